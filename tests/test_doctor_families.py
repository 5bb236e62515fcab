"""The model doctor's family pitfalls (doctor/checks/family.py) on tiny checkpoints saved by transformers: each
planted pitfall is found with its reason, --fix repairs what it can, and a clean model of every new family raises
no problem. The loader refuses float16 for Gemma 2 / 3 and reads a float16 label as bfloat16."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fasttune.doctor import diagnose, repair
from fasttune.models import CheckpointError, load_model
from test_doctor import checks_found, copy_model, edit_json, make_model

NEW_FAMILIES = ("gemma3_text", "olmo2", "granite", "smollm3")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("g3") / "m", "gemma3_text", query_pre_attn_scalar=8)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("g2") / "m", "gemma2", query_pre_attn_scalar=8)


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_clean_model_of_every_new_family_has_no_problems(tmp_path, model_type):
    extra = {"query_pre_attn_scalar": 8} if model_type == "gemma3_text" else {}
    report = diagnose(make_model(tmp_path / model_type, model_type, **extra))
    assert report.problems() == [], report.format()
    assert "internal" not in checks_found(report)
    assert {"float16-overflow", "gemma-attention", "granite-multipliers", "longrope", "nope-layers"} <= \
        set(report.checks_run)


@pytest.mark.parametrize("fixture", ["gemma3_dir", "gemma2_dir"])
def test_gemma_in_float16_is_an_error_when_asked_for_and_a_warning_when_labelled(tmp_path, request, fixture):
    src = request.getfixturevalue(fixture)
    asked = diagnose(src, dtype="fp16")
    [f] = asked.by_check("float16-overflow")
    assert f.severity == "error" and "65504" in f.evidence[0]
    assert diagnose(src, dtype="bfloat16").by_check("float16-overflow") == []
    labelled = copy_model(src, tmp_path / "fp16")
    edit_json(labelled / "config.json", torch_dtype="float16", dtype="float16")
    [w] = diagnose(labelled).by_check("float16-overflow")
    assert w.severity == "warning" and "bfloat16" in w.fix
    # not a pitfall of the other families
    llama = make_model(tmp_path / "llama", "llama")
    assert diagnose(llama, dtype="float16").by_check("float16-overflow") == []


def test_loader_refuses_gemma_in_float16_and_reads_a_float16_label_as_bfloat16(tmp_path, gemma3_dir, caplog):
    with pytest.raises(CheckpointError, match=r"gemma3_text cannot run in float16: Gemma 3's activations .*65504"):
        load_model(gemma3_dir, dtype="float16")
    labelled = copy_model(gemma3_dir, tmp_path / "fp16")
    edit_json(labelled / "config.json", torch_dtype="float16", dtype="float16")
    with caplog.at_level(logging.WARNING, logger="fasttune.models"):
        model = load_model(labelled)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert "labelled float16" in caplog.text
    assert load_model(labelled, dtype="float32").model.embed_tokens.weight.dtype == torch.float32
    llama = make_model(tmp_path / "llama", "llama", torch_dtype="float16")
    assert load_model(llama, dtype="float16").model.embed_tokens.weight.dtype == torch.float16


def test_gemma_query_pre_attn_scalar(tmp_path, gemma3_dir):
    # head_dim 8, hidden / heads = 32 / 4 = 8: released configs use one of those
    odd = copy_model(gemma3_dir, tmp_path / "odd")
    edit_json(odd / "config.json", query_pre_attn_scalar=100)
    [f] = diagnose(odd).by_check("gemma-attention-scale")
    assert f.severity == "warning" and "100" in f.title
    missing = copy_model(gemma3_dir, tmp_path / "missing")
    edit_json(missing / "config.json", query_pre_attn_scalar=None)
    [f] = diagnose(missing).by_check("gemma-attention-scale")
    assert "256" in f.title
    # ... and fasttune scales by 256^-1/2 there, as transformers does
    from fasttune.models.spec import ArchSpec
    assert ArchSpec.from_pretrained(missing).attn_scale == 256 ** -0.5
    assert diagnose(gemma3_dir).by_check("gemma-attention-scale") == []


def test_gemma2_without_softcapping_is_found_and_fixed(tmp_path, gemma2_dir):
    bad = copy_model(gemma2_dir, tmp_path / "bad")
    edit_json(bad / "config.json", attn_logit_softcapping="NULL")
    cfg = (bad / "config.json").read_text().replace('"NULL"', "null")
    (bad / "config.json").write_text(cfg)
    report = diagnose(bad)
    [f] = report.by_check("gemma-softcapping")
    assert f.severity == "warning" and "attn_logit_softcapping" in f.title
    repair(report, tmp_path / "fixed")
    assert diagnose(tmp_path / "fixed").by_check("gemma-softcapping") == []
    # absent keys are transformers' defaults (50, 30), not "off"
    from fasttune.models.spec import ArchSpec
    absent = copy_model(gemma2_dir, tmp_path / "absent")
    edit_json(absent / "config.json", attn_logit_softcapping=None, final_logit_softcapping=None)
    spec = ArchSpec.from_pretrained(absent)
    assert (spec.attn_softcap, spec.final_softcap) == (50.0, 30.0)
    assert diagnose(absent).by_check("gemma-softcapping") == []


def test_granite_multipliers(tmp_path):
    granite = make_model(tmp_path / "granite", "granite", embedding_multiplier=12.0, residual_multiplier=0.22,
                         attention_multiplier=0.125, logits_scaling=8.0)
    assert diagnose(granite).by_check("granite-multipliers") == []
    stripped = copy_model(granite, tmp_path / "stripped")
    edit_json(stripped / "config.json", logits_scaling=None)
    [f] = diagnose(stripped).by_check("granite-multipliers")
    assert f.severity == "warning" and "logits_scaling" in f.title
    as_llama = copy_model(granite, tmp_path / "as_llama")
    edit_json(as_llama / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    report = diagnose(as_llama)
    [f] = report.by_check("granite-multipliers")
    assert f.severity == "error" and "embedding_multiplier" in f.title
    repair(report, tmp_path / "fixed")
    fixed = diagnose(tmp_path / "fixed")
    assert fixed.by_check("granite-multipliers") == [] and fixed.folder.config["model_type"] == "granite"


def test_smollm3_relabelled_as_llama_loses_its_nope_layers(tmp_path):
    smol = make_model(tmp_path / "smol", "smollm3")
    as_llama = copy_model(smol, tmp_path / "as_llama")
    edit_json(as_llama / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    report = diagnose(as_llama)
    [f] = report.by_check("nope-layers")
    assert f.severity == "error"
    repair(report, tmp_path / "fixed")
    assert diagnose(tmp_path / "fixed").by_check("nope-layers") == []


PHI4_MINI_ROPE = {"type": "longrope", "short_factor": [1.0] * 2, "long_factor": [2.0] * 2}


def test_phi4_mini_longrope(tmp_path):
    # head_dim 8, partial_rotary_factor 0.5 -> rotary dim 4 -> 2 factors per list
    ok = make_model(tmp_path / "ok", "phi3", partial_rotary_factor=0.5, rope_scaling=PHI4_MINI_ROPE,
                    max_position_embeddings=131072, original_max_position_embeddings=4096)
    report = diagnose(ok)
    assert report.problems() == [], report.format()
    [note] = report.by_check("longrope")
    assert note.severity == "info" and "1.1902" in note.evidence[0]  # sqrt(1 + ln 32 / ln 4096)
    no_orig = copy_model(ok, tmp_path / "no_orig")
    rope = json.loads((no_orig / "config.json").read_text())["rope_parameters"]
    rope.pop("original_max_position_embeddings")
    edit_json(no_orig / "config.json", original_max_position_embeddings=None, rope_parameters=rope)
    [f] = diagnose(no_orig).by_check("longrope")
    assert f.severity == "warning" and "original_max_position_embeddings" in f.title
    short = copy_model(ok, tmp_path / "short")
    edit_json(short / "config.json", max_position_embeddings=4096)
    [f] = [f for f in diagnose(short).by_check("longrope") if f.severity == "warning"]
    assert "not above the original context" in f.title


def test_tied_phi4_mini_with_a_separate_lm_head_in_the_files(tmp_path):
    """Phi-4-mini ties its embeddings; a file that also stores a different lm_head.weight loses it under loaders
    that honour the flag (the generic tied-embeddings check, here on the new family)."""
    from safetensors.torch import load_file, save_file

    p = make_model(tmp_path / "phi", "phi3", tie_word_embeddings=True)
    f = p / "model.safetensors"
    state = load_file(str(f))
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    save_file(state, str(f), metadata={"format": "pt"})
    [finding] = diagnose(p).by_check("tied-embeddings")
    assert finding.severity == "error"


def test_cli_dtype_flag(gemma3_dir, capsys):
    from fasttune.cli import main

    assert main(["doctor", str(gemma3_dir), "--dtype", "fp16", "--quiet"]) == 1
    assert "float16-overflow" in capsys.readouterr().out
    assert main(["doctor", str(gemma3_dir), "--dtype", "bf16", "--quiet"]) == 0
