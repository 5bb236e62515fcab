"""Config anomalies: values that load without complaint and then quietly change what the model computes."""
from __future__ import annotations

from typing import Iterator

import torch

from ..context import EMBED, LM_HEAD, ModelFolder
from ..report import Finding


def check_spec(folder: ModelFolder) -> Iterator[Finding]:
    spec, err = folder.spec_or_error
    if spec is None:
        yield Finding("config-unsupported", "error", "fasttune cannot build this architecture from config.json",
                      [err or ""], "use a supported family (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, "
                      "olmo2, granite, smollm3) or "
                      "correct the config field named above")


def _is_off_by_one(n: int) -> bool:
    return n >= 255 and (n + 1) & n == 0  # 2047, 4095, ...: one below a power of two


def check_sliding_window(folder: ModelFolder) -> Iterator[Finding]:
    sw = folder.config.get("sliding_window")
    if not isinstance(sw, int) or not _is_off_by_one(sw):
        return
    spec = folder.spec
    active = spec is not None and spec.sliding_window is not None
    yield Finding(
        "sliding-window", "warning" if active else "info",
        f"sliding_window is {sw}, one below {sw + 1}",
        [f"config.json: sliding_window = {sw}" + ("" if active else " (not used: sliding attention is off)"),
         "window sizes are powers of two in every released model; 2^k - 1 usually comes from an off-by-one in "
         "the export (each token then attends to one fewer past token than in pretraining)"],
        f"set sliding_window to {sw + 1} if that is what the model was trained with",
        repair={"config": {"sliding_window": sw + 1}})


def check_rope(folder: ModelFolder) -> Iterator[Finding]:
    spec = folder.spec
    if spec is None:
        return
    rope, mpe = spec.rope, spec.max_position_embeddings
    if rope.kind == "default":
        return
    if rope.factor is None and rope.kind in _NEEDS_FACTOR:
        yield Finding("rope-scaling", "error", f"RoPE scaling {rope.kind!r} has no factor",
                      [f"config.json: {_rope_block(folder.config)}",
                       f"{rope.kind} scaling divides the rotary frequencies by its factor: without one the model "
                       "cannot be built (transformers refuses the config too)"],
                      "add the factor the model was extended with (extended length / original length), or remove "
                      "the RoPE scaling block if the context was never extended")
        return
    if rope.factor is not None and rope.factor < 1:
        yield Finding("rope-scaling", "error", f"RoPE scaling factor {rope.factor} is below 1",
                      [f"rope {rope.kind} factor = {rope.factor}: this shrinks the context instead of extending it"],
                      "set the factor to the context extension ratio (new length / original length, >= 1)")
    if rope.kind in _EXTENDING and rope.factor == 1:
        yield Finding("rope-scaling", "warning", f"RoPE scaling {rope.kind!r} with factor 1 extends nothing",
                      [f"rope {rope.kind} factor = 1.0: the positions are those of the unscaled model",
                       "a scaling block is added to extend the context; factor 1 usually means it was never set"],
                      "set the factor to the context extension ratio (extended length / original length), "
                      "or remove the rope scaling block")
    orig = rope.original_max_position_embeddings
    if orig is not None and mpe < orig:
        yield Finding("rope-scaling", "warning",
                      f"max_position_embeddings ({mpe}) is below the pre-scaling context ({orig})",
                      [f"rope {rope.kind}: original_max_position_embeddings = {orig}, factor = {rope.factor}",
                       "RoPE scaling extends a context, so the scaled model should accept at least the original one"],
                      f"set max_position_embeddings to the extended context ({orig} x factor) or drop the scaling")
    elif orig is not None and rope.kind in _SCALED_CONTEXT and rope.factor is not None and rope.factor > 1 \
            and mpe != orig:
        yield from _scaled_context(rope.kind, rope.factor, orig, mpe)
    if rope.kind == "longrope":
        half = int(spec.head_dim * rope.partial_rotary_factor) // 2
        for name in ("long_factor", "short_factor"):
            vals = getattr(rope, name)
            if vals is not None and len(vals) != half:
                yield Finding("rope-scaling", "error", f"longrope {name} has {len(vals)} entries, expected {half}",
                              [f"one factor per rotary frequency: rotary dim / 2 = {half}"],
                              f"use the {name} list published with the model")
    if rope.kind == "llama3" and rope.low_freq_factor >= rope.high_freq_factor:
        yield Finding("rope-scaling", "error", "llama3 RoPE: low_freq_factor >= high_freq_factor",
                      [f"low_freq_factor = {rope.low_freq_factor}, high_freq_factor = {rope.high_freq_factor}: "
                       "the smoothing between them divides by their difference"],
                      "use the published values (Llama 3.1: low 1.0, high 4.0)")


# Kinds that cannot compute their frequencies without a factor (yarn falls back to the context ratio).
_NEEDS_FACTOR = ("linear", "dynamic", "llama3")


def _rope_block(cfg: dict) -> str:
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key):
            return f"{key} = {cfg[key]}"
    return "no rope_scaling block"


# Kinds whose factor stretches the positions: factor 1 is a no-op. (dynamic NTK still rescales past
# max_position_embeddings with factor 1; longrope has per-frequency lists instead.)
_EXTENDING = ("linear", "llama3", "yarn")
# Kinds whose extended context is original_max_position_embeddings x factor. Not llama3: its factor only
# stretches the low frequencies, and the releases set max_position_embeddings to 16 x the original with factor 8
# (Llama 3.1: 8192 -> 131072) as well as with factor 32 (Llama 3.2), so no ratio there is a mistake.
_SCALED_CONTEXT = ("linear", "dynamic", "yarn")


def _scaled_context(kind: str, factor: float, orig: int, mpe: int) -> Iterator[Finding]:
    """max_position_embeddings against original x factor. Accepted: the original (Qwen2.5's yarn instructions
    keep it) and the product (DeepSeek-V3: 4096 x 40 = 163840), within rounding of the factor. Beyond the product
    is a warning; between the two only a note, as Qwen3's yarn instructions (32768 x 4, 40960) leave it there."""
    implied = orig * factor
    tol = max(1.0, 0.01 * implied)
    if abs(mpe - implied) <= tol:
        return
    ratio = f"{mpe / orig:g}"
    evidence = [f"rope {kind}: original_max_position_embeddings = {orig}, factor = {factor:g}: the scaling covers "
                f"{orig} x {factor:g} = {implied:g} positions",
                f"config.json: max_position_embeddings = {mpe} ({ratio} x the original)"]
    if mpe > implied:
        yield Finding("rope-scaling", "warning",
                      f"max_position_embeddings ({mpe}) is beyond the context the RoPE scaling covers ({implied:g})",
                      evidence + [f"positions past {implied:g} are outside what the scaled frequencies were made for"],
                      f"set max_position_embeddings to {round(implied)} (original x factor), or the factor to "
                      f"{ratio} if the model was extended to {mpe}")
    else:  # between the two
        yield Finding("rope-scaling", "info",
                      f"max_position_embeddings ({mpe}) is below the context the RoPE scaling implies ({implied:g})",
                      evidence + ["the model accepts fewer positions than its scaling supports; some releases do "
                                  "this on purpose (Qwen3 with yarn: 32768 x 4, 40960 positions)"],
                      f"set max_position_embeddings to {round(implied)} if the model was extended that far, "
                      f"or the factor to {ratio} if {mpe} is the extended context")


def check_vocab_rows(folder: ModelFolder) -> Iterator[Finding]:
    vocab = folder.vocab_size
    info = folder.tensors.get(EMBED)
    if info is None:
        if folder.tensors and not folder.weight_errors:  # else it may sit in a file weights-corrupt reports
            yield Finding("weights-missing", "error", f"no {EMBED} in the checkpoint",
                          [f"tensors found: {len(folder.tensors)}, e.g. {', '.join(list(folder.tensors)[:3])}"],
                          "point at the full model folder (not an adapter or a partial export)")
        return
    rows = info.shape[0]
    if vocab is not None and rows != vocab:
        can_fix = folder.tokenizer is None or len(folder.tokenizer) <= rows
        yield Finding("vocab-size", "error", f"config vocab_size ({vocab}) != embedding rows ({rows})",
                      [f"config.json: vocab_size = {vocab}; {EMBED}: shape {info.shape}"],
                      f"set vocab_size to {rows} (the weights are the truth)" if can_fix else
                      "resize the embeddings to the tokenizer's vocabulary",
                      repair={"config": {"vocab_size": rows}} if can_fix else None)
    tok = folder.tokenizer
    if tok is None:
        return
    if len(tok) > rows:
        yield Finding("vocab-size", "error", f"the tokenizer has {len(tok)} tokens but the embedding only {rows} rows",
                      [f"token ids {rows}..{len(tok) - 1} index past the embedding (crash on GPU, garbage on CPU)"],
                      "resize the token embeddings (and LM head) to the tokenizer, or use the matching tokenizer")
        return
    beyond = sorted((i, t) for t, i in tok.get_vocab().items() if i >= rows)  # ids need not be contiguous
    if beyond:
        yield Finding("vocab-size", "error",
                      f"{len(beyond)} tokenizer token id(s) are beyond the embedding's {rows} rows",
                      [", ".join(f"{i} {t!r}" for i, t in beyond[:8]) + (f", ... ({len(beyond)} in all)"
                                                                         if len(beyond) > 8 else ""),
                       f"the tokenizer has {len(tok)} tokens but numbers them up to {beyond[-1][0]}: text holding "
                       "them indexes past the embedding (IndexError in training and generation)"],
                      "renumber those tokens below the embedding size in tokenizer.json, or resize the embeddings "
                      "(and LM head) to cover them")


def check_tied(folder: ModelFolder) -> Iterator[Finding]:
    if EMBED not in folder.tensors:
        return
    spec = folder.spec
    tied = spec.tie_word_embeddings if spec is not None else bool(folder.config.get("tie_word_embeddings", False))
    if not folder.has_lm_head:
        if not tied:
            yield Finding("tied-embeddings", "error", "tie_word_embeddings is false but the checkpoint has no lm_head.weight",
                          ["the LM head would be left randomly initialised (transformers) or fail to load (fasttune)"],
                          "set tie_word_embeddings to true (the embedding matrix is then the LM head)",
                          repair={"config": {"tie_word_embeddings": True}})
        return
    embed, head = folder.get_tensor(EMBED), folder.get_tensor(LM_HEAD)
    same = embed.shape == head.shape and torch.equal(embed, head)
    if tied and not same:
        yield Finding("tied-embeddings", "error", "tie_word_embeddings is true but lm_head.weight differs from the embedding",
                      ["loaders that honour the flag drop lm_head.weight and use the embedding: the trained LM head is lost"],
                      "set tie_word_embeddings to false",
                      repair={"config": {"tie_word_embeddings": False}})
    elif not tied and same:
        yield Finding("tied-embeddings", "info", "lm_head.weight is an exact copy of the embedding but the flag says untied",
                      ["tying would save one vocab x hidden matrix; training will untie them either way"],
                      "optional: set tie_word_embeddings to true and drop lm_head.weight")


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)]


def check_special_ids(folder: ModelFolder) -> Iterator[Finding]:
    rows = folder.tensors[EMBED].shape[0] if EMBED in folder.tensors else folder.vocab_size
    if rows is None:
        return
    sources = {"config.json": folder.config, "generation_config.json": folder.generation_config}
    for src, cfg in sources.items():
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            bad = [i for i in _ids(cfg.get(key)) if not 0 <= i < rows]
            if bad:
                fixed = _id_repair(folder, key, cfg.get(key), rows)
                yield Finding("special-ids", "error", f"{src}: {key} {bad} outside the vocabulary (0..{rows - 1})",
                              [f"{src}: {key} = {cfg.get(key)}, embedding rows = {rows}"],
                              f"set it to {fixed}" if fixed is not None else "set it to a token id inside the vocabulary",
                              repair=None if fixed is None else
                              {"config" if src == "config.json" else "generation_config": {key: fixed}})
    tok = folder.tokenizer
    if tok is not None:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            i = getattr(tok, attr, None)
            if isinstance(i, int) and not 0 <= i < rows:
                yield Finding("special-ids", "error", f"tokenizer {attr} = {i} is outside the embedding (0..{rows - 1})",
                              [f"token {getattr(tok, attr.replace('_id', ''))!r}"],
                              "use the tokenizer that matches the model, or resize the embeddings")


def _id_repair(folder: ModelFolder, key: str, value, rows: int):
    """The repaired value of a special-id field with ids outside 0..rows-1, or None when nothing can be inferred.
    A list (several EOS ids, as in Llama-3 instruct) keeps its valid ids - dropping <|eot_id|> would make generation
    run on - and gains the tokenizer's id if missing; a single id becomes the tokenizer's."""
    tok = folder.tokenizer
    i = getattr(tok, key, None) if tok is not None else None
    tok_id = i if isinstance(i, int) and 0 <= i < rows else None
    if isinstance(value, list):
        kept = [v for v in value if isinstance(v, int) and 0 <= v < rows]
        if tok_id is not None and tok_id not in kept:
            kept.append(tok_id)
        return kept or None
    return tok_id


def check_chat_template(folder: ModelFolder) -> Iterator[Finding]:
    if folder.tokenizer is None:
        return
    if not folder.chat_template:
        yield Finding("chat-template", "info", "the tokenizer has no chat template (a base model?)",
                      ["conversation data needs a template: pick one with fasttune's chat template registry"],
                      "choose a chat template before training on conversations")
        return
    text, err = folder.rendered_sample
    if err is not None:
        yield Finding("chat-template", "error", "the chat template fails to render a plain conversation",
                      [err[:500]], "repair the template (tokenizer_config.json `chat_template` or chat_template.jinja)")
        return
    prompt = [{"role": "user", "content": "Hi"}]
    try:
        folder.render_chat(prompt, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001
        yield Finding("chat-template", "error", "the chat template fails with add_generation_prompt=True",
                      [f"{type(e).__name__}: {e}"[:500], f"messages: {prompt}"],
                      "repair the template's generation-prompt branch")


CHECKS = [("config-unsupported", check_spec), ("sliding-window", check_sliding_window), ("rope-scaling", check_rope),
          ("vocab-size", check_vocab_rows), ("tied-embeddings", check_tied), ("special-ids", check_special_ids),
          ("chat-template", check_chat_template)]
