"""The optimizers `train.optimizer` names, and the memory their training state takes before it exists (so the
memory policy can plan for it): one home for the trainer and the benchmarks."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(groups: list[dict], optimizer: str, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 0.0, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names over parameter groups (adapters.param_groups): "adamw8bit" (8-bit
    blockwise state, train.adamw8bit) or "adamw" (torch's AdamW, fused on CUDA when every parameter is a float
    dtype: no multi-tensor temporaries of the size of the whole state)."""
    if optimizer == "adamw8bit":
        from .adamw8bit import AdamW8bit

        return AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if optimizer != "adamw":
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    fused = (device is not None and device.type == "cuda"
             and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for g in groups for p in g["params"]))
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def optimizer_state_bytes(params: Iterable[torch.Tensor], optimizer: str) -> int:
    """Bytes of the moments `make_optimizer(..., optimizer)` keeps for `params` once it has stepped (memory
    planning before it exists): adamw keeps exp_avg and exp_avg_sq in each parameter's dtype, adamw8bit what
    train.adamw8bit.tensor_state_bytes says. The 0-d step counters (one per tensor, a few bytes) are left out."""
    if optimizer == "adamw8bit":
        from .adamw8bit import tensor_state_bytes

        return sum(tensor_state_bytes(p.numel()) for p in params)
    if optimizer != "adamw":
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    return sum(2 * p.numel() * p.element_size() for p in params)


def training_state_bytes(model: nn.Module, optimizer: str) -> int:
    """What training adds to a model's memory before its first forward, once it has stepped: a gradient of each
    trainable parameter (in its dtype) and the optimizer's moments."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() * p.element_size() for p in trainable) + optimizer_state_bytes(trainable, optimizer)
