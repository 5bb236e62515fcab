"""GGUF files (llama.cpp / Ollama) as model input: the inverse of `fasttune.export.gguf_writer`.

    f = read_gguf("model.gguf")           # header, metadata, tensor infos; tensor data stays memory-mapped
    spec = gguf_arch_spec(f)              # ArchSpec from the `{arch}.*` metadata and the tensor inventory
    for name, t in iter_gguf_tensors(f, spec): ...   # fasttune / Hugging Face names, float32, dequantised
    tok = gguf_tokenizer(f)               # transformers fast tokenizer from the `tokenizer.*` metadata

What is undone on the way in (see gguf_writer for the way out):
- llama.cpp's tensor names (token_embd, blk.N.attn_q, ..., output_norm, output) -> Hugging Face names;
- Llama-architecture q/k rows: convert_hf_to_gguf interleaves each head's two RoPE halves (pairs 0,d/2 | 1,d/2+1
  ...) for llama.cpp's "normal" RoPE; fasttune rotates halves, so rows go back with the inverse permutation;
- Gemma RMSNorm weights are stored as (1 + w) and come back as w;
- Llama-3 RoPE scaling is stored as a `rope_freqs` tensor only; its parameters are recovered (Llama 3.1's
  low/high frequency factors and 8192 original context) and checked against the stored factors.

The file format (little-endian): "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata count; metadata as
(string key, u32 type, value) where strings are u64 length + UTF-8 and arrays are u32 element type + u64 count +
elements; tensor infos as (string name, u32 n_dims, u64 dims innermost first, u32 ggml type, u64 offset); then
tensor data from the next multiple of `general.alignment` (default 32), each tensor at its offset.
"""
from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..kernels.gguf_dequant import UnsupportedQuantError, dequantize, quant_format
from .spec import SUPPORTED_MODEL_TYPES, ArchSpec, UnsupportedModelError


class GGUFError(ValueError):
    pass


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file starting with the GGUF magic (a folder never is)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


# ---- parsing ---------------------------------------------------------------------------------------------------

_STRUCTS = {k: struct.Struct(v) for k, v in {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                                              10: "<Q", 11: "<q", 12: "<d"}.items()}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): ggml's dims reversed
    type_id: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return quant_format(self.type_id).name
        except UnsupportedQuantError:
            return f"ggml type {self.type_id}"


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    _data: np.ndarray = field(repr=False)  # the whole file, memory-mapped (uint8)

    @property
    def arch(self) -> str:
        return self.metadata.get("general.architecture", "")

    def get(self, key: str, default: Any = None) -> Any:
        """`{arch}.`-prefixed key when it starts with '.', else the key as given."""
        return self.metadata.get(self.arch + key if key.startswith(".") else key, default)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's stored bytes, uint8, backed by the memory map (no copy)."""
        t = self.tensors[name]
        return torch.from_numpy(self._data[t.offset:t.offset + t.nbytes])

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor dequantised to float32."""
        t = self.tensors[name]
        try:
            return dequantize(self.raw(name), t.type_id, t.shape)
        except UnsupportedQuantError as e:
            raise GGUFError(f"{self.path}: tensor {name!r} is stored as {e}") from None


class _Cursor:
    """Reads the header through struct on a memoryview of the mapped file (numpy slicing per field is ~10x slower
    for the ~100k strings of a tokenizer)."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.mv, self.size, self.pos, self.path, self.what = memoryview(buf), len(buf), 0, path, "the header"

    def _need(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path} is truncated: {self.what} needs bytes {self.pos}..{self.pos + n} but the "
                            f"file has {self.size}; download it again")
        start = self.pos
        self.pos += n
        return start

    def take(self, n: int) -> bytes:
        start = self._need(n)
        return bytes(self.mv[start:start + n])

    def scalar(self, vtype: int):
        st = _STRUCTS[vtype]
        return st.unpack_from(self.mv, self._need(st.size))[0]

    def string(self) -> str:
        return self.take(self.scalar(10)).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype in _STRUCTS:
            return self.scalar(vtype)
        if vtype == 9:
            etype, count = self.scalar(4), self.scalar(10)
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype in _NP:
                return np.frombuffer(self.take(count * np.dtype(_NP[etype]).itemsize), dtype=_NP[etype]).tolist()
            if etype == 9:
                return [self.value(9) for _ in range(count)]
            raise GGUFError(f"{self.path}: {self.what} is an array of unknown value type {etype}; the file is "
                            "corrupt or from a newer GGUF version")
        raise GGUFError(f"{self.path}: {self.what} has unknown value type {vtype}; the file is corrupt or from a "
                        "newer GGUF version")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor infos; tensor data is memory-mapped, read on demand."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    # copy-on-write map: torch wants writable arrays; nothing is ever written back to the file
    data = np.memmap(path, dtype=np.uint8, mode="c") if path.stat().st_size else np.zeros(0, np.uint8)
    c = _Cursor(data, path)
    magic = c.take(4) if len(data) >= 4 else data.tobytes()
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    version = c.scalar(4)
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are); re-convert it with a "
                        "current llama.cpp")
    n_tensors, n_kv = c.scalar(10), c.scalar(10)
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        c.what = f"metadata entry {i}"
        key = c.string()
        c.what = f"metadata key {key!r}"
        metadata[key] = c.value(c.scalar(4))
    infos = []
    for i in range(n_tensors):
        c.what = f"tensor info {i}"
        name = c.string()
        c.what = f"tensor info of {name!r}"
        n_dims = c.scalar(4)
        if n_dims > 8:
            raise GGUFError(f"{path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        dims = [c.scalar(10) for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), c.scalar(4), c.scalar(10)))
    align = int(metadata.get("general.alignment", 32))
    start = (c.pos + align - 1) // align * align
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, type_id, offset in infos:
        n = math.prod(shape)
        try:
            fmt = quant_format(type_id)
        except UnsupportedQuantError as e:
            raise GGUFError(f"{path}: tensor {name!r} is stored as {e}") from None
        if n % fmt.block_size:
            raise GGUFError(f"{path}: tensor {name!r} of shape {shape} is not a whole number of {fmt.name} blocks "
                            f"({fmt.block_size} values)")
        size = n // fmt.block_size * fmt.type_size
        if start + offset + size > len(data):
            raise GGUFError(f"{path} is truncated: tensor {name!r} ({fmt.name}, shape {shape}) needs bytes "
                            f"{start + offset}..{start + offset + size} but the file has {len(data)}; download it "
                            "again")
        tensors[name] = GGUFTensorInfo(name, shape, type_id, start + offset, size)
    return GGUFFile(path, version, metadata, tensors, data)


# ---- architecture ----------------------------------------------------------------------------------------------

GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
              "phi3": "phi3"}  # GGUF general.architecture -> fasttune model_type (Mistral files say "llama")
_HPARAM_KEYS = (".embedding_length", ".feed_forward_length", ".block_count", ".attention.head_count",
                ".attention.head_count_kv", ".attention.key_length", ".vocab_size")


def _require(f: GGUFFile, key: str) -> Any:
    v = f.get(key)
    if v is None:
        raise GGUFError(f"{f.path}: metadata key {f.arch + key if key.startswith('.') else key!r} is missing; "
                        "the file cannot be read without it")
    return v


def gguf_config(f: GGUFFile) -> dict[str, Any]:
    """A transformers-style config dict (what config.json would say) from the file's metadata and tensors."""
    arch = f.arch
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(
            f"{f.path}: GGUF architecture {arch!r} (general.architecture) is not supported; supported: "
            f"{', '.join(GGUF_ARCHS)} (fasttune model types {', '.join(SUPPORTED_MODEL_TYPES)})")
    mt = GGUF_ARCHS[arch]
    hidden = int(_require(f, ".embedding_length"))
    heads = int(_require(f, ".attention.head_count"))
    kv = f.get(".attention.head_count_kv", heads)
    if isinstance(kv, list):
        raise GGUFError(f"{f.path}: {arch}.attention.head_count_kv varies per layer; fasttune needs one value")
    head_dim = int(f.get(".attention.key_length") or hidden // heads)
    emb = f.tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{f.path}: no token_embd.weight tensor; this is not a complete {arch} model")
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    vocab = int(f.get(".vocab_size") or emb.shape[0])
    eos = f.metadata.get("tokenizer.ggml.eos_token_id")
    cfg: dict[str, Any] = {
        "model_type": mt,
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                           "phi3": "Phi3ForCausalLM"}[mt]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_require(f, ".feed_forward_length")),
        "num_hidden_layers": int(_require(f, ".block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": head_dim,
        "max_position_embeddings": int(f.get(".context_length", 4096)),
        "rms_norm_eps": float(f.get(".attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(f.get(".rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "hidden_act": "gelu_pytorch_tanh" if mt in ("gemma", "gemma2") else "silu",
        "bos_token_id": f.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": f.metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",  # dequantised values are exact in float32 only
    }
    if tokens is not None and len(tokens) > vocab:
        raise GGUFError(f"{f.path}: tokenizer.ggml.tokens has {len(tokens)} entries but the model's vocabulary is "
                        f"{vocab} ({arch}.vocab_size / token_embd.weight); the file is inconsistent")
    rot = f.get(".rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        cfg["partial_rotary_factor"] = int(rot) / head_dim
    biased = "blk.0.attn_q.bias" in f.tensors
    cfg["attention_bias"] = biased and mt != "qwen2"
    cfg["mlp_bias"] = "blk.0.ffn_up.bias" in f.tensors
    if mt == "gemma2":
        cfg["attn_logit_softcapping"] = f.get(".attn_logit_softcapping")
        cfg["final_logit_softcapping"] = f.get(".final_logit_softcapping")
        cfg["sliding_window"] = f.get(".attention.sliding_window")
        cfg["query_pre_attn_scalar"] = head_dim  # not in GGUF; llama.cpp uses head_dim for Gemma 2 2B/9B
    if mt == "phi3":
        window = f.get(".attention.sliding_window")
        cfg["sliding_window"] = window or None
        orig = f.get(".rope.scaling.original_context_length")
        if orig:
            cfg["original_max_position_embeddings"] = int(orig)
    cfg.update(_rope_scaling(f, cfg))
    return cfg


def _rope_scaling(f: GGUFFile, cfg: dict[str, Any]) -> dict[str, Any]:
    kind = f.get(".rope.scaling.type")
    factor = f.get(".rope.scaling.factor")
    orig = f.get(".rope.scaling.original_context_length")
    if "rope_freqs.weight" in f.tensors:
        return {"rope_scaling": _llama3_rope(f, cfg)}
    if "rope_factors_long.weight" in f.tensors:
        long_f = f.tensor("rope_factors_long.weight").tolist()
        short_f = f.tensor("rope_factors_short.weight").tolist()
        scaling = {"rope_type": "longrope", "long_factor": long_f, "short_factor": short_f}
        attn = f.get(".rope.scaling.attn_factor")
        if attn is not None:
            scaling["attention_factor"] = float(attn)
        return {"rope_scaling": scaling}
    if kind in (None, "none") or (factor in (None, 0.0, 1.0) and kind != "yarn"):
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": float(factor)}}
    if kind == "yarn":
        return {"rope_scaling": {"rope_type": "yarn", "factor": float(factor),
                                 "original_max_position_embeddings": int(orig or cfg["max_position_embeddings"])}}
    raise UnsupportedModelError(f"{f.path}: {f.arch}.rope.scaling.type {kind!r} is not supported (linear, yarn, "
                                "Llama-3 rope_freqs, Phi-3 LongRoPE factors)")


def _llama3_rope(f: GGUFFile, cfg: dict[str, Any]) -> dict[str, Any]:
    """Llama 3.1-style scaling from the stored per-frequency factors: factor = the largest one, the rest as
    Llama 3.1/3.2 release them; refused if the regenerated factors do not match the stored ones."""
    stored = f.tensor("rope_freqs.weight").double()
    dim = int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 1.0))
    theta, factor, low, high, old = cfg["rope_theta"], float(stored.max()), 1.0, 4.0, 8192
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    rebuilt = torch.where(wavelen < old / high, torch.ones_like(freqs),
                          torch.where(wavelen > old / low, torch.full_like(freqs, factor),
                                      1 / ((1 - smooth) / factor + smooth)))
    if stored.shape != rebuilt.shape or not torch.allclose(stored, rebuilt, rtol=1e-5, atol=1e-6):
        raise UnsupportedModelError(f"{f.path}: rope_freqs.weight is not Llama 3.1-style RoPE scaling (factor "
                                    f"{factor}, low/high frequency factors 1/4, original context 8192); fasttune "
                                    "cannot reproduce it")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old}


def gguf_arch_spec(f: GGUFFile) -> ArchSpec:
    return ArchSpec.from_hf_config(gguf_config(f))


# ---- tensors ---------------------------------------------------------------------------------------------------

_LAYER_NAMES = {  # llama.cpp block tensor -> Hugging Face module under model.layers.N
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GEMMA2_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_PERMUTED_ARCHS = ("llama",)  # convert_hf_to_gguf permutes q/k only where llama.cpp applies "normal" RoPE


def hf_name(gguf_name: str, model_type: str) -> str | None:
    """The Hugging Face checkpoint name of a GGUF tensor (Phi-3's fused names as its checkpoints spell them)."""
    base, dot, leaf = gguf_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{leaf}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m is None:
        return None
    table = {**_LAYER_NAMES, **_GEMMA2_NORMS} if model_type == "gemma2" else _LAYER_NAMES
    module = table.get(m.group(2))
    if module is None:
        return None
    if model_type == "phi3" and m.group(2) == "ffn_up":
        module = "mlp.gate_up_proj"  # Phi-3's ffn_up holds gate and up fused, gate first
    return f"model.layers.{m.group(1)}.{module}.{leaf}"


def unpermute_from_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's q/k permute: per head, interleaved RoPE pairs -> first half, second half."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint-name -> shape for every tensor a model of `spec` stores (Phi-3 fused)."""
    from .decoder import CausalLM

    with torch.device("meta"):
        model = CausalLM(spec)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    if spec.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    if spec.fused_checkpoint:
        for n in [n for n in shapes if n.endswith("self_attn.q_proj.weight")]:
            base = n[: -len("q_proj.weight")]
            q, k, v = (shapes.pop(base + p + "_proj.weight") for p in "qkv")
            shapes[base + "qkv_proj.weight"] = (q[0] + k[0] + v[0], q[1])
        for n in [n for n in shapes if n.endswith("mlp.gate_proj.weight")]:
            base = n[: -len("gate_proj.weight")]
            g, u = shapes.pop(base + "gate_proj.weight"), shapes.pop(base + "up_proj.weight")
            shapes[base + "gate_up_proj.weight"] = (g[0] + u[0], g[1])
    return shapes


def check_tensors(f: GGUFFile, spec: ArchSpec) -> dict[str, str]:
    """GGUF name -> checkpoint name for every tensor, after checking names and shapes against the metadata."""
    shapes = expected_shapes(spec)
    keys = ", ".join(f"{f.arch}{k}={f.get(k)}" for k in _HPARAM_KEYS if f.get(k) is not None)
    names: dict[str, str] = {}
    for gname, info in f.tensors.items():
        if gname in _ROPE_TENSORS:
            continue  # read into the config by gguf_config
        name = hf_name(gname, spec.model_type)
        if name is None or name not in shapes:
            raise GGUFError(f"{f.path}: tensor {gname!r} has no place in a {spec.model_type} model as fasttune "
                            "builds it (an unsupported variant of the architecture?)")
        if tuple(info.shape) != shapes[name]:
            raise GGUFError(f"{f.path}: tensor {gname!r} ({name}) has shape {tuple(info.shape)} but the metadata "
                            f"({keys}) implies {shapes[name]}; the file's metadata and tensors disagree")
        names[gname] = name
    missing = sorted(set(shapes) - set(names.values()))
    if missing:
        raise GGUFError(f"{f.path} is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
    return names


def iter_gguf_tensors(f: GGUFFile, spec: ArchSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, float32 tensor) for each model tensor, dequantised one at a time, in the Hugging Face
    layout (q/k unpermuted, Gemma norms as w)."""
    for gname, name in check_tensors(f, spec).items():
        yield name, hf_layout(f, spec, name, f.tensor(gname))


def hf_layout(f: GGUFFile, spec: ArchSpec, name: str, t: torch.Tensor) -> torch.Tensor:
    """Tensor `name` as read from the file -> the Hugging Face layout. A permutation of rows only (q/k) or an
    offset on norms, so it applies equally to a linear weight's raw block rows, (out_features, row bytes)."""
    if f.arch in _PERMUTED_ARCHS and re.search(r"self_attn\.(q|k)_proj\.(weight|bias)$", name):
        t = unpermute_from_llama_cpp(t, spec.num_heads if ".q_proj." in name else spec.num_kv_heads)
    if spec.norm_unit_offset and name.endswith("norm.weight"):
        t = t - 1.0
    return t


# ---- tokenizer -------------------------------------------------------------------------------------------------

# ggml token types (llama.h): which ids are plain text, control (special), user-defined (added), byte pieces
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre (llama.cpp's name for the split rules the merges were learned with) -> split regex;
# "digits" = GPT-2's byte-level split after isolating each digit (SmolLM's tokenizer.json)
_PRE_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
               "deepseek-r1-qwen": _QWEN2_SPLIT, "smollm": "digits", "starcoder": "digits",
               "refact": "digits", "gpt-2": None, "default": None}


def _sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a normal (or user-defined) token into
    two vocabulary pieces, ranked by the merged token's score (higher first), ties by the pieces' ids, as
    transformers' extractor. Control, byte and unused tokens are never merge results: SentencePiece does not
    produce them from text."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, t in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or vocab[t] != i:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                found.append((-scores[i], vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for _, _, _, a, b in found]


def _build_backend(f: GGUFFile):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    md = f.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{f.path}: no tokenizer in the file (tokenizer.ggml.tokens is missing); load the "
                        "tokenizer from the original model folder instead")
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{f.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    if kind == "gpt2":
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise GGUFError(f"{f.path}: a byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2') without "
                            "tokenizer.ggml.merges cannot be rebuilt")
        vocab = {t: i for i, t in enumerate(tokens)}
        # merges are "a b" with both parts in the byte alphabet (which has no plain space)
        tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
        pre = md.get("tokenizer.ggml.pre", "default")
        split = _PRE_SPLITS.get(pre)
        if split == "digits":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
        elif split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:  # GPT-2's own split (also the fallback for split rules not known here)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise GGUFError(f"{f.path}: a SentencePiece tokenizer (tokenizer.ggml.model 'llama') without "
                            "tokenizer.ggml.scores cannot be rebuilt")
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = _sentencepiece_merges(tokens, scores, types)
        unk = tokens[unk_id] if unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        # spaces -> U+2581, and the dummy prefix only at the start of the text, not after a special or user-defined
        # token inside it (as sentencepiece and llama.cpp); split=False: merges see the whole fragment
        prefix = md.get("tokenizer.ggml.add_space_prefix", True)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else
                                                     "never", split=False)
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if md.get("tokenizer.ggml.add_space_prefix", True):
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    else:
        raise GGUFError(f"{f.path}: tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2' (byte-level "
                        "BPE) and 'llama' (SentencePiece)")
    # control tokens are special (never split, skipped on decode); user-defined ones are matched whole
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tok, tokens


def gguf_tokenizer(f: GGUFFile):
    """A transformers fast tokenizer from the file's tokenizer metadata: vocabulary, merges (or SentencePiece
    scores), token types, special ids, add_bos/add_eos and the chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend, tokens = _build_backend(f)
    md = f.metadata
    kind = md.get("tokenizer.ggml.model")
    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            if not 0 <= i < len(tokens):
                raise GGUFError(f"{f.path}: tokenizer.ggml.{key}_token_id = {i} is outside the vocabulary "
                                f"(0..{len(tokens) - 1})")
            special[name] = tokens[i]
    # llama.cpp's defaults when the file does not say: BOS for SentencePiece vocabularies, never EOS
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and name not in special:
            raise GGUFError(f"{f.path}: tokenizer.ggml.add_{name[:3]}_token is set but there is no "
                            f"tokenizer.ggml.{name[:3]}_token_id")
    if add_bos or add_eos:
        bos, eos = special.get("bos_token"), special.get("eos_token")
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos
                                                                                        else []))
        ids = {t: tokens.index(t) for t in (bos if add_bos else None, eos if add_eos else None) if t is not None}
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                               special_tokens=list(ids.items()))
    elif kind == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(special)
    template = md.get("tokenizer.chat_template")
    if template is not None:
        kwargs["chat_template"] = template
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                  model_max_length=int(f.get(".context_length", 1 << 30)), **kwargs)
    tok.name_or_path = str(f.path)
    return tok


# ---- entry points used by models.checkpoint ---------------------------------------------------------------------

def load_gguf_spec(path: str | os.PathLike) -> ArchSpec:
    return gguf_arch_spec(read_gguf(path))


def load_gguf_tokenizer(path: str | os.PathLike):
    return gguf_tokenizer(read_gguf(path))


def gguf_to_hf_folder(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      ) -> Path:
    """Write the GGUF as a Hugging Face folder (config.json, model.safetensors dequantised to `dtype`, tokenizer
    files): for tools that read only folders."""
    import json

    from safetensors.torch import save_file

    f = read_gguf(path)
    cfg = gguf_config(f)
    spec = ArchSpec.from_hf_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {n: t.to(dtype).contiguous() for n, t in iter_gguf_tensors(f, spec)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg["torch_dtype"] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    gguf_tokenizer(f).save_pretrained(str(out))
    return out
