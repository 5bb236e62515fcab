"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), a batch of left-padded
prompts, stopping at any EOS id."""
from __future__ import annotations

from typing import Iterable

import torch

from .decoder import CausalLM, KVCache


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass; always keep the first
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(
    model: CausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Returns (B, prompt_len + generated) token ids; finished rows are filled with `pad_token_id`.
    Prompts of different lengths must be left-padded with `attention_mask` marking real tokens."""
    if eos_token_id is None:
        eos_token_id = model.spec.eos_ids
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       device=input_ids.device, dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = model.spec.pad_token_id if model.spec.pad_token_id is not None else (
            int(eos[0]) if eos.numel() else 0)
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    cache = KVCache(model.spec.num_layers)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out, step_ids = input_ids, input_ids
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        res = model(step_ids, attention_mask=mask, position_ids=positions, cache=cache, return_logits=False)
        logits = model.logits(res.last_hidden_state[:, -1])
        if do_sample:
            logits = _filter_logits(logits / max(temperature, 1e-5), top_k, top_p)
            next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        else:
            next_ids = logits.argmax(-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
        out = torch.cat([out, next_ids[:, None]], dim=1)
        finished |= torch.isin(next_ids, eos)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_ids = next_ids[:, None]
        if bool(finished.all()):
            break
    return out
