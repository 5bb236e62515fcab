"""The protocol every frozen quantised linear follows (NF4 QLoRA bases, GGUF blocks), so LoRA, the fused kernels
and the exporters treat them alike:

    y = x W^T + b,   W = dequantize(stored),   dX = dY W   (W frozen: no dW, nothing dense is kept)

A subclass stores its weight in whatever packed form it likes (buffers, so `.to()` and `state_dict()` carry them)
and exposes:
    in_features, out_features, bias     as nn.Linear
    quantized                           an object with `.dequantize(dtype=...) -> Tensor (out, in)` and
                                        `.device`: what the fused LoRA kernels (kernels.lora) are handed in place
                                        of a dense W; `dtype` is the compute dtype the caller wants (a kernel
                                        that can write it directly saves a full-precision temporary)
    dequantize()                        the dense weight (its natural dtype; callers cast)
    weight_device                       where the stored weight lives
"""
from __future__ import annotations

import torch
import torch.nn as nn


class QuantizedLinear(nn.Module):
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    @property
    def quantized(self):
        raise NotImplementedError(f"{type(self).__name__} must define `quantized`")

    def dequantize(self) -> torch.Tensor:
        return self.quantized.dequantize()

    @property
    def weight_device(self) -> torch.device:
        return self.quantized.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.lora import lora_linear  # late: kernels import models

        # lora_linear without an adapter: the backward dequantises again instead of saving the dense weight
        return lora_linear(x, self.quantized, self.bias, None, None, 0.0)
