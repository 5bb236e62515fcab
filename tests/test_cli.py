"""The `fasttune` command: --help on every subcommand, train -> generate/chat with the adapter, config errors,
the demo (the README's main command) and bench listing."""
from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttune.cli import build_parser, main

from test_train import make_small_model

TINY = Path(__file__).resolve().parents[1] / "src" / "fasttune" / "assets" / "tiny"
COMMANDS = ["demo", "train", "chat", "generate", "export", "doctor", "compare", "bench"]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("cli_model"))


def test_every_command_has_complete_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(COMMANDS) <= set(sub.choices)
    expected = {"train": ["--resume", "--set", "--gpus", "--print-defaults"],
                "chat": ["--adapter", "--model", "--system", "--temperature", "--chat-template"],
                "generate": ["--prompt", "--raw", "--max-new-tokens"],
                "demo": ["--steps", "--output-dir"],
                "export": ["--format", "--adapter"], "doctor": ["--fix"], "bench": ["script"]}
    for command in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "not available in this install" not in text, f"fasttune {command} is not wired"
        for option in expected.get(command, []):
            assert option in text, f"fasttune {command} --help does not mention {option}"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "fasttune", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo" in out.stdout and "train" in out.stdout


def test_train_then_generate_and_chat_with_the_adapter(small_model, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{path: {small_model}, max_seq_length: 96, device: cpu}}
lora: {{r: 4, alpha: 8}}
data: {{path: "bundled:instructions", max_examples: 24}}
train: {{output_dir: {tmp_path / 'out'}, max_steps: 2, batch_size: 2, progress: false, tensorboard: false}}
""")
    assert main(["train", str(cfg), "--set", "train.lr=1e-2"]) == 0
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "trainable.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert (tmp_path / "out" / "loss.png").exists()
    capsys.readouterr()

    assert main(["generate", "--adapter", str(adapter), "--prompt", "What is 2 + 2?", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one reply line per prompt (a random model may say little)
    replies = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(replies))
    assert main(["chat", "--adapter", str(adapter), "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("assistant>") == 2

    # resume after completion continues nowhere (already at max_steps) but loads cleanly
    assert main(["train", str(cfg), "--resume"]) == 0


def test_chat_formats_prompts_as_the_adapter_was_trained(small_model, tmp_path, monkeypatch):
    """A run trained with data.chat_template: alpaca and a system prompt: chat/generate with its adapter use that
    template and prompt (not the tokenizer's own), unless the command line says otherwise."""
    from fasttune.cli import _load_for_inference, _session

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{path: {small_model}, max_seq_length: 96, device: cpu}}
data: {{path: "bundled:instructions", max_examples: 12, chat_template: alpaca, system_prompt: "Be brief."}}
train: {{output_dir: {tmp_path / 'out'}, max_steps: 1, progress: false, tensorboard: false, plot: false}}
""")
    assert main(["train", str(cfg)]) == 0
    adapter = str(tmp_path / "out" / "adapter")
    args = build_parser().parse_args(["chat", "--adapter", adapter, "--device", "cpu"])
    model, tokenizer = _load_for_inference(args)
    session = _session(args, model, tokenizer, system=args.system)
    assert session.template.name == "alpaca" and session.system == "Be brief."
    args = build_parser().parse_args(["chat", "--adapter", adapter, "--device", "cpu", "--chat-template", "chatml",
                                      "--system", "Be long."])
    session = _session(args, model, tokenizer, system=args.system)
    assert session.template.name == "chatml" and session.system == "Be long."

    # /reset in `fasttune chat` keeps the recorded system prompt
    import fasttune.cli as cli

    sessions = []
    monkeypatch.setattr(cli, "_session", lambda *a, **k: sessions.append(_session(*a, **k)) or sessions[-1])
    replies = iter(["hello", "/reset", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(replies))
    assert main(["chat", "--adapter", adapter, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert sessions[0].messages == [{"role": "system", "content": "Be brief."}]


def test_config_errors_exit_2_with_the_key_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr: fast\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.lr: expected a number" in err
    assert main(["train", str(cfg), "--set", "train.lr=1e-4", "--set", "train.optimiser=sgd"]) == 2
    assert "unknown key 'train.optimiser'" in capsys.readouterr().err
    assert main(["train", "--print-defaults"]) == 0
    assert "max_grad_norm" in capsys.readouterr().out


def test_data_errors_and_out_of_memory_at_load_are_explained_not_traced(small_model, tmp_path, capsys,
                                                                         monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "answer": "d"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{path: {small_model}, max_seq_length: 96, device: cpu}}
data: {{path: "{data}"}}
train: {{output_dir: {tmp_path / 'out'}, max_steps: 1, progress: false, tensorboard: false, plot: false}}
""")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and "d.jsonl, line 2" in err and "data.response_template" in err
    assert "Traceback" not in err

    # a setting the loaded model cannot take (LoRA on a tied LM head) is a config error too, found at load
    cfg.write_text(cfg.read_text().replace('data: {path: "' + str(data) + '"}', 'data: {path: "bundled:instructions"}')
                   + "lora: {target_modules: [q_proj, lm_head]}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "config error: lora: LoRA on lm_head is not possible" in err and "Traceback" not in err

    import fasttune.train.trainer as trainer

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(trainer.Trainer, "__init__", no_memory)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "ran out of memory loading the model" in err and "model.load_in_4bit: true" in err


def test_demo_runs_on_the_shipped_tiny_model(tmp_path, capsys):
    assert (TINY / "model.safetensors").exists() and (TINY / "model.safetensors").stat().st_size < 10_000_000
    assert main(["demo", "--steps", "3", "--output-dir", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train loss:" in out and "after fine-tune:" in out and "fasttune chat --adapter" in out
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "demo" / "loss.png").exists()


def test_bench_lists_the_benchmarks(capsys):
    assert main(["bench"]) == 0
    assert "kernels" in capsys.readouterr().out
