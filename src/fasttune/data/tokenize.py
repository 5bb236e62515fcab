"""Tokenise documents and conversations into {"input_ids", "labels"} with loss masking.

Labels are NOT shifted (the model shifts them) and labels[0] is always -100 (the first token is never a target),
which also keeps packed documents from being trained to predict across a document boundary.

Conversations: render the whole chat once and tokenise it once (so training sees exactly the tokens inference
sees), then find each assistant turn's character span by rendering incrementally: the turn is the text that
render(messages[:i+1]) adds after render(messages[:i], add_generation_prompt=True). A token is trained on only if
its character span lies entirely inside an assistant span (trailing whitespace after the end-of-turn marker is
excluded). BOS: a leading bos_token written by the template is removed from the text and the tokenizer's BOS id is
prepended once, so BOS appears exactly once whether the template, the tokenizer, both or neither add it.

Text far longer than any example can be (a 200 MB line) is cut by characters before tokenising, at
`char_limit(tokenizer, max_seq_length)`: past that point the first max_seq_length tokens cannot change, so the
example after truncation to max_seq_length is exactly the one the whole text gives; shorter text is untouched.
"""
from __future__ import annotations

from ..labels import IGNORE_INDEX
from .chat_templates import ChatTemplate
from .errors import DataError, Location

TRAIN_ON = ("responses", "all")


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is not a fast tokenizer; label masking needs character offsets",
                        hint="load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def char_limit(tokenizer, max_tokens: int) -> int:
    """Characters of text that surely hold more than `max_tokens` tokens, with their first `max_tokens` tokens the
    same as the whole text's. A token covers at most as many characters as its vocabulary string is long (byte-level
    and SentencePiece strings spell every covered character or byte); 4x that allows for normalizers that compose
    up to 3 characters into one (Hangul jamo) and leaves slack after the last kept token, where a cut could change
    the tokenisation. Never below 32 characters per token."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_tokens * max(32, 4 * longest)


def _bos(tokenizer) -> tuple[str | None, int | None]:
    return getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)


def tokenize_text(text: str, tokenizer, *, add_eos: bool = True, location: Location | None = None,
                  max_chars: int | None = None) -> dict:
    """A plain-text document: [BOS] + tokens + [EOS]; every token after the first is a target. Text over
    `max_chars` (from char_limit) is cut there first."""
    if not isinstance(text, str):
        raise DataError(f"text is a non-string value of type {type(text).__name__}", location=location)
    ids, _ = _encode(tokenizer, text if max_chars is None else text[:max_chars])
    bos_token, bos_id = _bos(tokenizer)
    if bos_id is not None and not (ids and ids[0] == bos_id):
        ids = [bos_id] + ids
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos_id is not None:
        ids = ids + [eos_id]
    labels = list(ids)
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(messages: list[dict], template: ChatTemplate, bos_token: str | None, eos_token: str | None,
                    location: Location | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The fully rendered chat and the [start, end) character spans of each assistant turn within it."""
    full = template.render(messages, bos_token=bos_token, eos_token=eos_token)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
        upto = template.render(messages[: i + 1], bos_token=bos_token, eos_token=eos_token)
        if not full.startswith(prompt) or not upto.startswith(prompt):
            raise DataError(f"chat template {template.name!r} is not incremental: the prompt for assistant turn {i} is not "
                            "a prefix of the rendered conversation, so response-only masking cannot locate the turn",
                            location=location, hint="use train_on='all' or a registered chat template")
        end = _common_prefix_length(upto, full)
        while end > len(prompt) and full[end - 1].isspace():
            end -= 1  # stop at the end-of-turn marker; the newline after it belongs to the next turn
        spans.append((len(prompt), end))
    return full, spans


def tokenize_conversation(messages: list[dict], tokenizer, template: ChatTemplate, *, train_on: str = "responses",
                          location: Location | None = None, max_chars: int | None = None) -> dict:
    """A standardised conversation ([{"role", "content"}]) rendered with `template`, tokenised and masked. Rendered
    text over `max_chars` (from char_limit) is tokenised only up to there."""
    if train_on not in TRAIN_ON:
        raise DataError(f"unknown train_on {train_on!r}", column="train_on", available=TRAIN_ON)
    bos_token, bos_id = _bos(tokenizer)
    eos_token = getattr(tokenizer, "eos_token", None)
    full, spans = assistant_spans(messages, template, bos_token, eos_token, location)
    shift = 0
    if bos_token and full.startswith(bos_token):
        shift = len(bos_token)  # template wrote BOS as text: drop it and add the id ourselves, exactly once
    ids, offsets = _encode(tokenizer, full[shift:] if max_chars is None else full[shift:shift + max_chars])
    if bos_id is not None:
        ids, offsets = [bos_id] + ids, [(-1, -1)] + offsets
    labels = [IGNORE_INDEX] * len(ids)
    if train_on == "all":
        labels = list(ids)
    else:
        k = 0
        for t, (start, end) in enumerate(offsets):
            if end <= start:
                continue
            start, end = start + shift, end + shift
            while k < len(spans) and spans[k][1] <= start:
                k += 1
            if k < len(spans) and spans[k][0] <= start and end <= spans[k][1]:
                labels[t] = ids[t]
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def generation_prompt_ids(messages: list[dict], tokenizer, template: ChatTemplate) -> list[int]:
    """Token ids of a chat ready for generation (ends with the assistant header), with BOS exactly once."""
    bos_token, bos_id = _bos(tokenizer)
    text = template.render(messages, add_generation_prompt=True, bos_token=bos_token,
                           eos_token=getattr(tokenizer, "eos_token", None))
    if bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    ids, _ = _encode(tokenizer, text)
    return ([bos_id] if bos_id is not None else []) + ids
