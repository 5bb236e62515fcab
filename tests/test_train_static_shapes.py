"""Issue 12 on CPU: the model sees few static shapes over a run of ragged data, padding and packing change neither
the loss nor the gradients, compilation stays bounded, and the per-step metrics count real tokens."""
from __future__ import annotations

import json
import random

import pytest
import torch

from fasttune.data.packing import collate_packed_rows, collate_padded, length_buckets
from fasttune.models import load_model
from fasttune.train import TrainConfig, Trainer
from fasttune.train.data import host_batch
from fasttune.train.objectives import lm_loss
from test_train import make_small_model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("static_model"))


def ragged_data(path, rows=400, seed=0):
    rng = random.Random(seed)
    words = "the a model learns from data every step tokens of varied length pack into rows".split()
    with path.open("w") as f:
        for _ in range(rows):
            n = max(1, int(rng.lognormvariate(2.5, 0.9)))
            f.write(json.dumps({"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8))),
                                "output": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
    return path


def trainer_for(model_path, tmp_path, packing, steps=50, batch_size=2):
    cfg = TrainConfig.from_dict({
        "model": {"path": str(model_path), "max_seq_length": 128, "device": "cpu"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(ragged_data(tmp_path / "ragged.jsonl")), "packing": packing, "eval_fraction": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": steps, "batch_size": batch_size, "lr": 1e-3,
                  "progress": False, "plot": False, "save_every": None, "memory": "none"}})
    return Trainer(cfg)


@pytest.mark.parametrize("packing", [True, False])
def test_fifty_steps_of_ragged_data_see_a_handful_of_shapes(small_model, tmp_path, packing):
    trainer = trainer_for(small_model, tmp_path, packing)
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(tuple(args[0].shape)),
                                            with_kwargs=True)
    trainer.train()
    assert len(seen) == 50
    shapes = set(seen)
    if packing:
        assert shapes == {(2, 128)}
    else:
        assert {s[0] for s in shapes} == {2} and {s[1] for s in shapes} <= set(length_buckets(128))
        assert len(shapes) <= len(length_buckets(128)) == 3  # 64, 96, 128
    assert trainer._shapes == shapes
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 50 and all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in steps)
    # tokens count real tokens only: fewer than the slots, equal to the batch's documents
    assert all(0 < r["tokens"] <= 2 * max(s[1] for s in shapes) for r in steps)
    assert any(r["tokens"] < 2 * 128 for r in steps)
    assert "peak_memory_gib" not in steps[0]  # CUDA only


def _loss_and_grads(model, batch, n):
    model.zero_grad(set_to_none=True)
    loss, _ = lm_loss(model, host_batch(batch, pin=False), n)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 4000, (n,), generator=g).tolist()
        labels = [t if torch.rand((), generator=g) < 0.7 else -100 for t in ids]
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _alone(model, exs, n):
    """The reference: each document in a batch of its own, no padding, summed (same divisor n)."""
    total, grads = 0.0, {}
    for ex in exs:
        loss, g = _loss_and_grads(model, {"input_ids": torch.tensor([ex["input_ids"]]),
                                          "labels": torch.tensor([ex["labels"]])}, n)
        total = total + loss
        for k, v in g.items():
            grads[k] = grads.get(k, 0) + v
    return total, grads


def _close(a, b, rel=1e-6):
    """||a - b|| / ||b|| <= rel: fp32 summation order alone moves single elements by ~1e-6 of the largest one
    (measured up to 1.0e-6 for the tied embedding's gradient), the norm by far less."""
    return (a - b).norm() <= rel * b.norm().clamp_min(1e-12)


def test_rows_of_one_document_each_need_no_layout():
    """A packed batch whose every row is one document (e.g. truncated long examples) is plain causal attention: no
    position ids, no layout reach the model (which would otherwise re-derive the layout from the device)."""
    exs = _examples([16, 16], seed=3)
    batch = host_batch(collate_packed_rows([[exs[0]], [exs[1]]], row_length=16, num_rows=2), pin=False)
    assert "position_ids" not in batch and "documents" not in batch
    mixed = host_batch(collate_packed_rows([[exs[0]], [_examples([5])[0]]], row_length=16, num_rows=2), pin=False)
    assert mixed["documents"].cu_seqlens.tolist() == [0, 16, 21, 32]


def test_bucketed_and_row_padded_batches_equal_the_unpadded_documents(small_model):
    """Right padding to a bucket, plus padding rows, run without a mask: loss and every gradient equal (fp32,
    <= 1e-6 relative) the documents computed alone."""
    model = load_model(small_model, dtype="float32", device="cpu")
    model.requires_grad_(True)
    exs = _examples([5, 17, 30])
    n = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in exs)
    batch = collate_padded(exs, pad_token_id=0, length=48, num_rows=8)
    assert tuple(batch["input_ids"].shape) == (8, 48)
    loss, grads = _loss_and_grads(model, batch, n)
    ref_loss, ref_grads = _alone(model, exs, n)
    assert _close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert _close(grads[k], ref_grads[k]), k


def test_packed_rows_give_each_document_its_own_loss(small_model):
    """Documents packed into rows with padding documents: the loss and gradients equal each document alone."""
    model = load_model(small_model, dtype="float32", device="cpu")
    model.requires_grad_(True)
    exs = _examples([7, 20, 3, 31, 12], seed=1)
    n = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in exs)
    batch = collate_packed_rows([exs[:3], exs[3:]], row_length=48, num_rows=3)
    assert tuple(batch["input_ids"].shape) == (3, 48) and batch["real_tokens"] == 73
    loss, grads = _loss_and_grads(model, batch, n)
    ref_loss, ref_grads = _alone(model, exs, n)
    assert _close(loss, ref_loss)
    for k in grads:
        assert _close(grads[k], ref_grads[k]), k


def test_flex_compiles_once_per_shape_not_per_document_layout():
    """Where compilation is used (flex_attention, the soft-capping path on CUDA), new document layouts of one static
    shape do not recompile: dynamo's frame count stays where the first call left it."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch._dynamo.utils import counters

    from fasttune.kernels import attention as attn_mod
    from fasttune.kernels.attention import FALLBACKS, DocumentLayout

    FALLBACKS.reset()
    torch._dynamo.reset()
    attn_mod._COMPILED = None
    B, H, T, D = 2, 2, 128, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    rng = random.Random(0)
    frames = []
    for _ in range(4):
        pos = []
        for _ in range(B):
            row = []
            while len(row) < T:
                row += list(range(min(rng.randint(5, 60), T - len(row))))
            pos.append(row)
        layout = DocumentLayout.from_position_ids(torch.tensor(pos))
        out = attn_mod._flex(q, k, v, 0.25, None, layout, 30.0, {})
        if out is None:
            pytest.skip(f"flex_attention does not run on this CPU build: {FALLBACKS.failed.get('flex')}")
        frames.append(counters["stats"]["unique_graphs"])
    assert frames[-1] == frames[0], frames
    # the counter is live: a new shape does compile again (what unbucketed, unpacked lengths did every step)
    q2, k2, v2 = (x[:, :, :64].contiguous() for x in (q, k, v))
    attn_mod._flex(q2, k2, v2, 0.25, None, DocumentLayout.from_position_ids(torch.tensor([list(range(32)) * 2] * B)),
                   30.0, {})
    assert counters["stats"]["unique_graphs"] > frames[-1]
