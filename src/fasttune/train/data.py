"""From a `DataConfig` to tokenised train/eval examples and a deterministic, resumable stream of micro-batches.

Reading, prompt templates, conversations, chat templates, masking and packing are `fasttune.data`'s; this file
only decides which of them a config asks for, splits train/eval, and fixes the order: epoch e's batches are a
pure function of (examples, seed + e), so a run resumed at (epoch, batch index) sees exactly the batches an
uninterrupted run would.

`bundled:preferences` is built from the bundled instructions: chosen = the example's own answer, rejected = the
answer of another example (a deterministic derangement) — a real, if easy, preference signal for demos and tests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..data.chat_templates import get_chat_template
from ..data.conversations import find_conversation_column, standardize_conversation
from ..data.dataset import build_dataset
from ..data.errors import DataError
from ..data.packing import collate_padded, iter_batches
from ..data.readers import read_rows
from ..data.template import PromptTemplate
from ..data.tokenize import IGNORE_INDEX, tokenize_conversation
from .config import DataConfig

BUNDLED = {"instructions": "instructions.jsonl", "conversations": "conversations.jsonl", "corpus": "corpus.txt",
           "preferences": "instructions.jsonl"}
DEFAULT_PROMPT = "{instruction}[[\n\n{input}]]"


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("fasttune") / "assets" / "data" / BUNDLED[name]))


def resolve_source(path: str) -> tuple[str, str | None]:
    """(file path, bundled name or None)."""
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        if name not in BUNDLED:
            raise DataError(f"unknown bundled dataset {path!r}", column="data.path",
                            available=[f"bundled:{n}" for n in BUNDLED])
        return str(bundled_path(name)), name
    return path, None


def _detect_kind(row: dict) -> str:
    if "chosen" in row and "rejected" in row:
        return "preference"
    if find_conversation_column(row) is not None:
        return "conversation"
    if "instruction" in row or "prompt" in row:
        return "instruction"
    if "text" in row:
        return "text"
    raise DataError("cannot tell what kind of data this is", available=sorted(row),
                    hint="expected columns chosen/rejected, messages/conversations, instruction/output, or text; "
                         "or set data.kind and data.prompt_template")


def chat_template_for(tokenizer, name: str | None):
    if name is None and not getattr(tokenizer, "chat_template", None):
        name = "chatml"  # base models without a template: ChatML as plain text
    return get_chat_template(name, tokenizer)


def _messages(value, location) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return standardize_conversation(value, location)


def _preference_rows(rows: list[tuple]) -> list[tuple]:
    """bundled:preferences: pair each instruction with its own answer (chosen) and another's (rejected)."""
    n = len(rows)
    out = []
    for i, (loc, row) in enumerate(rows):
        other = rows[(i * 7 + 3) % n if (i * 7 + 3) % n != i else (i + 1) % n][1]
        out.append((loc, {"instruction": row["instruction"], "input": row.get("input"),
                          "chosen": row["output"], "rejected": other["output"]}))
    return out


@dataclass
class PreparedData:
    kind: str
    train: list = field(default_factory=list)  # examples {"input_ids","labels"} or pairs {"chosen","rejected"}
    eval: list = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    summary: str = ""


def _fit(example: dict, max_len: int, mode: str, counts: dict) -> dict | None:
    if len(example["input_ids"]) <= max_len:
        return example
    if mode == "drop":
        counts["dropped"] += 1
        return None
    counts["truncated"] += 1
    return {"input_ids": example["input_ids"][:max_len], "labels": example["labels"][:max_len]}


def _split(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise DataError(f"eval split of {n_eval} examples leaves none to train on ({len(examples)} examples)")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _preference_data(cfg: DataConfig, tokenizer, path: str, bundled: str | None, max_seq_length: int,
                     seed: int) -> PreparedData:
    rows = list(read_rows(path, format=cfg.format))
    if bundled == "preferences":
        rows = _preference_rows(rows)
    if cfg.max_examples is not None:
        rows = rows[: cfg.max_examples]
    if cfg.kind == "auto" and _detect_kind(rows[0][1]) != "preference":
        raise DataError(f"this objective needs chosen/rejected pairs, but {cfg.path} has no chosen/rejected columns",
                        available=sorted(rows[0][1]), hint="use columns prompt (or instruction), chosen, rejected")
    template = chat_template_for(tokenizer, cfg.chat_template)
    prompt = PromptTemplate(cfg.prompt_template or DEFAULT_PROMPT)
    counts = {"truncated": 0, "dropped": 0}
    pairs: list = []
    for loc, row in rows:
        for side in ("chosen", "rejected"):
            if side not in row:
                raise DataError(f"missing column {side!r}", location=loc, column=side, available=sorted(row))
        context = _messages(row["prompt"], loc) if "prompt" in row else \
            [{"role": "user", "content": prompt.format(row, loc)}]
        if cfg.system_prompt and context[0]["role"] != "system":
            context = [{"role": "system", "content": cfg.system_prompt}] + context
        pair = {}
        for side in ("chosen", "rejected"):
            reply = row[side]
            if not isinstance(reply, str):  # a conversation whose last turn is the answer
                reply = _messages(reply, loc)[-1]["content"]
            tok = tokenize_conversation(context + [{"role": "assistant", "content": reply}], tokenizer, template,
                                        train_on="responses", location=loc)
            pair[side] = _fit(tok, max_seq_length, cfg.overlong, counts)
        if pair["chosen"] is not None and pair["rejected"] is not None:
            pairs.append(pair)
    if not pairs:
        raise DataError("no pairs left after tokenisation", file=path,
                        hint=f"{counts['dropped']} were dropped as longer than max_seq_length={max_seq_length}")
    train, evals = _split(pairs, cfg.eval_fraction, seed)
    return PreparedData("preference", train, evals, counts["truncated"], counts["dropped"],
                        f"{len(pairs)} chosen/rejected pairs from {len(rows)} rows; truncated {counts['truncated']}, "
                        f"dropped {counts['dropped']}")


def prepare_data(cfg: DataConfig, tokenizer, max_seq_length: int, seed: int, objective: str) -> PreparedData:
    """Tokenised train/eval examples for `objective` (single sequences for sft/pretrain, pairs otherwise)."""
    path, bundled = resolve_source(cfg.path)
    if objective in ("reward", "dpo", "orpo"):
        return _preference_data(cfg, tokenizer, path, bundled, max_seq_length, seed)
    if cfg.kind == "preference" or bundled == "preferences":
        raise DataError(f"objective {objective} trains on single sequences, but {cfg.path} holds chosen/rejected pairs",
                        hint="set objective.type to dpo, orpo or reward")
    splits = build_dataset(path, tokenizer, kind=cfg.kind, chat_template=cfg.chat_template,
                           prompt_template=cfg.prompt_template, response_template=cfg.response_template,
                           system_prompt=cfg.system_prompt, train_on=cfg.train_on, max_seq_length=max_seq_length,
                           overlong=cfg.overlong, on_error=cfg.on_error, shuffle=cfg.shuffle, seed=seed,
                           eval_fraction=cfg.eval_fraction, max_rows=cfg.max_examples, format=cfg.format)
    st = splits.stats
    return PreparedData(splits.kind, list(splits.train), list(splits.eval), st.truncated, st.dropped_overlong,
                        st.summary())


def collate_pairs(pairs: list[dict], pad_token_id: int) -> dict:
    """2P right-padded rows: the chosen sequences, then the rejected ones."""
    return collate_padded([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_token_id)


def epoch_batches(examples: list, *, kind: str, batch_size: int, packing: bool, max_seq_length: int,
                  pad_token_id: int, seed: int, shuffle: bool = True) -> list[dict]:
    """All micro-batches of one epoch, in a fixed order (a function of `seed` only)."""
    if kind == "preference":
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed).shuffle(order)
        return [collate_pairs([examples[i] for i in order[s:s + batch_size]], pad_token_id)
                for s in range(0, len(order), batch_size)]
    return list(iter_batches(examples, batch_size=batch_size, packing=packing, max_seq_length=max_seq_length,
                             pad_token_id=pad_token_id, shuffle=shuffle, seed=seed))


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch, for tokens/s."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def count_targets(batch: dict, kind: str) -> tuple[int, int]:
    """(target tokens, pairs). For preference batches the tokens are the chosen responses' (ORPO's NLL term)."""
    labels = batch["labels"][:, 1:]
    if kind == "preference":
        half = labels.shape[0] // 2
        return int((labels[:half] != IGNORE_INDEX).sum()), half
    if "position_ids" in batch and "attention_mask" not in batch:  # packed: no target across a document start
        labels = labels.masked_fill(batch["position_ids"][:, 1:] == 0, IGNORE_INDEX)
    return int((labels != IGNORE_INDEX).sum()), 0


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
