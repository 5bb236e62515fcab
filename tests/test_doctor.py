"""fasttune doctor: each check finds its planted defect in a tiny model, --fix repairs what it can, and a clean
tiny model of every family raises no error or warning."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fasttune.doctor import diagnose, repair
from fasttune.doctor.checks.tokens import RELATIVE_THRESHOLD, row_stats
from fasttune.doctor.cli import add_doctor_arguments, run_doctor

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "fasttune" / "assets" / "tiny"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def make_model(path: Path, model_type: str = "llama", **overrides) -> Path:
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    f = path / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})


def checks_found(report, severity: str | None = None) -> set[str]:
    return {f.check for f in report.findings if severity is None or f.severity == severity}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("llama") / "m", "llama")


def copy_model(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


# ---- no false alarms ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", FAMILIES)
def test_clean_model_of_every_family_has_no_problems(tmp_path, model_type):
    report = diagnose(make_model(tmp_path / model_type, model_type))
    assert report.problems() == [], report.format()
    assert "internal" not in checks_found(report)
    assert len(report.checks_run) >= 15


def test_row_stats_threshold_is_relative_and_scale_free():
    torch.manual_seed(0)
    for scale in (1e-4, 0.02, 50.0):
        w = torch.randn(3000, 32) * scale
        w[[5, 7]] = 0
        w[9] = w[9] * (RELATIVE_THRESHOLD / 10)  # small but not zero
        assert row_stats(w).untrained == [5, 7, 9]
        assert row_stats(w.bfloat16()).untrained == [5, 7, 9]


# ---- untrained tokens ---------------------------------------------------------------------------------------

def test_untrained_tokens_used_by_template_and_data_are_errors_and_fix_repairs(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(m))
    word_id = tok("zebra", add_special_tokens=False)["input_ids"][0]

    def plant(state):
        for name in (EMBED, LM_HEAD):
            state[name][[3, 4]] = 0.0  # <|im_start|>, <|im_end|>: the chat template uses them
            state[name][1000] *= 1e-4  # near zero, used by nothing
            state[name][word_id] = 0.0
    edit_weights(m, plant)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "the zebra runs"}) + "\n")
    report = diagnose(m, data=data)
    errors = [f for f in report.findings if f.check == "untrained-tokens" and f.severity == "error"]
    assert len(errors) == 1, report.format()
    text = "\n".join(errors[0].evidence)
    assert "'<|im_start|>'" in text and "chat template" in text and "data x1" in text
    warn = [f for f in report.findings if f.check == "untrained-tokens" and f.severity == "warning"]
    assert warn and "1000" in "\n".join(warn[0].evidence)

    out = tmp_path / "fixed"
    done = repair(report, out)
    assert any("untrained" in d for d in done)
    fixed = load_file(str(out / "model.safetensors"))
    orig = load_file(str(m / "model.safetensors"))
    for name in (EMBED, LM_HEAD):
        mask = torch.ones(orig[name].shape[0], dtype=torch.bool)
        repaired = [2, 3, 4, 1000, word_id]  # the pad row (zeroed by padding_idx) is set to the mean as well
        mask[repaired] = False
        mean = orig[name][mask].double().mean(0).float()
        torch.testing.assert_close(fixed[name][repaired], mean.expand(len(repaired), -1), rtol=0, atol=1e-6)
        torch.testing.assert_close(fixed[name][mask], orig[name][mask], rtol=0, atol=0)
    after = diagnose(out, data=data)
    assert "untrained-tokens" not in checks_found(after, "error") | checks_found(after, "warning"), after.format()


def test_untrained_eos_is_an_error_in_a_tied_model_and_fix_touches_the_one_matrix(tmp_path):
    m = make_model(tmp_path / "g", "gemma")
    edit_weights(m, lambda s: s[EMBED].__setitem__(1, 0.0))  # EOS row
    report = diagnose(m)
    err = [f for f in report.findings if f.check == "untrained-tokens" and f.severity == "error"]
    assert err and "EOS" in "\n".join(err[0].evidence)
    repair(report, tmp_path / "out")
    fixed = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert LM_HEAD not in fixed and fixed[EMBED][1].norm() > 0
    assert diagnose(tmp_path / "out").problems() == []


# ---- pad / BOS ----------------------------------------------------------------------------------------------

def test_pad_equal_to_eos_is_reported_and_fixed_with_a_distinct_pad(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "tokenizer_config.json", pad_token="<|end_of_text|>")
    edit_json(m / "config.json", pad_token_id=1)
    report = diagnose(m)
    [f] = report.by_check("pad-eos")
    assert f.severity == "warning" and "<|pad|>" in f.fix
    repair(report, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == tok.pad_token_id
    assert diagnose(tmp_path / "out").by_check("pad-eos") == []


@pytest.mark.parametrize("model_type", ["llama", "gemma"])  # separate LM head / tied embeddings
def test_pad_equal_to_eos_without_a_spare_token_is_fixed_by_adding_one(tmp_path, model_type):
    """No distinct pad token to choose: --fix adds '<|pad|>' and grows the embedding (and LM head) by one row."""
    m = make_model(tmp_path / "m", model_type)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (m / name).exists():  # the tiny tokenizer's own pad token becomes an ordinary added token
            (m / name).write_text((m / name).read_text().replace("<|pad|>", "<|foo|>"))
    edit_json(m / "tokenizer_config.json", pad_token="<|end_of_text|>")
    edit_json(m / "config.json", pad_token_id=1)
    rows = load_file(str(m / "model.safetensors"))[EMBED].shape[0]
    report = diagnose(m)
    [f] = report.by_check("pad-eos")
    assert f.severity == "warning" and "'<|pad|>' (new" in f.fix and f.repair is not None

    out = tmp_path / "out"
    done = repair(report, out)
    assert any(f"grown from {rows} to {rows + 1} rows" in d for d in done), done
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == rows and len(tok) == rows + 1
    assert tok.pad_token_id != tok.eos_token_id and "<|foo|>" in tok.get_vocab()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pad_token_id"] == rows and cfg["vocab_size"] == rows + 1
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen.get("pad_token_id", rows) == rows

    before, after = load_file(str(m / "model.safetensors")), load_file(str(out / "model.safetensors"))
    names = (EMBED, LM_HEAD) if model_type == "llama" else (EMBED,)
    assert (LM_HEAD in after) == (model_type == "llama")
    for name in names:
        assert after[name].shape == (rows + 1, before[name].shape[1])
        assert after[name][-1].norm() > 0  # the new row starts from the trained-row mean, not zero
        keep = torch.ones(rows, dtype=torch.bool)
        keep[2] = False  # the old pad row, zeroed by padding_idx, is repaired as an untrained row
        torch.testing.assert_close(after[name][:rows][keep], before[name][keep], rtol=0, atol=0)

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.get_input_embeddings().weight.shape[0] == rows + 1
    assert hf.get_output_embeddings().weight.shape[0] == rows + 1
    ids = tok(["a b c", "a"], padding=True, return_tensors="pt")
    assert (ids["input_ids"] == rows).any()  # the new pad id is used and indexes a real row
    with torch.no_grad():
        assert torch.isfinite(hf(**ids).logits).all()
    again = diagnose(out)
    assert again.problems() == [], again.format()


def _strip_bos_from_tokenizer(m: Path) -> None:
    tj = json.loads((m / "tokenizer.json").read_text())
    tj["post_processor"] = tj["post_processor"]["processors"][0]  # keep ByteLevel, drop the BOS template
    (m / "tokenizer.json").write_text(json.dumps(tj))


def test_missing_bos_reported_for_llama_not_for_qwen(tmp_path):
    llama = make_model(tmp_path / "l", "llama")
    qwen = make_model(tmp_path / "q", "qwen2")
    for m in (llama, qwen):
        _strip_bos_from_tokenizer(m)
    [f] = diagnose(llama).by_check("bos")
    assert "neither" in f.title and f.severity == "warning"
    assert diagnose(qwen).by_check("bos") == []


def test_bos_doubled_by_template_and_tokenizer(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    tmpl = (m / "chat_template.jinja").read_text() if (m / "chat_template.jinja").exists() else None
    assert tmpl is not None
    (m / "chat_template.jinja").write_text("{{ bos_token }}" + tmpl)
    [f] = diagnose(m).by_check("bos")
    assert "doubled" in f.title


# ---- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["mistral", "phi3"])  # Phi-3 mini shipped with 2047
def test_sliding_window_off_by_one_reported_and_fixed(tmp_path, model_type):
    m = make_model(tmp_path / "m", model_type, sliding_window=2047)
    report = diagnose(m)
    [f] = report.by_check("sliding-window")
    assert f.severity == "warning" and "2048" in f.fix
    repair(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == 2048
    assert diagnose(tmp_path / "out").problems() == []


def test_rope_scaling_inconsistencies(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", rope_parameters={"rope_type": "linear", "factor": 0.5, "rope_theta": 10000.0})
    assert "below 1" in diagnose(m).by_check("rope-scaling")[0].title
    edit_json(m / "config.json", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                  "original_max_position_embeddings": 1024})
    [f] = diagnose(m).by_check("rope-scaling")
    assert "max_position_embeddings (256) is below" in f.title
    p = make_model(tmp_path / "p", "phi3")  # transformers refuses to build the bad config: plant it afterwards
    edit_json(p / "config.json", original_max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 3, "short_factor": [1.0] * 4})
    titles = [f.title for f in diagnose(p).by_check("rope-scaling")]
    assert any("long_factor has 3 entries, expected 4" in t for t in titles), titles
    edit_json(m / "config.json", rope_parameters={  # transformers only warns; fasttune would divide by <= 0
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
        "original_max_position_embeddings": 128, "rope_theta": 10000.0})
    [f] = diagnose(m).by_check("rope-scaling")
    assert f.severity == "error" and "low_freq_factor >= high_freq_factor" in f.title


LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 500000.0}


@pytest.mark.parametrize("model_type,rope,mpe,title", [
    ("llama", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "rope_theta": 1e4}, 4096,
     "max_position_embeddings (4096) is beyond the context the RoPE scaling covers (2048)"),
    ("llama", {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}, 256,
     "max_position_embeddings (256) is beyond the context the RoPE scaling covers (128)"),
    ("llama", {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}, 256,
     "max_position_embeddings (256) is beyond the context the RoPE scaling covers (128)"),
    ("llama", dict(LLAMA3, factor=1.0, original_max_position_embeddings=256), 256, "'llama3' with factor 1 extends nothing"),
    ("llama", {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 256, "rope_theta": 1e4}, 256,
     "'yarn' with factor 1 extends nothing"),
    ("llama", {"rope_type": "linear", "factor": 1.0, "rope_theta": 1e4}, 256, "'linear' with factor 1 extends nothing"),
])
def test_rope_scaling_against_max_position_embeddings(tmp_path, llama_dir, model_type, rope, mpe, title):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", rope_parameters=rope, max_position_embeddings=mpe)
    [f] = diagnose(m, checks=["rope-scaling"]).by_check("rope-scaling")
    assert f.severity == "warning" and title in f.title, f
    assert "set" in f.fix


def test_rope_scaling_between_original_and_scaled_context_is_a_note(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")  # yarn x8 over 256 implies 2048, the config says 512
    edit_json(m / "config.json", max_position_embeddings=512, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "rope_theta": 1e4})
    [f] = diagnose(m, checks=["rope-scaling"]).by_check("rope-scaling")
    assert f.severity == "info" and "(512) is below the context the RoPE scaling implies (2048)" in f.title
    assert "2048" in f.fix and "factor to 2" in f.fix


@pytest.mark.parametrize("name,model_type,config", [
    ("Llama 3.1", "llama", {"max_position_embeddings": 131072, "rope_parameters": dict(
        LLAMA3, factor=8.0, original_max_position_embeddings=8192)}),
    ("Llama 3.2", "llama", {"max_position_embeddings": 131072, "rope_parameters": dict(
        LLAMA3, factor=32.0, original_max_position_embeddings=8192)}),
    ("Qwen2.5 yarn", "qwen2", {"max_position_embeddings": 32768, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}}),
    ("DeepSeek-V3-style yarn", "llama", {"max_position_embeddings": 163840, "rope_parameters": {
        "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "rope_theta": 1e4}}),
    ("Gemma 3-style linear", "gemma", {"max_position_embeddings": 131072, "rope_parameters": {
        "rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
    ("Phi-3.5 longrope", "phi3", {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                  "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                      "long_factor": [1.0, 1.5, 2.5, 4.0],
                                                      "short_factor": [1.0, 1.0, 1.02, 1.05]}}),
])
def test_rope_scaling_of_released_configs_raises_nothing(tmp_path, name, model_type, config):
    m = make_model(tmp_path / "m", model_type)
    edit_json(m / "config.json", **config)
    report = diagnose(m)
    assert report.by_check("rope-scaling") == [], report.format()
    assert report.problems() == [], report.format()


def test_vocab_size_vs_embedding_rows_reported_and_fixed(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", vocab_size=5000)
    report = diagnose(m)
    [f] = report.by_check("vocab-size")
    assert f.severity == "error" and "4013" in f.title
    repair(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 4013
    assert diagnose(tmp_path / "out").problems() == []


def test_tied_flag_against_weights(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", tie_word_embeddings=True)  # but lm_head.weight is a separate trained matrix
    [f] = diagnose(m).by_check("tied-embeddings")
    assert f.severity == "error" and "differs" in f.title
    g = make_model(tmp_path / "g", "gemma")  # tied: no lm_head.weight saved
    edit_json(g / "config.json", tie_word_embeddings=False)
    report = diagnose(g)
    [f] = report.by_check("tied-embeddings")
    assert f.severity == "error" and "no lm_head" in f.title
    repair(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert diagnose(tmp_path / "out").problems() == []


def test_eos_outside_vocabulary(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", eos_token_id=[1, 99999])
    errs = diagnose(m).by_check("special-ids")
    assert errs and "99999" in errs[0].title and errs[0].severity == "error"


def test_chat_template_that_fails_to_render(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    (m / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}")
    [f] = diagnose(m).by_check("chat-template")
    assert f.severity == "error" and "fails to render" in f.title


def test_unsupported_architecture_is_an_error_and_the_other_checks_still_run(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", model_type="not_a_family")
    report = diagnose(m)
    [f] = report.by_check("config-unsupported")
    assert f.severity == "error" and "not_a_family" in "\n".join(f.evidence)
    assert "internal" not in checks_found(report), report.format()
    assert {"weights", "tokenizer-roundtrip", "untrained-tokens"} <= set(report.checks_run)


def test_tokenizer_larger_than_the_embedding(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")  # 4013 tokens; cut the embedding and LM head to 4000 rows
    edit_weights(m, lambda s: s.update({k: s[k][:4000].clone() for k in (EMBED, LM_HEAD)}))
    edit_json(m / "config.json", vocab_size=4000)
    report = diagnose(m)
    [f] = report.by_check("vocab-size")
    assert f.severity == "error" and "4013 tokens" in f.title and "4000 rows" in f.title
    assert f.repair is None  # growing the embedding needs a person: which rows, initialised how
    assert "internal" not in checks_found(report), report.format()


def test_special_ids_in_generation_config_keep_the_valid_eos_ids_when_fixed(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "generation_config.json", eos_token_id=[5, 99999])  # e.g. <|eot_id|> plus a stale id
    edit_json(m / "config.json", bos_token_id=70000)
    report = diagnose(m)
    titles = sorted(f.title for f in report.by_check("special-ids"))
    assert any(t.startswith("generation_config.json: eos_token_id [99999]") for t in titles), titles
    assert any(t.startswith("config.json: bos_token_id [70000]") for t in titles), titles
    repair(report, tmp_path / "out")
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [5, 1]  # the valid id stays, the tokenizer's EOS is added
    assert json.loads((tmp_path / "out" / "config.json").read_text())["bos_token_id"] == 0
    assert diagnose(tmp_path / "out").by_check("special-ids") == []


def test_chat_template_failing_only_with_a_generation_prompt_and_a_missing_template(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    (m / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                                           "{% if add_generation_prompt %}{{ raise_exception('no prompt') }}{% endif %}")
    [f] = diagnose(m).by_check("chat-template")
    assert f.severity == "error" and "add_generation_prompt" in f.title and "no prompt" in f.evidence[0]
    (m / "chat_template.jinja").unlink()
    edit_json(m / "tokenizer_config.json", chat_template=None)
    [f] = diagnose(m).by_check("chat-template")
    assert f.severity == "info" and "no chat template" in f.title


def test_bos_token_absent_in_a_family_that_needs_it(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "tokenizer_config.json", bos_token=None)
    [f] = diagnose(m).by_check("bos")
    assert f.severity == "warning" and "has none" in f.title


def test_padded_vocabulary_rows_are_a_note_not_a_problem(tmp_path):
    m = make_model(tmp_path / "m", "llama", vocab_size=4024)  # 11 rows past the tokenizer, as in padded vocabularies
    edit_weights(m, lambda s: [s[k][4013:].zero_() for k in (EMBED, LM_HEAD)])
    report = diagnose(m)
    assert report.problems() == [], report.format()
    assert any("beyond the tokenizer" in f.title and "4013..4023" in f.evidence[0]
               for f in report.by_check("untrained-tokens"))


def test_clean_model_with_conversation_data_has_no_problems(tmp_path, llama_dir):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, café 3.14"}]},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
            {"text": "a plain text row"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = diagnose(llama_dir, data=data)
    assert report.problems() == [], report.format()
    assert len(report.folder.data_token_ids[0]) == 3


def test_data_file_that_cannot_be_read(tmp_path, llama_dir):
    [f] = diagnose(llama_dir, data=tmp_path / "missing.jsonl").by_check("data")
    assert f.severity == "error" and "missing.jsonl" in f.title


# ---- weights ------------------------------------------------------------------------------------------------

def test_nan_inf_and_zero_tensors(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")

    def plant(s):
        s["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        s["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("inf")
        s["model.layers.0.self_attn.q_proj.weight"].zero_()
    edit_weights(m, plant)
    report = diagnose(m)
    [nf] = report.by_check("weights-nonfinite")
    text = "\n".join(nf.evidence)
    assert "down_proj.weight: 1 NaN, 0 inf" in text and "k_proj.weight: 0 NaN, 1 inf" in text
    [z] = report.by_check("weights-zero")
    assert "q_proj.weight" in z.evidence[0] and len(z.evidence) == 1


def test_weight_dtype_differs_from_config_and_fix_resaves(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_weights(m, lambda s: s.update({k: v.bfloat16() for k, v in s.items() if "layers.1" in k}))
    report = diagnose(m)
    [f] = report.by_check("weights-dtype")
    assert f.severity == "warning" and "bfloat16" in f.title and "float32" in f.title
    repair(report, tmp_path / "out")
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {torch.float32}
    assert diagnose(tmp_path / "out").problems() == []


def test_no_safetensors_weights(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    [f] = diagnose(m).by_check("weights-missing")
    assert f.severity == "warning" and "pytorch_model.bin" in f.evidence[0]
    (m / "pytorch_model.bin").unlink()
    report = diagnose(m)
    [f] = report.by_check("weights-missing")
    assert f.severity == "error"
    assert "internal" not in checks_found(report), report.format()


# ---- tokenizer ----------------------------------------------------------------------------------------------

def test_round_trip_failure(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    tj = json.loads((m / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Lowercase"}
    (m / "tokenizer.json").write_text(json.dumps(tj))
    [f] = diagnose(m).by_check("tokenizer-roundtrip")
    assert f.severity == "warning" and any(e.startswith("spaces:") for e in f.evidence)
    assert not any(e.startswith("digits:") for e in f.evidence)  # digits have no case


def test_tokenizer_that_does_not_load(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    (m / "tokenizer.json").write_text("{ not json")
    report = diagnose(m)
    [f] = report.by_check("tokenizer")
    assert f.severity == "error" and "does not load" in f.title
    assert "internal" not in checks_found(report), report.format()


def test_special_tokens_split_by_the_pre_tokenizer(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    tj = json.loads((m / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in ("<|im_start|>", "<|im_end|>")]
    (m / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {k: v for k, v in tc.get("added_tokens_decoder", {}).items()
                                  if v["content"] not in ("<|im_start|>", "<|im_end|>")}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        tc.pop(key, None)
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    edit_json(m / "special_tokens_map.json", additional_special_tokens=None) if (m / "special_tokens_map.json").exists() else None
    [f] = diagnose(m).by_check("special-tokens-split")
    assert f.severity == "error" and "'<|im_start|>' (chat template)" in "\n".join(f.evidence)


def test_fast_and_slow_tokenizers_disagree(tmp_path, llama_dir):
    spm = pytest.importorskip("sentencepiece")
    m = copy_model(llama_dir, tmp_path / "m")
    corpus = (TINY_TOKENIZER.parent / "data" / "corpus.txt").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   byte_fallback=True, model_type="bpe", minloglevel=2)
    (tmp_path / "sp.model").rename(m / "tokenizer.model")
    [f] = diagnose(m).by_check("tokenizer-fast-slow")
    assert f.severity == "warning" and "disagree" in f.title


def test_fast_and_slow_tokenizers_that_agree_raise_nothing(tmp_path):
    """No false alarm when tokenizer.json is a faithful copy of tokenizer.model (built here without protobuf:
    a unigram sentencepiece model maps 1:1 onto a `tokenizers` Unigram model with the same pieces and scores)."""
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    corpus = (TINY_TOKENIZER.parent / "data" / "corpus.txt").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   byte_fallback=True, model_type="unigram", minloglevel=2, add_dummy_prefix=False,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    t = Tokenizer(models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                 unk_id=sp.unk_id(), byte_fallback=True))
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", sp.bos_id())])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    m = make_model(tmp_path / "m", "llama", vocab_size=len(fast), bos_token_id=fast.bos_token_id,
                   eos_token_id=fast.eos_token_id, pad_token_id=None)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (m / f).unlink(missing_ok=True)
    fast.save_pretrained(str(m))
    (tmp_path / "sp.model").rename(m / "tokenizer.model")
    report = diagnose(m)
    assert "tokenizer-fast-slow" in report.checks_run
    assert report.problems() == [], report.format()
    # and the same folder with the slow model swapped for a different one is caught
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[::-1]), model_prefix=str(tmp_path / "other"),
                                   vocab_size=500, byte_fallback=True, model_type="unigram", minloglevel=2)
    (tmp_path / "other.model").replace(m / "tokenizer.model")
    [f] = diagnose(m).by_check("tokenizer-fast-slow")
    assert f.severity == "warning"


# Llama-2 / Mistral v0.1: [INST] is plain text that the SentencePiece model splits into pieces, by design.
# (BOS comes from add_bos_token; writing {{ bos_token }} in the template as well is the doubled-BOS warning.)
LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                   "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def _llama2_style(tmp_path: Path, model_type: str, with_json: bool, **sp_options) -> Path:
    """A Llama-2-style folder: a 400-piece byte-fallback BPE sentencepiece model trained as Llama-2's was
    (no normalization, spaces kept, digits split), LlamaTokenizer, and an [INST] chat template."""
    spm = pytest.importorskip("sentencepiece")
    corpus = (TINY_TOKENIZER.parent / "data" / "corpus.txt").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, minloglevel=2,
                                   **sp_options)
    m = make_model(tmp_path / "m", model_type, vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (m / f).unlink(missing_ok=True)
    (tmp_path / "sp.model").replace(m / "tokenizer.model")
    (m / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": LLAMA2_TEMPLATE}))
    if with_json:  # as released: tokenizer.json next to tokenizer.model
        AutoTokenizer.from_pretrained(str(m)).save_pretrained(str(m))
    return m


@pytest.mark.parametrize("with_json", [False, True], ids=["tokenizer.model", "tokenizer.model+json"])
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_clean_sentencepiece_llama2_style_model_has_no_problems(tmp_path, model_type, with_json):
    m = _llama2_style(tmp_path, model_type, with_json)
    tok = AutoTokenizer.from_pretrained(str(m))
    assert len(tok("[INST]", add_special_tokens=False)["input_ids"]) > 1  # plain text for this tokenizer
    report = diagnose(m)
    assert "tokenizer-fast-slow" in report.checks_run
    assert report.by_check("special-tokens-split") == [], report.format()
    assert report.problems() == [], report.format()
    assert "internal" not in checks_found(report)


def test_control_token_in_the_vocabulary_that_the_tokenizer_splits(tmp_path):
    """Mistral v0.3 style: [INST] is a control piece of the sentencepiece model. A tokenizer.json that lost it
    from its added tokens splits it, and the model never sees the token it was trained with."""
    m = _llama2_style(tmp_path, "mistral", True, control_symbols=["[INST]", "[/INST]"])
    assert diagnose(m).by_check("special-tokens-split") == []  # loaded as added tokens: one token each
    (m / "tokenizer.model").unlink()
    tj = json.loads((m / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "[INST]"]
    (m / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((m / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if key in tc:
            tc[key] = [t for t in tc[key] if t != "[INST]"]
    tc["added_tokens_decoder"] = {k: v for k, v in tc.get("added_tokens_decoder", {}).items() if v["content"] != "[INST]"}
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    assert len(AutoTokenizer.from_pretrained(str(m))("[INST]", add_special_tokens=False)["input_ids"]) > 1
    [f] = diagnose(m).by_check("special-tokens-split")
    assert f.severity == "error" and "'[INST]' (chat template)" in f.evidence[0] and "vocabulary entry 3" in f.evidence[0]
    assert "[/INST]" not in "\n".join(f.evidence)


def test_chatml_template_on_a_tokenizer_without_those_tokens_is_a_note(tmp_path):
    m = _llama2_style(tmp_path, "llama", False)
    edit_json(m / "tokenizer_config.json", chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
              "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    [f] = diagnose(m).by_check("special-tokens-split")
    assert f.severity == "info" and "'<|im_start|>'" in f.evidence[0]


# ---- CLI ----------------------------------------------------------------------------------------------------

def test_cli_exit_codes_json_and_fix(tmp_path, llama_dir, capsys):
    parser = argparse.ArgumentParser()
    add_doctor_arguments(parser)
    assert run_doctor(parser.parse_args([str(llama_dir)])) == 0
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", vocab_size=5000)
    args = parser.parse_args([str(m), "--json", str(tmp_path / "r.json"), "--fix", str(tmp_path / "out")])
    assert run_doctor(args) == 0  # the error is repaired in the copy
    out = capsys.readouterr().out
    assert "[ERROR] vocab-size" in out and "after repair: 0 problem(s) left" in out
    assert json.loads((tmp_path / "r.json").read_text())["findings"][0]["check"] == "vocab-size"
    assert run_doctor(parser.parse_args([str(m)])) == 1
