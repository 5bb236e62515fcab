"""Decoder linears that keep a GGUF file's quantised blocks (LoRA straight over Q4_K / Q4_1 / Q8_0 ... weights).

A GGUF weight W (out, in) is stored row by row: each row is in / B blocks of `type_size` bytes (B = 32 or 256
values; see kernels.gguf_dequant for every layout). `GGUFLinear` keeps those bytes as they are in the file, as a
uint8 buffer of shape (out, in / B * type_size), plus the ggml type and the shape. Then

    forward   y  = x D(W)^T + b                 D = gguf.quants.dequantize's float32 values rounded to x's dtype
    backward  dx = dy D(W)                      W is frozen: no dW; D(W) is recomputed, never saved

through the same fused LoRA path as NF4 (kernels.lora: a `quantized` object whose `dequantize(dtype)` gives the
dense weight). On CUDA D is kernels.gguf_dequant's Triton kernel, which decodes the blocks straight into x's dtype
(bf16: half the bytes of a float32 temporary, one pass); on CPU the PyTorch reference then a cast (same bits). The dense weight exists only as a per-layer temporary, so the model holds
about the file's bytes (plus embeddings and norms, which are dequantised once at load).

Rows are whole blocks, so the row-level operations a loader needs apply to the bytes unchanged: llama.cpp's q/k
row permutation is undone on block rows, and Phi-3's fused qkv / gate_up rows are split on block rows.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels.gguf_dequant import dequantize_gguf, nbytes, quant_format
from .quantized import QuantizedLinear

_DECODER_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)"
                             r"\.weight")


@dataclass
class GGUFWeight:
    """The quantised weight handed to the fused LoRA kernels in place of a dense W."""

    blocks: torch.Tensor  # uint8 (out_features, row bytes)
    type_id: int  # ggml type
    shape: torch.Size  # (out_features, in_features)

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight in `dtype`: gguf.quants.dequantize's float32 values rounded once to `dtype`. On CUDA the
        Triton kernel writes `dtype` directly (no float32 copy of the weight); elsewhere the PyTorch reference."""
        return dequantize_gguf(self.blocks, self.type_id, self.shape, dtype)


class GGUFLinear(QuantizedLinear):
    """A frozen linear whose weight is GGUF blocks (any type kernels.gguf_dequant decodes), dequantised on the fly."""

    def __init__(self, blocks: torch.Tensor, type_id: int, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        fmt = quant_format(type_id)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise ValueError(f"GGUFLinear needs the raw blocks as uint8 (out_features, row bytes), got "
                             f"{blocks.dtype} of shape {tuple(blocks.shape)}")
        if in_features % fmt.block_size:
            raise ValueError(f"{fmt.name} rows are {fmt.block_size}-value blocks; in_features {in_features} is not a "
                             "multiple of that")
        if blocks.shape[1] != nbytes(type_id, in_features):
            raise ValueError(f"{fmt.name} rows of {in_features} values take {nbytes(type_id, in_features)} bytes, "
                             f"the blocks have {blocks.shape[1]} per row")
        self.out_features, self.in_features, self.type_id = blocks.shape[0], in_features, type_id
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def type_name(self) -> str:
        return quant_format(self.type_id).name

    @property
    def quantized(self) -> GGUFWeight:
        return GGUFWeight(self.blocks, self.type_id, torch.Size((self.out_features, self.in_features)))

    @property
    def weight_device(self) -> torch.device:
        return self.blocks.device

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gguf={self.type_name}")


def is_gguf_linear_weight(name: str) -> bool:
    """Whether checkpoint tensor `name` is a decoder projection weight (what keep_quantized keeps as blocks)."""
    return _DECODER_LINEAR.fullmatch(name) is not None


def load_gguf_quantized(path: str | os.PathLike, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A `CausalLM` from a GGUF file whose decoder projections are `GGUFLinear` layers holding the file's blocks
    (copied once, q/k rows unpermuted, fused rows split); embeddings, norms, the LM head and biases are dequantised
    to `dtype` as `load_model` does. Eval mode, requires_grad left on (as load_model)."""
    from .checkpoint import CheckpointError, _set_tensor, _unfuse, check_all_loaded, meta_model
    from .gguf_reader import GGUFError, check_tensors, gguf_arch_spec, hf_layout, read_gguf

    f = read_gguf(path)
    spec = gguf_arch_spec(f)
    device = torch.device(device)
    model, expected = meta_model(spec)
    loaded: set[str] = set()
    kept: dict[str, tuple[torch.Tensor, int]] = {}  # linear -> (block rows, ggml type)
    for gname, name in check_tensors(f, spec).items():
        info = f.tensors[gname]
        if is_gguf_linear_weight(name):
            fmt = quant_format(info.type_id)
            if len(info.shape) != 2 or info.shape[1] % fmt.block_size:
                raise GGUFError(f"{f.path}: tensor {gname!r} ({fmt.name}, shape {info.shape}) has rows that are not "
                                f"whole {fmt.block_size}-value blocks, so it cannot be kept quantised; load it with "
                                "keep_quantized=False (dequantised)")
            rows = hf_layout(f, spec, name, f.raw(gname).reshape(info.shape[0], -1))
            for n, part in _unfuse(name, rows, spec):
                # a copy: the file's memory map must not back a buffer that outlives it
                kept[n[: -len(".weight")]] = (torch.empty(part.shape, dtype=torch.uint8, device=device).copy_(part),
                                              info.type_id)
                loaded.add(n)
            continue
        for n, t in _unfuse(name, hf_layout(f, spec, name, f.tensor(gname)), spec):
            if spec.tie_word_embeddings and n == "lm_head.weight":
                continue
            if n not in expected:
                raise CheckpointError(f"unexpected tensor {n!r} in {path}: not part of a {spec.model_type} model")
            _set_tensor(model, n, t.to(device=device, dtype=dtype))
            loaded.add(n)
    check_all_loaded(path, expected, loaded)
    for owner, (rows, type_id) in kept.items():
        linear = model.get_submodule(owner)
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent), child, GGUFLinear(rows, type_id, linear.in_features, linear.bias))
    model.tie_weights()
    return model.eval()


def gguf_linears(model: nn.Module) -> dict[str, GGUFLinear]:
    """Every GGUFLinear of `model` by module name (inside LoRA wrappers too)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
