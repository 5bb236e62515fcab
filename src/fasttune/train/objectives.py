"""Training objectives. Every loss here is a *sum over the micro-batch divided by a step-wide count*, so summing
the micro-batch losses of one optimizer step gives exactly the loss of the whole step as one batch (exact
gradient accumulation; the count is the number of target tokens or pairs in the whole step).

SFT / continued pre-training: token cross-entropy, sum / (target tokens of the step), through the model's fused
    LM-head + cross-entropy (`num_items_in_batch`).
Reward model (Bradley-Terry): r = w . h_last (a scalar head on the final hidden state of the last real token),
    loss = -log sigmoid(r_chosen - r_rejected), summed / (pairs of the step).
DPO: logp(y|x) = sum of the response tokens' log-probabilities; the reference is the same model with its adapters
    switched off (never a second copy). With rho = beta * [(logp_c - ref_c) - (logp_r - ref_r)],
    loss = -log sigmoid(rho). Rewards: beta * (logp - ref); margin = reward_c - reward_r; accuracy = [margin > 0].
ORPO (reference-free by construction): with mean token log-probs a_c, a_r,
    log odds(y) = a - log(1 - exp(a)),  loss = NLL(chosen) + beta * -log sigmoid(log odds_c - log odds_r),
    NLL summed over chosen target tokens / (chosen target tokens of the step).

SimPO (reference-free, length-normalised): with mean token log-probs a_c, a_r (as ORPO's),
    loss = -log sigmoid(beta (a_c - a_r) - gamma), summed / (pairs of the step). Rewards beta * a; margin and
    accuracy as DPO's.
KTO (unpaired: each example is desirable or undesirable): r = logp(y|x) - ref(y|x) (sums over the response) and a
    reference point z0 = max(0, mean_j [logp(y'_j|x_j) - ref(y'_j|x_j)]), an estimate of KL(policy || reference)
    from mismatched pairs (each prompt with another example's response), with no gradient (as TRL); then
    desirable: lambda_D (1 - sigmoid(beta (r - z0))),  undesirable: lambda_U (1 - sigmoid(beta (z0 - r))),
    summed / (examples of the step); accuracy = share of examples on their side of z0 (desirable r > z0,
    undesirable r < z0); kto_kl = z0. z0 is estimated per micro-batch (TRL: per device batch), so with several
    micro-batches per step the loss is the sum of the micro-batches' losses, each with its own z0.

Preference batches hold 2P rows: the P chosen sequences, then the P rejected ones, right-padded with an
attention_mask; labels mark the response tokens (-100 elsewhere, not shifted).

Metrics come back as 0-d device tensors (never read here): the trainer reads them with the step's loss, in its one
host sync per step.

Every batch the trainer builds is right-padded (fasttune.data.packing's contract). Under a causal mask a right pad
is never attended by a real token, so the model runs without the mask — plain causal attention, the fastest path,
with the real tokens' outputs and gradients unchanged — and the mask only locates each row's last real token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..labels import IGNORE_INDEX, next_token_targets


def token_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   logits_model=None) -> torch.Tensor:
    """(B, T-1) float32: log p(labels[:, t+1] | input_ids[:, :t+1]) at `temperature`, 0 where the label is -100.
    Right-padded rows (no mask needed, see the module doc). The LM head and the log-softmax run fused, chunk by
    chunk (`kernels.fused_linear_token_logprobs`): the (tokens x vocab) logits are never materialised for the
    whole batch, in the forward or the backward. `model` runs the forward (it may be a DDP wrapper);
    `logits_model` (default: `model`) is the CausalLM whose LM head forms the log-probabilities."""
    lm = logits_model or model
    h = model(input_ids, return_logits=False).last_hidden_state[:, :-1]
    B, T, H = h.shape
    h = h.reshape(-1, H)
    if lm.spec.logits_scaling is not None:  # (h / s) @ W.T == (h @ W.T) / s, as the fused loss
        h = h / lm.spec.logits_scaling
    hid, weight, extra = lm.loss_head_inputs(h)
    logp = kernels.fused_linear_token_logprobs(
        hid, weight, next_token_targets(labels).reshape(-1), softcap=lm.spec.final_softcap, temperature=temperature,
        chunk_bytes=lm.loss_chunk_bytes, **({} if extra is None else {"extra_weight": extra}))
    return logp.view(B, T)


def sequence_logprobs(model, batch: dict, logits_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label token) over each row's target tokens, and the number of targets per row, through
    `token_logprobs` (no logits tensor of the batch is ever formed)."""
    logp = token_logprobs(model, batch["input_ids"], batch["labels"], logits_model=logits_model)
    return logp.sum(-1), (next_token_targets(batch["labels"]) != IGNORE_INDEX).sum(-1)


def lm_loss(model, batch: dict, num_items_in_batch: int, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    # right padding needs no mask (see the module doc); packed rows carry their position ids and document layout
    out = model(batch["input_ids"], position_ids=batch.get("position_ids"), documents=batch.get("documents"),
                labels=batch["labels"], num_items_in_batch=num_items_in_batch, return_logits=False,
                label_smoothing=label_smoothing)
    return out.loss, {}


class RewardHead(nn.Module):
    """Scalar reward from the final hidden state of each sequence's last real token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (hidden_size + 1))

    def forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        h = model(input_ids, return_logits=False).last_hidden_state  # right padding: see the module doc
        if attention_mask is None:
            last = torch.full((h.shape[0],), h.shape[1] - 1, device=h.device)
        else:
            last = attention_mask.long().sum(-1) - 1  # right padding
        h_last = h[torch.arange(h.shape[0], device=h.device), last]
        return self.score(h_last.to(self.score.weight.dtype)).squeeze(-1).float()


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = x.shape[0] // 2
    return x[:half], x[half:]


def reward_loss(model, head: RewardHead, batch: dict, num_pairs: int) -> tuple[torch.Tensor, dict]:
    rewards = head(model, batch["input_ids"], batch.get("attention_mask"))
    rc, rr = _split(rewards)
    margin = (rc - rr).detach()
    loss = -F.logsigmoid(rc - rr).sum() / num_pairs
    return loss, {"reward_margin": margin.sum(), "reward_accuracy": (margin > 0).sum(),
                  "pairs": rc.shape[0]}


def dpo_loss(model, batch: dict, num_pairs: int, beta: float, reference_context, logits_model=None
             ) -> tuple[torch.Tensor, dict]:
    """`reference_context()` returns a context manager inside which the model is the reference (adapters off)."""
    with torch.no_grad(), reference_context():
        ref, _ = sequence_logprobs(model, batch, logits_model)
    logp, _ = sequence_logprobs(model, batch, logits_model)
    pc, pr = _split(logp)
    rc, rr = _split(ref)
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    loss = -F.logsigmoid(reward_c - reward_r).sum() / num_pairs
    margin = (reward_c - reward_r).detach()
    return loss, {"reward_chosen": reward_c.detach().sum(), "reward_rejected": reward_r.detach().sum(),
                  "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).sum(),
                  "pairs": pc.shape[0]}


def orpo_loss(model, batch: dict, num_pairs: int, num_chosen_tokens: int, beta: float, logits_model=None
              ) -> tuple[torch.Tensor, dict]:
    logp, n = sequence_logprobs(model, batch, logits_model)
    pc, pr = _split(logp)
    nc, nr = _split(n.clamp(min=1).to(logp.dtype))
    mean_c, mean_r = pc / nc, pr / nr
    # log(1 - exp(a)) for a < 0, computed stably; clamp keeps a == 0 (probability 1) finite
    log_odds = lambda a: a - torch.log(-torch.expm1(a.clamp(max=-1e-6)))  # noqa: E731
    ratio = log_odds(mean_c) - log_odds(mean_r)
    or_term = -F.logsigmoid(ratio)
    nll = -pc.sum() / max(num_chosen_tokens, 1)
    loss = nll + beta * or_term.sum() / num_pairs
    margin = (beta * (mean_c - mean_r)).detach()
    return loss, {"nll": nll.detach(), "log_odds_ratio": ratio.detach().sum(),
                  "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).sum(),
                  "pairs": pc.shape[0]}


def simpo_loss(model, batch: dict, num_pairs: int, beta: float, gamma: float, logits_model=None
               ) -> tuple[torch.Tensor, dict]:
    logp, n = sequence_logprobs(model, batch, logits_model)
    pc, pr = _split(logp)
    nc, nr = _split(n.clamp(min=1).to(logp.dtype))
    reward_c, reward_r = beta * pc / nc, beta * pr / nr
    loss = -F.logsigmoid(reward_c - reward_r - gamma).sum() / num_pairs
    margin = (reward_c - reward_r).detach()
    return loss, {"reward_chosen": reward_c.detach().sum(), "reward_rejected": reward_r.detach().sum(),
                  "reward_margin": margin.sum(), "reward_accuracy": (margin > 0).sum(), "pairs": pc.shape[0]}


def kto_loss(model, batch: dict, num_examples: int, beta: float, desirable_weight: float, undesirable_weight: float,
             reference_context, logits_model=None) -> tuple[torch.Tensor, dict]:
    """`batch`: rows (input_ids, labels), `desirable` (B,) bool, and the mismatched rows kl_input_ids / kl_labels
    for the reference point; `reference_context()` makes the model the reference (adapters off)."""
    kl_batch = {"input_ids": batch["kl_input_ids"], "labels": batch["kl_labels"]}
    with torch.no_grad():
        with reference_context():
            ref, _ = sequence_logprobs(model, batch, logits_model)
            ref_kl, _ = sequence_logprobs(model, kl_batch, logits_model)
        policy_kl, _ = sequence_logprobs(model, kl_batch, logits_model)
        z0 = (policy_kl - ref_kl).mean().clamp(min=0)
    logp, _ = sequence_logprobs(model, batch, logits_model)
    r = logp - ref
    good = batch["desirable"].bool()
    per_row = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                          undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    loss = per_row.sum() / num_examples
    right_side = torch.where(good, r > z0, r < z0).detach()
    return loss, {"kto_kl": z0 * r.shape[0],  # summed over rows: the step reports the row-weighted mean
                  "reward_accuracy": right_side.sum(), "pairs": r.shape[0]}
