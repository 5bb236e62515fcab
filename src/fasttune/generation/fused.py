"""Concatenated projection weights for generation: q, k, v as one matmul, gate and up as one matmul.

Why: at batch 1 a decode step is a chain of matrix-vector products, each its own launch, and the small ones (k and
v: 1024 x 4096 at the Llama-3.1-8B shape) run far from the memory bandwidth. Over W_qkv = [W_q; W_k; W_v] and
W_gu = [W_gate; W_up] a layer's seven projection launches become four, and x is read once per group.

The model keeps each projection as its own tensor (checkpoint names, optimiser, LoRA, exporters rely on that), so
the concatenation is a copy: `FusedProjections` holds W_qkv and W_gu of every layer, allocated with the KV cache
and freed with it (`Generator.release`), and refreshed (copied again from the model) at every generate call, so
weights changed in place between calls (an optimiser step, a merged LoRA) are always what it computes with.
Memory: layers x (q + k + v + gate + up output features) x hidden x itemsize (`fused_projection_bytes`); at the
Llama-3.1-8B shape in bf16, 32 x 34816 x 4096 x 2 B = 9.1 GB, of which q, k, v are 1.6 GB. One refresh reads and
writes those bytes once.

Adapters: a projection whose LoRA adapter is active (unmerged) adds its update inside its group's matmul,
    y = x W_cat^T + b_cat + c (x A_cat^T) B_blk^T
with A_cat = [A_q; A_k; A_v] (sum of ranks, hidden) and B_blk block-diagonal (the blocks off the diagonal are zeros,
which add exact zeros), c the adapters' common scaling (each B block pre-multiplied by its own scaling when they
differ); a group of projections without active adapters is the one matmul. Disabled adapters compute as the
base. A merged call (`merge_lora`) writes W + s B A (rounded to W's dtype, as `merged_lora` rounds it) straight
into the copies and leaves those base weights alone (`merged_lora(..., elsewhere=adapted_members())`): no host
round trip for them. The projections are computed in the weights' dtype, as the per-projection path does (A and B
cast to it).

GEMV (`gemv="triton"`): at most kernels.gemv.MAX_ROWS rows (a decode step of few sequences) run the Triton GEMV
(kernels/gemv.py) instead of cuBLAS for the concatenated q/k/v and gate/up (their adapters' low-rank term added
after, as above), for down_proj with the GLU as the GEMV's prologue when gate/up are concatenated (one launch
reads the packed gate/up output: no GLU kernel, no (rows, I) intermediate) and for o_proj (through `Attention.use_fused_o`); down_proj and o_proj
only while their weight is dense and carries no active unmerged adapter (otherwise their module runs, the GLU
as its own kernel: noted once). More rows (prefill, large batches) run cuBLAS. "triton-o-down": the GEMV for o_proj
and down_proj (GLU fused) at one row only, where it measured faster (`_GEMV_ROWS`). "cublas" (the default): F.linear
everywhere.

Layers whose projections are not all dense (an NF4 / GGUF quantised base, a sharded weight) keep their own path
(noted once). The groups run through the decoder's hooks, `Attention.use_fused_qkv` and
`GatedMLP.use_fused_forward`, installed for the call (`installed()`); the hooks the model had (the LoRA kernels'
FusedQKV / FusedMLP) are put back after.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..adapters import LoraLinear
from ..kernels import gemv as _gemv
from ..kernels.attention import FALLBACKS
from ..models.decoder import Attention, CausalLM, GatedMLP

GROUPS = ("qkv", "gate_up")
GEMVS = ("cublas", "triton", "triton-o-down")
# rows a decode step may have for the Triton GEMV, per setting: (q/k/v and gate/up, o_proj and down_proj). The H200
# measurements (bench/RESULTS.md, 2026-12-03 night): at one row the GEMV beat cuBLAS for o_proj (6.1 vs 10.0 us) and
# down_proj (30.4 vs 32.6 us, plus the split-K reduce and the GLU kernel it replaces) but not for q/k/v, gate/up or
# the LM head; at 8 rows it lost everywhere (down_proj 192 vs 34 us). "triton-o-down" takes the winners only.
_GEMV_ROWS = {"cublas": (0, 0), "triton": (_gemv.MAX_ROWS, _gemv.MAX_ROWS), "triton-o-down": (0, 1)}
_MEMBERS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def _dense(module: nn.Module) -> nn.Linear | None:
    """The dense nn.Linear a projection computes with (itself or a LoraLinear's base); None when it is quantised or
    its weight is not a plain tensor (a sharded DTensor)."""
    base = module.base if isinstance(module, LoraLinear) else module
    if not isinstance(base, nn.Linear) or type(base.weight.data) is not torch.Tensor:
        return None
    return base


def _unadapted(module: nn.Module) -> nn.Linear | None:
    """The dense nn.Linear that computes `module` alone: None when it is quantised or sharded, or when it carries an
    active (unmerged) LoRA adapter."""
    if isinstance(module, LoraLinear) and not module.disabled:
        return None
    return _dense(module)


def check_gemv(gemv: str) -> str:
    if gemv not in GEMVS:
        raise ValueError(f"gemv: {gemv!r} is not one of {list(GEMVS)}")
    return gemv


def _gemv_rows(x: torch.Tensor, max_rows: int) -> bool:
    """Whether x (..., K) goes through the Triton GEMV: at most `max_rows` rows (0: not asked for; static shapes: no
    sync), and Triton runs for x's device (on CUDA; on CPU with FASTTUNE_KERNELS=triton, the interpreter)."""
    if not max_rows or x.numel() > max_rows * x.shape[-1]:
        return False
    if kernels.use_triton(x):
        return True
    FALLBACKS.note("generation-gemv-unavailable",
                   f"generation: gemv='triton' asked for, but Triton kernels do not run for {x.device.type} tensors "
                   "here (CPU without FASTTUNE_KERNELS=triton, FASTTUNE_KERNELS=reference, or no Triton): decode "
                   "projections run F.linear")
    return False


def _candidates(model: CausalLM, groups: Sequence[str]) -> Iterator[tuple[str, nn.Module, list[nn.Module]]]:
    for layer in model.model.layers:
        for kind in groups:
            owner = layer.self_attn if kind == "qkv" else layer.mlp
            if kind == "gate_up" and not isinstance(owner, GatedMLP):  # MoE layers: the experts' own kernels
                continue
            yield kind, owner, [getattr(owner, name) for name in _MEMBERS[kind]]


def check_groups(groups: Sequence[str]) -> tuple[str, ...]:
    """The group names, validated: a subset of ("qkv", "gate_up")."""
    groups = tuple(groups)
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        raise ValueError(f"fuse_projections: unknown group(s) {bad}; choose from {list(GROUPS)}")
    return groups


def fused_projection_bytes(model: CausalLM, groups: Sequence[str] = GROUPS) -> int:
    """Bytes `FusedProjections(model, groups)` allocates for the concatenated weights (adapter blocks aside)."""
    total = 0
    for _, _, members in _candidates(model, check_groups(groups)):
        bases = [_dense(m) for m in members]
        if all(b is not None for b in bases):
            total += sum(b.weight.numel() for b in bases) * bases[0].weight.element_size()
    return total


class _Group:
    """One layer's concatenated projections: the weight (and bias), the active adapters' A_cat / B_blk."""

    def __init__(self, kind: str, owner: nn.Module, members: list[nn.Module], gemv: str = "cublas"):
        self.kind, self.owner, self.members = kind, owner, members
        self.gemv_rows, self.gemv_rows_down = _GEMV_ROWS[gemv]
        self.bases = [_dense(m) for m in members]
        w = self.bases[0].weight
        if any(b.weight.dtype != w.dtype or b.weight.device != w.device or b.in_features != w.shape[1]
               for b in self.bases):
            raise ValueError(f"{kind}: the projections differ in dtype, device or input size; cannot concatenate")
        self.sizes = [b.out_features for b in self.bases]
        self.weight = torch.empty(sum(self.sizes), w.shape[1], dtype=w.dtype, device=w.device)
        has_bias = any(b.bias is not None for b in self.bases)
        # zeros where a member has no bias: adding them changes nothing
        self.bias = torch.zeros(sum(self.sizes), dtype=w.dtype, device=w.device) if has_bias else None
        self.lora: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (A_cat, B_blk, c)
        self._lora_layout: tuple | None = None

    @property
    def nbytes(self) -> int:
        tensors = [self.weight, self.bias] + (list(self.lora[:2]) if self.lora is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def data_ptrs(self) -> tuple[int, ...]:
        tensors = [self.weight, self.bias] + (list(self.lora[:2]) if self.lora is not None else [])
        return tuple(t.data_ptr() for t in tensors if t is not None)

    @torch.no_grad()
    def refresh(self, merged: set[int]) -> None:
        offset = 0
        for member, base, n in zip(self.members, self.bases, self.sizes):
            # a merged member: its merged weight, rounded to the dtype as merged_lora writes it into the base
            self.weight[offset:offset + n].copy_(member.merged_weight() if id(member) in merged else base.weight)
            if base.bias is not None:
                self.bias[offset:offset + n].copy_(base.bias)
            offset += n
        self._refresh_lora()

    def _refresh_lora(self) -> None:
        active = [i for i, m in enumerate(self.members) if isinstance(m, LoraLinear) and not m.disabled]
        if not active:
            self.lora, self._lora_layout = None, None
            return
        ranks = [self.members[i].r for i in active]
        scalings = {self.members[i].scaling for i in active}
        common = scalings.pop() if len(scalings) == 1 else None
        layout = (tuple(active), tuple(ranks), common is None)
        if layout != self._lora_layout:  # new buffers only when the set of adapters changes (B_blk's zeros stay)
            w = self.weight
            A = torch.empty(sum(ranks), w.shape[1], dtype=w.dtype, device=w.device)
            B = torch.zeros(w.shape[0], sum(ranks), dtype=w.dtype, device=w.device)
            self.lora, self._lora_layout = (A, B, 1.0 if common is None else common), layout
        A, B, _ = self.lora
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        r0 = 0
        for i, r in zip(active, ranks):
            m = self.members[i]
            A[r0:r0 + r].copy_(m.lora_A)
            b = m.lora_B if common is not None else m.lora_B * m.scaling
            B[starts[i]:starts[i] + self.sizes[i], r0:r0 + r].copy_(b)
            r0 += r

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> the members' outputs side by side (..., sum of output features)."""
        if _gemv_rows(x, self.gemv_rows):
            y = _gemv.gemv(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            A, B, c = self.lora
            x2 = x.reshape(-1, x.shape[-1])
            y.view(-1, y.shape[-1]).addmm_(x2 @ A.t(), B.t(), alpha=c)
        return y


class _FusedQKV:
    """`Attention.fused_qkv` hook: q, k, v as views of one matmul's output."""

    def __init__(self, group: _Group):
        self.group = group

    def __call__(self, x: torch.Tensor):
        return self.group.project(x).split(self.group.sizes, dim=-1)


class _FusedGateUp:
    """`GatedMLP.fused_forward` hook: gate and up from one matmul, the GLU on its two halves (views), then down."""

    def __init__(self, group: _Group, mlp: GatedMLP):
        self.group, self.mlp = group, mlp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group.project(x)
        down = self.mlp.down_proj
        if _gemv_rows(h, self.group.gemv_rows_down):
            base = _unadapted(down)
            if base is not None:  # the GLU as the GEMV's prologue: h is [gate | up], the layout glu_packed reads
                return _gemv.gemv(h, base.weight, base.bias, glu=self.mlp.activation)
            FALLBACKS.note("generation-gemv-down-adapted",
                           "generation: gemv='triton' with a down_proj that is quantised or carries an active "
                           "unmerged LoRA adapter: its GLU runs as its own kernel and down_proj as its module "
                           "(merge_lora=True merges the adapters for the call)")
        gate, up = h.split(self.group.sizes, dim=-1)
        return down(kernels.glu(gate, up, self.mlp.activation))


class _OutProj:
    """`Attention.fused_o` hook (gemv="triton"): o_proj through the Triton GEMV for decode rows."""

    def __init__(self, attn: Attention, max_rows: int):
        self.o, self.max_rows = attn.o_proj, max_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _gemv_rows(x, self.max_rows):
            base = _unadapted(self.o)
            if base is not None:
                return _gemv.gemv(x, base.weight, base.bias)
            FALLBACKS.note("generation-gemv-o-adapted",
                           "generation: gemv='triton' with an o_proj that is quantised or carries an active "
                           "unmerged LoRA adapter: o_proj runs as its module (cuBLAS)")
        return self.o(x)


class FusedProjections:
    """The concatenated q/k/v and gate/up weights of `model`'s layers (the `groups` named), see the module
    docstring. `refresh()` copies the model's current weights (and adapters) in; `installed()` routes the layers'
    projections through them for the duration of a block. `gemv`: "cublas" or "triton" (the module docstring; with
    "triton" the o_proj hooks are installed too, even without groups)."""

    def __init__(self, model: CausalLM, groups: Sequence[str] = GROUPS, gemv: str = "cublas"):
        self.groups: list[_Group] = []
        self.gemv = check_gemv(gemv)
        self.o_rows = _GEMV_ROWS[gemv][1]
        self.attentions = [layer.self_attn for layer in model.model.layers] if self.o_rows else []
        skipped = 0
        for kind, owner, members in _candidates(model, check_groups(groups)):
            if any(_dense(m) is None for m in members):
                skipped += 1
                continue
            self.groups.append(_Group(kind, owner, members, gemv))
        if skipped:
            FALLBACKS.note("generation-unfused-projections",
                           f"generation: {skipped} projection group(s) (q/k/v or gate/up of a layer) have a "
                           "quantised or sharded weight and run one projection at a time (no dense concatenation)")

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    def data_ptrs(self) -> tuple[int, ...]:
        """Where the buffers live (a captured decode step reads them)."""
        return tuple(p for g in self.groups for p in g.data_ptrs())

    def adapted_members(self) -> list[LoraLinear]:
        """The projections in the copies whose LoRA adapter is active now (what a merged call merges into them)."""
        return [m for g in self.groups for m in g.members if isinstance(m, LoraLinear) and not m.disabled]

    def refresh(self, merged: Sequence[LoraLinear] = ()) -> None:
        """Copy the model's current weights and active adapters in; `merged`: adapted projections whose merged weight
        W + s B A is written instead (their adapters disabled for the call by merged_lora)."""
        ids = {id(m) for m in merged}
        for g in self.groups:
            g.refresh(ids)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved: list[tuple[nn.Module, object]] = []
        saved_o: list[tuple[Attention, object]] = []
        try:
            for attn in self.attentions:
                saved_o.append((attn, attn.fused_o))
                attn.use_fused_o(_OutProj(attn, self.o_rows))
            for g in self.groups:
                if isinstance(g.owner, Attention):
                    saved.append((g.owner, g.owner.fused_qkv))
                    g.owner.use_fused_qkv(_FusedQKV(g))
                else:
                    saved.append((g.owner, g.owner.fused_forward))
                    g.owner.use_fused_forward(_FusedGateUp(g, g.owner))
            yield
        finally:
            for owner, hook in saved:
                if isinstance(owner, Attention):
                    owner.use_fused_qkv(hook)
                else:
                    owner.use_fused_forward(hook)
            for attn, hook in saved_o:
                attn.use_fused_o(hook)
