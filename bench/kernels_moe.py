"""Benchmark: the MoE experts' frozen-weight GEMMs (kernels/grouped_gemm.py) per projection and direction — the
Triton grouped kernel, torch's grouped mm, and what base_gemm="auto" keeps — against a dense bf16 GEMM of the same
FLOPs, in one process on one CUDA GPU.

    python bench/kernels_moe.py --shapes qwen3-30b-a3b --warmup 2 --iters 5 --out $OUT/kernels_moe.json

Shapes: Qwen3-30B-A3B (hidden 2048, expert width 768, 128 experts, top-8) and gpt-oss-20b (hidden 2880, width
2880, 32 experts, top-4, expert biases, weights stored (E, K, N) as transformers keeps them: transposed=True),
--tokens tokens (default 4096; 2048 is bench/moe_train.py's step), uniform random top-k routing (ragged loads);
both projections: gate_up (K = hidden, N = 2 x width) and down (K = width, N = hidden); M = tokens x top-k rows.

Directions: fwd (y = x W_e^T (+ b_e)) and dx (dx = dy W_e), the two GEMMs of a LoRA fine-tuning step that read
the frozen expert weights (dA, dB and the rank-r products are small and always Triton). Implementations, each
exactly what grouped_linear runs for that direction (`_frozen_gemm`): triton (the Triton kernel, bias fused),
torch (torch's grouped mm, then the Triton epilogue launch when there is a bias), the same two with per-expert
LoRA r=16 fused (+lora16: the rank-16 product u = x A^T or g = s dy B precomputed, not timed), auto+lora16 (the
kernel base_gemm="auto" keeps after timing both once: `choice`), and dense (one torch.mm of M rows with one
N x K weight: the same FLOPs, cuBLAS). Each row: median ms over CUDA-event timings after --warmup calls (the
first call of a Triton shape autotunes), TFLOP/s of the base GEMM (2 M N K; LoRA's rank-16 work not counted), and
vs_dense = that / the dense row's in the same direction and shape (the issue's target: >= 0.6). max_rel_err:
against the float32 per-expert loop (grouped_linear_reference) on the same bf16 inputs (max abs difference / max
abs value). Rows print as they are measured (with the seconds since the start: the first rows of a shape carry
the Triton compilation and autotuning), and the JSON is rewritten after each; a failing case gives a row with ms
None and an `error`.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from common import median_cuda_ms  # noqa: E402
from fasttune.kernels import grouped_gemm as gg  # noqa: E402

SHAPES = {  # experts, top-k, hidden, width, biases + (E, K, N) storage
    "qwen3-30b-a3b": (128, 8, 2048, 768, False),
    "gpt-oss-20b": (32, 4, 2880, 2880, True),
}
RANK = 16
SCALING = 2.0
IMPLS = ("dense", "triton", "torch", "triton+lora16", "torch+lora16", "auto+lora16")
HEAD = (f"{'shape':14} {'proj':8} {'dir':4} {'impl':14} {'ms':>8} {'TFLOP/s':>8} {'vs dense':>8} {'rel err':>8} "
        f"{'choice':>7} {'t s':>6}")


def _fmt(row: dict) -> str:
    def f(v, spec):
        return format(v, spec) if isinstance(v, float) else format("-" if v is None else str(v), ">8")
    return (f"{row['shape']:14} {row['proj']:8} {row['dir']:4} {row['impl']:14} {f(row.get('ms'), '8.3f')} "
            f"{f(row.get('tflops'), '8.1f')} {f(row.get('vs_dense'), '8.2f')} {f(row.get('max_rel_err'), '8.1e')} "
            f"{row.get('choice') or '-':>7} {row['elapsed_s']:6.1f}"
            + (f"  ERROR {row['error']}" if row.get("error") else ""))


def projection_rows(shape: str, proj: str, tokens: int, warmup: int, iters: int, t0: float, rows: list[dict],
                    emit, impls: tuple[str, ...] = IMPLS) -> None:
    """Measure every implementation of both directions of one projection, appending to `rows` (`emit` after each)."""
    E, k, H, I, gpt_oss = SHAPES[shape]
    K, N = (H, 2 * I) if proj == "gate_up" else (I, H)
    M = tokens * k
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.rand(tokens, E, device="cuda", generator=gen).topk(k, dim=1).indices
    _, offsets, _ = gg.sort_by_expert(ids, E)
    w_nk = (torch.randn(E, N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
    weight = w_nk.transpose(1, 2).contiguous() if gpt_oss else w_nk  # the checkpoint's own layout
    del w_nk
    bias = torch.randn(E, N, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.1 if gpt_oss else None
    A = (torch.randn(E, RANK, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
    B = (torch.randn(E, N, RANK, device="cuda", generator=gen) * 0.01).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", generator=gen, dtype=torch.bfloat16)
    counts = offsets.diff()
    meta = {"shape": shape, "proj": proj, "tokens": tokens, "M": M, "N": N, "K": K, "E": E, "top_k": k,
            "rows_per_expert_min": int(counts.min()), "rows_per_expert_max": int(counts.max())}
    # the rank-16 products the LoRA epilogues read, by torch's grouped mm (not timed; no Triton compilation)
    u = gg._TORCH_GROUPED_MM(x, A.transpose(1, 2), offs=offsets[1:])  # x A_e^T (M, r)
    g = gg._TORCH_GROUPED_MM(dy, B, offs=offsets[1:]) * SCALING  # s dy B_e (M, r)
    rows = []
    for direction in ("fwd", "dx"):
        fwd = direction == "fwd"
        rows_in, n_out = (x, N) if fwd else (dy, K)
        b_se, b_sn, b_sr = gg._expert_strides(B)  # the epilogue reads B as element (e, r, n), as grouped_linear does
        lora = (dict(u=u, lora_second=B, l_strides=(b_se, b_sr, b_sn), lora_scale=SCALING) if fwd
                else dict(u=g, lora_second=A, l_strides=gg._expert_strides(A)))
        b = bias if fwd else None
        # float32 references: fwd x W_e^T + b_e (+ s u B_e^T); dx dy W_e (+ g A_e), W_e read from the other side
        ref_base = gg.grouped_linear_reference(rows_in.float(), weight.float(), offsets, None if b is None
                                               else b.float(), transposed=gpt_oss == fwd)
        # + s u B_e^T (B (E, N, r)); + g A_e (A (E, r, K) read as (E, K_in, N_out): transposed)
        ref_lora = ref_base + (SCALING if fwd else 1.0) * gg.grouped_linear_reference(
            lora["u"].float(), (B if fwd else A).float(), offsets, transposed=not fwd)
        w0 = weight[0].t() if gpt_oss else weight[0]  # expert 0 as (N, K)
        dense_mat = (w0.t() if fwd else w0).contiguous()  # (K_in, N_out) row-major
        flops = 2.0 * M * N * K
        dense_tflops = None
        for impl in ("dense", *[i for i in impls if i != "dense"]):  # dense first: the vs_dense baseline
            row = {**meta, "dir": direction, "impl": impl}
            try:
                if impl == "dense":
                    fn, ref = functools.partial(torch.mm, rows_in, dense_mat), None
                else:
                    kernel, with_lora = impl.split("+")[0], impl.endswith("lora16")
                    requested = "time" if kernel == "auto" else kernel
                    fn = functools.partial(gg._frozen_gemm, requested, "forward" if fwd else "grad_input", rows_in,
                                           weight, weight, gpt_oss, not fwd, n_out, offsets, b,
                                           lora if with_lora else {}, strict=kernel == "torch")
                    ref = ref_lora if with_lora else ref_base
                if ref is not None:
                    with torch.no_grad():
                        got = fn().float()
                    row["max_rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
                    del got
                if impl.startswith("auto"):
                    key = gg.auto_key("forward" if fwd else "grad_input", rows_in, weight, n_out, b,
                                      lora["lora_second"])
                    row["choice"] = gg.AUTO_CHOICES[key]["kernel"]
                    row["auto_timings_ms"] = {n: gg.AUTO_CHOICES[key][f"{n}_ms"] for n in ("triton", "torch")}
                ms = median_cuda_ms(fn, warmup, iters)
                tflops = flops / ms / 1e9
                row.update(ms=ms, tflops=tflops)
                if impl == "dense":
                    dense_tflops = tflops
                row["vs_dense"] = None if dense_tflops is None else tflops / dense_tflops
            except Exception as e:  # one failing case must not hide the others
                traceback.print_exc()
                row.update(ms=None, error=f"{type(e).__name__}: {e}")
            row["elapsed_s"] = time.perf_counter() - t0
            rows.append(row)
            emit(row)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here (rewritten after each row)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=4096, help="tokens routed (rows = tokens x top-k)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"comma list from {','.join(IMPLS)} (dense always runs: the baseline)")
    args = p.parse_args(argv)
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    if set(impls) - set(IMPLS):
        p.error(f"--impls: unknown {sorted(set(impls) - set(IMPLS))}")
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    import triton

    blocked = gg.torch_grouped_mm_blocker(torch.empty(8, 8, device="cuda", dtype=torch.bfloat16),
                                          torch.empty(2, 8, 8, device="cuda", dtype=torch.bfloat16))
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "torch_grouped_mm_blocked": blocked, "auto_margin": gg.AUTO_MARGIN}
    print(env, flush=True)
    print(HEAD, flush=True)
    print("-" * len(HEAD), flush=True)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def write():
        if args.out:  # after every row: a run cut short by a time limit keeps its rows
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"env": env, "rows": rows, "elapsed_s": time.perf_counter() - t0}, f, indent=1)

    def emit(row):
        print(_fmt(row), flush=True)
        write()

    for shape in args.shapes:
        for proj in ("gate_up", "down"):
            projection_rows(shape, proj, args.tokens, args.warmup, args.iters, t0, rows, emit, impls)
            torch.cuda.empty_cache()
    write()
    print(f"(total {time.perf_counter() - t0:.0f} s)" + (f"; wrote {args.out}" if args.out else ""), flush=True)
    return rows


if __name__ == "__main__":
    main()
