"""Mistakes a user makes on the command line end in one line saying what was wrong and what to do, exit code 2,
no traceback (issue 13 items 9 and 17): a base model folder that is not there (given, or recorded by an adapter),
a folder holding only pickle weights, --adapter pointing at the run folder (or at nothing), --gpus without GPUs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fasttune.cli import main
from test_train import make_small_model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("errors_model"))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_missing_base_model_is_named_with_what_to_pass(small_model, tmp_path, capsys):
    gone = tmp_path / "no-such-model"
    for cmd in (["chat", "--model", str(gone)], ["generate", "--model", str(gone), "--prompt", "hi"]):
        assert main([*cmd, "--device", "cpu"]) == 2
        _one_line_error(capsys, str(gone), "does not exist", "--model")
    assert main(["export", "--format", "merged", str(gone), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(gone), "does not exist", "MODEL_DIR")

    # an adapter whose recorded base has moved away: the record is named, and how to override it
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "fasttune_adapter.json").write_text(json.dumps(
        {"base_model": str(gone), "lora": {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["q_proj"],
                                           "use_rslora": False, "seed": 0}}))
    save_file({}, str(adapter / "trainable.safetensors"))
    for cmd in (["chat", "--adapter", str(adapter)], ["generate", "--adapter", str(adapter), "--prompt", "hi"]):
        assert main([*cmd, "--device", "cpu"]) == 2
        _one_line_error(capsys, f"recorded in {adapter}", "--model")
    assert main(["export", "--format", "merged", str(adapter), str(tmp_path / "out")]) == 2
    _one_line_error(capsys, f"recorded in {adapter}")
    # ... and --model repairs it
    assert main(["generate", "--adapter", str(adapter), "--model", str(small_model), "--prompt", "hi",
                 "--max-new-tokens", "1", "--device", "cpu"]) == 0


def test_a_pickle_only_folder_says_how_to_load_it(small_model, tmp_path, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(small_model, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    for cmd in (["chat", "--model", str(folder), "--device", "cpu"],
                ["generate", "--model", str(folder), "--prompt", "hi", "--device", "cpu"],
                ["export", "--format", "merged", str(folder), str(tmp_path / "out")]):
        assert main(cmd) == 2
        _one_line_error(capsys, "pytorch_model.bin", "safetensors", "--allow-pickle")
    assert main(["generate", "--model", str(folder), "--allow-pickle", "--prompt", "hi", "--max-new-tokens", "1",
                 "--device", "cpu"]) == 0
    assert main(["export", "--format", "merged", "--allow-pickle", str(folder), str(tmp_path / "out")]) == 0


def test_adapter_pointing_at_the_run_folder_or_nothing(small_model, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for cmd in (["chat", "--adapter", str(run)], ["generate", "--adapter", str(run), "--prompt", "hi"]):
        assert main([*cmd, "--device", "cpu"]) == 2
        _one_line_error(capsys, "training run's folder", str(run / "adapter"), "checkpoints")
    assert main(["export", "--format", "merged", "--adapter", str(run), str(small_model), str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "training run's folder", str(run / "adapter"))
    assert main(["export", "--format", "merged", str(run), str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "training run's folder")

    assert main(["generate", "--adapter", str(tmp_path / "nothing"), "--prompt", "hi", "--device", "cpu"]) == 2
    _one_line_error(capsys, "does not exist", "adapter/ folder")
    (tmp_path / "empty").mkdir()
    assert main(["chat", "--adapter", str(tmp_path / "empty"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "holds no adapter", "PEFT adapter folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA GPUs")
def test_gpus_without_gpus_is_refused(small_model, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{path: {small_model}}}\ntrain: {{output_dir: {tmp_path / 'out'}, max_steps: 1}}\n")
    assert main(["train", str(cfg), "--gpus", "2"]) == 2
    _one_line_error(capsys, "--gpus 2", "no CUDA GPU", "leave --gpus out")
    assert main(["train", str(cfg), "--gpus", "0"]) == 2
    _one_line_error(capsys, "--gpus 0")
    assert not (tmp_path / "out").exists()  # nothing started
