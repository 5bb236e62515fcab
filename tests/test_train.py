"""Trainer: config validation, exact gradient accumulation, objectives against direct references, resume,
NaN stop, checkpoints and observability. Everything runs on a very small random Llama on CPU."""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasttune.data.packing import collate_padded
from fasttune.models import ArchSpec, CausalLM, save_model
from fasttune.train import ConfigError, TrainConfig, Trainer, TrainingDiverged
from fasttune.train import checkpoint as ckpt
from fasttune.train.objectives import RewardHead, dpo_loss, orpo_loss, reward_loss, sequence_logprobs

TINY = Path(__file__).resolve().parents[1] / "src" / "fasttune" / "assets" / "tiny"


def make_small_model(path: Path, tied: bool = True) -> Path:
    """A 2-layer Llama (hidden 32) with the shipped tokenizer, random init (seeded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TINY))
    cfg = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": tied,
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "torch_dtype": "float32"}
    torch.manual_seed(0)
    model = CausalLM(ArchSpec.from_hf_config(cfg))
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            torch.nn.init.normal_(p, std=0.05)
    save_model(model, path)
    (path / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY / f, path / f)
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("small_model"))


def config(model_path, out, **sections) -> TrainConfig:
    raw = {"model": {"path": str(model_path), "max_seq_length": 96, "device": "cpu"},
           "lora": {"r": 4, "alpha": 8},
           "data": {"path": "bundled:instructions", "max_examples": 40, "eval_fraction": 0.1},
           "objective": {"type": "sft"},
           "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-2,
                     "progress": False, "tensorboard": False, "plot": False, "memory": "none"}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return TrainConfig.from_dict(raw)


# ---- config ------------------------------------------------------------------------------------------------

def test_config_errors_name_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'.*allowed keys.*\blr\b"):
        TrainConfig.from_dict({"train": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*model, lora, data, objective, train"):
        TrainConfig.from_dict({"modle": {}})
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer, got 'four'"):
        TrainConfig.from_dict({"train": {"batch_size": "four"}})
    with pytest.raises(ConfigError, match=r"objective.type: 'ppo' is not allowed; allowed values: 'sft', 'pretrain', "
                                          r"'reward', 'dpo', 'orpo'"):
        TrainConfig.from_dict({"objective": {"type": "ppo"}})
    with pytest.raises(ConfigError, match=r"fsdp does not support train.optimizer: adamw8bit"):
        TrainConfig.from_dict({"train": {"parallel": "fsdp", "optimizer": "adamw8bit"}})
    with pytest.raises(ConfigError, match=r"lora.target_modules\[1\]: expected a string"):
        TrainConfig.from_dict({"lora": {"target_modules": ["q_proj", 3]}})
    with pytest.raises(ConfigError, match=r"train.lr must be > 0"):
        TrainConfig.from_dict({"train": {"lr": 0}})
    with pytest.raises(ConfigError, match=r"dpo needs lora.enabled"):
        TrainConfig.from_dict({"objective": {"type": "dpo"}, "lora": {"enabled": False}})
    with pytest.raises(ConfigError, match=r"train.max_grad_norm: expected a number or null"):
        TrainConfig.from_dict({"train": {"max_grad_norm": "x"}})
    # YAML file, overrides, ints accepted as floats, round trip
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1\n  max_steps: 5\nlora:\n  r: 4\n")
    cfg = TrainConfig.from_yaml(f, overrides=["train.max_steps=7", "objective.type=orpo"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.objective.type == "orpo" and cfg.lora.r == 4
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        TrainConfig.from_yaml(f)


# ---- exact gradient accumulation ---------------------------------------------------------------------------

def _grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_accumulation_4x1_equals_batch_of_4(small_model, tmp_path):
    trainer = Trainer(config(small_model, tmp_path, data={"packing": False}, lora={"dropout": 0.0}))
    examples = trainer.data.train[:4]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1, "examples of different lengths make the per-micro-batch-mean bug visible"
    with torch.no_grad():  # B = 0 at init makes every LoRA A-gradient zero; perturb so all gradients are live
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    pad = trainer.pad_id

    full = trainer.accumulate([collate_padded(examples, pad)])
    g_full = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    micro = trainer.accumulate([collate_padded([e], pad) for e in examples])
    g_micro = _grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)

    assert micro["target_tokens"] == full["target_tokens"]
    assert micro["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert g_full.keys() == g_micro.keys() and len(g_full) == 2 * 7 * 2  # A and B of 7 projections x 2 layers
    for name in g_full:
        torch.testing.assert_close(g_micro[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)

    # the bug fixed in 2024: averaging per-micro-batch means gives a different loss for unequal lengths
    means = [trainer.model(**{k: v for k, v in collate_padded([e], pad).items() if k != "real_tokens"}).loss.item()
             for e in examples]
    assert abs(sum(means) / 4 - full["loss"]) > 1e-3


# ---- objectives against direct computations -----------------------------------------------------------------

def _pairs_batch(trainer, n=2):
    from fasttune.train.data import collate_pairs

    return collate_pairs(trainer.data.train[:n], trainer.pad_id)


def _direct_logprobs(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    t = batch["labels"][:, 1:]
    tok = logp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
    return (tok * (t != -100)).sum(-1)


def test_sequence_logprobs_and_preference_losses_match_direct_formulas(small_model, tmp_path):
    trainer = Trainer(config(small_model, tmp_path, objective={"type": "dpo", "beta": 0.5},
                             data={"path": "bundled:preferences"}))
    model = trainer.model
    batch = _pairs_batch(trainer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    logp, n = sequence_logprobs(model, batch)
    direct = _direct_logprobs(model, batch)
    torch.testing.assert_close(logp.double(), direct, rtol=1e-5, atol=1e-4)
    assert torch.equal(n, (batch["labels"][:, 1:] != -100).sum(-1))

    # DPO: reference = the same model with adapters off
    from fasttune.adapters import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        ref = _direct_logprobs(model, batch)
    beta = 0.5
    rc, rr = beta * (direct[:2] - ref[:2]), beta * (direct[2:] - ref[2:])
    expected = -F.logsigmoid(rc - rr).sum() / 2
    loss, m = dpo_loss(model, batch, 2, beta, lambda: disable_adapters(model))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert float(m["reward_margin"]) == pytest.approx((rc - rr).sum().item(), rel=1e-3, abs=1e-5)
    assert float(m["reward_accuracy"]) == int(((rc - rr) > 0).sum())

    # ORPO
    nc, nr = n[:2].double(), n[2:].double()
    ac, ar = direct[:2] / nc, direct[2:] / nr
    lo = lambda a: a - torch.log1p(-torch.exp(a))  # noqa: E731
    exp_orpo = -direct[:2].sum() / nc.sum() + beta * (-F.logsigmoid(lo(ac) - lo(ar))).sum() / 2
    loss, _ = orpo_loss(model, batch, 2, int(nc.sum()), beta)
    assert loss.item() == pytest.approx(exp_orpo.item(), rel=1e-4)

    # Bradley-Terry reward loss
    head = RewardHead(model.spec.hidden_size)
    h = model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1
    r = (h[torch.arange(4), last] @ head.score.weight[0]).double()
    exp_bt = -F.logsigmoid(r[:2] - r[2:]).sum() / 2
    loss, _ = reward_loss(model, head, batch, 2)
    assert loss.item() == pytest.approx(exp_bt.item(), rel=1e-5)


def test_dpo_starts_at_log2_and_learns(small_model, tmp_path):
    cfg = config(small_model, tmp_path, objective={"type": "dpo", "beta": 0.5},
                 data={"path": "bundled:preferences", "max_examples": 10, "eval_fraction": 0.2},
                 train={"max_steps": 8, "lr": 2e-2, "eval_every": 4})
    trainer = Trainer(cfg)
    result = trainer.train()
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at B = 0: policy == reference
    trainer.data.eval = trainer.data.train  # the 8 training pairs, 4 epochs later: preferred answers now win
    fit = trainer.evaluate()
    assert fit["eval_loss"] < math.log(2) - 0.05 and fit["eval_reward_accuracy"] >= 0.75
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 8 and all("reward_margin" in r and 0 <= r["reward_accuracy"] <= 1 for r in steps)
    assert [r["step"] for r in rows if "eval_reward_accuracy" in r] == [4, 8]


# ---- resume, interruption, NaN ------------------------------------------------------------------------------

def _interrupt_after(step):
    def cb(trainer, record):
        if trainer.step == step:
            raise KeyboardInterrupt
    return cb


def test_resume_reproduces_the_uninterrupted_losses(small_model, tmp_path):
    sections = dict(lora={"dropout": 0.1}, train={"max_steps": 6, "save_every": 2, "keep_last": 5,
                                                  "schedule": "linear", "warmup_steps": 2})
    full = Trainer(config(small_model, tmp_path / "full", **sections)).train()
    assert len(full.losses) == 6

    # Ctrl-C after step 3: a checkpoint is saved and the run says it was interrupted
    first = Trainer(config(small_model, tmp_path / "cut", **sections))
    first.callbacks.append(_interrupt_after(3))
    part = first.train()
    assert part.interrupted and part.step == 3 and part.adapter_dir is None
    rest = Trainer(config(small_model, tmp_path / "cut", **sections)).train(resume=True)
    assert part.losses + rest.losses == full.losses  # bit-identical on CPU

    # Ctrl-C in the middle of step 4 (second micro-batch): step 4 is dropped and redone on resume
    mid = Trainer(config(small_model, tmp_path / "mid", **sections))
    calls = {"n": 0}
    real_micro_loss = mid.micro_loss

    def micro_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 2 + 2:
            raise KeyboardInterrupt
        return real_micro_loss(*args, **kwargs)
    mid.micro_loss = micro_loss
    part = mid.train()
    assert part.interrupted and part.step == 3
    rest = Trainer(config(small_model, tmp_path / "mid", **sections)).train(resume=True)
    assert part.losses + rest.losses == full.losses

    # a "killed" run: only the atomically written checkpoint of step 2 survives
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", killed / "checkpoints" / "step-000002")
    again = Trainer(config(small_model, killed, **sections)).train(resume=True)
    assert again.losses == full.losses[2:]

    # metrics.jsonl of the resumed run reads as one run; checkpoints are complete and no temp folder is left
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004", "step-000006"]
    for name in names:
        files = {p.name for p in (tmp_path / "full" / "checkpoints" / name).iterdir()}
        assert files == {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}


def test_keep_last_and_atomic_write(small_model, tmp_path):
    trainer = Trainer(config(small_model, tmp_path, train={"max_steps": 3, "save_every": 1, "keep_last": 2}))
    trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    # a crash mid-write leaves only a hidden temp folder, which resume ignores
    (tmp_path / "checkpoints" / ".tmp-step-000004-1").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000003"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(small_model, tmp_path):
    trainer = Trainer(config(small_model, tmp_path, train={"max_steps": 5, "save_every": 1}))

    def poison(tr, record):
        if tr.step == 2:
            with torch.no_grad():
                next(p for n, p in tr.model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    trainer.callbacks.append(poison)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*last good checkpoint is .*step-000002"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(t).all() for t in state["weights"].values())


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_inf_gradients_under_a_finite_loss_stop_before_the_update(small_model, tmp_path, max_grad_norm):
    """A finite loss can back-propagate an inf gradient (clipping then turns every gradient into NaN): the step
    must stop before the optimizer writes it into the weights, so the last checkpoint stays good."""
    trainer = Trainer(config(small_model, tmp_path, train={"max_steps": 5, "save_every": 1,
                                                           "max_grad_norm": max_grad_norm}))
    lora_a = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    lora_a.register_hook(lambda g: g.fill_(float("inf")) if trainer.step == 2 else g)
    with pytest.raises(TrainingDiverged, match=r"gradient norm is (inf|nan) at step 3.*last good checkpoint is "
                                               r".*step-000002"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert all(torch.isfinite(t).all() for t in state["weights"].values())


# ---- continued pre-training, observability ------------------------------------------------------------------

def test_pretrain_trains_embeddings_at_their_own_lr_and_writes_observability(small_model, tmp_path, capsys):
    cfg = config(small_model, tmp_path, objective={"type": "pretrain", "embedding_lr_ratio": 0.1},
                 data={"path": "bundled:corpus", "max_examples": 30},
                 train={"plot": True, "max_steps": 3, "progress": True})
    trainer = Trainer(cfg)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)
    emb = trainer.model.model.embed_tokens.weight
    assert any(p is emb for p in groups[1]["params"]) and emb.requires_grad
    before = emb.detach().clone()
    result = trainer.train()
    assert not torch.equal(before, emb.detach())
    bar = capsys.readouterr().err  # tqdm: steps, ETA, loss, lr, tokens/s
    assert "3/3" in bar and "loss=" in bar and "lr=" in bar and "tok/s=" in bar
    assert (tmp_path / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in rows if "loss" in r)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()  # PEFT layout (LoRA only)
    from safetensors.torch import load_file

    saved = load_file(str(result.adapter_dir / "trainable.safetensors"))  # everything trained, embeddings included
    torch.testing.assert_close(saved["model.model.embed_tokens.weight"], emb.detach())


def test_tensorboard_scalars_match_the_metrics_file(small_model, tmp_path):
    """When `tensorboard` is installed (a dev dependency, so CI runs this), every logged number is a scalar there."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    Trainer(config(small_model, tmp_path, train={"tensorboard": True, "max_steps": 3, "eval_every": 3})).train()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "eval_loss"):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert logged, key
        scalars = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in scalars] == [s for s, _ in logged], key
        assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6), key


def test_saved_adapter_reloads_onto_the_base(small_model, tmp_path):
    from fasttune.build import load_trained

    trainer = Trainer(config(small_model, tmp_path, train={"max_steps": 2}))
    result = trainer.train()
    model, _ = load_trained(result.adapter_dir, device="cpu", dtype="float32")
    ids = torch.tensor([[0, 5, 9, 33, 70]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trainer.model(ids).logits, rtol=0, atol=1e-6)


def test_out_of_memory_is_explained_with_options(small_model, tmp_path):
    from fasttune.train import OutOfMemory

    trainer = Trainer(config(small_model, tmp_path, train={"batch_size": 4}))

    def oom(group):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    trainer._accumulate = oom
    with pytest.raises(OutOfMemory) as e:
        trainer.train()
    msg = str(e.value)
    for option in ("load_in_4bit", "train.memory: offload", "max_seq_length", "train.batch_size", "adamw8bit"):
        assert option in msg


def test_ctrl_c_right_after_the_optimizer_update_keeps_that_step_whole(small_model, tmp_path):
    """A SIGINT that lands after the weights were updated but before the step was counted and logged is held until
    the step boundary: the checkpoint holds step 3's weights, count, data position and metrics line together."""
    import os
    import signal

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, Python's default handler in a terminal
    sections = dict(lora={"dropout": 0.1}, train={"max_steps": 6, "schedule": "linear", "warmup_steps": 2})
    full = Trainer(config(small_model, tmp_path / "full", **sections)).train()
    cut = Trainer(config(small_model, tmp_path / "cut", **sections))
    updates = {"n": 0}

    def signal_after_update(optimizer, args, kwargs):
        updates["n"] += 1
        if updates["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # delivered at once in the main thread, inside the step
    cut.optimizer.register_step_post_hook(signal_after_update)
    part = cut.train()
    assert part.interrupted and part.step == 3 and part.losses == full.losses[:3]
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is restored
    rest = Trainer(config(small_model, tmp_path / "cut", **sections)).train(resume=True)
    assert part.losses + rest.losses == full.losses
    logged = [json.loads(line)["loss"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == full.losses


def test_ctrl_c_on_a_real_process_saves_and_resume_continues_the_same_losses(small_model, tmp_path):
    """SIGINT to a running `fasttune train`: exit code 130 with a checkpoint; --resume then reproduces the
    losses of an uninterrupted run (constant LR, so max_steps does not shape the schedule)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    n = 30
    sections = dict(train={"schedule": "constant", "max_steps": n, "lr": 1e-2, "batch_size": 1, "grad_accum": 1},
                    data={"max_examples": 80})
    full = Trainer(config(small_model, tmp_path / "full", **sections)).train()
    cfg = config(small_model, tmp_path / "cut", **sections)
    cfg.train.max_steps = 100_000  # would run for a long time; it is stopped by SIGINT
    (tmp_path / "cut.yaml").write_text(cfg.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a terminal's SIGINT disposition for the child: a test run started as a background job ignores SIGINT, an
    # ignored SIGINT is inherited, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "fasttune", "train", str(tmp_path / "cut.yaml")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted at step" in out and "--resume" in out
    stopped = ckpt.latest_checkpoint(tmp_path / "cut")
    k = int(stopped.name.split("-")[1])
    assert k >= 2
    resumed = config(small_model, tmp_path / "cut", **sections)
    Trainer(resumed).train(resume=True)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if "loss" in json.loads(line)]
    assert losses[:n] == full.losses


def test_loss_png_is_drawn_even_without_matplotlib(tmp_path, monkeypatch):
    """Every run leaves loss.png: without matplotlib a dependency-free PNG (valid, the curve and eval points drawn
    where the numbers put them)."""
    import sys

    from PIL import Image

    from fasttune.train.observe import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 21)] + [{"step": 10, "eval_loss": 2.5},
                                                                          {"step": 20, "eval_loss": 1.9}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = plot_losses(metrics, tmp_path / "loss.png")
    assert png == tmp_path / "loss.png"
    img = Image.open(png).convert("RGB")
    w, h = img.size
    pixels = img.load()
    blue = [(x, y) for x in range(w) for y in range(h) if pixels[x, y] == (31, 119, 180)]
    orange = [(x, y) for x in range(w) for y in range(h) if pixels[x, y] == (255, 127, 14)]
    assert blue and orange
    # the loss falls with the step: the line's left end is high (small y), its right end low
    left_end = min(blue)
    right_end = max(blue)
    assert left_end[1] < h / 3 and right_end[1] > h / 2
    # two eval points: step 10 (2.5) mid-way across, step 20 (1.9) at the right and lower
    mid = [p for p in orange if p[0] < w * 0.75]
    last = [p for p in orange if p[0] >= w * 0.75]
    assert mid and last and min(x for x, _ in mid) > w * 0.3
    assert sum(y for _, y in last) / len(last) > sum(y for _, y in mid) / len(mid) + 20
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_losses(empty, tmp_path / "none.png") is None


def test_the_epoch_tail_that_fills_no_step_is_reported(small_model, tmp_path, capsys):
    trainer = Trainer(config(small_model, tmp_path, train={"max_steps": 1, "progress": False}))
    n = len(trainer._epoch(0))
    assert trainer.steps_per_epoch == n // trainer.micro_per_step and trainer.epoch_tail == n % trainer.micro_per_step
    grad_accum = next(g for g in range(3, 9) if n % g)  # an accumulation that leaves a tail
    trainer = Trainer(config(small_model, tmp_path / "b", train={"max_steps": 1, "grad_accum": grad_accum,
                                                                 "batch_size": 2}))
    trainer.train()
    out = capsys.readouterr().out
    assert f"the last {n % grad_accum} micro-batch(es) of an epoch do not fill a step" in out


def test_metrics_file_cut_off_by_a_kill_resumes(tmp_path):
    """A process killed mid-write leaves half a JSON line at the end of metrics.jsonl: resuming drops it (and
    the lines past the resumed step); a broken line anywhere else is still an error."""
    from fasttune.train.observe import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "loss": 1.8}\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(path, resume_step=2, tensorboard=False).log({"step": 3, "loss": 1.7})
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}, {"step": 3, "loss": 1.7}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.9}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)


# ---- streaming ---------------------------------------------------------------------------------------------

def test_streamed_training_matches_the_in_memory_run_and_resumes(small_model, tmp_path, capsys):
    """data.streaming: the file is re-read and tokenised pass by pass (nothing held but the eval split). In the
    same order (no shuffle, no eval split) it trains exactly as the in-memory run, across an epoch boundary; a
    checkpoint taken mid-stream resumes to the same losses."""
    common = dict(data={"max_examples": 24, "eval_fraction": 0.0, "shuffle": False},
                  train={"max_steps": 6, "batch_size": 1, "grad_accum": 2, "save_every": 2})
    listed = Trainer(config(small_model, tmp_path / "list", **common))
    assert listed.steps_per_epoch < 6  # the run crosses into a second epoch
    loss_list = listed.train().losses
    stream_cfg = config(small_model, tmp_path / "stream", data={**common["data"], "streaming": True},
                        train=common["train"])
    streamed = Trainer(stream_cfg)
    assert type(streamed.data.train).__name__ == "StreamingExamples"
    result = streamed.train()
    assert "streamed train" in capsys.readouterr().out
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(loss_list), rtol=1e-6, atol=1e-7)
    assert streamed.epoch == listed.epoch >= 1

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "stream" / "checkpoints" / "step-000004", resumed_dir / "checkpoints" / "step-000004")
    resumed = Trainer(config(small_model, resumed_dir, data={**common["data"], "streaming": True},
                             train=common["train"])).train(resume=True)
    assert resumed.losses == pytest.approx(loss_list[4:], rel=1e-6)


def test_streaming_shuffles_and_holds_out_an_eval_split(small_model, tmp_path):
    cfg = config(small_model, tmp_path, data={"max_examples": 40, "eval_fraction": 0.2, "streaming": True,
                                              "shuffle_buffer": 8}, train={"max_steps": 2})
    trainer = Trainer(cfg)
    assert 0 < len(trainer.data.eval) < 40
    first = [b["input_ids"].tolist() for b in itertools.islice(trainer._stream_batches(0), 3)]
    again = [b["input_ids"].tolist() for b in itertools.islice(trainer._stream_batches(0), 3)]
    other = [b["input_ids"].tolist() for b in itertools.islice(trainer._stream_batches(1), 3)]
    assert first == again and first != other  # seeded by the epoch
    result = trainer.train()
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


def test_streaming_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.streaming: true needs train.max_steps"):
        TrainConfig.from_dict({"data": {"streaming": True}, "train": {"max_steps": None}})
    with pytest.raises(ConfigError, match="data.streaming works for objective.type sft and pretrain, not dpo"):
        TrainConfig.from_dict({"data": {"streaming": True}, "objective": {"type": "dpo"}, "train": {"max_steps": 3}})


def test_label_smoothing_reaches_the_fused_loss(small_model, tmp_path, monkeypatch):
    """objective.label_smoothing: the model's fused loss equals F.cross_entropy(..., label_smoothing) on
    materialised logits (loss and gradients), and the trainer's first-step loss is that loss."""
    from fasttune.models import load_model

    model = load_model(small_model).float()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.spec.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels, label_smoothing=0.1)
    logits = model(ids).logits[:, :-1].reshape(-1, model.spec.vocab_size)
    want = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    plain = model(ids, labels=labels).loss
    assert abs(plain.item() - out.loss.item()) > 1e-3  # smoothing changes the loss (so the check above means something)
    w = model.model.layers[0].mlp.down_proj.weight
    got_grad = torch.autograd.grad(out.loss, w)[0]
    want_grad = torch.autograd.grad(F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, model.spec.vocab_size),
                                                    labels[:, 1:].reshape(-1), label_smoothing=0.1), w)[0]
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)

    from fasttune import kernels

    seen = []
    real = kernels.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return real(*args, **kwargs)
    monkeypatch.setattr(kernels, "fused_linear_cross_entropy", spy)
    Trainer(config(small_model, tmp_path / "s", objective={"label_smoothing": 0.1}, train={"max_steps": 1})).train()
    assert seen and set(seen) == {0.1}
    with pytest.raises(ConfigError, match="label_smoothing applies to sft and pretrain, not dpo"):
        TrainConfig.from_dict({"objective": {"type": "dpo", "label_smoothing": 0.1}})


def test_lora_target_modules_accept_peft_spellings():
    assert TrainConfig.from_dict({"lora": {"target_modules": "all-linear"}}).lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert TrainConfig.from_dict({"lora": {"target_modules": ["v", "q", "lm_head"]}}).lora.target_modules == [
        "q_proj", "v_proj", "lm_head"]
    assert TrainConfig.from_dict({"lora": {"target_modules": "q_proj, o_proj"}}).lora.target_modules == [
        "q_proj", "o_proj"]
    with pytest.raises(ConfigError, match=r"lora.target_modules: unknown LoRA target 'qq'.*lm_head"):
        TrainConfig.from_dict({"lora": {"target_modules": ["qq"]}})


def test_sigint_guard_keeps_an_ignored_sigint_ignored():
    """A process that ignores SIGINT (started as a background job) keeps ignoring it inside the update window too;
    with Python's handler the held signal is raised at the boundary."""
    import os
    import signal

    from fasttune.train.trainer import _SigintGuard

    before = signal.getsignal(signal.SIGINT)
    try:
        for disposition, raises in ((signal.SIG_IGN, False), (signal.default_int_handler, True)):
            signal.signal(signal.SIGINT, disposition)
            guard = _SigintGuard()
            guard.defer()
            os.kill(os.getpid(), signal.SIGINT)
            if raises:
                with pytest.raises(KeyboardInterrupt):
                    guard.release()
            else:
                try:
                    guard.release()
                except KeyboardInterrupt:
                    pytest.fail("an ignored SIGINT was raised at the step boundary")
            assert signal.getsignal(signal.SIGINT) is disposition
    finally:
        signal.signal(signal.SIGINT, before)
