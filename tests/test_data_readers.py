"""Every reader (tiny files in tmp_path) and every bad-input error names file, line/row, column and what is available."""
import json

import pytest

from fasttune.data import DataError, read_rows
from fasttune.data.readers import detect_format

ROWS = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"}, {"instruction": "Capital of France?", "output": "Paris"}]


def rows_of(source, **kw):
    return [(loc, row) for loc, row in read_rows(source, **kw)]


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")
    got = rows_of(p)
    assert [r for _, r in got] == ROWS
    assert [loc.line for loc, _ in got] == [1, 2] and got[0][0].file == str(p)


def test_json_array_and_wrapped(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS), encoding="utf-8")
    assert [r for _, r in rows_of(p)] == ROWS
    p.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    got = rows_of(p)
    assert [r for _, r in got] == ROWS and got[1][0].row == 1


def test_csv_and_tsv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('instruction,output\n"Say ""hi"", then stop",hi\n"multi\nline",x\n', encoding="utf-8")
    got = rows_of(p)
    assert [r for _, r in got] == [{"instruction": 'Say "hi", then stop', "output": "hi"},
                                   {"instruction": "multi\nline", "output": "x"}]
    assert [loc.line for loc, _ in got] == [2, 3]
    t = tmp_path / "d.tsv"
    t.write_text("a\tb\n1\t2\n3\n", encoding="utf-8")
    assert [r for _, r in rows_of(t)] == [{"a": "1", "b": "2"}, {"a": "3", "b": None}]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    p = tmp_path / "d.parquet"
    pd.DataFrame([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]).to_parquet(p)
    got = rows_of(p)
    assert [r for _, r in got] == [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    assert got[1][0].row == 1


def test_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    p = tmp_path / "d.xlsx"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "train"
    ws.append(["instruction", "output"])
    ws.append(["What is 2+2?", 4])
    ws.append([None, None])
    ws.append(["Name a colour.", "blue"])
    wb.save(p)
    got = rows_of(p)
    assert [r for _, r in got] == [{"instruction": "What is 2+2?", "output": 4}, {"instruction": "Name a colour.", "output": "blue"}]
    assert [loc.row for loc, _ in got] == [2, 4] and "sheet 'train'" in got[0][0].file
    with pytest.raises(DataError, match="no sheet named 'x'.*Available: 'train'"):
        rows_of(p, sheet="x")


def test_text_file_and_folder(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("First paragraph\nstill first.\n\n\nSecond.\n", encoding="utf-8")
    got = rows_of(p)
    assert [r["text"] for _, r in got] == ["First paragraph\nstill first.", "Second."]
    assert [loc.line for loc, _ in got] == [1, 5]
    assert [r["text"] for _, r in rows_of(p, text_split="line")] == ["First paragraph", "still first.", "Second."]
    assert [r["text"] for _, r in rows_of(p, text_split="file")] == ["First paragraph\nstill first.\n\n\nSecond.\n"]
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("From markdown.", encoding="utf-8")
    (sub / "skip.bin").write_bytes(b"\x00\xff")
    got = rows_of(tmp_path, text_split="file")
    assert [r["text"] for _, r in got] == ["First paragraph\nstill first.\n\n\nSecond.\n", "From markdown."]


def test_in_memory_rows_dataframe_and_datasets():
    assert [r for _, r in rows_of(ROWS)] == ROWS
    pd = pytest.importorskip("pandas")
    got = rows_of(pd.DataFrame(ROWS))
    assert got[0][1]["instruction"] == "Add 1 and 2." and got[1][0].row == 1 and "DataFrame" in got[0][0].file


def test_datasets_dataset_if_installed():
    datasets = pytest.importorskip("datasets")  # optional: only tested where installed
    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    assert [r for _, r in rows_of(ds)] == [{"text": "a"}, {"text": "b"}]


class Dataset:
    """Stands in for datasets.Dataset where the package is absent: same type name, rows as dicts by iteration."""

    def __init__(self, rows):
        self._rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __len__(self):
        return len(self._rows)

    def __iter__(self):
        return (dict(r) for r in self._rows)


class DatasetDict(dict):
    pass


def test_dataset_like_objects_without_the_datasets_package():
    got = rows_of(Dataset(ROWS))
    assert [r for _, r in got] == ROWS and str(got[1][0]) == "<Dataset>, row 1"
    with pytest.raises(DataError, match=r"<Dataset>: empty"):
        rows_of(Dataset([]))
    with pytest.raises(DataError, match=r"got a DatasetDict \(several splits\), expected one split. "
                                        r"Available: 'train', 'test'. pass one split"):
        rows_of(DatasetDict(train=Dataset(ROWS), test=Dataset(ROWS)))


def test_datasets_package_is_never_imported():
    """The data pipeline works, start to finish, where `datasets` cannot be imported at all."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'datasets' or name.startswith('datasets.'):\n"
        "            raise ImportError('datasets is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from transformers import AutoTokenizer\n"
        "from fasttune.data import build_dataset, bundled_data_path, iter_batches, tiny_tokenizer_path\n"
        "tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path())\n"
        "s = build_dataset(bundled_data_path(), tok, max_seq_length=64, max_rows=8)\n"
        "assert len(list(iter_batches(s.train, packing=True, max_seq_length=64))) >= 1\n"
        "assert 'datasets' not in sys.modules\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_streams_lazily(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text('{"text": "ok"}\n' * 3 + "not json\n", encoding="utf-8")
    it = read_rows(p)
    assert [next(it)[1] for _ in range(3)] == [{"text": "ok"}] * 3  # rows before the bad line are served first
    with pytest.raises(DataError, match="line 4"):
        next(it)


def test_json_array_streams_element_by_element(tmp_path):
    p = tmp_path / "big.json"
    rows = [{"i": i, "text": f"row {i}\nwith [brackets], {{braces}} and \"quotes\""} for i in range(500)]
    p.write_text(json.dumps(rows, indent=2), encoding="utf-8")  # pretty-printed: each object spans lines
    got = rows_of(p)
    assert [r for _, r in got] == rows and [loc.row for loc, _ in got] == list(range(500))
    p.write_bytes(json.dumps(rows, indent=2)[:-2].encode() + b',\n  {"text": "caf\xe9"}\n]')
    it = read_rows(p)
    assert [next(it)[1] for _ in range(500)] == rows  # served before the bad bytes at the end are read
    with pytest.raises(DataError, match=r"big.json, line \d+: invalid UTF-8"):
        next(it)


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_on_one_line_streams_too(tmp_path, monkeypatch, wrapped):
    """A whole array on one line (and one wrapped as {"data": [...]}) is read in chunks: rows are served before the
    file's end has been read, and only the unconsumed text is held."""
    import fasttune.data.readers as readers

    monkeypatch.setattr(readers, "_JSON_CHUNK_BYTES", 256)
    rows = [{"i": i, "text": f"row {i}, [x] {{y}} \"q\" caf\u00e9 \u65e5\u672c"} for i in range(1000)]
    body = json.dumps(rows, ensure_ascii=False)[:-1] + ', {"text": "caf'
    head, tail = ('{"version": 2, "data": ', "}") if wrapped else ("", "")
    p = tmp_path / "one_line.json"
    p.write_bytes((head + body).encode() + b'\xe9"}]' + tail.encode())
    it = read_rows(p)
    held = []
    for _ in range(1000):
        held.append(next(it)[1])
    assert held == rows
    with pytest.raises(DataError, match=r"one_line.json, line 1: invalid UTF-8 \(byte 0xe9\)"):
        next(it)
    # an error far along the line, after most of it was dropped, names its character on the whole line
    line = head + json.dumps(rows, ensure_ascii=False)[:-1] + ', {"a": 1,, "b": 2}]' + tail
    p.write_text("\n\n" + line, encoding="utf-8")
    with pytest.raises(DataError, match=rf"line 3: malformed JSON: .* \(character {line.index('1,, ') + 3}\)"):
        rows_of(p)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_json_chunk_boundaries_change_nothing(tmp_path, monkeypatch, chunk):
    """Chunks split multi-byte characters, numbers (`12|34`), literals and escapes: the rows, and the line and
    character named by an error after many chunks were dropped, are those of the whole file."""
    import fasttune.data.readers as readers

    monkeypatch.setattr(readers, "_JSON_CHUNK_BYTES", chunk)
    rows = [{"n": 1234567, "f": -0.000125, "t": True, "z": None, "s": "\u00e9\u00fc\u65e5\U0001f600 \\ \"\n"},
            {"nested": {"a": [1, 2, {"b": "c"}]}, "e": ""}] * 3
    p = tmp_path / "c.json"
    wrapper = {"version": 1.5, "scale": -1.25e-3, "count": 123456, "ok": True, "meta": {"n": 12345}, "rows": rows,
               "tail": 2.5e10}
    p.write_text("\ufeff" + json.dumps(wrapper, ensure_ascii=False, indent=1), encoding="utf-8")
    assert [r for _, r in rows_of(p)] == rows
    # a scalar where an object belongs: named at its own line, whatever was dropped while it was read
    p.write_text("[\n" + "".join('{"a": %d},\n' % i for i in range(50)) + "12345678\n]", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.json, line 52, row 50: expected a JSON object, got a JSON int"):
        rows_of(p)
    p.write_text(json.dumps(rows, ensure_ascii=False, indent=1)[:-2] + ',\n  {"a": 1,, "b": 2}\n]', encoding="utf-8")
    n_lines = json.dumps(rows, ensure_ascii=False, indent=1).count("\n")
    with pytest.raises(DataError, match=rf"c\.json, line {n_lines + 1}: malformed JSON: Expecting property name "
                                        r"enclosed in double quotes \(character 11\)"):
        rows_of(p)


def test_json_object_with_two_arrays_is_refused(tmp_path):
    p = tmp_path / "two.json"
    p.write_text(json.dumps({"train": ROWS, "test": ROWS}), encoding="utf-8")
    with pytest.raises(DataError, match=r"'train' and 'test' both hold arrays"):
        rows_of(p)
    p.write_text('{"data": [{"a": 1}], "n": 1', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: malformed JSON: expected ',' or '}' after an object member"):
        rows_of(p)
    p.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a JSON array of objects, got a JSON str"):
        rows_of(p)


@pytest.mark.parametrize("content, message", [
    ('[\n{"a": 1}\n{"a": 2}\n]', r"line 3: malformed JSON: expected ',' or '\]' after an array element"),
    ('[\n{"a": 1},\n{"a": 2}\n', r"line 4: malformed JSON: the array is never closed"),
    ('[{"a": 1}] {"b": 2}', r"line 1: malformed JSON: extra data after the array"),
    ('[\n{"a": 1},\n"text"\n]', r"line 3, row 1: expected a JSON object, got a JSON str"),
    ('[\n{"a": 1},\n  {"a": "open', r"line 3: malformed JSON: Unterminated string starting at \(character 9\)"),
    ('[\n{"a": 1},\n{"a": "new\nline"}]', r"line 3: malformed JSON: Invalid control character at \(character 11\)"),
])
def test_json_array_errors_name_the_line(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json, " + message):
        rows_of(p)


@pytest.mark.parametrize("name, head, row", [("big.csv", b"text\n", b"ok\n"), ("big.tsv", b"a\tb\n", b"ok\t1\n"),
                                             ("big.txt", b"", b"ok\n\n")])
def test_text_formats_stream_row_by_row(tmp_path, name, head, row):
    """Rows are served before the file's end has been read (a bad byte at the end shows up only when reached),
    so a file larger than memory is never held at once."""
    p = tmp_path / name
    p.write_bytes(head + row * 1000 + b"caf\xe9\n")
    it = read_rows(p)
    for _ in range(1000):
        next(it)
    with pytest.raises(DataError, match="invalid UTF-8"):
        next(it)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "unterminated}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        rows_of(p)
    assert str(p) in str(e.value) and "line 2" in str(e.value) and "malformed JSON" in str(e.value)
    assert e.value.file == str(p) and e.value.line == 2


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: expected a JSON object per line, got a JSON list"):
        rows_of(p)


def test_malformed_json_array(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"a": 1},\n{"a": 2,}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json, line 3: malformed JSON"):
        rows_of(p)
    p.write_text('{"x": 1, "y": 2}', encoding="utf-8")
    with pytest.raises(DataError, match=r"Available: 'x', 'y'"):
        rows_of(p)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.csv", ""), ("e.csv", "a,b\n"),
                                           ("e.txt", "  \n\n"), ("e.json", "[]")])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"e\.\w+: empty: no rows"):
        rows_of(p)


def test_empty_in_memory_dataset():
    with pytest.raises(DataError, match="<in-memory data>: empty"):
        rows_of([])


@pytest.mark.parametrize("name", ["u.jsonl", "u.csv", "u.txt"])
def test_invalid_utf8(tmp_path, name):
    p = tmp_path / name
    header = b"text\n" if name.endswith(".csv") else b""
    good = b'{"text": "fine"}\n' if name.endswith(".jsonl") else b"fine\n"
    p.write_bytes(header + good + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        rows_of(p)
    line = 4 if header else 3
    assert f"{p}, line {line}: invalid UTF-8 (byte 0xe9" in str(e.value)


def test_csv_row_with_too_many_fields(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,output\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.csv, line 3: row has 3 fields but the header has 2. Available: 'instruction', 'output'"):
        rows_of(p)


def test_unknown_extension_and_missing_file(tmp_path):
    p = tmp_path / "d.xml"
    p.write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot tell the format.*Available: .*'\.jsonl'"):
        rows_of(p)
    with pytest.raises(DataError, match="no such file"):
        rows_of(tmp_path / "missing.jsonl")
    assert detect_format(tmp_path) == "text"


def test_folder_without_text_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="folder has no text files"):
        rows_of(tmp_path)
