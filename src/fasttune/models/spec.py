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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    norm_unit_offset: bool = False  # Gemma: weight stored as w, applied as (1 + w), all in float32
    embed_scale: float | None = None  # Gemma: embeddings * sqrt(hidden), scale cast to the compute dtype first
    sandwich_norm: bool = False  # Gemma 2: extra norms after attention and after the MLP
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None  # None -> head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    fused_checkpoint: bool = False  # Phi-3 stores qkv_proj and gate_up_proj fused
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
        gemma = mt in ("gemma", "gemma2")
        activation = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                      "gelu_tanh": "gelu_tanh", "gelu": "gelu_tanh" if gemma else "gelu"}.get(act_name)
        if activation is None:
            raise UnsupportedModelError(f"hidden activation {act_name!r} is not supported (silu, gelu, gelu_pytorch_tanh)")

        sliding_window = cfg.get("sliding_window")
        if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding_window = None
        if mt == "llama":
            sliding_window = None
        layer_types = cfg.get("layer_types")
        if not layer_types:
            if mt == "gemma2":
                layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
            elif mt in ("qwen2", "qwen3"):
                mwl = cfg.get("max_window_layers", n_layers)
                layer_types = ["sliding_attention" if sliding_window is not None and i >= mwl else "full_attention"
                               for i in range(n_layers)]
            else:
                layer_types = ["sliding_attention" if sliding_window else "full_attention"] * n_layers
        if len(layer_types) != n_layers:
            raise ValueError(f"config layer_types has {len(layer_types)} entries for {n_layers} layers")

        attn_scale = None
        if mt == "gemma2":
            attn_scale = cfg.get("query_pre_attn_scalar", head_dim) ** -0.5
        bias = bool(cfg.get("attention_bias", False))
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
            rope=_rope_spec(cfg),
            tie_word_embeddings=cfg.get("tie_word_embeddings", gemma),
            qkv_bias=True if mt == "qwen2" else bias,
            o_bias=bias if mt in ("llama", "mistral", "phi3", "gemma", "gemma2", "qwen3") else False,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            activation=activation,
            qk_norm=mt == "qwen3",
            norm_unit_offset=gemma,
            embed_scale=math.sqrt(hidden) if gemma else None,
            sandwich_norm=mt == "gemma2",
            attn_softcap=cfg.get("attn_logit_softcapping") if mt == "gemma2" else None,
            final_softcap=cfg.get("final_logit_softcapping") if mt == "gemma2" else None,
            attn_scale=attn_scale,
            sliding_window=sliding_window,
            layer_types=list(layer_types),
            fused_checkpoint=mt == "phi3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw_config=dict(cfg),
        )


def _rope_spec(cfg: dict[str, Any]) -> RopeSpec:
    """Read RoPE settings from either the transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
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
