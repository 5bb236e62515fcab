"""LoRA hyper-parameters, stored on the model as `model.lora_config`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Projection names in decoder order (the order PEFT visits them, which the seeded initialisation follows).
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
          "down": "down_proj"}


def normalize_targets(target_modules) -> tuple[str, ...]:
    """Accept "q" or "q_proj" (and "all"); return the projection names in decoder order."""
    if target_modules is None or target_modules == "all" or target_modules == "all-linear":
        return ALL_TARGETS
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    names = set()
    for t in target_modules:
        name = _SHORT.get(t, t)
        if name not in ALL_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(ALL_TARGETS)} "
                             f"(or the short names {', '.join(_SHORT)})")
        names.add(name)
    if not names:
        raise ValueError("target_modules is empty: name at least one projection")
    return tuple(n for n in ALL_TARGETS if n in names)


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

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
