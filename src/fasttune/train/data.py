"""From a `DataConfig` to tokenised train/eval examples and a deterministic, resumable stream of micro-batches.

Reading, prompt templates, conversations, chat templates, masking and packing are `fasttune.data`'s; this file
only decides which of them a config asks for, splits train/eval, and fixes the order: epoch e's batches are a
pure function of (examples, seed + e), so a run resumed at (epoch, batch index) sees exactly the batches an
uninterrupted run would.

`bundled:preferences` is built from the bundled instructions: chosen = the example's own answer, rejected = the
answer of another example (a deterministic derangement) — a real, if easy, preference signal for demos and tests.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..data.chat_templates import chat_template_for
from ..data.conversations import find_conversation_column, standardize_conversation
from ..data.dataset import DataStats, build_dataset, examples_from_rows
from ..data.errors import DataError
from ..data.packing import bucket_length, collate_padded, iter_batches
from ..kernels.attention import DocumentLayout
from ..data.readers import read_rows
from ..data.template import PromptTemplate
from ..data.tokenize import tokenize_conversation
from ..labels import IGNORE_INDEX, count_target_tokens, next_token_targets
from .config import DataConfig

BUNDLED = {"instructions": "instructions.jsonl", "conversations": "conversations.jsonl", "corpus": "corpus.txt",
           "preferences": "instructions.jsonl"}
DEFAULT_PROMPT = "{instruction}[[\n\n{input}]]"
log = logging.getLogger("fasttune.data")


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
    truncated: int = 0  # examples (pairs, for preference data) cut to max_seq_length
    dropped: int = 0  # examples (pairs) over max_seq_length dropped with overlong: drop
    summary: str = ""
    skipped: int = 0  # bad rows skipped with on_error: skip
    skip_reasons: list = field(default_factory=list)  # the first few, verbatim
    dropped_no_target: int = 0  # examples (pairs) with nothing left to learn from after truncation
    streaming: bool = False  # train is a StreamingExamples (re-read and tokenised on each pass), not a list


def _split(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise DataError(f"eval split of {n_eval} examples leaves none to train on ({len(examples)} examples)")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _pair_summary(st: DataStats, max_seq_length: int) -> str:
    """Like DataStats.summary, but in pairs: every count below is of pairs (a pair counts once, whichever side)."""
    s = f"{st.examples} chosen/rejected pairs from {st.rows_read} rows"
    if st.skipped_rows:
        s += f"; skipped {st.skipped_rows} bad rows (on_error: skip)"
    if st.truncated:
        s += f"; truncated {st.truncated} pairs to max_seq_length={max_seq_length}"
    if st.dropped_overlong:
        s += f"; dropped {st.dropped_overlong} pairs longer than max_seq_length={max_seq_length}"
    if st.dropped_no_target:
        s += (f"; dropped {st.dropped_no_target} pairs with no response tokens left after truncation to "
              f"max_seq_length={max_seq_length}")
    return s


def _pair(cfg: DataConfig, tokenizer, template, prompt: PromptTemplate, loc, row: dict) -> dict:
    """One row -> {"chosen", "rejected"} tokenised (untruncated); DataError (with the row's location) if bad."""
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
        pair[side] = tokenize_conversation(context + [{"role": "assistant", "content": reply}], tokenizer, template,
                                           train_on="responses", location=loc)
    return pair


def _fit_pair(pair: dict, max_len: int, mode: str, st: DataStats) -> dict | None:
    """Apply the length policy to both sides; counts are per pair. None if the pair is dropped."""
    if any(len(pair[side]["input_ids"]) > max_len for side in ("chosen", "rejected")):
        if mode == "drop":
            st.dropped_overlong += 1
            return None
        st.truncated += 1
        pair = {side: {"input_ids": ex["input_ids"][:max_len], "labels": ex["labels"][:max_len]}
                for side, ex in pair.items()}
    targets = [count_target_tokens(pair[side]["labels"]) for side in ("chosen", "rejected")]
    if min(targets) == 0:  # a side with no response token left: nothing to compare
        st.dropped_no_target += 1
        return None
    st.examples += 1
    st.tokens += sum(len(pair[side]["input_ids"]) for side in ("chosen", "rejected"))
    st.target_tokens += sum(targets)
    return pair


class _PairPipeline:
    """Rows -> chosen/rejected pairs, as the dataset loop (data.dataset.examples_from_rows) takes a pipeline."""

    def __init__(self, cfg: DataConfig, tokenizer, max_seq_length: int):
        self.cfg, self.tokenizer, self.max_seq_length = cfg, tokenizer, max_seq_length
        self.template = chat_template_for(tokenizer, cfg.chat_template)
        self.prompt = PromptTemplate(cfg.prompt_template or DEFAULT_PROMPT)
        self.seen_pair_columns = False  # whether any row had a chosen or rejected column

    def example(self, loc, row: dict) -> dict:
        cfg = self.cfg
        has_pair_columns = "chosen" in row or "rejected" in row
        if cfg.kind == "auto" and not self.seen_pair_columns and not has_pair_columns and cfg.on_error != "skip":
            raise DataError(f"this objective needs chosen/rejected pairs, but {cfg.path} has no chosen/rejected "
                            f"columns", location=loc, available=sorted(row),
                            hint="use columns prompt (or instruction), chosen, rejected")
        self.seen_pair_columns = self.seen_pair_columns or has_pair_columns
        return _pair(cfg, self.tokenizer, self.template, self.prompt, loc, row)

    def apply_length_policy(self, pair: dict, stats: DataStats) -> dict | None:
        return _fit_pair(pair, self.max_seq_length, self.cfg.overlong, stats)


def _preference_data(cfg: DataConfig, tokenizer, path: str, bundled: str | None, max_seq_length: int,
                     seed: int) -> PreparedData:
    st = DataStats()
    limits = dict(format=cfg.format, encoding=cfg.encoding, max_line_bytes=cfg.max_line_bytes,
                  max_field_chars=cfg.max_field_chars,
                  on_bad_row=st.skip if cfg.on_error == "skip" else None)
    if bundled == "preferences":  # the derangement needs every row; the bundled file is small
        rows = iter(_preference_rows(list(read_rows(path, **limits))))
    else:
        rows = read_rows(path, **limits)  # streamed: each row is read, tokenised and let go
    pipeline = _PairPipeline(cfg, tokenizer, max_seq_length)
    pairs = [pair for _, pair in examples_from_rows(rows, pipeline, st, cfg.on_error, cfg.max_examples)]
    summary = _pair_summary(st, max_seq_length)
    if not pairs:
        if cfg.kind == "auto" and not pipeline.seen_pair_columns:
            raise DataError(f"this objective needs chosen/rejected pairs, but {cfg.path} has no chosen/rejected "
                            f"columns", file=path, hint="use columns prompt (or instruction), chosen, rejected")
        raise DataError(f"no usable pairs ({summary})", file=path,
                        hint="; ".join(st.skip_reasons[:1]) or "check max_seq_length and the data")
    if st.skipped_rows or st.truncated or st.dropped_overlong or st.dropped_no_target:
        log.warning("data: %s%s", summary, f" (first skipped: {st.skip_reasons[0]})" if st.skip_reasons else "")
    train, evals = _split(pairs, cfg.eval_fraction, seed)
    return PreparedData("preference", train, evals, st.truncated, st.dropped_overlong, summary,
                        skipped=st.skipped_rows, skip_reasons=list(st.skip_reasons),
                        dropped_no_target=st.dropped_no_target)


def _kto_label(value, loc) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"label {value!r:.40} is not true/false (or 1/0): KTO's label says whether the completion is "
                    "desirable", location=loc, column="label")


def _unpaired_examples(cfg: DataConfig, tokenizer, template, prompt: PromptTemplate, loc, row: dict) -> list[dict]:
    """KTO rows: prompt + completion + label (true: desirable), or a chosen/rejected pair (chosen desirable,
    rejected undesirable); each becomes {"input_ids", "labels", "desirable"}."""
    if "chosen" in row and "rejected" in row:
        items = [(row["chosen"], True), (row["rejected"], False)]
    else:
        column = next((c for c in ("completion", "response", "output") if c in row), None)
        if column is None or "label" not in row:
            raise DataError("KTO needs a completion column (completion, response or output) and a label column "
                            "(true: desirable, false: undesirable), or chosen/rejected pairs", location=loc,
                            available=sorted(row))
        items = [(row[column], _kto_label(row["label"], loc))]
    context = _messages(row["prompt"], loc) if "prompt" in row else \
        [{"role": "user", "content": prompt.format(row, loc)}]
    if cfg.system_prompt and context[0]["role"] != "system":
        context = [{"role": "system", "content": cfg.system_prompt}] + context
    out = []
    for reply, good in items:
        if not isinstance(reply, str):
            reply = _messages(reply, loc)[-1]["content"]
        ex = tokenize_conversation(context + [{"role": "assistant", "content": reply}], tokenizer, template,
                                   train_on="responses", location=loc)
        out.append({"input_ids": ex["input_ids"], "labels": ex["labels"], "desirable": good})
    return out


def _unpaired_data(cfg: DataConfig, tokenizer, path: str, bundled: str | None, max_seq_length: int,
                   seed: int) -> PreparedData:
    st = DataStats()
    limits = dict(format=cfg.format, encoding=cfg.encoding, max_line_bytes=cfg.max_line_bytes,
                  max_field_chars=cfg.max_field_chars, on_bad_row=st.skip if cfg.on_error == "skip" else None)
    rows = iter(_preference_rows(list(read_rows(path, **limits)))) if bundled == "preferences" else \
        read_rows(path, **limits)
    template = chat_template_for(tokenizer, cfg.chat_template)
    prompt = PromptTemplate(cfg.prompt_template or DEFAULT_PROMPT)
    examples = []
    for index, (loc, row) in enumerate(rows):
        if cfg.max_examples is not None and index >= cfg.max_examples:
            break
        st.rows_read += 1
        try:
            made = _unpaired_examples(cfg, tokenizer, template, prompt, loc, row)
        except DataError as e:
            if cfg.on_error != "skip" or (e.file is None and e.line is None and e.row is None):
                raise
            st.skip(e)
            continue
        for ex in made:
            if len(ex["input_ids"]) > max_seq_length:
                if cfg.overlong == "drop":
                    st.dropped_overlong += 1
                    continue
                st.truncated += 1
                ex = {**ex, "input_ids": ex["input_ids"][:max_seq_length], "labels": ex["labels"][:max_seq_length]}
            targets = count_target_tokens(ex["labels"])
            if targets == 0:
                st.dropped_no_target += 1
                continue
            st.examples += 1
            st.tokens += len(ex["input_ids"])
            st.target_tokens += targets
            examples.append(ex)
    if not examples:
        raise DataError(f"no usable KTO examples ({st.summary()})", file=path,
                        hint="; ".join(st.skip_reasons[:1]) or "check max_seq_length and the data")
    good = sum(ex["desirable"] for ex in examples)
    summary = st.summary() + f"; {good} desirable, {len(examples) - good} undesirable"
    train, evals = _split(examples, cfg.eval_fraction, seed)
    return PreparedData("unpaired", train, evals, st.truncated, st.dropped_overlong, summary,
                        skipped=st.skipped_rows, skip_reasons=list(st.skip_reasons),
                        dropped_no_target=st.dropped_no_target)


def _mismatched(example: dict, other: dict, max_seq_length: int) -> dict:
    """`example`'s prompt with `other`'s response (KTO's KL estimate): the prompt is the part before the first
    target token."""
    def split(ex):
        k = next(i for i, x in enumerate(ex["labels"]) if x != IGNORE_INDEX)
        return ex["input_ids"][:k], ex["input_ids"][k:], ex["labels"][k:]
    prompt, _, _ = split(example)
    _, ids, labels = split(other)
    n = max_seq_length
    return {"input_ids": (prompt + ids)[:n], "labels": ([IGNORE_INDEX] * len(prompt) + labels)[:n]}


def collate_unpaired(examples: list[dict], mismatched: list[dict], pad_token_id: int, max_seq_length: int) -> dict:
    """KTO's batch: the rows (right-padded to a length bucket), `desirable` (B,), and the mismatched rows for the
    reference point as kl_input_ids / kl_labels."""
    plain = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    batch = collate_padded(plain, pad_token_id, length=bucket_length(max(len(r["input_ids"]) for r in plain),
                                                                     max_seq_length))
    kl = collate_padded(mismatched, pad_token_id, length=bucket_length(
        max(len(r["input_ids"]) for r in mismatched), max_seq_length))
    batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
    batch["kl_input_ids"], batch["kl_labels"] = kl["input_ids"], kl["labels"]
    return batch


def prepare_data(cfg: DataConfig, tokenizer, max_seq_length: int, seed: int, objective: str,
                 grpo=None) -> PreparedData:
    """Tokenised train/eval examples for `objective` (single sequences for sft/pretrain, pairs for reward / dpo /
    orpo / simpo, labelled single responses for kto, prompts for grpo — `grpo` is its config section)."""
    path, bundled = resolve_source(cfg.path)
    if objective in ("reward", "dpo", "orpo", "simpo"):
        return _preference_data(cfg, tokenizer, path, bundled, max_seq_length, seed)
    if objective == "kto":
        return _unpaired_data(cfg, tokenizer, path, bundled, max_seq_length, seed)
    if objective == "grpo":
        from .grpo import prepare_prompts

        return prepare_prompts(cfg, tokenizer, grpo.max_prompt_length, seed, grpo.prompt_format)
    if cfg.kind == "preference" or bundled == "preferences":
        raise DataError(f"objective {objective} trains on single sequences, but {cfg.path} holds chosen/rejected pairs",
                        hint="set objective.type to dpo, orpo or reward")
    splits = build_dataset(path, tokenizer, kind=cfg.kind, chat_template=cfg.chat_template,
                           prompt_template=cfg.prompt_template, response_template=cfg.response_template,
                           system_prompt=cfg.system_prompt, train_on=cfg.train_on, max_seq_length=max_seq_length,
                           overlong=cfg.overlong, on_error=cfg.on_error, shuffle=cfg.shuffle, seed=seed,
                           eval_fraction=cfg.eval_fraction, max_rows=cfg.max_examples, format=cfg.format,
                           streaming=cfg.streaming, shuffle_buffer=cfg.shuffle_buffer,
                           encoding=cfg.encoding, max_line_bytes=cfg.max_line_bytes,
                           max_field_chars=cfg.max_field_chars)
    st = splits.stats
    if cfg.streaming:  # counts fill in as the stream is read; each pass reports what it cut, dropped or skipped
        return PreparedData(splits.kind, splits.train, list(splits.eval),
                            summary="streamed: tokenised pass by pass, counts reported after each pass",
                            streaming=True)
    return PreparedData(splits.kind, list(splits.train), list(splits.eval), st.truncated, st.dropped_overlong,
                        st.summary(), skipped=st.skipped_rows, skip_reasons=list(st.skip_reasons),
                        dropped_no_target=st.dropped_no_target)


def collate_pairs(pairs: list[dict], pad_token_id: int, max_seq_length: int | None = None) -> dict:
    """2P right-padded rows: the chosen sequences, then the rejected ones; padded to a length bucket when
    max_seq_length is given (few shapes over a run). Rows are not padded up: every row is a real pair."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    length = bucket_length(max(len(r["input_ids"]) for r in rows), max_seq_length) if max_seq_length else None
    return collate_padded(rows, pad_token_id, length=length)


def epoch_batches(examples, *, kind: str, batch_size: int, packing: bool, max_seq_length: int,
                  pad_token_id: int, seed: int, shuffle: bool = True) -> list[dict]:
    """All micro-batches of one epoch, in a fixed order (a function of `seed` only)."""
    if kind == "prompts":
        from .grpo import prompt_batches

        return prompt_batches(examples, batch_size, pad_token_id, seed, shuffle)
    if kind == "unpaired":  # each example's mismatched partner is the next example in the epoch's order
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed).shuffle(order)
        partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
        return [collate_unpaired([examples[i] for i in order[s:s + batch_size]],
                                 [_mismatched(examples[i], examples[partner[i]], max_seq_length)
                                  for i in order[s:s + batch_size]], pad_token_id, max_seq_length)
                for s in range(0, len(order), batch_size)]
    if kind == "preference":
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed).shuffle(order)
        return [collate_pairs([examples[i] for i in order[s:s + batch_size]], pad_token_id, max_seq_length)
                for s in range(0, len(order), batch_size)]
    return list(iter_batches(examples, batch_size=batch_size, packing=packing, max_seq_length=max_seq_length,
                             pad_token_id=pad_token_id, shuffle=shuffle, seed=seed))


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch, for tokens/s."""
    if "real_tokens" in batch:
        return int(batch["real_tokens"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def batch_shape(batch: dict) -> tuple[int, int]:
    return tuple(batch["input_ids"].shape)


def count_targets(batch: dict, kind: str) -> tuple[int, int]:
    """(target tokens, pairs). For preference batches the tokens are the chosen responses' (ORPO's NLL term)."""
    if kind == "unpaired":  # KTO: every row is an example
        return int((next_token_targets(batch["labels"]) != IGNORE_INDEX).sum()), batch["labels"].shape[0]
    if kind == "preference":
        half = batch["labels"].shape[0] // 2
        return int((next_token_targets(batch["labels"][:half]) != IGNORE_INDEX).sum()), half
    packed = "position_ids" in batch and "attention_mask" not in batch  # no target across a document start
    targets = next_token_targets(batch["labels"], batch["position_ids"] if packed else None)
    return int((targets != IGNORE_INDEX).sum()), 0


def host_batch(batch: dict, pin: bool) -> dict:
    """What the model reads, prepared on the host: the packed document layout (from the CPU position ids, so the
    GPU never reports it) and, for a CUDA run, the tensors in pinned memory so the copies do not block."""
    out = dict(batch)
    if "position_ids" in batch and "attention_mask" not in batch:
        out["documents"] = DocumentLayout.from_position_ids(batch["position_ids"])
        if out["documents"] is None:  # one document per row: its positions are 0..T-1, plain causal attention
            del out["position_ids"], out["documents"]
    if pin:
        out = {k: (v.pin_memory() if isinstance(v, (torch.Tensor, DocumentLayout)) and v is not None else v)
               for k, v in out.items()}
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and the document layout) to `device` without blocking the host; other entries as they are."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, DocumentLayout)) else v)
            for k, v in batch.items()}
