#!/usr/bin/env python
"""MoE LoRA training speed and peak memory: fasttune vs transformers + PEFT, side by side in one process (issue 17).

Random-initialised (bf16) shapes:
    qwen3-30b-a3b   Qwen3-30B-A3B: 48 layers, hidden 2048, 128 experts, top-8, expert width 768, vocab 151936
    gpt-oss-20b     gpt-oss-20b: 24 layers, hidden 2880, 32 experts, top-4, expert width 2880, sliding 128 / full
                    alternating, attention sinks, vocab 201088 (16-bit experts: the MXFP4 checkpoint dequantised)
LoRA r=16, alpha 16 on q/k/v/o and on the experts (gate_up_proj, down_proj: per-expert adapters), seq 2048.
    fasttune        CausalLM + add_lora (experts as grouped GEMMs with the LoRA fused in), memory policy --ft-policies
    hf+peft         transformers' model with its default (fastest available) experts implementation, recorded in
                    the row (`grouped_mm` on torch >= 2.9 with a Hopper GPU, else `eager`), SDPA attention (gpt-oss:
                    eager, transformers' only local path with sinks), PEFT LoRA on the attention projections and
                    `target_parameters` on the expert stacks, gradient checkpointing on (--hf-gc on,off for both)
tokens/s = batch * seq / median step time over --steps timed steps after --warmup (forward, backward, AdamW step);
peak = torch.cuda.max_memory_allocated() from just before the first step (weights included). Routers initialised
N(0, 0.02) route near-uniformly (balanced expert loads, the favourable case for every tool alike).
`--qlora` adds fasttune QLoRA rows: the expert stacks and decoder linears in NF4 as load_in_4bit stores them (router
16-bit); transformers + bitsandbytes cannot quantise the 3-D expert stacks, so these rows have no HF baseline.
`--optimizer adamw,adamw8bit` gives each fasttune row once per optimizer, made as the trainer makes train.optimizer
(torch's AdamW fused on CUDA; fasttune's 8-bit AdamW); HF+PEFT rows keep torch's AdamW with its defaults.
`--plan-only` builds nothing on a device: the model is built on the meta device exactly as the rows build it, and
the memory of a training step is printed component by component (exact weights, adapters, gradients, optimizer
moments; the memory planner's activation estimate for --budget-gib; the sizes of the largest transients). Budget
rows record that prediction (planned_*_gib) beside the measured peak.
`--layers N` builds N layers instead of the full depth (for a smaller GPU or a quick run); the row says so, and
tokens/s of a full model is then about tokens/s x N / full layers (the per-layer cost dominates; the LM head's does
not scale): say which when quoting.

    python bench/moe_train.py --out $OUT/moe_train.json                       # both shapes, full depth
    python bench/moe_train.py --cases gpt-oss-20b --layers 8 --steps 5
    python bench/moe_train.py --layers 8 --grouped-mm auto,triton,torch --profile   # experts' base GEMM kernels
    python bench/moe_train.py --cases gpt-oss-20b --tools "" --qlora --budget-gib 16 --optimizer adamw,adamw8bit
                                                                               # the 16 GB QLoRA target
    python bench/moe_train.py --cases gpt-oss-20b --tools "" --qlora --budget-gib 16 --optimizer adamw8bit --plan-only
    python bench/moe_train.py --cases qwen3-30b-a3b --budget-gib hf --grouped-mm auto   # fasttune capped at HF+PEFT's peak
    python bench/moe_train.py --tiny --device cpu --steps 2 --warmup 1        # smoke test without a GPU
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
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (GiB, cuda_index, default_dtype, free_everything, make_optimizer, materialize_random_,  # noqa: E402
                    profile_step, timed_training, train_step, versions)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 16
CASES = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6,
                          rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "gpt-oss-20b": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=True,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_local_experts=8,
            num_experts_per_tok=2, sliding_window=16)


def hf_config(case: str, layers: int | None, tiny: bool):
    import transformers

    cfg = dict(CASES[case])
    model_type = cfg.pop("model_type")
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg})
        if model_type == "gpt_oss":
            cfg["intermediate_size"] = 32
    if layers:
        cfg["num_hidden_layers"] = layers
    cls = {"qwen3_moe": transformers.Qwen3MoeConfig, "gpt_oss": transformers.GptOssConfig}[model_type]
    config = cls(**cfg)
    config.use_cache = False
    return config


# ---- model builders -----------------------------------------------------------------------------------------

def build_lora_model(config, device, dtype, qlora: bool = False):
    """The fasttune CausalLM of `config` with LoRA r=16 on q/k/v/o and the experts, weights random N(0, 0.02) in
    `dtype`; with `qlora` the expert stacks and the decoder linears (routers aside) in NF4 as load_in_4bit stores
    them, quantised one module at a time. On the meta device: the same modules and tensors (NF4 ones laid out by
    NF4Tensor.empty), no values and no memory: what `memory_breakdown` counts."""
    import fasttune
    from fasttune.kernels.nf4 import NF4Tensor
    from fasttune.models import ArchSpec, CausalLM
    from fasttune.models.moe import EXPERT_STACKS, Experts
    from fasttune.models.nf4_linear import NF4Linear, quantize_linear

    spec = ArchSpec.from_hf_config(config.to_dict())
    with torch.device("meta"):
        model = CausalLM(spec)
    meta = device.type == "meta"

    def quantize(mod_name: str, module: nn.Module) -> None:  # as load_in_4bit stores them, one module at a time
        if qlora and isinstance(module, Experts):
            for name in EXPERT_STACKS:
                module.quantize_nf4_(name, NF4Tensor.empty(getattr(module, name).shape, dtype) if meta else None)
        elif (qlora and isinstance(module, nn.Linear) and mod_name.startswith("model.layers.")
              and not mod_name.endswith((".mlp.gate", ".mlp.router"))):
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    NF4Linear(NF4Tensor.empty(module.weight.shape, dtype), module.bias) if meta
                    else quantize_linear(module))

    materialize_random_(model, device, dtype, after_module=quantize)
    model = fasttune.add_lora(model, r=RANK, alpha=RANK, target_modules=ATTENTION + ["gate_proj", "up_proj",
                                                                                      "down_proj"])
    return model.train()


def planned_free_bytes(model, budget_gib: float, optimizer: str, allocated: int) -> int:
    """What a GPU of `budget_gib` has left for activations once the model holds `allocated` bytes and the
    training state it has not made yet exists: the trainable parameters' gradients and the optimizer's moments."""
    from fasttune.train.optimizers import training_state_bytes

    return int(budget_gib * GiB) - allocated - training_state_bytes(model, optimizer)


def build_fasttune(config, device, dtype, policy: str, seq: int, batch: int, qlora: bool = False,
                   budget_gib: float | None = None, optimizer: str = "adamw"):
    from fasttune.train.memory import apply_memory_policy

    model = build_lora_model(config, device, dtype, qlora)
    # with a budget, plan for what a GPU of budget_gib has left after the weights, the gradients and the optimizer
    # state (made after the plan, so not yet allocated), not for the H200's free memory
    extra = ({"free_bytes": planned_free_bytes(model, budget_gib, optimizer, torch.cuda.memory_allocated(device))}
             if budget_gib and device.type == "cuda" else {})
    plan = apply_memory_policy(model, policy, seq_len=seq, batch_size=batch, **extra)
    return model, (f"{'QLoRA (NF4 experts and linears), ' if qlora else ''}memory policy {policy}"
                   f"{f' for a {budget_gib:g} GiB budget' if extra else ''}: {plan.summary()}")


# ---- memory accounting (--plan-only) ------------------------------------------------------------------------

def resident_bytes(model: nn.Module) -> dict[str, int]:
    """The bytes of every parameter and buffer of a built model (each tensor once), by component. On the meta
    device too: the same count a built model holds, without building it (tests/test_bench_moe_memory.py checks
    the two agree on the tiny shapes)."""
    from fasttune.adapters import lora_parameters
    from fasttune.models.decoder import RMSNorm
    from fasttune.models.moe import Experts, NF4ExpertStack
    from fasttune.models.nf4_linear import NF4Linear

    lora = {id(p) for p in lora_parameters(model)}
    embed, head = model.model.embed_tokens, getattr(model.lm_head, "base", model.lm_head)
    routers = {id(layer.mlp.router_linear) for layer in model.model.layers if hasattr(layer.mlp, "router_linear")}
    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(key: str, t: torch.Tensor) -> None:
        if id(t) not in seen:
            seen.add(id(t))
            out[key] = out.get(key, 0) + t.numel() * t.element_size()

    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(t) in lora:
                key = f"LoRA parameters ({t.dtype})".replace("torch.", "")
            elif module is embed:
                key = "embedding (vocab x hidden)"
            elif module is head:
                key = "lm_head (vocab x hidden, untied)"
            elif isinstance(module, NF4ExpertStack):
                key = "expert stacks NF4 codes" if name == "packed" else "expert stacks NF4 scales (double-quantised)"
            elif isinstance(module, Experts):
                key = "expert biases" if name.endswith("_bias") else "expert stacks (16-bit)"
            elif isinstance(module, NF4Linear):
                key = ("attention linears NF4 codes" if name == "packed" else
                       "attention linears biases" if name == "bias" else
                       "attention linears NF4 scales (double-quantised)")
            elif id(module) in routers:
                key = "routers"
            elif isinstance(module, nn.Linear):
                key = "attention linears biases" if name == "bias" else "attention linears (16-bit)"
            elif isinstance(module, RMSNorm):
                key = "norms"
            elif name == "sinks":
                key = "attention sinks"
            else:
                key = f"other ({type(module).__name__}.{name})"
            add(key, t)
    return out


def memory_breakdown(config, dtype: torch.dtype, seq: int, batch: int, qlora: bool, optimizer: str,
                     budget_gib: float | None, policy: str = "auto") -> dict:
    """Where the memory of a fasttune training step goes, from the model built on the meta device exactly as the
    rows build it. Exact: the resident weights and adapters, the gradients and the optimizer moments (from the
    trainable shapes and the optimizer's state layout). Estimated: the activations the memory plan made for
    `budget_gib` keeps (train.memory's per-layer estimate), one layer's backward working set (the planner's own
    allowance, without its reserve). Exact sizes of transients: the largest NF4 expert stack dequantised by the
    grouped GEMM (forward and backward), the fused loss head's chunk. The expected peak is the static state plus
    the kept activations plus the larger of the loss head's and one layer's backward transients (they do not
    coexist)."""
    from fasttune.kernels.cross_entropy import loss_workspace_bytes
    from fasttune.kernels.grouped_gemm import dequant_temporary_bytes
    from fasttune.models.moe import NF4ExpertStack
    from fasttune.train.memory import plan_memory, working_set_bytes
    from fasttune.train.optimizers import optimizer_state_bytes

    model = build_lora_model(config, torch.device("meta"), dtype, qlora)
    spec = model.spec
    dtype_bytes = torch.finfo(dtype).bits // 8
    tokens = seq * batch
    rows = [(k, v, "exact") for k, v in sorted(resident_bytes(model).items(), key=lambda kv: -kv[1])]
    weights = sum(v for _, v, _ in rows)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    state = optimizer_state_bytes(trainable, optimizer)
    grad_dtype = str(trainable[0].dtype).removeprefix("torch.")
    rows += [(f"gradients of the trainable parameters ({grad_dtype})", grads, "exact"),
             (f"optimizer moments ({optimizer})", state, "exact")]
    static = weights + grads + state
    free = int(budget_gib * GiB) - static if budget_gib else None
    plan = plan_memory(spec, policy, seq, batch, free, dtype_bytes, lora_rank=RANK)
    kept = plan.resident_activation_bytes(tokens * spec.hidden_size * dtype_bytes)
    layer = plan.activation_bytes_per_layer
    working = working_set_bytes(spec, tokens, layer, dtype_bytes, reserve_bytes=0)
    dequant = max((dequant_temporary_bytes(m.quantized, dtype) for m in model.modules()
                   if isinstance(m, NF4ExpertStack)), default=0)
    loss = loss_workspace_bytes(tokens - batch, spec.vocab_size, spec.hidden_size, dtype_bytes)
    rows += [(f"activations kept by the plan ({plan.summary()}; {layer / GiB:.3f} GiB per kept layer)", kept,
              "planner estimate"),
             ("one layer's backward working set (planner: factor x (activations + 4 x hidden))", working,
              "planner estimate"),
             ("largest NF4 expert range dequantised for a grouped GEMM (transient; Triton base GEMM)", dequant,
              "exact size"),
             ("fused loss head: one chunk of logits, dL/dhidden, row losses (transient)", loss, "exact size")]
    expected = static + kept + max(working + dequant, loss)
    return dict(rows=rows, weights_bytes=weights, gradient_bytes=grads, optimizer_bytes=state, static_bytes=static,
                expected_peak_bytes=expected,
                budget_bytes=int(budget_gib * GiB) if budget_gib else None, free_for_activations=free,
                planner_reserve_bytes=2 * GiB, plan=plan.summary(), plan_notes=plan.notes,
                activation_bytes_per_layer=layer, trainable_params=sum(p.numel() for p in trainable),
                layers=spec.num_layers)


def breakdown_table(case: str, qlora: bool, optimizer: str, b: dict) -> str:
    budget = f", budget {b['budget_bytes'] / GiB:g} GiB" if b["budget_bytes"] else ""
    lines = [f"### {case}, {b['layers']} layers, {'QLoRA' if qlora else 'LoRA on a 16-bit base'}, optimizer "
             f"{optimizer}{budget}; {b['trainable_params']:,} trainable parameters", "",
             "| component | bytes | GiB | kind |", "|---|---:|---:|---|"]
    for name, n, kind in b["rows"]:
        lines.append(f"| {name} | {n:,} | {n / GiB:.3f} | {kind} |")
    for label, key in (("weights and adapters", "weights_bytes"), ("+ gradients + optimizer moments", "static_bytes"),
                       ("expected peak: static + kept + max(layer backward + dequant, loss head)",
                        "expected_peak_bytes")):
        lines.append(f"| **{label}** | {b[key]:,} | {b[key] / GiB:.3f} | |")
    if b["budget_bytes"]:
        lines.append(f"\nLeft for activations under the budget: {b['free_for_activations'] / GiB:.3f} GiB (the "
                     f"planner also keeps a {b['planner_reserve_bytes'] / GiB:g} GiB reserve beside its working "
                     f"set). Plan: {b['plan']}{'; ' + '; '.join(b['plan_notes']) if b['plan_notes'] else ''}.")
    return "\n".join(lines)


def build_hf(config, device, dtype, gc_on: bool):
    import transformers
    from peft import LoraConfig, get_peft_model

    attn = "eager" if config.model_type == "gpt_oss" else "sdpa"
    with default_dtype(dtype), torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    experts = getattr(model.config, "_experts_implementation", None)
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=ATTENTION,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    model.train()
    return model, f"experts_implementation={experts}, attention {attn}, gradient checkpointing {'on' if gc_on else 'off'}"


def measure(tool, config, device, dtype, setting, seq, batch, warmup, steps, qlora=False,
            budget_gib: float | None = None, profile: bool = False, optimizer: str | None = None) -> dict:
    free_everything(device)
    capped = bool(budget_gib) and tool == "fasttune" and device.type == "cuda"
    if capped:  # the process may not allocate beyond the budget: an out-of-memory error is the honest result
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GiB / total), cuda_index(device))
    model = opt = None
    try:
        t_build = time.perf_counter()
        if tool == "fasttune":
            model, setup = build_fasttune(config, device, dtype, setting, seq, batch, qlora,
                                          budget_gib if capped else None, optimizer or "adamw")
        else:
            model, setup = build_hf(config, device, dtype, setting)
        built = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else 0.0
        opt = make_optimizer(model, tool, optimizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        build_s = time.perf_counter() - t_build
        gen = torch.Generator(device=device).manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (batch, seq), device=device, generator=gen)
        run = timed_training(lambda: train_step(model, tool, ids, opt), device, warmup, steps)
        row = dict(setup=setup, tokens_per_s=batch * seq / run["step_s"], **run, trainable_params=trainable,
                   build_s=build_s, allocated_after_build_gib=built)
        if profile:
            totals: dict = {}
            row["profile_top"] = profile_step(lambda: train_step(model, tool, ids, opt), device, totals=totals)
            row.update({f"profile_{k}": v for k, v in totals.items()})
        if capped:
            row.update(budget_gib=budget_gib, fits_budget=run["peak_gib"] <= budget_gib)
        return row
    finally:
        model = opt = None  # noqa: F841 - drop the references before freeing the memory
        free_everything(device)
        if capped:
            torch.cuda.set_per_process_memory_fraction(1.0, cuda_index(device))


def fallbacks_logged() -> list[str]:
    """What fasttune's attention dispatch logged as slower paths or failed fused paths during the run (gpt-oss's
    sinks should take neither since they run fused)."""
    from fasttune.kernels.attention import FALLBACKS

    return sorted(FALLBACKS._said) + [f"{path} failed: {why}" for path, why in FALLBACKS.failed.items()]


def experts_gemm_choices() -> list[dict]:
    """kernels.grouped_gemm.AUTO_CHOICES as JSON rows: direction, rows bucket, in/out features, the kept kernel and
    both timings (ms)."""
    from fasttune.kernels.grouped_gemm import AUTO_CHOICES

    return [{"direction": k[0], "rows_bucket": k[1], "in": k[2], "out": k[3], "lora": k[9] is not None, **v}
            for k, v in AUTO_CHOICES.items()]


def markdown(rows: list[dict]) -> str:
    lines = ["| case | layers | tool | setup | tokens/s | peak GiB | step s | loss first→last | speed vs HF+PEFT | "
             "memory vs HF+PEFT |", "|---|---:|---|---|---:|---:|---:|---|---:|---:|"]
    base = {}
    for r in rows:  # the fastest HF+PEFT row of each case is the baseline
        if r["tool"].startswith("hf+peft") and "tokens_per_s" in r:
            if r["case"] not in base or r["tokens_per_s"] > base[r["case"]]["tokens_per_s"]:
                base[r["case"]] = r
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['case']} | {r['layers']} | {r['tool']} | failed: {r.get('error', '')[:90]} | | | | | | |")
            continue
        b = base.get(r["case"])
        sp = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else ""
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b and b["peak_gib"] else ""
        peak = f"{r['peak_gib']:.1f}" + (f" (planned {r['planned_peak_gib']:.1f})" if "planned_peak_gib" in r else "")
        lines.append(f"| {r['case']} | {r['layers']} | {r['tool']} | {r['setup']} | {r['tokens_per_s']:,.0f} | "
                     f"{peak} | {r['step_s']:.3f} | {r['first_loss']:.3f}→{r['last_loss']:.3f} | {sp} | "
                     f"{mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="qwen3-30b-a3b,gpt-oss-20b", help="comma list of " + ", ".join(CASES))
    ap.add_argument("--tools", default="fasttune,hf+peft", help="comma list of fasttune, hf+peft")
    ap.add_argument("--ft-policies", default="auto", help="fasttune memory policies to measure (comma list)")
    ap.add_argument("--hf-gc", default="on", help="HF+PEFT gradient checkpointing settings to measure: on,off")
    ap.add_argument("--qlora", action="store_true", help="also fasttune QLoRA rows (NF4 experts and linears)")
    ap.add_argument("--grouped-mm", default="",
                    help="fasttune rows once per experts' base-GEMM kernel in this comma list (auto, triton, torch: "
                         "FASTTUNE_GROUPED_MM; auto times both once per shape and direction), side by side; "
                         "default: the library's default (auto) only")
    ap.add_argument("--profile", action="store_true",
                    help="one more step of each row under torch.profiler: its top kernels in the row (profile_top)")
    ap.add_argument("--budget-gib", default=None,
                    help="cap fasttune rows at this many GiB (torch.cuda.set_per_process_memory_fraction) and plan "
                         "their memory policy for it (the issue's 16 GB gpt-oss QLoRA target: --qlora --budget-gib 16); "
                         "'hf': each case's HF+PEFT peak, its rows measured first (the issue's 'at <= its memory')")
    ap.add_argument("--optimizer", default="adamw",
                    help="fasttune rows once per optimizer in this comma list, made as the trainer makes "
                         "train.optimizer: adamw (torch's, fused on CUDA), adamw8bit (8-bit moments); HF+PEFT rows "
                         "use torch's AdamW with its defaults")
    ap.add_argument("--plan-only", action="store_true",
                    help="build nothing on the device: print where the memory of each fasttune row would go (the "
                         "model built on the meta device, exact weights / gradients / optimizer state, the memory "
                         "planner's activation estimate for --budget-gib) and exit")
    ap.add_argument("--layers", type=int, default=None, help="build this many layers instead of the full depth")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test; CPU works)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/moe_train.json when $OUT is set)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    grouped_mms = [g.strip() for g in args.grouped_mm.split(",") if g.strip()] or [None]
    seq = 64 if args.tiny and args.seq == 2048 else args.seq
    optimizers = [o.strip() for o in args.optimizer.split(",") if o.strip()]
    bad = sorted(set(optimizers) - {"adamw", "adamw8bit"})
    if bad or not optimizers:
        ap.error(f"--optimizer: choose from adamw, adamw8bit (got {args.optimizer!r})")
    match_hf = args.budget_gib == "hf"
    try:
        args.budget_gib = None if match_hf or args.budget_gib is None else float(args.budget_gib)
    except ValueError:
        ap.error(f"--budget-gib: a number of GiB or 'hf' (got {args.budget_gib!r})")
    if match_hf and "hf+peft" not in tools:
        ap.error("--budget-gib hf needs the hf+peft rows (--tools fasttune,hf+peft)")
    if args.plan_only:
        if match_hf:
            ap.error("--plan-only needs a number for --budget-gib")
        return plan_only(args, cases, seq, optimizers)
    info = versions()
    print(json.dumps(info), flush=True)
    rows = []
    t_start = time.perf_counter()
    for case in cases:
        config = hf_config(case, args.layers, args.tiny)
        full = CASES[case]["num_hidden_layers"]
        jobs = []
        for tool in tools:
            settings = ([p.strip() for p in args.ft_policies.split(",")] if tool == "fasttune"
                        else [g.strip() == "on" for g in args.hf_gc.split(",")])
            jobs += [(tool, setting, False, gm, opt) for setting in settings
                     for gm in (grouped_mms if tool == "fasttune" else [None])
                     for opt in (optimizers if tool == "fasttune" else [None])]
        if args.qlora:
            jobs += [("fasttune", p.strip(), True, gm, opt) for p in args.ft_policies.split(",") for gm in grouped_mms
                     for opt in optimizers]
        if match_hf:  # HF first: its peak is the fasttune rows' budget
            jobs.sort(key=lambda job: job[0] != "hf+peft")
        hf_peak = None
        for tool, setting, qlora, grouped_mm, optimizer in jobs:
            budget = (hf_peak if match_hf else args.budget_gib) if tool == "fasttune" else None
            label = tool + (" qlora" if qlora else "") + (
                f" ({setting})" if tool == "fasttune" else f" (gc {'on' if setting else 'off'})") + (
                f" experts {grouped_mm}" if grouped_mm else "") + (f" {optimizer}" if optimizer else "")
            if grouped_mm:  # read by kernels.grouped_gemm at every call: this row's base-GEMM kernel
                os.environ["FASTTUNE_GROUPED_MM"] = grouped_mm
            row = dict(case=case, tool=label, seq=seq, batch=args.batch, layers=config.num_hidden_layers,
                       full_layers=full, optimizer=optimizer or "adamw (torch defaults)")
            print(f"[run] {case} {label} seq {seq} x batch {args.batch}, {config.num_hidden_layers} layers",
                  flush=True)
            if budget and device.type == "cuda":  # --plan-only's prediction
                b = memory_breakdown(config, dtype, seq, args.batch, qlora, optimizer, budget, setting)
                row.update(planned_weights_gib=b["weights_bytes"] / GiB, planned_static_gib=b["static_bytes"] / GiB,
                           planned_peak_gib=b["expected_peak_bytes"] / GiB, planned_plan=b["plan"])
            try:
                row.update(measure(tool, config, device, dtype, setting, seq, args.batch, args.warmup,
                                   args.steps, qlora, budget, args.profile, optimizer))
                if tool == "hf+peft" and "peak_gib" in row:
                    hf_peak = max(hf_peak or 0.0, row["peak_gib"])
                if tool == "fasttune":  # what base_gemm="auto" kept for each expert GEMM shape so far, with timings
                    row["experts_gemm_auto_choices"] = experts_gemm_choices()
                print("   ", json.dumps(row), flush=True)
            except Exception as e:  # noqa: BLE001 - one failure must not stop the other measurements
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc()
                print(row["traceback"], flush=True)
                free_everything(device)
            rows.append(row)
            write(args.out, info, rows, time.perf_counter() - t_start)  # partial results survive a timeout
    elapsed = time.perf_counter() - t_start
    print("\n" + markdown(rows) + f"\n\n(total {elapsed:.0f} s)", flush=True)
    out = write(args.out, info, rows, elapsed)
    if out:
        print(f"wrote {out}", flush=True)
    return 0


def plan_only(args, cases: list[str], seq: int, optimizers: list[str]) -> int:
    """--plan-only: the memory breakdown of each fasttune row the other options describe (bf16, as on the GPU),
    printed as tables; JSON beside them with --out / $OUT."""
    results = []
    for case in cases:
        config = hf_config(case, args.layers, args.tiny)
        for qlora in ([False] if not args.qlora or args.tools else []) + ([True] if args.qlora else []):
            for optimizer in optimizers:
                b = memory_breakdown(config, torch.bfloat16, seq, args.batch, qlora, optimizer, args.budget_gib,
                                     args.ft_policies.split(",")[0].strip())
                print(breakdown_table(case, qlora, optimizer, b) + "\n", flush=True)
                results.append(dict(case=case, qlora=qlora, optimizer=optimizer, seq=seq, batch=args.batch, **b))
    out = args.out or (os.path.join(os.environ["OUT"], "moe_memory_plan.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(dict(command="python " + " ".join(sys.argv), results=results), indent=2))
        print(f"wrote {out}", flush=True)
    return 0


def write(out: str | None, info: dict, rows: list[dict], elapsed: float) -> str | None:
    """JSON (and a markdown table beside it) of the rows so far; the path, or None without --out / $OUT."""
    out = out or (os.path.join(os.environ["OUT"], "moe_train.json") if os.environ.get("OUT") else None)
    if not out:
        return None
    result = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), versions=info,
                  command="python " + " ".join(sys.argv), elapsed_s=elapsed,
                  fasttune_fallbacks=fallbacks_logged(), rows=rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    Path(out).with_suffix(".md").write_text(markdown(rows) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
