"""`fasttune compare A [B]`: the same tokens through two implementations, and the per-layer error between them.

Three ways to pick the two sides (the second side is the reference the error is measured against):
  compare A --ref transformers          fasttune's decoder vs transformers' own model, same checkpoint
  compare A B                           two checkpoints, both through fasttune (e.g. before/after a merge)
  compare A --dtype-a bf16 --dtype-b fp32   one checkpoint in two dtypes (the rounding floor of bf16)
The error per block is ||a - b|| / ||b|| over all token positions, printed and plotted as log10."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.checkpoint import DTYPES, load_model, load_tokenizer
from ..models.compare import LayerError, capture_hidden_states, compare_states, format_errors, plot_errors
from ..models.spec import ArchSpec


@dataclass
class CompareResult:
    label: str
    errors: list[LayerError]
    input_ids: torch.Tensor


def _transformers_model(path: str, dtype: torch.dtype | None, device: str):
    import transformers
    from transformers import AutoModelForCausalLM

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype if dtype is not None else "auto"}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()


def _input_ids(path: str, text: str | None, seq_len: int, seed: int, vocab_size: int) -> torch.Tensor:
    if text is not None:
        tok = load_tokenizer(path)
        ids = tok(text, add_special_tokens=True)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, seq_len), generator=g)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def compare_paths(a: str | os.PathLike, b: str | os.PathLike | None = None, ref: str = "fasttune",
                  dtype_a: str | None = None, dtype_b: str | None = None, text: str | None = None,
                  seq_len: int = 128, seed: int = 0, device: str = "cpu") -> CompareResult:
    """Per-block error of side A against reference side B (see the module docstring for the modes)."""
    a = str(a)
    b = str(b) if b is not None else None
    if ref not in ("fasttune", "transformers"):
        raise ValueError(f"--ref must be fasttune or transformers, got {ref!r}")
    if b is None and ref == "fasttune":
        if dtype_a is None and dtype_b is None:
            raise ValueError("compare needs a second side: a checkpoint B, --ref transformers, or two dtypes "
                             "(--dtype-a bf16 --dtype-b fp32)")
        dtype_b = dtype_b or "float32"
    spec = ArchSpec.from_pretrained(a)
    ids = _input_ids(a, text, seq_len, seed, spec.vocab_size).to(device)
    model_a = load_model(a, dtype=_dtype(dtype_a), device=device)
    states_a = capture_hidden_states(model_a, ids)
    label_a = f"fasttune {Path(a).name} ({model_a.dtype})".replace("torch.", "")
    del model_a
    ref_path = b or a
    if ref == "transformers":
        model_b = _transformers_model(ref_path, _dtype(dtype_b), device)
        label_b = f"transformers {Path(ref_path).name} ({next(model_b.parameters()).dtype})".replace("torch.", "")
    else:
        model_b = load_model(ref_path, dtype=_dtype(dtype_b), device=device)
        label_b = f"fasttune {Path(ref_path).name} ({model_b.dtype})".replace("torch.", "")
    states_b = capture_hidden_states(model_b, ids)
    del model_b
    return CompareResult(f"{label_a} vs {label_b}", compare_states(states_a, states_b), ids.cpu())


def add_compare_arguments(parser) -> None:
    parser.add_argument("model_a", metavar="A", help="model folder (the side under test)")
    parser.add_argument("model_b", metavar="B", nargs="?", default=None,
                        help="second model folder (the reference); omit to compare A with itself in another "
                             "dtype or against transformers")
    parser.add_argument("--ref", choices=("fasttune", "transformers"), default="fasttune",
                        help="implementation of the reference side (default: fasttune)")
    parser.add_argument("--dtype-a", default=None, help="dtype of side A: bf16, fp16, fp32 (default: the config's)")
    parser.add_argument("--dtype-b", default=None, help="dtype of the reference side (default: the config's; fp32 "
                                                        "when comparing A with itself)")
    parser.add_argument("--text", default=None, help="input text (tokenized with A's tokenizer); default: random ids")
    parser.add_argument("--seq-len", type=int, default=128, help="length of the random input (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", default="compare.png", help="PNG to write (default compare.png; '' for none)")


def run_compare(args) -> int:
    try:
        result = compare_paths(args.model_a, args.model_b, ref=args.ref, dtype_a=args.dtype_a, dtype_b=args.dtype_b,
                               text=args.text, seq_len=args.seq_len, seed=args.seed, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"fasttune compare: {e}")
        return 2
    print(result.label)
    print(f"{result.input_ids.shape[1]} tokens; error of A relative to B per block")
    print(format_errors(result.errors))
    worst = max(result.errors, key=lambda e: e.rel_l2)
    print(f"largest: {worst.name} rel L2 {worst.rel_l2:.3e} (log10 {worst.log10_rel_l2:.2f})")
    if args.plot:
        plot_errors({result.label: result.errors}, args.plot, title="per-layer hidden-state error")
        print(f"plot: {args.plot}")
    return 0
