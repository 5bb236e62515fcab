"""Grouped GEMM for MoE experts (kernels/grouped_gemm.py) against a float64 per-row oracle.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set before triton is imported) with
16-row/column tiles, so the small shapes here span several tiles, partial tiles and segments that start mid-tile.
Kernel outputs are NaN-filled allocations, so an element a kernel forgets to write fails the comparison.
Tolerances, relative to the largest magnitude of the expected tensor: float32 1e-5 (seen ~2e-7); bfloat16 1.5e-2
(seen ~5e-3, the same as PyTorch's own bf16 per-expert loop on the same inputs: outputs and the rank-r products
u = x A^T and g = s dy B are rounded to bf16, as in kernels/lora.py); float16 3e-3 (seen ~7e-4, as PyTorch's own
fp16 loop). The torch-grouped-mm path (base_gemm="torch", bfloat16 only) is held to the same bf16 1.5e-2: it rounds y
and dx to bf16 once more (the base product, then + LoRA + bias), at most one more bf16 rounding step; on CPU it runs
torch's own CPU grouped mm and the Triton interpreter for everything else.
"""
import functools
import logging
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import fasttune.kernels as kernels  # noqa: E402
import fasttune.kernels.grouped_gemm as gg  # noqa: E402
from conftest import no_host_sync  # noqa: E402
from seeding import SESSION_SEED, generator  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(gg._grouped_mm_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU; "
                       "set it at the top of tests/conftest.py (before anything imports triton) on CPU-only machines")

@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write (an empty expert's gradient, a row of
    a partial tile) fails the comparison."""
    monkeypatch.setattr(gg, "alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
NAMES = ("y", "dx", "dweight", "dbias", "dlora_A", "dlora_B")


def offsets_of(loads):
    return torch.tensor([0, *torch.tensor(loads).cumsum(0).tolist()], dtype=torch.int32)


def make_case(loads, K, N, r, dtype, bias=True, lora="expert", transposed=False, salt=0):
    """Inputs for one grouped linear (float32 masters drawn once, cast to `dtype`), and an upstream gradient."""
    gen = generator("grouped", tuple(loads), K, N, r, bias, lora, transposed, salt)
    E, M = len(loads), sum(loads)

    def draw(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    w = draw(E, N, K, scale=K ** -0.5)
    t = {"x": draw(M, K), "weight": w.transpose(1, 2).contiguous() if transposed else w,
         "bias": draw(E, N) if bias else None, "lora_A": None, "lora_B": None}
    if lora is not None:
        lead = (E,) if lora == "expert" else ()
        t["lora_A"] = draw(*lead, r, K, scale=K ** -0.5)
        t["lora_B"] = draw(*lead, N, r)
    dy = draw(M, N)
    cast = {k: (None if v is None else v.to(DEVICE, dtype)) for k, v in t.items()}
    return cast, dy.to(DEVICE, dtype), offsets_of(loads).to(DEVICE)


def run(fn, inputs, dy, offsets, scaling, transposed, dtype=None, weight_grad=True):
    """y and the gradients of every input (None where the input is absent or frozen)."""
    def leaf(k, v):
        if v is None or not isinstance(v, torch.Tensor):  # absent, or a quantised weight (no gradient)
            return v
        return v.detach().to(dtype or v.dtype).requires_grad_(k != "weight" or weight_grad)

    leaves = {k: leaf(k, v) for k, v in inputs.items()}
    y = fn(leaves["x"], leaves["weight"], offsets, leaves["bias"], leaves["lora_A"], leaves["lora_B"], scaling,
           transposed=transposed)
    wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = iter(torch.autograd.grad(y, wrt, dy.to(y.dtype)))
    out = {"y": y.detach()}
    for k, name in zip(leaves, NAMES[1:]):
        v = leaves[k]
        out[name] = next(grads) if isinstance(v, torch.Tensor) and v.requires_grad else None
    return out


def oracle(x, weight, offsets, bias, lora_A, lora_B, scaling, transposed=False):
    """float64 formula per row: y_m = W_{e(m)} x_m + b_{e(m)} + s B_{e(m)} A_{e(m)} x_m, gathering each row's expert
    weights (independent of the per-segment slicing the implementations use)."""
    M = x.shape[0]
    E = offsets.numel() - 1
    expert = torch.searchsorted(offsets[1:].long().cpu(), torch.arange(M), right=True).to(x.device)
    assert int(expert.max()) < E if M else True
    w = weight.transpose(1, 2) if transposed else weight  # (E, N, K)
    y = torch.einsum("mk,mnk->mn", x, w[expert])
    if bias is not None:
        y = y + bias[expert]
    if lora_A is not None:
        A = lora_A[expert] if lora_A.dim() == 3 else lora_A.expand(M, *lora_A.shape)
        B = lora_B[expert] if lora_B.dim() == 3 else lora_B.expand(M, *lora_B.shape)
        y = y + scaling * torch.einsum("mnr,mr->mn", B, torch.einsum("mrk,mk->mr", A, x))
    return y


def assert_rel_close(actual, expected, tol, what):
    assert actual is not None and expected is not None, what
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    actual = actual.double()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-30)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= tol * scale, (f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g} "
                                f"(FASTTUNE_TEST_SEED={SESSION_SEED})")


def check(loads, K, N, r, dtype, bias=True, lora="expert", transposed=False, scaling=0.75, weight_grad=True,
          salt=0, base_gemm="auto"):
    inputs, dy, offsets = make_case(loads, K, N, r, dtype, bias, lora, transposed, salt)
    expected = run(oracle, inputs, dy, offsets, scaling, transposed, dtype=torch.float64, weight_grad=weight_grad)
    got = run(functools.partial(gg.grouped_linear, base_gemm=base_gemm), inputs, dy, offsets, scaling, transposed,
              weight_grad=weight_grad)
    for name in NAMES:
        if expected[name] is None:
            assert got[name] is None, name
            continue
        assert got[name].dtype == dtype, (name, got[name].dtype)
        assert_rel_close(got[name], expected[name], TOL[dtype], f"{name} loads={loads} {dtype} lora={lora}")


# ---- forward and every gradient ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lora", ["expert", "shared", None])
def test_ragged_loads_with_empty_experts(dtype, lora):
    # segments that start mid-tile, two empty experts (one last), one of a single row; N, K odd and not tile-sized
    check([5, 0, 17, 1, 33, 0], K=40, N=21, r=4, dtype=dtype, lora=lora)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_on_one_expert(dtype):
    check([0, 0, 37, 0], K=24, N=33, r=3, dtype=dtype, bias=True)


def test_single_expert_is_a_dense_lora_linear():
    check([29], K=19, N=18, r=16, dtype=torch.float32, lora="expert")


@pytest.mark.parametrize("lora", ["expert", "shared"])
def test_without_bias_and_frozen_weight(lora):
    check([3, 20, 0, 9], K=32, N=16, r=2, dtype=torch.float32, bias=False, lora=lora, weight_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_layout_gpt_oss(dtype):
    # weight stored (E, K, N) as transformers' gpt-oss keeps gate_up_proj / down_proj; dweight comes back in it
    check([11, 0, 6, 20], K=35, N=24, r=4, dtype=dtype, transposed=True)


def test_no_rows_at_all():
    check([0, 0, 0], K=16, N=17, r=2, dtype=torch.float32)


def test_rank_above_one_tile():
    check([7, 12], K=16, N=20, r=20, dtype=torch.float32, lora="expert")  # BR = 32: two 16-wide rank blocks


def test_float32_adapters_with_bf16_activations():
    """LoRA float32 masters with a bf16 base: cast for the GEMMs, gradients returned in float32."""
    inputs, dy, offsets = make_case([6, 0, 13], K=24, N=20, r=4, dtype=torch.bfloat16, salt=3)
    inputs["lora_A"], inputs["lora_B"] = inputs["lora_A"].float(), inputs["lora_B"].float()
    got = run(gg.grouped_linear, inputs, dy, offsets, 0.5, False)
    ref = run(gg.grouped_linear_reference, inputs, dy, offsets, 0.5, False)
    assert got["y"].dtype == torch.bfloat16
    assert got["dlora_A"].dtype == torch.float32 and got["dlora_B"].dtype == torch.float32
    for name in NAMES:
        assert_rel_close(got[name], ref[name].double(), TOL[torch.bfloat16], name)


# ---- the frozen-weight GEMMs through torch's grouped mm (base_gemm="torch"; on CPU torch's CPU grouped mm) ----

@pytest.fixture
def torch_mm_calls(monkeypatch):
    """The (rows, weight view shape, weight view strides) of every torch grouped mm call."""
    if gg._TORCH_GROUPED_MM is None:
        pytest.skip(f"torch {torch.__version__} has no grouped mm")
    calls, real = [], gg._TORCH_GROUPED_MM

    def spy(a, b, offs):
        calls.append((a.shape[0], tuple(b.shape), tuple(b.stride())))
        return real(a, b, offs=offs)
    monkeypatch.setattr(gg, "_TORCH_GROUPED_MM", spy)
    return calls


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("lora,bias,weight_grad", [("expert", True, False), ("shared", False, False),
                                                   (None, True, False), ("expert", False, True), (None, False, False)])
def test_torch_base_gemm_ragged_loads(torch_mm_calls, transposed, lora, bias, weight_grad):
    """Forward and every gradient against the float64 oracle: empty experts (one last), a single-row expert,
    segments not tile-aligned; both weight layouts read as views (no copy); dW (trained W) from the Triton kernel."""
    loads, K, N = [5, 0, 17, 1, 33, 0], 40, 24
    check(loads, K=K, N=N, r=4, dtype=torch.bfloat16, bias=bias, lora=lora, transposed=transposed,
          weight_grad=weight_grad, base_gemm="torch")
    stored = (K * N, N, 1) if transposed else (N * K, K, 1)  # the stored tensor's strides
    fwd_view = (stored[0], stored[1], 1) if transposed else (stored[0], 1, stored[1])  # (E, K, N)
    dx_view = (stored[0], 1, stored[1]) if transposed else (stored[0], stored[1], 1)  # (E, N, K)
    assert torch_mm_calls == [(56, (6, K, N), fwd_view), (56, (6, N, K), dx_view)]


def test_torch_base_gemm_no_rows(torch_mm_calls):
    check([0, 0, 0], K=16, N=16, r=2, dtype=torch.bfloat16, base_gemm="torch")
    assert torch_mm_calls == []  # nothing to multiply: no launch


def test_torch_base_gemm_equals_triton_up_to_one_rounding(torch_mm_calls):
    """Same inputs through both base kernels: the torch path rounds the base product P = x W_e^T to bf16 before
    adding LoRA and bias (the Triton path does not), so per element |y_torch - y_triton| <= u |P| + 2 u |y| with
    u = 2^-8 the bf16 unit roundoff; checked with the bound eps (|P| + |y|), eps = 2u."""
    t, dy, offsets = make_case([9, 3, 0, 20], K=32, N=16, r=8, dtype=torch.bfloat16, salt=5)
    ys = {mode: gg.grouped_linear(t["x"], t["weight"], offsets, t["bias"], t["lora_A"], t["lora_B"], 0.5,
                                  base_gemm=mode).double() for mode in ("torch", "triton")}
    assert len(torch_mm_calls) == 1
    base = gg.grouped_linear_reference(t["x"].double(), t["weight"].double(), offsets)
    bound = torch.finfo(torch.bfloat16).eps * (base.abs() + ys["triton"].abs()) + 1e-6
    diff = (ys["torch"] - ys["triton"]).abs()
    assert (diff <= bound).all(), (diff - bound).max()
    assert diff.max() > 0  # the two paths are distinct computations (the test compares two things)


def _bf16_case(M=24, K=32, N=16, E=3):
    x = torch.randn(M, K, generator=generator("blocker", M, K)).to(torch.bfloat16)
    w = torch.randn(E, N, K, generator=generator("blocker-w", E, N, K)).to(torch.bfloat16)
    return x, w


def test_torch_grouped_mm_blocker_reasons(monkeypatch):
    """Each condition torch's fused grouped mm has, checked from host metadata."""
    x, w = _bf16_case()
    assert gg.torch_grouped_mm_blocker(x, w) is None
    assert gg.torch_grouped_mm_blocker(x, w.transpose(1, 2)) is None  # column-major matrices: the gpt-oss view
    assert "bfloat16 only" in gg.torch_grouped_mm_blocker(x.half(), w.half())
    assert "bfloat16 only" in gg.torch_grouped_mm_blocker(x.float(), w)
    assert "multiples of 8" in gg.torch_grouped_mm_blocker(x[:, :20], w[:, :, :20].contiguous())
    assert "fewer than 1024 groups" in gg.torch_grouped_mm_blocker(x, torch.zeros(1024, 16, 32, dtype=torch.bfloat16))
    odd = torch.empty(24 * 32 + 1, dtype=torch.bfloat16)[1:].view(24, 32)  # 2 bytes past an aligned address
    assert "rows' strides" in gg.torch_grouped_mm_blocker(odd, w)
    # column-major rows: torch would need every expert's row count a multiple of 8 (a device assert otherwise)
    assert "rows' strides" in gg.torch_grouped_mm_blocker(torch.empty(32, 24, dtype=torch.bfloat16).t(), w)
    assert "rows' strides" in gg.torch_grouped_mm_blocker(torch.empty(24, 36, dtype=torch.bfloat16)[:, :32], w)
    stack = torch.empty(3 * (16 * 32 + 4), dtype=torch.bfloat16).as_strided((3, 16, 32), (16 * 32 + 4, 32, 1))
    assert "expert weight strides" in gg.torch_grouped_mm_blocker(x, stack)  # expert 1 starts 8 bytes off
    strided = torch.empty(3, 16, 64, dtype=torch.bfloat16)[..., ::2]  # no unit stride in the matrix
    assert "expert weight strides" in gg.torch_grouped_mm_blocker(x, strided)
    monkeypatch.setattr(gg, "FALLBACKS", gg.Fallbacks("grouped GEMM", gg.log))
    gg.FALLBACKS.fail("torch-grouped-mm", "RuntimeError: boom")
    assert "failed earlier" in gg.torch_grouped_mm_blocker(x, w)
    monkeypatch.setattr(gg, "_TORCH_GROUPED_MM", None)
    assert "has no grouped mm" in gg.torch_grouped_mm_blocker(x, w)


def test_base_gemm_choice_is_explicit(caplog):
    """"auto" on CPU is the Triton (interpreter) path without a log; "torch" where it cannot run is an error that
    says why, never a quiet switch; an unknown choice is rejected."""
    x, w = _bf16_case()
    offsets = offsets_of([10, 0, 14])
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        assert gg._requested_kernel("auto", x, w) == "triton"
        assert gg._requested_kernel("triton", x, w) == "triton"
        assert gg._requested_kernel("torch", x, w) == "torch"
    assert caplog.text == ""
    with pytest.raises(ValueError, match="base_gemm='torch' cannot run here: activations torch.float16"):
        gg.grouped_linear(x.half(), w.half(), offsets, base_gemm="torch")
    with pytest.raises(ValueError, match="base_gemm must be one of"):
        gg.grouped_linear(x, w, offsets, base_gemm="cutlass")


# ---- base_gemm="auto": the faster kernel per call shape, timed once (the timer faked on CPU) ----------------

@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(gg, "AUTO_CHOICES", {})
    monkeypatch.setattr(gg, "FALLBACKS", gg.Fallbacks("grouped GEMM", gg.log))
    return gg.AUTO_CHOICES


def _fake_timer(times, timed):
    """_time_ms stand-in: the candidate's time from `times` (the candidates are partials of the kernel name)."""
    def time_ms(fn, reps):
        timed.append(fn.args[0])
        return times[fn.args[0]]
    return time_ms


@pytest.mark.parametrize("torch_ms,expected", [(0.5, "torch"), (0.98, "triton"), (1.5, "triton")])
def test_auto_choice_keeps_the_faster_once(fresh_choices, monkeypatch, caplog, torch_ms, expected):
    """Both candidates run once to warm up, then are timed (two rounds); torch's is kept only when below
    AUTO_MARGIN x Triton's; the choice is cached per key (no second timing) and logged once with both times."""
    runs, timed = [], []
    monkeypatch.setattr(gg, "_time_ms", _fake_timer({"triton": 1.0, "torch": torch_ms}, timed))
    cands = [functools.partial(lambda name: runs.append(name), name) for name in ("triton", "torch")]
    with caplog.at_level(logging.INFO, logger="fasttune.kernels"):
        assert gg._auto_choice(("k",), *cands) == expected
        assert gg._auto_choice(("k",), *cands) == expected
    assert sorted(runs) == ["torch", "triton"] and sorted(timed) == ["torch", "torch", "triton", "triton"]
    assert fresh_choices[("k",)] == {"kernel": expected, "triton_ms": 1.0, "torch_ms": torch_ms}
    said = [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]
    assert len(said) == 1 and f"chose {expected}" in said[0] and "1.000 ms" in said[0], said


def test_auto_choice_is_not_made_during_capture(fresh_choices, monkeypatch, caplog):
    """Inside CUDA graph capture nothing is timed or cached: Triton runs, said once; a later eager call decides."""
    monkeypatch.setattr(gg, "_time_ms", _fake_timer({"triton": 1.0, "torch": 0.1}, []))
    monkeypatch.setattr(gg, "_untimeable", lambda: True)
    with caplog.at_level(logging.WARNING, logger="fasttune.kernels"):
        for _ in range(2):
            assert gg._auto_choice(("k",), lambda: pytest.fail("ran"), lambda: pytest.fail("ran")) == "triton"
    assert fresh_choices == {} and caplog.text.count("CUDA graph capture") == 1
    monkeypatch.setattr(gg, "_untimeable", lambda: False)
    assert gg._auto_choice(("k",), functools.partial(str, "triton"), functools.partial(str, "torch")) == "torch"


def test_auto_choice_when_torch_raises(fresh_choices, caplog):
    def broken():
        raise RuntimeError("cutlass cannot implement")
    with caplog.at_level(logging.WARNING, logger="fasttune.kernels"):
        assert gg._auto_choice(("k",), lambda: None, broken) == "triton"
    assert not gg.FALLBACKS.usable("torch-grouped-mm") and fresh_choices[("k",)]["kernel"] == "triton"
    assert caplog.text.count("torch-grouped-mm failed (RuntimeError: cutlass cannot implement)") == 1


@pytest.mark.parametrize("winner", ["torch", "triton"])
@pytest.mark.parametrize("transposed", [False, True])
def test_auto_runs_the_kept_kernel_forward_and_dx(torch_mm_calls, fresh_choices, monkeypatch, winner, transposed):
    """The whole "auto" path (on CPU: torch's CPU grouped mm and the interpreter, the timer faked): one choice per
    direction, keyed by the direction and the call shape; the kept kernel runs (torch's: one warm-up call and the
    real one per direction), and every output and gradient matches the float64 oracle. A second call of the same
    shape times nothing."""
    timed = []
    loser = {"torch": "triton", "triton": "torch"}[winner]
    monkeypatch.setattr(gg, "_time_ms", _fake_timer({winner: 1.0, loser: 2.0}, timed))
    monkeypatch.setattr(gg, "_requested_kernel", lambda base_gemm, x, w: "time")  # "auto" as on an sm90 GPU
    check([5, 0, 17, 1, 33, 0], K=40, N=24, r=4, dtype=torch.bfloat16, transposed=transposed, weight_grad=False)
    assert sorted(k[0] for k in fresh_choices) == ["forward", "grad_input"]
    assert {c["kernel"] for c in fresh_choices.values()} == {winner}
    assert len(torch_mm_calls) == (4 if winner == "torch" else 2)  # warm-up per direction (+ the kept runs)
    n_timed = len(timed)
    check([5, 0, 17, 1, 33, 0], K=40, N=24, r=4, dtype=torch.bfloat16, transposed=transposed, weight_grad=False,
          salt=1)
    assert len(timed) == n_timed and len(fresh_choices) == 2


def test_auto_key_is_static_per_token_count():
    """Same token count, different routing: one key; a different row bucket (decode), direction or LoRA: another."""
    x, w = _bf16_case(M=24)
    key = gg.auto_key("forward", x, w, 16, None, None)
    assert gg.auto_key("forward", torch.zeros_like(x), w, 16, None, None) == key
    assert gg.auto_key("forward", x[:20], w, 16, None, None) == key  # 20 and 24 rows: the same bucket of 32
    assert gg.auto_key("forward", x[:4], w, 16, None, None) != key
    assert gg.auto_key("grad_input", x, w, 16, None, None) != key
    assert gg.auto_key("forward", x, w, 16, None, torch.zeros(3, 16, 4)) != key
    assert gg.rows_hint(16384, 128) == 128 and gg.rows_hint(16000, 128) == 128 and gg.rows_hint(4, 128) == 1


# ---- the reference --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", ["expert", "shared"])
@pytest.mark.parametrize("transposed", [False, True])
def test_reference_equals_per_row_oracle(lora, transposed):
    inputs, dy, offsets = make_case([4, 0, 9, 2], K=12, N=10, r=3, dtype=torch.float64, lora=lora,
                                    transposed=transposed)
    got = run(gg.grouped_linear_reference, inputs, dy, offsets, 1.25, transposed)
    expected = run(oracle, inputs, dy, offsets, 1.25, transposed)
    for name in NAMES:
        assert_rel_close(got[name], expected[name], 1e-12, name)


def test_reference_rejects_bad_offsets_and_shapes():
    x, w = torch.randn(5, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="rise from 0 to the number of rows 5"):
        gg.grouped_linear_reference(x, w, torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="E \\+ 1 = 3 entries"):
        gg.grouped_linear_reference(x, w, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="takes 8"):
        gg.grouped_linear_reference(torch.randn(5, 7), w, torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        gg.grouped_linear(x, w, torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        gg.grouped_linear(x, w, torch.tensor([0, 2, 5], dtype=torch.int32), lora_A=torch.randn(2, 8))


def test_dispatch(monkeypatch):
    inputs, dy, offsets = make_case([3, 5], K=16, N=16, r=2, dtype=torch.float32)
    calls = []
    monkeypatch.setattr(gg, "grouped_linear", lambda *a, **k: calls.append("triton"))
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    kernels.grouped_linear(inputs["x"], inputs["weight"], offsets)
    assert calls == ["triton"]
    monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
    y = kernels.grouped_linear(inputs["x"], inputs["weight"], offsets, inputs["bias"])
    assert calls == ["triton"]
    assert torch.equal(y, gg.grouped_linear_reference(inputs["x"], inputs["weight"], offsets, inputs["bias"]))


# ---- routing order ---------------------------------------------------------------------------------------------

def test_sort_by_expert_round_trip_and_stability():
    T, k, E = 41, 3, 7
    ids = torch.randint(0, E - 1, (T, k), generator=generator("sort", T, k))  # expert E-1 stays empty
    ids[5] = 2  # ties inside one token, and across tokens
    order, offsets, inverse = gg.sort_by_expert(ids.to(DEVICE), E)
    order, offsets, inverse = order.cpu(), offsets.cpu(), inverse.cpu()
    flat = ids.reshape(-1)
    assert offsets.dtype == torch.int32 and offsets.shape == (E + 1,)
    assert offsets.tolist() == [0, *torch.bincount(flat, minlength=E).cumsum(0).tolist()]
    assert offsets[-1] == offsets[-2] == T * k
    sorted_ids = flat[order]
    assert (sorted_ids[1:] >= sorted_ids[:-1]).all()
    for e in range(E):  # stable: within an expert, (token, slot) order is kept
        seg = order[offsets[e]:offsets[e + 1]]
        assert (seg[1:] > seg[:-1]).all()
        assert (flat[seg] == e).all()
    assert torch.equal(sorted_ids[inverse], flat)
    assert torch.equal(order[inverse], torch.arange(T * k))
    # all on one expert: the identity order
    order1, offsets1, inverse1 = gg.sort_by_expert(torch.full((9, 2), 3, device=DEVICE), 5)
    assert order1.cpu().tolist() == list(range(18)) and inverse1.cpu().tolist() == list(range(18))
    assert offsets1.cpu().tolist() == [0, 0, 0, 0, 18, 18]


def test_permutations_and_their_backwards_match_indexing():
    """to_expert_order / to_token_order give x[order // k] and y[inverse] and the gradients autograd's indexing
    gives (integer-valued floats: every sum exact, so the comparison is exact whatever the summation order)."""
    T, k, E, H = 13, 3, 5, 6
    gen = generator("perm", T, k, E)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(DEVICE)
    order, offsets, inverse = gg.sort_by_expert(ids, E)
    x = torch.randint(-8, 8, (T, H), generator=gen).float().to(DEVICE).requires_grad_()
    ys = torch.randint(-8, 8, (T * k, H), generator=gen).float().to(DEVICE).requires_grad_()
    dxs = torch.randint(-8, 8, (T * k, H), generator=gen).float().to(DEVICE)
    ours = gg.to_expert_order(x, order, inverse, k)
    ref = x[order // k]
    assert torch.equal(ours, ref)
    assert torch.equal(torch.autograd.grad(ours, x, dxs)[0], torch.autograd.grad(ref, x, dxs)[0])
    ours, ref = gg.to_token_order(ys, order, inverse), ys[inverse]
    assert torch.equal(ours, ref)
    assert torch.equal(torch.autograd.grad(ours, ys, dxs)[0], torch.autograd.grad(ref, ys, dxs)[0])


@pytest.mark.parametrize("base_gemm", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_master_adapters_are_rounded_in_the_kernel(dtype, base_gemm):
    """float32 adapters with 16-bit activations (what LoraExperts passes) are read as they are and rounded to the
    activations' dtype inside the kernels: y and dx equal those of adapters cast beforehand bit for bit, and their
    float32 gradients round to the cast adapters' gradients (the same float32 accumulation, rounded once)."""
    if base_gemm == "torch" and (gg._TORCH_GROUPED_MM is None or dtype != torch.bfloat16):
        pytest.skip("torch's grouped mm path takes bfloat16 only (and needs torch's grouped mm)")
    inputs, dy, offsets = make_case([5, 0, 17, 1, 9], K=40, N=24, r=4, dtype=dtype, bias=False)
    gen = generator("masters", str(dtype))
    A = torch.randn(5, 4, 40, generator=gen).to(DEVICE) * 0.2  # float32 values not representable in 16 bits
    B = torch.randn(5, 24, 4, generator=gen).to(DEVICE) * 0.2
    fn = functools.partial(gg.grouped_linear, base_gemm=base_gemm)
    masters = run(fn, {**inputs, "lora_A": A, "lora_B": B}, dy, offsets, 0.5, False, weight_grad=False)
    cast = run(fn, {**inputs, "lora_A": A.to(dtype), "lora_B": B.to(dtype)}, dy, offsets, 0.5, False,
               weight_grad=False)
    assert masters["dlora_A"].dtype == torch.float32 and cast["dlora_A"].dtype == dtype
    for name in ("y", "dx"):
        assert torch.equal(masters[name], cast[name]), name
    for name in ("dlora_A", "dlora_B"):
        assert torch.equal(masters[name].to(dtype), cast[name]), name


def test_moe_layer_round_trip_through_sort():
    """Gather by `order`, grouped linear, scatter back by `inverse`: equals each (token, slot)'s expert applied
    directly (what the model does with the kernel)."""
    T, k, E, K, N = 10, 2, 4, 16, 12
    gen = generator("layer", T, k, E)
    ids = torch.randint(0, E, (T, k), generator=gen)
    h, w = torch.randn(T, K, generator=gen), torch.randn(E, N, K, generator=gen)
    order, offsets, inverse = gg.sort_by_expert(ids, E)
    y = gg.grouped_linear(h[order // k], w, offsets)[inverse].view(T, k, N)
    direct = torch.einsum("tk,tsnk->tsn", h.double(), w.double()[ids])
    assert_rel_close(y, direct, 1e-5, "layer")


# ---- GPU, real sizes ---------------------------------------------------------------------------------------------

REAL_SHAPES = {  # (tokens, top-k, experts, hidden, expert width) ; gate_up: K=hidden, N=2*width; down: K=width
    "qwen3-30b-a3b": (4096, 8, 128, 2048, 768),
    "gpt-oss-20b": (4096, 4, 32, 2880, 2880),
}


@pytest.mark.gpu
@pytest.mark.parametrize("base_gemm", ["triton", "torch"])
@pytest.mark.parametrize("shape", list(REAL_SHAPES))
@pytest.mark.parametrize("lora", [None, "expert"])
def test_gpu_real_size(shape, lora, base_gemm):
    """bf16 at the real expert shapes, forward and every gradient, against the float32 per-expert reference:
    tolerance 2e-2 of the largest magnitude (outputs and the rank-16 products rounded to bf16; the torch path
    rounds y and dx once more). base_gemm="torch" raises if torch's fused grouped mm cannot run here."""
    assert torch.cuda.is_available()
    T, k, E, H, I = REAL_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(SESSION_SEED)
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(k, dim=1).indices  # k distinct experts per token
    order, offsets, _ = gg.sort_by_expert(ids, E)
    transposed = shape == "gpt-oss-20b"
    for K, N in ((H, 2 * I), (I, H)):  # gate_up, then down
        x = torch.randn(T, K, device="cuda", generator=gen, dtype=torch.bfloat16)[order // k]
        w = (torch.randn(E, N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
        if transposed:
            w = w.transpose(1, 2).contiguous()
        bias = torch.randn(E, N, device="cuda", generator=gen, dtype=torch.bfloat16) if transposed else None
        A = B = None
        if lora:
            A = (torch.randn(E, 16, K, device="cuda", generator=gen) * K ** -0.5).requires_grad_()
            B = (torch.randn(E, N, 16, device="cuda", generator=gen) * 0.1).requires_grad_()
        dy = torch.randn(x.shape[0], N, device="cuda", generator=gen, dtype=torch.bfloat16)
        got = run(functools.partial(gg.grouped_linear, base_gemm=base_gemm),
                  {"x": x, "weight": w, "bias": bias, "lora_A": A, "lora_B": B}, dy, offsets, 2.0, transposed,
                  weight_grad=lora is None)
        ref = run(gg.grouped_linear_reference, {"x": x.float(), "weight": w.float(), "bias": bias, "lora_A": A,
                                                "lora_B": B}, dy.float(), offsets, 2.0, transposed,
                  weight_grad=lora is None)
        for name in NAMES:
            if ref[name] is not None:
                assert_rel_close(got[name].float(), ref[name].double(), 2e-2, f"{shape} K={K} N={N} {name}")


@pytest.mark.parametrize("base_gemm", ["auto", "torch"])
def test_nf4_experts_dequantised_per_call(base_gemm):
    """QLoRA experts: an NF4 (E, N, K) weight is dequantised into a temporary for the forward and again for dx
    (never saved), and gives exactly the result of its dequantised dense weight (either base GEMM kernel)."""
    from fasttune.kernels import nf4

    if base_gemm == "torch" and gg._TORCH_GROUPED_MM is None:
        pytest.skip(f"torch {torch.__version__} has no grouped mm")
    gen = generator("nf4-experts")
    q = nf4.quantize_nf4((torch.randn(3, 24, 32, generator=gen) * 0.1).to(DEVICE, torch.bfloat16))
    offsets = offsets_of([5, 0, 12]).to(DEVICE)
    x = torch.randn(17, 32, generator=gen).to(DEVICE, torch.bfloat16)
    A = (torch.randn(3, 4, 32, generator=gen) * 0.2).to(DEVICE).requires_grad_()
    B = (torch.randn(3, 24, 4, generator=gen) * 0.2).to(DEVICE).requires_grad_()
    dy = torch.randn(17, 24, generator=gen).to(DEVICE, torch.bfloat16)
    inputs = {"x": x, "weight": q, "bias": None, "lora_A": A, "lora_B": B}
    fn = functools.partial(gg.grouped_linear, base_gemm=base_gemm)
    got = run(fn, inputs, dy, offsets, 0.5, False, weight_grad=False)
    dense = run(fn, {**inputs, "weight": q.dequantize()}, dy, offsets, 0.5, False, weight_grad=False)
    for name in NAMES:
        assert (got[name] is None) == (dense[name] is None), name
        if got[name] is not None:
            assert torch.equal(got[name], dense[name]), name


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("lora", ["expert", "shared", None])
def test_nf4_experts_dequantised_a_few_experts_at_a_time(transposed, lora, monkeypatch):
    """A stack over DEQUANT_CHUNK_BYTES is dequantised an expert range at a time (never whole) for the forward and
    for dx, each launch writing its experts' rows of one output (NaN-poisoned: a forgotten row fails), and gives
    the same bits as dequantising it whole: y and every gradient, empty experts, a partial last range, the gpt-oss
    layout, per-expert and shared adapters, bias."""
    from fasttune.kernels import nf4

    gen = generator("nf4-chunks", transposed, lora)
    E, N, K = 5, 24, 32
    stored = (E, K, N) if transposed else (E, N, K)
    q = nf4.quantize_nf4((torch.randn(*stored, generator=gen) * 0.1).to(DEVICE, torch.bfloat16))
    offsets = offsets_of([5, 0, 12, 3, 7]).to(DEVICE)
    lead = (E,) if lora == "expert" else ()
    inputs = {"x": torch.randn(27, K, generator=gen).to(DEVICE, torch.bfloat16), "weight": q,
              "bias": torch.randn(E, N, generator=gen).to(DEVICE, torch.bfloat16),
              "lora_A": None if lora is None else (torch.randn(*lead, 4, K, generator=gen) * 0.2).to(DEVICE),
              "lora_B": None if lora is None else (torch.randn(*lead, N, 4, generator=gen) * 0.2).to(DEVICE)}
    dy = torch.randn(27, N, generator=gen).to(DEVICE, torch.bfloat16)
    fn = functools.partial(gg.grouped_linear, base_gemm="triton")
    whole = run(fn, inputs, dy, offsets, 0.5, transposed, weight_grad=False)
    per_expert = N * K * 2
    monkeypatch.setattr(gg, "DEQUANT_CHUNK_BYTES", 2 * per_expert)  # ranges of 2, 2, 1 experts
    assert gg._expert_chunks(q, torch.bfloat16) == [(0, 2), (2, 4), (4, 5)]
    ranges = []
    real = nf4.NF4Tensor.dequantize_rows
    monkeypatch.setattr(nf4.NF4Tensor, "dequantize_rows", lambda self, a, b, dtype=None: ranges.append((a, b))
                        or real(self, a, b, dtype))
    monkeypatch.setattr(nf4.NF4Tensor, "dequantize", lambda *a, **k: pytest.fail("dequantised whole"))
    chunked = run(fn, inputs, dy, offsets, 0.5, transposed, weight_grad=False)
    assert ranges == [(0, 2), (2, 4), (4, 5)] * 2  # forward, then dx
    for name in NAMES:
        assert (chunked[name] is None) == (whole[name] is None), name
        if chunked[name] is not None:
            assert torch.equal(chunked[name], whole[name]), name


def test_stack_of_blocks_straddling_experts_is_dequantised_whole_and_says_so(monkeypatch, caplog):
    from fasttune.kernels import nf4

    q = nf4.quantize_nf4(torch.randn(3, 8, 5).to(DEVICE, torch.bfloat16))  # 40 values per expert: not whole blocks
    monkeypatch.setattr(gg, "DEQUANT_CHUNK_BYTES", 1)
    monkeypatch.setattr(gg, "FALLBACKS", gg.Fallbacks("grouped GEMM", gg.log))
    with caplog.at_level(logging.INFO, logger="fasttune.kernels"):
        assert gg._expert_chunks(q, torch.bfloat16) is None
        assert gg._expert_chunks(q, torch.bfloat16) is None
    said = [r.getMessage() for r in caplog.records if "dequantised whole" in r.getMessage()]
    assert len(said) == 1 and "straddle" in said[0]
    assert gg._expert_chunks(q.dequantize(), torch.bfloat16) is None  # a dense stack: nothing to chunk


@pytest.mark.gpu
@pytest.mark.parametrize("base_gemm", ["triton", "torch", "auto"])
def test_gpu_no_host_sync(base_gemm):
    """Routing order, forward and backward never wait for the device (after the first call has autotuned); with
    torch's grouped mm too (its per-expert loop, which it runs off sm90/sm100 or for non-bf16, would copy the
    offsets to the host and fail here)."""
    assert torch.cuda.is_available()
    T, k, E, K, N = 512, 4, 16, 256, 384
    ids = torch.rand(T, E, device="cuda").topk(k, dim=1).indices
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16).requires_grad_()
    A = torch.randn(E, 16, K, device="cuda").requires_grad_()
    B = torch.randn(E, N, 16, device="cuda").requires_grad_()

    def step():
        order, offsets, inverse = gg.sort_by_expert(ids, E)
        xs = x[order // k].requires_grad_()
        y = gg.grouped_linear(xs, w, offsets, None, A, B, 2.0, base_gemm=base_gemm)[inverse]
        torch.autograd.grad(y.float().square().sum(), (xs, w, A, B))

    step()
    torch.cuda.synchronize()
    with no_host_sync():
        step()


def _gpu_small_case():
    gen = torch.Generator(device="cuda").manual_seed(SESSION_SEED)
    x = torch.randn(64, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(4, 32, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    return x, w, offsets_of([16, 0, 40, 8]).cuda()


@pytest.mark.gpu
def test_gpu_overrides_and_float16(torch_mm_calls, monkeypatch, caplog):
    """FASTTUNE_GROUPED_MM=triton keeps "auto" on the Triton kernel without a word; =torch puts bf16 base GEMMs
    (forward and dx) through torch's grouped mm on sm90/sm100, and float16 takes the Triton kernel with the reason
    logged once."""
    assert torch.cuda.is_available()
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch's fused grouped mm runs on sm90 / sm100 only")
    x, w, offsets = _gpu_small_case()
    monkeypatch.setattr(gg, "FALLBACKS", gg.Fallbacks("grouped GEMM", gg.log))
    monkeypatch.setenv("FASTTUNE_GROUPED_MM", "triton")
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        xs = x.clone().requires_grad_()
        torch.autograd.grad(kernels.grouped_linear(xs, w, offsets).float().square().sum(), xs)
        assert len(torch_mm_calls) == 0 and caplog.text == ""
        monkeypatch.setenv("FASTTUNE_GROUPED_MM", "torch")
        torch.autograd.grad(kernels.grouped_linear(xs, w, offsets).float().square().sum(), xs)
        assert len(torch_mm_calls) == 2 and caplog.text == ""
        for _ in range(2):
            gg.grouped_linear(x.half(), w.half(), offsets)
        assert len(torch_mm_calls) == 2
        assert caplog.text.count("run in the Triton grouped kernel") == 1 and "torch.float16" in caplog.text
    monkeypatch.setenv("FASTTUNE_GROUPED_MM", "cutlass")
    with pytest.raises(ValueError, match="FASTTUNE_GROUPED_MM must be one of"):
        gg.grouped_linear(x, w, offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(REAL_SHAPES))
def test_gpu_auto_times_both_once_per_shape_and_direction(shape, monkeypatch, caplog):
    """"auto" at the real expert shapes (LoRA r=16 on the experts, frozen W): the first step times both kernels for
    the forward and for dx of each projection (4 choices, each logged once with both times), and keeps the faster
    (torch's only when below AUTO_MARGIN x Triton's); the next step runs the kept kernels without a host sync, and
    its result equals the chosen kernel's run alone, bit for bit."""
    assert torch.cuda.is_available()
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch's fused grouped mm runs on sm90 / sm100 only")
    monkeypatch.delenv("FASTTUNE_GROUPED_MM", raising=False)
    monkeypatch.setattr(gg, "AUTO_CHOICES", {})
    T, k, E, H, I = REAL_SHAPES[shape]
    T //= 2  # 2048 tokens: the training benchmark's step (bench/moe_train.py)
    gen = torch.Generator(device="cuda").manual_seed(SESSION_SEED)
    ids = torch.rand(T, E, device="cuda", generator=gen).topk(k, dim=1).indices
    order, offsets, _ = gg.sort_by_expert(ids, E)
    transposed = shape == "gpt-oss-20b"
    cases = []
    for K, N in ((H, 2 * I), (I, H)):
        w = (torch.randn(E, N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16)
        w = w.transpose(1, 2).contiguous() if transposed else w
        bias = torch.randn(E, N, device="cuda", generator=gen, dtype=torch.bfloat16) if transposed else None
        A = (torch.randn(E, 16, K, device="cuda", generator=gen) * K ** -0.5).requires_grad_()
        B = (torch.randn(E, N, 16, device="cuda", generator=gen) * 0.1).requires_grad_()
        x = torch.randn(T * k, K, device="cuda", generator=gen, dtype=torch.bfloat16)
        dy = torch.randn(T * k, N, device="cuda", generator=gen, dtype=torch.bfloat16)
        cases.append((x, w, bias, A, B, dy))

    def step(base_gemm="auto"):
        out = []
        for x, w, bias, A, B, dy in cases:
            xs = x.clone().requires_grad_()
            y = gg.grouped_linear(xs, w, offsets, bias, A, B, 2.0, transposed=transposed, base_gemm=base_gemm)
            out += [y.detach(), *torch.autograd.grad(y, (xs, A, B), dy)]
        return out

    with caplog.at_level(logging.INFO, logger="fasttune.kernels"):
        step()
        step()
    torch.cuda.synchronize()
    said = [r.getMessage() for r in caplog.records if "base_gemm='auto' chose" in r.getMessage()]
    assert len(said) == 4 and len(gg.AUTO_CHOICES) == 4, said
    for key, c in gg.AUTO_CHOICES.items():
        print(shape, key[0], key[2:4], c)
        assert c["kernel"] == ("torch" if c["torch_ms"] < gg.AUTO_MARGIN * c["triton_ms"] else "triton")
    with no_host_sync():
        got = step()
    kept = {c["kernel"] for c in gg.AUTO_CHOICES.values()}
    if len(kept) == 1:  # the same kernel everywhere: the explicit run is the same computation
        expected = step(kept.pop())
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    else:  # mixed: each output within one more bf16 rounding of the Triton kernel's
        for a, b in zip(got, step("triton")):
            assert_rel_close(a.float(), b.double(), 2e-2, f"{shape} auto vs triton")


@pytest.mark.gpu
def test_gpu_torch_grouped_mm_error_is_logged_once_and_triton_takes_over(monkeypatch, caplog):
    """A torch grouped mm that raises (a build without the kernel, a check this code does not know) is logged once
    with its reason and not tried again; the result is the Triton path's."""
    assert torch.cuda.is_available()
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch's fused grouped mm runs on sm90 / sm100 only")
    x, w, offsets = _gpu_small_case()
    calls = []

    def broken(a, b, offs):
        calls.append(a.shape)
        raise RuntimeError("cutlass cannot implement")
    monkeypatch.setattr(gg, "FALLBACKS", gg.Fallbacks("grouped GEMM", gg.log))
    monkeypatch.setenv("FASTTUNE_GROUPED_MM", "torch")
    monkeypatch.setattr(gg, "_TORCH_GROUPED_MM", broken)
    with caplog.at_level(logging.WARNING, logger="fasttune"):
        ys = [gg.grouped_linear(x, w, offsets) for _ in range(2)]
    assert len(calls) == 1 and not gg.FALLBACKS.usable("torch-grouped-mm")
    assert caplog.text.count("torch-grouped-mm failed (RuntimeError: cutlass cannot implement)") == 1
    expected = gg.grouped_linear(x, w, offsets, base_gemm="triton")
    assert torch.equal(ys[0], expected) and torch.equal(ys[1], expected)
