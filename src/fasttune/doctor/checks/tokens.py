"""Token-level problems: untrained embedding rows, a pad token that is also EOS, a missing or doubled BOS.

Untrained rows. Rows the pretraining never updated (Llama-3 base's reserved special tokens) sit at or near
zero. A row is untrained when its L2 norm, or its standard deviation across the hidden dimension, is below
`RELATIVE_THRESHOLD` times the median over all rows: relative, so it holds for any init scale and dtype (a
random-init tiny model has row norms within a factor ~3 of the median; untrained rows are 100x+ below).
Rows equal to the mean of the trained rows are recognised as already repaired. Training on an untrained
token is the danger: its LM-head row gives it a logit near 0 among trained logits, and its embedding
feeds the first layer a near-zero vector, so gradients through it are huge or NaN."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..context import EMBED, LM_HEAD, ModelFolder
from ..report import Finding

RELATIVE_THRESHOLD = 0.05
_ROW_CHUNK = 8192
BOS_FAMILIES = ("llama", "mistral", "gemma", "gemma2")  # pretrained with BOS at the start of every sequence


@dataclass
class RowStats:
    untrained: list[int]
    repaired: list[int]
    median_norm: float


def row_stats(weight: torch.Tensor) -> RowStats:
    """Untrained rows of a (vocab, hidden) matrix, streamed in chunks of rows in float32."""
    V = weight.shape[0]
    norms = torch.empty(V)
    stds = torch.empty(V)
    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    for s in range(0, V, _ROW_CHUNK):
        c = weight[s:s + _ROW_CHUNK].float()
        norms[s:s + c.shape[0]] = c.norm(dim=1)
        stds[s:s + c.shape[0]] = c.std(dim=1)
    finite = torch.isfinite(norms) & torch.isfinite(stds)
    med_norm = norms[finite].median().item() if finite.any() else 0.0
    med_std = stds[finite].median().item() if finite.any() else 0.0
    low = finite & ((norms <= RELATIVE_THRESHOLD * med_norm) | (stds <= RELATIVE_THRESHOLD * med_std))
    candidates = low.nonzero().flatten().tolist()
    if not candidates or len(candidates) == V:
        return RowStats(candidates if len(candidates) < V else [], [], med_norm)
    trained = finite & ~low
    for s in range(0, V, _ROW_CHUNK):
        total += weight[s:s + _ROW_CHUNK].double()[trained[s:s + _ROW_CHUNK]].sum(0)
    mean = (total / trained.sum()).float()
    tol = 1e-2 * mean.norm().item() + 1e-6 * med_norm
    rows = weight[candidates].float()
    is_mean = (rows - mean).norm(dim=1) <= tol
    repaired = [i for i, m in zip(candidates, is_mean.tolist()) if m]
    untrained = [i for i, m in zip(candidates, is_mean.tolist()) if not m]
    return RowStats(untrained, repaired, med_norm)


def _token_names(folder: ModelFolder, ids: list[int], limit: int = 8) -> str:
    tok = folder.tokenizer
    shown = ids[:limit]
    if tok is not None:
        names = [f"{i} {tok.convert_ids_to_tokens(i)!r}" if i < len(tok) else f"{i} (no token)" for i in shown]
    else:
        names = [str(i) for i in shown]
    return ", ".join(names) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def untrained_ids(folder: ModelFolder) -> dict[str, RowStats]:
    stats = {}
    for name in (EMBED, LM_HEAD):
        if name in folder.tensors:
            stats[name] = row_stats(folder.get_tensor(name))
    return stats


def check_untrained(folder: ModelFolder) -> Iterator[Finding]:
    stats = untrained_ids(folder)
    if not stats:
        return
    tok = folder.tokenizer
    pad = tok.pad_token_id if tok is not None else folder.config.get("pad_token_id")
    rows_by_id: dict[int, list[str]] = {}
    for name, st in stats.items():
        for i in st.untrained:
            rows_by_id.setdefault(i, []).append("embedding" if name == EMBED else "LM head")
    if not rows_by_id:
        return
    ids = sorted(rows_by_id)
    evidence = [f"{name}: {len(st.untrained)} row(s) with norm or spread below {RELATIVE_THRESHOLD:g} x the median "
                f"(median row norm {st.median_norm:.3g})" for name, st in stats.items() if st.untrained]
    used: dict[int, list[str]] = {}
    if tok is not None:
        text, _ = folder.rendered_sample
        if text is not None:
            for i in set(folder.encode(text)):
                used.setdefault(i, []).append("chat template")
        for attr in ("bos_token_id", "eos_token_id"):
            i = getattr(tok, attr, None)
            if isinstance(i, int):
                used.setdefault(i, []).append(attr.replace("_token_id", "").upper())
        data, _ = folder.data_token_ids
        counts: dict[int, int] = {}
        for seq in data:
            for i in seq:
                counts[i] = counts.get(i, 0) + 1
        for i, n in counts.items():
            used.setdefault(i, []).append(f"data x{n}")
    in_use = [i for i in ids if i in used and i != pad]
    reachable = [i for i in ids if tok is None or i < len(tok)]
    only_pad = [i for i in ids if i == pad]
    unreachable = [i for i in ids if tok is not None and i >= len(tok)]
    idle = [i for i in reachable if i not in in_use and i != pad]
    fix = ("set these rows to the mean of the trained rows in both the embedding and the LM head, so the model "
           "starts them from an average token instead of zero")
    repair = {"mean_rows": [i for i in ids if i not in unreachable]}
    if in_use:
        yield Finding("untrained-tokens", "error", f"{len(in_use)} untrained token(s) are used in training text",
                      evidence + [f"{_token_names(folder, [i])}: untrained in {'+'.join(rows_by_id[i])}, used by "
                                  f"{', '.join(used[i])}" for i in in_use[:10]],
                      fix + "; training on them otherwise gives NaN losses or garbage", repair=repair)
    if idle:
        yield Finding("untrained-tokens", "warning", f"{len(idle)} untrained token(s) in the vocabulary",
                      evidence + [f"untrained: {_token_names(folder, idle)}",
                                  "not used by the chat template" + (" or the data" if folder.data else
                                                                     " (pass --data to check your dataset)")],
                      fix + " before any data or template uses them", repair=repair if not in_use else None)
    if only_pad:
        yield Finding("untrained-tokens", "info", "the pad token's rows are untrained",
                      [f"{_token_names(folder, only_pad)}: expected when padding_idx zeroed it; harmless while "
                       "pads are masked out of the loss and attention"], "")
    if unreachable:
        yield Finding("untrained-tokens", "info",
                      f"{len(unreachable)} untrained row(s) beyond the tokenizer's {len(tok)} tokens",
                      [f"rows {unreachable[0]}..{unreachable[-1]} (vocabulary padded for speed); no text maps to them"], "")


def check_pad_eos(folder: ModelFolder) -> Iterator[Finding]:
    tok = folder.tokenizer
    eos_ids = set(_ids(folder.config.get("eos_token_id")))
    pad_cfg = folder.config.get("pad_token_id")
    if tok is not None and isinstance(tok.eos_token_id, int):
        eos_ids.add(tok.eos_token_id)
    pads = {("tokenizer", tok.pad_token_id) if tok is not None else None, ("config.json", pad_cfg)} - {None}
    clash = [(src, i) for src, i in pads if isinstance(i, int) and i in eos_ids]
    if not clash:
        return
    evidence = [f"{src}: pad_token_id = {i} is an EOS id" for src, i in clash] + \
        ["masking pads out of the loss also masks every EOS, so the model never learns to stop"]
    if tok is None:  # a new pad token goes into the tokenizer: nothing --fix can do without one
        yield Finding("pad-eos", "warning", f"the pad token is the EOS token (id {clash[0][1]})", evidence,
                      "use a distinct pad token once the tokenizer loads (see the tokenizer finding)")
        return
    token = tok.convert_ids_to_tokens(clash[0][1])
    choice = choose_pad_token(folder)
    yield Finding("pad-eos", "warning", f"the pad token is the EOS token ({token!r})", evidence,
                  f"use a distinct pad token: {choice!r}" + (" (new; the embedding grows by one row)"
                                                            if choice not in _vocab(tok) else " (already in the vocabulary)"),
                  repair={"pad_token": choice})


def _vocab(tok) -> dict[str, int]:
    return tok.get_vocab() if tok is not None else {}


def choose_pad_token(folder: ModelFolder) -> str:
    """An existing unused special token that names padding, else a reserved special token no template uses,
    else a new "<|pad|>"."""
    tok = folder.tokenizer
    vocab = _vocab(tok)
    if tok is None:
        return "<|pad|>"
    taken = {tok.eos_token, tok.bos_token, tok.unk_token}
    text, _ = folder.rendered_sample
    specials = [t for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    names = [t.content for t in specials if t.content not in taken and (text is None or t.content not in text)]
    for pattern in ("pad", "reserved", "unused"):
        for n in names:
            if pattern in n.lower():
                return n
    for n in ("<|pad|>", "<pad>", "[PAD]"):
        if n not in vocab:
            return n
    return "<|fasttune_pad|>"


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)]


def check_bos(folder: ModelFolder) -> Iterator[Finding]:
    tok = folder.tokenizer
    mt = folder.config.get("model_type")
    if tok is None:
        return
    bos = tok.bos_token_id
    needs = mt in BOS_FAMILIES
    if bos is None:
        if needs:
            yield Finding("bos", "warning", f"{mt} models are trained with a BOS token but the tokenizer has none",
                          [f"tokenizer.bos_token is None; config bos_token_id = {folder.config.get('bos_token_id')}"],
                          "set bos_token in tokenizer_config.json to the model's BOS (e.g. <bos>, <s>, <|begin_of_text|>)")
        return
    plain = folder.encode("Hello world", add_special_tokens=True)
    text, _ = folder.rendered_sample
    template_bos = text is not None and text.startswith(tok.bos_token)
    if needs and plain[:1] != [bos] and not template_bos:
        yield Finding("bos", "warning", f"{mt} models need BOS first, but neither the tokenizer nor the chat template adds it",
                      [f"tokenizer('Hello world') = {plain[:6]} (BOS {bos} {tok.bos_token!r} missing)",
                       "the first token then plays the attention-sink role BOS had in pretraining: quality drops"],
                      "set add_bos_token=true in tokenizer_config.json (or prepend the BOS in the template)")
    if text is not None:
        ids = folder.encode(text, add_special_tokens=True)
        if ids[:2] == [bos, bos]:
            yield Finding("bos", "warning", "BOS is doubled: the chat template writes it and the tokenizer adds another",
                          [f"template text starts with {tok.bos_token!r}; tokenizer(text) = {ids[:5]}...",
                           "a sequence starting with two BOS tokens was never seen in pretraining"],
                          "tokenize rendered chat text with add_special_tokens=False (apply_chat_template(tokenize=True) "
                          "does), or remove the BOS from the template")


CHECKS = [("untrained-tokens", check_untrained), ("pad-eos", check_pad_eos), ("bos", check_bos)]
