"""The attention dispatch against a naive per-element loop in float64 (CPU), forward and backward."""
import math

import pytest
import torch

from fasttune.kernels.attention import attention, build_mask, documents_from_positions, eager_attention


def naive(q, k, v, scale, q_offset=0, window=None, pad=None, docs=None, softcap=None):
    B, H, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hk)
            for i in range(Tq):
                qi = q_offset + i
                allowed = [j for j in range(Tk) if j <= qi and (window is None or qi - j < window)
                           and (pad is None or pad[b, j]) and (docs is None or docs[b, j] == docs[b, Tk - Tq + i])]
                if not allowed:
                    allowed = [qi]
                s = torch.stack([(q[b, h, i].double() @ k[b, kh, j].double()) * scale for j in allowed])
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, kh, j].double() for n, j in enumerate(allowed))
    return out


@pytest.mark.parametrize("case", ["causal", "window", "padding", "docs", "softcap", "decode"])
def test_dispatch_matches_naive(case):
    torch.manual_seed(0)
    B, H, Hk, T, D = 2, 4, 2, 11, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hk, T, D), torch.randn(B, Hk, T, D)
    scale = 1 / math.sqrt(D)
    kw, nkw = {}, {}
    if case == "window":
        kw = nkw = {"sliding_window": 4}
        nkw = {"window": 4}
    if case == "padding":
        pad = torch.ones(B, T, dtype=torch.bool)
        pad[1, :3] = False
        kw, nkw = {"key_padding_mask": pad}, {"pad": pad}
    if case == "docs":
        docs = documents_from_positions(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]] * 2))
        kw, nkw = {"document_ids": docs}, {"docs": docs}
    if case == "softcap":
        kw = nkw = {"softcap": 2.0}
    if case == "decode":  # 3 new queries after 8 cached keys
        q = q[:, :, -3:]
        kw = nkw = {"q_offset": 8}
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    got = attention(q, k, v, scale=scale, **kw)
    want = naive(q64, k64, v64, scale, **nkw)
    dout = torch.randn_like(got)
    if case == "padding":  # fully padded query rows are unused: compare the real ones, send no gradient from the rest
        dout[1, :, :3] = 0
    grads = torch.autograd.grad(got, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    if case == "padding":
        got, want = got[:, :, 3:], want[:, :, 3:]
    assert (got.double() - want.detach()).abs().max() < 1e-5
    for name, g, r in zip("qkv", grads, ref):
        assert (g.double() - r).abs().max() < 1e-5, f"d{name}"


def test_fully_masked_rows_are_finite():
    mask = build_mask(1, 4, 4, torch.device("cpu"), key_padding_mask=torch.tensor([[0, 0, 1, 1]]))
    assert mask.any(-1).all()
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    out = eager_attention(q, q.detach(), q.detach(), mask, 0.3)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_documents_from_positions():
    assert documents_from_positions(torch.arange(5)[None]) is None
    d = documents_from_positions(torch.tensor([[0, 1, 0, 1, 2, 0]]))
    assert d.tolist() == [[1, 1, 2, 2, 2, 3]]
