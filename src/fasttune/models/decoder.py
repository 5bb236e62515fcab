"""One decoder for every supported family: Transformer++ (RMSNorm, RoPE, GQA attention, gated MLP), with the
families' quirks switched on by `ArchSpec` (Mixture-of-Experts families: the MLP of an MoE layer is models.moe's
SparseMoE; attention sinks for gpt-oss).

Module and parameter names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj.weight`,
...), so a state dict maps one-to-one to a checkpoint (Phi-3's fused tensors are split at load time).

Two optional hooks let other parts of fasttune take over a block without monkeypatching:
- `Attention.fused_qkv(x) -> (q, k, v)` and `GatedMLP.fused_forward(x) -> y` (installed by `fasttune.adapters`
  through `use_fused_qkv` / `use_fused_forward`, to run the fused LoRA kernels), and `Attention.fused_o(x) -> y`
  (`use_fused_o`: the output projection; generation's Triton GEMV for decode rows, generation.fused);
- `DecoderModel.layer_runner(layer, hidden, attn_inputs) -> hidden` (installed by `CausalLM.apply_memory_plan`, to
  checkpoint and offload activations).
An LM head with a `fused_loss_inputs(h) -> (hidden, weight, extra_weight)` method (fasttune.adapters' `LoraLMHead`)
gives the fused loss its own operands, logits = hidden @ [weight | extra_weight].T (a LoRA head widens hidden by
its rank and passes B as the extra columns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn

from .. import kernels
from ..kernels.attention import FALLBACKS, DocumentLayout, attention
from .moe import SparseMoE, load_balancing_loss
from .rope import RotaryTables
from ..labels import IGNORE_INDEX, next_token_targets
from .spec import ArchSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False, weight_float32: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset  # Gemma: applied as (1 + w), so the identity is w = 0
        # OLMo 2 multiplies the float32 normalised value by w and casts last (Llama casts, then multiplies): the
        # same kernel on float32 operands gives exactly that
        self.weight_float32 = weight_float32
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_float32 and x.dtype != torch.float32:
            return kernels.rms_norm(x.float(), self.weight.float(), self.eps, self.unit_offset).to(x.dtype)
        return kernels.rms_norm(x, self.weight, self.eps, self.unit_offset)

    def add_forward(self, x: torch.Tensor, d: torch.Tensor, d_scale: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(z), z) for z = x + d (x + d * d_scale) in one kernel: forward only (generation's no-grad forwards;
        not for float32-weight norms, see `DecoderLayer.fuses_adds`)."""
        return kernels.add_rms_norm(x, d, self.weight, self.eps, self.unit_offset, d_scale)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings, optionally multiplied by a scale (Gemma: sqrt(hidden)) that is rounded to the compute
    dtype first (sqrt(3072) in bf16 is 55.5, not 55.43), as the reference does. `padding_idx` (the config's
    pad_token_id) is transformers' too: that row gets no gradient when the embeddings train."""

    def __init__(self, num_embeddings: int, dim: int, scale: float | None = None, padding_idx: int | None = None):
        super().__init__(num_embeddings, dim, padding_idx=padding_idx)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = super().forward(input_ids)
        if self.scale is None:
            return h
        # a CPU 0-d tensor enters the kernel as a scalar: no host-to-device copy (which a CUDA graph cannot capture)
        return h * torch.tensor(self.scale, dtype=torch.float32).to(h.dtype)


class KVCache(Protocol):
    """What a generation cache gives the decoder (fasttune.generation.StaticKVCache is the one implementation):
    each layer hands it q, k, v and gets the attention output back; the cache decides where k and v
    are stored and which keys each query sees. `max_position`: a host-side bound of the forward's position ids
    (the RoPE table size, chosen without reading the ids back). Training passes no cache.
    `fused`: the forward may use the forward-only fused kernels (each residual add fused into the RMSNorm after it).
    `rotates`: the cache applies RoPE itself (a decode step: rotation and cache write in one kernel), so `attend`
    gets q and k unrotated with `rope=(cos, sin, float32)`; otherwise they come rotated and `rope` is None."""
    max_position: int
    fused: bool
    rotates: bool

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
               sliding_window: int | None, softcap: float | None, sinks: torch.Tensor | None = None,
               rope: tuple[torch.Tensor, torch.Tensor, bool] | None = None) -> torch.Tensor: ...


@dataclass
class AttentionInputs:
    """What every layer needs besides its hidden states (mostly for attention); built once per forward."""
    cos: torch.Tensor
    sin: torch.Tensor
    key_padding_mask: torch.Tensor | None
    documents: DocumentLayout | None
    cache: KVCache | None
    local_cos: torch.Tensor | None = None  # Gemma 3's sliding layers: RoPE of their own base
    local_sin: torch.Tensor | None = None
    # what attention derives from the masks once and every layer reuses (flash-attn's cu_seqlens, flex block masks)
    memo: dict = field(default_factory=dict)
    # MoE layers append their router logits (tokens, E) here when the forward collects them (aux loss)
    router_logits: list[torch.Tensor] | None = None


class Attention(nn.Module):
    def __init__(self, spec: ArchSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        h, d = spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=spec.o_bias)
        if spec.qk_norm == "head":
            self.q_norm = RMSNorm(d, spec.rms_norm_eps, spec.norm_unit_offset)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps, spec.norm_unit_offset)
        elif spec.qk_norm == "projection":
            self.q_norm = RMSNorm(spec.num_heads * d, spec.rms_norm_eps, weight_float32=spec.norm_weight_float32)
            self.k_norm = RMSNorm(spec.num_kv_heads * d, spec.rms_norm_eps, weight_float32=spec.norm_weight_float32)
        elif spec.qk_norm is not None:
            raise ValueError(f"qk_norm {spec.qk_norm!r}: expected 'head', 'projection' or None")
        # gpt-oss: one learned sink logit per query head (see kernels.attention)
        self.sinks = nn.Parameter(torch.empty(spec.num_heads)) if spec.attention_sinks else None
        self.scale = spec.attn_scale if spec.attn_scale is not None else d ** -0.5
        self.sliding_window = spec.window_for_layer(layer_idx)
        self.use_rope = spec.uses_rope(layer_idx)
        self.local_rope = spec.uses_local_rope(layer_idx)
        self.fused_qkv: Callable | None = None
        self.fused_o: Callable | None = None

    def use_fused_qkv(self, hook: Callable | None) -> None:
        """Compute q, k, v with `hook(x)` (None: the three projections one by one)."""
        self.fused_qkv = hook

    def use_fused_o(self, hook: Callable | None) -> None:
        """Compute the output projection with `hook(x)` (None: o_proj)."""
        self.fused_o = hook

    def forward(self, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        d = self.spec.head_dim
        q, k, v = self.fused_qkv(x) if self.fused_qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        if self.spec.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, -1, d)
        k = k.view(B, T, -1, d)
        v = v.view(B, T, -1, d)
        if self.spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        rope = None
        if self.use_rope:  # SmolLM3's NoPE layers skip it
            cos, sin = (a.local_cos, a.local_sin) if self.local_rope else (a.cos, a.sin)
            if a.cache is not None and a.cache.rotates:  # decode: rotated as the cache writes k (one kernel)
                rope = (cos, sin, self.spec.rope_float32)
            else:
                q, k = kernels.apply_rotary(q, k, cos, sin, self.spec.rope_float32)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if a.cache is not None:  # generation: the cache stores k, v and attends over what it holds
            out = a.cache.attend(self.layer_idx, q, k, v, scale=self.scale, sliding_window=self.sliding_window,
                                 softcap=self.spec.attn_softcap, sinks=self.sinks, rope=rope)
        else:
            out = attention(q, k, v, scale=self.scale, sliding_window=self.sliding_window,
                            key_padding_mask=a.key_padding_mask, documents=a.documents,
                            softcap=self.spec.attn_softcap, memo=a.memo, sinks=self.sinks)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.fused_o(out) if self.fused_o is not None else self.o_proj(out)


class GatedMLP(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=spec.mlp_bias)
        self.activation = spec.activation
        self.fused_forward: Callable | None = None
        # Long sequences: process this many tokens at a time so no (seq x intermediate) tensor of the whole
        # sequence lives at once. None = all at once.
        self.chunk_tokens: int | None = None
        # Whether the fused LoRA MLP keeps its gate/up outputs for the backward (False: recomputes them there)
        self.save_gate_up = True

    def use_fused_forward(self, hook: Callable | None) -> None:
        """Run the MLP as `hook(x)` (None: gate, up, activation, down one by one)."""
        self.fused_forward = hook

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_forward is not None:
            return self.fused_forward(x)
        return self.down_proj(kernels.glu(self.gate_proj(x), self.up_proj(x), self.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens is None or x.shape[-2] <= self.chunk_tokens:
            return self._forward(x)
        return torch.cat([self._forward(c) for c in x.split(self.chunk_tokens, dim=-2)], dim=-2)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, layer_idx: int):
        super().__init__()
        self.placement = spec.norm_placement
        if self.placement not in ("pre", "sandwich", "post"):
            raise ValueError(f"norm_placement {self.placement!r}: expected 'pre', 'sandwich' or 'post'")

        def norm() -> RMSNorm:
            return RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_unit_offset, spec.norm_weight_float32)
        # Llama-style names: post_attention_layernorm is the pre-MLP norm. Gemma 2/3 and OLMo 2 names:
        # post_attention_layernorm normalises the attention output, pre_/post_feedforward_layernorm wrap the MLP.
        if self.placement != "post":
            self.input_layernorm = norm()
        self.self_attn = Attention(spec, layer_idx)
        self.post_attention_layernorm = norm()
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if self.placement != "pre":
            self.post_feedforward_layernorm = norm()
        # Qwen3-MoE, Mixtral, gpt-oss: routed experts (Qwen3-MoE's mlp_only_layers keep the dense MLP)
        self.mlp = SparseMoE(spec) if spec.is_moe_layer(layer_idx) else GatedMLP(spec)
        self.residual_scale = spec.residual_scale  # Granite's residual_multiplier

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y if self.residual_scale is None else x + y * self.residual_scale

    def _mlp(self, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        return self.mlp(x, a.router_logits) if isinstance(self.mlp, SparseMoE) else self.mlp(x)

    def forward(self, x: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        if self.placement == "sandwich":
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), a))
            return x + self.post_feedforward_layernorm(self._mlp(self.pre_feedforward_layernorm(x), a))
        if self.placement == "post":
            x = x + self.post_attention_layernorm(self.self_attn(x, a))
            return x + self.post_feedforward_layernorm(self._mlp(x, a))
        x = self._add(x, self.self_attn(self.input_layernorm(x), a))
        return self._add(x, self._mlp(self.post_attention_layernorm(x), a))

    @property
    def fuses_adds(self) -> bool:
        """Whether `forward_deferred` applies: every residual add of the layer is followed by an RMSNorm ("pre" and
        "sandwich"; not "post", whose adds end the layer) of a weight in the compute dtype."""
        norms = [m for m in self.children() if isinstance(m, RMSNorm)]
        return self.placement != "post" and not any(n.weight_float32 for n in norms)

    def forward_deferred(self, x: torch.Tensor, pending: torch.Tensor | None, a: AttentionInputs
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with each residual add fused into the RMSNorm that reads its sum (forward only: generation).
        The residual stream is x + pending (the previous layer's last addend, None for the first layer); returns
        this layer's (x, pending) likewise, so its last add is fused into the next layer's input norm (or the final
        norm). Same values as `forward`: the adds round as `_add` does, the norms see the same sums."""
        scale = self.residual_scale if self.placement == "pre" else None  # sandwich layers add unscaled
        if pending is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm.add_forward(x, pending, scale)
        y = self.self_attn(h, a)
        if self.placement == "sandwich":
            h, x = self.pre_feedforward_layernorm.add_forward(x, self.post_attention_layernorm(y))
            return x, self.post_feedforward_layernorm(self._mlp(h, a))
        h, x = self.post_attention_layernorm.add_forward(x, y, scale)
        return x, self._mlp(h, a)


class DecoderModel(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        pad = spec.pad_token_id if spec.pad_token_id is not None and 0 <= spec.pad_token_id < spec.vocab_size else None
        self.embed_tokens = ScaledEmbedding(spec.vocab_size, spec.hidden_size, spec.embed_scale, pad)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_unit_offset, spec.norm_weight_float32)
        self.rotary = RotaryTables(spec)
        self.local_rotary = RotaryTables(spec, spec.local_rope) if spec.local_rope is not None else None
        self.layer_runner: Callable | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                output_hidden_states: bool = False, inputs_embeds: torch.Tensor | None = None,
                documents: DocumentLayout | None = None, router_logits: list[torch.Tensor] | None = None):
        """`documents`: where the packed documents of `position_ids` lie, built on the host
        (`DocumentLayout.from_position_ids(cpu_position_ids).to(device)`); without it, packed position ids on the
        GPU are read back once per forward to find the documents. `cache` (generation): a `KVCache`, with the
        position ids of every token given (the cache's slots know where each sequence is) and no attention mask. `router_logits`: a list the MoE layers append
        their router logits to, in layer order."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.spec.embedding_multiplier is not None:  # Granite: after the embedding module, as transformers does
            h = h * self.spec.embedding_multiplier
        B, T = h.shape[:2]
        max_position = T - 1  # known without reading the ids, except for position ids given by the caller
        if cache is not None:
            if position_ids is None or attention_mask is not None:
                raise ValueError("a forward with a KV cache takes each token's position_ids and no attention_mask "
                                 "(fasttune.generation.Generator builds both)")
            max_position = cache.max_position
        elif position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(T, device=h.device)[None].expand(B, T)
        elif documents is not None:
            max_position = documents.max_seqlen - 1
        else:
            max_position = None
        if documents is None and attention_mask is None and cache is None and max_position is None:
            if position_ids.is_cuda:
                FALLBACKS.note("layout-sync", "position_ids without a DocumentLayout: the document boundaries are "
                               "read back from the GPU every forward (pass documents=DocumentLayout."
                               "from_position_ids(cpu_position_ids).to(device) to avoid the sync)")
            documents = DocumentLayout.from_position_ids(position_ids)
        key_padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()
        cos, sin = self.rotary(position_ids, max_position=max_position)
        a = AttentionInputs(cos, sin, key_padding_mask, documents, cache, router_logits=router_logits)
        if self.local_rotary is not None:
            a.local_cos, a.local_sin = self.local_rotary(position_ids, max_position=max_position)
        hidden_states = [h] if output_hidden_states else None
        if cache is not None and cache.fused and not output_hidden_states and self._fuses_adds():
            # generation (no grad): each residual add runs inside the norm after it, the last in the final norm.
            # The layer runner (checkpointing, offloading) is for autograd; with a cache it runs layers plainly.
            pending = None
            for layer in self.layers:
                h, pending = layer.forward_deferred(h, pending, a)
            if pending is None:  # no layers
                return self.norm(h), None, position_ids
            scale = self.spec.residual_scale if self.spec.norm_placement == "pre" else None
            return self.norm.add_forward(h, pending, scale)[0], None, position_ids
        for layer in self.layers:
            h = layer(h, a) if self.layer_runner is None else self.layer_runner(layer, h, a)
            if output_hidden_states:
                hidden_states.append(h)
        h = self.norm(h)
        return h, hidden_states, position_ids

    def _fuses_adds(self) -> bool:
        return all(layer.fuses_adds for layer in self.layers) and not self.norm.weight_float32


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None  # embeddings, then each layer's output (before the final norm)
    last_hidden_state: torch.Tensor | None = None  # after the final norm
    cache: KVCache | None = None
    num_target_tokens: torch.Tensor | None = None  # 0-d, on the model's device (not read back: no sync)
    # MoE models, when router logits are collected: each MoE layer's (tokens, E) logits, and the load-balancing loss
    # (added to `loss` times router_aux_loss_coef when labels are given)
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


class CausalLM(nn.Module):
    """The decoder with its LM head. `forward(input_ids, labels=...)` returns the loss without materialising the
    (tokens x vocab) logits: the LM head and the cross-entropy run fused, chunk by chunk."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Logit bytes per chunk of the fused loss (None = the kernel's 128 MiB). Measured on H100 at the 1B shape:
        # 512 MiB chunks were no faster (66,150 vs 70,191 tokens/s in two runs), so nothing raises it by default.
        self.loss_chunk_bytes: int | None = None
        # What the model carries beside its weights, each set through a method below:
        self.max_seq_length: int | None = None  # the longest sequence it is prepared for (set_max_seq_length)
        self.memory_plan = None  # the train.memory.MemoryPlan installed (apply_memory_plan); None: none
        self.loaded_into_shards = False  # built on meta and loaded straight into FSDP2 shards (mark_loaded_into_shards)
        # adapters (set_adapters, called by fasttune.adapters): the LoRA settings (adapters.LoraConfig), and whether
        # the input embeddings / the whole output layer train beside them (a PEFT export saves them in full)
        self.lora_config = None
        self.trains_embeddings = False
        self.trains_lm_head = False
        self.score: nn.Linear | None = None  # a reward model's head (attach_score)

    def set_max_seq_length(self, n: int) -> None:
        self.max_seq_length = n

    def mark_loaded_into_shards(self) -> None:
        self.loaded_into_shards = True

    def set_adapters(self, lora_config, trains_embeddings: bool = False, trains_lm_head: bool = False) -> None:
        """Record the adapters the model carries (the LoRA modules themselves are in its module tree)."""
        self.lora_config = lora_config
        self.trains_embeddings, self.trains_lm_head = trains_embeddings, trains_lm_head

    def apply_memory_plan(self, plan, layer_runner: Callable | None = None) -> None:
        """Install a memory plan (train.memory.plan_memory): `layer_runner(layer, hidden, attn_inputs)` runs each
        decoder layer (checkpointing / offloading; None: plainly), each MLP processes at most `plan.chunk_tokens`
        tokens at a time, and the fused LoRA MLP keeps its gate/up outputs only if `plan.mlp_saves_gate_up`."""
        self.memory_plan = plan
        self.model.layer_runner = layer_runner
        for layer in self.model.layers:
            if isinstance(layer.mlp, GatedMLP):  # an MoE layer's experts have neither setting
                layer.mlp.chunk_tokens = plan.chunk_tokens
                layer.mlp.save_gate_up = plan.mlp_saves_gate_up

    def attach_score(self, weight: torch.Tensor) -> nn.Linear:
        """Give the model a reward head `score` (hidden -> 1, no bias, float32, frozen) holding `weight`: a linear on
        the final hidden state of each sequence's last token, as the reward objective trains it and transformers'
        <Family>ForSequenceClassification holds it. Returns the head."""
        hidden = self.spec.hidden_size
        if tuple(weight.shape) != (1, hidden):
            raise ValueError(f"a reward head's weight has shape (1, {hidden}) for this model, got "
                             f"{tuple(weight.shape)}")
        device = self.model.embed_tokens.weight.device
        self.score = nn.Linear(hidden, 1, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.score.weight.copy_(weight)
        self.score.weight.requires_grad_(False)
        return self.score

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def loss_head_inputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden, weight, extra_weight) with logits = hidden @ [weight | extra_weight].T, for the fused loss:
        the plain head's (h, W, None), or what a head with `fused_loss_inputs` (a LoRA head) makes of h."""
        widen = getattr(self.lm_head, "fused_loss_inputs", None)
        return widen(h) if widen is not None else (h, self.lm_head.weight, None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.spec.logits_scaling is not None:  # Granite divides the head's output, in its dtype
            logits = logits / self.spec.logits_scaling
        logits = logits.float()
        if self.spec.final_softcap is not None:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool | None = None,
        output_hidden_states: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        documents: DocumentLayout | None = None,
        output_router_logits: bool | None = None,
    ) -> CausalLMOutput:
        """labels: (B, T) aligned with input_ids (not shifted; -100 = no loss). The loss is the sum over target
        tokens divided by their count, or by `num_items_in_batch` when given (exact gradient accumulation);
        `label_smoothing` as in F.cross_entropy. `documents`: the layout of packed `position_ids`, built on the host
        (see DecoderModel.forward). Logits are returned when `return_logits` is True, or by default
        when no labels are given. MoE models: with `output_router_logits` (default: the config's), the router
        logits are returned with the load-balancing loss, which is added to the loss (times router_aux_loss_coef)
        when labels are given, as transformers does."""
        if output_router_logits is None:
            output_router_logits = self.spec.output_router_logits
        router_logits = [] if output_router_logits and self.spec.is_moe else None
        h, hidden_states, position_ids = self.model(input_ids, attention_mask, position_ids, cache,
                                                    output_hidden_states, inputs_embeds, documents, router_logits)
        out = CausalLMOutput(hidden_states=hidden_states, last_hidden_state=h, cache=cache)
        if router_logits is not None:
            out.router_logits = tuple(router_logits)
            out.aux_loss = load_balancing_loss(router_logits, self.spec.num_experts, self.spec.experts_per_token,
                                               attention_mask)
        if return_logits or (return_logits is None and labels is None):
            out.logits = self.logits(h)
        if labels is not None:
            packed = attention_mask is None and position_ids is not None  # documents restart their positions
            targets = next_token_targets(labels, position_ids if packed else None).reshape(-1)
            h_loss = h[:, :-1].reshape(-1, h.shape[-1])
            if self.spec.logits_scaling is not None:  # (h / s) @ W.T == (h @ W.T) / s: the fused loss scales h
                h_loss = h_loss / self.spec.logits_scaling
            hid, weight, extra = self.loss_head_inputs(h_loss)
            out.num_target_tokens = (targets != IGNORE_INDEX).sum()
            out.loss = kernels.fused_linear_cross_entropy(
                hid, weight, targets, softcap=self.spec.final_softcap,
                num_items_in_batch=num_items_in_batch, label_smoothing=label_smoothing,
                chunk_bytes=self.loss_chunk_bytes, **({} if extra is None else {"extra_weight": extra}))
            if out.aux_loss is not None:
                out.loss = out.loss + self.spec.router_aux_loss_coef * out.aux_loss
        return out

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype
