"""GGUF export, written in-process with the `gguf` package (no llama.cpp build), following llama.cpp's
convert_hf_to_gguf.py conventions:

- tensor names from `gguf.get_tensor_name_map` (token_embd, blk.N.attn_q, ..., output_norm, output);
- Llama / Mistral: q_proj and k_proj rows are permuted from Hugging Face's "rotate halves" RoPE layout to
  llama.cpp's interleaved pairs:  W.reshape(heads, 2, d/2, in).swapaxes(1, 2)  (Qwen, Gemma, Phi-3 use NEOX RoPE
  in llama.cpp and are written as they are);
- Gemma / Gemma 2 / Gemma 3: RMSNorm weights (q/k norms included) are stored as (1 + w), llama.cpp applies them
  as plain multipliers;
- Gemma 3: llama.cpp fixes the layer pattern (5 sliding : 1 global), the local RoPE base (10000, unscaled) and
  the attention scale (head_dim^-1/2; hidden / heads on the 62-layer 27B) instead of reading them: a model that
  differs is refused, as is a final logit soft-cap; a linear RoPE scaling of the global layers is written;
- Granite: its four multipliers as general scale keys (embedding, residual, attention, logit);
- SmolLM3: llama.cpp skips RoPE on every fourth layer (fixed), so another NoPE pattern is refused;
- OLMo 2: q/k norms over the whole projection and post-norms map onto llama.cpp's olmo2 tensors as they are;
- Phi-3: q/k/v and gate/up written fused (attn_qkv, ffn_up) as its checkpoints are;
- 1-D tensors (norms, biases) always F32; a 2-D tensor whose rows do not split into the quant's blocks falls back
  to F16; Llama-3 RoPE scaling becomes a `rope_freqs` tensor, Phi-3 LongRoPE `rope_factors_long/short`.

K-quant presets (q4_k_m, q5_k_m, q6_k, q3_k_m, q2_k) write llama.cpp's per-tensor type mix, as `llama-quantize`
chooses it (llama_tensor_get_type in src/llama-quant.cpp, without an importance matrix): output.weight (and a tied
token_embd) Q6_K; attn_v (Phi-3: attn_qkv) and ffn_down one or two steps up on some layers (`use_more_bits`: the
first and last eighth and every third layer between); attn_output up for q3_k_m/q2_k; then, for a row length that
is not a multiple of 256, llama.cpp's fallbacks (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and
F16 when not a multiple of 32 either). The K blocks come from gguf_quants.py (bit-exact with llama.cpp's reference
quantiser); the 32-value fallbacks from the `gguf` package. The legacy types (q8_0, q4_0, ...) stay "pure": every
2-D tensor in the one type.

Metadata llama.cpp keys on: `general.name` comes from the model's own metadata (config.json `_name_or_path`, or the
architecture), not the folder name, because llama.cpp's vocabulary loader switches on it (a name containing "phi3"
or "phi-3" makes it look up <unk>, <s>, </s> and <|endoftext|>, and a missing one aborts the load).
`tokenizer.ggml.add_bos_token` / `add_eos_token` are written as the Hugging Face tokenizer behaves when it encodes
text (llama.cpp's default without them differs by vocabulary type).

The file is written in two passes so only one merged tensor is in memory at a time: tensor infos first (their sizes
follow from shape and type), then each tensor merged, converted and appended.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
import torch.nn as nn

from ..models.checkpoint import FUSED_PARTS, save_tokenizer
from . import gguf_quants
from .merged import DEQUANTISED_NOTE, ExportResult, has_nf4, iter_merged_tensors

T = gguf.GGMLQuantizationType
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
             "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
             "phi3": gguf.MODEL_ARCH.PHI3, "gemma3_text": gguf.MODEL_ARCH.GEMMA3, "olmo2": gguf.MODEL_ARCH.OLMO2,
             "granite": gguf.MODEL_ARCH.GRANITE, "smollm3": gguf.MODEL_ARCH.SMOLLM3}
QUANT_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
               "q5_0": T.Q5_0, "q5_1": T.Q5_1}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}
# K-quant presets: the ggml type most tensors get, and the file type llama.cpp records for the mix
K_PRESETS = {"q4_k_m": (T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M), "q5_k_m": (T.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
             "q6_k": (T.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K), "q3_k_m": (T.Q3_K, gguf.LlamaFileType.MOSTLY_Q3_K_M),
             "q2_k": (T.Q2_K, gguf.LlamaFileType.MOSTLY_Q2_K)}
QUANT_TYPES.update({k: v[0] for k, v in K_PRESETS.items()})
FILE_TYPES.update({k: v[1] for k, v in K_PRESETS.items()})
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
# llama.cpp's tensor_type_fallback: a row length that is not a multiple of 256 takes a 32-value type
_K_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# llama.cpp runs these with its "normal" (interleaved-pair) RoPE, so convert_hf_to_gguf permutes their q/k rows;
# the other families use its NEOX RoPE (Hugging Face's rotate-halves layout) and are written as they are
PERMUTED_ROPE = ("llama", "mistral", "granite", "smollm3")
# families whose llama.cpp loader requires output.weight even when the embeddings are tied (OLMo 2)
_OUTPUT_REQUIRED = ("olmo2",)
# substrings of general.name that change llama.cpp's vocabulary loading (llama-vocab.cpp), and the tokens that the
# "phi-3" rule looks up (a missing one is a load error: unordered_map::at)
_NAME_TRIGGERS = ("phi-3", "phi3")
_PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")

# llama.cpp's pre-tokenizer names for the byte-level BPE split regexes we can recognise in tokenizer.json
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


class GGUFExportError(ValueError):
    pass


def permute_for_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q/k (per head: first half, second half) -> interleaved pairs, as convert_hf_to_gguf's permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Phi-3's fused modules under their parent module (their parts: models.checkpoint.FUSED_PARTS, the one list)
_FUSED_MODULES = {("self_attn." if fused == "qkv_proj" else "mlp.") + fused: parts
                  for fused, parts in FUSED_PARTS.items()}


def _fused_plan(model: nn.Module, items: list) -> list:
    """Phi-3: concatenate q/k/v and gate/up back into the fused tensors llama.cpp's phi3 graph expects."""
    by_name = {n: (fn, shape) for n, fn, shape in items}
    out = []
    for name, fn, shape in items:
        for fused, parts in _FUSED_MODULES.items():
            group, _, leaf = fused.rpartition(".")
            m = re.fullmatch(rf"(model\.layers\.\d+\.{group}\.)(\w+)\.(weight|bias)", name)
            if m and m.group(2) in parts:
                if m.group(2) != parts[0]:
                    break  # emitted with the first part
                names = [m.group(1) + p + "." + m.group(3) for p in parts]
                fns = [by_name[n][0] for n in names]
                rows = sum(by_name[n][1][0] for n in names)
                out.append((m.group(1) + leaf + "." + m.group(3), lambda fns=fns: torch.cat([f() for f in fns], 0),
                            (rows, *shape[1:])))
                break
        else:
            out.append((name, fn, shape))
    return out


def _tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: T) -> T:
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32
    if qtype in (T.F32, T.F16, T.BF16):
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else T.F16


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def k_quant_types(names_shapes: list[tuple[str, tuple[int, ...]]], spec, preset: str) -> dict[str, T]:
    """llama.cpp's type for each tensor of a K-quant preset (llama_tensor_get_type, no imatrix, dense models).

    `names_shapes`: (gguf name, numpy-order shape). Tensors are visited in llama.cpp's order (by layer, then name),
    which is what its attn_v counter counts in."""
    default, _ = K_PRESETS[preset]
    n_gqa = spec.num_heads // spec.num_kv_heads
    # llama.cpp calls an 80-layer Llama with grouped-query attention (and an 80-layer Qwen2) "70B" and gives its
    # attn_v more bits
    is_70b = spec.num_layers == 80 and (spec.model_type == "qwen2" or (
        spec.model_type in ("llama", "mistral") and spec.num_heads != spec.num_kv_heads))
    names = {n for n, _ in names_shapes}
    tied = "output.weight" not in names
    n_attn_v = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n)
    n_layer = spec.num_layers
    i_attn_v = 0
    out = {}
    for name, shape in sorted(names_shapes, key=lambda ns: (_layer_of(ns[0]), ns[0])):
        if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
            out[name] = T.F32
            continue
        ncols = shape[-1]
        t = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            t = T.Q8_0 if ncols % gguf.GGML_QUANT_SIZES[default][0] else T.Q6_K
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name or "attn_qkv.weight" in name:
            if preset == "q2_k":
                t = T.Q4_K if n_gqa >= 4 else T.Q3_K
            elif preset == "q3_k_m":
                t = T.Q5_K if i_attn_v < 2 else T.Q4_K
            elif preset in ("q4_k_m", "q5_k_m") and _use_more_bits(i_attn_v, n_attn_v):
                t = T.Q6_K
            if is_70b and t in (T.Q3_K, T.Q4_K):
                t = T.Q5_K
            i_attn_v += 1
        elif "ffn_down" in name:
            i = _layer_of(name)
            if preset == "q2_k":
                t = T.Q3_K
            elif preset == "q3_k_m":
                t = T.Q5_K if i < n_layer // 16 else T.Q4_K
            elif preset in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n_layer):
                t = T.Q6_K
        elif "attn_output.weight" in name:
            if preset == "q2_k":
                t = T.Q3_K
            elif preset == "q3_k_m":
                t = T.Q4_K
        if t in _K_FALLBACK and ncols % gguf_quants.QK_K:
            t = _K_FALLBACK[t]
        if ncols % gguf.GGML_QUANT_SIZES[t][0]:
            t = T.F16  # llama.cpp: "must use F16 due to unusual shape" (and it refuses a Q8_0 output outright)
        out[name] = t
    return out


def _to_gguf_array(t: torch.Tensor, qtype: T) -> np.ndarray:
    data = t.float().contiguous().numpy()
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype in K_TYPES:
        return gguf_quants.quantize(data, qtype.name)
    return gguf.quants.quantize(data, qtype)


def dequantize_gguf_tensor(t) -> np.ndarray:
    """A gguf.GGUFReader tensor as float32 (rows, cols), K-quants through fasttune's own dequantiser."""
    shape = [int(x) for x in reversed(t.shape)]
    qt = T(t.tensor_type)
    if qt == T.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif qt == T.F16:
        arr = np.asarray(t.data).astype(np.float32)
    elif qt in K_TYPES:
        arr = gguf_quants.dequantize(np.asarray(t.data), qt.name)
    else:
        arr = gguf.quants.dequantize(np.asarray(t.data), qt)
    return arr.reshape(shape)


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


# ---- tokenizer -------------------------------------------------------------------------------------------------

def _does_look_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<") and token.endswith(">")
                                                                  and len(token) > 2 and " " not in token) \
        or (token.startswith("[") and token.endswith("]") and token[1:-1].isupper())


def _add_bpe_vocab(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int, tokenizer=None) -> list[str]:
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer.json model type {model.get('type')!r} is not BPE and there is no "
                              "tokenizer.model: this tokenizer cannot be written to GGUF")
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            a = added[i]
            tokens.append(a["content"])
            types.append(gguf.TokenType.CONTROL if a.get("special") or _does_look_special(a["content"])
                         else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    if max(list(reverse) + list(added), default=0) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids >= the model's vocab_size {vocab_size}")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(_running_tokenizer_json(tokenizer) or tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    return tokens


def _running_tokenizer_json(tokenizer) -> dict | None:
    """The tokenizer.json that transformers actually runs, which can differ from the file: transformers 5 picks the
    class from config.json's model_type (a `qwen2` folder loads as Qwen2Tokenizer) and that class sets its own
    pre-tokenizer. The GGUF's pre-tokenizer must split text as the model was trained."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        return json.loads(backend.to_str()) if backend is not None else None
    except Exception:  # noqa: BLE001 - fall back to the file
        return None


def _pre_tokenizer_name(tj: dict) -> str:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for s in steps:
        pattern = (s.get("pattern") or {}).get("Regex")
        if pattern in _PRE_TOKENIZERS:
            return _PRE_TOKENIZERS[pattern]
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"
    return "default"


def _add_sentencepiece_vocab(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int) -> list[str]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(tok_dir / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
    cfg_file = tok_dir / "tokenizer_config.json"
    decoder = json.loads(cfg_file.read_text()).get("added_tokens_decoder", {}) if cfg_file.exists() else {}
    for sid, data in decoder.items():  # tokens added on top of the SentencePiece model (as llama.cpp's converter)
        i = int(sid)
        if i >= vocab_size:
            continue
        text = data["content"]
        if data.get("special") or _does_look_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = text.encode("utf-8")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    return [t.decode("utf-8", errors="replace") for t in tokens]


def hf_adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether the Hugging Face tokenizer puts BOS in front of / EOS after encoded text (add_special_tokens=True),
    found by encoding, since the flags live in different places per tokenizer (tokenizer_config.json keys, the
    tokenizer.json post-processor, the tokenizer class)."""
    text = "Hello world"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


def _add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, spec, chat_template: str | None,
                   add_bos_eos: tuple[bool, bool] | None, tokenizer=None) -> list[str]:
    use_spm = (tok_dir / "tokenizer.model").exists()
    if use_spm:
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            use_spm = False
    if use_spm:
        tokens = _add_sentencepiece_vocab(w, tok_dir, spec.vocab_size)
    elif (tok_dir / "tokenizer.json").exists():
        tokens = _add_bpe_vocab(w, tok_dir, spec.vocab_size, tokenizer)
    else:
        raise GGUFExportError(f"no tokenizer.json or tokenizer.model in {tok_dir} (install sentencepiece for "
                              "tokenizer.model)")
    special = gguf.SpecialVocab(tok_dir, load_merges=not use_spm, n_vocab=spec.vocab_size)
    if chat_template is not None:
        special.chat_template = chat_template
    if add_bos_eos is not None:  # what the tokenizer does, not gguf's reading of its config files
        special.add_special_token["bos"], special.add_special_token["eos"] = add_bos_eos
    special.add_to_gguf(w, quiet=True)
    if spec.model_type in ("gemma", "gemma2", "gemma3_text"):
        w.add_add_space_prefix(False)
    return tokens


_ARCH_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
               "gemma2": "Gemma 2", "phi3": "Phi-3", "gemma3_text": "Gemma 3", "olmo2": "OLMo 2",
               "granite": "Granite", "smollm3": "SmolLM3"}


def model_name(spec) -> str:
    """The model's name from its own metadata: config.json's `_name_or_path` when it is a Hub id ("org/Name" ->
    "Name"), else the architecture. A local path there (or the folder's name) says where a copy was saved, not what
    the model is, and llama.cpp reads meaning into the name (see gguf_name)."""
    raw = str(spec.raw_config.get("_name_or_path") or "").strip()
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*", raw)
    if hub_id and not raw.startswith(".") and not Path(raw).exists():
        return raw.rpartition("/")[2]
    return _ARCH_NAMES.get(spec.model_type, spec.model_type)


def gguf_name(name: str, tokens: list[str]) -> tuple[str, str | None]:
    """`general.name` safe for llama.cpp's loader: its "phi-3"/"phi3" rule looks up <unk>, <s>, </s> and
    <|endoftext|> and aborts the load when one is missing, so a name with those letters is only kept for a vocabulary
    that has all four (a real Phi-3 tokenizer, which that rule is for). Returns (name, note or None)."""
    if not any(t in name.lower() for t in _NAME_TRIGGERS):
        return name, None
    vocab = set(tokens)
    missing = [t for t in _PHI3_NAME_TOKENS if t not in vocab]
    if not missing:
        return name, None
    safe = re.sub(r"(?i)phi-?3", "Phi 3", name)
    return safe, (f"general.name {name!r} written as {safe!r}: llama.cpp treats a name containing 'phi3'/'phi-3' as "
                  f"Phi-3's vocabulary and fails to load without {', '.join(missing)}")


# ---- hyper-parameters ------------------------------------------------------------------------------------------

def _add_hparams(w: gguf.GGUFWriter, spec, file_type: int) -> list[str]:
    notes = []
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_freq_base(spec.rope.theta)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    rot = int(spec.head_dim * spec.rope.partial_rotary_factor)
    w.add_rope_dimension_count(rot)
    w.add_file_type(file_type)
    if spec.model_type in ("llama", "mistral", "granite", "smollm3"):
        w.add_vocab_size(spec.vocab_size)
    notes += _add_family_hparams(w, spec)
    if spec.model_type == "gemma2":
        if spec.attn_softcap is None or spec.final_softcap is None or spec.sliding_window is None:
            # llama.cpp's gemma2 loader falls back to its own defaults (caps 50 / 30, window 4096) when a key is
            # missing, which would silently change this model's math
            raise GGUFExportError("this Gemma 2 model has no attention/final logit soft-capping or no sliding "
                                  "window; llama.cpp's gemma2 loader would use its defaults instead: export "
                                  "--format merged instead")
        w.add_attn_logit_softcapping(spec.attn_softcap)
        w.add_final_logit_softcapping(spec.final_softcap)
        w.add_sliding_window(spec.sliding_window)
        if spec.attn_scale is not None and not math.isclose(spec.attn_scale, spec.head_dim ** -0.5):
            notes.append("Gemma 2 query_pre_attn_scalar != head_dim: llama.cpp picks the attention scale from the "
                         "model size, check it matches for this model")
    if spec.sliding_window and spec.model_type not in ("gemma2", "phi3", "gemma3_text"):
        # llama.cpp's converter drops Mistral's (and Qwen2's) window too; say so rather than let outputs differ quietly
        notes.append(f"sliding-window attention ({spec.sliding_window} tokens) has no GGUF key for "
                     f"{spec.model_type}: llama.cpp attends to the whole context, so outputs differ from this model's "
                     f"beyond {spec.sliding_window} tokens")
    if spec.model_type == "phi3":
        w.add_rope_scaling_orig_ctx_len(spec.rope.original_max_position_embeddings or spec.max_position_embeddings)
        w.add_sliding_window(spec.sliding_window or 0)
    kind = spec.rope.kind
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope.factor)
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(spec.rope.factor)
        w.add_rope_scaling_orig_ctx_len(spec.rope.original_max_position_embeddings)
    elif kind == "longrope" and spec.model_type == "phi3":  # Phi-3.5 / Phi-4-mini (factors: _extra_tensors)
        orig = spec.rope.original_max_position_embeddings
        scale = spec.max_position_embeddings / orig
        attn = spec.rope.attention_factor
        if attn is None:
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        w.add_rope_scaling_attn_factors(attn)
    elif kind == "dynamic":
        notes.append("dynamic NTK RoPE scaling has no llama.cpp equivalent: the GGUF uses plain RoPE")
    elif kind not in ("default", "llama3"):
        raise GGUFExportError(f"RoPE scaling {kind!r} on {spec.model_type} cannot be expressed in GGUF")
    return notes


def gemma3_llama_cpp_attn_scale(spec) -> float:
    """The attention scale llama.cpp's gemma3 loader sets (it reads no key): by the model's size, from the layer
    count, hidden / heads for the 62-layer 27B and head_dim for every other."""
    width = spec.hidden_size // spec.num_heads if spec.num_layers == 62 else spec.head_dim
    return width ** -0.5


def _llama_cpp_fixed_settings(spec) -> str | None:
    """Why llama.cpp would run another model than `spec` (it fixes, instead of reading, settings this model sets
    otherwise), or None. Gemma 3: the 5 sliding : 1 global pattern, the local RoPE (base 10000, unscaled), the
    attention scale, no final soft-cap. SmolLM3: no RoPE on every fourth layer."""
    mt = spec.model_type
    problems = []
    if mt == "gemma3_text":
        pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(spec.num_layers)]
        if spec.sliding_window is None or spec.layer_types != pattern:
            problems.append("its layers are not 5 sliding-window : 1 global (llama.cpp's fixed pattern)")
        local = spec.local_rope
        if local is None or local.theta != 10000.0 or local.kind != "default":
            problems.append("its sliding layers' RoPE is not base 10000 unscaled (llama.cpp's fixed local RoPE)")
        want = gemma3_llama_cpp_attn_scale(spec)
        if spec.attn_scale is not None and not math.isclose(spec.attn_scale, want, rel_tol=1e-6):
            problems.append(f"its query_pre_attn_scalar gives the attention scale {spec.attn_scale:.6g}, llama.cpp "
                            f"uses {want:.6g} for this size")
        if spec.final_softcap is not None:
            problems.append("it soft-caps the final logits, which llama.cpp's gemma3 graph does not")
    if mt == "smollm3" and spec.rope_layers and \
            list(spec.rope_layers) != [(i + 1) % 4 != 0 for i in range(spec.num_layers)]:
        problems.append("its RoPE-free layers are not every fourth layer, the pattern llama.cpp's smollm3 graph "
                        "fixes")
    if not problems:
        return None
    return (f"this {_ARCH_NAMES.get(mt, mt)} model cannot be written as a llama.cpp GGUF: " + "; ".join(problems)
            + ". Export --format merged instead")


def _add_family_hparams(w: gguf.GGUFWriter, spec) -> list[str]:
    """Keys of Gemma 3 and Granite (what check_gguf_supported refuses never gets here)."""
    if spec.model_type == "gemma3_text":
        w.add_sliding_window(spec.sliding_window)
    elif spec.model_type == "granite":
        w.add_embedding_scale(spec.embedding_multiplier or 1.0)
        w.add_residual_scale(spec.residual_scale or 1.0)
        w.add_attention_scale(spec.attn_scale if spec.attn_scale is not None else spec.head_dim ** -0.5)
        w.add_logit_scale(spec.logits_scaling or 1.0)
    return []


def _extra_tensors(spec) -> list[tuple[str, torch.Tensor]]:
    """RoPE frequency factors llama.cpp reads as tensors (as convert_hf_to_gguf's generate_extra_tensors)."""
    r = spec.rope
    if r.kind == "llama3":
        dim = int(spec.head_dim * r.partial_rotary_factor)
        freqs = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        old = r.original_max_position_embeddings or 8192
        low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
        factors = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(r.factor)
            else:
                smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
                factors.append(1 / ((1 - smooth) / r.factor + smooth))
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", torch.tensor(factors))]
    if r.kind == "longrope" and r.long_factor is not None:
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", torch.tensor(r.long_factor)),
                (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", torch.tensor(r.short_factor))]
    return []


# ---- export ----------------------------------------------------------------------------------------------------

def check_gguf_supported(spec) -> None:
    """Refuse, before any work, a family this writer has no llama.cpp layout for: its quirks would be dropped
    silently and llama.cpp would run a different model. (Settings of a supported family that llama.cpp cannot
    express are refused when the hyper-parameters are written, with the reason.)"""
    if spec.model_type not in GGUF_ARCH:
        raise GGUFExportError(
            f"GGUF export of {spec.model_type} models is not supported (fasttune writes GGUF for "
            f"{', '.join(GGUF_ARCH)}): export with --format merged and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py")
    problem = _llama_cpp_fixed_settings(spec)
    if problem:
        raise GGUFExportError(problem)


def gguf_tensor_plan(model: nn.Module, quant: str = "q8_0") -> list[tuple[str, Callable[[], torch.Tensor], tuple, T]]:
    """(gguf name, thunk -> float32 tensor in llama.cpp's layout, torch shape, ggml type) for every tensor."""
    spec = model.spec
    check_gguf_supported(spec)
    if quant not in QUANT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    qtype = QUANT_TYPES[quant]
    arch = GGUF_ARCH[spec.model_type]
    name_map = gguf.get_tensor_name_map(arch, spec.num_layers)
    items = list(iter_merged_tensors(model))
    if spec.fused_checkpoint:
        items = _fused_plan(model, items)
    plan = []
    for hf_name, fn, shape in items:
        new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(f"no GGUF name for tensor {hf_name!r} of a {spec.model_type} model")
        if spec.model_type in PERMUTED_ROPE and re.search(r"self_attn\.(q|k)_proj\.(weight|bias)$", hf_name):
            heads = spec.num_heads if ".q_proj." in hf_name else spec.num_kv_heads
            fn = (lambda fn=fn, h=heads: permute_for_llama_cpp(fn(), h))
        if spec.norm_unit_offset and hf_name.endswith("norm.weight"):
            fn = (lambda fn=fn: fn() + 1.0)
        plan.append((new, fn, shape, _tensor_type(new, shape, qtype)))
    if spec.tie_word_embeddings and spec.model_type in _OUTPUT_REQUIRED:
        embed = next(p for p in plan if p[0] == "token_embd.weight")
        plan.append(("output.weight", embed[1], embed[2], _tensor_type("output.weight", embed[2], qtype)))
    for name, t in _extra_tensors(spec):
        plan.append((name, (lambda t=t: t.float()), tuple(t.shape), T.F32))
    if quant in K_PRESETS:
        types = k_quant_types([(n, shape) for n, _, shape, _ in plan], spec, quant)
        plan = [(n, fn, shape, types[n]) for n, fn, shape, _ in plan]
    return plan


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                tokenizer=None, quant: str = "q8_0", chat_template: str | None = None, name: str | None = None,
                progress: Callable[[str], None] | None = None, perplexity: bool | None = None,
                perplexity_tokens: int = 2048) -> ExportResult:
    """Write one .gguf file: llama.cpp metadata, tokenizer, chat template and the merged weights as `quant`.

    The tokenizer comes from `tokenizer_dir` (a folder with tokenizer.json / tokenizer.model and
    tokenizer_config.json) or is saved from a transformers `tokenizer` first. `chat_template` (Jinja source)
    overrides the tokenizer's own. `name` (general.name) defaults to model_name(spec).

    `perplexity`: measure the quantisation's cost on the bundled corpus (fasttune's forward pass, float32, with the
    weights read back from the written file) and report it in the notes; None = for quantised types when the model
    has at most 1.5B parameters (a CPU forward over `perplexity_tokens` tokens stays quick)."""
    path = Path(path)
    spec = model.spec
    result = ExportResult()
    if has_nf4(model):
        result.notes.append(DEQUANTISED_NOTE)
    plan = gguf_tensor_plan(model, quant)
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_dir is None:
            if tokenizer is None:
                raise GGUFExportError("GGUF needs the tokenizer: pass tokenizer_dir= or tokenizer=")
            save_tokenizer(tokenizer, tmp)
            tokenizer_dir = tmp
        tok_dir = Path(tokenizer_dir)
        if tokenizer is None:
            from ..models.checkpoint import load_tokenizer
            try:
                tokenizer = load_tokenizer(tok_dir)
            except Exception as e:  # noqa: BLE001 - the GGUF can still be written; say what is unknown
                result.notes.append(f"could not load the tokenizer with transformers ({e}); add_bos_token / "
                                    "add_eos_token are written as its config files say")
        add_bos_eos = hf_adds_bos_eos(tokenizer) if tokenizer is not None else None
        w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[GGUF_ARCH[spec.model_type]])
        result.notes += _add_hparams(w, spec, FILE_TYPES[quant])
        if quant not in ("f32", "f16", "bf16"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens = _add_tokenizer(w, tok_dir, spec, chat_template, add_bos_eos, tokenizer)
        safe_name, note = gguf_name(name or model_name(spec), tokens)
        w.add_name(safe_name)
        if note:
            result.notes.append(note)
        for gname, _, shape, qt in plan:
            gguf_shape = shape  # numpy row-major shape; the writer reverses it into ggml's order
            w.add_tensor_info(gname, gguf_shape, np.dtype(np.float32), _nbytes(shape, qt), raw_dtype=qt)
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        try:
            for gname, fn, shape, qt in plan:
                data = _to_gguf_array(fn(), qt)
                if tuple(data.shape[:-1]) != tuple(shape[:-1]):
                    raise GGUFExportError(f"{gname}: converted shape {data.shape} does not match {shape}")
                w.write_tensor_data(data)
                if progress is not None:
                    progress(gname)
        finally:
            w.close()
    result.files = [path]
    if quant in K_PRESETS:
        counts: dict[str, int] = {}
        for _, _, shape, qt in plan:
            if len(shape) > 1:
                counts[qt.name] = counts.get(qt.name, 0) + 1
        result.notes.append(f"{quant.upper()} type mix (llama.cpp's preset): "
                            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " tensors")
    quantised = quant not in ("f32", "f16", "bf16")
    n_params = sum(math.prod(shape) for _, _, shape, _ in plan)
    if perplexity is None:
        perplexity = quantised and n_params <= 1.5e9
        if quantised and not perplexity:
            result.notes.append(f"perplexity before/after quantisation not measured ({n_params / 1e9:.1f}B "
                                "parameters); call fasttune.export.gguf_writer.gguf_perplexity(model, path, tokenizer)")
    if perplexity:
        if tokenizer is None:
            result.notes.append("perplexity not measured: no transformers tokenizer")
        else:
            before, after, n = gguf_perplexity(model, path, tokenizer, max_tokens=perplexity_tokens)
            result.perplexity = (before, after)
            result.notes.append(f"perplexity on the bundled corpus ({n} tokens): {before:.4f} before, {after:.4f} "
                                f"after {quant} ({(after / before - 1) * 100:+.2f}%), fasttune's forward pass with "
                                "the weights read back from the written file")
    return result


# ---- reading back ----------------------------------------------------------------------------------------------

def read_gguf_weights(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D weights of a GGUF written by export_gguf for `model`, dequantised (K-quants by fasttune's own
    dequantiser) and mapped back to the model's names and layout: q/k rows un-permuted, Phi-3's fused qkv and
    gate_up split. Both are row operations and every block lies within one row, so each weight read back equals
    the dequantisation of that weight quantised on its own. 1-D tensors (norms, biases; F32) are not read."""
    spec = model.spec
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    name_map = gguf.get_tensor_name_map(GGUF_ARCH[spec.model_type], spec.num_layers)
    shapes = {n: shape for n, _, shape in iter_merged_tensors(model)}
    cache: dict[str, np.ndarray] = {}
    out = {}
    for hf_name, shape in shapes.items():
        if len(shape) < 2:
            continue
        source, row0 = hf_name, 0
        m = re.fullmatch(r"(model\.layers\.\d+\.)(self_attn|mlp)\.(\w+)\.weight", hf_name)
        if spec.fused_checkpoint and m:
            for fused, parts in _FUSED_MODULES.items():
                if fused.startswith(m.group(2)) and m.group(3) in parts:
                    source = f"{m.group(1)}{fused}.weight"
                    for p in parts[:parts.index(m.group(3))]:
                        row0 += shapes[f"{m.group(1)}{m.group(2)}.{p}.weight"][0]
        gname = name_map.get_name(source, try_suffixes=(".weight", ".bias"))
        if gname not in tensors:
            raise GGUFExportError(f"{path} has no tensor {gname} (for {hf_name})")
        if gname not in cache:
            cache = {gname: dequantize_gguf_tensor(tensors[gname])}  # a fused tensor serves its parts in turn
        w = torch.from_numpy(np.ascontiguousarray(cache[gname][row0:row0 + shape[0]]))
        if spec.model_type in PERMUTED_ROPE and re.search(r"self_attn\.(q|k)_proj\.weight$", hf_name):
            heads = spec.num_heads if ".q_proj." in hf_name else spec.num_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        out[hf_name] = w
    return out


def _corpus_ids(tokenizer, max_tokens: int) -> torch.Tensor:
    text = (Path(__file__).resolve().parent.parent / "assets" / "data" / "corpus.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: max_tokens * 16], add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def _perplexity(model: nn.Module, ids: torch.Tensor, window: int, bos: int | None) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos]), chunk[: window - 1]])
        if chunk.numel() < 2:
            break
        x = chunk[None]
        loss = model(x, labels=x).loss.item()
        nll += loss * (x.shape[1] - 1)
        count += x.shape[1] - 1
    return math.exp(nll / count)


def gguf_perplexity(model: nn.Module, path: str | os.PathLike, tokenizer, max_tokens: int = 2048,
                    window: int = 512) -> tuple[float, float, int]:
    """(perplexity of the merged float32 model, perplexity with the GGUF's weights, tokens) on the bundled corpus,
    in windows of `window` tokens (BOS first where the tokenizer adds one), both with fasttune's own forward pass.
    The GGUF's 1-D tensors are F32 copies of the model's, so only the 2-D weights are swapped in."""
    from ..models.decoder import CausalLM

    spec = model.spec
    plain = CausalLM(spec).float().eval()
    params = dict(plain.named_parameters(remove_duplicate=False))
    for name, fn, _ in iter_merged_tensors(model):
        params[name].data.copy_(fn().cpu())
    plain.tie_weights()
    ids = _corpus_ids(tokenizer, max_tokens)
    window = min(window, spec.max_position_embeddings)
    bos = tokenizer.bos_token_id if hf_adds_bos_eos(tokenizer)[0] else None
    before = _perplexity(plain, ids, window, bos)
    for name, w in read_gguf_weights(path, model).items():
        params[name].data.copy_(w)
    plain.tie_weights()
    after = _perplexity(plain, ids, window, bos)
    return before, after, int(ids.numel())
