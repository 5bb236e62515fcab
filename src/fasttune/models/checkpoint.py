"""Hugging Face checkpoints in and out: config.json, (sharded) safetensors with their index, tokenizer files.

Loading builds the model on the meta device, then streams tensors one at a time from each shard straight
into place in the requested dtype and device, so peak host memory stays near one copy of the model (plus one
tensor). An optional `quantize` callable replaces each decoder linear as soon as its weights are in, so a 4-bit
model never holds its 16-bit weights all at once.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .decoder import CausalLM
from .spec import ArchSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class CheckpointError(ValueError):
    pass


# ---- Hugging Face Hub repo ids: the local cache, then a download ------------------------------------------------

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# what a download fetches: weights as safetensors, config, tokenizer and generation files; never pickles or code
HUB_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json", *TOKENIZER_FILES)


def hub_cache_dir() -> Path:
    """transformers' cache folder: HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub (default
    ~/.cache). Read at each call, not at import, so a variable set later counts."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of a model repo (models--org--name/snapshots/<commit>, the commit read from
    refs/<revision>, or `revision` itself when it is a commit), if it holds a config.json."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    ref = repo / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snapshot = repo / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def resolve_pretrained(path: str | os.PathLike, revision: str | None = None) -> Path:
    """Where the model `path` names lies, as transformers resolves it: an existing local folder or file as it is;
    a Hub repo id ("org/name") from the Hugging Face cache, else downloaded through huggingface_hub (safetensors,
    config, tokenizer and generation files only; token from HF_TOKEN) unless HF_HUB_OFFLINE is set. Anything else
    comes back unchanged, for the loader to report as missing."""
    local = Path(path).expanduser()
    name = str(path)
    if local.exists() or not _REPO_ID.fullmatch(name):
        return local
    snapshot = cached_snapshot(name, revision)
    if snapshot is not None:
        return snapshot
    at = f" at revision {revision!r}" if revision else ""
    where = (f"{name} is not a local folder, nor a model in the Hugging Face cache{at} "
             f"({hub_cache_dir() / ('models--' + name.replace('/', '--'))})")
    if hub_offline():
        raise CheckpointError(f"{where}, and HF_HUB_OFFLINE is set so it is not downloaded: download it while online "
                              f"(`hf download {name}`), unset HF_HUB_OFFLINE, or pass the model's folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, allow_patterns=list(HUB_PATTERNS),
                                      cache_dir=hub_cache_dir(), endpoint=os.environ.get("HF_ENDPOINT") or None))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here, with the cause
        raise CheckpointError(f"{where}, and downloading it from the Hugging Face Hub failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}): check the repo id and the network, set "
                              "HF_TOKEN for a gated or private repo, or pass the model's folder") from e


def resolve_dtype(dtype: str | torch.dtype | None, spec: ArchSpec) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or spec.torch_dtype or "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def compute_dtype(dtype: str | torch.dtype | None, spec: ArchSpec) -> torch.dtype:
    """The dtype to load a model in to run or train it: `resolve_dtype`, except that float16 is refused for a family
    that overflows it (spec.float16_overflow) when asked for, and replaced by bfloat16, with a warning, when it only
    comes from the checkpoint's own torch_dtype label."""
    resolved = resolve_dtype(dtype, spec)
    reason = spec.float16_overflow if resolved == torch.float16 else None
    if reason is None:
        return resolved
    if dtype is None:
        logging.getLogger("fasttune.models").warning(
            "%s: the checkpoint is labelled float16, but %s; loading it in bfloat16 (pass dtype='float32' for "
            "full precision)", spec.model_type, reason)
        return torch.bfloat16
    raise CheckpointError(f"{spec.model_type} cannot run in float16: {reason}. Load it in bfloat16 (or float32 on "
                          "hardware without bfloat16)")


# ---- Phi-3: fused checkpoint tensors <-> separate projections --------------------------------------------------

# Phi-3 checkpoints fuse q/k/v into qkv_proj and gate/up into gate_up_proj (in this order: transformers' Phi3
# modules); fasttune keeps the parts apart.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fused_split_sizes(spec: ArchSpec, fused: str) -> list[int]:
    """The output rows of each part of a fused module ("qkv_proj" or "gate_up_proj"), in FUSED_PARTS' order."""
    if fused == "qkv_proj":
        kv = spec.num_kv_heads * spec.head_dim
        return [spec.num_heads * spec.head_dim, kv, kv]
    return [spec.intermediate_size, spec.intermediate_size]


def _unfuse(name: str, tensor: torch.Tensor, spec: ArchSpec) -> list[tuple[str, torch.Tensor]]:
    if not spec.fused_checkpoint:
        return [(name, tensor)]
    for fused, owner in (("qkv_proj", "self_attn."), ("gate_up_proj", "mlp.")):
        if name.endswith(owner + fused + ".weight"):
            base = name[: -len(fused + ".weight")]
            pieces = tensor.split(fused_split_sizes(spec, fused), dim=0)
            return [(base + part + ".weight", t) for part, t in zip(FUSED_PARTS[fused], pieces)]
    return [(name, tensor)]


# ---- MoE experts: per-expert checkpoint tensors <-> the 3-D expert stacks -------------------------------------

# Checkpoints name each expert's projections (transformers 5 still saves this layout): Qwen3-MoE
# mlp.experts.N.{gate,up,down}_proj.weight, Mixtral block_sparse_moe.experts.N.{w1,w3,w2}.weight (gate, up, down)
# with its router as block_sparse_moe.gate. The model holds transformers 5's module layout instead, which some
# checkpoints store too: mlp.experts.gate_up_proj (E, 2I, H), gate rows first, and mlp.experts.down_proj (E, H, I).
# gpt-oss's MXFP4 checkpoints: mlp.experts.{gate_up,down}_proj_{blocks,scales}, each projection as (E, out, in)
_MXFP4_PART = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)")
_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PER_EXPERT_FAMILIES = ("qwen3_moe", "mixtral")
_EXPERT_STACK = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")  # what transformers 5 saves per expert


class _ExpertStacker:
    """Collects the per-expert tensors of each layer as they stream in and hands out the stacked tensors once a
    layer's are complete (shards hold whole layers in practice, so at most a layer's experts wait here)."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        self.parts: dict[str, dict[tuple[str, int], torch.Tensor]] = {}

    def rename(self, name: str) -> str:
        """The name in the model's spelling (Mixtral's block_sparse_moe -> mlp)."""
        return name.replace(".block_sparse_moe.", ".mlp.") if self.spec.model_type == "mixtral" else name

    def take(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        q = _MXFP4_PART.fullmatch(name)
        if q is not None:  # dequantised once both halves are in, as the model's (E, in, out) float32 tensor
            parts = self.parts.setdefault(q.group(1), {})
            parts[(q.group(2), 0)] = tensor
            if len(parts) < 2:
                return []
            del self.parts[q.group(1)]
            from .mxfp4 import dequantize_mxfp4

            return [(q.group(1), dequantize_mxfp4(parts[("blocks", 0)], parts[("scales", 0)]).transpose(1, 2))]
        m = _PER_EXPERT.fullmatch(name)
        if m is None:
            return [(name, tensor)]
        prefix, expert, proj = m.group(1), int(m.group(2)), _MIXTRAL_PROJ.get(m.group(3), m.group(3))
        E = self.spec.num_experts
        if expert >= E:
            raise CheckpointError(f"{name}: expert {expert} but the config has {E} experts")
        parts = self.parts.setdefault(prefix, {})
        parts[(proj, expert)] = tensor
        out = []
        if all(("gate_proj", e) in parts and ("up_proj", e) in parts for e in range(E)):
            gate = torch.stack([parts.pop(("gate_proj", e)) for e in range(E)])
            up = torch.stack([parts.pop(("up_proj", e)) for e in range(E)])
            out.append((prefix + ".gate_up_proj", torch.cat([gate, up], dim=1)))
        if all(("down_proj", e) in parts for e in range(E)):
            out.append((prefix + ".down_proj", torch.stack([parts.pop(("down_proj", e)) for e in range(E)])))
        if not parts:
            del self.parts[prefix]
        return out

    def finish(self) -> None:
        if self.parts:
            prefix, parts = next(iter(self.parts.items()))
            raise CheckpointError(f"incomplete experts in the checkpoint: {prefix} has only "
                                  f"{len(parts)} of the per-expert tensors (e.g. {sorted(parts)[:3]})")


def _split_experts(state: dict[str, torch.Tensor], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """The model's 3-D expert stacks as the per-expert tensors transformers saves (and every version reads) for
    Qwen3-MoE and Mixtral; gpt-oss checkpoints hold the 3-D stacks themselves."""
    if not spec.is_moe or spec.model_type not in _PER_EXPERT_FAMILIES:
        return state
    out: dict[str, torch.Tensor] = {}
    mixtral = spec.model_type == "mixtral"
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral else {}
    for name, t in state.items():
        if mixtral:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith(".experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}{e}.{names.get('gate_proj', 'gate_proj')}.weight"] = gate[e]
                out[f"{base}{e}.{names.get('up_proj', 'up_proj')}.weight"] = up[e]
        elif name.endswith(".experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.{names.get('down_proj', 'down_proj')}.weight"] = t[e]
        else:
            out[name] = t
    return out


# ---- multimodal checkpoints: the language model's tensors only ------------------------------------------------

_TEXT_TOWER_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                        ("model.language_model.", "model."))  # transformers' saved layout, then its module layout


def _text_tower_name(name: str) -> str | None:
    """The text-only name of a multimodal checkpoint's language-model tensor; None for the rest (vision tower,
    projector)."""
    for old, new in _TEXT_TOWER_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return "lm_head.weight" if name == "lm_head.weight" else None


def _fuse(state: dict[str, torch.Tensor], spec: ArchSpec) -> dict[str, torch.Tensor]:
    if not spec.fused_checkpoint:
        return state
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            base = name[: -len("q_proj.weight")]
            out[base + "qkv_proj.weight"] = torch.cat(
                [t, state[base + "k_proj.weight"], state[base + "v_proj.weight"]], dim=0)
        elif name.endswith("mlp.gate_proj.weight"):
            base = name[: -len("gate_proj.weight")]
            out[base + "gate_up_proj.weight"] = torch.cat([t, state[base + "up_proj.weight"]], dim=0)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            continue
        else:
            out[name] = t
    return out


# ---- loading ---------------------------------------------------------------------------------------------------

def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in the folder: {', '.join(missing)}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only pickle checkpoints ({pickles[0].name}); pickle files can run code when loaded. "
                "Convert them to safetensors, or pass allow_pickle=True to load them with torch.load(weights_only=True)."
            )
        return pickles
    raise CheckpointError(f"no model.safetensors, safetensors index or pytorch_model*.bin in {path}")


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            for key in list(state):
                yield key, state.pop(key)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    old = getattr(module, leaf)
    if old.shape != value.shape:
        raise CheckpointError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(old.shape)}; "
                              "config.json and the weights disagree")
    setattr(module, leaf, nn.Parameter(value, requires_grad=old.requires_grad))


def _is_gguf(path: str | os.PathLike) -> bool:
    from .gguf_reader import is_gguf  # late: the GGUF reader is only needed for .gguf files

    # a .gguf name that is not one (missing, truncated, not GGUF) goes to the reader for its error message
    return Path(path).suffix.lower() == ".gguf" or is_gguf(path)


def model_spec(path: str | os.PathLike) -> ArchSpec:
    """The ArchSpec of a Hugging Face folder (config.json) or of a GGUF file (its metadata)."""
    if _is_gguf(path):
        from .gguf_reader import load_gguf_spec

        return load_gguf_spec(path)
    return ArchSpec.from_pretrained(path)


def iter_model_tensors(path: str | os.PathLike, spec: ArchSpec,
                       allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(fasttune parameter name, tensor) for each tensor of the checkpoint at `path`, one at a time, streamed from
    its shards (or dequantised from a GGUF file, in float32); Phi-3's fused projections come split, a tied LM head
    and rotary buffers are skipped. For loaders that place each tensor themselves (FSDP2: every rank keeps only its
    shard)."""
    if _is_gguf(path):
        from .gguf_reader import iter_gguf_tensors, read_gguf

        source = iter_gguf_tensors(read_gguf(path), spec)
    else:
        source = _iter_tensors(_weight_files(Path(path), allow_pickle))
    experts = _ExpertStacker(spec) if spec.is_moe else None
    for raw_name, tensor in source:
        if spec.text_tower:  # a multimodal checkpoint: its language model only
            raw_name = _text_tower_name(raw_name)
            if raw_name is None:
                continue
        pieces = _unfuse(raw_name, tensor, spec)
        if experts is not None:
            pieces = [out for n, t in pieces for out in experts.take(experts.rename(n), t)]
        for name, t in pieces:
            if name.endswith("rotary_emb.inv_freq") or (spec.tie_word_embeddings and name == "lm_head.weight"):
                continue
            yield name, t
    if experts is not None:
        experts.finish()


# A bitsandbytes 4-bit weight (QuantState.as_dict(packed=True)): the packed codes under `<linear>.weight` and these
_BNB_PARTS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
              "weight.quant_state.bitsandbytes__nf4")


def is_prequantized(path: str | os.PathLike) -> bool:
    """Whether the folder's config.json declares quantised weights (quantization_config), or `path` is a GGUF file
    (its blocks are dequantised as they are read, so the model is loaded whole, never straight into shards)."""
    if _is_gguf(path):
        return True
    return bool(ArchSpec.from_pretrained(Path(path)).raw_config.get("quantization_config"))


def _bnb_nf4_checkpoint(spec: ArchSpec, path: Path) -> bool:
    """Whether `path` holds decoder weights quantised to NF4 by bitsandbytes (a "...-bnb-4bit" folder, as saved by
    transformers); the quantisation kinds fasttune cannot read are refused here, with what to do instead."""
    q = spec.raw_config.get("quantization_config") or {}
    if not q or _mxfp4_checkpoint(spec):
        return False
    use_16bit = "load the 16-bit checkpoint instead (fasttune.load(..., load_in_4bit=True) quantises it to NF4)"
    if q.get("quant_method") != "bitsandbytes" or not q.get("load_in_4bit"):
        raise CheckpointError(f"{path}: quantization_config says {q.get('quant_method')!r}"
                              f"{' 8-bit' if q.get('load_in_8bit') else ''}; fasttune reads 16/32-bit checkpoints and "
                              f"bitsandbytes 4-bit NF4 ones: {use_16bit}")
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{path}: bitsandbytes 4-bit of type {q.get('bnb_4bit_quant_type', 'fp4')!r}; only NF4 "
                              f"is read: {use_16bit}")
    if not q.get("bnb_4bit_use_double_quant"):
        raise CheckpointError(f"{path}: NF4 without double quantisation (bnb_4bit_use_double_quant: false) is not "
                              f"read: {use_16bit}")
    if spec.model_type == "phi3":
        raise CheckpointError(f"{path}: Phi-3's fused qkv/gate_up projections cannot be split once quantised: "
                              f"{use_16bit}")
    return True


def _mxfp4_checkpoint(spec: ArchSpec) -> bool:
    """A gpt-oss checkpoint with MXFP4 experts: they are dequantised as they are read (the rest is 16-bit)."""
    q = spec.raw_config.get("quantization_config") or {}
    return q.get("quant_method") == "mxfp4" and spec.model_type == "gpt_oss"


def load_model(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    quantize: Callable[[nn.Linear], nn.Module] | None = None,
    keep_quantized: bool = False,
) -> CausalLM:
    """Load a Hugging Face causal-LM folder, or a GGUF file, into a fasttune `CausalLM` (eval mode, requires_grad
    left on).

    A bitsandbytes NF4 checkpoint (double-quantised, as transformers saves `load_in_4bit` models) loads its decoder
    linears as `NF4Linear` layers holding the stored codes and scales as they are (bit for bit). A GGUF file's
    tensors are dequantised to float32 (bit-exact with llama.cpp's gguf package) and then cast to `dtype`;
    with `quantize` (load_in_4bit), an MoE model's expert stacks are stored in NF4 as they are read too
    (models.moe.NF4ExpertStack), its router stays 16-bit;
    with `keep_quantized`, its decoder linears keep their blocks instead (models.gguf_linear.GGUFLinear)."""
    path = Path(path)
    gguf_file = _is_gguf(path)
    spec = model_spec(path)
    torch_dtype = compute_dtype(dtype, spec)
    device = torch.device(device)
    if keep_quantized:
        if not gguf_file:
            raise CheckpointError(f"keep_quantized keeps a GGUF file's quantised blocks, and {path} is not a GGUF "
                                  "file; for a folder use load_in_4bit=True (NF4) instead")
        if quantize is not None:
            raise CheckpointError("keep_quantized and load_in_4bit both ask for the base's storage; choose one (a "
                                  "GGUF file: keep_quantized)")
        from .gguf_linear import load_gguf_quantized

        return load_gguf_quantized(path, torch_dtype, device)
    model, expected = meta_model(spec)
    loaded: set[str] = set()
    # the MoE router (mlp.gate of an MoE layer) is never quantised: top-k selection is sensitive to its precision
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
               and not (spec.is_moe and n.endswith((".mlp.gate", ".mlp.router")))}
    pending: dict[str, set[str]] = {n: {n + "." + p for p, _ in m.named_parameters()} for n, m in linears.items()}
    stored_4bit: dict[str, dict[str, torch.Tensor]] = {}  # linear -> its bitsandbytes parts read so far

    def place_4bit(owner: str) -> None:
        """Swap in the NF4 layer once all of `owner`'s parts (and its bias, if any) have been read."""
        parts, linear = stored_4bit[owner], linears[owner]
        if len(parts) < len(_BNB_PARTS) or (linear.bias is not None and owner + ".bias" not in loaded):
            return
        from ..kernels.nf4 import from_bnb_state_dict  # late: only bitsandbytes checkpoints need the NF4 layer
        from .nf4_linear import NF4Linear

        q = from_bnb_state_dict({f"{owner}.{k}": v for k, v in parts.items()}, prefix=owner + ".weight")
        if tuple(q.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{path}: {owner}.weight is stored 4-bit with shape {tuple(q.shape)}, the config "
                                  f"implies {(linear.out_features, linear.in_features)}")
        parent, _, child = owner.rpartition(".")
        setattr(model.get_submodule(parent), child, NF4Linear(q, linear.bias))
        loaded.add(owner + ".weight")
        del stored_4bit[owner], linears[owner], pending[owner]

    bnb = not gguf_file and _bnb_nf4_checkpoint(spec, path)
    for name, t in iter_model_tensors(path, spec, allow_pickle):
        owner, sep, part = name.partition(".weight")
        if bnb and sep and owner in linears:  # codes and scales keep their stored dtypes (uint8, float32)
            stored_4bit.setdefault(owner, {})["weight" + part] = t.to(device)
            place_4bit(owner)
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in {path}: not part of a {spec.model_type} model")
        _set_tensor(model, name, t.to(device=device, dtype=torch_dtype))
        loaded.add(name)
        del t
        if quantize is not None and _EXPERT_STACK.search(name):  # load_in_4bit: the expert stacks go NF4 too
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).quantize_nf4_(leaf)
            continue
        if bnb and name.endswith(".bias") and name[:-5] in stored_4bit:
            place_4bit(name[:-5])
            continue
        if quantize is not None:
            owner = name.rpartition(".")[0]
            if owner in pending:
                pending[owner].discard(name)
                if not pending[owner]:
                    parent, _, child = owner.rpartition(".")
                    # pop: the 16-bit layer must not outlive its quantised replacement (else a 4-bit load holds
                    # every 16-bit decoder weight until the end)
                    setattr(model.get_submodule(parent), child, quantize(linears.pop(owner)))
                    del pending[owner]
    if stored_4bit:
        owner, parts = next(iter(stored_4bit.items()))
        raise CheckpointError(f"{path}: incomplete 4-bit weights, e.g. {owner} has only {sorted(parts)} of "
                              f"{list(_BNB_PARTS)}")
    check_all_loaded(path, expected, loaded)
    model.tie_weights()
    return model.eval()


def meta_model(spec: ArchSpec) -> tuple[CausalLM, set[str]]:
    """The model built on the meta device (no memory yet) and the names of the parameters a checkpoint must fill
    (not lm_head.weight when the output layer is tied to the embeddings)."""
    with torch.device("meta"):
        model = CausalLM(spec)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if spec.tie_word_embeddings:
        expected.discard("lm_head.weight")
    return model, expected


def check_all_loaded(path, expected: set[str], loaded: set[str]) -> None:
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"{path} is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}")


# ---- saving ----------------------------------------------------------------------------------------------------

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for u, mult in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(s)


def save_model(model: CausalLM, path: str | os.PathLike, tokenizer=None, dtype: str | torch.dtype | None = None,
               max_shard_size: int | str = "5GB", state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json, safetensors shards (+ index when more than one) and tokenizer files, in the layout
    transformers' `from_pretrained` reads. `state_dict` overrides the model's tensors (used by merged export)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    state = state_dict if state_dict is not None else {n: p.detach() for n, p in model.state_dict().items()}
    if spec.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    target = resolve_dtype(dtype, spec) if dtype is not None else None
    state = {n: (t.to(target) if target is not None and t.is_floating_point() else t).contiguous().cpu()
             for n, t in state.items()}
    state = _split_experts(_fuse(state, spec), spec)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            for n, t in shard.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = dict(spec.raw_config)
    if _mxfp4_checkpoint(spec):  # loaded dequantised: written back as plain tensors
        cfg.pop("quantization_config")
    saved_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[saved_dtype]
    cfg["torch_dtype"] = dtype_name
    if "dtype" in cfg:
        cfg["dtype"] = dtype_name
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(path)`, keeping the SentencePiece model it was loaded from: recent transformers
    write only tokenizer.json, and llama.cpp's GGUF vocabulary for Llama 2 / Mistral / Gemma (scores, byte and
    control token types) comes from tokenizer.model."""
    tokenizer.save_pretrained(str(path))
    source = getattr(tokenizer, "vocab_file", None)
    target = Path(path) / "tokenizer.model"
    if isinstance(source, str) and source.endswith(".model") and Path(source).is_file() and not target.exists():
        shutil.copyfile(source, target)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.exists():
            shutil.copy2(f, Path(dst) / name)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside the model (tokenizer.json / tokenizer.model), through transformers; for a GGUF file,
    the one its metadata describes (vocabulary, merges or scores, special tokens, chat template)."""
    from transformers import AutoTokenizer

    if _is_gguf(path):
        from .gguf_reader import load_gguf_tokenizer

        return load_gguf_tokenizer(path)

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)  # local folders only: never the Hub
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise CheckpointError(f"could not load a tokenizer from {path}: {e}") from e
