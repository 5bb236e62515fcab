"""fasttune compare: fasttune vs transformers, two checkpoints, one checkpoint in two dtypes."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from fasttune.doctor.cli import add_compare_arguments, run_compare
from fasttune.doctor.compare_cli import compare_paths

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def _tiny(path: Path, model_type: str, seed: int = 0) -> Path:
    cfg = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)  # phi3's default pad id is 32000
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_fasttune_matches_transformers_layer_by_layer_in_fp32(tmp_path, model_type):
    m = _tiny(tmp_path / "m", model_type)
    result = compare_paths(m, ref="transformers", dtype_a="fp32", dtype_b="fp32", seq_len=32)
    assert [e.name for e in result.errors] == ["embeddings", "layer 0", "layer 1", "final norm"]
    assert max(e.rel_l2 for e in result.errors) < 1e-5, result.errors


def test_two_checkpoints_and_two_dtypes(tmp_path):
    a = _tiny(tmp_path / "a", "llama", seed=0)
    b = _tiny(tmp_path / "b", "llama", seed=1)
    same = compare_paths(a, a, seq_len=16)
    assert all(e.rel_l2 == 0 for e in same.errors)
    differ = compare_paths(a, b, seq_len=16)
    assert min(e.rel_l2 for e in differ.errors) > 0.1  # unrelated weights
    dt = compare_paths(a, dtype_a="bf16", dtype_b="fp32", seq_len=16)
    assert all(1e-4 < e.rel_l2 < 5e-2 for e in dt.errors), dt.errors  # bf16 rounding: ~2^-9 and up
    with pytest.raises(ValueError, match="second side"):
        compare_paths(a)


def test_compare_locates_the_first_layer_that_differs(tmp_path):
    from safetensors.torch import load_file, save_file

    a = _tiny(tmp_path / "a", "llama")
    b = tmp_path / "b"
    import shutil
    shutil.copytree(a, b)
    state = load_file(str(b / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"] *= 1.01  # a 1% change in layer 1 only
    save_file(state, str(b / "model.safetensors"), metadata={"format": "pt"})
    errs = {e.name: e.rel_l2 for e in compare_paths(a, b, seq_len=16).errors}
    assert errs["embeddings"] == 0 and errs["layer 0"] == 0, errs
    assert errs["layer 1"] > 1e-4 and errs["final norm"] > 1e-4, errs


def test_cli_prints_table_and_writes_png(tmp_path, capsys):
    a = _tiny(tmp_path / "a", "llama")
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    png = tmp_path / "err.png"
    assert run_compare(parser.parse_args([str(a), "--dtype-a", "bf16", "--seq-len", "16", "--plot", str(png)])) == 0
    out = capsys.readouterr().out
    assert "layer 1" in out and "log10" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_compare(parser.parse_args([str(a), "--plot", ""])) == 2
