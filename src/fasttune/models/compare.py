"""Layer-by-layer comparison of two implementations (public API; the model doctor builds on it).

Both fasttune models and transformers models name their blocks `model.embed_tokens`, `model.layers.N` and
`model.norm`, so the same forward hooks capture the hidden states of either."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class LayerError:
    name: str
    max_abs: float
    rel_l2: float  # ||a - b|| / ||b||

    @property
    def log10_rel_l2(self) -> float:
        return math.log10(self.rel_l2) if self.rel_l2 > 0 else float("-inf")


def _decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    body = model.model if hasattr(model, "model") else model
    blocks = [("embeddings", body.embed_tokens)]
    blocks += [(f"layer {i}", layer) for i, layer in enumerate(body.layers)]
    blocks.append(("final norm", body.norm))
    return blocks


@torch.no_grad()
def capture_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **forward_kwargs) -> dict[str, torch.Tensor]:
    """Run `model` once and return the output of its embeddings, every decoder layer and the final norm."""
    states: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in _decoder_blocks(model):
        def hook(_m, _inp, out, name=name):
            states[name] = (out[0] if isinstance(out, tuple) else out).detach().float().cpu()
        handles.append(module.register_forward_hook(hook))
    try:
        kwargs = dict(forward_kwargs)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        model(input_ids, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return states


def compare_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                   token_mask: torch.Tensor | None = None) -> list[LayerError]:
    """Per-block error of `a` against the reference `b`; `token_mask` (B, T) restricts to real tokens."""
    errors = []
    for name in b:
        if name not in a:
            continue
        x, y = a[name], b[name]
        if token_mask is not None:
            m = token_mask.bool().cpu()
            x, y = x[m], y[m]
        diff = (x.double() - y.double())
        denom = y.double().norm().item()
        errors.append(LayerError(name, diff.abs().max().item() if diff.numel() else 0.0,
                                 diff.norm().item() / denom if denom > 0 else diff.norm().item()))
    return errors


def compare_models(a: nn.Module, b: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> list[LayerError]:
    """Same input through both models; per-layer error of `a` relative to `b`."""
    return compare_states(capture_hidden_states(a, input_ids, attention_mask),
                          capture_hidden_states(b, input_ids, attention_mask), attention_mask)


def format_errors(errors: list[LayerError]) -> str:
    lines = [f"{'block':<14}{'max |a-b|':>12}{'rel L2':>12}{'log10':>8}"]
    for e in errors:
        lines.append(f"{e.name:<14}{e.max_abs:>12.3e}{e.rel_l2:>12.3e}{e.log10_rel_l2:>8.2f}")
    return "\n".join(lines)


def plot_errors(errors_by_label: dict[str, list[LayerError]], path: str, title: str = "") -> None:
    """PNG of log10 relative L2 error per block, one line per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, errs in errors_by_label.items():
        vals = [max(e.log10_rel_l2, -16) for e in errs]
        ax.plot(range(len(errs)), vals, marker="o", label=label)
        ax.set_xticks(range(len(errs)), [e.name for e in errs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("log10 relative L2 error")
    ax.set_title(title or "per-layer hidden-state error")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
