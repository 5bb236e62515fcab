"""`fasttune export` pieces: formats end to end on a tiny model, overwrite refusal, atomic rename, size summary."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import fasttune
from fasttune.export.adapter import save_adapter
from fasttune.export.cli import main
from fasttune.models import load_model
from test_export_common import randomize_lora, save_tiny_hf

TINY = Path(fasttune.__file__).parent / "assets" / "tiny"


@pytest.fixture()
def base_and_adapter(tmp_path):
    base = tmp_path / "base"
    save_tiny_hf(base, "llama", vocab_size=4013)
    for f in TINY.glob("*.json"):
        shutil.copy(f, base / f.name)
    model = fasttune.add_lora(load_model(base), r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    return base, tmp_path / "adapter", model


def test_cli_formats(tmp_path, base_and_adapter, capsys):
    base, adapter, model = base_and_adapter
    assert main(["--format", "gguf", "--quant", "f16", "--chat-template", "chatml", "--adapter", str(adapter),
                 str(base), str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "base-f16.gguf" in out
    assert (tmp_path / "g" / "base-f16.gguf").stat().st_size > 0
    assert (tmp_path / "g" / "Modelfile").read_text().startswith("FROM ./base-f16.gguf")
    assert not list(tmp_path.glob(".g.tmp-*"))

    # an adapter folder as MODEL_DIR finds its base
    assert main(["--format", "merged", "--dtype", "fp32", str(adapter), str(tmp_path / "m")]) == 0
    merged = load_model(tmp_path / "m")
    ids = torch.randint(5, 4000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=0)

    assert main(["--format", "adapter", str(adapter), str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_cli_refuses_non_empty_out_and_cleans_up(tmp_path, base_and_adapter):
    base, adapter, _ = base_and_adapter
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["--format", "adapter", "--adapter", str(adapter), str(base), str(out)]) == 2
    assert (out / "keep.txt").exists()
    assert main(["--format", "adapter", "--adapter", str(adapter), "--force", str(base), str(out)]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
    # a failing export leaves neither a result nor its temporary folder
    with pytest.raises(Exception):
        main(["--format", "gguf", "--quant", "q8_0", "--chat-template", "no-such-template", str(base),
              str(tmp_path / "fail")])
    assert not (tmp_path / "fail").exists() and not list(tmp_path.glob(".fail.tmp-*"))
