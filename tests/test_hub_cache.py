"""A Hub repo id resolves as transformers resolves it: a local folder first, then the Hugging Face cache
(HF_HUB_CACHE / HF_HOME, models--org--name/snapshots/<commit> through refs/<revision>), then a download unless
HF_HUB_OFFLINE; a repo id neither cached nor reachable is one error saying both. No test touches the network."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import fasttune
from fasttune.models import load_model
from fasttune.models.checkpoint import CheckpointError, resolve_pretrained
from fasttune.build import resolve_model_path

TINY = Path(fasttune.__file__).parent / "assets" / "tiny"
MAIN_SHA = "a" * 40
V1_SHA = "b" * 40


def _cache(root: Path, repo: str = "acme/tiny-model") -> Path:
    """A cache folder in huggingface_hub's layout: blobs are plain copies here (the real cache symlinks them)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for sha, ref in ((MAIN_SHA, "main"), (V1_SHA, "v1")):
        snap = repo_dir / "snapshots" / sha
        shutil.copytree(TINY, snap)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(sha)
    return repo_dir


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return _cache(tmp_path / "hub")


def test_repo_id_loads_from_the_cache_offline(offline_cache):
    model, tok = fasttune.load("acme/tiny-model", device="cpu", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_model(TINY, dtype="float32")(ids).logits)
    assert tok("hello")["input_ids"]
    assert resolve_pretrained("acme/tiny-model") == offline_cache / "snapshots" / MAIN_SHA
    # a branch or tag through refs/, a commit directly
    assert resolve_pretrained("acme/tiny-model", revision="v1") == offline_cache / "snapshots" / V1_SHA
    assert resolve_pretrained("acme/tiny-model", revision=V1_SHA) == offline_cache / "snapshots" / V1_SHA
    # model.path in a training config goes through the same resolution
    assert resolve_model_path("acme/tiny-model") == str(offline_cache / "snapshots" / MAIN_SHA)


def test_hf_home_locates_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_dir = _cache(tmp_path / "hf" / "hub")
    assert resolve_pretrained("acme/tiny-model") == repo_dir / "snapshots" / MAIN_SHA


def test_local_folder_wins_over_the_cache(offline_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(TINY, tmp_path / "acme" / "tiny-model")
    assert resolve_pretrained("acme/tiny-model") == Path("acme/tiny-model")


def test_uncached_repo_offline_is_one_clear_error(offline_cache):
    with pytest.raises(CheckpointError) as e:
        fasttune.load("acme/other-model", device="cpu")
    msg = str(e.value)
    assert "not a local folder" in msg and "Hugging Face cache" in msg and "models--acme--other-model" in msg
    assert "HF_HUB_OFFLINE" in msg
    with pytest.raises(CheckpointError, match="at revision 'v2'"):  # a revision not in the cache
        resolve_pretrained("acme/tiny-model", revision="v2")


def test_uncached_repo_unreachable_hub_is_one_clear_error(tmp_path, monkeypatch):
    """Online but the Hub cannot be reached (a closed local port as its endpoint): the error names the cache miss
    and the failed download."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(CheckpointError) as e:
        resolve_pretrained("acme/other-model")
    msg = str(e.value)
    assert "not a local folder" in msg and "Hugging Face cache" in msg
    assert "downloading it from the Hugging Face Hub failed" in msg


def test_paths_that_are_not_repo_ids_come_back_unchanged(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    assert resolve_pretrained(missing) == missing  # the loader reports it as missing, as before
    assert resolve_pretrained("model.gguf") == Path("model.gguf")


# ---- the commands that take a model: doctor and export ----------------------------------------------------------

def test_doctor_takes_a_repo_id_from_the_cache(offline_cache, tmp_path, capsys):
    from fasttune.cli import main
    from fasttune.doctor import diagnose

    report = diagnose("acme/tiny-model")
    assert report.folder.path == offline_cache / "snapshots" / MAIN_SHA
    assert report.model_dir == "acme/tiny-model"
    assert "internal" not in {f.check for f in report.findings}
    assert main(["doctor", "acme/tiny-model", "--quiet", "--json", str(tmp_path / "r.json")]) in (0, 1)
    assert "acme/tiny-model" in capsys.readouterr().out
    # not cached, offline: the same one error as fasttune.load, exit code 2
    assert main(["doctor", "acme/other-model"]) == 2
    out = capsys.readouterr().out
    assert "models--acme--other-model" in out and "HF_HUB_OFFLINE" in out


def test_export_takes_a_repo_id_from_the_cache(offline_cache, tmp_path, capsys):
    from fasttune.cli import main

    out = tmp_path / "merged"
    assert main(["export", "acme/tiny-model", str(out), "--format", "merged", "--dtype", "float32"]) == 0, \
        capsys.readouterr()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(load_model(out, dtype="float32")(ids).logits, load_model(TINY, dtype="float32")(ids).logits)
    assert main(["export", "acme/other-model", str(tmp_path / "x"), "--format", "merged"]) == 2
    err = capsys.readouterr().err
    assert "models--acme--other-model" in err and "HF_HUB_OFFLINE" in err
