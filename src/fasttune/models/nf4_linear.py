"""A frozen linear layer whose weight is stored in 4-bit NF4 (QLoRA's base), dequantised on the fly.

The NF4 tensors live in buffers so `.to(device)` moves them and `state_dict()` holds them. The float32 scales
are stored bit-cast to int32: `model.to(torch.bfloat16)` casts floating-point buffers, and a bf16 absmax would
silently corrupt every weight. The compute dtype is the input's; the weight dequantises to its original dtype
(bf16 from a bf16 checkpoint) and is cast if the input differs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.lora import lora_linear
from ..kernels.nf4 import NF4Tensor, quantize_nf4
from .quantized import QuantizedLinear


class NF4Linear(QuantizedLinear):
    def __init__(self, quantized: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if len(quantized.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(quantized.shape)}")
        self.out_features, self.in_features = quantized.shape
        self.weight_dtype = quantized.dtype
        self.blocksize, self.blocksize2 = quantized.blocksize, quantized.blocksize2
        self.register_buffer("packed", quantized.packed)
        self.register_buffer("absmax_q", quantized.absmax_q)
        self.register_buffer("absmax2_bits", quantized.absmax2.float().contiguous().view(torch.int32))
        self.register_buffer("offset_bits", quantized.offset.float().reshape(1).view(torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax_q, self.absmax2_bits.view(torch.float32),
                         self.offset_bits.view(torch.float32).reshape(()), torch.Size((self.out_features,
                                                                                      self.in_features)),
                         self.weight_dtype, self.blocksize, self.blocksize2)

    def dequantize(self) -> torch.Tensor:
        """The dense weight in its original dtype."""
        return self.quantized.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # lora_linear without an adapter: the backward dequantises again instead of saving the dense weight
        return lora_linear(x, self.quantized, self.bias, None, None, 0.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}, dtype={self.weight_dtype}")


def quantize_linear(linear: nn.Linear) -> NF4Linear:
    """NF4Linear holding `linear`'s weight quantised to NF4 (double-quantised absmax) and its bias."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_linear expects an nn.Linear, got {type(linear).__name__}")
    if linear.weight.device.type == "meta":
        raise ValueError("quantize_linear: the weight is still on the meta device (not loaded yet)")
    return NF4Linear(quantize_nf4(linear.weight.detach()), linear.bias)
