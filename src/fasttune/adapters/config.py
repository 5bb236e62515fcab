"""LoRA hyper-parameters, stored on the model as `model.lora_config`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Projection names in decoder order (the order PEFT visits them, which the seeded initialisation follows).
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The output layer can carry an adapter too, but only when named: "all" / "all-linear" mean the seven projections
# (PEFT's "all-linear" also leaves the output layer out). PEFT visits it after the decoder layers, and so does
# add_lora's seeded draw.
LM_HEAD = "lm_head"
TARGETS = ALL_TARGETS + (LM_HEAD,)
_SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
          "down": "down_proj"}
_ALL = ("all", "all-linear")


def normalize_targets(target_modules) -> tuple[str, ...]:
    """Accept "q" or "q_proj", "lm_head", and "all" / "all-linear" (the seven projections, also inside a list:
    ["all-linear", "lm_head"]); return the module names in the order add_lora initialises them."""
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


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: ALL_TARGETS)
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    seed: int = 0
    train_embeddings: bool = False
    train_lm_head: bool = False
    embedding_lr_ratio: float = 1.0  # learning rate of embeddings / LM head relative to the adapters'

    def __post_init__(self):
        self.target_modules = normalize_targets(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_lr_ratio <= 0:
            raise ValueError(f"embedding_lr_ratio must be > 0, got {self.embedding_lr_ratio}")
        if self.train_lm_head and LM_HEAD in self.target_modules:
            raise ValueError("train_lm_head=True trains the whole LM head, and target_modules also puts a LoRA on it: "
                             "choose one (drop 'lm_head' from target_modules, or set train_lm_head=False)")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
