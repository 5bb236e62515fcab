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
# Strings in a chat template that look like special tokens: <|...|>, <start_of_turn>-style words, [INST].
# Looking like one is not enough to be one: Llama-2 / Mistral v0.1 write [INST] as plain text, which their
# tokenizers split into pieces by design. Only a string the tokenizer declares (special or added) or has as one
# vocabulary entry (a control token such as Mistral v0.3's [INST]) must encode as one token.
_SPECIAL_LIKE = re.compile(r"<\|[^|<>\s]{1,40}\|>|<(?:start_of_turn|end_of_turn|bos|eos|s|/s)>|\[/?INST\]")
_CHATML_LIKE = re.compile(r"<\|[^|<>\s]{1,40}\|>")  # never plain text in a real template


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
        if back != text and not (back == text[1:] and _dummy_prefix_absorbs(folder, text)):
            at = next((k for k, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
            unk = tok.unk_token_id is not None and tok.unk_token_id in ids
            failures.append(f"{name}: {text!r} -> {back!r} (first difference at char {at}"
                            + (", unknown tokens" if unk else "") + ")")
    if failures:
        yield Finding("tokenizer-roundtrip", "warning", f"decode(encode(text)) != text for {len(failures)} probe(s)",
                      failures, "text the tokenizer cannot reproduce is trained on as something else: use the "
                      "tokenizer the model was pretrained with (byte fallback / byte-level BPE round-trips exactly)")


def _dummy_prefix_absorbs(folder: ModelFolder, text: str) -> bool:
    """True when `text`'s one leading space is swallowed by a SentencePiece-style dummy prefix: the tokenizer
    marks a word start on text that has none ("x" -> "\u2581x") and encodes " x" exactly as "x". That is how
    transformers' Llama / Mistral tokenizers (Metaspace) work, not a defect of the model folder."""
    if not text.startswith(" ") or text.startswith("  "):
        return False
    plain = folder.encode(text[1:])
    if not plain or folder.encode(text) != plain:
        return False
    first = folder.tokenizer.convert_ids_to_tokens(plain[:1])[0]
    return isinstance(first, str) and first.startswith("\u2581") and not text[1:].startswith("\u2581")


def _declared(tok) -> set[str]:
    """Strings the tokenizer itself declares: special tokens map, additional special tokens, added tokens."""
    out = set(tok.all_special_tokens)
    try:
        out |= set(tok.get_added_vocab())
    except Exception:  # noqa: BLE001 - tokenizers without an added vocabulary
        pass
    return out


def _vocab_id(tok, text: str) -> int | None:
    """The id of `text` as one vocabulary entry (a control token), or None when it is not one."""
    try:
        tid = tok.convert_tokens_to_ids(text)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(tid, int) or tid < 0 or (tok.unk_token_id is not None and tid == tok.unk_token_id
                                                 and text != tok.unk_token):
        return None
    return tid


def _meant_special(folder: ModelFolder) -> tuple[dict[str, str], list[str]]:
    """(strings that must each encode to one token -> where we learned about them,
    ChatML-like strings the template writes although the tokenizer has no such token)."""
    tok = folder.tokenizer
    out: dict[str, str] = {}
    for t in tok.all_special_tokens:
        out.setdefault(t, "tokenizer special tokens")
    declared = _declared(tok)
    unknown: list[str] = []
    tmpl = folder.chat_template or ""
    for m in dict.fromkeys(_SPECIAL_LIKE.findall(tmpl)):
        if m in declared or _vocab_id(tok, m) is not None:
            out.setdefault(m, "chat template")
        elif _CHATML_LIKE.fullmatch(m):
            unknown.append(m)
        # else: plain text for this tokenizer ([INST] in Llama-2): its pieces are what the model was trained on
    return out, unknown


def check_special_tokens(folder: ModelFolder) -> Iterator[Finding]:
    tok = folder.tokenizer
    if tok is None:
        return
    split = []
    meant, unknown = _meant_special(folder)
    declared = _declared(tok)
    for text, source in meant.items():
        alone = folder.encode(text)
        inside = folder.encode("a" + text + "b")
        tid = None if text in declared else _vocab_id(tok, text)
        if tid is None:  # declared by the tokenizer
            whole = len(alone) == 1 and alone[0] in inside
        else:  # only a vocabulary entry: a SentencePiece dummy prefix may come before it, so look for its id
            whole = tid in alone and tid in inside
        if not whole:
            pieces = tok.convert_ids_to_tokens(alone)
            split.append(f"{text!r} ({source}) -> {len(alone)} tokens {pieces[:8]}"
                         + ("" if tid is None else f", though it is vocabulary entry {tid}"))
    if split:
        yield Finding("special-tokens-split", "error", f"{len(split)} special token(s) do not encode as one token",
                      split + ["the model sees the pieces, never the special token it was trained with"],
                      "register them as special added tokens (tokenizer.add_special_tokens) in the saved tokenizer, "
                      "or fix the template to use the tokenizer's real special tokens")
    if unknown:
        yield Finding("special-tokens-split", "info",
                      f"the chat template writes {len(unknown)} token-like string(s) this tokenizer does not have",
                      [f"{t!r} -> {len(folder.encode(t))} tokens as plain text" for t in unknown]
                      + ["fine if the model was trained on that text; a template copied from another model is not"],
                      "use the chat template published with this model")


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
        if fast != slow and not (_dummy_prefix_absorbs(folder, text) and fast == sp.encode(text[1:])):
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
