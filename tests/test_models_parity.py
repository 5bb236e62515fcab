"""Parity of fasttune's native decoder with transformers, family by family (issue 2).

Each test builds a tiny random model with transformers, saves it as a user would, loads it with fasttune and
compares on the same inputs. Error measure: max |ours - theirs| / max |theirs| over the compared tensor
("max relative error", normalised by the tensor's scale so near-zero entries do not blow it up).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttune
from fasttune.models import generate, load_model, save_model
from fasttune.models.spec import ArchSpec, UnsupportedModelError

FP32_TOL = 1e-5
BF16_TOL = 3e-2  # measured: <= ~1e-2 on these tiny models; bf16 has 8 mantissa bits
VOCAB = 97
SEQ = 24


def tiny_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=7)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    elif family == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=16)
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(**common, head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
                                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    elif family == "phi3":
        cfg = transformers.Phi3Config(**common, tie_word_embeddings=False)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]


def build_pair(tmp_path, family: str, dtype=torch.float32, **overrides):
    torch.manual_seed(1234)
    cfg = tiny_config(family, **overrides)
    attn = "eager" if family == "gemma2" else "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    # random init puts some weights at their defaults (norms at 1/0, biases at 0): perturb everything so every
    # parameter matters in the comparison
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf = hf.to(dtype).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=dtype)
    return hf, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def random_ids(batch=2, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_loss_and_grads(tmp_path, family):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids()
    out_hf = hf(ids, labels=ids)
    out_ours = ours(ids, labels=ids, return_logits=True)
    assert rel_err(out_ours.logits, out_hf.logits) <= FP32_TOL
    assert abs(out_ours.loss.item() - out_hf.loss.item()) / out_hf.loss.item() <= FP32_TOL
    out_hf.loss.backward()
    out_ours.loss.backward()
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    if family == "phi3":  # the checkpoint's fused projections are split in fasttune
        for i in range(len(ours.layers)):
            qkv = hf_params.pop(f"model.layers.{i}.self_attn.qkv_proj.weight").grad
            gu = hf_params.pop(f"model.layers.{i}.mlp.gate_up_proj.weight").grad
            ours_qkv = torch.cat([ours_params.pop(f"model.layers.{i}.self_attn.{p}_proj.weight").grad for p in "qkv"])
            ours_gu = torch.cat([ours_params.pop(f"model.layers.{i}.mlp.{p}_proj.weight").grad for p in ("gate", "up")])
            assert rel_err(ours_qkv, qkv) <= FP32_TOL
            assert rel_err(ours_gu, gu) <= FP32_TOL
    assert set(ours_params) == set(hf_params)
    for name, p in ours_params.items():
        assert p.grad is not None, name
        assert rel_err(p.grad, hf_params[name].grad) <= FP32_TOL, name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits(tmp_path, family):
    hf, ours = build_pair(tmp_path, family, dtype=torch.bfloat16)
    ids = random_ids()
    with torch.no_grad():
        err = rel_err(ours(ids).logits, hf(ids).logits.float())
    assert err <= BF16_TOL, err


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches(tmp_path, family, side):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids(batch=3)
    mask = torch.ones_like(ids)
    pads = [0, 5, 11]
    for row, n in enumerate(pads):
        if n:
            if side == "left":
                mask[row, :n] = 0
            else:
                mask[row, -n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(a[real], b[real]) <= FP32_TOL
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_positions_beyond_8192(tmp_path, family):
    hf, ours = build_pair(tmp_path, family, max_position_embeddings=16384)
    ids = random_ids()
    pos = torch.arange(9000, 9000 + SEQ)[None].expand(2, SEQ)
    with torch.no_grad():
        a = ours(ids, position_ids=pos).logits
        b = hf(ids, position_ids=pos).logits
    assert rel_err(a, b) <= FP32_TOL


def test_rope_positions_stay_float32_in_bf16(tmp_path):
    """bf16 cannot tell 8192 from 8193: the cos/sin tables must come from float32 positions."""
    _, ours = build_pair(tmp_path, "llama", dtype=torch.bfloat16, max_position_embeddings=16384)
    pos = torch.tensor([[8192, 8193, 8194, 8195]])
    cos, sin = ours.model.rotary(pos)
    assert cos.dtype == torch.float32
    assert len({tuple(r.tolist()) for r in cos[0]}) == 4  # four distinct rows


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tmp_path, tied):
    hf, ours = build_pair(tmp_path, "llama", tie_word_embeddings=tied)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= FP32_TOL


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("kind", list(ROPE_CASES))
def test_rope_scaling_kinds(tmp_path, kind):
    params = {"rope_theta": 10000.0, **ROPE_CASES[kind]}
    # max_position_embeddings below the sequence length so dynamic NTK scaling kicks in
    hf, ours = build_pair(tmp_path, "llama", rope_parameters=params, max_position_embeddings=16)
    assert ours.spec.rope.kind == kind
    ids = random_ids(seq=40)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= FP32_TOL


def test_legacy_rope_config_format():
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    spec = ArchSpec.from_hf_config(cfg)
    assert spec.rope.kind == "llama3" and spec.rope.theta == 500000.0 and spec.rope.factor == 8.0


def test_sliding_window_sequence_longer_than_window(tmp_path):
    hf, ours = build_pair(tmp_path, "mistral")
    assert ours.spec.sliding_window == 7
    ids = random_ids(seq=30)
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert rel_err(a, b) <= FP32_TOL
    # and the window really changes the result (the test would pass vacuously otherwise)
    ours.layers[0].self_attn.sliding_window = None
    with torch.no_grad():
        assert rel_err(ours(ids).logits, b) > 1e-3


def test_packed_documents_do_not_attend_across(tmp_path):
    _, ours = build_pair(tmp_path, "llama")
    a_ids, b_ids = random_ids(1, 10, seed=1), random_ids(1, 14, seed=2)
    packed = torch.cat([a_ids, b_ids], dim=1)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        lp = ours(packed, position_ids=pos).logits
        la, lb = ours(a_ids).logits, ours(b_ids).logits
    assert rel_err(lp[:, :10], la) <= FP32_TOL
    assert rel_err(lp[:, 10:], lb) <= FP32_TOL
    # the loss skips the boundary: the last token of document a does not predict the first of document b
    labels = packed.clone()
    out = ours(packed, position_ids=pos, labels=labels)
    assert out.num_target_tokens == 9 + 13


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_round_trip_fasttune_save_transformers_load(tmp_path, family):
    hf, ours = build_pair(tmp_path / "src", family)
    save_model(ours, tmp_path / "out", max_shard_size=20_000)  # force several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    attn = "eager" if family == "gemma2" else "sdpa"
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation=attn).eval()
    reloaded = load_model(tmp_path / "out")
    ids = random_ids()
    with torch.no_grad():
        ref = ours(ids).logits
        assert torch.equal(hf2(ids).logits, hf(ids).logits)
        assert torch.equal(reloaded(ids).logits, ref)


def test_dtype_choice_and_bf16_save(tmp_path):
    _, ours = build_pair(tmp_path / "src", "qwen2")
    save_model(ours, tmp_path / "bf16", dtype="bfloat16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    m = load_model(tmp_path / "bf16")  # dtype from config
    assert m.lm_head.weight.dtype == torch.bfloat16
    m32 = load_model(tmp_path / "bf16", dtype="fp32")
    assert m32.lm_head.weight.dtype == torch.float32


def test_unsupported_model_type_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="llama.*mistral.*qwen2"):
        load_model(tmp_path)


def test_pickle_refused_unless_opted_in(tmp_path):
    hf, ours = build_pair(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(fasttune.models.CheckpointError, match="pickle"):
        load_model(tmp_path)
    m = load_model(tmp_path, allow_pickle=True)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(m(ids).logits, hf(ids).logits) <= FP32_TOL


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen3"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids(batch=2, seq=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


def test_sampling_respects_top_k_and_stops_at_eos(tmp_path):
    _, ours = build_pair(tmp_path, "llama")
    ids = random_ids(batch=2, seq=5)
    g = torch.Generator().manual_seed(0)
    out = generate(ours, ids, max_new_tokens=20, do_sample=True, temperature=0.7, top_k=1, generator=g,
                   eos_token_id=[])
    greedy = generate(ours, ids, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out, greedy)  # top_k=1 sampling is greedy
    stop = int(greedy[0, 5])  # make the first generated token of row 0 an EOS: row 0 must stop there
    out = generate(ours, ids, max_new_tokens=20, eos_token_id=[stop], pad_token_id=0)
    assert out[0, 5] == stop and (out[0, 6:] == 0).all()


@pytest.mark.parametrize("family", ["gemma", "gemma2", "qwen3"])
def test_layer_by_layer_comparison_api(tmp_path, family):
    """compare_models hooks the same block names in both implementations; every block must agree."""
    from fasttune.models import compare_models

    hf, ours = build_pair(tmp_path, family)
    errors = compare_models(ours, hf, random_ids())
    assert [e.name for e in errors][:2] == ["embeddings", "layer 0"] and errors[-1].name == "final norm"
    assert len(errors) == ours.spec.num_layers + 2
    assert max(e.rel_l2 for e in errors) <= FP32_TOL
    with torch.no_grad():  # a planted defect in one layer shows up from that layer on
        ours.layers[1].mlp.down_proj.weight.mul_(1.5)
    errors = compare_models(ours, hf, random_ids())
    assert errors[1].rel_l2 <= FP32_TOL and errors[2].rel_l2 > 1e-3
