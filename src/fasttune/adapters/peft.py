"""LoRA adapters in PEFT's on-disk format, both ways.

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in_features)
                                base_model.model.<module path>.lora_B.weight  (out_features, r)
                                base_model.model.<module path>.weight          (modules_to_save: embed_tokens, lm_head)
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, use_rslora,
                                rank_pattern / alpha_pattern (modules whose r / alpha differ), ...

Trained embeddings / LM head go out as modules_to_save. A reward model (fasttune's `model.score`, a linear head on
the last token's final hidden state) goes out as PEFT's SEQ_CLS adapter with `score` in modules_to_save, which
PEFT loads over transformers' <Family>ForSequenceClassification.

A LoRA on the output layer is PEFT's `lm_head` target (`base_model.model.lm_head.lora_A.weight`, "lm_head" in
target_modules). PEFT then also saves the base output weight (`lm_head.base_layer.weight`, its
save_embedding_layers="auto"); loading copies it into the frozen base, as PEFT does, and export leaves it out.

PEFT computes y = base(x) + scaling * B(A(x)), scaling = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA), the
same formula as `fasttune.adapters.LoraLinear` (adapters.config.lora_scaling), so the tensors are written unchanged.

Phi-3 checkpoints (and so transformers' and PEFT's Phi-3 modules) fuse q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`, while fasttune keeps them apart. Separate LoRAs on the parts are one LoRA on the fused module:
    A_fused = [A_q; A_k; A_v]  (3r x in),   B_fused = blockdiag(B_q, B_k, B_v)  (out x 3r)
so B_fused A_fused = [B_q A_q; B_k A_k; B_v A_v] exactly. Its rank is 3r, so `rank_pattern` / `alpha_pattern`
give the fused module r' = 3r and an alpha' with alpha'/r' = alpha/r (alpha' / sqrt(r') for rsLoRA). A part without
a LoRA gets zero blocks. Loading goes the other way: each part gets the full A and its rows of B (rank r', alpha'),
so one model may hold LoRAs of several ranks (qkv parts at 3r, gate/up at 2r, o/down at r); parts that share one A
are saved back as that one A with their B rows stacked (rank r' again, not 3r').

MoE models (Qwen3-MoE, Mixtral, gpt-oss): PEFT adapts the 3-D expert stacks through `target_parameters`
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): one LoRA layer per stack whose lora_A is (r E, in) and
lora_B (out, r E), expert e's factors being
    A_e = lora_A[e r : (e + 1) r],   B_e[:, j] = lora_B[:, j E + e]    (B's columns interleave the experts),
so fasttune's A (E, r, in) is lora_A reshaped and B (E, out, r) is lora_B viewed (out, r, E) and permuted. When both
stacks are adapted PEFT nests the wrappers in parameter order: gate_up_proj's tensors are saved under
`mlp.experts.base_layer.lora_*`, down_proj's under `mlp.experts.lora_*`. The router (Qwen3-MoE / Mixtral
`mlp.gate`, gpt-oss `mlp.router`) is not an nn.Linear in transformers, so PEFT adapts its weight as the parameter
target `mlp.gate.weight` (`mlp.router.weight`): an ordinary (r, in) / (out, r) pair saved under `mlp.gate.lora_*`.
For Qwen3-MoE and Mixtral PEFT reads the names gate_proj / up_proj / down_proj / w1-w3 / gate in target_modules as
transformers-4 adapters of the experts and remaps them onto the stacks (gate_up at rank 2r), so they never appear in
target_modules here; a LoRA on a Qwen3-MoE dense MLP layer (mlp_only_layers) therefore cannot be written in a form
PEFT loads, and export refuses it with that reason.
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

from ..models.checkpoint import FUSED_PARTS, fused_split_sizes
from .attach import add_lora, lora_layers
from .config import ALL_TARGETS, LM_HEAD, lora_alpha_for, lora_scaling
from .files import PEFT_CONFIG, PEFT_WEIGHTS
from .layer import LoraLinear

PEFT_PREFIX = "base_model.model."
# fasttune's separate projections -> the fused module Phi-3 checkpoints have, and their order inside it
PART_TO_FUSED = {p: f for f, parts in FUSED_PARTS.items() for p in parts}


class AdapterError(ValueError):
    pass


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Module path -> LoRA module, in model order."""
    return dict(lora_layers(model))


def trained_full_weights(model: nn.Module) -> tuple[bool, bool]:
    """(embeddings trained, LM head trained) in full: what `add_lora(train_embeddings=, train_lm_head=)` or an
    adapter's modules_to_save recorded (model.trains_embeddings / trains_lm_head), or what a trainer unfroze (it
    sets requires_grad)."""
    embed = model.trains_embeddings or model.model.embed_tokens.weight.requires_grad
    head = model.lm_head  # a LoRA'd head (LoraLMHead.weight is its frozen base) is an adapter, not this
    lm_head = model.trains_lm_head or (isinstance(getattr(head, "weight", None), nn.Parameter)
                                       and head.weight.requires_grad and not isinstance(head, LoraLinear))
    return embed, lm_head


def _fused_unit(owner: nn.Module, parts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, int, float, bool]:
    """(A, B, r, alpha, rslora) of one fused Phi-3 module from fasttune's separate parts (see the module docstring).
    Parts that share one A (an adapter loaded from a fused module) stack their B rows: the rank stays r. Otherwise
    A is stacked and B block-diagonal (rank = sum of the parts' ranks, a part without LoRA adds zero blocks)."""
    mods = [getattr(owner, p) for p in parts]
    loras = [m for m in mods if isinstance(m, LoraLinear)]
    first = loras[0]
    settings = {(float(m.scaling), bool(m.use_rslora)) for m in loras}
    if len(settings) != 1:
        raise AdapterError(f"the parts of a fused Phi-3 module ({', '.join(parts)}) have different LoRA scalings "
                           f"{sorted(settings)}; PEFT's fused module has one")
    scaling, rslora = settings.pop()
    if len(loras) == len(mods) and all(m.lora_A.shape == first.lora_A.shape and torch.equal(m.lora_A, first.lora_A)
                                       for m in loras[1:]):
        return (first.lora_A.detach().float(), torch.cat([m.lora_B.detach().float() for m in mods], 0),
                int(first.r), float(first.alpha), rslora)
    a_blocks, b_blocks = [], []
    for m in mods:
        if isinstance(m, LoraLinear):
            a_blocks.append(m.lora_A.detach().float())
            b_blocks.append(m.lora_B.detach().float())
        else:  # a part without LoRA contributes nothing
            out_f, in_f = _linear_shape(m)
            a_blocks.append(torch.zeros(first.r, in_f))
            b_blocks.append(torch.zeros(out_f, first.r))
    r = sum(a.shape[0] for a in a_blocks)
    alpha = lora_alpha_for(scaling, r, rslora)  # the fused module keeps the parts' scaling
    return torch.cat(a_blocks, 0), torch.block_diag(*b_blocks), r, alpha, rslora


def _lora_units(model: nn.Module, allow_none: bool = False
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, int, float, bool]]:
    """Module path (as PEFT names it: Phi-3's fused modules for the fused checkpoint) -> (A, B, r, alpha, rslora)."""
    mods = lora_modules(model)
    if not mods and allow_none:
        return {}
    if not mods:
        raise AdapterError("the model has no LoRA modules: call fasttune.add_lora(model, ...) or load an adapter first")
    for name, m in mods.items():
        expected = lora_scaling(int(m.r), float(m.alpha), bool(m.use_rslora))
        if not math.isclose(float(m.scaling), expected, rel_tol=1e-6):
            raise AdapterError(f"{name}.scaling = {m.scaling} but PEFT would use {expected} for r={m.r}, "
                               f"alpha={m.alpha}")
    units = {}
    fused = model.spec.fused_checkpoint
    for name, m in mods.items():
        parent, _, leaf = name.rpartition(".")
        if fused and leaf in PART_TO_FUSED:
            key = parent + "." + PART_TO_FUSED[leaf]
            if key not in units:
                units[key] = _fused_unit(model.get_submodule(parent), FUSED_PARTS[PART_TO_FUSED[leaf]])
        else:
            units[name] = (m.lora_A.detach(), m.lora_B.detach(), int(m.r), float(m.alpha), bool(m.use_rslora))
    return units


# ---- MoE: per-expert adapters <-> PEFT's target_parameters tensors ---------------------------------------------

# names PEFT remaps from target_modules onto the expert stacks for these model types (its v4 -> v5 conversion)
_PEFT_REMAPPED_MOE = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w2", "w3")}
_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)((?:\.base_layer)*)\.lora_([AB])\.weight")


def _expert_units(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int, float, bool]]:
    """PEFT key prefix (e.g. model.layers.0.mlp.experts.base_layer) -> (lora_A (r E, in), lora_B (out, r E), r,
    alpha, rslora) for every per-expert adapter, as PEFT's nested ParamWrappers save them."""
    from .experts import LoraExperts

    units = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoraExperts):
            continue
        present = list(m.adapters)  # EXPERT_PROJECTIONS order: the first one is the innermost wrapper
        for depth, proj in enumerate(present):
            a = m.adapters[proj]
            E, r, K = a.lora_A.shape
            key = name + ".base_layer" * (len(present) - 1 - depth)
            units[key] = (a.lora_A.detach().reshape(E * r, K), a.lora_B.detach().permute(1, 2, 0).reshape(-1, r * E),
                          int(a.r), float(a.alpha), bool(a.use_rslora))
    return units


def _expert_target_parameters(model: nn.Module) -> list[str]:
    from .experts import LoraExperts

    names = {f"mlp.experts.{proj}" for m in model.modules() if isinstance(m, LoraExperts) for proj in m.adapters}
    return sorted(names)


def _router_modules(model: nn.Module) -> set[str]:
    """Module paths of the MoE routers that carry a LoRA (PEFT adapts them as parameter targets)."""
    from ..models.moe import SparseMoE

    out = set()
    for name, m in model.named_modules():
        if isinstance(m, SparseMoE) and isinstance(m.router_linear, LoraLinear):
            out.add(f"{name}.{m.router_name}")
    return out


def _patterns(units: dict, r: int, alpha: float) -> tuple[dict, dict]:
    """PEFT rank_pattern / alpha_pattern for the units whose (r, alpha) differ from the config's: keyed by the leaf
    name when every module of that name agrees (PEFT matches keys as a suffix of the module path), else by path."""
    by_leaf: dict[str, set] = {}
    for name, (_, _, ur, ua, _) in units.items():
        by_leaf.setdefault(name.rpartition(".")[2], set()).add((ur, ua))
    rank_pattern, alpha_pattern = {}, {}
    for name, (_, _, ur, ua, _) in units.items():
        leaf = name.rpartition(".")[2]
        key = leaf if len(by_leaf[leaf]) == 1 else re.escape(name)
        if ur != r:
            rank_pattern[key] = ur
        if ua != alpha:
            alpha_pattern[key] = ua
    return rank_pattern, alpha_pattern


def adapter_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT tensors (keys as PEFT saves them) and the adapter_config.json dict, without writing anything.

    Trained embeddings / LM head go out as `modules_to_save`; a sequence-classification head (`model.score`, a
    reward model) makes it a SEQ_CLS adapter with `score` in modules_to_save, as PEFT saves one."""
    units = {**_lora_units(model, allow_none=True), **_expert_units(model)}
    if not units:
        raise AdapterError("the model has no LoRA modules: call fasttune.add_lora(model, ...) or load an adapter first")
    routers = _router_modules(model)
    if model.spec.model_type in _PEFT_REMAPPED_MOE:
        dense = sorted(n for n in units if n.rpartition(".")[2] in _PEFT_REMAPPED_MOE[model.spec.model_type])
        if dense:
            raise AdapterError(
                f"LoRA on the dense MLP of a {model.spec.model_type} layer ({dense[0]}, ...) cannot be exported for "
                "PEFT: PEFT reads those names in target_modules as the experts' (transformers-4 adapters) and moves "
                "them onto the expert stacks. Train without LoRA on those layers' gate_proj/up_proj/down_proj (or "
                "export a merged model instead)")
    rslora = {u[4] for u in units.values()}
    if len(rslora) != 1:
        raise AdapterError("some LoRA modules use rsLoRA and others do not; PEFT's format has one use_rslora")
    cfg = model.lora_config
    counts: dict[tuple[int, float], int] = {}
    for _, _, ur, ua, _ in units.values():
        counts[(ur, ua)] = counts.get((ur, ua), 0) + 1
    configured = (int(cfg.r), float(cfg.alpha)) if cfg is not None else None
    r, alpha = configured if configured in counts else max(counts, key=counts.get)
    rank_pattern, alpha_pattern = _patterns(units, r, alpha)
    store_dtype = next(iter(units.values()))[0].dtype
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        tensors[PEFT_PREFIX + key] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()

    for name, (a, b, *_rest) in units.items():
        put(name + ".lora_A.weight", a.to(store_dtype))
        put(name + ".lora_B.weight", b.to(store_dtype))

    modules_to_save = []
    embed, lm_head = trained_full_weights(model)
    if embed:
        modules_to_save.append("embed_tokens")
        put("model.embed_tokens.weight", model.model.embed_tokens.weight)
    if lm_head and not model.spec.tie_word_embeddings:
        modules_to_save.append("lm_head")
        put("lm_head.weight", model.lm_head.weight)
    score = model.score
    if score is not None:
        modules_to_save.append("score")
        put("score.weight", score.weight)

    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if score is not None else "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(cfg, "dropout", 0.0) or 0.0),
        "target_modules": sorted({n.rpartition(".")[2] for n in units
                                  if n not in routers and not _EXPERT_KEY.fullmatch(n + ".lora_A.weight")}),
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    target_parameters = _expert_target_parameters(model) + sorted(
        {"mlp." + r.rpartition(".")[2] + ".weight" for r in routers})
    if target_parameters:
        config["target_parameters"] = target_parameters
    return tensors, config


def mods_dtype(mods: dict[str, nn.Module]) -> torch.dtype:
    return next(iter(mods.values())).lora_A.dtype


def _linear_shape(m: nn.Module) -> tuple[int, int]:
    base = m.base if isinstance(m, LoraLinear) else m
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
    save_file(tensors, str(path / PEFT_WEIGHTS), metadata={"format": "pt"})
    (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return [path / PEFT_WEIGHTS, path / PEFT_CONFIG]


# ---- loading ---------------------------------------------------------------------------------------------------

def read_adapter_config(path: str | os.PathLike) -> dict:
    cfg_file = Path(path) / PEFT_CONFIG
    if not cfg_file.exists():
        raise AdapterError(f"no {PEFT_CONFIG} in {path}: point at a folder saved by PEFT or fasttune")
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
    """PEFT's target_modules (names, full module paths, 'all-linear' or a regex over module paths) as fasttune
    leaf names."""
    tm = cfg.get("target_modules")
    if tm == "all-linear" or tm is None:
        leaves = set(ALL_TARGETS)
    elif isinstance(tm, str):
        pattern = re.compile(tm)
        leaves = set()
        for n, _ in model.named_modules():
            for cand in (n, n.replace("self_attn.q_proj", "self_attn.qkv_proj")
                         .replace("mlp.gate_proj", "mlp.gate_up_proj")):
                if pattern.fullmatch(cand):
                    leaves.add(n.rpartition(".")[2])
    else:  # PEFT's "all-linear" is saved resolved, as full paths (model.layers.0.mlp.down_proj): the leaf counts
        leaves = {t.rpartition(".")[2] for t in tm}
    expanded = set()
    for leaf in leaves:
        expanded.update(FUSED_PARTS.get(leaf, (leaf,)))
    unknown = expanded - set(ALL_TARGETS) - {LM_HEAD}
    if unknown:
        raise AdapterError(f"adapter targets {sorted(unknown)}, which fasttune cannot put LoRA on; "
                           f"supported targets: {', '.join(ALL_TARGETS)}, {LM_HEAD} (and Phi-3's qkv_proj, "
                           "gate_up_proj)")
    return [t for t in ALL_TARGETS + (LM_HEAD,) if t in expanded]


def _pattern_value(pattern: dict, key: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern key that matches the end of the module
    path, at a dot boundary, as a regex."""
    for k, v in pattern.items():
        if re.match(rf"(.*\.)?({k})$", key):
            return v
    return default


def _module_settings(cfg: dict, path: Path, module: str, rank: int) -> tuple[int, float]:
    """(r, alpha) of one adapter module (`module` as the checkpoint names it, Phi-3's fused modules included)."""
    r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
    if rank != r:
        raise AdapterError(f"{path}: {module} has rank {rank} but the adapter config says r={r}")
    return r, alpha


def load_adapter(model: nn.Module, path: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Put a PEFT LoRA adapter (made by PEFT, Unsloth, fasttune, ...) into a fasttune model.

    Adds LoRA modules with the adapter's r / alpha / targets when the model has none (a module with its own
    rank_pattern / alpha_pattern entry gets its own rank, e.g. Phi-3's fused qkv_proj at 3r), then copies the
    tensors; modules_to_save (embed_tokens, lm_head) replace the model's weights, and a SEQ_CLS adapter's `score`
    becomes `model.score`. With `trainable=False` the adapter is frozen (inference / export)."""
    path = Path(path)
    cfg = read_adapter_config(path)
    weights = path / PEFT_WEIGHTS
    if not weights.exists():
        raise AdapterError(f"no {PEFT_WEIGHTS} in {path} (pickled adapter_model.bin files are not read)")
    rslora = bool(cfg.get("use_rslora", False))
    spec = model.spec

    with safe_open(str(weights), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    state = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in state.items()}
    expert_pairs, expert_settings = _read_expert_adapters(cfg, path, state)
    router_targeted = any(t.endswith(("gate.weight", "router.weight")) for t in cfg.get("target_parameters") or [])

    # fused Phi-3 modules -> per-part LoRA at the fused module's rank and alpha (its A, its rows of B)
    lora_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    settings: dict[str, tuple[int, float]] = {}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        mod = key[: -len(".lora_A.weight")]
        b_key = mod + ".lora_B.weight"
        if b_key not in state:
            raise AdapterError(f"{path}: {key} has no matching lora_B")
        a, b = state.pop(key), state.pop(b_key)
        setting = _module_settings(cfg, path, mod, a.shape[0])
        parent, _, leaf = mod.rpartition(".")
        if leaf in FUSED_PARTS and spec.fused_checkpoint:
            for part, b_rows in zip(FUSED_PARTS[leaf], b.split(fused_split_sizes(spec, leaf), dim=0)):
                lora_pairs[parent + "." + part] = (a, b_rows)
                settings[parent + "." + part] = setting
        else:
            lora_pairs[mod] = (a, b)
            settings[mod] = setting
    if not lora_pairs and not expert_pairs:
        raise AdapterError(f"{path} holds no lora_A/lora_B tensors")

    # base weights of targeted modules (PEFT saves lm_head.base_layer.weight when lm_head is a target)
    base_weights = {k: state.pop(k) for k in [k for k in state if k.endswith(".base_layer.weight")]}
    modules_to_save = {k: v for k, v in state.items() if k.endswith(".weight")}
    leftover = set(state) - set(modules_to_save)
    if leftover:
        raise AdapterError(f"{path}: tensors fasttune does not understand: {sorted(leftover)[:5]}")

    if not lora_modules(model):
        targets = _target_leaf_names(cfg, model)
        present = {m.rpartition(".")[2] for m in lora_pairs}
        targets = [t for t in targets if t in present] or targets
        routers = {m for m in lora_pairs if m.endswith((".mlp.gate", ".mlp.router"))}
        if routers or router_targeted:
            targets = [t for t in targets if t not in ("gate", "router")] + ["router"]
        expert_projections = {proj for _, proj in expert_pairs}
        targets += (["gate_proj", "up_proj"] if "gate_up_proj" in expert_projections else []) + (
            ["down_proj"] if "down_proj" in expert_projections else [])
        targets = list(dict.fromkeys(targets))
        counts: dict[tuple[int, float], int] = {}
        for s in settings.values():
            counts[s] = counts.get(s, 0) + 1
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])  # the adapter's own setting, else the commonest;
        if (r, alpha) not in counts:  # modules with another one are re-made below
            r, alpha = max(counts, key=counts.get)
        dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
        add_lora(model, r=r, alpha=alpha, target_modules=targets, use_rslora=rslora, dropout=dropout,
                 train_embeddings="model.embed_tokens.weight" in modules_to_save,
                 train_lm_head="lm_head.weight" in modules_to_save)
        for name, (mr, ma) in settings.items():
            m = lora_modules(model).get(name)
            if m is not None and (mr, ma) != (r, alpha):
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                # A is overwritten below; a private generator leaves the global RNG alone
                setattr(owner, child, type(m)(m.base, mr, ma, dropout, rslora, torch.Generator().manual_seed(0)))
    else:  # an adapter loaded over existing LoRA modules: remember what it carries, so a re-export keeps it
        if model.lora_config is not None:
            model.set_adapters(model.lora_config,
                               model.trains_embeddings or "model.embed_tokens.weight" in modules_to_save,
                               model.trains_lm_head or "lm_head.weight" in modules_to_save)
    if "score.weight" in modules_to_save:  # a SEQ_CLS adapter (a reward model): its head
        model.attach_score(modules_to_save.pop("score.weight"))
        model.score.weight.requires_grad_(trainable)
    _place_expert_adapters(model, path, expert_pairs, expert_settings, trainable, rslora)
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
                param = owner.base.weight if isinstance(owner, LoraLinear) else owner.weight
            except AttributeError:
                raise AdapterError(f"{path}: {key} names no dense module of this model") from None
            if tuple(param.shape) != tuple(t.shape):
                raise AdapterError(f"{key}: adapter shape {tuple(t.shape)} != model shape {tuple(param.shape)}")
            param.copy_(t)
        for key, t in modules_to_save.items():
            try:
                param = model.get_submodule(key.rpartition(".")[0]).weight
            except AttributeError:
                raise AdapterError(f"{path}: modules_to_save tensor {key} names no module of this model") from None
            if tuple(param.shape) != tuple(t.shape):
                raise AdapterError(f"{key}: adapter shape {tuple(t.shape)} != model shape {tuple(param.shape)}")
            param.copy_(t)
            param.requires_grad_(trainable)
    return model


def _read_expert_adapters(cfg: dict, path: Path, state: dict[str, torch.Tensor]
                          ) -> tuple[dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], dict]:
    """Pop PEFT's expert-stack tensors from `state`: ((experts module path, projection) -> (A (E, r, in),
    B (E, out, r))) and their (r, alpha). The nesting depth (`base_layer` count) tells the projection apart, in the
    order PEFT wraps them (the experts' parameter order)."""
    from .experts import EXPERT_PROJECTIONS

    targeted = [proj for proj in EXPERT_PROJECTIONS
                if any(t.endswith(f"experts.{proj}") for t in cfg.get("target_parameters") or [])]
    pairs, settings = {}, {}
    for key in [k for k in state if _EXPERT_KEY.fullmatch(k)]:
        owner, nesting, which = _EXPERT_KEY.fullmatch(key).groups()
        if which != "A":
            continue
        depth = nesting.count(".base_layer")
        if depth >= len(targeted):
            raise AdapterError(f"{path}: {key} is nested {depth} deep but target_parameters names "
                               f"{len(targeted)} expert stack(s): {cfg.get('target_parameters')}")
        proj = targeted[len(targeted) - 1 - depth]
        b_key = key[: -len("A.weight")] + "B.weight"
        if b_key not in state:
            raise AdapterError(f"{path}: {key} has no matching lora_B")
        a, b = state.pop(key), state.pop(b_key)
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, f"{owner}.{proj}", cfg["r"]))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, f"{owner}.{proj}", cfg["lora_alpha"]))
        if a.shape[0] % r or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{path}: {owner} {proj}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                               f"split into experts of rank {r}")
        E = a.shape[0] // r
        pairs[(owner, proj)] = (a.reshape(E, r, a.shape[1]), b.reshape(b.shape[0], r, E).permute(2, 0, 1))
        settings[(owner, proj)] = (r, alpha)
    return pairs, settings


def _place_expert_adapters(model: nn.Module, path: Path, pairs: dict, settings: dict, trainable: bool,
                           rslora: bool) -> None:
    from .experts import ExpertAdapter, LoraExperts

    for (owner, proj), (a, b) in pairs.items():
        try:
            experts = model.get_submodule(owner)
        except AttributeError:
            raise AdapterError(f"{path} adapts {owner}.{proj}, which this model does not have") from None
        if not isinstance(experts, LoraExperts) or proj not in experts.adapters:
            raise AdapterError(f"{path} has LoRA weights for {owner}.{proj}, which the model has no adapter for")
        adapter = experts.adapters[proj]
        r, alpha = settings[(owner, proj)]
        if (adapter.r, adapter.alpha) != (r, alpha):  # another rank than add_lora's (e.g. PEFT's 2r on gate_up)
            w = getattr(experts.base, proj)
            adapter = ExpertAdapter(adapter.num_experts, adapter.in_features, adapter.out_features, r, alpha, rslora,
                                    w.dtype, w.device, None)
            experts.adapters[proj] = adapter
        if tuple(a.shape) != tuple(adapter.lora_A.shape) or tuple(b.shape) != tuple(adapter.lora_B.shape):
            raise AdapterError(f"{owner}.{proj}: adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} != model's "
                               f"A{tuple(adapter.lora_A.shape)} B{tuple(adapter.lora_B.shape)}")
        with torch.no_grad():
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
        adapter.lora_A.requires_grad_(trainable)
        adapter.lora_B.requires_grad_(trainable)
    for name, experts in model.named_modules():  # adapters the file does not cover stay at zero effect
        if isinstance(experts, LoraExperts):
            for proj, adapter in experts.adapters.items():
                if (name, proj) not in pairs:
                    with torch.no_grad():
                        adapter.lora_B.zero_()

