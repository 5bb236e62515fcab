"""Fused LoRA Functions (kernels/lora.py) against autograd of the plain formula, in float64.

Odd shapes, with and without bias, dense and NF4 base weights; both MLP modes (saved / recomputed gate-up).
"""
import pytest
import torch
from seeding import SESSION_SEED, generator

from fasttune.kernels.lora import (LoraProjection, lora_linear, lora_linear_reference, lora_mlp, lora_mlp_reference,
                                   lora_qkv, lora_qkv_reference)
from fasttune.kernels.nf4 import quantize_nf4

DT = torch.float64


# one thread: exact float comparisons need a fixed summation order (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = dict(rtol=1e-10, atol=1e-10)


def _projection(n_in, n_out, r, bias, nf4, scaling, gen):
    w = torch.randn(n_out, n_in, dtype=torch.float32, generator=gen) * 0.3
    weight = quantize_nf4(w) if nf4 else w.to(DT)
    b = torch.randn(n_out, dtype=DT, generator=gen) if bias else None
    A = (torch.randn(r, n_in, dtype=DT, generator=gen) * 0.3).requires_grad_(True)
    B = (torch.randn(n_out, r, dtype=DT, generator=gen) * 0.3).requires_grad_(True)  # non-zero: test dB, dA
    return LoraProjection(weight, b, A, B, scaling)


def _leaves(projs):
    return [t for p in projs for t in (p.lora_A, p.lora_B)]


def _compare(fn, ref, x, projs):
    out = fn(x, *projs)
    out = out if isinstance(out, tuple) else (out,)
    expected = ref(x, *projs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    weights = [torch.randn_like(o) for o in expected]
    leaves = [x] + _leaves(projs)
    got_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), leaves)
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(expected, weights)), leaves)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, **TOL)
    for name, g, e in zip(["x"] + [f"{i}" for i in range(len(leaves) - 1)], got_grads, ref_grads):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 33)])
def test_lora_linear_matches_autograd(bias, nf4, shape):
    gen = generator(bias, nf4, shape)
    p = _projection(67, 45, 5, bias, nf4, 1.7, gen)
    x = torch.randn(*shape, 67, dtype=DT, generator=gen, requires_grad=True)
    _compare(lambda x, p: lora_linear(x, *p), lambda x, p: lora_linear_reference(x, *p), x, [p])


def test_lora_linear_without_adapter_gives_dx_only():
    gen = generator(1)
    w = quantize_nf4(torch.randn(19, 70, generator=gen))
    x = torch.randn(4, 70, dtype=DT, generator=gen, requires_grad=True)
    y = lora_linear(x, w, None, None, None, 0.0)
    ref = x @ w.dequantize().to(DT).t()
    torch.testing.assert_close(y, ref, **TOL)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy @ w.dequantize().to(DT), **TOL)


def test_lora_linear_rejects_trainable_base():
    w = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="freeze"):
        lora_linear(torch.randn(2, 4), w, None, torch.randn(1, 4), torch.randn(3, 1), 1.0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_qkv_matches_autograd(bias, nf4):
    gen = generator(7, bias, nf4)
    hidden = 66
    projs = [_projection(hidden, 36, 3, bias, nf4, 2.0, gen), _projection(hidden, 12, 4, bias, nf4, 0.5, gen),
             _projection(hidden, 12, 2, bias, nf4, 1.0, gen)]
    x = torch.randn(2, 5, hidden, dtype=DT, generator=gen, requires_grad=True)
    _compare(lora_qkv, lora_qkv_reference, x, projs)


def test_lora_qkv_unused_output_and_frozen_input():
    """A graph that uses only q (k, v grads arrive as None) and an x that needs no gradient."""
    gen = generator(3)
    projs = [_projection(10, 8, 2, False, False, 1.0, gen) for _ in range(3)]
    x = torch.randn(3, 10, dtype=DT, generator=gen)
    q, k, v = lora_qkv(x, *projs)
    got = torch.autograd.grad(q.sum(), _leaves(projs), allow_unused=True)
    qr, kr, vr = lora_qkv_reference(x, *projs)
    ref = torch.autograd.grad(qr.sum(), _leaves(projs), allow_unused=True)
    for g, e in zip(got, ref):
        if e is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("save_gate_up", [True, False])
@pytest.mark.parametrize("bias,nf4", [(False, False), (True, False), (False, True)])
def test_lora_mlp_matches_autograd(activation, save_gate_up, bias, nf4):
    gen = generator(11, save_gate_up, bias, nf4)
    hidden, inter = 34, 71
    projs = [_projection(hidden, inter, 3, bias, nf4, 1.5, gen), _projection(hidden, inter, 5, bias, nf4, 0.7, gen),
             _projection(inter, hidden, 2, bias, nf4, 2.0, gen)]
    x = torch.randn(3, 7, hidden, dtype=DT, generator=gen, requires_grad=True)
    _compare(lambda x, *p: lora_mlp(x, *p, activation, save_gate_up),
             lambda x, *p: lora_mlp_reference(x, *p, activation), x, projs)


# max |error| / max |float64 oracle| on the same (rounded) inputs. 16-bit: x and W in that dtype, adapters float32
# masters cast for the GEMMs (the training set-up); what is left is the 16-bit arithmetic and its outputs' rounding.
MIXED_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["linear", "qkv", "mlp"])
def test_each_op_in_every_dtype_against_float64(op, dtype):
    """The mixed-precision path stays within the dtype's rounding of the float64 formula, forward and backward,
    and returns the adapters' gradients in their own (float32) dtype."""
    gen = generator("dtype", op, str(dtype))
    hidden, inter, r = 72, 100, 4

    def proj(n_in, n_out):
        w = (torch.randn(n_out, n_in, generator=gen) * n_in ** -0.5).to(dtype)
        A = (torch.randn(r, n_in, generator=gen) * 0.3).requires_grad_(True)
        B = (torch.randn(n_out, r, generator=gen) * 0.3).requires_grad_(True)
        return LoraProjection(w, None, A, B, 1.5)

    shapes = {"linear": [(hidden, inter)], "qkv": [(hidden, 64), (hidden, 32), (hidden, 32)],
              "mlp": [(hidden, inter), (hidden, inter), (inter, hidden)]}[op]
    projs = [proj(*sh) for sh in shapes]
    x = torch.randn(2, 9, hidden, generator=gen).to(dtype).requires_grad_(True)
    run = {"linear": lambda x, ps: (lora_linear(x, *ps[0]),), "qkv": lambda x, ps: lora_qkv(x, *ps),
           "mlp": lambda x, ps: (lora_mlp(x, *ps, "silu"),)}[op]
    ref = {"linear": lambda x, ps: (lora_linear_reference(x, *ps[0]),), "qkv": lambda x, ps: lora_qkv_reference(x, *ps),
           "mlp": lambda x, ps: (lora_mlp_reference(x, *ps, "silu"),)}[op]
    ref_projs = [LoraProjection(p.weight.double(), None, p.lora_A.detach().double().requires_grad_(True),
                                p.lora_B.detach().double().requires_grad_(True), p.scaling) for p in projs]
    x64 = x.detach().double().requires_grad_(True)
    outs, wants = run(x, projs), ref(x64, ref_projs)
    weights = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in wants]
    sum((o.double() * w).sum() for o, w in zip(outs, weights)).backward()
    sum((o * w).sum() for o, w in zip(wants, weights)).backward()
    tol = MIXED_TOL[dtype]

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()
    for o, w in zip(outs, wants):
        assert o.dtype == dtype and rel(o, w.detach()) <= tol, rel(o, w.detach())
    assert x.grad.dtype == dtype and rel(x.grad, x64.grad) <= tol, rel(x.grad, x64.grad)
    for i, (p, q) in enumerate(zip(projs, ref_projs)):
        for name in ("lora_A", "lora_B"):
            g, want = getattr(p, name).grad, getattr(q, name).grad
            assert g.dtype == torch.float32, (i, name, g.dtype)
            assert rel(g, want) <= tol, (i, name, rel(g, want), f"FASTTUNE_TEST_SEED={SESSION_SEED}")


_TRITON_SCRIPT = r"""
import torch
from fasttune.kernels.lora import LoraProjection, lora_mlp, lora_mlp_reference
from fasttune.kernels.nf4 import quantize_nf4
torch.manual_seed(SEED)
def proj(i, o, nf4):
    w = torch.randn(o, i) * i ** -0.5
    return LoraProjection(quantize_nf4(w) if nf4 else w, None, torch.randn(4, i).mul(0.1).requires_grad_(),
                          torch.randn(o, 4).mul(0.1).requires_grad_(), 2.0)
worst = 0.0
for nf4 in (False, True):
    for save in (True, False):
        ps = [proj(32, 80, nf4), proj(32, 80, nf4), proj(80, 32, nf4)]
        x = torch.randn(2, 9, 32, requires_grad=True)
        y = lora_mlp(x, *ps, "gelu_tanh", save)
        y.square().sum().backward()
        x2 = x.detach().double().requires_grad_()
        ps2 = [LoraProjection((p.weight.dequantize() if nf4 else p.weight).double(), None,
                              p.lora_A.detach().double().requires_grad_(), p.lora_B.detach().double().requires_grad_(),
                              2.0) for p in ps]
        y2 = lora_mlp_reference(x2, *ps2, "gelu_tanh")
        y2.square().sum().backward()
        pairs = [(y, y2), (x.grad, x2.grad)] + [(p.lora_A.grad, q.lora_A.grad) for p, q in zip(ps, ps2)]
        worst = max([worst] + [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in pairs])
print("WORST", worst)
"""


def test_lora_mlp_through_triton_interpreter():
    """The CUDA path of the fused MLP (Triton GLU and NF4 dequantisation kernels) run by the Triton interpreter."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", FASTTUNE_KERNELS="triton", OMP_NUM_THREADS="1")
    script = _TRITON_SCRIPT.replace("SEED", str(SESSION_SEED))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst < 1e-5, worst  # float32 kernels against the float64 reference
