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

Decode (generation, forward only): `rope_cache_write` rotates one new token per slot s and writes its key and value
straight into the static KV cache at position p_s = lengths[s] - 1 (read on the device):
    q_out[s] = rot(q[s]),   K[s, p_s] = rot(k[s]),   V[s, p_s] = v[s]
one launch instead of a RoPE kernel plus two index_put writes. Partial rotary (cos/sin narrower than head_dim, width
r): rot applies the formula above to features [0, r) (halves of r/2) and copies features [r, head_dim) unchanged.
The rotation is the same jitted code as the training kernel's (`_rotate_heads`), so q_out and the cached key are bit
for bit what `apply_rope` followed by the cache writes gives.

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
    def _rotate_heads(SRC, DST, src_sh, dst_sh, n_heads, half_dim, c1, c2, s1, s2,
                      BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """The first 2 * half_dim features of every head of one token: DST = rot(SRC) in float32, cast on store."""
        d = tl.arange(0, BLOCK_HALF)
        h = tl.arange(0, BLOCK_H)[:, None]
        mask = (h < n_heads) & (d < half_dim)[None, :]
        src = SRC + h * src_sh + d[None, :]
        dst = DST + h * dst_sh + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half_dim, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * c1 - x2 * s1).to(DST.dtype.element_ty), mask=mask)
        tl.store(dst + half_dim, (x2 * c2 + x1 * s2).to(DST.dtype.element_ty), mask=mask)

    @triton.jit
    def _copy_heads(SRC, DST, src_sh, dst_sh, n_heads, start, stop, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        """Features [start, stop) of every head of one token, copied (cast to DST's dtype)."""
        d = start + tl.arange(0, BLOCK_W)
        h = tl.arange(0, BLOCK_H)[:, None]
        mask = (h < n_heads) & (d < stop)[None, :]
        x = tl.load(SRC + h * src_sh + d[None, :], mask=mask, other=0.0)
        tl.store(DST + h * dst_sh + d[None, :], x.to(DST.dtype.element_ty), mask=mask)

    @triton.jit
    def _cos_sin_halves(COS, SIN, half_dim, BLOCK_HALF: tl.constexpr):
        d = tl.arange(0, BLOCK_HALF)
        d_mask = d < half_dim
        c1 = tl.load(COS + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + half_dim + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + half_dim + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        return c1, c2, s1, s2

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
        cs = b * cs_sb + t * cs_st
        c1, c2, s1, s2 = _cos_sin_halves(COS + cs, SIN + cs, half_dim, BLOCK_HALF)
        if BACKWARD:  # transpose of the rotation: (s1, s2) -> (-s2, -s1)
            s1, s2 = -s2, -s1
        _rotate_heads(Q + b * q_sb + t * q_st, QO + b * qo_sb + t * qo_st, q_sh, qo_sh, n_q_heads, half_dim,
                      c1, c2, s1, s2, BLOCK_QH, BLOCK_HALF)
        _rotate_heads(K + b * k_sb + t * k_st, KO + b * ko_sb + t * ko_st, k_sh, ko_sh, n_k_heads, half_dim,
                      c1, c2, s1, s2, BLOCK_KH, BLOCK_HALF)

    @triton.jit
    def _rope_cache_write_kernel(
        Q, K, V, COS, SIN, QO, KC, VC, LENGTHS,
        q_ss, q_sh, k_ss, k_sh, v_ss, v_sh, qo_ss, qo_sh, cs_ss,
        kc_ss, kc_sm, kc_sh, vc_ss, vc_sm, vc_sh,
        n_q_heads, n_k_heads, half_dim, head_dim,
        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
        BLOCK_D: tl.constexpr, HAS_TAIL: tl.constexpr,
    ):
        # One program per slot (one new token each): rotate q into QO, rotate k into the cache row, copy v.
        s = tl.program_id(0).to(tl.int64)
        pos = tl.load(LENGTHS + s).to(tl.int64) - 1
        c1, c2, s1, s2 = _cos_sin_halves(COS + s * cs_ss, SIN + s * cs_ss, half_dim, BLOCK_HALF)
        q, qo = Q + s * q_ss, QO + s * qo_ss
        k, kc = K + s * k_ss, KC + s * kc_ss + pos * kc_sm
        _rotate_heads(q, qo, q_sh, qo_sh, n_q_heads, half_dim, c1, c2, s1, s2, BLOCK_QH, BLOCK_HALF)
        _rotate_heads(k, kc, k_sh, kc_sh, n_k_heads, half_dim, c1, c2, s1, s2, BLOCK_KH, BLOCK_HALF)
        if HAS_TAIL:  # partial rotary: the features past the rotated ones pass through
            _copy_heads(q, qo, q_sh, qo_sh, n_q_heads, 2 * half_dim, head_dim, BLOCK_QH, BLOCK_TAIL)
            _copy_heads(k, kc, k_sh, kc_sh, n_k_heads, 2 * half_dim, head_dim, BLOCK_KH, BLOCK_TAIL)
        _copy_heads(V + s * v_ss, VC + s * vc_ss + pos * vc_sm, v_sh, vc_sh, n_k_heads, 0, head_dim,
                    BLOCK_KH, BLOCK_D)


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


def _check_cache_write(q, k, v, cos, sin, k_cache, v_cache, lengths) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"rope_cache_write: q, k, v must be (slots, heads, 1, head_dim) (one new token per slot), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    S, Hk, _, D = k.shape
    if q.shape[0] != S or q.shape[3] != D:
        raise ValueError(f"rope_cache_write: q {tuple(q.shape)} and k {tuple(k.shape)} differ in slots or head_dim")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != S or k_cache.shape[2:] != (Hk, D):
        raise ValueError(f"rope_cache_write: caches must be ({S}, max_len, {Hk}, {D}), got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    r = cos.shape[-1]
    if cos.shape != sin.shape or cos.numel() != S * r or r % 2 or r > D:
        raise ValueError(f"rope_cache_write: cos/sin must hold one row of even width <= {D} per slot ({S}), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if lengths.shape != (S,):
        raise ValueError(f"rope_cache_write: lengths must be ({S},), got {tuple(lengths.shape)}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("rope_cache_write has no backward (generation only): call it under torch.no_grad()")


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Decode step, one launch: rotated q (returned, (S, Hq, 1, D), a transposed view of a fresh (S, 1, Hq, D));
    rotated k and v written to k_cache / v_cache (S, max_len, Hk, D) at row lengths[s] - 1 of slot s.
    q, k, v (S, H, 1, D) with unit stride on D (views of a fused projection output are fine); cos, sin: one row
    per slot, (S, 1, r) float32, r <= D (partial rotary: features past r are copied); lengths (S,) int32."""
    if triton is None:
        raise RuntimeError("rope_cache_write: Triton is not installed (use the kernels.rope_cache_write dispatcher)")
    _check_cache_write(q, k, v, cos, sin, k_cache, v_cache, lengths)
    S, Hq, _, D = q.shape
    Hk = k.shape[1]
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    cos, sin = _unit_last_stride(cos.float()).reshape(S, -1), _unit_last_stride(sin.float()).reshape(S, -1)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rope_cache_write: the caches need unit stride on head_dim (they are written in place)")
    r = cos.shape[-1]
    qo = alloc((S, 1, Hq, D), q.dtype, q.device)
    half = r // 2
    block_qh, block_kh = triton.next_power_of_2(Hq), triton.next_power_of_2(Hk)
    block_half, block_d = triton.next_power_of_2(max(half, 1)), triton.next_power_of_2(D)
    block_tail = triton.next_power_of_2(max(D - r, 1))
    elems = (block_qh + block_kh) * block_d
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2
    if S > 0:
        _rope_cache_write_kernel[(S,)](
            q, k, v, cos, sin, qo, k_cache, v_cache, lengths,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), qo.stride(0), qo.stride(2),
            cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            Hq, Hk, half, D,
            BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half, BLOCK_TAIL=block_tail, BLOCK_D=block_d,
            HAS_TAIL=r < D, num_warps=num_warps,
        )
    return qo.transpose(1, 2)


def cache_write_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          lengths: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """k, v (S, Hk, 1, D) (already rotated) into row lengths[s] - 1 of slot s of k_cache / v_cache (S, M, Hk, D).
    `where`: (arange(S), lengths - 1) as long tensors, when the caller keeps them for every layer of a step."""
    if where is None:
        where = (torch.arange(k.shape[0], device=k.device), lengths.to(torch.long) - 1)
    k_cache.index_put_(where, k[:, :, 0])
    v_cache.index_put_(where, v[:, :, 0])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """As transformers does it: cos/sin cast to the activation dtype, then q*cos + rotate_half(q)*sin."""
    cos = cos.unsqueeze(2).to(q.dtype)
    sin = sin.unsqueeze(2).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
