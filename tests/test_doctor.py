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
