"""GGUF block dequantisation in Triton: bit for bit equal to the PyTorch reference (itself bit-exact with the gguf
package, tests/test_models_gguf.py) followed by a cast, for every block format and output dtype; the dispatcher;
GGUF linears on the Triton path equal their reference path bit for bit.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set in tests/conftest.py before triton
is imported). Outputs are NaN-poisoned so an element the kernel forgets to write fails. Random codes everywhere,
and f16 scales that include zero, -0, subnormals, negative and large values. GPU tests (-m gpu) repeat the checks
at real sizes and time the kernel against the reference.
"""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
# f16 outputs of the large special scales overflow to inf, the intended IEEE result (the interpreter warns)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

import fasttune.kernels.gguf_dequant as gd  # noqa: E402
from seeding import SESSION_SEED  # noqa: E402 - one seed for the whole session

# byte offsets of each format's f16 fields (kernels/gguf_dequant.py's docstring). Not imported from
# test_models_gguf: that module skips itself without the `gguf` package, which would skip this one with it.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(gd._dequantize_gguf_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU; "
                       "set it at the top of tests/conftest.py (before anything imports triton)")

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# f16 bit patterns for scales: 0, -0, smallest subnormal, a subnormal, -2.0, 65504 (max), 1e-3
SPECIAL_F16 = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0xC000, 0x7BFF, 0x1419], dtype=np.uint16)


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Raw bytes (rows, row bytes): every code random, f16 scales small normals with special values mixed in."""
    fmt = gd.FORMAT_BY_NAME[type_name]
    rng = np.random.default_rng(SESSION_SEED * 7919 + seed)
    n_blocks = rows * cols // fmt.block_size
    blocks = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        f16 = (rng.standard_normal(n_blocks) * 0.02).astype(np.float16).view(np.uint16)
        special = rng.random(n_blocks) < 0.1
        f16[special] = rng.choice(SPECIAL_F16, int(special.sum()))
        blocks[:, off:off + 2] = f16.view(np.uint8).reshape(n_blocks, 2)
    return torch.from_numpy(blocks.reshape(rows, -1).copy()).to(DEVICE)


def _reference(blocks, type_name, shape, dtype):
    return gd.dequantize(blocks, gd.FORMAT_BY_NAME[type_name].type_id, shape).to(dtype)


def _assert_bitwise(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.view(torch.int16 if got.element_size() == 2 else torch.int32), \
        want.view(torch.int16 if want.element_size() == 2 else torch.int32)
    differ = g != w
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {got.numel()} values differ (seed "
                              f"{SESSION_SEED}), e.g. got {got[differ][:4].tolist()} want {want[differ][:4].tolist()}")


# (3, 256): K-quants' three blocks - fewer than one program's rows; (37, 512): odd rows, a partial last program
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("type_name", BLOCK_TYPES)
@pytest.mark.parametrize("shape", [(3, 256), (37, 512)])
def test_triton_equals_reference_bitwise(type_name, dtype, shape):
    blocks = random_blocks(type_name, *shape, seed=hash((type_name, shape)) % 10_000)
    want = _reference(blocks, type_name, shape, dtype)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    got = gd.dequantize_triton(blocks, gd.FORMAT_BY_NAME[type_name].type_id, shape, out=out)
    assert got is out
    _assert_bitwise(got, want, f"{type_name} -> {dtype}")


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_float_types(type_name, dtype):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(SESSION_SEED)) * 3
    src = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[type_name]
    raw = x.to(src).reshape(-1).view(torch.uint8).to(DEVICE)
    fmt = gd.FORMAT_BY_NAME[type_name]
    got = gd.dequantize_triton(raw, fmt.type_id, (5, 64), dtype)
    _assert_bitwise(got, gd.dequantize(raw, fmt.type_id, (5, 64)).to(dtype), f"{type_name} -> {dtype}")


def test_bf16_rounding_is_to_nearest_even():
    """Q8_0 with d = 1 + 2^-8 + 2^-9 (f16) and q = -16..15: the float32 products sit between bf16 neighbours (some
    above the half-way point, some on it); RNE, not truncation (the interpreter's cast truncates, so the kernel
    rounds by hand)."""
    block = np.zeros((1, 34), dtype=np.uint8)
    block[0, :2] = np.array([1 + 2**-8 + 2**-9], dtype=np.float16).view(np.uint8)
    block[0, 2:34] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    blocks = torch.from_numpy(block).to(DEVICE)
    got = gd.dequantize_triton(blocks, 8, (1, 32), torch.bfloat16)
    want = gd.dequantize(blocks, 8, (1, 32)).to(torch.bfloat16)
    _assert_bitwise(got, want, "Q8_0 -> bf16 ties")
    # truncation would give a different answer for some of these values: the test can fail
    truncated = (gd.dequantize(blocks, 8, (1, 32)).view(torch.int32) >> 16 << 16).view(torch.float32)
    assert not torch.equal(truncated.to(torch.bfloat16), want)


def test_bad_arguments():
    blocks = random_blocks("Q4_0", 2, 32, seed=1)
    with pytest.raises(ValueError, match="needs 36 bytes, got 34"):
        gd.dequantize_triton(blocks.reshape(-1)[:34], 2, (2, 32))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        gd.dequantize_triton(blocks, 2, (2, 32), torch.float64)
    with pytest.raises(ValueError, match="contiguous tensor of shape"):
        gd.dequantize_triton(blocks, 2, (2, 32), out=torch.empty(32, 2, device=DEVICE).t())
    with pytest.raises(gd.UnsupportedQuantError, match="IQ2_XXS is not supported"):
        gd.dequantize_triton(blocks, 16, (2, 32))


def test_dispatch(monkeypatch):
    blocks = random_blocks("Q4_K", 2, 256, seed=2)
    calls = []
    real = gd.dequantize_triton
    monkeypatch.setattr(gd, "dequantize_triton", lambda *a, **k: calls.append("triton") or real(*a, **k))
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    got = gd.dequantize_gguf(blocks, 12, (2, 256), torch.bfloat16)
    assert calls == ["triton"]
    monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
    _assert_bitwise(gd.dequantize_gguf(blocks, 12, (2, 256), torch.bfloat16), got, "dispatch")
    assert calls == ["triton"]


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q4_1", "Q8_0"])
def test_gguf_linear_triton_path_equals_reference_path(monkeypatch, type_name):
    """A GGUFLinear with a LoRA adapter, in bf16: forward and every gradient identical whichever path dequantises
    (the Triton kernel writes bf16 directly; the reference dequantises to float32 and casts)."""
    from fasttune.adapters import LoraLinear
    from fasttune.models.gguf_linear import GGUFLinear

    out_f, in_f = 24, 512
    blocks = random_blocks(type_name, out_f, in_f, seed=3).cpu()
    gen = torch.Generator().manual_seed(SESSION_SEED)
    x = torch.randn(2, 5, in_f, generator=gen).to(torch.bfloat16)
    dy = torch.randn(2, 5, out_f, generator=gen).to(torch.bfloat16)
    results = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("FASTTUNE_KERNELS", mode)
        torch.manual_seed(0)
        layer = LoraLinear(GGUFLinear(blocks.clone(), gd.FORMAT_BY_NAME[type_name].type_id, in_f), r=4, alpha=8)
        with torch.no_grad():
            layer.lora_B.normal_()
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(dy)
        results[mode] = (y, xi.grad, layer.lora_A.grad, layer.lora_B.grad)
    for name, a, b in zip(("y", "dx", "dA", "dB"), results["reference"], results["triton"]):
        _assert_bitwise(b, a, f"{type_name} {name}")


# ---- GPU, real sizes ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_gpu_real_size_bitwise_and_speed(type_name):
    """4096 x 4096 and 14336 x 4096 (an 8B MLP projection): bit-exact in bf16 and float32, and faster than the
    reference's float32 decode plus cast (timed side by side, printed)."""
    assert torch.cuda.is_available()
    type_id = gd.FORMAT_BY_NAME[type_name].type_id
    for shape in ((4096, 4096), (14336, 4096)):
        blocks = random_blocks(type_name, *shape, seed=5)
        for dtype in (torch.bfloat16, torch.float32):
            want = _reference(blocks, type_name, shape, dtype)
            got = gd.dequantize_triton(blocks, type_id, shape, out=torch.full(shape, float("nan"), dtype=dtype,
                                                                                device="cuda"))
            _assert_bitwise(got, want, f"{type_name} {shape} -> {dtype}")
        out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
        ms_triton = _time(lambda: gd.dequantize_triton(blocks, type_id, shape, out=out))
        ms_ref = _time(lambda: gd.dequantize(blocks, type_id, shape).to(torch.bfloat16))
        moved = blocks.numel() + out.numel() * 2
        print(f"\n{type_name} {shape} -> bf16: triton {ms_triton:.3f} ms ({moved / ms_triton / 1e6:.0f} GB/s), "
              f"reference {ms_ref:.3f} ms ({ms_ref / ms_triton:.1f}x)")
        assert ms_triton < ms_ref


def _time(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.mark.gpu
def test_gpu_gguf_linear_never_holds_a_float32_weight():
    """A 14336 x 4096 Q4_K GGUFLinear with LoRA, bf16, forward + backward: the peak memory above the blocks and
    activations is one bf16 weight (117 MB), not a float32 one (235 MB) plus its cast."""
    from fasttune.adapters import LoraLinear
    from fasttune.models.gguf_linear import GGUFLinear

    out_f, in_f = 14336, 4096
    layer = LoraLinear(GGUFLinear(random_blocks("Q4_K", out_f, in_f, seed=9), 12, in_f), r=16, alpha=16).cuda()
    x = torch.randn(1, 512, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # warm-up (allocator, kernel compile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    layer(x).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    weight_bf16 = out_f * in_f * 2
    activations = 512 * (in_f + out_f) * 2 * 2  # y, dy, dx and the rank-r products, with room
    print(f"\npeak above steady state: {extra / 1e6:.0f} MB (one bf16 weight: {weight_bf16 / 1e6:.0f} MB)")
    assert extra <= weight_bf16 + activations, extra
