"""Operations used by the model core, each with a Triton path (CUDA) and a plain-PyTorch reference.

This module is the one place that picks the implementation: Triton when the tensor lives on a CUDA
device and Triton imports, the reference otherwise (CPU, tests, or ``FASTTUNE_KERNELS=reference``).
Set ``FASTTUNE_KERNELS=triton`` to force the Triton path (with ``TRITON_INTERPRET=1`` it runs on CPU).
"""
from __future__ import annotations

import os

import torch

from . import _triton
from . import cross_entropy as _ce
from . import glu as _glu
from . import grouped_gemm as _gg
from . import layer_norm as _ln
from . import rms_norm as _rms
from . import rope as _rope

__all__ = ["use_triton", "rms_norm", "layer_norm", "apply_rope", "glu", "fused_linear_cross_entropy",
            "grouped_linear", "fused_linear_token_logprobs"]




def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernel should run for a tensor on ``x``'s device."""
    mode = os.environ.get("FASTTUNE_KERNELS", "auto")
    if mode == "reference" or not _triton.AVAILABLE:
        return False
    if mode == "triton":
        return True
    return x.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    if use_triton(x):
        return _rms.rms_norm(x, weight, eps, unit_offset)
    return _rms.rms_norm_reference(x, weight, eps, unit_offset)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if use_triton(x):
        return _ln.layer_norm(x, weight, bias, eps)
    return _ln.layer_norm_reference(x, weight, bias, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if use_triton(q):
        return _rope.apply_rope(q, k, cos, sin)
    return _rope.apply_rope_reference(q, k, cos, sin)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if use_triton(gate):
        return _glu.glu(gate, up, activation)
    return _glu.glu_reference(gate, up, activation)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    if use_triton(hidden):
        return _ce.fused_linear_cross_entropy(hidden, weight, labels, **kwargs)
    return _ce.fused_linear_cross_entropy_reference(hidden, weight, labels, **kwargs)


def grouped_linear(x: torch.Tensor, weight, expert_offsets: torch.Tensor, bias: torch.Tensor | None = None,
                   lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None, lora_scaling: float = 1.0,
                   transposed: bool = False) -> torch.Tensor:
    """Every expert's linear (+ LoRA) over rows sorted by expert: see kernels/grouped_gemm.py."""
    if use_triton(x):
        return _gg.grouped_linear(x, weight, expert_offsets, bias, lora_A, lora_B, lora_scaling, transposed)
    return _gg.grouped_linear_reference(x, weight, expert_offsets, bias, lora_A, lora_B, lora_scaling, transposed)


def fused_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                **kwargs) -> torch.Tensor:
    """Per-token log p(label) through the LM head without the (tokens x vocab) logits (see cross_entropy.py)."""
    if use_triton(hidden):
        return _ce.fused_linear_token_logprobs(hidden, weight, labels, **kwargs)
    return _ce.fused_linear_token_logprobs_reference(hidden, weight, labels, **kwargs)
