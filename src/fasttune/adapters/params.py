"""Which parameters train, and the optimizer groups over them: one rule for the trainer and for library users.

An adapter parameter is a `lora_A` / `lora_B` of a `LoraLinear` (LoraLMHead included) or of an MoE layer's
per-expert adapters (`LoraExperts`). Trained embeddings / a
trained LM head (add_lora's train_embeddings / train_lm_head, objective.train_embeddings) form their own group at
`lr * embedding_lr_ratio`; everything else that requires a gradient (adapters, a full fine-tune's weights, a reward
head) trains at `lr`.
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from ..models.decoder import CausalLM
from .attach import lora_expert_layers, lora_layers

# Learning rate of trained embeddings / LM head relative to the rest: the trainer's default
# (objective.embedding_lr_ratio) and param_groups'. Embeddings are full matrices updated beside low-rank adapters,
# so they get a smaller step. (add_lora used to record a per-model ratio defaulting to 1.0; pass it here instead.)
EMBEDDING_LR_RATIO = 0.1


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter (lora_A, lora_B of each LoRA layer, then of each MoE layer's expert adapters)."""
    return ([p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]
            + [p for _, m in lora_expert_layers(model) for a in m.adapters.values() for p in (a.lora_A, a.lora_B)])


def embedding_weights(model: CausalLM) -> list[nn.Parameter]:
    """The input embedding and the output layer's weight (one tensor when they are tied). A LoRA'd head's `weight`
    is its frozen base: the head's adapter is an adapter parameter, not this."""
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    return [embed] if head is embed else [embed, head]


def param_groups(model: CausalLM, lr: float, embedding_lr_ratio: float = EMBEDDING_LR_RATIO,
                 weight_decay: float = 0.0, extra_modules: Iterable[nn.Module] = ()) -> list[dict]:
    """Optimizer groups over the parameters of `model` (and `extra_modules`, e.g. a reward head) that require a
    gradient, each listed once (tied weights too): group "lora" at `lr` (adapters and any other trainable tensor),
    group "embeddings" at `lr * embedding_lr_ratio` (trained embeddings / LM head). Both use `weight_decay`."""
    embedding_ids = {id(p) for p in embedding_weights(model)}
    main, embeddings = [], []
    seen: set[int] = set()
    for module in (model, *extra_modules):
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (embeddings if id(p) in embedding_ids else main).append(p)
    groups = []
    if main:
        groups.append({"params": main, "lr": lr, "weight_decay": weight_decay, "name": "lora"})
    if embeddings:
        groups.append({"params": embeddings, "lr": lr * embedding_lr_ratio, "weight_decay": weight_decay,
                       "name": "embeddings"})
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient (add adapters with fasttune.add_lora, "
                         "or check lora.target_modules)")
    return groups
