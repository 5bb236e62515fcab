"""gpt-oss's clamped SwiGLU over a fused gate_up projection output, one Triton launch each way.

Forward, per output column j of a row (gate, up the j-th pair of gate_up: columns 2j and 2j+1 when interleaved, as
gpt-oss stores them, else j and I + j):
    g = min(gate, limit),  u = clamp(up, -limit, limit),  y = (u + 1) * (g * sigmoid(alpha g))
computed as transformers computes it, one elementwise op at a time in the input dtype: every intermediate
(u + 1, alpha g, the sigmoid, the gate product, y) is rounded to that dtype, so the values are those of
`models.moe.clamped_swiglu` (the clamps are exact).
Backward (dy given), in float32 from the stored gate_up, each gradient rounded once:
    s = sigmoid(alpha g)
    d gate = dy (u + 1) s (1 + alpha g (1 - s))   where gate <= limit, else 0
    d up   = dy g s                               where -limit <= up <= limit, else 0
(d/dg of g sigmoid(alpha g) = s + alpha g s (1 - s); torch.clamp passes the gradient where its input lies within
the bounds, ends included: the same masks.) The gradient is one (rows, 2I) tensor in gate_up's layout.

Why a kernel: the same math as torch ops is about 7 launches forward and, chunked to bound its float32
temporaries, ~13 launches per chunk backward (12 chunks per gpt-oss-20b layer at seq 2048), each a full pass over
the width; this reads gate_up (and dy) once and writes once.
"""
from __future__ import annotations

import torch

from ._triton import alloc, round_bf16, tl, triton

_BLOCK = 1024  # output columns per program
_DTYPE_ID = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SUPPORTED_DTYPES = tuple(_DTYPE_ID)


if triton is not None:

    @triton.jit
    def _round(x, DT: tl.constexpr):
        """float32 x rounded to the input dtype (still float32): DT 0 float32, 1 bfloat16, 2 float16."""
        if DT == 1:
            x = round_bf16(x)
        elif DT == 2:
            x = x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def _clamped_swiglu_kernel(X, DY, OUT, x_row_stride, dy_row_stride, out_row_stride, width, n_col_blocks,
                               alpha, limit, INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
                               DT: tl.constexpr, BLOCK: tl.constexpr):
        """Forward: OUT (rows, I) = y.  Backward: OUT (rows, 2I) = d gate_up.  One block of one row per program."""
        pid = tl.program_id(0).to(tl.int64)
        row = pid // n_col_blocks
        j = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
        ok = j < width
        if INTERLEAVED:
            gate_col, up_col = 2 * j, 2 * j + 1
        else:
            gate_col, up_col = j, width + j
        x = X + row * x_row_stride
        gate = tl.load(x + gate_col, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x + up_col, mask=ok, other=0.0).to(tl.float32)
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        if BACKWARD:
            d = tl.load(DY + row * dy_row_stride + j, mask=ok, other=0.0).to(tl.float32)
            s = tl.sigmoid(alpha * g)
            dg = tl.where(gate > limit, 0.0, d * (u + 1.0) * s * (1.0 + alpha * g * (1.0 - s)))
            du = tl.where((up < -limit) | (up > limit), 0.0, d * g * s)
            out = OUT + row * out_row_stride
            tl.store(out + gate_col, _round(dg, DT).to(OUT.dtype.element_ty), mask=ok)
            tl.store(out + up_col, _round(du, DT).to(OUT.dtype.element_ty), mask=ok)
        else:
            s = _round(tl.sigmoid(_round(g * alpha, DT)), DT)
            y = _round(_round(u + 1.0, DT) * _round(g * s, DT), DT)
            tl.store(OUT + row * out_row_stride + j, y.to(OUT.dtype.element_ty), mask=ok)


def _launch(gate_up: torch.Tensor, dy: torch.Tensor | None, interleaved: bool, alpha: float, limit: float
            ) -> torch.Tensor:
    x = gate_up.reshape(-1, gate_up.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, width = x.shape[0], x.shape[1] // 2
    backward = dy is not None
    if backward:
        d = dy.reshape(-1, width)
        if d.stride(-1) != 1:
            d = d.contiguous()
        out = alloc((rows, 2 * width), gate_up.dtype, gate_up.device)
    else:
        d = x
        out = alloc((rows, width), gate_up.dtype, gate_up.device)
    n_col_blocks = triton.cdiv(width, _BLOCK)
    if rows * width > 0:
        _clamped_swiglu_kernel[(rows * n_col_blocks,)](
            x, d, out, x.stride(0), d.stride(0), out.stride(0), width, n_col_blocks, float(alpha), float(limit),
            INTERLEAVED=interleaved, BACKWARD=backward, DT=_DTYPE_ID[gate_up.dtype], BLOCK=_BLOCK, num_warps=4)
    return out.view(gate_up.shape if backward else (*gate_up.shape[:-1], width))


def _check(gate_up: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("clamped_swiglu: Triton is not installed; use models.moe.clamped_swiglu")
    if gate_up.dtype not in _DTYPE_ID:
        raise TypeError(f"clamped_swiglu kernel: dtype {gate_up.dtype} is not one of {list(_DTYPE_ID)}")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"clamped_swiglu: gate_up's last dimension holds gate and up, so it must be even; got "
                         f"{tuple(gate_up.shape)}")


def clamped_swiglu_forward(gate_up: torch.Tensor, interleaved: bool, alpha: float, limit: float) -> torch.Tensor:
    """y (..., I) of gate_up (..., 2I) (module docstring), no autograd."""
    _check(gate_up)
    return _launch(gate_up, None, interleaved, alpha, limit)


def clamped_swiglu_backward(gate_up: torch.Tensor, dy: torch.Tensor, interleaved: bool, alpha: float, limit: float
                            ) -> torch.Tensor:
    """d gate_up (..., 2I), in gate_up's dtype and layout, for the incoming gradient dy (..., I)."""
    _check(gate_up)
    return _launch(gate_up, dy, interleaved, alpha, limit)
