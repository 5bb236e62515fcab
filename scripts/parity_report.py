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
import test_models_parity_new_families as new  # noqa: E402

BUILDERS = [(fam, build_pair) for fam in FAMILIES] + [(fam, new.build_pair) for fam in new.FAMILIES]

print(f"{'family':<9} {'fp32 logits':>12} {'fp32 loss':>10} {'fp32 grads':>11} {'bf16 logits':>12}")
for fam, build in BUILDERS:
    with tempfile.TemporaryDirectory() as d:
        hf, ours = build(Path(d), fam)
        ids = random_ids()
        a, b = ours(ids, labels=ids, return_logits=True), hf(ids, labels=ids)
        a.loss.backward(); b.loss.backward()
        hp = {n: p.grad for n, p in hf.named_parameters()}
        op = new._grads(ours, ours.spec.fused_checkpoint)  # Phi-3: ours concatenated as the checkpoint fuses them
        assert set(op) == set(hp), set(op) ^ set(hp)
        gerr = max(rel_err(g, hp[n]) for n, g in op.items())
        le = rel_err(a.logits, b.logits)
        lo = abs(a.loss.item() - b.loss.item()) / b.loss.item()
    with tempfile.TemporaryDirectory() as d:
        hf, ours = build(Path(d), fam, dtype=torch.bfloat16)
        with torch.no_grad():
            be = rel_err(ours(ids).logits, hf(ids).logits.float())
    print(f"{fam:<9} {le:>12.2e} {lo:>10.2e} {gerr:>11.2e} {be:>12.2e}")
