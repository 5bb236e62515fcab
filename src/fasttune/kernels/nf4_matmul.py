"""Fused NF4 matmul for few rows (decode steps): y = x W^T + b with W stored as NF4, never materialised.

Shapes: x (M, K) bf16/fp16/fp32 with M small (the sequences of a decode step), W (N, K) an NF4Tensor (kernels/nf4.py:
the row-major flat element i = n K + k is code q_i, its block k_b = i // B, B = q.blocksize, B2 = q.blocksize2),
b (N,) or none, y (M, N) in x's dtype. The math, per output:
    a_kb    = DYN8[aq_kb] * A_{kb // B2} + offset                   (float32, two roundings: no fused multiply-add)
    v_{n,k} = NF4[q_{nK+k}] * a_{(nK+k) // B}                       (float32; q from byte i // 2, high nibble first)
    w_{n,k} = round_x(round_W(v_{n,k}))                             (to W's dtype, then x's: exactly the values
                                                                     lora.dense_weight(W, x.dtype) holds)
    y_{m,n} = round_x(sum_k x_{m,k} w_{n,k} + round_x(b_n))         (products and sum in float32, one rounding)
So the weights are those of the dequantise-then-matmul path (`nf4_matmul_reference`: the oracle, and what the CPU
path computes), bit for bit; only the order of the float32 sum differs from a cuBLAS GEMM's.

Why: at decode the dequantise-then-matmul path reads the 0.5 B of each packed weight, writes a 2 B bf16 copy and
reads it again in the GEMM (~4.5 B moved per weight, for 0.5 B of information); this kernel reads the 0.5 B (+ 1/64 B
of absmax code per weight) once. For few rows a GEMM against W is bound by reading W, so bytes are time.

Tiling. The MMA is taken transposed, acc (BLOCK_N, BLOCK_M) = W_tile x^T: W's rows are the large side, x's few rows
the small one (padded to 16, the smallest tl.dot size; the padding rows are masked, never read). A program owns
BLOCK_N rows of W and one range of K (split-K, see below) and walks it 64 columns (a "sub-block") at a time, NB
sub-blocks per loop iteration. When K and B are multiples of 64 (every real model: the "aligned" layout) a
sub-block starts at a flat index that is a multiple of 64 and lies inside one quantisation block, so its scale is
one value per row: one absmax code, one absmax2 and one DYN8 lookup per row per sub-block. Byte j of the sub-block
holds columns 2j (high nibble) and 2j+1 (low): rather than interleave the two nibble planes into one tile, x is
read at the even and at the odd columns and
    acc += W_even (BLOCK_N, 32) x_even^T (32, BLOCK_M) + W_odd (BLOCK_N, 32) x_odd^T (32, BLOCK_M).
One row of x (M = 1, batch-1 decode) skips the MMA by default: each lane keeps float32 partial sums of its weights
times x (FMAs on the CUDA cores, no padding to 16 rows, no reshuffle of the weight tile into an MMA operand
layout), reduced across the tile once at the end.
Any other layout (K or B not a multiple of 64: odd shapes, tests) takes each element's byte, nibble and scale from
its own flat index (gathers: slower, the same values).
Split-K: a weight with few row tiles (k/v projections, large M) is also split along K, SPLIT programs per row tile;
each writes its float32 partial sum to a (SPLIT, M, N) workspace, and a second kernel adds the SPLIT partials in
order, adds b and rounds: no atomics, deterministic. SPLIT = 1 writes y directly.

Dispatch (`nf4_matmul_wanted`): the fused kernel for at most `MAX_ROWS` rows where Triton runs (CUDA, or
FASTTUNE_KERNELS=triton); above, one dequantisation amortised over many rows and a cuBLAS GEMM is the better
plan. Both the forward with and without autograd use it (the backward never depends on how y was computed: it
dequantises W again for dx). Everything is launched with static shapes and no host sync: CUDA-graph capturable.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ._triton import alloc, round_bf16, tl, triton
from .fallbacks import Fallbacks
from .nf4 import NF4Tensor

log = logging.getLogger("fasttune.kernels")
FALLBACKS = Fallbacks("NF4 matmul", log)

# The fused kernel runs for x with at most this many rows (decode: the number of sequences in the step); above it,
# dequantise + cuBLAS. At 64 rows the product does 128 FLOPs per 0.5 B weight read (256 FLOP/B), about an H200's
# ridge point (~989 bf16 TFLOP/s over 4.8 TB/s, ~206 FLOP/B): past it, reading W stops being the bound the fused
# kernel removes. A guess at the crossover, not a measurement: the bench's M=64 rows say whether to move it.
MAX_ROWS = 64

SUB = 64  # columns per sub-block: the kernel's unit along K (two 32-wide MMAs)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class NF4MatmulConfig:
    """Launch shape: `block_n` rows of W per program, `split` programs along K per row tile, `subs_per_iter`
    64-column sub-blocks per loop iteration (loads in flight), Triton's num_warps / num_stages, and `use_dot`:
    tensor-core MMAs (x padded to 16 rows) or, for one row of x only, FMAs on the CUDA cores (no padding, no
    shuffle of the weight tile into an MMA layout); None: FMAs for M = 1, MMAs otherwise."""
    block_n: int = 64
    split: int = 1
    subs_per_iter: int = 4
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool | None = None


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count  # cached by torch: no sync
    return 4


def default_config(M: int, N: int, K: int, device: torch.device) -> NF4MatmulConfig:
    """The launch shape chosen for an (M, K) x (N, K)^T product (a heuristic, not yet tuned on hardware: the bench
    sweeps alternatives). Enough programs to cover every SM twice, from row tiles first, then split-K; larger row
    tiles for more rows of x (each program reads its whole K range of x from L2: x bytes per weight byte read are
    4 M / block_n in bf16)."""
    block_n = 64 if M <= 16 else 128
    tiles = triton.cdiv(N, block_n)
    target = 2 * _multiprocessors(device)
    subs = triton.cdiv(K, SUB)
    nb = min(4, subs)  # a sub-block past K is masked, yet computed (and the interpreter computes it too)
    # each split at least two loop iterations; each split adds 8 M bytes of partial sums per weight row (L2 traffic)
    split = max(1, min(triton.cdiv(target, tiles), subs // (2 * nb)))
    return NF4MatmulConfig(block_n=block_n, split=split, subs_per_iter=nb)


if triton is not None:

    @triton.jit
    def _round_to(v, DT: tl.constexpr, UPCAST: tl.constexpr):
        """float32 v rounded (to nearest even) to dtype code DT (0 float32, 1 bf16, 2 fp16), kept as float32."""
        if DT == 1:
            if UPCAST:  # the interpreter's bf16 cast truncates
                v = round_bf16(v)
            else:
                v = v.to(tl.bfloat16).to(tl.float32)
        elif DT == 2:
            v = v.to(tl.float16).to(tl.float32)
        return v

    @triton.jit
    def _nf4_element(flat, ok, packed_ptr, absmax_q_ptr, absmax2_ptr, nf4_ptr, dyn8_ptr, offset,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr):
        """v_i of the module docstring for any flat indices i (the unaligned layout): own byte, nibble and scale."""
        byte = tl.load(packed_ptr + flat // 2, mask=ok, other=0)
        code = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF).to(tl.int32)
        blk = flat // BLOCKSIZE
        aq = tl.load(absmax_q_ptr + blk, mask=ok, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=ok, other=0.0)
        return tl.load(nf4_ptr + code) * (tl.load(dyn8_ptr + aq) * a2 + offset)

    @triton.jit
    def _operand(v, W_DT: tl.constexpr, X_DT: tl.constexpr, x_ty: tl.constexpr, AS_F32: tl.constexpr,
                 UPCAST: tl.constexpr):
        """w = round_x(round_W(v)): in x's dtype (the MMA operand), or (AS_F32) float32 holding those values - the
        FMA path, and the interpreter's MMA (it would multiply 16-bit tiles as raw bits, see grouped_gemm._dot)."""
        if W_DT != 0 and W_DT != X_DT:
            v = _round_to(v, W_DT, UPCAST)
        if AS_F32:  # one return: Triton rejects returns of different dtypes even under a constexpr branch
            w = _round_to(v, X_DT, UPCAST)
        else:
            w = v.to(x_ty)
        return w

    @triton.jit
    def _store_y(acc, bias_ptr, out_ptr, rn, rm, n_ok, m_ok, stride_om, HAS_BIAS: tl.constexpr, X_DT: tl.constexpr,
                 UPCAST: tl.constexpr):
        """y[m, n] = round_x(acc[n, m] + b[n]) for the tile (acc is the transposed product)."""
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if UPCAST:
            acc = _round_to(acc, X_DT, UPCAST)
        tl.store(out_ptr + rm[None, :] * stride_om + rn[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & m_ok[None, :])

    @triton.jit
    def _nf4_matmul_kernel(
        x_ptr, packed_ptr, absmax_q_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dyn8_ptr, bias_ptr, out_ptr,
        M, N, K, stride_xm, stride_xk,
        stride_os,  # partial sums (PARTIAL): stride between the SPLIT slices of the (SPLIT, M, N) workspace
        stride_om,  # row stride of y or of a workspace slice (unit stride along N)
        subs_per_split,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        NB: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
        W_DT: tl.constexpr, X_DT: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr,
    ):
        HALF: tl.constexpr = 32  # bytes of one row of a 64-column sub-block
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        j = tl.arange(0, HALF)
        n_ok = rn < N
        m_ok = rm < M
        row = rn * K  # flat index of each row's first weight
        offset = tl.load(offset_ptr)
        s_begin = pid_k * subs_per_split
        s_end = tl.minimum(s_begin + subs_per_split, tl.cdiv(K, 64))
        x_ty = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_fma = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)  # not USE_DOT (M = 1): per-lane partial sums
        for s0 in range(s_begin, s_end, NB):
            for b in tl.static_range(NB):
                s = s0 + b
                # past the split's end (the last iteration's tail): every mask empty (bounds, not a scalar `&`,
                # which the interpreter does not broadcast)
                k_lim = tl.where(s < s_end, K, 0)
                n_lim = tl.where(s < s_end, N, 0)
                k_even = s.to(tl.int64) * 64 + 2 * j  # (HALF,) the sub-block's even columns
                if USE_DOT:
                    xe_ok = m_ok[None, :] & (k_even[:, None] < k_lim)
                    xo_ok = m_ok[None, :] & (k_even[:, None] + 1 < k_lim)
                    x_ptrs = x_ptr + rm[None, :] * stride_xm + k_even[:, None] * stride_xk  # (HALF, BLOCK_M)
                else:  # the one row of x
                    xe_ok = k_even < k_lim
                    xo_ok = k_even + 1 < k_lim
                    x_ptrs = x_ptr + k_even * stride_xk  # (HALF,)
                xe = tl.load(x_ptrs, mask=xe_ok, other=0.0)
                xo = tl.load(x_ptrs + stride_xk, mask=xo_ok, other=0.0)
                if ALIGNED:
                    first = row + s * 64  # (BLOCK_N,) flat index of the sub-block in each row: a multiple of 64
                    ok = rn < n_lim
                    blk = first // BLOCKSIZE
                    aq = tl.load(absmax_q_ptr + blk, mask=ok, other=0).to(tl.int32)
                    a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=ok, other=0.0)
                    scale = tl.load(dyn8_ptr + aq) * a2 + offset
                    byte = tl.load(packed_ptr + first[:, None] // 2 + j[None, :], mask=ok[:, None], other=0)
                    ve = tl.load(nf4_ptr + (byte >> 4).to(tl.int32)) * scale[:, None]
                    vo = tl.load(nf4_ptr + (byte & 0xF).to(tl.int32)) * scale[:, None]
                else:
                    flat = row[:, None] + k_even[None, :]  # (BLOCK_N, HALF)
                    ve = _nf4_element(flat, n_ok[:, None] & (k_even[None, :] < k_lim), packed_ptr, absmax_q_ptr,
                                      absmax2_ptr, nf4_ptr, dyn8_ptr, offset, BLOCKSIZE, BLOCKSIZE2)
                    vo = _nf4_element(flat + 1, n_ok[:, None] & (k_even[None, :] + 1 < k_lim), packed_ptr,
                                      absmax_q_ptr, absmax2_ptr, nf4_ptr, dyn8_ptr, offset, BLOCKSIZE, BLOCKSIZE2)
                # masked weights are finite (code 0 times a scale of `offset`) and meet x = 0: they add exact zeros
                we = _operand(ve, W_DT, X_DT, x_ty, UPCAST or not USE_DOT, UPCAST)
                wo = _operand(vo, W_DT, X_DT, x_ty, UPCAST or not USE_DOT, UPCAST)
                if USE_DOT:
                    if UPCAST:
                        xe = xe.to(tl.float32)
                        xo = xo.to(tl.float32)
                    acc = tl.dot(we, xe, acc, input_precision="ieee")
                    acc = tl.dot(wo, xo, acc, input_precision="ieee")
                else:  # an explicit FMA: exact products of 16-bit values, one rounding per add
                    acc_fma = tl.fma(we, xe.to(tl.float32)[None, :], acc_fma)
                    acc_fma = tl.fma(wo, xo.to(tl.float32)[None, :], acc_fma)
        if not USE_DOT:
            acc = tl.sum(acc_fma, axis=1)[:, None]  # (BLOCK_N, 1): BLOCK_M is 1 on this path
        if PARTIAL:
            part = out_ptr + pid_k.to(tl.int64) * stride_os
            tl.store(part + rm[None, :] * stride_om + rn[:, None], acc, mask=n_ok[:, None] & m_ok[None, :])
        else:
            _store_y(acc, bias_ptr, out_ptr, rn, rm, n_ok, m_ok, stride_om, HAS_BIAS, X_DT, UPCAST)

    @triton.jit
    def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, SPLIT, stride_os, stride_om,
                              HAS_BIAS: tl.constexpr, X_DT: tl.constexpr, UPCAST: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """y = round_x(sum_s partial[s] + b), the partials added in split order (float32)."""
        rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        ptrs = part_ptr + rm[None, :] * stride_om + rn[:, None]  # (BLOCK_N, BLOCK_M): the kernel's transposed tile
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for s in range(SPLIT):
            acc += tl.load(ptrs + s * stride_os, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        _store_y(acc, bias_ptr, out_ptr, rn, rm, n_ok, m_ok, N, HAS_BIAS, X_DT, UPCAST)


def _check(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None) -> None:
    if len(q.shape) != 2:
        raise ValueError(f"nf4_matmul needs a 2-D NF4 weight, got shape {tuple(q.shape)}")
    if x.dim() != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"nf4_matmul: x must be (M, {q.shape[1]}) for a weight of shape {tuple(q.shape)}, got "
                         f"{tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"nf4_matmul: x must be bf16/fp16/fp32, got {x.dtype}")
    if bias is not None and bias.shape != (q.shape[0],):
        raise ValueError(f"nf4_matmul: bias must be ({q.shape[0]},), got {tuple(bias.shape)}")


def nf4_matmul_reference(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b by dequantising W into x's dtype and one matmul: the CPU path and the test oracle (what
    kernels.lora computes for an NF4 weight over many rows)."""
    from .lora import dense_weight  # late: kernels.lora imports this module

    _check(x, q, bias)
    w = dense_weight(q, x.dtype)
    if bias is None:
        return x @ w.t()
    return torch.addmm(bias.to(x.dtype), x, w.t())


def nf4_matmul_triton(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None,
                      config: NF4MatmulConfig | None = None) -> torch.Tensor:
    """x (M, K) W^T + b through the fused kernel (module docstring); `config` overrides the launch shape (bench,
    tests). No host sync, no shape-dependent allocation beyond y and the split-K workspace: graph-capturable."""
    if triton is None:
        raise RuntimeError("nf4_matmul_triton needs Triton; use nf4_matmul_reference")
    from .nf4 import _tables

    _check(x, q, bias)
    M, K = x.shape
    N = q.shape[0]
    out = alloc((M, N), x.dtype, x.device)
    if M == 0:
        return out
    cfg = config or default_config(M, N, K, x.device)
    subs = triton.cdiv(K, SUB)
    per = triton.cdiv(subs, max(1, cfg.split))
    split = triton.cdiv(subs, per)  # no empty K ranges
    use_dot = M > 1 if cfg.use_dot is None else cfg.use_dot
    if not use_dot and M != 1:
        raise ValueError(f"nf4_matmul: the FMA path (use_dot=False) takes one row of x, got {M}")
    block_m = max(16, triton.next_power_of_2(M)) if use_dot else 1
    nf4, dyn8 = _tables(q.device)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # addmm's rounding of b (the reference's bias.to(x.dtype))
    upcast = not x.is_cuda
    consts = dict(HAS_BIAS=bias is not None, X_DT=_DTYPE_CODE[x.dtype], UPCAST=upcast)
    target = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _nf4_matmul_kernel[(triton.cdiv(N, cfg.block_n), split)](
        x, q.packed, q.absmax_q, q.absmax2, q.offset, nf4, dyn8, out if bias is None else bias, target,
        M, N, K, x.stride(0), x.stride(1), target.stride(0) if split > 1 else 0, target.stride(-2), per,
        BLOCKSIZE=q.blocksize, BLOCKSIZE2=q.blocksize2, BLOCK_M=block_m, BLOCK_N=cfg.block_n, NB=cfg.subs_per_iter,
        ALIGNED=K % SUB == 0 and q.blocksize % SUB == 0, PARTIAL=split > 1, W_DT=_DTYPE_CODE.get(q.dtype, 0),
        USE_DOT=use_dot,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False,  # (code * absmax2) + offset and the bias add: separate roundings, as the reference
        **consts)
    if split > 1:
        block_n = max(16, min(128, 4096 // block_m))
        _splitk_reduce_kernel[(triton.cdiv(N, block_n),)](
            target, out if bias is None else bias, out, M, N, split, target.stride(0), target.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **consts)
    return out


def nf4_matmul_wanted(x: torch.Tensor, q: NF4Tensor) -> bool:
    """Whether x (M, K) W^T should run in the fused kernel: at most MAX_ROWS rows where Triton runs (CUDA, or
    FASTTUNE_KERNELS=triton). A few rows on CUDA that cannot (Triton missing or switched off, an unsupported dtype)
    are logged once with why: they dequantise the whole weight for a handful of rows."""
    from . import use_triton  # late: this module is imported by fasttune.kernels' own imports

    M = x.shape[0] if x.dim() == 2 else -1
    if M > MAX_ROWS or M < 0 or len(q.shape) != 2 or not FALLBACKS.usable("nf4-matmul"):
        return False
    if use_triton(x) and x.dtype in _DTYPE_CODE:
        return True
    if x.is_cuda:
        if not use_triton(x):
            why = ("FASTTUNE_KERNELS=reference" if os.environ.get("FASTTUNE_KERNELS") == "reference"
                   else "Triton is not available")
        else:
            why = f"activations in {x.dtype} (the kernel takes bf16/fp16/fp32)"
        FALLBACKS.note(f"dequant:{why}", f"NF4 linear over {M} rows (<= {MAX_ROWS}) dequantises the whole weight "
                                         f"and runs a GEMM instead of the fused NF4 matmul: {why}")
    return False

