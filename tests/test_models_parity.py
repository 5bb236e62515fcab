"""Parity of fasttune's native decoder with transformers, family by family (issue 2).

Each test builds a tiny random model with transformers, saves it as a user would, loads it with fasttune and
compares on the same inputs. Error measure: max |ours - theirs| / max |theirs| over the compared tensor
("max relative error", normalised by the tensor's scale so near-zero entries do not blow it up).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttune
from conftest import assert_greedy_generation_matches
from fasttune.models import generate, load_model, save_model
from fasttune.models.spec import ArchSpec, UnsupportedModelError

FP32_TOL = 1e-5
BF16_TOL = 3e-2  # measured (scripts/parity_report.py): 4.7e-3 (gemma) to 1.5e-2 (gemma2); bf16 has 8 mantissa bits
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


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pad_row_of_the_embedding_gets_the_gradient_transformers_gives_it(tmp_path, family):
    """transformers builds the embedding with padding_idx = pad_token_id: the input side sends that row no gradient
    (with tied weights the LM head's share still reaches it). Inputs that contain the pad id must agree."""
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids()
    ids[:, ::5] = 0  # the config's pad_token_id
    labels = ids.clone()
    hf(ids, labels=labels).loss.backward()
    ours(ids, labels=labels).loss.backward()
    g_hf = hf.model.embed_tokens.weight.grad
    g = ours.model.embed_tokens.weight.grad
    assert rel_err(g, g_hf) <= FP32_TOL
    if family == "llama":  # untied: no gradient at all for the pad row
        assert g[0].abs().max() == 0 and g_hf[0].abs().max() == 0
    else:
        assert g[0].abs().max() > 0


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_attention_bias_configs(tmp_path, family):
    """`attention_bias: true` puts biases on q/k/v and o (Qwen3 too): every one is loaded and used."""
    hf, ours = build_pair(tmp_path, family, attention_bias=True)
    assert any(n.endswith("o_proj.bias") for n, _ in ours.named_parameters())
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(ours(ids, return_logits=True).logits, hf(ids).logits) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits(tmp_path, family):
    hf, ours = build_pair(tmp_path, family, dtype=torch.bfloat16)
    ids = random_ids()
    with torch.no_grad():
        err = rel_err(ours(ids).logits, hf(ids).logits.float())
    assert err <= BF16_TOL, err


@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("seq", [10, 40])
def test_longrope_phi35(tmp_path, seq):
    """Phi-3.5's `longrope`: short factors up to original_max_position_embeddings (16 here), long factors and the
    attention factor beyond it."""
    half = 48 // 4 // 2
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
              "long_factor": [1.0 + 0.5 * i for i in range(half)], "short_factor": [1.0 + 0.1 * i for i in range(half)]}
    hf, ours = build_pair(tmp_path, "phi3", rope_parameters=params, max_position_embeddings=64,
                          original_max_position_embeddings=16)
    assert ours.spec.rope.kind == "longrope" and ours.spec.rope.original_max_position_embeddings == 16
    ids = random_ids(seq=seq)
    with torch.no_grad():
        b = hf(ids).logits
        assert rel_err(ours(ids).logits, b) <= FP32_TOL
        # the regime matters (the test would pass vacuously if short and long factors gave the same logits)
        rope = ours.spec.rope
        rope.long_factor, rope.short_factor = rope.short_factor, rope.long_factor
        ours.model.rotary = type(ours.model.rotary)(ours.spec)
        assert rel_err(ours(ids).logits, b) > 1e-3


def test_rotary_tables_computed_once_and_cached(tmp_path):
    """cos/sin come from one cached float32 table per regime, grown by powers of two, equal to the direct formula."""
    from fasttune.models.rope import RotaryTables, inverse_frequencies

    _, ours = build_pair(tmp_path, "llama", max_position_embeddings=16384)
    spec = ours.spec
    rot = RotaryTables(spec)

    def direct(pos):
        inv, scale = inverse_frequencies(spec.rope, rot.dim, spec.max_position_embeddings, int(pos.max()) + 1)
        ang = pos.float()[..., None] * inv
        ang = torch.cat((ang, ang), -1)
        return ang.cos() * scale, ang.sin() * scale

    pos = torch.tensor([[0, 1, 2, 0, 1], [9000, 9001, 9002, 9003, 9004]])
    cos, sin = rot(pos)
    want = direct(pos)
    assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])
    table = rot.table(torch.device("cpu"), 9005)[0]
    assert table.shape[0] == 16384 and len(rot._tables) == 1
    rot(torch.arange(300)[None])  # shorter: the same table serves it, nothing recomputed
    assert rot.table(torch.device("cpu"), 1)[0] is table
    # dynamic NTK scaling beyond the trained length: one regime per length, the cache stays bounded
    dyn = RotaryTables(ArchSpec.from_hf_config({**spec.raw_config, "max_position_embeddings": 16,
                                                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                    "rope_theta": 10000.0}}))
    for n in range(10, 30):
        p = torch.arange(n)[None]
        got = dyn(p)
        inv, _ = inverse_frequencies(dyn.spec.rope, dyn.dim, 16, n)
        ang = torch.cat((p.float()[..., None] * inv,) * 2, -1)
        assert torch.equal(got[0], ang.cos()), n
    assert len(dyn._tables) <= RotaryTables.max_tables and len(dyn._cache) <= RotaryTables.max_tables


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


@pytest.mark.parametrize("family", FAMILIES)
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


def test_gemma_embedding_scale_rounded_to_bf16_first(tmp_path):
    """Gemma multiplies embeddings by sqrt(hidden) cast to the compute dtype first (sqrt(48) -> 6.9375 in bf16)."""
    hf, ours = build_pair(tmp_path, "gemma", dtype=torch.bfloat16)
    ids = random_ids()
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states[0]
        got = ours(ids, output_hidden_states=True).hidden_states[0]
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
        raw = ours.model.embed_tokens.weight[ids].float()
        assert not torch.equal((raw * 48 ** 0.5).to(torch.bfloat16), ref)  # the unrounded scale differs


class _PickleBomb:
    """Unpickling this would run code (create a file); weights_only=True must refuse it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_opt_in_still_refuses_code(tmp_path):
    import pickle

    hf, _ = build_pair(tmp_path, "llama")
    (tmp_path / "model.safetensors").unlink()
    state = dict(hf.state_dict())
    state["model.norm.weight"] = _PickleBomb(tmp_path / "pwned")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        load_model(tmp_path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def test_tokenizer_saved_beside_the_model_and_loaded_back(tmp_path):
    from fasttune.models import load_tokenizer

    # llama: transformers 5 maps some model types (qwen2) to their own tokenizer class, which rebuilds a BPE
    # pipeline and would not read this toy word-level tokenizer; real checkpoints ship their own kind
    _, ours = build_pair(tmp_path / "src", "llama")
    save_model(ours, tmp_path / "out", tokenizer=_tiny_tokenizer())
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()
    tok = load_tokenizer(tmp_path / "out")
    assert tok("w5 w7 w96")["input_ids"] == [5, 7, 96]
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0
    # and transformers reads the same folder as a whole
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("w5 w7")["input_ids"] == [5, 7]
    with pytest.raises(fasttune.models.CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path / "src")  # no tokenizer files there


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(tmp_path, family):
    hf, ours = build_pair(tmp_path, family)
    assert_greedy_generation_matches(hf, ours, random_ids(batch=2, seq=9))


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


@pytest.mark.parametrize("top_k,top_p", [(0, 0.3), (0, 0.9), (5, 1.0), (5, 0.6)])
def test_top_k_top_p_filter_matches_transformers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from fasttune.generation import filter_logits

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(top_k + int(top_p * 10))) * 2
    want = logits.clone()
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, top_k, top_p if top_p < 1.0 else None)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


def test_sampling_stays_in_nucleus_and_stops_on_any_eos(tmp_path):
    _, ours = build_pair(tmp_path, "llama")
    ids = random_ids(batch=2, seq=5)
    greedy = generate(ours, ids, max_new_tokens=12, eos_token_id=[])
    # several EOS ids: each row stops at the first generated token that is any of them, then pads
    eos = [int(greedy[0, 8]), int(greedy[1, 6])]
    out = generate(ours, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    for row in range(2):
        gen = greedy[row, 5:].tolist()
        stop = next(i for i, t in enumerate(gen) if t in eos)
        assert out[row, 5:5 + stop + 1].tolist() == gen[: stop + 1]
        assert (out[row, 5 + stop + 1:] == 0).all()
    # sampled tokens come from the top-p nucleus of the step's distribution (top_p tiny: only the argmax)
    g = torch.Generator().manual_seed(3)
    sampled = generate(ours, ids, max_new_tokens=12, do_sample=True, temperature=1.3, top_p=1e-6, generator=g,
                       eos_token_id=[])
    assert torch.equal(sampled, greedy)
    # and a real sampler (temperature 1, no filter) does leave the greedy path, reproducibly per seed
    a = generate(ours, ids, max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(5),
                 eos_token_id=[])
    b = generate(ours, ids, max_new_tokens=12, do_sample=True, generator=torch.Generator().manual_seed(5),
                 eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, greedy)


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


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "phi3"])
def test_triton_kernels_in_the_model_match_transformers(tmp_path, monkeypatch, family):
    """The model core through the Triton kernels (the interpreter on CPU: FASTTUNE_KERNELS=triton) gives the same
    loss and gradients as transformers: the one dispatch point really routes every op, with the model's strides."""
    pytest.importorskip("triton")
    import fasttune.kernels as K

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    hf, ours = build_pair(tmp_path, family)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    calls = []
    for name in ("rms_norm", "apply_rope", "glu", "fused_linear_cross_entropy"):
        mod_fn = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=mod_fn, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    ids = random_ids()
    out = ours(ids, labels=ids, return_logits=True)
    assert {"rms_norm", "apply_rope", "glu", "fused_linear_cross_entropy"} <= set(calls)
    assert K.use_triton(ids.float())
    ref = hf(ids, labels=ids)
    assert rel_err(out.logits, ref.logits) <= FP32_TOL
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() <= FP32_TOL
    out.loss.backward()
    ref.loss.backward()
    hp = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if name in hp:  # phi3's fused tensors are covered by test_fp32_logits_loss_and_grads
            assert rel_err(p.grad, hp[name].grad) <= FP32_TOL, name


def test_tokenizer_loads_from_local_folders_only(monkeypatch):
    """A Hub id is not a folder: transformers is told never to reach the Hub (nor to fall back on its cache)."""
    import transformers

    from fasttune.models.checkpoint import CheckpointError, load_tokenizer

    calls = []

    def recording(path, **kwargs):
        calls.append(kwargs)
        raise OSError(f"{path} is not a local folder")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    with pytest.raises(CheckpointError, match="could not load a tokenizer from openai-community/gpt2"):
        load_tokenizer("openai-community/gpt2")
    assert calls == [{"local_files_only": True}]
