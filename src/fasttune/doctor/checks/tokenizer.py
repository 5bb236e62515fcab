"""Tokenizer: exact round trips, special tokens kept whole, and fast vs slow (sentencepiece) agreement."""
from __future__ import annotations

import re
from typing import Iterator

from ..context import ModelFolder
from ..report import Finding

# One probe per hazard, so a failure names what broke.
PROBES = {
    "spaces": "Hello  world,   three spaces\tand a tab\n\nnew lines ",
    "leading space": " leading space",
    "unicode": "naïve café, Zürich, 東京, ☃ and 🙂",
    "digits": "3.14159 + 2718281828 = 12,345,678.90",
    "code": "def f(x):\n    return {'a': [x ** 2, x // 3]}  # ok\n",
}
# Strings in a chat template that look like special tokens: <|...|>, <...> words with _ or digits, [INST].
_SPECIAL_LIKE = re.compile(r"<\|[^|<>\s]{1,40}\|>|<(?:start_of_turn|end_of_turn|bos|eos|s|/s)>|\[/?INST\]")


def check_round_trip(folder: ModelFolder) -> Iterator[Finding]:
    tok = folder.tokenizer
    if tok is None:
        _, err = folder.tokenizer_or_error
        yield Finding("tokenizer", "error", "the tokenizer does not load", [err or ""],
                      "add tokenizer.json (or tokenizer.model) from the original model")
        return
    failures = []
    for name, text in PROBES.items():
        ids = folder.encode(text)
        back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text:
            at = next((k for k, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            unk = tok.unk_token_id is not None and tok.unk_token_id in ids
            failures.append(f"{name}: {text!r} -> {back!r} (first difference at char {at}"
                            + (", unknown tokens" if unk else "") + ")")
    if failures:
        yield Finding("tokenizer-roundtrip", "warning", f"decode(encode(text)) != text for {len(failures)} probe(s)",
                      failures, "text the tokenizer cannot reproduce is trained on as something else: use the "
                      "tokenizer the model was pretrained with (byte fallback / byte-level BPE round-trips exactly)")


def _meant_special(folder: ModelFolder) -> dict[str, str]:
    """Strings that must each encode to one token -> where we learned about them."""
    tok = folder.tokenizer
    out: dict[str, str] = {}
    for t in tok.all_special_tokens:
        out.setdefault(t, "tokenizer special tokens")
    tmpl = folder.chat_template or ""
    for m in _SPECIAL_LIKE.findall(tmpl):
        out.setdefault(m, "chat template")
    return out


def check_special_tokens(folder: ModelFolder) -> Iterator[Finding]:
    tok = folder.tokenizer
    if tok is None:
        return
    split = []
    for text, source in _meant_special(folder).items():
        alone = folder.encode(text)
        inside = folder.encode("a" + text + "b")
        whole = len(alone) == 1 and alone[0] in inside
        if not whole:
            pieces = tok.convert_ids_to_tokens(alone)
            split.append(f"{text!r} ({source}) -> {len(alone)} tokens {pieces[:8]}")
    if split:
        yield Finding("special-tokens-split", "error", f"{len(split)} special token(s) do not encode as one token",
                      split + ["the model sees the pieces, never the special token it was trained with"],
                      "register them as special added tokens (tokenizer.add_special_tokens) in the saved tokenizer, "
                      "or fix the template to use the tokenizer's real special tokens")


def check_fast_slow(folder: ModelFolder) -> Iterator[Finding]:
    """When both tokenizer.json and a sentencepiece tokenizer.model exist, they must give the same ids."""
    tok = folder.tokenizer
    sp_file = folder.path / "tokenizer.model"
    if tok is None or not sp_file.exists() or not (folder.path / "tokenizer.json").exists():
        return
    try:
        import sentencepiece as spm
    except ImportError:
        yield Finding("tokenizer-fast-slow", "info", "tokenizer.model present but sentencepiece is not installed",
                      ["fast vs slow comparison skipped"], "pip install sentencepiece to run this check")
        return
    try:
        sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    except Exception as e:  # noqa: BLE001
        yield Finding("tokenizer-fast-slow", "warning", "tokenizer.model does not load with sentencepiece",
                      [f"{type(e).__name__}: {e}"], "remove the stale tokenizer.model or replace it with the right one")
        return
    diffs = []
    for name, text in PROBES.items():
        fast = folder.encode(text)
        slow = sp.encode(text)
        if fast != slow:
            at = next((k for k, (a, b) in enumerate(zip(fast, slow)) if a != b), min(len(fast), len(slow)))
            diffs.append(f"{name}: fast {fast[at:at + 5]} vs slow {slow[at:at + 5]} from token {at} "
                         f"({len(fast)} vs {len(slow)} tokens)")
    if diffs:
        yield Finding("tokenizer-fast-slow", "warning",
                      f"tokenizer.json and tokenizer.model disagree on {len(diffs)} of {len(PROBES)} probes",
                      diffs, "regenerate tokenizer.json from tokenizer.model (or delete the one that does not match "
                      "pretraining): tools that load the other file see different token ids")


CHECKS = [("tokenizer-roundtrip", check_round_trip), ("special-tokens-split", check_special_tokens),
          ("tokenizer-fast-slow", check_fast_slow)]
