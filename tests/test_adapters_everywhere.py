"""Every kind of trained-weights folder works wherever an adapter is taken (chat, generate, export, load_trained):
a run's adapter/, its checkpoints/step-N, a PEFT folder (PEFT's own, with full module paths; fasttune's export;
Phi-3 with LoRA on every linear layer); a relative model.path still works from elsewhere; chat answers its
/commands itself; one dtype rule; a plain progress line per logged step."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fasttune
from fasttune.cli import _load_for_inference, build_parser, main
from fasttune.adapters.peft import load_adapter, save_adapter
from fasttune.models import load_model
from fasttune.build import adapter_meta, load_trained
from fasttune.chat import ChatSession, chat_loop
from fasttune.train import Trainer
from fasttune.train.observe import Progress
from test_export_common import FP32_TOL, randomize_lora, random_ids, rel_err, save_tiny_hf
from test_train import config, make_small_model

TINY = Path(fasttune.__file__).parent / "assets" / "tiny"
IDS = torch.tensor([[0, 5, 9, 33, 70, 11]])


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_small_model(tmp_path_factory.mktemp("everywhere_model"))


@pytest.fixture(scope="module")
def run(small_model, tmp_path_factory) -> Path:
    """A 2-step SFT run with a checkpoint after each step (both kept)."""
    out = tmp_path_factory.mktemp("run")
    Trainer(config(small_model, out, train={"max_steps": 2, "grad_accum": 1, "save_every": 1, "keep_last": 2,
                                            "lr": 5e-2})).train()
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---- (2) checkpoints/step-N ------------------------------------------------------------------------------------

def test_a_checkpoint_folder_is_an_adapter(run, tmp_path, capsys):
    step1, step2 = run / "checkpoints" / "step-000001", run / "checkpoints" / "step-000002"
    meta = adapter_meta(step1)
    assert meta["kind"] == "checkpoint" and meta["step"] == 1 and meta["lora"]["r"] == 4
    final, _ = load_trained(run / "adapter", device="cpu")
    at2, _ = load_trained(step2, device="cpu")
    at1, _ = load_trained(step1, device="cpu")
    torch.testing.assert_close(_logits(at2), _logits(final), rtol=0, atol=0)  # the last checkpoint is the adapter
    assert rel_err(_logits(at1), _logits(final)) > 1e-4  # step 1 is its own weights, not the final ones

    assert main(["generate", "--adapter", str(step1), "--prompt", "hi", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    lines = iter(["hello", "/exit"])
    args = build_parser().parse_args(["chat", "--adapter", str(step1), "--max-new-tokens", "2", "--device", "cpu"])
    model, tokenizer = _load_for_inference(args)
    out: list[str] = []
    chat_loop(ChatSession(model, tokenizer, max_new_tokens=2), read=lambda _p: next(lines), write=out.append)
    assert sum(line.startswith("assistant>") for line in out) == 1

    assert main(["export", "--format", "merged", "--dtype", "fp32", str(step1), str(tmp_path / "m")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(hf(IDS).logits, _logits(at1)) <= FP32_TOL


# ---- (6) PEFT folders, fasttune's own export included ---------------------------------------------------------

def test_fasttunes_own_peft_export_is_an_adapter_for_chat_generate_and_export(run, tmp_path):
    assert main(["export", "--format", "adapter", str(run / "adapter"), str(tmp_path / "peft")]) == 0
    assert not (tmp_path / "peft" / "fasttune_adapter.json").exists()
    assert adapter_meta(tmp_path / "peft")["kind"] == "peft"
    final, _ = load_trained(run / "adapter", device="cpu")
    via_peft, _ = load_trained(tmp_path / "peft", device="cpu")
    torch.testing.assert_close(_logits(via_peft), _logits(final), rtol=0, atol=1e-6)
    assert main(["generate", "--adapter", str(tmp_path / "peft"), "--prompt", "hi", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
    assert main(["export", "--format", "merged", "--dtype", "fp32", "--adapter", str(tmp_path / "peft"),
                 str(adapter_meta(run / "adapter")["base_model"]), str(tmp_path / "m")]) == 0


def test_peft_all_linear_adapter_with_full_module_paths_loads(tmp_path):
    base = tmp_path / "base"
    hf = save_tiny_hf(base, "llama")
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.eval().save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert any("." in t for t in saved), "PEFT no longer saves full module paths: this test checks nothing"
    ids = random_ids()
    with torch.no_grad():
        theirs = pm(ids).logits
        ours = load_adapter(load_model(base), tmp_path / "peft")(ids).logits
    assert rel_err(ours, theirs) <= FP32_TOL


# ---- Phi-3: LoRA on all linear layers (fused qkv_proj at 3r, gate_up_proj at 2r, o/down at r) -----------------

def test_phi3_all_linear_adapter_exports_merged_and_round_trips(tmp_path):
    base = tmp_path / "base"
    save_tiny_hf(base, "phi3")
    for f in TINY.glob("*token*.json"):  # export writes the tokenizer too
        shutil.copy(f, base / f.name)
    model = fasttune.add_lora(load_model(base), r=4, alpha=8, target_modules="all-linear")
    randomize_lora(model)
    ids = random_ids()
    with torch.no_grad():
        ours = model(ids).logits
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}

    again = load_adapter(load_model(base), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(again(ids).logits, ours) <= FP32_TOL
    assert main(["export", "--format", "merged", "--dtype", "fp32", str(tmp_path / "adapter"),
                 str(tmp_path / "merged")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ours) <= FP32_TOL
    # re-exported from what was loaded: still what PEFT computes, at the same ranks (one A per fused module)
    save_adapter(again, tmp_path / "again", base_model_name_or_path=str(base))
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == cfg["rank_pattern"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "again").eval()
    with torch.no_grad():
        assert rel_err(pm(ids).logits, ours) <= FP32_TOL


# ---- (7) a relative model.path ---------------------------------------------------------------------------------

def test_relative_model_path_works_from_another_directory(small_model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "base").symlink_to(small_model, target_is_directory=True)
    monkeypatch.chdir(work)
    Trainer(config("base", "out", train={"max_steps": 1, "grad_accum": 1, "save_every": 1})).train()
    recorded = json.loads((work / "out" / "adapter" / "fasttune_adapter.json").read_text())["base_model"]
    assert Path(recorded).is_absolute() and Path(recorded) == (work / "base").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    load_trained(work / "out" / "adapter", device="cpu")
    # a checkpoint records model.path as configured ("base"); the run folder's train.output_dir locates its cwd
    recorded = adapter_meta(work / "out" / "checkpoints" / "step-000001")["base_model"]
    assert Path(recorded).resolve() == (work / "base").resolve()
    load_trained(work / "out" / "checkpoints" / "step-000001", device="cpu")


# ---- (15) chat commands ----------------------------------------------------------------------------------------

class _Recorder(ChatSession):
    """A chat session that records what reaches the model instead of generating."""

    def __init__(self):
        self.system, self.messages, self.sent = None, [], []

    def reply(self, text: str) -> str:
        self.sent.append(text)
        return "ok"


def test_chat_answers_help_and_unknown_commands_itself():
    session, out = _Recorder(), []
    lines = iter(["/help", "/summarize this", "hello", "//etc is a path", "/reset", "/quit", "never read"])
    chat_loop(session, read=lambda _p: next(lines), write=out.append)
    assert session.sent == ["hello", "/etc is a path"]  # no /command reached the model
    assert any("/reset" in line and "/exit" in line for line in out[1:2])  # /help lists the commands
    assert any(line.startswith("unknown command /summarize") for line in out)
    assert next(lines) == "never read"


# ---- (16) one dtype rule -----------------------------------------------------------------------------------------

def test_cpu_loads_in_float32_everywhere():
    tiny = TINY
    assert json.loads((tiny / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = fasttune.load(tiny, device="cpu")
    assert model.model.embed_tokens.weight.dtype == torch.float32
    model, _ = _load_for_inference(build_parser().parse_args(["generate", "--device", "cpu"]))
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert fasttune.auto_dtype("cpu") == "float32" and fasttune.auto_dtype("cuda") == "bfloat16"
    model, _ = fasttune.load(tiny, device="cpu", dtype="bfloat16")  # an explicit dtype still wins
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


# ---- (14) train.progress: false --------------------------------------------------------------------------------

def test_progress_off_prints_a_plain_line_per_logged_step(small_model, tmp_path, capsys):
    p = Progress(total=5, initial=0, enabled=False, every=2)
    for _ in range(5):
        p.update(1.5, 1e-3, 100.0)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    assert "loss 1.5000" in lines[0] and "lr 1.00e-03" in lines[0]
    Trainer(config(small_model, tmp_path, train={"max_steps": 2, "grad_accum": 1, "progress": False})).train()
    out = capsys.readouterr().out
    assert "step 1/2  loss" in out and "step 2/2  loss" in out
