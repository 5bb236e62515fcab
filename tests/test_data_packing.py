"""Packing and batching: the batch contract, token conservation (hypothesis), length grouping, num_target_tokens."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttune.data import (DataCollator, DataError, bucket_length, collate_packed, collate_packed_rows, collate_padded,
                           iter_batches, length_buckets, length_grouped_batches, num_target_tokens, pack_examples,
                           pack_rows)


def make_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        labels = [t if torch.rand((), generator=g) < 0.6 else -100 for t in ids]
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_packed_batch_contract():
    exs = make_examples([3, 4, 2])
    b = collate_packed(exs)
    assert set(b) == {"input_ids", "labels", "position_ids", "real_tokens"} and b["real_tokens"] == 9
    for k in ("input_ids", "labels", "position_ids"):
        assert b[k].shape == (1, 9) and b[k].dtype == torch.long
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert all(b["labels"][0, s] == -100 for s in starts)  # never predict a document's first token across a boundary
    padded = collate_packed(exs, pad_to_multiple_of=8, pad_token_id=2)
    assert padded["input_ids"].shape == (1, 16) and padded["input_ids"][0, 9:].eq(2).all()
    assert padded["position_ids"][0, 9:].tolist() == list(range(7)) and padded["labels"][0, 9:].eq(-100).all()


def test_padded_batch_contract():
    exs = make_examples([3, 5])
    b = collate_padded(exs, pad_token_id=2)
    assert set(b) == {"input_ids", "labels", "attention_mask", "real_tokens"} and b["real_tokens"] == 8
    assert b["input_ids"].shape == (2, 5) and all(b[k].dtype == torch.long for k in ("input_ids", "labels",
                                                                                       "attention_mask"))
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]  # right padding
    assert b["input_ids"][0, 3:].tolist() == [2, 2] and b["labels"][0, 3:].tolist() == [-100, -100]
    assert b["input_ids"][1].tolist() == exs[1]["input_ids"] and b["labels"][1].tolist() == exs[1]["labels"]
    assert collate_padded(exs, 2, pad_to_multiple_of=4)["input_ids"].shape == (2, 8)
    assert DataCollator(2)(exs)["attention_mask"].shape == (2, 5)
    assert "position_ids" in DataCollator(2, packing=True)(exs)


def test_num_target_tokens_counts_after_the_shift():
    labels = torch.tensor([[7, -100, 3, 4], [-100, 5, -100, -100]])
    assert num_target_tokens(labels) == 3 and num_target_tokens({"labels": labels}) == 3


# ---- property: static packed batches keep every document exactly once ------------------------------------------
@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), max_len=st.integers(40, 128),
       rows=st.integers(1, 4), shuffle=st.booleans())
def test_property_packed_batches_have_one_shape_and_keep_every_document(lengths, max_len, rows, shuffle):
    exs = make_examples(lengths)  # ids are >= 5, so no example looks like padding (pad id 0)
    batches = list(iter_batches(exs, packing=True, batch_size=rows, max_seq_length=max_len, shuffle=shuffle))
    segments = []
    for b in batches:
        assert {tuple(b[k].shape) for k in ("input_ids", "labels", "position_ids")} == {(rows, max_len)}
        for r in range(rows):
            pos, ids, lab = (b[k][r].tolist() for k in ("position_ids", "input_ids", "labels"))
            assert pos[0] == 0 and all(p == q + 1 or p == 0 for q, p in zip(pos, pos[1:]))
            starts = [i for i, p in enumerate(pos) if p == 0] + [max_len]
            segments += [(tuple(ids[x:y]), tuple(lab[x:y])) for x, y in zip(starts[:-1], starts[1:])]
    padding = [d for d in segments if set(d[0]) == {0}]
    assert all(set(d[1]) == {-100} for d in padding)  # padding documents are never trained on
    real = sorted(d for d in segments if set(d[0]) != {0})
    assert real == sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in exs)  # each example once, whole
    assert sum(b["real_tokens"] for b in batches) == sum(lengths)


def test_pack_rows_best_fit_fills_rows():
    lengths = [int(x) for x in torch.randint(20, 600, (400,), generator=torch.Generator().manual_seed(1))]
    rows = pack_rows(lengths, 2048)
    assert sorted(i for r in rows for i in r) == list(range(400))
    assert all(sum(lengths[i] for i in r) <= 2048 for r in rows)
    in_order = len(list(pack_examples([{"input_ids": [0] * n} for n in lengths], 2048)))
    assert len(rows) < in_order  # fewer rows than packing in order
    assert sum(lengths) / (len(rows) * 2048) > 0.97
    with pytest.raises(DataError, match="more than max_seq_length=10"):
        pack_rows([5, 11], 10)


def test_length_buckets_are_few_and_padding_is_bounded():
    assert length_buckets(2048) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert length_buckets(100) == [64, 96, 100] and length_buckets(40) == [40]
    for n in range(1, 2049):
        b = bucket_length(n, 2048)
        assert n <= b and (b <= max(64, 1.5 * n))


def test_unpacked_batches_use_buckets_and_a_fixed_row_count():
    lengths = [int(x) for x in torch.randint(1, 300, (203,), generator=torch.Generator().manual_seed(2))]
    exs = make_examples(lengths)
    batches = list(iter_batches(exs, batch_size=8, max_seq_length=300, pad_token_id=0, seed=1))
    shapes = {tuple(b["input_ids"].shape) for b in batches}
    assert {s[0] for s in shapes} == {8} and {s[1] for s in shapes} <= set(length_buckets(300))
    assert sum(b["real_tokens"] for b in batches) == sum(lengths)
    last = [b for b in batches if int(b["attention_mask"].any(-1).sum()) < 8]
    assert len(last) == 1 and (last[0]["labels"][~last[0]["attention_mask"].bool()] == -100).all()


def test_shuffle_is_seeded_and_length_grouping_reduces_padding():
    lengths = [int(x) for x in torch.randint(1, 200, (400,), generator=torch.Generator().manual_seed(0))]
    a = length_grouped_batches(lengths, 8, seed=3)
    assert a == length_grouped_batches(lengths, 8, seed=3) and a != length_grouped_batches(lengths, 8, seed=4)
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)
    ungrouped = length_grouped_batches(lengths, 8, seed=3, group_by_length=False)
    assert padded(a) < 0.8 * padded(ungrouped)
    assert max(lengths[i] for i in a[0]) == max(lengths)  # the largest batch first: OOM shows at step one
    capped = length_grouped_batches(lengths, 64, seed=3, max_tokens=500)
    assert all(max(lengths[i] for i in b) * len(b) <= 500 for b in capped)
    assert sorted(i for b in capped for i in b) == list(range(400))


def test_packing_rejects_examples_longer_than_the_limit():
    with pytest.raises(DataError, match="more than max_seq_length=4"):
        list(pack_examples(make_examples([5]), 4))
    with pytest.raises(DataError, match="more than max_seq_length=4"):
        list(iter_batches(make_examples([5]), packing=True, max_seq_length=4))
    with pytest.raises(DataError, match="packing needs max_seq_length"):
        list(iter_batches(make_examples([2]), packing=True))


def test_packed_shuffle_is_seeded():
    exs = make_examples([5] * 20)
    first = lambda seed: next(iter_batches(exs, packing=True, batch_size=1, max_seq_length=20,  # noqa: E731
                                           seed=seed))["input_ids"].tolist()
    assert first(1) == first(1) and first(1) != first(2)
