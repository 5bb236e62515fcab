"""The one-launch Triton decode attention (kernels/decode_attention.py) against a float64 reference: the project's
decode math (`eager_attention` with `decode_mask`, sinks as its extra softmax column) on the same rounded inputs.

Without a GPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, CPU), where programs run one after
the other: the last program of each (slot, kv head) still combines, so the split path (SPLITS > 1, partials in the
workspace, the counter) is exercised as well as SPLITS = 1. Cache positions outside each slot's [window start,
length) hold NaN, and the output allocation is NaN-filled: a key read that should not be, or an output element not
written, fails the comparison.

Tolerance, per element, against the float64 reference r of the slot's row, with vmax the largest |v| the row sees:
    |out - r| <= u (|r| + vmax)
float32: u = 1e-5 (float32 softmax and sums over <= 4096 keys; an off-by-one key or a wrong window moves the output
by ~ vmax / n >> 1e-5 at these sizes). bf16: u = 2^-7: the probabilities are rounded to bf16 for the P V product
(relative 2^-8 each, so <= 2^-8 vmax in all), and the output once (2^-8 |r|); the interpreter truncates instead of
rounding, which doubles both (the bf16 tests check the low-precision plumbing; the float32 ones the key ranges).
GPU tests (-m gpu) repeat this at real sizes (Llama-3.1-8B and gpt-oss-20b attention shapes) against float32
eager math, capture the kernel in a CUDA graph and check it makes no host sync.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import fasttune.kernels.decode_attention as dk  # noqa: E402
from fasttune.kernels.attention import FALLBACKS, decode_attention, decode_mask, eager_attention  # noqa: E402
from conftest import no_host_sync  # noqa: E402
from seeding import SESSION_SEED, generator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(autouse=True)
def _poison_and_reset(monkeypatch):
    """NaN-filled outputs (catch unwritten elements) and a clean fallback record."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(dk, "alloc", poisoned)
    FALLBACKS.reset()
    yield
    FALLBACKS.reset()


def make_inputs(S, M, Hq, Hk, D, lengths, dtype, window=None, sinks=False, salt=(), device=DEVICE):
    """q as the model holds it ((S, 1, Hq, D) storage seen as (S, Hq, 1, D)); the caches as slices [layer, :S] of a
    (layers, slots, M, Hk, D) cache with one more slot than used; NaN outside each slot's visible keys. Returns
    (q, k, v, lengths, sinks) on `device` and their clean float64 copies for the reference."""
    g = generator("decode-attn", S, M, Hq, Hk, D, tuple(lengths), str(dtype), window, sinks, *salt)
    q = torch.randn(S, 1, Hq, D, generator=g).to(dtype).transpose(1, 2)
    cache = torch.randn(2, 2, S + 1, M, Hk, D, generator=g).to(dtype)
    z = (1.5 * torch.randn(Hq, generator=g)).to(dtype) if sinks else None
    n = torch.tensor(lengths, dtype=torch.int32)
    clean = (q.double(), cache[0, 1, :S].double(), cache[1, 1, :S].double(), n, None if z is None else z.double())
    j = torch.arange(M)[None, :]
    start = (n[:, None] - window).clamp(min=0) if window is not None else torch.zeros_like(n)[:, None]
    hidden = (j >= n[:, None]) | (j < start)
    cache[:, 1, :S][:, hidden] = float("nan")
    cache = cache.to(device)
    return (q.to(device), cache[0, 1, :S], cache[1, 1, :S], n.to(device), None if z is None else z.to(device)), clean


def reference(clean, scale, window):
    """float64 decode math of kernels.attention (the CPU path's eager math with the length/window mask)."""
    q, k, v, n, z = clean
    mask = decode_mask(n, k.shape[1], window)
    return eager_attention(q, k.transpose(1, 2), v.transpose(1, 2), mask, scale, None, z), mask


def check(out, clean, scale, window, dtype, what=""):
    ref, mask = reference(clean, scale, window)
    assert out.shape == ref.shape and out.dtype == dtype, (out.shape, out.dtype)
    got = out.double().cpu()
    v = clean[2].transpose(1, 2)  # (S, Hk, M, D)
    seen = mask[:, 0, 0]  # (S, M)
    vmax = torch.where(seen[:, None, :, None], v.abs(), torch.zeros_like(v)).amax((1, 2, 3))[:, None, None, None]
    bound = U[dtype] * (ref.abs() + vmax)
    err = (got - ref).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, worst error {err.max().item():.3e} "
                           f"(bound there {bound.reshape(-1)[err.reshape(-1).nan_to_num(float('inf')).argmax()]:.3e}); "
                           f"FASTTUNE_TEST_SEED={SESSION_SEED}")


# lengths with block_n 16 and M 80: one key, a block edge, one past it, ragged, the whole cache
LENGTHS = [1, 16, 17, 47, 80]
SHAPES = [(1, 64), (4, 128), (8, 64)]  # (GQA group Hq / Hk, head_dim)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window,sinks", [(None, False), (24, False), (None, True), (24, True)])
@pytest.mark.parametrize("group,D", SHAPES)
def test_float32_matches_float64(group, D, window, sinks, splits):
    Hk = 2
    (q, k, v, n, z), clean = make_inputs(len(LENGTHS), 80, group * Hk, Hk, D, LENGTHS, torch.float32, window, sinks)
    out = dk.decode_attention_triton(q, k, v, n, scale=D ** -0.5, sliding_window=window, sinks=z,
                                     config=dk.DecodeConfig(splits=splits, block_n=16))
    check(out, clean, D ** -0.5, window, torch.float32, f"G {group} D {D} window {window} sinks {sinks} splits {splits}")


@pytest.mark.parametrize("window,sinks", [(None, False), (24, True)])
@pytest.mark.parametrize("group,D", SHAPES)
def test_bf16_matches_float64(group, D, window, sinks):
    Hk = 2
    (q, k, v, n, z), clean = make_inputs(len(LENGTHS), 80, group * Hk, Hk, D, LENGTHS, torch.bfloat16, window, sinks)
    out = dk.decode_attention_triton(q, k, v, n, scale=D ** -0.5, sliding_window=window, sinks=z,
                                     config=dk.DecodeConfig(splits=3, block_n=16))
    check(out, clean, D ** -0.5, window, torch.bfloat16, f"G {group} D {D} window {window} sinks {sinks}")


def test_more_splits_than_blocks_and_an_odd_head_dim():
    """8 splits of a window of 5 keys: most chunks are empty yet take part in the count; head_dim 80 is padded to
    128 columns inside the kernel (masked)."""
    lengths = [1, 3, 40]
    (q, k, v, n, z), clean = make_inputs(3, 40, 8, 2, 80, lengths, torch.float32, window=5, sinks=True)
    out = dk.decode_attention_triton(q, k, v, n, scale=0.1, sliding_window=5, sinks=z,
                                     config=dk.DecodeConfig(splits=8, block_n=16))
    check(out, clean, 0.1, 5, torch.float32, "8 splits, window 5")


def test_a_second_launch_gives_the_same_output_and_leaves_the_counters_at_zero():
    """The counters are shared by every launch of a shape (the layers of a step, graph replays): each launch must
    hand them back at zero, or the next would combine too early or never."""
    (q, k, v, n, z), clean = make_inputs(2, 64, 8, 2, 64, [64, 33], torch.float32, sinks=True)
    cfg = dk.DecodeConfig(splits=4, block_n=16)
    first = dk.decode_attention_triton(q, k, v, n, scale=0.125, sinks=z, config=cfg)
    ws = dk._WORKSPACES[(q.device.type, q.device.index, 2, 2, 4, 4, 64)]
    assert torch.equal(ws[3].cpu(), torch.zeros(4, dtype=torch.int32))
    second = dk.decode_attention_triton(q, k, v, n, scale=0.125, sinks=z, config=cfg)
    assert torch.equal(first, second)
    assert torch.equal(ws[3].cpu(), torch.zeros(4, dtype=torch.int32))
    check(second, clean, 0.125, None, torch.float32, "second launch")


def test_default_config_follows_the_measured_launch_shapes(monkeypatch):
    """The H200 sweep's winners (default_config's docstring): batch 1 at the 8B shape on 132 SMs, one split per 128
    keys of capacity (M = 128: one; M = 4096: 32, 8 kv heads x 32 = 256 programs, the grid's cap), 64 keys a step;
    many slots: one split; the grid cap at batch 8."""
    monkeypatch.setattr(dk, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    assert dk.default_config(1, 8, 4096, cuda) == dk.DecodeConfig(splits=32, block_n=64)
    assert dk.default_config(1, 8, 128, cuda) == dk.DecodeConfig(splits=1, block_n=64)
    assert dk.default_config(1, 8, 1024, cuda) == dk.DecodeConfig(splits=8, block_n=64)
    assert dk.default_config(1, 8, 192, cuda).splits == 2
    assert dk.default_config(64, 8, 4096, cuda) == dk.DecodeConfig(splits=1, block_n=64)
    assert dk.default_config(8, 8, 1024, cuda).splits == 5
    assert dk.default_config(1, 8, 40, cuda) == dk.DecodeConfig(splits=1, block_n=32)


def test_decode_attention_dispatch(monkeypatch):
    """Where Triton runs (FASTTUNE_KERNELS=triton here; CUDA in production) decode_attention takes the kernel, and
    its answer matches; FASTTUNE_DECODE_TRITON=0 and the plain CPU default keep the reference path; softcapping
    stays on the reference path."""
    calls = []
    real = dk.decode_attention_triton
    monkeypatch.setattr(dk, "decode_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    (q, k, v, n, z), clean = make_inputs(3, 48, 8, 2, 64, [1, 20, 48], torch.float32, window=16, sinks=True)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    out = decode_attention(q, k, v, n, scale=0.125, sliding_window=16, sinks=z, memo={})
    assert calls == [1] and not FALLBACKS.failed
    check(out, clean, 0.125, 16, torch.float32, "dispatch")
    clean_q, clean_k, clean_v = (t.float() for t in clean[:3])  # the reference paths read every position: no NaN
    monkeypatch.setenv("FASTTUNE_DECODE_TRITON", "0")
    decode_attention(clean_q, clean_k, clean_v, clean[3], scale=0.125, memo={})
    monkeypatch.setenv("FASTTUNE_DECODE_TRITON", "1")
    decode_attention(clean_q, clean_k, clean_v, clean[3], scale=0.125, softcap=30.0, memo={})
    if DEVICE == "cpu":
        monkeypatch.setenv("FASTTUNE_KERNELS", "auto")
        decode_attention(clean_q, clean_k, clean_v, clean[3], scale=0.125, memo={})
    assert calls == [1]


def test_a_failing_kernel_is_logged_once_and_the_next_path_answers(monkeypatch, caplog):
    def broken(*a, **kw):
        raise RuntimeError("no such GPU")
    monkeypatch.setattr(dk, "decode_attention_triton", broken)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    (q, k, v, n, z), clean = make_inputs(2, 32, 4, 2, 64, [5, 32], torch.float32, salt=("fail",))
    q, k, v = (t.float() for t in clean[:3])
    with caplog.at_level("WARNING", logger="fasttune.attention"):
        a = decode_attention(q, k, v, n, scale=0.125, memo={})
        b = decode_attention(q, k, v, n, scale=0.125, memo={})
    assert "triton-decode" in FALLBACKS.failed and "no such GPU" in FALLBACKS.failed["triton-decode"]
    assert sum("triton-decode failed" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(a, b)
    check(a, (clean[0], clean[1], clean[2], clean[3], None), 0.125, None, torch.float32, "after the failure")


def test_generation_through_the_kernel_equals_full_recompute(tmp_path, monkeypatch):
    """End to end: a tiny Mistral (sliding window 7, GQA 2, head_dim 12) decoding with FASTTUNE_KERNELS=triton (the
    CUDA path; in the interpreter here) gives full recompute's greedy tokens, and every layer of every decode step
    ran the kernel."""
    pytest.importorskip("transformers")
    import test_models_parity as old_families
    from fasttune.generation import Generator, SamplingParams
    from test_generation import _build, ragged_prompts, recompute

    model = _build(tmp_path, old_families, "mistral")
    calls = []
    real = dk.decode_attention_triton
    monkeypatch.setattr(dk, "decode_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    prompts = ragged_prompts((3, 9, 1))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    got = [c[0] for c in Generator(model, max_batch_size=4, max_seq_len=24).generate(prompts, params)]
    assert len(calls) == model.spec.num_layers * (params.max_new_tokens - 1) and not FALLBACKS.failed
    monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
    assert got == [recompute(model, p, params, stop_ids=[]) for p in prompts]


# ---- GPU, real sizes ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_inputs(S, M, Hq, Hk, D, dtype, window=None, sinks=False, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    q = torch.randn(S, 1, Hq, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(S, M, Hk, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(S, M, Hk, D, device="cuda", generator=g).to(dtype)
    n = torch.randint(1, M + 1, (S,), device="cuda", dtype=torch.int32, generator=g)
    n[0] = M
    if S > 1:
        n[1] = 1
    z = (1.5 * torch.randn(Hq, device="cuda", generator=g)).to(dtype) if sinks else None
    return q, k, v, n, z


def _gpu_check(out, q, k, v, n, z, scale, window, u, what):
    """Against float32 eager math (TF32 off) on the same rounded inputs: |out - r| <= u (|r| + max|v|)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = eager_attention(q.float(), k.float().transpose(1, 2), v.float().transpose(1, 2),
                              decode_mask(n, k.shape[1], window), scale, None, None if z is None else z.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    err = (out.float() - ref).abs()
    bound = u * (ref.abs() + v.float().abs().max())
    print(f"{what}: max error {err.max().item():.2e}, max error / bound {(err / bound).max().item():.3f}")
    assert torch.isfinite(out).all() and (err <= bound).all(), what


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("S,M", [(1, 128), (1, 4096), (8, 1024), (64, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_8b_shape_through_decode_attention(S, M, dtype):
    """Llama-3.1-8B attention (32 q / 8 kv heads, head_dim 128) through `decode_attention`'s dispatch (the
    default launch shape), ragged lengths including 1 and M; bf16 bound 2^-8 (rounding on the GPU), fp32 1e-5."""
    q, k, v, n, _ = _gpu_inputs(S, M, 32, 8, 128, dtype, seed=S + M)
    with torch.no_grad():
        out = decode_attention(q, k, v, n, scale=128 ** -0.5, memo={})
    assert not FALLBACKS.failed, FALLBACKS.failed
    assert not FALLBACKS._said, FALLBACKS._said  # no slower path noted: the kernel ran
    _gpu_check(out, q, k, v, n, None, 128 ** -0.5, None, 2.0**-8 if dtype == torch.bfloat16 else 1e-5,
               f"8B S {S} M {M} {dtype} splits {dk.default_config(S, 8, M, q.device).splits}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("S,M", [(1, 4096), (16, 2048)])
@pytest.mark.parametrize("window", [None, 128])
def test_gpu_gpt_oss_shape_with_sinks(S, M, window):
    """gpt-oss-20b attention: 64 q / 8 kv heads, head_dim 64, sinks, sliding window 128 on half the layers."""
    q, k, v, n, z = _gpu_inputs(S, M, 64, 8, 64, torch.bfloat16, window, sinks=True, seed=7 + S)
    with torch.no_grad():
        out = decode_attention(q, k, v, n, scale=64 ** -0.5, sliding_window=window, sinks=z, memo={})
    assert not FALLBACKS.failed and not FALLBACKS._said, (FALLBACKS.failed, FALLBACKS._said)
    _gpu_check(out, q, k, v, n, z, 64 ** -0.5, window, 2.0**-8, f"gpt-oss S {S} M {M} window {window}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_replays_follow_new_lengths_and_make_no_host_sync():
    """Batch 1 at the 8B shape (32 splits): captured once, replayed with new lengths and a new query; each replay
    equals an eager launch, twice in a row (the counters were reset), with no host sync inside."""
    S, M = 1, 4096
    q, k, v, n, _ = _gpu_inputs(S, M, 32, 8, 128, torch.bfloat16, seed=3)
    cfg = dk.default_config(S, 8, M, q.device)
    assert cfg.splits > 1
    dk.decode_attention_triton(q, k, v, n, scale=0.088, config=cfg)  # warm-up: compile, workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dk.decode_attention_triton(q, k, v, n, scale=0.088, config=cfg)
    for length in (M, 1, 700, 4000):
        n.fill_(length)
        q.copy_(torch.randn_like(q))
        with no_host_sync():
            graph.replay()
        first = out.clone()
        graph.replay()
        eager = dk.decode_attention_triton(q, k, v, n, scale=0.088, config=cfg)
        torch.cuda.synchronize()
        assert torch.equal(first, out) and torch.equal(out, eager), length
    _gpu_check(out, q, k, v, n, None, 0.088, None, 2.0**-8, "graph replay")
