"""LoRA / QLoRA on a tiny Llama: PEFT parity (init, 50 training steps), options, adapters off, NF4 base, load path."""
import math

import pytest
import torch
import torch.nn.functional as F

import fasttune
from fasttune.adapters import LoraLinear, add_lora, disable_adapters, lora_parameters, param_groups
from fasttune.adapters.attach import FusedMLP, FusedQKV
from fasttune.models.nf4_linear import NF4Linear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one thread is many times faster than several threads contending on a shared CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random tiny Llama saved as a Hugging Face folder (with the repo's tiny tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # larger than the default 0.02 so attention and the MLP are far from linear
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    from importlib.resources import files

    from fasttune.models.checkpoint import copy_tokenizer_files as copy_tok
    copy_tok(str(files("fasttune") / "assets" / "tiny"), path)
    return path


def _hf_peft(path, r, alpha, seed, targets=ALL, dtype=torch.float32, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    torch.manual_seed(seed)
    return get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **kw))


def _ours(path, dtype="float32", **kw):
    model = fasttune.load_model(path, dtype=dtype)
    return add_lora(model, **kw)


def _peft_lora(pm, kind):
    return {n.replace("base_model.model.", "").replace(f".{kind}.default.weight", f".{kind}"): p
            for n, p in pm.named_parameters() if f"{kind}.default" in n}


def _ours_lora(model, kind):
    return {n: p for n, p in model.named_parameters() if n.endswith(kind)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_seed_gives_peft_initialisation(tiny_llama, dtype):
    pm = _hf_peft(tiny_llama, 4, 8, seed=5, dtype=getattr(torch, dtype))
    ours = _ours(tiny_llama, r=4, alpha=8, seed=5, dtype=dtype)
    for kind in ("lora_A", "lora_B"):
        theirs, mine = _peft_lora(pm, kind), _ours_lora(ours, kind)
        assert list(theirs) == list(mine) and len(mine) == 14
        for n in mine:
            assert mine[n].dtype == torch.float32  # float32 masters, as PEFT (autocast_adapter_dtype)
            assert torch.equal(theirs[n], mine[n]), n
    other = _ours(tiny_llama, r=4, alpha=8, seed=6)
    assert not torch.equal(other.model.layers[0].self_attn.q_proj.lora_A, ours.model.layers[0].self_attn.q_proj.lora_A)


def _batch(step, vocab=128, shape=(2, 17)):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, shape, generator=g)


def test_fifty_steps_match_transformers_peft(tiny_llama):
    """The issue's correctness test: same seed, data and adapter init; per-step loss and LoRA gradients (first
    step with B != 0) per tensor. fp32 on CPU, so the bounds are far tighter than the issue's GPU ones (1e-3 loss,
    cosine 0.999): measured worst 4.7e-7 relative loss and cosine 1 - 1.8e-7; a real bug would be far larger."""
    pm = _hf_peft(tiny_llama, 8, 16, seed=0)
    ours = _ours(tiny_llama, r=8, alpha=16, seed=0)
    assert all(isinstance(layer.self_attn.fused_qkv, FusedQKV) for layer in ours.model.layers)
    pm.train()
    ours.train()
    theirs_params = list(_peft_lora(pm, "lora_A").values()) + list(_peft_lora(pm, "lora_B").values())
    mine_params = list(_ours_lora(ours, "lora_A").values()) + list(_ours_lora(ours, "lora_B").values())
    names = list(_ours_lora(ours, "lora_A")) + list(_ours_lora(ours, "lora_B"))
    opt_t = torch.optim.AdamW(theirs_params, lr=5e-3, weight_decay=0.01)
    opt_m = torch.optim.AdamW(param_groups(ours, lr=5e-3, weight_decay=0.01))
    assert sum(p.numel() for g in opt_m.param_groups for p in g["params"]) == sum(p.numel() for p in mine_params)
    losses = []
    for step in range(50):
        ids = _batch(step % 2)  # two fixed batches, so the loss goes down
        lt = pm(input_ids=ids, labels=ids).loss
        lm = ours(ids, labels=ids).loss
        lt.backward()
        lm.backward()
        losses.append((lt.item(), lm.item()))
        assert abs(lm.item() - lt.item()) <= 1e-5 * abs(lt.item()), (step, lt.item(), lm.item())
        if step == 1:  # B != 0 after one update: every LoRA gradient is non-trivial
            for n, pt, pm_ in zip(names, theirs_params, mine_params):
                cos = F.cosine_similarity(pt.grad.flatten(), pm_.grad.flatten(), 0).item()
                assert cos >= 1 - 1e-5, (n, cos)
                assert pm_.grad.abs().sum() > 0, n
        opt_t.step()
        opt_m.step()
        opt_t.zero_grad()
        opt_m.zero_grad()
    assert losses[-1][1] < losses[0][1] - 0.05, losses  # the run actually trained


def test_options_rslora_subset_dropout(tiny_llama):
    m = _ours(tiny_llama, r=4, alpha=8, use_rslora=True, target_modules=["q", "v_proj", "down"])
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert isinstance(attn.q_proj, LoraLinear) and isinstance(attn.v_proj, LoraLinear)
    assert isinstance(attn.k_proj, torch.nn.Linear) and isinstance(mlp.up_proj, torch.nn.Linear)
    assert attn.q_proj.scaling == pytest.approx(8 / math.sqrt(4))
    assert attn.fused_qkv is None and mlp.fused_forward is None  # not all of q, k, v / gate, up, down
    assert m.lora_config.target_modules == ("q_proj", "v_proj", "down_proj")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.{s}.{w}" for i in range(2)
        for s in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for w in ("lora_A", "lora_B")}
    m2 = _ours(tiny_llama, r=4, alpha=8)
    assert m2.model.layers[0].self_attn.q_proj.scaling == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        _ours(tiny_llama, target_modules=["qkv"])
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(m2)

    # dropout > 0: unfused path; dropout acts in training only, and a subset of PEFT's equations holds in eval
    d = _ours(tiny_llama, r=4, alpha=8, dropout=0.5)
    assert d.model.layers[0].self_attn.fused_qkv is None and d.model.layers[0].mlp.fused_forward is None
    for p in lora_parameters(d):
        if p.shape[1] == 4:  # make B non-zero so the adapter (and its dropout) shows in the output
            torch.nn.init.normal_(p, std=0.5)
    ids = _batch(0)
    d.eval()
    assert torch.equal(d(ids).logits, d(ids).logits)
    d.train()
    torch.manual_seed(0)
    a = d(ids).logits
    torch.manual_seed(1)
    b = d(ids).logits
    assert not torch.allclose(a, b)


def test_fused_hooks_match_unfused_path(tiny_llama):
    m = _ours(tiny_llama, r=4, alpha=8, seed=1)
    for p in lora_parameters(m):
        torch.nn.init.normal_(p, std=0.2)
    ids = _batch(3)
    fused = m(ids, labels=ids).loss
    g_fused = torch.autograd.grad(fused, lora_parameters(m))
    hooks = [(layer.self_attn.fused_qkv, layer.mlp.fused_forward) for layer in m.model.layers]
    for layer in m.model.layers:
        layer.self_attn.fused_qkv, layer.mlp.fused_forward = None, None
    plain = m(ids, labels=ids).loss
    g_plain = torch.autograd.grad(plain, lora_parameters(m))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for layer, (q, f) in zip(m.model.layers, hooks):  # the recompute mode of the MLP gives the same grads
        layer.self_attn.fused_qkv = q
        layer.mlp.fused_forward = FusedMLP(layer.mlp, save_gate_up=False)
    g_recompute = torch.autograd.grad(m(ids, labels=ids).loss, lora_parameters(m))
    for a, b in zip(g_fused, g_recompute):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_disable_adapters_gives_base_model(tiny_llama):
    base = fasttune.load_model(tiny_llama, dtype="float32")
    m = _ours(tiny_llama, r=4, alpha=8)
    for p in lora_parameters(m):
        torch.nn.init.normal_(p, std=0.3)
    ids = _batch(1)
    with torch.no_grad():
        ref = base(ids).logits
        adapted = m(ids).logits
        with disable_adapters(m):
            off = m(ids).logits
        again = m(ids).logits
    torch.testing.assert_close(off, ref, rtol=0, atol=1e-5)
    assert (adapted - ref).abs().max() > 1e-2
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    layer = m.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.merged_weight(), layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A)
    assert layer.delta_weight().dtype == torch.float32


def test_trainable_embeddings_and_lm_head_param_groups(tiny_llama):
    m = _ours(tiny_llama, r=4, alpha=8, train_embeddings=True, train_lm_head=True)
    groups = param_groups(m, lr=1e-3)  # embedding_lr_ratio: EMBEDDING_LR_RATIO, 0.1
    assert [g["name"] for g in groups] == ["lora", "embeddings"]
    assert groups[1]["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in groups[1]["params"]} == {id(m.model.embed_tokens.weight), id(m.lm_head.weight)}
    ids = _batch(2)
    m(ids, labels=ids).loss.backward()
    assert m.model.embed_tokens.weight.grad is not None and m.lm_head.weight.grad is not None
    assert m.model.norm.weight.grad is None


def test_qlora_forward_close_to_dequantised_model(tiny_llama):
    from fasttune.models.nf4_linear import quantize_linear

    q = fasttune.load_model(tiny_llama, dtype="bfloat16", quantize=quantize_linear)
    assert isinstance(q.model.layers[0].mlp.up_proj, NF4Linear)
    deq = fasttune.load_model(tiny_llama, dtype="bfloat16")
    with torch.no_grad():  # the dense model holding exactly the dequantised weights
        for (name, mod) in q.named_modules():
            if isinstance(mod, NF4Linear):
                deq.get_submodule(name).weight.copy_(mod.dequantize())
    add_lora(q, r=4, alpha=8, seed=0)
    add_lora(deq, r=4, alpha=8, seed=0)
    for a, b in zip(lora_parameters(q), lora_parameters(deq)):
        with torch.no_grad():
            a.normal_(0, 0.1)
            b.copy_(a)
    ids = _batch(4)
    lq, ld = q(ids, labels=ids).loss, deq(ids, labels=ids).loss
    torch.testing.assert_close(lq.float(), ld.float(), rtol=1e-2, atol=0)
    gq = torch.autograd.grad(lq, lora_parameters(q))
    gd = torch.autograd.grad(ld, lora_parameters(deq))
    for a, b in zip(gq, gd):
        assert a.dtype == torch.float32
        assert F.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.99
    # and the 4-bit model is close to the original 16-bit one (NF4 error is a few percent per weight)
    orig = fasttune.load_model(tiny_llama, dtype="bfloat16")
    with torch.no_grad(), disable_adapters(q):
        lo, lq0 = orig(ids, labels=ids).loss.float(), q(ids, labels=ids).loss.float()
    assert abs(lo - lq0) / lo < 0.05


def test_load_in_4bit_then_plain_loop_reduces_loss(tiny_llama):
    model, tokenizer = fasttune.load(tiny_llama, load_in_4bit=True, device="cpu")
    assert isinstance(model.model.layers[1].self_attn.o_proj, NF4Linear)
    model = fasttune.add_lora(model, r=8, alpha=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _batch(7, shape=(2, 24))
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    # NF4 buffers survive a dtype cast of the whole model (scales are stored bit-cast, not as floats)
    layer = model.model.layers[0].mlp.gate_proj.base
    before = layer.dequantize()
    model.to(torch.float32)
    assert torch.equal(layer.dequantize(), before)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_base_weights_train_close_to_float32(tiny_llama, dtype):
    """LoRA over an fp16 (or bf16) base: float32 adapter masters, 16-bit compute. The loss and every adapter
    gradient stay within 16-bit rounding of the same model in float32 (measured: fp16 2.2e-6 relative loss and
    1 - cosine 6.3e-6; bf16 7.5e-4 and 6.8e-4)."""
    tol = {"float16": 2e-4, "bfloat16": 5e-3}[dtype]
    torch.manual_seed(0)
    half = _ours(tiny_llama, dtype=dtype, r=4, alpha=8, seed=3)
    full = _ours(tiny_llama, dtype="float32", r=4, alpha=8, seed=3)
    with torch.no_grad():  # B != 0 so that dA is not zero; the same values in both
        for (n, p), (_, q) in zip(half.named_parameters(), full.named_parameters()):
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
                q.copy_(p)
    ids = _batch(0)
    loss_half, loss_full = half(ids, labels=ids).loss, full(ids, labels=ids).loss
    assert half.model.layers[0].self_attn.q_proj.base.weight.dtype == getattr(torch, dtype)
    assert abs(loss_half.item() - loss_full.item()) <= tol * loss_full.item()
    loss_half.backward()
    loss_full.backward()
    for (n, p), (_, q) in zip(half.named_parameters(), full.named_parameters()):
        if "lora_" in n:
            assert p.grad.dtype == torch.float32
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), 0).item()
            assert cos >= 1 - tol, (n, cos)
