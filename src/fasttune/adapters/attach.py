"""Attach LoRA adapters to a fasttune CausalLM, and switch them off."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from ..kernels.lora import lora_mlp, lora_qkv
from .config import ALL_TARGETS, LM_HEAD, ROUTER, LoraConfig
from .experts import LoraExperts
from .layer import LoraLinear, LoraLMHead, peft_initial_A
from ..models.decoder import CausalLM, GatedMLP
from ..models.moe import SparseMoE
from ..models.quantized import QuantizedLinear

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class FusedQKV:
    """`Attention.fused_qkv` hook: q, k, v LoRA projections in one autograd node (kernels.lora.lora_qkv)."""

    def __init__(self, attn: nn.Module):
        self.attn = attn

    def __call__(self, x: torch.Tensor):
        q, k, v = self.attn.q_proj, self.attn.k_proj, self.attn.v_proj
        if q.disabled or k.disabled or v.disabled or (q.training and max(q.dropout_p, k.dropout_p, v.dropout_p)):
            return q(x), k(x), v(x)
        return lora_qkv(x, q.projection(), k.projection(), v.projection())


class FusedMLP:
    """`GatedMLP.fused_forward` hook: gate, up, activation, down in one autograd node (kernels.lora.lora_mlp).
    Gate/up outputs are kept for the backward unless the MLP's `save_gate_up` (its memory plan, for long sequences)
    is false, or `save_gate_up` given here says otherwise."""

    def __init__(self, mlp: nn.Module, save_gate_up: bool | None = None):
        self.mlp = mlp
        self._save_gate_up = save_gate_up  # None: follow the MLP's setting

    @property
    def save_gate_up(self) -> bool:
        return self.mlp.save_gate_up if self._save_gate_up is None else self._save_gate_up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        g, u, d = m.gate_proj, m.up_proj, m.down_proj
        if g.disabled or u.disabled or d.disabled or (g.training and max(g.dropout_p, u.dropout_p, d.dropout_p)):
            from .. import kernels

            return d(kernels.glu(g(x), u(x), m.activation))
        return lora_mlp(x, g.projection(), u.projection(), d.projection(), m.activation, self.save_gate_up)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def lora_expert_layers(model: nn.Module) -> Iterator[tuple[str, LoraExperts]]:
    """The MoE layers' experts that carry per-expert adapters."""
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            yield name, module


def add_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0, target_modules=None,
             use_rslora: bool = False, seed: int = 0, train_embeddings: bool = False,
             train_lm_head: bool = False) -> nn.Module:
    """Freeze `model` and wrap the targeted projections of every decoder layer in `LoraLinear` (in place);
    with "lm_head" in `target_modules`, the output layer in `LoraLMHead` too (not with tied embeddings).
    MoE layers: gate_proj + up_proj and down_proj put per-expert adapters on the experts' stacks (`LoraExperts`:
    gate_up_proj, down_proj; dropout must be 0 there), "router" a `LoraLinear` on the router.
    `train_embeddings` / `train_lm_head` also train the input embeddings / the whole output layer (their learning
    rate: `param_groups`' embedding_lr_ratio).

    Adapters are initialised as PEFT does (A kaiming-uniform, B zero) from a CPU generator seeded with `seed`,
    in decoder order (lm_head last, as PEFT), so PEFT with `torch.manual_seed(seed)` gets the same A. When all
    of q, k, v (resp. gate, up, down) carry adapters and dropout is 0, the fused kernels are installed as the
    layer's hooks. Returns the model, with `model.lora_config` set."""
    config = LoraConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, seed=seed,
                        target_modules=ALL_TARGETS if target_modules is None else target_modules)
    return attach_lora(model, config, train_embeddings=train_embeddings, train_lm_head=train_lm_head)


def attach_lora(model: nn.Module, config: LoraConfig, train_embeddings: bool = False,
                train_lm_head: bool = False) -> nn.Module:
    """`add_lora` from a LoraConfig (the YAML `lora:` section; `enabled` is the caller's business)."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"add_lora expects a fasttune CausalLM (from fasttune.load), got {type(model).__name__}")
    if model.lora_config is not None or any(True for _ in lora_layers(model)) or any(
            True for _ in lora_expert_layers(model)):
        raise ValueError("this model already has LoRA adapters; add_lora can be applied once")
    cfg = config.checked()
    if train_lm_head and LM_HEAD in cfg.target_modules:
        raise ValueError("train_lm_head=True trains the whole LM head, and target_modules also puts a LoRA on it: "
                         "choose one (drop 'lm_head' from target_modules, or set train_lm_head=False)")
    if LM_HEAD in cfg.target_modules:
        _check_lm_head_target(model)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    targets = set(cfg.target_modules)
    expert_targets = _expert_targets(model, targets, cfg.dropout)
    for layer in model.model.layers:
        for parent, name in _targeted(layer, targets):
            base = getattr(parent, name)
            if not isinstance(base, (nn.Linear, QuantizedLinear)):
                raise TypeError(f"{name} is a {type(base).__name__}; LoRA needs nn.Linear or a quantised linear "
                                "(NF4Linear, GGUFLinear)")
            setattr(parent, name, LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, generator))
        if isinstance(layer.mlp, SparseMoE) and expert_targets:
            layer.mlp.experts = LoraExperts(layer.mlp.experts, expert_targets, cfg.r, cfg.alpha, cfg.use_rslora,
                                            generator)
        if cfg.dropout == 0:
            if {"q_proj", "k_proj", "v_proj"} <= targets:
                layer.self_attn.use_fused_qkv(FusedQKV(layer.self_attn))
            if {"gate_proj", "up_proj", "down_proj"} <= targets and isinstance(layer.mlp, GatedMLP):
                layer.mlp.use_fused_forward(FusedMLP(layer.mlp))
    if LM_HEAD in targets:  # after the layers: PEFT reaches lm_head last in named_modules()
        model.lm_head = LoraLMHead(model.lm_head, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, generator)
    if train_embeddings:
        model.model.embed_tokens.weight.requires_grad_(True)
    if train_lm_head:
        model.lm_head.weight.requires_grad_(True)
    model.set_adapters(cfg, train_embeddings, train_lm_head)
    return model


def _expert_targets(model: nn.Module, targets: set[str], dropout: float) -> tuple[str, ...]:
    """The expert projections (gate_up_proj, down_proj) `targets` name on an MoE model; () for dense models."""
    if not model.spec.is_moe:
        if ROUTER in targets:
            raise ValueError("LoRA target 'router' names an MoE router, and this model has no MoE layers")
        return ()
    gate_up = {"gate_proj", "up_proj"} & targets
    if len(gate_up) == 1:
        raise ValueError(f"LoRA targets name {gate_up.pop()} but not its partner: an MoE model's experts store gate "
                         "and up as one fused stack (gate_up_proj) with one adapter; name both gate_proj and up_proj, "
                         "or neither")
    experts = (("gate_up_proj",) if gate_up else ()) + (("down_proj",) if "down_proj" in targets else ())
    if experts and dropout > 0:
        raise ValueError(f"LoRA dropout {dropout} on MoE experts: the per-expert adapters run inside the grouped "
                         "GEMM, where dropout cannot apply to the adapter's input alone (PEFT refuses it too); "
                         "use dropout 0")
    return experts


def _check_lm_head_target(model: CausalLM) -> None:
    head = model.lm_head
    tied = model.spec.tie_word_embeddings or getattr(head, "weight", None) is model.model.embed_tokens.weight
    if tied:
        raise ValueError(
            "LoRA on lm_head is not possible for this model: it ties its input and output embeddings "
            "(tie_word_embeddings), so the merged adapter W + s*B@A would also change the input embeddings. "
            "Remove 'lm_head' from target_modules; to adapt the output layer of a tied model, train the shared "
            "embedding matrix in full instead (train_embeddings / train_lm_head)")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"LoRA on lm_head needs a dense nn.Linear output layer, got {type(head).__name__}")


def _targeted(layer: nn.Module, targets: set[str]):
    """(parent module, attribute name) of each targeted linear of a decoder layer, in add_lora's draw order (an MoE
    layer: its router when targeted; its experts are not linears, see LoraExperts)."""
    for name in _ATTN:
        if name in targets:
            yield layer.self_attn, name
    if isinstance(layer.mlp, SparseMoE):
        if ROUTER in targets:
            yield layer.mlp, layer.mlp.router_name
        return
    for name in _MLP:
        if name in targets:
            yield layer.mlp, name


def initial_lora_A(model: nn.Module) -> dict[str, torch.Tensor]:
    """The lora_A values `add_lora` drew for `model` (from its seed, in its order), recomputed on the CPU: for a
    model whose adapters were created on the meta device and are filled in later (FSDP2 loading)."""
    cfg = model.lora_config
    generator = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for i, layer in enumerate(model.model.layers):
        for parent, name in _targeted(layer, set(cfg.target_modules)):
            lora = getattr(parent, name)
            base_dtype = lora.base.weight.dtype if isinstance(lora.base, nn.Linear) else None
            prefix = "self_attn" if parent is layer.self_attn else "mlp"
            out[f"model.layers.{i}.{prefix}.{name}.lora_A"] = peft_initial_A(
                lora.r, lora.in_features, lora.out_features, base_dtype, generator)
        experts = layer.mlp.experts if isinstance(layer.mlp, SparseMoE) else None
        if isinstance(experts, LoraExperts):  # drawn after the layer's linears, as add_lora does
            for name, adapter in experts.adapters.items():
                E, r, K = adapter.lora_A.shape
                w = getattr(experts.base, name)
                base_dtype = w.dtype if isinstance(w, torch.Tensor) else None  # as LoraExperts draws it
                A = peft_initial_A(r * E, K, adapter.out_features, base_dtype, generator)
                out[f"model.layers.{i}.mlp.experts.adapters.{name}.lora_A"] = A.reshape(E, r, K)
    if LM_HEAD in cfg.target_modules:
        head = model.lm_head
        out["lm_head.lora_A"] = peft_initial_A(head.r, head.in_features, head.out_features, head.base.weight.dtype,
                                               generator)
    return out


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model (adapters off), e.g. as DPO's reference model; restores each layer's flag on exit."""
    layers = [m for _, m in lora_layers(model)] + [m for _, m in lora_expert_layers(model)]
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was
