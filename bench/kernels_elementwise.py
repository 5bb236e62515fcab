"""GPU benchmark of the memory-bound kernels (RMSNorm, LayerNorm, RoPE, GLU): fasttune vs PyTorch eager vs Liger-Kernel.

    PYTHONPATH=src python bench/kernels_elementwise.py [--out results.json]      (also called by bench/kernels_ops.py)

Per op and implementation, in bf16 at Llama-3-8B sizes (32768 tokens):
  ms       median forward+backward time (triton.testing.do_bench, L2 flushed between runs)
  peak_mib peak CUDA memory allocated during one forward+backward, above what was allocated before it (inputs)
  gbps     ideal bytes / time: every input read once and every output written once, forward plus backward,
           the same byte count for every implementation (so it ranks them like time does)
  max_diff max |output - eager output| of the forward, a sanity check that each implementation computes the op
Every case runs in its own try/except: a failure is reported in the row and the others still run.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

import torch

N_TOKENS = 32768
HIDDEN = 4096
INTERMEDIATE = 14336
ROPE_B, ROPE_T, ROPE_HQ, ROPE_HK, ROPE_D = 4, 8192, 32, 8, 128
DTYPE = torch.bfloat16
DEVICE = "cuda"


def _fasttune(name: str):
    return importlib.import_module(f"fasttune.kernels.{name}")


_LIGER_ERRORS: list[str] = []


def _liger(path: str, attr: str):
    """An attribute of a Liger-Kernel module, or None when Liger (or that name) is not importable."""
    try:
        return getattr(importlib.import_module(path), attr)
    except Exception as e:  # noqa: BLE001
        _LIGER_ERRORS.append(f"{path}.{attr}: {type(e).__name__}: {e}")
        return None


def _measure(op: str, impl: str, fn, inputs, grad_outputs, bytes_moved: int, reference_out=None) -> dict:
    """Time fwd+bwd of ``fn(*inputs)`` (a tensor or a tuple of tensors) and record its peak memory."""
    import triton.testing

    row = {"op": op, "impl": impl, "ms": "n/a", "peak_mib": "n/a", "gbps": "n/a"}
    needs_grad = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.grad(outs, needs_grad, grad_outputs)
        return out

    try:
        out = step()  # compile / warm up
        if reference_out is not None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            refs = reference_out if isinstance(reference_out, (tuple, list)) else (reference_out,)
            row["max_diff"] = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, refs))
        del out
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_mib"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        row["ms"] = round(ms, 4)
        row["gbps"] = round(bytes_moved / (ms * 1e-3) / 1e9, 1)
    except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the table
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    return row


def _missing(op: str, impl: str, why: str | None = None) -> dict:
    why = why or ("liger-kernel not importable: " + (_LIGER_ERRORS[-1] if _LIGER_ERRORS else "?"))
    return {"op": op, "impl": impl, "ms": "n/a", "peak_mib": "n/a", "gbps": "n/a", "note": why}


def bench_rms_norm(rows: int = N_TOKENS, hidden: int = HIDDEN, op: str = "rms_norm (llama)") -> list[dict]:
    rms = _fasttune("rms_norm")
    x = torch.randn(rows, hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (torch.rand(hidden, device=DEVICE) + 0.5).to(DTYPE).requires_grad_()
    dy = torch.randn_like(x)
    e = x.element_size()
    nbytes = 5 * x.numel() * e + 3 * hidden * e + 2 * rows * 4  # x,y,dy,x,dx + w,w,dw + rstd written/read
    with torch.no_grad():
        ref = rms.rms_norm_reference(x, w, 1e-6)
    rows = [
        _measure(op, "fasttune", lambda a, b: rms.rms_norm(a, b, 1e-6), (x, w), dy, nbytes, ref),
        _measure(op, "torch eager", lambda a, b: rms.rms_norm_reference(a, b, 1e-6), (x, w), dy, nbytes, ref),
    ]
    LigerRMSNorm = _liger("liger_kernel.transformers.rms_norm", "LigerRMSNorm") or _liger(
        "liger_kernel.transformers", "LigerRMSNorm")
    if LigerRMSNorm is None:
        rows.append(_missing(op, "liger"))
    else:
        try:
            mod = LigerRMSNorm(hidden, eps=1e-6).to(device=DEVICE, dtype=DTYPE)
            with torch.no_grad():
                mod.weight.copy_(w)
            rows.append(_measure(op, "liger", lambda a, b: mod(a), (x, mod.weight), dy, nbytes, ref))
        except Exception as e:  # noqa: BLE001
            rows.append(_missing(op, "liger", f"{type(e).__name__}: {e}"))
    return rows


def bench_layer_norm() -> list[dict]:
    ln = _fasttune("layer_norm")
    x = torch.randn(N_TOKENS, HIDDEN, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE, requires_grad=True)
    b = torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    e = x.element_size()
    nbytes = 5 * x.numel() * e + 6 * HIDDEN * e + 4 * N_TOKENS * 4
    op = "layer_norm (bias)"
    with torch.no_grad():
        ref = ln.layer_norm_reference(x, w, b, 1e-5)
    rows = [
        _measure(op, "fasttune", lambda a, c, d: ln.layer_norm(a, c, d, 1e-5), (x, w, b), dy, nbytes, ref),
        _measure(op, "torch eager", lambda a, c, d: ln.layer_norm_reference(a, c, d, 1e-5), (x, w, b), dy, nbytes,
                 ref),
    ]
    LigerLayerNorm = _liger("liger_kernel.transformers.layer_norm", "LigerLayerNorm") or _liger(
        "liger_kernel.transformers", "LigerLayerNorm")
    if LigerLayerNorm is None:
        rows.append(_missing(op, "liger"))
    else:
        try:
            mod = LigerLayerNorm(HIDDEN, eps=1e-5, bias=True).to(device=DEVICE, dtype=DTYPE)
            with torch.no_grad():
                mod.weight.copy_(w)
                mod.bias.copy_(b)
            rows.append(_measure(op, "liger", lambda a, c, d: mod(a), (x, mod.weight, mod.bias), dy, nbytes, ref))
        except Exception as e:  # noqa: BLE001
            rows.append(_missing(op, "liger", f"{type(e).__name__}: {e}"))
    return rows


def bench_rope() -> list[dict]:
    rope = _fasttune("rope")
    B, T, Hq, Hk, D = ROPE_B, ROPE_T, ROPE_HQ, ROPE_HK, ROPE_D
    q = torch.randn(B, T, Hq, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(B, T, Hk, D, device=DEVICE, dtype=DTYPE, requires_grad=True)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEVICE).float() / D)
    freqs = torch.arange(T, device=DEVICE).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)[None]  # (1, T, D): one table broadcast over the batch
    cos, sin = emb.cos(), emb.sin()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    e = q.element_size()
    nbytes = 4 * (q.numel() + k.numel()) * e + 4 * cos.numel() * 4  # q,k read+written fwd and bwd; cos,sin twice
    op = f"rope (B={B},T={T},{Hq}/{Hk} heads,D={D})"
    with torch.no_grad():
        ref = rope.apply_rope_reference(q, k, cos, sin)
    rows = [
        _measure(op, "fasttune", lambda a, b: rope.apply_rope(a, b, cos, sin), (q, k), (dq, dk), nbytes, ref),
        _measure(op, "torch eager", lambda a, b: rope.apply_rope_reference(a, b, cos, sin), (q, k), (dq, dk),
                 nbytes, ref),
    ]
    liger_rope = _liger("liger_kernel.transformers.rope", "liger_rotary_pos_emb") or _liger(
        "liger_kernel.transformers", "liger_rotary_pos_emb")
    if liger_rope is None:
        rows.append(_missing(op, "liger"))
    else:
        # Liger takes (B, H, T, D) and rotates in place. Give it transposed views of (B, T, H, D) leaves it may
        # overwrite (it transposes back internally, so no copy), and compare layouts after transposing back.
        ql = q.detach().clone().requires_grad_()
        kl = k.detach().clone().requires_grad_()

        def liger_fn(a, b):
            qo, ko = liger_rope(a.transpose(1, 2), b.transpose(1, 2), cos, sin)
            return qo.transpose(1, 2), ko.transpose(1, 2)

        # its in-place forward rotates ql/kl on every call, so check correctness on fresh copies once
        try:
            with torch.no_grad():
                chk = liger_fn(q.detach().clone(), k.detach().clone())
            diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(chk, ref))
        except Exception as e:  # noqa: BLE001
            diff = f"{type(e).__name__}: {e}"
        row = _measure(op, "liger", liger_fn, (ql, kl), (dq, dk), nbytes)
        row["max_diff"] = diff
        rows.append(row)
    return rows


def bench_glu(activation: str) -> list[dict]:
    glu = _fasttune("glu")
    gate = torch.randn(N_TOKENS, INTERMEDIATE, device=DEVICE, dtype=DTYPE, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    dy = torch.randn_like(gate)
    nbytes = 8 * gate.numel() * gate.element_size()  # fwd: g,u,y; bwd: dy,g,u,dg,du
    op = f"glu {activation} ({N_TOKENS}x{INTERMEDIATE})"
    with torch.no_grad():
        ref = glu.glu_reference(gate, up, activation)
    rows = [
        _measure(op, "fasttune", lambda a, b: glu.glu(a, b, activation), (gate, up), dy, nbytes, ref),
        _measure(op, "torch eager", lambda a, b: glu.glu_reference(a, b, activation), (gate, up), dy, nbytes, ref),
    ]
    del ref
    if activation == "silu":
        fn = _liger("liger_kernel.ops.swiglu", "LigerSiLUMulFunction") or _liger(
            "liger_kernel.ops", "LigerSiLUMulFunction")
    elif activation == "gelu_tanh":  # Liger's GeGLU is the tanh approximation only
        fn = _liger("liger_kernel.ops.geglu", "LigerGELUMulFunction") or _liger(
            "liger_kernel.ops", "LigerGELUMulFunction")
    else:
        rows.append(_missing(op, "liger", "Liger has no exact-erf GeGLU"))
        return rows
    if fn is None:
        rows.append(_missing(op, "liger"))
    else:
        # Liger's backward writes the gradients into the saved gate/up buffers: give it its own copies.
        gl = gate.detach().clone().requires_grad_()
        ul = up.detach().clone().requires_grad_()
        with torch.no_grad():
            ref = glu.glu_reference(gl, ul, activation)
        rows.append(_measure(op, "liger", lambda a, b: fn.apply(a, b), (gl, ul), dy, nbytes, ref))
    return rows


def run_all() -> list[dict]:
    if not torch.cuda.is_available():
        print("kernels_elementwise: no CUDA device, nothing to measure", file=sys.stderr)
        return []
    rows: list[dict] = []
    # many short rows: Qwen3's q_norm over 2048 tokens x 32 heads of 128 (the MoE training step's case, issue 17)
    qk_norm = lambda: bench_rms_norm(65536, 128, "rms_norm (qwen3 q_norm, 65536 x 128)")  # noqa: E731
    cases = [bench_rms_norm, qk_norm, bench_layer_norm, bench_rope] + [
        (lambda a=a: bench_glu(a)) for a in ("silu", "gelu_tanh", "gelu")
    ]
    for case in cases:
        try:
            rows += case()
        except Exception as e:  # noqa: BLE001 - keep going: the other ops still get measured
            traceback.print_exc(file=sys.stderr)
            rows.append({"op": getattr(case, "__name__", "glu"), "impl": "all", "ms": "n/a", "peak_mib": "n/a",
                         "gbps": "n/a", "error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache()
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here (default: $OUT/kernels_elementwise.json)")
    args = ap.parse_args()
    result = run_all()
    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}\n")
    print("| op | impl | ms (fwd+bwd) | peak MiB | GB/s | max diff vs eager | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in result:
        note = r.get("error") or r.get("note") or ""
        print(f"| {r['op']} | {r['impl']} | {_fmt(r['ms'])} | {_fmt(r['peak_mib'])} | {_fmt(r['gbps'])} | "
              f"{_fmt(r.get('max_diff', ''))} | {note} |")
    out = args.out or (os.path.join(os.environ["OUT"], "kernels_elementwise.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
