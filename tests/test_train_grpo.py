"""GRPO (and Dr. GRPO, GSPO): the loss and its gradient against a direct float64 implementation of each variant,
advantages, the model's per-token log-probabilities, the built-in rewards, the config, and a tiny end-to-end run in
which a reward that prefers one token raises that token's frequency."""
import json
import math
from pathlib import Path

import pytest
import torch

from fasttune.train import grpo
from fasttune.train.config import ConfigError, TrainConfig
from fasttune.train.rewards import RewardError, build_rewards, extract_answer
from seeding import generator

# ---- the loss -----------------------------------------------------------------------------------------------------


def direct_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, num_sequences, max_len):
    """The formulas of grpo.py's docstring, term by term in float64 Python loops."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(logp.shape[0]):
        toks = [t for t in range(logp.shape[1]) if mask[i, t]]
        n = max(len(toks), 1)
        a = adv[i]
        kl = [torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1 if ref is not None else 0.0
              for t in toks]
        if loss_type == "gspo":
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / n)
            clipped = torch.clamp(s, 1 - eps_low, 1 + eps_high)
            total = total - torch.minimum(s * a, clipped * a) + beta * sum(kl) / n
            continue
        seq = 0.0
        for t, k in zip(toks, kl):
            rho = torch.exp(logp[i, t] - old[i, t])
            seq = seq - torch.minimum(rho * a, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a) + beta * k
        total = total + (seq / n if loss_type == "grpo" else seq / max_len)
    return total / num_sequences


def make_case(seed, rows=6, length=9, ratio_spread=0.4):
    g = generator("grpo-loss", seed)
    logp = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(rows, length, generator=g, dtype=torch.float64) * ratio_spread
    ref = logp + torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for i in range(rows):  # a prompt prefix (no targets) then a completion of varying length, then padding
        start = 1 + i % 2
        mask[i, start:start + 2 + (i * 3) % (length - 3)] = True
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "gspo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("with_old", [False, True])
def test_loss_and_gradient_match_float64(loss_type, beta, with_old):
    logp64, old64, ref64, adv64, mask = make_case(f"{loss_type}-{beta}-{with_old}")
    if loss_type == "gspo" and with_old:  # sequence ratios exp(-shift) on both sides of the clip range
        shift = torch.tensor([0.4, -0.4, 0.1, -0.1, 0.5, -0.5], dtype=torch.float64)[:, None]
        old64 = logp64 + shift + (old64 - logp64) * 0.05
        adv64 = adv64.abs() * torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, beta=beta)
    # float32 implementation
    logp = logp64.float().requires_grad_()
    loss, metrics = grpo.grpo_loss(logp, old64.float() if with_old else None, ref64.float() if beta else None,
                                   adv64.float(), mask, loss_type=loss_type, num_sequences=10,
                                   max_completion_length=7, **kw)
    (grad,) = torch.autograd.grad(loss, [logp])
    # float64 oracle (old = logp detached when the rollout is trained on once)
    x = logp64.clone().requires_grad_()
    want = direct_loss(x, old64 if with_old else x.detach(), ref64 if beta else None, adv64, mask, loss_type,
                       0.2, 0.28, beta, 10, 7)
    (want_grad,) = torch.autograd.grad(want, [x])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    scale = want_grad.abs().max().item()
    assert scale > 0
    assert (grad.double() - want_grad).abs().max().item() <= 1e-5 * scale
    assert (grad[~mask] == 0).all()  # padding and prompt tokens get no gradient
    if with_old:  # the case really exercises clipping
        assert metrics["clipped"].item() > 0
    else:  # ratio 1: nothing is clipped, and the gradient is the plain policy gradient
        assert metrics["clipped"].item() == 0
    if beta:
        assert metrics["kl"].item() > 0


def test_ratio_one_gives_the_policy_gradient():
    """mu = 1, beta = 0, grpo: dL/dlogp_it = -A_i / (|o_i| N) on completion tokens."""
    logp64, _, _, adv64, mask = make_case(7)
    logp = logp64.float().requires_grad_()
    loss, _ = grpo.grpo_loss(logp, None, None, adv64.float(), mask, loss_type="grpo", epsilon_low=0.2,
                             epsilon_high=0.2, beta=0.0, num_sequences=6, max_completion_length=7)
    (grad,) = torch.autograd.grad(loss, [logp])
    want = -adv64[:, None] / mask.sum(-1, keepdim=True) / 6 * mask
    assert torch.allclose(grad.double(), want, atol=1e-7)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    a = grpo.group_advantages(r, 4, scale=True)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # Bessel's correction
    assert torch.allclose(a[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5).double() / (std + 1e-4))
    assert (a[4:] == 0).all()  # a group with one reward teaches nothing
    assert torch.equal(grpo.group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]).double())


# ---- the model's per-token log-probabilities ----------------------------------------------------------------------

def test_token_logprobs_of_the_model_match_its_logits(small_model_dir):
    from fasttune import load
    from fasttune.adapters import add_lora

    model, _ = load(str(small_model_dir), device="cpu", dtype=torch.float32)
    model = add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=1)
    g = generator("token-logprobs-model")
    ids = torch.randint(3, 200, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 8:] = -100
    got = grpo.token_logprobs(model, ids, labels, temperature=0.8)
    logits = model.logits(model(ids, return_logits=False).last_hidden_state[:, :-1]) / 0.8
    want = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
    assert torch.allclose(got, want, atol=1e-5)


# ---- rewards ------------------------------------------------------------------------------------------------------

def test_builtin_rewards(tmp_path):
    assert extract_answer("so 12 + 30 = 42\n#### 42") == "42"
    assert extract_answer("the answer is \\boxed{\\frac{1}{2}} indeed") == "\\frac{1}{2}"
    assert extract_answer("no marker") is None
    rewards = build_rewards(["exact_answer", "format", "length"], [1.0, 0.5, 2.0], answer_column="answer",
                            format_regex=r"<think>.*</think>", length_target=10, length_mode="target")
    fns = {r.name: r.fn for r in rewards}
    row = {"answer": "Natalia sold 48/2 = 24 clips.\n#### 1,000"}
    assert fns["exact_answer"]("p", "... #### 1000.0", row) == 1.0
    assert fns["exact_answer"]("p", "... \\boxed{1000}", row) == 1.0
    assert fns["exact_answer"]("p", "... #### 999", row) == 0.0
    assert fns["exact_answer"]("p", "no answer", {"answer": "7"}) == 0.0
    assert fns["exact_answer"]("p", "#### seven", {"answer": "seven"}) == 1.0
    assert fns["format"]("p", "<think>\na\n</think> 4", row) == 1.0
    assert fns["format"]("p", "<think> a", row) == 0.0
    assert fns["length"]("p", "x" * 10, row) == 0.0
    assert fns["length"]("p", "x" * 15, row) == -0.5 and fns["length"]("p", "x" * 5, row) == -0.5
    pen = build_rewards(["length"], None, answer_column="a", format_regex=None, length_target=10,
                        length_mode="penalty")[0].fn
    assert pen("p", "x" * 5, row) == 0.0 and pen("p", "x" * 20, row) == -1.0
    with pytest.raises(RewardError, match="answer_column"):
        fns["exact_answer"]("p", "#### 1", {"question": "q"})
    with pytest.raises(RewardError, match="format_regex"):
        build_rewards(["format"], None, answer_column="a", format_regex=None, length_target=None,
                      length_mode="target")
    with pytest.raises(RewardError, match="no file"):
        build_rewards(["missing.py:f"], None, answer_column="a", format_regex=None, length_target=None,
                      length_mode="target", base_dir=tmp_path)


# ---- config -------------------------------------------------------------------------------------------------------

def test_config_parses_and_checks_grpo(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def score(prompt, completion, row):\n    return 1.0\n")
    f = tmp_path / "cfg.yaml"
    f.write_text("objective:\n  type: grpo\n  grpo:\n    rewards: [exact_answer, 'my_rewards.py:score']\n"
                 "    loss: gspo\n    num_generations: 4\n    epsilon_high: 0.28\n    beta: 0.04\n"
                 f"train:\n  output_dir: {tmp_path / 'run'}\n")
    cfg = TrainConfig.from_yaml(f)
    g = cfg.objective.grpo
    assert g.loss == "gspo" and g.num_generations == 4 and g.epsilon_high == 0.28 and g.beta == 0.04
    assert g.rewards == ["exact_answer", f"{(tmp_path / 'my_rewards.py').resolve()}:score"]
    with pytest.raises(ConfigError, match="needs objective.grpo.rewards"):
        TrainConfig.from_dict({"objective": {"type": "grpo"}})
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        TrainConfig.from_dict({"objective": {"type": "grpo", "grpo": {"rewards": ["format"], "num_generations": 1}}})
    with pytest.raises(ConfigError, match="'grpo', 'dr_grpo', 'gspo'"):
        TrainConfig.from_dict({"objective": {"type": "grpo", "grpo": {"rewards": ["format"], "loss": "ppo"}}})
    with pytest.raises(ConfigError, match="beta > 0 needs lora.enabled"):
        TrainConfig.from_dict({"objective": {"type": "grpo", "grpo": {"rewards": ["format"], "beta": 0.1}},
                               "lora": {"enabled": False}})


def test_a_kept_kv_cache_reserves_the_generators_projection_copies_too():
    """With keep_kv_cache the generator holds its KV cache and its concatenated q/k/v, gate/up weights through the
    training phase: the memory plan reserves both."""
    from fasttune.generation import fused_projection_bytes, kv_cache_bytes
    from fasttune.models import ArchSpec, CausalLM
    from fasttune.train.memory import GiB

    spec = ArchSpec.from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = CausalLM(spec)
    raw = {"objective": {"type": "grpo", "grpo": {"rewards": ["format"], "keep_kv_cache": True}}}
    cfg = TrainConfig.from_dict(raw)
    rows, length, extra = grpo.memory_plan_inputs(cfg, model)
    kv = kv_cache_bytes(spec, grpo.generation_rows(cfg), length, torch.float32)
    fused = fused_projection_bytes(model)
    assert fused == 2 * (32 + 16 + 16 + 48 + 48) * 32 * 4
    assert extra["reserve_bytes"] == 2 * GiB + kv + fused
    raw["objective"]["grpo"]["keep_kv_cache"] = False
    assert grpo.memory_plan_inputs(TrainConfig.from_dict(raw), model)[2] == {}


# ---- end to end ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from test_train import make_small_model

    return make_small_model(tmp_path_factory.mktemp("grpo_model"), tied=False)


def _peaked(model_dir: Path, out: Path, scale: float = 40.0) -> Path:
    """The small model with a larger LM head, so its next-token distribution has a few likely tokens to choose
    from (a near-uniform one over 4K tokens gives a group of 8 short completions nothing to compare)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    state = load_file(str(out / "model.safetensors"))
    key = next(k for k in state if k.endswith("lm_head.weight"))
    state[key] = state[key] * scale
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_reward_preferring_one_token_raises_its_frequency(small_model_dir, tmp_path):
    from fasttune.train import Trainer

    model_dir = _peaked(small_model_dir, tmp_path / "model")
    rewards_file = tmp_path / "rewards.py"  # the user's reward: occurrences of the target token's text
    rewards_file.write_text("from pathlib import Path\n"
                            "def likes_target(prompt, completion, row):\n"
                            "    target = Path(__file__).with_name('target.txt').read_text()\n"
                            "    return float(completion.count(target))\n")
    raw = {"model": {"path": str(model_dir), "max_seq_length": 96, "device": "cpu", "dtype": "float32"},
           "lora": {"r": 8, "alpha": 16},
           "data": {"path": "bundled:instructions", "max_examples": 16},
           "objective": {"type": "grpo", "grpo": {"rewards": [f"{rewards_file}:likes_target"], "num_generations": 8,
                                                  "max_new_tokens": 6, "max_prompt_length": 48, "beta": 0.0,
                                                  "samples_every": 2}},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 5, "batch_size": 2, "grad_accum": 1,
                     "lr": 3e-2, "schedule": "constant", "progress": False, "tensorboard": False, "plot": False,
                     "memory": "none", "seed": 3}}
    trainer = Trainer(TrainConfig.from_dict(raw))
    prompts = [e["prompt_ids"] for e in trainer.data.train[:4]]
    sampling = trainer.rl.sampling(seed=11)

    def counts() -> torch.Tensor:
        done = grpo.generate_completions(trainer.rl.generator, prompts, 16, sampling, merge_lora=True)
        trainer.rl.generator.release()
        return torch.bincount(torch.tensor([t for group in done for c in group for t in c]), minlength=5000)

    before = counts()
    special = set(trainer.rl.stop_ids) | {trainer.pad_id}
    target = next(int(t) for t in before.argsort(descending=True) if int(t) not in special)
    text = trainer.tokenizer.decode([target])
    assert text.strip(), "the target token decodes to text"
    (tmp_path / "target.txt").write_text(text)
    result = trainer.train()
    after = counts()
    share_before = before[target].item() / before.sum().item()
    share_after = after[target].item() / after.sum().item()
    assert share_after > share_before + 0.1, (share_before, share_after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 5 and all(math.isfinite(r["loss"]) for r in steps)
    for key in ("reward/likes_target", "kl", "clip_fraction", "completion_length", "completion_length_max"):
        assert key in steps[0]
    assert steps[-1]["reward"] > steps[0]["reward"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 3, 5} and len(samples) == 3 * 8
    assert result.adapter_dir is not None


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "gspo"])
def test_num_iterations_reuses_each_rollout_and_measures_kl(small_model_dir, tmp_path, loss_type):
    """mu = 2: each step's prompts come twice in a row and the second step trains on the first one's rollout (no
    generation), where the ratio and the KL to the adapters-off reference are no longer trivial."""
    from fasttune.train import Trainer

    model_dir = _peaked(small_model_dir, tmp_path / "model", scale=10.0)
    (tmp_path / "r.py").write_text("def r(prompt, completion, row):\n    return float(sum(map(ord, completion)) % 7)\n")
    raw = {"model": {"path": str(model_dir), "max_seq_length": 96, "device": "cpu", "dtype": "float32"},
           "lora": {"r": 4, "alpha": 8},
           "data": {"path": "bundled:instructions", "max_examples": 4},
           "objective": {"type": "grpo", "grpo": {"rewards": [f"{tmp_path / 'r.py'}:r"], "num_generations": 4,
                                                  "max_new_tokens": 5, "max_prompt_length": 40, "beta": 0.1,
                                                  "num_iterations": 2, "loss": loss_type, "samples_every": 0,
                                                  "epsilon_low": 0.01, "epsilon_high": 0.01}},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 2, "grad_accum": 1,
                     "lr": 2e-2, "progress": False, "tensorboard": False, "plot": False, "memory": "none"}}
    trainer = Trainer(TrainConfig.from_dict(raw))
    order = [tuple(e["prompt"] for e in b["examples"]) for b in trainer._epoch(0)]
    assert order[0] == order[1] and order[2] == order[3] and order[0] != order[2]
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["generate_s"] > 0 for r in steps] == [True, False, True, False]
    assert steps[0]["kl"] == 0.0  # adapters start at B = 0: policy == reference
    assert steps[1]["kl"] > 0 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[0]["clip_fraction"] == 0.0  # ratio 1 on the rollout's first step
    assert steps[1]["clip_fraction"] > 0  # the update moved the policy past a 1% clip range


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_grpo_on_cuda_runs_generation_and_the_triton_log_probs(tmp_path, load_in_4bit):
    """The bundled tiny model on CUDA in bf16 (and over an NF4 base): Generator rollouts (CUDA graphs; LoRA merged
    on the bf16 base, unmerged over NF4), the Triton per-token log-prob head, the KL reference pass, 3 steps with
    finite losses; the model's per-token log-probabilities match its materialised logits."""
    from fasttune.train import Trainer

    (tmp_path / "r.py").write_text("def r(prompt, completion, row):\n    return float(len(set(completion)))\n")
    raw = {"model": {"path": "tiny", "max_seq_length": 256, "device": "cuda", "dtype": "bfloat16",
                     "load_in_4bit": load_in_4bit},
           "lora": {"r": 8, "alpha": 16},
           "data": {"path": "bundled:instructions", "max_examples": 12},
           "objective": {"type": "grpo", "grpo": {"rewards": [f"{tmp_path / 'r.py'}:r"], "num_generations": 4,
                                                  "max_new_tokens": 32, "max_prompt_length": 64, "beta": 0.04,
                                                  "samples_every": 1}},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2, "grad_accum": 2,
                     "lr": 1e-3, "progress": False, "tensorboard": False, "plot": False}}
    trainer = Trainer(TrainConfig.from_dict(raw))
    assert trainer.rl.merge_lora == (not load_in_4bit)
    result = trainer.train()
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["completion_length"] > 0 and r["generate_s"] > 0 for r in rows if "reward" in r)
    b = trainer.rl.buffer[0]
    with torch.no_grad():
        got = grpo.token_logprobs(trainer.model, b["input_ids"], b["labels"])
        h = trainer.model(b["input_ids"], return_logits=False).last_hidden_state[:, :-1]
        want = trainer.model.logits(h).log_softmax(-1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
        want = want * (b["labels"][:, 1:] != -100)
    assert (got - want).abs().max().item() < 2e-2


def _interrupt_after_step_2(trainer, record):
    if trainer.step == 2:
        raise KeyboardInterrupt  # as Ctrl-C: the trainer saves a checkpoint and stops


def test_resume_reproduces_the_uninterrupted_run(small_model_dir, tmp_path):
    """Rollouts follow (train.seed, step) and each prompt's place in the step, and the checkpoint restores weights,
    optimizer and data position, so a run stopped after step 2 and resumed makes the same rollouts and losses as one
    that was not (mu = 2: the resumed step 3 is the second use of step 2's prompts and regenerates them, as step 2
    did)."""
    from fasttune.train import Trainer

    model_dir = _peaked(small_model_dir, tmp_path / "model", scale=10.0)
    (tmp_path / "r.py").write_text("def r(prompt, completion, row):\n    return float(sum(map(ord, completion)) % 7)\n")

    def make(out, mu):
        return Trainer(TrainConfig.from_dict({
            "model": {"path": str(model_dir), "max_seq_length": 96, "device": "cpu", "dtype": "float32"},
            "lora": {"r": 4, "alpha": 8}, "data": {"path": "bundled:instructions", "max_examples": 6},
            "objective": {"type": "grpo", "grpo": {"rewards": [f"{tmp_path / 'r.py'}:r"], "num_generations": 3,
                                                   "max_new_tokens": 4, "max_prompt_length": 40, "beta": 0.05,
                                                   "num_iterations": mu, "samples_every": 1}},
            "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 1, "grad_accum": 1, "lr": 2e-2,
                      "save_every": 1, "progress": False, "tensorboard": False, "plot": False, "memory": "none"}}))

    for mu in (1, 2):
        full = make(tmp_path / f"full{mu}", mu).train()
        first = make(tmp_path / f"cut{mu}", mu)
        first.callbacks.append(_interrupt_after_step_2)
        part = first.train()
        assert part.interrupted and part.step == 2
        rest = make(tmp_path / f"cut{mu}", mu).train(resume=True)
        if mu == 1:
            assert part.losses + rest.losses == full.losses
        else:  # step 3 regenerates the rollout the uninterrupted run reused: same prompts, another seed
            assert part.losses == full.losses[:2] and len(rest.losses) == 2
        samples = lambda run: [(s["step"], s["completion"]) for s in map(  # noqa: E731
            json.loads, (tmp_path / run / "samples.jsonl").read_text().splitlines())]
        if mu == 1:
            assert samples(f"cut{mu}") == samples(f"full{mu}")


def test_data_preview_shows_prompts_for_grpo_and_labels_for_kto():
    import io

    from fasttune.data.preview import preview

    root = Path(__file__).resolve().parents[1] / "configs"
    out = io.StringIO()
    result = preview(TrainConfig.from_yaml(root / "grpo_tiny.yaml"), rows=2, out=out)
    text = out.getvalue()
    assert "--- prompt 1:" in text and "<|im_start|>assistant" in text and "8 completions of up to 64" in text
    assert result["lengths"]["examples"] > 100 and "truncated to 128" in text
    out = io.StringIO()
    preview(TrainConfig.from_yaml(root / "kto_tiny.yaml"), rows=2, out=out)
    assert "--- row 1 desirable:" in out.getvalue() and "undesirable" in out.getvalue()
