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
reads it again in the GEMM (~4.5 B moved per weight, for 0.5 B of information); these kernels read the 0.5 B
(+ 1/64 B of absmax code per weight) once. For few rows a GEMM against W is bound by reading W, so bytes are time -
once the instructions per weight are few enough: an H200 SM issues 128 lane-instructions a cycle, and its share
of the 4.22 TB/s copy bandwidth (132 SMs at ~1.98 GHz) is ~16 B, ~32 packed weights, a cycle: past ~4
instructions per weight a kernel is issue-bound, not bandwidth-bound.

What the first version cost (measured by the lead on an H200, bench/results/2026-12-03n_h200_gpu_tests_2.log,
tests/test_kernels_nf4_matmul.py::test_gpu_faster_than_dequantise_then_matmul, per call, 20 calls in one graph):
at M = 8 0.715 ms (W 14336 x 4096) and 0.994 ms (4096 x 14336) against 0.096 / 0.095 ms for dequantise + cuBLAS;
at M = 1 67.4 / 83.4 us. Why, read from its sm_90 SASS (compiled here, no GPU): the MMA loop was software-pipelined
(num_stages=2), which turned every per-element NF4 table lookup into its own 4-byte cp.async into shared memory
(272 LDGSTS per iteration, 77 KB of shared memory, a fence per MMA); the one-row loop spent ~16 instructions per
weight (64-bit address arithmetic for each lookup, bytes unpacked one by one, x re-read per weight at stride 2).

Layout of the work (the "aligned" layout: K and B multiples of 64, packed bytes 4-byte aligned - every real model):
a program owns BLOCK_N rows of W and walks K in chunks of BLOCK_K columns (whole 64-column sub-blocks, each inside
one quantisation block, so one scale per row and sub-block: one absmax code, absmax2 and DYN8 lookup per 64
weights). The packed bytes are read as int32 words (16 B vectors along a row); word c of a row holds columns
8c..8c+7, byte b of it (little-endian) columns 8c+2b (high nibble) and 8c+2b+1 (low). Each code's value is looked
up by one inline-asm load (rotate the nibble to a byte offset, OR it into the 64-byte aligned table address, one
read-only load: the table is 64 B, one L1 line), the eight values of a word are interleaved back into column order
in registers, multiplied by their sub-block's scale and rounded (bf16: one cvt.rn.bf16x2 per pair). The words of
the next two chunks and x of the next are loaded before the current chunk is used (a register prefetch: no
software pipelining, see above; num_stages stays 1).
  GEMV kernel (M = 1): FMAs into per-lane float32 partial sums (BLOCK_N, BLOCK_K), reduced across the tile at the
  end; 4096 weights per program and iteration. Its loop is ~9.7 SASS instructions per weight (311 per 32-weight
  lane iteration at block 8 x 512, sm_90, counted in the kernel compiled here with Triton 3.9: lookup 3, scale 1,
  rounding 1.5, FMA 1; the rest register moves of the prefetch, x through shared memory, the scales).
  MMA kernel (M >= 2, and one row in the unaligned layout): acc (BLOCK_N, BLOCK_M) = W_tile x^T with tl.dot (x's
  rows padded to 16, padding masked), W's tile rounded to x's dtype. Counted the same way at M = 8: ~12.5
  instructions per weight at 32 x 128 (mma.sync; x's operand re-read from shared memory per 32 rows), ~9.1 at
  64 x 64 and ~7.9 at 64 x 128 (wgmma, with a fence every iteration that may wait on the prefetched loads; 204
  registers at 64 x 128): the default takes mma.sync, whose prefetch nothing waits on; the sweep says which wins.
  Split-K: a weight with few row tiles is also split along K, each split writing float32 partial sums to a
  (SPLIT, M, N) workspace that a second kernel adds in order, adds b and rounds: no atomics, deterministic.
Any other layout (K or B not a multiple of 64: odd shapes, tests) takes each element's byte, nibble and scale from
its own flat index in the MMA kernel (gathers: slower, the same values).

Dispatch (`nf4_matmul_wanted`): the fused kernels for at most `MAX_ROWS` rows where Triton runs (CUDA, or
FASTTUNE_KERNELS=triton); above, one dequantisation amortised over many rows and a cuBLAS GEMM is the better
plan. Both the forward with and without autograd use it (the backward never depends on how y was computed: it
dequantises W again for dx). Everything is launched with static shapes and no host sync: CUDA-graph capturable.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from ._triton import alloc, multiprocessors, round_bf16, tl, triton
from .fallbacks import Fallbacks
from .nf4 import NF4Tensor

log = logging.getLogger("fasttune.kernels")
FALLBACKS = Fallbacks("NF4 matmul", log)

# The fused kernel runs for x with at most this many rows (decode: the number of sequences in the step); above it,
# dequantise + cuBLAS. At 64 rows the product does 128 FLOPs per 0.5 B weight read (256 FLOP/B), about an H200's
# ridge point (~989 bf16 TFLOP/s over 4.8 TB/s, ~206 FLOP/B): past it, reading W stops being the bound the fused
# kernel removes. A guess at the crossover, not a measurement: the bench's M=64 rows say whether to move it.
MAX_ROWS = 64

SUB = 64  # columns per sub-block: one scale per row; the aligned kernels' unit along K
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The GEMV tile must give every thread at least one whole int32 word (8 values): the unpacking keeps a word's
# values in its thread and the paired bf16 rounding takes them two at a time. Weights per warp at one word a lane:
_WORDS_PER_WARP = 8 * 32


@dataclass(frozen=True)
class NF4MatmulConfig:
    """Launch shape: `block_n` rows of W per program, `block_k` columns per loop iteration (a power of two >= 64),
    `split` programs along K per row tile (the MMA kernel only; partial sums + a reduction kernel), Triton's
    num_warps / num_stages, and `use_dot`: the MMA kernel (x padded to 16 rows) or, for one row of x only, the
    GEMV kernel (FMAs on the CUDA cores); None: GEMV for M = 1, MMA otherwise. num_stages stays 1 by default: a
    software-pipelined loop turns every table lookup into its own 4-byte cp.async (the old kernel's M = 8 time)."""
    block_n: int = 16
    block_k: int = 256
    split: int = 1
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool | None = None


_multiprocessors = multiprocessors  # one name the launch-shape tests patch


def _fit_k(target: int, K: int) -> int:
    """A power-of-two chunk of columns near `target` (>= 64): one that divides K when one within 4x of target does
    (no masked tail chunk), never much longer than K itself."""
    target = max(SUB, min(target, triton.next_power_of_2(K)))
    bk = target
    while bk >= max(SUB, target // 4):
        if K % bk == 0:
            return bk
        bk //= 2
    return target


def default_config(M: int, N: int, K: int, device: torch.device, gemv: bool = True) -> NF4MatmulConfig:
    """The launch shape for an (M, K) x (N, K)^T product: a table by (M bucket, N), reasoned for an H200 (132 SMs,
    ~4.2 TB/s) and not yet tuned on it (`python bench/kernels_ce_nf4.py --only nf4-matmul --sweep` times the
    alternatives).
    GEMV (M = 1): 4096 weights per program and iteration (32 per thread at 4 warps: 4 words, 4 registers of
    prefetch, 32 of partial sums), as many row tiles as keep >= 3 programs per SM (reading W is the whole cost, and
    each program has only its one prefetched chunk outstanding): block_n 16 for N >= 6336, 8 for N >= 3168 (q/o:
    512 programs), smaller for k/v; fewer warps when the whole product is smaller than one such tile.
    MMA, M = 2..16: block_n 32 x block_k 128 at 4 warps (mma.sync: the wgmma a 64-row tile would get fences
    every iteration that may wait for the prefetched loads); M = 17..64: block_n 64 x block_k 64 (x's tile,
    re-read from L1/L2 by every row tile, is 4 M / block_n bytes per weight byte; a 64 x 128 tile spills at
    M = 64). Split-K until the grid covers the SMs twice, each split at least 4 chunks long. `gemv=False`: the MMA
    shape for one row too (the unaligned layout)."""
    sms = _multiprocessors(device)
    if M == 1 and gemv:
        block_n = 1
        for bn in (16, 8, 4, 2):
            if triton.cdiv(N, bn) >= 3 * sms:
                block_n = bn
                break
        block_k = _fit_k(4096 // block_n, K)
        block_n = max(block_n, _WORDS_PER_WARP // block_k)  # a tiny K: rows enough for one word a lane
        return NF4MatmulConfig(block_n=block_n, block_k=block_k,
                               num_warps=max(1, min(4, block_n * block_k // _WORDS_PER_WARP)))
    block_n, block_k = (32, _fit_k(128, K)) if M <= 16 else (64, _fit_k(64, K))
    tiles = triton.cdiv(N, block_n)
    chunks = triton.cdiv(K, block_k)
    split = max(1, min(triton.cdiv(2 * sms, tiles), chunks // 4))
    return NF4MatmulConfig(block_n=block_n, block_k=block_k, split=split)


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
    def _round_bf16_pairs(v):
        """float32 v rounded to bf16 (nearest even), kept as float32, on the GPU: one cvt.rn.bf16x2 per two values
        and a shift / mask to widen each back (Triton's cast takes one F2F plus one widening per value)."""
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }",
            "=r,=r,r,r", [v], dtype=tl.float32, is_pure=True, pack=2)

    @triton.jit
    def _nibble(words, SHIFT: tl.constexpr, nf4_ptr, lo, hi, UPCAST: tl.constexpr):
        """NF4[code] for the 4-bit code at bits SHIFT..SHIFT+3 of each int32 word, in the words' own layout.
        On the GPU one inline-asm load per value: rotate the code to bits 2..5 (byte offset 4 code), OR it into the
        low word of the 64-byte aligned table's address, load through the read-only path. A plain tl.load of
        `nf4_ptr + code` here is re-laid-out by Triton's coalescing pass (a gather has no contiguity: one value per
        thread, the pointers converted through shared memory every iteration) and costs a 64-bit address add."""
        if UPCAST:
            return tl.load(nf4_ptr + ((words >> SHIFT) & 15))
        else:
            rot = tl.zeros_like(words) + ((SHIFT + 30) % 32)  # rotate right by SHIFT - 2 (mod 32)
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; .reg .b64 a; shf.r.wrap.b32 t, $1, $1, $4; lop3.b32 t, t, 60, $2, 0xea; "
                "mov.b64 a, {t, $3}; ld.global.nc.f32 $0, [a]; }",
                "=r,r,r,r,r", [words, lo + tl.zeros_like(words), hi + tl.zeros_like(words), rot],
                dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _nf4_values(words, nf4_ptr, UPCAST: tl.constexpr):
        """(R, C) int32 words of packed codes -> (R, 8 C) float32 NF4 values in column order: word c holds columns
        8c..8c+7, byte b (little-endian) columns 8c+2b (high nibble) and 8c+2b+1 (low). Interleaving puts its
        second operand's selector in the lowest bit of the column, so the three levels of interleaves pair bytes
        b and b+2, then b0 = b mod 2, then the two nibbles: column 8c + 4 (b // 2) + 2 (b mod 2) + h."""
        base = nf4_ptr.to(tl.int64, bitcast=True)
        lo = base.to(tl.int32)  # the table is 64-byte aligned (checked at launch): bits 0..5 of lo are 0
        hi = (base >> 32).to(tl.int32)
        a = tl.interleave(_nibble(words, 4, nf4_ptr, lo, hi, UPCAST), _nibble(words, 20, nf4_ptr, lo, hi, UPCAST))
        b = tl.interleave(_nibble(words, 12, nf4_ptr, lo, hi, UPCAST), _nibble(words, 28, nf4_ptr, lo, hi, UPCAST))
        c = tl.interleave(_nibble(words, 0, nf4_ptr, lo, hi, UPCAST), _nibble(words, 16, nf4_ptr, lo, hi, UPCAST))
        d = tl.interleave(_nibble(words, 8, nf4_ptr, lo, hi, UPCAST), _nibble(words, 24, nf4_ptr, lo, hi, UPCAST))
        return tl.interleave(tl.interleave(a, b), tl.interleave(c, d))

    @triton.jit
    def _block_scales(absmax_q_ptr, absmax2_ptr, dyn8_ptr, offset, first, k0, k_end, NSUB: tl.constexpr,
                      BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr):
        """a_kb of the module docstring for the NSUB 64-column sub-blocks of a chunk, one per row and sub-block
        (R, NSUB): `first` (R,) int64 is each row's flat index of column 0, k0 the chunk's first column."""
        s = tl.arange(0, NSUB)
        ok = (k0 + s * 64 < k_end)[None, :]
        blk = (first[:, None] + k0 + s[None, :] * 64) // BLOCKSIZE
        aq = tl.load(absmax_q_ptr + blk, mask=ok, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=ok, other=0.0)
        return tl.load(dyn8_ptr + aq) * a2 + offset

    @triton.jit
    def _aligned_chunk(words, absmax_q_ptr, absmax2_ptr, dyn8_ptr, nf4_ptr, offset, first, k0, k_end,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                       BLOCKSIZE2: tl.constexpr, UPCAST: tl.constexpr):
        """v (BLOCK_N, BLOCK_K) float32 for one chunk of whole 64-column sub-blocks: a table value per weight, one
        scale per row and sub-block."""
        NSUB: tl.constexpr = BLOCK_K // 64
        scale = _block_scales(absmax_q_ptr, absmax2_ptr, dyn8_ptr, offset, first, k0, k_end, NSUB, BLOCKSIZE,
                              BLOCKSIZE2)
        v = tl.reshape(_nf4_values(words, nf4_ptr, UPCAST), (BLOCK_N, NSUB, 64))
        return tl.reshape(v * scale[:, :, None], (BLOCK_N, BLOCK_K))

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
            if X_DT == 1 and not UPCAST:
                w = _round_bf16_pairs(v)
            else:
                w = _round_to(v, X_DT, UPCAST)
        else:
            w = v.to(x_ty)
        return w

    @triton.jit
    def _chunk_words(w_ptrs, c0, c_end, jw, W8: tl.constexpr, EVEN_K: tl.constexpr):
        """The int32 words of the chunk at `w_ptrs` (word c0 of each row; nothing at or past word c_end: zeros)."""
        if EVEN_K:  # whole chunks: all of the chunk or none, a mask constant along the row (16 B loads stay)
            return tl.load(w_ptrs, mask=(jw < tl.where(c0 < c_end, W8, 0))[None, :], other=0)
        else:
            return tl.load(w_ptrs, mask=(c0 + jw < c_end)[None, :], other=0)

    @triton.jit
    def _nf4_gemv_kernel(
        x_ptr, words_ptr, absmax_q_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dyn8_ptr, bias_ptr, out_ptr,
        N, K, K_WORDS, stride_xk,
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, W_DT: tl.constexpr, X_DT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """y (1, N) = x (1, K) W^T + b, aligned layout: FMAs into per-lane float32 partial sums (BLOCK_N, BLOCK_K),
        reduced across the tile once at the end."""
        W8: tl.constexpr = BLOCK_K // 8  # int32 words per row per chunk
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(rn, N - 1).to(tl.int64)  # rows past N re-read row N - 1 (no masks); never stored
        jw = tl.arange(0, W8)
        kk = tl.arange(0, BLOCK_K)
        w_ptrs = words_ptr + rows[:, None] * K_WORDS + jw[None, :]
        first = rows * K
        offset = tl.load(offset_ptr)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # two chunks of words in flight ahead of the one being used (registers, not shared memory: no software
        # pipelining), x one ahead (it is re-read by every program: L1 / L2)
        words = _chunk_words(w_ptrs, 0, K_WORDS, jw, W8, EVEN_K)
        words1 = _chunk_words(w_ptrs + W8, W8, K_WORDS, jw, W8, EVEN_K)
        xk = tl.load(x_ptr + kk * stride_xk, mask=kk < K, other=0.0)
        for k0 in range(0, K, BLOCK_K):
            nxt = _chunk_words(w_ptrs + 2 * W8, k0 // 8 + 2 * W8, K_WORDS, jw, W8, EVEN_K)
            x_nxt = tl.load(x_ptr + (k0 + BLOCK_K + kk) * stride_xk, mask=k0 + BLOCK_K + kk < K, other=0.0)
            v = _aligned_chunk(words, absmax_q_ptr, absmax2_ptr, dyn8_ptr, nf4_ptr, offset, first, k0, K,
                               BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, UPCAST)
            # masked columns: code 0 times a scale of `offset` (finite) meets x = 0, an exact zero
            w = _operand(v, W_DT, X_DT, x_ptr.dtype.element_ty, True, UPCAST)
            acc = tl.fma(w, xk.to(tl.float32)[None, :], acc)  # an explicit FMA: one rounding per add
            words = words1
            words1 = nxt
            xk = x_nxt
            w_ptrs += W8
        y = tl.sum(acc, axis=1)
        n_ok = rn < N
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if UPCAST:
            y = _round_to(y, X_DT, UPCAST)
        tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=n_ok)

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
    def _nf4_mm_kernel(
        x_ptr, words_ptr, packed_ptr, absmax_q_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dyn8_ptr, bias_ptr, out_ptr,
        M, N, K, K_WORDS, stride_xm, stride_xk,
        stride_os,  # partial sums (PARTIAL): stride between the SPLIT slices of the (SPLIT, M, N) workspace
        stride_om,  # row stride of y or of a workspace slice (unit stride along N)
        k_per_split,  # columns per split: a multiple of BLOCK_K
        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        PARTIAL: tl.constexpr, W_DT: tl.constexpr, X_DT: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """acc (BLOCK_N, BLOCK_M) = W_tile x^T over one K range, on the tensor cores: W's rows are the MMA's large
        side, x's few rows (padded to 16; padding rows masked, never read) the small one."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(rn, N - 1).to(tl.int64)
        rm = tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        first = rows * K
        offset = tl.load(offset_ptr)
        x_ty = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        W8: tl.constexpr = BLOCK_K // 8
        jw = tl.arange(0, W8)
        w_ptrs = words_ptr + rows[:, None] * K_WORDS + (k_begin // 8 + jw)[None, :]
        if ALIGNED:  # as in the GEMV kernel: two chunks of words in flight ahead, x one
            words = _chunk_words(w_ptrs, k_begin // 8, k_end // 8, jw, W8, EVEN_K)
            words1 = _chunk_words(w_ptrs + W8, k_begin // 8 + W8, k_end // 8, jw, W8, EVEN_K)
        x_ptrs = x_ptr + rm[None, :] * stride_xm + (k_begin + kk)[:, None] * stride_xk  # (BLOCK_K, BLOCK_M)
        xt = tl.load(x_ptrs, mask=m_ok[None, :] & (k_begin + kk < k_end)[:, None], other=0.0)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + kk
            # the next chunk's x loaded before this chunk is used
            x_ptrs += BLOCK_K * stride_xk
            x_nxt = tl.load(x_ptrs, mask=m_ok[None, :] & (k + BLOCK_K < k_end)[:, None], other=0.0)
            if ALIGNED:
                nxt = _chunk_words(w_ptrs + 2 * W8, k0 // 8 + 2 * W8, k_end // 8, jw, W8, EVEN_K)
                v = _aligned_chunk(words, absmax_q_ptr, absmax2_ptr, dyn8_ptr, nf4_ptr, offset, first, k0, k_end,
                                   BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2, UPCAST)
                words = words1
                words1 = nxt
                w_ptrs += W8
            else:
                v = _nf4_element(first[:, None] + k[None, :], (k < k_end)[None, :], packed_ptr, absmax_q_ptr,
                                 absmax2_ptr, nf4_ptr, dyn8_ptr, offset, BLOCKSIZE, BLOCKSIZE2)
            # masked weights are finite (code 0 times a scale of `offset`) and meet x = 0: they add exact zeros
            w = _operand(v, W_DT, X_DT, x_ty, UPCAST, UPCAST)
            if UPCAST:
                acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            xt = x_nxt
        n_ok = rn < N
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


def _aligned(q: NF4Tensor, K: int) -> bool:
    """Whether W takes the aligned layout: rows of whole 64-column sub-blocks inside quantisation blocks (K and
    the block size multiples of 64: every real model) and packed bytes readable as int32 words."""
    return (K % SUB == 0 and q.blocksize % SUB == 0 and q.packed.is_contiguous()
            and q.packed.storage_offset() % 4 == 0)


def nf4_matmul_triton(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None,
                      config: NF4MatmulConfig | None = None) -> torch.Tensor:
    """x (M, K) W^T + b through the fused kernels (module docstring); `config` overrides the launch shape (bench,
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
    aligned = _aligned(q, K)
    if not aligned:
        FALLBACKS.note(f"per-element:{K % SUB},{q.blocksize % SUB}",
                       f"an NF4 weight with K={K}, block size {q.blocksize}, packed codes "
                       f"{'contiguous' if q.packed.is_contiguous() else 'strided'} at byte offset "
                       f"{q.packed.storage_offset()}: the fused matmul reads each weight's byte and scale by its own "
                       f"index (slower); whole 64-column sub-blocks and 4-byte aligned codes take the fast kernels")
    cfg = config or default_config(M, N, K, x.device, gemv=aligned)
    if cfg.block_k < SUB or cfg.block_k & (cfg.block_k - 1) or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"nf4_matmul: block_k must be a power of two >= {SUB} and block_n a power of two: {cfg}")
    use_dot = M > 1 if cfg.use_dot is None else cfg.use_dot
    if not use_dot and M != 1:
        raise ValueError(f"nf4_matmul: the GEMV kernel (use_dot=False) takes one row of x, got {M}")
    if not use_dot and not aligned:  # the GEMV kernel reads whole 64-column sub-blocks: the MMA kernel instead
        use_dot = True
        cfg = replace(cfg, block_n=max(16, cfg.block_n))
    if not use_dot and cfg.block_n * cfg.block_k < _WORDS_PER_WARP * cfg.num_warps:
        raise ValueError(f"nf4_matmul: a GEMV tile of {cfg.block_n} x {cfg.block_k} gives some of {cfg.num_warps} "
                         f"warps' lanes less than one 8-value word: {cfg}")
    if use_dot and cfg.block_n < 16:
        raise ValueError(f"nf4_matmul: the MMA kernel needs block_n >= 16 (tl.dot's smallest tile): {cfg}")
    nf4, dyn8 = _tables(q.device)
    upcast = not x.is_cuda
    if not upcast and nf4.data_ptr() % 64:
        raise RuntimeError("nf4_matmul: the NF4 table must be 64-byte aligned (its lookup ORs the code into the "
                           "address)")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # addmm's rounding of b (the reference's bias.to(x.dtype))
    # the packed bytes as int32 words: 8 codes per load lane, 16 B vectors along a row
    words = q.packed.view(-1).view(torch.int32) if aligned else q.packed
    common = dict(BLOCKSIZE=q.blocksize, BLOCKSIZE2=q.blocksize2, HAS_BIAS=bias is not None,
                  W_DT=_DTYPE_CODE.get(q.dtype, 0), X_DT=_DTYPE_CODE[x.dtype], UPCAST=upcast,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  enable_fp_fusion=False)  # (code * absmax2) + offset and the bias add: separate roundings
    if not use_dot:
        _nf4_gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
            x, words, q.absmax_q, q.absmax2, q.offset, nf4, dyn8, out if bias is None else bias, out,
            N, K, K // 8, x.stride(1),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0, **common)
        return out
    # the MMA kernel (also one row of x in the unaligned layout)
    block_m = max(16, triton.next_power_of_2(M))
    chunks = triton.cdiv(K, cfg.block_k)
    per = triton.cdiv(chunks, max(1, cfg.split))
    split = triton.cdiv(chunks, per)  # no empty K ranges
    target = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _nf4_mm_kernel[(triton.cdiv(N, cfg.block_n), split)](
        x, words, q.packed, q.absmax_q, q.absmax2, q.offset, nf4, dyn8, out if bias is None else bias, target,
        M, N, K, K // 8, x.stride(0), x.stride(1), target.stride(0) if split > 1 else 0, target.stride(-2),
        per * cfg.block_k,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ALIGNED=aligned, EVEN_K=K % cfg.block_k == 0,
        PARTIAL=split > 1, **common)
    if split > 1:
        block_n = max(16, min(128, 4096 // block_m))
        _splitk_reduce_kernel[(triton.cdiv(N, block_n),)](
            target, out if bias is None else bias, out, M, N, split, target.stride(0), target.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, HAS_BIAS=bias is not None, X_DT=_DTYPE_CODE[x.dtype],
            UPCAST=upcast)
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

