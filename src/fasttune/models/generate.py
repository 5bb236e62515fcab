"""`generate` over padded token tensors, kept for callers that hold a (B, T) batch: a thin wrapper over
fasttune.generation.Generator (the one home of generation: static KV cache, packed prefill, CUDA-graph decode)."""
from __future__ import annotations

from typing import Iterable

import torch

from .decoder import CausalLM


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
    min_p: float = 0.0,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """Returns (B, T + generated) token ids: each row's prompt as given, then its completion, rows that stopped
    earlier filled with `pad_token_id`. Prompts of different lengths are left-padded with `attention_mask` marking
    real tokens. Sampling (`do_sample`) draws its seed from `generator` (or torch's default generator)."""
    from ..generation import Generator, SamplingParams

    if eos_token_id is None:
        eos_token_id = model.spec.eos_ids
    eos = [eos_token_id] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
    if pad_token_id is None:
        pad_token_id = model.spec.pad_token_id if model.spec.pad_token_id is not None else (eos[0] if eos else 0)
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows, keep = input_ids.cpu(), mask.cpu().bool()
    prompts = [rows[i][keep[i]].tolist() for i in range(B)]
    seed = int(torch.randint(0, 2 ** 62, (), generator=generator).item()) if do_sample else 0
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k, top_p=top_p, min_p=min_p, stop_token_ids=eos, seed=seed)
    gen = Generator(model, max_batch_size=B, max_seq_len=max(len(p) for p in prompts) + max_new_tokens,
                    cuda_graphs=cuda_graphs)
    completions = [c[0] for c in gen.generate(prompts, params)]
    gen.release()
    width = max(len(c) for c in completions)
    out = torch.full((B, T + width), pad_token_id, dtype=input_ids.dtype)
    out[:, :T] = rows
    for i, c in enumerate(completions):
        out[i, T:T + len(c)] = torch.tensor(c, dtype=input_ids.dtype)
    return out.to(input_ids.device)
