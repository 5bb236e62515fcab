"""Per-token log-probabilities through the fused LM head (Triton, and the reference) against a float64 oracle:
forward and every gradient, with ignored rows, bias, soft-capping, temperature, a LoRA head's extra columns,
several vocab blocks and token chunks. Tolerances relative to the largest magnitude of the expected tensor."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import fasttune.kernels.cross_entropy as ce  # noqa: E402
from seeding import SESSION_SEED, generator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(ce, "MAX_VOCAB_BLOCK", 256)
        monkeypatch.setattr(ce, "CHUNK_LOGITS_BYTES", 8 * 1003 * 4)  # 8 rows per chunk at V=1003, fp32


def oracle(hidden, weight, labels, upstream, bias=None, softcap=None, temperature=1.0, extra=None):
    """sum_i g_i logp_i and its gradients, float64, from the definition."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias, extra)]
    h, w, b, e = leaves
    full_w = w if e is None else torch.cat([w, e], 1)
    z = h @ full_w.T + (b if b is not None else 0)
    s = torch.tanh(z / softcap) * softcap if softcap is not None else z
    s = s / temperature
    logp = s.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) - torch.logsumexp(s, -1)
    logp = torch.where(labels == -100, 0.0, logp)
    (logp * upstream.double()).sum().backward()
    return logp.detach(), [t.grad if t is not None else None for t in leaves]


def close(actual, expected, tol, what):
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual.double() - expected).abs().max().item()
    assert torch.isfinite(actual).all(), what
    assert err <= tol * scale, f"{what}: {err:.3g} > {tol} * {scale:.3g} (FASTTUNE_TEST_SEED={SESSION_SEED})"


CASES = [dict(), dict(bias=True), dict(softcap=3.0), dict(temperature=0.7), dict(extra=True, softcap=2.0),
         dict(bias=True, temperature=1.3, softcap=5.0, extra=True)]


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_token_logprobs_match_float64(impl, dtype, case):
    cfg = CASES[case]
    g = generator("token-logprobs", case, str(dtype))
    n, hdim, r, v = 21, 24, 5, 1003
    hidden = torch.randn(n, hdim + (r if cfg.get("extra") else 0), generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, hdim, generator=g) / hdim**0.5 * 3).to(DEVICE, dtype).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_() if cfg.get("bias") else None
    extra = (torch.randn(v, r, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_() if cfg.get("extra") else None
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    labels[::4] = -100
    upstream = torch.randn(n, generator=g).to(DEVICE)
    kw = dict(softcap=cfg.get("softcap"), temperature=cfg.get("temperature", 1.0))
    fn = ce.fused_linear_token_logprobs if impl == "triton" else ce.fused_linear_token_logprobs_reference
    logp = fn(hidden, weight, labels, bias=bias, extra_weight=extra, **kw)
    assert logp.shape == (n,) and logp.dtype == torch.float32
    params = [t for t in (hidden, weight, bias, extra) if t is not None]
    grads = torch.autograd.grad((logp * upstream).sum(), params)
    ref_logp, ref_grads = oracle(hidden, weight, labels, upstream, bias, extra=extra, **kw)
    tol = TOL[dtype]
    close(logp, ref_logp, tol, "logp")
    assert (logp[::4] == 0).all()
    for name, got, want in zip(("hidden", "weight", "bias", "extra"), grads,
                               [x for x in ref_grads if x is not None]):
        assert got.dtype == dtype
        close(got, want, tol, f"grad {name}")


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_keeps_nothing():
    g = generator("token-logprobs-frozen")
    hidden = torch.randn(9, 16, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(300, 16, generator=g).to(DEVICE)
    labels = torch.randint(0, 300, (9,), generator=g).to(DEVICE)
    logp = ce.fused_linear_token_logprobs(hidden, weight, labels)
    (gh,) = torch.autograd.grad(logp.sum(), [hidden])
    _, (want_h, _, _, _) = oracle(hidden, weight, labels, torch.ones(9, device=DEVICE))
    close(gh, want_h, 2e-5, "grad hidden")
    with torch.no_grad():
        assert not ce.fused_linear_token_logprobs(hidden, weight, labels).requires_grad


def test_bad_labels_and_temperature_are_refused_on_cpu():
    hidden, weight = torch.randn(3, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match="labels must be in"):
        ce.fused_linear_token_logprobs(hidden, weight, torch.tensor([1, 50, 2]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ce.fused_linear_token_logprobs_reference(hidden, weight, torch.tensor([1, 2, 3]), temperature=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_size_bf16_matches_the_reference_and_keeps_memory_to_a_chunk():
    """8B head shape (V = 128256, H = 4096), 4096 tokens in bf16: log-probabilities and gradients against the
    float32 reference, and the working memory while the op runs (beyond its inputs and gradients) stays far below
    one (tokens x vocab) float32 logits tensor."""
    g = torch.Generator(device="cuda").manual_seed(SESSION_SEED)
    n, hdim, v = 4096, 4096, 128256
    hidden = torch.randn(n, hdim, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, hdim, device="cuda", generator=g) / hdim**0.5 * 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::7] = -100
    upstream = torch.randn(n, device="cuda", generator=g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logp = ce.fused_linear_token_logprobs(hidden, weight, labels)
    gh, gw = torch.autograd.grad((logp * upstream).sum(), [hidden, weight])
    torch.cuda.synchronize()
    grads_bytes = (gh.numel() + gw.numel()) * 2  # the outputs themselves (dW is a whole 1 GiB)
    working = torch.cuda.max_memory_allocated() - base - grads_bytes  # chunks of logits, lse, logp
    assert working < 0.25 * n * v * 4, (f"{working / 2**30:.2f} GiB of working memory; the whole logits in float32 "
                                        f"would be {n * v * 4 / 2**30:.2f} GiB")
    rows = slice(0, 512)  # the reference materialises the logits: a slice of the rows
    h32 = hidden[rows].detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = ce.fused_linear_token_logprobs_reference(h32, w32, labels[rows])
    rh, rw = torch.autograd.grad((ref * upstream[rows]).sum(), [h32, w32])
    close(logp[rows], ref.double(), 2e-2, "logp")
    close(gh[rows], rh.double(), 3e-2, "grad hidden")
    # the weight gradient over all rows vs the slice's: compare the slice's own contribution through a second call
    logp_s = ce.fused_linear_token_logprobs(hidden[rows].detach(), weight, labels[rows])
    (gw_s,) = torch.autograd.grad((logp_s * upstream[rows]).sum(), [weight])
    close(gw_s, rw.double(), 3e-2, "grad weight")
