"""The run folder (issue 19 items 2, 3, 5; issue 13 item 1): one run at a time (a lock held by another process is
refused naming it, a dead holder's lock is taken over), a folder holding a run needs --resume or --overwrite, the
adapter is replaced whole or not at all, nothing is written through a symlink, a full disk says so and leaves no
temporary folder, and temporary folders of killed runs are cleaned up. CPU, a 2-layer random Llama."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasttune.cli import main
from fasttune.train import TrainConfig, Trainer
from fasttune.train import checkpoint as ckpt
from fasttune.train import run_folder
from fasttune.train import trainer as trainer_module

from test_train import make_small_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("run_folder_model"))


def _write_config(model: Path, out: Path, cfg: Path, **train) -> Path:
    t = {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "save_every": 1,
         "keep_last": 5, "progress": False, "tensorboard": False, "plot": False, "memory": "none", **train}
    cfg.write_text(f"model: {{path: {model}, max_seq_length: 96, device: cpu}}\nlora: {{r: 4, alpha: 8}}\n"
                   "data: {path: 'bundled:instructions', max_examples: 24, eval_fraction: 0.0}\n"
                   f"train: {json.dumps(t)}\n")
    return cfg


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- the lock ------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from fasttune.train.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(model, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = _write_config(model, out, tmp_path / "run.yaml")
        assert main(["train", str(cfg)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"{out} is in use by another fasttune run (pid {holder.pid} on host" in line
        assert "wait for it to finish, or set another train.output_dir" in line
        # the lock is checked again where it is taken (a run that passed the early check still cannot get in)
        with pytest.raises(run_folder.RunFolderBusy, match=f"pid {holder.pid}"):
            run_folder.prepare(out, resume=False, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL) holding the lock: its record is stale, taken over with a warning
    lock = run_folder.RunLock(out).acquire()
    err = capsys.readouterr().err
    assert f"taking over the stale lock of {out} left by pid {holder.pid}" in err and "no longer running" in err
    record = json.loads((out / run_folder.LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] and record["started"]
    lock.release()
    assert (out / run_folder.LOCK_NAME).read_text() == ""  # released: no record, so no stale warning next time
    run_folder.RunLock(out).acquire().release()
    assert "stale" not in capsys.readouterr().err


# ---- a used folder, --overwrite, --resume -------------------------------------------------------------------------

def test_a_folder_holding_a_run_needs_resume_or_overwrite(model, tmp_path, capsys):
    """Issue 13's mix-up: 4 steps saving every 2, then 1 step into the same folder; keep_last kept the old run's
    checkpoints and deleted the new one's, and a later --resume resumed the old run."""
    out = tmp_path / "out"
    cfg = _write_config(model, out, tmp_path / "run.yaml", max_steps=4, save_every=2)
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    again = ["train", str(cfg), "--set", "train.max_steps=1", "--set", "train.save_every=1"]
    assert main(again) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{out} already holds a run (metrics.jsonl, checkpoints, adapter, config.yaml" in line
    assert "--resume" in line and "--overwrite" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002", "step-000004"]  # untouched

    assert main(again + ["--resume", "--overwrite"]) == 2
    assert "contradict" in _one_line(capsys.readouterr().err)

    assert main(again + ["--overwrite"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001"]  # only the new run's
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert json.loads((out / "adapter" / "fasttune_adapter.json").read_text())["step"] == 1


# ---- the adapter is replaced whole or not at all ------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_crash_while_the_adapter_is_written_leaves_the_old_adapter_intact(model, tmp_path, monkeypatch):
    cfg = TrainConfig.from_yaml(_write_config(model, tmp_path / "out", tmp_path / "run.yaml", max_steps=1))
    trainer = Trainer(cfg)
    adapter = trainer.train().adapter_dir
    before = _snapshot(adapter)
    assert {"trainable.safetensors", "fasttune_adapter.json", "adapter_model.safetensors"} <= set(before)

    import torch

    with torch.no_grad():  # different weights, so a half-replaced adapter would show
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(tokenizer, path):
        raise OSError("simulated crash after the weights were written")

    monkeypatch.setattr(trainer_module, "save_tokenizer", crash)
    trainer.step = 99
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save_adapter()
    assert _snapshot(adapter) == before  # the old adapter, complete and consistent
    assert sorted(p.name for p in adapter.parent.iterdir() if ".tmp-" in p.name) == []

    # a full disk while writing it says so, and the old adapter still stands
    def full(tokenizer, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_tokenizer", full)
    with pytest.raises(ckpt.DiskFull, match="disk full while writing the adapter"):
        trainer.save_adapter()
    assert _snapshot(adapter) == before

    monkeypatch.undo()
    trainer.save_adapter()  # and a successful save replaces it whole
    after = _snapshot(adapter)
    assert after.keys() == before.keys() and after["trainable.safetensors"] != before["trainable.safetensors"]
    assert json.loads(after["fasttune_adapter.json"])["step"] == 99


# ---- symlinks, a full disk, leftovers -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml", "adapter", "checkpoints/step-000001"])
def test_a_symlink_in_the_run_folder_is_refused_and_its_target_untouched(model, tmp_path, capsys, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious"
    target.write_text("the user's own file\n")
    out = tmp_path / "out"
    link = out / name
    link.parent.mkdir(parents=True)
    link.symlink_to(target if "." in name else outside)
    cfg = _write_config(model, out, tmp_path / "run.yaml")
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert main(["train", str(cfg), *flags]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "is a symbolic link" in line and "remove the link" in line
    assert target.read_text() == "the user's own file\n" and [p.name for p in outside.iterdir()] == ["precious"]


def test_a_full_disk_while_checkpointing_says_so_and_leaves_no_temporary_folder(model, tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "out"
    cfg = _write_config(model, out, tmp_path / "run.yaml", max_steps=2, save_every=1)
    assert main(["train", str(cfg)]) == 0

    def full(*args, **kwargs):  # what torch.save's zip writer says when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1600 vs 1530")

    monkeypatch.setattr(ckpt, "save_file", full)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "--set", "train.max_steps=3"]) == 1
    err = capsys.readouterr().err
    assert "disk full while writing the checkpoint of step 3" in err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert run_folder.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not run_folder.is_disk_full(RuntimeError("something else"))


def test_temporary_folders_of_killed_runs_are_cleaned_on_the_next_run(tmp_path):
    out = tmp_path / "out"
    dead, live = _dead_pid(), os.getppid()  # the parent of this process is alive
    leftovers = [out / "checkpoints" / f".tmp-step-000003-{dead}", out / "checkpoints" / ".tmp-step-000004-sharded",
                 out / f".adapter.tmp-{dead}", out / f".adapter.old-{dead}",  # aside copy, shadowed by adapter/
                 out / f".export.tmp-{dead}"]
    kept = [out / "checkpoints" / f".tmp-step-000005-{live}", out / f".adapter.tmp-{live}"]
    for p in leftovers + kept:
        p.mkdir(parents=True)
        (p / "file").write_text("x")
    (out / "adapter").mkdir()
    (out / "adapter" / "weights").write_text("the adapter")
    (out / f".config.yaml.tmp-{dead}").write_text("half")
    run_folder.prepare(out, resume=True, overwrite=False).release()
    assert not any(p.exists() for p in leftovers) and not (out / f".config.yaml.tmp-{dead}").exists()
    assert all(p.exists() for p in kept)

    # an aside copy with no adapter/ beside it is the only complete copy (a crash between the two renames): restored
    os.rename(out / "adapter", out / f".adapter.old-{dead}")
    run_folder.prepare(out, resume=True, overwrite=False).release()
    assert (out / "adapter" / "weights").read_text() == "the adapter"
    assert not (out / f".adapter.old-{dead}").exists()
