"""`fasttune export` pieces: formats end to end on a tiny model, overwrite refusal, atomic rename, size summary."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttune
from fasttune.adapters.peft import save_adapter
from fasttune.export.cli import main
from fasttune.models import load_model
from test_export_common import randomize_lora, save_tiny_hf

TINY = Path(fasttune.__file__).parent / "assets" / "tiny"


@pytest.fixture()
def base_and_adapter(tmp_path):
    base = tmp_path / "base"
    save_tiny_hf(base, "llama", vocab_size=4013)
    for f in TINY.glob("*token*.json"):  # tokenizer files only, not the tiny model's config
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
    # config and tokenizer files travel with the weights: transformers loads both from the folder alone
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert hf_tok("hello world").input_ids == transformers.AutoTokenizer.from_pretrained(base)("hello world").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)

    assert main(["--format", "adapter", str(adapter), str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_cli_refuses_non_empty_out_and_cleans_up(tmp_path, base_and_adapter, capsys):
    base, adapter, _ = base_and_adapter
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["--format", "adapter", "--adapter", str(adapter), str(base), str(out)]) == 2
    assert (out / "keep.txt").exists()
    assert main(["--format", "adapter", "--adapter", str(adapter), "--force", str(base), str(out)]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
    # an unknown chat template is refused up front, naming the choices, and writes nothing
    assert main(["--format", "gguf", "--chat-template", "no-such-template", str(base), str(tmp_path / "t")]) == 2
    assert "unknown --chat-template 'no-such-template'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.tmp-*"))


def _interrupt_after_partial_write(monkeypatch, module, name):
    def partial(model, path, *args, **kwargs):
        path = Path(path)
        target = path / "model.safetensors" if module == "merged" else path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing the weights
    monkeypatch.setattr(f"fasttune.export.{module}.{name}", partial)


@pytest.mark.parametrize("fmt, module, name", [("gguf", "gguf_writer", "export_gguf"),
                                               ("merged", "merged", "export_merged")])
def test_cli_interrupted_export_leaves_nothing_that_looks_whole(tmp_path, base_and_adapter, monkeypatch, fmt, module,
                                                                name):
    base, adapter, _ = base_and_adapter
    _interrupt_after_partial_write(monkeypatch, module, name)
    with pytest.raises(KeyboardInterrupt):
        main(["--format", fmt, "--adapter", str(adapter), str(base), str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()
    # with --force over an earlier export, the earlier export survives the interruption untouched
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "model.safetensors").write_bytes(b"the previous, complete export")
    with pytest.raises(KeyboardInterrupt):
        main(["--format", fmt, "--adapter", str(adapter), "--force", str(base), str(earlier)])
    assert sorted(p.name for p in earlier.iterdir()) == ["model.safetensors"]
    assert (earlier / "model.safetensors").read_bytes() == b"the previous, complete export"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_cli_merged_from_4bit_base_says_it_is_dequantised(tmp_path, base_and_adapter, capsys):
    base, adapter, _ = base_and_adapter
    out = tmp_path / "q"
    assert main(["--format", "merged", "--load-in-4bit", "--adapter", str(adapter), str(base), str(out)]) == 0
    captured = capsys.readouterr()
    assert "note: the base model was 4-bit (NF4): the merged weights are the dequantised NF4 base" in captured.out
    assert "dequantised NF4 base plus the adapter" in (out / "EXPORT_NOTES.txt").read_text()
    assert "quantization_config" not in (out / "config.json").read_text()  # dense weights, loadable as such
    # the progress bar counts every tensor written, ending full
    done = re.findall(r"export merged: 100%\|.*?\| (\d+)/(\d+)", captured.err)
    assert done and done[-1][0] == done[-1][1]


def test_gguf_is_optional_and_quant_names_match_the_writer():
    """Without the `gguf` package, fasttune.export (used to save adapters after every training run) still imports,
    and `--format gguf` says what to install; the CLI's --quant choices are the writer's tensor types."""
    import subprocess
    import sys

    from fasttune.export import QUANT_TYPES
    from fasttune.export.cli import QUANT_NAMES

    assert set(QUANT_NAMES) == set(QUANT_TYPES)
    code = (
        "import sys; sys.modules['gguf'] = None\n"  # an import of gguf now raises ImportError
        "import fasttune.export as e\n"
        "from fasttune.export import save_adapter, export_merged\n"
        "try:\n    e.export_gguf\nexcept ImportError:\n    print('lazy-ok')\n"
        "from fasttune.export.cli import run\n"
        "import argparse\n"
        "from fasttune.export.cli import add_arguments\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "print('rc', run(p.parse_args(['m', sys.argv[1], '--format', 'gguf'])))\n"
    )
    import tempfile
    out = tempfile.mkdtemp() + "/out"
    proc = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=120)
    assert "lazy-ok" in proc.stdout, proc.stdout + proc.stderr
    assert "rc 2" in proc.stdout, proc.stdout + proc.stderr
    assert "pip install gguf" in proc.stderr


def test_cli_removes_what_a_killed_export_left(tmp_path, base_and_adapter):
    """A SIGKILLed export leaves `.OUT.tmp-PID`; the next export beside it removes it when that PID is dead (and keeps
    a live writer's)."""
    import os
    import subprocess

    base, adapter, _ = base_and_adapter
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".m.tmp-{dead.pid}"
    (stale / "part").mkdir(parents=True)
    live = tmp_path / f".other.tmp-{os.getpid()}"
    live.mkdir()
    assert main(["--format", "adapter", "--adapter", str(adapter), str(base), str(tmp_path / "a")]) == 0
    assert not stale.exists() and live.exists()
