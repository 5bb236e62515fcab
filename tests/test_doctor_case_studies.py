"""The documented case studies (docs/case_studies) reproduce their bugs: scripts/case_studies.py is run on CPU and
the claims the docs make are checked against its numbers, which must also match the committed case_studies.json."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "case_studies"
STUDIES = ("rope_bf16_positions", "gelu_exact_vs_tanh", "rmsnorm_cast_order")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("case_studies", ROOT / "scripts" / "case_studies.py")
    cs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cs)
    out = tmp_path_factory.mktemp("case_studies")
    summary = {"rope_bf16_positions": cs.rope_case(out), "gelu_exact_vs_tanh": cs.gelu_case(out),
               "rmsnorm_cast_order": cs.rmsnorm_case(out)}
    return out, json.loads(json.dumps(summary, default=lambda v: None))


def test_every_study_is_documented_with_its_plots(fresh):
    out, _ = fresh
    readme = (DOCS / "README.md").read_text()
    for name in STUDIES:
        doc = (DOCS / f"{name}.md").read_text()
        assert f"({name}.md)" in readme and f"({name}.png)" in doc
        assert (DOCS / f"{name}.png").read_bytes()[:8] == PNG  # committed plot
        assert (out / f"{name}.png").read_bytes()[:8] == PNG  # the script writes it
    assert "(rope_bf16_positions_by_position.png)" in (DOCS / "rope_bf16_positions.md").read_text()
    assert (out / "rope_bf16_positions_by_position.png").read_bytes()[:8] == PNG


def test_rope_positions_in_bf16_collide_and_the_error_grows_with_length(fresh):
    rope = fresh[1]["rope_bf16_positions"]
    assert rope["distinct_bf16_positions"] == {"256": 256, "1024": 513, "4096": 769}
    right_256 = rope["bf16 model, fp32 angles, first 256 tokens"]["final norm"]
    right_4k = rope["bf16 model, fp32 angles, first 4096 tokens"]["final norm"]
    wrong_256 = rope["bf16 model, bf16 angles, first 256 tokens"]["final norm"]
    wrong_4k = rope["bf16 model, bf16 angles, first 4096 tokens"]["final norm"]
    assert abs(right_4k / right_256 - 1) < 0.2  # correct angles: the bf16 floor, flat in length
    assert 2 < wrong_256 / right_256 < 6  # "3.5x the floor in the first 256 tokens"
    assert wrong_4k > 0.3 and wrong_4k / right_4k > 15  # "0.44 ... 28x"
    curve = rope["per_position_final_norm"]["bf16 model, bf16 angles"]
    assert curve[-1] > 5 * curve[0]


def test_exact_vs_tanh_gelu_is_tiny_in_fp32_and_below_the_bf16_floor(fresh):
    gelu = fresh[1]["gelu_exact_vs_tanh"]
    fp32 = gelu["exact GELU instead of tanh (float32)"]
    both_bf16 = gelu["exact vs tanh GELU, both bfloat16"]["final norm"]
    floor = gelu["correct model in bfloat16 (rounding floor)"]["final norm"]
    assert fp32["embeddings"] == 0 and 1e-7 < fp32["layer 0"] < fp32["final norm"] < 1e-4
    assert both_bf16 < floor / 2


def test_rmsnorm_cast_order_gap_is_of_the_size_of_the_bf16_floor(fresh):
    rms = fresh[1]["rmsnorm_cast_order"]
    right = rms["Gemma order: (1 + w) in fp32, cast last (bf16) vs fp32"]
    wrong = rms["Llama order: cast, then (1 + w) in bf16 vs fp32"]
    gap = rms["Llama order vs Gemma order, both bf16"]
    assert gap["embeddings"] == 0 and gap["layer 0"] > 1e-4 and gap["final norm"] > 3 * gap["layer 0"]
    assert gap["final norm"] > 0.3 * right["final norm"]
    assert wrong["final norm"] > right["final norm"]


def test_committed_numbers_match_the_script(fresh):
    """The docs quote case_studies.json: it must be what the script produces (bf16 sums vary a little with threads)."""
    committed = json.loads((DOCS / "case_studies.json").read_text())

    def walk(a, b, where):
        if isinstance(b, dict):
            assert set(a) == set(b), where
            for k in b:
                walk(a[k], b[k], f"{where}/{k}")
        elif isinstance(b, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}/{i}")
        elif b is None or a is None:
            assert a == b, where
        else:
            assert math.isclose(a, b, rel_tol=0.05, abs_tol=1e-12), (where, a, b)
    walk(fresh[1], committed, "case_studies.json")
