"""GGUF export read back with gguf's own reader: every tensor (dequantised, within its type's error), the
metadata, the tokenizer, and llama.cpp's RoPE layout for Llama's q/k (checked by computing attention scores)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import fasttune
from fasttune.export.gguf_writer import _pre_tokenizer_name, export_gguf
from fasttune.export.merged import merged_state_dict
from fasttune.models import load_model
from test_export_common import randomize_lora, save_tiny_hf

TINY_TOKENIZER = Path(fasttune.__file__).parent / "assets" / "tiny"
TINY_VOCAB = 4013
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
# max |dequantised - original| / max |block|: half a step (Q8_0: amax/127; Q5_1: (max-min)/31 <= 2 amax/31; Q4_1:
# (max-min)/15), a full step where the code range is asymmetric (Q5_0: amax/16, Q4_0: amax/8), plus the fp16 scale's
# rounding
QUANT_BOUND = {"q8_0": 0.5 / 127 + 2e-3, "q5_1": 1 / 31 + 2e-3, "q4_1": 1 / 15 + 2e-3, "q5_0": 1 / 16 + 2e-3,
               "q4_0": 1 / 8 + 2e-3}


def _model_dir(tmp_path, family, **overrides):
    d = tmp_path / family
    save_tiny_hf(d, family, vocab_size=TINY_VOCAB, **overrides)
    for f in TINY_TOKENIZER.glob("*token*.json"):  # tokenizer files only, not the tiny model's config
        shutil.copy(f, d / f.name)
    return d


def _lora_model(d):
    model = fasttune.add_lora(load_model(d), r=4, alpha=8)
    randomize_lora(model)
    return model


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _dequant(t) -> np.ndarray:
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return arr.reshape([int(x) for x in reversed(t.shape)])


def _expected(model, family) -> dict[str, torch.Tensor]:
    """What each GGUF tensor must hold, built from the merged HF state dict with llama.cpp's conventions."""
    spec = model.spec
    state = merged_state_dict(model)
    if family == "phi3":
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            state[p + "self_attn.qkv_proj.weight"] = torch.cat(
                [state.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            state[p + "mlp.gate_up_proj.weight"] = torch.cat(
                [state.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")])
    names = gguf.get_tensor_name_map(
        {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
         "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
         "phi3": gguf.MODEL_ARCH.PHI3}[family], spec.num_layers)
    out = {}
    for name, t in state.items():
        if family in ("gemma", "gemma2") and name.endswith("norm.weight"):
            t = t + 1  # llama.cpp multiplies by the stored weight; Gemma's checkpoints hold w of (1 + w)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_f32_tensors_and_hparams(tmp_path, family):
    d = _model_dir(tmp_path, family)
    model = _lora_model(d)
    export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=d, quant="f32", chat_template=TEMPLATE)
    fields, tensors = _read(tmp_path / "m.gguf")
    spec = model.spec
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
            "gemma2": "gemma2",
            "phi3": "phi3"}[family]
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == spec.num_layers
    assert fields[f"{arch}.embedding_length"] == spec.hidden_size
    assert fields[f"{arch}.feed_forward_length"] == spec.intermediate_size
    assert fields[f"{arch}.attention.head_count"] == spec.num_heads
    assert fields[f"{arch}.attention.head_count_kv"] == spec.num_kv_heads
    assert fields[f"{arch}.context_length"] == spec.max_position_embeddings
    assert fields[f"{arch}.attention.key_length"] == spec.head_dim
    assert abs(fields[f"{arch}.attention.layer_norm_rms_epsilon"] - spec.rms_norm_eps) < 1e-12
    assert fields["tokenizer.chat_template"] == TEMPLATE
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 5.0
        assert fields["gemma2.final_logit_softcapping"] == 3.0
        assert fields["gemma2.attention.sliding_window"] == 8
    if family == "phi3":
        assert fields["phi3.rope.scaling.original_context_length"] == spec.rope.original_max_position_embeddings == 4096

    if family in ("llama", "mistral"):
        assert fields["llama.vocab_size"] == TINY_VOCAB

    expected = _expected(model, family)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        got = tensors[name]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32, name
        got = _dequant(got)
        if family in ("llama", "mistral") and (".attn_q." in name or ".attn_k." in name):  # test_llama_rope_layout
            assert not np.array_equal(got, want.numpy()), f"{name} was not permuted"
            continue
        np.testing.assert_array_equal(got, want.numpy(), err_msg=name)


def _neox_rope(x, pos, theta=10000.0):  # Hugging Face: rotate the two halves of each head
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _interleaved_rope(x, pos, theta=10000.0):  # llama.cpp LLAMA_ROPE_TYPE_NORM: rotate pairs (2i, 2i+1)
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * inv
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x0 * ang.cos() - x1 * ang.sin(), x0 * ang.sin() + x1 * ang.cos()], -1)
    return out.reshape(x.shape)


def test_llama_rope_layout(tmp_path):
    """With llama.cpp's interleaved RoPE on the GGUF weights, q.k scores equal transformers' on the HF weights."""
    d = _model_dir(tmp_path, "llama")
    model = _lora_model(d)
    export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=d, quant="f32")
    _, tensors = _read(tmp_path / "m.gguf")
    spec = model.spec
    state = merged_state_dict(model)
    x = torch.randn(spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hd, group = spec.head_dim, spec.num_heads // spec.num_kv_heads
    for layer in range(spec.num_layers):
        wq = state[f"model.layers.{layer}.self_attn.q_proj.weight"].double()
        wk = state[f"model.layers.{layer}.self_attn.k_proj.weight"].double()
        gq = torch.tensor(_dequant(tensors[f"blk.{layer}.attn_q.weight"])).double()
        gk = torch.tensor(_dequant(tensors[f"blk.{layer}.attn_k.weight"])).double()
        for h in range(spec.num_heads):
            kv = h // group
            sl_q, sl_k = slice(h * hd, (h + 1) * hd), slice(kv * hd, (kv + 1) * hd)
            hf = _neox_rope(wq[sl_q] @ x, 7) @ _neox_rope(wk[sl_k] @ x, 3)
            cpp = _interleaved_rope(gq[sl_q] @ x, 7) @ _interleaved_rope(gk[sl_k] @ x, 3)
            assert abs(hf - cpp) <= 1e-9 * max(1.0, abs(hf)), (layer, h)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_quantised_types(tmp_path, quant):
    d = _model_dir(tmp_path, "qwen2")  # no permutation: tensors compare directly
    model = _lora_model(d)
    export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=d, quant=quant)
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == int(
        {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
         "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    for name, want in _expected(model, "qwen2").items():
        t = tensors[name]
        got = _dequant(t)
        want = want.numpy()
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif quant == "f16":
            assert t.tensor_type == qtype
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        elif quant == "bf16":
            assert t.tensor_type == qtype
            np.testing.assert_array_equal(got, torch.from_numpy(want).bfloat16().float().numpy(), err_msg=name)
        else:
            assert t.tensor_type == qtype, name
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            err = np.abs(got - want).reshape(-1, block)
            scale = np.abs(want).reshape(-1, block).max(axis=1, keepdims=True)
            assert (err <= QUANT_BOUND[quant] * scale + 1e-12).all(), name
            assert err.mean() > 0, f"{name}: no quantisation error at all, so the type was not applied"


def test_bpe_tokenizer_metadata(tmp_path):
    d = _model_dir(tmp_path, "llama")
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="f16")
    fields, _ = _read(tmp_path / "m.gguf")
    tj = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == TINY_VOCAB
    assert all(tokens[i] == t for t, i in vocab.items())
    types = fields["tokenizer.ggml.token_type"]
    special = {a["id"] for a in tj["added_tokens"] if a["special"]}
    assert all((types[i] == gguf.TokenType.CONTROL) == (i in special) for i in range(TINY_VOCAB))
    merges = tj["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and fields["tokenizer.ggml.eos_token_id"] == 1
    assert fields["tokenizer.ggml.padding_token_id"] == 2
    # add-BOS flag (the tokenizer's post-processor adds BOS) and, with no override, the tokenizer's own chat template
    assert fields["tokenizer.ggml.add_bos_token"] is True
    cfg = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    assert fields["tokenizer.chat_template"] == cfg["chat_template"] and "<|im_start|>" in cfg["chat_template"]


def test_pre_tokenizer_names():
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    qwen = llama3.replace(r"\p{N}{1,3}", r"\p{N}")

    def seq(pattern):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}

    assert _pre_tokenizer_name(seq(llama3)) == "llama-bpe"
    assert _pre_tokenizer_name(seq(qwen)) == "qwen2"
    assert _pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path / "gemma"
    corpus = (Path(fasttune.__file__).parent / "assets" / "data" / "corpus.txt").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   character_coverage=0.99, byte_fallback=True, bos_id=2, eos_id=1, pad_id=0, unk_id=3)
    save_tiny_hf(d, "gemma", vocab_size=404)
    shutil.copy(tmp_path / "sp.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {"400": {"content": "<start_of_turn>", "special": True},
                                 "401": {"content": "<end_of_turn>", "special": True}}}))
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="f16")
    fields, _ = _read(tmp_path / "m.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tokens, scores, types = (fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"],
                             fields["tokenizer.ggml.token_type"])
    assert fields["tokenizer.ggml.model"] == "llama" and len(tokens) == 404
    for i in range(400):
        assert tokens[i] == sp.id_to_piece(i) and abs(scores[i] - sp.get_score(i)) < 1e-6
        want = (gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.NORMAL)
        assert types[i] == want, i
    assert tokens[400:402] == ["<start_of_turn>", "<end_of_turn>"] and types[400] == gguf.TokenType.CONTROL
    assert tokens[403] == "[PAD403]" and types[403] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is False
