"""KTO (unpaired desirable / undesirable) and SimPO (reference-free, length-normalised) against float64
implementations of their formulas (objectives.py's docstring), their data handling, and short runs that learn."""
import json

import pytest
import torch
import torch.nn.functional as F

from fasttune.adapters import disable_adapters
from fasttune.train import Trainer
from fasttune.train.config import ConfigError, TrainConfig
from fasttune.train.objectives import kto_loss, simpo_loss
from test_train import _direct_logprobs, _pairs_batch, config, make_small_model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("kto_model"))


def _perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def test_simpo_matches_its_formula_in_float64(small_model, tmp_path):
    trainer = Trainer(config(small_model, tmp_path, objective={"type": "simpo", "beta": 2.0, "simpo_gamma": 0.7},
                             data={"path": "bundled:preferences"}))
    model = trainer.model
    _perturb_adapters(model)
    batch = _pairs_batch(trainer, 3)
    direct = _direct_logprobs(model, batch)  # float64 sums over the responses
    n = (batch["labels"][:, 1:] != -100).sum(-1).double()
    a = direct / n
    beta, gamma = 2.0, 0.7
    expected = -F.logsigmoid(beta * (a[:3] - a[3:]) - gamma).sum() / 5  # 5 pairs in the whole step
    loss, m = simpo_loss(model, batch, 5, beta, gamma)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    margin = beta * (a[:3] - a[3:])
    assert float(m["reward_margin"]) == pytest.approx(margin.sum().item(), rel=1e-3, abs=1e-5)
    assert float(m["reward_accuracy"]) == int((margin > 0).sum())
    # gradient: d/dtheta of the float64 expression equals the loss's (through one trainable tensor)
    p = next(p for name, p in model.named_parameters() if "lora_A" in name)
    (g,) = torch.autograd.grad(loss, [p])
    direct = _direct_logprobs(model, batch)
    a = direct / n
    (want,) = torch.autograd.grad(-F.logsigmoid(beta * (a[:3] - a[3:]) - gamma).sum() / 5, [p])
    torch.testing.assert_close(g.double(), want.double(), rtol=1e-3, atol=1e-6)


def test_kto_matches_its_formula_in_float64(small_model, tmp_path):
    trainer = Trainer(config(small_model, tmp_path, objective={"type": "kto", "beta": 0.3,
                                                               "kto_desirable_weight": 1.5,
                                                               "kto_undesirable_weight": 0.8},
                             data={"path": "bundled:preferences"}, train={"batch_size": 4}))
    assert trainer.data.kind == "unpaired"
    good = sum(e["desirable"] for e in trainer.data.train)
    assert 0 < good < len(trainer.data.train)  # chosen -> desirable, rejected -> undesirable
    model = trainer.model
    _perturb_adapters(model)
    batch = trainer._epoch(0)[0]
    assert batch["input_ids"].shape[0] == 4 and batch["kl_input_ids"].shape[0] == 4
    kl_batch = {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"],
                "attention_mask": torch.ones_like(batch["kl_labels"])}
    plain = {"input_ids": batch["input_ids"], "labels": batch["labels"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        with disable_adapters(model):
            ref = _direct_logprobs(model, plain)
            ref_kl = _direct_logprobs(model, kl_batch)
        pol_kl = _direct_logprobs(model, kl_batch)
    z0 = (pol_kl - ref_kl).mean().clamp(min=0)
    beta, ld, lu = 0.3, 1.5, 0.8

    def formula():
        r = _direct_logprobs(model, plain) - ref
        d = batch["desirable"]
        return torch.where(d, ld * (1 - torch.sigmoid(beta * (r - z0))), lu * (1 - torch.sigmoid(beta * (z0 - r))))

    expected = formula().sum() / 7  # 7 examples in the whole step
    loss, m = kto_loss(model, batch, 7, beta, ld, lu, lambda: disable_adapters(model))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert float(m["kto_kl"]) == pytest.approx(4 * z0.item(), rel=1e-3, abs=1e-6)
    with torch.no_grad():
        r = _direct_logprobs(model, plain) - ref
    assert float(m["reward_accuracy"]) == int(torch.where(batch["desirable"], r > z0, r < z0).sum())
    p = next(p for name, p in model.named_parameters() if "lora_A" in name)
    (g,) = torch.autograd.grad(loss, [p])
    (want,) = torch.autograd.grad(formula().sum() / 7, [p])
    torch.testing.assert_close(g.double(), want.double(), rtol=1e-3, atol=1e-6)


def test_kto_mismatched_rows_pair_each_prompt_with_another_response(small_model, tmp_path):
    trainer = Trainer(config(small_model, tmp_path, objective={"type": "kto"},
                             data={"path": "bundled:preferences"}, train={"batch_size": 2}))
    batch = trainer._epoch(0)[0]
    for i in range(2):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        kl_ids, kl_labels = batch["kl_input_ids"][i], batch["kl_labels"][i]
        k = int((labels != -100).nonzero()[0])
        assert torch.equal(kl_ids[:k], ids[:k]) and (kl_labels[:k] == -100).all()  # the same prompt
        assert (kl_labels != -100).any()


def test_kto_reads_a_label_column_and_refuses_a_bad_one(small_model, tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(6)]
    f = tmp_path / "kto.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    trainer = Trainer(config(small_model, tmp_path / "run", objective={"type": "kto"},
                             data={"path": str(f), "eval_fraction": 0.0}, train={"batch_size": 2}))
    assert sorted(e["desirable"] for e in trainer.data.train) == [False] * 3 + [True] * 3
    f.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "maybe"}))
    from fasttune.data.errors import DataError

    with pytest.raises(DataError, match="not true/false"):
        Trainer(config(small_model, tmp_path / "run2", objective={"type": "kto"}, data={"path": str(f)}))
    with pytest.raises(ConfigError, match="kto needs lora.enabled"):
        TrainConfig.from_dict({"objective": {"type": "kto"}, "lora": {"enabled": False}})
    with pytest.raises(ConfigError, match="simpo_gamma must be >= 0"):
        TrainConfig.from_dict({"objective": {"type": "simpo", "simpo_gamma": -1.0}})


@pytest.mark.parametrize("objective", [{"type": "simpo", "beta": 2.0, "simpo_gamma": 0.5},
                                       {"type": "kto", "beta": 0.5}])
def test_short_runs_lower_the_loss(small_model, tmp_path, objective):
    cfg = config(small_model, tmp_path, objective=objective,
                 data={"path": "bundled:preferences", "max_examples": 8, "eval_fraction": 0.0},
                 train={"max_steps": 8, "lr": 2e-2, "grad_accum": 1})
    result = Trainer(cfg).train()
    assert result.losses[-1] < result.losses[0]
