"""RMSNorm, LayerNorm, RoPE and GLU Triton kernels, forward and backward, against float64 oracles.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below before Triton is imported).
Kernel outputs are poisoned (NaN-filled allocations) so an element a kernel forgets to write fails the comparison.
Tolerances, relative to |expected| + max|expected| (so cancellation near zero is judged against the tensor's scale):
float32 1e-5, bfloat16 1e-2, float16 2e-3.  GPU tests (-m gpu) repeat the checks at real model sizes.
"""
import importlib
import os
import random
import sys
import zlib

import pytest
import torch

# the interpreter's numpy exp overflows to inf in saturated sigmoids, which is the intended IEEE result
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

_ON_GPU = torch.cuda.is_available()
if not _ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates the kernels, i.e. at module import
triton = pytest.importorskip("triton")

DEVICE = "cuda" if _ON_GPU else "cpu"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Inputs are drawn fresh each run: a per-session seed is mixed into every test's seed. It is named in every
# failure message; FASTTUNE_TEST_SEED=<n> replays a run.
from seeding import SESSION_SEED  # noqa: E402 - one seed for the whole session


def _ensure_interpreted_triton() -> None:
    """Triton decorates its own library (tl.sum, ...) when first imported; if that happened before TRITON_INTERPRET
    was set (any earlier `import fasttune` does it), the interpreter cannot run. Safety net only: the real fix is
    setting TRITON_INTERPRET in tests/conftest.py. Re-import Triton's Python modules (not its C extension)."""
    import triton.language as tl

    if _ON_GPU or type(tl.sum).__name__ == "InterpretedFunction":
        return
    for name in [m for m in sys.modules if m == "triton" or (m.startswith("triton.") and not m.startswith("triton._C"))]:
        del sys.modules[name]
    importlib.import_module("triton.language")


def _load(name: str):
    mod = importlib.import_module(f"fasttune.kernels.{name}")
    # A module imported earlier in this process without TRITON_INTERPRET holds compiled kernels that cannot run on
    # CPU tensors; re-executing it re-decorates the kernels for the interpreter.
    kernel = next(v for k, v in vars(mod).items() if k.endswith("_kernel"))
    if not _ON_GPU and (type(kernel).__name__ != "InterpretedFunction" or mod.triton is not sys.modules["triton"]):
        helpers = importlib.import_module("fasttune.kernels._triton")
        if helpers.triton is not sys.modules["triton"]:
            importlib.reload(helpers)
        mod = importlib.reload(mod)
    return mod


_ensure_interpreted_triton()


rms_mod, ln_mod, rope_mod, glu_mod = (_load(n) for n in ("rms_norm", "layer_norm", "rope", "glu"))
triton_helpers = importlib.import_module("fasttune.kernels._triton")
_MODULES = (rms_mod, ln_mod, rope_mod, glu_mod)


def _poisoned_alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    for mod in _MODULES:
        monkeypatch.setattr(mod, "alloc", _poisoned_alloc)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str, min_scale: float = 0.0):
    """|actual - expected| <= rtol * (|expected| + scale), scale = max(max|expected|, min_scale); min_scale is the
    size of the terms that cancel when the exact result is ~0 (e.g. rms_norm's dx at width 1)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite (unwritten poisoned output?; seed {SESSION_SEED})"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, min_scale)
    err = (actual - expected).abs()
    bound = rtol * (expected.abs() + scale) + 1e-9  # floor: float64 round-off where the exact value is 0
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, (f"{what}: max error {err.max().item():.3e} exceeds rtol {rtol} (worst ratio {worst:.2f}; "
                          f"FASTTUNE_TEST_SEED={SESSION_SEED})")


def _grads(outputs, inputs, grad_outputs):
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    grad_outputs = grad_outputs if isinstance(grad_outputs, (tuple, list)) else (grad_outputs,)
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def _seed(*key) -> None:
    """Per-test seed mixed with the session seed (crc32, not hash(): Python salts string hashes)."""
    torch.manual_seed(zlib.crc32(repr((SESSION_SEED,) + key).encode()))


def _leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad)


def test_poison_is_active():
    assert torch.isnan(rms_mod.alloc((2,), torch.float32, DEVICE)).all()


# ----------------------------------------------------------------------------------------------------- RMSNorm


def _rms_oracle(x64, w64, eps, unit_offset, x_dtype):
    """rms_norm_reference's casts with float64 where it uses float32 (the cast of n rounds, its gradient is identity)."""
    n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return n * (1.0 + w64)
    rounded = n + (n.detach().to(x_dtype).double() - n.detach())  # value rounded like .to(x.dtype), identity grad
    return w64 * rounded


def _check_rms(x, w, unit_offset, eps=1e-6, w_grad=True):
    rtol = RTOL[x.dtype]
    x, w = _leaf(x), _leaf(w, w_grad)
    y = rms_mod.rms_norm(x, w, eps, unit_offset)
    assert y.dtype == rms_mod.rms_norm_reference(x, w, eps, unit_offset).dtype
    dy = torch.randn_like(y)
    inputs = (x, w) if w_grad else (x,)
    grads = _grads(y, inputs, dy)
    x64, w64 = _f64(x), _f64(w)
    y64 = _rms_oracle(x64, w64, eps, unit_offset, x.dtype)
    ref = _grads(y64, (x64, w64) if w_grad else (x64,), dy.double())
    _assert_close(y, y64, rtol, "rms_norm y")
    rstd = torch.rsqrt(x64.detach().pow(2).mean(-1) + eps)
    terms = dy.double().abs().max() * ((1.0 + w64) if unit_offset else w64).abs().max() * rstd.max()
    _assert_close(grads[0], ref[0], rtol, "rms_norm dx", min_scale=terms.item())
    if w_grad:
        assert grads[1].dtype == w.dtype
        _assert_close(grads[1], ref[1], rtol, "rms_norm dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (6, 96), (2, 3, 1000), (9, 256), (3, 100, 128)])
def test_rms_norm(shape, unit_offset, dtype):
    # (3, 100, 128): many short rows (as Qwen3's q_norm / k_norm), 300 rows in tiles of 32, the last one partial,
    # over more tiles than the backward has programs, some of which get no rows
    _seed((shape, unit_offset, str(dtype)))
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(dtype)
    _check_rms(x, w, unit_offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("width", [100, 1000])
def test_rms_norm_rows_longer_than_one_block(monkeypatch, width, unit_offset, dtype):
    monkeypatch.setattr(triton_helpers, "MAX_BLOCK", 32)  # forces the looped path: 4 and 32 column blocks per row
    _seed(width)
    x = torch.randn(7, width, device=DEVICE).to(dtype)
    w = torch.randn(width, device=DEVICE).to(dtype)
    _check_rms(x, w, unit_offset)


def test_rms_norm_mixed_dtypes_frozen_weight_and_strided_input():
    _seed(1)
    # bf16 activations with a float32 weight: the Llama path promotes the output to float32, like the reference
    x = torch.randn(4, 50, device=DEVICE).to(torch.bfloat16)
    _check_rms(x, torch.randn(50, device=DEVICE), unit_offset=False)
    # frozen weight (LoRA): no dw computed; a transposed (non-unit-stride) input
    x = torch.randn(33, 5, device=DEVICE).t()
    _check_rms(x, torch.randn(33, device=DEVICE), unit_offset=True, w_grad=False)


# ------------------------------------------------------------------- residual add + RMSNorm (forward only)


def _round_like_kernel(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype as the kernels round: to nearest on the GPU (as torch), but the Triton interpreter (3.9)
    truncates float32 to bfloat16, which this mirrors on the CPU so the checks stay bit for bit."""
    if _ON_GPU or dtype != torch.bfloat16:
        return t.to(dtype)
    return (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)  # exact: low bits are zero


def _check_add_rms(x, d, w, unit_offset, d_scale, eps=1e-6):
    """z what the decoder's add gives (bit for bit on the GPU), y bit for bit the plain kernel's rms_norm(z), and y
    against the float64 oracle of RMSNorm(z)."""
    with torch.no_grad():
        y, z = rms_mod.add_rms_norm(x, d, w, eps, unit_offset, d_scale)
        want_z = x + d if d_scale is None else x + d * d_scale  # what the decoder's layer computes
        dd = d.float() if d_scale is None else _round_like_kernel(d.float() * d_scale, x.dtype).float()
        assert z.dtype == x.dtype and torch.equal(z, _round_like_kernel(x.float() + dd, x.dtype))
        if _ON_GPU:
            assert torch.equal(z, want_z), "add_rms_norm: z differs from the decoder's x + d"
        assert torch.equal(y, rms_mod.rms_norm(z, w, eps, unit_offset)), "add_rms_norm: y differs from rms_norm(z)"
        ref_y, ref_z = rms_mod.add_rms_norm_reference(x, d, w, eps, unit_offset, d_scale)
        assert torch.equal(ref_z, want_z) and ref_y.dtype == y.dtype
    y64 = _rms_oracle(z.double(), w.double(), eps, unit_offset, x.dtype)
    _assert_close(y, y64, RTOL[x.dtype], "add_rms_norm y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("d_scale", [None, 0.22])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (6, 96), (2, 3, 1000)])
def test_add_rms_norm(shape, d_scale, unit_offset, dtype):
    _seed((shape, d_scale, unit_offset, str(dtype), "add"))
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    d = (torch.randn(shape, device=DEVICE) * 2).to(dtype)
    w = (torch.rand(shape[-1], device=DEVICE) + 0.5).to(dtype)
    _check_add_rms(x, d, w, unit_offset, d_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_scale", [None, 0.22])
def test_add_rms_norm_rows_longer_than_one_block(monkeypatch, d_scale, dtype):
    monkeypatch.setattr(triton_helpers, "MAX_BLOCK", 32)  # the looped path recomputes z in its second pass
    _seed((d_scale, str(dtype), "add-looped"))
    x = torch.randn(5, 200, device=DEVICE).to(dtype)
    d = torch.randn(5, 200, device=DEVICE).to(dtype)
    _check_add_rms(x, d, torch.randn(200, device=DEVICE).to(dtype), False, d_scale)
    # strided (transposed) inputs, Gemma's unit offset
    x, d = torch.randn(200, 5, device=DEVICE).to(dtype).t(), torch.randn(200, 5, device=DEVICE).to(dtype).t()
    _check_add_rms(x, d, torch.randn(200, device=DEVICE).to(dtype), True, d_scale)


def test_add_rms_norm_refuses_autograd_and_mismatched_inputs():
    x = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE)
    for fn in (rms_mod.add_rms_norm, rms_mod.add_rms_norm_reference):
        with pytest.raises(RuntimeError, match="no backward"):
            fn(x, torch.randn(2, 8, device=DEVICE), w, 1e-6)
        with pytest.raises(ValueError, match="same shape and dtype"):
            fn(x.detach(), torch.randn(2, 8, device=DEVICE, dtype=torch.float64), w, 1e-6)
    with torch.no_grad():  # under no_grad the same call runs
        rms_mod.add_rms_norm(x, torch.randn(2, 8, device=DEVICE), w, 1e-6)


# --------------------------------------------------------------------------------------------------- LayerNorm


def _check_ln(x, w, b, eps=1e-5):
    rtol = RTOL[x.dtype]
    x, w = _leaf(x), _leaf(w)
    b = _leaf(b) if b is not None else None
    y = ln_mod.layer_norm(x, w, b, eps)
    assert y.dtype == x.dtype
    dy = torch.randn_like(y)
    inputs = (x, w) + ((b,) if b is not None else ())
    grads = _grads(y, inputs, dy)
    ins64 = [_f64(t) for t in inputs]
    y64 = torch.nn.functional.layer_norm(ins64[0], (x.shape[-1],), ins64[1], ins64[2] if b is not None else None, eps)
    ref = _grads(y64, ins64, dy.double())
    _assert_close(y, y64, rtol, "layer_norm y")
    rstd = torch.rsqrt(ins64[0].detach().var(-1, unbiased=False) + eps)
    terms = (dy.double().abs().max() * ins64[1].detach().abs().max() * rstd.max()).item()
    for name, g, r in zip(("dx", "dw", "db"), grads, ref):
        _assert_close(g, r, rtol, f"layer_norm {name}", min_scale=terms if name == "dx" else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (5, 96), (2, 3, 1000)])
def test_layer_norm(shape, bias, dtype):
    _seed((shape, bias, str(dtype)))
    x = (torch.randn(shape, device=DEVICE) * 2 + 1.5).to(dtype)  # non-zero mean exercises the centring
    w = torch.randn(shape[-1], device=DEVICE).to(dtype)
    b = torch.randn(shape[-1], device=DEVICE).to(dtype) if bias else None
    _check_ln(x, w, b)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_rows_longer_than_one_block(monkeypatch, bias):
    monkeypatch.setattr(triton_helpers, "MAX_BLOCK", 32)  # layer_norm shares the row-kernel launch helpers
    _seed(3)
    x = torch.randn(6, 200, device=DEVICE) + 4.0
    _check_ln(x, torch.randn(200, device=DEVICE), torch.randn(200, device=DEVICE) if bias else None)


def test_layer_norm_without_weight():
    _seed(4)
    x = _leaf(torch.randn(3, 21, device=DEVICE))
    y = ln_mod.layer_norm(x, None, None, 1e-5)
    (dx,) = _grads(y, (x,), torch.ones_like(y) * torch.arange(21.0, device=DEVICE))
    x64 = _f64(x)
    y64 = torch.nn.functional.layer_norm(x64, (21,), None, None, 1e-5)
    (ref,) = _grads(y64, (x64,), torch.arange(21.0, device=DEVICE, dtype=torch.float64).expand(3, 21))
    _assert_close(y, y64, 1e-5, "layer_norm y")
    _assert_close(dx, ref, 1e-5, "layer_norm dx")


# -------------------------------------------------------------------------------------------------------- RoPE


def _cos_sin(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """transformers' default rotary table for integer positions (batch, seq) -> cos, sin (batch, seq, head_dim)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).double() / head_dim)
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _check_rope(q, k, cos, sin):
    rtol = RTOL[q.dtype]
    q, k = _leaf(q), _leaf(k)
    qo, ko = rope_mod.apply_rope(q, k, cos, sin)
    assert qo.dtype == q.dtype and ko.dtype == k.dtype
    dqo, dko = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = _grads((qo, ko), (q, k), (dqo, dko))
    q64, k64 = _f64(q), _f64(k)
    if cos.dim() == 2:  # the reference wants (batch, seq, head_dim)
        cos, sin = cos[None], sin[None]
    r = rope_mod.apply_rope_reference(q64, k64, cos.double(), sin.double())
    rdq, rdk = _grads(r, (q64, k64), (dqo.double(), dko.double()))
    _assert_close(qo, r[0], rtol, "rope q")
    _assert_close(ko, r[1], rtol, "rope k")
    _assert_close(dq, rdq, rtol, "rope dq")
    _assert_close(dk, rdk, rtol, "rope dk")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", ["broadcast", "per_batch"])
@pytest.mark.parametrize("B,T,Hq,Hk,D", [(1, 1, 1, 1, 2), (2, 3, 4, 2, 10), (1, 5, 3, 1, 96), (2, 2, 32, 8, 128)])
def test_rope(B, T, Hq, Hk, D, cos_batch, dtype):
    _seed((B, T, Hq, Hk, D, cos_batch, str(dtype)))
    q = torch.randn(B, T, Hq, D, device=DEVICE).to(dtype)
    k = torch.randn(B, T, Hk, D, device=DEVICE).to(dtype)
    if cos_batch == "broadcast":
        positions = torch.arange(T, device=DEVICE)[None] + 1000
    else:  # packed sequences: arbitrary per-token positions for each batch row
        positions = torch.randint(0, 4096, (B, T), device=DEVICE)
    cos, sin = _cos_sin(positions, D)
    _check_rope(q, k, cos, sin)


def test_rope_strided_views_and_general_tables():
    _seed(5)
    B, T, Hq, Hk, D = 2, 3, 4, 2, 6
    # q/k/v as views into one fused projection output, and k transposed from (B, H, T, D)
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=DEVICE)
    q = qkv[..., : Hq * D].view(B, T, Hq, D)
    k = torch.randn(B, Hk, T, D, device=DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    # arbitrary cos/sin (halves differ): checks the general formula and its exact transpose in the backward
    cos, sin = torch.randn(B, T, D, device=DEVICE), torch.randn(B, T, D, device=DEVICE)
    _check_rope(q, k, cos, sin)
    _check_rope(q, k, cos[0], sin[0])  # a (seq, head_dim) table shared by the batch


def test_rope_rejects_bad_shapes():
    q = torch.randn(1, 2, 2, 6, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_mod.apply_rope(q, q, torch.randn(1, 3, 6, device=DEVICE), torch.randn(1, 3, 6, device=DEVICE))
    with pytest.raises(ValueError, match="even"):
        q = torch.randn(1, 2, 2, 5, device=DEVICE)
        rope_mod.apply_rope(q, q, torch.randn(1, 2, 5, device=DEVICE), torch.randn(1, 2, 5, device=DEVICE))


# ------------------------------------------------------------------ RoPE + KV-cache write (decode, forward only)


def _decode_inputs(S, Hq, Hk, D, dtype):
    """q, k, v of one token per slot as (S, H, 1, D) views of one fused projection output (as the decoder makes)."""
    qkv = torch.randn(S, 1, (Hq + 2 * Hk) * D, device=DEVICE).to(dtype)
    q = qkv[..., : Hq * D].view(S, 1, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D : (Hq + Hk) * D].view(S, 1, Hk, D).transpose(1, 2)
    v = qkv[..., (Hq + Hk) * D :].view(S, 1, Hk, D).transpose(1, 2)
    return q, k, v


def _check_rope_cache_write(S, Hq, Hk, D, r, M, dtype):
    q, k, v = _decode_inputs(S, Hq, Hk, D, dtype)
    lengths = torch.randint(1, M + 1, (S,), device=DEVICE, dtype=torch.int32)
    cos, sin = _cos_sin((lengths.long() - 1)[:, None], r)  # (S, 1, r): the rotary table rows of each slot
    kc = torch.full((S, M, Hk, D), float("nan"), device=DEVICE).to(dtype)
    vc = kc.clone()
    with torch.no_grad():
        qo = rope_mod.rope_cache_write(q, k, v, cos, sin, kc, vc, lengths)
        # bit for bit the training kernel on the rotated features, the rest passed through
        qe, ke = rope_mod.apply_rope(q.transpose(1, 2)[..., :r], k.transpose(1, 2)[..., :r], cos, sin)
    assert qo.shape == q.shape and qo.dtype == dtype
    rows = torch.arange(S, device=DEVICE)
    pos = lengths.long() - 1
    assert torch.equal(qo.transpose(1, 2)[..., :r], qe) and torch.equal(qo[..., r:], q[..., r:])
    assert torch.equal(kc[rows, pos][..., :r], ke[:, 0]) and torch.equal(kc[rows, pos][..., r:], k[:, :, 0, r:])
    assert torch.equal(vc[rows, pos], v[:, :, 0])
    untouched = torch.ones(S, M, dtype=torch.bool, device=DEVICE)
    untouched[rows, pos] = False
    assert torch.isnan(kc[untouched]).all() and torch.isnan(vc[untouched]).all(), "a cache row outside p_s written"
    # against float64
    q64, k64 = q.transpose(1, 2).double(), k.transpose(1, 2).double()
    r64 = rope_mod.apply_rope_reference(q64[..., :r], k64[..., :r], cos.double(), sin.double())
    _assert_close(qo.transpose(1, 2)[..., :r], r64[0], RTOL[dtype], "rope_cache_write q")
    _assert_close(kc[rows, pos][..., :r], r64[1][:, 0], RTOL[dtype], "rope_cache_write k")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,Hq,Hk,D,r,M", [(1, 1, 1, 2, 2, 1), (3, 4, 2, 16, 16, 9), (5, 6, 2, 10, 6, 7),
                                          (2, 32, 8, 128, 128, 33), (4, 8, 8, 64, 48, 5)])
def test_rope_cache_write(S, Hq, Hk, D, r, M, dtype):
    _seed((S, Hq, Hk, D, r, M, str(dtype), "rope-write"))
    _check_rope_cache_write(S, Hq, Hk, D, r, M, dtype)


@pytest.mark.parametrize("float32", [False, True])
def test_rope_cache_write_dispatcher_reference_path_agrees(float32):
    """kernels.rope_cache_write without Triton (apply_rotary + the index writes) against the kernel."""
    import fasttune.kernels as K

    _seed(("rope-write-ref", float32))
    S, Hq, Hk, D, r, M = 3, 4, 2, 12, 8, 6
    q, k, v = _decode_inputs(S, Hq, Hk, D, torch.bfloat16)
    lengths = torch.tensor([1, 6, 3], device=DEVICE, dtype=torch.int32)
    cos, sin = _cos_sin((lengths.long() - 1)[:, None], r)
    caches = [torch.zeros(S, M, Hk, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        want = rope_mod.rope_cache_write(q, k, v, cos, sin, caches[0], caches[1], lengths)
        os.environ["FASTTUNE_KERNELS"] = "reference"
        try:
            got = K.rope_cache_write(q, k, v, cos, sin, caches[2], caches[3], lengths, float32)
        finally:
            del os.environ["FASTTUNE_KERNELS"]
    # the reference rounds cos/sin and each product to bf16 unless float32 (then it rounds once, as the kernel);
    # one bf16 rounding step is ~4e-3 relative
    tol = 1e-2 if float32 else 2e-2
    _assert_close(got, want.float(), tol, "reference q")
    _assert_close(caches[2], caches[0].float(), tol, "reference k cache")
    assert torch.equal(caches[3], caches[1])


def test_rope_cache_write_refuses_autograd_and_bad_shapes():
    q, k, v = _decode_inputs(2, 2, 1, 8, torch.float32)
    lengths = torch.tensor([1, 2], device=DEVICE, dtype=torch.int32)
    cos, sin = _cos_sin((lengths.long() - 1)[:, None], 8)
    kc = torch.zeros(2, 4, 1, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="no backward"):
        rope_mod.rope_cache_write(q.detach().requires_grad_(), k, v, cos, sin, kc, kc.clone(), lengths)
    with torch.no_grad(), pytest.raises(ValueError, match="caches"):
        rope_mod.rope_cache_write(q, k, v, cos, sin, kc[:, :, :, :4], kc[:, :, :, :4], lengths)
    with torch.no_grad(), pytest.raises(ValueError, match="one new token"):
        rope_mod.rope_cache_write(q.expand(2, 2, 3, 8), k, v, cos, sin, kc, kc.clone(), lengths)


# --------------------------------------------------------------------------------------------------------- GLU


def _check_glu(gate, up, activation):
    rtol = RTOL[gate.dtype]
    gate, up = _leaf(gate), _leaf(up)
    y = glu_mod.glu(gate, up, activation)
    assert y.dtype == gate.dtype and y.shape == gate.shape
    dy = torch.randn_like(y)
    dg, du = _grads(y, (gate, up), dy)
    g64, u64 = _f64(gate), _f64(up)
    y64 = glu_mod.glu_reference(g64, u64, activation)
    rdg, rdu = _grads(y64, (g64, u64), dy.double())
    # The activations are x * P(x) with P from 1 + erf(...) etc., so float32 loses absolute, not relative, accuracy
    # in the tails (as torch's own float32 kernels do): the error scale is the size of the factors, |g|, |u|, |dy|.
    g_, u_, dy_ = g64.detach().abs(), u64.detach().abs(), dy.double().abs()
    _assert_close(y, y64, rtol, f"glu[{activation}] y", min_scale=(g_ * u_).max().item())
    _assert_close(dg, rdg, rtol, f"glu[{activation}] dgate", min_scale=(dy_ * u_ * (1 + g_)).max().item())
    _assert_close(du, rdu, rtol, f"glu[{activation}] dup", min_scale=(dy_ * g_).max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 3, 1000), (1, 2100)])
def test_glu(shape, activation, dtype):
    _seed((shape, activation, str(dtype)))
    gate = (torch.randn(shape, device=DEVICE) * 4).to(dtype)  # wide range: saturated tails of the activations
    up = torch.randn(shape, device=DEVICE).to(dtype)
    _check_glu(gate, up, activation)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu_strided_halves_of_fused_projection(activation):
    _seed(6)
    gate_up = torch.randn(2, 5, 2 * 70, device=DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)  # row stride 140, unit column stride: used as views, no copy
    assert not gate.is_contiguous()
    _check_glu(gate, up, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 2 * 37), (1, 2 * 50), (2, 3, 2 * 40)])
def test_glu_packed_equals_glu_of_the_halves_and_returns_one_gradient(shape, dtype):
    """glu_packed(gate_up) is glu on the two halves, bit for bit, and its gradient is [dgate | dup] as one tensor
    (written by the kernel in place of the concatenation a split's backward makes); checked against the float64
    oracle through _check_glu's path too."""
    _seed((shape, str(dtype)))
    gate_up = _leaf((torch.randn(shape, device=DEVICE) * 3).to(dtype))
    y = glu_mod.glu_packed(gate_up, "silu")
    dy = torch.randn_like(y)
    (d,) = _grads(y, (gate_up,), dy)
    assert d.shape == gate_up.shape and d.is_contiguous()
    gate, up = (_leaf(t) for t in gate_up.detach().chunk(2, dim=-1))
    y_halves = glu_mod.glu(gate, up, "silu")
    dg, du = _grads(y_halves, (gate, up), dy)
    assert torch.equal(y, y_halves)
    assert torch.equal(d, torch.cat([dg, du], dim=-1))
    with pytest.raises(ValueError, match="even"):
        glu_mod.glu_packed(torch.randn(2, 5, device=DEVICE), "silu")


def test_glu_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown GLU activation"):
        glu_mod.glu(torch.randn(2, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE), "relu")


# ------------------------------------------------------------------------------------ GPU, real model sizes


def _chunked_oracle_check(ours_out, ours_grads, oracle, inputs, dy, row_dims, rtol, what, reduced=()):
    """Compare against a float64 oracle evaluated over chunks of rows (bounded memory at 32K tokens).
    ``row_dims``: index of the row-split dim per input (None: shared, e.g. a weight, whose grad is summed)."""
    n = inputs[0].shape[row_dims[0]]
    step = 4096
    grad_acc = [None] * len(inputs)
    for start in range(0, n, step):
        ins = [(t.narrow(d, start, min(step, n - start)) if d is not None else t).detach().double().requires_grad_()
               for t, d in zip(inputs, row_dims)]
        out = oracle(*ins)
        dy_c = dy.narrow(row_dims[0], start, min(step, n - start)).double()
        _assert_close(ours_out.narrow(row_dims[0], start, min(step, n - start)), out, rtol[0], f"{what} y")
        grads = torch.autograd.grad(out, ins, dy_c)
        for i, (g, d) in enumerate(zip(grads, row_dims)):
            if d is None:
                grad_acc[i] = g if grad_acc[i] is None else grad_acc[i] + g
            else:
                _assert_close(ours_grads[i].narrow(d, start, min(step, n - start)), g, rtol[1], f"{what} grad{i}")
    for i, d in enumerate(row_dims):
        if d is None:
            _assert_close(ours_grads[i], grad_acc[i], rtol[2], f"{what} grad{i} (reduced over rows)")


GPU_RTOL = {torch.float32: (1e-5, 1e-5, 3e-5), torch.bfloat16: (1e-2, 1e-2, 1e-2)}


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["rms", "rms_gemma", "ln"])
def test_gpu_norms_real_size(op, dtype):
    _seed(0)
    N, H = 32768, 4096
    x = _leaf(torch.randn(N, H, device="cuda").to(dtype))
    w = _leaf((torch.rand(H, device="cuda") + 0.5).to(dtype))
    b = _leaf(torch.randn(H, device="cuda").to(dtype))
    if op == "ln":
        y = ln_mod.layer_norm(x, w, b, 1e-5)
        inputs, oracle = (x, w, b), lambda x_, w_, b_: torch.nn.functional.layer_norm(x_, (H,), w_, b_, 1e-5)
    else:
        uo = op == "rms_gemma"
        y = rms_mod.rms_norm(x, w, 1e-6, uo)
        inputs, oracle = (x, w), lambda x_, w_: _rms_oracle(x_, w_, 1e-6, uo, dtype)
    dy = torch.randn_like(y)
    grads = _grads(y, inputs, dy)
    _chunked_oracle_check(y, grads, oracle, inputs, dy, (0,) + (None,) * (len(inputs) - 1), GPU_RTOL[dtype], op)


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(65536, 128), (8192, 128), (2048, 2048), (3000, 96)])
def test_gpu_rms_norm_row_tiles(rows, width, dtype):
    """The row-tile paths at the Qwen3-30B-A3B step's norms (q_norm 2048 x 32 heads of 128, k_norm 2048 x 4, the
    hidden 2048 x 2048) and a width that is not a power of two, forward, dx and dw, against float64."""
    _seed(rows, width)
    x = _leaf((torch.randn(rows, width, device="cuda") * 3).to(dtype))
    w = _leaf((torch.rand(width, device="cuda") + 0.5).to(dtype))
    y = rms_mod.rms_norm(x, w, 1e-6)
    dy = torch.randn_like(y)
    grads = _grads(y, (x, w), dy)
    oracle = lambda x_, w_: _rms_oracle(x_, w_, 1e-6, False, dtype)  # noqa: E731
    _chunked_oracle_check(y, grads, oracle, (x, w), dy, (0, None), GPU_RTOL[dtype], f"rms {rows}x{width}")


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gpu_glu_real_size(activation, dtype):
    _seed(0)
    N, I = 32768, 14336
    gate = _leaf((torch.randn(N, I, device="cuda") * 3).to(dtype))
    up = _leaf(torch.randn(N, I, device="cuda").to(dtype))
    y = glu_mod.glu(gate, up, activation)
    dy = torch.randn_like(y)
    grads = _grads(y, (gate, up), dy)
    oracle = lambda g, u: glu_mod.glu_reference(g, u, activation)  # noqa: E731
    _chunked_oracle_check(y, grads, oracle, (gate, up), dy, (0, 0), GPU_RTOL[dtype], f"glu[{activation}]")


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_rope_real_size(dtype):
    _seed(0)
    B, T, Hq, Hk, D = 4, 8192, 32, 8, 128
    q = _leaf(torch.randn(B, T, Hq, D, device="cuda").to(dtype))
    k = _leaf(torch.randn(B, T, Hk, D, device="cuda").to(dtype))
    cos, sin = _cos_sin(torch.randint(0, 131072, (B, T), device="cuda"), D)
    qo, ko = rope_mod.apply_rope(q, k, cos, sin)
    dqo, dko = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = _grads((qo, ko), (q, k), (dqo, dko))
    rtol = GPU_RTOL[dtype][0]
    for bi in range(B):  # float64 oracle one sequence at a time
        q64, k64 = _f64(q[bi : bi + 1]), _f64(k[bi : bi + 1])
        r = rope_mod.apply_rope_reference(q64, k64, cos[bi : bi + 1].double(), sin[bi : bi + 1].double())
        rdq, rdk = _grads(r, (q64, k64), (dqo[bi : bi + 1].double(), dko[bi : bi + 1].double()))
        _assert_close(qo[bi : bi + 1], r[0], rtol, "rope q")
        _assert_close(ko[bi : bi + 1], r[1], rtol, "rope k")
        _assert_close(dq[bi : bi + 1], rdq, rtol, "rope dq")
        _assert_close(dk[bi : bi + 1], rdk, rtol, "rope dk")


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 32768])
def test_gpu_add_rms_norm_real_size(rows, dtype):
    """Decode (1 and 64 rows) and prefill sizes at hidden 4096: z and y bit for bit the unfused add and kernel."""
    _seed(rows)
    H = 4096
    x = torch.randn(rows, H, device="cuda").to(dtype)
    d = torch.randn(rows, H, device="cuda").to(dtype)
    w = (torch.rand(H, device="cuda") + 0.5).to(dtype)
    with torch.no_grad():
        y, z = rms_mod.add_rms_norm(x, d, w, 1e-5)
        assert torch.equal(z, x + d)
        assert torch.equal(y, rms_mod.rms_norm(x + d, w, 1e-5))
        y, z = rms_mod.add_rms_norm(x, d, w, 1e-5, d_scale=0.22)  # Granite's scaled residual
        assert torch.equal(z, x + d * 0.22)
    _assert_close(y[:4096], _rms_oracle(z[:4096].double(), w.double(), 1e-5, False, dtype), GPU_RTOL[dtype][0],
                  "add_rms_norm y")


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 64])
def test_gpu_rope_cache_write_8b_shape(S, dtype):
    """Llama-3.1-8B decode shape (32 q heads, 8 kv heads, head_dim 128, 2048 cached positions)."""
    _seed(S)
    _check_rope_cache_write(S, 32, 8, 128, 128, 2048, dtype)
