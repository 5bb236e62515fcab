"""GPU checks of attention with sinks (gpt-oss) on the fused paths (run on the device:
pytest -m gpu tests/test_attention_sinks_gpu.py), at gpt-oss-20b's attention shape: 64 query / 8 KV heads, head_dim
64, sliding window 128, 2 x 2048 tokens.

Each fused path against the eager reference (`eager_attention` with the same boolean mask) in float32 with TF32 off,
on the same rounded inputs: forward and the gradients of q, k, v and the sinks.
- bf16 training without padding: `_FlashSinks` (aten's flash forward and backward). Bound: max |error| / max |ref|
  <= 2e-2 for the output and dq, dk, dv (the bf16 bound of tests/test_attention.py and of
  tests/test_gpu_model.py::test_torch_flash_varlen_matches_float64); the sinks' gradient, a sum over all 4096 rows
  of each head, |error| / |ref| (norms) <= 2e-2.
- bf16 with a padding mask: compiled flex_attention with its differentiable lse, then `_SinkCombine`; same bounds.
- fp32 (flex, TF32 off): 1e-4 for everything.
- decoding (one query per slot over a static cache, bf16): the Triton decode kernel (sink in its combine), and
  aten's flash decode kernel's lse with it switched off: 2e-2.
Every test prints its measured errors."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from fasttune.kernels import attention as attn_mod
from fasttune.kernels.attention import (FALLBACKS, DocumentLayout, attention, build_mask, decode_attention,
                                        decode_mask, eager_attention)

B, T, HQ, HK, D, WINDOW = 2, 2048, 64, 8, 64, 128


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """The float32 reference (and the fp32 flex path) without TF32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    FALLBACKS.reset()
    yield
    torch.backends.cuda.matmul.allow_tf32 = before
    FALLBACKS.reset()


@pytest.fixture
def spies(monkeypatch):
    """Counts of calls into aten's flash forward and the compiled flex kernel (which path really ran)."""
    calls = {"flash": 0, "flex": 0}
    real_fwd, real_flex = attn_mod._torch_flash_fwd, attn_mod._compiled_flex

    def flash(*a, **kw):
        calls["flash"] += 1
        return real_fwd(*a, **kw)

    def flex():
        calls["flex"] += 1
        return real_flex()

    monkeypatch.setattr(attn_mod, "_torch_flash_fwd", flash)
    monkeypatch.setattr(attn_mod, "_compiled_flex", flex)
    return calls


def _inputs(dtype, hq=HQ, hk=HK, t=T, b=B):
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(b, t, hq, D, device="cuda", generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hk, D, device="cuda", generator=g).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(b, t, hk, D, device="cuda", generator=g).to(dtype).transpose(1, 2).requires_grad_()
    sinks = (1.5 * torch.randn(hq, device="cuda", generator=g)).to(dtype).requires_grad_()
    return q, k, v, sinks


def _layout(case, t=T):
    if "packed" not in case:
        return None
    rows = [[700, 1, t - 701], [1024, 1000, t - 2024]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    return DocumentLayout.from_position_ids(pos).to("cuda")


def _padding(case, t=T):
    if "padding" not in case:
        return None
    pad = torch.ones(B, t, dtype=torch.bool, device="cuda")
    pad[1, :300] = False  # left padding: 300 queries of row 1 see no key (zero output, no gradient)
    pad[0, -500:] = False  # right padding
    return pad


def _reference(q, k, v, sinks, window, layout, pad, dout):
    """eager fp32 on the same values, forward and gradients (q, k, v, sinks)."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, sinks)]
    mask = build_mask(q.shape[0], q.shape[2], k.shape[2], q.device, 0, window, pad,
                      layout.document_ids if layout is not None else None, empty_rows_see_self=False)
    out = eager_attention(*leaves[:3], mask, D ** -0.5, None, leaves[3])
    return out.detach(), torch.autograd.grad(out, leaves, dout.float())


def _compare(got, grads, want, ref, tol, label):
    errs = {"out": ((got.float() - want).abs().max() / want.abs().max()).item()}
    for name, g, r in zip(["dq", "dk", "dv"], grads[:3], ref[:3]):
        errs[name] = ((g.float() - r).abs().max() / r.abs().max()).item()
    errs["dsinks"] = ((grads[3].float() - ref[3]).norm() / ref[3].norm()).item()
    print(label, " ".join(f"{k} {e:.2e}" for k, e in errs.items()))
    for name, e in errs.items():
        assert e <= tol, f"{label}: {name} error {e:.3e} > {tol}"
    for g in grads:
        assert torch.isfinite(g).all()


def _run(case, dtype, tol, spies):
    window = WINDOW if "window" in case else None
    layout, pad = _layout(case), _padding(case)
    q, k, v, sinks = _inputs(dtype)
    out = attention(q, k, v, scale=D ** -0.5, sliding_window=window, documents=layout, key_padding_mask=pad,
                    memo={}, sinks=sinks)
    assert not FALLBACKS.failed, FALLBACKS.failed
    assert not any(key.startswith("sinks-eager") for key in FALLBACKS._said), "the eager sink path ran"
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    want, ref = _reference(q, k, v, sinks, window, layout, pad, dout)
    if pad is not None:  # rows with no key give zero (and the reference agrees)
        assert torch.equal(out[1, :, :300].float(), torch.zeros_like(out[1, :, :300].float()))
    _compare(out, grads, want, ref, tol, f"{case} {dtype}")
    return out


@pytest.mark.parametrize("case", ["full", "window", "packed_full", "packed_window"])
def test_bf16_training_with_sinks_runs_flash_and_matches_eager_fp32(case, spies):
    _run(case, torch.bfloat16, 2e-2, spies)
    assert spies["flash"] == 1 and spies["flex"] == 0, spies


@pytest.mark.parametrize("case", ["padding_full", "padding_window"])
def test_bf16_padded_training_with_sinks_runs_flex_and_matches_eager_fp32(case, spies):
    _run(case, torch.bfloat16, 2e-2, spies)
    assert spies["flash"] == 0 and spies["flex"] == 1, spies


@pytest.mark.parametrize("case", ["window", "packed_window", "padding_full"])
def test_fp32_training_with_sinks_runs_flex_and_matches_eager_fp32(case, spies):
    _run(case, torch.float32, 1e-4, spies)
    assert spies["flash"] == 0 and spies["flex"] == 1, spies


@pytest.mark.parametrize("triton_decode", ["1", "0"])
@pytest.mark.parametrize("window", [None, WINDOW])
def test_bf16_decode_with_sinks_runs_its_kernel_and_matches_eager_fp32(window, triton_decode, spies, monkeypatch):
    """One step for 4 slots over a 2048-position cache holding 1, 127, 1000 and 2048 keys (full layers: the kernel's
    grouped single-query layout; window layers: the windowed one). The Triton decode kernel (sink in its combine);
    with FASTTUNE_DECODE_TRITON=0 aten's flash decode (its lse weighs the output)."""
    monkeypatch.setenv("FASTTUNE_DECODE_TRITON", triton_decode)
    S, M = 4, T
    g = torch.Generator("cuda").manual_seed(1)
    q = torch.randn(S, HQ, 1, D, device="cuda", generator=g).bfloat16()
    kc = torch.randn(S, M, HK, D, device="cuda", generator=g).bfloat16()
    vc = torch.randn(S, M, HK, D, device="cuda", generator=g).bfloat16()
    sinks = (1.5 * torch.randn(HQ, device="cuda", generator=g)).bfloat16()
    lengths = torch.tensor([1, 127, 1000, 2048], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        got = decode_attention(q, kc, vc, lengths, scale=D ** -0.5, sliding_window=window, memo={}, sinks=sinks)
        assert spies["flash"] == (triton_decode == "0") and not FALLBACKS.failed, FALLBACKS.failed
        assert not FALLBACKS._said, FALLBACKS._said  # no dense-mask path
        want = eager_attention(q.float(), kc.float().transpose(1, 2), vc.float().transpose(1, 2),
                               decode_mask(lengths, M, window), D ** -0.5, None, sinks.float())
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    print(f"decode window {window}: out error {err:.2e}")
    assert err <= 2e-2
