"""Packing and batching: the batch contract, token conservation (hypothesis), length grouping, num_target_tokens."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fasttune.data import (DataCollator, DataError, collate_packed, collate_padded, iter_batches, length_grouped_batches,
                           num_target_tokens, pack_examples)


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
    assert set(b) == {"input_ids", "labels", "position_ids"}
    for k in b:
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
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert b["input_ids"].shape == (2, 5) and all(v.dtype == torch.long for v in b.values())
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]  # right padding
    assert b["input_ids"][0, 3:].tolist() == [2, 2] and b["labels"][0, 3:].tolist() == [-100, -100]
    assert b["input_ids"][1].tolist() == exs[1]["input_ids"] and b["labels"][1].tolist() == exs[1]["labels"]
    assert collate_padded(exs, 2, pad_to_multiple_of=4)["input_ids"].shape == (2, 8)
    assert DataCollator(2)(exs)["attention_mask"].shape == (2, 5)
    assert "position_ids" in DataCollator(2, packing=True)(exs)


def test_num_target_tokens_counts_after_the_shift():
    labels = torch.tensor([[7, -100, 3, 4], [-100, 5, -100, -100]])
    assert num_target_tokens(labels) == 3 and num_target_tokens({"labels": labels}) == 3


# ---- property: packing keeps every token exactly once and in order ----------------------------------------------
@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), max_len=st.integers(40, 128))
def test_property_packing_keeps_every_token_once_in_order(lengths, max_len):
    exs = make_examples(lengths)
    batches = list(iter_batches(exs, packing=True, max_seq_length=max_len, shuffle=False))
    ids = [t for b in batches for t in b["input_ids"][0].tolist()]
    labels = [t for b in batches for t in b["labels"][0].tolist()]
    assert ids == [t for ex in exs for t in ex["input_ids"]]
    assert labels == [t for ex in exs for t in ex["labels"]]
    for b in batches:
        T = b["input_ids"].shape[1]
        assert b["input_ids"].shape[0] == 1 and T <= max_len
        pos = b["position_ids"][0].tolist()
        assert pos[0] == 0 and all(p == q + 1 or p == 0 for q, p in zip(pos, pos[1:]))
    # every document starts a position run of exactly its own length
    runs = []
    for b in batches:
        for p in b["position_ids"][0].tolist():
            if p == 0:
                runs.append(0)
            runs[-1] += 1
    assert runs == lengths


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=40), bs=st.integers(1, 6), seed=st.integers(0, 3))
def test_property_padded_batches_cover_every_example_once(lengths, bs, seed):
    exs = make_examples(lengths)
    seen = []
    for b in iter_batches(exs, batch_size=bs, pad_token_id=0, seed=seed):
        assert b["input_ids"].shape[0] <= bs
        for row, mask, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            seen.append((tuple(row[:n].tolist()), tuple(lab[:n].tolist())))
    assert sorted(seen) == sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in exs)


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
    with pytest.raises(DataError, match="packing needs max_seq_length"):
        list(iter_batches(make_examples([2]), packing=True))


def test_packed_shuffle_is_seeded():
    exs = make_examples([5] * 20)
    first = lambda seed: next(iter_batches(exs, packing=True, max_seq_length=20, seed=seed))["input_ids"].tolist()
    assert first(1) == first(1) and first(1) != first(2)
