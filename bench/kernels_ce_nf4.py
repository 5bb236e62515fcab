"""Benchmark: fused linear cross-entropy, NF4 dequantisation and the fused NF4 matmul on one CUDA GPU.

    python bench/kernels_ce_nf4.py            # prints a table; writes $OUT/kernels_ce_nf4.json when OUT is set
    python bench/kernels_ce_nf4.py --only nf4-matmul [--sweep]   # just the NF4 matmul rows (+ launch-shape sweep)

Rows: {op, impl, ms, peak_mib, gbps}. ms is the median of CUDA-event timings; peak_mib is the peak of
allocated memory above what was allocated before the call (inputs excluded, gradients included); gbps is
bytes read + written per second for memory-bound ops (None otherwise). Cross-entropy rows also carry
``mem_vs_eager`` (peak_mib / eager's peak_mib). A failing case gives a row with ms None and an ``error``.
NF4 matmul rows (y = x W^T at the Llama-3.1-8B projection shapes, M = 1, 8, 64 rows of x, bf16): the fused kernel
against dequantise + cuBLAS, each timed as 20 calls replayed from one CUDA graph (as a decode step runs them: no
launch gaps), ms per call; gbps counts the NF4 weight's bytes only (packed codes + absmax codes + absmax2: what any
implementation must read), so both impls are on one scale, and ``frac_of_4.8TBps`` compares it with the H200's
HBM bound. ``--sweep`` adds, at M = 1 and 8, a row per launch shape tried (kernels/nf4_matmul.NF4MatmulConfig:
a handful per shape, meant to keep the run with its compiles under 40 s on an H200, not yet timed) and ends with
one ``SWEEP`` line per (shape, M): the best config against the default and dequant + mm, for tuning
`default_config`.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from common import median_cuda_ms  # noqa: E402
from fasttune.kernels import cross_entropy as ce  # noqa: E402
from fasttune.kernels import nf4  # noqa: E402
from fasttune.kernels import nf4_matmul as nm  # noqa: E402


_median_ms = median_cuda_ms


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _row(op, impl, ms=None, peak_mib=None, gbps=None, **extra):
    return {"op": op, "impl": impl, "ms": ms, "peak_mib": peak_mib, "gbps": gbps, **extra}


def _case(rows, op, impl, fn):
    try:
        rows.append(fn())
    except Exception as e:  # one failing case must not hide the others
        traceback.print_exc()
        rows.append(_row(op, impl, error=f"{type(e).__name__}: {e}"))
        torch.cuda.empty_cache()


def bandwidth_reference(nbytes=2**30) -> dict:
    """Device-to-device copy: the attainable HBM bandwidth on this machine (read + write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), iters=20)
    return _row("copy 1 GiB (bandwidth reference)", "torch", ms, None, 2 * nbytes / ms / 1e6)


def flce_rows(n=16384, h=4096, v=128256, train_head: bool = True) -> list[dict]:
    head = "trainable head" if train_head else "frozen head (LoRA)"
    op = f"fused linear CE fwd+bwd N={n} H={h} V={v} bf16, {head}"
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda") / h**0.5).to(torch.bfloat16).requires_grad_(train_head)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::11] = -100

    def step(loss_fn):
        def run():
            hidden.grad = None
            weight.grad = None
            loss_fn().backward()
        return run

    def eager():
        return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)

    def fused():
        return ce.fused_linear_cross_entropy(hidden, weight, labels)

    impls = [("eager F.cross_entropy(hidden @ W.T)", eager), ("fasttune", fused)]
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        def liger():
            out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels)
            return out[0] if isinstance(out, tuple) else out

        impls.append(("liger", liger))
    except Exception as e:
        liger_missing = f"{type(e).__name__}: {e}"
    else:
        liger_missing = None

    rows = []
    for impl, fn in impls:
        _case(rows, op, impl, lambda: _row(op, impl, _median_ms(step(fn), warmup=2, iters=5), _peak_mib(step(fn))))
        hidden.grad = weight.grad = None
    if liger_missing:
        rows.append(_row(op, "liger", "n/a", "n/a", None, error=liger_missing))
    eager_peak = rows[0]["peak_mib"]
    for r in rows:
        if isinstance(r["peak_mib"], float) and isinstance(eager_peak, float):
            r["mem_vs_eager"] = r["peak_mib"] / eager_peak
    del hidden, weight, labels
    torch.cuda.empty_cache()
    return rows


def nf4_rows(shape=(4096, 14336)) -> list[dict]:
    op = f"NF4 dequant {shape[0]}x{shape[1]} -> bf16"
    torch.manual_seed(0)
    w = (torch.randn(shape, device="cuda") * 0.02).to(torch.bfloat16)
    q = nf4.quantize_nf4(w)
    out = torch.empty_like(w)
    nbytes = q.packed.numel() + q.absmax_q.numel() + 4 * q.absmax2.numel() + 2 * out.numel()
    rows = []

    def ours():
        ms = _median_ms(lambda: nf4.dequantize_nf4_triton(q, out=out), iters=50)
        assert torch.equal(out, nf4.dequantize_nf4_reference(q)), "Triton dequant differs from the reference"
        return _row(op, "fasttune", ms, None, nbytes / ms / 1e6)

    _case(rows, op, "fasttune", ours)
    try:
        import bitsandbytes.functional as bnb_f
    except Exception as e:
        rows.append(_row(op, "bitsandbytes", "n/a", None, None, error=f"{type(e).__name__}: {e}"))
    else:
        def theirs():
            bq, st = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            bout = torch.empty_like(w)
            ms = _median_ms(lambda: bnb_f.dequantize_4bit(bq, st, out=bout), iters=50)
            same = torch.equal(bout, out)
            return _row(op, "bitsandbytes", ms, None, nbytes / ms / 1e6, bit_exact_vs_fasttune=same)

        _case(rows, op, "bitsandbytes", theirs)
    return rows


HBM_BOUND_GBPS = 4800.0  # H200 HBM3e, the datasheet figure
NF4_MATMUL_SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # (N, K): q/o, k/v, gate/up, down


def _graph_ms(fn, reps: int = 20) -> float:
    """ms per call of fn, `reps` calls captured in one CUDA graph and replayed (no launch gaps between calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # compile, autotune, allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return _median_ms(graph.replay, warmup=2, iters=20) / reps


def _sweep_configs(M: int, N: int, K: int) -> list:
    """A handful of launch shapes per (M, N, K) around the default (kernels/nf4_matmul.default_config's table): the
    sweep must finish in well under a minute, compiles included (the GEMV / MMA kernels specialise on each)."""
    C = nm.NF4MatmulConfig
    if M == 1:  # GEMV: rows per program x columns per iteration (4096 or 8192 weights); the MMA kernel padded
        configs = [C(block_n=4, block_k=1024), C(block_n=8, block_k=512), C(block_n=16, block_k=256),
                   C(block_n=8, block_k=1024), C(block_n=32, block_k=128, use_dot=True)]
    else:  # mma.sync tiles of 32 and 16 rows, 64-row (wgmma) tiles; the default's split
        split = nm.default_config(M, N, K, torch.device("cuda")).split
        configs = [C(block_n=32, block_k=128, split=split), C(block_n=16, block_k=256, split=split),
                   C(block_n=64, block_k=64, split=split), C(block_n=64, block_k=128, split=split)]
    return [c for c in configs if K % c.block_k == 0]


def nf4_matmul_rows(sweep: bool = False) -> list[dict]:
    rows = []
    for N, K in NF4_MATMUL_SHAPES:
        torch.manual_seed(0)
        q = nf4.quantize_nf4((torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16))
        nbytes = q.packed.numel() + q.absmax_q.numel() + 4 * q.absmax2.numel()
        for M in (1, 8, 64):
            op = f"NF4 matmul y = x W^T, W {N}x{K} NF4, x {M}x{K} bf16"
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = nm.nf4_matmul_reference(x, q)

            def row(impl, fn, **extra):
                ms = _graph_ms(fn)
                gbps = nbytes / ms / 1e6
                return _row(op, impl, ms, None, gbps, **{"frac_of_4.8TBps": gbps / HBM_BOUND_GBPS}, **extra)

            def fused(config=None, impl="fused (default config)"):
                y = nm.nf4_matmul_triton(x, q, config=config)
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                cfg = config or nm.default_config(M, N, K, x.device)
                return row(impl, lambda: nm.nf4_matmul_triton(x, q, config=config), max_err_rel_to_max=err,
                           config=str(cfg))

            _case(rows, op, "dequant + mm", lambda: row("dequant + mm", lambda: nm.nf4_matmul_reference(x, q)))
            _case(rows, op, "fused (default config)", fused)
            if sweep and M in (1, 8):  # M = 64: the default only (the sweep's time budget)
                tried = []
                for cfg in _sweep_configs(M, N, K):
                    _case(tried, op, "fused sweep", lambda cfg=cfg: fused(cfg, "fused sweep"))
                timed = [r for r in tried if isinstance(r.get("ms"), float)]
                if timed:
                    rows.append({**min(timed, key=lambda r: r["ms"]), "impl": "fused (best of sweep)"})
                rows += tried
        torch.cuda.empty_cache()
    return rows


def _print_sweep_best(rows: list[dict]) -> None:
    """One line per (shape, M): the default's time, the sweep's best and its config, dequant + mm's time."""
    by_op: dict[str, dict] = {}
    for r in rows:
        if r["op"].startswith("NF4 matmul") and isinstance(r.get("ms"), float):
            by_op.setdefault(r["op"], {}).setdefault(r["impl"], r)
    for op, impls in by_op.items():
        best, default, ref = impls.get("fused (best of sweep)"), impls.get("fused (default config)"), impls.get(
            "dequant + mm")
        if best:
            print(f"SWEEP {op}: best {best['ms'] * 1e3:.1f} us {best['config']} | default "
                  f"{default['ms'] * 1e3 if default else float('nan'):.1f} us | dequant+mm "
                  f"{ref['ms'] * 1e3 if ref else float('nan'):.1f} us")


def _frac_of_copy(rows: list[dict]) -> None:
    copy_gbps = rows[0].get("gbps") if rows and rows[0]["op"].startswith("copy") else None
    for r in rows:
        if r["op"].startswith("NF4") and isinstance(r.get("gbps"), float) and copy_gbps:
            r["frac_of_copy_bw"] = r["gbps"] / copy_gbps


def run_nf4_matmul(sweep: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench/kernels_ce_nf4.py needs a CUDA GPU")
    rows: list[dict] = []
    _case(rows, "copy 1 GiB (bandwidth reference)", "torch", bandwidth_reference)
    rows += nf4_matmul_rows(sweep)
    _frac_of_copy(rows)
    return rows


def run_all() -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("bench/kernels_ce_nf4.py needs a CUDA GPU")
    rows: list[dict] = []
    _case(rows, "copy 1 GiB (bandwidth reference)", "torch", bandwidth_reference)
    for v, train_head in ((128256, True), (128256, False)):
        try:
            rows += flce_rows(v=v, train_head=train_head)
        except Exception as e:
            traceback.print_exc()
            rows.append(_row(f"fused linear CE V={v}", "all", error=f"{type(e).__name__}: {e}"))
    try:
        rows += nf4_rows()
    except Exception as e:
        traceback.print_exc()
        rows.append(_row("NF4 dequant", "all", error=f"{type(e).__name__}: {e}"))
    try:
        rows += nf4_matmul_rows()
    except Exception as e:
        traceback.print_exc()
        rows.append(_row("NF4 matmul", "all", error=f"{type(e).__name__}: {e}"))
    _frac_of_copy(rows)
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["nf4-matmul"], help="run only these rows (and the copy reference)")
    parser.add_argument("--sweep", action="store_true", help="NF4 matmul: also time every launch shape of the sweep")
    args = parser.parse_args()
    rows = run_nf4_matmul(args.sweep) if args.only == "nf4-matmul" else run_all()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    print(json.dumps(meta))
    for r in rows:
        fmt = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()}
        print(" | ".join(f"{k}={v}" for k, v in fmt.items()))
    if args.sweep:
        _print_sweep_best(rows)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels_ce_nf4.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
