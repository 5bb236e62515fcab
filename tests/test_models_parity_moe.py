"""Parity of the one decoder's Mixture-of-Experts switch with transformers: Qwen3-MoE, Mixtral, gpt-oss (issue 17).

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

from conftest import padded_batch, assert_greedy_generation_matches
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
    elif family == "gpt_oss":  # sliding / full / sliding, YaRN (its defaults), sinks; a SwiGLU limit low enough to
        # clamp some of the gate and up values of these small weights
        cfg = transformers.GptOssConfig(**common, intermediate_size=24, head_dim=16, num_local_experts=5,
                                        num_experts_per_tok=2, sliding_window=6, swiglu_limit=0.1)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ["qwen3_moe", "qwen3_moe_raw", "mixtral", "gpt_oss"]
ROUTER = {"gpt_oss": "router"}  # the others' router is mlp.gate


def build_pair(tmp_path, family: str, dtype=torch.float32, **overrides):
    torch.manual_seed(1234)
    cfg = tiny_config(family, **overrides)
    attn = "eager" if family == "gpt_oss" else "sdpa"  # transformers runs sinks in eager (or kernels) only
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    with torch.no_grad():  # every weight off its default (norms at 1, Qwen3's router at 0) so every one matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for n, p in hf.named_parameters():  # routers with logits spread wide enough that routing varies by token
            if n.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.normal_(0, 0.5)
    hf = hf.to(dtype).eval()
    hf.save_pretrained(tmp_path)
    if dtype != torch.float32:  # reloaded: .to(dtype) would also round transformers' float32 RoPE buffers
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation=attn).eval()
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


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
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
    assert all(m.router_linear.weight.grad.abs().sum() > 0 for m in moe)
    assert moe[-1].experts.gate_up_proj.grad is None


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_and_masked_aux_loss(tmp_path, family, side):
    hf, ours = build_pair(tmp_path, family)
    ids = random_ids(batch=3)
    ids, mask = padded_batch(ids, side)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_router_logits=True)
        b = hf(ids, attention_mask=mask, output_router_logits=True)
    real = mask.bool()
    assert rel_err(a.logits[real], b.logits[real]) <= FP32_TOL
    assert abs(a.aux_loss.item() - b.aux_loss.item()) <= FP32_TOL * b.aux_loss.item()
    # the padding rows are excluded: the unmasked aux loss differs
    assert abs(load_balancing_loss(a.router_logits, ours.spec.num_experts,
                                   ours.spec.experts_per_token).item() - a.aux_loss.item()) > 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
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


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_routing_ties_pick_the_same_experts(tmp_path, family):
    """Experts with identical router rows tie exactly; torch.topk's choice among them must be transformers'. The
    ties are set in the first MoE layer, whose input is bit-identical in both models (a later layer's input differs
    by rounding, which turns exact ties into near-ties that either side may break differently)."""
    hf, ours = build_pair(tmp_path, family)
    name = ROUTER.get(family, "gate")
    with torch.no_grad():
        for model in (hf, ours):
            router = next(getattr(l.mlp, name) for l in model.model.layers if hasattr(l.mlp, name))
            w = router.weight
            w[1:] = w[0]  # every expert ties ...
            w[2] = w[3] = w[0] * 1.5  # ... and two lead, tied
            if getattr(router, "bias", None) is not None:
                router.bias.fill_(0.1)
    ids = random_ids()
    with torch.no_grad():
        mine = ours(ids, output_router_logits=True)
        theirs = hf(ids, output_router_logits=True)
    assert torch.equal(mine.router_logits[0], theirs.router_logits[0])
    assert rel_err(mine.logits, theirs.logits) <= FP32_TOL
    layer = next(m for m in ours.modules() if isinstance(m, SparseMoE))
    hf_router = next(getattr(l.mlp, name) for l in hf.model.layers if hasattr(l.mlp, name))
    x = torch.randn(64, ours.spec.hidden_size)
    chosen = layer.route(x)[2]
    assert torch.equal(chosen, hf_router(x)[2])
    assert len({tuple(r) for r in chosen.tolist()}) > 1  # the tie-break is not one fixed pair


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


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
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


# ---- gpt-oss MXFP4 experts ---------------------------------------------------------------------------------------

def _e2m1_direct(code: int) -> float:
    """E2M1 from its bits: sign (bit 3), exponent (bits 2-1, bias 1), mantissa (bit 0); exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


def _mxfp4_direct(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Element by element: byte j of a block holds elements 2j (low nibble) and 2j + 1 (high nibble), times
    2 ** (scale - 127)."""
    flat_b = blocks.reshape(-1, 16).tolist()
    flat_s = scales.reshape(-1).tolist()
    out = []
    for row, s in zip(flat_b, flat_s):
        for byte in row:
            out += [_e2m1_direct(byte & 0xF) * 2.0 ** (s - 127), _e2m1_direct(byte >> 4) * 2.0 ** (s - 127)]
    return torch.tensor(out, dtype=torch.float64).reshape(*scales.shape[:-1], -1)


def test_mxfp4_decode_matches_the_format():
    from fasttune.models.mxfp4 import dequantize_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 5, 2), dtype=torch.uint8, generator=g)
    scales[0, 0, 0] = 0  # the exponent's extremes that stay finite in float32 (254 would overflow 6 * 2 ** 127)
    scales[0, 0, 1] = 250
    blocks[1, 1, 0] = torch.arange(16, dtype=torch.uint8) * 17  # every code in both nibbles
    decoded = dequantize_mxfp4(blocks, scales)
    assert decoded.shape == (3, 5, 64) and decoded.dtype == torch.float32
    assert torch.equal(decoded.double(), _mxfp4_direct(blocks, scales))
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(), decoded)  # exact in bf16 too
    with pytest.raises(ValueError, match="disagree"):
        dequantize_mxfp4(blocks, scales[..., :1])


def test_gpt_oss_mxfp4_checkpoint_loads_dequantised(tmp_path):
    """A gpt-oss checkpoint whose experts are MXFP4 (as OpenAI ships it: *_blocks / *_scales, quantization_config
    mxfp4) loads as the float model those codes stand for: the same logits as transformers running the decoded
    weights, and it saves back as a plain checkpoint."""
    hf, _ = build_pair(tmp_path / "ref", "gpt_oss", hidden_size=64, intermediate_size=32)  # blocks of 32 inputs
    state = load_file(str(tmp_path / "ref" / "model.safetensors"))
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    g = torch.Generator().manual_seed(1)
    quantised, decoded = {}, {}
    for k, t in state.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, K, N = t.shape  # stored (E, in, out); MXFP4 blocks are (E, out, in / 32, 16)
            blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(118, 124, (E, N, K // 32), dtype=torch.uint8, generator=g)
            quantised[k + "_blocks"], quantised[k + "_scales"] = blocks, scales
            decoded[k] = _mxfp4_direct(blocks, scales).float().transpose(1, 2).contiguous()
        else:
            quantised[k] = decoded[k] = t
    (tmp_path / "q").mkdir()
    save_file(quantised, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "q" / "config.json").write_text(json.dumps(
        {**cfg, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                          "model.layers.*.mlp.router",
                                                                                          "model.embed_tokens",
                                                                                          "lm_head"]}}))
    ours = load_model(tmp_path / "q")
    hf.load_state_dict(decoded)
    ids = random_ids()
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= FP32_TOL
    save_model(ours, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.0.mlp.experts.down_proj"],
                       decoded["model.layers.0.mlp.experts.down_proj"])


def test_gpt_oss_round_trip(tmp_path):
    hf, ours = build_pair(tmp_path / "src", "gpt_oss")
    save_model(ours, tmp_path / "out")
    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == set(
        load_file(str(tmp_path / "src" / "model.safetensors")))  # the 3-D stacks, biases and sinks, as saved
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(hf2(ids).logits, hf(ids).logits)
        assert torch.equal(load_model(tmp_path / "out")(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    """Decoding with the KV cache (gpt-oss: sinks and its sliding layers past the window) and left padding."""
    hf, ours = build_pair(tmp_path, family)
    assert_greedy_generation_matches(hf, ours, random_ids(batch=2, seq=9))
