"""Dense matrix-vector products for decode rows: y = x W^T + b for x with few rows (M <= MAX_ROWS), one launch.

Shapes: x (M, K) bf16/fp16/fp32, W (N, K) row-major in x's dtype, b (N,) or none, y (M, N) in x's dtype. The math:
    y_{m,n} = round_x(sum_k x_{m,k} W_{n,k} + b_n)            (products and sum in float32, one rounding)
the value F.linear gives up to the order of the float32 sum. With the GLU prologue (`glu=` an activation of
kernels/glu.py), the input is the packed gate_up projection output h (M, 2K) = [gate | up] and
    x_{m,k} = round_x(act(h_{m,k}) * h_{m,K+k})               (act and the product in float32, one rounding)
which is exactly the tensor glu_packed(h) would write (the same activation code, `glu._act_and_grad`), so
gemv(h, W, glu=act) equals F.linear(glu_packed(h, act), W) in the model's dtype rounding, without the (M, K)
intermediate and without the GLU's own launch.

Why: at batch 1 every projection of a decode step is bound by reading W once (2 B per weight in bf16, 1-8 rows of
x: 1-8 FLOPs per byte, far below any GPU's ridge point), so time is bytes over bandwidth. cuBLAS picks split-K
GEMMs for the narrow shapes (o_proj 4096 -> 4096, down_proj 14336 -> 4096 at the Llama-3.1-8B shape): a second
reduce kernel per projection, and inside a CUDA graph every extra kernel also costs its launch gap. Here each
program owns BLOCK_N output features over the whole of K: no reduce kernel, no atomics, deterministic.

Two inner loops, picked by M:
- M = 1 (batch-1 decode): each lane keeps float32 partial sums of its weights times x (acc (BLOCK_N, BLOCK_K),
  FMAs on the CUDA cores, the 16-byte loads of W along K), reduced across the tile once at the end;
- M > 1: tensor-core MMAs, acc (BLOCK_N, BLOCK_M) = W_tile (BLOCK_N, BLOCK_K) x^T (BLOCK_K, BLOCK_M), x padded to
  BLOCK_M = 16 rows (the smallest tl.dot size; the padding rows are masked, never read, and never stored).
Rows of W past N (the last tile) are clamped to row N - 1 for the loads (so the loads stay unmasked and
vectorised) and masked at the store. K not a multiple of BLOCK_K masks every K block (tests and odd shapes only).
In the Triton interpreter (CPU tests) 16-bit values are widened to float32 before tl.dot, and roundings to bf16 are
done by hand (`_triton.round_bf16`: the interpreter's cast truncates).

Launch shape (`default_config`): the best of the H200 sweep per 8B projection shape (`bench/decode_profile.py
--gemv-bench`): at M = 1, BLOCK_N = 8 (N = 4096: 512 programs, all resident at once) with 512 or 1,024 columns a
step, or 4 x 1,024 for the LM head, where the hand prefetch (the next block's loads issued before this block's
FMAs: Triton's pipeliner only stages loads that feed tl.dot) helped; at M > 1, BLOCK_N = 32, BLOCK_K = 256, 3
stages (cp.async).
Everything is launched with static shapes and no host sync: CUDA-graph capturable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import alloc, as_rows, tl, triton
from .glu import _activation_id
from .nf4_matmul import _DTYPE_CODE

if triton is not None:
    from .glu import _act_and_grad
    from .nf4_matmul import _round_to, _store_y

# The decode rows this kernel is for: above, cuBLAS's GEMMs (tensor cores, K split as they choose) are the plan.
MAX_ROWS = 8


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: `block_n` output features per program, `block_k` columns of K per loop iteration, Triton's
    num_warps / num_stages (the MMA loop's pipelining), `prefetch`: the FMA loop (one row) loads the next block
    before this block's FMAs (two blocks in flight per program)."""
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = False




def default_config(M: int, N: int, K: int, device: torch.device) -> GemvConfig:
    """The launch shape for an (M, K) x (N, K)^T product. One row: the winners of the H200 sweep at the 8B shapes
    (bench/decode_profile.py --gemv-bench, results/2026-12-03n_h200_gemv_bench.json, 20 calls in a CUDA graph):
    BLOCK_N 8 with 512 columns a step (1,024 at K = 14,336), the hand prefetch off, for q/k/v (12.2 us against
    cuBLAS's 14.1), o (6.3 / 9.9), gate_up (56.4 / 56.2) and down with its GLU (30.1 / 32.9); the LM head's best
    was 4 x 1,024 with the prefetch (238 / 247 us). Several rows: 32 x 256 tiles through tl.dot, 3 stages (16 x 256 lost
    to cuBLAS at 8 rows but for gate_up; 32 x 256 was the sweep's best there, still behind cuBLAS for q/k/v, o and
    down: "triton-o-down" in generation/fused.py uses the GEMV at one row only)."""
    if M == 1:
        if N >= 65536:  # the LM head
            block_n, block_k, prefetch = 4, 1024, True
        else:
            block_n, block_k, prefetch = 8, 1024 if K >= 8192 else 512, False
        stages = 1
    else:  # tl.dot; the W and x tiles are staged through shared memory (3 stages)
        block_n, block_k, stages, prefetch = 32, 256, 3, False
    block_k = max(16, min(block_k, triton.next_power_of_2(max(K, 1))))
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=stages, prefetch=prefetch)


if triton is not None:

    @triton.jit
    def _x_load(ptrs, mask, up_offset, MASKED: tl.constexpr, GLU: tl.constexpr):
        """The raw input at ptrs: (x, x), or (gate, up) of the packed gate_up row (GLU)."""
        if MASKED:
            v = tl.load(ptrs, mask=mask, other=0.0)
        else:
            v = tl.load(ptrs)
        u = v
        if GLU:
            if MASKED:
                u = tl.load(ptrs + up_offset, mask=mask, other=0.0)
            else:
                u = tl.load(ptrs + up_offset)
        return v, u

    @triton.jit
    def _x_form(v, u, GLU: tl.constexpr, ACT: tl.constexpr, X_DT: tl.constexpr, UPCAST: tl.constexpr):
        """The float32 values of x: x itself, or (GLU) round_x(act(gate) * up)."""
        v = v.to(tl.float32)
        if GLU:
            a, _ = _act_and_grad(v, ACT)
            v = _round_to(a * u.to(tl.float32), X_DT, UPCAST)  # what glu_packed stores; act(0) * 0 = 0 if masked
        return v

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, up_offset, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        MASK_K: tl.constexpr, PREFETCH: tl.constexpr,
        USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, X_DT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rk = tl.arange(0, BLOCK_K)
        # the last tile's rows past N read row N - 1 (unmasked, vectorised loads); they are never stored
        w_ptrs = w_ptr + tl.minimum(rn, N - 1)[:, None] * K + rk[None, :]
        x_ty = x_ptr.dtype.element_ty
        rm = tl.arange(0, BLOCK_M)
        m_ok = rm < M
        if USE_DOT:
            x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]  # (BLOCK_K, BLOCK_M): x^T
        else:
            x_ptrs = x_ptr + rk
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # MMAs
        acc_fma = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # FMAs: per-lane partial sums (one is dead code)
        if USE_DOT:  # the MMA operands' loads are pipelined by Triton (num_stages)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=(rk[None, :] + k0) < K, other=0.0)
                g, u = _x_load(x_ptrs, m_ok[None, :] & ((rk[:, None] + k0) < K), up_offset, True, GLU)
                xv = _x_form(g, u, GLU, ACT, X_DT, UPCAST)
                if UPCAST:  # the interpreter's tl.dot would multiply 16-bit tiles as raw bits
                    acc = tl.dot(w.to(tl.float32), xv, acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, xv.to(x_ty), acc, input_precision="ieee")
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
        elif PREFETCH:
            # Triton does not pipeline loads that feed no tl.dot: the next block of W (and of x) is loaded by hand
            # before this block's FMAs, so each program keeps two blocks of loads in flight (the one past K masked)
            w_next = tl.load(w_ptrs, mask=rk[None, :] < K, other=0.0)
            g_next, u_next = _x_load(x_ptrs, rk < K, up_offset, True, GLU)
            for k0 in range(0, K, BLOCK_K):
                w, g, u = w_next, g_next, u_next
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
                ahead = (rk + (k0 + BLOCK_K)) < K
                w_next = tl.load(w_ptrs, mask=ahead[None, :], other=0.0)
                g_next, u_next = _x_load(x_ptrs, ahead, up_offset, True, GLU)
                # exact products of 16-bit values, one rounding per add
                acc_fma = tl.fma(w.to(tl.float32), _x_form(g, u, GLU, ACT, X_DT, UPCAST)[None, :], acc_fma)
        else:
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=(rk[None, :] + k0) < K, other=0.0)
                g, u = _x_load(x_ptrs, (rk + k0) < K, up_offset, MASK_K, GLU)
                acc_fma = tl.fma(w.to(tl.float32), _x_form(g, u, GLU, ACT, X_DT, UPCAST)[None, :], acc_fma)
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
        if USE_DOT:
            _store_y(acc, bias_ptr, out_ptr, rn, rm, n_ok, m_ok, stride_om, HAS_BIAS, X_DT, UPCAST)
        else:
            y = tl.sum(acc_fma, axis=1)
            if HAS_BIAS:
                y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            if UPCAST:
                y = _round_to(y, X_DT, UPCAST)
            tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, glu: str | None) -> int:
    """K, validated."""
    if weight.dim() != 2:
        raise ValueError(f"gemv needs a 2-D weight (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    width = 2 * K if glu is not None else K
    if x.shape[-1] != width:
        what = f"the packed gate_up output (..., 2 x {K})" if glu is not None else f"x (..., {K})"
        raise ValueError(f"gemv: expected {what} for a weight of shape {tuple(weight.shape)}, got {tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODE or weight.dtype != x.dtype:
        raise TypeError(f"gemv: x and the weight must share one of bf16/fp16/fp32, got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"gemv: bias must be ({N},), got {tuple(bias.shape)}")
    return K


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   glu: str | None = None) -> torch.Tensor:
    """The unfused path the kernel stands for: glu_packed (when `glu`) then F.linear, in x's dtype."""
    from . import glu_packed  # late: fasttune.kernels imports this module

    _check(x, weight, bias, glu)
    if glu is not None:
        x = glu_packed(x, glu)
    return torch.nn.functional.linear(x, weight, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, glu: str | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x (..., K) W^T + b through the kernel (module docstring), for at most MAX_ROWS rows of x; with `glu` (an
    activation of kernels/glu.py) x is the packed gate_up output (..., 2K) and the product is
    glu_packed(x) W^T + b. `config` overrides the launch shape (bench, tests). Output (..., N) in x's dtype."""
    if triton is None:
        raise RuntimeError("gemv needs Triton; use gemv_reference")
    K = _check(x, weight, bias, glu)
    act = _activation_id(glu) if glu is not None else 0
    N = weight.shape[0]
    lead = x.shape[:-1]
    x2 = as_rows(x)
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv is for at most {MAX_ROWS} rows (decode steps), got {M}: use F.linear")
    out = alloc((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out.view(*lead, N)
    w = weight if weight.is_contiguous() else weight.contiguous()
    cfg = config or default_config(M, N, K, x.device)
    use_dot = M > 1
    if use_dot and cfg.block_n < 16:
        raise ValueError(f"gemv: {M} rows take tensor-core MMAs, which need block_n >= 16, got {cfg.block_n}")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # F.linear's rounding of b
    _gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
        x2, w, out if bias is None else bias, out, M, N, K, x2.stride(0), K, out.stride(0),
        BLOCK_M=16 if use_dot else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        MASK_K=K % cfg.block_k != 0, PREFETCH=cfg.prefetch and not use_dot,
        USE_DOT=use_dot, HAS_BIAS=bias is not None, GLU=glu is not None, ACT=act, X_DT=_DTYPE_CODE[x.dtype],
        UPCAST=not x.is_cuda, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*lead, N)
