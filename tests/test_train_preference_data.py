"""Preference data (DPO / ORPO / reward): on_error skip, clear errors, pairs truncated to no response tokens dropped
and counted, per-pair truncation counts, and a run that prints those counts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fasttune.data.errors import DataError
from fasttune.data.tokenize import IGNORE_INDEX
from fasttune.train import TrainConfig, Trainer
from fasttune.train.config import DataConfig
from fasttune.train.data import prepare_data
from test_train import TINY, make_small_model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY))


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"What is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.", "rejected": f"It is {2 * i + 1}."}
        for i in range(6)]


def _targets(ex: dict) -> int:
    return sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX)


def _decoded_targets(tok, ex: dict) -> str:
    return tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])


def test_normal_pairs_are_kept(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", ROWS)
    data = prepare_data(DataConfig(path=path, eval_fraction=0.0), tok, 128, 0, "dpo")
    assert data.kind == "preference" and len(data.train) == 6 and data.eval == []
    assert (data.skipped, data.truncated, data.dropped, data.dropped_no_target) == (0, 0, 0, 0)
    assert data.summary == "6 chosen/rejected pairs from 6 rows"
    answers = sorted((_decoded_targets(tok, p["chosen"]), _decoded_targets(tok, p["rejected"])) for p in data.train)
    for i in range(6):
        assert any(f"{i} + {i} = {2 * i}." in c and f"It is {2 * i + 1}." in r for c, r in answers)
    for p in data.train:
        assert _targets(p["chosen"]) > 0 and _targets(p["rejected"]) > 0
        assert len(p["chosen"]["input_ids"]) == len(p["chosen"]["labels"])


def test_on_error_skip_counts_bad_rows_and_keeps_the_rest(tok, tmp_path, caplog):
    rows = [dict(r) for r in ROWS]
    del rows[1]["rejected"]
    del rows[3]["chosen"]
    rows[4] = {"chosen": "yes", "rejected": "no"}  # no prompt and no instruction column for the default template
    path = _write(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="fasttune.data"):
        data = prepare_data(DataConfig(path=path, eval_fraction=0.0, on_error="skip"), tok, 128, 0, "orpo")
    assert data.skipped == 3 and len(data.train) == 3
    assert data.summary.startswith("3 chosen/rejected pairs from 6 rows; skipped 3 bad rows")
    assert "line 2" in data.skip_reasons[0] and "'rejected'" in data.skip_reasons[0]
    assert "line 4" in data.skip_reasons[1] and "'chosen'" in data.skip_reasons[1]
    assert "line 5" in data.skip_reasons[2]
    assert "skipped 3 bad rows" in caplog.text
    kept = sorted(_decoded_targets(tok, p["chosen"]) for p in data.train)
    for i in (0, 2, 5):  # exactly the good rows, each with its own chosen and rejected answers
        assert sum(f"{i} + {i} = {2 * i}." in c for c in kept) == 1
    for p in data.train:
        c = _decoded_targets(tok, p["chosen"])
        i = int(c.split(" ")[0])
        assert f"It is {2 * i + 1}." in _decoded_targets(tok, p["rejected"])


def test_on_error_raise_names_file_line_and_column(tok, tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[2]["rejected"]
    path = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"p\.jsonl, line 3, column 'rejected': missing column 'rejected'\. "
                                        r"Available: 'chosen', 'prompt'") as e:
        prepare_data(DataConfig(path=path), tok, 128, 0, "dpo")
    assert (e.value.file, e.value.line, e.value.column) == (path, 3, "rejected")
    # a file with no chosen/rejected columns at all is named as such, in either mode
    plain = _write(tmp_path / "i.jsonl", [{"instruction": "hi", "output": "hello"}] * 3)
    for mode in ("raise", "skip"):
        with pytest.raises(DataError, match=r"needs chosen/rejected pairs, but .*i\.jsonl has no chosen/rejected"):
            prepare_data(DataConfig(path=plain, on_error=mode), tok, 128, 0, "reward")


def test_pair_truncated_to_no_response_tokens_is_dropped_and_counted(tok, tmp_path):
    long_prompt = "Please answer this question carefully and at length, " * 8
    rows = [dict(r) for r in ROWS[:4]] + [{"prompt": long_prompt, "chosen": "Yes.", "rejected": "No."}]
    path = _write(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(path=path, eval_fraction=0.0)
    full = prepare_data(cfg, tok, 4096, 0, "dpo")
    assert len(full.train) == 5 and full.dropped_no_target == 0
    long_len = max(len(p["chosen"]["input_ids"]) for p in full.train)
    short_len = max(len(p[s]["input_ids"]) for p in full.train for s in ("chosen", "rejected")
                    if len(p[s]["input_ids"]) < long_len)
    max_len = short_len + 2  # the short pairs fit; the long prompt alone is longer than that
    assert max_len < long_len - 8
    data = prepare_data(cfg, tok, max_len, 0, "dpo")
    assert len(data.train) == 4 and data.dropped_no_target == 1 and data.truncated == 1
    assert ("dropped 1 pairs with no response tokens left after truncation to max_seq_length="
            f"{max_len}") in data.summary
    assert f"truncated 1 pairs to max_seq_length={max_len}" in data.summary
    for p in data.train:
        assert _targets(p["chosen"]) > 0 and _targets(p["rejected"]) > 0
    # truncation is counted per pair, not per side: a pair cut on both sides but keeping response tokens counts once
    rows = [{"prompt": "Hi.", "chosen": "word " * 200, "rejected": "other " * 200}]
    two = prepare_data(DataConfig(path=_write(tmp_path / "q.jsonl", rows), eval_fraction=0.0), tok, 48, 0, "dpo")
    assert len(two.train) == 1 and two.truncated == 1 and two.dropped_no_target == 0
    assert all(len(two.train[0][s]["input_ids"]) == 48 for s in ("chosen", "rejected"))
    drop = prepare_data(DataConfig(path=_write(tmp_path / "r.jsonl", rows + ROWS[:2]), eval_fraction=0.0,
                                   overlong="drop"), tok, 48, 0, "dpo")
    assert len(drop.train) == 2 and drop.dropped == 1 and drop.truncated == 0


def test_bundled_preferences_unchanged_and_max_examples(tok):
    data = prepare_data(DataConfig(path="bundled:preferences", max_examples=10, eval_fraction=0.2), tok, 96, 0,
                        "dpo")
    assert len(data.train) == 8 and len(data.eval) == 2 and data.summary.startswith("10 chosen/rejected pairs from 10 rows")


def test_trainer_skips_bad_rows_and_prints_the_counts(tmp_path, capsys):
    model = make_small_model(tmp_path / "model")
    rows = [dict(r) for r in ROWS] + [{"prompt": "Only a chosen answer", "chosen": "x"}]
    path = _write(tmp_path / "p.jsonl", rows)
    cfg = TrainConfig.from_dict({
        "model": {"path": str(model), "max_seq_length": 96, "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": path, "eval_fraction": 0.0, "on_error": "skip"},
        "objective": {"type": "dpo"},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 2, "grad_accum": 1,
                  "progress": False, "tensorboard": False, "plot": False, "memory": "none"}})
    trainer = Trainer(cfg)
    assert len(trainer.data.train) == 6 and trainer.data.skipped == 1
    result = trainer.train()
    assert len(result.losses) == 2
    assert "6 chosen/rejected pairs from 7 rows; skipped 1 bad rows (on_error: skip)" in capsys.readouterr().out


def test_on_error_skip_skips_and_counts_a_malformed_preference_line(tmp_path):
    """data.on_error: skip reaches the reader for preference data too (a malformed JSONL line used to stop the run)."""
    import json

    from fasttune.models import load_tokenizer
    from fasttune.train.config import DataConfig
    from fasttune.train.data import prepare_data
    from fasttune.build import tiny_model_path

    path = tmp_path / "pairs.jsonl"
    rows = [json.dumps({"prompt": f"question {i}", "chosen": "a good answer", "rejected": "a bad one"})
            for i in range(10)]
    rows.insert(3, '{"prompt": "broken", ')
    path.write_text("\n".join(rows) + "\n")
    data = prepare_data(DataConfig(path=str(path), on_error="skip", eval_fraction=0.0),
                        load_tokenizer(tiny_model_path()), 128, 0, "dpo")
    assert data.skipped == 1 and len(data.train) == 10 and "line 4" in data.skip_reasons[0]
