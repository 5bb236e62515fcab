"""Issue 13 items 10, 11, 18: `--set` takes string keys verbatim; data.encoding and model.allow_pickle exist and the
advice names them; --print-defaults documents every key; docs/config.md is generated from the same comments."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fasttune.cli import main
from fasttune.train.config import ConfigError, TrainConfig

from test_train import make_small_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("set_docs_model"))


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---- item 11: --set --------------------------------------------------------------------------------------------

def test_set_takes_string_keys_verbatim():
    cfg = TrainConfig.from_dict({}, ["data.prompt_template=[{category}] {instruction}",  # YAML: a flow sequence
                                     "data.response_template={instruction}",  # YAML: a mapping
                                     "data.system_prompt=yes: no # not a comment",
                                     "data.format=csv", "train.output_dir=runs/x=1"])
    assert cfg.data.prompt_template == "[{category}] {instruction}"
    assert cfg.data.response_template == "{instruction}"
    assert cfg.data.system_prompt == "yes: no # not a comment"
    assert cfg.data.format == "csv" and cfg.train.output_dir == "runs/x=1"
    # a YAML-quoted value loses its quotes (as when every value was YAML); a lone quote, or two scalars, are text
    cfg = TrainConfig.from_dict({}, ['data.chat_template="a: {b}"', "data.path='it''s'", "model.path='{x}",
                                     "data.system_prompt='a' or 'b'"])
    assert cfg.data.chat_template == "a: {b}" and cfg.data.path == "it's" and cfg.model.path == "'{x}"
    assert cfg.data.system_prompt == "'a' or 'b'"


def test_set_null_for_nullable_string_keys_and_yaml_for_the_rest():
    cfg = TrainConfig.from_dict({"data": {"chat_template": "chatml"}},
                                ["data.chat_template=null", "train.lr=1e-4", "lora.target_modules=[q, v]",
                                 "train.max_steps=7", "data.packing=false", "train.max_grad_norm=~"])
    assert cfg.data.chat_template is None and cfg.train.lr == 1e-4 and cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.packing is False
    assert cfg.train.max_grad_norm is None


@pytest.mark.parametrize("item, needles", [
    ("train.lr=[1", ["--set", "train.lr", "not valid YAML", "column"]),
    ("train.lr={a}", ["train.lr", "expected a number"]),
    ("lora.target_modules=[q", ["lora.target_modules", "not valid YAML", "quote it"]),
    ("data.format=xml", ["data.format", "'jsonl'"]),
    ("data.nope=1", ["unknown key", "data.nope"]),
])
def test_set_errors_are_one_line_config_errors(item, needles, tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({}, [item])
    assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train: {{output_dir: {tmp_path / 'out'}}}\n")
    assert main(["train", str(cfg), "--set", item]) == 2
    _one_line_error(capsys, "config error", *needles[:2])


# ---- item 10: data.encoding, model.allow_pickle ------------------------------------------------------------------

def test_data_encoding_reaches_the_readers_and_the_advice_names_it(small_model, tmp_path):
    from fasttune.data import DataError
    from fasttune.models import load_tokenizer
    from fasttune.train.data import prepare_data

    rows = tmp_path / "rows.csv"
    rows.write_bytes("instruction,output\nSay café,Café crème\nSay naïve,Naïve\n".encode("cp1252"))
    tok = load_tokenizer(small_model)
    cfg = TrainConfig.from_dict({"data": {"path": str(rows), "eval_fraction": 0.0, "shuffle": False}},
                                ["data.encoding=cp1252"])
    assert cfg.data.encoding == "cp1252"
    data = prepare_data(cfg.data, tok, 64, 0, "sft")
    assert "café" in tok.decode(data.train[0]["input_ids"])
    with pytest.raises(DataError) as e:  # read as UTF-8 (the default): the hint names the config key
        prepare_data(TrainConfig.from_dict({"data": {"path": str(rows)}}).data, tok, 64, 0, "sft")
    assert "data.encoding" in str(e.value) and "to the reader" not in str(e.value)
    with pytest.raises(ConfigError, match="data.encoding 'utf-9' is not a text encoding"):
        TrainConfig.from_dict({"data": {"encoding": "utf-9"}})


def test_model_allow_pickle_is_a_config_key_named_by_the_refusal(small_model, tmp_path, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(small_model, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
model: {{path: {folder}, max_seq_length: 64, device: cpu}}
lora: {{r: 2, alpha: 4}}
data: {{path: "bundled:instructions", max_examples: 8}}
train: {{output_dir: {tmp_path / 'out'}, max_steps: 1, batch_size: 2, progress: false, tensorboard: false,
         plot: false}}
""")
    assert main(["train", str(cfg)]) == 2
    _one_line_error(capsys, "pytorch_model.bin", "model.allow_pickle: true")
    assert main(["train", str(cfg), "--set", "model.allow_pickle=true"]) == 0
    assert (tmp_path / "out" / "adapter" / "trainable.safetensors").is_file()


def test_no_advice_names_an_option_that_does_not_exist():
    """The readers' and trainer's texts name the config keys (models/ speaks to Python callers: allow_pickle=True)."""
    for path in ("src/fasttune/data/readers.py", "src/fasttune/train/trainer.py", "src/fasttune/train/data.py"):
        text = (ROOT / path).read_text()
        assert "to the reader" not in text, path


# ---- item 18: --print-defaults, docs/config.md -------------------------------------------------------------------

def test_print_defaults_documents_every_key_and_loads_back(capsys):
    from fasttune.train.config_docs import key_docs

    assert main(["train", "--print-defaults"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == TrainConfig().to_dict()
    comment_of, path, previous = {}, [], ""
    for line in out.splitlines():  # the comment line above each key, by dotted key (sections nest by indent)
        if line and not line.lstrip().startswith("#"):
            depth = (len(line) - len(line.lstrip())) // 2
            path = path[:depth] + [line.strip().split(":", 1)[0]]
            comment_of[".".join(path)] = previous
        previous = line
    docs = key_docs()
    assert len(docs) > 60 and len(comment_of) == len(docs)
    for doc in docs:
        assert doc.meaning, f"{doc.key} has no comment in config.py"
        assert comment_of[doc.key].strip().startswith("# " + doc.meaning), (doc.key, comment_of[doc.key])
    assert "[one of 'auto', 'float32', 'bfloat16', 'float16']" in out  # allowed values from the type
    assert "# text encoding of jsonl/json/csv/tsv/text files" in out


def test_a_comment_above_a_field_and_one_trailing_it_are_both_its_meaning():
    from fasttune.train.config_docs import field_comments
    from fasttune.adapters.config import LoraConfig
    from fasttune.train.config import DataConfig

    lora, data = field_comments(LoraConfig), field_comments(DataConfig)
    assert lora["target_modules"].startswith("names (q_proj") and lora["dropout"].startswith("dropout on")
    assert data["streaming"].startswith("tokenise pass by pass") and "eval split" in data["streaming"]
    assert data["shuffle_buffer"].startswith("streaming: examples are shuffled")


def test_docs_config_md_is_current_and_linked_from_the_readme(capsys):
    assert main(["train", "--print-reference"]) == 0
    current = capsys.readouterr().out
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == current, ("docs/config.md is stale: run `fasttune train --print-reference > docs/config.md` "
                                  "after changing a config field or its comment")
    assert "| `data.encoding` | `utf-8` |" in current and "| `model.allow_pickle` | `false` |" in current
    assert "docs/config.md" in (ROOT / "README.md").read_text()
