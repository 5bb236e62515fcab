"""Print fasttune-vs-transformers max relative errors per family (the numbers quoted in issue 2's note).

    python scripts/parity_report.py
"""
import sys
import tempfile
from pathlib import Path

import torch
import transformers

transformers.utils.logging.disable_progress_bar()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_models_parity import FAMILIES, build_pair, random_ids, rel_err  # noqa: E402

print(f"{'family':<8} {'fp32 logits':>12} {'fp32 loss':>10} {'fp32 grads':>11} {'bf16 logits':>12}")
for fam in FAMILIES:
    with tempfile.TemporaryDirectory() as d:
        hf, ours = build_pair(Path(d), fam)
        ids = random_ids()
        a, b = ours(ids, labels=ids, return_logits=True), hf(ids, labels=ids)
        a.loss.backward(); b.loss.backward()
        hp = {n: p.grad for n, p in hf.named_parameters()}
        op = {n: p.grad for n, p in ours.named_parameters()}
        if fam == "phi3":  # compare the checkpoint's fused tensors' gradients with ours concatenated
            for i in range(len(ours.layers)):
                pre = f"model.layers.{i}."
                op[pre + "self_attn.qkv_proj.weight"] = torch.cat(
                    [op.pop(pre + f"self_attn.{x}_proj.weight") for x in "qkv"])
                op[pre + "mlp.gate_up_proj.weight"] = torch.cat(
                    [op.pop(pre + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
        assert set(op) == set(hp), set(op) ^ set(hp)
        gerr = max(rel_err(g, hp[n]) for n, g in op.items())
        le = rel_err(a.logits, b.logits)
        lo = abs(a.loss.item() - b.loss.item()) / b.loss.item()
    with tempfile.TemporaryDirectory() as d:
        hf, ours = build_pair(Path(d), fam, dtype=torch.bfloat16)
        with torch.no_grad():
            be = rel_err(ours(ids).logits, hf(ids).logits.float())
    print(f"{fam:<8} {le:>12.2e} {lo:>10.2e} {gerr:>11.2e} {be:>12.2e}")
