"""RMSNorm over the last dimension, Triton forward and hand-derived backward.

Forward (per row x of width H, statistics in float32):
    r = 1 / sqrt(mean(x^2) + eps),   n = x * r,   y = n * w'     with w' = w (Llama) or 1 + w (Gemma)
Casts follow transformers exactly: Llama rounds n to x.dtype *before* multiplying by w (result in the promoted
dtype of x and w); Gemma multiplies by (1 + w) in float32 and rounds once at the end.

Backward (m = dy * w', everything in float32; the cast of n is treated as the identity, as autograd does):
    dr/dx_j = -r^3 x_j / H  =>  dx = r * (m - n * sum(m * n) / H)
    dw      = sum over rows of dy * n        (Llama uses the rounded n, the value that multiplied w)
The forward saves only r (one float per row). Rows that fit one block go through the kernels as tiles of BLOCK_ROWS
rows (~TILE_ELEMENTS elements, see rows_per_tile): the forward is one program per tile; the backward a persistent
grid of BWD_PROGRAMS_PER_SM programs per SM, each walking a contiguous range of tiles and keeping its partial dw in
float32 registers, one (H,) partial per program summed at the end. Rows wider than one block (H > _triton.MAX_BLOCK)
are one row per program (backward: per loop step), looping over column blocks instead of holding the row in
registers.

Residual add fused in front (forward only, for generation's no-grad forwards), with residual stream x and a block's
output d (Granite: times a residual scale c, the product rounded first as `d * c` rounds; in float32 the wrapper
forms d * c with torch first, since without a cast in between the compiler may fuse the product into the add):
    z = round(x + round(d * c)),   y = RMSNorm(z)            (z in x.dtype, the value `x + d * c` gives)
z is written out (it is the next residual stream) and normalised by the same code as above, so y is bit for bit
RMSNorm(z) of the plain kernel; one launch reads x and d once instead of an add kernel plus a norm kernel.
"""
from __future__ import annotations

import torch

from ._triton import alloc, as_rows, block_and_warps, num_programs, tl, triton


if triton is not None:

    @triton.jit
    def _residual_sum(x_ptrs, d_ptrs, z_ptrs, mask, d_scale, HAS_RESIDUAL: tl.constexpr, SCALE_D: tl.constexpr,
                      STORE_Z: tl.constexpr):
        """The float32 block the norm sees: x, or z = round(x + round(d * c)) (stored to z_ptrs when STORE_Z)."""
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
            if SCALE_D:
                d = (d * d_scale).to(x_ptrs.dtype.element_ty).to(tl.float32)
            z = (x + d).to(x_ptrs.dtype.element_ty)
            if STORE_Z:
                tl.store(z_ptrs, z, mask=mask)
            x = z.to(tl.float32)
        return x

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, W, Y, RSTD, D, Z, x_row_stride, y_row_stride, d_row_stride, z_row_stride, n_rows, n_cols, eps, d_scale,
        UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr, SCALE_D: tl.constexpr,
    ):
        if SINGLE_BLOCK:  # a tile of BLOCK_ROWS whole rows
            rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < n_rows
            cols = tl.arange(0, BLOCK)
            col_ok = cols < n_cols
            mask = row_ok[:, None] & col_ok[None, :]
            x = _residual_sum(X + rows[:, None] * x_row_stride + cols[None, :],
                              D + rows[:, None] * d_row_stride + cols[None, :],
                              Z + rows[:, None] * z_row_stride + cols[None, :], mask, d_scale, HAS_RESIDUAL, SCALE_D,
                              True)
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            n = x * rstd[:, None]
            if UNIT_OFFSET:
                y = n * (1.0 + w[None, :])
            else:
                y = n.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
            tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
            tl.store(RSTD + rows, rstd, mask=row_ok)
        else:  # one row per program, wider than a block: loops over column blocks
            row = tl.program_id(0).to(tl.int64)
            X += row * x_row_stride
            Y += row * y_row_stride
            D += row * d_row_stride
            Z += row * z_row_stride
            sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = _residual_sum(X + cols, D + cols, Z + cols, cols < n_cols, d_scale, HAS_RESIDUAL, SCALE_D, True)
                sum_sq += x * x
            rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                # z is recomputed from x and d (the same rounding), not read back from Z: no ordering to rely on
                x = _residual_sum(X + cols, D + cols, Z + cols, mask, d_scale, HAS_RESIDUAL, SCALE_D, False)
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
        BLOCK_ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = pid.to(tl.int64) * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        DW_PARTIAL += pid.to(tl.int64) * n_cols
        if SINGLE_BLOCK:
            # tiles of BLOCK_ROWS whole rows (rows_per_program is a multiple of BLOCK_ROWS); rows past row_end load
            # as zeros (dy = 0: no dw contribution) and are not stored
            cols = tl.arange(0, BLOCK)
            col_ok = cols < n_cols
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            if UNIT_OFFSET:
                w = w + 1.0
            dw_acc = tl.zeros([BLOCK_ROWS, BLOCK], dtype=tl.float32)
            for r0 in range(row_start, row_end, BLOCK_ROWS):
                rows = r0 + tl.arange(0, BLOCK_ROWS)
                row_ok = rows < row_end
                mask = row_ok[:, None] & col_ok[None, :]
                dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
                n = x * rstd[:, None]
                m = dy * w[None, :]
                dx = rstd[:, None] * (m - n * (tl.sum(m * n, axis=1) / n_cols)[:, None])
                tl.store(DX + rows[:, None] * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    if UNIT_OFFSET:
                        dw_acc += dy * n
                    else:
                        dw_acc += dy * n.to(X.dtype.element_ty).to(tl.float32)
            if COMPUTE_DW:
                tl.store(DW_PARTIAL + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
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
        block_rows = rows_per_tile(block) if single else 1
        if n_rows > 0:
            _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
                x2, weight_c, y, rstd, x2, x2, x2.stride(0), y.stride(0), 0, 0, n_rows, n_cols, eps, 1.0,
                UNIT_OFFSET=unit_offset, BLOCK=block, SINGLE_BLOCK=single, BLOCK_ROWS=block_rows,
                HAS_RESIDUAL=False, SCALE_D=False, num_warps=num_warps,
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
        block_rows = rows_per_tile(block) if single else 1
        n_tiles = triton.cdiv(n_rows, block_rows)
        n_programs = num_programs(x2.device, n_tiles, per_sm=BWD_PROGRAMS_PER_SM if single else 1)
        rows_per_program = triton.cdiv(n_tiles, n_programs) * block_rows if n_rows else 0
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
                BLOCK_ROWS=block_rows, num_warps=num_warps,
            )
        dw = None
        if compute_dw:
            dw = (dw_partial.sum(0) if n_rows else torch.zeros(n_cols, device=x2.device)).to(ctx.weight_dtype)
        return dx.view(ctx.x_shape), dw, None, None


# Rows that fit one block are processed TILE_ELEMENTS at a time, as a (BLOCK_ROWS, BLOCK) tile: many short rows
# (Qwen3's q_norm / k_norm: 2048 tokens x 32 heads = 65,536 rows of 128) would otherwise be one 128-element row per
# program (forward) or per loop step of a one-program-per-SM backward, a few hundred bytes in flight per SM (the
# loads of one step wait on the previous step), far from what hides the memory latency. The backward keeps a
# persistent grid (each program's dw partial is one (n_cols,) row of the buffer summed at the end), at
# BWD_PROGRAMS_PER_SM programs per SM so loads from several tiles are in flight on each SM.
TILE_ELEMENTS = 4096
MAX_BLOCK_ROWS = 64
BWD_PROGRAMS_PER_SM = 2


def rows_per_tile(block: int) -> int:
    """BLOCK_ROWS for rows of `block` columns (a power of two, as tl.arange needs): 32 rows of 128, 2 of 2048,
    1 from 4096 up."""
    return max(1, min(MAX_BLOCK_ROWS, TILE_ELEMENTS // block))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension with the Triton kernels; same result and casts as ``rms_norm_reference``."""
    if triton is None:
        raise RuntimeError("rms_norm: Triton is not installed; use rms_norm_reference (or pip install triton)")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    return RMSNormFunction.apply(x, weight, float(eps), bool(unit_offset))


def add_rms_norm(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False,
                 d_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(z), z) with z = x + d (or x + d * d_scale) in x's dtype, one Triton launch; forward only (no
    autograd: it refuses inputs that require grad while grad mode is on). Same values as
    ``add_rms_norm_reference``: z bit for bit, y as `rms_norm(z)`."""
    if triton is None:
        raise RuntimeError("add_rms_norm: Triton is not installed; use add_rms_norm_reference (or pip install triton)")
    _check_add_rms_norm(x, d, weight)
    if d_scale is not None and x.dtype == torch.float32:
        # in float32 no cast separates d * c from the add, and the compiler may fuse them into one FMA (one
        # rounding, not the two of `x + d * c`): the product is formed first, as the decoder forms it
        d, d_scale = d * d_scale, None
    shape = x.shape
    x2, d2 = as_rows(x), as_rows(d)
    n_rows, n_cols = x2.shape
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    y = alloc((n_rows, n_cols), out_dtype, x.device)
    z = alloc((n_rows, n_cols), x.dtype, x.device)
    rstd = alloc((n_rows,), torch.float32, x.device)  # written, unused: the kernel is the training forward's
    block, num_warps, single = block_and_warps(n_cols)
    block_rows = rows_per_tile(block) if single else 1
    if n_rows > 0:
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x2, weight.contiguous(), y, rstd, d2, z, x2.stride(0), y.stride(0), d2.stride(0), z.stride(0), n_rows,
            n_cols, float(eps), 1.0 if d_scale is None else float(d_scale),
            UNIT_OFFSET=bool(unit_offset), BLOCK=block, SINGLE_BLOCK=single, BLOCK_ROWS=block_rows,
            HAS_RESIDUAL=True, SCALE_D=d_scale is not None, num_warps=num_warps,
        )
    return y.view(shape), z.view(shape)


def _check_add_rms_norm(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"add_rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if d.shape != x.shape or d.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: the residual input {tuple(x.shape)} {x.dtype} and the added block output "
                         f"{tuple(d.shape)} {d.dtype} must have the same shape and dtype")
    if torch.is_grad_enabled() and (x.requires_grad or d.requires_grad or weight.requires_grad):
        raise RuntimeError("add_rms_norm has no backward (it serves generation's no-grad forwards): call it under "
                           "torch.no_grad(), or use x + d followed by rms_norm for training")


def add_rms_norm_reference(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float,
                           unit_offset: bool = False, d_scale: float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """z = x + d (or x + d * d_scale, as the decoder layer writes it), then ``rms_norm_reference(z)``: (y, z)."""
    _check_add_rms_norm(x, d, weight)
    z = x + d if d_scale is None else x + d * d_scale
    return rms_norm_reference(z, weight, eps, unit_offset), z


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Exactly the casts of transformers: statistics in float32; Llama casts the normalised value back to the
    input dtype *before* multiplying by ``w``; Gemma multiplies by ``1 + w`` in float32 and casts last."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)
