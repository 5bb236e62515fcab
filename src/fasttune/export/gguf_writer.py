"""GGUF export, written in-process with the `gguf` package (no llama.cpp build), following llama.cpp's
convert_hf_to_gguf.py conventions:

- tensor names from `gguf.get_tensor_name_map` (token_embd, blk.N.attn_q, ..., output_norm, output);
- Llama / Mistral: q_proj and k_proj rows are permuted from Hugging Face's "rotate halves" RoPE layout to
  llama.cpp's interleaved pairs:  W.reshape(heads, 2, d/2, in).swapaxes(1, 2)  (Qwen, Gemma, Phi-3 use NEOX RoPE
  in llama.cpp and are written as they are);
- Gemma / Gemma 2: RMSNorm weights are stored as (1 + w), llama.cpp applies them as plain multipliers;
- Phi-3: q/k/v and gate/up written fused (attn_qkv, ffn_up) as its checkpoints are;
- 1-D tensors (norms, biases) always F32; a 2-D tensor whose rows do not split into the quant's blocks falls back
  to F16; Llama-3 RoPE scaling becomes a `rope_freqs` tensor, Phi-3 LongRoPE `rope_factors_long/short`.

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

from ..models.checkpoint import save_tokenizer
from .merged import DEQUANTISED_NOTE, ExportResult, has_nf4, iter_merged_tensors

T = gguf.GGMLQuantizationType
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
             "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
             "phi3": gguf.MODEL_ARCH.PHI3}
QUANT_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
               "q5_0": T.Q5_0, "q5_1": T.Q5_1}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}
PERMUTED_ROPE = ("llama", "mistral")

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


def _fused_plan(model: nn.Module, items: list) -> list:
    """Phi-3: concatenate q/k/v and gate/up back into the fused tensors llama.cpp's phi3 graph expects."""
    by_name = {n: (fn, shape) for n, fn, shape in items}
    out = []
    for name, fn, shape in items:
        for fused, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
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


def _to_gguf_array(t: torch.Tensor, qtype: T) -> np.ndarray:
    data = t.float().contiguous().numpy()
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


# ---- tokenizer -------------------------------------------------------------------------------------------------

def _does_look_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<") and token.endswith(">")
                                                                  and len(token) > 2 and " " not in token) \
        or (token.startswith("[") and token.endswith("]") and token[1:-1].isupper())


def _add_bpe_vocab(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int) -> None:
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
    w.add_tokenizer_pre(_pre_tokenizer_name(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)


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


def _add_sentencepiece_vocab(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int) -> None:
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


def _add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, spec, chat_template: str | None) -> None:
    use_spm = (tok_dir / "tokenizer.model").exists()
    if use_spm:
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            use_spm = False
    if use_spm:
        _add_sentencepiece_vocab(w, tok_dir, spec.vocab_size)
    elif (tok_dir / "tokenizer.json").exists():
        _add_bpe_vocab(w, tok_dir, spec.vocab_size)
    else:
        raise GGUFExportError(f"no tokenizer.json or tokenizer.model in {tok_dir} (install sentencepiece for "
                              "tokenizer.model)")
    special = gguf.SpecialVocab(tok_dir, load_merges=not use_spm, n_vocab=spec.vocab_size)
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(w, quiet=True)
    if spec.model_type in ("gemma", "gemma2"):
        w.add_add_space_prefix(False)


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
    if spec.model_type in ("llama", "mistral"):
        w.add_vocab_size(spec.vocab_size)
    if spec.model_type == "gemma2":
        w.add_attn_logit_softcapping(spec.attn_softcap)
        w.add_final_logit_softcapping(spec.final_softcap)
        w.add_sliding_window(spec.sliding_window)
        if spec.attn_scale is not None and not math.isclose(spec.attn_scale, spec.head_dim ** -0.5):
            notes.append("Gemma 2 query_pre_attn_scalar != head_dim: llama.cpp picks the attention scale from the "
                         "model size, check it matches for this model")
    if spec.sliding_window and spec.model_type not in ("gemma2", "phi3"):
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
    elif kind == "longrope" and spec.model_type == "phi3":
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

def gguf_tensor_plan(model: nn.Module, quant: str = "q8_0") -> list[tuple[str, Callable[[], torch.Tensor], tuple, T]]:
    """(gguf name, thunk -> float32 tensor in llama.cpp's layout, torch shape, ggml type) for every tensor."""
    spec = model.spec
    if spec.model_type not in GGUF_ARCH:
        raise GGUFExportError(f"no GGUF architecture for model_type {spec.model_type!r}")
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
    for name, t in _extra_tensors(spec):
        plan.append((name, (lambda t=t: t.float()), tuple(t.shape), T.F32))
    return plan


def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                tokenizer=None, quant: str = "q8_0", chat_template: str | None = None, name: str | None = None,
                progress: Callable[[str], None] | None = None) -> ExportResult:
    """Write one .gguf file: llama.cpp metadata, tokenizer, chat template and the merged weights as `quant`.

    The tokenizer comes from `tokenizer_dir` (a folder with tokenizer.json / tokenizer.model and
    tokenizer_config.json) or is saved from a transformers `tokenizer` first. `chat_template` (Jinja source)
    overrides the tokenizer's own."""
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
        w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[GGUF_ARCH[spec.model_type]])
        w.add_name(name or path.stem)
        result.notes += _add_hparams(w, spec, FILE_TYPES[quant])
        if quant not in ("f32", "f16", "bf16"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tok_dir, spec, chat_template)
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
    return result
