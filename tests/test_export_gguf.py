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
    result = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=d, quant="f32", chat_template=TEMPLATE)
    fields, tensors = _read(tmp_path / "m.gguf")
    spec = model.spec
    # a window the GGUF cannot hold is said, never dropped quietly (and nothing is said where there is none)
    window_note = [n for n in result.notes if "sliding-window" in n]
    assert bool(window_note) == bool(spec.sliding_window and family not in ("gemma2", "phi3")), (family, result.notes)
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


def _train_sentencepiece(prefix: Path, **ids) -> None:
    spm = pytest.importorskip("sentencepiece")
    corpus = (Path(fasttune.__file__).parent / "assets" / "data" / "corpus.txt").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(prefix), vocab_size=400,
                                   character_coverage=0.99, byte_fallback=True, **ids)


def _expected_sp_type(sp, i: int):
    return (gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.CONTROL if sp.is_control(i)
            else gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.NORMAL)


def test_cli_keeps_a_sentencepiece_vocabulary(tmp_path):
    """`fasttune export --format gguf` on a Llama-2-style folder (tokenizer.model, no tokenizer.json): the tokenizer
    is re-saved from the loaded one, and recent transformers write only tokenizer.json — the GGUF must still carry
    the SentencePiece vocabulary (model "llama", scores, byte tokens), not a BPE reading of tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    _train_sentencepiece(tmp_path / "sp", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    d = tmp_path / "llama2"
    save_tiny_hf(d, "llama", vocab_size=400)
    shutil.copy(tmp_path / "sp.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    from fasttune.export.cli import main

    assert main(["--format", "gguf", "--quant", "f16", str(d), str(tmp_path / "out")]) == 0
    fields, _ = _read(tmp_path / "out" / "llama2-f16.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(400)]
    assert fields["tokenizer.ggml.token_type"] == [_expected_sp_type(sp, i) for i in range(400)]
    assert sum(t == gguf.TokenType.BYTE for t in fields["tokenizer.ggml.token_type"]) == 256
    assert np.allclose(fields["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(400)])


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path / "gemma"
    _train_sentencepiece(tmp_path / "sp", bos_id=2, eos_id=1, pad_id=0, unk_id=3)
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
        assert types[i] == _expected_sp_type(sp, i), i
    assert tokens[400:402] == ["<start_of_turn>", "<end_of_turn>"] and types[400] == gguf.TokenType.CONTROL
    assert tokens[403] == "[PAD403]" and types[403] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is False


# Qwen2's split regex, as in Qwen2's tokenizer.json (Llama-3's with single digits: \p{N} instead of \p{N}{1,3})
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _qwen2_tokenizer(d: Path) -> int:
    """A small Qwen2-style byte-level BPE tokenizer saved to `d`; returns its size (special tokens included)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = (Path(fasttune.__file__).parent / "assets" / "data" / "corpus.txt").read_text().splitlines()
    sentences = [s for s in corpus if s][:40] + [
        "Hello, world! I'm fine, you're kind and we'll see.", "Tabs\tand\nnew lines\r\n   spaces 12345 67.",
        "Ünïcödé — 中文 also works.", "def f(x):\n    return x ** 2  # comment"]
    trainer = trainers.BpeTrainer(vocab_size=360, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences, trainer)
    # as in Qwen2, the special tokens come after the BPE vocabulary
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN2_SPECIAL}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "model_max_length": 32768,
        "clean_up_tokenization_spaces": False, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
        "chat_template": QWEN2_CHAT_TEMPLATE}, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


def test_qwen2_tokenizer_end_to_end(tmp_path):
    """Qwen2: byte-level BPE with Qwen2's split regex, ChatML special tokens, no BOS; the model's vocab_size is
    padded past the tokenizer's (as Qwen2's 151936 > 151665), the padding written as [PADi] UNUSED tokens."""
    from tokenizers import Tokenizer

    d = tmp_path / "qwen2"
    n_tok = _qwen2_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    endoftext, im_start, im_end = (tok.token_to_id(t) for t in QWEN2_SPECIAL)
    assert (endoftext, im_start, im_end) == (n_tok - 3, n_tok - 2, n_tok - 1)
    n_vocab = n_tok + 5
    save_tiny_hf(d, "qwen2", vocab_size=n_vocab, bos_token_id=endoftext, eos_token_id=im_end,
                 pad_token_id=endoftext, max_position_embeddings=256, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, d / f.name)
    cfg = json.loads((d / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert cfg["model_type"] == "qwen2" and theta == 1e6 and cfg["vocab_size"] == n_vocab

    transformers = pytest.importorskip("transformers")  # the fixture is a tokenizer transformers loads as Qwen's
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    assert hf_tok.bos_token is None and hf_tok.eos_token_id == im_end and hf_tok.pad_token_id == endoftext
    assert hf_tok("Hello world")["input_ids"] == tok.encode("Hello world").ids  # no BOS added
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True).endswith("<|im_start|>assistant\n")

    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="f16")
    fields, _ = _read(tmp_path / "m.gguf")

    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"

    vocab = tok.get_vocab(with_added_tokens=True)
    assert sorted(vocab.values()) == list(range(n_tok))
    in_order = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == n_vocab
    assert tokens[:n_tok] == in_order
    assert tokens[n_tok:] == [f"[PAD{i}]" for i in range(n_tok, n_vocab)]

    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    assert len(merges) > 20
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]

    types = fields["tokenizer.ggml.token_type"]
    assert len(types) == n_vocab
    special = {endoftext, im_start, im_end}
    for i in range(n_vocab):
        want = (gguf.TokenType.CONTROL if i in special else gguf.TokenType.UNUSED if i >= n_tok
                else gguf.TokenType.NORMAL)
        assert types[i] == want, (i, tokens[i])

    assert fields["tokenizer.ggml.eos_token_id"] == im_end
    assert fields["tokenizer.ggml.padding_token_id"] == endoftext
    assert fields["tokenizer.ggml.add_bos_token"] is False
    # no bos_token in tokenizer_config: the id comes from config.json (<|endoftext|>), as llama.cpp's Qwen2 GGUFs
    assert fields["tokenizer.ggml.bos_token_id"] == endoftext
    assert fields["tokenizer.chat_template"] == QWEN2_CHAT_TEMPLATE

    assert fields["qwen2.context_length"] == cfg["max_position_embeddings"] == 256
    assert fields["qwen2.embedding_length"] == cfg["hidden_size"]
    assert fields["qwen2.block_count"] == cfg["num_hidden_layers"]
    assert fields["qwen2.feed_forward_length"] == cfg["intermediate_size"]
    assert fields["qwen2.attention.head_count"] == cfg["num_attention_heads"]
    assert fields["qwen2.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields["qwen2.rope.freq_base"] == theta
    assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)


# ---- metadata llama.cpp keys on: general.name, add_bos / add_eos ---------------------------------------------

def test_general_name_comes_from_the_model_not_the_folder(tmp_path):
    """The folder is named like a Phi-3 run; the GGUF's name must not be the folder's, and must not carry "phi3"
    for a vocabulary without the four tokens llama.cpp's Phi-3 rule looks up (else: unordered_map::at at load)."""
    from fasttune.export.gguf_writer import gguf_name, model_name

    d = _model_dir(tmp_path, "phi3")
    d = d.rename(tmp_path / "my-phi3-finetune")
    model = load_model(d)
    result = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=d, quant="f32")
    fields, _ = _read(tmp_path / "m.gguf")
    name = fields["general.name"]
    assert name != d.name and "phi3" not in name.lower() and "phi-3" not in name.lower(), name
    assert name == gguf_name(model_name(model.spec), fields["tokenizer.ggml.tokens"])[0]
    assert any("general.name" in n and "unk" in n for n in result.notes), result.notes

    # a Hub id in config.json names the model; a path there does not
    spec = model.spec
    spec.raw_config["_name_or_path"] = "microsoft/Phi-3-mini-4k-instruct"
    assert model_name(spec) == "Phi-3-mini-4k-instruct"
    spec.raw_config["_name_or_path"] = str(d)
    assert model_name(spec) == "Phi-3"
    spec.raw_config["_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_name(spec) == "Qwen2.5-0.5B-Instruct"
    # a real Phi-3 vocabulary keeps its name (llama.cpp's Phi-3 whitespace rule is meant for it)
    full = ["<unk>", "<s>", "</s>", "<|endoftext|>", "a"]
    assert gguf_name("Phi-3-mini-4k-instruct", full) == ("Phi-3-mini-4k-instruct", None)
    safe, note = gguf_name("Phi-3-mini-4k-instruct", full[1:])
    assert safe == "Phi 3-mini-4k-instruct" and "<unk>" in note
    assert gguf_name("Llama-3.2-1B", ["a"]) == ("Llama-3.2-1B", None)


def _set_post_processor(d: Path, single: list) -> None:
    tj = json.loads((d / "tokenizer.json").read_text())
    procs = [p for p in tj["post_processor"]["processors"] if p["type"] != "TemplateProcessing"]
    if single:
        procs.append({"type": "TemplateProcessing", "single": single, "pair": single + [{"Sequence": {"id": "B",
                      "type_id": 0}}], "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in
                                                          (("<|begin_of_text|>", 0), ("<|end_of_text|>", 1))}})
    tj["post_processor"]["processors"] = procs
    (d / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("bos,eos", [(True, False), (False, False), (False, True), (True, True)])
def test_add_bos_eos_as_the_hf_tokenizer_encodes(tmp_path, bos, eos):
    from fasttune.models.checkpoint import load_tokenizer

    d = _model_dir(tmp_path, "llama")
    a = [{"Sequence": {"id": "A", "type_id": 0}}]
    _set_post_processor(d, ([{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}] if bos else []) + a +
                        ([{"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}}] if eos else []))
    tok = load_tokenizer(d)
    ids = tok("hello", add_special_tokens=True)["input_ids"]
    assert (ids[0] == tok.bos_token_id, ids[-1] == tok.eos_token_id) == (bos, eos)  # the setup itself
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="f32")
    fields, _ = _read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.add_bos_token"] is bos
    assert fields["tokenizer.ggml.add_eos_token"] is eos


def test_gemma2_without_soft_capping_is_refused_not_a_struct_error(tmp_path):
    """llama.cpp's gemma2 loader would put its default caps in place of missing ones: refuse with the reason."""
    from fasttune.export.gguf_writer import GGUFExportError

    d = _model_dir(tmp_path, "gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)
    with pytest.raises(GGUFExportError, match="soft-capping"):
        export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="f32", chat_template=TEMPLATE)
