"""Rotary position embeddings: inverse frequencies for every scaling kind, and cos/sin tables.

All of it is computed in float32 whatever the model dtype: bf16 has 8 bits of mantissa, so bf16 positions
collide beyond 256 and repeat near 8192 (a real bug the field fixed). Tables are cached per length and device.
"""
from __future__ import annotations

import math

import torch

from .spec import ArchSpec, RopeSpec


def rotary_dim(spec: ArchSpec) -> int:
    return int(spec.head_dim * spec.rope.partial_rotary_factor)


def inverse_frequencies(rope: RopeSpec, dim: int, max_position_embeddings: int, seq_len: int | None = None,
                        device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq of shape (dim/2,), attention scaling applied to cos and sin)."""
    base = rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    kind = rope.kind
    if kind in ("default", "linear", "llama3"):
        inv_freq = 1.0 / (base ** exponents)
        if kind == "linear":
            inv_freq = inv_freq / rope.factor
        if kind == "llama3":
            inv_freq = _llama3_scale(inv_freq, rope)
        return inv_freq, 1.0
    if kind == "dynamic":
        # NTK-aware: the base grows with the sequence once it is longer than the trained context.
        seq_len = max(seq_len or 0, max_position_embeddings)
        base = base * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if kind == "yarn":
        return _yarn(rope, dim, max_position_embeddings, device)
    if kind == "longrope":
        orig = rope.original_max_position_embeddings
        factor = rope.factor if rope.factor is not None else max_position_embeddings / orig
        attention = rope.attention_factor
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = rope.long_factor if seq_len and seq_len > orig else rope.short_factor
        ext = torch.tensor(ext, dtype=torch.float32, device=device)
        return 1.0 / (ext * base ** exponents), attention
    raise ValueError(f"unknown RoPE kind {kind!r}")


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeSpec, dim: int, max_pos: int, device) -> tuple[torch.Tensor, float]:
    base = rope.theta
    orig = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


class RotaryTables:
    """cos/sin for given position ids, float32, shape (batch, seq, rotary_dim).

    For each scaling regime (device, and for `dynamic` / `longrope` the length that selects the frequencies) the
    table of cos/sin for positions 0..L-1 is computed once, from integer positions in float32, and cached; L grows
    by powers of two when a longer sequence arrives. A forward then only gathers the rows of its position ids, so
    packed sequences with per-token positions cost nothing extra. At most `max_tables` regimes are kept (dynamic
    NTK scaling beyond the trained length has one per sequence length), the least recently used is dropped."""

    max_tables = 4
    min_length = 256

    def __init__(self, spec: ArchSpec, rope: RopeSpec | None = None):
        self.spec = spec
        self.rope = rope if rope is not None else spec.rope  # Gemma 3's local layers: spec.local_rope
        self.dim = rotary_dim(spec)
        self._cache: dict[tuple, tuple[torch.Tensor, float]] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # half-width (L, dim/2) cos, sin

    def _key(self, device: torch.device, seq_len: int) -> tuple:
        rope = self.rope
        key: tuple = (str(device),)
        if rope.kind == "dynamic" and seq_len > self.spec.max_position_embeddings:
            key += (seq_len,)
        if rope.kind == "longrope":
            key += (seq_len > rope.original_max_position_embeddings,)
        return key

    def _inv_freq(self, device: torch.device, seq_len: int) -> tuple[torch.Tensor, float]:
        key = self._key(device, seq_len)
        if key not in self._cache:
            self._cache[key] = inverse_frequencies(self.rope, self.dim, self.spec.max_position_embeddings,
                                                   seq_len, device)
        return self._cache[key]

    def table(self, device: torch.device, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached half-width (L, rotary_dim / 2) cos and sin for positions 0..L-1, L >= seq_len, in float32."""
        key = self._key(device, seq_len)
        cached = self._tables.pop(key, None)
        if cached is None or cached[0].shape[0] < seq_len:
            inv_freq, scale = self._inv_freq(device, seq_len)
            length = max(self.min_length, 1 << max(seq_len - 1, 0).bit_length())
            # float32 angles from exact integer positions: see the module docstring
            angles = torch.arange(length, dtype=torch.int64, device=device).float()[:, None] * inv_freq
            cached = (angles.cos() * scale, angles.sin() * scale)
        self._tables[key] = cached  # most recently used last
        while len(self._tables) > self.max_tables:
            old = next(iter(self._tables))
            del self._tables[old]
            self._cache.pop(old, None)
        return cached

    def __call__(self, position_ids: torch.Tensor, max_position: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each position. `max_position`: an upper bound of the (non-negative) ids the caller knows,
        so the table size is chosen without reading the ids back from the device."""
        if max_position is not None:
            lo, hi = 0, max_position
        elif position_ids.numel():
            lo, hi = torch.stack(torch.aminmax(position_ids)).tolist()  # one device-to-host transfer
        else:
            lo, hi = 0, 0
        seq_len = hi + 1
        if lo < 0:  # negative positions cannot index the table: compute the angles directly
            inv_freq, scale = self._inv_freq(position_ids.device, seq_len)
            angles = position_ids.float()[..., None] * inv_freq
            cos_h, sin_h = angles.cos() * scale, angles.sin() * scale
        else:
            cos_t, sin_t = self.table(position_ids.device, seq_len)
            cos_h, sin_h = cos_t[position_ids], sin_t[position_ids]
        return torch.cat((cos_h, cos_h), dim=-1), torch.cat((sin_h, sin_h), dim=-1)
