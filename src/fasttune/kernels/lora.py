"""Fused LoRA projections: y = x W^T + b + s (x A^T) B^T with a hand-written backward.

Shapes: x (N, k), frozen W (n, k) (bf16/fp16/fp32, or NF4 dequantised on the fly), b (n,), A (r, k), B (n, r),
s = alpha / r (or alpha / sqrt(r) for rsLoRA). Let u = x A^T (N, r), the only extra activation LoRA needs.
Forward:   y  = x W^T + b + s u B^T                  (two GEMMs; the rank-r one is added in place, addmm)
Backward, given dy (N, n), with g = s dy B (N, r):
           dx = dy W + g A                           (W read again - NF4 is dequantised again, never saved)
           dA = g^T x                                (r, k)
           dB = s dy^T u                             (n, r)
           db = sum_rows dy                          (only when the bias is trainable)
The dense delta s B A (n, k) is never formed and dW is never computed (W is frozen). Saved: x and u only.

q, k, v in one node (`LoraQKVFunction`): x is saved once for all three; the forward is the three base GEMMs plus
one GEMM against A_qkv = [A_q; A_k; A_v] (sum r, k) instead of three rank-r ones (a single base GEMM, reading x
once, would need W_q, W_k, W_v stored as one matrix); the backward accumulates dx = sum_p dy_p W_p + G A_qkv in
place, with G = [s_q dy_q B_q, s_k dy_k B_k, s_v dy_v B_v], and dA_qkv = G^T x is one GEMM.

Gated MLP in one node (`LoraMLPFunction`), act = silu / gelu / gelu_tanh:
    g = lora(x; gate),  p = lora(x; up),  a = act(g) * p,  y = lora(a; down)
    da = dy W_d + g_d A_d,  dg = da * p * act'(g),  dp = da * act(g),  dx = dg W_g + dp W_u + G A_gu
Saved tensors: x, the rank-r products, and (by default) g and p; a = act(g) * p is recomputed in the backward
(one elementwise pass, the GLU kernel) instead of being saved. Why g and p and not recompute them from x:
recomputing costs two of the MLP's three big GEMMs again (~+25% of the layer's FLOPs, and for NF4 two more
dequantisations), while the memory policy already bounds saved activations by checkpointing whole layers - and
under checkpointing the layer's forward is re-run anyway, so a recompute here would compute g and p a third
time. For very long sequences (where even one layer's 2 x tokens x intermediate is too much) the memory policy
sets `save_gate_up=False` together with MLP token chunking: then only x is saved and g, p are recomputed per
chunk in the backward.

There is no Triton kernel here: every step is a GEMM (cuBLAS is the fastest there is for these shapes) except
the GLU, which calls `fasttune.kernels.glu` (Triton on CUDA), and the NF4 dequantisation (Triton on CUDA); an NF4
base over at most nf4_matmul.MAX_ROWS rows (decode steps) skips the dequantisation and runs the fused NF4 matmul
(kernels/nf4_matmul.py, Triton on CUDA) for x W^T. The same Functions therefore run on CPU. The `*_reference`
functions are the plain formulas under autograd (the test oracle). LoRA matrices may be float32 masters while x is bf16: they are cast to x's dtype for the GEMMs
and their gradients are returned in their own dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .nf4 import NF4Tensor
from .nf4_matmul import FALLBACKS as NF4_MATMUL_FALLBACKS
from .nf4_matmul import nf4_matmul_triton, nf4_matmul_wanted

class LoraProjection(NamedTuple):
    """One projection's operands: frozen weight (dense or NF4), optional bias, adapters (None = no adapter)."""
    weight: torch.Tensor | NF4Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None
    scaling: float


def dense_weight(w: torch.Tensor | NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight as a dense tensor of `dtype` (a quantised weight - NF4Tensor, GGUFWeight, anything with
    `dequantize(dtype=)` per models.quantized - is dequantised into a temporary, straight into `dtype` where its
    kernel can)."""
    if not isinstance(w, torch.Tensor):
        w = w.dequantize(dtype=dtype)
    return w if w.dtype == dtype else w.to(dtype)


def _base(x2: torch.Tensor, w: torch.Tensor | NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 W^T + b. An NF4 W over few rows (decode) runs the fused NF4 matmul (kernels/nf4_matmul.py): it reads the
    packed weight once instead of dequantising all of it for a handful of rows; the weights it multiplies by are
    the dequantised ones bit for bit."""
    if isinstance(w, NF4Tensor) and nf4_matmul_wanted(x2, w):
        try:
            return nf4_matmul_triton(x2, w, bias)
        except Exception as e:  # noqa: BLE001 - a compiler or launch failure on some GPU: logged, not tried again
            NF4_MATMUL_FALLBACKS.fail("nf4-matmul", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    wd = dense_weight(w, x2.dtype)
    if bias is None:
        return x2 @ wd.t()
    return torch.addmm(bias.to(x2.dtype), x2, wd.t())


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _grad_bias(dy2: torch.Tensor, bias: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    return dy2.sum(0).to(bias.dtype) if needed and bias is not None else None


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T; A, B may be None (frozen projection, e.g. NF4 without adapter)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        y = _base(x2, weight, bias)
        u = A = B = None
        if lora_A is not None:
            A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
            u = x2 @ A.t()
            y.addmm_(u, B.t(), alpha=scaling)
            ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        ctx.weight, ctx.scaling, ctx.x_shape = weight, scaling, x.shape
        # the adapters in x's dtype, as the forward cast them (r (k + n) elements): the backward does not cast again
        ctx.save_for_backward(x2, u, bias, A, B)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, u, bias, A, B = ctx.saved_tensors
        need_x, _, need_b, need_A, need_B, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        s = ctx.scaling
        dx = dA = dB = None
        g = None
        if A is not None:
            A, B = A.to(dy.dtype), B.to(dy.dtype)  # no-ops unless dy's dtype differs from x's
            g = (dy2 @ B).mul_(s) if (need_x or need_A) else None
            if need_A:
                dA = (g.t() @ x2).to(ctx.adapter_dtypes[0])
            if need_B:
                dB = (dy2.t() @ u).mul_(s).to(ctx.adapter_dtypes[1])
        if need_x:
            dx = dy2 @ dense_weight(ctx.weight, dy.dtype)
            if g is not None:
                dx.addmm_(g, A)
            dx = dx.view(ctx.x_shape)
        return dx, None, _grad_bias(dy2, bias, need_b), dA, dB, None


def _check_frozen(*weights) -> None:
    for w in weights:
        if isinstance(w, torch.Tensor) and w.requires_grad:
            raise ValueError("the fused LoRA kernels never compute a gradient for the base weight W; freeze it "
                             "(weight.requires_grad_(False)) or train it without LoRA")


def lora_linear(x: torch.Tensor, weight: torch.Tensor | NF4Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """x W^T + b + scaling (x A^T) B^T with the memory-lean backward above (A = B = None: frozen W only)."""
    _check_frozen(weight)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling))


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling):
    y = torch.nn.functional.linear(x, dense_weight(weight, x.dtype), _cast(bias, x.dtype))
    if lora_A is None:
        return y
    return y + scaling * ((x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t())


# ---- several projections of the same input (q, k, v) -----------------------------------------------------

def _stack_A(projs: list[LoraProjection], dtype: torch.dtype) -> tuple[torch.Tensor, list[int]]:
    """[A_1; A_2; ...] in `dtype` and the ranks, for one GEMM x A^T over all adapters."""
    return torch.cat([p.lora_A.to(dtype) for p in projs], 0), [p.lora_A.shape[0] for p in projs]


def _multi_forward(x2: torch.Tensor, projs: list[LoraProjection]):
    A_all, ranks = _stack_A(projs, x2.dtype)
    u_all = x2 @ A_all.t()
    outs = []
    for p, u in zip(projs, u_all.split(ranks, 1)):
        y = _base(x2, p.weight, p.bias)
        y.addmm_(u, p.lora_B.to(x2.dtype).t(), alpha=p.scaling)
        outs.append(y)
    return outs, u_all


def _multi_backward(x2, u_all, projs, dys, need_x, need_A, need_B, need_b):
    """dx (or None) and, per projection, (db, dA, dB) for ys = [x W_p^T + b_p + s_p (x A_p^T) B_p^T]."""
    dtype = dys[0].dtype
    A_all, ranks = _stack_A(projs, dtype)
    gs = [(dy @ p.lora_B.to(dtype)).mul_(p.scaling) for p, dy in zip(projs, dys)]
    G = torch.cat(gs, 1)  # (N, sum r)
    grads = []
    dA_all = (G.t() @ x2).split(ranks, 0) if need_A else [None] * len(projs)
    for p, dy, u, dA in zip(projs, dys, u_all.split(ranks, 1), dA_all):
        dB = (dy.t() @ u).mul_(p.scaling).to(p.lora_B.dtype) if need_B else None
        grads.append((_grad_bias(dy, p.bias, need_b), None if dA is None else dA.to(p.lora_A.dtype), dB))
    dx = None
    if need_x:
        dx = dys[0] @ dense_weight(projs[0].weight, dtype)
        for p, dy in zip(projs[1:], dys[1:]):
            dx.addmm_(dy, dense_weight(p.weight, dtype))
        dx.addmm_(G, A_all)
    return dx, grads


class LoraQKVFunction(torch.autograd.Function):
    """(q, k, v) = three LoRA projections of the same x in one autograd node: x saved once, dx accumulated."""

    @staticmethod
    def forward(ctx, x, wq, bq, Aq, Bq, sq, wk, bk, Ak, Bk, sk, wv, bv, Av, Bv, sv):
        projs = [LoraProjection(wq, bq, Aq, Bq, sq), LoraProjection(wk, bk, Ak, Bk, sk),
                 LoraProjection(wv, bv, Av, Bv, sv)]
        x2 = x.reshape(-1, x.shape[-1])
        outs, u_all = _multi_forward(x2, projs)
        ctx.weights, ctx.scalings, ctx.x_shape = (wq, wk, wv), (sq, sk, sv), x.shape
        ctx.save_for_backward(x2, u_all, bq, Aq, Bq, bk, Ak, Bk, bv, Av, Bv)
        lead = x.shape[:-1]
        return tuple(o.view(*lead, o.shape[-1]) for o in outs)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x2, u_all, bq, Aq, Bq, bk, Ak, Bk, bv, Av, Bv = ctx.saved_tensors
        n = ctx.needs_input_grad
        projs = [LoraProjection(w, b, A, B, s) for w, b, A, B, s in
                 zip(ctx.weights, (bq, bk, bv), (Aq, Ak, Av), (Bq, Bk, Bv), ctx.scalings)]
        outs = (dq, dk, dv)
        dys = [(d if d is not None else torch.zeros(*ctx.x_shape[:-1], p.lora_B.shape[0], dtype=x2.dtype,
                                                     device=x2.device)).reshape(-1, p.lora_B.shape[0])
               for d, p in zip(outs, projs)]
        need_b = n[2] or n[7] or n[12]
        dx, grads = _multi_backward(x2, u_all, projs, dys, n[0], n[3] or n[8] or n[13], n[4] or n[9] or n[14],
                                    need_b)
        result = [None if dx is None else dx.view(ctx.x_shape)]
        for i, (db, dA, dB) in enumerate(grads):
            base = 1 + 5 * i
            result += [None, db if n[base + 1] else None, dA if n[base + 2] else None,
                       dB if n[base + 3] else None, None]
        return tuple(result)


def lora_qkv(x: torch.Tensor, q: LoraProjection, k: LoraProjection, v: LoraProjection):
    """(q, k, v) projections of x, each with its adapter, as one autograd node (see the module docstring)."""
    for p in (q, k, v):
        if p.lora_A is None:
            raise ValueError("lora_qkv needs an adapter on each of q, k and v; use lora_linear per projection")
        _check_frozen(p.weight)
    return LoraQKVFunction.apply(x, *q[:4], float(q.scaling), *k[:4], float(k.scaling), *v[:4], float(v.scaling))


def lora_qkv_reference(x, q: LoraProjection, k: LoraProjection, v: LoraProjection):
    return tuple(lora_linear_reference(x, *p) for p in (q, k, v))


# ---- gated MLP ---------------------------------------------------------------------------------------------

def _glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    from . import glu  # the dispatcher: Triton on CUDA, reference elsewhere (late import: package init order)

    return glu(gate, up, activation)


class LoraMLPFunction(torch.autograd.Function):
    """y = down(act(gate(x)) * up(x)), every projection with a LoRA adapter, one autograd node."""

    @staticmethod
    def forward(ctx, x, wg, bg, Ag, Bg, sg, wu, bu, Au, Bu, su, wd, bd, Ad, Bd, sd, activation: str,
                save_gate_up: bool):
        gate_up = [LoraProjection(wg, bg, Ag, Bg, sg), LoraProjection(wu, bu, Au, Bu, su)]
        x2 = x.reshape(-1, x.shape[-1])
        (g, p), u_gu = _multi_forward(x2, gate_up)
        a = _glu(g, p, activation)
        ud = a @ Ad.to(a.dtype).t()
        y = _base(a, wd, bd)
        y.addmm_(ud, Bd.to(a.dtype).t(), alpha=sd)
        del a
        ctx.weights, ctx.scalings, ctx.x_shape = (wg, wu, wd), (sg, su, sd), x.shape
        ctx.activation, ctx.save_gate_up = activation, save_gate_up
        saved_gp = (g, p) if save_gate_up else (None, None)
        ctx.save_for_backward(x2, u_gu, ud, *saved_gp, bg, Ag, Bg, bu, Au, Bu, bd, Ad, Bd)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, u_gu, ud, g, p, bg, Ag, Bg, bu, Au, Bu, bd, Ad, Bd = ctx.saved_tensors
        n = ctx.needs_input_grad
        wg, wu, wd = ctx.weights
        sg, su, sd = ctx.scalings
        gate_up = [LoraProjection(wg, bg, Ag, Bg, sg), LoraProjection(wu, bu, Au, Bu, su)]
        dtype = dy.dtype
        if g is None:  # recompute the gate and up projections (x and the saved rank-r products suffice)
            g, p = (_base(x2, q.weight, q.bias).addmm_(u, q.lora_B.to(dtype).t(), alpha=q.scaling)
                    for q, u in zip(gate_up, u_gu.split([Ag.shape[0], Au.shape[0]], 1)))
        dy2 = dy.reshape(-1, dy.shape[-1])
        # recompute a = act(g) * p through the GLU op, keeping its graph for the GLU backward
        with torch.enable_grad():
            g_ = g.detach().requires_grad_(True)
            p_ = p.detach().requires_grad_(True)
            a_graph = _glu(g_, p_, ctx.activation)
        a = a_graph.detach()
        # down projection
        Ad_c = Ad.to(dtype)
        gd = (dy2 @ Bd.to(dtype)).mul_(sd)
        dAd = (gd.t() @ a).to(Ad.dtype) if n[13] else None
        dBd = (dy2.t() @ ud).mul_(sd).to(Bd.dtype) if n[14] else None
        dbd = _grad_bias(dy2, bd, n[12])
        del a
        da = dy2 @ dense_weight(wd, dtype)
        da.addmm_(gd, Ad_c)
        dg, dp = torch.autograd.grad(a_graph, (g_, p_), da)
        del a_graph, g_, p_, da, g, p
        need_x = n[0]
        dx, ((dbg, dAg, dBg), (dbu, dAu, dBu)) = _multi_backward(
            x2, u_gu, gate_up, [dg, dp], need_x, n[3] or n[8], n[4] or n[9], n[2] or n[7])
        return (None if dx is None else dx.view(ctx.x_shape),
                None, dbg if n[2] else None, dAg if n[3] else None, dBg if n[4] else None, None,
                None, dbu if n[7] else None, dAu if n[8] else None, dBu if n[9] else None, None,
                None, dbd, dAd, dBd, None, None, None)


def lora_mlp(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection, activation: str,
             save_gate_up: bool = True) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with an adapter on each projection, one autograd node (module docstring)."""
    for p in (gate, up, down):
        if p.lora_A is None:
            raise ValueError("lora_mlp needs an adapter on each of gate, up and down; use lora_linear instead")
        _check_frozen(p.weight)
    return LoraMLPFunction.apply(x, *gate[:4], float(gate.scaling), *up[:4], float(up.scaling), *down[:4],
                                 float(down.scaling), activation, bool(save_gate_up))


def lora_mlp_reference(x, gate: LoraProjection, up: LoraProjection, down: LoraProjection, activation: str):
    from .glu import glu_reference

    return lora_linear_reference(glu_reference(lora_linear_reference(x, *gate), lora_linear_reference(x, *up),
                                               activation), *down)
