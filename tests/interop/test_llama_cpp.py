"""fasttune's GGUF exports run through llama.cpp itself (llama-cpp-python), not only read back with `gguf`'s reader:
logits of every family and quant against fasttune's own forward pass, tokenisation, BOS presence, and a real model
(SmolLM2-135M-Instruct) that greedy-generates the same tokens in both.

Skipped, saying why, when llama-cpp-python is not installed (CI): `make interop` compiles it into the venv (about 30
minutes on 2 cores) and runs this folder.

Error measure: max |llama.cpp - fasttune| / max |fasttune| over all positions and the whole vocabulary. llama.cpp
runs with an f32 KV cache, no flash attention, every position's logits kept.

Measured with llama-cpp-python 0.3.16 (CPU, GGML_NATIVE=OFF) on 2-layer models of hidden size 256 (so that K-quant
blocks of 256 fit), 32 tokens (four Gemma 2 windows of 8):
- F32: Llama 7.3e-7, Mistral 7.3e-7, Qwen2 6.7e-7, Qwen3 8.3e-7, Phi-3 6.9e-7; Gemma 3.0e-5, Gemma 2 3.2e-4. The
  Gemma gap is llama.cpp's CPU GELU, which looks gelu(x) up in a table indexed by x rounded to float16
  (GGML_GELU_FP16 in ggml-cpu/vec.h): with that rounding emulated in fasttune's forward pass Gemma drops to 2.4e-6
  (Gemma 2 to 1.3e-4: its post-feed-forward RMSNorm rescales the MLP's output, so an activation that lands in a
  different float16 bucket weighs more), and with the MLP silenced (up_proj = 0, so no GELU) Gemma 2 matches to
  4.4e-7 and Gemma to 2.5e-7. Changing Gemma 2's soft-caps (off) or window (64) leaves the gap as it is: the
  file's soft-capping values, query_pre_attn_scalar and window are right.
- Q8_0 / Q4_K_M: against fasttune's forward pass with the file's own weights, dequantised by fasttune: 1.3e-2 to
  2.0e-2 (Q8_0) and 1.9e-2 to 2.4e-2 (Q4_K_M; Gemma 1.9e-3 / 2.5e-3), against 2.2e-2 to 3.1e-2 and 0.18 to 0.25
  to the unquantised model. What remains is llama.cpp quantising the activations to 8 bits for its quantised dot
  products (see QUANT_TOL): with that emulated in fasttune, 6 to 32 of the 32 positions match to <= 6.2e-7, the
  others off by an activation rounded the other way at a rounding boundary.
- SmolLM2-135M-Instruct exported as F32: 2.4e-6 over the chat prompt, the same 16 greedy tokens; the released Q4_1
  file itself: 6.9e-2 (8-bit activations again), and its first answer token, a near tie in fasttune ("The" 25.33,
  "L" 25.24), comes out the other way in llama.cpp.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import re

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: `make interop` compiles it into the venv (~30 minutes "
                        "on 2 cores) and runs these tests")

import fasttune  # noqa: E402
from fasttune.export.gguf_writer import export_gguf, read_gguf_weights  # noqa: E402
from fasttune.export.merged import iter_merged_tensors  # noqa: E402
from fasttune.models import load_model  # noqa: E402
from fasttune.models.checkpoint import load_tokenizer  # noqa: E402
from test_export_common import randomize_lora, save_tiny_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = Path(fasttune.__file__).parent / "assets" / "tiny"
TINY_VOCAB = 4013
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]
GELU_FAMILIES = ("gemma", "gemma2")
# hidden 256 so K-quant blocks (256 values) fit the rows; head_dim 64 for every family (and Gemma 2's
# query_pre_attn_scalar with it, as Gemma 2 9B: llama.cpp takes the attention scale from head_dim)
SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, max_position_embeddings=128)
GEMMA2 = dict(query_pre_attn_scalar=64)
N_CTX = 64
N_TOKENS = 32
F32_TOL = 1e-5  # measured <= 8.3e-7 (see the module docstring)
F32_TOL_GELU = 1e-3  # Gemma, Gemma 2: llama.cpp's float16 GELU table; measured 3.0e-5, 3.2e-4
# llama.cpp quantises activations to 8 bits (Q8_0 / Q8_K) for its quantised matmuls; fasttune multiplies the
# dequantised weights by float32 activations
QUANT_TOL = {"q8_0": 3e-2, "q4_k_m": 4e-2}  # measured <= 2.0e-2, 2.4e-2
TEXTS = ["Hello world", "Hello, world! I'm fine, you're kind and we'll see.",
         "Tabs\tand\nnew lines\r\n   spaces 12345 67.", "Ünïcödé — 中文 also works.",
         "def f(x):\n    return x ** 2  # comment", " leading space", "The quick brown fox jumps over the lazy dog."]


# ---- helpers ---------------------------------------------------------------------------------------------------

def _llama(path: Path, n_ctx: int = N_CTX) -> "llama_cpp.Llama":
    f32 = getattr(llama_cpp, "GGML_TYPE_F32", 0)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           type_k=f32, type_v=f32, flash_attn=False, n_threads=2, n_threads_batch=2, seed=0,
                           verbose=False)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@torch.no_grad()
def _fasttune_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].double().numpy()


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _model_dir(root: Path, family: str) -> Path:
    d = root / family
    save_tiny_hf(d, family, vocab_size=TINY_VOCAB, **SHAPE, **(GEMMA2 if family == "gemma2" else {}))
    for f in TINY_TOKENIZER.glob("*token*.json"):
        shutil.copy(f, d / f.name)
    return d


def _tokens(tokenizer, n: int = N_TOKENS) -> list[int]:
    """A fixed sequence: the bundled corpus as the tokenizer encodes it (BOS first where it adds one)."""
    text = (Path(fasttune.__file__).parent / "assets" / "data" / "corpus.txt").read_text(encoding="utf-8")
    return tokenizer(text[:2000])["input_ids"][:n]


def _dequantised_model(model, path: Path):
    """fasttune's decoder with the GGUF's 2-D weights, dequantised by fasttune (1-D tensors are F32 in the file)."""
    from fasttune.models.decoder import CausalLM

    plain = CausalLM(model.spec).float().eval()
    params = dict(plain.named_parameters(remove_duplicate=False))
    for name, fn, _ in iter_merged_tensors(model):
        params[name].data.copy_(fn().cpu())
    for name, w in read_gguf_weights(path, model).items():
        params[name].data.copy_(w)
    plain.tie_weights()
    return plain


def _ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (GGML_GELU_FP16): the tanh GELU of x rounded to float16, itself rounded to float16."""
    h = x.half().float()
    g = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * h * (1.0 + 0.044715 * h * h)))
    g = g.half().float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, g))


class _GgmlGelu:
    """Within the block, fasttune's gated GELU uses ggml's float16-table GELU (SiLU untouched)."""

    def __enter__(self):
        from fasttune import kernels

        self._kernels, self._glu = kernels, kernels.glu

        def glu(gate, up, activation):
            if activation in ("gelu_tanh", "gelu"):
                return _ggml_gelu(gate.float()).to(gate.dtype) * up
            return self._glu(gate, up, activation)

        kernels.glu = glu
        return self

    def __exit__(self, *exc):
        self._kernels.glu = self._glu


T = gguf.GGMLQuantizationType
# the activation format ggml's CPU backend converts a matmul's input to, per weight type (vec_dot_type)
_VEC_DOT = {T.F16: "f16", T.Q8_0: "q8_0", T.Q4_0: "q8_0", T.Q5_0: "q8_0", T.Q4_1: "q8_1", T.Q5_1: "q8_1",
            T.Q2_K: "q8_k", T.Q3_K: "q8_k", T.Q4_K: "q8_k", T.Q5_K: "q8_k", T.Q6_K: "q8_k"}


def _q8(x, block):  # quantize_row_q8_0 / q8_1: d = amax/127 kept as float16, q = round(x * 127/amax)
    b = x.reshape(*x.shape[:-1], -1, block)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv)
    return ((amax / 127.0).half().float() * q).reshape(x.shape)


def _q8_k(x):  # quantize_row_q8_K_ref: signed max, iscale = -127/max, q = min(127, round(iscale * x)), d = 1/iscale
    b = x.reshape(*x.shape[:-1], -1, 256)
    mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.round(b * iscale).clamp(max=127)
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (d * q).reshape(x.shape)


def _activation_types(model, path) -> dict:
    """weight data_ptr -> the activation format llama.cpp uses with that weight's type in the file."""
    spec = model.spec
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
            "phi3": gguf.MODEL_ARCH.PHI3}[spec.model_type]
    names = gguf.get_tensor_name_map(arch, spec.num_layers)
    types = {t.name: T(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    out = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        hf = mod_name
        if "blk.0.attn_qkv.weight" in types:  # Phi-3: q/k/v and gate/up are one tensor in the file
            hf = re.sub(r"mlp\.(gate|up)_proj$", "mlp.gate_up_proj", re.sub(r"self_attn\.[qkv]_proj$", "self_attn.qkv_proj", hf))
        g = names.get_name(hf + ".weight", try_suffixes=(".weight",))
        if g not in types and mod_name == "lm_head":
            g = "token_embd.weight"
        out[mod.weight.data_ptr()] = _VEC_DOT.get(types[g])
    return out


class _LlamaCppActivations:
    """Within the block, every matmul input is rounded as ggml's CPU backend converts it for the weight's type."""

    def __init__(self, model, path):
        self.types = _activation_types(model, path)

    def __enter__(self):
        self._linear = F.linear
        types, linear = self.types, self._linear

        def emulated(x, w, b=None):
            kind = types.get(w.data_ptr())
            if kind == "f16":
                x = x.half().float()
            elif kind in ("q8_0", "q8_1"):
                x = _q8(x, 32)
            elif kind == "q8_k":
                x = _q8_k(x)
            return linear(x, w, b)

        F.linear = emulated
        return self

    def __exit__(self, *exc):
        F.linear = self._linear


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, quant) -> (fasttune model with a random LoRA, GGUF path, model folder), built once per module."""
    root = tmp_path_factory.mktemp("interop")
    cache: dict = {}

    def get(family: str, quant: str):
        if family not in cache:
            d = _model_dir(root, family)
            model = fasttune.add_lora(load_model(d), r=4, alpha=8)
            randomize_lora(model)
            cache[family] = (model.eval(), d)
        model, d = cache[family]
        path = root / f"{family}-{quant}.gguf"
        if not path.exists():
            export_gguf(model, path, tokenizer_dir=d, quant=quant, perplexity=False)
        return model, path, d

    return get


# ---- logits ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_f32_logits_match(exported, family):
    model, path, d = exported(family, "f32")
    ids = _tokens(load_tokenizer(d))
    theirs = _llama_logits(_llama(path), ids)
    ours = _fasttune_logits(model, ids)
    rel = _rel(theirs, ours)
    print(f"\n{family} f32: llama.cpp vs fasttune max rel {rel:.3g}")
    if family in GELU_FAMILIES:
        assert rel <= F32_TOL_GELU, (family, rel)
        with _GgmlGelu():
            emulated = _fasttune_logits(model, ids)
        rel_emulated = _rel(theirs, emulated)
        print(f"{family} f32 with ggml's float16 GELU table emulated: max rel {rel_emulated:.3g}")
        assert rel_emulated < rel, (family, rel_emulated, rel)  # the table explains the gap (exactly: next test)
    else:
        assert rel <= F32_TOL, (family, rel)


@pytest.mark.parametrize("family", GELU_FAMILIES)
def test_gemma_without_gelu_matches_exactly(tmp_path, family):
    """The MLP silenced (up_proj = 0, so GELU's float16 table plays no part): everything else in the file -- Gemma 2's
    soft-caps, query_pre_attn_scalar, sliding window, (1 + w) norms, embedding scale -- gives llama.cpp the same logits
    as fasttune to float32 rounding (measured 4.4e-7 Gemma 2, 2.5e-7 Gemma)."""
    d = _model_dir(tmp_path, family)
    model = fasttune.add_lora(load_model(d), r=4, alpha=8)
    randomize_lora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.up_proj." in name:
                p.zero_()
    export_gguf(model.eval(), tmp_path / "m.gguf", tokenizer_dir=d, quant="f32", perplexity=False)
    ids = _tokens(load_tokenizer(d))
    rel = _rel(_llama_logits(_llama(tmp_path / "m.gguf"), ids), _fasttune_logits(model, ids))
    print(f"\n{family} f32, MLP silenced: max rel {rel:.3g}")
    assert rel <= F32_TOL, (family, rel)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantised_logits_match_the_dequantised_weights(exported, family, quant):
    """llama.cpp on the quantised file against fasttune's forward pass with the same file's weights dequantised by
    fasttune. With llama.cpp's 8-bit rounding of each matmul's input emulated too (Q8_0 per 32 values for Q8_0/Q5_0
    weights, Q8_K per 256 for K-quants), the logits match to float32 rounding (<= 6.2e-7) at every position except
    where an activation sits on a rounding boundary (x * 127 / amax at k + 1/2 within float32 error), which llama.cpp
    and fasttune may round either way; such a flip can reach later positions through attention. Without the
    emulation no position matches to 1e-5; with it, measured on these fixed models, 6 to 32 of the 32 positions do."""
    model, path, d = exported(family, quant)
    ids = _tokens(load_tokenizer(d))
    theirs = _llama_logits(_llama(path), ids)
    deq = _dequantised_model(model, path)
    with _GgmlGelu() if family in GELU_FAMILIES else torch.no_grad():
        ours = _fasttune_logits(deq, ids)
        with _LlamaCppActivations(deq, path):
            emulated = _fasttune_logits(deq, ids)
    rel = _rel(theirs, ours)
    rel_unquantised = _rel(theirs, _fasttune_logits(model, ids))
    per_pos = np.abs(theirs - emulated).max(1) / np.abs(emulated).max()
    exact = per_pos <= F32_TOL
    print(f"\n{family} {quant}: llama.cpp vs fasttune(dequantised) max rel {rel:.3g}; vs the unquantised model "
          f"{rel_unquantised:.3g}; with 8-bit activations emulated: {int(exact.sum())} of {len(ids)} positions match "
          f"(max {per_pos[exact].max() if exact.any() else float('nan'):.3g} there; elsewhere a rounding flip, "
          f"max {per_pos.max():.3g})")
    assert rel <= QUANT_TOL[quant], (family, quant, rel)
    assert rel < rel_unquantised, (family, quant, rel, rel_unquantised)
    assert exact.sum() >= 4, (family, quant, per_pos)


# ---- tokenisation and BOS --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma", "phi3"])
def test_tokenize_equals_the_hf_tokenizer(exported, family):
    """Byte-level BPE (the bundled tokenizer) in three architectures: llama.cpp's ids equal the HF tokenizer's, with
    and without special tokens, and BOS is added exactly when the HF tokenizer adds it."""
    _, path, d = exported(family, "f32")
    hf = load_tokenizer(d)
    llm = _llama(path)
    for text in TEXTS:
        want = hf(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text
        plain = hf(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == plain, text
        assert llm.detokenize(plain).decode() == hf.decode(plain), text
    chat = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf(chat, add_special_tokens=False)["input_ids"]


def _set_post_processor(d: Path, bos: bool) -> None:
    tj = json.loads((d / "tokenizer.json").read_text())
    procs = [p for p in tj["post_processor"]["processors"] if p["type"] != "TemplateProcessing"]
    if bos:
        single = [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        procs.append({"type": "TemplateProcessing", "single": single, "pair": single + [
            {"Sequence": {"id": "B", "type_id": 0}}], "special_tokens": {"<|begin_of_text|>": {
                "id": "<|begin_of_text|>", "ids": [0], "tokens": ["<|begin_of_text|>"]}}})
    tj["post_processor"]["processors"] = procs
    (d / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "phi3", "qwen2"])
def test_bos_exactly_when_the_hf_tokenizer_adds_it(tmp_path, family, bos):
    d = tmp_path / family
    save_tiny_hf(d, family, vocab_size=TINY_VOCAB)
    for f in TINY_TOKENIZER.glob("*token*.json"):
        shutil.copy(f, d / f.name)
    _set_post_processor(d, bos)
    hf = load_tokenizer(d)
    assert (hf("hello")["input_ids"][0] == hf.bos_token_id) == bos  # the set-up itself
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="f32", perplexity=False)
    llm = _llama(tmp_path / "m.gguf")
    assert llm._model.add_bos_token() == bos
    for text in TEXTS[:3]:
        assert llm.tokenize(text.encode(), add_bos=True) == hf(text)["input_ids"], (text, bos)


def test_qwen2_tokenizer_and_chatml_specials(tmp_path):
    """A Qwen2-style tokenizer (Qwen2's split regex, pre-tokenizer "qwen2", ChatML specials after the BPE vocabulary,
    no BOS) tokenises in llama.cpp as in transformers."""
    from test_export_gguf import QWEN2_SPECIAL, _qwen2_tokenizer

    n_tok = _qwen2_tokenizer(tmp_path / "tok")
    d = tmp_path / "qwen2"
    endoftext, im_end = n_tok - 3, n_tok - 1
    save_tiny_hf(d, "qwen2", vocab_size=n_tok + 5, bos_token_id=endoftext, eos_token_id=im_end,
                 pad_token_id=endoftext)
    for f in (tmp_path / "tok").iterdir():
        shutil.copy(f, d / f.name)
    export_gguf(load_model(d), tmp_path / "m.gguf", tokenizer_dir=d, quant="f32", perplexity=False)
    hf = load_tokenizer(d)
    llm = _llama(tmp_path / "m.gguf")
    assert not llm._model.add_bos_token()
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == hf(text)["input_ids"], text
    chat = hf.apply_chat_template([{"role": "user", "content": "Hello, world!"}], tokenize=False,
                                  add_generation_prompt=True)
    assert all(s in chat for s in QWEN2_SPECIAL[1:])
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf(chat, add_special_tokens=False)["input_ids"]


# ---- a real model ----------------------------------------------------------------------------------------------

def _smollm2() -> Path:
    from conftest import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2()
    model, tok = fasttune.load(path, device="cpu", dtype="float32")
    return path, model.eval(), tok


def _greedy_llama_cpp(llm, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    llm.reset()
    llm.eval(out)
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out[len(ids):]


def test_smollm2_export_greedy_generates_the_same_tokens(smollm2, tmp_path):
    """SmolLM2-135M-Instruct, loaded by fasttune from its Q4_1 GGUF (dequantised to float32) and exported as F32:
    llama.cpp's tokenisation of the chat prompt, its logits and its greedy continuation equal fasttune's."""
    path, model, tok = smollm2
    out = tmp_path / "smollm2-f32.gguf"
    export_gguf(model, out, tokenizer=tok, quant="f32", perplexity=False)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = _llama(out, n_ctx=256)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    rel = _rel(_llama_logits(llm, ids), _fasttune_logits(model, ids))
    print(f"\nSmolLM2 F32 export: llama.cpp vs fasttune max rel {rel:.3g} over {len(ids)} prompt tokens")
    assert rel <= 1e-4, rel
    n = 16
    ours = fasttune.generate(model, None, [ids], max_new_tokens=n, temperature=0.0, stop_token_ids=[])[0]
    theirs = _greedy_llama_cpp(llm, ids, n)
    print(f"greedy: fasttune {tok.decode(ours)!r}\n        llama.cpp {tok.decode(theirs)!r}")
    assert theirs == ours


def test_smollm2_original_file_in_both(smollm2):
    """The released Q4_1 file itself: llama.cpp and fasttune (which dequantises it) read the same model; the gap is
    llama.cpp's 8-bit activations in its Q4_1 dot products."""
    path, model, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = _llama(path, n_ctx=256)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    rel = _rel(_llama_logits(llm, ids), _fasttune_logits(model, ids))
    print(f"\nSmolLM2 Q4_1 (released file): llama.cpp vs fasttune max rel {rel:.3g}")
    assert rel <= 0.15, rel  # measured 6.9e-2
    # the first answer token is a near tie in fasttune ("The" 25.33, "L" 25.24) that llama.cpp's 8-bit activations
    # turn around ("L'Étoile..." against "The capital of France is Paris."): llama.cpp's pick is in fasttune's top 2
    first = _greedy_llama_cpp(llm, ids, 1)[0]
    assert first in np.argsort(-_fasttune_logits(model, ids)[-1])[:2].tolist(), first
