"""RMSNorm over the last dimension, Triton forward and hand-derived backward.

Forward (per row x of width H, statistics in float32):
    r = 1 / sqrt(mean(x^2) + eps),   n = x * r,   y = n * w'     with w' = w (Llama) or 1 + w (Gemma)
Casts follow transformers exactly: Llama rounds n to x.dtype *before* multiplying by w (result in the promoted
dtype of x and w); Gemma multiplies by (1 + w) in float32 and rounds once at the end.

Backward (m = dy * w', everything in float32; the cast of n is treated as the identity, as autograd does):
    dr/dx_j = -r^3 x_j / H  =>  dx = r * (m - n * sum(m * n) / H)
    dw      = sum over rows of dy * n        (Llama uses the rounded n, the value that multiplied w)
The forward saves only r (one float per row). The backward runs a persistent grid of ~SM-count programs, each
walking a contiguous range of rows and keeping its partial dw in float32 registers; the partials are summed at the end.
Rows wider than one block (H > _triton.MAX_BLOCK) loop over column blocks instead of holding the row in registers.
"""
from __future__ import annotations

import torch

from ._triton import alloc, as_rows, block_and_warps, num_programs, tl, triton


if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y, RSTD, x_row_stride, y_row_stride, n_cols, eps,
        UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        X += row * x_row_stride
        Y += row * y_row_stride
        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            n = x * rstd
            if UNIT_OFFSET:
                y = n * (1.0 + w)
            else:
                y = n.to(X.dtype.element_ty).to(tl.float32) * w
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(X + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                sum_sq += x * x
            rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                n = x * rstd
                if UNIT_OFFSET:
                    y = n * (1.0 + w)
                else:
                    y = n.to(X.dtype.element_ty).to(tl.float32) * w
                tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, RSTD, DX, DW_PARTIAL,
        dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, rows_per_program,
        UNIT_OFFSET: tl.constexpr, COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        DW_PARTIAL += pid.to(tl.int64) * n_cols
        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if UNIT_OFFSET:
                w = w + 1.0
            dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
            for row in range(row_start, row_end):
                dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                n = x * rstd
                m = dy * w
                dx = rstd * (m - n * (tl.sum(m * n, axis=0) / n_cols))
                tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    if UNIT_OFFSET:
                        dw_acc += dy * n
                    else:
                        dw_acc += dy * n.to(X.dtype.element_ty).to(tl.float32)
            if COMPUTE_DW:
                tl.store(DW_PARTIAL + cols, dw_acc, mask=mask)
        else:
            # Wide rows: two passes over column blocks per row; the partial dw lives in global memory (zeroed by
            # the caller) and each element is read-modified-written by the same program, so no atomics are needed.
            for row in range(row_start, row_end):
                rstd = tl.load(RSTD + row)
                dot = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    if UNIT_OFFSET:
                        w = w + 1.0
                    dot += dy * w * x * rstd
                c = tl.sum(dot, axis=0) / n_cols
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    if UNIT_OFFSET:
                        w = w + 1.0
                    n = x * rstd
                    dx = rstd * (dy * w - n * c)
                    tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if COMPUTE_DW:
                        if UNIT_OFFSET:
                            contrib = dy * n
                        else:
                            contrib = dy * n.to(X.dtype.element_ty).to(tl.float32)
                        acc = tl.load(DW_PARTIAL + cols, mask=mask, other=0.0)
                        tl.store(DW_PARTIAL + cols, acc + contrib, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
        shape = x.shape
        x2 = as_rows(x)
        n_rows, n_cols = x2.shape
        out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
        y = alloc((n_rows, n_cols), out_dtype, x.device)
        rstd = alloc((n_rows,), torch.float32, x.device)
        weight_c = weight.contiguous()
        block, num_warps, single = block_and_warps(n_cols)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](
                x2, weight_c, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                UNIT_OFFSET=unit_offset, BLOCK=block, SINGLE_BLOCK=single, num_warps=num_warps,
            )
        ctx.save_for_backward(x2, weight_c, rstd)
        ctx.unit_offset = unit_offset
        ctx.x_shape = shape
        ctx.weight_dtype = weight.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = as_rows(dy)
        dx = alloc((n_rows, n_cols), x2.dtype, x2.device)
        compute_dw = ctx.needs_input_grad[1]
        block, num_warps, single = block_and_warps(n_cols)
        n_programs = num_programs(x2.device, n_rows)
        rows_per_program = triton.cdiv(n_rows, n_programs) if n_rows else 0
        if compute_dw:
            make = alloc if single else torch.zeros  # looped path accumulates into it
            dw_partial = make((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        else:
            dw_partial = rstd  # unused placeholder pointer
        if n_rows > 0:
            _rms_norm_bwd_kernel[(n_programs,)](
                dy2, x2, weight, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                UNIT_OFFSET=ctx.unit_offset, COMPUTE_DW=compute_dw, BLOCK=block, SINGLE_BLOCK=single,
                num_warps=num_warps,
            )
        dw = None
        if compute_dw:
            dw = (dw_partial.sum(0) if n_rows else torch.zeros(n_cols, device=x2.device)).to(ctx.weight_dtype)
        return dx.view(ctx.x_shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension with the Triton kernels; same result and casts as ``rms_norm_reference``."""
    if triton is None:
        raise RuntimeError("rms_norm: Triton is not installed; use rms_norm_reference (or pip install triton)")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    return RMSNormFunction.apply(x, weight, float(eps), bool(unit_offset))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Exactly the casts of transformers: statistics in float32; Llama casts the normalised value back to the
    input dtype *before* multiplying by ``w``; Gemma multiplies by ``1 + w`` in float32 and casts last."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)
