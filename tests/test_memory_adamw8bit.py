"""8-bit AdamW tracks float32 AdamW on a small problem, with 2 bytes of state per parameter."""
import pytest
import torch

from fasttune.train.adamw8bit import (AdamW8bit, dequantize_blockwise, quantize_blockwise, state_bytes,
                                     tensor_state_bytes)


# one thread: exact float comparisons need a fixed summation order (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_roundtrip_error(signed):
    x = torch.randn(3 * 256 + 17, generator=torch.Generator().manual_seed(0)) * 1e-3
    if not signed:
        x = x.abs()
    q, absmax = quantize_blockwise(x, signed)
    assert q.dtype == torch.uint8 and absmax.numel() == 4
    y = dequantize_blockwise(q, absmax, signed, x.shape)
    # dynamic map: relative error within a block ~ a few percent of the block's absmax, exact at the absmax
    err = (y - x).abs().view(-1)
    assert err.max() <= 0.05 * x.abs().max()
    assert torch.isclose(y[x.abs().argmax()], x[x.abs().argmax()], rtol=1e-6)


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 64, generator=g)
    W_true = torch.randn(64, 96, generator=g) / 8
    Y = torch.tanh(X @ W_true) + 0.01 * torch.randn(256, 96, generator=g)
    W0 = torch.randn(64, 96, generator=g) * 0.05  # 6144 values: quantised state (>= 4096)
    b0 = torch.zeros(96)  # small: float32 state
    return X, Y, W0, b0


def _train(opt_cls, steps=150, **kw):
    X, Y, W0, b0 = _problem(0)
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = opt_cls([W, b], lr=3e-3, weight_decay=0.01, **kw)
    losses = []
    for i in range(steps):
        idx = torch.arange(i * 32, i * 32 + 32) % 256
        loss = ((torch.tanh(X[idx] @ W + b) - Y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return W.detach(), b.detach(), losses, opt


def test_tracks_fp32_adamw():
    W32, b32, l32, _ = _train(torch.optim.AdamW)
    W8, b8, l8, opt = _train(AdamW8bit)
    assert l32[-1] < 0.5 * l32[0]  # the problem is learnable
    for a, b in zip(l8, l32):
        assert abs(a - b) <= 0.06 * b + 1e-4  # measured: max 4% (late steps, loss near its noise floor)
    # same trajectory: measured 1.1% of the distance travelled
    assert (W8 - W32).norm() / (W32 - _problem(0)[2]).norm() < 0.03
    torch.testing.assert_close(b8, b32, rtol=0, atol=5e-3)
    st = opt.state[next(iter(opt.state))]
    assert st["m_q"].dtype == torch.uint8 and st["v_q"].dtype == torch.uint8
    # W: 2 bytes per value + absmax per 256; b: float32 state
    expected = 2 * 64 * 96 + 2 * 4 * (64 * 96 // 256) + 2 * 4 * 96
    assert state_bytes(opt) == expected


def test_bf16_parameters_and_state_dict_roundtrip():
    p = torch.nn.Parameter(torch.randn(5000).bfloat16())
    opt = AdamW8bit([p], lr=1e-2)
    p.grad = torch.randn(5000).bfloat16()
    opt.step()
    assert p.dtype == torch.bfloat16
    sd = opt.state_dict()
    opt2 = AdamW8bit([torch.nn.Parameter(p.detach().clone())], lr=1e-2)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[opt2.param_groups[0]["params"][0]]["m_q"], opt.state[p]["m_q"])
    with pytest.raises(ValueError):
        AdamW8bit([p], lr=-1)


def test_tensor_state_bytes_is_what_a_step_allocates():
    """tensor_state_bytes (memory planning before the first step) equals the state one step really keeps, for
    quantised tensors with a partial last block, the min_8bit_size boundary, and float32-state small ones."""
    for numel in (100, 4095, 4096, 4097, 3 * 256 + 1, 70_000):
        p = torch.nn.Parameter(torch.randn(numel))
        opt = AdamW8bit([p], lr=1e-3)
        p.grad = torch.randn(numel)
        opt.step()
        assert state_bytes(opt) == tensor_state_bytes(numel), numel
    assert tensor_state_bytes(4096) == 2 * 4096 + 2 * 4 * 16 and tensor_state_bytes(4095) == 8 * 4095


def test_make_optimizer_names_and_refusals():
    """train.optimizer's names make what they say (the trainer's and the benchmarks' one factory); an unknown name
    is refused by both the factory and the state-size planner."""
    from fasttune.train.optimizers import make_optimizer, optimizer_state_bytes

    p = torch.nn.Parameter(torch.randn(5000))
    groups = [{"params": [p], "lr": 1e-3}]
    assert isinstance(make_optimizer(groups, "adamw8bit", 1e-3), AdamW8bit)
    plain = make_optimizer(groups, "adamw", 1e-3, device=torch.device("cpu"))
    assert type(plain) is torch.optim.AdamW and not plain.defaults.get("fused")
    for bad in (lambda: make_optimizer(groups, "sgd", 1e-3), lambda: optimizer_state_bytes([p], "sgd")):
        with pytest.raises(ValueError, match="adamw, adamw8bit"):
            bad()
    assert optimizer_state_bytes([p], "adamw8bit") == tensor_state_bytes(5000)
