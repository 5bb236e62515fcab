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
- Quantised files (F16, Q8_0, Q4_K_M), matmul by matmul inside llama.cpp (its graph callback hands over each
  matmul's float32 input and output): every output equals fasttune's dequantisation of the weight times that input
  rounded as ggml converts it for the weight's type (float16, Q8_0 blocks of 32, Q8_K blocks of 256) to <= 6.7e-7,
  all 12 families.
- Q8_0 / Q4_K_M logits, against fasttune's forward pass with the file's own weights dequantised by fasttune:
  1.9e-3 to 3.1e-2 (Q8_0) and 2.5e-3 to 3.6e-2 (Q4_K_M), against 3.1e-3 to 4.0e-2 and 1.4e-2 to 0.43 to the
  unquantised model. The gap is llama.cpp's 8-bit activations: the same rounding emulated in fasttune's forward pass
  makes a gap of the same size (ratio 0.95 to 1.02, max |.|; 0.99 to 1.01, mean |.|). Gemma 3's Q8_0 gap, the
  largest (3.1e-2), is its emulated gap too (3.1e-2; 1.2e-2 with the MLP silenced). Logit by logit the two do not
  agree everywhere: a rounding at a k + 1/2 boundary may go either way in float32 and changes later roundings, so
  1 to 32 of the 32 positions match to float32 rounding on the 2-layer models, and with Q8_0 none on Gemma 3 or on
  a 6-layer Llama.
- The new families (2-layer, Gemma 3 six layers for its 5:1 pattern; SmolLM3 four, so one layer is RoPE-free;
  Phi-4-mini's phi3 shape: partial rotary 0.75, long-RoPE, tied), F32: OLMo 2 1.1e-6, Granite 3.9e-7 (all four
  multipliers != 1), SmolLM3 6.9e-7, Phi-4-mini 6.9e-7; Gemma 3 4.7e-4 (GELU table; 1.6e-4 emulated, 5.7e-7 with
  the MLP silenced: its local/global RoPE, window, q/k norms, (1 + w) norms and attention scale are right).
  With the released checkpoints' RoPE (global: base 1e6, linear scaling 8; sliding: base 1e4) over 64 tokens,
  llama.cpp vs transformers: F32 7.3e-7 with the MLP silenced (4.7e-4 with it), F16 7.4e-4 (1.6e-3); the same
  weights with the global layers unscaled, the sliding layers scaled too or on the global base: 0.11, 0.32, 0.15.
- SmolLM2-135M-Instruct exported as F32: 2.4e-6 over the chat prompt, the same 16 greedy tokens; the released Q4_1
  file itself: 6.9e-2 (8-bit activations again), and its first answer token, a near tie in fasttune ("The" 25.33,
  "L" 25.24), comes out the other way in llama.cpp.
"""
from __future__ import annotations

import ctypes
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
from fasttune.export.gguf_writer import dequantize_gguf_tensor, export_gguf, read_gguf_weights  # noqa: E402
from fasttune.export.merged import iter_merged_tensors  # noqa: E402
from fasttune.models import load_model  # noqa: E402
from fasttune.models.checkpoint import load_tokenizer  # noqa: E402
from test_export_common import FP16_TOL, randomize_lora, save_tiny_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = Path(fasttune.__file__).parent / "assets" / "tiny"
TINY_VOCAB = 4013
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gemma3_text", "olmo2", "granite",
            "smollm3", "phi4mini"]
GELU_FAMILIES = ("gemma", "gemma2", "gemma3_text")
# hidden 256 so K-quant blocks (256 values) fit the rows; head_dim 64 for every family (and Gemma 2's
# query_pre_attn_scalar with it, as Gemma 2 9B: llama.cpp takes the attention scale from head_dim)
SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, max_position_embeddings=128)
GEMMA2 = dict(query_pre_attn_scalar=64)
N_CTX = 64
N_TOKENS = 32
F32_TOL = 1e-5  # measured <= 8.3e-7 (see the module docstring)
F32_TOL_GELU = 1e-3  # Gemma, Gemma 2, Gemma 3: llama.cpp's float16 GELU table; measured 3.0e-5, 3.2e-4, 4.7e-4
# Quantised files: llama.cpp's gap to fasttune (same dequantised weights, float32 activations) over the gap that
# emulating llama.cpp's 8-bit activations makes in fasttune itself, max |.| and mean |.| over every logit; measured
# 0.950 to 1.021 (max) and 0.991 to 1.011 (mean) over the 12 families x Q8_0 / Q4_K_M; the ratio for the unquantised
# model instead (max |.|): 1.26 (Gemma 3 Q8_0) to 12.0
ACT_GAP_BAND = (0.9, 1.1)
ACT_GAP_BAND_MEAN = (0.95, 1.05)
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
    save_tiny_hf(d, family, vocab_size=TINY_VOCAB, **SHAPE, **(GEMMA2 if family in ("gemma2", "gemma3_text") else {}))
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


def _round_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """x as ggml's CPU backend converts a matmul's input to `kind` (_VEC_DOT; None: used as it is, float32)."""
    if kind == "f16":
        return x.half().float()
    if kind in ("q8_0", "q8_1"):
        return _q8(x, 32)
    if kind == "q8_k":
        return _q8_k(x)
    return x


def _activation_types(model, path) -> dict:
    """weight data_ptr -> the activation format llama.cpp uses with that weight's type in the file."""
    spec = model.spec
    from fasttune.export.gguf_writer import GGUF_ARCH

    arch = GGUF_ARCH[spec.model_type]
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
            return linear(_round_activations(x, types.get(w.data_ptr())), w, b)

        F.linear = emulated
        return self

    def __exit__(self, *exc):
        F.linear = self._linear


class _GgmlTensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64 bytes, GGML_MAX_SRC 10, GGML_MAX_NAME 64),
    as llama.cpp's graph callback hands it over. _llama_cpp_matmuls checks the layout against ggml's own accessors
    (name, element count, data pointer) on every tensor it reads."""


_GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GgmlTensor) * 10), ("view_src", ctypes.POINTER(_GgmlTensor)),
    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for fn, res, args in (("ggml_op_name", ctypes.c_char_p, [ctypes.c_int]),
                          ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
                          ("ggml_nelements", ctypes.c_int64, [ctypes.c_void_p]),
                          ("ggml_get_data", ctypes.c_void_p, [ctypes.c_void_p])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


def _f32_array(lib, ptr) -> np.ndarray:
    """A float32 ggml tensor (any strides) copied into numpy, in ggml's reversed dimension order."""
    t = ctypes.cast(ptr, ctypes.POINTER(_GgmlTensor)).contents
    ne, nb = list(t.ne), list(t.nb)
    assert (lib.ggml_get_name(ptr), lib.ggml_nelements(ptr), lib.ggml_get_data(ptr)) == \
        (t.name, int(np.prod(ne)), t.data), "ggml_tensor layout differs from _GgmlTensor"
    assert t.type == 0, f"{t.name} is not float32"
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
    buf = (ctypes.c_char * span).from_address(t.data)
    return np.ndarray(ne[::-1], np.float32, buf, strides=nb[::-1]).copy()


def _llama_cpp_matmuls(path: Path, ids: list[int], n_ctx: int = N_CTX) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(weight name, input (tokens, in), output (tokens, out)) of every matmul with a model weight that llama.cpp's
    CPU backend computes for `ids` in one batch, read in its graph-evaluation callback: the float32 activations exactly
    as llama.cpp has them, before it converts them for the weight's type."""
    from llama_cpp import _internals

    lib, out, errors = _ggml_base(), [], []

    def callback(ptr, ask, _user_data):
        try:
            t = ctypes.cast(ptr, ctypes.POINTER(_GgmlTensor)).contents
            wanted = (lib.ggml_op_name(t.op) == b"MUL_MAT" and bool(t.src[0])
                      and t.src[0].contents.name.endswith(b".weight"))
            if ask or not wanted:
                return wanted if ask else True  # True after computing: go on with the graph
            x = _f32_array(lib, ctypes.cast(t.src[1], ctypes.c_void_p))
            y = _f32_array(lib, ptr)
            out.append((t.src[0].contents.name.decode(), x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])))
            return True
        except BaseException as e:  # noqa: BLE001 - raised after decode: an exception cannot cross into C
            errors.append(e)
            return False  # stops the graph

    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)  # kept alive until the context is closed
    model = _internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                  verbose=False)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = getattr(llama_cpp, "GGML_TYPE_F32", 0)
    cp.flash_attn = False
    cp.cb_eval = cb
    ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
    try:
        batch.set_batch(ids, n_past=0, logits_all=True)
        ctx.decode(batch)
    finally:
        batch.close()
        ctx.close()
        model.close()
    if errors:
        raise errors[0]
    return out


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


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_matmul_is_the_dequantised_weight_times_the_rounded_activations(exported, family, quant):
    """Inside llama.cpp, matmul by matmul: its output for our file equals fasttune's dequantisation of the weight
    times llama.cpp's own input, rounded as ggml converts it for the weight's type (float16; Q8_0 blocks of 32 for
    Q8_0 / Q5_0; Q8_K blocks of 256 for K-quants), to float32 rounding. Both sides start from the same input, so no
    rounding can come out the other way: this pins every weight's blocks (scales, packing, row order, q/k
    permutation, Phi-3's fused tensors) and the activation format exactly, for every family, where the end-to-end
    logits can only bound them (next test). Every 2-D tensor of the file takes part."""
    model, path, d = exported(family, quant)
    ids = _tokens(load_tokenizer(d))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    matmuls = _llama_cpp_matmuls(path, ids)
    two_d = {n for n, t in tensors.items() if len(t.shape) == 2}
    looked_up = {"token_embd.weight"} if "output.weight" in tensors else set()  # get_rows, no matmul
    assert {name for name, _, _ in matmuls} == two_d - looked_up
    worst, worst_name = 0.0, None
    for name, x, y in matmuls:
        t = tensors[name]
        w = torch.from_numpy(np.array(dequantize_gguf_tensor(t))).double()
        xr = _round_activations(torch.from_numpy(x), _VEC_DOT.get(T(t.tensor_type))).double()
        rel = _rel(y.astype(np.float64), (xr @ w.T).numpy())
        if rel > worst:
            worst, worst_name = rel, name
    print(f"\n{family} {quant}: {len(matmuls)} matmuls in llama.cpp vs dequantised weight x rounded input: "
          f"max rel {worst:.3g} ({worst_name})")
    assert worst <= F32_TOL, (family, quant, worst_name, worst)


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantised_logits_differ_by_what_8bit_activations_explain(exported, family, quant):
    """End to end, llama.cpp on the quantised file against fasttune's forward pass with the same file's weights
    dequantised by fasttune (`ours`). The whole gap is llama.cpp's 8-bit rounding of each matmul's input (the test
    above: exact otherwise), so it is compared with the gap that rounding makes in fasttune itself (`emulated`, the
    same forward pass with the rounding emulated), not with a fixed tolerance: llama.cpp's gap, max and mean over
    every position and logit, must be that big, within ACT_GAP_BAND(_MEAN). Logit by logit the two do not match: a
    rounding that lands the other way (float32 summation order at a k + 1/2 boundary; in Gemma 2 / 3 a GELU input
    in another float16 bucket first) changes later roundings and, through attention, later positions, so how many
    positions match exactly depends on depth (Q8_0 on a 6-layer Llama: none, as on Gemma 3), not on the file; only
    the size of the gap is a property of the file. The band tells the file's weights from the unquantised ones:
    llama.cpp's gap to the unquantised model is outside it."""
    model, path, d = exported(family, quant)
    ids = _tokens(load_tokenizer(d))
    theirs = _llama_logits(_llama(path), ids)
    deq = _dequantised_model(model, path)
    with _GgmlGelu() if family in GELU_FAMILIES else torch.no_grad():
        ours = _fasttune_logits(deq, ids)
        with _LlamaCppActivations(deq, path):
            emulated = _fasttune_logits(deq, ids)
    explained = _rel(emulated, ours)
    ratio = _rel(theirs, ours) / explained
    ratio_mean = float(np.abs(theirs - ours).mean() / np.abs(emulated - ours).mean())
    ratio_unquantised = _rel(theirs, _fasttune_logits(model, ids)) / explained
    exact = int((np.abs(theirs - emulated).max(1) / np.abs(emulated).max() <= F32_TOL).sum())
    print(f"\n{family} {quant}: llama.cpp vs fasttune(dequantised) max rel {_rel(theirs, ours):.3g}, 8-bit "
          f"activations emulated in fasttune {explained:.3g}: ratio {ratio:.3f} (mean |.| {ratio_mean:.3f}); to the "
          f"unquantised model {ratio_unquantised:.3f}; positions matching the emulation exactly: {exact} of {len(ids)}")
    assert ACT_GAP_BAND[0] <= ratio <= ACT_GAP_BAND[1], (family, quant, ratio)
    assert ACT_GAP_BAND_MEAN[0] <= ratio_mean <= ACT_GAP_BAND_MEAN[1], (family, quant, ratio_mean)
    assert ratio_unquantised > ACT_GAP_BAND[1], (family, quant, ratio_unquantised)


# ---- Gemma 3's two RoPEs ---------------------------------------------------------------------------------------

# google/gemma-3-4b-it's text config (1b: the same without the scaling): global layers base 1e6 with linear scaling 8,
# sliding layers base 1e4 unscaled
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
ROPE_TOKENS = 64  # eight sliding windows of 8; the global layers see positions up to 63 / 8


def _gemma3_rope_dir(root: Path, rope: dict, silence_mlp: bool) -> Path:
    d = root / "gemma3"
    hf = save_tiny_hf(d, "gemma3_text", vocab_size=TINY_VOCAB, **SHAPE, **GEMMA2, rope_parameters=rope)
    assert json.loads((d / "config.json").read_text())["rope_parameters"] == rope
    if silence_mlp:  # in the checkpoint itself, so transformers runs the same model
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.mlp.up_proj.weight.zero_()
        hf.save_pretrained(d)
    for f in TINY_TOKENIZER.glob("*token*.json"):
        shutil.copy(f, d / f.name)
    return d


def _with_rope(d: Path, root: Path, rope: dict) -> Path:
    """A copy of the checkpoint `d` (same weights) whose config has `rope` instead."""
    out = root / "variant"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(d, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = rope
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@torch.no_grad()
def _transformers_logits(d: Path, ids: list[int]) -> np.ndarray:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    return hf.eval()(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("mlp", ["silenced", "on"])
def test_gemma3_scaled_global_rope_and_local_base(tmp_path, mlp):
    """Gemma 3 with the released checkpoints' two RoPEs (global: base 1e6, linear scaling 8; sliding: base 1e4,
    unscaled), a window of 8 and 64 tokens, so both kinds of layer and the scaled positions matter: llama.cpp on the
    F32 and F16 files gives transformers' logits (F32 to float32 rounding with the MLP silenced, to the float16 GELU
    table's gap with it; F16 to the float16 tolerance of the export tests). llama.cpp reads the scaling from
    gemma3.rope.scaling.type / .factor for its global layers and fixes its sliding layers at base 10000, scale 1.
    Controls: the same weights with the global layers unscaled (a file without the scaling keys), with the sliding
    layers scaled too, or with them on the global base are far from llama.cpp's logits."""
    d = _gemma3_rope_dir(tmp_path, GEMMA3_ROPE, silence_mlp=mlp == "silenced")
    ids = _tokens(load_tokenizer(d), ROPE_TOKENS)
    assert len(ids) == ROPE_TOKENS
    reference = _transformers_logits(d, ids)
    model = load_model(d).eval()
    rel_fasttune = _rel(_fasttune_logits(model, ids), reference)
    assert rel_fasttune <= F32_TOL, rel_fasttune
    f32_tol = F32_TOL if mlp == "silenced" else F32_TOL_GELU
    logits = {}
    for quant, tol in (("f32", f32_tol), ("f16", FP16_TOL)):
        path = tmp_path / f"gemma3-{quant}.gguf"
        export_gguf(model, path, tokenizer_dir=d, quant=quant, perplexity=False)
        fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
        assert (fields["gemma3.rope.scaling.type"], fields["gemma3.rope.scaling.factor"],
                fields["gemma3.rope.freq_base"], fields["gemma3.attention.sliding_window"]) == ("linear", 8.0, 1e6, 8)
        logits[quant] = _llama_logits(_llama(path, n_ctx=2 * ROPE_TOKENS), ids)
        rel = _rel(logits[quant], reference)
        print(f"\nGemma 3 real RoPE, MLP {mlp}, {quant}: llama.cpp vs transformers max rel {rel:.3g} (fasttune "
              f"vs transformers {rel_fasttune:.3g})")
        assert rel <= tol, (quant, rel)
    full, sliding = GEMMA3_ROPE["full_attention"], GEMMA3_ROPE["sliding_attention"]
    controls = {"global layers unscaled": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                           "sliding_attention": sliding},
                "sliding layers scaled too": {"full_attention": full,
                                              "sliding_attention": {**full, "rope_theta": 1e4}},
                "sliding layers on the global base": {"full_attention": full,
                                                      "sliding_attention": {**sliding, "rope_theta": 1e6}}}
    for label, rope in controls.items():
        rel = _rel(logits["f32"], _transformers_logits(_with_rope(d, tmp_path, rope), ids))
        print(f"control, {label}: llama.cpp (F32) vs transformers max rel {rel:.3g}")
        assert rel > 20 * f32_tol, (label, rel)


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
