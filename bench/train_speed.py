#!/usr/bin/env python
"""LoRA / QLoRA training speed and peak memory: fasttune vs transformers+PEFT (+ Liger-Kernel, + bitsandbytes).

Side by side in one process on one GPU, random-initialised Llama shapes (issue 4):
    1b        Llama-3.2-1B shape, seq 2048, batch 4, LoRA r=16 on all seven projections, bf16
    8b        Llama-3.1-8B shape, seq 2048, batch 2, same LoRA
    8b-qlora  Llama-3.1-8B shape, seq 2048, batch 2, NF4 base (bf16 compute)
Tools: fasttune (one run per memory policy in --ft-policies), HF+PEFT (gradient checkpointing, SDPA),
HF+PEFT+Liger-Kernel, and for QLoRA HF+PEFT+bitsandbytes 4-bit. Liger patches transformers' Llama classes
globally, so every Liger run happens after all the others.

tokens/s = batch * seq / median step time over --steps timed steps after --warmup steps (synchronised);
peak = torch.cuda.max_memory_allocated() from just before the first step (weights included).

    python bench/train_speed.py                                  # default cases, JSON + markdown to $OUT
    python bench/train_speed.py --cases 8b-qlora --steps 5
    python bench/train_speed.py --max-context --cases 8b,8b-qlora --max-context-budget-s 240
    python bench/train_speed.py --tiny --device cpu --steps 2 --warmup 1   # smoke test without a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

# Long contexts allocate tensors of many different sizes; expandable segments keep the caching allocator from
# fragmenting (must be set before CUDA initialises). Applies to every tool alike.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (GiB, default_dtype, free_everything, make_optimizer, materialize_random_,  # noqa: E402
                    sync, timed_training, train_step, versions)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
}
CASES = {  # name: (shape, seq, batch, qlora)
    "1b": ("1b", 2048, 4, False),
    "8b": ("8b", 2048, 2, False),
    "8b-qlora": ("8b", 2048, 2, True),
}


def llama_config(shape: str, vocab: int) -> dict:
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
               max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
               attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
               torch_dtype="bfloat16")
    cfg.update(SHAPES[shape])
    return cfg


# ---- model builders -----------------------------------------------------------------------------------------

def build_fasttune(cfg: dict, device, dtype, qlora: bool, policy: str, seq: int, batch: int):
    from fasttune.adapters import LoraConfig
    from fasttune.build import prepare_for_training
    from fasttune.models import ArchSpec, CausalLM
    from fasttune.models.nf4_linear import quantize_linear

    spec = ArchSpec.from_hf_config(cfg)
    with torch.device("meta"):
        model = CausalLM(spec)
    def quantize(mod_name: str, module: nn.Module) -> None:  # as fasttune.load(load_in_4bit=True) does
        if qlora and isinstance(module, nn.Linear) and mod_name.startswith("model.layers."):
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(module))

    materialize_random_(model, device, dtype, after_module=quantize)
    model.tie_weights()
    model = prepare_for_training(model, LoraConfig(r=16, alpha=16, target_modules=TARGETS), policy, seq_len=seq,
                                 batch_rows=batch)
    return model, model.memory_plan.summary()


def build_hf(cfg: dict, device, dtype, qlora: bool, liger: bool):
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # patches transformers' Llama module globally (hence Liger runs go last)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    hf_cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")}
    config = LlamaConfig(**hf_cfg)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    with default_dtype(dtype), torch.device(device):
        model = modeling_llama.LlamaForCausalLM(config)
    model.config.use_cache = False
    if qlora:
        replace_with_bnb_4bit(model, device, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    model.train()
    return model, "gradient checkpointing"


def replace_with_bnb_4bit(model: nn.Module, device, dtype) -> None:
    """What transformers' load_in_4bit does (bnb_4bit_quant_type nf4, double quant, bf16 compute), in memory:
    each decoder nn.Linear becomes bnb.nn.Linear4bit holding its weight quantised by bitsandbytes."""
    import bitsandbytes as bnb

    for name in [n for n, _ in model.named_modules()]:  # names, not modules: a replaced Linear must be freed
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) and ".layers." in name:
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(module.weight.data.to("cpu"), requires_grad=False,
                                           compress_statistics=True, quant_type="nf4").to(device)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.data, requires_grad=False)
            new.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            del module
    model.is_loaded_in_4bit = True  # PEFT then wraps the layers with its bitsandbytes LoRA class
    gc.collect()
    torch.cuda.empty_cache()


# ---- one measurement ------------------------------------------------------------------------------------------

def build(tool, cfg, device, dtype, qlora, policy, seq, batch):
    if tool == "fasttune":
        return build_fasttune(cfg, device, dtype, qlora, policy, seq, batch)
    return build_hf(cfg, device, dtype, qlora, liger=(tool == "hf+peft+liger"))


def measure(tool, cfg, device, dtype, qlora, policy, seq, batch, warmup, steps, vocab) -> dict:
    free_everything(device)
    t_build = time.perf_counter()
    model, setup = build(tool, cfg, device, dtype, qlora, policy, seq, batch)
    opt = make_optimizer(model, tool)
    build_s = time.perf_counter() - t_build
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    try:
        run = timed_training(lambda: train_step(model, tool, ids, opt), device, warmup, steps)
        return dict(tool=tool, setup=setup, tokens_per_s=batch * seq / run["step_s"], **run, build_s=build_s)
    finally:
        model = opt = None  # noqa: F841 - drop the references before freeing the memory
        free_everything(device)


def try_length(tool, model, opt, device, vocab, seq) -> bool:
    """One training step at batch 1 x seq; False on out-of-memory."""
    ids = torch.randint(0, vocab, (1, seq), device=device)
    try:
        if tool == "fasttune":
            from fasttune.train.memory import apply_memory_policy

            apply_memory_policy(model, "auto", seq_len=seq, batch_size=1)
        loss = train_step(model, tool, ids, opt)
        sync(device)
        return math.isfinite(float(loss))
    except torch.OutOfMemoryError:
        return False
    finally:
        del ids
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = None
        free_everything(device)


def max_context(tool, cfg, device, dtype, qlora, vocab, budget_s, start=8192, resolution=4096,
                lengths: list[int] | None = None) -> dict:
    """Longest batch-1 sequence that trains: doubling from `start`, then bisection to `resolution`; or, with
    `lengths`, exactly those lengths in order, stopping at the first that does not train."""
    free_everything(device)
    model, setup = build(tool, cfg, device, dtype, qlora, "auto", lengths[0] if lengths else start, 1)
    opt = make_optimizer(model, tool)
    t_end = time.perf_counter() + budget_s
    lo, hi, trials = 0, None, []
    try:
        if lengths:
            for seq in lengths:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                ok = try_length(tool, model, opt, device, vocab, seq)
                peak = torch.cuda.max_memory_allocated(device) / GiB if torch.cuda.is_available() else 0.0
                trials.append((seq, ok, round(time.perf_counter() - t0, 1), round(peak, 1)))
                print(f"  {tool} seq {seq}: {'ok' if ok else 'OOM'} ({trials[-1][2]} s, peak {peak:.1f} GiB)",
                      flush=True)
                if not ok:
                    hi = seq
                    break
                lo = seq
            return dict(tool=tool, setup=setup, max_seq=lo, complete=False, trials=trials)
        seq = start
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            ok = try_length(tool, model, opt, device, vocab, seq)
            trials.append((seq, ok, round(time.perf_counter() - t0, 1)))
            print(f"  {tool} seq {seq}: {'ok' if ok else 'OOM'} ({trials[-1][2]} s)", flush=True)
            if ok:
                lo = seq
            else:
                hi = seq
            if hi is None:
                seq *= 2
            elif hi - lo <= resolution:
                break
            else:
                seq = (lo + hi) // 2 // 1024 * 1024
        done = hi is not None and hi - lo <= resolution
        return dict(tool=tool, setup=setup, max_seq=lo, complete=done, trials=trials)
    finally:
        del model, opt
        free_everything(device)


# ---- main -----------------------------------------------------------------------------------------------------

def available(tool: str) -> str | None:
    """Why a tool cannot run here (None when it can)."""
    needs = (["liger_kernel"] if "liger" in tool else []) + (["bitsandbytes"] if "bnb" in tool else [])
    for name in needs:
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001
            return f"{name} not importable: {e}"
    return None


def markdown(rows: list[dict]) -> str:
    lines = ["| case | tool | setup | tokens/s | peak GiB | step s | loss first→last | speed vs HF+PEFT "
             "| memory vs HF+PEFT |", "|---|---|---|---:|---:|---:|---|---:|---:|"]
    base = {r["case"]: r for r in rows if r.get("tool") in ("hf+peft", "hf+peft+bnb") and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['case']} | {r['tool']} | {r.get('setup', '')} | failed: {r.get('error', '')[:80]} |"
                         " | | | | |")
            continue
        b = base.get(r["case"])
        sp = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else ""
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b and b["peak_gib"] else ""
        lines.append(f"| {r['case']} | {r['tool']} | {r['setup']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
                     f"{r['step_s']:.3f} | {r['first_loss']:.3f}→{r['last_loss']:.3f} | {sp} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="1b,8b,8b-qlora", help="comma list of " + ", ".join(CASES))
    ap.add_argument("--tools", default="fasttune,hf+peft,hf+peft+liger",
                    help="comma list of fasttune, hf+peft, hf+peft+liger (QLoRA cases use hf+peft+bnb for hf+peft)")
    ap.add_argument("--ft-policies", default="auto,checkpoint", help="fasttune memory policies to measure")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=None, help="override the case's sequence length")
    ap.add_argument("--batch", type=int, default=None, help="override the case's batch size")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test; CPU works)")
    ap.add_argument("--max-context", action="store_true", help="search the longest batch-1 context instead")
    ap.add_argument("--max-context-budget-s", type=float, default=240.0, help="time budget per tool")
    ap.add_argument("--max-context-start", type=int, default=16384)
    ap.add_argument("--max-context-lengths", default=None,
                    help="comma list of batch-1 lengths to try in order instead of searching (e.g. 65536,131072)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/train_speed.json when $OUT is set)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = 512 if args.tiny else args.vocab
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    info = versions()
    print(json.dumps(info), flush=True)

    # every (case, tool, policy) job; Liger patches transformers globally, so its jobs go last
    jobs = []
    for case in cases:
        shape, seq, batch, qlora = CASES[case]
        for tool in tools:
            name = tool
            if qlora and tool == "hf+peft+liger":
                continue  # the QLoRA comparison is against HF+PEFT+bitsandbytes
            if qlora and tool == "hf+peft":
                name = "hf+peft+bnb"
            policies = [None]
            if tool == "fasttune":  # max-context always uses the auto policy (it adapts to each length)
                policies = ["auto"] if args.max_context else [p.strip() for p in args.ft_policies.split(",")]
            for policy in policies:
                jobs.append((case, name, policy))
    jobs.sort(key=lambda j: "liger" in j[1])

    rows = []
    t_start = time.perf_counter()
    for case, tool, policy in jobs:
        shape, seq, batch, qlora = CASES[case]
        shape = "tiny" if args.tiny else shape
        seq, batch = args.seq or (64 if args.tiny else seq), args.batch or batch
        cfg = llama_config(shape, vocab)
        base_tool = "fasttune" if tool == "fasttune" else ("hf+peft+liger" if "liger" in tool else "hf+peft")
        row = dict(case=case, tool=tool + (f" ({policy})" if policy else ""), seq=seq, batch=batch)
        why = available(tool)
        if why:
            row["error"] = why
            print(f"[skip] {case} {tool}: {why}", flush=True)
            rows.append(row)
            continue
        print(f"[run] {case} {row['tool']} seq {seq} x batch {batch}", flush=True)
        try:
            if args.max_context:
                lengths = ([int(x) for x in args.max_context_lengths.split(",")]
                           if args.max_context_lengths and tool == "fasttune" else None)
                res = max_context(base_tool, cfg, device, dtype, qlora, vocab, args.max_context_budget_s,
                                  start=args.max_context_start if not args.tiny else 64, resolution=4096 if not
                                  args.tiny else 64, lengths=lengths)
            else:
                res = measure(base_tool, cfg, device, dtype, qlora, policy or "auto", seq, batch, args.warmup,
                              args.steps, vocab)
            res.pop("tool", None)
            row.update(res)
            print("   ", json.dumps(row), flush=True)
        except Exception as e:  # noqa: BLE001 - one failure must not stop the other measurements
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
            print(row["traceback"], flush=True)
            free_everything(device)
        rows.append(row)
    elapsed = time.perf_counter() - t_start

    result = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), versions=info,
                  command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  elapsed_s=elapsed, rows=rows)
    if args.max_context:
        table = "\n".join(["| case | tool | longest batch-1 context | search complete |", "|---|---|---:|---|"] +
                          [f"| {r['case']} | {r['tool']} | {r.get('max_seq', 'failed: ' + r.get('error', '')[:60])} | "
                           f"{r.get('complete', '')} |" for r in rows])
    else:
        table = markdown(rows)
    print("\n" + table + f"\n\n(total {elapsed:.0f} s)", flush=True)
    out = args.out or (os.path.join(os.environ["OUT"], "train_speed.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        Path(out).with_suffix(".md").write_text(table + "\n")
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
