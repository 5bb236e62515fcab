"""Kernel benchmark (issue 3): every op against PyTorch eager and Liger-Kernel, on one GPU, in one process.

    PYTHONPATH=src python bench/kernels_ops.py --out $OUT/kernels.json

Prints a markdown table (ms = median forward+backward, peak MiB, achieved GB/s and % of the copy bandwidth
measured here first)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written over the median time."""
    import triton.testing

    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = "not installed"
    peak = copy_bandwidth_gbps()
    env["copy_gbps"] = round(peak, 1)
    rows = []
    for name in ("kernels_elementwise", "kernels_ce_nf4"):
        try:
            rows += _load(name).run_all()
        except Exception as e:  # one broken module must not hide the other's numbers
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"\n{env}\n")
    print("| op | impl | ms (fwd+bwd) | peak MiB | GB/s | % of copy BW |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        gbps = r.get("gbps")
        pct = f"{100 * gbps / peak:.0f}%" if isinstance(gbps, (int, float)) else ""
        ms = r.get("ms")
        ms_s = f"{ms:.3f}" if isinstance(ms, (int, float)) else str(ms)
        pk = r.get("peak_mib")
        pk_s = f"{pk:.0f}" if isinstance(pk, (int, float)) else str(pk)
        g_s = f"{gbps:.0f}" if isinstance(gbps, (int, float)) else ""
        print(f"| {r.get('op')} | {r.get('impl')} | {ms_s} | {pk_s} | {g_s} | {pct} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
