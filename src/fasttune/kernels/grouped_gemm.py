"""Grouped GEMM for Mixture-of-Experts layers, LoRA on the experts fused in, with a hand-written backward.

Routing gives each token k experts. `sort_by_expert` orders the T*k (token, slot) pairs by expert (stable), so the
M = T*k gathered rows x (M, K) come in E contiguous segments; expert_offsets (E+1,) holds the segment bounds
(offsets[0] = 0, offsets[E] = M; an expert with no rows has an empty segment). For row m of expert e:

Forward:   y_m = x_m W_e^T + b_e + s (x_m A_e^T) B_e^T
           W (E, N, K) (or stored (E, K, N): `transposed`, gpt-oss), b (E, N), A_e (r, K), B_e (N, r),
           A and B either per expert ((E, r, K), (E, N, r)) or one pair shared by all experts ((r, K), (N, r)).
           Let u = x A_e^T (M, r), computed first by the same grouped kernel (N = r); the main GEMM's output tile
           starts its float32 accumulator at s u_tile B_e^T, adds x_tile W_e^T over K, then b_e: one launch for all
           experts, and the (M, N) LoRA update s u B_e^T never goes through memory.
Backward, given dy (M, N) in the same sorted order, with g = s dy B_e (M, r) (the same grouped kernel again):
           dx_m  = dy_m W_e + g_m A_e                     (grouped GEMM with W read as (E, K, N), LoRA term fused)
           dW_e  = sum_{m in e} dy_m^T x_m                (N, K) per expert: a grouped "TN" GEMM, reduction over
                                                           that expert's rows; only when the weight requires grad)
           dA_e  = sum_{m in e} g_m^T x_m                 (r, K)    shared A: dA = g^T x   (all rows, one GEMM)
           dB_e  = s sum_{m in e} dy_m^T u_m              (N, r)    shared B: dB = s dy^T u
           db_e  = sum_{m in e} dy_m                      (N,)
Empty experts get zero dW_e, dA_e, dB_e, db_e. Saved for the backward: x, u and the (small) adapters; W is read
again (a quantised W is dequantised again, never saved, a few experts at a time on the Triton path:
DEQUANT_CHUNK_BYTES), as in kernels/lora.py.

The kernels. `_grouped_mm_kernel` computes y = alpha (x W_e^T + lora_scale u L_e) + b_e for every row segment:
the grid is (N tiles, cdiv(M, BM) + E M tiles), an upper bound from static sizes (the tiles of all segments,
sum_e cdiv(m_e, BM) < M / BM + E). Each program maps its M-tile index to (expert, first row) from the offsets in
registers: tiles_e = cdiv(m_e, BM), an inclusive cumulative sum over the E experts, expert = #{e : cum_e <= pid};
programs past the last tile return at once. No per-expert launch, no host read of the offsets. Every operand is
addressed through its strides, so W^T (dx), (E, K, N) storage, a shared adapter (expert stride 0) and B^T (g) are
the same kernel. `_grouped_tn_kernel` computes out_e = alpha sum_{m in e} a_m^T b_m over a grid of
(P tiles x Q tiles, E), looping over the expert's rows; `_segment_sum_kernel` gives db. Accumulation is float32;
outputs are rounded once to their dtype (bf16 / fp16 / fp32; fp32 inputs use IEEE products unless
torch.backends.cuda.matmul.allow_tf32 is set, as torch.matmul does). The small LoRA products u and g are kept in
x's dtype, as in kernels/lora.py; adapters may be float32 masters, read as they are and rounded to x's dtype in the
kernels' registers (CAST_W / CAST_L: the values `.to(dtype)` gives, without a cast launch and copy per adapter and
pass), gradients in their dtype.

Layout: transformers 5 stores Qwen3-MoE and Mixtral experts as gate_up_proj (E, 2I, H) and down_proj (E, H, I),
i.e. (E, N, K) = this kernel's default; gpt-oss stores gate_up_proj (E, H, 2I) and down_proj (E, I, H), i.e.
(E, K, N): pass transposed=True and the tensor is read in place through its strides (no copy at load).

The frozen-weight GEMMs (forward x W_e^T, grad-input dx = dy W_e) run in one of two kernels, both exact bf16
products with float32 accumulation: the Triton kernel above, LoRA and bias fused; or torch's grouped mm (CUTLASS;
bfloat16 on sm90 / sm100 with operands it takes: `torch_grouped_mm_blocker`) on views of the stored tensor in
either layout (torch takes row- and column-major matrices), its `offs` our offsets[1:]. It has no bias or LoRA
input, so one more launch of the Triton kernel adds them over its output in place (ACCUMULATE, no K loop):
y += s u B_e^T + b_e, dx += g A_e; that output is so rounded to bf16 twice (the base product, then the sum) where
the fused Triton path rounds once. u, g, dW, dA, dB and db always run in the Triton kernels. base_gemm="auto" (what
the MoE layer runs) measures both on CUDA, once per call shape and direction, and keeps the faster
(`_auto_choice`: neither wins everywhere: on the Qwen3-30B-A3B expert shapes torch's bare GEMM was the faster in
bench/kernels_moe.py, yet the Qwen3 LoRA training step measured faster on Triton, bench/moe_train.py);
FASTTUNE_GROUPED_MM=triton / torch overrides it. Where torch's path cannot run (float32 / float16, another GPU,
unaligned operands, torch without the op, a quantised stack dequantised a few experts at a time), "auto" is the
Triton kernel with the reason logged once (a warning when FASTTUNE_GROUPED_MM=torch asked for torch's); on CPU
"auto" is the Triton (interpreter) path and "torch" runs torch's CPU grouped mm, which is how the tests cover
this path's offsets, views, epilogue and backward.

Load balance of the TN kernel: one program per (expert, output tile) loops over the expert's rows, so a very
skewed routing (all rows on one expert) serialises that expert's reduction; correct, but slower than balanced.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import torch

from ._triton import alloc, round_bf16, tl, triton
from .fallbacks import Fallbacks
from .lora import dense_weight

# Block sizes when the kernels run in Triton's interpreter (CPU tests): small, so test shapes span several tiles.
INTERPRETER_BLOCKS = {"BM": 16, "BN": 16, "BK": 16}


# ---- routing: rows sorted by expert ------------------------------------------------------------------------

def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the (token, slot) pairs of `expert_ids` (T, k) by expert, stably (ties keep token, then slot order).

    Returns order (T*k,) int64, the flat (token, slot) indices in expert order (token = order // k); expert_offsets
    (E+1,) int32, the cumulative counts (expert e's rows are sorted[offsets[e]:offsets[e+1]]); inverse (T*k,)
    int64 with sorted[inverse] back in (token, slot) order. Four ops, static shapes, no host sync: the stable
    sort; one arange serving as both the experts' bounds and the row positions; offsets[e] = #{ids < e}, a binary
    search of e in the sorted ids; inverse[order[m]] = m, a scatter. The ids must lie in [0, num_experts), as the
    router's top-k gives them: they are not checked (a check would cost a host sync or another launch), and a row
    with an id outside would fall outside every expert's segment."""
    flat = expert_ids.reshape(-1)
    if flat.dtype != torch.int64:
        flat = flat.long()
    sorted_ids, order = torch.sort(flat, stable=True)
    M = flat.numel()
    positions = torch.arange(max(M, num_experts + 1), device=flat.device)
    offsets = torch.searchsorted(sorted_ids, positions[:num_experts + 1], out_int32=True)
    inverse = torch.empty_like(order).scatter_(0, order, positions[:M])
    return order, offsets, inverse


class _ToExpertOrder(torch.autograd.Function):
    """x_sorted = x[order // k]. Backward: dx_t = sum_j dx_sorted[inverse[t k + j]], a gather and a sum over the
    k slots (float32 accumulation, one rounding; deterministic), instead of the index_put with accumulation that
    autograd's indexing backward runs (zeros, then a sort of the indices on CUDA)."""

    @staticmethod
    def forward(ctx, x, order, inverse, top_k: int):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, dxs):
        (inverse,) = ctx.saved_tensors
        k = ctx.top_k
        return dxs.index_select(0, inverse).view(inverse.numel() // k, k, dxs.shape[-1]).sum(1), None, None, None


class _ToTokenOrder(torch.autograd.Function):
    """y = y_sorted[inverse] (a permutation). Backward: dy_sorted = dy[order], one gather (its inverse permutation)."""

    @staticmethod
    def forward(ctx, y_sorted, order, inverse):
        ctx.save_for_backward(order)
        return y_sorted.index_select(0, inverse)

    @staticmethod
    def backward(ctx, dy):
        (order,) = ctx.saved_tensors
        return dy.index_select(0, order), None, None


def to_expert_order(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """The rows the experts take: x (T, H) -> x[order // top_k] (T*k, H), each token once per slot, sorted by
    expert (`order`, `inverse` from sort_by_expert). Differentiable in x, with a static-shape backward."""
    return _ToExpertOrder.apply(x, order, inverse, int(top_k))


def to_token_order(y_sorted: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The experts' rows back in (token, slot) order: y_sorted[inverse] (T*k, N). Differentiable, its backward one
    gather by `order`."""
    return _ToTokenOrder.apply(y_sorted, order, inverse)


# ---- reference (CPU path and test oracle) ------------------------------------------------------------------

def _check_shapes(x, weight, expert_offsets, bias, lora_A, lora_B, transposed) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"grouped_linear takes x of shape (rows, in_features) sorted by expert, got {tuple(x.shape)}")
    if len(weight.shape) != 3:
        raise ValueError(f"grouped_linear takes a 3-D expert weight (E, N, K) (or (E, K, N) with transposed=True), "
                         f"got {tuple(weight.shape)}")
    E = weight.shape[0]
    N, K = (weight.shape[2], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[2])
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} features but the expert weight {tuple(weight.shape)} "
                         f"(transposed={transposed}) takes {K}")
    if tuple(expert_offsets.shape) != (E + 1,):
        raise ValueError(f"expert_offsets must have E + 1 = {E + 1} entries (from sort_by_expert), "
                         f"got {tuple(expert_offsets.shape)}")
    if bias is not None and tuple(bias.shape) != (E, N):
        raise ValueError(f"bias must be (E, N) = {(E, N)}, got {tuple(bias.shape)}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    if lora_A is not None:
        r = lora_A.shape[-2]
        if tuple(lora_A.shape) not in ((E, r, K), (r, K)) or tuple(lora_B.shape) not in ((E, N, r), (N, r)):
            raise ValueError(f"LoRA shapes must be A (E, r, K) or (r, K) and B (E, N, r) or (N, r) with E={E}, "
                             f"N={N}, K={K}; got A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}")
    return E, N, K


def grouped_linear_reference(x: torch.Tensor, weight, expert_offsets: torch.Tensor, bias: torch.Tensor | None = None,
                             lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                             lora_scaling: float = 1.0, transposed: bool = False) -> torch.Tensor:
    """The formula per expert segment with PyTorch ops under autograd (reads the offsets to the host once)."""
    E, N, K = _check_shapes(x, weight, expert_offsets, bias, lora_A, lora_B, transposed)
    bounds = [int(b) for b in expert_offsets.tolist()]
    if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"expert_offsets must rise from 0 to the number of rows {x.shape[0]}, got {bounds}")
    w = dense_weight(weight, x.dtype)
    outs = []
    for e in range(E):
        xe = x[bounds[e]:bounds[e + 1]]
        we = w[e].t() if transposed else w[e]
        y = torch.nn.functional.linear(xe, we, None if bias is None else bias[e].to(x.dtype))
        if lora_A is not None:
            a = (lora_A[e] if lora_A.dim() == 3 else lora_A).to(x.dtype)
            b = (lora_B[e] if lora_B.dim() == 3 else lora_B).to(x.dtype)
            y = y + lora_scaling * ((xe @ a.t()) @ b.t())
        outs.append(y)
    return torch.cat(outs, 0)


# ---- Triton kernels ------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a b in float32. UPCAST (the interpreter only): Triton's interpreter multiplies 16-bit float tiles as
        their raw bits (bf16 is stored as uint16 there), so the tiles are widened first; exact for bf16/fp16, whose
        products are exact in float32 - the same arithmetic as the tensor cores' float32 accumulation."""
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _cast_out(acc, out_ty: tl.constexpr, UPCAST: tl.constexpr):
        """acc rounded to the output dtype. The interpreter's float32 -> bfloat16 cast truncates; there (UPCAST)
        round to nearest even by hand, the GPU's cvt.rn, as kernels/nf4.py does."""
        if UPCAST:
            if out_ty == tl.bfloat16:
                acc = round_bf16(acc)
        return acc.to(out_ty)

    @triton.jit
    def _expert_of_tile(offsets_ptr, pid_m, E, BM: tl.constexpr, BLOCK_E: tl.constexpr):
        """(expert, first row, end row) of the pid_m-th BM-row tile over all expert segments; expert = E when the
        tile lies past the last one."""
        e_idx = tl.arange(0, BLOCK_E)
        in_range = e_idx < E
        starts = tl.load(offsets_ptr + e_idx, mask=in_range, other=0)
        ends = tl.load(offsets_ptr + e_idx + 1, mask=in_range, other=0)
        tiles = (ends - starts + BM - 1) // BM
        cum = tl.cumsum(tiles, axis=0)  # inclusive: tiles of experts 0..e
        expert = tl.sum((in_range & (cum <= pid_m)).to(tl.int32), axis=0)
        mine = e_idx == expert
        first_tile = tl.sum(tl.where(mine, cum - tiles, 0), axis=0)
        row_start = tl.sum(tl.where(mine, starts, 0), axis=0) + (pid_m - first_tile) * BM
        row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
        return expert, row_start, row_end

    @triton.jit(do_not_specialize=["ROWS_HINT"])
    def _grouped_mm_kernel(
        x_ptr, stride_xm, stride_xk,                  # (M, K) rows sorted by expert
        w_ptr, stride_we, stride_wn, stride_wk,       # element (e, n, k) of the expert weight
        y_ptr, stride_ym, stride_yn,                  # (M, N) output
        bias_ptr, stride_be, stride_bn,               # (E, N)
        u_ptr, stride_um, stride_ur,                  # (M, R): the rank-R product (x A^T forward, g backward)
        l_ptr, stride_le, stride_lr, stride_ln,       # element (e, r, n) of the second LoRA factor
        offsets_ptr, M, N, K, E, R, ROWS_HINT,        # ROWS_HINT: autotuning key only (rows_hint), unused here
        alpha, lora_scale,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, CAST_W: tl.constexpr, CAST_L: tl.constexpr, BLOCK_E: tl.constexpr, BR: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        expert, row_start, row_end = _expert_of_tile(offsets_ptr, pid_m, E, BM, BLOCK_E)
        if expert >= E:
            return
        # 64-bit scalar bases (a stack or the rows may pass 2^31 elements), 32-bit offsets inside the tile (at most
        # BM or BN times a row stride): the pointer tensors' arithmetic stays 32-bit, fewer registers per tile
        ri = tl.arange(0, BM)
        ci = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        row_ok = row_start + ri < row_end
        col_ok = pid_n * BN + ci < N
        row0 = row_start.to(tl.int64)
        col0 = (pid_n * BN).to(tl.int64)
        e64 = expert.to(tl.int64)
        x_ptrs = x_ptr + row0 * stride_xm + (ri[:, None] * stride_xm + rk[None, :] * stride_xk)
        w_ptrs = w_ptr + (e64 * stride_we + col0 * stride_wn) + (ci[None, :] * stride_wn + rk[:, None] * stride_wk)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if HAS_LORA:
            # the rank-R term first, into the accumulator itself (a second BM x BN fp32 tile would double the
            # registers of the widest tiles and spill)
            rr = tl.arange(0, BR)
            r_ok = rr < R
            u = tl.load(u_ptr + row0 * stride_um + (ri[:, None] * stride_um + rr[None, :] * stride_ur),
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            lw = tl.load(l_ptr + (e64 * stride_le + col0 * stride_ln)
                         + (rr[:, None] * stride_lr + ci[None, :] * stride_ln),
                         mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            if CAST_L:  # a float32 master adapter, rounded to u's dtype here (as .to(dtype) rounds it)
                lw = _cast_out(lw.to(tl.float32), u_ptr.dtype.element_ty, UPCAST)
            acc = _dot(u, lw, acc, INPUT_PRECISION, UPCAST) * lora_scale
        for k0 in range(0, K, BK):
            if EVEN_K:  # no mask along K: the common case (K = 768, 2048, 2880 with BK = 64)
                a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = rk < K - k0
                a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if CAST_W:  # a float32 master adapter as the weight (u = x A^T, g = s dy B): rounded to x's dtype
                b = _cast_out(b.to(tl.float32), x_ptr.dtype.element_ty, UPCAST)
            acc = _dot(a, b, acc, INPUT_PRECISION, UPCAST)
            x_ptrs += BK * stride_xk
            w_ptrs += BK * stride_wk
        acc = acc * alpha
        if HAS_BIAS:
            bias = tl.load(bias_ptr + e64 * stride_be + (col0 + ci) * stride_bn, mask=col_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        y_ptrs = y_ptr + (row0 * stride_ym + col0 * stride_yn) + (ri[:, None] * stride_ym + ci[None, :] * stride_yn)
        if ACCUMULATE:  # y += the above: the epilogue after torch's grouped mm wrote x W_e^T into y (K = 0 here)
            acc += tl.load(y_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        tl.store(y_ptrs, _cast_out(acc, y_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _grouped_tn_kernel(
        a_ptr, stride_am, stride_ap,                  # (M, P)
        b_ptr, stride_bm, stride_bq,                  # (M, Q)
        out_ptr, stride_oe, stride_op, stride_oq,     # element (e, p, q) of the (E, P, Q) output
        offsets_ptr, P, Q, alpha,
        INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr,
    ):
        """out_e = alpha * sum over expert e's rows m of a_m^T b_m (zero for an empty expert)."""
        pid = tl.program_id(0)
        expert = tl.program_id(1)
        tiles_q = tl.cdiv(Q, BQ)
        pid_p = pid // tiles_q
        pid_q = pid % tiles_q
        row_start = tl.load(offsets_ptr + expert)
        row_end = tl.load(offsets_ptr + expert + 1)
        rp = pid_p * BP + tl.arange(0, BP)
        rq = pid_q * BQ + tl.arange(0, BQ)
        p_ok = rp < P
        q_ok = rq < Q
        acc = tl.zeros((BP, BQ), dtype=tl.float32)
        for m0 in range(row_start, row_end, BM):
            rm = m0 + tl.arange(0, BM)
            m_ok = rm < row_end
            rm64 = rm.to(tl.int64)
            a = tl.load(a_ptr + rm64[None, :] * stride_am + rp[:, None] * stride_ap,
                        mask=p_ok[:, None] & m_ok[None, :], other=0.0)  # (BP, BM) = a^T tile
            b = tl.load(b_ptr + rm64[:, None] * stride_bm + rq[None, :] * stride_bq,
                        mask=m_ok[:, None] & q_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, INPUT_PRECISION, UPCAST)
        acc = acc * alpha
        out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + rp[:, None].to(tl.int64) * stride_op
                    + rq[None, :] * stride_oq)
        tl.store(out_ptrs, _cast_out(acc, out_ptr.dtype.element_ty, UPCAST), mask=p_ok[:, None] & q_ok[None, :])

    @triton.jit
    def _segment_sum_kernel(dy_ptr, stride_m, stride_n, out_ptr, stride_oe, offsets_ptr, N,
                            UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """out[e, n] = sum over expert e's rows of dy[m, n] (float32 sum, deterministic)."""
        pid_n = tl.program_id(0)
        expert = tl.program_id(1)
        row_start = tl.load(offsets_ptr + expert)
        row_end = tl.load(offsets_ptr + expert + 1)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < N
        acc = tl.zeros((BN,), dtype=tl.float32)
        for m0 in range(row_start, row_end, BM):
            rm = m0 + tl.arange(0, BM)
            tile = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * stride_m + rn[None, :] * stride_n,
                           mask=(rm < row_end)[:, None] & n_ok[None, :], other=0.0)
            acc += tl.sum(tile.to(tl.float32), axis=0)
        tl.store(out_ptr + expert.to(tl.int64) * stride_oe + rn, _cast_out(acc, out_ptr.dtype.element_ty, UPCAST),
                 mask=n_ok)

    # Hopper (H100/H200) candidates for the main grouped kernel: 128- or 64-row tiles (64 wastes less of each
    # expert's partial last tile: at ~256 rows per expert, 128-row tiles compute ~1.25x the rows; at ~128 rows,
    # Qwen3-30B-A3B's 2048-token step, ~1.5x), as wide as the registers allow (a 128 x 256 or 64 x 256 tile reads
    # each weight tile into shared memory for twice the rows of a 128-wide one: at ~128 rows per expert every
    # expert's weights are streamed from HBM about once per row tile, near the H200's ridge point), K steps of 64
    # (or 128) with 3-4 pipeline stages (~100-200 KB of the 227 KB shared memory; a config that does not fit is
    # skipped by the autotuner). The narrow configs serve the rank-r passes (u = x A^T, g = s dy B: N = r); the
    # 16- and 32-row ones few rows per expert (decode, tiny batches). Keys are static per layer shape: N, K, R,
    # the reduction stride (K-contiguous (E, N, K) forward vs N-contiguous dx / gpt-oss), LoRA and bias, and
    # ROWS_HINT (`rows_hint`: the mean rows per expert rounded up to a power of two, constant for a fixed token
    # count; a changing ragged load never changes it).
    _MM_CONFIGS = [
        triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=4),
        triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 64, "BN": 256, "BK": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=4),
        triton.Config({"BM": 64, "BN": 256, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 128, "BN": 128, "BK": 128}, num_warps=8, num_stages=3),
        # few rows per expert (ROWS_HINT <= 32)
        triton.Config({"BM": 32, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
        triton.Config({"BM": 16, "BN": 128, "BK": 128}, num_warps=4, num_stages=4),
        # the rank-r passes (N <= 32)
        triton.Config({"BM": 128, "BN": 16, "BK": 128}, num_warps=4, num_stages=4),
        triton.Config({"BM": 64, "BN": 16, "BK": 128}, num_warps=4, num_stages=4),
        triton.Config({"BM": 128, "BN": 32, "BK": 128}, num_warps=4, num_stages=4),
        triton.Config({"BM": 64, "BN": 32, "BK": 128}, num_warps=4, num_stages=4),
        triton.Config({"BM": 32, "BN": 16, "BK": 128}, num_warps=4, num_stages=4),
        triton.Config({"BM": 16, "BN": 32, "BK": 128}, num_warps=4, num_stages=4),
    ]

    def _prune_by_width(configs, named_args, **kwargs):
        """Narrow tiles (BN < 64) for narrow outputs (N <= 32, the rank-r passes) and only there; row tiles under
        64 for few rows per expert (ROWS_HINT <= 32) and only there: the autotuner compiles and times fewer
        candidates (what makes a first call, and bench/kernels_moe.py, slow), none of them mostly padding."""
        narrow = named_args["N"] <= 32
        few_rows = named_args["ROWS_HINT"] <= 32
        by_width = [c for c in configs if (c.kwargs["BN"] < 64) == narrow] or configs
        return [c for c in by_width if (c.kwargs["BM"] < 64) == few_rows] or by_width

    def _prune_tn(configs, named_args, **kwargs):
        """Tiles no wider than needed along a rank-r side (dA: P = r, dB: Q = r)."""
        P, Q = named_args["P"], named_args["Q"]
        kept = [c for c in configs if (c.kwargs["BP"] < 64) == (P <= 32) and (c.kwargs["BQ"] < 64) == (Q <= 32)]
        return kept or configs

    def _tune_bench(kernel_call, quantiles):
        """The autotuner's timing of one candidate: 5 ms of warm-up and 25 ms of runs (Triton's default is 25 and
        100 ms: with ~10 candidates per key and ~10 keys per model that alone was seconds per first step). A
        kernel of these shapes takes 0.05-1 ms, so still 25-500 runs per candidate."""
        from triton.testing import do_bench

        return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    _even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})
    _grouped_mm_even = _even_k(_grouped_mm_kernel)
    _grouped_mm_tuned = triton.autotune(
        configs=_MM_CONFIGS, key=["N", "K", "R", "ROWS_HINT", "stride_wk", "HAS_LORA", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_by_width}, do_bench=_tune_bench)(_grouped_mm_even)

    _TN_CONFIGS = [
        triton.Config({"BP": 128, "BQ": 128, "BM": 64}, num_warps=8, num_stages=3),
        triton.Config({"BP": 128, "BQ": 128, "BM": 32}, num_warps=4, num_stages=4),
        triton.Config({"BP": 64, "BQ": 128, "BM": 64}, num_warps=4, num_stages=4),
        triton.Config({"BP": 128, "BQ": 64, "BM": 64}, num_warps=4, num_stages=4),
        triton.Config({"BP": 64, "BQ": 64, "BM": 64}, num_warps=4, num_stages=3),
        # rank-r side (dA: P = r; dB: Q = r)
        triton.Config({"BP": 16, "BQ": 128, "BM": 128}, num_warps=4, num_stages=4),
        triton.Config({"BP": 32, "BQ": 128, "BM": 64}, num_warps=4, num_stages=4),
        triton.Config({"BP": 16, "BQ": 256, "BM": 64}, num_warps=4, num_stages=4),
        triton.Config({"BP": 128, "BQ": 16, "BM": 128}, num_warps=4, num_stages=4),
        triton.Config({"BP": 128, "BQ": 32, "BM": 64}, num_warps=4, num_stages=4),
        triton.Config({"BP": 256, "BQ": 16, "BM": 64}, num_warps=4, num_stages=4),
    ]
    _grouped_tn_tuned = triton.autotune(configs=_TN_CONFIGS, key=["P", "Q"], do_bench=_tune_bench,
                                        prune_configs_by={"early_config_prune": _prune_tn})(_grouped_tn_kernel)


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


# The epilogue launch (add_to): memory-bound (one read and one write of y), so one fixed tile shape; autotuning
# would also run this in-place kernel once per candidate on the same y.
EPILOGUE_BLOCKS = {"BM": 64, "BN": 128, "BK": 16}


def rows_hint(rows: int, experts: int) -> int:
    """The mean rows per expert, rounded up to a power of two: the grouped kernel's autotuning key for the row
    count (the tile that fits ~128 rows per expert is not the one for ~4), constant for a fixed number of tokens
    whatever the routing. The offsets' own counts are never read (that would be a host sync)."""
    return triton.next_power_of_2(max(1, -(-rows // max(1, experts))))


def _grouped_mm(x: torch.Tensor | None, w: torch.Tensor | None, w_strides: tuple[int, int, int], N: int,
                offsets: torch.Tensor, bias: torch.Tensor | None = None, u: torch.Tensor | None = None,
                lora_second: torch.Tensor | None = None, l_strides: tuple[int, int, int] = (0, 0, 0),
                alpha: float = 1.0, lora_scale: float = 1.0, out_dtype: torch.dtype | None = None,
                add_to: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) = alpha (x W_e^T + lora_scale u L_e) (+ b_e) per expert segment, W addressed by
    w_strides = (expert, n, k) strides and L by l_strides = (expert, r, n). With add_to (M, N) (x and w None):
    add_to += alpha lora_scale u L_e (+ b_e) in place, no reduction over K (torch's grouped mm made x W_e^T).
    The offsets hold absolute row numbers, so a slice offsets[e0:e1 + 1] with w, b, L of experts e0:e1 computes
    only those experts' rows: written into `out` (M, N), the other rows untouched."""
    if add_to is None:
        M, K = x.shape
        y = out if out is not None else alloc((M, N), out_dtype or x.dtype, x.device)
        x_strides = (x.stride(0), x.stride(1))
        precision = _input_precision(x.dtype)
    else:
        y, M, K = add_to, add_to.shape[0], 0
        x, w, x_strides, w_strides = y, y, (0, 0), (0, 0, 0)  # never read: the K loop is empty
        precision = _input_precision(y.dtype)
    E = offsets.shape[0] - 1
    R = 0 if u is None else u.shape[1]
    has_lora, has_bias = u is not None, bias is not None
    args = [x, *x_strides, w, *w_strides, y, y.stride(0), y.stride(1),
            bias if has_bias else y, *(bias.stride() if has_bias else (0, 0)),
            u if has_lora else y, *(u.stride() if has_lora else (0, 0)),
            lora_second if has_lora else y, *l_strides,
            offsets, M, N, K, E, R, rows_hint(M, E), float(alpha), float(lora_scale)]
    consts = dict(HAS_BIAS=has_bias, HAS_LORA=has_lora, ACCUMULATE=add_to is not None,
                  INPUT_PRECISION=precision, UPCAST=not y.is_cuda,
                  CAST_W=add_to is None and w.dtype != x.dtype,
                  CAST_L=has_lora and lora_second.dtype != u.dtype,
                  BLOCK_E=triton.next_power_of_2(E), BR=_rank_block(R))
    if y.is_cuda and add_to is None:
        def grid(meta):
            return (triton.cdiv(N, meta["BN"]), triton.cdiv(M, meta["BM"]) + E)
        _grouped_mm_tuned[grid](*args, **consts)
    else:
        b, launch = (EPILOGUE_BLOCKS, {"num_warps": 4}) if y.is_cuda else (INTERPRETER_BLOCKS, {})
        _grouped_mm_even[(triton.cdiv(N, b["BN"]), triton.cdiv(M, b["BM"]) + E)](
            *args, **consts, BM=b["BM"], BN=b["BN"], BK=b["BK"], **launch)
    return y


def _grouped_tn(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                out_strides: tuple[int, int, int], alpha: float = 1.0) -> torch.Tensor:
    """out[e] (P, Q), addressed by out_strides = (expert, p, q) = alpha * a_e^T b_e over expert e's rows."""
    P, Q = a.shape[1], b.shape[1]
    E = offsets.shape[0] - 1
    args = [a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), out, *out_strides, offsets, P, Q, float(alpha)]
    precision = _input_precision(a.dtype)
    if a.is_cuda:
        def grid(meta):
            return (triton.cdiv(P, meta["BP"]) * triton.cdiv(Q, meta["BQ"]), E)
        _grouped_tn_tuned[grid](*args, INPUT_PRECISION=precision, UPCAST=False)
    else:
        blk = INTERPRETER_BLOCKS
        _grouped_tn_kernel[(triton.cdiv(P, blk["BN"]) * triton.cdiv(Q, blk["BK"]), E)](
            *args, INPUT_PRECISION=precision, UPCAST=True, BP=blk["BN"], BQ=blk["BK"], BM=blk["BM"])
    return out


def _segment_sum(dy: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    E, N = offsets.shape[0] - 1, dy.shape[1]
    out = alloc((E, N), dtype, dy.device)
    BN = 128 if dy.is_cuda else INTERPRETER_BLOCKS["BN"]
    BM = 64 if dy.is_cuda else INTERPRETER_BLOCKS["BM"]
    _segment_sum_kernel[(triton.cdiv(N, BN), E)](dy, dy.stride(0), dy.stride(1), out, out.stride(0), offsets, N,
                                                 UPCAST=not dy.is_cuda, BM=BM, BN=BN)
    return out


def _weight_strides(w: torch.Tensor, transposed: bool, as_kn: bool = False) -> tuple[int, int, int]:
    """Strides of a dense stack stored (E, N, K) (or (E, K, N) when `transposed`) read as element (e, n, k): the
    forward's x W_e^T; with `as_kn` read as (e, k, n): the backward's dy W_e."""
    se, s1, s2 = w.stride()
    return (se, s2, s1) if transposed != as_kn else (se, s1, s2)


def _expert_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(expert, row, col) strides of a per-expert (E, a, b) tensor or of a shared (a, b) one (expert stride 0)."""
    return tuple(t.stride()) if t.dim() == 3 else (0, *t.stride())


# ---- the base GEMMs through torch's grouped mm ---------------------------------------------------------------

log = logging.getLogger("fasttune.kernels")
FALLBACKS = Fallbacks("grouped GEMM", log)
# torch.nn.functional.grouped_mm is the public name of torch._grouped_mm in recent torch; either may be missing
_TORCH_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
BASE_GEMMS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_operand_ok(t: torch.Tensor) -> bool:
    """torch's operand rule for its grouped mm (aten GroupedMMUtils.h check_valid_strides_and_return_transposed,
    and the TMA descriptors GroupMMCommon.cuh builds per group): each matrix row- or column-major with its leading
    stride a multiple of 16 bytes, the base address 16-byte aligned, and for a 3-D stack every expert's matrix too
    (the expert stride a multiple of 16 bytes: torch checks only the base). The 2-D ragged operand (rows) must be
    row-major here: column-major, every group's row count would have to be a multiple of 8, which torch asserts on
    the device (a crash, not an error)."""
    align = 16 // t.element_size()
    st, n = t.stride(), t.shape
    if t.data_ptr() % 16 or (t.dim() == 3 and st[0] % align):
        return False
    if st[-1] == 1 and st[-2] >= max(1, n[-1]):
        return st[-2] % align == 0
    if t.dim() == 3 and st[-2] == 1 and st[-1] >= max(1, n[-2]):
        return st[-1] % align == 0
    return False


def torch_grouped_mm_blocker(x: torch.Tensor, w: torch.Tensor) -> str | None:
    """Why torch's fused grouped mm cannot run this call's base GEMMs (x W_e^T, and dy W_e for dx), or None when it
    can. x (M, K) the sorted rows, w the dense 3-D weight in its stored layout. Reads host metadata only. torch runs
    a fused kernel (CUTLASS) only for bfloat16 on sm90 / sm100; anything else takes its per-expert loop, which
    copies the offsets to the host every call, so those cases stay on the Triton kernel."""
    if _TORCH_GROUPED_MM is None:
        return f"torch {torch.__version__} has no grouped mm (torch._grouped_mm)"
    if not FALLBACKS.usable("torch-grouped-mm"):
        return f"torch's grouped mm failed earlier in this process ({FALLBACKS.failed['torch-grouped-mm']})"
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return (f"activations {x.dtype}, weight {w.dtype}: torch's fused grouped mm takes bfloat16 only (other "
                "dtypes run its per-expert loop, which copies the offsets to the host)")
    if x.is_cuda:
        if torch.version.hip is not None:
            return "ROCm: torch's fused grouped mm used here is the CUDA (CUTLASS) one"
        major, minor = _cuda_capability(x.device.index if x.device.index is not None else torch.cuda.current_device())
        if major not in (9, 10):
            return (f"compute capability {major}.{minor}: torch builds its fused grouped mm for sm90 and sm100 only "
                    "(elsewhere it runs a per-expert loop that copies the offsets to the host)")
    if w.shape[0] >= 1024:
        return f"{w.shape[0]} experts: torch's grouped mm takes fewer than 1024 groups"
    if w.shape[1] % 8 or w.shape[2] % 8:
        return f"expert weight {tuple(w.shape)}: torch's grouped mm needs both matrix sizes multiples of 8 (16 bytes)"
    if not _tma_operand_ok(w):
        return (f"expert weight strides {tuple(w.stride())} (or its address) are not what torch's grouped mm takes: "
                "row- or column-major matrices at 16-byte aligned addresses")
    if not _tma_operand_ok(x):
        return (f"rows' strides {tuple(x.stride())} (or their address) are not what torch's grouped mm takes here: "
                "row-major, the row stride a multiple of 16 bytes, at a 16-byte aligned address")
    return None


def _requested_kernel(base_gemm: str, x: torch.Tensor, w: torch.Tensor) -> str:
    """What runs the frozen-weight GEMMs of this call: "triton", "torch", or "time" (measure both once per call
    shape: `_auto_choice`). "triton" is always Triton; "torch" torch's grouped mm or a ValueError saying why not
    (on CPU too: torch's per-expert loop, for the tests). "auto" reads FASTTUNE_GROUPED_MM (an override: "triton",
    "torch", or "auto"/unset): on CUDA "time" where torch's fused grouped mm can run, else Triton with the reason
    logged once (a warning when torch's was asked for by name, info otherwise: the Triton kernel is not a slower
    path, only the one left); on CPU (the interpreter) Triton without a log."""
    if base_gemm == "triton":
        return "triton"
    override = None
    if base_gemm == "auto":
        override = os.environ.get("FASTTUNE_GROUPED_MM", "") or "auto"
        if override not in BASE_GEMMS:
            raise ValueError(f"FASTTUNE_GROUPED_MM must be one of {BASE_GEMMS} (or unset), got {override!r}")
        if not x.is_cuda or override == "triton":
            return "triton"
    reason = torch_grouped_mm_blocker(x, w)
    if reason is None:
        return "torch" if base_gemm == "torch" or override == "torch" else "time"
    if base_gemm == "torch":
        raise ValueError(f"base_gemm='torch' cannot run here: {reason}")
    if override == "torch":
        FALLBACKS.note(f"triton:{reason}", f"the experts' base GEMMs run in the Triton grouped kernel: {reason}")
    else:
        _say_once(f"auto-triton:{reason}", f"the experts' base GEMMs run in the Triton grouped kernel (torch's "
                  f"grouped mm, the other candidate of base_gemm='auto', cannot run: {reason})")
    return "triton"


_SAID: set[str] = set()


def _say_once(key: str, message: str) -> None:
    """An info line once per process: a kernel choice that is not a slower path (those go through FALLBACKS)."""
    if key not in _SAID:
        _SAID.add(key)
        log.info("grouped GEMM: %s", message)


# ---- "auto": the faster of the two base-GEMM kernels, measured once per call shape ---------------------------
#
# Neither kernel wins everywhere (bench/RESULTS.md, kernels_moe and moe_train): the Triton kernel fuses the LoRA
# term and the bias into the GEMM (one launch, one rounding), torch's grouped mm (CUTLASS) is the faster bare GEMM
# on some expert shapes but needs a second launch for LoRA + bias. So "auto" times both, once, on the first call
# of each (direction, call shape) on CUDA, and keeps the faster: each candidate run once to warm up (Triton's
# autotuning, torch's first-call setup), then AUTO_REPS runs of each timed with CUDA events, twice in alternation,
# the best of the two rounds. That first call waits for the device (one host sync per new shape and direction, a
# few milliseconds); later calls read the cached choice (no sync). Never timed during CUDA graph capture or a
# torch.compile trace: such a call runs Triton and leaves the shape undecided (logged once), so an eager call
# decides it later. A choice within AUTO_MARGIN goes to Triton: it rounds once where torch's path rounds the base
# product and then the sum, and a 3% difference is within the run-to-run noise of a few timed runs.

AUTO_REPS = 3
AUTO_MARGIN = 0.97  # torch's grouped mm is chosen when its time < AUTO_MARGIN x the Triton kernel's
# (direction, rows bucket, in features, out features, weight shape, weight strides, dtype, device, bias, LoRA
# second factor's shape) -> {"kernel": "triton" | "torch", "triton_ms": ..., "torch_ms": ...}
AUTO_CHOICES: dict[tuple, dict] = {}


def auto_key(direction: str, rows: torch.Tensor, w: torch.Tensor, n_out: int, bias: torch.Tensor | None,
             lora_second: torch.Tensor | None) -> tuple:
    """The call shape a choice is kept for: direction ("forward" or "grad_input"), the row count rounded up to a
    power of two (a fixed token count is one bucket whatever the routing; decode and training are different
    ones), the operands' sizes and the weight's layout, dtype and device, bias, and the LoRA factor fused into
    this direction's epilogue (its shape; None without LoRA)."""
    return (direction, triton.next_power_of_2(max(1, rows.shape[0])), rows.shape[1], n_out, tuple(w.shape),
            tuple(w.stride()), rows.dtype, str(rows.device), bias is not None,
            None if lora_second is None else tuple(lora_second.shape))


def _time_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _untimeable() -> bool:
    """Inside CUDA graph capture or a torch.compile trace: no timing (no sync) possible."""
    return (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()) or torch.compiler.is_compiling()


def _auto_choice(key: tuple, run_triton, run_torch) -> str:
    """"triton" or "torch" for this call shape: the cached choice, else both timed now (see above). A torch
    grouped mm that raises here is recorded as failed (FALLBACKS) and Triton chosen."""
    known = AUTO_CHOICES.get(key)
    if known is not None:
        return known["kernel"]
    if _untimeable():
        FALLBACKS.note(f"auto-untimed:{key}", f"base_gemm='auto' met the call shape {key} first inside CUDA graph "
                       "capture or a compile trace, where it cannot time the two kernels: Triton there, and the "
                       "choice is made at the first eager call of that shape")
        return "triton"
    try:
        run_torch()
    except RuntimeError as e:  # a torch build without the kernel, a check this file does not know
        FALLBACKS.fail("torch-grouped-mm", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        AUTO_CHOICES[key] = {"kernel": "triton", "triton_ms": None, "torch_ms": None}
        return "triton"
    run_triton()
    ms = {"triton": float("inf"), "torch": float("inf")}
    for _ in range(2):
        for name, fn in (("triton", run_triton), ("torch", run_torch)):
            ms[name] = min(ms[name], _time_ms(fn, AUTO_REPS))
    kernel = "torch" if ms["torch"] < AUTO_MARGIN * ms["triton"] else "triton"
    AUTO_CHOICES[key] = {"kernel": kernel, "triton_ms": ms["triton"], "torch_ms": ms["torch"]}
    log.info("grouped GEMM: base_gemm='auto' chose %s for %s (Triton kernel %.3f ms, torch grouped mm %.3f ms, "
             "LoRA and bias included)", kernel, key, ms["triton"], ms["torch"])
    return kernel


def _torch_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[m] = a[m] @ b[e] (K, N) for the rows m of expert e: torch's grouped mm, whose `offs` are the E
    cumulative end offsets (our offsets[1:], int32; an empty expert is an empty group). No rows: no launch."""
    if a.shape[0] == 0:
        return a.new_empty((0, b.shape[2]))
    return _TORCH_GROUPED_MM(a, b, offs=offsets[1:])


# A quantised expert stack (NF4) is dequantised for the frozen-weight GEMMs into a temporary of the compute dtype:
# at most this many bytes of it at a time (a few experts per launch), not the whole stack (gpt-oss-20b's gate_up in
# bf16: 1.06 GB, the largest transient of its 16 GB QLoRA step).
DEQUANT_CHUNK_BYTES = 256 * 2**20


def _expert_chunks(weight, dtype: torch.dtype) -> list[tuple[int, int]] | None:
    """The expert ranges a quantised stack is dequantised in, one after another, for the Triton base GEMM; None
    when it is dequantised whole: dense, within one chunk, or stored in blocks that straddle experts (which can
    only be dequantised whole: logged once)."""
    if isinstance(weight, torch.Tensor):
        return None
    E = weight.shape[0]
    step = max(1, DEQUANT_CHUNK_BYTES // (math.prod(weight.shape[1:]) * dtype.itemsize))
    if step >= E:
        return None
    if not getattr(weight, "rows_dequantizable", False):
        FALLBACKS.note(f"dequant-whole:{type(weight).__name__}:{tuple(weight.shape)}",
                       f"a {type(weight).__name__} expert stack {tuple(weight.shape)} is dequantised whole for each "
                       "grouped GEMM (its quantisation blocks straddle experts), not a few experts at a time")
        return None
    return [(e, min(e + step, E)) for e in range(0, E, step)]


def dequant_temporary_bytes(weight, dtype: torch.dtype) -> int:
    """Bytes of the largest temporary the Triton base GEMMs dequantise a quantised stack into (memory planning):
    its largest expert range, or the whole stack when it is not dequantised in ranges; 0 for a dense stack of
    `dtype`. (torch's grouped mm path, FASTTUNE_GROUPED_MM=torch, dequantises whole.)"""
    if isinstance(weight, torch.Tensor):
        return 0 if weight.dtype == dtype else weight.numel() * dtype.itemsize
    per_expert = math.prod(weight.shape[1:]) * dtype.itemsize
    chunks = _expert_chunks(weight, dtype)
    return per_expert * (weight.shape[0] if chunks is None else max(b - a for a, b in chunks))


def _chunked_base_mm(x: torch.Tensor, weight, chunks: list[tuple[int, int]], transposed: bool, as_kn: bool,
                     N: int, offsets: torch.Tensor, bias: torch.Tensor | None, lora: dict) -> torch.Tensor:
    """The Triton grouped GEMM (x W_e^T, or with `as_kn` x W_e) with a quantised stack dequantised `chunks` (expert
    ranges) at a time: each launch reads its experts' offsets, weight, bias and per-expert adapter (a shared one
    whole), and writes their rows of one output."""
    y = alloc((x.shape[0], N), x.dtype, x.device)
    for e0, e1 in chunks:
        w = weight.dequantize_rows(e0, e1, x.dtype)
        w = w if w.dtype == x.dtype else w.to(x.dtype)
        part = dict(lora)
        if "lora_second" in part and part["lora_second"].dim() == 3:
            part["lora_second"] = part["lora_second"][e0:e1]
        _grouped_mm(x, w, _weight_strides(w, transposed, as_kn), N, offsets[e0:e1 + 1],
                    None if bias is None else bias[e0:e1], out=y, **part)
    return y


def _base_product(kernel: str, rows: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int],
                  w_view_kn: torch.Tensor, n_out: int, offsets: torch.Tensor, bias: torch.Tensor | None,
                  lora: dict) -> torch.Tensor:
    """rows W_e^T (+ b_e + the fused LoRA term) per expert through one kernel: "triton" (one launch, LoRA and
    bias in the epilogue) or "torch" (torch's grouped mm on `w_view_kn`, the stored tensor viewed (E, K, N), then
    one Triton launch adding LoRA and bias in place)."""
    if kernel == "triton":
        return _grouped_mm(rows, w, w_strides, n_out, offsets, bias, **lora)
    if not _tma_operand_ok(rows):  # e.g. an expanded gradient from autograd: the layout torch's kernel takes
        rows = rows.clone(memory_format=torch.contiguous_format)
    y = _torch_mm(rows, w_view_kn, offsets)
    if lora or bias is not None:  # + s u L_e + b_e in place: one pass over y
        _grouped_mm(None, None, (0, 0, 0), n_out, offsets, bias, add_to=y, **lora)
    return y


def _frozen_gemm(requested: str, direction: str, rows: torch.Tensor, weight, w: torch.Tensor | None,
                 transposed: bool, as_kn: bool, n_out: int, offsets: torch.Tensor, bias: torch.Tensor | None,
                 lora: dict, strict: bool) -> torch.Tensor:
    """The frozen-weight GEMM of one direction: forward y = x W_e^T (+ b_e + s u B_e^T), or (`as_kn`) grad-input
    dx = dy W_e (+ g A_e). `requested` from `_requested_kernel`; `w` the dense stack in the compute dtype, or
    None for a quantised stack dequantised a few experts at a time (`_expert_chunks`: always the Triton kernel,
    which is what the memory plan counts). With "time", the cached or measured choice (`_auto_choice`). A torch
    grouped mm that raises is re-raised when it was asked for by name (`strict`: base_gemm="torch"), else recorded
    as failed (FALLBACKS, logged once) and the Triton kernel runs."""
    if w is None:
        return _chunked_base_mm(rows, weight, _expert_chunks(weight, rows.dtype), transposed, as_kn, n_out,
                                offsets, bias, lora)
    strides = _weight_strides(w, transposed, as_kn)
    # torch's grouped mm takes W_e^T (forward) or W_e (dx) as (E, K, N) views of the stored tensor, no copy
    w_kn = w if transposed != as_kn else w.transpose(1, 2)
    run = functools.partial(_base_product, rows=rows, w=w, w_strides=strides, w_view_kn=w_kn, n_out=n_out,
                            offsets=offsets, bias=bias, lora=lora)
    kernel = requested
    if requested == "time":
        key = auto_key(direction, rows, w, n_out, bias, lora.get("lora_second"))
        kernel = _auto_choice(key, functools.partial(run, "triton"), functools.partial(run, "torch"))
    if kernel == "torch":
        try:
            return run("torch")
        except RuntimeError as e:  # a torch build without the kernel, a check this file does not know
            if strict:
                raise
            FALLBACKS.fail("torch-grouped-mm", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return run("triton")


class GroupedLinearFunction(torch.autograd.Function):
    """y = x W_e^T + b_e + s (x A_e^T) B_e^T per expert segment, with a hand-written backward (module docstring);
    the frozen-weight GEMMs (forward and dx) through torch's grouped mm or the Triton kernel (`_frozen_gemm`),
    the rest Triton. A quantised W is dequantised for them, DEQUANT_CHUNK_BYTES at a time on the Triton path
    (`_expert_chunks`)."""

    @staticmethod
    def forward(ctx, x, weight, offsets, bias, lora_A, lora_B, scaling: float, transposed: bool, base_gemm: str):
        # the kernel choice reads shapes, dtype, strides and alignment only: a dequantised stack is a fresh
        # contiguous (aligned) tensor of x's dtype, as this stand-in on the meta device (address 0)
        w = dense_weight(weight, x.dtype) if isinstance(weight, torch.Tensor) else torch.empty(
            weight.shape, dtype=x.dtype, device="meta")
        N = w.shape[2] if transposed else w.shape[1]
        requested = _requested_kernel(base_gemm, x, w)
        if requested != "torch" and _expert_chunks(weight, x.dtype) is not None:
            if requested == "time":
                _say_once(f"chunked:{tuple(weight.shape)}", f"the quantised expert stack {tuple(weight.shape)} "
                          "runs in the Triton grouped kernel, dequantised a few experts at a time (torch's grouped "
                          "mm, the other candidate of base_gemm='auto', would need it dequantised whole)")
            requested, w = "triton", None
        elif w.is_meta:
            w = dense_weight(weight, x.dtype)
        u = None
        lora = {}
        if lora_A is not None:  # float32 masters are read as they are and rounded to x's dtype in the kernel
            u = _grouped_mm(x, lora_A, _expert_strides(lora_A), lora_A.shape[-2], offsets)  # x A_e^T, (M, r)
            b_se, b_sn, b_sr = _expert_strides(lora_B)
            lora = dict(u=u, lora_second=lora_B, l_strides=(b_se, b_sr, b_sn), lora_scale=scaling)
        y = _frozen_gemm(requested, "forward", x, weight, w, transposed, False, N, offsets, bias, lora,
                         strict=base_gemm == "torch")
        ctx.weight, ctx.scaling, ctx.transposed = weight, scaling, transposed
        ctx.requested, ctx.strict = requested, base_gemm == "torch"
        ctx.save_for_backward(x, offsets, u, bias, lora_A, lora_B)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, u, bias, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, _, need_b, need_A, need_B, _, _, _ = ctx.needs_input_grad
        s = ctx.scaling
        K = x.shape[1]
        dx = dw = db = dA = dB = None
        g = None
        if lora_A is not None and (need_x or need_A):  # adapters rounded to dy's dtype in the kernels
            b_se, b_sn, b_sr = _expert_strides(lora_B)
            g = _grouped_mm(dy, lora_B, (b_se, b_sr, b_sn), lora_B.shape[-1], offsets, alpha=s)  # s dy B_e, (M, r)
        if need_x:
            lora = dict(u=g, lora_second=lora_A, l_strides=_expert_strides(lora_A)) if g is not None else {}
            chunked = ctx.requested == "triton" and _expert_chunks(ctx.weight, dy.dtype) is not None
            w = None if chunked else dense_weight(ctx.weight, dy.dtype)
            # W_e read as (K, N): element (e, k, n); a quantised stack dequantised again (never saved)
            dx = _frozen_gemm(ctx.requested, "grad_input", dy, ctx.weight, w, ctx.transposed, True, K, offsets,
                              None, lora, strict=ctx.strict)
        if need_w:
            weight = ctx.weight
            dw = alloc(weight.shape, weight.dtype, weight.device)
            se, s1, s2 = dw.stride()
            _grouped_tn(dy, x, offsets, dw, (se, s2, s1) if ctx.transposed else (se, s1, s2))
        if need_b:
            db = _segment_sum(dy, offsets, bias.dtype)
        if need_A:
            if lora_A.dim() == 3:
                dA = alloc(lora_A.shape, lora_A.dtype, lora_A.device)
                _grouped_tn(g, x, offsets, dA, dA.stride())
            else:
                dA = (g.t() @ x).to(lora_A.dtype)
        if need_B:
            if lora_B.dim() == 3:
                dB = alloc(lora_B.shape, lora_B.dtype, lora_B.device)
                _grouped_tn(dy, u, offsets, dB, dB.stride(), alpha=s)
            else:
                dB = (dy.t() @ u).mul_(s).to(lora_B.dtype)
        return dx, dw, None, db, dA, dB, None, None, None


def grouped_linear(x: torch.Tensor, weight, expert_offsets: torch.Tensor, bias: torch.Tensor | None = None,
                   lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None, lora_scaling: float = 1.0,
                   transposed: bool = False, base_gemm: str = "auto") -> torch.Tensor:
    """x (M, K), rows sorted by expert (sort_by_expert); weight (E, N, K), or (E, K, N) with transposed=True (read
    in place); expert_offsets (E+1,) int32 from 0 to M; bias (E, N); lora_A (E, r, K) or shared (r, K); lora_B
    (E, N, r) or shared (N, r). Returns y (M, N): row m of expert e is x_m W_e^T + b_e + s (x_m A_e^T) B_e^T.
    Differentiable in x, weight (when it requires grad), bias, lora_A and lora_B. base_gemm: the kernel of the
    frozen-weight GEMMs (forward and dx): "auto" (on CUDA the faster of the Triton kernel and torch's grouped mm,
    measured once per call shape and direction, where torch's runs fused; FASTTUNE_GROUPED_MM=triton / torch
    overrides; else Triton, the reason logged once), "torch" (or a ValueError why not), "triton"; everything else
    is Triton (CUDA or the interpreter). `fasttune.kernels.grouped_linear` picks between this and the reference."""
    _check_shapes(x, weight, expert_offsets, bias, lora_A, lora_B, transposed)
    if expert_offsets.dtype != torch.int32:
        raise ValueError(f"expert_offsets must be int32 (as sort_by_expert returns), got {expert_offsets.dtype}")
    if base_gemm not in BASE_GEMMS:
        raise ValueError(f"base_gemm must be one of {BASE_GEMMS}, got {base_gemm!r}")
    return GroupedLinearFunction.apply(x, weight, expert_offsets, bias, lora_A, lora_B, float(lora_scaling),
                                       bool(transposed), base_gemm)
