"""Parity of the one decoder's Mixture-of-Experts switch with transformers: Qwen3-MoE and Mixtral (issue 17).

Same method and error measure as tests/test_models_parity.py: a tiny random model built and saved by transformers
(which writes the per-expert layout), loaded by fasttune, compared on the same inputs: fp32 logits, loss with the
load-balancing loss, every gradient (router and 3-D expert stacks included), router logits, padded batches,
packed documents, routing ties, both checkpoint layouts, and round trips.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from fasttune.models import load_model, save_model
from fasttune.models.moe import SparseMoE, load_balancing_loss
from fasttune.models.spec import ArchSpec

from test_models_parity import FP32_TOL, SEQ, VOCAB, random_ids, rel_err

AUX_COEF = 0.25  # far above the default 0.001 so the aux loss's share of loss and gradients shows in the comparison


def tiny_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, router_aux_loss_coef=AUX_COEF)
    if family == "qwen3_moe":  # layer 1 dense (mlp_only_layers), 6 experts, top-3, renormalised
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=80, moe_intermediate_size=24, head_dim=16,
                                          num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                          mlp_only_layers=[1])
    elif family == "qwen3_moe_raw":  # top-k weights not renormalised, every second layer sparse
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=80, moe_intermediate_size=24, head_dim=16,
                                          num_experts=5, num_experts_per_tok=2, norm_topk_prob=False,
                                          decoder_sparse_step=2)
    elif family == "mixtral":  # sliding window shorter than the sequence
        cfg = transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                         sliding_window=7)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["qwen3_moe", "qwen3_moe_raw", "mixtral"]


def build_pair(tmp_path, family: str, dtype=torch.float32, **overrides):
    torch.manual_seed(1234)
    cfg = tiny_config(family, **overrides)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():  # every weight off its default (norms at 1, Qwen3's router at 0) so every one matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for n, p in hf.named_parameters():  # routers with logits spread wide enough that routing varies by token
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    hf = hf.to(dtype).eval()
    hf.save_pretrained(tmp_path)
    return hf, load_model(tmp_path, dtype=dtype)


def test_spec_reads_the_moe_switches():
    spec = ArchSpec.from_hf_config(tiny_config("qwen3_moe").to_dict())
    assert (spec.num_experts, spec.experts_per_token, spec.expert_intermediate_size) == (6, 3, 24)
    assert spec.moe_layers == [True, False, True] and spec.qk_norm == "head" and spec.norm_topk_prob
    assert spec.router_aux_loss_coef == AUX_COEF and spec.routing_weights_in_logits_dtype
    raw = ArchSpec.from_hf_config(tiny_config("qwen3_moe_raw").to_dict())
    assert raw.moe_layers == [False, True, False] and not raw.norm_topk_prob
    mixtral = ArchSpec.from_hf_config(tiny_config("mixtral").to_dict())
    assert mixtral.moe_layers == [True] * 3 and mixtral.norm_topk_prob and mixtral.expert_intermediate_size == 24
    assert mixtral.window_for_layer(0) == 7 and mixtral.qk_norm is None
    # Qwen3-30B-A3B's config.json spells the expert count num_experts
    old = {**tiny_config("qwen3_moe").to_dict(), "num_experts": 128}
    old.pop("num_local_experts", None)
    assert ArchSpec.from_hf_config(old).num_experts == 128


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_loss_aux_loss_router_logits_and_grads(tmp_path, family):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids()
    out_hf = hf(ids, labels=ids, output_router_logits=True)
    out_ours = ours(ids, labels=ids, return_logits=True, output_router_logits=True)
    assert rel_err(out_ours.logits, out_hf.logits) <= FP32_TOL
    assert len(out_ours.router_logits) == len(out_hf.router_logits) == sum(ours.spec.moe_layers)
    for mine, theirs in zip(out_ours.router_logits, out_hf.router_logits):
        assert rel_err(mine, theirs) <= FP32_TOL
    assert abs(out_ours.aux_loss.item() - out_hf.aux_loss.item()) <= FP32_TOL * out_hf.aux_loss.item()
    assert abs(out_ours.loss.item() - out_hf.loss.item()) <= FP32_TOL * out_hf.loss.item()
    # the aux loss is a visible share of the loss, so a missing one would fail the line above
    assert AUX_COEF * out_hf.aux_loss.item() > 100 * FP32_TOL * out_hf.loss.item()
    out_hf.loss.backward()
    out_ours.loss.backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    mine = {n: p.grad for n, p in ours.named_parameters()}
    assert set(mine) == set(theirs)
    for name, g in mine.items():
        assert g is not None, name
        assert rel_err(g, theirs[name]) <= FP32_TOL, name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_aux_loss_off_by_default_and_its_gradient_reaches_the_router_only(tmp_path, family):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids()
    plain = ours(ids, labels=ids)
    assert plain.router_logits is None and plain.aux_loss is None  # config output_router_logits is False
    ref = hf(ids, labels=ids)
    assert abs(plain.loss.item() - ref.loss.item()) <= FP32_TOL * ref.loss.item()
    # d(aux)/d(params) reaches every router, and what feeds a router: the last MoE layer's experts feed none
    out = ours(ids, output_router_logits=True)
    out.aux_loss.backward()
    moe = [layer.mlp for layer in ours.model.layers if isinstance(layer.mlp, SparseMoE)]
    assert all(m.gate.weight.grad.abs().sum() > 0 for m in moe)
    assert moe[-1].experts.gate_up_proj.grad is None


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_and_masked_aux_loss(tmp_path, family, side):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids(batch=3)
    mask = torch.ones_like(ids)
    for row, n in enumerate([0, 5, 11]):
        if n:
            if side == "left":
                mask[row, :n] = 0
            else:
                mask[row, -n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_router_logits=True)
        b = hf(ids, attention_mask=mask, output_router_logits=True)
    real = mask.bool()
    assert rel_err(a.logits[real], b.logits[real]) <= FP32_TOL
    assert abs(a.aux_loss.item() - b.aux_loss.item()) <= FP32_TOL * b.aux_loss.item()
    # the padding rows are excluded: the unmasked aux loss differs
    assert abs(load_balancing_loss(a.router_logits, 6 if family == "qwen3_moe" else 4,
                                   ours.spec.experts_per_token).item() - a.aux_loss.item()) > 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_packed_documents(tmp_path, family):
    _, ours = build_pair(tmp_path, family, sliding_window=None)
    a_ids, b_ids = random_ids(1, 10, seed=1), random_ids(1, 14, seed=2)
    packed = torch.cat([a_ids, b_ids], dim=1)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        lp = ours(packed, position_ids=pos).logits
        la, lb = ours(a_ids).logits, ours(b_ids).logits
    assert rel_err(lp[:, :10], la) <= FP32_TOL
    assert rel_err(lp[:, 10:], lb) <= FP32_TOL
    out = ours(packed, position_ids=pos, labels=packed)
    assert out.num_target_tokens == 9 + 13


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_routing_ties_pick_the_same_experts(tmp_path, family):
    """Experts with identical router rows tie exactly; torch.topk's choice among them must be transformers'."""
    hf, ours = build_pair(tmp_path, family)
    with torch.no_grad():
        for model in (hf, ours):
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    w = layer.mlp.gate.weight
                    w[1:] = w[0]  # every expert ties; weights by index only
                    w[2] = w[3] = w[0] * 1.5  # two tied leaders
    ids = random_ids()
    with torch.no_grad():
        mine = ours(ids, output_router_logits=True)
        theirs = hf(ids, output_router_logits=True)
    assert rel_err(mine.logits, theirs.logits) <= FP32_TOL
    layer = next(m for m in ours.modules() if isinstance(m, SparseMoE))
    hf_gate = next(l.mlp.gate for l in hf.model.layers if hasattr(l.mlp, "gate"))
    x = torch.randn(5, ours.spec.hidden_size)
    assert torch.equal(layer.route(x)[2], hf_gate(x)[2])


def _fused_layout(src, dst, spec_family: str):
    """Rewrite a per-expert checkpoint as transformers 5's module layout (3-D gate_up_proj / down_proj)."""
    state = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    E = cfg.get("num_local_experts") or cfg.get("num_experts")
    names = ({"gate": "w1", "up": "w3", "down": "w2"} if spec_family == "mixtral"
             else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    moe = "block_sparse_moe" if spec_family == "mixtral" else "mlp"
    out = {}
    for k, t in state.items():
        if ".experts." not in k:
            out[k.replace(".block_sparse_moe.", ".mlp.")] = t
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.{moe}.experts."
        if p + f"0.{names['gate']}.weight" not in state:
            continue
        stack = {r: torch.stack([state[f"{p}{e}.{names[r]}.weight"] for e in range(E)]) for r in names}
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], 1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = stack["down"]
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_both_checkpoint_layouts_load_and_save_writes_transformers_layout(tmp_path, family):
    hf, ours = build_pair(tmp_path / "src", family)
    _fused_layout(tmp_path / "src", tmp_path / "fused", family)
    fused = load_model(tmp_path / "fused")
    for (n, a), (m, b) in zip(ours.state_dict().items(), fused.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    save_model(fused, tmp_path / "out", max_shard_size=20_000)  # several shards + index
    saved = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert set(saved) == set(source)  # transformers' own per-expert names (Mixtral: block_sparse_moe, w1/w2/w3)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="sdpa").eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(hf2(ids).logits, hf(ids).logits)
        assert torch.equal(load_model(tmp_path / "out")(ids).logits, ours(ids).logits)


def test_incomplete_experts_are_refused(tmp_path):
    build_pair(tmp_path, "qwen3_moe")
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.0.mlp.experts.4.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="incomplete experts.*model.layers.0.mlp.experts"):
        load_model(tmp_path)


def test_bf16_logits_close(tmp_path):
    hf, ours = build_pair(tmp_path, "qwen3_moe", dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                           attn_implementation="sdpa").eval()
    with torch.no_grad():
        err = rel_err(ours(random_ids()).logits, hf(random_ids()).logits.float())
    assert err <= 3e-2, err


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_triton_kernels_in_the_moe_model_match_transformers(tmp_path, monkeypatch, family):
    """Through the Triton path (the interpreter on CPU), the experts run as grouped GEMMs and every gradient still
    matches transformers."""
    pytest.importorskip("triton")
    import os

    import fasttune.kernels as K

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and the Triton interpreter is off")
    hf, ours = build_pair(tmp_path, family)
    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    calls = []
    grouped = K.grouped_linear
    monkeypatch.setattr(K, "grouped_linear", lambda *a, **kw: calls.append(1) or grouped(*a, **kw))
    ids = random_ids()
    out = ours(ids, labels=ids, return_logits=True, output_router_logits=True)
    assert len(calls) == 2 * sum(ours.spec.moe_layers)  # gate_up and down, once per MoE layer
    ref = hf(ids, labels=ids, output_router_logits=True)
    assert rel_err(out.logits, ref.logits) <= FP32_TOL
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() <= FP32_TOL
    out.loss.backward()
    ref.loss.backward()
    hp = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, hp[name].grad) <= FP32_TOL, name


@pytest.mark.parametrize("policy", ["checkpoint", "offload"])
def test_checkpointed_layers_keep_the_aux_loss_gradient(tmp_path, policy):
    """Under activation checkpointing the forward runs without a graph; the router logits come back as outputs of
    the checkpointed node, so the aux loss still trains the routers: gradients equal the plain run's."""
    from fasttune.train.memory import apply_memory_policy

    _, ours = build_pair(tmp_path, "qwen3_moe")
    ours.train()
    ids = random_ids()
    out = ours(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad(set_to_none=True)
    plan = apply_memory_policy(ours, policy, seq_len=SEQ, batch_size=2)
    assert set(plan.modes) - {"none"}
    out2 = ours(ids, labels=ids, output_router_logits=True)
    assert all(t.requires_grad for t in out2.router_logits)
    assert abs(out2.loss.item() - out.loss.item()) <= 1e-6 * out.loss.item()
    out2.loss.backward()
    for n, p in ours.named_parameters():
        assert rel_err(p.grad, plain[n]) <= FP32_TOL, n
