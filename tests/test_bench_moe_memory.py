"""bench/moe_train.py's memory accounting (--plan-only): the breakdown counted on the meta device is what the built
model really holds, so the full-depth gpt-oss-20b numbers cannot silently drift from the code that builds it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import moe_train  # noqa: E402
from common import make_optimizer, train_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("case", ["gpt-oss-20b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("qlora", [True, False])
def test_meta_accounting_matches_the_built_tiny_model(case, qlora):
    """Resident bytes by component of the meta-device build equal those of the real build (NF4 codes and
    double-quantised scales, bf16 embedding / head / router / norms / sinks, float32 adapters), and the components
    add up to every parameter and buffer the real model holds."""
    config = moe_train.hf_config(case, None, tiny=True)
    real = moe_train.build_lora_model(config, torch.device("cpu"), torch.bfloat16, qlora)
    meta = moe_train.build_lora_model(config, torch.device("meta"), torch.bfloat16, qlora)
    counted = moe_train.resident_bytes(real)
    assert counted == moe_train.resident_bytes(meta)
    assert sum(counted.values()) == _tensor_bytes([*real.parameters(), *real.buffers()])
    assert not [k for k in counted if k.startswith("other")], counted
    if qlora:
        assert counted["expert stacks NF4 codes"] > 0 and counted["attention linears NF4 codes"] > 0
        assert "expert stacks (16-bit)" not in counted
    assert counted["LoRA parameters (float32)"] == 4 * sum(p.numel() for p in real.parameters() if p.requires_grad)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_gradients_and_optimizer_state_match_a_real_step(optimizer):
    """The breakdown's gradients and optimizer moments are the bytes one real training step of the tiny gpt-oss
    QLoRA model leaves (gradients read before they are dropped; the moments after the step; 0-d step counters
    aside), with the optimizer made as the trainer makes it."""
    config = moe_train.hf_config("gpt-oss-20b", None, tiny=True)
    b = moe_train.memory_breakdown(config, torch.bfloat16, 16, 1, True, optimizer, budget_gib=1.0)
    model = moe_train.build_lora_model(config, torch.device("cpu"), torch.bfloat16, qlora=True)
    assert b["weights_bytes"] == _tensor_bytes([*model.parameters(), *model.buffers()])
    opt = make_optimizer(model, "fasttune", optimizer)
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert _tensor_bytes(grads) == b["gradient_bytes"]
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert _tensor_bytes(state) == b["optimizer_bytes"]
    assert b["static_bytes"] == b["weights_bytes"] + b["gradient_bytes"] + b["optimizer_bytes"]
    opt.zero_grad(set_to_none=True)
    assert torch.isfinite(train_step(model, "fasttune", ids, opt))


def test_plan_only_prints_the_full_depth_breakdown(capsys):
    """--plan-only at gpt-oss-20b's full depth builds nothing on a device and reports the 16 GiB QLoRA budget's
    breakdown: 184,909,824 trainable parameters (7,704,576 per layer), the NF4 expert codes at half a byte per
    weight, AdamW's float32 moments, and the dequantised expert range of the grouped GEMM."""
    assert moe_train.main(["--cases", "gpt-oss-20b", "--tools", "", "--qlora", "--budget-gib", "16",
                           "--optimizer", "adamw,adamw8bit", "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert out.count("184,909,824 trainable parameters") == 2
    experts = 24 * 32 * (2880 * 5760 + 2880 * 2880)
    assert f"| expert stacks NF4 codes | {experts // 2:,} |" in out
    assert "| optimizer moments (adamw) | 1,479,278,592 |" in out  # 2 x 4 bytes x 184,909,824
    assert "optimizer moments (adamw8bit)" in out
    # the grouped GEMM dequantises gate_up 8 experts (256 MiB of bf16) at a time, not the whole 1.06 GB stack
    assert f"(transient; Triton base GEMM) | {8 * 2880 * 5760 * 2:,} |" in out
