"""LayerNorm over the last dimension (bias optional), Triton forward and hand-derived backward.

Forward (per row x of width H, float32 statistics, biased variance as F.layer_norm):
    mu = mean(x),  r = 1 / sqrt(mean((x - mu)^2) + eps),  n = (x - mu) * r,  y = n * w + b   (cast to x.dtype)
Backward (g = dy * w, all float32):
    dn/dx is the projection that removes the mean of g and its component along n:
    dx = r * (g - mean(g) - n * mean(g * n))
    dw = sum over rows of dy * n,   db = sum over rows of dy
The forward saves mean and r (two floats per row). The backward uses a persistent grid of ~SM-count programs, each
walking a range of rows and keeping partial dw / db in float32 registers; the partials are summed at the end.
Rows wider than one block loop over column blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import alloc, as_rows, block_and_warps, num_programs, tl, triton


if triton is not None:

    @triton.jit
    def _layer_norm_fwd_kernel(
        X, W, B, Y, MEAN, RSTD, x_row_stride, y_row_stride, n_cols, eps,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        X += row * x_row_stride
        Y += row * y_row_stride
        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=0) / n_cols
            xc = tl.where(mask, x - mean, 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
            y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                acc += tl.load(X + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            mean = tl.sum(acc, axis=0) / n_cols
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):  # centred second pass: no E[x^2] - mu^2 cancellation
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                xc = tl.where(mask, tl.load(X + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
                acc += xc * xc
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                y = (x - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _layer_norm_bwd_kernel(
        DY, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
        dy_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, rows_per_program,
        COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        DW_PARTIAL += pid.to(tl.int64) * n_cols
        DB_PARTIAL += pid.to(tl.int64) * n_cols
        if SINGLE_BLOCK:
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
            db_acc = tl.zeros([BLOCK], dtype=tl.float32)
            for row in range(row_start, row_end):
                dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(MEAN + row)
                rstd = tl.load(RSTD + row)
                n = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy * w
                dx = rstd * (g - tl.sum(g, axis=0) / n_cols - n * (tl.sum(g * n, axis=0) / n_cols))
                tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    dw_acc += dy * n
                if COMPUTE_DB:
                    db_acc += dy
            if COMPUTE_DW:
                tl.store(DW_PARTIAL + cols, dw_acc, mask=mask)
            if COMPUTE_DB:
                tl.store(DB_PARTIAL + cols, db_acc, mask=mask)
        else:
            # Wide rows: partial dw/db in global memory (zeroed by the caller), each element updated by one program.
            for row in range(row_start, row_end):
                mean = tl.load(MEAN + row)
                rstd = tl.load(RSTD + row)
                sum_g = tl.zeros([BLOCK], dtype=tl.float32)
                sum_gn = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    sum_g += g
                    sum_gn += g * tl.where(mask, (x - mean) * rstd, 0.0)
                mean_g = tl.sum(sum_g, axis=0) / n_cols
                mean_gn = tl.sum(sum_gn, axis=0) / n_cols
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < n_cols
                    dy = tl.load(DY + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    n = (x - mean) * rstd
                    dx = rstd * (g - mean_g - n * mean_gn)
                    tl.store(DX + row * dx_row_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
                    if COMPUTE_DW:
                        acc = tl.load(DW_PARTIAL + cols, mask=mask, other=0.0)
                        tl.store(DW_PARTIAL + cols, acc + dy * n, mask=mask)
                    if COMPUTE_DB:
                        acc = tl.load(DB_PARTIAL + cols, mask=mask, other=0.0)
                        tl.store(DB_PARTIAL + cols, acc + dy, mask=mask)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = as_rows(x)
        n_rows, n_cols = x2.shape
        y = alloc((n_rows, n_cols), x.dtype, x.device)
        mean = alloc((n_rows,), torch.float32, x.device)
        rstd = alloc((n_rows,), torch.float32, x.device)
        weight_c = weight.contiguous()
        bias_c = bias.contiguous() if bias is not None else weight_c  # dummy pointer when HAS_BIAS is False
        block, num_warps, single = block_and_warps(n_cols)
        if n_rows > 0:
            _layer_norm_fwd_kernel[(n_rows,)](
                x2, weight_c, bias_c, y, mean, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                HAS_BIAS=bias is not None, BLOCK=block, SINGLE_BLOCK=single, num_warps=num_warps,
            )
        ctx.save_for_backward(x2, weight_c, mean, rstd)
        ctx.x_shape = shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = as_rows(dy)
        dx = alloc((n_rows, n_cols), x2.dtype, x2.device)
        compute_dw = ctx.needs_input_grad[1]
        compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        block, num_warps, single = block_and_warps(n_cols)
        n_programs = num_programs(x2.device, n_rows)
        rows_per_program = triton.cdiv(n_rows, n_programs) if n_rows else 0
        make = alloc if single else torch.zeros  # the looped path accumulates into the partials
        dw_partial = make((n_programs, n_cols), dtype=torch.float32, device=x2.device) if compute_dw else rstd
        db_partial = make((n_programs, n_cols), dtype=torch.float32, device=x2.device) if compute_db else rstd
        if n_rows > 0:
            _layer_norm_bwd_kernel[(n_programs,)](
                dy2, x2, weight, mean, rstd, dx, dw_partial, db_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, BLOCK=block, SINGLE_BLOCK=single,
                num_warps=num_warps,
            )
        empty = torch.zeros(n_cols, device=x2.device)
        dw = (dw_partial.sum(0) if n_rows else empty).to(ctx.weight_dtype) if compute_dw else None
        db = (db_partial.sum(0) if n_rows else empty).to(ctx.bias_dtype) if compute_db else None
        return dx.view(ctx.x_shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension with the Triton kernels; matches ``F.layer_norm`` (output in x.dtype)."""
    if triton is None:
        raise RuntimeError("layer_norm: Triton is not installed; use layer_norm_reference (or pip install triton)")
    if weight is None:  # elementwise_affine=False: a constant weight of ones, no gradient for it
        weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    if weight.shape != (x.shape[-1],) or (bias is not None and bias.shape != (x.shape[-1],)):
        raise ValueError(
            f"layer_norm: weight {tuple(weight.shape)} / bias {None if bias is None else tuple(bias.shape)} "
            f"must both have shape ({x.shape[-1]},), the hidden size"
        )
    return LayerNormFunction.apply(x, weight, bias, float(eps))


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
