"""The one attention dispatch: causal, padding mask, sliding window, packed documents, logit soft-capping, sinks.

Shapes: q (B, Hq, Tq, D); k, v (B, Hk, Tk, D) with Hq a multiple of Hk (GQA). Query i sits at absolute
position `q_offset + i` among the Tk keys (q_offset > 0 while decoding with a KV cache).

Packed rows carry a `DocumentLayout` (document ids, cu_seqlens, the longest document), built on the host by the
data collator, so no path has to read back from the GPU where documents start.

Paths, fastest first (measured on H200, bf16, 8B shape 2 x 2048, documents of median ~260 tokens, forward +
backward of one layer: bench/attention_paths.py, bench/RESULTS.md):
- no mask at all (plain causal): `scaled_dot_product_attention(is_causal=True)` (flash; 0.66 ms, the floor);
- packed documents and/or a sliding window on CUDA in fp16/bf16, training/prefill (Tq == Tk, no padding mask, no
  soft-cap): PyTorch's own flash kernel with cu_seqlens (`aten._flash_attention_forward`, GQA native, window
  `(W - 1, 0)`; 0.93 ms). Its public wrapper `torch.nn.attention.varlen.varlen_attn` measured 1.50 ms, a dense-mask
  SDPA 1.73 ms, flex_attention with a block mask built per call 5.1 ms;
- the same with soft-capping (Gemma 2) when the `flash_attn` package (Dao-AILab FlashAttention 2.x) imports:
  `flash_attn_varlen_func` (it has softcap), `flash_attn_func` for windows without documents;
- otherwise on CUDA: compiled `flex_attention` with a block mask built once per forward (memo) from the layout;
- otherwise (padding masks, decoding with a window, CPU): an explicit boolean mask through SDPA, or eager math when
  soft-capping;
- attention sinks (gpt-oss): see below.

Attention sinks. gpt-oss gives each query head h a learned logit s_h that joins every row's softmax as one more
column whose value is zero: out_i = sum_j P'_ij v_j with P' = softmax([S_i1 .. S_in, s_h]) over the n allowed keys.
No kernel here takes a sink, but none needs to. With o_i and lse_i = log sum_j exp S_ij the output and log-sum-exp
of ordinary attention over the same allowed keys, and L_i = logaddexp(lse_i, s_h) the log-sum-exp with the sink,
    P'_ij = exp(S_ij - L_i),   out_i = exp(lse_i - L_i) o_i = w_i o_i,   w_i = sigmoid(lse_i - s_h).
Backward (dOut the output's gradient). The sink is a softmax column of value zero, so softmax's usual backward over
all n + 1 columns gives, with D_i = dOut_i . out_i:
    dS_ij = P'_ij (dOut_i . v_j - D_i),   d s_h = sum_i P'_i,sink (0 - D_i) = -sum_i exp(s_h - L_i) D_i.
That is a flash backward run with the sinked output `out` and L in place of lse (it recomputes P' = exp(S - L)
and D from what it is given): `_FlashSinks`. Seen from (o, lse) instead (flex_attention, which differentiates its
returned lse): dO_i = w_i dOut_i, d lse_i = (dOut_i . o_i) w_i (1 - w_i), d s_h = -sum_i d lse_i; a kernel that
takes d lse subtracts it from D_i, which gives the same dS (`_SinkCombine`). A row with no allowed key (padding)
has lse = -inf, hence w = 0: zero output and zero gradients, with no NaN; the eager reference agrees (the sink
alone takes the row, so `build_mask` leaves it empty). Paths: training/prefill on CUDA in fp16/bf16 without a
padding mask or soft-cap: aten's flash forward (it returns lse) and backward, as `_FlashSinks`; otherwise on CUDA
(fp32, a padding mask, soft-capping) with whole rows: compiled flex_attention returning lse, then `_SinkCombine`;
decoding on CUDA: the Triton decode kernel adds the sink to its softmax denominator (kernels/decode_attention.py),
or, when it is off, in fp16/bf16 the flash decode kernel below returns lse too. Everything else (CPU, queries at an
offset) runs eager math with a dense mask, logged once on CUDA.

Decoding over a static per-slot KV cache (`decode_attention`, fasttune.generation): one query per slot, keys
(S, M, Hk, D) of which slot s holds `lengths[s]` valid ones. On CUDA (fp16/bf16/fp32, head_dim <= 256, with or
without a window and sinks, no soft-capping): the one-launch Triton kernel of kernels/decode_attention.py (split
over the valid keys, its partials combined inside the same launch; aten's flash decode below costs two kernels, a
split-kv one and a combine). If it is switched off (`FASTTUNE_DECODE_TRITON=0`) or failed, in fp16/bf16: the same
aten flash kernel as varlen, the cache seen as S blocks of M keys (cu_seqlens_k = 0, M, 2M, ...) of which it reads
only `seqused_k = lengths`, so a step costs the valid keys, not M, and every shape is static (CUDA graphs); with
sinks, its lse weighs the output as above. Otherwise the reference: a (S, 1, 1, M) boolean length/window mask
through SDPA, or eager math when soft-capping or with sinks (one query per slot: cheap, though it reads all M).
A fused path that raises is logged once with the reason and not tried again (`FALLBACKS`); a dense mask taken on
CUDA is logged once too. `FASTTUNE_FLASH_ATTN=0` / `FASTTUNE_FLEX=0` / `FASTTUNE_DECODE_TRITON=0` switch the
flash_attn package / flex / the Triton decode kernel off.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fallbacks import Fallbacks

log = logging.getLogger("fasttune.attention")


@dataclass(frozen=True)
class DocumentLayout:
    """Where the packed documents of a (B, T) batch lie. Built on the host (`from_position_ids` of CPU position
    ids), then moved with `to(device)`."""
    document_ids: torch.Tensor  # (B, T) int32: distinct across rows, non-decreasing along a row
    cu_seqlens: torch.Tensor  # (N + 1,) int32: where each of the N documents starts in the B * T flattened tokens
    max_seqlen: int  # the longest document

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> DocumentLayout | None:
        """A document starts at every row start and wherever the position restarts at 0. None when no row holds
        more than one document (plain causal attention is then exact). Reads the values on the host: pass CPU
        position ids (a CUDA tensor costs a device-to-host sync)."""
        B, T = position_ids.shape
        starts = position_ids == 0
        if T < 2 or not bool(starts[:, 1:].any()):
            return None
        starts = starts.clone()
        starts[:, 0] = True
        flat = starts.reshape(-1)
        document_ids = (torch.cumsum(flat.to(torch.int32), 0) - 1).to(torch.int32).reshape(B, T)
        begin = torch.nonzero(flat).reshape(-1)
        cu = torch.cat([begin, begin.new_tensor([B * T])]).to(torch.int32)
        return cls(document_ids, cu, int((cu[1:] - cu[:-1]).max()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DocumentLayout:
        return DocumentLayout(self.document_ids.to(device, non_blocking=non_blocking),
                              self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen)

    def pin_memory(self) -> DocumentLayout:
        return DocumentLayout(self.document_ids.pin_memory(), self.cu_seqlens.pin_memory(), self.max_seqlen)


FALLBACKS = Fallbacks("attention", log)


def build_mask(
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    q_offset: int = 0,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    empty_rows_see_self: bool = True,
) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask, True where query may attend to key.

    A query row with no allowed key (a left-padding position) is allowed to attend to itself so softmax never
    sees an empty row: its output is unused, but a NaN there would poison the backward pass. With
    `empty_rows_see_self=False` it stays empty (attention sinks: the sink's column keeps such a row's softmax
    finite, and the row's output is then zero, as the fused sink paths give)."""
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
    if not empty_rows_see_self:
        return allowed
    empty = ~allowed.any(-1, keepdim=True)
    if bool(empty.any()):
        diag = (k_pos == q_pos)[None, None]
        allowed = allowed | (empty & diag)
    return allowed




def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    documents: DocumentLayout | None = None,
    softcap: float | None = None,
    memo: dict | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns (B, Hq, Tq, D). `memo`: a dict shared by every layer of one forward (and its recompute), where what
    is derived from the masks (row cu_seqlens, flex block masks) is built once instead of per layer. `sinks`
    (Hq,): attention-sink logits (gpt-oss)."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    gqa = Hq != k.shape[1]
    if sliding_window is not None and Tk <= sliding_window:
        sliding_window = None  # the window covers every key: it changes nothing
    if sinks is not None:
        return _attention_with_sinks(q, k, v, sinks, scale, q_offset, sliding_window, key_padding_mask, documents,
                                     softcap, memo)
    plain_causal = key_padding_mask is None and documents is None and sliding_window is None and softcap is None
    if plain_causal and q_offset == 0 and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if plain_causal and Tq == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    whole_rows = key_padding_mask is None and q_offset == 0 and Tq == Tk
    if whole_rows and softcap is None and _torch_flash_ok(q, k, v):
        out = _torch_flash_varlen(q, k, v, scale, sliding_window, documents, memo)
        if out is not None:
            return out
    if (whole_rows and D <= 256 and _flash_attn_device_ok(q, k, v)
            and os.environ.get("FASTTUNE_FLASH_ATTN", "1") != "0"):
        out = _flash(q, k, v, scale, sliding_window, documents, softcap, memo)
        if out is not None:
            return out
    if whole_rows and q.is_cuda and os.environ.get("FASTTUNE_FLEX", "1") == "1":
        out = _flex(q, k, v, scale, sliding_window, documents, softcap, memo)
        if out is not None:
            return out
    if q.is_cuda:
        FALLBACKS.note(f"dense-mask:{key_padding_mask is not None}:{softcap is not None}:{q.dtype}",
                       f"a dense (B, 1, Tq, Tk) mask through {'eager math' if softcap else 'SDPA'} is used for "
                       f"{'a padding mask' if key_padding_mask is not None else 'these inputs'} ({q.dtype}, "
                       f"q_offset {q_offset}): slower than the fused paths")
    document_ids = documents.document_ids if documents is not None else None
    mask = build_mask(B, Tq, Tk, q.device, q_offset, sliding_window, key_padding_mask, document_ids)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return eager_attention(q, k, v, mask, scale, softcap)


def _attention_with_sinks(q, k, v, sinks, scale, q_offset, sliding_window, key_padding_mask, documents, softcap,
                          memo):
    """`attention` with sink logits (Hq,): the paths of the module docstring's "Attention sinks"."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    whole_rows = q_offset == 0 and Tq == Tk
    if (whole_rows and key_padding_mask is None and softcap is None and _torch_flash_ok(q, k, v)
            and FALLBACKS.usable("torch-flash-sinks")):
        out = _torch_flash_varlen(q, k, v, scale, sliding_window, documents, memo, sinks)
        if out is not None:
            return out
    if whole_rows and q.is_cuda and os.environ.get("FASTTUNE_FLEX", "1") == "1":
        out = _flex(q, k, v, scale, sliding_window, documents, softcap, memo, key_padding_mask, sinks)
        if out is not None:
            return out
    if q.is_cuda:
        FALLBACKS.note(f"sinks-eager:{whole_rows}:{q.dtype}",
                       f"attention sinks (gpt-oss) run as eager math with a dense (B, 1, Tq, Tk) mask "
                       f"({q.dtype}, {'flex off or failed' if whole_rows else f'q_offset {q_offset}'}): "
                       "slower, Tq x Tk scores per head in memory")
    document_ids = documents.document_ids if documents is not None else None
    mask = build_mask(B, Tq, Tk, q.device, q_offset, sliding_window, key_padding_mask, document_ids,
                      empty_rows_see_self=False)
    return eager_attention(q, k, v, mask, scale, softcap, sinks)


def eager_attention(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Reference math, as transformers' eager path: scores, soft-cap, mask, softmax in float32, cast back. With
    `sinks` (Hq,), each head's sink logit is one more softmax column whose probability is dropped (value zero); a
    row whose mask is all False then gives zero (the sink takes all of it)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is not None:
        B, H, Tq, _ = scores.shape
        sink = sinks.to(scores.dtype).reshape(1, H, 1, 1).expand(B, H, Tq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
        return torch.matmul(probs.to(q.dtype), v)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _sink_weight(lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """w = sigmoid(lse - s) in float32: the share of each row's softmax its real keys keep beside the sink. `sinks`
    is already shaped to broadcast against `lse`. lse = -inf (a row with no key) gives 0."""
    return torch.sigmoid(lse.float() - sinks.float())


class _SinkCombine(torch.autograd.Function):
    """out = o * w, w = sigmoid(lse - s): ordinary attention's (o, lse) over the real keys -> attention with sinks.
    o (B, H, T, D), lse (B, H, T), sinks (H,). Backward (module docstring): dO = w dOut,
    d lse = (dOut . o) w (1 - w), d s = -sum of d lse over B and T; lse's gradient goes back through the kernel
    that returned it (flex_attention). Saves o and lse only (w is recomputed)."""

    @staticmethod
    def forward(ctx, o, lse, sinks):
        w = _sink_weight(lse, sinks[:, None])
        ctx.save_for_backward(o, lse, sinks)
        return (o.float() * w[..., None]).to(o.dtype)

    @staticmethod
    def backward(ctx, dout):
        o, lse, sinks = ctx.saved_tensors
        w = _sink_weight(lse, sinks[:, None])
        do = (dout.float() * w[..., None]).to(o.dtype)
        dlse = (dout.float() * o.float()).sum(-1) * w * (1 - w)
        dsinks = -dlse.sum((0, 2))
        return do, dlse.to(lse.dtype), dsinks.to(sinks.dtype)


class _FlashSinks(torch.autograd.Function):
    """Attention with sinks through aten's flash kernel, varlen layout: qf (N, Hq, D), kf, vf (N, Hk, D), sinks
    (Hq,), cu_seqlens and the longest sequence, causal with an optional left window. The forward returns
    out = w o (w from the kernel's lse, (Hq, N)); the backward is the kernel's own backward given `out` and
    L = logaddexp(lse, s) (it recomputes the sink-inclusive P' = exp(S - L) and D = dOut . out from them), and
    d s = -sum_i exp(s - L_i) (dOut_i . out_i): the derivation is in the module docstring."""

    @staticmethod
    def forward(ctx, qf, kf, vf, sinks, cu, longest, scale, window_left):
        o, lse, rng_state, unused = _torch_flash_fwd(qf, kf, vf, cu, cu, longest, longest, scale, window_left)
        s = sinks.float()[:, None]
        full_lse = torch.logaddexp(lse, s)  # (Hq, N): the row's log-sum-exp with the sink column
        out = (o.float() * _sink_weight(lse, s).t()[..., None]).to(o.dtype)
        ctx.save_for_backward(qf, kf, vf, sinks, out, full_lse, cu, rng_state, unused)
        ctx.longest, ctx.scale, ctx.window_left = longest, scale, window_left
        return out

    @staticmethod
    def backward(ctx, dout):
        qf, kf, vf, sinks, out, full_lse, cu, rng_state, unused = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _torch_flash_bwd(dout, qf, kf, vf, out, full_lse, cu, ctx.longest, ctx.scale, ctx.window_left,
                                      rng_state, unused)
        d_rows = (dout.float() * out.float()).sum(-1).t()  # (Hq, N): D_i of every row
        dsinks = -(torch.exp(sinks.float()[:, None] - full_lse) * d_rows).sum(1)
        return dq, dk, dv, dsinks.to(sinks.dtype), None, None, None, None




def _row_layout(B: int, T: int, device: torch.device, memo: dict | None) -> tuple[torch.Tensor, int]:
    """cu_seqlens of B whole rows of T tokens (a window without documents), built on the device: no sync."""
    key = ("rows", B, T)
    if memo is not None and key in memo:
        return memo[key]
    out = (torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device), T)
    if memo is not None:
        memo[key] = out
    return out


def _varlen_inputs(q, k, v, documents: DocumentLayout | None, memo):
    """(B * T, H, D) views of q, k, v (the model's (B, T, H, D) storage transposed back) and (cu_seqlens, longest)."""
    B, Hq, T, D = q.shape
    if documents is not None:
        cu, longest = documents.cu_seqlens, documents.max_seqlen
    else:
        cu, longest = _row_layout(B, T, q.device, memo)
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]
    return flat, cu, longest


def _torch_flash_ok(q, k, v) -> bool:
    """PyTorch's own flash kernel takes CUDA fp16/bf16 of one dtype with head_dim a multiple of 8 up to 256."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and FALLBACKS.usable("torch-flash-varlen")
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def _torch_flash_fwd(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale, window_left, seqused_k=None):
    """aten's causal flash forward with cu_seqlens -> (out (N, Hq, D), lse (Hq, N) float32, rng_state, unused).
    The window, like flash-attn's, lets query i see keys [i - left, i]; `seqused_k` (decoding) reads only that many
    keys of each sequence."""
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        qf, kf, vf, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale, window_size_left=window_left,
        window_size_right=0 if window_left is not None else None, seqused_k=seqused_k)
    return out, lse, rng_state, unused


def _torch_flash_bwd(dout, qf, kf, vf, out, lse, cu, longest, scale, window_left, rng_state, unused):
    """aten's flash backward for `_torch_flash_fwd`'s varlen training call (the arguments autograd passes it)."""
    return torch.ops.aten._flash_attention_backward(
        dout, qf, kf, vf, out, lse, cu, cu, longest, longest, 0.0, True, rng_state, unused, scale=scale,
        window_size_left=window_left, window_size_right=0 if window_left is not None else None)


def _torch_flash_op(qf, kf, vf, cu, longest, scale, window_left):
    """aten's flash forward with cu_seqlens; autograd runs its flash backward."""
    return _torch_flash_fwd(qf, kf, vf, cu, cu, longest, longest, scale, window_left)[0]


def _torch_flash_varlen(q, k, v, scale, sliding_window, documents, memo, sinks=None):
    """With `sinks`: `_FlashSinks` (failures counted apart, as it calls the backward kernel itself)."""
    B, Hq, T, D = q.shape
    (qf, kf, vf), cu, longest = _varlen_inputs(q, k, v, documents, memo)
    window_left = None if sliding_window is None else sliding_window - 1
    path = "torch-flash-varlen" if sinks is None else "torch-flash-sinks"
    try:
        if sinks is None:
            out = _torch_flash_op(qf, kf, vf, cu, longest, scale, window_left)
        else:
            out = _FlashSinks.apply(qf, kf, vf, sinks, cu, longest, scale, window_left)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # an old torch or a GPU its flash kernel does not support
        FALLBACKS.fail(path, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None
    return out.reshape(B, T, Hq, D).transpose(1, 2)


def _flash_attn_device_ok(q, k, v) -> bool:
    """Whether flash-attn's kernels take these tensors: CUDA, fp16/bf16, one dtype. (Tests patch this to run the
    path on CPU against a stand-in `flash_attn` module.)"""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and v.dtype == q.dtype


def _flash(q, k, v, scale, sliding_window, documents, softcap, memo: dict | None = None):
    """The flash_attn package (training and prefill: Tq == Tk, no cache, no padding). Returns (B, Hq, T, D), or
    None when it is missing or raised (then it is not tried again).

    flash-attn's layout is (B, T, H, D) (varlen: (total, H, D)); GQA is native (head h reads kv head
    h // (Hq // Hk), as repeat_interleave does). With causal=True and window_size=(left, right) query i sees keys
    [i - left, i + right] (seqlen_q == seqlen_k, so its bottom-right alignment is our top-left); our mask allows
    q - window < k <= q, hence left = window - 1, right = 0. Soft-capping is tanh(s / cap) * cap of the scaled
    score, as in `eager_attention`."""
    if not FALLBACKS.usable("flash-attn"):
        return None
    try:
        import flash_attn
    except Exception as e:
        FALLBACKS.fail("flash-attn", f"the flash_attn package does not import: {type(e).__name__}")
        return None
    B, Hq, T, D = q.shape
    kw = {"softmax_scale": scale, "causal": True}
    if sliding_window is not None:  # only pass what is used, so versions without softcap still serve windows
        kw["window_size"] = (sliding_window - 1, 0)
    if softcap is not None:
        kw["softcap"] = float(softcap)
    try:
        if documents is None:
            out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
            return out.transpose(1, 2)
        (qf, kf, vf), cu, longest = _varlen_inputs(q, k, v, documents, memo)
        out = flash_attn.flash_attn_varlen_func(qf, kf, vf, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                                max_seqlen_k=longest, **kw)
        return out.reshape(B, T, Hq, D).transpose(1, 2)
    except torch.OutOfMemoryError:  # not a reason to give up on the kernel: the trainer explains what would fit
        raise
    except Exception as e:  # an old flash-attn, an unsupported GPU / dtype / head size
        FALLBACKS.fail("flash-attn", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return None


def _flex(q, k, v, scale, sliding_window, documents, softcap, memo: dict | None = None,
          key_padding_mask: torch.Tensor | None = None, sinks: torch.Tensor | None = None):
    """Compiled flex_attention for packed documents / sliding windows / soft-capping on CUDA. The block mask is built
    once per forward (memo) on the GPU from the layout's document ids; the compiled kernel sees one shape per
    (B, T), so static batch shapes compile it a bounded number of times. None if unavailable or it raised.

    With `sinks`: flex also returns lse (differentiable), and `_SinkCombine` adds the sinks; a padding mask is then
    taken too (a query with no key gives zero, as the eager reference with sinks does)."""
    if not FALLBACKS.usable("flex"):
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except Exception as e:
        FALLBACKS.fail("flex", f"flex_attention does not import: {type(e).__name__}")
        return None
    B, Hq, T, D = q.shape
    docs = documents.document_ids if documents is not None else None
    pad = key_padding_mask.bool() if key_padding_mask is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if sliding_window is not None:
            ok = ok & (kv_idx > q_idx - sliding_window)
        if docs is not None:
            ok = ok & (docs[b, q_idx] == docs[b, kv_idx])
        if pad is not None:
            ok = ok & pad[b, kv_idx]
        return ok

    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap
    try:
        # the same for every layer with this window (the layout and padding are the forward's)
        key = ("flex-block-mask", sliding_window, B, T, pad is not None)
        block_mask = memo.get(key) if memo is not None else None
        if block_mask is None:
            per_row = docs is not None or pad is not None
            block_mask = create_block_mask(mask_mod, B if per_row else None, None, T, T, device=q.device,
                                           _compile=q.is_cuda)
            if memo is not None:
                memo[key] = block_mask
        kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        if sinks is None:
            return _compiled_flex()(q, k, v, **kw)
        from torch.nn.attention.flex_attention import AuxRequest  # torch >= 2.9

        o, aux = _compiled_flex()(q, k, v, return_aux=AuxRequest(lse=True), **kw)
        return _SinkCombine.apply(o, aux.lse, sinks)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # an old torch or an unsupported head size
        FALLBACKS.fail("flex", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return None


_COMPILED = None


def _compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def decode_mask(lengths: torch.Tensor, max_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """(S, 1, 1, M) boolean: slot s's query (at position lengths[s] - 1) sees keys j < lengths[s], and with a window
    only the last `sliding_window` of them (the query counts itself, as in `build_mask`)."""
    j = torch.arange(max_len, device=lengths.device)
    n = lengths.to(torch.long)[:, None]
    allowed = j[None, :] < n
    if sliding_window is not None:
        allowed = allowed & (j[None, :] >= n - sliding_window)
    return allowed[:, None, None, :]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    memo: dict | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step over a per-slot cache. q (S, Hq, 1, D); k_cache, v_cache (S, M, Hk, D) (the new token's key
    already written at lengths[s] - 1); lengths (S,) int32 on q's device: keys per slot, >= 1. Returns (S, Hq, 1, D).
    No host sync and static shapes on every path. `memo`: shared by the layers of one step (masks, cu_seqlens)."""
    S, Hq, _, D = q.shape
    M = k_cache.shape[1]
    if softcap is None and _triton_decode_ok(q, k_cache, v_cache):
        out = _triton_decode(q, k_cache, v_cache, lengths, scale, sliding_window, sinks)
        if out is not None:
            return out
    if softcap is None and _torch_flash_ok(q, k_cache, v_cache) and FALLBACKS.usable("torch-flash-decode"):
        out = _torch_flash_decode(q, k_cache, v_cache, lengths, scale, sliding_window, memo, sinks)
        if out is not None:
            return out
    if q.is_cuda:  # sinks: eager math costs little at one query per slot, but it reads all M positions
        eager = "eager math (sinks)" if sinks is not None else "eager math (soft-capping)" if softcap else "SDPA"
        FALLBACKS.note(f"decode-dense:{softcap is not None}:{sinks is not None}:{q.dtype}",
                       f"decoding attends through a dense (S, 1, 1, {M}) length mask with {eager} ({q.dtype}): it reads all {M} cached "
                       "positions of every slot each step")
    key = ("decode-mask", sliding_window)
    mask = memo.get(key) if memo is not None else None
    if mask is None:
        mask = decode_mask(lengths, M, sliding_window)
        if memo is not None:
            memo[key] = mask
    k, v = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # (S, Hk, M, D) views
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != k.shape[1])
    return eager_attention(q, k, v, mask, scale, softcap, sinks)


def _triton_decode_ok(q, k_cache, v_cache) -> bool:
    """Whether the one-launch Triton decode kernel takes these tensors: where Triton runs (`kernels.use_triton`:
    CUDA, or FASTTUNE_KERNELS=triton), one dtype among fp16/bf16/fp32, head_dim <= 256, caches with unit stride
    along head_dim, not switched off (FASTTUNE_DECODE_TRITON=0) and not failed before."""
    from . import use_triton  # late: fasttune.kernels imports its kernel modules first

    return (use_triton(q) and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k_cache.dtype == q.dtype
            and v_cache.dtype == q.dtype and q.shape[-1] <= 256 and k_cache.stride(-1) == 1
            and v_cache.stride(-1) == 1 and os.environ.get("FASTTUNE_DECODE_TRITON", "1") != "0"
            and FALLBACKS.usable("triton-decode"))


def _triton_decode(q, k_cache, v_cache, lengths, scale, sliding_window, sinks):
    """kernels.decode_attention: one launch per layer (split-K with its combine in the same kernel). None when it
    raised (logged once; the next path is used from then on)."""
    from .decode_attention import decode_attention_triton

    try:
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale=scale, sliding_window=sliding_window,
                                       sinks=sinks)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a Triton that cannot compile it for this GPU / dtype / head size
        FALLBACKS.fail("triton-decode", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return None


def _torch_flash_decode(q, k_cache, v_cache, lengths, scale, sliding_window, memo, sinks=None):
    """With `sinks`: the kernel's lse weighs its output (`_SinkCombine`'s forward; decoding needs no backward)."""
    S, Hq, _, D = q.shape
    M, Hk = k_cache.shape[1], k_cache.shape[2]
    key = ("decode-cu", S, M)
    cu = memo.get(key) if memo is not None else None
    if cu is None:
        cu = (torch.arange(S + 1, dtype=torch.int32, device=q.device),
              torch.arange(0, (S + 1) * M, M, dtype=torch.int32, device=q.device))
        if memo is not None:
            memo[key] = cu
    window_left = None if sliding_window is None else sliding_window - 1
    try:
        out, lse, _, _ = _torch_flash_fwd(
            q.transpose(1, 2).reshape(S, Hq, D), k_cache.reshape(S * M, Hk, D), v_cache.reshape(S * M, Hk, D),
            cu[0], cu[1], 1, M, scale, window_left, seqused_k=lengths)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a torch whose flash kernel lacks seqused_k, or a GPU it does not support
        FALLBACKS.fail("torch-flash-decode", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return None
    out = out.reshape(S, 1, Hq, D).transpose(1, 2)  # (S, Hq, 1, D)
    if sinks is not None:
        out = _SinkCombine.apply(out, lse.t()[:, :, None], sinks)  # lse (Hq, S) -> (S, Hq, 1)
    return out
