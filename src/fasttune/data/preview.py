"""`fasttune data preview CONFIG`: the data of a training config as the model will see it, before any GPU time.

    - the first rows of the file, tokenised and templated exactly as training does, with the trained tokens (labels
      that are not -100) marked: wrapped in ⟦ ⟧ (or [[ ]] where the terminal cannot show those), coloured on a TTY;
    - the token-length distribution (min / median / p90 / p99 / max) and how many examples were truncated, dropped
      or skipped;
    - how the batches fill: the trainer's own batching (`iter_batches`, the config's batch_size, max_seq_length and
      seed) for the first epoch, as rows and the share of token slots holding real tokens.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from .packing import iter_batches, pack_rows
from ..labels import IGNORE_INDEX

if TYPE_CHECKING:
    from ..train.config import TrainConfig

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"
STREAMING_ROWS = 10_000  # a streaming config's data may not fit in memory: its statistics cover this many rows


def markers(stream: TextIO) -> tuple[str, str]:
    """⟦ ⟧ where the stream can encode them, else [[ ]] (an ASCII console)."""
    try:
        "⟦⟧".encode(getattr(stream, "encoding", None) or "ascii")
        return "⟦", "⟧"
    except (UnicodeEncodeError, LookupError):
        return "[[", "]]"


def render(tokenizer, input_ids: Sequence[int], labels: Sequence[int], mark: tuple[str, str] = ("⟦", "⟧"),
           color: bool = False) -> str:
    """The decoded text of one example with its trained spans marked. Spans are cut from the decoding of growing
    prefixes, so a tokenizer's spacing (SentencePiece's leading spaces, byte-level pieces) is rendered as in the
    whole text."""
    trained = [label != IGNORE_INDEX for label in labels]
    bounds = [0] + [i for i in range(1, len(trained)) if trained[i] != trained[i - 1]] + [len(trained)]
    out, done = [], ""
    for start, end in zip(bounds, bounds[1:]):
        text = tokenizer.decode(list(input_ids[:end]))
        piece = text[len(done):] if text.startswith(done) else tokenizer.decode(list(input_ids[start:end]))
        done = text
        if trained[start]:
            piece = f"{GREEN}{piece}{RESET}" if color else f"{mark[0]}{piece}{mark[1]}"
        out.append(piece)
    return "".join(out)


def percentile(sorted_values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def length_summary(lengths: Sequence[int]) -> dict[str, int]:
    values = sorted(lengths)
    return {"examples": len(values), "min": values[0], "median": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": values[-1]}


def batch_fill(examples: Sequence[dict], *, batch_size: int, max_seq_length: int, packing: bool, seed: int,
               shuffle: bool) -> dict[str, float]:
    """The first epoch's micro-batches as the trainer builds them: batches, rows, real tokens / token slots."""
    batches = rows = real = slots = 0
    for b in iter_batches(examples, batch_size=batch_size, packing=packing, max_seq_length=max_seq_length,
                          shuffle=shuffle, seed=seed):
        batches += 1
        rows += b["input_ids"].shape[0]
        real += int(b["real_tokens"]) if "real_tokens" in b else int(b["attention_mask"].sum())
        slots += b["input_ids"].numel()
    return {"batches": batches, "rows": rows, "real_tokens": real, "slots": slots,
            "fill": 100.0 * real / max(slots, 1)}


def packed_rows(lengths: Sequence[int], max_seq_length: int) -> int:
    """Rows of max_seq_length tokens that best-fit packing needs for these documents (before batch padding)."""
    return len(pack_rows(lengths, max_seq_length))


def preview(cfg: "TrainConfig", rows: int = 3, out: TextIO = sys.stdout, color: bool = False,
            max_rows: int | None = None) -> dict:
    """Print the preview of `cfg`'s data to `out`; returns the numbers printed (for tests and scripts).
    `max_rows`: read at most this many rows for the statistics (default: the config's data.max_examples; a
    streaming config: STREAMING_ROWS). Raises ConfigError, DataError or CheckpointError (the tokenizer's folder)."""
    from ..models import load_tokenizer
    from ..train.data import prepare_data
    from ..build import resolve_model_path

    from pathlib import Path

    from ..train.config import ConfigError

    d, m, t = cfg.data, cfg.model, cfg.train
    path = Path(resolve_model_path(m.path))
    if not path.exists():
        raise ConfigError(f"model.path {m.path} does not exist: set it to the base model's folder or .gguf file (its "
                          "tokenizer and chat template render the preview)")
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"model.path {m.path} holds no tokenizer (tokenizer.json or tokenizer.model): set it to "
                          "the base model's folder")
    tokenizer = load_tokenizer(path)
    seq, objective = m.max_seq_length, cfg.objective.type
    limit = max_rows or d.max_examples or (STREAMING_ROWS if d.streaming else None)
    note = f" (the first {limit:,} rows)" if limit and limit != d.max_examples else ""
    # the first rows, in file order; then every row as the run prepares them (its shuffle and eval split)
    grpo = cfg.objective.grpo
    head = prepare_data(dataclasses.replace(d, shuffle=False, eval_fraction=0.0, max_examples=rows, streaming=False),
                        tokenizer, seq, t.seed, objective, grpo=grpo).train if rows else []
    data = prepare_data(dataclasses.replace(d, max_examples=limit, streaming=False), tokenizer, seq, t.seed,
                        objective, grpo=grpo)
    mark = markers(out)
    say = lambda text="": print(text, file=out)  # noqa: E731

    say(f"data: {d.path} ({data.kind}; objective {objective}; model.max_seq_length {seq}; tokenizer of {m.path})")
    say("trained tokens (the loss is computed on them) are " +
        ("green" if color else f"between {mark[0]} and {mark[1]}") + "\n")
    for i, ex in enumerate(head[:rows]):
        if data.kind == "prompts":  # GRPO: the prompt as the model sees it; the completions are generated
            say(f"--- prompt {i + 1}: {len(ex['prompt_ids'])} tokens ---")
            say(tokenizer.decode(ex["prompt_ids"]))
            continue
        if data.kind == "unpaired":  # KTO: the label names the side
            sides = [("desirable" if ex["desirable"] else "undesirable", ex)]
        else:
            sides = [("chosen", ex["chosen"]), ("rejected", ex["rejected"])] if "chosen" in ex else [("", ex)]
        for side, s in sides:
            trained = sum(1 for x in s["labels"] if x != IGNORE_INDEX)
            say(f"--- row {i + 1}{' ' + side if side else ''}: {len(s['input_ids'])} tokens, {trained} trained ---")
            say(render(tokenizer, s["input_ids"], s["labels"], mark, color))
    say()

    if data.kind == "prompts":
        lengths = [len(ex["prompt_ids"]) for ex in data.train]
        unit = "prompts"
    elif data.kind == "preference":
        lengths = [max(len(p["chosen"]["input_ids"]), len(p["rejected"]["input_ids"])) for p in data.train + data.eval]
        unit = "pairs (longer side)"
    else:
        lengths = [len(ex["input_ids"]) for ex in data.train + data.eval]
        unit = "examples"
    stats = length_summary(lengths)
    say(f"token lengths of {stats['examples']:,} {unit}{note}: min {stats['min']}, median {stats['median']}, "
        f"p90 {stats['p90']}, p99 {stats['p99']}, max {stats['max']}")
    cap = grpo.max_prompt_length if data.kind == "prompts" else seq
    over = f"truncated to {cap}: {data.truncated:,}" if d.overlong == "truncate" else f"dropped (over {cap}): " \
                                                                                      f"{data.dropped:,}"
    say(f"{over}; skipped rows: {data.skipped:,}; nothing left to learn after truncation: {data.dropped_no_target:,}")
    result = {"lengths": stats, "truncated": data.truncated, "dropped": data.dropped, "skipped": data.skipped}

    if data.kind == "preference":
        say(f"batches: {t.batch_size} pairs per micro-batch, padded (pairs are not packed)")
        return result
    if data.kind == "prompts":
        say(f"batches: {t.batch_size} prompts per micro-batch, each with {grpo.num_generations} completions of up to "
            f"{grpo.max_new_tokens} tokens (prompts over objective.grpo.max_prompt_length={grpo.max_prompt_length} "
            "keep their last tokens)")
        return result
    if data.kind == "unpaired":
        good = sum(ex["desirable"] for ex in data.train + data.eval)
        say(f"batches: {t.batch_size} examples per micro-batch, padded; {good:,} desirable, "
            f"{len(data.train) + len(data.eval) - good:,} undesirable")
        return result
    fill = batch_fill(data.train, batch_size=t.batch_size, max_seq_length=seq, packing=d.packing, seed=t.seed,
                      shuffle=d.shuffle)
    result["batches"] = fill
    if d.packing:
        docs = packed_rows([len(ex["input_ids"]) for ex in data.train], seq)
        say(f"packing (data.packing: true): {len(data.train):,} training examples in {docs:,} rows of {seq} tokens, "
            f"{fill['batches']:,} micro-batches of {t.batch_size} rows per epoch; real tokens fill "
            f"{fill['fill']:.1f}% of the token slots")
    else:
        packed = batch_fill(data.train, batch_size=t.batch_size, max_seq_length=seq, packing=True, seed=t.seed,
                            shuffle=d.shuffle)
        result["packed"] = packed
        say(f"padded batches (data.packing: false): {fill['batches']:,} micro-batches of {t.batch_size} rows per "
            f"epoch; real tokens fill {fill['fill']:.1f}% of the token slots (data.packing: true would fill "
            f"{packed['fill']:.1f}% in {packed['batches']:,} micro-batches)")
    return result
