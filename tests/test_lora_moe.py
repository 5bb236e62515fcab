"""LoRA on Mixture-of-Experts models (issue 17): per-expert adapters on the expert stacks (through the grouped GEMM),
LoRA on the router, PEFT's format both ways (`target_parameters`), merging into the 3-D stacks.

The oracle is PEFT itself: the adapter fasttune exports, loaded by PEFT over the transformers model, gives the same
logits, loss and adapter gradients as fasttune."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fasttune.export import export_merged, load_adapter, save_adapter
from fasttune.adapters import LoraExperts, add_lora, disable_adapters, lora_parameters
from fasttune.models import load_model

from test_models_parity import FP32_TOL, random_ids, rel_err
from test_models_parity_moe import build_pair

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
TARGETS = ["all-linear", "router"]


def _randomise_adapters(model, seed=0):
    """B starts at zero (no effect): give every adapter random factors so the comparison sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_model(hf, adapter_dir, trainable=False):
    return peft.PeftModel.from_pretrained(hf, str(adapter_dir), is_trainable=trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_exported_adapter_same_logits_loss_and_gradients(tmp_path, family):
    hf, ours = build_pair(tmp_path / "base", family, mlp_only_layers=[])  # every layer MoE (see the refusal test)
    add_lora(ours, r=3, alpha=6, target_modules=TARGETS)
    _randomise_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    router = "router" if family == "gpt_oss" else "gate"
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", f"mlp.{router}.weight"]
    assert router not in cfg["target_modules"]
    pm = _peft_model(hf, tmp_path / "adapter", trainable=True)
    ids = random_ids()
    ours.train()
    pm.train()  # (no dropout anywhere: train mode changes nothing but the flags)
    out_ours = ours(ids, labels=ids, return_logits=True, output_router_logits=True)
    out_peft = pm(input_ids=ids, labels=ids, output_router_logits=True)
    assert rel_err(out_ours.logits, out_peft.logits) <= FP32_TOL
    assert abs(out_ours.loss.item() - out_peft.loss.item()) <= FP32_TOL * out_peft.loss.item()
    out_ours.loss.backward()
    out_peft.loss.backward()
    # fasttune's gradients in PEFT's layout, through the exporter's own mapping, against PEFT's
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if "lora_" in n}
    mine = {}
    for p in lora_parameters(ours):
        p.data, p.grad = p.grad, None  # the exporter reads .data: route the gradient through it
    from fasttune.export import adapter_state_dict

    tensors, _ = adapter_state_dict(ours)
    mine = {k.replace("base_model.model.", ""): t for k, t in tensors.items()}
    assert set(mine) == set(theirs)
    for name, g in mine.items():
        assert rel_err(g, theirs[name]) <= 1e-4, name  # products of small factors: a looser relative bound


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_adapter_round_trip_and_peft_made_adapter_loads(tmp_path, family):
    hf, ours = build_pair(tmp_path / "base", family, mlp_only_layers=[])
    add_lora(ours, r=2, alpha=5, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    _randomise_adapters(ours, seed=3)
    save_adapter(ours, tmp_path / "a1")
    ids = random_ids()
    fresh = load_adapter(load_model(tmp_path / "base"), tmp_path / "a1")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ours(ids).logits)
    # an adapter PEFT made (its own init, B randomised there) loads into fasttune with PEFT's logits
    lc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"],
                         target_parameters=["mlp.experts.down_proj"])
    pm = peft.get_peft_model(hf, lc)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    theirs = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft")
    assert all(list(m.adapters) == ["down_proj"] for m in theirs.modules() if isinstance(m, LoraExperts))
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, pm(input_ids=ids).logits) <= FP32_TOL


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_merged_export_folds_adapters_into_the_expert_stacks(tmp_path, family):
    _, ours = build_pair(tmp_path / "base", family)
    add_lora(ours, r=2, alpha=4, target_modules=TARGETS)
    _randomise_adapters(ours, seed=5)
    export_merged(ours, tmp_path / "merged", dtype="float32")
    merged = load_model(tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager" if family == "gpt_oss" else "sdpa").eval()
    ids = random_ids()
    with torch.no_grad():
        ref = ours(ids).logits
        assert rel_err(merged(ids).logits, ref) <= FP32_TOL
        assert rel_err(hf(ids).logits, ref) <= FP32_TOL


def test_expert_targets_are_validated(tmp_path):
    _, ours = build_pair(tmp_path, "qwen3_moe")
    with pytest.raises(ValueError, match="gate and up as one fused stack"):
        add_lora(ours, target_modules=["up_proj"])
    with pytest.raises(ValueError, match="dropout"):
        add_lora(ours, target_modules=["down_proj"], dropout=0.1)
    _, dense = build_pair(tmp_path / "mixtral", "mixtral")
    from test_models_parity import build_pair as dense_pair

    _, llama = dense_pair(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="no MoE layers"):
        add_lora(llama, target_modules=["q_proj", "router"])


def test_export_refuses_lora_on_a_dense_qwen3_moe_layer(tmp_path):
    """PEFT remaps gate_proj/up_proj/down_proj in target_modules onto the experts for Qwen3-MoE, so a LoRA on a
    dense (mlp_only_layers) MLP cannot be written for it: refused with the reason, not silently dropped."""
    from fasttune.export import AdapterError

    _, ours = build_pair(tmp_path, "qwen3_moe")  # layer 1 dense
    add_lora(ours, r=2, alpha=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    with pytest.raises(AdapterError, match="dense MLP.*model.layers.1.mlp"):
        save_adapter(ours, tmp_path / "a")


def test_disable_adapters_turns_the_experts_off_too(tmp_path):
    hf, ours = build_pair(tmp_path, "qwen3_moe")
    add_lora(ours, r=2, alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    _randomise_adapters(ours)
    ids = random_ids()
    with torch.no_grad(), disable_adapters(ours):
        assert rel_err(ours(ids).logits, hf(ids).logits) <= FP32_TOL
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) > 1e-3


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_qlora_experts_are_nf4_and_train(tmp_path, family):
    """load_in_4bit stores the expert stacks (the bulk of an MoE model) in NF4 as they are read; the model computes
    exactly what the dequantised stacks give, LoRA on the experts trains over them, and a merged export holds the
    dequantised stacks plus the adapters."""
    from fasttune.kernels.nf4 import quantize_nf4
    from fasttune.models.nf4_linear import quantize_linear
    from fasttune.models.moe import NF4ExpertStack

    _, dense = build_pair(tmp_path / "base", family, mlp_only_layers=[])
    q = load_model(tmp_path / "base", dtype="float32", quantize=quantize_linear)  # what load_in_4bit passes
    stacks = [m for m in q.modules() if isinstance(m, NF4ExpertStack)]
    assert len(stacks) == 2 * sum(q.spec.moe_layers)
    assert all(type(layer.mlp.router_linear) is torch.nn.Linear for layer in q.model.layers)  # the router: 16-bit
    with torch.no_grad():  # the reference: the dense model with each stack and decoder linear (not the router)
        for layer in dense.model.layers:  # replaced by its NF4 round trip
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(layer.mlp.experts, name)
                w.copy_(quantize_nf4(w).dequantize())
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = getattr(layer.self_attn, proj).weight
                w.copy_(quantize_nf4(w).dequantize())
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(q(ids).logits, dense(ids).logits) <= FP32_TOL
    add_lora(q, r=2, alpha=4, target_modules=TARGETS)
    _randomise_adapters(q, seed=7)
    q.train()
    out = q(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(q))
    q.eval()
    result = export_merged(q, tmp_path / "merged", dtype="float32")
    assert any("4-bit" in n for n in result.notes)
    with torch.no_grad():
        assert rel_err(load_model(tmp_path / "merged")(ids).logits, q(ids).logits) <= FP32_TOL
