"""Batches for the trainer: padding-free packing or length-grouped padded batches.

BATCH CONTRACT (the model and trainer rely on it):
  input_ids  (B, T) long
  labels     (B, T) long, -100 where masked, NOT shifted (the model shifts: logits[:, t] predicts labels[:, t+1])
  padded batches:  attention_mask (B, T) long 1/0, right padding
  packed batches:  B == 1, position_ids (1, T) long restarting at 0 at every document start; no attention_mask.
                   The attention dispatch derives document boundaries from the restarts, so no token attends
                   across documents. Each document's labels[0] is -100, so no token is trained to predict the
                   first token of the next document.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

import torch

from .errors import DataError
from .tokenize import IGNORE_INDEX


def num_target_tokens(batch_or_labels) -> int:
    """Number of positions that contribute to the loss: labels[:, 1:] != -100 (after the model's shift)."""
    labels = batch_or_labels["labels"] if isinstance(batch_or_labels, dict) else batch_or_labels
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def pack_examples(examples: Iterable[dict], max_seq_length: int) -> Iterator[list[dict]]:
    """Group consecutive examples (in order) into packs of at most `max_seq_length` tokens."""
    pack: list[dict] = []
    used = 0
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_seq_length:
            raise DataError(f"example {i} has {n} tokens, more than max_seq_length={max_seq_length}",
                            hint="build the dataset with the same max_seq_length so long examples are truncated or dropped")
        if n == 0:
            continue
        if used + n > max_seq_length and pack:
            yield pack
            pack, used = [], 0
        pack.append(ex)
        used += n
    if pack:
        yield pack


def collate_packed(examples: Sequence[dict], pad_to_multiple_of: int | None = None, pad_token_id: int = 0) -> dict:
    """Concatenate documents into one row (B=1) with per-document position ids. Optional padding at the end is
    its own document (positions from 0, labels -100), so real tokens never attend to it."""
    input_ids, labels, positions = [], [], []
    for ex in examples:
        n = len(ex["input_ids"])
        input_ids.extend(ex["input_ids"])
        labels.extend(ex["labels"])
        positions.extend(range(n))
    if pad_to_multiple_of and len(input_ids) % pad_to_multiple_of:
        pad = pad_to_multiple_of - len(input_ids) % pad_to_multiple_of
        input_ids.extend([pad_token_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        positions.extend(range(pad))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def collate_padded(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-padded (B, T) batch with attention_mask; padding labels are -100."""
    if not examples:
        raise DataError("cannot collate an empty batch")
    T = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class DataCollator:
    """Callable for torch DataLoader(collate_fn=...): a list of examples -> one batch (packed: all into one row)."""

    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.packing, self.pad_to_multiple_of = pad_token_id, packing, pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict:
        if self.packing:
            return collate_packed(examples, self.pad_to_multiple_of, self.pad_token_id)
        return collate_padded(examples, self.pad_token_id, self.pad_to_multiple_of)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, max_tokens: int | None = None,
                           megabatch_factor: int = 50, group_by_length: bool = True) -> list[list[int]]:
    """Seeded shuffle, then within megabatches of batch_size*factor sort by length so batches hold similar lengths
    (little padding). Batches hold at most batch_size rows and, if max_tokens is set, at most max_tokens padded
    tokens. The longest batch comes first so an out-of-memory shows at step one."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = max(1, batch_size * megabatch_factor) if group_by_length else max(1, batch_size)
    batches: list[list[int]] = []
    for m in range(0, len(order), mega):
        chunk = order[m:m + mega]
        if group_by_length:
            chunk.sort(key=lambda i: -lengths[i])
        current: list[int] = []
        longest = 0
        for i in chunk:
            grown = max(longest, lengths[i])
            if current and (len(current) >= batch_size or (max_tokens and grown * (len(current) + 1) > max_tokens)):
                batches.append(current)
                current, grown = [], lengths[i]
            current.append(i)
            longest = grown
        if current:
            batches.append(current)
    if group_by_length and len(batches) > 1:
        first = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
        rest = batches[:first] + batches[first + 1:]
        rng.shuffle(rest)
        batches = [batches[first]] + rest
    return batches


def iter_batches(examples: Sequence[dict] | Iterable[dict], *, batch_size: int = 8, packing: bool = False,
                 max_seq_length: int | None = None, max_tokens: int | None = None, pad_token_id: int = 0,
                 shuffle: bool = True, seed: int = 0, group_by_length: bool = True, drop_last: bool = False,
                 pad_to_multiple_of: int | None = None) -> Iterator[dict]:
    """Yield batches (see the contract above) from tokenised examples ({"input_ids", "labels"} lists).

    packing=True: one row per batch holding up to `max_seq_length` (or `max_tokens`) tokens; batch_size is unused.
    packing=False: up to `batch_size` rows (and at most `max_tokens` padded tokens if given), length-grouped.
    Pass seed=base_seed + epoch for a different, reproducible order each epoch. A list is shuffled here; a
    streaming iterable is used in its own (already shuffled) order.
    """
    if packing:
        limit = max_seq_length or max_tokens
        if not limit:
            raise DataError("packing needs max_seq_length (tokens per packed row)")
        if isinstance(examples, Sequence):
            order = list(range(len(examples)))
            if shuffle:
                random.Random(seed).shuffle(order)
            stream: Iterable[dict] = (examples[i] for i in order)
        else:
            stream = examples
        for pack in pack_examples(stream, limit):
            yield collate_packed(pack, pad_to_multiple_of, pad_token_id)
        return
    if not isinstance(examples, Sequence):  # streaming: length-group within windows of batch_size * 50 examples
        window: list[dict] = []
        windows = 0
        options = dict(batch_size=batch_size, max_tokens=max_tokens, pad_token_id=pad_token_id, shuffle=shuffle,
                       group_by_length=group_by_length, drop_last=drop_last, pad_to_multiple_of=pad_to_multiple_of)
        for ex in examples:
            window.append(ex)
            if len(window) == batch_size * 50:
                yield from iter_batches(window, seed=seed * 1_000_003 + windows, **options)
                window, windows = [], windows + 1
        if window:
            yield from iter_batches(window, seed=seed * 1_000_003 + windows, **options)
        return
    lengths = [len(ex["input_ids"]) for ex in examples]
    if shuffle:
        batches = length_grouped_batches(lengths, batch_size, seed, max_tokens, group_by_length=group_by_length)
    else:
        batches = [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
    for b in batches:
        if drop_last and len(b) < batch_size and not max_tokens:
            continue
        yield collate_padded([examples[i] for i in b], pad_token_id, pad_to_multiple_of)
