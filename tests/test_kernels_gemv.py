"""The Triton GEMV for decode rows (kernels/gemv.py): y against float64 within a stated bound for M = 1..8 (both
inner loops: FMAs at M = 1, MMAs above), odd N and K (a partial last tile of W, a masked K tail), bias, the GLU
prologue for every activation of kernels/glu.py; the generation decode path with gemv="triton" gives the greedy
tokens of the cuBLAS path and of full recompute (CPU, the interpreter); on the GPU the Llama-3.1-8B shapes, the
GLU prologue bit for bit against glu_packed, CUDA-graph capture without host syncs, and a timing print.

Tolerance (against float64): with x64 the input in float64 (with the GLU, x64 = round_x(act(gate) * up) from
glu.py's formulas in float32, i.e. what glu_packed stores), W64, b64 likewise,
    |y - y64| <= u_x |y64| + (K + 2) 2^-24 (|x64| |W64|^T + |b64|) + g_x |x64| |W64|^T + tiny_x
u_x the unit roundoff of the output dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32: the final rounding), the second term
the float32 accumulation (exact products of 16-bit values, one rounding per add) and the bias add, tiny_x the
smallest subnormal step of the output dtype. g_x = 0 without the GLU; with it, 2 u_x for 16-bit x (the kernel's and
torch's float32 activations may differ in the last float32 bits, which can move the rounding of x_k to the
neighbouring 16-bit value: one ulp, <= 2 u_x |x_k|) and 16 x 2^-24 for float32 x (the activations' float32
error). The GLU values alone are checked more tightly through an identity weight (y = x exactly): at most one
ulp apart, and on the GPU bit for bit equal to glu_packed."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import fasttune.kernels.gemv as gv  # noqa: E402
from fasttune.kernels.glu import ACTIVATIONS  # noqa: E402
from conftest import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF, no_host_sync  # noqa: E402
from seeding import SESSION_SEED, generator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ROUNDOFF, TINY = UNIT_ROUNDOFF, SMALLEST_SUBNORMAL
# (N, K, config): a partial last tile and a masked K tail over several K blocks, with and without the M = 1
# prefetch; the default launch shape (one masked K block on the CPU); N and K multiples of the blocks (unmasked
# loads; the prefetch's look-ahead past K is still masked)
SMALL = gv.GemvConfig(block_n=16, block_k=32)
SHAPES = [(37, 100, SMALL), (37, 100, gv.GemvConfig(block_n=16, block_k=32, prefetch=True)), (70, 200, None),
          (64, 256, gv.GemvConfig(block_n=16, block_k=64, prefetch=True))]


def randn(shape, dtype, *salt, scale=1.0):
    """N(0, scale^2) drawn on DEVICE (the 8B shapes' 0.5 G weights would take seconds on the host)."""
    seed = generator("gemv", shape, *salt).initial_seed()
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE) * scale).to(dtype)


def glu_values(h: torch.Tensor, act: str) -> torch.Tensor:
    """round_x(act(gate) * up) with act and the product in float32, in h's dtype: glu.py's kernel formulas (its
    gelu_tanh through sigmoid(2z), which keeps a tiny nonzero tail where F.gelu(tanh) gives exactly 0)."""
    K = h.shape[-1] // 2
    g, u = h[..., :K].float(), h[..., K:].float()
    if act == "silu":
        a = g * torch.sigmoid(g)
    elif act == "gelu":
        a = g * (0.5 * (1.0 + torch.erf(g * 0.7071067811865476)))
    else:
        a = g * torch.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    return (a * u).to(h.dtype)


def assert_within(y, x, w, bias, glu=None, what=""):
    """x: the matmul's input (the GLU's output when `glu`)."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0]), (y.dtype, y.shape)
    x64, w64 = x.double(), w.double()
    b64 = None if bias is None else bias.to(x.dtype).double()
    y64 = x64 @ w64.t() + (0 if b64 is None else b64)
    prods = x64.abs() @ w64.abs().t()
    u = ROUNDOFF[x.dtype]
    g = 0.0 if glu is None else (16 * 2.0**-24 if x.dtype == torch.float32 else 2 * u)
    bound = u * y64.abs() + (x.shape[1] + 2) * 2.0**-24 * (prods + (0 if b64 is None else b64.abs())) \
        + g * prods + TINY[x.dtype]
    worst = ((y.double() - y64).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.3g} x the bound (FASTTUNE_TEST_SEED={SESSION_SEED})"


@pytest.fixture
def poisoned(monkeypatch):
    """y allocated full of NaN: an element the kernel leaves unwritten fails the bound."""
    monkeypatch.setattr(gv, "alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                            device=device))


# ---- the kernel ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
@pytest.mark.parametrize("M", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_against_float64(poisoned, shape, M, dtype):
    N, K, cfg = shape
    x, w = randn((M, K), dtype, "x", M), randn((N, K), dtype, "w", scale=0.05)
    bias = randn((N,), dtype, "b")
    assert_within(gv.gemv(x, w, config=cfg), x, w, None, what=f"{dtype} M={M} {N}x{K}")
    assert_within(gv.gemv(x, w, bias, config=cfg), x, w, bias, what=f"{dtype} M={M} {N}x{K} bias")


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_glu_prologue_against_float64(poisoned, act, M, dtype):
    for N, K, cfg in SHAPES[:3]:
        h, w = randn((M, 2 * K), dtype, "h", M, act), randn((N, K), dtype, "w-glu", scale=0.05)
        bias = randn((N,), dtype, "b-glu")
        x = glu_values(h, act)
        assert_within(gv.gemv(h, w, glu=act, config=cfg), x, w, None, act, f"{act} {dtype} M={M} {N}x{K}")
        assert_within(gv.gemv(h, w, bias, glu=act, config=cfg), x, w, bias, act, f"{act} {dtype} M={M} bias")


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("M", [1, 4])
def test_glu_prologue_values_through_an_identity_weight(act, M):
    """W = I: y = x exactly (one product of 1, the rest exact zeros), so y shows the prologue's x itself: within one
    bf16 ulp of glu.py's formula in float32 (see the module docstring), and equal to it almost everywhere."""
    K = 96
    h = randn((M, 2 * K), torch.bfloat16, "h-eye", M, act) * 3
    eye = torch.eye(K, dtype=torch.bfloat16, device=DEVICE)
    y = gv.gemv(h, eye, glu=act, config=gv.GemvConfig(block_n=16, block_k=32))
    x = glu_values(h, act)
    ulp = torch.finfo(torch.bfloat16).eps * x.float().abs().clamp_min(2.0**-126)
    assert ((y.float() - x.float()).abs() <= ulp).all()
    assert (y == x).float().mean() >= 0.98, (y != x).sum()


def test_rows_and_operands_are_checked():
    w = torch.zeros(8, 16, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="at most 8 rows"):
        gv.gemv(torch.zeros(9, 16, dtype=torch.bfloat16, device=DEVICE), w)
    with pytest.raises(ValueError, match="packed gate_up"):
        gv.gemv(torch.zeros(1, 16, dtype=torch.bfloat16, device=DEVICE), w, glu="silu")
    with pytest.raises(TypeError, match="share one of"):
        gv.gemv(torch.zeros(1, 16, dtype=torch.float32, device=DEVICE), w)
    with pytest.raises(ValueError, match="block_n >= 16"):
        gv.gemv(torch.zeros(2, 16, dtype=torch.bfloat16, device=DEVICE), w, config=gv.GemvConfig(block_n=8))
    y = gv.gemv(torch.zeros(2, 3, 16, dtype=torch.bfloat16, device=DEVICE), w)  # leading dims kept
    assert y.shape == (2, 3, 8)


# ---- generation (CPU: the interpreter) ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "gemma2"])  # qkv biases, silu; sandwich norms, gelu_tanh
def test_generation_with_the_triton_gemv_gives_the_cublas_tokens(tmp_path, monkeypatch, family):
    """fp32 tiny models: gemv="triton" (decode steps of 4 slots: MMAs; one prompt: batch 1, FMAs) gives the greedy
    tokens of gemv="cublas" and of full recompute, and the GEMV ran for q/k/v, o, gate/up and down (with its GLU) of every
    layer at every forward of at most 8 rows, and the hooks are gone after the call."""
    import test_generation as tg
    from fasttune.generation import Generator, SamplingParams

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    model = tg._build(tmp_path, tg.old_families, family)
    calls = []
    real = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda x, w, b=None, glu=None, **k: calls.append(glu) or real(x, w, b, glu, **k))
    L = model.spec.num_layers
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    for prompts in (tg.ragged_prompts((3, 13, 8, 1)), tg.ragged_prompts((5,), seed=1)):
        calls.clear()
        got = [c[0] for c in Generator(model, max_batch_size=4, max_seq_len=24, gemv="triton").generate(
            prompts, params)]
        forwards = (params.max_new_tokens - 1) + (sum(map(len, prompts)) <= gv.MAX_ROWS)  # decode steps, prefill
        assert len(calls) == 4 * L * forwards  # qkv, o, gate_up, down per layer
        assert calls.count(model.spec.activation) == L * forwards
        plain = [c[0] for c in Generator(model, max_batch_size=4, max_seq_len=24).generate(prompts, params)]
        assert got == plain
        monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
        assert got == [tg.recompute(model, p, params, stop_ids=[]) for p in prompts]
        monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    for layer in model.model.layers:
        assert layer.self_attn.fused_o is None and layer.self_attn.fused_qkv is None


def test_generation_triton_o_down_runs_the_gemv_for_o_and_down_at_one_row_only(tmp_path, monkeypatch):
    """gemv="triton-o-down": a one-prompt decode runs the GEMV for o_proj and down_proj (GLU fused) of every layer at
    every decode step and nothing else through it; 3 slots run none; the tokens are gemv="cublas"'s."""
    import test_generation as tg
    from fasttune.generation import Generator, SamplingParams

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    model = tg._build(tmp_path, tg.old_families, "qwen2")
    calls = []
    real = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda x, w, b=None, glu=None, **k: calls.append(glu) or real(x, w, b, glu, **k))
    L = model.spec.num_layers
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    for prompts, expected in ((tg.ragged_prompts((5,), seed=1), 2 * L * (params.max_new_tokens - 1)),
                              (tg.ragged_prompts((3, 13, 8)), 0)):
        calls.clear()
        got = [c[0] for c in Generator(model, max_batch_size=4, max_seq_len=24, gemv="triton-o-down").generate(
            prompts, params)]
        assert len(calls) == expected
        assert calls.count(model.spec.activation) == expected // 2  # down_proj, with its GLU
        assert got == [c[0] for c in Generator(model, max_batch_size=4, max_seq_len=24).generate(prompts, params)]


def test_generation_gemv_with_unmerged_and_merged_adapters(tmp_path, monkeypatch):
    """Unmerged adapters: q/k/v and gate/up take the GEMV and add their low-rank term after; o_proj and down_proj
    (adapted) run their modules (noted). Merged: every projection takes the GEMV. Tokens as full recompute."""
    import fasttune
    import test_generation as tg
    from fasttune.generation import Generator, SamplingParams

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    model = tg._build(tmp_path, tg.old_families, "llama")
    fasttune.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    calls = []
    real = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = tg.ragged_prompts((3, 11))
    params = SamplingParams(max_new_tokens=5, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, max_batch_size=2, max_seq_len=24, gemv="triton")
    L, steps = model.spec.num_layers, params.max_new_tokens - 1
    unmerged = [c[0] for c in gen.generate(prompts, params)]
    assert len(calls) == 2 * L * steps  # the two concatenated groups only
    calls.clear()
    merged = [c[0] for c in gen.generate(prompts, params, merge_lora=True)]
    assert len(calls) == 4 * L * steps
    monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
    assert unmerged == [tg.recompute(model, p, params, stop_ids=[]) for p in prompts]
    assert merged == [c[0] for c in Generator(model, 2, 24).generate(prompts, params, merge_lora=True)]


def test_generator_rejects_an_unknown_gemv(tmp_path):
    import test_generation as tg
    from fasttune.generation import Generator

    with pytest.raises(ValueError, match="cublas"):
        Generator(tg._build(tmp_path, tg.old_families, "llama"), 2, 16, gemv="cutlass")


# ---- the GPU: Llama-3.1-8B shapes -----------------------------------------------------------------------------------

SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
             "lm_head": (128256, 4096)}  # (N, K); down takes the GLU prologue of gate_up's (M, 2 x 14336) output


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SHAPES_8B))
@pytest.mark.parametrize("M", [1, 4, 8])
def test_gpu_8b_shapes_against_float64(name, M):
    from fasttune.kernels import glu_packed

    N, K = SHAPES_8B[name]
    w = randn((N, K), torch.bfloat16, "w8b", name, scale=0.02)
    if name == "down":
        h = randn((M, 2 * K), torch.bfloat16, "h8b", M)
        x = glu_packed(h, "silu")  # the exact x the prologue must form
        assert_within(gv.gemv(h, w, glu="silu"), x, w, None, what=f"down+glu M={M}")
        return
    x = randn((M, K), torch.bfloat16, "x8b", M)
    bias = randn((N,), torch.bfloat16, "b8b", name) if name == "qkv" else None  # Qwen2's q/k/v biases
    assert_within(gv.gemv(x, w, bias), x, w, bias, what=f"{name} M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("M", [1, 8])
def test_gpu_glu_prologue_bit_for_bit_as_glu_packed(act, M):
    from fasttune.kernels import glu_packed

    K = 2048
    h = randn((M, 2 * K), torch.bfloat16, "h-gpu", act, M) * 3
    y = gv.gemv(h, torch.eye(K, dtype=torch.bfloat16, device="cuda"), glu=act)
    assert torch.equal(y, glu_packed(h, act))


@pytest.mark.gpu
def test_gpu_graph_capture_and_no_host_sync():
    w = randn((4096, 14336), torch.bfloat16, "w-graph", scale=0.02)
    h = randn((1, 2 * 14336), torch.bfloat16, "h-graph")
    gv.gemv(h, w, glu="silu")  # compile outside the capture
    torch.cuda.synchronize()
    with no_host_sync():
        gv.gemv(h, w, glu="silu")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gv.gemv(h, w, glu="silu")
    h.copy_(randn((1, 2 * 14336), torch.bfloat16, "h-graph-2"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, gv.gemv(h, w, glu="silu"))


def _graph_us(fn, calls: int = 20) -> float:
    """Microseconds per call of fn, replayed from one CUDA graph of `calls` calls (as a decode step runs them)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)


@pytest.mark.gpu
def test_gpu_timing_triton_vs_cublas():
    """Prints us per call (in a CUDA graph) and the weight bytes' rate for each 8B shape at M = 1 and 8, Triton vs
    cuBLAS (down: the GLU prologue vs glu_packed + F.linear). No speed assertion (the lead reads the numbers); the
    outputs timed must agree within the bound."""
    from fasttune.kernels import glu_packed

    F = torch.nn.functional
    for name, (N, K) in SHAPES_8B.items():
        w = randn((N, K), torch.bfloat16, "w-time", name, scale=0.02)
        for M in (1, 8):
            if name == "down":
                h = randn((M, 2 * K), torch.bfloat16, "h-time", M)
                tri, ref = (lambda: gv.gemv(h, w, glu="silu")), (lambda: F.linear(glu_packed(h, "silu"), w))
                assert_within(tri(), glu_packed(h, "silu"), w, None, what=f"timed {name} M={M}")
            else:
                x = randn((M, K), torch.bfloat16, "x-time", M)
                tri, ref = (lambda: gv.gemv(x, w)), (lambda: F.linear(x, w))
                assert_within(tri(), x, w, None, what=f"timed {name} M={M}")
            t_tri, t_ref = _graph_us(tri), _graph_us(ref)
            nbytes = w.numel() * 2
            print(f"GEMV {name:8s} {N}x{K} M={M}: triton {t_tri:7.1f} us ({nbytes / t_tri / 1e6:.2f} TB/s) "
                  f"{gv.default_config(M, N, K, w.device)}, cublas {t_ref:7.1f} us ({nbytes / t_ref / 1e6:.2f} TB/s)")


@pytest.mark.gpu
def test_gpu_generation_triton_gemv_equals_cublas(tmp_path):
    """fp32 tiny model on CUDA with captured decode steps: the same greedy tokens with either GEMV."""
    from conftest import tiny_cuda_model
    from fasttune.generation import Generator, SamplingParams

    model = tiny_cuda_model(tmp_path, dtype="float32")
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 9)]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[])
    for batch in (1, 4):
        chunk = prompts[:batch]
        tri = Generator(model, max_batch_size=batch, max_seq_len=48, gemv="triton").generate(chunk, params)
        cub = Generator(model, max_batch_size=batch, max_seq_len=48).generate(chunk, params)
        assert tri == cub
