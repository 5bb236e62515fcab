"""The config file as untrusted input (issue 19 item 8, and item 5's output_dir): numbers finite and in range,
duplicate keys and alias bombs refused, quoted values cut, a run folder that is not the user's own working or config
folder; each a one-line `config error`, exit 2, no traceback."""
from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasttune.cli import main
from fasttune.train import ConfigError, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _load(tmp_path: Path, text: str) -> TrainConfig:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    return TrainConfig.from_yaml(cfg)


@pytest.mark.parametrize("text,message", [
    ("train: {lr: .nan}", "train.lr: expected a finite number, got nan"),
    ("train: {lr: .inf}", "train.lr: expected a finite number, got inf"),
    ("train: {lr: -1.0e-4}", "train.lr must be > 0"),
    ("train: {betas: [0.9, 1.5]}", r"train.betas\[1\] must be in \[0, 1\), got 1.5"),
    ("train: {betas: [-0.1, 0.9]}", r"train.betas\[0\] must be in \[0, 1\)"),
    ("train: {weight_decay: -10}", "train.weight_decay must be >= 0, got -10"),
    ("train: {epochs: .inf}", "train.epochs: expected a finite number, got inf"),
    ("train: {epochs: 0}", "train.epochs must be > 0, got 0"),
    ("train: {warmup_steps: -5}", "train.warmup_steps must be >= 0, got -5"),
    ("train: {max_grad_norm: .nan}", "train.max_grad_norm: expected a finite number or null, got nan"),
    ("train: {max_grad_norm: 0}", "train.max_grad_norm must be > 0, or null for no clipping"),
    ("lora: {alpha: .nan}", "lora.alpha: expected a finite number, got nan"),
    ("lora: {alpha: 0}", "lora.alpha must be > 0"),
    ("lora: {r: 0}", "lora.r must be >= 1"),
    ("lora: {dropout: 1.0}", r"lora.dropout must be in \[0, 1\)"),
    ("objective: {beta: -1}", "objective.beta must be > 0"),
    ("data: {max_examples: 0}", "data.max_examples must be >= 1 or null"),
])
def test_numbers_must_be_finite_and_in_range(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_duplicate_keys_are_refused_naming_the_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice in one mapping \(lines 2 and 3\)"):
        _load(tmp_path, "train:\n  lr: 1.0e-4\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice"):
        _load(tmp_path, "train: {lr: 1.0e-4}\nmodel: {path: tiny}\ntrain: {max_steps: 3}\n")
    # a merge key is not a duplicate, nor is a key that overrides a merged one
    cfg = _load(tmp_path, "train:\n  <<: {lr: 1.0e-3, max_steps: 3}\n  lr: 2.0e-3\n")
    assert cfg.train.lr == 2e-3 and cfg.train.max_steps == 3


def test_a_billion_laughs_config_is_refused_at_once_under_a_memory_limit(tmp_path):
    """9 levels of 9 aliases under a known key: the old error message printed every expanded value (3.7 GB)."""
    bomb = "train:\n  lr: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"  x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(bomb)

    def limit():  # 2 GiB of address space: expanding the bomb (or printing it) cannot fit
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fasttune", "train", str(cfg)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.perf_counter() - start < 60
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and len(lines[0]) < 400, proc.stderr[-2000:]
    assert "YAML aliases" in lines[0]


def test_an_alias_expansion_past_the_node_cap_is_refused_even_with_few_aliases(tmp_path):
    # 4 levels of 10 aliases (40 aliases, under the alias cap) expand to 123,461 values with the keys
    text = "a0: &a0 [" + ", ".join(["x"] * 10) + "]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 5))
    with pytest.raises(ConfigError, match=r"expands to 123,461 values through its aliases \(more than 100,000\)"):
        _load(tmp_path, text)


def test_quoted_values_are_cut_in_messages(tmp_path):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "train: {lr: '" + "x" * 100_000 + "'}")
    assert len(str(e.value)) < 200 and "..." in str(e.value)
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "train: {batch_size: [" + ", ".join(["[1, 2, 3]"] * 5000) + "]}")
    assert len(str(e.value)) < 200
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "modle" * 10_000 + ": 1")
    assert len(str(e.value)) < 250 and "\n" not in str(e.value)


@pytest.mark.parametrize("output_dir", ["''", "'.'", "'  '", "CONFIG_DIR"])
def test_output_dir_must_be_a_folder_of_its_own(tmp_path, monkeypatch, capsys, output_dir):
    """`output_dir: "."` overwrote the user's own commented config.yaml."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "config.yaml"
    text = f"train: {{output_dir: {output_dir}}}\n".replace("CONFIG_DIR", str(tmp_path))
    cfg.write_text("# my own notes\n" + text)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "fasttune train: config error: train.output_dir" in err and "runs/my-run" in err
    assert cfg.read_text() == "# my own notes\n" + text


def test_the_shipped_configs_are_valid():
    for f in sorted(CONFIGS.glob("*.yaml")):
        TrainConfig.from_yaml(f)


def test_bad_values_through_the_cli_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train: {output_dir: out, lr: .nan}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fasttune train: config error: train.lr: expected a finite number, got nan"
    assert main(["train", str(cfg), "--set", "train.lr=1.0e-4", "--set", "train.epochs=.inf"]) == 2
    assert "train.epochs: expected a finite number, got inf" in capsys.readouterr().err
