"""Parity of the one decoder with transformers for the families of issue 16: OLMo 2, Granite 3.x, SmolLM3,
Phi-4-mini (phi3 with partial rotary, long-RoPE and tied embeddings) and Gemma 3 text (Gemma3ForCausalLM).

Same method and error measure as tests/test_models_parity.py: a tiny random model built and saved by transformers,
loaded by fasttune, compared on the same inputs (fp32: logits, loss, every gradient; bf16 logits; padded batches;
packed documents; round trips; greedy generation).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import assert_greedy_generation_matches, padded_batch
from fasttune.models import load_model, save_model
from fasttune.models.spec import ArchSpec

from test_models_parity import FP32_TOL, SEQ, VOCAB, random_ids, rel_err

# bf16 logits against transformers loaded in bf16: measured 0 for every family here (the same casts in the same
# order, OLMo 2's float32 norm weights and RoPE included); the bound leaves room for another op order only
BF16_TOL = 1e-3

CONFIG_CLASSES = {"olmo2": "Olmo2Config", "granite": "GraniteConfig", "smollm3": "SmolLM3Config",
                  "phi4mini": "Phi3Config", "gemma3": "Gemma3TextConfig"}
FAMILIES = [f for f, cls in CONFIG_CLASSES.items() if hasattr(transformers, cls)]
# Phi-4-mini's long-RoPE switches to the long factors past this many positions: SEQ = 24 tokens use them,
# SHORT_SEQ the short ones
PHI_ORIGINAL_CONTEXT = 16
SHORT_SEQ = 12


def tiny_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "olmo2":
        cfg = transformers.Olmo2Config(**common)
    elif family == "granite":  # multipliers far from 1 so each one shows in the comparison
        cfg = transformers.GraniteConfig(**common, embedding_multiplier=3.0, residual_multiplier=0.4,
                                         attention_multiplier=0.11, logits_scaling=2.5)
    elif family == "smollm3":  # 4 layers: the 4th has no RoPE
        cfg = transformers.SmolLM3Config(**{**common, "num_hidden_layers": 4})
    elif family == "phi4mini":  # head_dim 16, rotary over 12 of it (factor 0.75): 6 frequencies
        cfg = transformers.Phi3Config(
            **{**common, "hidden_size": 64}, tie_word_embeddings=True,
            original_max_position_embeddings=PHI_ORIGINAL_CONTEXT,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                             "short_factor": [1.0 + 0.1 * i for i in range(6)],
                             "long_factor": [2.0 + 0.5 * i for i in range(6)]})
    elif family == "gemma3":  # 7 layers: 5 local, 1 global, 1 local; linear RoPE scaling on the global layer
        cfg = transformers.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 7}, head_dim=16, sliding_window=6, query_pre_attn_scalar=20,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_pair(tmp_path, family: str, dtype=torch.float32, **overrides):
    torch.manual_seed(1234)
    cfg = tiny_config(family, **overrides)
    # sdpa: none of these tiny configs soft-caps attention (Gemma 3 may; eager then), and sdpa is what fasttune's
    # CPU path runs, so fp32 and bf16 compare the same attention arithmetic
    attn = "eager" if getattr(cfg, "attn_logit_softcapping", None) else "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    with torch.no_grad():  # move every weight off its default (norms at 1/0) so every parameter matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf = hf.to(dtype).eval()
    hf.save_pretrained(tmp_path)
    if dtype != torch.float32:  # reloaded: .to(dtype) would also round transformers' float32 RoPE buffers
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation=attn).eval()
    return hf, load_model(tmp_path, dtype=dtype)


def _grads(model: torch.nn.Module, fused: bool) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by checkpoint name; Phi-3's split projections fused as the checkpoint has them."""
    grads = {n: p.grad for n, p in model.named_parameters()}
    if fused:
        for i in range(model.spec.num_layers):
            pre = f"model.layers.{i}."
            grads[pre + "self_attn.qkv_proj.weight"] = torch.cat(
                [grads.pop(pre + f"self_attn.{p}_proj.weight") for p in "qkv"])
            grads[pre + "mlp.gate_up_proj.weight"] = torch.cat(
                [grads.pop(pre + f"mlp.{p}_proj.weight") for p in ("gate", "up")])
    return grads


@pytest.mark.parametrize("seq", [SEQ, SHORT_SEQ])
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_loss_and_grads(tmp_path, family, seq):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids(seq=seq)
    out_hf = hf(ids, labels=ids)
    out_ours = ours(ids, labels=ids, return_logits=True)
    assert rel_err(out_ours.logits, out_hf.logits) <= FP32_TOL
    assert abs(out_ours.loss.item() - out_hf.loss.item()) / out_hf.loss.item() <= FP32_TOL
    out_hf.loss.backward()
    out_ours.loss.backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    mine = _grads(ours, ours.spec.fused_checkpoint)
    assert set(mine) == set(theirs)
    for name, g in mine.items():
        assert g is not None, name
        assert rel_err(g, theirs[name]) <= FP32_TOL, name


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_same_casts_as_transformers(tmp_path, family):
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
    ids, mask = padded_batch(ids, side)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(a[real], b[real]) <= FP32_TOL
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents(tmp_path, family):
    """Two documents packed in one row (position ids restart) give transformers' logits of each document alone,
    and the packed loss and every gradient equal those of the documents run separately (summed over targets)."""
    hf, ours = build_pair(tmp_path, family)
    a_ids, b_ids = random_ids(1, 10, seed=1), random_ids(1, 14, seed=2)
    packed = torch.cat([a_ids, b_ids], dim=1)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        lp = ours(packed, position_ids=pos).logits
        assert rel_err(lp[:, :10], hf(a_ids).logits) <= FP32_TOL
        assert rel_err(lp[:, 10:], hf(b_ids).logits) <= FP32_TOL
    out = ours(packed, position_ids=pos, labels=packed, num_items_in_batch=9 + 13)
    assert out.num_target_tokens == 9 + 13
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    sep = ours(a_ids, labels=a_ids, num_items_in_batch=22).loss + ours(b_ids, labels=b_ids, num_items_in_batch=22).loss
    sep.backward()
    assert abs(out.loss.item() - sep.item()) / sep.item() <= FP32_TOL
    for n, p in ours.named_parameters():
        assert rel_err(packed_grads[n], p.grad) <= FP32_TOL, n


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_fasttune_save_transformers_load(tmp_path, family):
    hf, ours = build_pair(tmp_path / "src", family)
    save_model(ours, tmp_path / "out", max_shard_size=20_000)  # several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    attn = "sdpa"
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation=attn).eval()
    reloaded = load_model(tmp_path / "out")
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(hf2(ids).logits, hf(ids).logits)
        assert torch.equal(reloaded(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(tmp_path, family):
    hf, ours = build_pair(tmp_path, family)
    assert_greedy_generation_matches(hf, ours, random_ids(batch=2, seq=9))


# ---- each family's switches are read from its config and really change the result (no vacuous parity) ----------

def _logits_err_after(tmp_path, family, change) -> float:
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids()
    change(ours)
    with torch.no_grad():
        return rel_err(ours(ids).logits, hf(ids).logits)


@pytest.mark.skipif("olmo2" not in FAMILIES, reason="transformers has no Olmo2Config")
def test_olmo2_spec(tmp_path):
    spec = ArchSpec.from_hf_config(tiny_config("olmo2").to_dict())
    assert spec.norm_placement == "post" and spec.qk_norm == "projection" and not spec.tie_word_embeddings
    _, ours = build_pair(tmp_path, "olmo2")
    assert ours.layers[0].self_attn.q_norm.weight.shape == (4 * 12,)  # over the whole projection
    assert not hasattr(ours.layers[0], "input_layernorm")


@pytest.mark.skipif("granite" not in FAMILIES, reason="transformers has no GraniteConfig")
def test_granite_multipliers_all_matter(tmp_path):
    spec = ArchSpec.from_hf_config(tiny_config("granite").to_dict())
    assert (spec.embedding_multiplier, spec.residual_scale, spec.attn_scale, spec.logits_scaling) == \
        (3.0, 0.4, 0.11, 2.5)
    assert spec.embed_scale is None

    def drop(attr):
        def change(m):
            if attr == "embed":
                m.spec.embedding_multiplier = None
            elif attr == "residual":
                for layer in m.layers:
                    layer.residual_scale = None
            elif attr == "attention":
                for layer in m.layers:
                    layer.self_attn.scale = 12 ** -0.5
            else:
                m.spec.logits_scaling = None
        return change
    for attr in ("embed", "residual", "attention", "logits"):
        assert _logits_err_after(tmp_path / attr, "granite", drop(attr)) > 1e-3, attr


@pytest.mark.skipif("smollm3" not in FAMILIES, reason="transformers has no SmolLM3Config")
def test_smollm3_every_fourth_layer_has_no_rope(tmp_path):
    spec = ArchSpec.from_hf_config(tiny_config("smollm3").to_dict())
    assert spec.rope_layers == [True, True, True, False] and spec.tie_word_embeddings
    assert spec.sliding_window is None  # use_sliding_window is false

    def rope_everywhere(m):
        m.layers[3].self_attn.use_rope = True
    assert _logits_err_after(tmp_path, "smollm3", rope_everywhere) > 1e-4


@pytest.mark.skipif("phi4mini" not in FAMILIES, reason="transformers has no Phi3Config")
def test_phi4mini_spec_and_long_positions(tmp_path):
    spec = ArchSpec.from_hf_config(tiny_config("phi4mini").to_dict())
    assert spec.model_type == "phi3" and spec.tie_word_embeddings
    assert spec.rope.kind == "longrope" and spec.rope.partial_rotary_factor == 0.75
    assert spec.rope.original_max_position_embeddings == PHI_ORIGINAL_CONTEXT
    hf, ours = build_pair(tmp_path, "phi4mini")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = random_ids()
    pos = torch.arange(200, 200 + SEQ)[None].expand(2, SEQ)  # far past the original context
    with torch.no_grad():
        assert rel_err(ours(ids, position_ids=pos).logits, hf(ids, position_ids=pos).logits) <= FP32_TOL


@pytest.mark.skipif("gemma3" not in FAMILIES, reason="transformers has no Gemma3TextConfig")
def test_gemma3_spec_local_rope_and_pattern(tmp_path):
    spec = ArchSpec.from_hf_config(tiny_config("gemma3").to_dict())
    assert spec.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert spec.rope.theta == 1e6 and spec.rope.kind == "linear" and spec.rope.factor == 2.0
    assert spec.local_rope.theta == 1e4 and spec.local_rope.kind == "default"
    assert spec.qk_norm == "head" and spec.norm_placement == "sandwich" and spec.norm_unit_offset
    assert spec.attn_scale == 20 ** -0.5 and spec.tie_word_embeddings

    def global_rope_everywhere(m):
        for layer in m.layers:
            layer.self_attn.local_rope = False
    assert _logits_err_after(tmp_path, "gemma3", global_rope_everywhere) > 1e-4


def test_gemma3_legacy_config_rope_bases():
    """Hub configs written before transformers 5: rope_theta (+ rope_scaling) for global layers,
    rope_local_base_freq for the local ones, and the 5:1 pattern from sliding_window_pattern."""
    cfg = {"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 12, "num_attention_heads": 2, "head_dim": 4, "sliding_window": 512,
           "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 4}
    spec = ArchSpec.from_hf_config(cfg)
    assert [t[0] for t in spec.layer_types] == list("sssssfsssssf")
    assert (spec.rope.theta, spec.rope.kind, spec.rope.factor) == (1e6, "linear", 8.0)
    assert (spec.local_rope.theta, spec.local_rope.kind) == (1e4, "default")
    assert spec.uses_local_rope(0) and not spec.uses_local_rope(5)


@pytest.mark.skipif("gemma3" not in FAMILIES, reason="transformers has no Gemma3TextConfig")
def test_gemma3_embedding_scale_rounded_to_bf16_first(tmp_path):
    hf, ours = build_pair(tmp_path, "gemma3", dtype=torch.bfloat16)
    ids = random_ids()
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states[0]
        got = ours(ids, output_hidden_states=True).hidden_states[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


# ---- LoRA, merged export and GGUF export --------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merged_export_loads_in_transformers(tmp_path, family):
    """A LoRA on every linear, merged and written in the Hugging Face layout: transformers reproduces the adapted
    model's logits (fp32)."""
    import fasttune
    from fasttune.export.merged import export_merged
    from test_export_common import randomize_lora

    build_pair(tmp_path / "base", family)
    model = fasttune.add_lora(load_model(tmp_path / "base"), r=4, alpha=8)
    randomize_lora(model)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
        assert rel_err(ours, load_model(tmp_path / "base")(ids).logits) > 1e-2  # the adapter matters
    assert not export_merged(model, tmp_path / "out", dtype="float32").notes
    attn = "sdpa"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation=attn).eval()
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ours) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_through_the_cli(tmp_path, family, capsys):
    """`fasttune export --format gguf` writes each new family in llama.cpp's architecture (tests/interop runs the
    files in llama.cpp itself); the 2-D weights read back equal the model's (F32). Gemma 3 takes
    query_pre_attn_scalar = head_dim here, as llama.cpp fixes the scale (the refusal of the others: next test)."""
    gguf = pytest.importorskip("gguf")
    from fasttune.export.cli import main
    from fasttune.export.gguf_writer import GGUF_ARCH, read_gguf_weights
    from fasttune.export.merged import iter_merged_tensors

    import shutil
    from pathlib import Path

    import fasttune

    tiny_tokenizer = Path(fasttune.__file__).parent / "assets" / "tiny"  # a real BPE tokenizer of 4013 tokens
    overrides = {"query_pre_attn_scalar": 16} if family == "gemma3" else {}
    build_pair(tmp_path / "base", family, vocab_size=4013, **overrides)
    for f in tiny_tokenizer.glob("*token*.json"):
        shutil.copy(f, tmp_path / "base" / f.name)
    assert main(["--format", "gguf", "--quant", "f32", str(tmp_path / "base"), str(tmp_path / "out")]) == 0, \
        capsys.readouterr().err
    [path] = (tmp_path / "out").glob("*.gguf")
    model = load_model(tmp_path / "base")
    arch = gguf.GGUFReader(path).fields["general.architecture"]
    assert bytes(arch.parts[-1]).decode() == gguf.MODEL_ARCH_NAMES[GGUF_ARCH[model.spec.model_type]]
    back = read_gguf_weights(path, model)
    merged = {n: fn() for n, fn, shape in iter_merged_tensors(model) if len(shape) == 2}
    assert set(back) == set(merged)
    for name, w in back.items():
        assert torch.equal(w, merged[name]), name


@pytest.mark.parametrize("case", ["gemma3 scale", "gemma3 pattern", "smollm3 nope"])
def test_gguf_export_refuses_what_llama_cpp_fixes(tmp_path, case, capsys):
    """llama.cpp fixes some settings instead of reading them (Gemma 3's attention scale, 5:1 layer pattern and
    local RoPE; SmolLM3's every-fourth NoPE layer): a model that differs is refused before loading, saying why."""
    pytest.importorskip("gguf")
    from fasttune.export.cli import main

    family, overrides, reason = {
        "gemma3 scale": ("gemma3", {}, "query_pre_attn_scalar gives the attention scale 0.223607, llama.cpp uses 0.25"),
        "gemma3 pattern": ("gemma3", {"query_pre_attn_scalar": 16, "layer_types": ["sliding_attention",
                                                                                    "full_attention"] * 3 +
                                      ["sliding_attention"]}, "not 5 sliding-window : 1 global"),
        "smollm3 nope": ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}, "not every fourth layer"),
    }[case]
    build_pair(tmp_path / "base", family, **overrides)
    assert main(["--format", "gguf", str(tmp_path / "base"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert reason in err and "--format merged" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif("phi4mini" not in FAMILIES, reason="transformers has no Phi3Config")
def test_phi4mini_gguf_tensors_round_trip(tmp_path):
    """Phi-4-mini goes through the Phi-3 GGUF path: tied embeddings (no output.weight), the rotary dimension
    count of the partial rotary, the long/short factors of its rotary dimensions, F32 tensors read back exactly."""
    gguf = pytest.importorskip("gguf")
    from fasttune.export.gguf_writer import export_gguf, read_gguf_weights

    import shutil
    from pathlib import Path

    import fasttune

    tiny_tokenizer = Path(fasttune.__file__).parent / "assets" / "tiny"  # a real BPE tokenizer of 4013 tokens
    _, ours = build_pair(tmp_path / "base", "phi4mini", vocab_size=4013)
    for f in tiny_tokenizer.glob("*token*.json"):
        shutil.copy(f, tmp_path / "base" / f.name)
    export_gguf(ours, tmp_path / "m.gguf", tokenizer_dir=tmp_path / "base", quant="f32", perplexity=False)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert int(reader.fields["phi3.rope.dimension_count"].parts[-1][0]) == 12
    assert len(next(t for t in reader.tensors if t.name == "rope_factors_long.weight").data) == 6
    back = read_gguf_weights(tmp_path / "m.gguf", ours)
    state = dict(ours.state_dict())
    linears = {n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.")}
    assert {n + ".weight" for n in linears} <= set(back)  # the split q/k/v and gate/up of the fused tensors
    for name, t in back.items():
        assert torch.equal(t.float(), state[name].float()), name


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_comparison(tmp_path, family):
    """compare_models (fasttune compare) hooks the same blocks in both implementations: every block agrees."""
    from fasttune.models import compare_models

    hf, ours = build_pair(tmp_path, family)
    errors = compare_models(ours, hf, random_ids())
    assert len(errors) == ours.spec.num_layers + 2
    assert max(e.rel_l2 for e in errors) <= FP32_TOL


@pytest.mark.skipif(not hasattr(transformers, "Gemma3ForConditionalGeneration"),
                    reason="transformers has no Gemma3ForConditionalGeneration")
def test_gemma3_multimodal_checkpoint_loads_its_text_tower(tmp_path):
    """A Gemma 3 4B/12B/27B-style checkpoint (Gemma3ForConditionalGeneration: language_model.* beside a vision
    tower): fasttune loads the language model alone and matches the multimodal model on text (fp32 logits, loss,
    every language-model gradient); saved back, it is a Gemma3ForCausalLM checkpoint transformers reads."""
    torch.manual_seed(0)
    text = tiny_config("gemma3").to_dict()
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=96, boi_token_index=94, eoi_token_index=95)
    hf = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.eval().save_pretrained(tmp_path / "mm")
    ours = load_model(tmp_path / "mm")
    assert ours.spec.model_type == "gemma3_text" and ours.spec.text_tower
    ids = random_ids()
    out_hf = hf(input_ids=ids, labels=ids)
    out_ours = ours(ids, labels=ids, return_logits=True)
    assert rel_err(out_ours.logits, out_hf.logits) <= FP32_TOL
    assert abs(out_ours.loss.item() - out_hf.loss.item()) / out_hf.loss.item() <= FP32_TOL
    out_hf.loss.backward()
    out_ours.loss.backward()
    theirs = {n.replace("model.language_model.", "model."): p.grad for n, p in hf.named_parameters()
              if n.startswith("model.language_model.")}
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs)
    for name, p in mine.items():
        assert rel_err(p.grad, theirs[name]) <= FP32_TOL, name
    save_model(ours, tmp_path / "text")
    hf_text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="sdpa")
    assert type(hf_text).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, hf_text.eval()(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_kernels_in_the_model_match_transformers(tmp_path, monkeypatch, family):
    """The model through the Triton kernels (FASTTUNE_KERNELS=triton; the interpreter on CPU): OLMo 2's norms over
    float32 operands, partial rotary, NoPE layers, Gemma 3's two RoPE tables, Granite's scaled head all give the
    reference's loss and gradients."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    hf, ours = build_pair(tmp_path, family)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    ids = random_ids()
    out = ours(ids, labels=ids, return_logits=True)
    ref = hf(ids, labels=ids)
    assert rel_err(out.logits, ref.logits) <= FP32_TOL
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() <= FP32_TOL
    out.loss.backward()
    ref.loss.backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    for name, g in _grads(ours, ours.spec.fused_checkpoint).items():
        assert rel_err(g, theirs[name]) <= FP32_TOL, name


@pytest.mark.skipif("gemma3" not in FAMILIES, reason="transformers has no Gemma3TextConfig")
def test_gemma3_with_soft_capping(tmp_path):
    """Gemma 3 configs may set final_logit_softcapping (applied, as Gemma 2) and attn_logit_softcapping (a field
    transformers' Gemma 3 attention never reads, so neither does fasttune)."""
    hf, ours = build_pair(tmp_path, "gemma3", attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    assert (ours.spec.attn_softcap, ours.spec.final_softcap) == (None, 3.0)
    ids = random_ids()
    out_hf = hf(ids, labels=ids)
    out_ours = ours(ids, labels=ids, return_logits=True)
    assert rel_err(out_ours.logits, out_hf.logits) <= FP32_TOL
    assert abs(out_ours.loss.item() - out_hf.loss.item()) / out_hf.loss.item() <= FP32_TOL


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "granite"])
def test_reward_head_exports_as_sequence_classification(tmp_path, family):
    """A reward head (model.score) goes out as transformers' <Family>ForSequenceClassification, which scores the
    last token as fasttune does. (Granite has no such class in transformers: its reward export is refused.)"""
    from fasttune.export.merged import export_merged

    _, ours = build_pair(tmp_path / "base", family)
    head = torch.randn(1, ours.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    ours.attach_score(head)
    ids = random_ids(batch=1)
    with torch.no_grad():
        expected = (ours(ids).last_hidden_state[0, -1] @ head[0]).item()
    export_merged(ours, tmp_path / "out", dtype="float32")
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__.endswith("ForSequenceClassification") and not info["missing_keys"]
    with torch.no_grad():
        assert hf.eval()(ids).logits.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.skipif("smollm3" not in FAMILIES, reason="transformers has no SmolLM3Config")
def test_smollm3_sliding_window_on_nope_layers(tmp_path):
    """SmolLM3 with use_sliding_window: the window applies to the NoPE layers only (its layer_types)."""
    torch.manual_seed(0)
    cfg = transformers.SmolLM3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     use_sliding_window=True, sliding_window=6, pad_token_id=0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert [ours.spec.window_for_layer(i) for i in range(4)] == [None, None, None, 6]
    ids = random_ids(seq=30)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= FP32_TOL
