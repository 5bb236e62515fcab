#!/usr/bin/env python
"""One GRPO optimizer step on the 8B shape (issue 18): time split into generation and training, peak memory.

Random-initialised Llama-3.1-8B shape (bf16), LoRA r=16 on the seven projections, built in memory as
bench/train_speed.py does (QLoRA: each decoder linear quantised to NF4 as it is materialised). The step is the
Trainer's own (`objective.type: grpo`, fasttune.train.grpo): one prompt of 512 random tokens per step, G=8
completions of exactly 1024 tokens (stop ids are cleared so every completion runs the full length: the worst case,
the same work every step), a pseudo-random reward (a hash of the completion text: the bench times the machinery,
not learning), beta 0.04 (the reference pass runs). The timed phases of each step:
    generate_s   fasttune.generation's Generator on the training model (KV cache allocated, prefill, decode steps,
                 LoRA merged on the bf16 base / unmerged over NF4), until the token lists are on the host
    rollout_s    generation + scoring + the no-grad reference pass over the 8 x 1536 rows
    train_s      the rest of the optimizer step: forward + backward through the fused per-token log-prob head,
                 clipping, AdamW update (synchronised)
Peaks: torch.cuda.max_memory_allocated() reset before each phase of the last timed step, weights included:
peak_rollout_gib (generation with its KV cache, scoring, the reference pass), peak_training_gib (the rest). `--budget-gib B` caps this process at B GiB (torch.cuda.set_per_process_memory_fraction) and
plans the memory policy for that budget: the 24 GB target for 8B QLoRA is checked by running under --budget-gib 24.

    python bench/grpo_step.py --out $OUT/grpo_step.json                     # 8b-qlora (budget 24) and 8b-lora
    python bench/grpo_step.py --cases 8b-qlora --budget-gib 24 --steps 2
    python bench/grpo_step.py --cases 8b-qlora --new-tokens 4096 --budget-gib 0     # long completions, no cap
    python bench/grpo_step.py --quick --out $OUT/grpo_quick.json            # 1B shape, 256 new tokens, 1 step
    python bench/grpo_step.py --tiny --device cpu --steps 1 --warmup 0      # smoke test without a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GiB, cuda_index, free_everything, sync  # noqa: E402
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, vocab_size=4096),
}
CASES = {"8b-qlora": ("8b", True), "8b-lora": ("8b", False), "1b-lora": ("1b", False), "tiny": ("tiny", False)}


def hashed_reward(prompt: str, completion: str, row: dict) -> float:
    """A pseudo-random reward in [0, 1) from the completion's text: non-zero advantages, so the update is real."""
    import zlib

    return (zlib.crc32(completion.encode()) % 1000) / 1000


def build_model(shape: str, qlora: bool, device, dtype):
    from train_speed import build_fasttune

    cfg = {"model_type": "llama", **SHAPES[shape], "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "bos_token_id": 1, "eos_token_id": 2}
    # the memory policy is planned again by the Trainer for the GRPO batch; "none" here only builds the model
    model, _ = build_fasttune(cfg, device, dtype, qlora, "none", 16, 1)
    return model


def run_case(name: str, args, device) -> dict:
    from fasttune.models import load_tokenizer
    from fasttune.train import Trainer
    from fasttune.train.config import TrainConfig
    from fasttune.train.data import PreparedData
    from fasttune.build import tiny_model_path

    shape, qlora = CASES[name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        if args.budget_gib:
            total = torch.cuda.get_device_properties(cuda_index(device)).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * GiB / total), cuda_index(device))
    model = build_model(shape, qlora, device, dtype)
    weights_gib = torch.cuda.memory_allocated() / GiB if device.type == "cuda" else None
    tok = load_tokenizer(tiny_model_path())
    vocab = model.spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    n_prompts = args.steps + args.warmup
    examples = [{"prompt_ids": torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist(),
                 "prompt": "", "row": {}} for _ in range(n_prompts)]
    out_dir = Path(args.work) / name
    cfg = TrainConfig.from_dict({
        "model": {"path": "tiny", "device": device.type, "max_seq_length": args.prompt_tokens + args.new_tokens},
        "lora": {"r": 16, "alpha": 16},
        "objective": {"type": "grpo", "grpo": {
            "rewards": [f"{Path(__file__).resolve()}:hashed_reward"], "num_generations": args.G,
            "max_prompt_length": args.prompt_tokens, "max_new_tokens": args.new_tokens, "beta": args.beta,
            "samples_every": 0, "loss": "grpo"}},
        "train": {"output_dir": str(out_dir), "max_steps": n_prompts, "batch_size": 1, "grad_accum": 1,
                  "lr": 1e-5, "progress": False, "tensorboard": False, "plot": False, "memory": args.memory,
                  "optimizer": "adamw", "seed": 0}})
    data = PreparedData("prompts", examples, [], summary=f"{n_prompts} random prompts")
    trainer = Trainer(cfg, model=model, tokenizer=tok, data=data)
    if device.type == "cuda" and args.budget_gib and args.memory == "auto":
        # plan for the budget, not for the H200's free memory: what a GPU of budget_gib has left after the weights
        from fasttune.train.grpo import memory_plan_inputs
        from fasttune.train.memory import apply_memory_policy

        rows, seq_len, extra = memory_plan_inputs(cfg, model)
        apply_memory_policy(model, "auto", seq_len=seq_len, batch_size=rows,
                            free_bytes=int(args.budget_gib * GiB - torch.cuda.memory_allocated()), **extra)
    rl = trainer.rl
    rl.stop_ids = []  # every completion runs max_new_tokens: the worst case, and the same work every step
    plan = model.memory_plan  # what apply_memory_policy installed last
    steps = []
    for i in range(n_prompts):
        group = trainer._next_group()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rl.prepare(group)
        sync(device)
        t1 = time.perf_counter()
        rollout_peak = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        record = trainer.train_step(group)
        sync(device)
        t2 = time.perf_counter()
        train_peak = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else None
        trainer.step += 1
        steps.append({"generate_s": rl.generate_seconds, "rollout_s": t1 - t0, "train_s": t2 - t1,
                      "step_s": t2 - t0, "peak_rollout_gib": rollout_peak, "peak_training_gib": train_peak,
                      "completion_tokens": record["target_tokens"], "loss": record["loss"], "kl": record["kl"],
                      "warmup": i < args.warmup})
        print(f"  {name} step {i}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in steps[-1].items()), flush=True)
    timed = [s for s in steps if not s["warmup"]] or steps
    mean = {k: sum(s[k] for s in timed) / len(timed) for k in ("generate_s", "rollout_s", "train_s", "step_s")}
    completion_tokens = timed[-1]["completion_tokens"]
    result = {"case": name, "shape": shape, "qlora": qlora, "G": args.G, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "beta": args.beta, "memory_policy": args.memory,
              "memory_plan": plan.summary() if plan is not None else None, "budget_gib": args.budget_gib,
              "weights_gib": weights_gib, **mean,
              "generated_tokens_per_s": completion_tokens / mean["generate_s"] if mean["generate_s"] else None,
              "peak_rollout_gib": timed[-1]["peak_rollout_gib"],
              "peak_training_gib": timed[-1]["peak_training_gib"], "steps": steps,
              "generator_cuda_graphs": getattr(rl.generator, "cuda_graphs", None), "merge_lora": rl.merge_lora}
    if device.type == "cuda" and args.budget_gib:
        peak = max(result["peak_rollout_gib"], result["peak_training_gib"])
        result["fits_budget"] = peak <= args.budget_gib
    del trainer, rl, model
    free(device)
    return result


def free(device):
    """Free the GPU and lift the --budget-gib cap for the next case."""
    free_everything(device)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, cuda_index(device))


def write(out: str | None, device, results: list) -> None:
    if not out:
        return
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="8b-qlora,8b-lora", help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=1, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (KV cache, CUDA graphs, autotune)")
    p.add_argument("--memory", default="auto", help="train.memory policy")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="cap GPU memory at this many GiB and plan for it (default: 24 for *-qlora cases, none else; "
                        "0: no cap)")
    p.add_argument("--quick", action="store_true", help="1b-lora, 256 new tokens, one timed step")
    p.add_argument("--tiny", action="store_true", help="the tiny shape (smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", default="/tmp/fasttune_grpo_bench")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.new_tokens, args.steps, args.warmup = "1b-lora", 256, 1, 1
    if args.tiny:
        args.cases, args.prompt_tokens, args.new_tokens = "tiny", 16, 8
    device = torch.device(args.device)
    results = []
    for name in args.cases.split(","):
        name = name.strip()
        if name not in CASES:
            p.error(f"unknown case {name!r}; choose from {', '.join(CASES)}")
        case_args = argparse.Namespace(**vars(args))
        if case_args.budget_gib is None and name.endswith("qlora") and device.type == "cuda":
            case_args.budget_gib = 24.0
        case_args.budget_gib = case_args.budget_gib or None  # 0: no cap
        print(f"{name}: G={args.G}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens", flush=True)
        try:
            results.append(run_case(name, case_args, device))
        except Exception as e:  # one case failing (e.g. out of memory under the budget) is a result too
            traceback.print_exc()
            results.append({"case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                            "budget_gib": case_args.budget_gib})
            free(device)
        write(args.out, device, results)  # after every case: a run cut short still leaves what it measured
    for r in results:
        if "error" in r:
            print(f"{r['case']}: FAILED {r['error']}")
        else:
            print(f"{r['case']}: step {r['step_s']:.2f} s = generation {r['generate_s']:.2f} s "
                  f"(+ scoring/reference {r['rollout_s'] - r['generate_s']:.2f} s) + training {r['train_s']:.2f} s; "
                  f"peak rollout {r['peak_rollout_gib']} GiB, training {r['peak_training_gib']} GiB"
                  + (f"; fits {r['budget_gib']} GiB: {r['fits_budget']}" if "fits_budget" in r else ""))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
