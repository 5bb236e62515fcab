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

__all__ = ["use_triton", "rms_norm", "add_rms_norm", "layer_norm", "apply_rope", "apply_rotary", "rope_cache_write",
           "glu", "glu_packed", "fused_linear_cross_entropy", "grouped_linear", "fused_linear_token_logprobs"]




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


def add_rms_norm(x: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False,
                 d_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(z), z) with z = x + d (x + d * d_scale): a residual add and the norm after it. Forward only."""
    if use_triton(x):
        return _rms.add_rms_norm(x, d, weight, eps, unit_offset, d_scale)
    return _rms.add_rms_norm_reference(x, d, weight, eps, unit_offset, d_scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    if use_triton(x):
        return _ln.layer_norm(x, weight, bias, eps)
    return _ln.layer_norm_reference(x, weight, bias, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if use_triton(q):
        return _rope.apply_rope(q, k, cos, sin)
    return _rope.apply_rope_reference(q, k, cos, sin)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, float32: bool = False):
    """RoPE as the decoder applies it: q, k (B, T, H, D); cos, sin (B or 1, T, r) rotate the first r features of each
    head (partial rotary, r < D: the rest pass through); `float32` (OLMo 2): rotate in float32, cast back after."""
    if float32 and q.dtype != torch.float32:
        qr, kr = apply_rotary(q.float(), k.float(), cos, sin)
        return qr.to(q.dtype), kr.to(k.dtype)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return apply_rope(q, k, cos, sin)
    qr, kr = apply_rope(q[..., :r], k[..., :r], cos, sin)
    return torch.cat([qr, q[..., r:]], -1), torch.cat([kr, k[..., r:]], -1)


def rope_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     float32: bool = False) -> torch.Tensor:
    """A decode step's RoPE and KV-cache write (kernels/rope.py): q, k, v (S, H, 1, D) of one new token per slot;
    rotated k and v go to row lengths[s] - 1 of slot s of the caches (S, M, Hk, D); returns rotated q. Forward only.
    `float32` matters to the reference alone: every Triton RoPE path rotates in float32 and rounds once."""
    if use_triton(q):
        return _rope.rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, lengths)
    _rope._check_cache_write(q, k, v, cos, sin, k_cache, v_cache, lengths)
    qr, kr = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, float32)
    _rope.cache_write_reference(kr.transpose(1, 2), v, k_cache, v_cache, lengths)
    return qr.transpose(1, 2)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    if use_triton(gate):
        return _glu.glu(gate, up, activation)
    return _glu.glu_reference(gate, up, activation)


def glu_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """glu of the halves [gate | up] of one fused projection output, its gradient one tensor (kernels/glu.py)."""
    if use_triton(gate_up):
        return _glu.glu_packed(gate_up, activation)
    return _glu.glu_packed_reference(gate_up, activation)


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
