"""The static KV cache of the generator: preallocated per slot, written in place, read by length.

Layout: keys and values of shape (layers, slots, max_seq_len, kv_heads, head_dim), so that slot s of layer l is a
contiguous (max_seq_len, kv_heads, head_dim) block: the flash decode kernel reads the first `lengths[s]` rows of
each block (kernels.attention.decode_attention), and a prefill writes token rows with one index_put per layer.

The decoder never sees this layout: `Attention` hands its rotated q, k, v to `cache.attend(layer, q, k, v, ...)`
and gets the attention output back; the cache decides where k and v go and which keys the query sees. It has two
modes, set by the generator before each forward:
- prefill: the prompts packed into one row (B = 1, their `DocumentLayout`), each token's k/v written to
  (slot, position) for every slot that shares that prompt (several samples per prompt: one prefill, written to the
  sibling slots at once), then ordinary packed attention (flash varlen on CUDA);
- decode: one token per slot of the first S slots, written at position lengths[s] - 1, then `decode_attention`
  over each slot's valid keys. Every tensor it touches is preallocated, so the step can be captured in a CUDA graph.
  With `fused` (the default), a decode step takes q and k unrotated: one kernel (kernels.rope_cache_write) rotates
  q, rotates k into its cache row and copies v into its row; the decoder also fuses its residual adds into the
  RMSNorms after them (`fused` is what it reads). fused=False: RoPE, then two index_put writes (the old path).
"""
from __future__ import annotations

import torch

from .. import kernels
from ..kernels.attention import DocumentLayout, attention, decode_attention
from ..kernels.rope import cache_write_reference
from ..models.spec import ArchSpec


def kv_cache_bytes(spec: ArchSpec, slots: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of a StaticKVCache (keys and values): what a generation phase holds besides the weights."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * slots * max_seq_len * spec.num_kv_heads * spec.head_dim * itemsize


class StaticKVCache:
    def __init__(self, spec: ArchSpec, slots: int, max_seq_len: int, dtype: torch.dtype, device: torch.device,
                 fused: bool = True):
        shape = (spec.num_layers, slots, max_seq_len, spec.num_kv_heads, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_seq_len = slots, max_seq_len
        self.fused = fused  # the forward-only fused kernels (see the module docstring)
        self.max_position = 0  # host bound of the positions of the current forward (RoPE table size)
        self._mode: str | None = None
        # prefill state
        self._documents: DocumentLayout | None = None
        self._token_index: torch.Tensor | None = None  # (N,) packed token of each write
        self._slot_index: torch.Tensor | None = None  # (N,) slot it goes to
        self._position_index: torch.Tensor | None = None  # (N,) position in the slot
        # decode state
        self._num_slots = 0
        self._lengths: torch.Tensor | None = None  # (S,) int32 valid keys per slot after this step's write
        # arange(slots), allocated once: a captured step must not read a tensor allocated at its capture that a
        # later capture frees
        self._all_rows = torch.arange(slots, device=device)
        self._rows: torch.Tensor | None = None
        self._memo: dict = {}

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    @property
    def rotates(self) -> bool:
        """Whether `attend` takes q and k unrotated (with `rope=`): fused decode steps."""
        return self.fused and self._mode == "decode"

    def begin_prefill(self, documents: DocumentLayout | None, token_index: torch.Tensor, slot_index: torch.Tensor,
                      position_index: torch.Tensor, max_position: int) -> None:
        """The next forward is a packed prefill (B = 1): packed token token_index[i] goes to
        (slot_index[i], position_index[i]); a token may be listed several times (sibling slots)."""
        self._mode, self._documents = "prefill", documents
        self._token_index, self._slot_index, self._position_index = token_index, slot_index, position_index
        self.max_position = max_position
        self._memo = {}

    def begin_decode(self, lengths: torch.Tensor, max_position: int) -> None:
        """The next forwards are decode steps over the first len(lengths) slots: one token each, written at
        lengths[s] - 1. `lengths` is read on the device at every step (a CUDA graph's static buffer)."""
        S = lengths.shape[0]
        if S > self.slots:
            raise ValueError(f"{S} decoding slots, the cache has {self.slots}")
        self._mode, self._num_slots, self._lengths = "decode", S, lengths
        self._rows = self._all_rows[:S]
        self.max_position = max_position
        self._memo = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
               sliding_window: int | None, softcap: float | None, sinks: torch.Tensor | None = None,
               rope: tuple[torch.Tensor, torch.Tensor, bool] | None = None) -> torch.Tensor:
        """q (B, Hq, T, D), k and v (B, Hk, T, D) of layer `layer` -> attention output (B, Hq, T, D). q and k come
        after RoPE, except when `rotates` (a fused decode step): then `rope` = (cos, sin, float32) and the cache
        rotates them. `sinks`: gpt-oss's per-head sink logits (None for the other families)."""
        if layer == 0:  # a new forward: what the previous one derived from the lengths / layout is stale
            self._memo = {}
        if rope is not None and not self.rotates:
            raise RuntimeError("StaticKVCache.attend got rope= outside a fused decode step (the decoder rotates then)")
        if self._mode == "prefill":
            rows = k[0].transpose(0, 1)  # (T, Hk, D)
            vals = v[0].transpose(0, 1)
            self.keys[layer].index_put_((self._slot_index, self._position_index), rows[self._token_index])
            self.values[layer].index_put_((self._slot_index, self._position_index), vals[self._token_index])
            return attention(q, k, v, scale=scale, sliding_window=sliding_window, documents=self._documents,
                             softcap=softcap, memo=self._memo, sinks=sinks)
        if self._mode == "decode":
            S = self._num_slots
            kc, vc = self.keys[layer, :S], self.values[layer, :S]
            if rope is not None:
                cos, sin, float32 = rope
                q = kernels.rope_cache_write(q, k, v, cos, sin, kc, vc, self._lengths, float32)
            else:
                where = self._memo.get("write-at")
                if where is None:
                    where = self._memo["write-at"] = (self._rows, self._lengths.to(torch.long) - 1)
                cache_write_reference(k, v, kc, vc, self._lengths, where)
            return decode_attention(q, kc, vc, self._lengths, scale=scale, sliding_window=sliding_window,
                                    softcap=softcap, memo=self._memo, sinks=sinks)
        raise RuntimeError("StaticKVCache.attend before begin_prefill / begin_decode")
