#!/usr/bin/env python
"""Decode throughput: fasttune's Generator vs transformers' `generate` (default dynamic cache, and its static cache,
which transformers compiles with torch.compile "reduce-overhead" on CUDA), side by side in one process on one GPU
(issue 18, item 5).

Model: Llama-3.1-8B shape, random N(0, 0.02) weights in bf16, built once by transformers; fasttune's model is the
same tensors (no copy), so both decode the same weights. Prompts: `--prompt-len` random tokens per row (all rows
the same length, so transformers needs no padding mask); `--new-tokens` generated greedily with EOS off, so every
row generates exactly that many.

Per (tool, batch):
    time_full    median wall time of generate(max_new_tokens=N) (synchronised), after --warmup calls
    time_prefill median wall time of generate(max_new_tokens=1)
    step_ms      (time_full - time_prefill) / (N - 1): one decode step
    tokens_s     batch * N / time_full (end to end);   decode_tokens_s = batch / step time
    hbm          weight bytes read per step (every linear and the LM head; the embedding reads one row per
                 token) / step time, and that as a fraction of the H200's 4.8 TB/s (meaningful at batch 1)
    kernels_per_step  (fasttune tools on CUDA) GPU activities (kernels, copies, memsets) of one decode step, counted
                 by the profiler as those of an eager 3-token call minus those of a 2-token call
Tools: fasttune (Generator, CUDA graphs, its defaults: concatenated q/k/v and gate/up weights, residual add fused
into RMSNorm, RoPE fused with the KV-cache write), fasttune-gemv (the same with gemv="triton": decode steps of at
most 8 sequences run their projections in the Triton GEMV, kernels/gemv.py, down_proj with the GLU fused in),
fasttune-unfused (the same Generator with fused=False,
fuse_projections=False: one launch per projection, add, norm, RoPE and cache write, as before issue 18's fusions),
fasttune+lora (r=16 adapters on all seven projections, unmerged, and
merged for the call), hf-default (generate, DynamicCache), hf-static (cache_implementation="static": transformers
compiles the forward, fullgraph, "reduce-overhead"; the first call of each shape compiles and is a warmup).
A failing tool is recorded with its error and the rest continue; the JSON is rewritten after every measurement.

    python bench/generate_speed.py --out $OUT/generate_speed.json              # batch 1, 16, 64; 512 new tokens
    python bench/generate_speed.py --quick                                     # 64 new tokens, batch 1 and 16
    python bench/generate_speed.py --tools fasttune,hf-static --batches 64
    python bench/generate_speed.py --tools fasttune,fasttune-unfused,hf-static --batches 1,64   # the fusions' gain
    python bench/generate_speed.py --tools fasttune,fasttune-gemv --batches 1,8 --quick        # Triton GEMV vs cuBLAS
    python bench/generate_speed.py --tiny --device cpu --tools fasttune,hf-default --quick   # smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

H200_HBM_BYTES_S = 4.8e12
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
}
TOOLS = ("fasttune", "fasttune-gemv", "fasttune-unfused", "fasttune+lora", "hf-default", "hf-static")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(shape: str, vocab: int) -> dict:
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
               max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
               attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    cfg.update(SHAPES[shape])
    return cfg


def build_hf(cfg: dict, device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = modeling_llama.LlamaForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(0)
    for mod_name in [n for n, _ in model.named_modules()]:
        module = model.get_submodule(mod_name)
        for name, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if p.dim() >= 2:
                t.normal_(0, 0.02, generator=gen)
            else:
                t.fill_(1.0)
            setattr(module, name, nn.Parameter(t, requires_grad=False))
    rotary = model.model.rotary_emb  # its inv_freq buffer was computed on the meta device: build it for real
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def fasttune_from_hf(hf, cfg: dict):
    """A fasttune CausalLM whose parameters are the transformers model's tensors (names match one to one)."""
    from fasttune.models import ArchSpec, CausalLM

    spec = ArchSpec.from_hf_config(cfg)
    with torch.device("meta"):
        model = CausalLM(spec)
    for name, p in hf.named_parameters():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Parameter(p.data, requires_grad=False))
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters not shared from the transformers model: {left[:5]}")
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every parameter but the input embedding (one row per token)."""
    embed = model.model.embed_tokens.weight
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is embed
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return total - (0 if tied else embed.numel() * embed.element_size())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def runner(tool: str, model, hf, batch: int, prompt_len: int, max_seq_len: int, device):
    """fn(ids (B, T) tensor, n) -> (B, n) generated ids, for this tool; and a cleanup."""
    if tool.startswith("fasttune"):
        from fasttune.generation import Generator, SamplingParams

        gen = Generator(model, max_batch_size=batch, max_seq_len=max_seq_len, cuda_graphs=device.type == "cuda",
                        **fasttune_kwargs(tool))
        merge = tool.endswith("merged")

        def run(ids, n):
            params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=[])
            out = gen.generate(ids.tolist(), params, merge_lora=merge)
            return torch.tensor([c[0] for c in out])
        return run, gen.release
    static = tool == "hf-static"

    def run(ids, n):
        kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        if static:
            kw["cache_implementation"] = "static"
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return out[:, ids.shape[1]:]
    return run, lambda: None


def fasttune_kwargs(tool: str) -> dict:
    unfused = tool == "fasttune-unfused"
    return dict(fused=not unfused, fuse_projections=not unfused, gemv="triton" if tool == "fasttune-gemv" else "cublas")


def kernels_per_step(tool: str, model, ids: torch.Tensor, max_seq_len: int) -> tuple[int, dict[str, int]]:
    """GPU activities of one eager decode step: a 3-token call's minus a 2-token call's (each counted after an
    unprofiled call of its own length; the prefill and the per-call weight refresh cancel). Returns the total and
    the 12 most launched kernels of the step, by name."""
    from common import device_activity_counts

    from fasttune.generation import Generator, SamplingParams

    gen = Generator(model, max_batch_size=ids.shape[0], max_seq_len=max_seq_len, cuda_graphs=False,
                    **fasttune_kwargs(tool))
    counts = []
    try:
        for n in (2, 3):
            params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=[])
            gen.generate(ids.tolist(), params)
            counts.append(device_activity_counts(lambda: gen.generate(ids.tolist(), params), ids.device))
    finally:
        gen.release()
    step = {k: counts[1].get(k, 0) - counts[0].get(k, 0) for k in counts[1].keys() | counts[0].keys()}
    top = sorted(((k[:80], v) for k, v in step.items() if v), key=lambda kv: -kv[1])[:12]
    return sum(step.values()), dict(top)


def measure(tool, model, hf, batch, args, device, wbytes) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=g).to(device)
    n = args.new_tokens
    run, cleanup = runner(tool, model, hf, batch, args.prompt_len, args.prompt_len + n, device)
    try:
        for _ in range(args.warmup):  # compiles / captures / autotunes for both call shapes
            run(ids, n)
            run(ids, 1)
        t_full, out = timed(lambda: run(ids, n), device, args.repeats)
        t_pre, _ = timed(lambda: run(ids, 1), device, args.repeats)
    finally:
        cleanup()
    step = max(t_full - t_pre, 1e-9) / max(n - 1, 1)
    row = dict(tool=tool, batch=batch, prompt_len=args.prompt_len, new_tokens=n, time_full_s=round(t_full, 4),
               time_prefill_s=round(t_pre, 4), step_ms=round(step * 1e3, 3),
               tokens_s=round(batch * n / t_full, 1), decode_tokens_s=round(batch / step, 1),
               generated_shape=list(out.shape))
    row["hbm_gb_s"] = round(wbytes / step / 1e9, 1)
    row["hbm_fraction_of_4.8TBs"] = round(wbytes / step / H200_HBM_BYTES_S, 3)
    if tool in ("fasttune", "fasttune-gemv", "fasttune-unfused") and device.type == "cuda" and args.count_kernels:
        try:
            row["kernels_per_step"], row["step_kernels_top"] = kernels_per_step(tool, model, ids, args.prompt_len + 3)
        except Exception as e:  # the profiler is a diagnostic: the timings stand without it
            row["kernels_per_step_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row, out.cpu()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of " + ", ".join(TOOLS))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test; CPU works)")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, batch 1 and 16, one timed call")
    ap.add_argument("--no-count-kernels", dest="count_kernels", action="store_false",
                    help="skip the profiler's count of GPU activities per decode step (fasttune tools, CUDA)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="skip the measurements left once this much wall time has passed (recorded as skipped)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/generate_speed.json when $OUT is set)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = min(args.new_tokens, 64), 1
        if args.batches == "1,16,64":
            args.batches = "1,16"
    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_path = args.out or (os.path.join(os.environ["OUT"], "generate_speed.json") if os.environ.get("OUT") else None)
    tools = [t for t in args.tools.split(",") if t]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        ap.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    import transformers

    result = dict(info=dict(torch=torch.__version__, transformers=transformers.__version__,
                            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                            shape="tiny" if args.tiny else "8b", dtype=str(dtype), args=vars(args)), runs=[])

    def save():
        print(json.dumps(result["runs"][-1]) if result["runs"] else "", flush=True)
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(result, indent=2))

    cfg = llama_config("tiny" if args.tiny else "8b", args.vocab)
    hf = build_hf(cfg, device, dtype)
    model = fasttune_from_hf(hf, cfg)
    wbytes = weight_bytes(model)
    result["info"]["weight_bytes_per_step"] = wbytes
    from fasttune.generation import fused_projection_bytes

    result["info"]["fused_projection_bytes"] = fused_projection_bytes(model)  # fasttune's extra copy (its default)
    print(json.dumps(result["info"]), flush=True)
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    lora_added = False
    # order: what the targets compare first (fasttune at every batch, then the baselines from the largest batch
    # down), so a run cut short by --budget-s still has them; LoRA last (it wraps the shared model's projections)
    plan = [(t, b) for b in batches for t in ("fasttune", "fasttune-gemv") if t in tools]
    for b in sorted(batches, reverse=True):
        plan += [(t, b) for t in ("hf-static", "hf-default") if t in tools]
    plan += [("fasttune-unfused", b) for b in batches if "fasttune-unfused" in tools]
    if "fasttune+lora" in tools:
        plan += [(t, b) for b in batches for t in ("fasttune+lora", "fasttune+lora-merged")]
    for tool, b in plan:
        if time.perf_counter() - start > args.budget_s:
            result["runs"].append(dict(tool=tool, batch=b, skipped=f"--budget-s {args.budget_s} s reached"))
            save()
            continue
        try:
            if tool.startswith("fasttune+lora") and not lora_added:
                import fasttune

                fasttune.add_lora(model, r=16, alpha=16, target_modules=TARGETS)  # wraps fasttune's modules only
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name.endswith("lora_B"):
                            p.normal_(0, 1e-3)
                lora_added = True
            row, out = measure(tool, model, hf, b, args, device, wbytes)
            outputs[(tool, b)] = out
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
            result["runs"].append(row)
        except Exception as e:
            result["runs"].append(dict(tool=tool, batch=b, error=f"{type(e).__name__}: {str(e)[:500]}",
                                       traceback=traceback.format_exc()[-2000:]))
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        save()
    for row in result["runs"]:  # same weights, greedy: how long each tool's rows follow transformers' default
        ref, out = outputs.get(("hf-default", row.get("batch"))), outputs.get((row.get("tool"), row.get("batch")))
        if ref is not None and out is not None and row["tool"] in ("fasttune", "fasttune-unfused", "hf-static") \
                and ref.shape == out.shape:
            same = (ref == out).long().cumprod(-1).sum(-1).float()  # equal tokens before the first difference
            row["greedy_prefix_agreeing_with_hf_default"] = round(float(same.mean()), 1)
        fused = outputs.get(("fasttune", row.get("batch")))
        if row["tool"] in ("fasttune-unfused", "fasttune-gemv") and fused is not None and out is not None \
                and fused.shape == out.shape:
            same = (fused == out).long().cumprod(-1).sum(-1).float()
            row["greedy_prefix_agreeing_with_fasttune"] = round(float(same.mean()), 1)
    summary = {}
    for b in batches:
        rows = {r["tool"]: r for r in result["runs"] if r.get("batch") == b and "tokens_s" in r}
        ft = rows.get("fasttune")
        if ft is None:
            continue
        for base in ("hf-default", "hf-static", "fasttune-unfused"):
            if base in rows:
                summary[f"batch{b}_fasttune_over_{base}"] = round(ft["tokens_s"] / rows[base]["tokens_s"], 2)
                summary[f"batch{b}_decode_fasttune_over_{base}"] = round(
                    ft["decode_tokens_s"] / rows[base]["decode_tokens_s"], 2)
        if "fasttune-gemv" in rows:
            summary[f"batch{b}_decode_fasttune_gemv_over_fasttune"] = round(
                rows["fasttune-gemv"]["decode_tokens_s"] / ft["decode_tokens_s"], 3)
        if b == 1:
            summary["batch1_fasttune_hbm_fraction"] = ft["hbm_fraction_of_4.8TBs"]
            if "fasttune-gemv" in rows:
                summary["batch1_fasttune_gemv_hbm_fraction"] = rows["fasttune-gemv"]["hbm_fraction_of_4.8TBs"]
    result["summary"] = summary
    print(json.dumps(summary), flush=True)
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
