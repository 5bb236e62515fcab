"""Gated linear units y = act(gate) * up (SwiGLU, GeGLU exact and tanh), Triton forward and backward.

Forward, elementwise in float32, one rounding to the input dtype:
    silu:      a(g) = g * s,                      s = sigmoid(g)
    gelu:      a(g) = g * P,                      P = (1 + erf(g / sqrt 2)) / 2
    gelu_tanh: a(g) = g * (1 + t) / 2,            t = tanh(z), z = sqrt(2/pi) * (g + 0.044715 g^3)
Backward (dy given):  d_up = dy * a(g),  d_gate = dy * up * a'(g), with
    silu:      a' = s * (1 + g * (1 - s))
    gelu:      a' = P + g * exp(-g^2 / 2) / sqrt(2 pi)
    gelu_tanh: a' = (1 + t) / 2 + g / 2 * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 g^2)
The backward recomputes a(g) from the saved gate instead of saving it (no extra activation memory).
gelu_tanh is evaluated through (1 + tanh z) / 2 = sigmoid(2z): exact algebra, no tanh needed (not in every
Triton version), and no cancellation in the negative tail where tanh z -> -1.
glu() allocates fresh gradients (the inputs may be used elsewhere; the fused LoRA MLP calls it too, under autograd
in its backward). glu_packed(gate_up) takes one fused projection output (..., 2I), gate = the first I features, up =
the last I: the same kernel on its two halves (views), and its backward writes d gate and d up into one (..., 2I)
gradient, which two separate inputs would need concatenated (a copy of the whole gradient: what a split's backward
does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import alloc, tl, triton


ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_ACT_ID = {name: i for i, name in enumerate(ACTIVATIONS)}
_BLOCK = 1024  # elements per program: 8 per thread at 4 warps, i.e. 16-byte accesses in bf16


if triton is not None:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        """(a(g), a'(g)) in float32 for ACT 0 = silu, 1 = gelu (erf), 2 = gelu_tanh."""
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            p = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            a = g * p
            da = p + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        else:
            # (1 + t) / 2 = sigmoid(2z) and (1 - t^2) / 2 = 2 sigmoid(2z) (1 - sigmoid(2z)): no cancellation near t = -1
            q = tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
            a = g * q
            da = q + 2.0 * g * q * (1.0 - q) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        return a, da

    @triton.jit
    def _glu_kernel(
        G, U, DY, OUT0, OUT1, g_row_stride, u_row_stride, dy_row_stride, o0_row_stride, o1_row_stride,
        n_cols, n_col_blocks,
        ACT: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Forward: OUT0 = a(G) * U.  Backward: OUT0 = dgate, OUT1 = dup.  One block of one row per program."""
        pid = tl.program_id(0).to(tl.int64)
        row = pid // n_col_blocks
        cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        out = OUT0 + row * o0_row_stride + cols
        if BACKWARD:
            dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out, (dy * u * da).to(OUT0.dtype.element_ty), mask=mask)
            tl.store(OUT1 + row * o1_row_stride + cols, (dy * a).to(OUT1.dtype.element_ty), mask=mask)
        else:
            tl.store(out, (a * u).to(OUT0.dtype.element_ty), mask=mask)


def _as_rows(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring every tensor to (rows, cols) with unit column stride, as views where possible. All contiguous:
    one long row (fewest masked lanes); otherwise (..., I) -> (rows, I), e.g. the gate/up halves of a fused
    gate_up projection output stay views with a row stride of 2I."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, t.numel()) for t in tensors]
    return [(t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, t.shape[-1]) for t in tensors]


def _glu_launch(gate, up, dy, act_id: int, backward: bool, grads: tuple[torch.Tensor, torch.Tensor] | None = None):
    """grads (backward only): (dgate, dup) to write into, views with unit column stride shaped as gate and up."""
    rows = _as_rows([gate, up] + ([dy] if backward else []) + (list(grads) if grads is not None else []))
    n_rows, n_cols = rows[0].shape
    if grads is not None:
        out0, out1 = rows[-2], rows[-1]
    else:
        out0 = alloc((n_rows, n_cols), gate.dtype, gate.device)
        out1 = alloc((n_rows, n_cols), up.dtype, up.device) if backward else out0
    dy_rows = rows[2] if backward else rows[0]
    n_col_blocks = triton.cdiv(n_cols, _BLOCK)
    if n_rows * n_cols > 0:
        _glu_kernel[(n_rows * n_col_blocks,)](
            rows[0], rows[1], dy_rows, out0, out1,
            rows[0].stride(0), rows[1].stride(0), dy_rows.stride(0), out0.stride(0), out1.stride(0),
            n_cols, n_col_blocks, ACT=act_id, BACKWARD=backward, BLOCK=_BLOCK, num_warps=4,
        )
    if grads is not None:
        return grads
    if backward:
        return out0.view(gate.shape), out1.view(up.shape)
    return out0.view(gate.shape)


def _activation_id(activation: str) -> int:
    if activation not in _ACT_ID:
        raise ValueError(f"unknown GLU activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    return _ACT_ID[activation]


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act_id: int) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act_id = act_id
        return _glu_launch(gate, up, None, act_id, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        dgate, dup = _glu_launch(gate, up, dy, ctx.act_id, backward=True)
        return dgate, dup, None


class PackedGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, act_id: int) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        ctx.act_id = act_id
        gate, up = _halves(gate_up)
        return _glu_launch(gate, up, None, act_id, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        d = alloc(gate_up.shape, gate_up.dtype, gate_up.device)
        _glu_launch(*_halves(gate_up), dy, ctx.act_id, backward=True, grads=_halves(d))
        return d, None


def _halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = gate_up.shape[-1] // 2
    return gate_up[..., :i], gate_up[..., i:]


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up fused in one Triton kernel (and one for the backward); output in gate's dtype."""
    if triton is None:
        raise RuntimeError("glu: Triton is not installed; use glu_reference (or pip install triton)")
    act_id = _activation_id(activation)
    if gate.shape != up.shape:
        raise ValueError(f"glu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return GLUFunction.apply(gate, up, act_id)


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown GLU activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")


def glu_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of gate_up (..., 2I) = [gate | up], one Triton kernel each way; the gradient comes back as one
    (..., 2I) tensor (module docstring). Same values as `glu` on the two halves."""
    if triton is None:
        raise RuntimeError("glu_packed: Triton is not installed; use glu_packed_reference (or pip install triton)")
    act_id = _activation_id(activation)
    _check_packed(gate_up)
    return PackedGLUFunction.apply(gate_up, act_id)


def glu_packed_reference(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    _check_packed(gate_up)
    return glu_reference(*_halves(gate_up), activation)


def _check_packed(gate_up: torch.Tensor) -> None:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"glu_packed: the last dimension holds gate and up halves, so it must be even; got "
                         f"{tuple(gate_up.shape)}")
