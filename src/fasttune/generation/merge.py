"""Merging frozen LoRA adapters into their base weights for a rollout, and restoring the base bit for bit after.

Why merge: unmerged, every adapted projection costs two extra small matmuls (and the fused hooks' extra
kernels) per decode step; merged, a step is the base model's dense matmuls only. Why restore from a copy rather
than subtract: in bf16, round(round(W + dW) - dW) != W, and after a few rollouts the base would drift from the
checkpoint the adapters are trained against. So the merge writes round(W + s B A) into each base weight in place
(no second copy of the model on the GPU) and keeps the original W on the host (pinned when on CUDA), copied back
on exit. Cost: one device-to-host and one host-to-device copy of the adapted weights per merged call.

Quantised bases (NF4, GGUF blocks) cannot hold a merged weight without re-quantising, which changes the base:
`merged_lora` refuses them (generate unmerged: their forward dequantises on the fly anyway).

`elsewhere`: layers whose merged weight the caller writes somewhere else (the generator's concatenated q/k/v and
gate/up copies, generation.fused): their adapters are switched off for the block like the others, but their base
weights are neither written nor saved and restored, which spares those copies to and from the host.
"""
from __future__ import annotations

import contextlib
from typing import Collection, Iterator

import torch
import torch.nn as nn

from ..adapters import disable_adapters, lora_layers
from ..models.quantized import QuantizedLinear


@contextlib.contextmanager
def merged_lora(model: nn.Module, enabled: bool = True, elsewhere: Collection[nn.Module] = ()
                ) -> Iterator[nn.Module]:
    """Within the block, every active LoRA layer of `model` computes as its merged dense weight (adapter disabled,
    base weight = W + s B A in W's dtype); on exit the base weights are restored exactly and the flags reset.
    Layers in `elsewhere` are only disabled: the caller computes with their merged weight (module docstring)."""
    if not enabled:
        yield model
        return
    skip = {id(m) for m in elsewhere}
    active = [m for _, m in lora_layers(model) if not m.disabled and id(m) not in skip]
    quantised = [type(m.base).__name__ for m in active if isinstance(m.base, QuantizedLinear)]
    if quantised:
        raise ValueError(f"merge_lora: {len(quantised)} adapted layers sit on a quantised base ({quantised[0]}), "
                         "which cannot hold a merged weight without re-quantising it; generate with "
                         "merge_lora=False (the adapters then run unmerged over the dequantised base)")
    saved: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for m in active:
                w = m.base.weight
                original = torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=w.is_cuda)
                original.copy_(w)
                saved.append((m, original))
                w.copy_(m.merged_weight().to(w.dtype))
        with disable_adapters(model):  # the merged base weights now carry the adapters
            yield model
    finally:
        with torch.no_grad():
            for m, original in saved:
                m.base.weight.copy_(original)
