"""MoE models through the user paths (issue 17): `fasttune train` (TrainConfig -> Trainer) with LoRA on attention,
experts and router and the load-balancing loss, `fasttune doctor` on MoE checkpoints in each layout, and the
export formats (adapter for PEFT, merged; GGUF refused with the reason)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttune.doctor import diagnose
from fasttune.export import GGUFExportError, export_gguf
from fasttune.models import load_model
from fasttune.train import Trainer

from test_models_parity_moe import _fused_layout, _mxfp4_direct
from test_train import TINY, config


def _tiny_moe(path, family: str, **extra):
    tok = transformers.AutoTokenizer.from_pretrained(str(TINY))
    common = {**dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), **extra}
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                          num_experts_per_tok=2)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = transformers.GptOssConfig(**{**common, "max_position_embeddings": 131072}, intermediate_size=32,
                                        num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY / f, path / f)
    return path


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_fasttune_train_on_an_moe_model_with_the_aux_loss(tmp_path, family):
    model_dir = _tiny_moe(tmp_path / "m", family, output_router_logits=True, router_aux_loss_coef=0.05)
    cfg = config(model_dir, tmp_path / "run", lora={"target_modules": ["all-linear", "router"]},
                 data={"packing": True}, train={"memory": "checkpoint"})
    Trainer(cfg).train(overwrite=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert "mlp.experts.gate_up_proj" in adapter["target_parameters"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_doctor_finds_no_problem_in_clean_moe_checkpoints(tmp_path, family):
    model_dir = _tiny_moe(tmp_path / "m", family, max_position_embeddings=131072)
    report = diagnose(model_dir)
    assert report.problems() == [], report.format()
    if family != "gpt_oss":  # the 3-D layout transformers 5 holds in memory, as some checkpoints store it
        _fused_layout(model_dir, tmp_path / "fused", family)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(TINY / f, tmp_path / "fused" / f)
        report = diagnose(tmp_path / "fused")
        assert report.problems() == [], report.format()


def test_doctor_reports_a_missing_expert(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = _tiny_moe(tmp_path / "m", "qwen3_moe", max_position_embeddings=131072)
    state = load_file(str(model_dir / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.down_proj.weight"]
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    report = diagnose(model_dir)
    assert any("layer 1: missing ['mlp.experts.3.down_proj.weight']" in d
               for f in report.problems() for d in f.evidence), report.format()


def test_doctor_accepts_gpt_oss_mxfp4_experts(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = _tiny_moe(tmp_path / "m", "gpt_oss")
    state = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, K, N = state.pop(k).shape
        state[k + "_blocks"] = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
        state[k + "_scales"] = torch.randint(118, 124, (E, N, K // 32), dtype=torch.uint8, generator=g)
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    report = diagnose(model_dir)
    assert not [f for f in report.problems() if f.check.startswith("weights")], report.format()
    block = state["model.layers.0.mlp.experts.down_proj_blocks"]
    expected = _mxfp4_direct(block, state["model.layers.0.mlp.experts.down_proj_scales"]).float().transpose(1, 2)
    assert torch.equal(load_model(model_dir).model.layers[0].mlp.experts.down_proj.detach(), expected)


def test_gguf_export_of_an_moe_model_is_refused_with_the_reason(tmp_path):
    model = load_model(_tiny_moe(tmp_path / "m", "qwen3_moe"))
    with pytest.raises(GGUFExportError, match="qwen3_moe.*merged"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_dir=tmp_path / "m")
