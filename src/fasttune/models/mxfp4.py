"""MXFP4 (OCP microscaling FP4), the format gpt-oss checkpoints store their expert weights in, decoded to floats.

A block of 32 consecutive weights along the input dimension shares one scale:
    blocks (..., G, 16) uint8: two FP4 E2M1 codes per byte, the low nibble first (element 2j), the high one second;
    scales (..., G)     uint8: the shared power-of-two exponent, biased by 127;
    w[..., 32 g + i] = e2m1(code_i) * 2 ** (scales[..., g] - 127).
E2M1 (1 sign, 2 exponent, 1 mantissa bit) codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; codes 8..15 the same negated.
gpt-oss stores each expert's projection as (out, in) blocks; the model holds (E, in, out) (transposed on load).
"""
from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., G, 16) uint8 codes and (..., G) uint8 exponents -> (..., 32 G) weights in `dtype` (exact: every value
    is a small float times a power of two, representable in bf16 while the exponent stays in its range)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks (..., G, 16) and scales (..., G) disagree: {tuple(blocks.shape)} and "
                         f"{tuple(scales.shape)}")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32)  # low nibble first
    values = table[codes.long()]
    out = torch.ldexp(values, (scales.to(torch.int32) - SCALE_BIAS).unsqueeze(-1).float())
    return out.reshape(*scales.shape[:-1], -1).to(dtype)
