"""The fused NF4 matmul (kernels/nf4_matmul.py) for few rows: its weights are the dequantised ones bit for bit
(one-hot rows of x read W's columns back), y against a float64 dequantise-then-matmul within a stated bound, both
kernels (GEMV for one row, MMA) in both layouts (aligned / per-element), split-K or not, masked tail chunks, the
dispatch in the LoRA kernels and NF4Linear (forward and backward), and at 8B sizes on the GPU (bound, bit-exact
weights, CUDA-graph capture, no host sync, speed).

Tolerance (every test against float64): with W64 = dense_weight(W, x.dtype) in float64 (the exact weights the
kernel must use), b64 = b rounded to x's dtype, y64 = x W64^T + b64 in float64,
    |y - y64| <= u_x |y64| + (K + 2) 2^-24 (|x| |W64|^T + |b64|) + tiny_x
u_x the unit roundoff of the output dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32: the final rounding), the second term
the float32 accumulation of K products (exact for 16-bit inputs, one rounding each in fp32) and the bias add,
tiny_x the smallest subnormal step of the output dtype (an fp16 result can underflow)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import fasttune.kernels.nf4 as nf4  # noqa: E402
import fasttune.kernels.nf4_matmul as nm  # noqa: E402
from fasttune.kernels.lora import dense_weight, lora_linear, lora_linear_reference  # noqa: E402
from conftest import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, no_host_sync  # noqa: E402
from seeding import SESSION_SEED, generator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROUNDOFF, TINY = UNIT_ROUNDOFF, SMALLEST_SUBNORMAL
# (N, K): odd everything and blocks straddling rows (per-element layout); K not a multiple of 64 (per-element);
# aligned with K/64 = 5 sub-blocks (a masked tail chunk); aligned with N odd (row tiles past N)
SHAPES = [(33, 37), (70, 200), (96, 320), (129, 192)]


def weight(shape, dtype=torch.bfloat16, seed=0):
    w = torch.randn(shape, generator=generator("nf4mm-w", shape, seed)) * 0.02
    w.view(-1)[::97] *= 10  # outliers: blocks of different scales
    return w.to(DEVICE, dtype)


def rows(M, K, dtype, seed=0):
    return torch.randn(M, K, generator=generator("nf4mm-x", M, K, seed)).to(DEVICE, dtype)


def oracle_and_bound(x, q, bias):
    w64 = dense_weight(q, x.dtype).double()
    x64 = x.double()
    b64 = None if bias is None else bias.to(x.dtype).double()
    y64 = x64 @ w64.t() + (0 if b64 is None else b64)
    scale = x64.abs() @ w64.abs().t() + (0 if b64 is None else b64.abs())
    K = x.shape[1]
    bound = ROUNDOFF[x.dtype] * y64.abs() + (K + 2) * 2.0**-24 * scale + TINY[x.dtype]
    return y64, bound


def assert_within(y, x, q, bias, what=""):
    assert y.dtype == x.dtype and y.shape == (x.shape[0], q.shape[0])
    y64, bound = oracle_and_bound(x, q, bias)
    err = (y.double() - y64).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the bound (FASTTUNE_TEST_SEED={SESSION_SEED})"


@pytest.fixture
def poisoned(monkeypatch):
    """y allocated full of NaN: an element the kernel leaves unwritten fails the bound."""
    monkeypatch.setattr(nm, "alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                            device=device))


# ---- the kernel ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_against_float64(poisoned, shape, M, dtype):
    N, K = shape
    q = nf4.quantize_nf4(weight(shape, seed=M))
    x = rows(M, K, dtype, seed=N)
    bias = None if (M + N) % 2 else weight((N,), dtype, seed=1) * 10  # with and without, across the grid
    assert_within(nm.nf4_matmul_triton(x, q, bias), x, q, bias, f"{shape} M={M} {dtype} bias={bias is not None}")


@pytest.mark.parametrize("shape", [(70, 200), (96, 320), (129, 192)])
@pytest.mark.parametrize("config", [nm.NF4MatmulConfig(block_n=16, block_k=64, split=3),
                                    nm.NF4MatmulConfig(block_n=32, block_k=128),
                                    nm.NF4MatmulConfig(block_n=64, block_k=64, split=64),
                                    nm.NF4MatmulConfig(block_n=4, block_k=256, num_warps=4, use_dot=False),
                                    nm.NF4MatmulConfig(block_n=2, block_k=128, num_warps=1, use_dot=False),
                                    nm.NF4MatmulConfig(block_n=16, block_k=64, use_dot=True)],
                         ids=["split3", "nosplit", "split-all", "gemv-tail", "gemv-narrow", "dot-one-row"])
@pytest.mark.parametrize("bias", [False, True])
def test_launch_shapes(poisoned, shape, config, bias):
    """Split-K (the workspace and its reduction, empty K ranges dropped), row tiles wider than N or narrower, chunks
    that end past K (320 = 256 + 64: a masked tail; 192 in 128s), and one row of x through the GEMV kernel (the
    unaligned K = 200 takes the MMA kernel) and through the MMA one."""
    N, K = shape
    q = nf4.quantize_nf4(weight(shape, seed=2))
    x = rows(1 if config.use_dot is not None else 5, K, torch.bfloat16, seed=3)
    b = weight((N,), torch.bfloat16, seed=4) if bias else None
    assert_within(nm.nf4_matmul_triton(x, q, b, config=config), x, q, b, f"{shape} {config}")


@pytest.mark.parametrize("shape", [(33, 37), (129, 192)])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float16)])
def test_weights_are_the_dequantised_ones_bit_for_bit(shape, x_dtype, w_dtype):
    """x = one-hot rows: y[i] = W[:, k_i], one product with 1 and no sum, so any weight that differs from
    dense_weight(W, x.dtype) (the nibble order, a scale, the rounding to W's dtype then x's) shows, bit for bit."""
    N, K = shape
    q = nf4.quantize_nf4(weight(shape, w_dtype, seed=5))
    cols = torch.randperm(K, generator=generator("nf4mm-cols", shape))[:17]
    x = torch.zeros(len(cols), K, dtype=x_dtype, device=DEVICE)
    x[torch.arange(len(cols)), cols.to(DEVICE)] = 1
    expected = dense_weight(q, x_dtype)[:, cols.to(DEVICE)].t()
    for config in (None, nm.NF4MatmulConfig(block_n=16, block_k=64, split=2)):
        assert torch.equal(nm.nf4_matmul_triton(x, q, config=config), expected)
    for i in (0, len(cols) - 1):  # one row: the GEMV kernel (aligned) or the MMA one
        assert torch.equal(nm.nf4_matmul_triton(x[i:i + 1], q), expected[i:i + 1])


def test_strided_rows_and_no_rows():
    q = nf4.quantize_nf4(weight((40, 128), seed=6))
    wide = rows(3, 256, torch.bfloat16, seed=7)
    x = wide[:, ::2]  # column stride 2
    assert_within(nm.nf4_matmul_triton(x, q), x, q, None, "strided")
    assert nm.nf4_matmul_triton(rows(0, 128, torch.bfloat16), q).shape == (0, 40)


def test_misaligned_packed_codes_take_the_per_element_kernel_and_say_so(monkeypatch, caplog):
    """Packed codes at an odd byte offset cannot be read as int32 words: the per-element kernel answers (the same
    values) and the slower path is logged once."""
    import logging

    monkeypatch.setattr(nm, "FALLBACKS", nm.Fallbacks("NF4 matmul", nm.log))
    q = nf4.quantize_nf4(weight((40, 128), seed=13))
    shifted = torch.cat([q.packed.new_zeros((1, 1)), q.packed])[1:]  # same bytes, storage offset 1
    assert shifted.storage_offset() == 1 and torch.equal(shifted, q.packed)
    q_odd = nf4.NF4Tensor(shifted, q.absmax_q, q.absmax2, q.offset, q.shape, q.dtype, q.blocksize, q.blocksize2)
    x = rows(1, 128, torch.bfloat16, seed=14)
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        ys = [nm.nf4_matmul_triton(x, q_odd) for _ in range(2)]
    assert_within(ys[0], x, q, None, "misaligned codes")
    assert torch.equal(ys[0], ys[1])
    assert caplog.text.count("byte offset 1") == 1


def test_bad_arguments():
    q = nf4.quantize_nf4(weight((8, 64)))
    with pytest.raises(ValueError, match=r"\(M, 64\)"):
        nm.nf4_matmul_triton(rows(2, 63, torch.bfloat16), q)
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        nm.nf4_matmul_triton(rows(2, 64, torch.float64), q)
    with pytest.raises(ValueError, match="bias"):
        nm.nf4_matmul_triton(rows(2, 64, torch.bfloat16), q, torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        nm.nf4_matmul_triton(rows(2, 64, torch.bfloat16), q, config=nm.NF4MatmulConfig(use_dot=False))
    with pytest.raises(ValueError, match="power of two"):
        nm.nf4_matmul_triton(rows(2, 64, torch.bfloat16), q, config=nm.NF4MatmulConfig(block_k=96))
    with pytest.raises(ValueError, match="8-value word"):
        nm.nf4_matmul_triton(rows(1, 64, torch.bfloat16), q, config=nm.NF4MatmulConfig(block_n=1, block_k=64))
    with pytest.raises(ValueError, match="block_n >= 16"):
        nm.nf4_matmul_triton(rows(2, 64, torch.bfloat16), q, config=nm.NF4MatmulConfig(block_n=8))


def test_default_config_covers_the_device():
    """GEMV (one row): >= 3 programs per SM where the rows allow, every lane at least one 8-value word, chunks that
    divide K at the 8B shapes; MMA: enough programs for every SM twice (row tiles, then split-K), splits of at least
    4 chunks, one chunk for a K shorter than it."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sms = nm._multiprocessors(dev)
    for N, K in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096), (3, 64)]:
        cfg = nm.default_config(1, N, K, dev)
        assert cfg.use_dot is None and cfg.split == 1, cfg
        assert cfg.block_n * cfg.block_k >= nm._WORDS_PER_WARP * cfg.num_warps, cfg
        assert K % cfg.block_k == 0, (K, cfg)
        if N >= 1024:
            assert triton.cdiv(N, cfg.block_n) >= min(3 * sms, N), (N, K, cfg)
    for M, N, K in [(8, 1024, 4096), (8, 4096, 4096), (64, 4096, 14336), (2, 14336, 4096), (3, 33, 37)]:
        cfg = nm.default_config(M, N, K, dev)
        chunks = triton.cdiv(K, cfg.block_k)
        assert cfg.block_n >= 16 and (cfg.split == 1 or chunks // cfg.split >= 4), (M, N, K, cfg)
        programs = triton.cdiv(N, cfg.block_n) * cfg.split
        assert programs >= min(2 * sms, triton.cdiv(N, cfg.block_n) * max(1, chunks // 4)), (M, N, K, cfg)
    assert nm.default_config(1, 33, 37, dev, gemv=False).block_n >= 16


# ---- dispatch -----------------------------------------------------------------------------------------------------

def test_dispatch_threshold(monkeypatch):
    q = nf4.quantize_nf4(weight((16, 64)))
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    assert nm.nf4_matmul_wanted(rows(1, 64, torch.bfloat16), q)
    assert nm.nf4_matmul_wanted(rows(nm.MAX_ROWS, 64, torch.bfloat16), q)
    assert not nm.nf4_matmul_wanted(rows(nm.MAX_ROWS + 1, 64, torch.bfloat16), q)
    assert not nm.nf4_matmul_wanted(rows(2, 64, torch.float64), q)
    monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
    assert not nm.nf4_matmul_wanted(rows(1, 64, torch.bfloat16), q)


@pytest.mark.parametrize("M", [3, 70])
def test_lora_linear_over_nf4_forward_and_backward(monkeypatch, M):
    """The LoRA kernel's forward takes the fused path for few rows (counted) and dequantise+GEMM above MAX_ROWS;
    the adapter's part and the backward (which dequantises W again) are unchanged."""
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    calls = []
    real = nm.nf4_matmul_triton
    import fasttune.kernels.lora as lora_mod
    monkeypatch.setattr(lora_mod, "nf4_matmul_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    K, N, r = 128, 48, 4
    q = nf4.quantize_nf4(weight((N, K), seed=8))
    g = generator("nf4mm-lora", M)
    A = (torch.randn(r, K, generator=g) * 0.1).to(DEVICE).requires_grad_()
    B = (torch.randn(N, r, generator=g) * 0.1).to(DEVICE).requires_grad_()
    bias = weight((N,), torch.float32, seed=9)
    x = rows(M, K, torch.float32, seed=10).reshape(1, M, K).requires_grad_()
    y = lora_linear(x, q, bias, A, B, 2.0)
    assert len(calls) == (1 if M <= nm.MAX_ROWS else 0)
    x_ref, A_ref, B_ref = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y_ref = lora_linear_reference(x_ref, q, bias, A_ref, B_ref, 2.0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # fp32: float32 sums in another order
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(dy)
    y_ref.backward(dy)
    for got, ref in ((x.grad, x_ref.grad), (A.grad, A_ref.grad), (B.grad, B_ref.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_nf4_linear_module_takes_the_fused_path(monkeypatch):
    from fasttune.models.nf4_linear import quantize_linear

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    lin = torch.nn.Linear(96, 40, bias=True).to(DEVICE, torch.bfloat16)
    layer = quantize_linear(lin)
    x = rows(6, 96, torch.bfloat16, seed=11).reshape(2, 3, 96)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 3, 40)
    assert_within(y.reshape(6, 40), x.reshape(6, 96), layer.quantized, layer.bias, "NF4Linear")


def test_a_failing_fused_kernel_is_logged_once_and_the_dequantised_path_answers(monkeypatch, caplog):
    """The fused kernel has checks only where it was run; a compiler or launch error elsewhere must not stop a run:
    it is logged once with its reason, the dequantise-then-matmul result is returned, and it is not tried again."""
    import logging

    import fasttune.kernels.lora as kl
    from fasttune.models.nf4_linear import quantize_linear

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    monkeypatch.setattr(nm, "FALLBACKS", nm.Fallbacks("NF4 matmul", nm.log))
    monkeypatch.setattr(kl, "NF4_MATMUL_FALLBACKS", nm.FALLBACKS)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(kl, "nf4_matmul_triton", broken)
    layer = quantize_linear(torch.nn.Linear(64, 24, bias=True).to(DEVICE, torch.float32))
    x = rows(3, 64, torch.float32, seed=12)
    with caplog.at_level(logging.WARNING, logger="fasttune"), torch.no_grad():
        ys = [layer(x) for _ in range(3)]
    assert calls == [1]
    assert caplog.text.count("nf4-matmul failed (RuntimeError: PassManager::run failed)") == 1
    expected = x @ dense_weight(layer.quantized, torch.float32).t() + layer.bias
    for y in ys:
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


# ---- GPU, 8B sizes ------------------------------------------------------------------------------------------------

GPU_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # q/o, k/v, gate/up, down (N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("M", [1, 8, 64])
def test_gpu_real_size_against_float64(shape, M):
    assert torch.cuda.is_available()
    q = nf4.quantize_nf4(weight(shape, seed=M))
    x = rows(M, shape[1], torch.bfloat16, seed=1)
    bias = weight((shape[0],), torch.bfloat16, seed=2)
    assert_within(nm.nf4_matmul_triton(x, q), x, q, None, f"{shape} M={M}")
    assert_within(nm.nf4_matmul_triton(x, q, bias), x, q, bias, f"{shape} M={M} bias")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336)])
def test_gpu_weights_bit_for_bit(shape):
    """The GPU's casts (cvt.rn) give the dequantised weights exactly: one-hot rows read W's columns back."""
    q = nf4.quantize_nf4(weight(shape, seed=3))
    cols = torch.randperm(shape[1], generator=generator("nf4mm-gpu-cols", shape))[:64].cuda()
    x = torch.zeros(64, shape[1], dtype=torch.bfloat16, device="cuda")
    x[torch.arange(64, device="cuda"), cols] = 1
    expected = dense_weight(q, torch.bfloat16)[:, cols].t()
    assert torch.equal(nm.nf4_matmul_triton(x, q), expected)  # the MMA kernel
    for i in range(0, 64, 9):  # the GEMV kernel: its inline-asm table lookup and paired bf16 rounding
        assert torch.equal(nm.nf4_matmul_triton(x[i:i + 1], q), expected[i:i + 1])


@pytest.mark.gpu
def test_gpu_graph_capture_and_no_host_sync():
    q = nf4.quantize_nf4(weight((1024, 4096), seed=4))
    x = rows(8, 4096, torch.bfloat16, seed=5)
    bias = weight((1024,), torch.bfloat16, seed=6)
    nm.nf4_matmul_triton(x, q, bias)  # compile outside the capture
    torch.cuda.synchronize()
    with no_host_sync():
        nm.nf4_matmul_triton(x, q, bias)
    assert nm.default_config(8, 1024, 4096, x.device).split > 1  # the workspace and the second kernel are captured
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nm.nf4_matmul_triton(x, q, bias)
    x.copy_(rows(8, 4096, torch.bfloat16, seed=7))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, nm.nf4_matmul_triton(x, q, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336)])
def test_gpu_faster_than_dequantise_then_matmul(shape):
    """At M = 1 and 8 the fused kernel must beat dequantise + cuBLAS (it moves ~1/8 of the bytes); the times and
    the fraction of the H200's 4.8 TB/s are printed (bench/kernels_ce_nf4.py has the full table). Timed as a
    decode step runs them: 20 calls replayed from one CUDA graph (no launch gaps)."""
    q = nf4.quantize_nf4(weight(shape, seed=8))
    nbytes = q.packed.numel() + q.absmax_q.numel() + 4 * q.absmax2.numel()
    for M in (1, 8):
        x = rows(M, shape[1], torch.bfloat16, seed=M)
        times = {}
        for name, fn in (("fused", lambda: nm.nf4_matmul_triton(x, q)),
                         ("dequant+mm", lambda: nm.nf4_matmul_reference(x, q))):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    fn()
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[name] = start.elapsed_time(end) / 100
        print(f"NF4 matmul {shape} M={M}: fused {times['fused'] * 1e3:.1f} us "
              f"({nbytes / times['fused'] / 1e9:.2f} TB/s), dequant+mm {times['dequant+mm'] * 1e3:.1f} us")
        assert times["fused"] < times["dequant+mm"], times
