"""Known pitfalls of particular families: settings that load without complaint and then compute something other
than what the model was trained with.

- Gemma 2 / Gemma 3 in float16: activations overflow (spec.float16_overflow says why; the loader refuses it).
- Gemma 2 / Gemma 3 query_pre_attn_scalar: the attention scale is query_pre_attn_scalar^-1/2, not head_dim^-1/2.
  Released models set it to head_dim (Gemma 2 2B/9B, Gemma 3 1B..12B) or hidden_size / num_attention_heads
  (Gemma 2 27B: 144, Gemma 3 27B: 168); absent, transformers uses 256 (so 256 is also accepted).
- Gemma 2 without logit soft-capping (attn 50, final 30): some exports null them to allow faster attention
  kernels; the model then computes other logits than it was trained with.
- Granite: the four multipliers (embedding, residual, attention, logits scaling) are the model; absent, each is 1.
  A Granite checkpoint relabelled as Llama carries them but no Llama loader reads them.
- Phi-3 / Phi-4-mini long-RoPE: the short factors apply up to original_max_position_embeddings, the long ones
  beyond, with the attention scaled by sqrt(1 + ln(max / original) / ln(original)). Without the original length,
  or with max_position_embeddings not above it, the long factors are never used.
- SmolLM3: every fourth layer has no RoPE (no_rope_layers); relabelled as Llama, every layer would rotate.
"""
from __future__ import annotations

import math
from typing import Iterator

from ..context import ModelFolder
from ..report import Finding

_GEMMA = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
_GRANITE_KEYS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


def check_float16(folder: ModelFolder) -> Iterator[Finding]:
    spec = folder.spec
    if spec is None or spec.float16_overflow is None:
        return
    if folder.dtype == "float16":
        yield Finding("float16-overflow", "error", f"{spec.model_type} cannot be trained or run in float16",
                      [spec.float16_overflow, "fasttune refuses to load it in float16"],
                      "use bfloat16 (or float32 on a GPU without bfloat16)")
    elif spec.torch_dtype == "float16":
        yield Finding("float16-overflow", "warning", f"the checkpoint is labelled float16, which {spec.model_type} "
                      "overflows",
                      [f"config.json: torch_dtype = float16; {spec.float16_overflow}",
                       "loaders that follow the label (transformers' dtype='auto') compute in float16; fasttune "
                       "loads it in bfloat16 instead"],
                      "train and run it in bfloat16 (or float32); re-save it in bfloat16 to fix the label")


def check_gemma_attention(folder: ModelFolder) -> Iterator[Finding]:
    spec, cfg = folder.spec, folder.config
    if spec is None or spec.model_type not in _GEMMA:
        return
    if spec.text_tower and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    name = _GEMMA[spec.model_type]
    released = {spec.head_dim, spec.hidden_size // spec.num_heads}
    qpas = cfg.get("query_pre_attn_scalar")
    if qpas is None:
        if 256 not in released:
            yield Finding("gemma-attention-scale", "warning", "query_pre_attn_scalar is missing: the attention scale "
                          "falls back to 256^-1/2",
                          [f"{name}: head_dim = {spec.head_dim}, hidden_size / heads = "
                           f"{spec.hidden_size // spec.num_heads}; transformers and fasttune use 256 when the key "
                           "is absent", "released Gemma 2 / 3 configs always set it (head_dim, or hidden / heads "
                                        "for the 27B models)"],
                          "restore query_pre_attn_scalar from the released config.json")
    elif qpas not in released | {256}:  # 256: transformers' default, what a model built from defaults trains with
        yield Finding("gemma-attention-scale", "warning",
                      f"query_pre_attn_scalar = {qpas} is neither head_dim nor hidden_size / heads",
                      [f"{name}: the attention scale is query_pre_attn_scalar^-1/2 = {qpas ** -0.5:.5g}; head_dim = "
                       f"{spec.head_dim}, hidden_size / heads = {spec.hidden_size // spec.num_heads}",
                       "every released Gemma 2 / 3 uses one of those two (a model built from transformers' "
                       "defaults: 256)"],
                      "check it against the released config.json")
    if spec.model_type == "gemma2":
        missing = [k for k in ("attn_logit_softcapping", "final_logit_softcapping") if k in cfg and cfg[k] is None]
        if missing:
            yield Finding("gemma-softcapping", "warning", f"Gemma 2 with {' and '.join(missing)} switched off",
                          [f"config.json: {k} = null" for k in missing] +
                          ["Gemma 2 was trained with attention logits capped at 50 and final logits at 30; some "
                           "exports drop the caps to use faster attention kernels, which changes the logits"],
                          "set attn_logit_softcapping: 50.0 and final_logit_softcapping: 30.0 (the released values)",
                          repair={"config": {k: 50.0 if k.startswith("attn") else 30.0 for k in missing}})


def check_granite(folder: ModelFolder) -> Iterator[Finding]:
    cfg = folder.config
    mt = cfg.get("model_type")
    present = [k for k in _GRANITE_KEYS if k in cfg]
    if mt == "granite":
        absent = [k for k in _GRANITE_KEYS if k not in cfg]
        if absent:
            yield Finding("granite-multipliers", "warning", f"Granite config without {', '.join(absent)}",
                          ["each absent multiplier is taken as 1.0, i.e. not applied; Granite 3.x models are "
                           "trained with all four (e.g. embedding 12, residual 0.22, attention 1/128 and logits "
                           "scaling 8 in Granite 3.1 8B)"],
                          "restore the multipliers from the released config.json")
    elif present and mt in ("llama", "mistral"):
        yield Finding("granite-multipliers", "error", f"a {mt} config carries Granite's {', '.join(present)}",
                      [f"config.json: " + ", ".join(f"{k} = {cfg[k]}" for k in present),
                       f"the {mt} architecture never reads them: the model would run without its multipliers"],
                      "set model_type to granite (and architectures to GraniteForCausalLM)",
                      repair={"config": {"model_type": "granite", "architectures": ["GraniteForCausalLM"]}})


def check_longrope(folder: ModelFolder) -> Iterator[Finding]:
    spec = folder.spec
    if spec is None or spec.rope.kind != "longrope":
        return
    rope, mpe = spec.rope, spec.max_position_embeddings
    orig = rope.original_max_position_embeddings
    blocks = [folder.config] + [b for b in (folder.config.get(k) for k in ("rope_scaling", "rope_parameters"))
                                if isinstance(b, dict)]
    if not any(b.get("original_max_position_embeddings") for b in blocks):  # the spec falls back to the max
        yield Finding("longrope", "warning", "long-RoPE scaling without original_max_position_embeddings",
                      ["the short factors apply up to the original (pre-extension) context and the long ones beyond "
                       "it; without it the switch point and the attention scaling sqrt(1 + ln(max/original) / "
                       "ln(original)) fall back to max_position_embeddings: the long factors are never used"],
                      "set original_max_position_embeddings (Phi-3.5 / Phi-4-mini: 4096)")
    elif mpe <= orig:
        yield Finding("longrope", "warning",
                      f"long-RoPE with max_position_embeddings ({mpe}) not above the original context ({orig})",
                      [f"positions past {orig} select the long factors, and there are none below {mpe}: the long "
                       "factors and the attention scaling are unused"],
                      "set max_position_embeddings to the extended context (Phi-4-mini: 131072)")
    elif rope.attention_factor is None:
        scale = math.sqrt(1 + math.log(mpe / orig) / math.log(orig))
        yield Finding("longrope", "info", f"long-RoPE: short factors up to {orig} positions, long factors beyond",
                      [f"max_position_embeddings = {mpe}, original = {orig}: cos and sin are scaled by {scale:.4f}",
                       "a training sequence longer than the original context is rotated with the long factors, "
                       "a shorter one with the short factors"],
                      f"keep max_seq_length at or below {orig} unless the model should learn long-context use")


def check_nope_layers(folder: ModelFolder) -> Iterator[Finding]:
    cfg = folder.config
    if cfg.get("model_type") in ("llama", "mistral") and ("no_rope_layers" in cfg or "no_rope_layer_interval" in cfg):
        flags = cfg.get("no_rope_layers") or []
        yield Finding("nope-layers", "error", f"a {cfg['model_type']} config carries SmolLM3's RoPE-free layers",
                      [f"config.json: no_rope_layers = {flags}" if flags else
                       f"config.json: no_rope_layer_interval = {cfg.get('no_rope_layer_interval')}",
                       f"the {cfg['model_type']} architecture rotates every layer: the RoPE-free layers (every fourth "
                       "in SmolLM3) would see positions they were not trained with"],
                      "set model_type to smollm3 (and architectures to SmolLM3ForCausalLM)",
                      repair={"config": {"model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"]}})


CHECKS = [("float16-overflow", check_float16), ("gemma-attention", check_gemma_attention),
          ("granite-multipliers", check_granite), ("longrope", check_longrope), ("nope-layers", check_nope_layers)]
