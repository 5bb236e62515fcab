#!/usr/bin/env python
"""End to end: `fasttune train` on ragged instruction data, the path users take, against transformers + PEFT.

For each case it writes a random-initialised Llama checkpoint (1B or 8B shape, bf16, transformers'
`save_pretrained`) and the bundled tiny tokenizer to disk, and a synthetic instruction set of its own (lengths
log-normal, median ~260 tokens, ~1% over 2048). Then, side by side in this process on this GPU:
  fasttune packed     `fasttune train`'s config path (TrainConfig from YAML -> train()), packing, seq 2048
  fasttune unpacked   the same, packing off, batch 8 (length-grouped, padded to a length bucket)
  fasttune fixed      the same Trainer stepping one fixed batch of single full-length documents (the model step
                      bench/train_speed.py times: no data, no documents)
  hf+peft [gc]        transformers + PEFT (SDPA, LoRA r=16 on all linear layers) on the same tokenised rows,
                      batched as TRL's SFTTrainer does by default (shuffled, batch 8, padded to the longest in
                      the batch), with and without gradient checkpointing
MoE cases (issue 17): `qwen3-30b-a3b` and `gpt-oss-20b` shapes (bench/moe_train.py's configs) with --moe-layers
layers (default 12 and 8: the checkpoint is written to disk; say so when quoting), LoRA on the attention
projections and the experts ("all-linear" in fasttune's config; PEFT: attention target_modules plus
target_parameters on the expert stacks), transformers' default experts implementation (gpt-oss: eager attention).
TRL's SFTTrainer itself is not run: its wheels are not on the GPU machine.
Optimisation is the same on both sides so that the loss columns compare: AdamW (torch defaults but lr 2e-4),
constant learning rate, no warm-up, no gradient clipping (fasttune's defaults, cosine decay and clipping at 1.0,
are switched off in the generated config; until 2026-12-03 night they were on, which is why earlier tables show
fasttune's last loss above HF's).
tokens/s = real tokens (padding excluded) / wall-clock seconds of the timed steps (data included; the first
--warmup steps excluded); peak = torch.cuda.max_memory_allocated() during the run; first/last loss of the run.

    python bench/train_e2e.py --out $OUT --cases 1b,8b
    python bench/train_e2e.py --out $OUT --cases qwen3-30b-a3b,gpt-oss-20b --tools packed,hf-gc
    python bench/train_e2e.py --tiny --device cpu --steps 3 --warmup 1     # smoke test without a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, vocab_size=128256),
    "phi3": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, tie_word_embeddings=False, vocab_size=32064, sliding_window=2047),
    # Gemma-3-12B's text tower: 5 sliding (1024) : 1 global layers, local RoPE base 10k, global 1M with linear x8
    "gemma3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, vocab_size=262208, sliding_window=1024,
                       query_pre_attn_scalar=256, tie_word_embeddings=True),
    # Phi-4 (14B): the phi3 architecture, fused qkv / gate_up, no sliding window
    "phi4": dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=10, tie_word_embeddings=False, vocab_size=100352, sliding_window=None),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, vocab_size=4096),
}
PACKED_ROWS = {"1b": 4, "8b": 2, "phi3": 2, "gemma3-12b": 2, "phi4": 2, "tiny": 2}  # bench/train_speed.py's batch at seq 2048


MOE_CASES = {"qwen3-30b-a3b": 12, "gpt-oss-20b": 8}  # case -> default number of layers written
MOE_ROWS = 2


def moe_config(shape: str, layers: int | None):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moe_train import hf_config

    return hf_config(shape, layers or MOE_CASES[shape], tiny=False)


def write_checkpoint(shape: str, folder: Path, device: str, moe_layers: int | None = None) -> None:
    from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                              Phi3Config, Phi3ForCausalLM)

    from fasttune.build import tiny_model_path

    if shape in MOE_CASES:
        cfg = moe_config(shape, moe_layers)

        def cls(config):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    elif shape == "phi3":  # Phi-3-mini-4k's shape: fused qkv / gate_up, sliding window 2047
        cfg = Phi3Config(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, torch_dtype="bfloat16")
        cls = Phi3ForCausalLM
    elif shape == "phi4":
        cfg = Phi3Config(**SHAPES[shape], max_position_embeddings=16384, rope_theta=250000.0, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, torch_dtype="bfloat16")
        cls = Phi3ForCausalLM
    elif shape == "gemma3-12b":
        # pad_token_id = the bundled tokenizer's <|pad|> (2). transformers' init zeroes the pad row; with 0 there
        # it zeroed <|begin_of_text|>, which starts every document here: such a document's hidden state stays
        # exactly zero through all layers, and RMSNorm's backward multiplies its gradient by 1/sqrt(eps) per norm,
        # so 48 layers overflowed to a NaN gradient norm at step 1 (in transformers too: bench/RESULTS.md)
        cfg = Gemma3TextConfig(**SHAPES[shape], max_position_embeddings=131072, bos_token_id=1, eos_token_id=2,
                               pad_token_id=2, torch_dtype="bfloat16",
                               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                   "rope_theta": 1000000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
        cls = Gemma3ForCausalLM
    else:
        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                          bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
        cls = LlamaForCausalLM
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    for f in Path(tiny_model_path()).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)


def write_data(path: Path, rows: int, seed: int = 0) -> dict:
    """Instruction rows whose tokenised length is log-normal: median ~260 tokens, ~1% over 2048."""
    from fasttune.models import load_tokenizer
    from fasttune.build import tiny_model_path

    tok = load_tokenizer(tiny_model_path())
    words = [w for w in (Path(tiny_model_path()).parent / "data" / "corpus.txt").read_text().split() if w.isalpha()]
    rng = random.Random(seed)
    sigma = math.log(2048 / 260) / 2.326  # P(length > 2048) = 1%
    lengths = []
    with path.open("w") as f:
        for _ in range(rows):
            target = max(16, int(math.exp(rng.gauss(math.log(260), sigma))))
            prompt_n = max(4, target // 5)
            prompt = " ".join(rng.choice(words) for _ in range(int(prompt_n / 1.3)))
            answer = " ".join(rng.choice(words) for _ in range(int((target - prompt_n) / 1.3)))
            lengths.append(len(tok.encode(prompt + " " + answer)))
            f.write(json.dumps({"instruction": prompt, "output": answer}) + "\n")
    lengths.sort()
    return {"rows": rows, "median_tokens": lengths[len(lengths) // 2],
            "over_2048": sum(n > 2048 for n in lengths) / rows}


def fasttune_config(model_dir: Path, data: Path, out: Path, packing: bool, batch: int, steps: int, device: str,
                    memory: str = "auto", qlora: bool = False):
    from fasttune.train import TrainConfig

    yaml = f"""
model: {{path: {model_dir}, max_seq_length: 2048, device: {device}, dtype: {'bfloat16' if device == 'cuda' else 'float32'},
        load_in_4bit: {str(qlora).lower()}}}
lora: {{r: 16, alpha: 16, dropout: 0.0, target_modules: all-linear}}
data: {{path: {data}, packing: {str(packing).lower()}, eval_fraction: 0.0, train_on: responses}}
objective: {{type: sft}}
train: {{output_dir: {out}, batch_size: {batch}, grad_accum: 1, max_steps: {steps}, lr: 2.0e-4,
        warmup_steps: 0, schedule: constant, max_grad_norm: null, save_every: null, plot: false, progress: false,
        log_every: 1, memory: {memory}}}
"""
    p = out.parent / f"{out.name}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml)
    return TrainConfig.from_yaml(p)


def summarise(name: str, losses, tokens, seconds, warmup, peak) -> dict:
    t, s = sum(tokens[warmup:]), sum(seconds[warmup:])
    return {"tool": name, "steps_timed": len(tokens) - warmup, "tokens_per_s": t / s if s else float("nan"),
            "peak_gib": peak, "first_loss": losses[0], "last_loss": losses[-1]}


def run_fasttune(name, cfg, warmup, fixed_steps=0) -> list[dict]:
    from fasttune.train.trainer import Trainer

    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    trainer = Trainer(cfg)
    trainer.train(overwrite=True)  # a re-run of the benchmark replaces its earlier run folder
    rows = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    out = [summarise(name, [r["loss"] for r in rows], [r["tokens"] for r in rows],
                     [r["tokens"] / r["tokens_per_s"] for r in rows], warmup, peak)]
    out[0]["shapes"] = sorted(trainer._shapes)
    if fixed_steps:  # the same model and optimizer on one fixed batch of full-length single documents
        rows_n, T = next(iter(trainer._shapes))
        ids = torch.randint(5, 4000, (rows_n, T))
        batch = {"input_ids": ids, "labels": ids.clone(), "real_tokens": ids.numel()}
        times, losses = [], []
        for _ in range(fixed_steps):
            t0 = time.perf_counter()
            rec = trainer.train_step([batch])
            times.append(time.perf_counter() - t0)
            losses.append(rec["loss"])
        out.append(summarise(name.replace("packed", "fixed batch"), losses, [ids.numel()] * fixed_steps, times,
                             warmup, torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None))
    del trainer
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def run_hf(name, model_dir, examples, batch, steps, warmup, gc_on, device, pad_id, moe: bool = False) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gpt_oss = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == "gpt_oss"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation="eager" if gpt_oss else "sdpa").to(device)
    model.config.use_cache = False
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if moe:  # attention projections as modules, the expert stacks as parameters (PEFT's MoE path)
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS[:4], task_type="CAUSAL_LM",
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        name += f" (experts {getattr(model.config, '_experts_implementation', None)})"
    else:
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=device == "cuda")
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)  # TRL default: shuffled, no length grouping, pad to the longest
    losses, tokens, seconds = [], [], []
    t_prev = time.perf_counter()
    try:
        for step in range(steps):
            rows = [examples[i] for i in order[step * batch:(step + 1) * batch]]
            T = max(len(r["input_ids"]) for r in rows)
            ids = torch.full((len(rows), T), pad_id)
            labels = torch.full((len(rows), T), -100)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for b, r in enumerate(rows):
                n = len(r["input_ids"])
                ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            now = time.perf_counter()
            tokens.append(int(mask.sum()))
            seconds.append(now - t_prev)
            t_prev = now
        result = summarise(name, losses, tokens, seconds, warmup,
                           torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
    except torch.OutOfMemoryError as e:
        result = {"tool": name, "error": "out of memory: " + str(e).splitlines()[0][:120]}
    del model, opt
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1b,8b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tools", default="packed,unpacked,fixed,hf,hf-gc")
    ap.add_argument("--work", default="/tmp/fasttune_e2e")
    ap.add_argument("--out", default=None)
    ap.add_argument("--moe-layers", type=int, default=None,
                    help="layers of the MoE cases' checkpoints (default: " +
                         ", ".join(f"{k} {v}" for k, v in MOE_CASES.items()) + ")")
    args = ap.parse_args()
    cases = ["tiny"] if args.tiny else args.cases.split(",")
    tools = args.tools.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "ragged.jsonl"
    info = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d"), "data": write_data(data, args.rows)}
    print(json.dumps(info), flush=True)
    results = []

    def record(r, case):
        r["case"] = case
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "train_e2e.json").write_text(json.dumps({"info": info, "results": results}, indent=1))

    for case in cases:
        moe = case in MOE_CASES
        model_dir = work / (case if moe else f"llama-{case}")
        t0 = time.perf_counter()
        write_checkpoint(case, model_dir, args.device, args.moe_layers)
        print(f"{case}: checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = MOE_ROWS if moe else PACKED_ROWS[case]
        try:
            if "packed" in tools:
                cfg = fasttune_config(model_dir, data, work / f"run-{case}-packed", True, rows, args.steps, args.device)
                for r in run_fasttune(f"fasttune packed {rows}x2048", cfg, args.warmup,
                                      fixed_steps=args.steps // 2 if "fixed" in tools else 0):
                    record(r, case)
            if "checkpoint" in tools:
                cfg = fasttune_config(model_dir, data, work / f"run-{case}-ckpt", True, rows, args.steps, args.device,
                                      memory="checkpoint")
                for r in run_fasttune(f"fasttune packed {rows}x2048 memory: checkpoint", cfg, args.warmup):
                    record(r, case)
            if "qlora" in tools:
                cfg = fasttune_config(model_dir, data, work / f"run-{case}-qlora", True, rows, args.steps,
                                      args.device, qlora=True)
                for r in run_fasttune(f"fasttune QLoRA packed {rows}x2048", cfg, args.warmup):
                    record(r, case)
            if "unpacked" in tools:
                cfg = fasttune_config(model_dir, data, work / f"run-{case}-unpacked", False, 8, args.steps,
                                      args.device)
                for r in run_fasttune("fasttune unpacked batch 8", cfg, args.warmup):
                    record(r, case)
        except Exception:
            traceback.print_exc()
            record({"tool": "fasttune", "error": traceback.format_exc()[-400:]}, case)
        if any(t.startswith("hf") for t in tools):
            from fasttune.models import load_tokenizer
            from fasttune.train.data import prepare_data

            cfg = fasttune_config(model_dir, data, work / f"run-{case}-hf", False, 8, args.steps, args.device)
            tok = load_tokenizer(str(model_dir))
            examples = prepare_data(cfg.data, tok, 2048, 0, "sft").train
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            for gc_on in (False, True):
                if ("hf-gc" if gc_on else "hf") in tools:
                    record(run_hf("hf+peft batch 8" + (" +gc" if gc_on else ""), str(model_dir), examples, 8,
                                  args.steps, args.warmup, gc_on, args.device, pad, moe=moe), case)
        shutil.rmtree(model_dir, ignore_errors=True)
    print("\n| case | tool | tokens/s | peak GiB | first loss | last loss |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['case']} | {r['tool']} | error: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['case']} | {r['tool']} | {r['tokens_per_s']:,.0f} | "
                  f"{(r['peak_gib'] or 0):.1f} | {r['first_loss']:.3f} | {r['last_loss']:.3f} |")


if __name__ == "__main__":
    main()
