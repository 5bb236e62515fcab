"""Benchmark: the MoE grouped GEMM (kernels/grouped_gemm.py) against a dense bf16 GEMM of the same FLOPs, the
per-expert PyTorch loop and torch's grouped_mm, all in one process on one CUDA GPU.

    python bench/kernels_moe.py --out $OUT/kernels_moe.json         # prints a table, writes the JSON rows

Shapes: Qwen3-30B-A3B (hidden 2048, expert width 768, 128 experts, top-8) and gpt-oss-20b (hidden 2880, width
2880, 32 experts, top-4, expert biases, weights stored (E, K, N) as transformers keeps them: transposed=True),
4096 tokens, uniform random top-k routing; both expert projections: gate_up (K = hidden, N = 2 x width) and
down (K = width, N = hidden). M = tokens x top-k rows.

Modes: "fwd"; "fwd+bwd frozen W" (forward, then dx; the LoRA fine-tuning case, with dA and dB when LoRA is on);
"fwd+bwd train W" (forward, then dx and dW). Implementations: dense (one torch.mm over M rows with one N x K
weight: the same FLOPs, cuBLAS), grouped (fasttune's grouped_linear, base GEMMs in the Triton kernel
(base_gemm="triton"), no LoRA), grouped+lora16 (the same with per-expert LoRA r=16, frozen W), grouped_torch_mm
(grouped_linear with base_gemm="torch": forward and dx in torch's grouped mm, bias added by the Triton epilogue,
dW Triton), torch_grouped_mm+lora16 (the same with per-expert LoRA r=16, frozen W: what the MoE layer runs for LoRA
fine-tuning on an sm90 GPU in bf16, base_gemm="auto" choosing torch), loop (grouped_linear_reference: one F.linear
per expert after one host read of the offsets; what transformers' eager expert loop does), torch_grouped_mm (the
bare torch.nn.functional.grouped_mm or torch._grouped_mm when this torch has it, bias by repeat_interleave;
transformers' fastest expert path). Each row: median ms over CUDA-event timings after
warm-up (the first calls autotune the Triton kernels), TFLOP/s of the base GEMMs (2 M N K per GEMM; the LoRA
row's extra rank-16 work is not counted), and vs_dense = that throughput / the dense row's in the same mode and
shape (the issue's target: >= 0.6 for grouped). max_rel_err: each implementation's forward output against the
loop's on the same bf16 inputs (max abs difference / max abs value). In "train W" the grouped dW writes E
weight gradients (E x N x K) where the dense one writes one (N x K), so there it does inherently more memory
traffic than the dense comparison at the same FLOPs. A failing case gives a row with ms
None and an `error`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from common import median_cuda_ms  # noqa: E402
from fasttune.kernels import grouped_gemm as gg  # noqa: E402

SHAPES = {  # tokens, top-k, experts, hidden, width, biases + (E, K, N) storage
    "qwen3-30b-a3b": (4096, 8, 128, 2048, 768, False),
    "gpt-oss-20b": (4096, 4, 32, 2880, 2880, True),
}
MODES = ("fwd", "fwd+bwd frozen W", "fwd+bwd train W")
RANK = 16


_median_ms = median_cuda_ms


def _torch_grouped_mm():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _step(forward, leaves, dy, mode):
    """One timed step: the forward, and in the backward modes the gradients of `leaves`."""
    def run():
        if mode == "fwd":
            with torch.no_grad():
                return forward()
        y = forward()
        torch.autograd.grad(y, leaves, dy)
        return y
    return run


def projection_rows(shape: str, proj: str, warmup: int, iters: int) -> list[dict]:
    T, k, E, H, I, gpt_oss = SHAPES[shape]
    K, N = (H, 2 * I) if proj == "gate_up" else (I, H)
    M = T * k
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(k, dim=1).indices
    order, offsets, _ = gg.sort_by_expert(ids, E)
    x0 = torch.randn(M, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    w_nk = (torch.randn(E, N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
    weight = w_nk.transpose(1, 2).contiguous() if gpt_oss else w_nk  # the checkpoint's own layout
    bias = torch.randn(E, N, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.1 if gpt_oss else None
    A = (torch.randn(E, RANK, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
    B = (torch.randn(E, N, RANK, device="cuda", generator=gen) * 0.01).to(torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", generator=gen, dtype=torch.bfloat16)
    dense_w = w_nk[0].clone()
    flops_fwd = 2.0 * M * N * K
    counts = offsets.diff()
    meta = {"shape": shape, "proj": proj, "M": M, "N": N, "K": K, "E": E, "top_k": k,
            "rows_per_expert_min": int(counts.min()), "rows_per_expert_max": int(counts.max())}

    def leaves(train_w, lora):
        x = x0.clone().requires_grad_()
        w = weight.clone().requires_grad_(train_w)
        b = None if bias is None else bias.clone().requires_grad_()
        a_, b_ = (A.clone().requires_grad_(), B.clone().requires_grad_()) if lora else (None, None)
        return x, w, b, a_, b_

    reference_y = gg.grouped_linear_reference(x0, weight, offsets, bias, transposed=gpt_oss)
    reference_lora_y = gg.grouped_linear_reference(x0, weight, offsets, bias, A, B, 2.0, transposed=gpt_oss)
    # kind: None (dense), "reference", "torch" (the bare op), or (base_gemm, LoRA on) for fasttune's grouped_linear
    impls = {
        "dense": None,
        "grouped": ("triton", False),
        "grouped+lora16": ("triton", True),
        "loop": "reference",
    }
    if _torch_grouped_mm() is not None:
        impls["grouped_torch_mm"] = ("torch", False)
        impls["torch_grouped_mm+lora16"] = ("torch", True)
        impls["torch_grouped_mm"] = "torch"
    rows = []
    for mode in MODES:
        train_w = mode == "fwd+bwd train W"
        n_gemms = 1 if mode == "fwd" else (2 if not train_w else 3)
        flops = flops_fwd * n_gemms
        dense_tflops = None
        for impl, kind in impls.items():
            lora = isinstance(kind, tuple) and kind[1]
            if lora and train_w:
                continue  # LoRA trains the adapters, not W
            row = {**meta, "mode": mode, "impl": impl}
            try:
                x, w, b, a_, b_ = leaves(train_w, lora)
                if kind is None:
                    xd = x0.clone().requires_grad_()
                    wd = dense_w.clone().requires_grad_(train_w)
                    bd = None if bias is None else bias[0].clone().requires_grad_()
                    fwd = (lambda: torch.addmm(bd, xd, wd.t())) if bd is not None else (lambda: xd @ wd.t())
                    grads = [t for t in (xd, wd, bd) if t is not None and t.requires_grad]
                    y_check = None
                elif kind == "torch":
                    mm = _torch_grouped_mm()
                    w_kn = w if gpt_oss else w.transpose(1, 2)  # (E, K, N) view; no copy
                    offs = offsets[1:]

                    def fwd(mm=mm, w_kn=w_kn, offs=offs, x=x, b=b):
                        y = mm(x, w_kn, offs=offs)
                        if b is not None:  # transformers adds the bias per row's expert the same way
                            y = y + b.repeat_interleave(offs.diff(prepend=offs.new_zeros(1)).long(), dim=0,
                                                        output_size=M)
                        return y
                    grads = [t for t in (x, w, b) if t is not None and t.requires_grad]
                    y_check = fwd
                elif kind == "reference":
                    def fwd(x=x, w=w, b=b):
                        return gg.grouped_linear_reference(x, w, offsets, b, transposed=gpt_oss)
                    grads = [t for t in (x, w, b) if t is not None and t.requires_grad]
                    y_check = fwd
                else:
                    def fwd(base_gemm=kind[0], x=x, w=w, b=b, a_=a_, b_=b_):
                        return gg.grouped_linear(x, w, offsets, b, a_, b_, 2.0, transposed=gpt_oss,
                                                 base_gemm=base_gemm)
                    grads = [t for t in (x, w, b, a_, b_) if t is not None and t.requires_grad]
                    y_check = fwd
                if y_check is not None and mode == "fwd":
                    with torch.no_grad():
                        got = y_check().float()
                    ref = (reference_lora_y if lora else reference_y).float()
                    row["max_rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
                ms = _median_ms(_step(fwd, grads, dy, mode), warmup, iters)
                tflops = flops / ms / 1e9
                row.update(ms=ms, tflops=tflops)
                if impl == "dense":
                    dense_tflops = tflops
                row["vs_dense"] = None if dense_tflops is None else tflops / dense_tflops
            except Exception as e:  # one failing case must not hide the others
                traceback.print_exc()
                row.update(ms=None, error=f"{type(e).__name__}: {e}")
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    import triton

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "torch_grouped_mm": getattr(_torch_grouped_mm(), "__name__", None)}
    print(env)
    rows = []
    for shape in args.shapes:
        for proj in ("gate_up", "down"):
            rows += projection_rows(shape, proj, args.warmup, args.iters)
    head = f"{'shape':14} {'proj':8} {'mode':17} {'impl':24} {'ms':>8} {'TFLOP/s':>8} {'vs dense':>8} {'rel err':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def fmt(v, spec):
            return format(v, spec) if isinstance(v, float) else format("-" if v is None else str(v), ">8")
        print(f"{r['shape']:14} {r['proj']:8} {r['mode']:17} {r['impl']:24} {fmt(r.get('ms'), '8.3f')} "
              f"{fmt(r.get('tflops'), '8.1f')} {fmt(r.get('vs_dense'), '8.2f')} {fmt(r.get('max_rel_err'), '8.1e')}"
              + (f"  ERROR {r['error']}" if r.get("error") else ""))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
