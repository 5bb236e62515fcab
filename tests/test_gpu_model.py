"""GPU checks of the model core (run on the device: pytest -m gpu tests/test_gpu_model.py).

The Triton path and the flex-attention path must give what the reference path gives on the same model."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

transformers = pytest.importorskip("transformers")



def _tiny(tmp_path, family="llama", **kw):
    from conftest import tiny_cuda_model

    return tiny_cuda_model(tmp_path, family, **kw)


def _loss_and_grads(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kw)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_triton_path_matches_reference_path(tmp_path, monkeypatch, family):
    model = _tiny(tmp_path, family)
    ids = torch.randint(0, 1000, (2, 512), device="cuda")
    monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    monkeypatch.setenv("FASTTUNE_KERNELS", "auto")
    loss, grads = _loss_and_grads(model, ids)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    for n in ref_grads:
        assert _rel(grads[n], ref_grads[n]) < 3e-2, n


@pytest.mark.parametrize("window", [None, 100])
def test_flex_attention_packed_and_sliding_matches_masked_sdpa(tmp_path, monkeypatch, window):
    model = _tiny(tmp_path, "mistral", sliding_window=window)
    lengths = [300, 200, 524]
    ids = torch.randint(0, 1000, (1, sum(lengths)), device="cuda")
    pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    from fasttune.kernels import attention as attn_mod
    monkeypatch.setenv("FASTTUNE_FLASH_ATTN", "0")  # flash-attn, when installed, would take these cases before flex
    monkeypatch.setattr(attn_mod, "_torch_flash_ok", lambda q, k, v: False)  # so would torch's own flash varlen
    monkeypatch.setenv("FASTTUNE_FLEX", "0")
    ref_loss, ref_grads = _loss_and_grads(model, ids, position_ids=pos)
    monkeypatch.setenv("FASTTUNE_FLEX", "1")
    attn_mod.FALLBACKS.reset()
    loss, grads = _loss_and_grads(model, ids, position_ids=pos)
    assert attn_mod.FALLBACKS.usable("flex"), attn_mod.FALLBACKS.failed
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    for n in ref_grads:
        assert _rel(grads[n], ref_grads[n]) < 3e-2, n


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_flash_attn_packed_and_sliding_matches_masked_sdpa(monkeypatch, softcap):
    flash_attn = pytest.importorskip("flash_attn")
    from fasttune.kernels import attention as attn_mod
    from fasttune.kernels.attention import DocumentLayout, attention, build_mask, eager_attention

    calls = {"n": 0}
    real = flash_attn.flash_attn_varlen_func

    def spy(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(flash_attn, "flash_attn_varlen_func", spy)
    attn_mod.FALLBACKS.reset()
    monkeypatch.delenv("FASTTUNE_FLASH_ATTN", raising=False)
    monkeypatch.setattr(attn_mod, "_torch_flash_ok", lambda q, k, v: False)  # the flash_attn package's turn
    torch.manual_seed(0)
    B, Hq, Hk, D, window = 2, 32, 8, 128, 256
    lengths = [[700, 1, 1347], [1024, 1024]]
    T = sum(lengths[0])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).cuda()
    layout = DocumentLayout.from_position_ids(pos.cpu()).to("cuda")
    docs = layout.document_ids
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    scale = D ** -0.5
    dout = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)

    out = attention(q, k, v, scale=scale, sliding_window=window, documents=layout, softcap=softcap)
    assert calls["n"] == 1 and attn_mod.FALLBACKS.usable("flash-attn"), "flash-attn path not taken or fell back"
    grads = torch.autograd.grad(out, (q, k, v), dout)

    mask = build_mask(B, T, T, q.device, sliding_window=window, document_ids=docs)

    def masked(q, k, v):  # the reference path: masked SDPA (eager math when soft-capping)
        if softcap is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                    enable_gqa=True)
        return eager_attention(q, k, v, mask, scale, softcap)

    ref = masked(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    exact = masked(q32, k32, v32)
    exact_grads = torch.autograd.grad(exact, (q32, k32, v32), dout.float())
    # flash-attn in bf16 is at least as close to the fp32 result as masked SDPA in bf16, and close in absolute terms
    assert _rel(out.float(), exact) < 1e-2
    assert _rel(out.float(), exact) <= 2 * _rel(ref.float(), exact) + 1e-3
    for name, g, r, e in zip("qkv", grads, ref_grads, exact_grads):
        assert _rel(g.float(), e) < 3e-2, f"d{name}"
        assert _rel(g.float(), e) <= 2 * _rel(r.float(), e) + 1e-3, f"d{name}"


@pytest.mark.parametrize("window", [None, 256, 2047])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_flash_varlen_matches_float64(window, packed, dtype):
    """PyTorch's own flash kernel with cu_seqlens (the packed / sliding-window training path) against float64 math,
    forward and every gradient, at the 8B attention shape (32 query / 8 KV heads, head_dim 128), 2 x 2048 tokens with
    documents of 1 to 1347 tokens. Bound: max error / max |oracle| <= 2e-2 (bf16) / 4e-3 (fp16), the dispatch tests'
    16-bit bounds; the inputs are rounded first, so the oracle sees the same values."""
    from fasttune.kernels import attention as attn_mod
    from fasttune.kernels.attention import DocumentLayout, attention, build_mask

    if window is None and not packed:
        pytest.skip("plain causal: SDPA's own path")
    attn_mod.FALLBACKS.reset()
    calls = {"n": 0}
    real = attn_mod._torch_flash_op

    def spy(*a):
        calls["n"] += 1
        return real(*a)

    attn_mod._torch_flash_op = spy
    try:
        torch.manual_seed(0)
        B, Hq, Hk, D, T = 2, 32, 8, 128, 2048
        rows = [[700, 1, 1347], [1024, 1000, 24]] if packed else [[T], [T]]
        pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
        layout = DocumentLayout.from_position_ids(pos)
        layout = layout.to("cuda") if layout is not None else None
        q = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        v = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        scale = D ** -0.5
        out = attention(q, k, v, scale=scale, sliding_window=window, documents=layout)
        assert calls["n"] == 1 and attn_mod.FALLBACKS.usable("torch-flash-varlen"), attn_mod.FALLBACKS.failed
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    finally:
        attn_mod._torch_flash_op = real
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = build_mask(B, T, T, q.device, sliding_window=window,
                      document_ids=layout.document_ids if layout is not None else None)
    kk, vv = k64.repeat_interleave(Hq // Hk, 1), v64.repeat_interleave(Hq // Hk, 1)
    s = (q64 @ kk.transpose(-1, -2)) * scale
    want = s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    ref = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (out.double() - want).abs().max() <= tol * want.abs().max()
    for name, g, r in zip("qkv", grads, ref):
        assert (g.double() - r).abs().max() <= tol * r.abs().max(), f"d{name}"


def test_packed_training_on_gpu_sees_one_shape_and_never_falls_back(tmp_path, caplog):
    """`fasttune train` on ragged data with packing on the GPU: every step has one batch shape, the fused attention
    path is taken for every layer (nothing logged as a fallback), and no per-forward layout sync is needed."""
    import json
    import logging
    import random

    from fasttune.kernels import attention as attn_mod
    from fasttune.train import TrainConfig
    from fasttune.train.trainer import Trainer

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    data = tmp_path / "ragged.jsonl"
    data.write_text("".join(json.dumps({"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(2, 40))),
                                        "output": " ".join(rng.choice(words) for _ in range(rng.randint(2, 200)))})
                            + "\n" for _ in range(300)))
    cfg = TrainConfig.from_dict({
        "model": {"path": "tiny", "max_seq_length": 512, "device": "cuda", "dtype": "bfloat16"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "data": {"path": str(data), "packing": True,
                                                                  "eval_fraction": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 12, "lr": 1e-3,
                  "save_every": None, "plot": False, "progress": False}})
    attn_mod.FALLBACKS.reset()
    with caplog.at_level(logging.WARNING, logger="fasttune.attention"):
        trainer = Trainer(cfg)
        trainer.train()
    assert trainer._shapes == {(2, 512)}
    said = [r.getMessage() for r in caplog.records if r.name == "fasttune.attention"]
    assert not attn_mod.FALLBACKS.failed and not said, said
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_gib"] > 0 and 0 < r["tokens"] <= 2 * 512 for r in rows if "loss" in r)
