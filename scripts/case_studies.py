"""Reproduce three known numerical bugs on tiny random models and plot their per-layer error
(docs/case_studies/*.md explain each). Every broken variant is implemented here, locally; the library stays right.

    python scripts/case_studies.py [--out docs/case_studies]

1. RoPE angles from bf16 positions (the bug of computing cos/sin under bf16 autocast): positions above 256 are
   not representable in bf16 and collide, and position * frequency rounds to bf16, so long sequences rotate
   queries and keys by the wrong angles.
2. Exact erf GELU where the model was trained with the tanh approximation (Gemma's gelu_pytorch_tanh).
3. RMSNorm cast order: Gemma computes x_normed * (1 + w) in float32 and casts last; applying Llama's order
   (cast x_normed to bf16 first, then multiply by (1 + w) in bf16) rounds 1 + w to 8 bits of mantissa.
Errors are relative L2 of each block's output against the same model in float32 with the correct math.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from fasttune.models import ArchSpec, CausalLM
from fasttune.models.compare import capture_hidden_states, compare_states, format_errors, plot_errors

VOCAB = 512


def tiny_spec(model_type: str, **over) -> ArchSpec:
    cfg = dict(model_type=model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
               rope_theta=10000.0, rms_norm_eps=1e-6)
    if model_type.startswith("gemma"):
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
    cfg.update(over)
    return ArchSpec.from_hf_config(cfg)


def tiny_model(spec: ArchSpec, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # trained norms are far from their init; (1 + w) with w of O(1) is what exposes cast order
                p.normal_(0.0, 0.5) if spec.norm_unit_offset else p.uniform_(0.5, 1.5)
    return model.eval()


def clone(model: CausalLM, dtype: torch.dtype) -> CausalLM:
    m = CausalLM(model.spec)
    m.load_state_dict(model.state_dict())
    return m.to(dtype).eval()


# ---- 1. RoPE from bf16 positions --------------------------------------------------------------------------

class BF16PositionRotary:
    """The broken variant: inv_freq and positions in bf16, angle = position * inv_freq rounded to bf16."""

    def __init__(self, spec: ArchSpec):
        d = int(spec.head_dim * spec.rope.partial_rotary_factor)
        self.inv_freq = 1.0 / (spec.rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

    def __call__(self, position_ids: torch.Tensor, max_position: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        angles = (position_ids.to(torch.bfloat16)[..., None] * self.inv_freq.to(torch.bfloat16)).float()
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()


def per_position_error(a: torch.Tensor, b: torch.Tensor, bucket: int) -> list[float]:
    """Relative L2 error of (1, T, H) states per bucket of `bucket` positions."""
    d = (a - b).double()[0].split(bucket)
    r = b.double()[0].split(bucket)
    return [x.norm().item() / y.norm().item() for x, y in zip(d, r)]


def rope_case(out: Path) -> dict:
    spec = tiny_spec("llama")
    ref = tiny_model(spec)
    with torch.no_grad():  # sharper attention, as in trained models, so positions matter to the output
        for layer in ref.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    right = clone(ref, torch.bfloat16)  # bf16 weights, angles from integer positions in float32 (fasttune)
    wrong = clone(ref, torch.bfloat16)
    wrong.model.rotary = BF16PositionRotary(spec)
    results, summary, curves = {}, {}, {}
    length, bucket = 4096, 256
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    ref_states = capture_hidden_states(ref, ids)
    right_states = capture_hidden_states(right, ids)
    wrong_states = capture_hidden_states(wrong, ids)
    for first in (256, length):
        sl = {k: v[:, :first] for k, v in ref_states.items()}
        for label, states in (("fp32 angles", right_states), ("bf16 angles", wrong_states)):
            errs = compare_states({k: v[:, :first] for k, v in states.items()}, sl)
            results[f"bf16 model, {label}, first {first} tokens"] = errs
    curves = {"bf16 model, fp32 angles": per_position_error(right_states["final norm"], ref_states["final norm"], bucket),
              "bf16 model, bf16 angles": per_position_error(wrong_states["final norm"], ref_states["final norm"], bucket)}
    for label, errs in results.items():
        print(f"\nRoPE, {label} (reference: fp32 model, fp32 angles)\n{format_errors(errs)}")
        summary[label] = {e.name: e.rel_l2 for e in errs}
    distinct = {n: torch.arange(n).to(torch.bfloat16).unique().numel() for n in (256, 1024, 4096)}
    print(f"\ndistinct positions after rounding 0..n-1 to bf16: {distinct}")
    for label, c in curves.items():
        print(f"{label}: final-norm rel L2 per {bucket} positions: " + " ".join(f"{v:.1e}" for v in c))
    summary["distinct_bf16_positions"] = distinct
    summary["per_position_final_norm"] = curves
    plot_errors(results, str(out / "rope_bf16_positions.png"),
                title="RoPE angles from bf16 positions (reference: fp32 model, fp32 angles)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, c in curves.items():
        ax.plot([bucket * (i + 0.5) for i in range(len(c))], [math.log10(v) for v in c], marker="o", label=label)
    ax.set_xlabel("token position")
    ax.set_ylabel("log10 relative L2 error (final norm)")
    ax.set_title("error by position: bf16 angles degrade as positions grow")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rope_bf16_positions_by_position.png", dpi=120)
    plt.close(fig)
    return summary


# ---- 2. exact vs tanh GELU --------------------------------------------------------------------------------

def gelu_case(out: Path) -> dict:
    spec = tiny_spec("gemma")
    ref = tiny_model(spec)
    ids = torch.randint(0, VOCAB, (1, 512), generator=torch.Generator().manual_seed(1))
    exact = clone(ref, torch.float32)
    for layer in exact.layers:
        layer.mlp.activation = "gelu"  # erf GELU in a model trained with the tanh approximation
    bf16 = clone(ref, torch.bfloat16)
    ref_states = capture_hidden_states(ref, ids)
    bf16_exact = clone(exact, torch.bfloat16)
    for layer in bf16_exact.layers:
        layer.mlp.activation = "gelu"
    bf16_states = capture_hidden_states(bf16, ids)
    results = {"exact GELU instead of tanh (float32)": compare_states(capture_hidden_states(exact, ids), ref_states),
               "exact vs tanh GELU, both bfloat16": compare_states(capture_hidden_states(bf16_exact, ids), bf16_states),
               "correct model in bfloat16 (rounding floor)": compare_states(bf16_states, ref_states)}
    for label, errs in results.items():
        print(f"\nGemma, {label}\n{format_errors(errs)}")
    plot_errors(results, str(out / "gelu_exact_vs_tanh.png"), title="Gemma MLP: exact vs tanh GELU (reference: fp32 tanh)")
    return {label: {e.name: e.rel_l2 for e in errs} for label, errs in results.items()}


# ---- 3. RMSNorm cast order --------------------------------------------------------------------------------

class LlamaOrderUnitOffsetNorm(nn.Module):
    """The broken variant for Gemma: normalise in float32, cast to the input dtype, then multiply by (1 + w) in
    that dtype (Llama's order) instead of multiplying in float32 and casting last."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return h * (1.0 + self.weight.to(x.dtype))


def swap_norms(model: CausalLM) -> None:
    for parent in [model.model] + list(model.layers):
        for name, child in list(parent.named_children()):
            if name.endswith("norm") and child.__class__.__name__ == "RMSNorm":
                setattr(parent, name, LlamaOrderUnitOffsetNorm(child))


def rmsnorm_case(out: Path) -> dict:
    spec = tiny_spec("gemma", num_hidden_layers=8)
    ref = tiny_model(spec)
    ids = torch.randint(0, VOCAB, (1, 512), generator=torch.Generator().manual_seed(1))
    right = clone(ref, torch.bfloat16)
    wrong = clone(ref, torch.bfloat16)
    swap_norms(wrong)
    ref_states = capture_hidden_states(ref, ids)
    right_states, wrong_states = capture_hidden_states(right, ids), capture_hidden_states(wrong, ids)
    results = {"Gemma order: (1 + w) in fp32, cast last (bf16) vs fp32": compare_states(right_states, ref_states),
               "Llama order: cast, then (1 + w) in bf16 vs fp32": compare_states(wrong_states, ref_states),
               "Llama order vs Gemma order, both bf16": compare_states(wrong_states, right_states)}
    for label, errs in results.items():
        print(f"\nGemma RMSNorm, {label}\n{format_errors(errs)}")
    plot_errors(results, str(out / "rmsnorm_cast_order.png"), title="Gemma RMSNorm cast order in bf16 (reference: fp32)")
    return {label: {e.name: e.rel_l2 for e in errs} for label, errs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "case_studies"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    summary = {"rope_bf16_positions": rope_case(out), "gelu_exact_vs_tanh": gelu_case(out),
               "rmsnorm_cast_order": rmsnorm_case(out)}
    (out / "case_studies.json").write_text(json.dumps(summary, indent=2, default=lambda v: None if
                                                      isinstance(v, float) and math.isinf(v) else v))
    print(f"\nplots and numbers written to {out}")


if __name__ == "__main__":
    main()
