"""Issue 6 on the device: the trainer on CUDA (bf16 compute, Triton kernels, fused AdamW, the auto memory policy,
QLoRA) — the same guarantees the CPU tests check, where the GPU code paths differ.

    pytest -m gpu tests/test_train_gpu.py
"""
from __future__ import annotations

import math

import pytest
import torch

from fasttune.data.packing import collate_padded
from fasttune.train import TrainConfig, Trainer

from test_train import config, make_small_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return make_small_model(tmp_path_factory.mktemp("small_model_gpu"))


def gpu_config(model_path, out, dtype="bfloat16", **sections) -> TrainConfig:
    """test_train.config with GPU defaults: CUDA, `dtype`, longer sequences, more data, the auto memory policy."""
    merged = {"model": {"max_seq_length": 256, "device": "cuda", "dtype": dtype},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
              "data": {"max_examples": 120},
              "train": {"max_steps": 12, "memory": "auto"}}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return config(model_path, out, **merged)


def test_sft_bf16_loss_falls_and_resume_continues_the_same_losses(small_model, tmp_path):
    sections = dict(train={"save_every": 6, "keep_last": 3})
    full = Trainer(gpu_config(small_model, tmp_path / "full", **sections)).train()
    assert len(full.losses) == 12 and all(math.isfinite(x) for x in full.losses)
    assert sum(full.losses[-3:]) / 3 < sum(full.losses[:3]) / 3 - 0.15, full.losses  # CPU fp32: -0.3
    assert isinstance(full.eval, list) and full.eval and math.isfinite(full.eval[-1]["eval_loss"])

    # resume from the step-6 checkpoint of the same run: losses 7..12 again, up to GPU reduction order
    import shutil
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000006", resumed / "checkpoints" / "step-000006")
    again = Trainer(gpu_config(small_model, resumed, **sections)).train(resume=True)
    torch.testing.assert_close(torch.tensor(again.losses), torch.tensor(full.losses[6:]), rtol=2e-3, atol=0)


def test_accumulation_4x1_equals_batch_of_4_in_float32_on_gpu(small_model, tmp_path):
    """Exact accumulation through the Triton kernels (fused CE with num_items_in_batch) on CUDA, in float32."""
    trainer = Trainer(gpu_config(small_model, tmp_path, dtype="float32", data={"packing": False},
                                 train={"memory": "none"}))
    examples = trainer.data.train[:4]
    assert len({len(e["input_ids"]) for e in examples}) > 1
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    pad = trainer.pad_id
    full = trainer.accumulate([collate_padded(examples, pad)])
    g_full = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    micro = trainer.accumulate([collate_padded([e], pad) for e in examples])
    g_micro = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert micro["target_tokens"] == full["target_tokens"]
    assert micro["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert g_full.keys() == g_micro.keys() and g_full
    for name in g_full:
        torch.testing.assert_close(g_micro[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_objectives_train_on_gpu(small_model, tmp_path, objective):
    cfg = gpu_config(small_model, tmp_path, data={"path": "bundled:preferences", "max_examples": 64},
                     objective={"type": objective}, train={"max_steps": 8, "batch_size": 2, "grad_accum": 1,
                                                             "lr": 5e-3, "eval_every": 8})
    result = Trainer(cfg).train()
    assert all(math.isfinite(x) for x in result.losses)
    if objective == "dpo":  # adapters start at B = 0, so policy == reference: the first loss is log 2
        assert result.losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert result.losses[-1] < result.losses[0]
    assert "eval_reward_accuracy" in result.eval[-1]


def test_qlora_trains_on_gpu(small_model, tmp_path):
    cfg = gpu_config(small_model, tmp_path, model={"load_in_4bit": True}, train={"max_steps": 10})
    result = Trainer(cfg).train()
    assert all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
