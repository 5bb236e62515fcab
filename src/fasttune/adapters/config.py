"""The LoRA settings, one dataclass: the YAML config's `lora:` section, what `add_lora` takes, and what a model with
adapters records (`model.lora_config`); the target names and the scaling formula, defined once."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Union

# Projection names in decoder order (the order PEFT visits them, which the seeded initialisation follows).
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The output layer can carry an adapter too, but only when named: "all" / "all-linear" mean the seven projections
# (PEFT's "all-linear" also leaves the output layer out). PEFT visits it after the decoder layers, and so does
# add_lora's seeded draw.
LM_HEAD = "lm_head"
# MoE models: gate_proj / up_proj / down_proj name the experts' projections (gate and up are one fused stack there,
# so they are named together); the router (mlp.gate, gpt-oss mlp.router) carries an adapter only when named "router"
ROUTER = "router"
TARGETS = ALL_TARGETS + (LM_HEAD, ROUTER)
_SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
          "down": "down_proj"}
_ALL = ("all", "all-linear")


def normalize_targets(target_modules) -> tuple[str, ...]:
    """Accept "q" or "q_proj", "lm_head", "router" (MoE), and "all" / "all-linear" (the seven projections, also
    inside a list: ["all-linear", "lm_head"]); return the module names in the order add_lora initialises them."""
    if target_modules is None or (isinstance(target_modules, str) and target_modules in _ALL):
        return ALL_TARGETS
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    names = set()
    for t in target_modules:
        if t in _ALL:
            names.update(ALL_TARGETS)
            continue
        name = _SHORT.get(t, t)
        if name not in TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGETS)} "
                             f"(or the short names {', '.join(_SHORT)}, or 'all-linear' for the seven projections)")
        names.add(name)
    if not names:
        raise ValueError("target_modules is empty: name at least one projection")
    return tuple(n for n in TARGETS if n in names)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """s in y = W x + s B A x: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (rsLoRA); PEFT's formula, so
    adapters go to and from PEFT unchanged."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    """The alpha that gives rank `r` the scaling `scaling` (lora_scaling solved for alpha)."""
    return scaling * (math.sqrt(r) if use_rslora else r)


@dataclass
class LoraConfig:
    enabled: bool = True  # false: train every parameter (full fine-tune; no DPO reference then)
    r: int = 16  # adapter rank (>= 1)
    alpha: float = 16.0  # adapters are scaled by alpha / r (> 0)
    dropout: float = 0.0  # dropout on the adapters' input, in [0, 1)
    # names (q_proj ... down_proj, lm_head; short q, k, v, o, gate, up, down), or "all-linear" for the seven projections;
    # MoE models: gate/up/down adapt every expert (gate and up together), "router" the router
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(ALL_TARGETS))
    use_rslora: bool = False  # rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r
    seed: int = 0  # seed of the adapters' initialisation

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def checked(self) -> "LoraConfig":
        """A copy with target_modules as the full names in add_lora's order (a tuple: what a model records);
        ValueError for a setting no model can take (the training config wraps it as a ConfigError naming the key)."""
        targets = normalize_targets(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        return replace(self, target_modules=targets)
