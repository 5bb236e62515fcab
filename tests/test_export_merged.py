"""Merged export: transformers loads the folder and reproduces fasttune's logits with the adapter applied."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttune
from fasttune.export.merged import DEQUANTISED_NOTE, export_merged
from fasttune.models import load_model
from fasttune.models.nf4_linear import quantize_linear
from test_export_common import BF16_TOL, FP16_TOL, FP32_TOL, randomize_lora, random_ids, rel_err, save_tiny_hf


def _hf_logits(path, ids, dtype=torch.float32):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager")
    with torch.no_grad():
        return hf.eval()(ids).logits.float()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_merged_matches_fasttune(tmp_path, family):
    save_tiny_hf(tmp_path / "base", family)
    model = fasttune.add_lora(load_model(tmp_path / "base"), r=4, alpha=8)
    randomize_lora(model)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
        plain = load_model(tmp_path / "base")(ids).logits
    assert rel_err(ours, plain) > 1e-2
    for dtype, tol in (("float32", FP32_TOL), ("bfloat16", BF16_TOL), ("float16", FP16_TOL)):
        out = tmp_path / dtype
        result = export_merged(model, out, dtype=dtype, max_shard_size="20KB")  # several shards + index
        assert not result.notes
        assert (out / "model.safetensors.index.json").exists()
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
        theirs = _hf_logits(out, ids, getattr(torch, dtype))
        assert rel_err(theirs, ours) <= tol, dtype


def test_merged_from_4bit_base_is_dequantised_plus_adapter(tmp_path):
    save_tiny_hf(tmp_path / "base", "llama")
    model = fasttune.add_lora(load_model(tmp_path / "base", quantize=quantize_linear), r=4, alpha=8)
    randomize_lora(model)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
    result = export_merged(model, tmp_path / "out", dtype="float32")
    assert result.notes == [DEQUANTISED_NOTE]
    # the NF4 forward dequantises and computes in the same dtype, so the merged dense model agrees closely
    assert rel_err(_hf_logits(tmp_path / "out", ids), ours) <= 1e-4
    # and it is not the 16-bit base plus the adapter (NF4 error is visible)
    q_proj = model.model.layers[0].self_attn.q_proj
    merged = q_proj.merged_weight()
    dense = load_model(tmp_path / "base").model.layers[0].self_attn.q_proj.weight.float() + q_proj.delta_weight()
    assert (merged - dense).abs().max() > 1e-4
