"""Rotary position embedding, half-rotation layout (transformers' rotate_half), Triton forward and backward.

q, k: (batch, seq, heads, head_dim) (any strides with unit stride on head_dim; Hq may differ from Hk, GQA);
cos, sin: (batch or 1, seq, head_dim) in float32, one row per token, so packed sequences with per-token positions work.

Forward, with x = [x1, x2] split in halves of head_dim (and cos = [c1, c2], sin = [s1, s2]):
    y = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
    =>  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
Backward: y = A x with A = diag(cos) + diag(sin) R, so dx = A^T dy = cos * dy + R^T (sin * dy), R^T [a1, a2] = [a2, -a1]:
    dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1
i.e. the forward formula with (s1, s2) replaced by (-s2, -s1): for the usual cos/sin (equal halves) this is the
rotation by -theta. One kernel serves both directions. The rotation is computed in float32 and cast to q.dtype.

Outputs are fresh contiguous tensors, not written into q/k in place: q/k usually come from views of a projection
output (split/chunk/view of a fused qkv), and autograd refuses in-place writes on outputs of multi-view functions.
Fresh outputs move the same bytes (read q, k once, write once), and since the backward saves only cos/sin the
inputs are freed just the same, so the only cost is a transient q+k buffer during the forward.
"""
from __future__ import annotations

import torch

from ._triton import alloc, tl, triton


if triton is not None:

    @triton.jit
    def _rope_kernel(
        Q, K, COS, SIN, QO, KO, seq_len,
        q_sb, q_st, q_sh, k_sb, k_st, k_sh, qo_sb, qo_st, qo_sh, ko_sb, ko_st, ko_sh, cs_sb, cs_st,
        n_q_heads, n_k_heads, half_dim,
        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        # One program per token: every q and k head of that token against one cos/sin row.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        t = pid % seq_len
        d = tl.arange(0, BLOCK_HALF)
        d_mask = d < half_dim
        cs = b * cs_sb + t * cs_st
        c1 = tl.load(COS + cs + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + cs + half_dim + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + cs + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + cs + half_dim + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        if BACKWARD:  # transpose of the rotation: (s1, s2) -> (-s2, -s1)
            s1, s2 = -s2, -s1

        h = tl.arange(0, BLOCK_QH)[:, None]
        mask = (h < n_q_heads) & d_mask[None, :]
        src = Q + b * q_sb + t * q_st + h * q_sh + d[None, :]
        dst = QO + b * qo_sb + t * qo_st + h * qo_sh + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half_dim, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * c1 - x2 * s1).to(QO.dtype.element_ty), mask=mask)
        tl.store(dst + half_dim, (x2 * c2 + x1 * s2).to(QO.dtype.element_ty), mask=mask)

        h = tl.arange(0, BLOCK_KH)[:, None]
        mask = (h < n_k_heads) & d_mask[None, :]
        src = K + b * k_sb + t * k_st + h * k_sh + d[None, :]
        dst = KO + b * ko_sb + t * ko_st + h * ko_sh + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half_dim, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * c1 - x2 * s1).to(KO.dtype.element_ty), mask=mask)
        tl.store(dst + half_dim, (x2 * c2 + x1 * s2).to(KO.dtype.element_ty), mask=mask)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope_launch(q, k, cos, sin, backward: bool):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    qo = alloc((B, T, Hq, D), q.dtype, q.device)
    ko = alloc((B, T, Hk, D), k.dtype, k.device)
    cs_sb = cos.stride(0) if cos.shape[0] == B else 0  # batch 1 broadcasts over the batch
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_qh, block_kh = triton.next_power_of_2(Hq), triton.next_power_of_2(Hk)
    elems = (block_qh + block_kh) * block_half
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2
    if B * T > 0:
        _rope_kernel[(B * T,)](
            q, k, cos, sin, qo, ko, T,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), cs_sb, cos.stride(1),
            Hq, Hk, half,
            BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=num_warps,
        )
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _rope_launch(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def _check_and_prepare_cos_sin(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (batch, seq, heads, head_dim), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must share batch, seq and head_dim with q {tuple(q.shape)}")
    if D % 2:
        raise ValueError(f"apply_rope: head_dim must be even for the half-rotation layout, got {D}")
    if cos.dim() == 2:  # (seq, head_dim): same positions for every sequence
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        raise ValueError(
            f"apply_rope: cos/sin must be ({B} or 1, {T}, {D}), got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    return _unit_last_stride(cos.float()), _unit_last_stride(sin.float())


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k with the Triton kernel; returns fresh (q_rot, k_rot) in q's/k's dtype."""
    if triton is None:
        raise RuntimeError("apply_rope: Triton is not installed; use apply_rope_reference (or pip install triton)")
    cos, sin = _check_and_prepare_cos_sin(q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """As transformers does it: cos/sin cast to the activation dtype, then q*cos + rotate_half(q)*sin."""
    cos = cos.unsqueeze(2).to(q.dtype)
    sin = sin.unsqueeze(2).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
