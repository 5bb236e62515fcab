"""Sampling: the parameters, the logit filters and a counter-based sampler that needs no generator state.

Filters, in transformers' order (temperature, top-k, top-p, min-p), each on float32 logits:
    top-k   keep the k largest logits (ties at the k-th kept, as transformers);
    top-p   sort descending, p = softmax; drop token i when the mass ranked strictly above it, cumsum(p)_i - p_i,
            already exceeds top_p (the most likely token is always kept);
    min-p   drop tokens with p_i < min_p * max_j p_j.

Sampling draws token i with probability p_i by inverting the CDF: u ~ U(0, 1), pick the first i with
cumsum(p)_i >= u * sum(p). The uniform u is a hash of (seed, row, step), computed with integer tensor ops on the
device: no torch.Generator state to carry through a CUDA graph, the same draws on every device and batch layout,
and a sample depends only on its seed, its row (prompt index * num_samples + sample index) and its step.
The hash (two rounds of a 32-bit multiply-xorshift mixer) keeps every intermediate below 2^63, so int64 tensor
arithmetic never overflows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2^27: a 32-bit value times this stays below 2^59
_GOLDEN = 0x9E3779B9


@dataclass
class SamplingParams:
    """How to sample. temperature 0 = greedy (argmax; the filters are then moot). stop_token_ids None = the model's
    EOS ids (an empty list: never stop on a token). stop_strings need the Generator's tokenizer; they are checked
    on the host every `stop_check_interval` decode steps and at the end, and the completion is cut after the token
    that completes the first one. seed None draws one from torch's default CPU generator (so torch.manual_seed
    reproduces it)."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop_token_ids: list[int] | set[int] | tuple[int, ...] | None = None
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_check_interval: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must be non-empty strings")
        if self.stop_check_interval < 1:
            raise ValueError(f"stop_check_interval must be >= 1, got {self.stop_check_interval}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filters(self, vocab_size: int) -> tuple[int, bool, bool]:
        """Which filters run: (top_k or 0, top-p on, min-p on): the structure a captured decode step bakes in."""
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return (0, False, False) if self.greedy else (top_k, self.top_p < 1.0, self.min_p > 0.0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float | torch.Tensor | None = None,
                  min_p: float | torch.Tensor | None = None) -> torch.Tensor:
    """The logits (already divided by the temperature) with filtered-out tokens at -inf; see the module docstring.
    top_p / min_p None = off; they may be 0-d tensors (a captured step reads them from static buffers)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def uniform(seed: torch.Tensor, rows: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1), one per row, a pure function of (seed, row, step) (int64 tensors; seed and step
    0-d or broadcastable). 24 random bits: u = (h + 1/2) / 2^24."""
    h = _mix32((seed & _MASK32) ^ _mix32(rows & _MASK32))
    h = _mix32((h + _mix32((step * _GOLDEN + (seed >> 32)) & _MASK32)) & _MASK32)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids (rows,) drawn from softmax(logits) (-inf = never) by inverting the CDF at uniforms u (rows,)."""
    cdf = logits.softmax(-1).cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def next_tokens(logits: torch.Tensor, greedy: bool, filters: tuple[int, bool, bool], temperature: torch.Tensor,
                top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor, rows: torch.Tensor,
                step: torch.Tensor) -> torch.Tensor:
    """One token per row from float32 logits (rows, V): greedy, or filtered and sampled with the hash uniforms of
    (seed, rows, step). The float parameters are 0-d device tensors (static buffers of a captured step)."""
    if greedy:
        return logits.argmax(-1)
    top_k, use_top_p, use_min_p = filters
    logits = filter_logits(logits / temperature, top_k, top_p if use_top_p else None, min_p if use_min_p else None)
    return sample_from_logits(logits, uniform(seed, rows, step))
