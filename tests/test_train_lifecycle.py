"""Training lifecycle: learning-rate schedules (exact values, and against transformers' schedulers), the reward
model objective end to end (metrics, learning, resume), a real `fasttune train` process killed with SIGKILL and
resumed, and checkpoint replacement that never leaves a moment without a checkpoint. CPU, a 2-layer random Llama."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasttune.train import Trainer
from fasttune.train import checkpoint as ckpt
from fasttune.train.schedule import lr_factor, make_scheduler

from test_train import config, make_small_model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("small_model"))


def _metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metric_rows(out) if "loss" in r}


# ---- learning-rate schedules --------------------------------------------------------------------------------

def _lrs(kind: str, warmup: int, total: int, base=(1e-3, 1e-4), steps: int | None = None) -> list[list[float]]:
    """The learning rate of each param group at optimizer steps 0, 1, ... (the trainer reads the lr, steps the
    optimizer, then steps the scheduler), through the real scheduler on a real optimizer."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, base)])
    sched = make_scheduler(opt, kind, warmup, total)
    out = []
    for _ in range(total if steps is None else steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


# warm-up 4, 20 steps: warm-up (s + 1) / 4 at s = 0..3, then p = (s - 4) / 16
EXACT = {
    "linear": {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 12: 0.5, 16: 0.25, 19: 1 / 16},
    "cosine": {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 8: 0.5 * (1 + math.cos(math.pi / 4)), 12: 0.5,
               16: 0.5 * (1 + math.cos(3 * math.pi / 4)), 19: 0.5 * (1 + math.cos(15 * math.pi / 16))},
    "constant": {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 12: 1.0, 19: 1.0},
}


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_exact_values(kind):
    lrs = _lrs(kind, warmup=4, total=20)
    for step, factor in EXACT[kind].items():
        assert lrs[step][0] == pytest.approx(1e-3 * factor, rel=1e-12, abs=0), (kind, step)
        assert lrs[step][1] == pytest.approx(1e-4 * factor, rel=1e-12, abs=0), (kind, step)  # every group scaled
    assert max(g[0] for g in lrs) == pytest.approx(1e-3, rel=1e-12)  # the peak is the configured lr, never above
    assert all(g[0] > 0 for g in lrs)  # no step trains at lr 0 (step 0 included; the last step included)
    if kind != "constant":  # decays monotonically after warm-up, to 0 one step past the end
        after = [g[0] for g in lrs[4:]]
        assert all(a > b for a, b in zip(after, after[1:]))
        assert lr_factor(20, kind=kind, warmup=4, total=20) == pytest.approx(0.0, abs=1e-15)
        assert lr_factor(25, kind=kind, warmup=4, total=20) == pytest.approx(0.0, abs=1e-15)  # clamped past the end


def _independent(kind: str, s: int, warmup: int, total: int) -> float:
    """Written from the definitions: linear warm-up to the peak *at* the last warm-up step, then over the remaining
    total - warmup steps either linear decay to 0, half a cosine to 0, or constant."""
    if warmup and s < warmup:
        return (s + 1) / warmup
    n = max(total - warmup, 1)
    k = min(s - warmup, n)
    return {"linear": (n - k) / n, "cosine": (1 + math.cos(math.pi * k / n)) / 2, "constant": 1.0}[kind]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (1, 7), (3, 3), (5, 4), (10, 100), (7, 8)])
def test_schedule_matches_independent_formula(kind, warmup, total):
    lrs = _lrs(kind, warmup, total, base=(2e-4,), steps=total + 3)
    for s, (lr,) in enumerate(lrs):
        assert lr == pytest.approx(2e-4 * _independent(kind, s, warmup, total), rel=1e-12, abs=1e-18), s
    if warmup == 0:
        assert lrs[0][0] == 2e-4  # no warm-up: the first step has the full lr


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 12), (4, 20), (10, 100), (6, 7)])
def test_schedule_matches_transformers_step_by_step(kind, warmup, total):
    """Equal to transformers' get_*_schedule_with_warmup after warm-up; during warm-up fasttune is the same ramp
    one step earlier ((s + 1) / warmup instead of s / warmup): its first step trains at lr / warmup instead of 0, and
    the peak is reached at the last warm-up step."""
    optimization = pytest.importorskip("transformers.optimization")
    make_hf = {"linear": lambda o: optimization.get_linear_schedule_with_warmup(o, warmup, total),
               "cosine": lambda o: optimization.get_cosine_schedule_with_warmup(o, warmup, total),
               "constant": lambda o: optimization.get_constant_schedule_with_warmup(o, warmup)}[kind]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-4)
    hf = make_hf(opt)
    hf_lrs = []
    for _ in range(total + 1):
        hf_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    ours = [g[0] for g in _lrs(kind, warmup, total, base=(3e-4,))]
    for s in range(total):
        expected = hf_lrs[s + 1] if s < warmup else hf_lrs[s]
        assert ours[s] == pytest.approx(expected, rel=1e-12, abs=1e-18), (kind, s)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown schedule 'step'.*linear, cosine or constant"):
        lr_factor(5, kind="step", warmup=0, total=10)


def test_scheduler_state_resumes_the_same_lrs():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = make_scheduler(opt, "cosine", 3, 12)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    rest = []
    for _ in range(7):
        rest.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = make_scheduler(opt2, "cosine", 3, 12)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]  # what the optimizer state (in the checkpoint) restores
    again = []
    for _ in range(7):
        again.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert again == rest


def test_trainer_logs_the_scheduled_lr(small_model, tmp_path):
    """Step k (1-based) of a run trains at lr * factor(k - 1); warmup_ratio 0.25 of 8 steps is 2 warm-up steps;
    the embeddings' group follows the same schedule at its own base lr."""
    cfg = config(small_model, tmp_path, objective={"type": "pretrain", "embedding_lr_ratio": 0.1},
                 data={"path": "bundled:corpus", "max_examples": 30},
                 train={"max_steps": 8, "schedule": "cosine", "warmup_ratio": 0.25, "lr": 4e-3, "batch_size": 1,
                        "grad_accum": 1})
    trainer = Trainer(cfg)
    seen = []
    trainer.callbacks.append(lambda tr, rec: seen.append([g["lr"] for g in tr.optimizer.param_groups]))
    trainer.train()
    logged = [r["lr"] for r in _metric_rows(tmp_path) if "loss" in r]
    assert logged == pytest.approx([4e-3 * lr_factor(k, kind="cosine", warmup=2, total=8) for k in range(8)],
                                   rel=1e-12)
    assert logged[0] == pytest.approx(2e-3) and logged[1] == logged[2] == pytest.approx(4e-3)
    # after step k the optimizer holds the lr of step k + 1, in both groups
    for k, (main, emb) in enumerate(seen, start=1):
        f = lr_factor(k, kind="cosine", warmup=2, total=8)
        assert main == pytest.approx(4e-3 * f, abs=1e-15) and emb == pytest.approx(4e-4 * f, abs=1e-16)


# ---- reward model (Bradley-Terry) -----------------------------------------------------------------------------

def _reward_config(model, out, **over):
    sections = {"objective": {"type": "reward"},
                "data": {"path": "bundled:preferences", "max_examples": 16, "eval_fraction": 0.25},
                "train": {"max_steps": 12, "batch_size": 2, "grad_accum": 1, "lr": 2e-2, "schedule": "constant",
                          "eval_every": 6}}
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return config(model, out, **sections)


def test_reward_model_trains_and_logs_accuracy_and_margin(small_model, tmp_path):
    trainer = Trainer(_reward_config(small_model, tmp_path, lora={"dropout": 0.0}))
    assert trainer.data.kind == "preference" and len(trainer.data.train) == 12
    assert any(p is trainer.reward_head.score.weight for g in trainer.optimizer.param_groups for p in g["params"])

    # the first step's logged metrics, computed directly from the untrained model and head
    first = trainer._epoch(0)[0]
    with torch.no_grad():
        h = trainer.model(first["input_ids"], attention_mask=first["attention_mask"]).last_hidden_state
        last = first["attention_mask"].sum(-1) - 1
        r = h[torch.arange(h.shape[0]), last] @ trainer.reward_head.score.weight[0]
        margin = r[:2] - r[2:]
    head_before = trainer.reward_head.score.weight.detach().clone()
    train_pairs = trainer.data.train
    held_out = trainer.data.eval
    trainer.data.eval = train_pairs
    before = trainer.evaluate()
    trainer.data.eval = held_out

    result = trainer.train()
    assert len(result.losses) == 12 and all(math.isfinite(x) for x in result.losses)
    rows = _metric_rows(tmp_path)
    steps = [r for r in rows if "loss" in r]
    assert [s["step"] for s in steps] == list(range(1, 13))
    for s in steps:
        assert s["pairs"] == 2 and s["reward_accuracy"] in (0.0, 0.5, 1.0) and math.isfinite(s["reward_margin"])
    assert steps[0]["loss"] == pytest.approx(-F.logsigmoid(margin).mean().item(), rel=1e-5)
    assert steps[0]["reward_margin"] == pytest.approx(margin.mean().item(), rel=1e-4, abs=1e-6)
    assert steps[0]["reward_accuracy"] == (margin > 0).float().mean().item()
    evals = [r for r in rows if "eval_loss" in r]
    assert [e["step"] for e in evals] == [6, 12]
    assert all(0 <= e["eval_reward_accuracy"] <= 1 and math.isfinite(e["eval_reward_margin"]) for e in evals)

    # it learned: the head moved, and on the 12 training pairs (two epochs later) the loss fell and the preferred
    # answers score higher
    assert not torch.equal(head_before, trainer.reward_head.score.weight.detach())
    trainer.data.eval = train_pairs
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.05, (before, after)
    assert after["eval_reward_margin"] > before["eval_reward_margin"]
    assert after["eval_reward_accuracy"] >= 0.75
    # the head is part of every checkpoint and of the saved weights
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    torch.testing.assert_close(state["weights"]["reward_head.score.weight"], trainer.reward_head.score.weight.detach())
    from safetensors.torch import load_file

    assert "reward_head.score.weight" in load_file(str(result.adapter_dir / "trainable.safetensors"))


def test_reward_model_resume_reproduces_the_uninterrupted_losses(small_model, tmp_path):
    """Ctrl-C right after the periodic save of step 4 saves step 4 a second time (the replace path of
    save_checkpoint); the resumed run continues to the same losses and the same final head, bit for bit."""
    over = dict(lora={"dropout": 0.1}, train={"max_steps": 8, "save_every": 2, "keep_last": 5, "eval_every": None})
    full_trainer = Trainer(_reward_config(small_model, tmp_path / "full", **over))
    full = full_trainer.train()

    first = Trainer(_reward_config(small_model, tmp_path / "cut", **over))

    def interrupt(trainer, record):
        if trainer.step == 4:
            raise KeyboardInterrupt
    first.callbacks.append(interrupt)
    part = first.train()
    assert part.interrupted and part.step == 4 and part.losses == full.losses[:4]
    root = ckpt.checkpoint_root(tmp_path / "cut")
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]  # no aside / temp folder left

    resumed = Trainer(_reward_config(small_model, tmp_path / "cut", **over))
    rest = resumed.train(resume=True)
    assert part.losses + rest.losses == full.losses
    assert torch.equal(resumed.reward_head.score.weight, full_trainer.reward_head.score.weight)
    rows = [r for r in _metric_rows(tmp_path / "cut") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    full_rows = [r for r in _metric_rows(tmp_path / "full") if "loss" in r]
    assert [(r["reward_accuracy"], r["reward_margin"]) for r in rows] == \
        [(r["reward_accuracy"], r["reward_margin"]) for r in full_rows]


# ---- a real process, killed -----------------------------------------------------------------------------------

def test_sigkill_mid_run_then_resume_continues_the_same_losses(small_model, tmp_path):
    """`python -m fasttune train` is killed with SIGKILL (no handler runs: whatever it was writing stays half
    written) once checkpoints exist; `--resume` in a new process picks the newest complete checkpoint, never a
    temporary or partial folder, finishes, and logs the losses an uninterrupted run has."""
    n = 150
    sections = dict(model={"max_seq_length": 64}, lora={"dropout": 0.1},
                    data={"max_examples": 80},  # 72 training examples: the run crosses two epoch boundaries
                    train={"max_steps": n, "batch_size": 1, "grad_accum": 1, "save_every": 1, "keep_last": 2,
                           "schedule": "cosine", "warmup_steps": 5})
    # the subprocesses run single-threaded (OMP_NUM_THREADS=1); so does the reference, for identical sums
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = Trainer(config(small_model, tmp_path / "full", **sections)).train()
    finally:
        torch.set_num_threads(threads)
    assert len(full.losses) == n

    out = tmp_path / "cut"
    cfg_file = tmp_path / "cut.yaml"
    cfg_file.write_text(config(small_model, out, **sections).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fasttune", "train", str(cfg_file)]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        try:
            while time.time() < deadline and proc.poll() is None:
                done = [p for p in out.glob("checkpoints/step-*") if (p / "trainer_state.json").exists()]
                if any(int(p.name.split("-")[1]) >= 3 for p in done):
                    break
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    latest = ckpt.latest_checkpoint(out)
    k = int(latest.name.split("-")[1])
    assert 3 <= k < n - 10, "the run must be killed mid-way"
    assert not (out / "adapter").exists()

    # what else a crash can leave: a temporary folder (even one that looks complete), a step folder whose writing
    # never finished, and a half-written aside folder; none of them is a checkpoint
    root = ckpt.checkpoint_root(out)
    tmp = root / f".tmp-step-{k + 1:06d}-99999"
    tmp.mkdir(exist_ok=True)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": k + 1}))
    partial = root / f"step-{k + 5:06d}"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\0" * 10)
    (root / f".old-step-{k + 3:06d}-1").mkdir()
    (root / "step-latest").mkdir()
    assert ckpt.latest_checkpoint(out) == latest
    assert all(p.name.startswith("step-") and (p / "trainer_state.json").exists() for p in ckpt.list_checkpoints(out))

    done = subprocess.run(cmd + ["--resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resumed from {latest} at step {k}" in done.stdout
    assert (out / "adapter" / "trainable.safetensors").exists()

    losses = _step_losses(out)
    assert sorted(losses) == list(range(1, n + 1))  # metrics.jsonl reads as one run: the killed run's later lines
    for step in range(k + 1, n + 1):                # were dropped on resume
        assert losses[step] == pytest.approx(full.losses[step - 1], rel=1e-5, abs=0), step
    for step in range(1, k + 1):
        assert losses[step] == pytest.approx(full.losses[step - 1], rel=1e-5, abs=0), step
    # the leftovers were replaced or cleaned up by the resumed run's saves; the last two checkpoints remain
    assert sorted(p.name for p in root.iterdir()) == sorted(["step-latest", f"step-{n - 1:06d}", f"step-{n:06d}"])


# ---- replacing a checkpoint of the same step --------------------------------------------------------------------

class _Sched:
    def __init__(self, tag):
        self.tag = tag

    def state_dict(self):
        return {"tag": self.tag}


def _save(out, step, tag, keep_last=1):
    return ckpt.save_checkpoint(out, step, weights={"w": torch.full((2,), float(tag))}, optimizer_state={"tag": tag},
                                scheduler=_Sched(tag), trainer_state={"tag": tag}, keep_last=keep_last)


def _tag(path) -> int:
    return ckpt.load_checkpoint(path)["trainer_state"]["tag"]


def test_resaving_a_step_never_leaves_no_checkpoint(tmp_path, monkeypatch):
    """keep_last 1, step 7 saved again: a crash at any point of the replacement leaves a complete checkpoint of
    step 7 (the old or the new one) that latest_checkpoint finds; the old one is deleted only after the new one is
    in place."""
    first = _save(tmp_path, 7, 1)
    assert _tag(first) == 1

    real_replace = os.replace

    def crash_on(n):
        calls = {"n": 0}

        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == n:
                raise OSError("simulated crash")
            return real_replace(src, dst)
        return replace

    # crash on the 2nd rename (old already moved aside, new not yet in): the old checkpoint is still found
    monkeypatch.setattr(os, "replace", crash_on(2))
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 7, 2)
    monkeypatch.setattr(os, "replace", real_replace)
    found = ckpt.latest_checkpoint(tmp_path)
    assert found is not None and _tag(found) == 1 and found.name.startswith(".old-step-000007-")
    assert [_tag(p) for p in ckpt.list_checkpoints(tmp_path)] == [1]
    state = ckpt.load_checkpoint(found)
    assert state["weights"]["w"].tolist() == [1.0, 1.0] and state["scheduler"] == {"tag": 1}

    # the next save of that step puts a proper step-000007 back and removes every leftover
    final = _save(tmp_path, 7, 3)
    assert ckpt.latest_checkpoint(tmp_path) == final and _tag(final) == 3
    assert sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()) == ["step-000007"]

    # crash on the 1st rename (before anything moved): the old checkpoint is untouched
    monkeypatch.setattr(os, "replace", crash_on(1))
    with pytest.raises(OSError):
        _save(tmp_path, 7, 4)
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.latest_checkpoint(tmp_path) == final and _tag(final) == 3

    # crash after both renames, before the old one is deleted: the new one is step-000007, the aside is ignored
    real_rmtree = ckpt.shutil.rmtree

    def rmtree(path, *a, **kw):
        if Path(path).name.startswith(".old-"):
            return None  # the process died before deleting it
        return real_rmtree(path, *a, **kw)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    _save(tmp_path, 7, 5)
    assert any(p.name.startswith(".old-step-000007-") for p in ckpt.checkpoint_root(tmp_path).iterdir())
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert _tag(ckpt.latest_checkpoint(tmp_path)) == 5 and ckpt.latest_checkpoint(tmp_path).name == "step-000007"
    assert [_tag(p) for p in ckpt.list_checkpoints(tmp_path)] == [5]
    # a later save cleans the stale aside up and keep_last still holds
    _save(tmp_path, 8, 6)
    assert sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir()) == ["step-000008"]


def test_resave_without_a_crash_and_what_is_never_a_checkpoint(tmp_path):
    _save(tmp_path, 1, 1, keep_last=3)
    _save(tmp_path, 2, 2, keep_last=3)
    _save(tmp_path, 2, 3, keep_last=3)  # same step again: replaced, no leftover
    root = ckpt.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]
    assert [_tag(p) for p in ckpt.list_checkpoints(tmp_path)] == [1, 3]
    # an RNG state given to save_checkpoint (the trainer's, from the start of an interrupted step) is what it stores
    rng = ckpt.rng_state()
    torch.rand(3)
    path = ckpt.save_checkpoint(tmp_path, 2, weights={"w": torch.zeros(2)}, optimizer_state={}, scheduler=_Sched(4),
                                trainer_state={"tag": 4}, keep_last=3, rng=rng)
    assert torch.equal(ckpt.load_checkpoint(path)["rng"]["torch"], rng["torch"])
    # temporary folders (even with trainer_state.json), step folders without it, incomplete aside folders and
    # other names are not checkpoints
    for name in (".tmp-step-000009-5", "step-000010", ".old-step-000011-5", "step-000012.bak", "step-x"):
        (root / name).mkdir()
    (root / ".tmp-step-000009-5" / "trainer_state.json").write_text("{}")
    (root / "step-000012.bak" / "trainer_state.json").write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    # a complete aside folder counts only where its step-N is missing
    (root / ".old-step-000002-5").mkdir()
    (root / ".old-step-000002-5" / "trainer_state.json").write_text("{}")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    # saving step 9 removes the temporary folders of steps up to 9 that a crash left behind, and the shadowed aside
    _save(tmp_path, 9, 9, keep_last=3)
    names = sorted(p.name for p in root.iterdir())
    assert ".tmp-step-000009-5" not in names and ".old-step-000002-5" not in names
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001", "step-000002", "step-000009"]
