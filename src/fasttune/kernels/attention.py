"""The one attention dispatch: causal, padding mask, sliding window, packed documents, logit soft-capping.

Shapes: q (B, Hq, Tq, D); k, v (B, Hk, Tk, D) with Hq a multiple of Hk (GQA). Query i sits at absolute
position `q_offset + i` among the Tk keys (q_offset > 0 while decoding with a KV cache).

Paths, fastest first:
- no mask at all (plain causal): `scaled_dot_product_attention(is_causal=True)`, which takes the flash or cuDNN
  kernel on GPU;
- packed documents, a sliding window or soft-capping on CUDA in fp16/bf16, when the `flash_attn` package (Dao-AILab
  FlashAttention 2.x) imports: `flash_attn_varlen_func` for packed documents (each document its own causal sequence,
  `cu_seqlens` from the document ids), `flash_attn_func` otherwise; our window of W keys (the query included) is
  flash-attn's `window_size=(W - 1, 0)`. Training/prefill only (q_offset 0, Tq == Tk, no padding mask), head_dim
  <= 256; any error falls back to the paths below; `FASTTUNE_FLASH_ATTN=0` turns it off. Plain causal stays on SDPA;
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
    memo: dict | None = None,
) -> torch.Tensor:
    """Returns (B, Hq, Tq, D). `memo`: a dict shared by every layer of one forward (and its recompute), where the
    layout derived from the masks (flash-attn's cu_seqlens, flex block masks) is built once instead of per layer."""
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
    if (key_padding_mask is None and q_offset == 0 and Tq == Tk and D <= 256 and _flash_attn_device_ok(q, k, v)
            and os.environ.get("FASTTUNE_FLASH_ATTN", "1") != "0"):
        out = _flash(q, k, v, scale, sliding_window, document_ids, softcap, memo)
        if out is not None:
            return out
    if (q.is_cuda and key_padding_mask is None and q_offset == 0 and Tq == Tk
            and os.environ.get("FASTTUNE_FLEX", "1") == "1"):
        out = _flex(q, k, v, scale, sliding_window, document_ids, softcap, memo)
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


_FLASH_FAILED = False


def _flash_attn_device_ok(q, k, v) -> bool:
    """Whether flash-attn's kernels take these tensors: CUDA, fp16/bf16, one dtype. (Tests patch this to run the
    path on CPU against a stand-in `flash_attn` module.)"""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype


def _flash(q, k, v, scale, sliding_window, document_ids, softcap, memo: dict | None = None):
    """flash-attn 2.x for packed documents / sliding windows / soft-capping (training and prefill: Tq == Tk, no
    cache, no padding). Returns (B, Hq, T, D), or None when flash-attn is missing, the ids are not contiguous
    documents, or it raised (then it is not tried again).

    flash-attn's layout is (B, T, H, D) (varlen: (total, H, D)); GQA is native (head h reads kv head
    h // (Hq // Hk), as repeat_interleave does). With causal=True and window_size=(left, right) query i sees keys
    [i - left, i + right] (seqlen_q == seqlen_k, so its bottom-right alignment is our top-left); our mask allows
    q - window < k <= q, hence left = window - 1, right = 0. Soft-capping is tanh(s / cap) * cap of the scaled
    score, as in `eager_attention`."""
    global _FLASH_FAILED
    if _FLASH_FAILED:
        return None
    try:
        import flash_attn
    except Exception:
        _FLASH_FAILED = True
        return None
    B, Hq, T, D = q.shape
    kw = {"softmax_scale": scale, "causal": True}
    if sliding_window is not None:  # only pass what is used, so versions without softcap still serve windows
        kw["window_size"] = (sliding_window - 1, 0)
    if softcap is not None:
        kw["softcap"] = float(softcap)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D): free for our callers
    try:
        if document_ids is None:
            out = flash_attn.flash_attn_func(qt, kt, vt, **kw)
            return out.transpose(1, 2)
        key = ("flash-varlen", B, T)
        if memo is None or key not in memo:  # host syncs here: once per forward when the caller passes a memo
            layout = _varlen_layout(document_ids.reshape(B, T).to(q.device))
            if memo is not None:
                memo[key] = layout
        else:
            layout = memo[key]
        if layout is None:
            return None  # a document split in two runs: only the mask paths express that
        cu, max_len = layout
        out = flash_attn.flash_attn_varlen_func(
            qt.reshape(B * T, Hq, D), kt.reshape(B * T, -1, D), vt.reshape(B * T, -1, D),
            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, **kw)
        return out.reshape(B, T, Hq, D).transpose(1, 2)
    except torch.OutOfMemoryError:  # not a reason to give up on the kernel: the trainer explains what would fit
        raise
    except Exception:  # an old flash-attn, an unsupported GPU / dtype / head size: fall back to SDPA or flex
        _FLASH_FAILED = True
        return None


def _varlen_layout(docs: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens int32, longest document) of a (B, T) document-id tensor flattened row by row: a sequence starts
    at every row start and wherever the id changes. None if some row's ids decrease (a document split in two)."""
    B, T = docs.shape
    if T > 1 and not bool((docs[:, 1:] >= docs[:, :-1]).all()):
        return None
    starts = torch.ones(B, T, dtype=torch.bool, device=docs.device)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    cu = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu = torch.cat([cu, cu.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


_FLEX_FAILED = False


def _flex(q, k, v, scale, sliding_window, document_ids, softcap, memo: dict | None = None):
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
        key = ("flex-block-mask", sliding_window, B, T)  # the same for every layer with this window
        block_mask = memo.get(key) if memo is not None else None
        if block_mask is None:
            block_mask = create_block_mask(mask_mod, B if docs is not None else None, None, T, T, device=q.device)
            if memo is not None:
                memo[key] = block_mask
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                enable_gqa=q.shape[1] != k.shape[1])
    except torch.OutOfMemoryError:
        raise
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
