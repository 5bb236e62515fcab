"""Helpers shared by the export tests (tiny random models saved with transformers, adapters with non-zero B),
plus checks of the merged-tensor walk every exporter builds on.

Error measure: max |ours - theirs| / max |theirs| ("max relative error")."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttune
from fasttune.export.merged import iter_merged_tensors, merged_state_dict
from fasttune.models import load_model

VOCAB = 96
FP32_TOL = 1e-5
BF16_TOL = 3e-2
FP16_TOL = 5e-3  # 3 more mantissa bits than bfloat16 (measured ~1e-3 on the tiny models)


def tiny_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "gemma": transformers.GemmaConfig,
           "gemma2": transformers.Gemma2Config, "phi3": transformers.Phi3Config, "phi4mini": transformers.Phi3Config,
           "gemma3_text": transformers.Gemma3TextConfig, "olmo2": transformers.Olmo2Config,
           "granite": transformers.GraniteConfig, "smollm3": transformers.SmolLM3Config}[family]
    extra = {"qwen3": dict(head_dim=16), "gemma": dict(head_dim=16),
             "gemma2": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                            final_logit_softcapping=3.0),
             # six layers: llama.cpp's fixed 5 sliding : 1 global pattern; query_pre_attn_scalar = head_dim
             "gemma3_text": dict(head_dim=16, num_hidden_layers=6, sliding_window=8, query_pre_attn_scalar=16),
             "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                             logits_scaling=8.0),
             "smollm3": dict(num_hidden_layers=4),  # layer 3 has no RoPE
             }.get(family, {})
    if family == "phi4mini":  # Phi-4-mini's shape of the phi3 architecture: partial rotary, long-RoPE, tied
        head_dim = overrides.get("head_dim") or overrides.get("hidden_size", common["hidden_size"]) // 4
        n = int(head_dim * 0.75) // 2  # one factor per rotary frequency
        extra = dict(partial_rotary_factor=0.75, tie_word_embeddings=True, original_max_position_embeddings=64,
                     rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 100 for i in range(n)],
                                   "long_factor": [2.0 + i / 10 for i in range(n)]})
        common.update({k: overrides[k] for k in ("hidden_size", "max_position_embeddings") if k in overrides})
    if family in ("llama", "qwen2", "phi3", "mistral"):
        extra["tie_word_embeddings"] = False
    cfg = cls(**{**common, **extra})
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_tiny_hf(path, family: str = "llama", seed: int = 0, **overrides):
    """A tiny random transformers model saved to `path` (every weight perturbed so each one matters)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.eval().save_pretrained(path)
    return hf


def randomize_lora(model, seed: int = 0, scale: float = 0.05) -> None:
    """Non-zero B (and fresh A) in every adapter, so the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in fasttune.adapters.lora_layers(model):
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * scale)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


def random_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_merged_tensors_cover_the_checkpoint_and_add_the_delta(tmp_path):
    save_tiny_hf(tmp_path, "llama")
    plain = load_model(tmp_path)
    model = fasttune.add_lora(load_model(tmp_path), r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_lora(model)
    merged = merged_state_dict(model)
    reference = {k: v for k, v in plain.state_dict().items()}
    assert set(merged) == set(reference)
    shapes = {n: s for n, _, s in iter_merged_tensors(model)}
    for name, t in merged.items():
        assert tuple(t.shape) == shapes[name] == tuple(reference[name].shape), name
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module.rpartition(".")[2] in ("q_proj", "v_proj", "down_proj"):
            m = model.get_submodule(module)
            expected = reference[name].double() + m.scaling * (m.lora_B.double() @ m.lora_A.double())
            assert (t.double() - expected).abs().max() < 1e-6, name
            assert (t - reference[name]).abs().max() > 1e-4, f"{name}: adapter had no effect"
        else:
            assert torch.equal(t, reference[name]), name
