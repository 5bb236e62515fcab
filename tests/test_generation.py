"""fasttune.generation on CPU: the static-cache engine against step-by-step full recompute (fp32, token for token)
for every family the parity tests build, ragged prompt batches, several samples per prompt, stop tokens and
strings, seeded sampling, the sampling filters against transformers' warpers, the sampler's distribution, LoRA
unmerged vs merged, NF4 and GGUF-quantised bases, release() and re-use.

The oracle (`recompute`) runs the whole sequence through the model at every step, without any cache, and draws
its token with the same rule (argmax, or the filters and the (seed, row, step) uniform)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttune
from fasttune.adapters import lora_layers
from fasttune.generation import Generator, SamplingParams, filter_logits
from fasttune.generation.sampling import next_tokens, sample_from_logits, uniform

import test_models_parity as old_families
import test_models_parity_new_families as new_families

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = old_families.VOCAB
FAMILIES = [(old_families, f) for f in old_families.FAMILIES] + [(new_families, f) for f in new_families.FAMILIES]


def _build(tmp_path, module, family, **kw):
    _, model = module.build_pair(tmp_path, family, **kw)
    return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("llama"), old_families, "llama")


def ragged_prompts(lengths=(3, 13, 8, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def recompute(model, prompt, params: SamplingParams, row: int = 0, stop_ids=None):
    """Full recompute at every step: no cache; the same sampling rule as the engine."""
    stop = set(model.spec.eos_ids if stop_ids is None else stop_ids)
    seed = torch.tensor(params.seed or 0)
    ids, out = list(prompt), []
    for step in range(params.max_new_tokens):
        logits = model(torch.tensor([ids]), return_logits=True).logits[:, -1].float()
        t = next_tokens(logits, params.greedy, params.filters(model.spec.vocab_size),
                        torch.tensor(params.temperature or 1.0), torch.tensor(params.top_p),
                        torch.tensor(params.min_p), seed, torch.tensor([row]), torch.tensor(step))
        t = int(t[0])
        out.append(t)
        ids.append(t)
        if t in stop:
            break
    return out


@pytest.mark.parametrize("module,family", FAMILIES, ids=[f for _, f in FAMILIES])
def test_greedy_equals_full_recompute_for_ragged_prompts(tmp_path, module, family):
    model = _build(tmp_path, module, family)
    if family == "phi4mini":  # stay inside the short-factor context (16): see the Generator's RoPE note
        lengths, new = (5, 9, 2), 6
    else:  # longer than every sliding window of the tiny configs (6, 7)
        lengths, new = (3, 13, 8, 1), 10
    prompts = ragged_prompts(lengths)
    params = SamplingParams(max_new_tokens=new, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, max_batch_size=8, max_seq_len=32)
    got = gen.generate(prompts, params)
    want = [recompute(model, p, params, stop_ids=[]) for p in prompts]
    assert [c[0] for c in got] == want
    # several samples per prompt share its prefill: greedy, they all equal the single sample
    got = gen.generate(prompts, params, num_samples=2)
    assert [c for c in got] == [[w, w] for w in want]


def test_sampled_generation_equals_recompute_with_the_same_draws(llama):
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=123,
                            stop_token_ids=[])
    got = Generator(llama, max_batch_size=8, max_seq_len=24).generate(prompts, params, num_samples=2)
    for p, prompt in enumerate(prompts):
        for j in range(2):
            assert got[p][j] == recompute(llama, prompt, params, row=p * 2 + j, stop_ids=[])


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llama):
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, stop_token_ids=[])
    gen = Generator(llama, max_batch_size=8, max_seq_len=24)
    a = gen.generate(prompts, params, num_samples=2)
    assert gen.generate(prompts, params, num_samples=2) == a
    assert a[0][0] != a[0][1]  # siblings draw differently
    assert gen.generate(prompts[:1], params, num_samples=2)[0] == a[0]  # same row ids: same draws
    params.seed = 8
    assert gen.generate(prompts, params, num_samples=2) != a
    # seed None: drawn from torch's default generator, so torch.manual_seed reproduces it
    params.seed = None
    torch.manual_seed(0)
    b = gen.generate(prompts, params)
    torch.manual_seed(0)
    assert gen.generate(prompts, params) == b


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [(0, 0.3, 0.0, 1.0), (0, 0.9, 0.0, 0.7), (5, 1.0, 0.0, 1.0),
                                                           (5, 0.6, 0.0, 1.3), (0, 1.0, 0.1, 1.0),
                                                           (10, 0.8, 0.05, 0.8)])
def test_filters_match_transformers_warpers(top_k, top_p, min_p, temperature):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(top_k + int(top_p * 10))) * 2
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    scaled = want.clone()
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want)
    if min_p > 0:
        want = MinPLogitsWarper(min_p)(None, want)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    k, use_p, use_min = params.filters(50)
    got = filter_logits(logits / temperature, k, torch.tensor(top_p) if use_p else None,
                        torch.tensor(min_p) if use_min else None)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], scaled[~torch.isinf(got)])


def test_sampler_draws_the_softmax_distribution_and_never_a_filtered_token():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, float("-inf"), 1.5, float("-inf")])
    n = 40000
    rows = torch.arange(n)
    u = uniform(torch.tensor(99), rows, torch.tensor(3))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    draws = sample_from_logits(logits.expand(n, -1), u)
    counts = torch.bincount(draws, minlength=8).double()
    p = logits.softmax(-1).double()
    assert counts[5] == 0 and counts[7] == 0
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sigma + 1e-9).all(), (counts / n, p)
    # another step or seed gives other uniforms (independent streams)
    assert not torch.equal(u, uniform(torch.tensor(99), rows, torch.tensor(4)))
    assert not torch.equal(u, uniform(torch.tensor(98), rows, torch.tensor(3)))


def test_stop_tokens_end_each_row_at_its_first_stop(llama):
    prompts = ragged_prompts((4, 9, 2))
    free = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    gen = Generator(llama, max_batch_size=4, max_seq_len=24)
    full = [c[0] for c in gen.generate(prompts, free)]
    stops = [full[0][5], full[1][2]]
    got = [c[0] for c in gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0,
                                                              stop_token_ids=set(stops)))]
    for row, completion in zip(full, got):
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        assert completion == row[:cut]
    assert got[0][-1] in stops and got[1][-1] in stops
    # default stop ids: the model's EOS
    assert gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0)) == [
        [c[:next((i + 1 for i, t in enumerate(c) if t in llama.spec.eos_ids), len(c))]] for c in full]


@pytest.mark.parametrize("interval", [1, 3, 16])
def test_stop_strings_cut_after_the_completing_token(llama, interval):
    tok = old_families._tiny_tokenizer()
    prompts = ragged_prompts((4, 9, 2))
    free = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    gen = Generator(llama, max_batch_size=4, max_seq_len=24, tokenizer=tok)
    full = [c[0] for c in gen.generate(prompts, free)]
    # a stop string spanning two tokens of row 0 (its 4th and 5th), and one that never occurs
    stop = tok.decode(full[0][3:5])
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[], stop_strings=[stop, "zzz"],
                            stop_check_interval=interval)
    got = [c[0] for c in gen.generate(prompts, params)]
    for row, completion in zip(full, got):
        n = next((n for n in range(1, len(row) + 1) if stop in tok.decode(row[:n])), len(row))
        assert completion == row[:n]
    assert len(got[0]) <= 5
    with pytest.raises(ValueError, match="tokenizer"):
        Generator(llama, 2, 24).generate(prompts, params)


def test_rounds_and_prefill_groups_give_the_same_tokens(llama):
    prompts = ragged_prompts((4, 9, 2, 7, 5))
    params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, stop_token_ids=[])
    one = Generator(llama, max_batch_size=16, max_seq_len=20).generate(prompts, params, num_samples=3)
    # 2 prompts x 3 samples per round; prefill groups of at most 8 tokens
    small = Generator(llama, max_batch_size=6, max_seq_len=20, prefill_tokens=8)
    assert small.generate(prompts, params, num_samples=3) == one
    from fasttune.generation import kv_cache_bytes
    assert small.cache.nbytes == kv_cache_bytes(llama.spec, 6, 20, torch.float32)
    small.release()
    assert small.cache is None
    assert small.generate(prompts, params, num_samples=3) == one  # allocated again


def test_lora_unmerged_equals_recompute_and_merged_restores_the_base_exactly(tmp_path):
    model = _build(tmp_path, old_families, "llama")
    fasttune.add_lora(model, r=4, alpha=8, target_modules=["all-linear", "lm_head"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    model.train()  # a trainer calls generate mid-training: the generator runs eval and restores the mode
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = Generator(model, max_batch_size=4, max_seq_len=24)
    unmerged = [c[0] for c in gen.generate(prompts, params)]
    assert model.training
    model.eval()
    assert unmerged == [recompute(model, p, params, stop_ids=[]) for p in prompts]
    merged = [c[0] for c in gen.generate(prompts, params, merge_lora=True)]
    assert merged == unmerged
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any(m.disabled for _, m in lora_layers(model))
    # the merge is real: merged weights without the adapters running give the adapted model's tokens
    base = [c[0] for c in gen.generate(prompts, params, merge_lora=False)]
    from fasttune.adapters import disable_adapters
    with disable_adapters(model):
        plain = [c[0] for c in gen.generate(prompts, params)]
    assert base == unmerged and plain != unmerged


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_nf4_base_decodes_through_its_dequant_path(tmp_path, monkeypatch, kernels):
    """"auto" on CPU: dequantise then matmul; "triton" (the interpreter): the CUDA path, where every NF4 projection
    of a decode step runs the fused NF4 matmul. The recompute oracle always dequantises (the plain-PyTorch path)."""
    import fasttune.kernels.lora as lora_kernels
    from conftest import nf4_projections_

    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    fused = []
    real = lora_kernels.nf4_matmul_triton
    monkeypatch.setattr(lora_kernels, "nf4_matmul_triton", lambda *a, **k: fused.append(a[0].shape[0]) or real(*a, **k))
    model = _build(tmp_path, old_families, "qwen2")
    nf4_projections_(model)
    fasttune.add_lora(model, r=4, alpha=8)
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, max_batch_size=4, max_seq_len=24)
    got = [c[0] for c in gen.generate(prompts, params)]
    # the decode steps' 4 slots (3 prompts) went through the fused kernel, 7 projections a layer
    assert fused.count(4) == (7 * len(model.layers) * (params.max_new_tokens - 1) if kernels == "triton" else 0)
    monkeypatch.setenv("FASTTUNE_KERNELS", "reference")
    assert got == [recompute(model, p, params, stop_ids=[]) for p in prompts]
    monkeypatch.setenv("FASTTUNE_KERNELS", kernels)
    with pytest.raises(ValueError, match="quantised base"):
        gen.generate(prompts, params, merge_lora=True)


def test_gguf_quantised_base_decodes_through_its_dequant_path(tmp_path):
    pytest.importorskip("gguf")
    from test_models_gguf import _tiny_gguf

    model, _ = fasttune.load(_tiny_gguf(tmp_path, "q8_0"), device="cpu", dtype="float32", keep_quantized=True)
    from fasttune.models.gguf_linear import gguf_linears
    assert gguf_linears(model)
    prompts = [[5, 9, 11, 3], [7, 8]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    got = Generator(model, max_batch_size=2, max_seq_len=16).generate(prompts, params)
    assert [c[0] for c in got] == [recompute(model, p, params, stop_ids=[]) for p in prompts]


def test_top_level_generate_with_text_prompts(llama):
    tok = old_families._tiny_tokenizer()
    params = dict(max_new_tokens=5, temperature=0.0, stop_token_ids=[])
    texts = fasttune.generate(llama, tok, ["w5 w9 w11", "w7"], **params)
    ids = fasttune.generate(llama, None, [[5, 9, 11], [7]], **params)
    assert texts == [tok.decode(c, skip_special_tokens=True) for c in ids]
    assert fasttune.generate(llama, tok, "w5 w9 w11", **params) == texts[0]
    many = fasttune.generate(llama, None, [[5, 9, 11]], num_samples=3, max_new_tokens=4, seed=1, stop_token_ids=[])
    assert len(many) == 1 and len(many[0]) == 3 and all(len(c) == 4 for c in many[0])


def test_errors_say_what_to_change(llama):
    gen = Generator(llama, max_batch_size=2, max_seq_len=10)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([[5] * 8], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="num_samples"):
        gen.generate([[5]], SamplingParams(max_new_tokens=2), num_samples=3)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="position_ids"):
        llama(torch.tensor([[5, 6]]), cache=gen.cache or object())


def test_the_loop_ends_soon_after_every_row_finished(llama):
    prompts = ragged_prompts((4, 9, 2))
    gen = Generator(llama, max_batch_size=4, max_seq_len=64, check_every=4)
    free = [c[0] for c in gen.generate(prompts, SamplingParams(max_new_tokens=40, temperature=0.0,
                                                                stop_token_ids=[]))]
    assert int(gen._buf.step) == 40  # nothing finished: every step ran
    stops = {row[1] for row in free}  # every row stops at its second token
    got = [c[0] for c in gen.generate(prompts, SamplingParams(max_new_tokens=40, temperature=0.0,
                                                               stop_token_ids=stops))]
    assert all(len(c) <= 2 and c[-1] in stops for c in got)
    assert int(gen._buf.step) <= 4 + 1  # checked every 4 steps (on the CPU the flag is read at once)


class _ReplayingGenerator(Generator):
    """The captured-step logic on the CPU: warm-up (then restore), a 'graph' that re-runs the step exactly as
    captured (RoPE bound max_seq_len - 1, the static buffers), keyed and dropped like the real ones."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cuda_graphs = True
        self.captures = 0

    def _capture(self, S, greedy, filters):
        self._warm_up(S, greedy, filters)
        self.captures += 1
        gen = self

        class Replay:
            def replay(self):
                gen._decode_step(S, greedy, filters, gen.max_seq_len - 1)
        return Replay()


def test_captured_step_logic_equals_eager(tmp_path):
    model = _build(tmp_path, old_families, "mistral")  # a sliding window (7) inside the 40 positions
    fasttune.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    prompts = ragged_prompts((4, 9, 2, 7, 5))
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11, stop_token_ids=[])
    eager = Generator(model, max_batch_size=8, max_seq_len=40).generate(prompts, params, num_samples=2)
    replaying = _ReplayingGenerator(model, max_batch_size=8, max_seq_len=40)
    # 10 sequences in slots of 8: a round of 8 (S = 8) and one of 2 (S = 2), one capture each
    assert replaying.generate(prompts, params, num_samples=2) == eager
    assert replaying.captures == 2
    assert replaying.generate(prompts[:1], params, num_samples=2) == eager[:1]  # S = 2 again: reused
    assert replaying.generate(prompts, params, num_samples=2) == eager  # both reused
    assert replaying.captures == 2
    with torch.no_grad():  # new adapter values in place: the same 'graphs' see them
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.mul_(2)
    again = Generator(model, max_batch_size=8, max_seq_len=40).generate(prompts, params, num_samples=2)
    assert replaying.generate(prompts, params, num_samples=2) == again != eager
    assert replaying.captures == 2
    replaying.generate(prompts, params, num_samples=2, merge_lora=True)  # adapters off: captured again
    assert replaying.captures == 4


# ---- the fused decode paths (issue 18): concatenated projections, residual add + norm, RoPE + cache write -------

def _counting(monkeypatch, owner, name: str) -> list:
    """Wrap owner.name so its calls are counted (the returned list gets one entry per call)."""
    calls, real = [], getattr(owner, name)

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # pre-norm and sandwich layers
@pytest.mark.parametrize("fused,groups", [(True, True), (False, False), (True, ("qkv",)), (False, ("gate_up",))])
def test_every_fusion_setting_equals_full_recompute_and_takes_its_path(tmp_path, monkeypatch, family, fused, groups):
    from fasttune import kernels
    from fasttune.generation import fused_projection_bytes
    from fasttune.generation.fused import GROUPS, _Group

    model = _build(tmp_path, old_families, family)
    adds = _counting(monkeypatch, kernels, "add_rms_norm")
    writes = _counting(monkeypatch, kernels, "rope_cache_write")
    projects = _counting(monkeypatch, _Group, "project")
    prompts = ragged_prompts((3, 13, 8, 1))
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, max_batch_size=8, max_seq_len=32, fused=fused, fuse_projections=groups)
    got = [c[0] for c in gen.generate(prompts, params)]
    n_adds, n_writes, n_projects = len(adds), len(writes), len(projects)
    assert got == [recompute(model, p, params, stop_ids=[]) for p in prompts]
    L = model.spec.num_layers
    # per forward: 2 adds per layer fused into norms (the first layer's input norm has none, the final norm one)
    assert n_adds == (2 * L * 10 if fused else 0)  # 1 prefill + 9 decode steps
    assert n_writes == (L * 9 if fused else 0)  # decode steps only (the prefill writes through index_put)
    names = GROUPS if groups is True else () if groups is False else groups
    assert n_projects == len(names) * L * 10
    if names:
        assert gen.projections.nbytes == fused_projection_bytes(model, names) > 0
    else:
        assert gen.projections is None
    for layer in model.layers:  # the model's own hooks are back after the call
        assert layer.self_attn.fused_qkv is None and layer.mlp.fused_forward is None
    gen.release()
    assert gen.projections is None


def test_fused_projections_carry_unmerged_adapters_on_some_projections_with_their_own_scalings(tmp_path):
    from fasttune.adapters.attach import FusedMLP, FusedQKV

    model = _build(tmp_path, old_families, "qwen2")  # q/k/v biases
    fasttune.add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    model.layers[0].self_attn.q_proj.scaling = 0.7  # unequal scalings within a group: folded into B's blocks
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, max_batch_size=4, max_seq_len=24)
    got = [c[0] for c in gen.generate(prompts, params)]
    assert got == [recompute(model, p, params, stop_ids=[]) for p in prompts]
    assert got == [c[0] for c in Generator(model, 4, 24, fuse_projections=False).generate(prompts, params)]
    groups = gen.projections.groups
    assert groups[0].lora is not None and groups[0].lora[2] == 1.0  # folded: unequal scalings
    assert groups[2].lora is not None and groups[2].lora[2] == 2.0  # layer 1's q/v: the common scaling
    # the LoRA kernels' hooks are restored after the call
    full = _build(tmp_path / "full", old_families, "llama")
    fasttune.add_lora(full, r=4, alpha=8)
    hooks = [(l.self_attn.fused_qkv, l.mlp.fused_forward) for l in full.layers]
    assert all(isinstance(q, FusedQKV) and isinstance(m, FusedMLP) for q, m in hooks)
    Generator(full, 4, 24).generate(prompts, params)
    assert hooks == [(l.self_attn.fused_qkv, l.mlp.fused_forward) for l in full.layers]


def test_projection_copies_follow_weights_changed_in_place_between_calls(tmp_path):
    model = _build(tmp_path, old_families, "llama")
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, max_batch_size=4, max_seq_len=24)
    first = [c[0] for c in gen.generate(prompts, params)]
    with torch.no_grad():  # an optimiser step on the dense weights (full fine-tuning), in place
        for layer in model.layers:
            layer.self_attn.k_proj.weight.mul_(-2.0)
            layer.mlp.up_proj.weight.mul_(1.5)
    second = [c[0] for c in gen.generate(prompts, params)]
    assert second == [recompute(model, p, params, stop_ids=[]) for p in prompts]
    assert second != first, "the weight change changed nothing: the test cannot see stale copies"


def test_a_merged_call_merges_into_the_copies_and_leaves_their_base_weights_alone(tmp_path):
    model = _build(tmp_path, old_families, "llama")
    fasttune.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[])
    gen = Generator(model, max_batch_size=4, max_seq_len=24)
    unmerged = [c[0] for c in gen.generate(prompts, params)]
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    in_copies = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
    versions = [m.base.weight._version for m in in_copies]
    o_version = attn.o_proj.base.weight._version
    merged = [c[0] for c in gen.generate(prompts, params, merge_lora=True)]
    assert merged == unmerged  # fp32: the merged weights compute what the adapters do
    assert [m.base.weight._version for m in in_copies] == versions  # never written (nor saved and restored)
    assert attn.o_proj.base.weight._version > o_version  # merged in place and restored, as before
    assert merged == [c[0] for c in Generator(model, 4, 24, fuse_projections=False).generate(
        prompts, params, merge_lora=True)]
    # the copies hold W + s B A, as merged_lora would write it
    group = gen.projections.groups[0]
    assert torch.equal(group.weight[:attn.q_proj.out_features], attn.q_proj.merged_weight().to(group.weight.dtype))
    assert not any(m.disabled for _, m in lora_layers(model))


def test_projection_copies_are_skipped_with_a_note_when_they_would_leave_too_little_memory(tmp_path, monkeypatch,
                                                                                           caplog):
    import fasttune.train.memory as memory
    from fasttune.generation import fused_projection_bytes
    from fasttune.kernels.attention import FALLBACKS

    model = _build(tmp_path, old_families, "llama")
    need = fused_projection_bytes(model)
    prompts = ragged_prompts((4, 9, 2))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[])
    FALLBACKS.reset()
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: need + 2 * memory.GiB - 1)
    gen = Generator(model, max_batch_size=4, max_seq_len=24)
    with caplog.at_level("WARNING"):
        got = [c[0] for c in gen.generate(prompts, params)]
    assert gen.projections is None and "no room for the concatenated" in caplog.text
    assert got == [recompute(model, p, params, stop_ids=[]) for p in prompts]
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: need + 2 * memory.GiB)
    roomy = Generator(model, max_batch_size=4, max_seq_len=24)
    assert [c[0] for c in roomy.generate(prompts, params)] == got and roomy.projections is not None
