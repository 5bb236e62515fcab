#!/usr/bin/env python
"""Where a batch-1 decode step's time goes (issue 18: batch-1 decode at >= 70% of the HBM bound).

Three measurements on one GPU, Llama-3.1-8B shape, random bf16 weights (bench/generate_speed.py's model):
  copy      the bandwidth a plain device-to-device copy of 2 GiB reaches (read + write bytes / time): what the
            memory system gives a streaming kernel, beside the 4.8 TB/s on the data sheet;
  gemv      each projection shape of a decode step as one (1, K) x (K, N) matmul (torch.matmul, cuBLAS), timed
            alone with CUDA events: weight bytes / time, and as a share of the copy bandwidth;
  step      the Generator's decode step under CUDA graphs, profiled: the device time of each kernel (by name) per
            step, from a generate() of N+1 tokens minus one of 1 token, divided by N; and the step's wall time, so
            that "gaps" = wall - sum of kernel times (launch latency between the graph's kernels).

  attention (--attention: only this) the decode step's attention alone at the 8B shape (32 q / 8 kv heads, head_dim
            128, bf16) for batch 1, 8, 64 and contexts 128, 1024, 4096 (cache capacity = context = every slot's
            length): the one-launch Triton kernel (kernels/decode_attention.py, its default launch shape) against
            aten's flash decode (`_torch_flash_decode`: split-kv kernel + combine), each as 32 calls over 32 layers'
            caches (cold in L2 as in a real step, up to ~8 GiB of caches) captured in one CUDA graph, timed with CUDA
            events: us per call. At batch 1 it also sweeps the Triton launch shape (splits x keys per step), as long as
            the run has taken under 40 s (each new shape compiles).

  gemv-bench  (--gemv-bench, alone: < 40 s) each projection shape at M = 1 and 8 rows, the Triton GEMV
            (kernels/gemv.py: its default launch shape, and at M = 1 a sweep of alternatives) vs torch.matmul
            (cuBLAS); down_proj as the GEMV with its GLU prologue vs glu_packed + matmul. Each timed twice with CUDA
            events: alone (median of 50, launch included) and in a CUDA graph of 20 calls (as inside a decode step;
            `_graph_us_per_call`).

    python bench/decode_profile.py --out $OUT/decode_profile.json
    FASTTUNE_DECODE_TRITON=0 python bench/decode_profile.py --out $OUT/decode_profile_flash.json  # the step with
                                                                  # aten's flash decode instead of the Triton kernel
    python bench/decode_profile.py --attention --out $OUT/decode_attention.json
    python bench/decode_profile.py --gemv triton --out $OUT/decode_profile_gemv.json   # the step with the GEMV
    python bench/decode_profile.py --gemv-bench --out $OUT/gemv_bench.json
    python bench/decode_profile.py --tiny --device cpu            # smoke test (no profile: CUDA only)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import median_cuda_ms, sync, versions  # noqa: E402
from generate_speed import build_hf, fasttune_from_hf, llama_config, weight_bytes  # noqa: E402


def copy_bandwidth(device: torch.device) -> float:
    src = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = median_cuda_ms(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * src.numel() * 2 / (ms / 1e3)


def gemv_rows(cfg: dict, device: torch.device, copy_bw: float) -> list[dict]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    shapes = {"qkv": (h, q + 2 * kv), "q": (h, q), "k": (h, kv), "o": (q, h), "gate_up": (h, 2 * i),
              "down": (i, h), "lm_head": (h, cfg["vocab_size"])}
    rows = []
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        ms = median_cuda_ms(lambda: torch.matmul(x, w.t()), warmup=5, iters=50)
        bw = w.numel() * 2 / (ms / 1e3)
        rows.append(dict(proj=name, K=k, N=n, us=round(ms * 1e3, 2), gb_s=round(bw / 1e9, 1),
                         share_of_copy=round(bw / copy_bw, 3)))
        print(json.dumps(rows[-1]), flush=True)
        del w
    return rows


# The launch shapes the GEMV bench tries besides the default: (block_n, block_k, num_warps, num_stages, prefetch)
# (each a Triton compile: 16 in all, the bulk of the bench's time)
GEMV_SWEEP = {1: [(8, 512, 4, 1, True), (8, 512, 4, 1, False), (8, 1024, 4, 1, False), (4, 1024, 4, 1, True),
                  (16, 256, 4, 1, True), (32, 128, 4, 1, True)],
              8: [(16, 256, 4, 3, False), (32, 256, 4, 3, False)]}


def gemv_bench(cfg: dict, device: torch.device, copy_bw: float | None) -> list[dict]:
    from fasttune.kernels import glu_packed
    from fasttune.kernels import gemv as gv

    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    shapes = {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * i), "down+glu": (i, h),
              "lm_head": (h, cfg["vocab_size"])}
    rows = []
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        glu = "silu" if name == "down+glu" else None
        for M in (1, 8):
            x = torch.randn(M, 2 * k if glu else k, device=device, dtype=torch.bfloat16)
            if glu:
                def ref(): return torch.matmul(glu_packed(x, glu), w.t())
            else:
                def ref(): return torch.matmul(x, w.t())
            expected = ref().float()
            default = gv.default_config(M, n, k, device)
            configs = [default] + [c for c in (gv.GemvConfig(*t) for t in GEMV_SWEEP[M]) if c != default]
            row = dict(proj=name, K=k, N=n, M=M, cublas_us=round(median_cuda_ms(ref, 5, 50) * 1e3, 2),
                       cublas_graph_us=round(_graph_us_per_call([ref] * 20, device), 2), triton=[])
            for c in configs:
                def tri(): return gv.gemv(x, w, glu=glu, config=c)
                err = ((tri().float() - expected).abs().max() / expected.abs().max()).item()
                t = _graph_us_per_call([tri] * 20, device)
                row["triton"].append(dict(config=[c.block_n, c.block_k, c.num_warps, c.num_stages, c.prefetch],
                                          default=c == default, us=round(median_cuda_ms(tri, 5, 50) * 1e3, 2),
                                          graph_us=round(t, 2), tb_s=round(w.numel() * 2 / t / 1e6, 3),
                                          max_rel_diff_vs_cublas=float(f"{err:.3g}")))
            best = min(row["triton"], key=lambda r: r["graph_us"])
            row["best_triton_graph_us"], row["best_config"] = best["graph_us"], best["config"]
            if copy_bw:
                row["best_share_of_copy"] = round(w.numel() * 2 / (best["graph_us"] / 1e6) / copy_bw, 3)
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "triton"}), flush=True)
            for r in row["triton"]:
                print("   ", json.dumps(r), flush=True)
    return rows


def step_profile(model, batch: int, prompt_len: int, n: int, device: torch.device, gemv: str = "cublas") -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from fasttune.generation import Generator, SamplingParams

    gen = Generator(model, max_batch_size=batch, max_seq_len=prompt_len + n + 2, cuda_graphs=True, gemv=gemv)
    ids = torch.randint(3, 1000, (batch, prompt_len)).tolist()

    def run(k):
        gen.generate(ids, SamplingParams(max_new_tokens=k, temperature=0.0, stop_token_ids=[]))

    try:
        for k in (n + 1, 1, n + 1, 1):
            run(k)
        walls = {}
        for k in (n + 1, 1):
            sync(device)
            t0 = time.perf_counter()
            run(k)
            sync(device)
            walls[k] = time.perf_counter() - t0
        per_kernel = {}
        for k, sign in ((n + 1, 1), (1, -1)):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(k)
                sync(device)
            for e in prof.events():
                if e.device_type == DeviceType.CUDA:
                    name = e.name[:100]
                    t, c = per_kernel.get(name, (0.0, 0))
                    per_kernel[name] = (t + sign * e.device_time_total, c + sign)
    finally:
        gen.release()
    step_ms = (walls[n + 1] - walls[1]) / n * 1e3
    rows = sorted(((k, t / n / 1e3, c / n) for k, (t, c) in per_kernel.items() if c > 0),
                  key=lambda r: -r[1])
    kernel_ms = sum(r[1] for r in rows)
    return dict(batch=batch, new_tokens=n, step_ms=round(step_ms, 3), kernel_ms_per_step=round(kernel_ms, 3),
                gaps_ms_per_step=round(step_ms - kernel_ms, 3), kernels_per_step=round(sum(r[2] for r in rows), 1),
                kernels=[dict(name=k, ms_per_step=round(t, 4), per_step=round(c, 2)) for k, t, c in rows[:40]])


def _graph_us_per_call(calls, device: torch.device) -> float:
    """calls: a list of no-argument launches (one per layer). Captured once in a CUDA graph after an eager warm-up;
    median replay time / len(calls), in microseconds."""
    for fn in calls:  # compile, workspaces, memo tables: nothing may be allocated for the first time while capturing
        fn()
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    ms = median_cuda_ms(graph.replay, warmup=3, iters=20)
    del graph
    return ms * 1e3 / len(calls)


def attention_rows(device: torch.device, layers: int = 32, cache_budget: int = 8 * 2**30,
                   sweep_seconds: float = 40.0) -> list[dict]:
    from fasttune.kernels.attention import _torch_flash_decode
    from fasttune.kernels.decode_attention import DecodeConfig, decode_attention_triton, default_config

    Hq, Hk, D, dtype = 32, 8, 128, torch.bfloat16
    scale = D ** -0.5
    rows = []
    t0 = time.perf_counter()
    for S in (1, 8, 64):
        for ctx in (128, 1024, 4096):
            per_layer = 2 * S * ctx * Hk * D * 2
            n_caches = max(1, min(layers, cache_budget // per_layer))
            caches = [(torch.randn(S, ctx, Hk, D, device=device, dtype=dtype),
                       torch.randn(S, ctx, Hk, D, device=device, dtype=dtype)) for _ in range(n_caches)]
            q = torch.randn(S, 1, Hq, D, device=device, dtype=dtype).transpose(1, 2)
            lengths = torch.full((S,), ctx, dtype=torch.int32, device=device)
            memo: dict = {}
            kv = [caches[i % n_caches] for i in range(layers)]

            def triton_calls(cfg=None):
                return [lambda k=k, v=v: decode_attention_triton(q, k, v, lengths, scale=scale, config=cfg)
                        for k, v in kv]
            flash_calls = [lambda k=k, v=v: _torch_flash_decode(q, k, v, lengths, scale, None, memo) for k, v in kv]
            ref = _torch_flash_decode(q, kv[0][0], kv[0][1], lengths, scale, None, memo)
            got = decode_attention_triton(q, kv[0][0], kv[0][1], lengths, scale=scale)
            cfg = default_config(S, Hk, ctx, device)
            row = dict(batch=S, context=ctx, splits=cfg.splits, block_n=cfg.block_n,
                       triton_us=round(_graph_us_per_call(triton_calls(), device), 2),
                       torch_flash_us=round(_graph_us_per_call(flash_calls, device), 2),
                       max_abs_diff_vs_flash=float((got.float() - ref.float()).abs().max()),
                       kv_bytes=per_layer)
            row["speedup"] = round(row["torch_flash_us"] / row["triton_us"], 2)
            row["triton_tb_s"] = round(per_layer / (row["triton_us"] * 1e-6) / 1e12, 3)
            if S == 1:  # the launch shape around the default, while the whole run stays under ~60 s
                row["sweep_us"] = {}
                for sp in (1, 4, 8, 16, 32):
                    for bn in (16, 32, 64):
                        if sp * bn <= 2 * ctx and time.perf_counter() - t0 < sweep_seconds:
                            us = _graph_us_per_call(triton_calls(DecodeConfig(sp, bn)), device)
                            row["sweep_us"][f"splits{sp}_block{bn}"] = round(us, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
            caches = kv = None  # freed before the next shape allocates its caches
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--attention", action="store_true", help="only the decode attention comparison (CUDA)")
    ap.add_argument("--gemv", choices=["cublas", "triton", "triton-o-down"], default="cublas",
                    help="the Generator's GEMV for the step profile (kernels/gemv.py)")
    ap.add_argument("--gemv-bench", action="store_true",
                    help="only the copy bandwidth and the Triton GEMV vs cuBLAS per projection shape (CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.attention:
        if device.type != "cuda":
            ap.error("--attention needs CUDA (it captures CUDA graphs)")
        result = dict(info=dict(versions(), args=vars(args)), attention=attention_rows(device))
        out = args.out or (os.path.join(os.environ["OUT"], "decode_attention.json") if os.environ.get("OUT") else None)
        if out:
            Path(out).write_text(json.dumps(result, indent=2))
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = llama_config("tiny" if args.tiny else "8b", args.vocab)
    result = dict(info=dict(versions(), shape="tiny" if args.tiny else "8b", args=vars(args)))
    out = args.out or (os.path.join(os.environ["OUT"], "decode_profile.json") if os.environ.get("OUT") else None)
    if device.type == "cuda":
        bw = copy_bandwidth(device)
        result["copy_gb_s"] = round(bw / 1e9, 1)
        print("copy GB/s", result["copy_gb_s"], flush=True)
        if args.gemv_bench:
            result["gemv_bench"] = gemv_bench(cfg, device, bw)
            if out:
                Path(out).write_text(json.dumps(result, indent=2))
            return 0
        result["gemv"] = gemv_rows(cfg, device, bw)
    elif args.gemv_bench:
        ap.error("--gemv-bench needs a CUDA device")
    hf = build_hf(cfg, device, dtype)
    model = fasttune_from_hf(hf, cfg)
    result["weight_bytes_per_step"] = weight_bytes(model)
    if device.type == "cuda":
        result["step"] = step_profile(model, args.batch, args.prompt_len, args.new_tokens, device, args.gemv)
        s = result["step"]
        s["hbm_tb_s"] = round(result["weight_bytes_per_step"] / (s["step_ms"] / 1e3) / 1e12, 3)
        s["share_of_4.8TBs"] = round(s["hbm_tb_s"] / 4.8, 3)
        s["share_of_copy"] = round(s["hbm_tb_s"] * 1e12 / bw, 3)
        from fasttune.kernels.attention import FALLBACKS as ATTENTION_FALLBACKS
        # which decode attention the step ran: the Triton kernel unless it failed (named here) or
        # FASTTUNE_DECODE_TRITON=0 (then aten's flash decode: its split-kv kernel and combine show in the kernels)
        s["attention_failed_paths"] = dict(ATTENTION_FALLBACKS.failed)
        s["FASTTUNE_DECODE_TRITON"] = os.environ.get("FASTTUNE_DECODE_TRITON", "1")
        print(json.dumps({k: v for k, v in s.items() if k != "kernels"}), flush=True)
        for r in s["kernels"][:25]:
            print(f"{r['ms_per_step']:8.4f} ms  x{r['per_step']:5.1f}  {r['name']}")
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
