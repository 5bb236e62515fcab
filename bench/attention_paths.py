#!/usr/bin/env python
"""Which document-masked attention path to take for packed rows: measured forward + backward, side by side.

Packed rows of `--seq` tokens holding documents of log-normal length (median ~260 tokens, as bench/train_e2e.py's
data), bf16, the 8B shape (32 query heads, 8 KV heads, head_dim 128) and the 1B shape (head_dim 64). Paths:
    sdpa-causal   plain causal SDPA over the whole row, ignoring documents: the floor (wrong math, for scale)
    varlen        torch.nn.attention.varlen.varlen_attn (PyTorch's flash kernel with cu_seqlens)
    flex          compiled flex_attention, block mask built per batch on the GPU (mask creation timed too)
    sdpa-mask     SDPA with a dense boolean (B, 1, T, T) mask
    flash-attn    flash_attn_varlen_func, when the flash_attn package imports
Each is checked against float64 math on the same inputs before it is timed; also with a sliding window (Phi-3's
2047 at seq 2048) where the path supports one.

    python bench/attention_paths.py --out $OUT/attention_paths.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def doc_lengths(total: int, rng: random.Random) -> list[int]:
    out, used = [], 0
    while used < total:
        n = max(8, min(total - used, int(math.exp(rng.gauss(math.log(260), 0.9)))))
        out.append(n)
        used += n
    return out


def layout(B: int, T: int, seed: int, device):
    rng = random.Random(seed)
    docs = torch.empty(B, T, dtype=torch.int32)
    cu, longest, d = [0], 0, 0
    for b in range(B):
        start = 0
        for n in doc_lengths(T, rng):
            docs[b, start:start + n] = d
            d += 1
            start += n
            cu.append(b * T + start)
            longest = max(longest, n)
    return docs.to(device), torch.tensor(cu, dtype=torch.int32, device=device), longest


def reference(q, k, v, docs, scale, window):
    B, H, T, D = q.shape
    g = H // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    i = torch.arange(T, device=q.device)
    allowed = (i[None, :] <= i[:, None])
    if window:
        allowed &= i[None, :] > i[:, None] - window
    allowed = allowed[None, None] & (docs[:, None, :, None] == docs[:, None, None, :])
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ v)


def make_paths(window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch.nn.functional as F
    compiled = torch.compile(flex_attention, dynamic=False)
    paths = {}

    def sdpa_causal(q, k, v, docs, cu, longest, scale):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    paths["sdpa-causal"] = sdpa_causal

    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
        print("varlen_attn parameters:", list(params))

        def varlen_with(repeat):
            def varlen(q, k, v, docs, cu, longest, scale):
                B, H, T, D = q.shape
                if repeat:
                    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1)
                kw = {}
                if "window_size" in params:
                    kw["window_size"] = (window - 1, 0) if window else (-1, 0)
                elif window:
                    raise RuntimeError("no window_size")
                else:
                    kw["is_causal"] = True
                if "enable_gqa" in params and not repeat:
                    kw["enable_gqa"] = True
                o = varlen_attn(q.transpose(1, 2).reshape(B * T, H, D), k.transpose(1, 2).reshape(B * T, -1, D),
                                v.transpose(1, 2).reshape(B * T, -1, D), cu, cu, longest, longest, scale=scale, **kw)
                return o.reshape(B, T, H, D).transpose(1, 2)
            return varlen
        paths["varlen"] = varlen_with(False)
        paths["varlen-repeat-kv"] = varlen_with(True)
    except Exception as e:
        print("varlen unavailable:", repr(e))

    def aten_flash(q, k, v, docs, cu, longest, scale):
        B, H, T, D = q.shape
        o = torch.ops.aten._flash_attention_forward(
            q.transpose(1, 2).reshape(B * T, H, D), k.transpose(1, 2).reshape(B * T, -1, D),
            v.transpose(1, 2).reshape(B * T, -1, D), cu, cu, longest, longest, 0.0, True, False, scale=scale,
            window_size_left=(window - 1) if window else None, window_size_right=0 if window else None)[0]
        return o.reshape(B, T, H, D).transpose(1, 2)
    paths["aten-flash-fwd-only"] = aten_flash

    def flex_mask_only(q, k, v, docs, cu, longest, scale):
        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (docs[b, qi] == docs[b, ki])
        create_block_mask(mask_mod, q.shape[0], None, q.shape[2], q.shape[2], device=q.device)
        return q * 1
    paths["flex-mask-creation-only"] = flex_mask_only

    def flex(q, k, v, docs, cu, longest, scale):
        def mask_mod(b, h, qi, ki):
            ok = (ki <= qi) & (docs[b, qi] == docs[b, ki])
            if window:
                ok = ok & (ki > qi - window)
            return ok
        bm = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], q.shape[2], device=q.device, _compile=True)
        return compiled(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)
    paths["flex"] = flex

    def sdpa_mask(q, k, v, docs, cu, longest, scale):
        T = q.shape[2]
        i = torch.arange(T, device=q.device)
        allowed = (i[None, :] <= i[:, None])
        if window:
            allowed &= i[None, :] > i[:, None] - window
        m = allowed[None, None] & (docs[:, None, :, None] == docs[:, None, None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)
    paths["sdpa-mask"] = sdpa_mask
    try:
        import flash_attn

        def fa(q, k, v, docs, cu, longest, scale):
            B, H, T, D = q.shape
            o = flash_attn.flash_attn_varlen_func(
                q.transpose(1, 2).reshape(B * T, H, D), k.transpose(1, 2).reshape(B * T, -1, D),
                v.transpose(1, 2).reshape(B * T, -1, D), cu, cu, longest, longest, softmax_scale=scale,
                causal=True, **({"window_size": (window - 1, 0)} if window else {}))
            return o.reshape(B, T, H, D).transpose(1, 2)
        paths["flash-attn"] = fa
    except Exception:
        pass
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only-8b", action="store_true")
    args = ap.parse_args()
    from triton.testing import do_bench
    dev = torch.device("cuda")
    print("torch", torch.__version__, torch.cuda.get_device_name())
    results = []
    for shape, (B, H, Hk, D) in {"8b": (2, 32, 8, 128), "1b": (4, 32, 8, 64)}.items():
        if shape == "1b" and args.only_8b:
            continue
        for window in (None, args.seq - 1):
            paths = make_paths(window)
            T = args.seq
            scale = D ** -0.5
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            k = torch.randn(B, Hk, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(B, Hk, T, D, device=dev, dtype=torch.bfloat16, generator=g)
            layouts = [layout(B, T, s, dev) for s in range(8)]
            ref = reference(q, k, v, layouts[0][0], scale, window)
            for name, fn in paths.items():
                row = {"shape": shape, "window": window, "path": name}
                try:
                    out = fn(q, k, v, *layouts[0], scale)
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    row["rel_err"] = err
                    qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
                    go = torch.randn_like(q)
                    state = {"i": 0}

                    def step():
                        lay = layouts[state["i"] % len(layouts)]  # a new document layout every call
                        state["i"] += 1
                        o = fn(qq, kk, vv, *lay, scale)
                        o.backward(go)
                    for _ in range(3):
                        step()
                    row["ms_fwd_bwd"] = do_bench(step, warmup=50, rep=300, return_mode="median")
                except Exception as e:
                    row["error"] = repr(e)[:300]
                    traceback.print_exc()
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| shape | window | path | rel err vs fp64 | ms fwd+bwd |\n|---|---|---|---:|---:|")
    for r in results:
        print(f"| {r['shape']} | {r['window']} | {r['path']} | {r.get('rel_err', float('nan')):.2e} | "
              f"{r.get('ms_fwd_bwd', float('nan')):.3f} | {r.get('error', '')}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
