"""Build the shipped tiny model: a Llama-architecture decoder sized for CPU demos and tests, briefly pre-trained
on fasttune's bundled text (corpus.txt, and the instructions/chats as plain prose without any chat template),
deterministic for a given torch build and thread count (the shipped file: OMP_NUM_THREADS=1, torch 2.13 CPU,
the defaults below). The README demo then teaches it the ChatML format with LoRA.

    python scripts/make_tiny_model.py            # writes src/fasttune/assets/tiny/{config.json,model.safetensors}
    python scripts/make_tiny_model.py --steps 0  # random init only (std 0.02), no pre-training

Shape: hidden 256, 4 layers, 4 query / 2 key-value heads (head_dim 64), intermediate 688, tied embeddings,
vocab = the bundled tokenizer's size. About 3.9M parameters, stored in bfloat16 (< 10 MB).
The tokenizer files in the same folder come from scripts/make_tokenizer.py and must exist first.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "fasttune" / "assets" / "tiny"
DATA = ROOT / "src" / "fasttune" / "assets" / "data"
CORPUS, INSTRUCTIONS, CONVERSATIONS = DATA / "corpus.txt", DATA / "instructions.jsonl", DATA / "conversations.jsonl"


def tiny_config(vocab_size: int, bos: int, eos: int, pad: int, hidden: int = 192, intermediate: int = 512,
                layers: int = 4) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "bfloat16",
    }


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Llama's initialisation: normal(0, std) for linears and embeddings, ones for norms."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, mean=0.0, std=std)


def pretraining_texts() -> list[str]:
    """corpus.txt paragraphs, plus the bundled instructions and chats as plain prose (question, then answer; no
    chat template), so the base model knows the domain's words and facts but not the chat format the demo teaches."""
    texts = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    for line in INSTRUCTIONS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append("\n".join(t for t in (row["instruction"], row.get("input"), row["output"]) if t))
    for line in CONVERSATIONS.read_text(encoding="utf-8").splitlines():
        texts.append("\n".join(turn["value"] for turn in json.loads(line)["conversations"]))
    return texts


def corpus_blocks(tokenizer, seq_len: int) -> torch.Tensor:
    """The pre-training texts as one token stream (BOS per document, EOS after it) cut into (N, seq_len) blocks."""
    ids: list[int] = []
    for text in pretraining_texts():
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="pre-training steps on the bundled text (0 = random init)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=192, help="hidden size (4 heads, 2 KV heads, head_dim hidden / 4)")
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=TINY)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from fasttune.models import ArchSpec, CausalLM, save_model

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(TINY))
    cfg = tiny_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                      hidden=args.hidden, intermediate=args.intermediate, layers=args.layers)
    model = CausalLM(ArchSpec.from_hf_config(cfg))
    init_weights(model)
    print(f"tiny model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {cfg['vocab_size']}")

    if args.steps > 0:
        blocks = corpus_blocks(tokenizer, args.seq)
        g = torch.Generator().manual_seed(args.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        warmup = max(1, args.steps // 10)
        def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        model.train()
        t0 = time.time()
        for step in range(args.steps):
            idx = torch.randint(0, blocks.shape[0], (args.batch,), generator=g)
            batch = blocks[idx]
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 20 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
        model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, args.out, dtype="bfloat16")
    # save_model writes spec.raw_config; keep the file readable and stable
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    size = (args.out / "model.safetensors").stat().st_size
    print(f"wrote {args.out}/config.json and model.safetensors ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
