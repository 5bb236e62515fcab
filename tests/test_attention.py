"""The attention dispatch against a naive per-element loop in float64 (CPU), forward and backward."""
import math

import pytest
from seeding import seed_all
import torch

from fasttune.kernels.attention import FALLBACKS, DocumentLayout, attention, build_mask, eager_attention


def naive(q, k, v, scale, q_offset=0, window=None, pad=None, docs=None, softcap=None, sinks=None):
    """With `sinks` (H,): each row's softmax has one more column, the head's sink, whose value is zero; a row with no
    allowed key is then all sink (zero output) instead of attending to itself."""
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
                    if sinks is not None:
                        continue
                    allowed = [qi]
                s = torch.stack([(q[b, h, i].double() @ k[b, kh, j].double()) * scale for j in allowed])
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                if sinks is not None:
                    s = torch.cat([s, sinks[h].double().reshape(1)])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, kh, j].double() for n, j in enumerate(allowed))
    return out


@pytest.fixture(autouse=True)
def _fresh_draws(request):
    """Every test draws from this session's seed (see tests/seeding.py), mixed with its own name."""
    seed_all(request.node.nodeid)


# max |error| against the float64 oracle, in units of max |oracle|: fp32 ~ 1e-5; 16-bit inputs are rounded first
# (the oracle sees the same rounded values), so what is left is the kernel's own 16-bit arithmetic
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["causal", "window", "padding", "docs", "softcap", "decode"])
def test_dispatch_matches_naive(case, dtype):
    B, H, Hk, T, D = 2, 4, 2, 11, 8
    q, k, v = (torch.randn(B, n, T, D).to(dtype) for n in (H, Hk, Hk))
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
        layout = DocumentLayout.from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]] * 2))
        kw, nkw = {"documents": layout}, {"docs": layout.document_ids}
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
    assert got.dtype == dtype
    tol = ATTN_TOL[dtype]
    assert (got.double() - want.detach()).abs().max() <= tol * want.abs().max().clamp_min(1.0)
    for name, g, r in zip("qkv", grads, ref):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= tol * r.abs().max().clamp_min(1.0), f"d{name}"


def test_fully_masked_rows_are_finite():
    mask = build_mask(1, 4, 4, torch.device("cpu"), key_padding_mask=torch.tensor([[0, 0, 1, 1]]))
    assert mask.any(-1).all()
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    out = eager_attention(q, q.detach(), q.detach(), mask, 0.3)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_document_layout_from_positions():
    assert DocumentLayout.from_position_ids(torch.arange(5)[None]) is None
    d = DocumentLayout.from_position_ids(torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]))
    assert d.document_ids.tolist() == [[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 4, 4]]  # every row starts a document
    assert d.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12] and d.cu_seqlens.dtype == torch.int32
    assert d.max_seqlen == 4


# --- the flash-attn path, on CPU against a stand-in `flash_attn` module --------------------------------------------
# The stand-in follows flash-attn 2.x's documented semantics (flash_attn/flash_attn_interface.py docstrings of
# flash_attn_func / flash_attn_varlen_func): layout (B, S, H, D) or (total, H, D); kv head of query head h is
# h // (H // Hk); causal aligned to the bottom-right corner; window_size=(left, right) lets query i see keys
# [i + Sk - Sq - left, i + Sk - Sq + right] inclusive, -1 meaning unlimited; softcap > 0 maps the scaled score s to
# softcap * tanh(s / softcap); a row with no key gives zeros; cu_seqlens int32 (N + 1,), max_seqlen an int.

def _fa_mask(sq, sk, causal, window_size):
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    left, right = window_size
    if causal:
        right = 0
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    return ok


def _fa_one(q, k, v, softmax_scale, causal, window_size, softcap):
    """One sequence: q (Sq, H, D), k, v (Sk, Hk, D), float64 math."""
    H, Hk = q.shape[1], k.shape[1]
    assert H % Hk == 0
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    kh = torch.arange(H) // (H // Hk)
    qd, kd, vd = q.double(), k.double()[:, kh], v.double()[:, kh]
    s = torch.einsum("ihd,jhd->hij", qd, kd) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    ok = _fa_mask(q.shape[0], k.shape[0], causal, window_size)
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # an empty row gives zeros
    return torch.einsum("hij,jhd->ihd", p, vd).to(q.dtype)


class _FakeFlashAttn:
    def __init__(self, fail=False):
        self.calls = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}
        self.seen = []
        self.fail = fail

    def module(self):
        import types
        m = types.ModuleType("flash_attn")
        m.flash_attn_func = self.flash_attn_func
        m.flash_attn_varlen_func = self.flash_attn_varlen_func
        return m

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        self.calls["flash_attn_func"] += 1
        if self.fail:
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
        assert q.dim() == 4 and k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1]
        self.seen.append(dict(window_size=tuple(window_size), softcap=softcap, causal=causal))
        return torch.stack([_fa_one(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap)
                            for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        self.calls["flash_attn_varlen_func"] += 1
        if self.fail:
            raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
        assert q.dim() == 3 and k.dim() == 3
        for cu, total, mx in ((cu_seqlens_q, q.shape[0], max_seqlen_q), (cu_seqlens_k, k.shape[0], max_seqlen_k)):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device
            assert cu[0].item() == 0 and cu[-1].item() == total and bool((cu[1:] > cu[:-1]).all())
            assert isinstance(mx, int) and mx == int((cu[1:] - cu[:-1]).max())
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        self.seen.append(dict(window_size=tuple(window_size), softcap=softcap, causal=causal,
                              cu_seqlens=cu_seqlens_q.tolist()))
        cu = cu_seqlens_q.tolist()
        return torch.cat([_fa_one(q[a:b], k[a:b], v[a:b], softmax_scale, causal, window_size, softcap)
                          for a, b in zip(cu[:-1], cu[1:])])


def test_stand_in_mask_matches_flash_attn_docs():
    # the examples in flash-attn's docstrings: causal aligned to the bottom-right corner
    assert _fa_mask(2, 5, True, (-1, -1)).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert _fa_mask(5, 2, True, (-1, -1)).int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    # window (2, 0) on a square matrix: the query and the two keys before it
    assert _fa_mask(4, 4, True, (2, 0)).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    q, k, v = torch.randn(3, 2, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    out = _fa_one(q, k, v, None, True, (-1, -1), 0.0)  # key 4 is the last query's own position
    s = (q[2, 0].double() @ k[:, 0].double().T) * 0.5
    assert torch.allclose(out[2, 0].double(), torch.softmax(s, 0) @ v[:, 0].double())


@pytest.fixture
def fake_flash(monkeypatch):
    import sys

    from fasttune.kernels import attention as attn_mod

    def install(fail=False):
        fake = _FakeFlashAttn(fail)
        monkeypatch.setitem(sys.modules, "flash_attn", fake.module())
        monkeypatch.setattr(attn_mod, "_flash_attn_device_ok", lambda q, k, v: True)
        FALLBACKS.reset()
        monkeypatch.delenv("FASTTUNE_FLASH_ATTN", raising=False)
        return fake
    return install


_PACKED_POSITIONS = [[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6],  # documents of 5, 1 and 7 tokens
                     [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]]  # 8 and 5


@pytest.mark.parametrize("case", ["window", "packed", "packed_window", "softcap", "gqa", "gemma2"])
def test_flash_attn_path_matches_reference(fake_flash, case):
    fake = fake_flash()
    B, Hq, Hk, T, D = 2, 4, 2, 13, 8
    if case == "gqa":
        Hq = 4 * Hk
    kw = {}
    if case in ("window", "packed_window", "gqa", "gemma2"):
        kw["sliding_window"] = 4 if case != "packed_window" else 3
    if case in ("packed", "packed_window", "gqa"):
        kw["documents"] = DocumentLayout.from_position_ids(torch.tensor(_PACKED_POSITIONS))
    if case in ("softcap", "gemma2"):
        kw["softcap"] = 1.5
    q = (torch.randn(B, T, Hq, D) * 2).transpose(1, 2)  # the model's layout: a transposed view
    k = (torch.randn(B, T, Hk, D) * 2).transpose(1, 2)
    v = torch.randn(B, T, Hk, D).transpose(1, 2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = 1 / math.sqrt(D)
    got = attention(q, k, v, scale=scale, **kw)

    varlen = "documents" in kw
    assert fake.calls == {"flash_attn_func": int(not varlen), "flash_attn_varlen_func": int(varlen)}
    seen = fake.seen[0]
    assert seen["causal"] is True
    assert seen["window_size"] == ((kw["sliding_window"] - 1, 0) if "sliding_window" in kw else (-1, -1))
    assert seen["softcap"] == kw.get("softcap", 0.0)
    if varlen:
        assert seen["cu_seqlens"] == [0, 5, 6, 13, 21, 26]

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = build_mask(B, T, T, q.device, sliding_window=kw.get("sliding_window"),
                      document_ids=kw["documents"].document_ids if varlen else None)
    want = eager_attention(q64, k64, v64, mask, scale, kw.get("softcap"))
    assert got.shape == want.shape and got.dtype == q.dtype
    assert (got.double() - want.detach()).abs().max() < 1e-5
    dout = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    for name, g, r in zip("qkv", grads, ref):
        assert (g.double() - r).abs().max() < 1e-5, f"d{name}"


def test_flash_attn_path_skipped_for_plain_causal_decode_padding_and_switch(fake_flash, monkeypatch):
    fake = fake_flash()
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    attention(q, k, v, scale=0.3)  # plain causal stays on SDPA
    attention(q, k, v, scale=0.3, sliding_window=20)  # a window longer than the sequence is plain causal
    attention(q[:, :, -3:], k, v, scale=0.3, q_offset=6, sliding_window=4)  # decoding
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, :2] = False
    attention(q, k, v, scale=0.3, sliding_window=4, key_padding_mask=pad)  # padding
    assert fake.calls == {"flash_attn_func": 0, "flash_attn_varlen_func": 0}
    monkeypatch.setenv("FASTTUNE_FLASH_ATTN", "0")
    attention(q, k, v, scale=0.3, sliding_window=4)
    assert fake.calls == {"flash_attn_func": 0, "flash_attn_varlen_func": 0}
    monkeypatch.setenv("FASTTUNE_FLASH_ATTN", "1")
    attention(q, k, v, scale=0.3, sliding_window=4)
    assert fake.calls["flash_attn_func"] == 1


@pytest.mark.parametrize("packed", [False, True])
def test_flash_attn_errors_fall_back_to_reference(fake_flash, packed):
    from fasttune.kernels import attention as attn_mod
    fake = fake_flash(fail=True)
    B, T = 2, 13
    q, k, v = torch.randn(B, 4, T, 8), torch.randn(B, 2, T, 8), torch.randn(B, 2, T, 8)
    layout = DocumentLayout.from_position_ids(torch.tensor(_PACKED_POSITIONS)) if packed else None
    got = attention(q, k, v, scale=0.3, sliding_window=4, documents=layout, softcap=2.0)
    mask = build_mask(B, T, T, q.device, sliding_window=4, document_ids=layout.document_ids if packed else None)
    want = eager_attention(q.double(), k.double(), v.double(), mask, 0.3, 2.0)
    assert (got.double() - want).abs().max() < 1e-5
    assert sum(fake.calls.values()) == 1 and not attn_mod.FALLBACKS.usable("flash-attn")
    assert "Ampere" in attn_mod.FALLBACKS.failed["flash-attn"]  # the reason is kept (and logged once)
    attention(q, k, v, scale=0.3, sliding_window=4, documents=layout)  # not retried once it failed
    assert sum(fake.calls.values()) == 1


def test_document_layout_is_built_once_per_forward_and_shared_by_every_layer(fake_flash, monkeypatch):
    """The packed layout is built once per forward (from the position ids) and shared by every layer, also when
    checkpointed layers recompute; the varlen path's result equals the reference path's."""
    from fasttune.models import ArchSpec, CausalLM
    from fasttune.train.memory import apply_memory_policy

    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32"}
    model = CausalLM(ArchSpec.from_hf_config(cfg)).double()
    ids = torch.randint(0, 64, (2, 13))
    positions = torch.tensor(_PACKED_POSITIONS)
    reference = model(ids, position_ids=positions).logits  # no stand-in installed: the mask path

    fake = fake_flash()
    real = DocumentLayout.from_position_ids.__func__
    built = []
    monkeypatch.setattr(DocumentLayout, "from_position_ids",
                        classmethod(lambda cls, pos: built.append(1) or real(cls, pos)))
    logits = model(ids, position_ids=positions).logits
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-12)
    assert fake.calls["flash_attn_varlen_func"] == 3 and len(built) == 1
    # a layout passed in (as the trainer does, built on the host) is used as it is
    layout = real(DocumentLayout, positions)
    built.clear()
    torch.testing.assert_close(model(ids, position_ids=positions, documents=layout).logits, reference,
                               rtol=1e-10, atol=1e-12)
    assert not built

    apply_memory_policy(model, "checkpoint", seq_len=13, batch_size=2)  # the backward re-runs every layer
    model.requires_grad_(True)
    built.clear()
    model(ids, position_ids=positions, labels=ids).loss.backward()
    assert fake.calls["flash_attn_varlen_func"] == 3 + 3 + 6 and len(built) == 1


@pytest.mark.parametrize("case", ["packed", "window", "packed_window", "gqa"])
def test_torch_flash_varlen_path_plumbing(monkeypatch, case):
    """PyTorch's own flash kernel (CUDA only) is reached with the right flattened layout, cu_seqlens, longest
    document and window; here a float64 stand-in with flash's documented semantics takes its place on CPU. (The
    real kernel is checked against float64 on the GPU: tests/test_gpu_model.py.)"""
    from fasttune.kernels import attention as attn_mod

    FALLBACKS.reset()
    seen = []

    def fake_op(qf, kf, vf, cu, longest, scale, window_left):
        seen.append(dict(cu=cu.tolist(), longest=longest, window_left=window_left))
        bounds = cu.tolist()
        return torch.cat([_fa_one(qf[a:b], kf[a:b], vf[a:b], scale, True,
                                  (-1 if window_left is None else window_left, 0), 0.0)
                          for a, b in zip(bounds[:-1], bounds[1:])])

    monkeypatch.setattr(attn_mod, "_torch_flash_ok", lambda q, k, v: True)
    monkeypatch.setattr(attn_mod, "_torch_flash_op", fake_op)
    B, Hq, Hk, T, D = 2, 4 if case != "gqa" else 8, 2, 13, 8
    kw = {}
    if case in ("window", "packed_window", "gqa"):
        kw["sliding_window"] = 4
    if case in ("packed", "packed_window", "gqa"):
        kw["documents"] = DocumentLayout.from_position_ids(torch.tensor(_PACKED_POSITIONS))
    q = torch.randn(B, T, Hq, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hk, D).transpose(1, 2).requires_grad_()
    got = attention(q, k, v, scale=0.3, **kw)
    packed = "documents" in kw
    assert seen[0]["cu"] == ([0, 5, 6, 13, 21, 26] if packed else [0, 13, 26])
    assert seen[0]["longest"] == (8 if packed else 13)
    assert seen[0]["window_left"] == (3 if "sliding_window" in kw else None)
    mask = build_mask(B, T, T, q.device, sliding_window=kw.get("sliding_window"),
                      document_ids=kw["documents"].document_ids if packed else None)
    want = eager_attention(q.double(), k.double(), v.double(), mask, 0.3)
    assert (got.double() - want).abs().max() < 1e-5
    torch.autograd.grad(got.sum(), (q, k, v))  # differentiable through the stand-in, as through aten's op


def test_flex_block_mask_is_built_once_per_window(monkeypatch):
    """The flex path builds one block mask per (window, batch, length) per forward and every layer reuses it."""
    import torch.nn.attention.flex_attention as flex_mod

    from fasttune.kernels import attention as attn_mod

    built = []
    monkeypatch.setattr(flex_mod, "create_block_mask", lambda mask_mod, B, H, Q, KV, device, _compile=False:
                        built.append(1) or object())
    monkeypatch.setattr(attn_mod, "_compiled_flex", lambda: lambda q, k, v, **kw: torch.zeros_like(q))
    FALLBACKS.reset()
    q = k = v = torch.randn(1, 2, 16, 8)
    layout = DocumentLayout.from_position_ids(torch.tensor([list(range(8)) * 2]))
    memo: dict = {}
    for window in (None, 4, None, 4, None):  # Gemma 2 style: alternating global and local layers
        assert attn_mod._flex(q, k, v, 0.3, window, layout, None, memo) is not None
    assert len(built) == 2
    attn_mod._flex(q, k, v, 0.3, None, layout, None)  # without a memo: built on every call
    assert len(built) == 3


# ---- attention sinks (gpt-oss): the fused paths against the eager reference ----

SINK_CASES = ["causal", "window", "docs", "docs_window", "padding", "padding_window", "gqa_window"]


def _sink_inputs(case, dtype, B=2, T=13, D=8):
    """q, k, v (B, T, H, D) storage seen as (B, H, T, D), as the model passes them; sink logits on the scale of the
    scores so they take a real share of each row; the dispatch's and `naive`'s keyword arguments."""
    H, Hk = (8, 2) if case.startswith("gqa") else (4, 2)
    q = torch.randn(B, T, H, D).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, Hk, D).to(dtype).transpose(1, 2)
    v = torch.randn(B, T, Hk, D).to(dtype).transpose(1, 2)
    sinks = (1.5 * torch.randn(H)).to(dtype)
    kw, nkw = {}, {}
    if "window" in case:
        kw["sliding_window"] = nkw["window"] = 4
    if case.startswith("docs"):
        layout = DocumentLayout.from_position_ids(torch.tensor(_PACKED_POSITIONS))
        kw["documents"], nkw["docs"] = layout, layout.document_ids
    if case.startswith("padding"):
        pad = torch.ones(B, T, dtype=torch.bool)
        pad[1, :3] = False  # left padding: queries 0-2 of row 1 see no key at all
        pad[0, -2:] = False  # right padding: those queries still see the real keys before them
        kw["key_padding_mask"] = nkw["pad"] = pad
    return q, k, v, sinks, kw, nkw


def _sink_oracle(q, k, v, sinks, scale, kw):
    """The eager reference in float64 (what the CPU dispatch runs), with its gradients."""
    B, H, T, D = q.shape
    docs = kw["documents"].document_ids if "documents" in kw else None
    mask = build_mask(B, T, T, q.device, 0, kw.get("sliding_window"), kw.get("key_padding_mask"), docs,
                      empty_rows_see_self=False)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    return eager_attention(*leaves[:3], mask, scale, None, leaves[3]), leaves


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * want.abs().max().clamp_min(1.0).item(), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SINK_CASES + ["decode"])
def test_eager_sinks_match_naive(case, dtype):
    """The reference itself (the CPU dispatch with sinks) against the per-element loop: forward and the gradients
    of q, k, v and the sinks. Queries with no key at all give exactly zero and send no gradient."""
    q, k, v, sinks, kw, nkw = _sink_inputs("window" if case == "decode" else case, dtype)
    if case == "decode":  # 3 new queries after 10 cached keys
        q = q[:, :, -3:]
        kw["q_offset"] = nkw["q_offset"] = 10
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    got = attention(*leaves[:3], scale=0.35, sinks=leaves[3], **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = naive(*ref_leaves[:3], 0.35, sinks=ref_leaves[3], **nkw)
    dout = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, dout)
    ref = torch.autograd.grad(want, ref_leaves, dout.double())
    tol = 1e-6 if dtype == torch.float64 else 1e-5  # eager's softmax runs in float32, as transformers'
    _close(got, want, tol, "out")
    for name, g, r in zip(["dq", "dk", "dv", "dsinks"], grads, ref):
        _close(g, r, tol, name)
    if case.startswith("padding"):
        assert torch.equal(got[1, :, :3], torch.zeros_like(got[1, :, :3]))
        assert torch.equal(grads[0][1, :, :3], torch.zeros_like(grads[0][1, :, :3]))


def _flash_standin_fwd(calls):
    """aten's varlen flash forward with flash's documented semantics (causal aligned bottom-right, window
    (left, 0), GQA, `seqused_k`), float64 math: out (N, Hq, D) in q's dtype, lse (Hq, N) float32 as the kernel's."""
    def fwd(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale, window_left, seqused_k=None):
        calls.append(dict(kind="fwd", cu_q=cu_q.tolist(), cu_k=cu_k.tolist(), max_q=max_q, max_k=max_k,
                          window_left=window_left, seqused_k=None if seqused_k is None else seqused_k.tolist()))
        outs, lses = [], []
        for b in range(cu_q.numel() - 1):
            qs = qf[cu_q[b]:cu_q[b + 1]].double()
            used = int(cu_k[b + 1] - cu_k[b]) if seqused_k is None else int(seqused_k[b])
            ks, vs = (t[cu_k[b]:cu_k[b] + used].double() for t in (kf, vf))
            s, ok = _standin_scores(qs, ks, scale, window_left)
            lse = torch.logsumexp(s, -1)  # (H, Sq)
            p = torch.exp(s - lse[..., None]).masked_fill(~ok, 0.0)
            outs.append(torch.einsum("hij,jhd->ihd", p, vs.repeat_interleave(qs.shape[1] // vs.shape[1], 1)))
            lses.append(lse)
        return (torch.cat(outs).to(qf.dtype), torch.cat(lses, 1).float(), torch.empty(0), torch.empty(0))
    return fwd


def _standin_scores(qs, ks, scale, window_left):
    ok = _fa_mask(qs.shape[0], ks.shape[0], True, (-1 if window_left is None else window_left, 0))
    kk = ks.repeat_interleave(qs.shape[1] // ks.shape[1], 1)
    return (torch.einsum("ihd,jhd->hij", qs, kk) * scale).masked_fill(~ok, float("-inf")), ok


def _flash_standin_bwd(calls):
    """aten's flash backward as the kernel computes it from what it is given: P = exp(S - lse) (recomputed),
    D = rowsum(dout * out), dS = P (dout . v - D); dk, dv summed over each KV head's query heads."""
    def bwd(dout, qf, kf, vf, out, lse, cu, longest, scale, window_left, rng_state, unused):
        calls.append(dict(kind="bwd", cu=cu.tolist(), longest=longest, window_left=window_left))
        Hq, Hk = qf.shape[1], kf.shape[1]
        dq, dk, dv = (torch.zeros_like(t, dtype=torch.float64) for t in (qf, kf, vf))
        for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
            qs, ks, vs, do, o = (t[a:b].double() for t in (qf, kf, vf, dout, out))
            s, ok = _standin_scores(qs, ks, scale, window_left)
            p = torch.exp(s - lse[:, a:b, None].double()).masked_fill(~ok, 0.0)
            vv = vs.repeat_interleave(Hq // Hk, 1)
            dp = torch.einsum("ihd,jhd->hij", do, vv)
            ds = p * (dp - (do * o).sum(-1).t()[..., None])
            kk = ks.repeat_interleave(Hq // Hk, 1)
            dq[a:b] = torch.einsum("hij,jhd->ihd", ds, kk) * scale
            dk[a:b] = (torch.einsum("hij,ihd->jhd", ds, qs) * scale).reshape(b - a, Hk, Hq // Hk, -1).sum(2)
            dv[a:b] = torch.einsum("hij,ihd->jhd", p, do).reshape(b - a, Hk, Hq // Hk, -1).sum(2)
        return dq.to(qf.dtype), dk.to(kf.dtype), dv.to(vf.dtype)
    return bwd


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [c for c in SINK_CASES if not c.startswith("padding")])
def test_flash_sinks_path_matches_eager(monkeypatch, case, dtype):
    """Training with sinks on CUDA in 16-bit runs `_FlashSinks`: aten's flash forward for (o, lse), its backward
    handed the sinked output and L = logaddexp(lse, s). Here float64 stand-ins with the kernel's semantics take the
    kernel's place on CPU, so the sink algebra and the layouts (lse (Hq, N), rows / documents, window) are checked
    against the eager reference: forward and the gradients of q, k, v and the sinks. (The real kernel:
    tests/test_attention_sinks_gpu.py.)"""
    from fasttune.kernels import attention as attn_mod

    FALLBACKS.reset()
    calls = []
    monkeypatch.setattr(attn_mod, "_torch_flash_ok", lambda q, k, v: True)
    monkeypatch.setattr(attn_mod, "_torch_flash_fwd", _flash_standin_fwd(calls))
    monkeypatch.setattr(attn_mod, "_torch_flash_bwd", _flash_standin_bwd(calls))
    q, k, v, sinks, kw, _ = _sink_inputs(case, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    got = attention(*leaves[:3], scale=0.35, sinks=leaves[3], **kw)
    assert [c["kind"] for c in calls] == ["fwd"] and not FALLBACKS.failed
    assert calls[0]["window_left"] == (3 if "sliding_window" in kw else None)
    assert calls[0]["cu_q"] == ([0, 5, 6, 13, 21, 26] if "documents" in kw else [0, 13, 26])
    want, ref_leaves = _sink_oracle(q, k, v, sinks, 0.35, kw)
    dout = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, dout)
    assert [c["kind"] for c in calls] == ["fwd", "bwd"]
    ref = torch.autograd.grad(want, ref_leaves, dout.double())
    tol = 1e-5  # lse is float32, as the kernel's
    _close(got, want, tol, "out")
    for name, g, r in zip(["dq", "dk", "dv", "dsinks"], grads, ref):
        assert g.dtype == dtype
        _close(g, r, tol, name)


def test_flash_sinks_failure_is_logged_and_the_reference_answers(monkeypatch, caplog):
    from fasttune.kernels import attention as attn_mod

    FALLBACKS.reset()

    def broken(*a, **kw):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(attn_mod, "_torch_flash_ok", lambda q, k, v: True)
    monkeypatch.setattr(attn_mod, "_torch_flash_fwd", broken)
    q, k, v, sinks, kw, _ = _sink_inputs("docs_window", torch.float64)
    with caplog.at_level("WARNING", logger="fasttune.attention"):
        got = attention(q, k, v, scale=0.35, sinks=sinks, **kw)
    assert "torch-flash-sinks failed" in caplog.text and not FALLBACKS.usable("torch-flash-sinks")
    _close(got, _sink_oracle(q, k, v, sinks, 0.35, kw)[0], 1e-6, "out")
    FALLBACKS.reset()


def _masked_attention_with_lse(q, k, v, scale, kw):
    """Differentiable (o, lse) of ordinary attention over the allowed keys, as flex_attention returns them: a row
    with no key has o = 0 and lse = -inf (and no NaN anywhere in its backward)."""
    B, H, T, D = q.shape
    docs = kw["documents"].document_ids if "documents" in kw else None
    mask = build_mask(B, T, T, q.device, 0, kw.get("sliding_window"), kw.get("key_padding_mask"), docs,
                      empty_rows_see_self=False)
    groups = H // k.shape[1]
    s = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * scale
    empty = ~mask.any(-1)  # (B, 1, T)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty[..., None], 0.0)
    lse = torch.where(empty, float("-inf"), torch.logsumexp(s, -1))
    o = torch.where(empty[..., None], 0.0, torch.softmax(s, -1) @ v.repeat_interleave(groups, 1))
    return o, lse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SINK_CASES)
def test_sink_combine_backward_through_lse(case, dtype):
    """The flex path's `_SinkCombine` (out = o * sigmoid(lse - s)) on a differentiable (o, lse): its gradients to
    o, lse and the sinks, sent back through lse as flex_attention's backward does, give the eager reference's
    gradients of q, k, v and the sinks; rows with no key give zero and no NaN. (flex_attention has no backward on
    CPU; the real one: tests/test_attention_sinks_gpu.py.)"""
    from fasttune.kernels.attention import _SinkCombine

    q, k, v, sinks, kw, _ = _sink_inputs(case, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    o, lse = _masked_attention_with_lse(*leaves[:3], 0.35, kw)
    got = _SinkCombine.apply(o, lse, leaves[3])
    want, ref_leaves = _sink_oracle(q, k, v, sinks, 0.35, kw)
    dout = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, dout)
    ref = torch.autograd.grad(want, ref_leaves, dout.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # the oracle's softmax runs in float32
    _close(got, want, tol, "out")
    for name, g, r in zip(["dq", "dk", "dv", "dsinks"], grads, ref):
        assert torch.isfinite(g).all(), name
        _close(g, r, tol, name)


@pytest.mark.parametrize("case", SINK_CASES)
def test_flex_sinks_forward_matches_eager_on_cpu(monkeypatch, case):
    """The flex path's block mask (window, documents, padding per row), GQA and lse use, end to end through
    flex_attention itself (uncompiled: on CPU it runs forward only) against the eager reference."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from fasttune.kernels import attention as attn_mod

    FALLBACKS.reset()
    monkeypatch.setattr(attn_mod, "_compiled_flex", lambda: flex_attention)
    q, k, v, sinks, kw, _ = _sink_inputs(case, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        got = attn_mod._flex(q, k, v, 0.35, kw.get("sliding_window"), kw.get("documents"), None, {},
                             kw.get("key_padding_mask"), sinks)
    assert got is not None, FALLBACKS.failed
    _close(got, _sink_oracle(q, k, v, sinks, 0.35, kw)[0], 1e-6, "out")  # lse comes back float32-rounded


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("flash", [False, True])
def test_decode_with_sinks_matches_naive(monkeypatch, window, flash):
    """One decoding step over a per-slot cache with sinks: the reference (eager, any device) and, with a stand-in
    for aten's flash decode kernel, the fused path (its lse weighs the output) against the per-element loop."""
    from fasttune.kernels import attention as attn_mod
    from fasttune.kernels.attention import decode_attention

    FALLBACKS.reset()
    calls = []
    if flash:
        monkeypatch.setattr(attn_mod, "_torch_flash_ok", lambda q, k, v: True)
        monkeypatch.setattr(attn_mod, "_torch_flash_fwd", _flash_standin_fwd(calls))
    S, M, Hq, Hk, D = 3, 10, 8, 2, 8
    lengths = torch.tensor([1, 6, 10], dtype=torch.int32)
    q = torch.randn(S, Hq, 1, D, dtype=torch.float64)
    kc, vc = torch.randn(S, M, Hk, D, dtype=torch.float64), torch.randn(S, M, Hk, D, dtype=torch.float64)
    sinks = 1.5 * torch.randn(Hq, dtype=torch.float64)
    got = decode_attention(q, kc, vc, lengths, scale=0.35, sliding_window=window, sinks=sinks)
    if flash:
        assert len(calls) == 1 and calls[0]["seqused_k"] == [1, 6, 10] and calls[0]["max_q"] == 1
        assert calls[0]["window_left"] == (None if window is None else window - 1)
    for s in range(S):
        n = int(lengths[s])
        want = naive(q[s:s + 1], kc[s:s + 1, :n].transpose(1, 2), vc[s:s + 1, :n].transpose(1, 2), 0.35,
                     q_offset=n - 1, window=window, sinks=sinks)
        _close(got[s:s + 1], want, 1e-6, f"slot {s}")  # float32: the kernel's lse, the reference's softmax
