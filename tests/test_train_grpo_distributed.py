"""Issue 18 on CPU: GRPO under DDP with 2 gloo processes (torchrun) against one process with the same global batch.

Design (as TRL): each rank takes its own micro-batches of a step's group, so the ranks roll out different prompts;
the G completions of a prompt stay on its rank, so the group advantages are local. The sampling seed depends on
(train.seed, step) only and each prompt samples from the sampler rows of its place in the whole group: the ranks
draw different completions, and 2 ranks x 1 prompt roll out exactly what 1 process x 2 prompts does. The loss of
every micro-batch is divided by the step's global count of sequences (and, for Dr. GRPO, the constant
max_new_tokens), so the gradients agree up to the order of floating-point summation.

FSDP2 cannot run GRPO yet (the config refuses it): generation needs whole weights on every rank."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fasttune.train import Trainer, TrainConfig, train
from fasttune.train.config import ConfigError

LOSSES = ("grpo", "dr_grpo", "gspo")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
# metrics that depend on the rollouts and the update, not on the wall clock
SAME_METRICS = ("loss", "grad_norm", "reward", "reward_std", "reward/r", "kl", "clip_fraction", "completion_length",
                "completion_length_max", "tokens", "target_tokens")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The small test model with a peaked LM head (so a group's completions differ, and so do their rewards) whose
    EOS row points along the mean final hidden state of generated text, so that completions stop after varying
    numbers of tokens (the length normalisations and token means then differ between ranks and sequences)."""
    from safetensors.torch import save_file

    from fasttune import load
    from fasttune.generation import Generator, SamplingParams
    from fasttune.train.grpo import prepare_prompts
    from test_train import make_small_model
    from test_train_grpo import _peaked

    root = tmp_path_factory.mktemp("grpo_ddp_model")
    path = _peaked(make_small_model(root / "base", tied=False), root / "model", scale=10.0)
    model, tok = load(str(path), device="cpu", dtype=torch.float32)
    data = TrainConfig.from_dict({"data": {"path": "bundled:instructions", "max_examples": 12}}).data
    prompts = [e["prompt_ids"] for e in prepare_prompts(data, tok, 40, 0, "chat").train]
    done = Generator(model, max_batch_size=36, max_seq_len=64).generate(
        prompts, SamplingParams(max_new_tokens=5, stop_token_ids=[], seed=5), num_samples=3)
    with torch.no_grad():
        hidden = torch.cat([model(torch.tensor([p + c]), return_logits=False).last_hidden_state[0, len(p) - 1:]
                            for p, group in zip(prompts, done) for c in group])
        mean = hidden.mean(0)
        # |h| ~ 5.7 and cos(h, mean) ~ 0.7 +- 0.15 on these contexts: an EOS logit around 9 +- 2, beside a largest
        # logit around 10
        eos_row = 2.6 * mean / mean.norm()
    state = load_file(str(path / "model.safetensors"))
    state["lm_head.weight"][tok.eos_token_id] = eos_row
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _raw(model: Path, reward: Path, out: Path, grad_accum: int, loss: str = "grpo", mu: int = 1,
         max_steps: int = 3, generation_batch_size: int | None = None) -> dict:
    return {"model": {"path": str(model), "max_seq_length": 96, "device": "cpu", "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8},
            "data": {"path": "bundled:instructions", "max_examples": 12},
            "objective": {"type": "grpo", "grpo": {
                "rewards": [f"{reward}:r"], "num_generations": 3, "max_new_tokens": 6, "max_prompt_length": 40,
                "beta": 0.05, "loss": loss, "num_iterations": mu, "samples_every": 1,
                "epsilon_low": 0.01, "epsilon_high": 0.01,  # small: the second use of a rollout clips some tokens
                "generation_batch_size": generation_batch_size}},
            "train": {"output_dir": str(out), "max_steps": max_steps, "batch_size": 1, "grad_accum": grad_accum,
                      "lr": 2e-2, "save_every": 1, "progress": False, "tensorboard": False, "plot": False,
                      "memory": "none", "parallel": "ddp", "seed": 10}}


def _reward(tmp_path: Path) -> Path:
    path = tmp_path / "r.py"
    path.write_text("def r(prompt, completion, row):\n    return float(sum(map(ord, completion)) % 7)\n")
    return path


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---- the gradient of one step: 2 ranks x 1 prompt == 1 process x 2 prompts --------------------------------------

def _one_step(raw: dict) -> dict:
    """For each loss type: the rollout of the first step (each rank's prompts and completions, gathered), the
    step's loss and metrics, and the trainable parameters' gradients after `accumulate` (all-reduced under DDP)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for loss in LOSSES:
        raw["objective"]["grpo"]["loss"] = loss
        trainer = Trainer(TrainConfig.from_dict(raw))
        # the rollout runs on the module itself: the DDP wrapper only serves the training forward
        assert trainer.rl.generator.model is trainer.model
        if trainer.dist.enabled:
            assert isinstance(trainer.engine, DDP) and trainer.engine.module is trainer.model
        total, record = trainer.rl.accumulate(trainer._next_group())
        G = raw["objective"]["grpo"]["num_generations"]
        rollout = [(e["prompt"], r["texts"][i * G:(i + 1) * G], r["lengths"][i * G:(i + 1) * G])
                   for r in trainer.rl.buffer for i, e in enumerate(r["examples"])]
        per_rank = [rollout]
        if trainer.dist.enabled:
            per_rank = [None] * trainer.dist.world_size
            dist.all_gather_object(per_rank, rollout)
        out[loss] = {"rollouts": per_rank, "loss": float(total),
                     "record": {k: float(v) for k, v in record.items()},
                     "grads": {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                               if p.requires_grad}}
    return out


def test_two_ranks_roll_out_different_prompts_and_give_one_process_gradient(model_dir, tmp_path):
    raw = _raw(model_dir, _reward(tmp_path), tmp_path / "unused", grad_accum=1)
    raw["objective"]["grpo"]["samples_every"] = 0  # no run folder: accumulate alone, outside train()
    (tmp_path / "two.json").write_text(json.dumps(raw))
    _torchrun(__file__, str(tmp_path / "two.json"), str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt")
    raw["train"]["grad_accum"] = 2
    one = _one_step(raw)

    for loss in LOSSES:
        a, b = one[loss], two[loss]
        (rank0, rank1), (alone,) = b["rollouts"], a["rollouts"]
        assert len(rank0) == len(rank1) == 1 and len(alone) == 2
        assert rank0[0][0] != rank1[0][0]  # different prompts on the two ranks ...
        assert rank0[0][1] != rank1[0][1]  # ... and different completions
        assert [rank0[0], rank1[0]] == alone  # the rollouts one process makes of both prompts
        # the case is not degenerate: completions of one group stop at different lengths, and rank 0's longest is
        # shorter than rank 1's (a length maximum or token count left rank-local would disagree)
        assert len(set(rank0[0][2])) > 1 and len(set(rank1[0][2])) > 1
        assert max(rank0[0][2]) < max(rank1[0][2])
        assert b["record"]["reward_std"] > 0  # the groups' rewards differ: the advantages are not all 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-8)
        for k in ("reward", "reward_std", "reward/r", "kl", "clip_fraction", "completion_length",
                  "completion_length_max", "tokens", "target_tokens"):
            assert b["record"][k] == pytest.approx(a["record"][k], rel=1e-6), (loss, k)
        assert a["grads"].keys() == b["grads"].keys()
        moved = 0
        for name, g in a["grads"].items():
            torch.testing.assert_close(b["grads"][name], g, rtol=1e-5, atol=1e-8, msg=f"{loss} {name}")
            moved += int(g.abs().max() > 0)
        assert moved > 0  # the gradient is not zero everywhere (so agreement is not trivial)


# ---- whole runs through the CLI: metrics, weights, samples, resume -------------------------------------------------

def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss,mu,generation_batch_size", [("dr_grpo", 1, 6), ("gspo", 2, None)])
def test_two_gloo_ranks_train_as_one_process_and_resume(model_dir, tmp_path, loss, mu, generation_batch_size):
    """1 prompt x 2 ranks == 1 prompt x 2 accumulation x 1 process, step by step: the loss, the gradient norm (which
    Adam's update would hide a scaling error from), the metrics reduced over ranks, the trained adapters and the
    sample completions (written by rank 0 only); a 2-rank checkpoint resumes to the same step 3 in one process and
    on 2 ranks. generation_batch_size 6: the one process decodes both prompts in one batch, each rank its one."""
    reward = _reward(tmp_path)
    kw = dict(loss=loss, mu=mu, generation_batch_size=generation_batch_size)
    train(TrainConfig.from_dict(_raw(model_dir, reward, tmp_path / "one", grad_accum=2, **kw)))
    two = tmp_path / "two"
    (tmp_path / "two.json").write_text(json.dumps(_raw(model_dir, reward, two, grad_accum=1, **kw)))
    proc = _torchrun("-m", "fasttune", "train", str(tmp_path / "two.json"))
    assert "x 2 device(s)" in proc.stdout and proc.stdout.count("fasttune: ") == 1

    rows1, rows2 = _rows(tmp_path / "one"), _rows(two)
    assert len(rows1) == len(rows2) == 3
    for r1, r2 in zip(rows1, rows2):
        for k in SAME_METRICS:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), (r1["step"], k, r1[k], r2[k])
    assert rows1[0]["reward_std"] > 0 and rows1[1]["kl"] > 0
    if mu == 2:  # the second use of a rollout: the update moved the policy past the 1% clip range
        assert rows1[1]["clip_fraction"] > 0
    w1 = load_file(str(tmp_path / "one" / "adapter" / "trainable.safetensors"))
    w2 = load_file(str(two / "adapter" / "trainable.safetensors"))
    assert w1.keys() == w2.keys() and any(float(w1[k].abs().max()) > 0 for k in w1 if "lora_B" in k)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    # rank 0 writes the samples (its first prompt's group each step), once: the same lines as the one process
    samples1 = (tmp_path / "one" / "samples.jsonl").read_text().splitlines()
    rollouts = -(-3 // mu)  # steps that made a rollout (with mu = 2, steps 1 and 3)
    assert len(samples1) == rollouts * 3 and (two / "samples.jsonl").read_text().splitlines() == samples1

    # the 2-rank checkpoint of step 2 resumes in one process (grad_accum 2) to the same step 3 ...
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    result = train(TrainConfig.from_dict(_raw(model_dir, reward, resumed, grad_accum=2, **kw)), resume=True)
    assert result.losses == pytest.approx([rows1[2]["loss"]], rel=1e-5)
    if loss == "dr_grpo":  # ... and on 2 ranks
        again = tmp_path / "again"
        shutil.copytree(two / "checkpoints" / "step-000002", again / "checkpoints" / "step-000002")
        (tmp_path / "again.json").write_text(json.dumps(_raw(model_dir, reward, again, grad_accum=1, **kw)))
        _torchrun("-m", "fasttune", "train", str(tmp_path / "again.json"), "--resume")
        (row,) = _rows(again)
        for k in SAME_METRICS:
            assert row[k] == pytest.approx(rows1[2][k], rel=1e-5, abs=1e-7), k


# ---- the pieces -----------------------------------------------------------------------------------------------------

def test_prompt_indices_make_split_generation_equal_one_call(model_dir):
    """The seam of data-parallel rollouts: prompts generated in separate calls with their indices in the whole
    batch draw exactly what one call over the batch draws; the index (not the call) picks the sampler rows."""
    from fasttune import load
    from fasttune.generation import Generator, SamplingParams

    model, tok = load(str(model_dir), device="cpu", dtype=torch.float32)
    gen = Generator(model, max_batch_size=8, max_seq_len=64)
    prompts = [tok("Name a colour.")["input_ids"], tok("Count to three, please.")["input_ids"],
               tok("Hi")["input_ids"]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=[], seed=123)
    whole = gen.generate(prompts, params, num_samples=2)
    parts = gen.generate([prompts[0], prompts[2]], params, num_samples=2, prompt_indices=[0, 2]) + \
        gen.generate([prompts[1]], params, num_samples=2, prompt_indices=[1])
    assert [parts[0], parts[2], parts[1]] == whole
    assert whole[0][0] != whole[0][1]  # the samples of a prompt differ ...
    assert gen.generate([prompts[1]], params, num_samples=2) != whole[1:2]  # ... and so does another index
    with pytest.raises(ValueError, match="prompt_indices"):
        gen.generate(prompts, params, num_samples=2, prompt_indices=[0, 1])


def test_grpo_refuses_fsdp(tmp_path):
    raw = _raw(Path("unused"), _reward(tmp_path), tmp_path / "run", grad_accum=1)
    raw["train"]["parallel"] = "fsdp"
    with pytest.raises(ConfigError, match=r"grpo does not support train.parallel: fsdp yet: generation needs the "
                                          r"whole weights.*use train.parallel: ddp"):
        TrainConfig.from_dict(raw)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_grpo_ddp_on_two_gpus_matches_one(tmp_path):
    """The bundled tiny model in bf16 on CUDA (NCCL, CUDA-graph rollouts, LoRA merged for generation): 2 GPUs x 1
    accumulation against 1 GPU x 2. A rank's generation rounds hold the same prompts as the one process's (the
    rounds are batch_size prompts), so step 1's rollouts, rewards and samples are identical; the loss and the
    gradient norm agree to bf16 summation order. (Run with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    NVSHMEM_DISABLE_NVLS=1 exported on the lent machines.)"""
    reward = _reward(tmp_path)

    def raw(out: Path, grad_accum: int) -> dict:
        r = _raw(Path("tiny"), reward, out, grad_accum, loss="dr_grpo", max_steps=2)
        r["model"].update({"path": "tiny", "max_seq_length": 256, "device": "cuda", "dtype": "bfloat16"})
        r["objective"]["grpo"].update({"num_generations": 4, "max_new_tokens": 32, "max_prompt_length": 64})
        r["train"]["batch_size"] = 2
        return r

    train(TrainConfig.from_dict(raw(tmp_path / "one", 2)))
    (tmp_path / "two.json").write_text(json.dumps(raw(tmp_path / "two", 1)))
    proc = subprocess.run([sys.executable, "-m", "fasttune", "train", str(tmp_path / "two.json"), "--gpus", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows1, rows2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(rows1) == len(rows2) == 2
    for k in ("reward", "reward_std", "completion_length", "completion_length_max", "tokens"):
        assert rows2[0][k] == pytest.approx(rows1[0][k], rel=1e-9), k
    assert rows1[0]["reward_std"] > 0
    for k in ("loss", "grad_norm"):
        assert rows2[0][k] == pytest.approx(rows1[0][k], rel=2e-2, abs=1e-4), k
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows2)
    first = lambda out: [line for line in (out / "samples.jsonl").read_text().splitlines()  # noqa: E731
                         if json.loads(line)["step"] == 1]
    assert first(tmp_path / "two") == first(tmp_path / "one") and len(first(tmp_path / "one")) == 4


if __name__ == "__main__":  # a torchrun worker of the gradient test: CONFIG.json OUT.pt
    from fasttune.train import distributed as dist_utils

    result = _one_step(json.loads(Path(sys.argv[1]).read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, sys.argv[2])
    dist_utils.cleanup()
    dist_utils.exit_worker(0)
