"""LoRA on Mixture-of-Experts expert stacks: one low-rank adapter per expert on a 3-D projection.

For expert e of a projection W (E, N, K) (logical (out, in); gpt-oss stores (E, K, N)):
    y_m = x_m W_e^T + s (x_m A_e^T) B_e^T,   A (E, r, K), B (E, N, r), s = alpha / r (alpha / sqrt(r): rsLoRA),
computed inside the grouped GEMM (kernels.grouped_linear's lora_A / lora_B), never as a per-expert loop. The
experts' gate_up_proj holds gate and up fused, so one adapter spans both (as PEFT's `target_parameters` does).
Adapters are float32 masters, A drawn as PEFT draws it for the same (r * E, K) ParamWrapper layer, B zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.moe import EXPERT_STACKS, Experts, NF4ExpertStack
from .config import lora_scaling
from .layer import peft_initial_A

EXPERT_PROJECTIONS = EXPERT_STACKS  # parameter order of the experts (PEFT nests them in this order)


class ExpertAdapter(nn.Module):
    """The per-expert LoRA of one expert projection: lora_A (E, r, K), lora_B (E, N, r)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, alpha: float,
                 use_rslora: bool, base_dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator | None):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        A = peft_initial_A(r * num_experts, in_features, out_features, base_dtype, generator)
        self.lora_A = nn.Parameter(A.reshape(num_experts, r, in_features).to(device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, dtype=torch.float32, device=device))

    def kernel_arguments(self) -> dict:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_scaling": self.scaling}

    def delta_weight(self) -> torch.Tensor:
        """scaling * B_e @ A_e for every expert, float32 (E, N, K)."""
        return torch.bmm(self.lora_B.float(), self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}")


class LoraExperts(nn.Module):
    """Frozen `Experts` (`base`) plus per-expert adapters on the projections named in `targets`."""

    def __init__(self, base: Experts, targets: tuple[str, ...], r: int, alpha: float, use_rslora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, Experts):
            raise TypeError(f"LoraExperts wraps the experts of an MoE layer, got {type(base).__name__}")
        unknown = set(targets) - set(EXPERT_PROJECTIONS)
        if unknown or not targets:
            raise ValueError(f"expert LoRA targets must be among {EXPERT_PROJECTIONS}, got {targets}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.disabled = False
        self.adapters = nn.ModuleDict()
        for name in EXPERT_PROJECTIONS:  # fixed order: the seeded draws do not depend on how targets were listed
            if name not in targets:
                continue
            w = getattr(base, name)
            E, out_f, in_f = self.logical_shape(name)
            # an NF4 base: A is PEFT's draw as for a non-16-bit base (not rounded to the weight dtype)
            base_dtype = None if isinstance(w, NF4ExpertStack) else w.dtype
            self.adapters[name] = ExpertAdapter(E, in_f, out_f, r, alpha, use_rslora, base_dtype, w.device, generator)

    def logical_shape(self, name: str) -> tuple[int, int, int]:
        """(E, out_features, in_features) of a projection, whatever its storage order."""
        E, a, b = getattr(self.base, name).shape
        return (E, b, a) if self.base.transposed else (E, a, b)

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x_sorted, offsets)
        return self.base(x_sorted, offsets, {n: a.kernel_arguments() for n, a in self.adapters.items()})

    def merged_weight(self, name: str) -> torch.Tensor:
        """The projection's stored tensor with its adapter added, float32, in the storage order."""
        w = self.base.dense_stack(name).float()
        if name not in self.adapters:
            return w
        delta = self.adapters[name].delta_weight().detach()
        return w + (delta.transpose(1, 2) if self.base.transposed else delta)
