"""Mixture-of-Experts MLP (Qwen3-MoE, Mixtral, gpt-oss): a router picks k of E gated MLPs per token, and the
experts run as grouped GEMMs over the tokens sorted by expert.

For the T tokens of a layer, with router weight R (E, H):
    logits = x R^T                                   (T, E), in the compute dtype
    p      = softmax(float32(logits))                (T, E)
    w, i   = topk(p, k)                              (T, k): torch.topk's order and tie-breaking, as transformers
    w      = w / sum(w)                              when norm_topk_prob (Mixtral always)
    y_t    = sum_j w_tj * Down_{i_tj}(act(Gate_{i_tj} x_t) * Up_{i_tj} x_t)
Qwen3-MoE casts w to the logits' dtype before the product; Mixtral keeps it float32 (same values in float32).
gpt-oss ("topk_softmax"): logits = x R^T + b, (l, i) = topk(logits, k), w = softmax(l) in the logits' dtype; its
experts carry biases, are stored (E, in, out) (read in place: grouped_linear's `transposed`), interleave gate and up
(gate = even columns) and use the clamped SwiGLU (spec.swiglu_alpha / swiglu_limit, see ArchSpec).

Expert compute: the T*k (token, slot) pairs are sorted by expert once per layer (`sort_by_expert`); the gathered
rows (`to_expert_order`) go through gate_up = grouped_linear(x_sorted, W_gate_up (E, 2I, H)), the GLU, and down =
grouped_linear(., W_down (E, H, I)), one launch each for all experts; the rows return to (token, slot) order through
the inverse permutation (`to_token_order`) and are combined with their routing weights by one batched
(1 x k) @ (k x H) product per token. The permutations' backwards are gathers (no index_put with accumulation), and
nothing on this path reads a device value on the host.

Load-balancing loss (Switch Transformer, as transformers' `load_balancing_loss_func`), over the layers' logits
stacked along the rows: with f_e the fraction of (token, slot) assignments to expert e over all layers' top-k
and P_e the mean router probability of e (padding rows excluded when an attention mask is given),
    aux = E * sum_e f_e * P_e.
Only P_e carries a gradient (f_e counts a top-k selection).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import kernels
from ..kernels.clamped_swiglu import SUPPORTED_DTYPES as SWIGLU_KERNEL_DTYPES
from ..kernels.clamped_swiglu import clamped_swiglu_backward, clamped_swiglu_forward
from ..kernels.grouped_gemm import sort_by_expert, to_expert_order, to_token_order
from ..kernels.nf4 import NF4Tensor, quantize_nf4
from .spec import ArchSpec

EXPERT_STACKS = ("gate_up_proj", "down_proj")


class NF4ExpertStack(nn.Module):
    """A 3-D expert stack stored in NF4 (QLoRA's base for the experts, the bulk of an MoE model's weights); the
    grouped GEMM dequantises it when it runs (forward and again in the backward, never saved). Buffers as NF4Linear
    keeps them: the float32 scales bit-cast to int32, so `model.to(dtype)` cannot round them."""

    def __init__(self, quantized: NF4Tensor):
        super().__init__()
        self.shape, self.dtype = quantized.shape, quantized.dtype
        self.blocksize, self.blocksize2 = quantized.blocksize, quantized.blocksize2
        self.register_buffer("packed", quantized.packed)
        self.register_buffer("absmax_q", quantized.absmax_q)
        self.register_buffer("absmax2_bits", quantized.absmax2.float().contiguous().view(torch.int32))
        self.register_buffer("offset_bits", quantized.offset.float().reshape(1).view(torch.int32))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax_q, self.absmax2_bits.view(torch.float32),
                         self.offset_bits.view(torch.float32).reshape(()), self.shape, self.dtype, self.blocksize,
                         self.blocksize2)

    def dequantize(self) -> torch.Tensor:
        return self.quantized.dequantize()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, nf4 blocksize={self.blocksize}, dtype={self.dtype}"


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's GLU: gate clamped above at `limit`, up clamped to [-limit, limit], (up + 1) * gate * sigmoid(alpha
    gate), as transformers computes it (elementwise ops in the input dtype). Under autograd this keeps four
    tensors of the width beside its inputs; `ClampedSwiGLU` is the training path."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def split_gate_up(gate_up: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views of a fused gate_up projection output (..., 2I): even / odd columns when `interleaved`
    (gpt-oss), else the first / second half."""
    if interleaved:
        return gate_up[..., ::2], gate_up[..., 1::2]
    return gate_up.split(gate_up.shape[-1] // 2, dim=-1)


def _swiglu_kernel_runs(gate_up: torch.Tensor) -> bool:
    return kernels.use_triton(gate_up) and gate_up.dtype in SWIGLU_KERNEL_DTYPES


class ClampedSwiGLU(torch.autograd.Function):
    """y = clamped_swiglu(gate, up) of a fused gate_up (M, 2I), saving gate_up alone for the backward: 2I values
    per routed row, where autograd over the elementwise ops keeps 6I (the clamped gate, the sigmoid, up + 1 and the
    gate product beside gate_up). The forward is clamped_swiglu itself (same values); the backward recomputes in
    float32 (float64 inputs: in float64), CHUNK_ELEMENTS values of the width at a time (temporaries bounded
    whatever the token count), and rounds each gradient once. Where the Triton kernels run (CUDA; fp32/bf16/fp16)
    each direction is one launch of kernels/clamped_swiglu.py, same values:
        g = min(gate, limit),  u = clamp(up, -limit, limit),  s = sigmoid(alpha g)
        d gate = dy (u + 1) s (1 + alpha g (1 - s)) [gate <= limit]
        d up   = dy g s [-limit <= up <= limit]
    (torch.clamp passes the gradient where its input lies within the bounds, ends included: the same masks.)"""

    CHUNK_ELEMENTS = 1 << 21

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, interleaved: bool, alpha: float, limit: float) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        ctx.interleaved, ctx.alpha, ctx.limit = interleaved, alpha, limit
        if _swiglu_kernel_runs(gate_up):
            return clamped_swiglu_forward(gate_up, interleaved, alpha, limit)
        return clamped_swiglu(*split_gate_up(gate_up, interleaved), alpha, limit)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        alpha, limit = ctx.alpha, ctx.limit
        if _swiglu_kernel_runs(gate_up):
            return clamped_swiglu_backward(gate_up, dy, ctx.interleaved, alpha, limit), None, None, None
        width = gate_up.shape[-1] // 2
        rows_in = gate_up.reshape(-1, 2 * width)
        grad = torch.empty_like(rows_in)
        gate, up = split_gate_up(rows_in, ctx.interleaved)
        dgate, dup = split_gate_up(grad, ctx.interleaved)
        dy = dy.reshape(-1, width)
        step = max(1, ClampedSwiGLU.CHUNK_ELEMENTS // max(1, width))
        compute = torch.promote_types(gate_up.dtype, torch.float32)  # float32, or float64 for float64 inputs
        for a in range(0, rows_in.shape[0], step):
            b = min(a + step, rows_in.shape[0])
            g_in, u_in, d = (t[a:b].to(compute) for t in (gate, up, dy))
            g = g_in.clamp(max=limit)
            s = torch.sigmoid(alpha * g)
            dg = d * (u_in.clamp(min=-limit, max=limit) + 1) * s * (1 + alpha * g * (1 - s))
            dgate[a:b] = dg.masked_fill_(g_in > limit, 0)
            dup[a:b] = (d * g * s).masked_fill_((u_in < -limit) | (u_in > limit), 0)
        return grad.view(gate_up.shape), None, None, None


class Experts(nn.Module):
    """E gated MLPs stored as transformers 5 holds them: gate_up_proj (E, 2I, H) with gate rows first, down_proj
    (E, H, I); gpt-oss: gate_up_proj (E, H, 2I) with gate and up interleaved, down_proj (E, I, H), and biases
    gate_up_proj_bias (E, 2I), down_proj_bias (E, H). `forward` takes rows already sorted by expert."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        E, h, i = spec.num_experts, spec.hidden_size, spec.expert_intermediate_size
        self.num_experts, self.intermediate_size, self.activation = E, i, spec.activation
        self.transposed, self.interleaved = spec.experts_transposed, spec.gate_up_interleaved
        self.swiglu = (spec.swiglu_alpha, spec.swiglu_limit) if spec.swiglu_alpha is not None else None
        self.gate_up_proj = nn.Parameter(torch.empty((E, h, 2 * i) if self.transposed else (E, 2 * i, h)))
        self.down_proj = nn.Parameter(torch.empty((E, i, h) if self.transposed else (E, h, i)))
        if spec.expert_bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * i))
            self.down_proj_bias = nn.Parameter(torch.empty(E, h))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None

    def stack(self, name: str) -> torch.Tensor | NF4Tensor:
        """The stored weight of "gate_up_proj" or "down_proj": a tensor, or an NF4Tensor once quantised."""
        w = getattr(self, name)
        return w.quantized if isinstance(w, NF4ExpertStack) else w

    def dense_stack(self, name: str) -> torch.Tensor:
        """The stored weight as a dense tensor (dequantised when NF4), in its storage order."""
        w = getattr(self, name)
        return w.dequantize() if isinstance(w, NF4ExpertStack) else w.detach()

    def quantize_nf4_(self, name: str, quantized: NF4Tensor | None = None) -> None:
        """Store the `name` stack in NF4 from now on (frozen; load_in_4bit does this as each stack is read).
        `quantized`: its NF4 form when already made, e.g. `NF4Tensor.empty` of its shape for a model kept on the
        meta device to count its memory."""
        if name not in EXPERT_STACKS:
            raise ValueError(f"expert stacks are {EXPERT_STACKS}, got {name!r}")
        w = getattr(self, name)
        if isinstance(w, NF4ExpertStack):
            return
        if quantized is not None:
            if tuple(quantized.shape) != tuple(w.shape):
                raise ValueError(f"{name}: an NF4 form of shape {tuple(quantized.shape)} for a stack of shape "
                                 f"{tuple(w.shape)}")
        elif w.device.type == "meta":
            raise ValueError(f"{name} is still on the meta device (not loaded yet)")
        del self._parameters[name]
        setattr(self, name, NF4ExpertStack(quantized if quantized is not None else quantize_nf4(w.detach())))

    def project(self, name: str, x_sorted: torch.Tensor, offsets: torch.Tensor, adapter: dict | None = None
                ) -> torch.Tensor:
        """One of the two grouped projections ("gate_up_proj" or "down_proj") of rows sorted by expert; `adapter`:
        grouped_linear's lora_A / lora_B / lora_scaling for it."""
        return kernels.grouped_linear(x_sorted, self.stack(name), offsets, bias=getattr(self, name + "_bias"),
                                      transposed=self.transposed, **(adapter or {}))

    def forward(self, x_sorted: torch.Tensor, offsets: torch.Tensor, adapters: dict[str, dict] | None = None
                ) -> torch.Tensor:
        """`adapters`: projection name -> its LoRA arguments (fasttune.adapters' LoraExperts passes them)."""
        adapters = adapters or {}
        gate_up = self.project("gate_up_proj", x_sorted, offsets, adapters.get("gate_up_proj"))
        if self.swiglu is not None:
            act = ClampedSwiGLU.apply(gate_up, self.interleaved, *self.swiglu)
        elif not self.interleaved:
            # gate and up halves in one call: the backward writes d gate_up whole (no concatenation of two halves)
            act = kernels.glu_packed(gate_up, self.activation)
        else:
            act = kernels.glu(*split_gate_up(gate_up, self.interleaved), self.activation)
        return self.project("down_proj", act, offsets, adapters.get("down_proj"))


class SparseMoE(nn.Module):
    """The routed MLP of one layer: the router (a linear H -> E, named as the checkpoint names it: `gate`, gpt-oss
    `router`) and `experts`."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        self.num_experts, self.top_k = spec.num_experts, spec.experts_per_token
        if spec.router_kind not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"router_kind {spec.router_kind!r}: expected 'softmax_topk' or 'topk_softmax'")
        self.router_name = "router" if spec.model_type == "gpt_oss" else "gate"
        self.add_module(self.router_name, nn.Linear(spec.hidden_size, spec.num_experts, bias=spec.router_bias))
        self.experts = Experts(spec)
        # Mixtral's router_jitter_noise: only while training (its parity is not testable: random)
        self.jitter_noise = spec.router_jitter_noise

    @property
    def router_linear(self) -> nn.Module:
        return getattr(self, self.router_name)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (T, E), routing weights (T, k), expert ids (T, k)) for x (T, H)."""
        logits = self.router_linear(x)
        if self.spec.router_kind == "topk_softmax":
            top, ids = torch.topk(logits, self.top_k, dim=-1)
            return logits, torch.softmax(top, dim=-1, dtype=top.dtype), ids
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.spec.routing_weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        return logits, weights, ids

    def forward(self, x: torch.Tensor, router_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (..., H). The layer's router logits (tokens, E) are appended to `router_logits` when it is given."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits, weights, ids = self.route(x)
        if router_logits is not None:
            router_logits.append(logits)
        order, offsets, inverse = sort_by_expert(ids, self.num_experts)
        y_sorted = self.experts(to_expert_order(x, order, inverse, self.top_k), offsets)
        y = to_token_order(y_sorted, order, inverse).view(x.shape[0], self.top_k, shape[-1])
        # sum_j w_tj y_tj, one (1 x k) @ (k x H) product per token
        out = torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)
        return out.reshape(shape)


def load_balancing_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch-Transformer auxiliary loss of the layers' router logits (each (B*T, E)); see the module docstring.
    `attention_mask` (B, T): rows of padding tokens count neither in f nor in P."""
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one layer")
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        selected = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        row_weight = torch.ones(probs.shape[0], device=device) if mask is None else mask
        counts = counts.index_add(0, selected, row_weight[:, None].expand(-1, top_k).reshape(-1))
        prob_sum = prob_sum + (probs * row_weight[:, None]).sum(0)
        rows = rows + row_weight.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
