"""One decoding step of attention over a static per-slot KV cache, as ONE Triton launch (split-K with an in-kernel
combine). The fused path of `kernels.attention.decode_attention` on CUDA (issue 18).

Inputs: q (S, Hq, 1, D); k_cache, v_cache (S, M, Hk, D), slot s holding n_s = lengths[s] valid keys (the new token's
at n_s - 1); GQA group G = Hq / Hk (query head h reads kv head h // G, as repeat_interleave does). Query of head h
in slot s sees the keys j in [a_s, n_s), a_s = max(n_s - W, 0) with a sliding window of W keys (the query counts
itself), else a_s = 0. With scores x_j = scale q . k_j and an optional sink logit z_h (gpt-oss: one more softmax
column whose value is zero, `kernels.attention`'s "Attention sinks"):
    out = sum_j e^{x_j} v_j / (sum_j e^{x_j} + e^{z_h})            (no sink: drop the e^{z_h} term)

Split. The range [a_s, n_s) is cut into SPLITS chunks of C = ceil(ceil((n_s - a_s) / SPLITS) / BLOCK_N) * BLOCK_N
keys (chunk i: [a_s + i C, min(a_s + (i + 1) C, n_s)), possibly empty). SPLITS is static (a function of S, Hk, M and
the GPU's SM count: enough programs to fill the GPU at batch 1, `default_config`); C follows each slot's own
length at run time, so every non-empty chunk does a similar amount of work whatever the cache capacity M.
Program (s, hk, i) holds the G query rows of kv head hk (padded to GP >= 16 rows: tl.dot's minimum tile) and runs
the online softmax over its chunk, in base 2 (y_j = x_j log2 e), BLOCK_N keys per step:
    m' = max(m, max_j y_j),   l' = l 2^{m - m'} + sum_j 2^{y_j - m'},   o' = o 2^{m - m'} + sum_j 2^{y_j - m'} v_j
from m = -inf, l = 0, o = 0 (every step holds at least one key of the chunk, so m' is finite after it). The
partial (m_i, l_i, o_i) (float32, o unnormalised) of chunk i is exact for its keys; an empty chunk leaves
(-inf, 0, 0). Combine, per query row, with the sink's y_z = z_h log2 e:
    m = max(max_i m_i, y_z),   l = sum_i l_i 2^{m_i - m} + 2^{y_z - m},   out = sum_i o_i 2^{m_i - m} / l
(2^{-inf} = 0 drops empty chunks; without a sink y_z = -inf and its term vanishes). A row with no key at all
(n_s = 0, outside the contract) gives out = 0 instead of 0/0.

One launch. Each program writes its partial to a workspace (S, Hk, SPLITS, G[, D]), then `tl.debug_barrier()` (all
its threads' stores issued, ordered before what follows) and an acq_rel atomic add on the counter of (s, hk): the
release publishes the partial, and the program that reads SPLITS - 1 (the last of the group to finish, whichever
it is) acquires every other partial, combines them (workspace loads with .cg, i.e. L2, never a stale L1 line),
writes the output in q's dtype and stores 0 into the counter, so the next launch (the next layer, or a CUDA-graph
replay) starts from zero. Nothing waits on another program (no spin), so any scheduling order is safe. The
workspace and counters are allocated once per (device, S, Hk, SPLITS, G, D) and shared by every layer and step:
launches on one stream run in order. Under CUDA-graph capture with no workspace yet (a capture without an eager
warm-up), the call allocates its own (the graph's pool) and zeroes the counters inside the graph. SPLITS = 1 skips
the workspace: the program normalises and writes directly. In the Triton interpreter (CPU) programs run one after
the other, so the last program of each group combines there.

Precision: scores and softmax in float32. bf16/fp16 inputs: q k^T on tensor cores (exact products, float32 sums);
the probabilities 2^{y - m'} are rounded to the input dtype for the P V product (as flash attention does).
float32 inputs: both products in IEEE float32 (no TF32). Partials and the combine in float32; one rounding to the
output dtype at the end. In the interpreter (CPU) the products are taken in float32 from the same rounded operands
(its tl.dot mishandles bf16), so it computes what the GPU does up to float32 summation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import alloc, multiprocessors, tl, triton

LOG2E = 1.4426950408889634
MAX_SPLITS = 32
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape: `splits` programs per (slot, kv head) along the keys, `block_n` keys per loop step, Triton's
    num_warps / num_stages."""
    splits: int = 1
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2


_multiprocessors = multiprocessors  # one name the launch-shape tests patch


def default_config(S: int, Hk: int, M: int, device: torch.device) -> DecodeConfig:
    """Static launch shape for S slots, Hk kv heads, cache capacity M. Measured on an H200 at the 8B shape, batch 1
    (bench/decode_profile.py --attention, results/2026-12-03n_h200_decode_attention.json): 64 keys a step beat 32 and
    16 at every context; one split was best at M = 128 (4.1 us, against 5.9 with 4 splits of 32 keys), 32 splits at
    M = 4096 (13.7 us, 15.2 with 16) and within 5% of the best at M = 1024 with 8 to 32. So: one split per 128 keys
    of capacity, capped where the grid covers every SM twice (and at MAX_SPLITS); 64 keys a step unless chunks are
    shorter."""
    target = 2 * _multiprocessors(device)
    splits = max(1, min(MAX_SPLITS, triton.cdiv(target, S * Hk), triton.cdiv(M, 128)))
    block_n = 64 if M // splits >= 64 else 32
    return DecodeConfig(splits=splits, block_n=block_n)


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        Q, K, V, LENGTHS, SINKS, OUT, WS_O, WS_M, WS_L, COUNTERS,
        stride_qs, stride_qh, stride_ks, stride_km, stride_kh, stride_vs, stride_vm, stride_vh, stride_os, stride_oh,
        Hk, window, qk_scale,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        s = tl.program_id(0)
        hk = tl.program_id(1)
        split = tl.program_id(2)
        s64 = s.to(tl.int64)

        # this program's chunk of [a, n) (module docstring)
        n = tl.load(LENGTHS + s).to(tl.int32)
        if HAS_WINDOW:
            a = tl.maximum(n - window, 0)
        else:
            a = n * 0
        per = tl.cdiv(tl.cdiv(n - a, SPLITS), BLOCK_N) * BLOCK_N
        lo = a + split * per
        hi = tl.minimum(lo + per, n)

        rows = tl.arange(0, GP)
        row_ok = rows < G
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(Q + s64 * stride_qs + (hk * G + rows)[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, BLOCK_D], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_N)
        k_base = K + s64 * stride_ks + hk * stride_kh
        v_base = V + s64 * stride_vs + hk * stride_vh
        for start in range(lo, hi, BLOCK_N):
            j = start + cols
            key_ok = j < hi
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + j[:, None] * stride_km + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:  # the interpreter's tl.dot multiplies bf16 storage bits: exact float32 products instead
                y = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            elif IEEE:
                y = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                y = tl.dot(q, tl.trans(k))
            y = tl.where(key_ok[None, :], y * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(y, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(y - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + j[:, None] * stride_vm + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:  # p rounded as on the GPU, then exact float32 products
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            elif IEEE:
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out_rows = OUT + s64 * stride_os + (hk * G + rows)[:, None] * stride_oh + d[None, :]
        if SPLITS == 1:
            m_tot = m_i
            l_tot = l_i
            if HAS_SINKS:
                z = tl.load(SINKS + hk * G + rows, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
                m_tot = tl.maximum(m_i, z)
                l_tot = l_i * tl.exp2(m_i - m_tot) + tl.exp2(z - m_tot)
                acc = acc * tl.exp2(m_i - m_tot)[:, None]
            l_tot = tl.where(l_tot > 0, l_tot, 1.0)  # n = 0 (outside the contract): 0, not 0/0
            tl.store(out_rows, (acc / l_tot[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            group = s64 * Hk + hk
            ws_ml = (group * SPLITS + split) * G + rows
            tl.store(WS_M + ws_ml, m_i, mask=row_ok)
            tl.store(WS_L + ws_ml, l_i, mask=row_ok)
            tl.store(WS_O + ws_ml[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
            tl.debug_barrier()  # every thread's partial stores precede the release below
            count = tl.atomic_add(COUNTERS + group, 1, sem="acq_rel")
            if count == SPLITS - 1:  # the last program of (s, hk): every partial is visible to it
                sp = tl.arange(0, SPLITS_P)
                sp_ok = sp < SPLITS
                for g in tl.static_range(G):
                    at = (group * SPLITS + sp) * G + g
                    m = tl.load(WS_M + at, mask=sp_ok, other=float("-inf"), cache_modifier=".cg")
                    l = tl.load(WS_L + at, mask=sp_ok, other=0.0, cache_modifier=".cg")
                    o = tl.load(WS_O + at[:, None] * D + d[None, :], mask=sp_ok[:, None] & d_ok[None, :],
                                other=0.0, cache_modifier=".cg")
                    m_tot = tl.max(m, axis=0)
                    if HAS_SINKS:
                        z = tl.load(SINKS + hk * G + g).to(tl.float32) * 1.4426950408889634
                        m_tot = tl.maximum(m_tot, z)
                    m_safe = tl.where(m_tot == float("-inf"), 0.0, m_tot)
                    w = tl.exp2(m - m_safe)
                    l_tot = tl.sum(l * w, axis=0)
                    if HAS_SINKS:
                        l_tot += tl.exp2(z - m_safe)
                    l_tot = tl.where(l_tot > 0, l_tot, 1.0)
                    res = tl.sum(o * w[:, None], axis=0) / l_tot
                    tl.store(OUT + s64 * stride_os + (hk * G + g) * stride_oh + d, res.to(OUT.dtype.element_ty),
                             mask=d_ok)
                tl.store(COUNTERS + group, 0)  # for the next launch (the next layer, a graph replay)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _workspace(device: torch.device, S: int, Hk: int, splits: int, G: int, D: int) -> tuple[torch.Tensor, ...]:
    """(o, m, l, counters) for a split launch: allocated once per shape and device, counters zeroed at allocation
    and left at zero by every launch (module docstring)."""
    key = (device.type, device.index, S, Hk, splits, G, D)
    ws = _WORKSPACES.get(key)
    if ws is not None:
        return ws
    f32 = dict(dtype=torch.float32, device=device)
    ws = (torch.empty(S * Hk * splits * G * D, **f32), torch.empty(S * Hk * splits * G, **f32),
          torch.empty(S * Hk * splits * G, **f32), torch.zeros(S * Hk, dtype=torch.int32, device=device))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return ws  # the graph's own pool; the counters' zeroing is captured and runs at every replay
    _WORKSPACES[key] = ws
    return ws


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            *, scale: float, sliding_window: int | None = None, sinks: torch.Tensor | None = None,
                            config: DecodeConfig | None = None) -> torch.Tensor:
    """One decode step (module docstring): q (S, Hq, 1, D), k_cache / v_cache (S, M, Hk, D) with unit stride on D,
    lengths (S,) int on q's device (>= 1 each), sinks (Hq,) or None -> (S, Hq, 1, D) in q's dtype. `config`
    overrides the launch shape (bench, tests). No host sync, static shapes: CUDA-graph capturable."""
    if triton is None:
        raise RuntimeError("decode_attention_triton needs Triton")
    S, Hq, T, D = q.shape
    _, M, Hk, _ = k_cache.shape
    if T != 1 or v_cache.shape != k_cache.shape or k_cache.shape[0] != S or k_cache.shape[3] != D or Hq % Hk:
        raise ValueError(f"decode_attention_triton: q (S, Hq, 1, D) and caches (S, M, Hk, D) with Hk | Hq, got "
                         f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"decode_attention_triton: q, k, v of one dtype among fp16/bf16/fp32, got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention_triton: the caches need unit stride along head_dim")
    G = Hq // Hk
    cfg = config or default_config(S, Hk, M, q.device)
    out = alloc((S, Hq, 1, D), q.dtype, q.device)
    if S == 0:
        return out
    if cfg.splits > 1:
        ws_o, ws_m, ws_l, counters = _workspace(q.device, S, Hk, cfg.splits, G, D)
    else:
        ws_o = ws_m = ws_l = counters = out  # unused (SPLITS = 1 writes the output directly)
    window = 0 if sliding_window is None else int(sliding_window)
    _decode_attention_kernel[(S, Hk, cfg.splits)](
        q, k_cache, v_cache, lengths, sinks if sinks is not None else q, out, ws_o, ws_m, ws_l, counters,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        Hk, window, scale * LOG2E,
        G=G, GP=max(16, triton.next_power_of_2(G)), D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_N=cfg.block_n, SPLITS=cfg.splits, SPLITS_P=triton.next_power_of_2(cfg.splits),
        HAS_WINDOW=sliding_window is not None, HAS_SINKS=sinks is not None, IEEE=q.dtype == torch.float32,
        UPCAST=not q.is_cuda,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
