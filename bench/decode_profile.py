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

    python bench/decode_profile.py --out $OUT/decode_profile.json
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


def step_profile(model, batch: int, prompt_len: int, n: int, device: torch.device) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from fasttune.generation import Generator, SamplingParams

    gen = Generator(model, max_batch_size=batch, max_seq_len=prompt_len + n + 2, cuda_graphs=True)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = llama_config("tiny" if args.tiny else "8b", args.vocab)
    result = dict(info=dict(versions(), shape="tiny" if args.tiny else "8b", args=vars(args)))
    if device.type == "cuda":
        bw = copy_bandwidth(device)
        result["copy_gb_s"] = round(bw / 1e9, 1)
        print("copy GB/s", result["copy_gb_s"], flush=True)
        result["gemv"] = gemv_rows(cfg, device, bw)
    hf = build_hf(cfg, device, dtype)
    model = fasttune_from_hf(hf, cfg)
    result["weight_bytes_per_step"] = weight_bytes(model)
    if device.type == "cuda":
        result["step"] = step_profile(model, args.batch, args.prompt_len, args.new_tokens, device)
        s = result["step"]
        s["hbm_tb_s"] = round(result["weight_bytes_per_step"] / (s["step_ms"] / 1e3) / 1e12, 3)
        s["share_of_4.8TBs"] = round(s["hbm_tb_s"] / 4.8, 3)
        s["share_of_copy"] = round(s["hbm_tb_s"] * 1e12 / bw, 3)
        print(json.dumps({k: v for k, v in s.items() if k != "kernels"}), flush=True)
        for r in s["kernels"][:25]:
            print(f"{r['ms_per_step']:8.4f} ms  x{r['per_step']:5.1f}  {r['name']}")
    out = args.out or (os.path.join(os.environ["OUT"], "decode_profile.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
