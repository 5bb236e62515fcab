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
