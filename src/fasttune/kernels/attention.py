"""The one attention dispatch: causal, padding mask, sliding window, packed documents, logit soft-capping.

Shapes: q (B, Hq, Tq, D); k, v (B, Hk, Tk, D) with Hq a multiple of Hk (GQA). Query i sits at absolute
position `q_offset + i` among the Tk keys (q_offset > 0 while decoding with a KV cache).

Paths, fastest first:
- no mask at all (plain causal): `scaled_dot_product_attention(is_causal=True)`, which takes the flash or cuDNN
  kernel on GPU;
- packed documents or a sliding window on CUDA: `flex_attention` with a block mask, so masked blocks are skipped;
- otherwise (padding, soft-capping, CPU): an explicit boolean mask through SDPA, or eager math when soft-capping.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def build_mask(
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    q_offset: int = 0,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask, True where query may attend to key.

    A query row with no allowed key (a left-padding position) is allowed to attend to itself so softmax never
    sees an empty row: its output is unused, but a NaN there would poison the backward pass."""
    q_pos = torch.arange(q_len, device=device)[:, None] + q_offset
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)  # window counts the query itself, as transformers does
    allowed = allowed[None, None].expand(batch, 1, q_len, k_len)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    if document_ids is not None:  # (B, Tk); queries are the last Tq keys
        q_docs = document_ids[:, -q_len:]
        allowed = allowed & (q_docs[:, None, :, None] == document_ids[:, None, None, :])
    empty = ~allowed.any(-1, keepdim=True)
    if bool(empty.any()):
        diag = (k_pos == q_pos)[None, None]
        allowed = allowed | (empty & diag)
    return allowed


def documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Packed sequences restart their position ids at 0; a restart after the first token starts a new document.
    Returns (B, T) document indices, or None when no row is packed."""
    if position_ids.shape[-1] < 2 or not bool((position_ids[:, 1:] == 0).any()):
        return None
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Returns (B, Hq, Tq, D)."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    gqa = Hq != k.shape[1]
    window_matters = sliding_window is not None and Tk > sliding_window
    if window_matters is False:
        sliding_window = None
    plain_causal = key_padding_mask is None and document_ids is None and sliding_window is None and softcap is None
    if plain_causal and q_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if plain_causal and Tq == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if (q.is_cuda and key_padding_mask is None and q_offset == 0 and Tq == Tk
            and os.environ.get("FASTTUNE_FLEX", "1") == "1"):
        out = _flex(q, k, v, scale, sliding_window, document_ids, softcap)
        if out is not None:
            return out
    mask = build_mask(B, Tq, Tk, q.device, q_offset, sliding_window, key_padding_mask, document_ids)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return eager_attention(q, k, v, mask, scale, softcap)


def eager_attention(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Reference math, as transformers' eager path: scores, soft-cap, mask, softmax in float32, cast back."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


_FLEX_FAILED = False


def _flex(q, k, v, scale, sliding_window, document_ids, softcap):
    """flex_attention for packed documents / sliding windows / soft-capping on CUDA. Returns None if unavailable."""
    global _FLEX_FAILED
    if _FLEX_FAILED:
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        _FLEX_FAILED = True
        return None
    B, Hq, T, D = q.shape
    docs = document_ids

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if sliding_window is not None:
            ok = ok & (kv_idx > q_idx - sliding_window)
        if docs is not None:
            ok = ok & (docs[b, q_idx] == docs[b, kv_idx])
        return ok

    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    try:
        block_mask = create_block_mask(mask_mod, B if docs is not None else None, None, T, T, device=q.device)
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                enable_gqa=q.shape[1] != k.shape[1])
    except Exception:  # an old torch or an unsupported head size: fall back to the masked SDPA path
        _FLEX_FAILED = True
        return None


_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED
