"""Benchmark: fused linear cross-entropy and NF4 dequantisation on one CUDA GPU.

    python bench/kernels_ce_nf4.py            # prints a table; writes $OUT/kernels_ce_nf4.json when OUT is set

Rows: {op, impl, ms, peak_mib, gbps}. ms is the median of CUDA-event timings; peak_mib is the peak of
allocated memory above what was allocated before the call (inputs excluded, gradients included); gbps is
bytes read + written per second for memory-bound ops (None otherwise). Cross-entropy rows also carry
``mem_vs_eager`` (peak_mib / eager's peak_mib). A failing case gives a row with ms None and an ``error``.
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
    copy_gbps = rows[0].get("gbps")
    for r in rows:
        if r["op"].startswith("NF4") and isinstance(r.get("gbps"), float) and copy_gbps:
            r["frac_of_copy_bw"] = r["gbps"] / copy_gbps
    return rows


def main() -> None:
    rows = run_all()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        pass
    print(json.dumps(meta))
    for r in rows:
        fmt = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()}
        print(" | ".join(f"{k}={v}" for k, v in fmt.items()))
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels_ce_nf4.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
