#!/usr/bin/env python
"""The SmolLM2-135M-Instruct demo fine-tune (scripts/demo_smollm2.py: a persona from a dozen conversations, LoRA
r 8 on all linear layers, straight from the real Q4_1 GGUF) on a GPU, twice, side by side in one process:

  dequantised   the GGUF read into a bf16 model (`fasttune.load("x.gguf")`), LoRA over dense bf16 weights
  gguf blocks   `model.keep_quantized: true`: the decoder linears keep the file's Q4_1 blocks, dequantised on the
                fly into bf16 (the Triton kernel of kernels.gguf_dequant) in the fused LoRA forward and backward

Both through `fasttune train`'s own Trainer, the demo's data, settings and step count, in bf16. For each:
  tokens/s      real tokens / wall-clock seconds of the steps after --warmup (the Trainer's per-step records)
  peak GiB      torch.cuda.max_memory_allocated() from before the model is loaded to the end of training
  weights MiB   bytes of the model's parameters and buffers (the kept blocks count their bytes)
  loss          mean token loss over all the demo conversations (answers only), before and after training
  answers       greedy answers (--max-new-tokens, 40) to the demo's questions, before (adapters off) and after

    python bench/smollm2_gpu.py --out $OUT/smollm2_gpu.json [--gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
    python bench/smollm2_gpu.py --device cpu --dtype float32 --steps 2 --warmup 1 --max-new-tokens 2 --out /tmp/s.json
        # a smoke test without a GPU (on CPU every generated token dequantises all the kept blocks again: slow)

Without --gguf the file is found (or fetched once) as the demo and tests do (scripts/fetch_smollm2.py, .cache/).
Runs in well under 3 minutes on one H200 (two 40-step runs of ~256 tokens; most of it is Triton compilation).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def data_loss(model, tok, conversations: list[tuple[str, str]], device: torch.device) -> float:
    """Mean cross-entropy per answer token over every conversation (prompt tokens masked), as in
    tests/test_real_smollm2.py: the chat template renders each, the answer is what follows the generation prompt."""
    total, count = 0.0, 0
    with torch.no_grad():
        for q, a in conversations:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs, tokenize=False)
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]], device=device)
            labels = ids.clone()
            labels[0, :n_prompt] = -100
            n = int((labels[0, 1:] != -100).sum())
            total += model(ids, labels=labels).loss.float().item() * n
            count += n
    return total / count


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run_case(name: str, gguf: Path, keep_quantized: bool, args, demo, workdir: Path) -> dict:
    from fasttune.adapters import disable_adapters
    from fasttune.models.gguf_linear import gguf_linears
    from fasttune.chat import ChatSession
    from fasttune.train.config import TrainConfig
    from fasttune.train.trainer import Trainer

    device = torch.device(args.device)
    data = workdir / "data.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for q, a in demo.TEACH:
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}) + "\n")
    out = workdir / name.replace(" ", "_")
    cfg = TrainConfig.from_dict({  # the demo's settings, on the GPU in bf16
        "model": {"path": str(gguf), "max_seq_length": 256, "device": args.device, "dtype": args.dtype,
                  "keep_quantized": keep_quantized},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(data), "eval_fraction": 0.0, "packing": True},
        "objective": {"type": "sft"},
        "train": {"output_dir": str(out), "batch_size": 1, "grad_accum": 1, "max_steps": args.steps, "lr": 2e-3,
                  "schedule": "cosine", "warmup_steps": 3, "log_every": 1, "memory": "none", "tensorboard": False,
                  "plot": False},
    })
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    model, tok = trainer.model, trainer.tokenizer
    load_s = time.perf_counter() - t0
    kept = gguf_linears(model)
    if keep_quantized and not kept:
        raise RuntimeError("keep_quantized loaded no GGUFLinear layers: the case would measure the dense model")

    def ask(q: str) -> str:
        return ChatSession(model, tok, max_new_tokens=args.max_new_tokens).complete([{"role": "user", "content": q}])

    model.eval()
    with disable_adapters(model):
        before = {q: ask(q) for q in demo.QUESTIONS}
        loss_before = data_loss(model, tok, demo.TEACH, device)
    model.train()
    t1 = time.perf_counter()
    result = trainer.train(overwrite=True)
    train_s = time.perf_counter() - t1
    model.eval()
    loss_after = data_loss(model, tok, demo.TEACH, device)
    after = {q: ask(q) for q in demo.QUESTIONS}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    records = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    steps = [r for r in records if "tokens_per_s" in r][args.warmup:]
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    row = {
        "case": name, "keep_quantized": keep_quantized, "gguf_linears": len(kept),
        "gguf_types": sorted({m.type_name for m in kept.values()}),
        "weights_mib": weight_bytes(model) / 2**20, "peak_gib": peak,
        "tokens_per_s": tokens / seconds if seconds else None, "timed_steps": len(steps), "timed_tokens": tokens,
        "tokens_per_step": tokens / max(1, len(steps)),
        "step_loss_first": result.losses[0], "step_loss_last": result.losses[-1],
        "data_loss_before": loss_before, "data_loss_after": loss_after,
        "answers_before": before, "answers_after": after, "load_s": load_s, "train_s": train_s,
    }
    del trainer, model, result
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct .gguf (default: scripts/fetch_smollm2.py's cache)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per case (the demo's 40)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s (compilation)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="answer length (the demo's 40)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cases", default="dequantised,gguf blocks")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or --device cpu --dtype float32 for a smoke test")

    demo = _script("demo_smollm2")
    if args.gguf:
        gguf = Path(args.gguf)
    else:
        fetch = _script("fetch_smollm2")
        try:
            gguf = fetch.fetch()
        except fetch.FetchError as e:  # e.g. a GPU machine without network: carry the file and pass --gguf
            sys.exit(f"SmolLM2-135M-Instruct GGUF not available ({e}); pass --gguf PATH")
    if not gguf.is_file():
        sys.exit(f"{gguf}: no such file")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [c.strip() for c in args.cases.split(",")]:
            if name not in ("dequantised", "gguf blocks"):
                sys.exit(f"unknown case {name!r}: dequantised, gguf blocks")
            row = run_case(name, gguf, name == "gguf blocks", args, demo, Path(tmp))
            rows.append(row)
            print(f"{name:12s} {row['tokens_per_s'] or 0:10,.0f} tokens/s   peak {row['peak_gib'] or 0:6.2f} GiB   "
                  f"weights {row['weights_mib']:6.1f} MiB   loss {row['data_loss_before']:.3f} -> "
                  f"{row['data_loss_after']:.3f}", flush=True)
            for q in demo.QUESTIONS:
                print(f"   {q}\n      before: {row['answers_before'][q]!r}\n      after:  {row['answers_after'][q]!r}")
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "dtype": args.dtype, "gguf": str(gguf), "steps": args.steps, "warmup": args.warmup,
           "max_new_tokens": args.max_new_tokens,
           "total_s": time.perf_counter() - start}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"env": env, "cases": rows}, indent=1))
    print(f"wrote {args.out} ({env['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
