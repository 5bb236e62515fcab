#!/usr/bin/env python
"""What one MoE layer launches: the aten ops and Triton kernel launches of one SparseMoE forward + backward with
LoRA on the experts (and on the router with --router-lora), counted op by op (issue 17: the host side of a step).

Counts do not depend on the sizes, so a tiny Qwen3-MoE layer on the CPU gives the GPU step's counts: the Triton
kernels run in their interpreter (FASTTUNE_KERNELS=triton, TRITON_INTERPRET=1; the interpreter's own tensor
copies are not counted), every aten op reaching the dispatcher below autograd is counted once (views, which launch
nothing, are listed apart). On a GPU (--device cuda) the same counts come from the real launches.

    python bench/moe_op_count.py                    # experts' LoRA (as bench/moe_train.py's fasttune rows)
    python bench/moe_op_count.py --router-lora      # and the router's
    python bench/moe_op_count.py --scope model      # a one-layer model's whole step (attention, norms, loss too)
    python bench/moe_op_count.py --json $OUT/ops.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTTUNE_KERNELS"] = "triton"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class _OpCounter(TorchDispatchMode):
    """Counts aten ops by name, except while a Triton kernel is being launched (the interpreter copies its
    arguments with aten ops that a GPU launch does not run)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views: Counter[str] = Counter()
        self.triton: Counter[str] = Counter()
        self.where: Counter[str] = Counter()  # op @ where it came from (--trace)
        self._in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_launch:
            name = func.overloadpacket.__name__
            view = func.is_view or name in ("detach", "_unsafe_view", "alias")
            (self.views if view else self.ops)[name] += 1
            if not view:
                self.where[f"{name} @ {_origin()}"] += 1
        return func(*args, **(kwargs or {}))


def _origin() -> str:
    """The autograd node running the op (backward), else the innermost fasttune source line (forward)."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return node.name()
    for fr in reversed(traceback.extract_stack()):
        if "/fasttune/" in fr.filename.replace(os.sep, "/"):
            return f"{fr.filename.rsplit('fasttune/', 1)[1]}:{fr.lineno} {fr.line}"
    return "?"


def _launch_hook(counter: _OpCounter):
    """A sys.setprofile hook that counts Triton launches (the interpreter's GridExecutor.__call__, or the JIT's
    run on a GPU) and pauses op counting inside them. Observation only: nothing is replaced."""
    def hook(frame, event, arg):
        code = frame.f_code
        if code.co_name not in ("__call__", "run"):
            return
        fname = code.co_filename.replace(os.sep, "/")
        launch = ((code.co_name == "__call__" and fname.endswith("triton/runtime/interpreter.py")
                   and "self" in frame.f_locals and type(frame.f_locals["self"]).__name__ == "GridExecutor")
                  or (code.co_name == "run" and fname.endswith("triton/runtime/jit.py")))
        if not launch:
            return
        if event == "call":
            if counter._in_launch == 0:
                fn = frame.f_locals["self"].fn
                counter.triton[getattr(fn, "__name__", str(fn))] += 1
            counter._in_launch += 1
        elif event == "return":
            counter._in_launch -= 1
    return hook


def build_model(device: torch.device, targets: list[str], dtype: torch.dtype):
    import transformers

    import fasttune
    from fasttune.models import ArchSpec, CausalLM

    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    torch.manual_seed(0)
    model = CausalLM(ArchSpec.from_hf_config(cfg.to_dict()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(device, dtype)
    fasttune.add_lora(model, r=4, alpha=4, target_modules=targets)
    with torch.no_grad():  # B starts at zero; nonzero so nothing is skipped as trivially zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()
    return model


def count(device: torch.device, router_lora: bool, dtype: torch.dtype, scope: str = "moe", tokens: int = 24) -> dict:
    """scope "moe": the MoE layer (router + experts) alone, LoRA on the experts (and router); "model": a one-layer
    model's whole training step, LoRA as bench/moe_train.py puts it (q, k, v, o and the experts; and router)."""
    experts = ["gate_proj", "up_proj", "down_proj"] + (["router"] if router_lora else [])
    model = build_model(device, experts + (["q_proj", "k_proj", "v_proj", "o_proj"] if scope == "model" else []),
                        dtype)
    if scope == "moe":
        mlp = model.model.layers[0].mlp
        x = torch.randn(1, tokens, mlp.spec.hidden_size, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(1, tokens, mlp.spec.hidden_size, device=device, dtype=dtype)
        leaves = [x]

        def forward():
            return mlp(x)

        def backward(y):
            y.backward(dy)
    else:
        ids = torch.randint(0, model.spec.vocab_size, (1, tokens), device=device)
        leaves = []

        def forward():
            return model(ids, labels=ids).loss

        def backward(loss):
            loss.backward()

    backward(forward())  # first call: autotuning / compilation
    model.zero_grad(set_to_none=True)  # as the optimizer leaves them: the counted backward's AccumulateGrad copies none
    for t in leaves:
        t.grad = None
    counts = {}
    for phase in ("forward", "backward"):
        counter = _OpCounter()
        y = forward() if phase == "backward" else None
        sys.setprofile(_launch_hook(counter))
        try:
            with counter:
                if phase == "forward":
                    forward()
                else:
                    backward(y)
        finally:
            sys.setprofile(None)
        counts[phase] = dict(aten=dict(counter.ops.most_common()), views=dict(counter.views.most_common()),
                             triton=dict(counter.triton.most_common()), aten_total=sum(counter.ops.values()),
                             views_total=sum(counter.views.values()), triton_total=sum(counter.triton.values()),
                             where=dict(counter.where.most_common()))
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router-lora", action="store_true", help="LoRA on the router too")
    ap.add_argument("--scope", choices=("moe", "model"), default="moe",
                    help="moe: the MoE layer alone; model: a one-layer model's whole step (attention, norms, loss)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (as the GPU step) or float32")
    ap.add_argument("--trace", action="store_true", help="also list where each op comes from")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    counts = count(device, args.router_lora, dtype, args.scope)
    for phase, c in counts.items():
        print(f"{phase}: {c['aten_total']} aten ops (+{c['views_total']} views), {c['triton_total']} Triton launches")
        for name, n in c["aten"].items():
            print(f"    {n:3d}  aten::{name}")
        for name, n in c["triton"].items():
            print(f"    {n:3d}  triton {name}")
        print("    views: " + ", ".join(f"{k} {v}" for k, v in c["views"].items()))
        if args.trace:
            for where, n in c["where"].items():
                print(f"    {n:3d}  {where}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
