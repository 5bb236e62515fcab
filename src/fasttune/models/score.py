"""A reward model's head on a CausalLM: `model.score`, a bias-free linear (hidden -> 1) on the final hidden state of
each sequence's last token, as the reward objective trains it and transformers' <Family>ForSequenceClassification
holds it."""
from __future__ import annotations

import torch
import torch.nn as nn


def score_head(model: nn.Module) -> nn.Linear | None:
    """The sequence-classification (reward) head a model carries, if any."""
    head = getattr(model, "score", None)
    return head if isinstance(head, nn.Linear) else None


def attach_score(model: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """Give a CausalLM a reward head `model.score` (hidden -> 1, no bias) holding `weight`; returns the head."""
    hidden = model.spec.hidden_size
    if tuple(weight.shape) != (1, hidden):
        raise ValueError(f"a reward head's weight has shape (1, {hidden}) for this model, got {tuple(weight.shape)}")
    device = model.model.embed_tokens.weight.device
    model.score = nn.Linear(hidden, 1, bias=False, device=device, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(weight)
    model.score.weight.requires_grad_(False)
    return model.score
