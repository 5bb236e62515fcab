"""gpt-oss's clamped SwiGLU as one autograd node (models.moe.ClampedSwiGLU): same forward as the elementwise ops,
their gradients (clamp bounds included), and only the gate_up projection output kept for the backward."""
from __future__ import annotations

import pytest
import torch

from fasttune.models.moe import ClampedSwiGLU, clamped_swiglu, split_gate_up

ALPHA, LIMIT = 1.702, 7.0


def _gate_up(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 2 * width, generator=g, dtype=torch.float64) * 6  # many values beyond +-LIMIT
    x.view(-1)[:4] = torch.tensor([LIMIT, -LIMIT, LIMIT, -LIMIT], dtype=torch.float64)  # on the bounds
    return x.to(dtype)


def _autograd(gate_up: torch.Tensor, interleaved: bool, dy: torch.Tensor):
    x = gate_up.detach().requires_grad_(True)
    y = clamped_swiglu(*split_gate_up(x, interleaved), ALPHA, LIMIT)
    y.backward(dy)
    return y.detach(), x.grad


def _function(gate_up: torch.Tensor, interleaved: bool, dy: torch.Tensor):
    x = gate_up.detach().requires_grad_(True)
    y = ClampedSwiGLU.apply(x, interleaved, ALPHA, LIMIT)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("chunk", [None, 24])  # None: one chunk; 24 values: several chunks, a partial last one
def test_matches_autograd_in_float64(interleaved, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(ClampedSwiGLU, "CHUNK_ELEMENTS", chunk)
    gate_up = _gate_up(37, 8, torch.float64)
    dy = torch.randn(37, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref, g_ref = _autograd(gate_up, interleaved, dy)
    y, g = _function(gate_up, interleaved, dy)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert (g_ref == 0).any() and (g_ref != 0).any()  # the clamps really cut some gradients


def test_bf16_forward_is_bitwise_and_backward_within_rounding():
    """bf16: the forward is the same ops (same bits); the gradients, computed in float32 and rounded once, are at
    least as close to the float64 gradient as autograd's bf16 chain of ops."""
    gate_up = _gate_up(64, 16, torch.bfloat16)
    dy = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y_ref, g_ref = _autograd(gate_up, True, dy)
    y, g = _function(gate_up, True, dy)
    assert torch.equal(y, y_ref)
    _, g64 = _autograd(gate_up.double(), True, dy.double())
    err, err_ref = (g.double() - g64).abs().max(), (g_ref.double() - g64).abs().max()
    assert err <= err_ref
    assert err <= 2 ** -8 * g64.abs().max()


def test_keeps_only_the_gate_up_output():
    """What autograd keeps for the backward: the gate_up tensor's storage alone (2 x width per row), where the
    elementwise ops kept 6 x width per row."""
    gate_up = _gate_up(32, 8, torch.float32)

    def saved_bytes(fn) -> int:
        x = gate_up.clone().requires_grad_(True)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x).sum().backward()
        return sum(storages.values())

    row = 8 * 4  # width x float32
    assert saved_bytes(lambda x: ClampedSwiGLU.apply(x, True, ALPHA, LIMIT)) == 32 * 2 * row
    assert saved_bytes(lambda x: clamped_swiglu(*split_gate_up(x, True), ALPHA, LIMIT)) == 32 * 6 * row


@pytest.fixture
def triton_kernels(monkeypatch):
    """The Triton kernels of kernels/clamped_swiglu.py through the interpreter (CPU)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_forward_equals_the_ops_and_backward_the_float32_formula(triton_kernels, interleaved, dtype):
    """The kernel's forward rounds each intermediate as the elementwise ops do (bitwise in bf16/fp16 up to one unit
    where float32 sigmoids differ); its backward equals the torch float32 path (chunked, one rounding) within one
    unit of the dtype, with the clamp masks identical. Width 1,100: a partial column block; 3 rows."""
    from fasttune.kernels.clamped_swiglu import clamped_swiglu_backward, clamped_swiglu_forward

    gate_up = _gate_up(3, 1100, dtype)
    dy = torch.randn(3, 1100, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = clamped_swiglu_forward(gate_up, interleaved, ALPHA, LIMIT)
    y_ref = clamped_swiglu(*split_gate_up(gate_up, interleaved), ALPHA, LIMIT)
    ulp = {torch.float32: 2 ** -22, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=ulp, atol=ulp)
    if dtype != torch.float32:  # float32: the sigmoids' last bits differ (numpy's exp vs torch's), nothing to round them
        assert (y == y_ref).float().mean() > 0.99
    g = clamped_swiglu_backward(gate_up, dy, interleaved, ALPHA, LIMIT)
    _, g64 = _autograd(gate_up.double(), interleaved, dy.double())
    assert (g[g64 == 0] == 0).all()  # the masks: every cut gradient is zero...
    assert (g64[g == 0].abs() < torch.finfo(dtype).tiny).all()  # ...and any other zero is an underflow of the dtype
    torch.testing.assert_close(g.double(), g64, rtol=ulp, atol=ulp * g64.abs().max().item())


def test_triton_kernel_runs_through_the_autograd_node(triton_kernels):
    """ClampedSwiGLU takes the kernels where Triton runs, with values as its torch path; a non-contiguous gate_up
    (a view with a row stride) works."""
    base = _gate_up(5, 40, torch.bfloat16)
    gate_up = base[:, :64]  # row stride 80, width 32
    dy = torch.randn(5, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y, g = _function(gate_up, True, dy)
    import os
    os.environ["FASTTUNE_KERNELS"] = "reference"
    try:
        y_ref, g_ref = _function(gate_up, True, dy)
    finally:
        os.environ["FASTTUNE_KERNELS"] = "triton"
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=2 ** -7, atol=2 ** -7 * g_ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [True, False])
def test_gpu_kernel_at_gpt_oss_size(interleaved):
    """gpt-oss-20b at seq 2048: 8,192 routed rows x 2,880, bf16, the kernels against the torch ops on the GPU."""
    from fasttune.kernels.clamped_swiglu import clamped_swiglu_backward, clamped_swiglu_forward

    gate_up = _gate_up(8192, 2880, torch.float32).to("cuda", torch.bfloat16)
    dy = torch.randn(8192, 2880, device="cuda", dtype=torch.bfloat16)
    y = clamped_swiglu_forward(gate_up, interleaved, ALPHA, LIMIT)
    y_ref = clamped_swiglu(*split_gate_up(gate_up, interleaved), ALPHA, LIMIT)
    assert (y == y_ref).float().mean() > 0.99
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2 ** -7, atol=2 ** -7)
    g = clamped_swiglu_backward(gate_up, dy, interleaved, ALPHA, LIMIT)
    _, g64 = _autograd(gate_up.double(), interleaved, dy.double())
    assert (g[g64 == 0] == 0).all()
    torch.testing.assert_close(g.double(), g64, rtol=2 ** -7, atol=2 ** -7 * g64.abs().max().item())
