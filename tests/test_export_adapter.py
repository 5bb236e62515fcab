"""PEFT-format adapters: fasttune -> PEFT over transformers reproduces fasttune's logits, and PEFT -> fasttune."""
from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fasttune
from fasttune.adapters.peft import AdapterError, load_adapter, save_adapter
from fasttune.models import load_model
from test_export_common import FP32_TOL, randomize_lora, random_ids, rel_err, save_tiny_hf


def _peft_logits(base_dir, adapter_dir, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32,
                                                           attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        return pm(ids).logits


@pytest.mark.parametrize("family,targets,rslora,embeddings", [
    ("llama", None, False, False),
    ("qwen2", ["q_proj", "k_proj", "o_proj", "up_proj"], True, True),
    ("phi3", ["q_proj", "v_proj", "gate_proj", "down_proj"], False, False),
])
def test_peft_reproduces_fasttune_logits(tmp_path, family, targets, rslora, embeddings):
    base = tmp_path / "base"
    save_tiny_hf(base, family)
    model = fasttune.add_lora(load_model(base), r=4, alpha=8, target_modules=targets, use_rslora=rslora,
                              train_embeddings=embeddings, train_lm_head=embeddings)
    randomize_lora(model)
    if embeddings:  # trained embeddings / head go out as PEFT modules_to_save
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(0.05)
            model.lm_head.weight.mul_(1.5)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
        plain = load_model(base)(ids).logits
    assert rel_err(ours, plain) > 1e-2, "the adapter does not change the logits: the test could not fail"

    out = tmp_path / "adapter"
    save_adapter(model, out, base_model_name_or_path=str(base))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["use_rslora"] is rslora and cfg["base_model_name_or_path"] == str(base)
    if family == "phi3":
        assert cfg["target_modules"] == ["down_proj", "gate_up_proj", "qkv_proj"]
    assert (cfg["modules_to_save"] is not None) == embeddings
    theirs = _peft_logits(base, out, ids)
    assert rel_err(ours, theirs) <= FP32_TOL


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_peft_adapter_loads_into_fasttune(tmp_path, family):
    base = tmp_path / "base"
    hf = save_tiny_hf(base, family)
    targets = ["qkv_proj", "gate_up_proj"] if family == "phi3" else ["q_proj", "v_proj", "gate_proj"]
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM",
                                                 modules_to_save=["embed_tokens"] if family == "llama" else None))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            if "modules_to_save" in n:
                p.add_(0.03)
    pm.eval().save_pretrained(tmp_path / "peft")
    ids = random_ids()
    with torch.no_grad():
        theirs = pm(ids).logits
        model = load_adapter(load_model(base), tmp_path / "peft")
        ours = model(ids).logits
    assert rel_err(ours, theirs) <= FP32_TOL
    # and back out again: fasttune's export of what it loaded is still what PEFT computes
    save_adapter(model, tmp_path / "again")
    assert rel_err(_peft_logits(base, tmp_path / "again", ids), theirs) <= FP32_TOL


def test_load_adapter_errors(tmp_path):
    base = tmp_path / "base"
    save_tiny_hf(base, "llama")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(load_model(base), tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="IA3"):
        load_adapter(load_model(base), tmp_path / "a")
    with pytest.raises(AdapterError, match="no LoRA modules"):
        save_adapter(load_model(base), tmp_path / "b")
