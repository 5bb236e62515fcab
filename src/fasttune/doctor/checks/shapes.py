"""What makes loading fail, found from config.json and the safetensors headers without reading a weight: files
that are truncated or missing, config sizes that cannot describe a model (hidden_size not divisible by the heads),
and tensors whose shapes differ from what config.json implies (intermediate_size, num_key_value_heads,
hidden_size, vocab_size, num_hidden_layers). The implied shapes come from fasttune's own decoder built with one
layer on the meta device (no memory, whatever the sizes), so they are the shapes the loader will demand."""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import torch

from ..context import LM_HEAD, ModelFolder
from ..report import Finding

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# bitsandbytes stores a 4-bit linear as packed codes plus scale tables under `<linear>.weight...`: not comparable
_QUANTIZED_LINEAR = re.compile(r"^(self_attn|mlp)\.[^.]+\.weight")
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _listed(items: list[str], limit: int = 8) -> list[str]:
    return items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])


def check_weight_files(folder: ModelFolder) -> Iterator[Finding]:
    folder.tensors  # reads and validates every header, filling weight_errors
    for f, why in folder.weight_errors.items():
        yield Finding("weights-corrupt", "error", f"{f.name} cannot be read", [why],
                      "re-download or re-copy the file (compare its size with the source); loading stops at it")
    index = folder.weight_index
    if index is None:
        return
    missing = sorted({n for n in index.values() if not (folder.path / n).exists()})
    if missing:
        yield Finding("weights-corrupt", "error",
                      f"model.safetensors.index.json names {len(missing)} shard(s) that are not in the folder",
                      _listed(missing), "download the missing shards; loading fails without them")
    readable = {f.name for f in folder.weight_files} - {f.name for f in folder.weight_errors}
    absent = sorted(n for n, shard in index.items() if shard in readable and n not in folder.tensors)
    if absent:
        yield Finding("weights-corrupt", "error",
                      f"{len(absent)} tensor(s) listed in the index are not in their shard",
                      _listed([f"{n} (index: {index[n]})" for n in absent]),
                      "the index and the shards come from different exports: re-download both")


def _config_size_problems(cfg: dict) -> list[str]:
    problems = []
    for key in _SIZE_KEYS + ("num_key_value_heads", "head_dim"):
        v = cfg.get(key)
        if v is None and key in ("num_key_value_heads", "head_dim"):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            problems.append(f"{key} = {v!r}: must be a positive integer")
    if problems:
        return problems
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if not cfg.get("head_dim") and cfg["hidden_size"] % heads:
        problems.append(f"hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads {heads} (and "
                        "config.json gives no head_dim), so the heads cannot split the hidden state")
    if heads % kv:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}: grouped-query "
                        "attention shares each key/value head among a whole number of query heads")
    return problems


def check_config_sizes(folder: ModelFolder) -> Iterator[Finding]:
    problems = _config_size_problems(folder.config)
    if problems:
        yield Finding("config-sizes", "error", "config.json's sizes cannot describe a model", problems,
                      "restore these values from the original config.json; the tensor shapes in the safetensors "
                      "headers show what the weights were made with")


def _implied_shapes(folder: ModelFolder, layer: int = 0, expert_layout: str = "saved"
                    ) -> dict[str, tuple[int, ...]] | None:
    """Checkpoint name -> shape the loader demands, with `model.layers.0.` standing for every layer of layer
    `layer`'s kind (MoE models have MoE and dense layers); None when config.json cannot be turned into a model
    (reported by config-unsupported / config-sizes). `expert_layout`: MoE experts as fasttune and transformers save
    them ("saved": per expert for Qwen3-MoE / Mixtral, 3-D for gpt-oss) or as 3-D stacks ("stacked"), which the
    loader reads too."""
    spec = folder.spec
    if spec is None or _config_size_problems(folder.config):
        return None
    from ...models.checkpoint import _fuse, _split_experts
    from ...models.decoder import CausalLM

    # shapes do not depend on RoPE scaling, whose own mistakes (a missing factor) rope-scaling reports
    one_layer = dataclasses.replace(spec, num_layers=1, layer_types=spec.layer_types[layer:layer + 1],
                                    moe_layers=spec.moe_layers[layer:layer + 1],
                                    rope=dataclasses.replace(spec.rope, kind="default"))
    with torch.device("meta"):  # shapes only: nothing is allocated, even for hidden_size 1e7
        model = CausalLM(one_layer)
    state = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    if spec.tie_word_embeddings:
        state.pop(LM_HEAD, None)
    state = _fuse(state, spec)
    if expert_layout == "saved":
        state = _split_experts(state, spec)
    return {n: tuple(t.shape) for n, t in state.items()}


# gpt-oss's MXFP4 experts: packed codes and scales instead of the 3-D stacks (dequantised on load)
_MXFP4_EXPERTS = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


def _layer_templates(folder: ModelFolder, spec) -> dict[bool, list[dict[str, tuple[int, ...]]]]:
    """Per layer kind (MoE or not), the accepted per-layer layouts (suffix -> shape): for MoE layers the saved
    per-expert layout and the 3-D stacks (and MXFP4 codes for gpt-oss), either of which the loader reads."""
    kinds: dict[bool, list[dict[str, tuple[int, ...]]]] = {}
    for i in range(spec.num_layers):
        kind = spec.is_moe_layer(i)
        if kind in kinds:
            continue
        layouts = []
        for expert_layout in (("saved", "stacked") if kind else ("saved",)):
            implied = _implied_shapes(folder, i, expert_layout)
            layouts.append({n.removeprefix("model.layers.0."): s for n, s in implied.items()
                            if n.startswith("model.layers.0.")})
        kinds[kind] = layouts
    return kinds


def check_tensor_shapes(folder: ModelFolder) -> Iterator[Finding]:
    tensors = folder.tensors
    if not tensors:
        return
    implied = _implied_shapes(folder)
    if implied is None:
        return
    spec = folder.spec
    quantized = bool(folder.config.get("quantization_config"))
    templates = _layer_templates(folder, spec) if spec.is_moe else None
    wrong, unexpected = [], []
    layers: dict[int, set[str]] = {}
    for name, info in tensors.items():
        if name.endswith("rotary_emb.inv_freq") or (spec.tie_word_embeddings and name == LM_HEAD):
            continue  # the loader skips these
        m = _LAYER.match(name)
        key = name
        want = implied.get(key)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(m.group(2))
            if quantized and (_QUANTIZED_LINEAR.match(m.group(2)) or _MXFP4_EXPERTS.match(m.group(2))):
                continue
            key = f"model.layers.0.{m.group(2)}"
            if templates is not None and int(m.group(1)) < spec.num_layers:
                layouts = templates[spec.is_moe_layer(int(m.group(1)))]
                want = next((t[m.group(2)] for t in layouts if m.group(2) in t), None)
            else:
                want = implied.get(key)
        if want is None:
            unexpected.append(f"{name}: shape {info.shape}")
        elif info.shape != want:
            wrong.append(f"{name}: shape {info.shape}, config implies {want}")
    config_facts = (f"config.json: hidden_size {spec.hidden_size}, intermediate_size {spec.intermediate_size}, "
                    f"num_attention_heads {spec.num_heads}, num_key_value_heads {spec.num_kv_heads}, head_dim "
                    f"{spec.head_dim}, vocab_size {spec.vocab_size}")
    if wrong:
        yield Finding("weights-shape", "error", f"{len(wrong)} tensor(s) do not have the shape config.json implies",
                      _listed(wrong) + [config_facts],
                      "correct config.json to the shapes the weights have (or use the weights this config belongs "
                      "to): loading stops at the first mismatch")
    if unexpected:
        yield Finding("weights-shape", "error", f"{len(unexpected)} tensor(s) are not part of a "
                      f"{spec.model_type} model as config.json describes it", _listed(unexpected),
                      "check model_type and the layer settings in config.json; loading refuses unknown tensors")
    if not layers:
        return
    stored = sorted(layers)
    if stored != list(range(spec.num_layers)):
        gaps = sorted(set(range(min(stored[-1] + 1, spec.num_layers))) - set(stored))
        yield Finding("weights-shape", "error",
                      f"config.json says {spec.num_layers} layers, the checkpoint holds {len(stored)}",
                      [f"layers stored: {stored[0]}..{stored[-1]}" + (f", missing {gaps[:10]}" if gaps else ""),
                       f"config.json: num_hidden_layers = {folder.config.get('num_hidden_layers')}"],
                      f"set num_hidden_layers to {stored[-1] + 1}" if not gaps else
                      "re-download the checkpoint: layers are missing")
    per_layer = {n.removeprefix("model.layers.0.") for n in implied if n.startswith("model.layers.0.")}

    def missing(i: int, names: set[str]) -> set[str]:
        if templates is None or i >= spec.num_layers:
            return per_layer - names
        gaps = [set(t) - names for t in templates[spec.is_moe_layer(i)]]  # one complete layout is enough
        return min(gaps, key=len)
    incomplete = [f"layer {i}: missing {sorted(missing(i, names))[:4]}" for i, names in sorted(layers.items())
                  if not quantized and missing(i, names)]
    if incomplete:
        yield Finding("weights-shape", "error", f"{len(incomplete)} layer(s) lack tensors the model needs",
                      _listed(incomplete), "re-export the checkpoint; loading fails on missing tensors")


CHECKS = [("weights-corrupt", check_weight_files), ("config-sizes", check_config_sizes),
          ("weights-shape", check_tensor_shapes)]
