"""GPU checks of the model core (run on the device: pytest -m gpu tests/test_gpu_model.py).

The Triton path and the flex-attention path must give what the reference path gives on the same model."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

transformers = pytest.importorskip("transformers")

from fasttune.models import load_model  # noqa: E402


def _tiny(tmp_path, family="llama", **kw):
    torch.manual_seed(0)
    common = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    common.update(kw)
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "gemma2": transformers.Gemma2Config}[family](**common)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(tmp_path)
    return load_model(tmp_path, dtype="bfloat16", device="cuda")


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
    monkeypatch.setenv("FASTTUNE_FLASH_ATTN", "0")  # flash-attn, when installed, would take these cases before flex
    monkeypatch.setenv("FASTTUNE_FLEX", "0")
    ref_loss, ref_grads = _loss_and_grads(model, ids, position_ids=pos)
    monkeypatch.setenv("FASTTUNE_FLEX", "1")
    loss, grads = _loss_and_grads(model, ids, position_ids=pos)
    from fasttune.kernels import attention as attn_mod
    assert not attn_mod._FLEX_FAILED, "flex_attention path failed and fell back"
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    for n in ref_grads:
        assert _rel(grads[n], ref_grads[n]) < 3e-2, n


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_flash_attn_packed_and_sliding_matches_masked_sdpa(monkeypatch, softcap):
    flash_attn = pytest.importorskip("flash_attn")
    from fasttune.kernels import attention as attn_mod
    from fasttune.kernels.attention import attention, build_mask, documents_from_positions, eager_attention

    calls = {"n": 0}
    real = flash_attn.flash_attn_varlen_func

    def spy(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(flash_attn, "flash_attn_varlen_func", spy)
    monkeypatch.setattr(attn_mod, "_FLASH_FAILED", False)
    monkeypatch.delenv("FASTTUNE_FLASH_ATTN", raising=False)
    torch.manual_seed(0)
    B, Hq, Hk, D, window = 2, 32, 8, 128, 256
    lengths = [[700, 1, 1347], [1024, 1024]]
    T = sum(lengths[0])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).cuda()
    docs = documents_from_positions(pos)
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    scale = D ** -0.5
    dout = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)

    out = attention(q, k, v, scale=scale, sliding_window=window, document_ids=docs, softcap=softcap)
    assert calls["n"] == 1 and not attn_mod._FLASH_FAILED, "flash-attn path not taken or fell back"
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
