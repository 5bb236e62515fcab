"""Architecture spec: everything the one decoder needs to know about a family, read from a config.json.

Each supported family is a set of switches on the same Transformer++ block (RMSNorm, RoPE, GQA attention,
gated MLP). `ArchSpec.from_hf_config` is the only place that knows how each family spells its config.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
                         "granite", "smollm3", "qwen3_moe", "mixtral", "gpt_oss")
# Mixture-of-Experts families: some or all layers route each token to `experts_per_token` of `num_experts` MLPs
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral", "gpt_oss")
# families whose config.json may leave tie_word_embeddings out because their transformers default is True
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3_text", "smollm3")
_GEMMA = ("gemma", "gemma2", "gemma3_text")
# Gemma 3 configs without rope_parameters: the global and local bases transformers assumes
_GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


class UnsupportedModelError(ValueError):
    pass


@dataclass
class RopeSpec:
    theta: float = 10000.0
    kind: str = "default"
    factor: float | None = None
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn / longrope
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    long_factor: list[float] | None = None
    short_factor: list[float] | None = None


@dataclass
class ArchSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeSpec = field(default_factory=RopeSpec)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # silu | gelu | gelu_tanh
    # RMSNorm on q and k before RoPE: "head" over each head (Qwen3, Gemma 3), "projection" over the whole q / k
    # projection output (OLMo 2: weights of num_heads * head_dim), None without
    qk_norm: str | None = None
    norm_unit_offset: bool = False  # Gemma: weight stored as w, applied as (1 + w), all in float32
    norm_weight_float32: bool = False  # OLMo 2: w multiplies the float32 normalised value, cast back after
    rope_float32: bool = False  # OLMo 2: q and k rotated in float32 (its cos/sin stay float32), cast back after
    embed_scale: float | None = None  # Gemma: the embedding module's sqrt(hidden), cast to the compute dtype first
    # Granite: the model multiplies the embeddings (given inputs_embeds too) by this exact float
    embedding_multiplier: float | None = None
    # "pre": norm before attention and MLP (Llama); "sandwich": also after each (Gemma 2/3); "post": only after
    # each, none before (OLMo 2)
    norm_placement: str = "pre"
    residual_scale: float | None = None  # Granite: residual + residual_multiplier * block(x)
    logits_scaling: float | None = None  # Granite: logits divided by this
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None  # None -> head_dim ** -0.5 (Gemma 2/3: query_pre_attn_scalar ** -0.5)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    local_rope: RopeSpec | None = None  # Gemma 3: the sliding layers' own RoPE (another base, no scaling)
    rope_layers: list[bool] = field(default_factory=list)  # per layer whether RoPE applies (SmolLM3); [] = all
    fused_checkpoint: bool = False  # Phi-3 stores qkv_proj and gate_up_proj fused
    # a multimodal checkpoint (Gemma 3 4B/12B/27B) of which only the language model is loaded: its tensors are
    # renamed from language_model.* and the vision tower's skipped; saved back as the text-only model
    text_tower: bool = False
    # Mixture of Experts (Qwen3-MoE, Mixtral): 0 experts = a dense MLP in every layer
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    moe_layers: list[bool] = field(default_factory=list)  # per layer whether its MLP is the routed experts
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1 (Mixtral always; Qwen3 by config)
    # Qwen3-MoE casts the (float32) routing weights to the router logits' dtype before they scale the experts'
    # outputs; Mixtral scales with the float32 weights
    routing_weights_in_logits_dtype: bool = False
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight in the training loss
    output_router_logits: bool = False  # the config's default: collect router logits and add the aux loss
    router_jitter_noise: float = 0.0  # Mixtral: multiplicative uniform noise on the MoE input while training
    # gpt-oss: the router has a bias and takes the top-k of its logits, then a softmax over those k ("topk_softmax";
    # the others: "softmax_topk"); its experts have biases, are stored (E, in, out) ("transposed"), interleave the
    # gate and up columns (gate = even, up = odd) and use the clamped SwiGLU
    #     a = min(gate, limit) * sigmoid(alpha * min(gate, limit)),  y = (clamp(up, -limit, limit) + 1) * a
    router_kind: str = "softmax_topk"
    router_bias: bool = False
    expert_bias: bool = False
    experts_transposed: bool = False
    gate_up_interleaved: bool = False
    swiglu_alpha: float | None = None  # set: the clamped SwiGLU (gpt-oss) instead of `activation`'s GLU
    swiglu_limit: float | None = None
    attention_sinks: bool = False  # gpt-oss: a learned per-head logit that joins every softmax (its value is zero)
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    raw_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def window_for_layer(self, i: int) -> int | None:
        if self.sliding_window is None:
            return None
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @property
    def float16_overflow(self) -> str | None:
        """Why this family cannot compute in float16 (None when it can). One home for the model doctor's warning
        and the loader's refusal."""
        if self.model_type in ("gemma2", "gemma3_text"):
            name = "Gemma 2" if self.model_type == "gemma2" else "Gemma 3"
            return (f"{name}'s activations grow past float16's largest finite value (65504) in the residual stream "
                    "and the MLP, so float16 gives inf and then NaN logits and losses (bfloat16 has float32's "
                    "range)")
        return None

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[i]

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    def uses_rope(self, i: int) -> bool:
        return not self.rope_layers or self.rope_layers[i]

    def uses_local_rope(self, i: int) -> bool:
        """Whether layer i takes `local_rope` (Gemma 3's sliding layers) rather than `rope`."""
        return self.local_rope is not None and self.layer_types[i] == "sliding_attention"

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ArchSpec":
        path = Path(path)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.exists():
            raise FileNotFoundError(f"no config.json in {path}: point at a Hugging Face model folder")
        return cls.from_hf_config(json.loads(cfg_file.read_text()))

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ArchSpec":
        if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
            spec = cls.from_hf_config(_gemma3_text_config(cfg))
            spec.text_tower = True
            return spec
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {mt!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        n_layers = cfg["num_hidden_layers"]
        act_name = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
        gemma = mt in _GEMMA
        activation = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                      "gelu_tanh": "gelu_tanh", "gelu": "gelu_tanh" if gemma else "gelu"}.get(act_name)
        if activation is None:
            raise UnsupportedModelError(f"hidden activation {act_name!r} is not supported (silu, gelu, gelu_pytorch_tanh)")

        sliding_window = cfg.get("sliding_window")
        if mt in ("qwen2", "qwen3", "smollm3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            sliding_window = None
        if mt in ("llama", "olmo2", "granite"):  # no sliding window in these families' transformers code
            sliding_window = None
        layer_types = cfg.get("layer_types")
        if not layer_types:
            if mt in ("gemma2", "gemma3_text", "gpt_oss"):
                # Gemma 2 and gpt-oss: 1 local : 1 global; Gemma 3: sliding_window_pattern 6
                every = cfg.get("sliding_window_pattern", 6) if mt == "gemma3_text" else 2
                layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
            elif mt in ("qwen2", "qwen3"):
                mwl = cfg.get("max_window_layers", n_layers)
                layer_types = ["sliding_attention" if sliding_window is not None and i >= mwl else "full_attention"
                               for i in range(n_layers)]
            else:
                layer_types = ["sliding_attention" if sliding_window else "full_attention"] * n_layers
        if len(layer_types) != n_layers:
            raise ValueError(f"config layer_types has {len(layer_types)} entries for {n_layers} layers")
        rope_layers: list[bool] = []
        if mt == "smollm3":  # NoPE: no_rope_layers[i] == 0 marks a layer without RoPE (every 4th by default)
            every = cfg.get("no_rope_layer_interval", 4)
            flags = cfg.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n_layers)]
            if len(flags) != n_layers:
                raise ValueError(f"config no_rope_layers has {len(flags)} entries for {n_layers} layers")
            rope_layers = [bool(f) for f in flags]
        if mt == "gemma3_text" and cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention (an encoder, e.g. EmbeddingGemma) "
                                        "is not a causal LM; fasttune trains the causal Gemma 3 text models")

        attn_scale = None
        if mt in ("gemma2", "gemma3_text"):
            # transformers' default when the key is absent is 256 (the 2B/9B/1B..12B head_dim), not head_dim
            attn_scale = cfg.get("query_pre_attn_scalar", 256) ** -0.5
        granite = mt == "granite"
        if granite:
            attn_scale = float(cfg.get("attention_multiplier", 1.0))
        qk_norm = {"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "olmo2": "projection"}.get(mt)
        moe = _moe_settings(cfg, mt, n_layers)
        bias = bool(cfg.get("attention_bias", mt == "gpt_oss"))
        return cls(
            model_type=mt,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_spec(cfg, "full_attention" if mt == "gemma3_text" else None),
            tie_word_embeddings=cfg.get("tie_word_embeddings", mt in _TIED_BY_DEFAULT),
            qkv_bias=True if mt == "qwen2" else bias,
            o_bias=bias if mt != "qwen2" else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            activation=activation,
            qk_norm=qk_norm,
            norm_unit_offset=gemma,
            norm_weight_float32=mt == "olmo2",
            rope_float32=mt == "olmo2",
            embed_scale=math.sqrt(hidden) if gemma else None,
            embedding_multiplier=_granite_factor(cfg, "embedding_multiplier") if granite else None,
            norm_placement={"gemma2": "sandwich", "gemma3_text": "sandwich", "olmo2": "post"}.get(mt, "pre"),
            residual_scale=_granite_factor(cfg, "residual_multiplier") if granite else None,
            logits_scaling=_granite_factor(cfg, "logits_scaling") if granite else None,
            # Gemma 3 configs carry attn_logit_softcapping, but transformers' Gemma 3 attention never applies it
            attn_softcap=cfg.get("attn_logit_softcapping", 50.0) if mt == "gemma2" else None,
            final_softcap=(cfg.get("final_logit_softcapping", 30.0) if mt == "gemma2" else
                           cfg.get("final_logit_softcapping") if mt == "gemma3_text" else None),
            attn_scale=attn_scale,
            sliding_window=sliding_window,
            layer_types=list(layer_types),
            local_rope=_rope_spec(cfg, "sliding_attention") if mt == "gemma3_text" else None,
            rope_layers=rope_layers,
            fused_checkpoint=mt == "phi3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw_config=dict(cfg),
            **moe,
        )


def _moe_settings(cfg: dict[str, Any], mt: str, n_layers: int) -> dict[str, Any]:
    """The ArchSpec MoE fields of a Qwen3-MoE or Mixtral config ({} for dense families).

    Qwen3-MoE: layer i is sparse unless listed in mlp_only_layers, and only every decoder_sparse_step-th layer
    ((i + 1) % step == 0); the others keep a dense MLP of intermediate_size. Its expert width is
    moe_intermediate_size; transformers 5 saves the expert count as num_local_experts, older configs as
    num_experts. Mixtral: every layer sparse, experts of intermediate_size, top-k always renormalised."""
    if mt not in MOE_MODEL_TYPES:
        return {}
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    gpt_oss = mt == "gpt_oss"
    if mt == "qwen3_moe":
        step = cfg.get("decoder_sparse_step", 1) or 1
        dense = set(cfg.get("mlp_only_layers") or [])
        layers = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]
        width = cfg.get("moe_intermediate_size", 768)
        norm_topk = bool(cfg.get("norm_topk_prob", False))
        jitter = 0.0
    else:  # Mixtral, gpt-oss
        layers = [experts > 0] * n_layers
        width = cfg["intermediate_size"]
        norm_topk = not gpt_oss  # gpt-oss's softmax over the top k sums to 1 already
        jitter = float(cfg.get("router_jitter_noise", 0.0) or 0.0)
    top_k = cfg.get("num_experts_per_tok", 2)
    if experts and not 0 < top_k <= experts:
        raise ValueError(f"config num_experts_per_tok={top_k} must be between 1 and the {experts} experts")
    settings = dict(num_experts=int(experts), experts_per_token=int(top_k), expert_intermediate_size=int(width),
                    moe_layers=layers, norm_topk_prob=norm_topk,
                    routing_weights_in_logits_dtype=mt in ("qwen3_moe", "gpt_oss"),
                    router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
                    output_router_logits=bool(cfg.get("output_router_logits", False)), router_jitter_noise=jitter)
    if gpt_oss:
        settings.update(router_kind="topk_softmax", router_bias=True, expert_bias=True, experts_transposed=True,
                        gate_up_interleaved=True, swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
                        swiglu_limit=float(cfg.get("swiglu_limit", 7.0)), attention_sinks=True)
    return settings


def _gemma3_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Gemma3ForCausalLM config of a multimodal Gemma 3 checkpoint's language model: its text_config, with the
    token ids, dtype and tying the top level may hold instead."""
    text = {**cfg["text_config"], "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "tie_word_embeddings",
                "quantization_config"):
        if text.get(key) is None and cfg.get(key) is not None:
            text[key] = cfg[key]
    return text


def _granite_factor(cfg: dict[str, Any], key: str) -> float | None:
    """A Granite multiplier, None when it is 1 (nothing to apply)."""
    value = float(cfg.get(key, 1.0))
    return None if value == 1.0 else value


def _rope_spec(cfg: dict[str, Any], layer_type: str | None = None) -> RopeSpec:
    """Read RoPE settings from either the transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`.

    `layer_type`: for families with one RoPE per layer type (Gemma 3): transformers 5 nests `rope_parameters` by
    layer type; older configs give the global base as `rope_theta` (+ `rope_scaling`, global layers only) and the
    local one as `rope_local_base_freq`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    default_theta = 10000.0
    if layer_type is not None:
        default_theta = _GEMMA3_THETA.get(layer_type, default_theta)
        if isinstance(params.get(layer_type), dict):
            params = dict(params[layer_type])
        elif any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"config rope_parameters has no entry for {layer_type!r} layers: {sorted(params)}")
        if layer_type == "sliding_attention":
            scaling = {}  # rope_scaling applies to the global layers only
            default_theta = cfg.get("rope_local_base_freq", default_theta)
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", default_theta if layer_type == "sliding_attention"
                       else cfg.get("rope_theta", default_theta))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "su":  # old name of longrope (Phi-3)
        kind = "longrope"
    if kind not in ROPE_KINDS:
        raise UnsupportedModelError(f"RoPE scaling kind {kind!r} is not supported; supported: {', '.join(ROPE_KINDS)}")
    orig = cfg.get("original_max_position_embeddings") if cfg.get("model_type") == "phi3" else None
    orig = orig or merged.get("original_max_position_embeddings")
    if kind in ("llama3", "yarn", "longrope") and orig is None:
        orig = cfg.get("max_position_embeddings")
    return RopeSpec(
        theta=float(theta),
        kind=kind,
        factor=float(merged["factor"]) if merged.get("factor") is not None else None,
        partial_rotary_factor=float(merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
        original_max_position_embeddings=orig,
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        attention_factor=merged.get("attention_factor"),
        beta_fast=merged.get("beta_fast"),
        beta_slow=merged.get("beta_slow"),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        truncate=merged.get("truncate", True),
        long_factor=merged.get("long_factor"),
        short_factor=merged.get("short_factor"),
    )
