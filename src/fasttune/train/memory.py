"""Memory policy for training: per-layer activation checkpointing, CPU offload of checkpointed inputs, MLP chunking.

Each decoder layer runs in one of three modes (installed as `DecoderModel.layer_runner`):
- "none":       plain autograd; the layer keeps its activations until the backward (fastest).
- "checkpoint": the forward runs without a graph and keeps only the layer input h (tokens x hidden); the backward
                re-runs the layer with a graph from h and back-propagates through it (one extra layer forward).
- "offload":    as "checkpoint", but h is copied to pinned CPU memory on a side CUDA stream during the forward
                (overlapped with the next layers' compute) and copied back on the side stream while the layer
                after it is still in its backward, so the GPU holds no per-layer state at all.
On CPU the same code runs; "offload" keeps a separate copy of h instead of a pinned host buffer (so it is
testable, and the original tensor is released as on GPU).

`recompute-mlp` keeps every layer's activations but the MLP's gate/up outputs (recomputed in the backward), a
middle ground between "none" and checkpointing. `auto` picks modes from free GPU memory and an estimate of each layer's saved activations: nothing is
recomputed when everything fits; otherwise just enough layers are checkpointed, and then offloaded. For long
sequences the MLP runs in token chunks (`GatedMLP.chunk_tokens`) and the fused LoRA MLP recomputes its gate/up
projections in the backward, so no tokens x intermediate tensor of the whole sequence is ever alive.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .distributed import is_sharded

MODES = ("none", "checkpoint", "offload")
POLICIES = ("auto", "none", "recompute-mlp", "checkpoint", "offload")
GiB = 2**30


# ---- offload of checkpointed layer inputs ------------------------------------------------------------------

class _Slot:
    __slots__ = ("host", "device_copy", "device", "ready", "prev")

    def __init__(self, host, device, ready, prev):
        self.host, self.device, self.ready, self.prev = host, device, ready, prev
        self.device_copy = None


class ActivationOffloader:
    """Moves checkpointed layer inputs to host memory and brings them back, one side CUDA stream for both ways.
    Slots form a chain in forward order: fetching slot i starts the prefetch of slot i-1 (the next backward)."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.last: _Slot | None = None

    def new_pass(self) -> None:
        self.last = None  # a fresh forward: do not chain to (and keep alive) the previous pass's slots

    def offload(self, t: torch.Tensor) -> _Slot:
        if t.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before the copy starts
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.stream)
            t.record_stream(self.stream)  # the allocator must not reuse t's memory before the copy is done
        else:
            host, ready = t.detach().clone(), None
        slot = _Slot(host, t.device, ready, self.last)
        self.last = slot
        return slot

    def prefetch(self, slot: _Slot | None) -> None:
        if slot is None or slot.host is None or slot.device_copy is not None:
            return
        if slot.device.type == "cuda":
            with torch.cuda.stream(self.stream):  # same stream as the D2H copy: ordered after it
                slot.device_copy = slot.host.to(slot.device, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.stream)
        else:
            slot.device_copy = slot.host
        slot.host = None

    def fetch(self, slot: _Slot) -> torch.Tensor:
        self.prefetch(slot)
        t = slot.device_copy
        if slot.device.type == "cuda":
            current = torch.cuda.current_stream(slot.device)
            current.wait_event(slot.ready)
            t.record_stream(current)
        slot.device_copy = None
        self.prefetch(slot.prev)  # overlaps with this layer's recompute and backward
        slot.prev = None
        return t


# ---- the checkpointed layer ---------------------------------------------------------------------------------

class _CheckpointedLayer(torch.autograd.Function):
    """out = layer(h, attn_inputs); saves h (or offloads it) instead of the layer's activations.

    The layer's trainable parameters are explicit inputs, so the backward returns their gradients through the
    autograd engine (both `loss.backward()` and `torch.autograd.grad` work), and the backward runs even when h
    needs no gradient (the first layer over frozen embeddings).

    An MoE layer that appends its router logits to `attn_inputs.router_logits` (for the load-balancing loss) has
    them returned as extra outputs of this node, so the aux loss's gradient comes back here with the layer's and
    flows through the recomputed router."""

    @staticmethod
    def forward(ctx, hidden, layer, attn_inputs, offloader, offload, *params):
        ctx.layer, ctx.attn_inputs, ctx.layer_params = layer, attn_inputs, params
        ctx.offloader, ctx.offload = offloader, offload
        ctx.device = hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}
        collected = attn_inputs.router_logits
        before = len(collected) if collected is not None else 0
        with torch.no_grad():
            out = layer(hidden, attn_inputs)
        router_logits = tuple(collected[before:]) if collected is not None else ()
        ctx.num_router_logits = len(router_logits)
        if offload:
            ctx.slot = offloader.offload(hidden)
        else:
            ctx.save_for_backward(hidden)
        return (out, *router_logits)

    @staticmethod
    def backward(ctx, grad_out, *grad_router_logits):
        if ctx.offload:
            hidden = ctx.offloader.fetch(ctx.slot)
            ctx.slot = None
        else:  # a kept layer (e.g. the last): start bringing back the offloaded input that is needed next
            hidden = ctx.saved_tensors[0]
            ctx.offloader.prefetch(ctx.offloader.last)
        need_h = ctx.needs_input_grad[0]
        params = [p for p, need in zip(ctx.layer_params, ctx.needs_input_grad[5:]) if need]
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(ctx.cpu_rng)  # same dropout masks as the first forward
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast("cpu", enabled=ctx.autocast["cpu"][0],
                                                     dtype=ctx.autocast["cpu"][1]), \
                    torch.autocast("cuda", enabled=ctx.autocast["cuda"][0], dtype=ctx.autocast["cuda"][1]):
                h = hidden.detach().requires_grad_(need_h)
                # the recompute's router logits go to a list of its own, not the finished forward's
                recompute_inputs = (dataclasses.replace(ctx.attn_inputs, router_logits=[])
                                    if ctx.num_router_logits else ctx.attn_inputs)
                out = ctx.layer(h, recompute_inputs)
        del hidden
        inputs = ([h] if need_h else []) + params
        outputs, grad_outputs = [out], [grad_out]
        if ctx.num_router_logits:
            outputs += recompute_inputs.router_logits
            grad_outputs += list(grad_router_logits)
        grads = list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
        dh = grads.pop(0) if need_h else None
        param_grads = iter(grads)
        return (dh, None, None, None, None,
                *[next(param_grads) if need else None for need in ctx.needs_input_grad[5:]])


def _checkpointed(hidden, layer, attn_inputs, offloader: ActivationOffloader, offload: bool):
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params and not hidden.requires_grad:
        with torch.no_grad():
            return layer(hidden, attn_inputs)
    collected = attn_inputs.router_logits
    before = len(collected) if collected is not None else 0
    out, *router_logits = _CheckpointedLayer.apply(hidden, layer, attn_inputs, offloader, offload, *params)
    if router_logits:  # the node's outputs replace the graph-less logits the no-grad forward appended
        collected[before:] = router_logits
    return out


class LayerRunner:
    """`DecoderModel.layer_runner`: runs each layer in its mode ("none" | "checkpoint" | "offload")."""

    def __init__(self, layers: nn.ModuleList, modes: list[str]):
        if len(modes) != len(layers):
            raise ValueError(f"{len(modes)} modes for {len(layers)} layers")
        bad = sorted(set(modes) - set(MODES))
        if bad:
            raise ValueError(f"unknown layer mode(s) {bad}; choose from {MODES}")
        self.modes = {id(layer): mode for layer, mode in zip(layers, modes)}
        self.first = id(layers[0])
        self.offloader = ActivationOffloader()

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, attn_inputs) -> torch.Tensor:
        mode = self.modes.get(id(layer), "none")
        if id(layer) == self.first:
            self.offloader.new_pass()
        if mode == "none" or not torch.is_grad_enabled() or attn_inputs.cache is not None:
            return layer(hidden, attn_inputs)
        if is_sharded(layer):
            # FSDP2 computes with gathered copies of the sharded parameters, so _CheckpointedLayer's gradients with
            # respect to the (sharded) parameters would be empty and nothing would train. PyTorch's non-reentrant
            # checkpoint lets the recompute's gradients flow to whatever parameters it used, and FSDP2 composes
            # with it (its pre-backward hook gathers the layer for the recompute). The input stays on the GPU:
            # under FSDP2 "offload" checkpoints without offloading.
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, hidden, attn_inputs, use_reentrant=False, preserve_rng_state=True)
        return _checkpointed(hidden, layer, attn_inputs, self.offloader, mode == "offload")



# ---- the policy -----------------------------------------------------------------------------------------------

def moe_activation_bytes(spec, tokens: int, dtype_bytes: int = 2, lora_rank: int = 16) -> int:
    """Estimated bytes an MoE block (router and experts, LoRA on the experts) keeps for its backward, for `tokens`
    tokens. Per token, its k routed rows: the gathered input (hidden), the gate_up output (2 x expert width: the GLU
    keeps only it, gpt-oss's clamped SwiGLU too), the GLU output (expert width), the down output back in (token,
    slot) order for the weighted sum (hidden), the rank-r LoRA products of both projections (2 x r) and two int64
    row indices (the gather and its inverse); then the router's top-k ids (int64) and routing weights (k), and for
    softmax-then-top-k routers the float32 probabilities (E), top-k values (k) and their sum. This is what autograd
    keeps through the kernels' autograd functions (tests/test_memory.py measures it through Triton's interpreter):
    the down output in expert order, the inputs' norm output and the weights are not counted here (not saved, or
    counted with the norms)."""
    k, width = spec.experts_per_token, spec.expert_intermediate_size
    rows = k * ((2 * spec.hidden_size + 3 * width + 2 * lora_rank) * dtype_bytes + 2 * 8)
    router = k * (8 + dtype_bytes)
    if spec.router_kind == "softmax_topk":
        router += 4 * spec.num_experts + 4 * k + 4
    return tokens * (rows + router)


def layer_activation_bytes(spec, tokens: int, dtype_bytes: int = 2, mlp_saves_gate_up: bool = True,
                           lora_rank: int = 16) -> int:
    """Estimated bytes one decoder layer keeps for its backward (fused LoRA path), for `tokens` tokens:
    the two norms' inputs and outputs (4 x hidden), attention q, k, v, output and the o_proj input
    (3 x q_dim + 2 x kv_dim), the MLP's gate and up outputs (2 x intermediate, unless recomputed), rank-r
    products and float32 norm statistics. An MoE layer's MLP: `moe_activation_bytes` (the largest of a model's
    layers counts, for plans that treat layers alike; the gate/up recomputation does not apply to experts).
    Attention with sinks (gpt-oss) runs fused on CUDA (kernels.attention: the kernel's output and float32 lse, as
    without sinks), so it adds nothing of the sequence length; only its eager fallback would."""
    q_dim = spec.num_heads * spec.head_dim
    kv_dim = spec.num_kv_heads * spec.head_dim
    per_token = 4 * spec.hidden_size + 3 * q_dim + 2 * kv_dim + 7 * lora_rank
    dense_mlp = tokens * (2 * spec.intermediate_size if mlp_saves_gate_up else 0) * dtype_bytes
    mlp = dense_mlp
    if spec.is_moe:
        moe = moe_activation_bytes(spec, tokens, dtype_bytes, lora_rank)
        mlp = max(moe, dense_mlp if not all(spec.moe_layers) else 0)
    return tokens * (per_token * dtype_bytes + 4 * (2 + spec.num_heads)) + mlp


@dataclass
class MemoryPlan:
    modes: list[str]
    chunk_tokens: int | None
    mlp_saves_gate_up: bool
    activation_bytes_per_layer: int
    budget_bytes: int | None
    notes: list[str] = field(default_factory=list)

    def resident_activation_bytes(self, layer_input_bytes: int) -> int:
        """Estimated bytes the plan keeps on the device from the forward to the backward: every plain layer's
        activations and every checkpointed layer's input (`layer_input_bytes`, tokens x hidden); an offloaded
        layer keeps nothing there."""
        return (self.modes.count("none") * self.activation_bytes_per_layer
                + self.modes.count("checkpoint") * layer_input_bytes)

    def summary(self) -> str:
        counts = {m: self.modes.count(m) for m in MODES if self.modes.count(m)}
        parts = [f"{n} {m}" for m, n in counts.items()]
        if self.chunk_tokens:
            parts.append(f"MLP chunks of {self.chunk_tokens} tokens")
        return ", ".join(parts)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device, counting PyTorch's cached-but-unused blocks as free; None on CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


WORKSPACE_FACTOR = 1.6  # measured correction to the analytic working-set estimate (see working_set_bytes)


def working_set_bytes(spec, tokens: int, layer_bytes: int, dtype_bytes: int = 2, mlp_chunk_bytes: int = 2 * GiB,
                      reserve_bytes: int = 2 * GiB) -> int:
    """What the auto policy leaves free beside the kept activations: the working set while one checkpointed layer
    (`layer_bytes` of activations) is in its backward, with its transients, plus `reserve_bytes`. The analytic
    count is short of what the allocator really holds (gradient buffers, SDPA workspaces, fragmentation): on the
    H100, 8B LoRA at 131K tokens ran out of memory with 32 GB of checkpoints next to 16 GB of weights, so the true
    working set was over 30 GB where the plain estimate said 22.5 GB; hence WORKSPACE_FACTOR."""
    hidden_bytes = tokens * spec.hidden_size * dtype_bytes
    per_mlp_token = 6 * spec.intermediate_size * dtype_bytes  # one MLP chunk's backward: ~6 x intermediate
    return int(reserve_bytes + WORKSPACE_FACTOR * (layer_bytes + 4 * hidden_bytes)
               + min(tokens * per_mlp_token, mlp_chunk_bytes))


def plan_memory(spec, policy: str, seq_len: int, batch_size: int, free_bytes: int | None, dtype_bytes: int = 2,
                lora_rank: int = 16, mlp_chunk_bytes: int = 2 * GiB, reserve_bytes: int = 2 * GiB) -> MemoryPlan:
    """Choose each layer's mode. `free_bytes` None (CPU) means unlimited."""
    if policy not in POLICIES:
        raise ValueError(f"unknown memory policy {policy!r}; choose from {', '.join(POLICIES)}")
    L, tokens = spec.num_layers, seq_len * batch_size
    notes = []
    # MLP chunking: the backward of one MLP chunk holds ~6 tensors of chunk x intermediate
    per_mlp_token = 6 * spec.intermediate_size * dtype_bytes
    chunk_tokens = None
    if tokens * per_mlp_token > mlp_chunk_bytes and policy != "none":
        chunk = max(16, mlp_chunk_bytes // (per_mlp_token * batch_size))
        chunk = 2 ** int(math.log2(chunk))
        chunk_tokens = chunk if chunk < seq_len else None
    act = layer_activation_bytes(spec, tokens, dtype_bytes, True, lora_rank)
    hidden_bytes = tokens * spec.hidden_size * dtype_bytes
    if policy == "none":
        return MemoryPlan(["none"] * L, None, True, act, free_bytes)
    if policy == "recompute-mlp":
        # every layer keeps its activations except the MLP's gate/up outputs (2 x intermediate per token, most of a
        # layer's saved bytes), which the fused LoRA MLP recomputes in its backward: two of the three MLP GEMMs again
        lean_act = layer_activation_bytes(spec, tokens, dtype_bytes, False, lora_rank)
        return MemoryPlan(["none"] * L, None, False, lean_act, free_bytes,
                          ["MLP gate/up recomputed in the backward; no layer checkpointed"])
    if policy in ("checkpoint", "offload"):
        modes = [policy] * L
        if policy == "offload":
            modes[-1] = "checkpoint"  # its backward comes first: no time to bring it back
        lean = chunk_tokens is not None
        return MemoryPlan(modes, chunk_tokens, not lean, act, free_bytes)
    # auto
    if free_bytes is None:
        return MemoryPlan(["none"] * L, None, True, act, None, ["no device memory limit (CPU): nothing recomputed"])
    lean_act = layer_activation_bytes(spec, tokens, dtype_bytes, False, lora_rank)
    budget = free_bytes - working_set_bytes(spec, tokens, act, dtype_bytes, mlp_chunk_bytes, reserve_bytes)
    if L * act <= budget:
        return MemoryPlan(["none"] * L, None, True, act, free_bytes, ["everything fits: nothing recomputed"])
    n_ckpt = math.ceil((L * act - budget) / max(1, act - hidden_bytes))
    if n_ckpt <= L:
        modes = ["checkpoint"] * n_ckpt + ["none"] * (L - n_ckpt)
        return MemoryPlan(modes, None, True, act, free_bytes, [f"checkpoint {n_ckpt} of {L} layers"])
    # every layer checkpointed; shrink the working set (chunked MLP, gate/up recomputed), then offload inputs
    budget = free_bytes - working_set_bytes(spec, tokens, lean_act, dtype_bytes, mlp_chunk_bytes, reserve_bytes)
    lean = chunk_tokens is not None
    n_off = 0 if L * hidden_bytes <= budget else math.ceil((L * hidden_bytes - budget) / hidden_bytes)
    n_off = min(n_off, L - 1)
    modes = ["offload"] * n_off + ["checkpoint"] * (L - n_off)
    if (L - n_off) * hidden_bytes > budget:
        notes.append("even with every layer offloaded the estimate exceeds free memory; this may run out")
    return MemoryPlan(modes, chunk_tokens, not lean, act, free_bytes, notes)


def apply_memory_policy(model: nn.Module, policy: str = "auto", seq_len: int | None = None, batch_size: int = 1,
                        free_bytes: int | None = None, pending_bytes: int = 0, **kwargs) -> MemoryPlan:
    """Install the memory policy on a fasttune CausalLM (in place) and return the plan.

    policy: "auto" (from free GPU memory and the activation estimate for `batch_size` x `seq_len`), "none",
    "recompute-mlp" (nothing checkpointed, but the MLP's gate/up outputs are recomputed in its backward instead of
    saved), "checkpoint" (every layer) or "offload" (every layer but the last). `free_bytes` overrides the
    measurement; `pending_bytes` is what training will allocate before the step that is not allocated yet
    (gradients, optimizer moments: optimizers.training_state_bytes), taken off the measured free memory."""
    from ..adapters.attach import FusedMLP
    from ..models.decoder import GatedMLP

    decoder = model.model
    spec = model.spec
    if policy == "recompute-mlp" and not any(isinstance(layer.mlp, GatedMLP) and isinstance(layer.mlp.fused_forward,
                                                                                          FusedMLP)
                                             for layer in decoder.layers):
        raise ValueError("memory policy recompute-mlp works through the fused LoRA MLP, which this model does not "
                         "use: it needs LoRA on gate_proj, up_proj and down_proj with dropout 0; choose "
                         "'checkpoint' instead")
    if seq_len is None:
        seq_len = model.max_seq_length or spec.max_position_embeddings
    device = next(model.parameters()).device
    if free_bytes is None and policy == "auto":
        free_bytes = free_device_bytes(device)
        if free_bytes is not None:
            free_bytes -= pending_bytes
    dtype_bytes = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    cfg = model.lora_config
    plan = plan_memory(spec, policy, seq_len, batch_size, free_bytes, dtype_bytes,
                       lora_rank=cfg.r if cfg is not None else 0, **kwargs)
    runner = None if all(m == "none" for m in plan.modes) else LayerRunner(decoder.layers, plan.modes)
    model.apply_memory_plan(plan, runner)
    return plan
