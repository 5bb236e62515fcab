"""The doctor catches what breaks loading (issue 19 item 9, issue 13 item 13): every condition that makes
`fasttune.load` or training fail is an ERROR (exit 1), found from config.json and the safetensors headers without
materialising the model, and reported as what it is (a config mistake is not "the tokenizer does not load")."""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import time
from pathlib import Path

import pytest

from fasttune.doctor import diagnose
from fasttune.doctor.cli import add_doctor_arguments, run_doctor
from fasttune.models.checkpoint import load_model
from test_doctor import checks_found, copy_model, edit_json, make_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("llama") / "m", "llama")


def _errors(report) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in report.findings:
        if f.severity == "error":
            out.setdefault(f.check, []).append(f)
    return out


def _exit_code(model_dir: Path, capsys, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    add_doctor_arguments(parser)
    code = run_doctor(parser.parse_args([str(model_dir), *extra]))
    capsys.readouterr()
    return code


def _loading_fails(m: Path) -> bool:
    try:
        load_model(m)
    except Exception:  # noqa: BLE001 - any failure: the point is that the doctor must have said so
        return True
    return False


def test_truncated_safetensors_file_is_an_error_naming_the_file(tmp_path, llama_dir, capsys):
    m = copy_model(llama_dir, tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])  # an interrupted download
    assert _loading_fails(m)
    report = diagnose(m)
    [err] = _errors(report)["weights-corrupt"]
    assert "model.safetensors" in err.title and "truncated" in err.evidence[0]
    assert "internal" not in checks_found(report), report.format()
    assert _exit_code(m, capsys) == 1


def test_safetensors_header_longer_than_the_file(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    f = m / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[: 8 + n // 2])  # cut inside the header
    [err] = _errors(diagnose(m))["weights-corrupt"]
    assert "header declares" in err.evidence[0]


def test_index_naming_a_missing_shard(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    names = json.loads(json.dumps(list(__import__("safetensors").safe_open(str(m / "model.safetensors"), "pt").keys())))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    errs = _errors(diagnose(m))["weights-corrupt"]
    assert any("model-00002-of-00002.safetensors" in "\n".join(e.evidence) for e in errs)


@pytest.mark.parametrize("change, implied", [
    ({"intermediate_size": 96}, "(96, 32)"),
    ({"num_key_value_heads": 4}, "(32, 32)"),
    ({"hidden_size": 48}, "(4013, 48)"),
    ({"vocab_size": 5000}, "(5000, 32)"),
])
def test_config_sizes_that_do_not_match_the_tensors(tmp_path, llama_dir, capsys, change, implied):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", **change)
    assert _loading_fails(m)
    report = diagnose(m)
    errs = _errors(report)
    assert "weights-shape" in errs, report.format()
    assert any(implied in line for f in errs["weights-shape"] for line in f.evidence), report.format()
    assert "tokenizer" not in errs and "internal" not in checks_found(report), report.format()
    assert _exit_code(m, capsys) == 1


@pytest.mark.parametrize("change, title", [
    ({"hidden_size": 10_000_000}, "do not have the shape"),
    ({"num_hidden_layers": 100_000}, "says 100000 layers, the checkpoint holds 2"),
])
def test_absurd_sizes_are_caught_fast_without_allocating(tmp_path, llama_dir, change, title):
    import resource

    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", **change)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    report = diagnose(m)
    assert time.monotonic() - start < 20  # (before: minutes and gigabytes)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024  # KiB: < 512 MiB more
    assert any(title in f.title for f in _errors(report).get("weights-shape", [])), report.format()


def test_hidden_size_not_divisible_by_the_heads_is_a_config_error_not_a_tokenizer_one(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", hidden_size=190, head_dim=None)
    report = diagnose(m)
    errs = _errors(report)
    assert "config-sizes" in errs and "190 is not divisible by num_attention_heads 4" in errs["config-sizes"][0].evidence[0]
    assert "tokenizer" not in errs, report.format()
    assert report.folder.tokenizer is not None  # the tokenizer itself is fine and still checked


def test_heads_not_a_multiple_of_kv_heads(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", num_key_value_heads=3)
    errs = _errors(diagnose(m))
    assert "not a multiple of num_key_value_heads 3" in "\n".join(errs["config-sizes"][0].evidence)


def test_tokenizer_id_beyond_the_embedding_rows(tmp_path, llama_dir, capsys):
    """len(tokenizer) fits the embedding, but a token is numbered past it (ids need not be contiguous)."""
    m = copy_model(llama_dir, tmp_path / "m")
    tj = json.loads((m / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    [last] = [t for t, i in vocab.items() if i == 4012]
    vocab[last] = 4063  # 4013 tokens, numbered up to 4063
    (m / "tokenizer.json").write_text(json.dumps(tj))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(m))
    assert len(tok) == 4013 and 4063 in tok(" accumulation").input_ids
    report = diagnose(m)
    errs = _errors(report)
    assert "vocab-size" in errs, report.format()
    f = errs["vocab-size"][0]
    assert "beyond the embedding's 4013 rows" in f.title and f"4063 {last!r}" in f.evidence[0]
    assert _exit_code(m, capsys) == 1


def test_rope_scaling_without_a_factor_is_reported_as_the_rope_problem(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "linear"})
    report = diagnose(m)
    errs = _errors(report)
    assert list(errs) == ["rope-scaling"], report.format()
    assert "'linear' has no factor" in errs["rope-scaling"][0].title
    assert report.folder.tokenizer is not None


def test_fix_repairs_pad_equal_to_eos_even_when_the_config_has_another_error(tmp_path, llama_dir, capsys):
    """The rope error stays (nothing to infer a factor from) but the pad repair --fix announces is made."""
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "tokenizer_config.json", pad_token="<|end_of_text|>")
    edit_json(m / "config.json", pad_token_id=1, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0})
    out = tmp_path / "out"
    assert _exit_code(m, capsys, "--fix", str(out)) == 1  # the rope error is left
    after = diagnose(out)
    assert after.by_check("pad-eos") == [], after.format()
    assert [f.check for f in after.problems()] == ["rope-scaling"], after.format()


def test_pad_equal_to_eos_offers_no_repair_when_the_tokenizer_does_not_load(tmp_path, llama_dir):
    m = copy_model(llama_dir, tmp_path / "m")
    edit_json(m / "config.json", pad_token_id=1)
    (m / "tokenizer.json").write_text("{not json")
    [f] = diagnose(m).by_check("pad-eos")
    assert f.repair is None


def test_runaway_chat_template_is_one_error_in_the_doctor_and_fast(tmp_path, llama_dir, capsys):
    m = copy_model(llama_dir, tmp_path / "m")
    (m / "chat_template.jinja").write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    start = time.monotonic()
    report = diagnose(m)
    assert time.monotonic() - start < 30
    [f] = report.by_check("chat-template")
    assert f.severity == "error" and "runs too many loop iterations" in f.evidence[0]
    assert "internal" not in checks_found(report), report.format()


def test_clean_model_still_has_no_problems(tmp_path, llama_dir):
    report = diagnose(copy_model(llama_dir, tmp_path / "m"))
    assert report.problems() == [], report.format()
    assert {"weights-corrupt", "config-sizes", "weights-shape"} <= set(report.checks_run)
    shutil.rmtree(tmp_path / "m")
