"""`fasttune demo`: a real LoRA fine-tune of the shipped tiny model on the bundled instruction dataset, on CPU.

It trains for `steps` optimizer steps (default 60) with packing, prints the loss as it falls, evaluates on a
held-out split, saves the adapter, writes the loss curve and metrics, then answers a few held-out style
questions with the base model and with the fine-tuned adapter, so the change is visible.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import TrainConfig

DEMO_QUESTIONS = ("What is the capital of Italy?", "Is 82 a prime number?")


def demo_config(output_dir: str = "runs/demo", steps: int = 60, device: str = "cpu", seed: int = 0) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"path": "tiny", "max_seq_length": 512, "device": device, "dtype": "float32"},
        "lora": {"r": 16, "alpha": 32},
        "data": {"path": "bundled:instructions", "eval_fraction": 0.05, "packing": True},
        "objective": {"type": "sft"},
        "train": {"output_dir": output_dir, "seed": seed, "batch_size": 1, "grad_accum": 1, "max_steps": steps,
                  "lr": 5e-3, "schedule": "cosine", "warmup_steps": 5, "eval_every": max(1, steps // 3),
                  "save_every": None, "keep_last": 1, "log_every": 1, "memory": "none"},
    })


def run_demo(output_dir: str = "runs/demo", steps: int = 60, device: str = "cpu", seed: int = 0,
             questions: tuple[str, ...] = DEMO_QUESTIONS, progress: bool = True) -> dict:
    from ..chat import ChatSession
    from .trainer import Trainer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = demo_config(output_dir, steps, device, seed)
    cfg.train.progress = progress
    trainer = Trainer(cfg)
    model, tokenizer = trainer.model, trainer.tokenizer
    from ..adapters import disable_adapters

    before = {}
    session = ChatSession(model, tokenizer, max_new_tokens=48)
    with disable_adapters(model):
        for q in questions:
            before[q] = session.complete([{"role": "user", "content": q}])
    eval_before = trainer.evaluate().get("eval_loss")
    model.train()
    result = trainer.train(overwrite=True)  # the demo folder is the demo's own: a second demo replaces it
    after = {q: ChatSession(model, tokenizer, max_new_tokens=48).complete([{"role": "user", "content": q}])
             for q in questions}
    losses = result.losses
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"\ntrain loss: {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps)")
    if result.eval:
        print(f"held-out eval loss: {eval_before:.3f} before -> {result.eval[-1]['eval_loss']:.3f} after")
    for q in questions:
        print(f"\nQ: {q}\n  base model:       {before[q]!r}\n  after fine-tune:  {after[q]!r}")
    out = Path(output_dir)
    print(f"\nadapter: {result.adapter_dir}\nloss curve: {out / 'loss.png'}\nmetrics: {out / 'metrics.jsonl'}\n"
          f"chat with it: fasttune chat --adapter {result.adapter_dir}")
    return {"result": result, "before": before, "after": after, "first_loss": first, "last_loss": last}
