"""Cross-entropy fused with the LM head: the (tokens x vocab) logits tensor is never materialised.

Forward, for token i with hidden row h_i, label y_i (rows with y_i == ignore_index are skipped):
    z_i   = W h_i + b                     (V logits, computed in the weight dtype, read back as float32)
    s_i   = c * tanh(z_i / c)             (Gemma 2 soft-capping; s_i = z_i when softcap is None)
    lse_i = log sum_j exp(s_ij)           (online over vocab blocks: running max m and sum d,
                                           d <- d * exp(m_old - m_new) + sum exp(s - m_new))
    l_i   = lse_i - (1 - eps) * s_iy - (eps / V) * sum_j s_ij      (F.cross_entropy's label smoothing eps)
    loss  = sum_i l_i / n,  n = number of non-ignored labels, or num_items_in_batch when given (so the sum
            over micro-batches with the global count equals the full-batch loss: exact gradient accumulation).
            n == 0 is treated as n = 1: an all-ignored batch gives loss 0 and zero gradients, never NaN.

Gradient (p_ij = exp(s_ij - lse_i) is the softmax):
    dl_i/ds_ij = p_ij - (1 - eps) [j == y_i] - eps / V
    dl_i/dz_ij = dl_i/ds_ij * (1 - tanh^2(z_ij / c))          (d/dz c tanh(z/c) = 1 - tanh^2(z/c))
    G = dloss/dZ = (dl/dz) / n,   dloss/dH = G W,   dloss/dW = G^T H,   dloss/db = sum_i G_i

Because G depends only on the forward quantities, it is computed in the forward pass: for each chunk of
tokens the logits are formed by one matmul, a Triton kernel computes the loss of each row and overwrites
the logits *in place* with G (two passes over the row: online max/sum, then gradient), and G is immediately
contracted with W and H. Only the chunk's logits, dH (N x H) and dW (V x H) are ever alive. The backward
just multiplies the stored gradients by the incoming scalar grad_output, read from the device by a small kernel
(no host sync; the product is formed in float32 and rounded once to the gradient's dtype).

No host sync in forward or backward: labels outside [0, V) (and not ignore_index) cannot be reported without
reading them back, so on the device they are treated as ignored and the loss is made NaN — the trainer stops
with "the loss is nan" (and validates labels on the host before a step, where the message names them).

Extra weight columns (`extra_weight` E, (V, r)): hidden has H + r columns and z_i = W h_i[:H] + E h_i[H:] + b,
i.e. the weight is [W | E] without forming that copy; dloss/dH = G [W | E] and dloss/dE = G^T H[:, H:]. A LoRA
LM head passes its B here (the extra columns of hidden are s A drop(h)), so a frozen W never gets a gradient.

Per-token log-probabilities (`fused_linear_token_logprobs`, what RL objectives need: reduction "none"):
    s_i      = tau * c * tanh(z_i / c)    (tau = 1 / temperature: the sampling distribution's log-probabilities)
    logp_i   = s_iy - lse_i               (0 for an ignored row)
    With the upstream gradient g_i = dL/dlogp_i (one per token, known only in the backward):
    dlogp_i/ds_ij = [j == y_i] - p_ij
    dL/dz_ij      = g_i ([j == y_i] - p_ij) * tau * (1 - tanh^2(z_ij / c))
    dL/dH = G W,  dL/dW = G^T H,  dL/db = sum_i G_i,  dL/dE = G^T H[:, H:]   (G = dL/dZ, chunk by chunk)
Unlike the loss, G depends on g, so it cannot be formed in the forward: the forward keeps only lse_i (N floats),
and the backward recomputes each chunk's logits (one extra matmul per chunk), overwrites them in place with G in
one pass (p_ij = exp(s_ij - lse_i) needs no second reduction) and contracts G with W and H at once. As for the
loss, only one chunk's logits are ever alive.

Precision: logits are rounded to the weight dtype exactly as ``F.linear(...).float()`` does; all softmax and
loss arithmetic is float32; every matmul accumulates in float32. For a 16-bit trainable weight, dW is
accumulated across chunks in the weight dtype (one rounding per chunk, like Liger-Kernel); chunks are large
(CHUNK_LOGITS_BYTES), so there are few of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX
from ._triton import tl, triton


# Budget for one chunk's logits. 128 MiB = 512 tokens at a 128K vocabulary in bf16, the size of Liger-Kernel's
# chunks (with 512 MiB chunks the H100 benchmark peaked at 1002 MiB against Liger's 125 MiB).
CHUNK_LOGITS_BYTES = 128 * 2**20
# Largest vocab block one kernel iteration loads (Liger-Kernel's choice; power of two).
MAX_VOCAB_BLOCK = 32768


if triton is not None:

    @triton.jit
    def _tanh(x):
        # exp formulation: available in every Triton version and in the interpreter; abs error ~1e-7
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x >= 0, t, -t)

    @triton.jit
    def _zero_row(row_ptr, V, BLOCK: tl.constexpr):
        # an ignored row's gradient: zeros over its logits
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(row_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32).to(row_ptr.dtype.element_ty),
                     mask=offs < V)

    @triton.jit
    def _scores(row_ptr, offs, mask, softcap, HAS_SOFTCAP: tl.constexpr):
        # one block of a row's (soft-capped) logits in float32, -inf past the vocabulary (for the online lse)
        s = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            s = tl.where(mask, softcap * _tanh(s / softcap), float("-inf"))
        return s

    @triton.jit
    def _scale_inplace_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        # x *= scale, in float32, for a device scalar: the backward's grad_output without a host sync
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        scale = tl.load(scale_ptr).to(tl.float32)
        tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_loss_and_grad_kernel(
        logits_ptr,  # (rows, V), row stride `stride_row`; overwritten with dloss/dlogits when COMPUTE_GRAD
        stride_row,
        labels_ptr,  # (rows,) int64
        row_loss_ptr,  # (rows,) float32, unscaled per-row loss
        grad_scale_ptr,  # () float32: 1 / n
        V,
        ignore_index,
        label_smoothing,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)

        if label == ignore_index:
            tl.store(row_loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                _zero_row(row_ptr, V, BLOCK)
            return

        # pass 1: online log-sum-exp (and the sum of logits needed by label smoothing)
        m = float("-inf")
        d = 0.0
        s_sum = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            s = _scores(row_ptr, offs, mask, softcap, HAS_SOFTCAP)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            if HAS_SMOOTHING:
                s_sum += tl.sum(tl.where(mask, s, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(d)

        s_y = tl.load(row_ptr + label).to(tl.float32)
        if HAS_SOFTCAP:
            s_y = softcap * _tanh(s_y / softcap)
        if HAS_SMOOTHING:
            loss = lse - (1.0 - label_smoothing) * s_y - (label_smoothing / V) * s_sum
        else:
            loss = lse - s_y
        tl.store(row_loss_ptr + row, loss)

        # pass 2: gradient, written over the logits block by block (each block is read before it is written)
        if COMPUTE_GRAD:
            scale = tl.load(grad_scale_ptr)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < V
                z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    s = softcap * t
                else:
                    s = z
                g = tl.exp(s - lse)
                if HAS_SMOOTHING:
                    g = g - label_smoothing / V
                    g = tl.where(offs == label, g - (1.0 - label_smoothing), g)
                else:
                    g = tl.where(offs == label, g - 1.0, g)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(row_ptr + offs, (g * scale).to(row_ptr.dtype.element_ty), mask=mask)


if triton is not None:

    @triton.jit
    def _token_logprob_kernel(
        logits_ptr,  # (rows, V), row stride `stride_row`; BACKWARD: overwritten with dL/dlogits
        stride_row,
        labels_ptr,  # (rows,) int64
        logp_ptr,  # (rows,) float32: forward output
        lse_ptr,  # (rows,) float32: written by the forward, read by the backward
        grad_ptr,  # (rows,) float32: dL/dlogp (backward)
        V,
        ignore_index,
        softcap,
        inv_temperature,
        HAS_SOFTCAP: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            if BACKWARD:
                _zero_row(row_ptr, V, BLOCK)
            else:
                tl.store(logp_ptr + row, 0.0)
                tl.store(lse_ptr + row, 0.0)
            return
        if BACKWARD:  # one pass: p from the stored lse, G written over the logits block by block
            lse = tl.load(lse_ptr + row)
            g = tl.load(grad_ptr + row).to(tl.float32) * inv_temperature
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < V
                z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    s = softcap * t * inv_temperature
                else:
                    s = z * inv_temperature
                d = tl.where(offs == label, 1.0, 0.0) - tl.exp(s - lse)
                d = d * g
                if HAS_SOFTCAP:
                    d = d * (1.0 - t * t)
                tl.store(row_ptr + offs, d.to(row_ptr.dtype.element_ty), mask=mask)
        else:  # online log-sum-exp, then s_y - lse
            m = float("-inf")
            dsum = 0.0
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < V
                s = _scores(row_ptr, offs, mask, softcap, HAS_SOFTCAP) * inv_temperature
                m_new = tl.maximum(m, tl.max(s, axis=0))
                dsum = dsum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
                m = m_new
            lse = m + tl.log(dsum)
            s_y = tl.load(row_ptr + label).to(tl.float32)
            if HAS_SOFTCAP:
                s_y = softcap * _tanh(s_y / softcap)
            tl.store(logp_ptr + row, s_y * inv_temperature - lse)
            tl.store(lse_ptr + row, lse)


def _divisor(labels: torch.Tensor, ignore_index: int, num_items_in_batch, device) -> torch.Tensor:
    """n as a float32 device tensor (no host sync), with n == 0 replaced by 1 (0/0 := 0)."""
    if num_items_in_batch is None:
        n = (labels != ignore_index).sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        n = num_items_in_batch
    else:  # a Python count: filled on the device, no host-to-device copy
        n = torch.full((), float(num_items_in_batch), dtype=torch.float32, device=device)
    n = n.to(device=device, dtype=torch.float32)
    return torch.where(n > 0, n, torch.ones_like(n))


def _chunk_rows(num_rows: int, vocab: int, element_size: int, chunk_bytes: int | None = None) -> int:
    rows = max(1, (chunk_bytes or CHUNK_LOGITS_BYTES) // (vocab * element_size))
    if rows >= 128:
        rows -= rows % 128  # matmul-friendly
    return min(num_rows, rows)


def loss_workspace_bytes(num_rows: int, vocab: int, hidden: int, element_size: int,
                         chunk_bytes: int | None = None) -> int:
    """Bytes `fused_linear_cross_entropy` allocates beyond its inputs for `num_rows` rows of a frozen (vocab x
    hidden) head (memory planning): one chunk's logits, dL/dhidden (kept for the backward) and the float32 row
    losses."""
    rows = _chunk_rows(num_rows, vocab, element_size, chunk_bytes)
    return rows * vocab * element_size + num_rows * hidden * element_size + 4 * num_rows


def _launch_loss_and_grad(logits, labels, row_loss, grad_scale, ignore_index, label_smoothing, softcap, compute_grad):
    vocab = logits.shape[1]
    block = min(MAX_VOCAB_BLOCK, triton.next_power_of_2(vocab))
    _ce_loss_and_grad_kernel[(logits.shape[0],)](
        logits, logits.stride(0), labels, row_loss, grad_scale, vocab, ignore_index,
        float(label_smoothing), float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0, COMPUTE_GRAD=compute_grad,
        BLOCK=block, num_warps=32 if block >= 8192 else 8,
    )


def _chunk_logits(hidden, weight, bias, extra, start, end):
    width = weight.shape[1]
    h = hidden[start:end] if extra is None else hidden[start:end, :width]
    logits = F.linear(h, weight, bias)
    if extra is not None:
        logits.addmm_(hidden[start:end, width:], extra.t())
    return h, logits


def _contract_chunk_grads(dlogits, hidden, h, weight, extra, start, end, grad_hidden, grad_weight, grad_extra,
                          grad_bias) -> None:
    """From one chunk's dL/dlogits (rows start:end): its rows of dL/dhidden = G [W | E], and its share of
    dL/dW = G^T h, dL/dE = G^T hidden[:, H:], dL/db = sum_i G_i (the first chunk writes, later ones add). A gradient
    passed as None is not wanted."""
    width = weight.shape[1]
    if grad_hidden is not None:
        if extra is None:
            torch.mm(dlogits, weight, out=grad_hidden[start:end])
        else:
            grad_hidden[start:end, :width] = dlogits @ weight
            grad_hidden[start:end, width:] = dlogits @ extra
    if grad_weight is not None:
        if start == 0:
            torch.mm(dlogits.t(), h, out=grad_weight)
        else:
            grad_weight.addmm_(dlogits.t(), h)
    if grad_extra is not None:
        if start == 0:
            torch.mm(dlogits.t(), hidden[start:end, width:], out=grad_extra)
        else:
            grad_extra.addmm_(dlogits.t(), hidden[start:end, width:])
    if grad_bias is not None:
        grad_bias += dlogits.sum(0, dtype=torch.float32)


def _forward_and_grads(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, num_items_in_batch,
                       need_hidden_grad, need_weight_grad, need_bias_grad, chunk_bytes=None, extra=None,
                       need_extra_grad=False):
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    compute_grad = need_hidden_grad or need_weight_grad or need_bias_grad or need_extra_grad
    divisor = _divisor(labels, ignore_index, num_items_in_batch, device)
    grad_scale = (1.0 / divisor).reshape(())

    row_loss = torch.full((num_rows,), float("nan"), dtype=torch.float32, device=device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.empty_like(weight) if need_weight_grad else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias_grad else None
    grad_extra = torch.empty_like(extra) if need_extra_grad else None

    rows = _chunk_rows(num_rows, vocab, weight.element_size(), chunk_bytes)
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        h, logits = _chunk_logits(hidden, weight, bias, extra, start, end)  # in the weight dtype, as the reference
        _launch_loss_and_grad(logits, labels[start:end], row_loss[start:end], grad_scale,
                              ignore_index, label_smoothing, softcap, compute_grad)
        # `logits` now holds dloss/dlogits for this chunk
        _contract_chunk_grads(logits, hidden, h, weight, extra, start, end, grad_hidden, grad_weight, grad_extra,
                              grad_bias)
        del h, logits  # else the next chunk's logits are allocated while these are still held: two chunks at peak
    loss = row_loss.sum() / divisor
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias, grad_extra


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, num_items_in_batch,
                need_hidden_grad, need_weight_grad, need_bias_grad, chunk_bytes, extra, need_extra_grad):
        loss, grad_hidden, grad_weight, grad_bias, grad_extra = _forward_and_grads(
            hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, num_items_in_batch,
            need_hidden_grad, need_weight_grad, need_bias_grad, chunk_bytes, extra, need_extra_grad)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_extra)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.backward_done:
            raise RuntimeError("fused_linear_cross_entropy stores its gradients in the forward pass and scales them "
                               "in place, so it cannot be back-propagated twice; recompute the loss instead.")
        ctx.backward_done = True
        grads = ctx.saved_tensors
        scale = grad_loss.detach().reshape(1).to(torch.float32).contiguous()
        for g in grads:
            if g is not None and g.numel():
                _scale_inplace(g, scale)
        grad_hidden, grad_weight, grad_bias, grad_extra = grads
        return (grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None, grad_extra,
                None)


def _scale_inplace(g: torch.Tensor, scale: torch.Tensor) -> None:
    if not g.is_contiguous():  # our saved gradients are all fresh, contiguous buffers; anything else: plain torch
        g.copy_((g.float() * scale).to(g.dtype))
        return
    block = 4096
    _scale_inplace_kernel[(triton.cdiv(g.numel(), block),)](g, scale, g.numel(), BLOCK=block)


def _check_inputs(hidden, weight, labels, bias, extra=None):
    width = weight.shape[1] + (extra.shape[1] if extra is not None else 0) if weight.dim() == 2 else -1
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != width:
        raise ValueError(f"fused_linear_cross_entropy expects hidden (N, H) and weight (V, H) (hidden (N, H + r) "
                         f"with extra_weight (V, r)); got hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}" + ("" if extra is None else f", extra_weight {tuple(extra.shape)}"))
    if extra is not None and (extra.dim() != 2 or extra.shape[0] != weight.shape[0] or extra.dtype != weight.dtype):
        raise ValueError(f"extra_weight must be (V, r) = ({weight.shape[0]}, r) in the weight's dtype "
                         f"{weight.dtype}; got {tuple(extra.shape)} {extra.dtype}")
    if hidden.shape[:-1].numel() != labels.numel():
        raise ValueError(f"labels must have one entry per hidden row (already shifted): {labels.numel()} labels "
                         f"for {hidden.shape[:-1].numel()} rows")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype; cast the "
                        f"hidden states to the LM head dtype first")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    extra_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton path of ``fused_linear_cross_entropy_reference`` (same arguments, same result).

    hidden: (N, H) (or (..., H)); weight: (V, H); labels: (N,) already shifted, int64. Returns a float32 scalar.
    chunk_bytes: budget for one chunk's logits (default CHUNK_LOGITS_BYTES); the model passes its
    `loss_chunk_bytes`, None unless a caller sets it (CausalLM says why nothing raises it by default)."""
    if triton is None:
        raise RuntimeError("fused_linear_cross_entropy needs Triton; use fused_linear_cross_entropy_reference on CPU")
    _check_inputs(hidden, weight, labels, bias, extra_weight)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    bad = (labels1d != ignore_index) & ((labels1d < 0) | (labels1d >= weight.shape[0]))
    poison = None
    if labels1d.is_cuda:  # no sync: bad labels are ignored by the kernel and turn the loss into NaN (see above)
        labels1d = labels1d.masked_fill(bad, ignore_index)
        poison = torch.where(bad.any(), float("nan"), 0.0)
    elif bool(bad.any()):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    grad_on = torch.is_grad_enabled()
    loss = FusedLinearCrossEntropyFunction.apply(
        hidden2d, weight.contiguous(), bias, labels1d, ignore_index, label_smoothing, softcap, num_items_in_batch,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, chunk_bytes,
        None if extra_weight is None else extra_weight.contiguous(),
        grad_on and extra_weight is not None and extra_weight.requires_grad,
    )
    return loss if poison is None else loss + poison


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_bytes: int | None = None,  # accepted for a common signature; the reference has no chunks
    extra_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of token losses divided by the number of non-ignored targets (or ``num_items_in_batch``).

    hidden: (N, H); weight: (V, H); labels: (N,) already shifted. Logits are computed in the weight dtype and
    upcast to float32, as transformers does. A zero count is treated as 1, so an all-ignored batch gives 0.
    extra_weight (V, r): hidden is (N, H + r) and the logits are hidden @ [weight | extra_weight]^T."""
    if extra_weight is not None:
        _check_inputs(hidden, weight, labels, bias, extra_weight)
        weight = torch.cat([weight, extra_weight], dim=1)
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum", label_smoothing=label_smoothing)
    return loss / _divisor(labels, ignore_index, num_items_in_batch, loss.device).to(loss.dtype)


# ---- per-token log-probabilities (reduction "none") ---------------------------------------------------------

def _launch_token_logprob(logits, labels, logp, lse, grad, ignore_index, softcap, temperature, backward):
    vocab = logits.shape[1]
    block = min(MAX_VOCAB_BLOCK, triton.next_power_of_2(vocab))
    _token_logprob_kernel[(logits.shape[0],)](  # a pass's unused output pointer gets `lse` as a stand-in
        logits, logits.stride(0), labels, logp if logp is not None else lse, lse, grad if grad is not None else lse,
        vocab, ignore_index,
        float(softcap) if softcap is not None else 1.0, 1.0 / float(temperature),
        HAS_SOFTCAP=softcap is not None, BACKWARD=backward, BLOCK=block, num_warps=32 if block >= 8192 else 8)


class FusedLinearTokenLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, extra, ignore_index, softcap, temperature, chunk_bytes):
        num_rows, vocab = hidden.shape[0], weight.shape[0]
        logp = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
        rows = _chunk_rows(num_rows, vocab, weight.element_size(), chunk_bytes)
        for start in range(0, num_rows, rows):
            end = min(start + rows, num_rows)
            _, logits = _chunk_logits(hidden, weight, bias, extra, start, end)
            _launch_token_logprob(logits, labels[start:end], logp[start:end], lse[start:end], None, ignore_index,
                                  softcap, temperature, backward=False)
        ctx.save_for_backward(hidden, weight, bias, extra, labels, lse)
        ctx.settings = (ignore_index, softcap, temperature, chunk_bytes)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, extra, labels, lse = ctx.saved_tensors
        ignore_index, softcap, temperature, chunk_bytes = ctx.settings
        need_h, need_w, need_b, _, need_e = ctx.needs_input_grad[:5]
        grad_logp = grad_logp.to(torch.float32).contiguous()
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.empty_like(weight) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_b else None
        grad_extra = torch.empty_like(extra) if need_e else None
        rows = _chunk_rows(hidden.shape[0], weight.shape[0], weight.element_size(), chunk_bytes)
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            h, logits = _chunk_logits(hidden, weight, bias, extra, start, end)
            _launch_token_logprob(logits, labels[start:end], None, lse[start:end], grad_logp[start:end],
                                  ignore_index, softcap, temperature, backward=True)
            # `logits` now holds dL/dlogits of this chunk
            _contract_chunk_grads(logits, hidden, h, weight, extra, start, end, grad_hidden, grad_weight,
                                  grad_extra, grad_bias)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, grad_extra, None, None, None, None


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    extra_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton path of ``fused_linear_token_logprobs_reference`` (same arguments, same result).

    hidden: (N, H) (or (..., H)); weight: (V, H); labels: (N,) already shifted. Returns (N,) float32
    log p(label_i), 0 where the label is ignore_index; differentiable in hidden, weight, bias and extra_weight."""
    if triton is None:
        raise RuntimeError("fused_linear_token_logprobs needs Triton; use fused_linear_token_logprobs_reference on "
                           "CPU")
    _check_inputs(hidden, weight, labels, bias, extra_weight)
    _check_temperature(temperature)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
    shape = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    bad = (labels1d != ignore_index) & ((labels1d < 0) | (labels1d >= weight.shape[0]))
    poison = None
    if labels1d.is_cuda:  # no sync, as the loss: bad labels are ignored and their log-probabilities made NaN
        labels1d = labels1d.masked_fill(bad, ignore_index)
        poison = torch.where(bad, float("nan"), 0.0)
    elif bool(bad.any()):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")
    logp = FusedLinearTokenLogprobFunction.apply(
        hidden2d, weight.contiguous(), bias, labels1d,
        None if extra_weight is None else extra_weight.contiguous(), ignore_index, softcap, temperature, chunk_bytes)
    if poison is not None:
        logp = logp + poison
    return logp.reshape(shape)


def fused_linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,  # accepted for a common signature; the reference has no chunks
    extra_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(softcap(hidden @ [weight | extra_weight]^T + bias) / temperature)[label] per row, float32, 0 where
    the label is ignore_index. Logits in the weight dtype, upcast to float32, as the model's `logits`."""
    _check_temperature(temperature)
    if extra_weight is not None:
        _check_inputs(hidden, weight, labels, bias, extra_weight)
        weight = torch.cat([weight, extra_weight], dim=1)
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == ignore_index, 0.0)
