"""LoraLinear: a frozen linear (dense, or quantised: NF4, GGUF blocks) plus a trainable low-rank update, y = base(x) + s B A x.

Contract (the export code relies on it): `base`, `lora_A` (r, in_features), `lora_B` (out_features, r),
`scaling`, `r`, `alpha`, `use_rslora`, `dropout`, `in_features`, `out_features`, `disabled`, `delta_weight()`,
`merged_weight()`. Adapters are float32 masters whatever the base dtype; the forward computes in x's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.lora import LoraProjection, lora_linear
from ..models.quantized import QuantizedLinear
from .config import lora_scaling


def peft_kaiming_uniform_(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """nn.init.kaiming_uniform_(t, a=sqrt(5)) drawn from `generator` (the same numbers nn.Linear and PEFT draw)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def peft_initial_A(r: int, in_features: int, out_features: int, base_dtype: torch.dtype | None,
                   generator: torch.Generator | None) -> torch.Tensor:
    """The float32 lora_A PEFT starts from, drawn on the CPU from `generator` (B starts at zero).

    PEFT's draw order: nn.Linear(in, r) and nn.Linear(r, out) each run their default init (kaiming on the weight),
    then reset_lora_parameters draws A again and zeroes B. Drawing the same numbers on the CPU generator makes the
    same seed give PEFT's A for the same module order."""
    A = torch.empty(r, in_features, dtype=torch.float32)
    peft_kaiming_uniform_(A, generator)  # nn.Linear(in, r) default init, discarded by PEFT
    peft_kaiming_uniform_(torch.empty(out_features, r), generator)  # nn.Linear(r, out), zeroed by PEFT
    peft_kaiming_uniform_(A, generator)
    if base_dtype in (torch.bfloat16, torch.float16):
        # PEFT moves the adapter to the base layer's dtype, then upcasts it to float32 again
        # (autocast_adapter_dtype): its A is the draw rounded to the 16-bit dtype. Same here.
        A = A.to(base_dtype).float()
    return A


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise TypeError(f"LoRA wraps nn.Linear or a quantised linear (NF4Linear, GGUFLinear), got "
                            f"{type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        A = peft_initial_A(r, self.in_features, self.out_features,
                           base.weight.dtype if isinstance(base, nn.Linear) else None, generator)
        device = self.base_weight_device()
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=torch.float32, device=device))

    def base_weight_device(self) -> torch.device:
        return self.base.weight_device if isinstance(self.base, QuantizedLinear) else self.base.weight.device

    @property
    def base_weight(self):
        """The frozen weight: a dense tensor, or the quantised weight (NF4Tensor, GGUFWeight) of a quantised base."""
        return self.base.quantized if isinstance(self.base, QuantizedLinear) else self.base.weight

    def projection(self) -> LoraProjection:
        return LoraProjection(self.base_weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        if self.training and self.dropout_p > 0:  # dropout on the adapter's input only: plain autograd path
            lora = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
            return self.base(x) + self.scaling * lora
        return lora_linear(x, *self.projection())

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32 (out_features, in_features)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """Base weight (dequantised if quantised) plus the delta, float32."""
        base = self.base.dequantize() if isinstance(self.base, QuantizedLinear) else self.base.weight
        return base.detach().float() + self.delta_weight().detach()

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}, "
                f"disabled={self.disabled}")


class LoraLMHead(LoraLinear):
    """LoRA on the output layer (`model.lm_head`), PEFT's `lm_head` target: logits = h W^T + s B A drop(h).

    `forward` (generation, `return_logits`, `model.logits`) is LoraLinear's. The training loss never forms the
    logits: `fused_loss_inputs(h)` hands the fused linear cross-entropy the adapter folded in as r extra features,
        h W^T + s (drop(h) A^T) B^T = [h | s drop(h) A^T] [W | B]^T,
    with B passed as the kernel's `extra_weight` (no copy of W is made, and the kernel's only weight gradient is
    dB, (V, r)); softcapping, label smoothing and num_items_in_batch apply unchanged. The extra features' gradient
    reaches A through autograd; W does not require grad, so nothing reaches it.
    `weight` is the frozen base weight, for code that reads `model.lm_head.weight` (device, dtype, shapes)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 generator: torch.Generator | None = None):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA on lm_head needs a dense nn.Linear output layer, got {type(base).__name__}")
        if base.bias is not None:
            raise TypeError("LoRA on lm_head: an output layer with a bias is not supported by the fused loss")
        super().__init__(base, r, alpha, dropout, use_rslora, generator)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def fused_loss_inputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden, weight, extra_weight) for `kernels.fused_linear_cross_entropy`: hidden (N, H) -> (N, H + r),
        the frozen W, and B (V, r) in W's dtype; (h, W, None) when the adapter is disabled."""
        w = self.base.weight
        if self.disabled:
            return h, w, None
        u = F.linear(self.dropout(h), self.lora_A.to(h.dtype)) * self.scaling  # dropout is a no-op in eval()
        return torch.cat([h, u.to(h.dtype)], dim=-1), w, self.lora_B.to(w.dtype)
