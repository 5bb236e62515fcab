"""Issue 9 on CPU: DDP and FSDP2 (fully_shard) with 2 gloo processes under torchrun gives the same per-step losses and the same trained
adapter weights as one process with the same global batch (1 micro-batch x 2 accumulation x 2 ranks == 1 x 4 x 1).
The ranks split each step's micro-batches between them; the loss of every micro-batch is divided by the step's
global count of target tokens, so only the order of floating-point summation differs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fasttune.train import TrainConfig, train

from test_train import make_small_model



def _yaml(model: Path, out: Path, grad_accum: int, objective: str, data: str, parallel: str = "ddp",
          load_in_4bit: bool = False, memory: str = "none", targets: str | None = None) -> str:
    return f"""
model: {{path: {model}, max_seq_length: 96, device: cpu, load_in_4bit: {str(load_in_4bit).lower()}}}
lora: {{r: 4, alpha: 8{f", target_modules: {targets}" if targets else ""}}}
data: {{path: "{data}", max_examples: 48, eval_fraction: 0.1}}
objective: {{type: {objective}}}
train: {{output_dir: {out}, max_steps: 3, batch_size: 1, grad_accum: {grad_accum}, lr: 1.0e-2, eval_every: 3, save_every: 2,
         progress: false, tensorboard: false, plot: false, memory: {memory}, parallel: {parallel}}}
"""


def _losses(out: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


@pytest.mark.parametrize("objective,data,parallel,qlora,memory", [
    ("sft", "bundled:instructions", "ddp", False, "none"),
    ("dpo", "bundled:preferences", "ddp", False, "none"),
    ("sft", "bundled:instructions", "fsdp", False, "none"),
    ("orpo", "bundled:preferences", "fsdp", False, "none"),
    ("sft", "bundled:instructions", "fsdp", True, "none"),
    # layer checkpointing under FSDP2 goes through PyTorch's checkpoint (fasttune's own would see no gradients for
    # sharded parameters); under DDP through fasttune's, with the layer inputs offloaded
    ("sft", "bundled:instructions", "fsdp", False, "checkpoint"),
    ("sft", "bundled:instructions", "ddp", False, "offload"),
    # LoRA on the (untied) LM head too: its adapters are sharded and start from the same values
    ("sft", "bundled:instructions", "fsdp", False, "lm_head")])
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path, objective, data, parallel, qlora,
                                                                     memory):
    lm_head = memory == "lm_head"
    memory, targets = ("none", "[q_proj, v_proj, down_proj, lm_head]") if lm_head else (memory, None)
    model = make_small_model(tmp_path / "model", tied=not lm_head)
    one = tmp_path / "one"
    (tmp_path / "one.yaml").write_text(_yaml(model, one, 4, objective, data, load_in_4bit=qlora, memory=memory,
                                             targets=targets))
    train(TrainConfig.from_yaml(tmp_path / "one.yaml"))

    two = tmp_path / "two"
    (tmp_path / "two.yaml").write_text(_yaml(model, two, 2, objective, data, parallel, load_in_4bit=qlora,
                                             memory=memory, targets=targets))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if parallel == "ddp" and objective == "sft":  # `fasttune train --gpus 2` re-launches itself under torchrun
        cmd = [sys.executable, "-m", "fasttune", "train", str(tmp_path / "two.yaml"), "--gpus", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fasttune", "train", str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 2 device(s)" in proc.stdout  # global batch stated in the log, once (rank 0 only)
    # FSDP2 (16-bit base) loads the checkpoint straight into shards: no rank holds the whole model
    assert ("loaded straight into FSDP2 shards" in proc.stdout) == (parallel == "fsdp" and not qlora)
    assert proc.stdout.count("fasttune: ") == 1

    loss1, eval1 = _losses(one)
    loss2, eval2 = _losses(two)
    assert len(loss1) == len(loss2) == 3
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(eval2), torch.tensor(eval1), rtol=1e-5, atol=1e-6)
    w1 = load_file(str(one / "adapter" / "trainable.safetensors"))
    w2 = load_file(str(two / "adapter" / "trainable.safetensors"))
    assert w1.keys() == w2.keys() and len(w1) > 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    # the weights really moved (so agreement is not trivial)
    assert any(float(w1[k].abs().max()) > 0 for k in w1 if "lora_B" in k)

    # the 2-rank checkpoint of step 2 resumes in one process (world size 1, grad_accum 4) to the same step 3
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    (tmp_path / "resumed.yaml").write_text(_yaml(model, resumed, 4, objective, data, load_in_4bit=qlora,
                                                 targets=targets))
    result = train(TrainConfig.from_yaml(tmp_path / "resumed.yaml"), resume=True)
    assert result.losses == pytest.approx([loss1[2]], rel=1e-5)

    if parallel == "fsdp":
        # FSDP2 writes the trainable weights and optimizer state sharded (one file a rank, nothing gathered) ...
        step2 = two / "checkpoints" / "step-000002"
        files = {p.name for p in (step2 / "sharded").iterdir()}
        assert sum(f.endswith(".distcp") for f in files) == 2 and ".metadata" in files, files
        assert not (step2 / "trainable.safetensors").exists() and not (step2 / "optimizer.pt").exists()
        if objective == "sft":  # ... and the same checkpoint resumes on 2 ranks too
            again = tmp_path / "again"
            shutil.copytree(step2, again / "checkpoints" / "step-000002")
            (tmp_path / "again.yaml").write_text(_yaml(model, again, 2, objective, data, parallel,
                                                       load_in_4bit=qlora, targets=targets))
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc_per_node=2", "-m", "fasttune", "train", str(tmp_path / "again.yaml"),
                                   "--resume"], capture_output=True, text=True, timeout=600, env=env)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert _losses(again)[0] == pytest.approx([loss1[2]], rel=1e-5)


def test_a_worker_leaves_through_os_exit_after_destroying_its_process_group(tmp_path, monkeypatch):
    """CI once saw a 2-rank FSDP2 worker abort (SIGABRT) during interpreter shutdown after it had saved everything:
    the gloo group outlives destroy_process_group (DTensor's caches hold the DeviceMesh that holds it), and its
    threads were torn down while the interpreter finalised. So `fasttune train`, in a process that joined a group,
    destroys the group and then leaves through os._exit with the run's exit status."""
    from fasttune.cli import main

    model = make_small_model(tmp_path / "model")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(_yaml(model, tmp_path / "out", 1, "sft", "bundled:instructions").replace("max_steps: 3",
                                                                                           "max_steps: 1"))
    exits: list[int] = []

    def fake_exit(code: int):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit):
            main(["train", str(cfg)])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert exits == [0]
    assert (tmp_path / "out" / "adapter" / "trainable.safetensors").exists()
    # a process that joined no group returns normally
    assert main(["train", str(cfg), "--set", f"train.output_dir={tmp_path / 'again'}"]) == 0 and exits == [0]
