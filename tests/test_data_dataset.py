"""build_dataset end to end: bundled data, formats, splits, length policy, skip counts and errors."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from fasttune.data import (DataError, build_dataset, bundled_data_path, iter_batches, num_target_tokens,
                           tiny_tokenizer_path)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path())


def targets_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != -100])


def test_bundled_data_is_large_correct_and_varied():
    rows = [json.loads(line) for line in open(bundled_data_path("instructions.jsonl"), encoding="utf-8")]
    assert len(rows) >= 300 and all(isinstance(r["instruction"], str) and r["output"] for r in rows)
    with_input = sum("input" in r for r in rows)
    assert 50 < with_input < len(rows)  # some rows have an input column, some do not
    assert len({r["instruction"].split()[0] for r in rows}) >= 15
    for r in rows:  # spot-check the arithmetic is right
        if r["instruction"].startswith("What is ") and " + " in r["instruction"]:
            a, b = r["instruction"][8:-1].split(" + ")
            assert r["output"].startswith(f"{a} + {b} = {int(a) + int(b)}.")
    convs = [json.loads(line) for line in open(bundled_data_path("conversations.jsonl"), encoding="utf-8")]
    assert len(convs) == 50
    import os
    assert 20_000 < os.path.getsize(bundled_data_path("corpus.txt")) < 400_000


@pytest.mark.parametrize("name, kind", [("instructions.jsonl", "instruction"), ("conversations.jsonl", "chat"),
                                        ("corpus.txt", "text")])
def test_bundled_files_build_and_batch(tok, name, kind):
    splits = build_dataset(bundled_data_path(name), tok, max_seq_length=128, eval_fraction=0.1, seed=0)
    assert splits.kind == kind and splits.eval and splits.train
    total = len(splits.train) + len(splits.eval)
    assert splits.stats.examples == total and splits.stats.rows_read == total + splits.stats.dropped_no_target
    for packing in (True, False):
        n_targets = 0
        for batch in iter_batches(splits.train, packing=packing, batch_size=4, max_seq_length=128,
                                  pad_token_id=tok.pad_token_id, seed=0):
            assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[-1] <= 128
            n_targets += num_target_tokens(batch)
        assert n_targets == sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in splits.train)


def test_instruction_rows_mask_the_prompt(tok):
    rows = [{"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
            {"instruction": "Capital of Peru?", "output": "Lima"}]
    splits = build_dataset(rows, tok, shuffle=False)
    assert [targets_text(tok, ex) for ex in splits.train] == ["1, 2, 3<|im_end|>", "Lima<|im_end|>"]
    text = tok.decode(splits.train[0]["input_ids"])
    assert "Sort these numbers.\n\n3, 1, 2" in text and text.startswith("<|begin_of_text|><|im_start|>user\n")
    assert "<|im_start|>user\nCapital of Peru?<|im_end|>" in tok.decode(splits.train[1]["input_ids"])
    alpaca = build_dataset(rows, tok, shuffle=False, chat_template="alpaca", system_prompt="Be exact.")
    assert tok.decode(alpaca.train[1]["input_ids"]).startswith("<|begin_of_text|>Be exact.\n\n### Instruction:\nCapital")
    assert targets_text(tok, alpaca.train[1]) == "Lima<|end_of_text|>"


def test_prompt_completion_columns_need_no_templates(tok):
    splits = build_dataset([{"prompt": "2 + 3 =", "completion": " 5"}], tok)
    assert splits.kind == "instruction" and targets_text(tok, splits.train[0]) == " 5<|im_end|>"
    assert "user\n2 + 3 =<|im_end|>" in tok.decode(splits.train[0]["input_ids"])


def test_titanic_csv_with_prompt_and_response_templates(tmp_path, tok):
    p = tmp_path / "titanic.csv"
    p.write_text("PassengerId,Survived,Pclass,Name,Sex,Age,SibSp,Parch,Ticket,Fare,Cabin,Embarked\n"
                 '1,0,3,"Braund, Mr. Owen Harris",male,22,1,0,A/5 21171,7.25,,S\n'
                 '2,1,1,"Cumings, Mrs. John Bradley",female,38,1,0,PC 17599,71.2833,C85,C\n', encoding="utf-8")
    splits = build_dataset(p, tok, shuffle=False, response_template="{Survived}", prompt_template=(
        "{Name}, a {Age}-year-old {Sex} in class {Pclass} (ticket {Ticket}, fare {Fare}[[, cabin {Cabin}]], embarked "
        "{Embarked}, {SibSp} siblings/spouses, {Parch} parents/children). Survived?"))
    first = tok.decode(splits.train[0]["input_ids"])
    assert "Braund, Mr. Owen Harris, a 22-year-old male in class 3 (ticket A/5 21171, fare 7.25, embarked S" in first
    assert "cabin C85" in tok.decode(splits.train[1]["input_ids"])
    assert [targets_text(tok, ex) for ex in splits.train] == ["0<|im_end|>", "1<|im_end|>"]


def test_excel_and_parquet_sources(tmp_path, tok):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("openpyxl")
    df = pd.DataFrame({"instruction": ["Add 2 and 3.", "Name a planet."], "output": [5, "Mars"]})
    df.to_excel(tmp_path / "d.xlsx", index=False)
    df.astype(str).to_parquet(tmp_path / "d.parquet")
    for name in ("d.xlsx", "d.parquet"):
        splits = build_dataset(tmp_path / name, tok, shuffle=False)
        assert [targets_text(tok, ex) for ex in splits.train] == ["5<|im_end|>", "Mars<|im_end|>"]


def test_shuffle_and_split_are_deterministic(tok):
    path = bundled_data_path("instructions.jsonl")
    a = build_dataset(path, tok, seed=1, eval_size=20)
    b = build_dataset(path, tok, seed=1, eval_size=20)
    c = build_dataset(path, tok, seed=2, eval_size=20)
    assert a.train == b.train and a.eval == b.eval and len(a.eval) == 20
    assert a.train != c.train
    key = lambda ex: tuple(ex["input_ids"])
    assert not set(map(key, a.train)) & set(map(key, a.eval))


def test_truncate_and_drop_are_counted(tok, caplog):
    rows = [{"text": "word " * 200}, {"text": "short"}]
    with caplog.at_level("WARNING", logger="fasttune.data"):
        t = build_dataset(rows, tok, max_seq_length=32, shuffle=False)
    assert t.stats.truncated == 1 and len(t.train[0]["input_ids"]) == 32 and len(t.train) == 2
    assert "truncated: 1" in t.stats.summary() and "truncated: 1" in caplog.text  # reported, not only counted
    caplog.clear()
    with caplog.at_level("WARNING", logger="fasttune.data"):
        build_dataset([{"text": "short"}], tok, max_seq_length=32)
    assert not caplog.text  # nothing lost: nothing to warn about
    # streaming counts the same way, per pass, and reports at the end of each full pass
    with caplog.at_level("WARNING", logger="fasttune.data"):
        s = build_dataset(rows, tok, max_seq_length=32, shuffle=False, streaming=True)
        assert [len(ex["input_ids"]) for ex in s.train] == [32, len(t.train[1]["input_ids"])]
    assert s.stats.truncated == 1 and "streaming pass" in caplog.text and "truncated: 1" in caplog.text
    sd = build_dataset(rows, tok, max_seq_length=32, overlong="drop", streaming=True)
    assert len(list(sd.train)) == 1 and sd.stats.dropped_overlong == 1
    d = build_dataset(rows, tok, max_seq_length=32, overlong="drop", shuffle=False)
    assert d.stats.dropped_overlong == 1 and len(d.train) == 1 and "dropped overlong: 1" in d.stats.summary()
    # a response cut off entirely leaves nothing to learn: dropped and counted, never silently
    chat = [{"instruction": "x " * 100, "output": "y"}, {"instruction": "q", "output": "a"}]
    n = build_dataset(chat, tok, max_seq_length=16, shuffle=False)
    assert n.stats.dropped_no_target == 1 and n.stats.truncated == 1 and len(n.train) == 1


def test_streaming_matches_in_memory(tmp_path, tok):
    path = bundled_data_path("instructions.jsonl")
    eager = build_dataset(path, tok, shuffle=False)
    lazy = build_dataset(path, tok, shuffle=False, streaming=True)
    assert lazy.kind == "instruction" and lazy.chat_template.name == "tokenizer"
    assert list(lazy.train) == eager.train and list(lazy.train) == eager.train  # re-iterable
    assert lazy.stats.examples == len(eager.train)
    split = build_dataset(path, tok, streaming=True, eval_fraction=0.2, seed=5, shuffle_buffer=64)
    train, evals = list(split.train), list(split.eval)
    assert len(train) + len(evals) == len(eager.train) and 40 < len(evals) < 120
    key = lambda ex: tuple(ex["input_ids"])
    assert sorted(map(key, train + evals)) == sorted(map(key, eager.train))
    split.train.set_epoch(1)
    assert sorted(map(key, split.train)) == sorted(map(key, train)) and list(split.train) != train


# ---- bad input through build_dataset ----------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_missing_column_names_file_line_column_and_available(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}])
    with pytest.raises(DataError) as e:
        build_dataset(p, tok)
    assert str(e.value).startswith(f"{p}, line 2, column 'output': ")
    assert "Available: 'instruction', 'answer'" in str(e.value)


def test_skip_bad_rows_counts_them(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"},
                                          {"instruction": ["not", "text"], "output": "e"}])
    splits = build_dataset(p, tok, on_error="skip")
    assert len(splits.train) == 1 and splits.stats.skipped_rows == 2
    assert "line 2" in splits.stats.skip_reasons[0] and "line 3" in splits.stats.skip_reasons[1]
    assert "skipped rows: 2" in splits.stats.summary()


def test_non_string_values(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": 42}])
    with pytest.raises(DataError, match=r"d.jsonl, line 2, column 'text': non-string value of type int"):
        build_dataset(p, tok)
    p = write_jsonl(tmp_path / "e.jsonl", [{"instruction": {"a": 1}, "output": "x"}])
    with pytest.raises(DataError, match=r"e.jsonl, line 1, column 'instruction': non-string value of type dict"):
        build_dataset(p, tok)


def test_conversation_without_assistant_turn(tmp_path, tok):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"c.jsonl, line 1, column 'messages': conversation has no assistant turn"):
        build_dataset(p, tok)


def test_unknown_template_name_fails_before_reading(tok):
    with pytest.raises(DataError, match=r"unknown chat template 'chatgpt-9'. Available: 'llama-3'"):
        build_dataset("/nonexistent.jsonl", tok, chat_template="chatgpt-9")


def test_unrecognised_columns_and_bad_options(tok):
    with pytest.raises(DataError, match=r"row 0: cannot tell what kind of data this is. Available: 'foo'"):
        build_dataset([{"foo": "bar"}], tok)
    with pytest.raises(DataError, match="unknown overlong policy 'cut'. Available: 'truncate', 'drop'"):
        build_dataset([{"text": "a"}], tok, overlong="cut")
    with pytest.raises(DataError, match="empty"):
        build_dataset([], tok)
    with pytest.raises(DataError, match="empty"):
        build_dataset([], tok, streaming=True)
