"""LoRA adapters in PEFT's on-disk format, both ways.

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in_features)
                                base_model.model.<module path>.lora_B.weight  (out_features, r)
                                base_model.model.<module path>.weight          (modules_to_save: embed_tokens, lm_head)
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, use_rslora, ...

A LoRA on the output layer is PEFT's `lm_head` target (`base_model.model.lm_head.lora_A.weight`, "lm_head" in
target_modules). PEFT then also saves the base output weight (`lm_head.base_layer.weight`, its
save_embedding_layers="auto"); loading copies it into the frozen base, as PEFT does, and export leaves it out.

PEFT computes y = base(x) + scaling * B(A(x)), scaling = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA), the
same formula as `fasttune.lora.LoraLinear`, so the tensors are written unchanged.

Phi-3 checkpoints (and so transformers' and PEFT's Phi-3 modules) fuse q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`, while fasttune keeps them apart. Separate LoRAs on the parts are one LoRA on the fused module:
    A_fused = [A_q; A_k; A_v]  (3r x in),   B_fused = blockdiag(B_q, B_k, B_v)  (out x 3r)
so B_fused A_fused = [B_q A_q; B_k A_k; B_v A_v] exactly. Its rank is 3r, so `rank_pattern` / `alpha_pattern`
give the fused module r' = 3r and an alpha' with alpha'/r' = alpha/r (alpha' / sqrt(r') for rsLoRA). A part without
a LoRA gets zero blocks. Loading goes the other way: each part gets the full A and its rows of B (rank r').
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"  # a target only when named: PEFT's "all-linear" leaves the output layer out
# fasttune's separate projections -> the fused module Phi-3 checkpoints have, and their order inside it
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PART_TO_FUSED = {p: f for f, parts in FUSED_PARTS.items() for p in parts}


class AdapterError(ValueError):
    pass


def is_lora(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "base", "scaling"))


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> LoRA module, in model order."""
    return {n: m for n, m in model.named_modules() if is_lora(m)}


def _lora_settings(model: nn.Module) -> dict:
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("the model has no LoRA modules: call fasttune.add_lora(model, ...) or load an adapter first")
    cfg = getattr(model, "lora_config", None)
    first = next(iter(mods.values()))
    r = int(getattr(cfg, "r", first.r))
    alpha = float(getattr(cfg, "alpha", first.alpha))
    rslora = bool(getattr(cfg, "use_rslora", first.use_rslora))
    for name, m in mods.items():
        if int(m.r) != r or float(m.alpha) != alpha or bool(m.use_rslora) != rslora:
            raise AdapterError(f"{name} has r={m.r}, alpha={m.alpha}, rslora={m.use_rslora}; the adapter config says "
                               f"r={r}, alpha={alpha}, rslora={rslora}. PEFT's format needs one setting for all modules.")
        expected = alpha / (math.sqrt(r) if rslora else r)
        if not math.isclose(float(m.scaling), expected, rel_tol=1e-6):
            raise AdapterError(f"{name}.scaling = {m.scaling} but PEFT would use {expected} for r={r}, alpha={alpha}")
    targets = sorted({n.rpartition(".")[2] for n in mods})
    return {"r": r, "alpha": alpha, "use_rslora": rslora, "targets": targets,
            "dropout": float(getattr(cfg, "dropout", 0.0) or 0.0),
            "train_embeddings": bool(getattr(cfg, "train_embeddings", False)),
            "train_lm_head": bool(getattr(cfg, "train_lm_head", False))}


def _alpha_for_rank(alpha: float, r: int, new_r: int, rslora: bool) -> float:
    """alpha' with the same scaling at rank new_r."""
    return alpha * (math.sqrt(new_r / r) if rslora else new_r / r)


def adapter_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT tensors (keys as PEFT saves them) and the adapter_config.json dict, without writing anything."""
    s = _lora_settings(model)
    mods = lora_modules(model)
    spec = model.spec
    tensors: dict[str, torch.Tensor] = {}
    config_extra: dict = {"rank_pattern": {}, "alpha_pattern": {}}

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        tensors[PEFT_PREFIX + key] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()

    targets = list(s["targets"])
    if spec.fused_checkpoint:
        for fused, parts in FUSED_PARTS.items():
            if not any(p in targets for p in parts):
                continue
            k = len(parts)
            new_r = k * s["r"]
            config_extra["rank_pattern"][fused] = new_r
            config_extra["alpha_pattern"][fused] = _alpha_for_rank(s["alpha"], s["r"], new_r, s["use_rslora"])
            for layer_idx, layer in enumerate(model.model.layers):
                owner = layer.self_attn if fused == "qkv_proj" else layer.mlp
                prefix = f"model.layers.{layer_idx}.{'self_attn' if fused == 'qkv_proj' else 'mlp'}."
                a_blocks, b_blocks = [], []
                for p in parts:
                    m = getattr(owner, p)
                    out_f, in_f = _linear_shape(m)
                    if is_lora(m):
                        a_blocks.append(m.lora_A.detach().float())
                        b_blocks.append(m.lora_B.detach().float())
                    else:  # a part without LoRA contributes nothing
                        a_blocks.append(torch.zeros(s["r"], in_f))
                        b_blocks.append(torch.zeros(out_f, s["r"]))
                put(prefix + fused + ".lora_A.weight", torch.cat(a_blocks, 0).to(mods_dtype(mods)))
                put(prefix + fused + ".lora_B.weight", torch.block_diag(*b_blocks).to(mods_dtype(mods)))
        targets = sorted({PART_TO_FUSED.get(t, t) for t in targets})
        for name, m in mods.items():
            if name.rpartition(".")[2] not in PART_TO_FUSED:
                put(name + ".lora_A.weight", m.lora_A)
                put(name + ".lora_B.weight", m.lora_B)
    else:
        for name, m in mods.items():
            put(name + ".lora_A.weight", m.lora_A)
            put(name + ".lora_B.weight", m.lora_B)

    modules_to_save = []
    if s["train_embeddings"]:
        modules_to_save.append("embed_tokens")
        put("model.embed_tokens.weight", model.model.embed_tokens.weight)
    if s["train_lm_head"] and not spec.tie_word_embeddings:
        modules_to_save.append("lm_head")
        put("lm_head.weight", model.lm_head.weight)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": s["r"],
        "lora_alpha": s["alpha"],
        "lora_dropout": s["dropout"],
        "target_modules": targets,
        "use_rslora": s["use_rslora"],
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        **config_extra,
    }
    return tensors, config


def mods_dtype(mods: dict[str, nn.Module]) -> torch.dtype:
    return next(iter(mods.values())).lora_A.dtype


def _linear_shape(m: nn.Module) -> tuple[int, int]:
    base = m.base if is_lora(m) else m
    out_f = getattr(base, "out_features", None)
    in_f = getattr(base, "in_features", None)
    if out_f is None or in_f is None:
        out_f, in_f = base.weight.shape
    return int(out_f), int(in_f)


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                 dtype: torch.dtype | None = None) -> list[Path]:
    """Write adapter_model.safetensors and adapter_config.json (PEFT's format) into `path`; returns the files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, config = adapter_state_dict(model, dtype)
    config["base_model_name_or_path"] = base_model_name_or_path
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return [path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG]


# ---- loading ---------------------------------------------------------------------------------------------------

def read_adapter_config(path: str | os.PathLike) -> dict:
    cfg_file = Path(path) / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise AdapterError(f"no {ADAPTER_CONFIG} in {path}: point at a folder saved by PEFT or fasttune")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path} holds a {cfg.get('peft_type')} adapter; only LORA adapters can be loaded")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise AdapterError(f"{path}: {flag}=true is not supported by fasttune")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("layers_to_transform") is not None:
        raise AdapterError(f"{path}: layers_to_transform is not supported; the adapter must cover every layer")
    return cfg


def _target_leaf_names(cfg: dict, model: nn.Module) -> list[str]:
    """PEFT's target_modules (list of names, 'all-linear' or a regex over module paths) as fasttune leaf names."""
    tm = cfg.get("target_modules")
    if tm == "all-linear" or tm is None:
        leaves = set(ALL_LINEAR)
    elif isinstance(tm, str):
        pattern = re.compile(tm)
        leaves = set()
        for n, _ in model.named_modules():
            for cand in (n, n.replace("self_attn.q_proj", "self_attn.qkv_proj")
                         .replace("mlp.gate_proj", "mlp.gate_up_proj")):
                if pattern.fullmatch(cand):
                    leaves.add(n.rpartition(".")[2])
    else:
        leaves = set(tm)
    expanded = set()
    for leaf in leaves:
        expanded.update(FUSED_PARTS.get(leaf, (leaf,)))
    unknown = expanded - set(ALL_LINEAR) - {LM_HEAD}
    if unknown:
        raise AdapterError(f"adapter targets {sorted(unknown)}, which fasttune cannot put LoRA on; "
                           f"supported targets: {', '.join(ALL_LINEAR)}, {LM_HEAD} (and Phi-3's qkv_proj, "
                           "gate_up_proj)")
    return [t for t in ALL_LINEAR + (LM_HEAD,) if t in expanded]


def _pattern_value(pattern: dict, key: str, default):
    for k, v in pattern.items():  # PEFT matches pattern keys as a suffix / regex of the module path
        if key == k or key.endswith("." + k) or re.fullmatch(k, key) or re.search(rf"(^|\.){k}$", key):
            return v
    return default


def load_adapter(model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Put a PEFT LoRA adapter (made by PEFT, Unsloth, fasttune, ...) into a fasttune model.

    Adds LoRA modules with the adapter's r / alpha / targets when the model has none, then copies the tensors;
    modules_to_save (embed_tokens, lm_head) replace the model's weights. With `trainable=False` the adapter is
    frozen (inference / export)."""
    path = Path(path)
    cfg = read_adapter_config(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        raise AdapterError(f"no {ADAPTER_WEIGHTS} in {path} (pickled adapter_model.bin files are not read)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    spec = model.spec
    fused_ranks = set()
    if spec.fused_checkpoint:  # fasttune's own Phi-3 export: fused modules at k*r with matching alpha
        for fused, parts in FUSED_PARTS.items():
            fr = rank_pattern.pop(fused, None)
            fa = alpha_pattern.pop(fused, None)
            if fr is not None:
                fused_ranks.add((int(fr), float(fa if fa is not None else alpha)))
    if rank_pattern or alpha_pattern:
        raise AdapterError(f"{path}: per-module rank_pattern/alpha_pattern {rank_pattern or alpha_pattern} is not "
                           "supported; fasttune uses one r and alpha for every LoRA module")

    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    state = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in state.items()}

    # fused Phi-3 modules -> per-part LoRA at the fused rank (all parts must then share it)
    lora_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        mod = key[: -len(".lora_A.weight")]
        b_key = mod + ".lora_B.weight"
        if b_key not in state:
            raise AdapterError(f"{path}: {key} has no matching lora_B")
        a, b = state.pop(key), state.pop(b_key)
        leaf = mod.rpartition(".")[2]
        if leaf in FUSED_PARTS:
            parent = mod.rpartition(".")[0]
            sizes = _fused_split_sizes(spec, leaf)
            for part, b_rows in zip(FUSED_PARTS[leaf], b.split(sizes, dim=0)):
                lora_pairs[parent + "." + part] = (a, b_rows)
        else:
            lora_pairs[mod] = (a, b)
    if not lora_pairs:
        raise AdapterError(f"{path} holds no lora_A/lora_B tensors")
    ranks = {a.shape[0] for a, _ in lora_pairs.values()}
    if fused_ranks:
        if len(fused_ranks) != 1 or any(rk != next(iter(fused_ranks))[0] for rk in ranks):
            raise AdapterError(f"{path}: Phi-3 fused LoRA ranks {sorted(ranks)} differ between modules; "
                               "fasttune needs one rank for all")
        r, alpha = next(iter(fused_ranks))
    elif spec.fused_checkpoint and ranks != {r}:
        raise AdapterError(f"{path}: tensors have ranks {sorted(ranks)} but r={r}")

    # base weights of targeted modules (PEFT saves lm_head.base_layer.weight when lm_head is a target)
    base_weights = {k: state.pop(k) for k in [k for k in state if k.endswith(".base_layer.weight")]}
    modules_to_save = {k: v for k, v in state.items() if k.endswith(".weight")}
    leftover = set(state) - set(modules_to_save)
    if leftover:
        raise AdapterError(f"{path}: tensors fasttune does not understand: {sorted(leftover)[:5]}")

    if not lora_modules(model):
        from ..lora import add_lora

        targets = _target_leaf_names(cfg, model)
        present = {m.rpartition(".")[2] for m in lora_pairs}
        targets = [t for t in targets if t in present] or targets
        add_lora(model, r=r, alpha=alpha, target_modules=targets, use_rslora=rslora,
                 dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                 train_embeddings="model.embed_tokens.weight" in modules_to_save,
                 train_lm_head="lm_head.weight" in modules_to_save)
    else:  # an adapter loaded over existing LoRA modules: remember what it carries, so a re-export keeps it
        lora_cfg = getattr(model, "lora_config", None)
        if lora_cfg is not None:
            lora_cfg.train_embeddings |= "model.embed_tokens.weight" in modules_to_save
            lora_cfg.train_lm_head |= "lm_head.weight" in modules_to_save
    mods = lora_modules(model)
    missing = sorted(set(mods) - set(lora_pairs))
    extra = sorted(set(lora_pairs) - set(mods))
    if extra:
        raise AdapterError(f"{path} has LoRA weights for {extra[:3]}{'...' if len(extra) > 3 else ''}, which the "
                           "model has no LoRA module for (was it made for another model or with other targets?)")
    with torch.no_grad():
        for name, m in mods.items():
            if name not in lora_pairs:
                continue
            a, b = lora_pairs[name]
            if tuple(a.shape) != tuple(m.lora_A.shape) or tuple(b.shape) != tuple(m.lora_B.shape):
                raise AdapterError(f"{name}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} != model's "
                                   f"A{tuple(m.lora_A.shape)} B{tuple(m.lora_B.shape)}")
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
            m.lora_A.requires_grad_(trainable)
            m.lora_B.requires_grad_(trainable)
        for name in missing:  # model LoRA modules the adapter does not cover stay at zero effect
            mods[name].lora_B.zero_()
        for key, t in base_weights.items():  # the frozen base of a LoRA module (or a plain linear): stays frozen
            try:
                owner = model.get_submodule(key[: -len(".base_layer.weight")])
                param = owner.base.weight if is_lora(owner) else owner.weight
            except AttributeError:
                raise AdapterError(f"{path}: {key} names no dense module of this model") from None
            if tuple(param.shape) != tuple(t.shape):
                raise AdapterError(f"{key}: adapter shape {tuple(t.shape)} != model shape {tuple(param.shape)}")
            param.copy_(t)
        for key, t in modules_to_save.items():
            owner = model.get_submodule(key.rpartition(".")[0])
            param = owner.weight
            if tuple(param.shape) != tuple(t.shape):
                raise AdapterError(f"{key}: adapter shape {tuple(t.shape)} != model shape {tuple(param.shape)}")
            param.copy_(t)
            param.requires_grad_(trainable)
    return model


def _fused_split_sizes(spec, fused: str) -> list[int]:
    if fused == "qkv_proj":
        return [spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim]
    return [spec.intermediate_size, spec.intermediate_size]
