"""Memory policy: checkpointing / offload / MLP chunking give the same loss and gradients as plain autograd."""
import pytest
import torch

from fasttune.adapters import add_lora, lora_parameters
from fasttune.models import ArchSpec, CausalLM
from fasttune.train.memory import (WORKSPACE_FACTOR, LayerRunner, apply_memory_policy, layer_activation_bytes,
                                   plan_memory)

GiB = 2**30


# one thread: exact float comparisons need a fixed summation order (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(**kw):
    cfg = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
               tie_word_embeddings=False)
    cfg.update(kw)
    return ArchSpec.from_hf_config(cfg)


def _model(dropout=0.0, train_embeddings=False):
    torch.manual_seed(0)
    model = CausalLM(_spec()).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    add_lora(model, r=4, alpha=8, dropout=dropout, train_embeddings=train_embeddings)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.2)  # B != 0 so every path contributes
    return model.double().train()


def _loss_and_grads(model, ids, seed=0):
    torch.manual_seed(seed)
    loss = model(ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), [g.clone() for g in torch.autograd.grad(loss, params)]


def _ids(seq=40):
    return torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("policy", ["checkpoint", "offload"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_policies_give_identical_gradients(policy, dropout):
    model = _model(dropout, train_embeddings=True)
    ids = _ids()
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    plan = apply_memory_policy(model, policy, seq_len=40, batch_size=2)
    assert isinstance(model.model.layer_runner, LayerRunner)
    assert plan.modes[0] == policy and plan.modes[-1] == "checkpoint"
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert len(grads) == len(ref_grads) == 1 + 2 * 7 * 3
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    apply_memory_policy(model, "none", seq_len=40, batch_size=2)
    assert model.model.layer_runner is None


def test_recompute_mlp_policy_gives_identical_gradients_and_saves_less():
    """`recompute-mlp`: no layer checkpointed, the fused LoRA MLP recomputes gate/up in its backward instead of
    saving them — the same loss and gradients, and fewer bytes kept for the backward."""
    with pytest.raises(ValueError, match="dropout 0"):  # LoRA dropout turns the fused MLP off: say so
        apply_memory_policy(_model(0.3), "recompute-mlp", seq_len=40, batch_size=2)
    model = _model(0.0)
    ids = _ids()
    ref_loss, ref_grads = _loss_and_grads(model, ids)

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids).loss
        return total
    kept = saved_bytes()
    plan = apply_memory_policy(model, "recompute-mlp", seq_len=40, batch_size=2)
    assert plan.modes == ["none"] * 3 and model.model.layer_runner is None and not plan.mlp_saves_gate_up
    assert all(layer.mlp.fused_forward.save_gate_up is False for layer in model.model.layers)
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # gate and up (2 x intermediate x tokens, float64) per layer are no longer saved
    spec = model.spec
    assert kept - saved_bytes() >= 3 * 2 * spec.intermediate_size * ids.numel() * 8
    apply_memory_policy(model, "none", seq_len=40, batch_size=2)
    assert all(layer.mlp.fused_forward.save_gate_up is True for layer in model.model.layers)


def test_first_layer_adapters_get_gradients_with_frozen_embeddings():
    """The checkpointed layer's input does not require grad (frozen embeddings): the adapters still train."""
    model = _model()
    ids = _ids()
    _, ref = _loss_and_grads(model, ids)
    apply_memory_policy(model, "offload", seq_len=40, batch_size=2)
    _, got = _loss_and_grads(model, ids)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_auto_policy_chunked_mlp_and_recompute_match():
    model = _model()
    ids = _ids(64)
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    spec = model.spec
    act = layer_activation_bytes(spec, 128, 8, True, 4)
    # tiny budgets (scaled down by passing the reserve and chunk limits explicitly) force every regime
    plan = apply_memory_policy(model, "auto", seq_len=64, batch_size=2, free_bytes=10 * act, reserve_bytes=0,
                               mlp_chunk_bytes=2**40)
    assert plan.modes == ["none"] * 3
    assert model.model.layer_runner is None
    # room for the working set (the planner's own estimate) plus 2.5 layers of activations: 1 of 3 layers recomputed
    workspace = WORKSPACE_FACTOR * (act + 4 * 128 * spec.hidden_size * 8)
    plan = apply_memory_policy(model, "auto", seq_len=64, batch_size=2, free_bytes=int(workspace + 2.5 * act),
                               reserve_bytes=0, mlp_chunk_bytes=2**40)
    assert 0 < plan.modes.count("checkpoint") < 3 and "offload" not in plan.modes
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    plan = apply_memory_policy(model, "auto", seq_len=64, batch_size=2, free_bytes=int(1.0 * act), reserve_bytes=0,
                               mlp_chunk_bytes=6 * 72 * 8 * 2 * 16)  # 16 tokens per MLP chunk
    assert plan.modes[0] == "offload" and plan.modes[-1] == "checkpoint"
    assert plan.chunk_tokens == 16 and not plan.mlp_saves_gate_up
    assert model.model.layers[0].mlp.chunk_tokens == 16
    assert model.model.layers[0].mlp.fused_forward.save_gate_up is False
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_auto_plans_for_the_training_state_made_after_it(monkeypatch):
    """The gradients and optimizer moments do not exist when the plan is made (the trainer makes the optimizer
    after the model): with `optimizer` given, prepare_for_training takes them off the measured free memory, so a
    budget that fits the activations only without them checkpoints a layer."""
    import fasttune.train.memory as memory
    from fasttune.adapters import LoraConfig
    from fasttune.build import prepare_for_training
    from fasttune.train.optimizers import training_state_bytes

    model = _model()
    spec = model.spec
    act = layer_activation_bytes(spec, 128, 8, True, 4)
    pending = training_state_bytes(model, "adamw")
    assert pending == 3 * 8 * sum(p.numel() for p in lora_parameters(model))  # gradient + two moments, float64
    free = memory.working_set_bytes(spec, 128, act, 8) + 3 * act  # everything fits, but for the training state
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: free)
    kept = prepare_for_training(model, LoraConfig(r=4, alpha=8), "auto", seq_len=64, batch_rows=2).memory_plan
    assert kept.modes == ["none"] * 3
    planned = prepare_for_training(model, LoraConfig(r=4, alpha=8), "auto", seq_len=64, batch_rows=2,
                                   optimizer="adamw").memory_plan
    assert planned.modes == plan_memory(spec, "auto", 64, 2, free - pending, 8, lora_rank=4).modes
    assert planned.modes.count("checkpoint") == 1
    assert training_state_bytes(model, "adamw8bit") < pending


def test_plan_at_issue_shapes():
    """Llama-3.1-8B shapes on an 80 GB GPU with 16 GB of weights: bs 2 x 2048 fits without recomputation;
    400K tokens at batch 1 needs every layer checkpointed, offloaded and the MLP chunked."""
    spec = _spec(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072)
    free = 62 * GiB
    assert plan_memory(spec, "auto", 2048, 2, free).modes == ["none"] * 32
    mid = plan_memory(spec, "auto", 32768, 1, free)
    assert 0 < mid.modes.count("checkpoint") and mid.modes.count("none") < 32
    long = plan_memory(spec, "auto", 400_000, 1, free)
    assert long.modes.count("offload") > 0 and long.chunk_tokens is not None and not long.mlp_saves_gate_up
    with pytest.raises(ValueError, match="unknown memory policy"):
        plan_memory(spec, "fast", 2048, 1, free)


def test_runner_is_bypassed_without_grad():
    model = _model()
    apply_memory_policy(model, "offload", seq_len=40, batch_size=2)
    ids = _ids()
    with torch.no_grad():
        out = model(ids).logits
    apply_memory_policy(model, "none")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_gpu_matches_and_saves_memory():
    torch.manual_seed(0)
    spec = _spec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=4096, max_position_embeddings=8192)
    model = CausalLM(spec).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    add_lora(model, r=16, alpha=16)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.02)
    model.train()
    ids = torch.randint(0, 4096, (2, 4096), device="cuda")
    results = {}
    for policy in ("none", "checkpoint", "offload"):
        apply_memory_policy(model, policy, seq_len=4096, batch_size=2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(ids, labels=ids).loss
        grads = torch.autograd.grad(loss, lora_parameters(model))
        torch.cuda.synchronize()
        results[policy] = (loss.float().item(), [g.float() for g in grads], torch.cuda.max_memory_allocated() - base)
    ref_loss, ref_grads, ref_peak = results["none"]
    for policy in ("checkpoint", "offload"):
        loss, grads, peak = results[policy]
        assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss)
        for g, r in zip(grads, ref_grads):
            assert torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), 0) > 0.999
        print(policy, "peak activation MiB", peak / 2**20, "vs none", ref_peak / 2**20)
        assert peak < ref_peak
    assert results["offload"][2] < results["checkpoint"][2]


def _moe_spec(**kw):
    cfg = dict(model_type="qwen3_moe", vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
               num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=256)
    cfg.update(kw)
    return ArchSpec.from_hf_config(cfg)


def test_moe_activation_estimate_counts_routed_rows():
    """An MoE layer's estimate grows with tokens x top-k x expert width (not the dense intermediate size), and the
    bytes autograd really keeps for the MoE block are within the estimate's MoE share (measured, CPU path)."""
    spec = _moe_spec()
    top2 = _moe_spec(num_experts_per_tok=2)
    tokens = 512
    per_k = (layer_activation_bytes(spec, tokens, 4, lora_rank=0) - layer_activation_bytes(top2, tokens, 4, lora_rank=0))
    # two more routed rows per token (input and output rows, gate_up and GLU output, two int64 indices), two more
    # top-k ids, routing weights and top-k values
    assert per_k == tokens * 2 * ((2 * 64 + 3 * 48) * 4 + 2 * 8 + 8 + 4 + 4)
    torch.manual_seed(0)
    model = CausalLM(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    moe = model.model.layers[0].mlp
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, spec.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe(x).sum().backward()
    measured = sum(saved.values())
    attention_and_norms = layer_activation_bytes(_spec(hidden_size=64, intermediate_size=0, num_attention_heads=4,
                                                       num_key_value_heads=2), tokens, 4, lora_rank=0)
    estimate_moe_share = layer_activation_bytes(spec, tokens, 4, lora_rank=0) - attention_and_norms
    assert 0.6 * estimate_moe_share <= measured <= 1.25 * estimate_moe_share, (measured, estimate_moe_share)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while fn() runs and back-propagates, the
    module's parameters and buffers excluded (they are resident anyway)."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_activation_estimate_matches_what_the_kernels_keep(family, dtype, monkeypatch):
    """The planner's MoE estimate (tokens x top-k routed rows, issue 17) against the bytes autograd really keeps
    for an MoE block with LoRA on its experts, through the autograd functions the GPU runs (grouped GEMM with the
    adapters fused in, gpt-oss's ClampedSwiGLU, the GLU kernel; Triton's interpreter on CPU): equal but for the
    (E + 1) int32 expert offsets."""
    import dataclasses

    from fasttune.train.memory import moe_activation_bytes

    monkeypatch.setenv("FASTTUNE_KERNELS", "triton")
    if family == "gpt_oss":
        spec = ArchSpec.from_hf_config(dict(model_type="gpt_oss", vocab_size=96, hidden_size=64, intermediate_size=48,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, num_local_experts=8, num_experts_per_tok=4, sliding_window=8))
    else:
        spec = _moe_spec(num_hidden_layers=1)
    torch.manual_seed(0)
    model = CausalLM(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model = model.to(dtype)
    add_lora(model, r=4, alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    moe = model.model.layers[0].mlp
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    tokens = 32  # the interpreter runs every program in Python: few rows
    x = torch.randn(1, tokens, spec.hidden_size, dtype=dtype, requires_grad=True)
    saved = _saved_bytes(lambda: moe(x).float().sum().backward())
    measured = sum(n for ptr, n in saved.items() if ptr not in resident)
    offsets = 4 * (spec.num_experts + 1)
    estimate = moe_activation_bytes(spec, tokens, dtype.itemsize, lora_rank=4)
    assert measured == estimate + offsets, (measured, estimate)
    assert moe_activation_bytes(dataclasses.replace(spec, experts_per_token=2), tokens, dtype.itemsize, 4) < estimate


def test_plan_at_qwen3_30b_a3b_shape():
    """Qwen3-30B-A3B (48 layers, 128 experts, top-8, width 768) in bf16 on an H200 with ~61 GB of weights: seq 2048
    fits without recomputation, 64K tokens needs checkpointing: the routed rows (8 x per token) are counted."""
    spec = _moe_spec(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=40960)
    free = 75 * GiB
    assert plan_memory(spec, "auto", 2048, 1, free).modes == ["none"] * 48
    long = plan_memory(spec, "auto", 65536, 1, free)
    assert long.modes.count("checkpoint") + long.modes.count("offload") > 0
    per_token = layer_activation_bytes(spec, 1, 2, lora_rank=16)
    assert per_token > 8 * (3 * 2048 + 3 * 768) * 2  # the routed rows dominate


def test_attention_sinks_add_no_sequence_length_term():
    """gpt-oss's sinks run fused (kernels.attention): a layer keeps what it keeps without sinks, linear in tokens,
    and the plan at a long sequence is the same as for the same shapes without sinks."""
    import dataclasses

    spec = ArchSpec.from_hf_config(dict(model_type="gpt_oss", vocab_size=96, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8))
    no_sinks = dataclasses.replace(spec, attention_sinks=False)
    assert spec.attention_sinks
    assert layer_activation_bytes(spec, 4096, 2) == 2 * layer_activation_bytes(spec, 2048, 2)
    assert layer_activation_bytes(spec, 2048, 2) == layer_activation_bytes(no_sinks, 2048, 2)
    for seq in (2048, 65536):
        a, b = plan_memory(spec, "auto", seq, 1, 8 * GiB), plan_memory(no_sinks, "auto", seq, 1, 8 * GiB)
        assert (a.modes, a.activation_bytes_per_layer) == (b.modes, b.activation_bytes_per_layer)
