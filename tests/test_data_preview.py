"""Issue 13 item 19: `fasttune data preview CONFIG` renders the first rows as the model will see them (trained tokens
marked), the token-length distribution with the truncated count, and how the batches fill."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from fasttune.cli import main
from fasttune.data.preview import batch_fill, length_summary, preview, render
from fasttune.data.tokenize import IGNORE_INDEX
from fasttune.train.config import TrainConfig


@pytest.fixture()
def config(tmp_path) -> Path:
    rows = [{"instruction": "Name a colour.", "output": "Teal is a colour."},
            {"instruction": "Say hello.", "output": "Hello there!"},
            {"instruction": "Count to three.", "output": "One, two, three."},
            *({"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(20)),
            *({"instruction": "Repeat.", "output": "word " * 300} for _ in range(2))]  # over max_seq_length
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model: {{path: tiny, max_seq_length: 64}}
data: {{path: {tmp_path / 'rows.jsonl'}, chat_template: chatml}}
train: {{batch_size: 2, output_dir: {tmp_path / 'out'}}}
""")
    return cfg


def test_preview_renders_rows_marks_trained_tokens_and_reports_lengths_and_packing(config, capsys):
    assert main(["data", "preview", str(config), "--color", "never"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"--- row (\d+): (\d+) tokens, (\d+) trained ---\n(.*?)\n(?=--- row|\n)", out, re.S)
    assert [r[0] for r in rows] == ["1", "2", "3"]  # the first three rows of the file, in its order
    first = rows[0][3]
    assert "Name a colour." in first and "⟦Teal is a colour." in first
    assert re.findall(r"⟦(.*?)⟧", first, re.S) == ["Teal is a colour.<|im_end|>"]  # only the response is trained
    assert "Name a colour." not in "".join(re.findall(r"⟦(.*?)⟧", out, re.S))
    assert "Hello there!" in rows[1][3] and "One, two, three." in rows[2][3]

    line = re.search(r"token lengths of 25 examples: min (\d+), median (\d+), p90 (\d+), p99 (\d+), max (\d+)", out)
    assert line and int(line[5]) == 64 and int(line[1]) <= int(line[2]) <= int(line[3]) <= int(line[4]) <= 64
    assert "truncated to 64: 2;" in out  # the two long rows
    packed = re.search(r"packing \(data\.packing: true\): (\d+) training examples in (\d+) rows of 64 tokens, "
                       r"(\d+) micro-batches of 2 rows per epoch; real tokens fill ([\d.]+)%", out)
    assert packed and int(packed[1]) == 24 and int(packed[3]) == -(-int(packed[2]) // 2)  # 5% held out of 25
    assert 50 < float(packed[4]) <= 100


def test_preview_numbers_are_the_trainers_batches(config):
    out = io.StringIO()
    result = preview(TrainConfig.from_yaml(config), rows=1, out=out)
    assert result["truncated"] == 2 and result["lengths"]["examples"] == 25 and result["lengths"]["max"] == 64
    fill = result["batches"]
    assert f"{fill['fill']:.1f}% of the token slots" in out.getvalue()
    assert fill["slots"] == fill["batches"] * 2 * 64  # static shapes: batch_size rows of max_seq_length
    unpacked = preview(TrainConfig.from_yaml(config, overrides=["data.packing=false"]), rows=0, out=io.StringIO())
    assert unpacked["packed"]["fill"] == pytest.approx(fill["fill"]) and unpacked["batches"]["fill"] < fill["fill"]


def test_batch_fill_packs_best_fit_into_batch_size_rows():
    examples = [{"input_ids": [1] * n, "labels": [IGNORE_INDEX] + [1] * (n - 1)} for n in (10, 6, 4, 8)]
    fill = batch_fill(examples, batch_size=2, max_seq_length=16, packing=True, seed=0, shuffle=False)
    # best-fit decreasing: [10, 6] and [8, 4] -> two rows, one batch, 28 of 32 token slots
    assert (fill["batches"], fill["rows"], fill["real_tokens"], fill["slots"]) == (1, 2, 28, 32)
    assert fill["fill"] == pytest.approx(87.5)


def test_length_summary_nearest_rank():
    assert length_summary(list(range(100, 0, -1))) == {"examples": 100, "min": 1, "median": 50, "p90": 90, "p99": 99,
                                                        "max": 100}
    assert length_summary([7]) == {"examples": 1, "min": 7, "median": 7, "p90": 7, "p99": 7, "max": 7}


def test_render_marks_spans_and_keeps_the_tokenizers_spacing():
    from fasttune.models import load_tokenizer
    from fasttune.build import resolve_model_path

    tok = load_tokenizer(resolve_model_path("tiny"))
    ids = tok("The answer is forty two", add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * 3 + ids[3:]
    text = render(tok, ids, labels)
    assert text.replace("⟦", "").replace("⟧", "") == tok.decode(ids)
    assert text.count("⟦") == 1 and text.endswith("⟧") and not text.startswith("⟦")
    coloured = render(tok, ids, labels, color=True)
    assert "\x1b[1;32m" in coloured and "⟦" not in coloured
    assert render(tok, ids, [IGNORE_INDEX] * len(ids)) == tok.decode(ids)


def test_colour_on_request_and_brackets_when_piped(config, capsys):
    assert main(["data", "preview", str(config), "--rows", "1", "--color", "always"]) == 0
    assert "\x1b[1;32m" in capsys.readouterr().out
    assert main(["data", "preview", str(config), "--rows", "1"]) == 0  # auto: captured output is not a TTY
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "⟦" in out


def test_preview_errors_are_one_line(config, tmp_path, capsys):
    for args, needle in ((["data", "preview", str(tmp_path / "none.yaml")], "does not exist"),
                         (["data", "preview", str(config), "--set", f"data.path={tmp_path / 'no.jsonl'}"],
                          "no.jsonl"),
                         (["data", "preview", str(config), "--set", "data.nope=1"], "unknown key"),
                         (["data", "preview", str(config), "--set", f"model.path={tmp_path / 'gone'}"],
                          "does not exist"),
                         (["data", "preview", str(config), "--set", f"model.path={tmp_path}"], "holds no tokenizer")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err, err
