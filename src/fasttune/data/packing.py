"""Batches for the trainer, in few static shapes: packed rows of exactly max_seq_length tokens, or length-grouped
right-padded batches whose length is one of a few buckets.

BATCH CONTRACT (the model and trainer rely on it):
  input_ids    (B, T) long
  labels       (B, T) long, -100 where masked, NOT shifted (the model shifts: logits[:, t] predicts labels[:, t+1])
  real_tokens  int: tokens of the examples (padding excluded), for tokens/s
  padded batches:  attention_mask (B, T) long 1/0, right padding; T is a length bucket (`length_buckets`) when
                   max_seq_length is given, and B is batch_size (rows of padding fill the last batch). Right
                   padding under a causal mask never reaches a real token, so the model may ignore the mask.
  packed batches:  B == batch_size rows of exactly max_seq_length tokens; position_ids (B, T) long restarting at 0
                   at every document start; no attention_mask. A row's unused tail is its own padding document
                   (positions from 0, labels -100), and rows without documents fill the last batch, so every
                   packed batch of a run has one shape. The attention dispatch keeps documents apart
                   (`DocumentLayout.from_position_ids`). Each document's labels[0] is -100, so no token is trained
                   to predict the first token of the next document.
Documents are placed into rows best-fit decreasing (longest first, each into the fullest row it fits), which fills
rows far better than packing them in order; the rows are then shuffled (seeded).
"""
from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..labels import IGNORE_INDEX, count_target_tokens
from .errors import DataError


def num_target_tokens(batch_or_labels) -> int:
    """Number of positions that contribute to the loss: labels[:, 1:] != -100 (after the model's shift)."""
    labels = batch_or_labels["labels"] if isinstance(batch_or_labels, dict) else batch_or_labels
    return count_target_tokens(labels)


def length_buckets(max_seq_length: int, smallest: int = 64) -> list[int]:
    """The padded lengths of unpacked batches: powers of two and 1.5x powers of two from `smallest`, then
    max_seq_length itself (at most ~2 per doubling: 11 shapes up to 2048, each padded at most 50%)."""
    out, n = [], smallest
    while n < max_seq_length:
        out.append(n)
        if n * 3 // 2 < max_seq_length:
            out.append(n * 3 // 2)
        n *= 2
    return out + [max_seq_length]


def bucket_length(n: int, max_seq_length: int) -> int:
    """The smallest bucket that holds n tokens (n <= max_seq_length)."""
    buckets = length_buckets(max_seq_length)
    return buckets[bisect.bisect_left(buckets, min(n, max_seq_length))]


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into rows of at most `row_length` tokens. Longest first,
    each document into the row with the least room that still fits it (ties: the earlier row), else a new row.
    Deterministic; every index appears exactly once; zero-length documents are left out."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row) of the rows with room, sorted
    for i in order:
        n = lengths[i]
        if n > row_length:
            raise DataError(f"example {i} has {n} tokens, more than max_seq_length={row_length}",
                            hint="build the dataset with the same max_seq_length so long examples are truncated or "
                                 "dropped")
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, r = room.pop(at)
        else:
            free, r = row_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, r))
    return rows


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
    real = sum(len(ex["input_ids"]) for ex in examples)
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
        "real_tokens": real,
    }


def collate_packed_rows(rows: Sequence[Sequence[dict]], row_length: int, num_rows: int | None = None,
                        pad_token_id: int = 0) -> dict:
    """(num_rows, row_length) packed batch (see the contract): each row's documents, then a padding document filling
    the row; rows beyond len(rows) are all padding."""
    num_rows = len(rows) if num_rows is None else num_rows
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {num_rows}")
    input_ids = torch.full((num_rows, row_length), pad_token_id, dtype=torch.long)
    labels = torch.full((num_rows, row_length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(row_length).repeat(num_rows, 1)
    real = 0
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex["input_ids"])
            if at + n > row_length:
                raise DataError(f"documents of {at + n} tokens do not fit a packed row of {row_length}")
            input_ids[r, at:at + n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            labels[r, at:at + n] = torch.tensor(ex["labels"], dtype=torch.long)
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(row_length - at)
        real += at
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "real_tokens": real}


def collate_padded(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None,
                   length: int | None = None, num_rows: int | None = None) -> dict:
    """Right-padded (B, T) batch with attention_mask; padding labels are -100. `length`: pad to exactly this many
    tokens (a bucket); `num_rows`: add rows of padding up to this many."""
    if not examples:
        raise DataError("cannot collate an empty batch")
    T = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    if length is not None:
        if length < T:
            raise ValueError(f"cannot pad {T} tokens to {length}")
        T = length
    B = max(len(examples), num_rows or 0)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "real_tokens": sum(len(ex["input_ids"]) for ex in examples)}


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


PACK_WINDOW = 4096  # documents packed together when streaming (a list is packed as a whole)


def _packed_batches(examples: Sequence[dict], row_length: int, rows_per_batch: int, pad_token_id: int,
                    rng: random.Random | None) -> Iterator[dict]:
    order = list(range(len(examples)))
    if rng is not None:  # equal lengths keep this order in the sort: which documents share a row varies by seed
        rng.shuffle(order)
    rows = [[examples[order[i]] for i in row]
            for row in pack_rows([len(examples[j]["input_ids"]) for j in order], row_length)]
    if rng is not None:
        rng.shuffle(rows)
    for s in range(0, len(rows), rows_per_batch):
        yield collate_packed_rows(rows[s:s + rows_per_batch], row_length, rows_per_batch, pad_token_id)


def iter_batches(examples: Sequence[dict] | Iterable[dict], *, batch_size: int = 8, packing: bool = False,
                 max_seq_length: int | None = None, max_tokens: int | None = None, pad_token_id: int = 0,
                 shuffle: bool = True, seed: int = 0, group_by_length: bool = True, drop_last: bool = False,
                 pad_to_multiple_of: int | None = None, static_rows: bool = True) -> Iterator[dict]:
    """Yield batches (see the contract above) from tokenised examples ({"input_ids", "labels"} lists).

    packing=True: `batch_size` rows of exactly `max_seq_length` (or `max_tokens`) tokens each, documents placed
    best-fit decreasing (a streaming iterable: within windows of PACK_WINDOW documents), rows shuffled.
    packing=False: up to `batch_size` rows (and at most `max_tokens` padded tokens if given), length-grouped, padded
    to a length bucket when max_seq_length is given (else to the longest, or `pad_to_multiple_of`); with
    static_rows, short batches get rows of padding up to batch_size (not with max_tokens).
    Pass seed=base_seed + epoch for a different, reproducible order each epoch. A list is shuffled here; a
    streaming iterable is used in its own (already shuffled) order.
    """
    if packing:
        row_length = max_seq_length or max_tokens
        if not row_length:
            raise DataError("packing needs max_seq_length (tokens per packed row)")
        rng = random.Random(seed) if shuffle else None
        if isinstance(examples, Sequence):
            yield from _packed_batches(examples, row_length, batch_size, pad_token_id, rng)
            return
        window: list[dict] = []
        for ex in examples:
            window.append(ex)
            if len(window) == PACK_WINDOW:
                yield from _packed_batches(window, row_length, batch_size, pad_token_id, rng)
                window = []
        if window:
            yield from _packed_batches(window, row_length, batch_size, pad_token_id, rng)
        return
    options = dict(batch_size=batch_size, max_seq_length=max_seq_length, max_tokens=max_tokens,
                   pad_token_id=pad_token_id, shuffle=shuffle, group_by_length=group_by_length, drop_last=drop_last,
                   pad_to_multiple_of=pad_to_multiple_of, static_rows=static_rows)
    if not isinstance(examples, Sequence):  # streaming: length-group within windows of batch_size * 50 examples
        window = []
        windows = 0
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
        length = None
        if max_seq_length and not pad_to_multiple_of:
            length = bucket_length(max(lengths[i] for i in b), max_seq_length)
        rows = batch_size if static_rows and not max_tokens else None
        yield collate_padded([examples[i] for i in b], pad_token_id, pad_to_multiple_of, length=length, num_rows=rows)
