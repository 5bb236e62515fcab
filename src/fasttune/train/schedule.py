"""Learning-rate schedules with linear warm-up: factor(step) multiplies the base learning rate.

    warm-up:  (step + 1) / warmup                      for step < warmup
    linear:   1 - p                                    p = (step - warmup) / (total - warmup), in [0, 1]
    cosine:   0.5 * (1 + cos(pi * p))
    constant: 1
"""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - p
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {kind!r}; choose linear, cosine or constant")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind=kind, warmup=warmup, total=total))
