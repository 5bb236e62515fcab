"""Labels and the targets they give: one definition for the data pipeline, the model's loss, the trainer and the
kernels.

A label is the token id a position is trained to produce, or IGNORE_INDEX where nothing is trained (prompt tokens,
padding). Position t predicts the token at t + 1, so a row's targets are its labels shifted left by one; in a packed
row the last token of one document does not predict the first of the next.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # PyTorch's and transformers' value, so labels pass between the libraries unchanged


def next_token_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) labels -> (B, T - 1) targets: labels[:, 1:], with IGNORE_INDEX where `position_ids` (packed rows,
    counting from 0 in each document) start a new document."""
    targets = labels[:, 1:]
    if position_ids is not None:
        targets = targets.masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
    return targets


def count_target_tokens(labels: list[int] | torch.Tensor) -> int:
    """How many tokens train: the targets (labels after the one-token shift, along the last axis) that are not
    IGNORE_INDEX — of one tokenised sequence (a list) or of a batch of rows (a tensor)."""
    if isinstance(labels, torch.Tensor):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)
