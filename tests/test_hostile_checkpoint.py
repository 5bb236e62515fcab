"""Checkpoints as untrusted input (issue 19 items 1, 4 and 10): no file read on resume can run code, a resume refuses
settings it cannot honour and applies those it can, a divergence names a checkpoint whose weights are sound, and every
failure is one line saying what to do. CPU, a 2-layer random Llama."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fasttune.cli import main
from fasttune.models.checkpoint import CheckpointError
from fasttune.train import ConfigError, TrainConfig, Trainer
from fasttune.train import checkpoint as ckpt

from test_train import make_small_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Pickles as a call to os.system: loading it with plain pickle runs the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _yaml(model: Path, out: Path, **train) -> str:
    t = {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "save_every": 1,
         "keep_last": 5, "schedule": "constant", "progress": False, "tensorboard": False, "plot": False,
         "memory": "none", **train}
    return (f"model: {{path: {model}, max_seq_length: 96, device: cpu}}\nlora: {{r: 4, alpha: 8}}\n"
            "data: {path: 'bundled:instructions', max_examples: 24, eval_fraction: 0.0}\n"
            f"train: {json.dumps(t)}\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run with checkpoints step-1 and step-2 (copied, never modified, by the tests)."""
    base = tmp_path_factory.mktemp("hostile")
    model = make_small_model(base / "model")
    cfg = base / "run.yaml"
    cfg.write_text(_yaml(model, base / "out"))
    assert main(["train", str(cfg)]) == 0
    return {"model": model, "out": base / "out"}


def _copy_run(run, dst: Path, **train) -> Path:
    """A copy of the run folder and a config for it (train keys overridden); returns the config path."""
    shutil.copytree(run["out"], dst / "out")
    cfg = dst / "run.yaml"
    cfg.write_text(_yaml(run["model"], dst / "out", **train))
    return cfg


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- no code from checkpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "scheduler.pt"])
def test_a_payload_in_any_checkpoint_file_is_refused_and_never_runs(run, tmp_path, name):
    step = tmp_path / "step-000002"
    shutil.copytree(run["out"] / "checkpoints" / "step-000002", step)
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker)}, step / name)
    with pytest.raises(CheckpointError, match=rf"{name} holds Python objects other than tensors.*can run code") as e:
        ckpt.load_checkpoint(step)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_resume_from_a_planted_rng_file_exits_2_in_one_line_and_runs_nothing(run, tmp_path, capsys):
    """The issue's attack: `fasttune train base.yaml --resume evilckpt` ran the payload and exited 0."""
    cfg = _copy_run(run, tmp_path, max_steps=3)
    evil = tmp_path / "out" / "checkpoints" / "step-000002"
    marker = tmp_path / "PWNED"
    torch.save({"python": Payload(marker), "torch": torch.get_rng_state()}, evil / "rng.pt")
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", str(evil)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "rng.pt holds Python objects" in line and "never unpickles" in line
    assert not marker.exists()


def _plain_module():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_a_sharded_checkpoint_is_read_without_unpickling_anything_but_its_index(tmp_path):
    """torch.distributed.checkpoint pickles its index (.metadata) and reads non-tensor items with
    weights_only=False; fasttune reads both through an allow-list."""
    import torch.distributed.checkpoint as dcp

    model, opt = _plain_module()
    folder = tmp_path / "step-000001"
    (folder / ckpt.SHARDED).mkdir(parents=True)
    dcp.save(ckpt._sharded_state(model, opt), checkpoint_id=str(folder / ckpt.SHARDED))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_opt = _plain_module()
    ckpt.load_sharded_weights_and_optimizer(folder, fresh, fresh_opt)  # a real index loads
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, want[k])

    marker = tmp_path / "PWNED"
    index = folder / ckpt.SHARDED / ".metadata"
    index.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata holds Python objects other than a checkpoint index"):
        ckpt.load_sharded_weights_and_optimizer(folder, fresh, fresh_opt)
    assert not marker.exists()

    # a non-tensor item (stored with torch.save) carrying a payload
    items = tmp_path / "items"
    dcp.save({"x": Payload(marker)}, checkpoint_id=str(items))
    with pytest.raises(CheckpointError, match=r"item x holds Python objects"):
        ckpt._read_sharded({"x": 0}, items, no_dist=True)
    assert not marker.exists()


def test_every_reader_in_src_is_safe():
    """No torch.load without weights_only=True and no pickle.load anywhere in fasttune (the index unpickler
    above is the one allow-listed Unpickler)."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "fasttune"
    for f in src.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.end():m.end() + 300].split("\n\n")[0]
            assert "weights_only=True" in call, f"{f}: torch.load({call[:80]}"
        assert not re.search(r"pickle\.loads?\(|weights_only=False|yaml\.load\(|yaml\.unsafe_load", text), f


# ---- corrupt or mismatched checkpoints: one line, what to do -----------------------------------------------------

def test_resume_with_no_checkpoint_is_one_line(small_model_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(_yaml(small_model_dir, tmp_path / "out"))
    assert main(["train", str(cfg), "--resume"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no checkpoint in" in line and "run without --resume" in line


@pytest.fixture(scope="module")
def small_model_dir(run):
    return run["model"]


def test_resume_with_a_changed_lora_rank_names_the_key(run, tmp_path, capsys):
    cfg = _copy_run(run, tmp_path, max_steps=3)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "--set", "lora.r=8"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "cannot resume from" in line and "lora.r 4 -> 8" in line and "--overwrite" in line


def test_corrupt_or_mismatched_weights_are_one_line(run, tmp_path, capsys):
    cfg = _copy_run(run, tmp_path, max_steps=3)
    step = tmp_path / "out" / "checkpoints" / "step-000002"
    weights = step / "trainable.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "trainable.safetensors is missing or corrupt" in line and "another checkpoint" in line

    # right names, wrong shapes (a checkpoint whose recorded config does not say so: only the tensors can tell)
    state = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file_bytes(good).items()}
    save_file(state, str(weights))
    ts = json.loads((step / "trainer_state.json").read_text())
    ts.pop("config")
    (step / "trainer_state.json").write_text(json.dumps(ts))
    assert main(["train", str(cfg), "--resume"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "has shape" in line and "different model or lora.r" in line


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


# ---- a resume applies what it may change, refuses the rest -------------------------------------------------------

def _trainer(run, out: Path, **train) -> Trainer:
    raw = {"model": {"path": str(run["model"]), "max_seq_length": 96, "device": "cpu"}, "lora": {"r": 4, "alpha": 8},
           "data": {"path": "bundled:instructions", "max_examples": 24, "eval_fraction": 0.0},
           "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 1e-2,
                     "save_every": 1, "keep_last": 5, "schedule": "constant", "progress": False,
                     "tensorboard": False, "plot": False, "memory": "none", **train}}
    return Trainer(TrainConfig.from_dict(raw))


def test_resume_applies_a_new_learning_rate_and_schedule(run, tmp_path):
    """--resume --set train.lr=1e-5 used to keep training at the checkpoint's lr while config.yaml said 1e-5."""
    shutil.copytree(run["out"], tmp_path / "out")
    trainer = _trainer(run, tmp_path / "out", lr=1e-3, max_steps=4, schedule="linear", warmup_steps=0,
                       betas=[0.8, 0.99], weight_decay=0.1)
    result = trainer.train(resume=True)
    assert trainer.scheduler.base_lrs == [1e-3]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # steps 1-2 ran at the old constant 1e-2; step 3 (scheduler step 2 of 4, linear) at 1e-3 x (1 - 2/4)
    assert lrs[1] == lrs[2] == pytest.approx(1e-2)
    assert lrs[3] == pytest.approx(1e-3 * 0.5) and lrs[4] == pytest.approx(1e-3 * 0.25)
    g = trainer.optimizer.param_groups[0]
    assert tuple(g["betas"]) == (0.8, 0.99) and g["weight_decay"] == 0.1 and g["initial_lr"] == 1e-3
    assert result.step == 4


def test_resume_refuses_what_it_cannot_change_and_names_every_key(run, tmp_path):
    shutil.copytree(run["out"], tmp_path / "out")
    trainer = _trainer(run, tmp_path / "out", batch_size=1, seed=3, max_steps=3)
    with pytest.raises(ConfigError) as e:
        trainer.train(resume=True)
    msg = str(e.value)
    assert "train.batch_size 2 -> 1" in msg and "train.seed 0 -> 3" in msg and "\n" not in msg
    # nothing in the folder changed: the refusal comes before the lock is even taken
    assert ckpt.latest_checkpoint(tmp_path / "out").name == "step-000002"
    # cadence, length and display keys may change
    _trainer(run, tmp_path / "out", max_steps=3, save_every=2, eval_every=1, keep_last=3, log_every=1,
             max_grad_norm=0.5).train(resume=True)


# ---- the last good checkpoint after a divergence ------------------------------------------------------------------

def _fake_checkpoint(root: Path, step: int, value: float) -> None:
    d = root / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    save_file({"model.w": torch.full((4,), value)}, str(d / "trainable.safetensors"))
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch_index": step}))


def test_last_good_checkpoint_skips_nonfinite_and_blown_up_weights(tmp_path):
    _fake_checkpoint(tmp_path, 1, 0.05)
    _fake_checkpoint(tmp_path, 2, 3.0)
    _fake_checkpoint(tmp_path, 3, 1e9)  # finite, but 1e9: what one step at lr 1e9 leaves
    _fake_checkpoint(tmp_path, 4, float("nan"))
    assert ckpt.last_good_checkpoint(tmp_path).name == "step-000002"  # reference: the oldest finite one
    assert ckpt.last_good_checkpoint(tmp_path, reference=2e6).name == "step-000003"
    shutil.rmtree(tmp_path / "checkpoints" / "step-000001")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000002")
    # the run's own start scale as the reference: the blown-up step-3 is not good even as the oldest left
    assert ckpt.last_good_checkpoint(tmp_path, reference=0.05) is None


def test_divergence_names_a_checkpoint_with_sound_weights(run, tmp_path, capsys):
    """Two good steps, then a resume at lr 1e9: the next checkpoint holds |w| ~ 1e9 (finite), and the run diverges
    after it. The message must name step-2, not the blown-up one that `--resume` alone would pick."""
    cfg = _copy_run(run, tmp_path, lr=1e9, max_steps=8, max_grad_norm=None)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "stopped without updating the weights" in err
    steps = ckpt.list_checkpoints(tmp_path / "out")
    assert len(steps) > 2  # at least one checkpoint was written after the resume ...
    finite, scale = ckpt.checkpoint_weight_scale(steps[-1])
    assert not finite or scale > 1e6  # ... and its weights are ruined
    good = tmp_path / "out" / "checkpoints" / "step-000002"
    assert f"The last good checkpoint is {good}: change the config, then resume from it with --resume {good}" in err
