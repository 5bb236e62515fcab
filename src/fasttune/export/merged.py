"""Merged export: every LoRA folded into its base weight, W' = W + scaling * B @ A, computed in float32 and only then
rounded to the output dtype (one rounding, not one per operand).

An NF4 (4-bit) base is dequantised first, so the result is *the dequantised 4-bit base plus the adapter*, not the
original 16-bit model plus the adapter; `export_merged` says so in its notes. To merge into the original weights,
load the base in 16 bits and the adapter with `load_adapter`, then export.

A reward model carries `model.score` (`CausalLM.attach_score`: a bias-free linear, hidden -> 1, on the final hidden state of
each sequence's last token, as fasttune's reward objective trains it). It is exported as transformers'
<Family>ForSequenceClassification (num_labels 1, `score.weight`, no LM head), which scores the last token that is
not the pad token: the same token as fasttune's attention-mask rule whenever a sequence does not end in the pad
token.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..adapters import LoraExperts, LoraLinear
from ..models.moe import EXPERT_STACKS, Experts, NF4ExpertStack
from ..models.nf4_linear import NF4Linear
from ..models.checkpoint import resolve_dtype, save_model
from ..models.quantized import QuantizedLinear

DEQUANTISED_NOTE = ("the base model was 4-bit (NF4): the merged weights are the dequantised NF4 base plus the "
                    "adapter, not the original 16-bit weights plus the adapter")


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    perplexity: tuple[float, float] | None = None  # GGUF: (before, after) quantisation on the bundled corpus


# transformers' class-name prefix of each family fasttune reads (config.json's architectures may be absent)
# (Granite has no sequence-classification class in transformers: its reward models are refused)
SEQ_CLS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
                  "gemma2": "Gemma2", "gemma3_text": "Gemma3Text", "phi3": "Phi3", "olmo2": "Olmo2",
                  "smollm3": "SmolLM3"}


def sequence_classification_config(config: dict, pad_token_id: int | None) -> dict:
    """config.json of a causal LM, turned into the <Family>ForSequenceClassification one a reward model needs."""
    cfg = dict(config)
    family = SEQ_CLS_PREFIX.get(cfg.get("model_type"))
    if family is None:
        raise ValueError(f"no sequence-classification class known for model_type {cfg.get('model_type')!r}")
    cfg["architectures"] = [family + "ForSequenceClassification"]
    cfg["num_labels"] = 1
    cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    cfg["problem_type"] = "regression"
    if cfg.get("pad_token_id") is None and pad_token_id is not None:
        cfg["pad_token_id"] = pad_token_id  # transformers needs it to find each row's last token in a batch
    return cfg


def has_nf4(model: nn.Module) -> bool:
    return any(isinstance(m, (NF4Linear, NF4ExpertStack)) for m in model.modules())


def _dense_module_weight(m: nn.Module) -> torch.Tensor:
    """A linear's weight as a dense float32 tensor: merged for LoRA, dequantised for NF4 / GGUF blocks."""
    if isinstance(m, LoraLinear):
        return m.merged_weight()
    if isinstance(m, QuantizedLinear):
        return m.dequantize().float()
    return m.weight.detach().float()


def iter_merged_tensors(model: nn.Module) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """(checkpoint name, thunk returning the float32 merged tensor, shape) for every tensor of the plain model,
    with Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), in model order; nothing is computed until
    a thunk is called, so a caller can hold one merged tensor at a time. lm_head is skipped when tied, and for a
    reward model (`model.score`), whose checkpoint has `score.weight` instead."""
    spec = model.spec
    reward = model.score is not None
    owned = set()
    for name, m in model.named_modules():
        if isinstance(m, (LoraExperts, Experts)) and not any(name.startswith(o + ".") for o in owned):
            # MoE expert stacks: each adapter folded into its 3-D tensor, an NF4 stack dequantised
            experts = m.base if isinstance(m, LoraExperts) else m
            if isinstance(m, Experts) and not any(isinstance(getattr(m, n), NF4ExpertStack) for n in EXPERT_STACKS):
                continue  # plain tensors: the parameter loop below takes them
            owned.add(name)
            for stack in EXPERT_STACKS:
                thunk = ((lambda m=m, n=stack: m.merged_weight(n)) if isinstance(m, LoraExperts) else
                         (lambda m=m, n=stack: m.dense_stack(n).float()))
                yield f"{name}.{stack}", thunk, tuple(getattr(experts, stack).shape)
            for pname, p in experts.named_parameters(recurse=False):  # the biases (gpt-oss)
                if pname not in EXPERT_STACKS:
                    yield f"{name}.{pname}", (lambda p=p: p.detach().float()), tuple(p.shape)
            continue
        if isinstance(m, (LoraLinear, QuantizedLinear)):
            if any(name.startswith(o + ".") for o in owned):
                continue  # a LoRA layer's quantised base: merged into the LoRA layer's weight already
            owned.add(name)
            if reward and name == "lm_head":
                continue
            out_f, in_f = m.out_features, m.in_features
            yield name + ".weight", (lambda m=m: _dense_module_weight(m)), (out_f, in_f)
            base = m.base if isinstance(m, LoraLinear) else m
            if base.bias is not None:
                yield name + ".bias", (lambda b=base.bias: b.detach().float()), tuple(base.bias.shape)
    seen: set[int] = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        owner = pname.rpartition(".")[0]
        if any(owner == o or owner.startswith(o + ".") for o in owned):
            continue
        if pname == "lm_head.weight" and (spec.tie_word_embeddings or reward):
            continue
        if reward and (owner == "lm_head" or owner.startswith("lm_head.")):
            continue
        if id(p) in seen and pname != "lm_head.weight":
            continue
        seen.add(id(p))
        yield pname, (lambda p=p: p.detach().float()), tuple(p.shape)


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32,
                      progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The plain (LoRA-free) state dict with adapters merged in float32, each tensor then cast to `dtype`."""
    out = {}
    for name, thunk, _ in iter_merged_tensors(model):
        out[name] = thunk().to(dtype).cpu()
        if progress is not None:
            progress(name)
    return out


def export_merged(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: str | torch.dtype = "bfloat16",
                  max_shard_size: int | str = "5GB", progress: Callable[[str], None] | None = None) -> ExportResult:
    """Write a transformers-loadable folder (config.json, safetensors shards, tokenizer files) of the merged model:
    a causal LM, or for a reward model (`model.score`) a sequence-classification model."""
    path = Path(path)
    torch_dtype = resolve_dtype(dtype, model.spec)
    result = ExportResult()
    if has_nf4(model):
        result.notes.append(DEQUANTISED_NOTE)
    state = merged_state_dict(model, torch_dtype, progress)
    save_model(model, path, tokenizer=tokenizer, dtype=torch_dtype, max_shard_size=max_shard_size, state_dict=state)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    changed = cfg.pop("quantization_config", None) is not None  # the weights written are dense
    if model.score is not None:
        cfg = sequence_classification_config(cfg, getattr(tokenizer, "pad_token_id", None))
        changed = True
        result.notes.append(f"a reward model: written as {cfg['architectures'][0]} (AutoModelForSequenceClassification"
                            f", one score per sequence); it scores the last token that is not pad_token_id "
                            f"({cfg.get('pad_token_id')}), so score sequences that do not end in that token")
    if changed:
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    result.files = sorted(p for p in path.iterdir() if p.is_file())
    return result
