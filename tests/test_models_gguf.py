"""GGUF files as model input, on hand-built tiny files: every block format against gguf's numpy dequantiser (bit for
bit), llama.cpp's q/k permutation undone (against a known row order and against transformers' own GGUF loader), each
family read back from fasttune's GGUF export with the logits of the original, the tokenizer (byte-level BPE against
the original tokenizer.json, SentencePiece against the sentencepiece library), and bad files refused with errors
naming the file, the tensor or key, and what is supported."""
from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import fasttune
from fasttune.export.gguf_writer import export_gguf, permute_for_llama_cpp
from fasttune.kernels.gguf_dequant import FORMATS, dequantize
from fasttune.models import load_model
from fasttune.models.gguf_reader import (GGUFError, gguf_tokenizer, read_gguf, unpermute_from_llama_cpp)
from fasttune.models.spec import UnsupportedModelError
from test_export_common import rel_err, save_tiny_hf

T = gguf.GGMLQuantizationType
TINY = Path(fasttune.__file__).parent / "assets" / "tiny"
TINY_VOCAB = 4013
# the f16 fields of each block format (byte offsets), given sane values so no block decodes to inf/nan
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(fmt, rows: int, cols: int, rng) -> np.ndarray:
    """Raw bytes (rows, cols / block * type_size) of a tensor in `fmt`: every code random, scales small floats."""
    if fmt.name in ("F32", "F16", "BF16"):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        if fmt.name == "BF16":
            return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return x.astype(np.float16 if fmt.name == "F16" else np.float32).view(np.uint8)
    blocks = rng.integers(0, 256, (rows * cols // fmt.block_size, fmt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[fmt.name]:
        blocks[:, off:off + 2] = (rng.standard_normal((len(blocks), 1)) * 0.02).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _write(path: Path, arch: str = "llama", tensors=(), kv=None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype) in (kv or {}).items():
        w.add_key_value(key, value, vtype)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- block formats ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=lambda f: f.name)
def test_every_block_format_is_bit_exact_with_gguf(tmp_path, fmt):
    """Random codes and scales written to a file, read back through fasttune's parser: the float32 bits equal
    gguf.quants.dequantize's for every value (and the same on a direct call, in odd-sized chunks)."""
    rng = np.random.default_rng(fmt.type_id)
    rows, cols = 6, 2 * 256
    raw = _random_blocks(fmt, rows, cols, rng)
    path = _write(tmp_path / "q.gguf", tensors=[("t", raw, T(fmt.type_id))])
    want = gguf.quants.dequantize(raw, T(fmt.type_id)).reshape(rows, cols)
    f = read_gguf(path)
    assert f.tensors["t"].shape == (rows, cols) and f.tensors["t"].type_id == fmt.type_id
    got = f.tensor("t")
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    chunked = dequantize(torch.from_numpy(raw.reshape(-1).copy()), fmt.type_id, (rows, cols), chunk_values=768)
    np.testing.assert_array_equal(chunked.numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_quantised_real_values_round_trip(tmp_path, qtype):
    """Values quantised by gguf's own quantiser dequantise to what gguf says (bit for bit)."""
    x = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    q = gguf.quants.quantize(x, qtype)
    f = read_gguf(_write(tmp_path / "q.gguf", tensors=[("t", q, qtype)]))
    np.testing.assert_array_equal(f.tensor("t").numpy(), gguf.quants.dequantize(q, qtype))


# ---- llama.cpp's q/k permutation -------------------------------------------------------------------------------

def test_unpermute_puts_interleaved_rope_pairs_back_into_halves():
    heads, d = 3, 8
    w = torch.arange(heads * d, dtype=torch.float32)[:, None].repeat(1, 2)  # row r holds r
    cpp = permute_for_llama_cpp(w, heads)
    # llama.cpp's row i of a head is Hugging Face's row i // 2 of the first half (even i) or of the second (odd i)
    want = [h * d + i // 2 + (i % 2) * (d // 2) for h in range(heads) for i in range(d)]
    assert cpp[:, 0].long().tolist() == want
    assert torch.equal(unpermute_from_llama_cpp(cpp, heads), w)
    bias = torch.randn(heads * d)
    assert torch.equal(unpermute_from_llama_cpp(permute_for_llama_cpp(bias, heads), heads), bias)


def _tiny_dir(tmp_path, family, **overrides):
    d = tmp_path / family
    save_tiny_hf(d, family, vocab_size=TINY_VOCAB, **overrides)
    for f in TINY.glob("*token*.json"):
        shutil.copy(f, d / f.name)
    return d


def _ids():
    return torch.randint(3, TINY_VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_each_family_reads_back_from_its_f32_gguf(tmp_path, family):
    """fasttune's own F32 export read back: the same config, every weight (q/k unpermuted, Gemma's norms as w) and
    the same logits as the Hugging Face folder it came from."""
    d = _tiny_dir(tmp_path, family)
    ref = load_model(d)
    export_gguf(ref, tmp_path / "m.gguf", tokenizer_dir=d, quant="f32")
    model, tok = fasttune.load(tmp_path / "m.gguf", device="cpu")
    for field in ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "tie_word_embeddings", "qkv_bias", "qk_norm", "sliding_window",
                  "attn_softcap", "final_softcap", "activation", "fused_checkpoint"):
        want = getattr(ref.spec, field)
        if family == "mistral" and field in ("model_type", "sliding_window"):
            continue  # GGUF has no Mistral: it is a llama file (and llama.cpp keeps no window for it)
        assert getattr(model.spec, field) == want, field
    assert model.spec.rope.theta == ref.spec.rope.theta
    ref_state = ref.state_dict()
    for name, t in model.state_dict().items():
        if family in ("gemma", "gemma2") and name.endswith("norm.weight"):
            torch.testing.assert_close(t, ref_state[name], rtol=0, atol=1e-7)  # (1 + w) - 1 rounds once
        else:
            assert torch.equal(t, ref_state[name]), name
    ids = _ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref(ids).logits) <= 1e-6


def test_llama_layout_agrees_with_transformers_gguf_loader(tmp_path):
    """An independent reading of the same file: transformers' GGUF loader undoes the permutation its own way."""
    transformers = pytest.importorskip("transformers")
    d = _tiny_dir(tmp_path, "llama")
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="q8_0")
    model, _ = fasttune.load(tmp_path / "m.gguf", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) <= 1e-5


def test_model_path_in_a_train_config_takes_a_gguf(tmp_path):
    from fasttune.train.config import TrainConfig
    from fasttune.train.trainer import Trainer

    d = _tiny_dir(tmp_path, "llama")
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="q8_0")
    cfg = TrainConfig.from_dict({"model": {"path": str(tmp_path / "m.gguf"), "device": "cpu", "max_seq_length": 64},
                                 "lora": {"r": 2, "alpha": 4},
                                 "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False,
                                           "tensorboard": False, "plot": False}})
    trainer = Trainer(cfg)
    assert trainer.model.spec.num_layers == load_model(d).spec.num_layers
    assert any("lora_A" in n for n, _ in trainer.model.named_parameters())


# ---- tokenizer -------------------------------------------------------------------------------------------------

TEXTS = ["Hello world", "  two  spaces\tand a tab\n\nnew lines", "digits 1234567 and 3.14", "ünïcödé — 東京 🙂",
         "<|begin_of_text|>special<|end_of_text|> inline", "", " leading space", "trailing space "]


def test_byte_level_bpe_tokenizer_round_trip(tmp_path):
    """The GGUF's vocabulary, merges, token types and template rebuild the tokenizer it was written from."""
    from transformers import AutoTokenizer

    d = _tiny_dir(tmp_path, "llama")
    template = "{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="q8_0", chat_template=template)
    original = AutoTokenizer.from_pretrained(d)
    tok = fasttune.load_tokenizer(tmp_path / "m.gguf")
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == original(text)["input_ids"], text
        assert tok.decode(ids) == original.decode(original(text)["input_ids"]), text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    msgs = [{"role": "user", "content": "hi 42"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|begin_of_text|>user: hi 42"
    assert tok.decode(tok("<|end_of_text|>x")["input_ids"], skip_special_tokens=True) == "x"


def _sentencepiece_model(tmp_path) -> Path:
    spm = pytest.importorskip("sentencepiece")
    corpus = (Path(fasttune.__file__).parent / "assets" / "data" / "corpus.txt").read_text(encoding="utf-8")
    text = tmp_path / "corpus.txt"
    text.write_text(corpus[:200_000], encoding="utf-8")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=600, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   user_defined_symbols=["<tool>"], minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama's
    return prefix.with_suffix(".model")


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    """A llama-style vocabulary (pieces, scores, token types incl. byte pieces) written by hand: encodes as the
    sentencepiece library does, BOS added as the file says, decodes back to the text."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(_sentencepiece_model(tmp_path)))
    n = sp.vocab_size()
    types = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else
             4 if sp.IdToPiece(i) == "<tool>" else 1 for i in range(n)]
    V = gguf.GGUFValueType
    kv = {"tokenizer.ggml.model": ("llama", V.STRING),
          "tokenizer.ggml.tokens": ([sp.IdToPiece(i) for i in range(n)], V.ARRAY),
          "tokenizer.ggml.scores": ([sp.GetScore(i) for i in range(n)], V.ARRAY),
          "tokenizer.ggml.token_type": (types, V.ARRAY),
          "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32),
          "tokenizer.ggml.unknown_token_id": (0, V.UINT32)}
    tok = gguf_tokenizer(read_gguf(_write(tmp_path / "sp.gguf", kv=kv)))
    texts = ["The cat sat on the mat.", "Hello  world\nagain", "unseen glyphs: ü 東 🙂", "a<tool>b", "1234 + 5678",
             "trailing  ", "x <tool> y"]
    # not compared: text that starts with a space or a user-defined token. sentencepiece writes "▁▁x" for " x"; the tokenizers library's
    # Metaspace (and so every Hugging Face fast tokenizer of a SentencePiece model) writes "▁x"
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text  # llama.cpp's default for a SentencePiece vocabulary: BOS first
        assert tok.decode(ids, skip_special_tokens=True) == text, text
    assert tok.eos_token == "</s>" and tok.unk_token == "<unk>"


# ---- bad input -------------------------------------------------------------------------------------------------

def _tiny_gguf(tmp_path, quant="q8_0") -> Path:
    d = _tiny_dir(tmp_path, "llama")
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant=quant)
    return tmp_path / "m.gguf"


def test_unsupported_architecture_is_named(tmp_path):
    path = _write(tmp_path / "bert.gguf", arch="bert", kv={"bert.embedding_length": (8, gguf.GGUFValueType.UINT32)},
                  tensors=[("token_embd.weight", np.zeros((4, 8), np.float32), T.F32)])
    with pytest.raises(UnsupportedModelError) as e:
        fasttune.load(path, device="cpu")
    msg = str(e.value)
    assert "bert.gguf" in msg and "'bert'" in msg and "general.architecture" in msg and "qwen2" in msg


def test_unsupported_and_unknown_quant_types_are_named(tmp_path):
    iq = _write(tmp_path / "iq.gguf", tensors=[("blk.0.attn_q.weight", np.zeros((4, 18), np.uint8), T.IQ4_NL)])
    with pytest.raises(GGUFError) as e:
        read_gguf(iq)
    assert "iq.gguf" in str(e.value) and "blk.0.attn_q.weight" in str(e.value) and "IQ4_NL" in str(e.value)
    assert "Q4_K" in str(e.value)  # what is supported
    # a type id no ggml version has: patch the tensor info's type field
    path = _write(tmp_path / "x.gguf", tensors=[("blk.0.odd.weight", np.zeros((2, 32), np.float32), T.F32)])
    raw = bytearray(path.read_bytes())
    at = raw.index(b"blk.0.odd.weight") + len("blk.0.odd.weight") + 4 + 2 * 8  # name, n_dims, 2 dims
    raw[at:at + 4] = struct.pack("<I", 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match=r"x\.gguf.*blk\.0\.odd\.weight.*unknown ggml type 99.*supported: F32"):
        read_gguf(path)


def test_truncated_file_names_the_tensor_or_key(tmp_path):
    path = _tiny_gguf(tmp_path)
    full = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:-100])
    last = list(read_gguf(path).tensors)[-1]
    with pytest.raises(GGUFError, match=rf"cut\.gguf is truncated: tensor '{re.escape(last)}'"):
        fasttune.load(cut, device="cpu")
    cut.write_bytes(full[:300])  # inside the metadata
    with pytest.raises(GGUFError, match=r"cut\.gguf is truncated: metadata (key '[\w.]+'|entry \d+) needs bytes"):
        read_gguf(cut)
    cut.write_bytes(b"GGU")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        fasttune.load(cut, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        fasttune.load(tmp_path / "missing.gguf", device="cpu")


def test_metadata_that_disagrees_with_the_shapes_is_named(tmp_path):
    path = _tiny_gguf(tmp_path)
    raw = bytearray(path.read_bytes())
    key = b"llama.feed_forward_length"
    at = raw.index(key) + len(key)
    assert struct.unpack_from("<I", raw, at)[0] == gguf.GGUFValueType.UINT32
    struct.pack_into("<I", raw, at + 4, 640)  # the tiny model has 512
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError) as e:
        fasttune.load(path, device="cpu")
    msg = str(e.value)
    assert "m.gguf" in msg and "blk.0.ffn_" in msg and "llama.feed_forward_length=640" in msg and "disagree" in msg

