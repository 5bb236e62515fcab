"""Exports carry every tensor a run trained (issue 13 item 3) and never write into or over their inputs (item 8).

Continued pre-training trains the embeddings and the LM head in full: the run's PEFT files list them in
modules_to_save (PEFT then computes the trained model), and merged / GGUF exports hold the trained values, not the
base's. A reward model's head is exported as transformers' sequence-classification model (merged) or PEFT's
SEQ_CLS adapter, each scoring like fasttune's reward head; GGUF (a text generator's format) is refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fasttune.cli import main
from fasttune.models import load_model
from fasttune.build import load_trained
from fasttune.train import Trainer
from test_export_adapter import _peft_logits
from test_export_common import FP32_TOL, rel_err
from test_train import config, make_small_model

IDS = torch.tensor([[0, 5, 9, 33, 70, 11, 402]])


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("untied_model"), tied=False)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("tied_model"))


def test_continued_pretraining_exports_the_trained_embeddings_and_head(untied_model, tmp_path):
    cfg = config(untied_model, tmp_path / "run", objective={"type": "pretrain"},
                 data={"path": "bundled:corpus", "max_examples": 30},
                 train={"max_steps": 2, "grad_accum": 1, "lr": 5e-2})
    adapter = Trainer(cfg).train().adapter_dir
    trained, _ = load_trained(adapter, device="cpu")
    base = load_model(untied_model)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert rel_err(trained.get_parameter(name), base.get_parameter(name)) > 1e-3, f"{name} was not trained"
    with torch.no_grad():
        ours = trained(IDS).logits

    # the run's own PEFT files: PEFT over transformers computes the trained model
    peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert rel_err(_peft_logits(untied_model, adapter, IDS), ours) <= FP32_TOL

    assert main(["export", "--format", "merged", "--dtype", "fp32", str(adapter), str(tmp_path / "m")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(hf(IDS).logits, ours) <= FP32_TOL

    gguf = pytest.importorskip("gguf")
    assert main(["export", "--format", "gguf", "--quant", "f32", str(adapter), str(tmp_path / "g")]) == 0
    (path,) = (tmp_path / "g").glob("*.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gguf_name, name in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        t = tensors[gguf_name]
        stored = np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])
        np.testing.assert_array_equal(stored, trained.get_parameter(name).detach().numpy())


def test_reward_model_exports_as_sequence_classification(small_model, tmp_path, capsys):
    cfg = config(small_model, tmp_path / "run", objective={"type": "reward"},
                 data={"path": "bundled:preferences", "max_examples": 8},
                 train={"max_steps": 2, "grad_accum": 1, "lr": 5e-2})
    adapter = Trainer(cfg).train().adapter_dir
    model, tokenizer = load_trained(adapter, device="cpu")
    head = load_file(str(adapter / "trainable.safetensors"))["reward_head.score.weight"]
    assert torch.equal(model.score.weight, head)
    assert tokenizer.pad_token_id not in IDS[0].tolist()  # transformers scores the last non-pad token
    with torch.no_grad():
        expected = (model(IDS).last_hidden_state[0, -1] @ head[0]).item()  # fasttune's RewardHead

    assert main(["export", "--format", "merged", "--dtype", "fp32", str(adapter), str(tmp_path / "m")]) == 0
    assert "a reward model" in capsys.readouterr().out and not (tmp_path / "m" / "Modelfile").exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "m", dtype=torch.float32, output_loading_info=True)
    assert isinstance(hf, transformers.LlamaForSequenceClassification) and not info["missing_keys"]
    with torch.no_grad():
        assert hf(IDS).logits.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)

    assert main(["export", "--format", "adapter", str(adapter), str(tmp_path / "a")]) == 0
    peft_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert peft_cfg["task_type"] == "SEQ_CLS" and "score" in peft_cfg["modules_to_save"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(small_model, num_labels=1,
                                                                           dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    with torch.no_grad():
        assert pm(IDS).logits.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)

    capsys.readouterr()
    assert main(["export", "--format", "gguf", str(adapter), str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "reward model" in err and "--format merged" in err and not (tmp_path / "g").exists()


def test_export_never_writes_into_or_over_its_inputs(small_model, tmp_path, capsys):
    import fasttune
    from fasttune.adapters.peft import save_adapter

    base = tmp_path / "base"
    import shutil

    shutil.copytree(small_model, base)
    adapter = tmp_path / "adapter"
    save_adapter(fasttune.add_lora(load_model(base), r=2, alpha=4), adapter, base_model_name_or_path=str(base))
    before = sorted(p.name for p in base.iterdir()), sorted(p.name for p in adapter.iterdir())
    cases = [(["--adapter", str(adapter), str(base), str(base)], "is the input folder"),
             (["--adapter", str(adapter), str(base), str(base / "merged")], "is inside the input folder"),
             (["--adapter", str(adapter), str(base), str(adapter / "out")], "is inside the input folder"),
             ([str(adapter), str(adapter)], "is the input folder"),
             ([str(adapter), str(tmp_path)], "holds the input folder")]
    for args, why in cases:
        assert main(["export", "--format", "merged", "--force", *args]) == 2, args
        err = capsys.readouterr().err
        assert why in err and "--force does not change this" in err, err
        assert (sorted(p.name for p in base.iterdir()), sorted(p.name for p in adapter.iterdir())) == before
    assert main(["export", "--format", "merged", "--force", str(adapter), str(tmp_path / "merged")]) == 0
