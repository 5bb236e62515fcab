"""Readers: turn a file, folder or in-memory table into a lazy stream of (Location, row dict).

Formats: JSONL (.jsonl/.ndjson), JSON array (.json), CSV (.csv), TSV (.tsv/.tab), Parquet (.parquet), Excel (.xlsx),
plain text (.txt/.md/.text, or a folder of them: one row {"text": ...} per document), and in-memory data: a list
of dicts, a pandas DataFrame, or a `datasets.Dataset` (used only if the user passes one; never imported here).

Everything streams (a file larger than memory is never loaded at once) except text read with split="file":
line-based formats are decoded line by line, JSON in chunks whatever its layout (pretty-printed, on one line, or
wrapped as {"data": [...]}); invalid bytes are reported with their line.
"""
from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from .errors import DataError, Location

Row = dict
TEXT_SUFFIXES = (".txt", ".md", ".text")
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "xlsx", "text")
_SUFFIX_TO_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                     ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet", ".xlsx": "xlsx", ".xlsm": "xlsx",
                     **{s: "text" for s in TEXT_SUFFIXES}}


def detect_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if path.is_dir():
        return "text"
    fmt = _SUFFIX_TO_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the format of {path.name!r} from its extension", file=str(path),
                        available=sorted(_SUFFIX_TO_FORMAT), hint="rename the file or pass format=... explicitly")
    return fmt


def _decoded_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its newline), raising DataError on bytes that are not valid text."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise DataError(f"invalid {encoding.upper()} (byte 0x{raw[e.start]:02x} at byte {e.start} of the line)",
                                file=path, line=number,
                                hint=f"re-save the file as {encoding.upper()} or pass encoding=... to the reader") from None
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # byte-order mark written by some editors
            yield number, line


def read_jsonl(path: str, encoding: str = "utf-8") -> Iterator[tuple[Location, Row]]:
    for number, line in _decoded_lines(path, encoding):
        if not line.strip():
            continue  # blank lines separate nothing and hold no data
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} at character {e.colno}: {line.strip()[:80]!r}", file=path,
                            line=number, hint="each line of a JSONL file must be one complete JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object per line, got a JSON {type(obj).__name__}", file=path, line=number)
        yield Location(path, line=number), obj


_JSON_BUFFER_LIMIT = 64 * 2**20  # characters of one array element before giving up on it
_JSON_CHUNK_BYTES = 2**20  # a JSON file is read this many bytes at a time, whatever its line structure


class _JsonText:
    """A JSON file as decoded text read in chunks and consumed left to right: only the unconsumed part (at least
    the value being parsed) is held, so neither a pretty-printed array nor one written on a single line is loaded
    whole. Positions are indices into `buf`; `line0`/`col0` say where `buf[0]` sits in the file (for errors)."""

    def __init__(self, path: str, encoding: str):
        self.path, self.encoding = path, encoding
        self.file = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder(encoding)()
        self.buf, self.pos, self.eof = "", 0, False
        self.bad_bytes: DataError | None = None  # invalid bytes found ahead of the cursor
        self.line0, self.col0 = 1, 0  # 1-based line of buf[0]; characters of that line dropped before buf[0]

    def close(self) -> None:
        self.file.close()

    def more(self) -> bool:
        """Append the next chunk (dropping what is consumed); False at the end of the file."""
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:  # amortised: each character is dropped (and scanned for newlines) once
            dropped = self.buf[:self.pos]
            newlines = dropped.count("\n")
            self.col0 = len(dropped) - dropped.rfind("\n") - 1 if newlines else self.col0 + len(dropped)
            self.line0 += newlines
            self.buf, self.pos = self.buf[self.pos:], 0
        if self.bad_bytes is not None:  # the cursor has reached them
            raise self.bad_bytes
        raw = self.file.read(_JSON_CHUNK_BYTES)
        self.eof = not raw
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:  # keep the good text before them: rows there are served first
            text = e.object[:e.start].decode(self.encoding)
            self.bad_bytes = DataError(
                f"invalid {self.encoding.upper()} (byte 0x{e.object[e.start]:02x})", file=self.path,
                line=self.line0 + self.buf.count("\n") + text.count("\n"),
                hint=f"re-save the file as {self.encoding.upper()} or pass encoding=... to the reader")
        if self.line0 == 1 and self.col0 == 0 and not self.buf and text.startswith("\ufeff"):
            text = text[1:]  # byte-order mark written by some editors
        self.buf += text
        return bool(text) or not self.eof

    def peek(self) -> str:
        """The next character that is not white space ("" at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def value(self):
        """Parse the JSON value at the cursor, reading on while it is incomplete."""
        decoder = json.JSONDecoder()
        self.peek()
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
                # a number cut by the chunk's end parses too soon: `12|34` as 12, `1.|5` as 1 (then a stray `.`)
                cut = end == len(self.buf) or (isinstance(obj, (int, float)) and self.buf[end] in ".eE+-")
                if not cut or self.eof or not self.more():
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:  # incomplete: read on; malformed: report where
                offset = e.pos - self.pos  # `more` may drop the consumed text before the cursor
                if len(self.buf) - self.pos > _JSON_BUFFER_LIMIT or not self.more():
                    raise self.malformed(e.msg, self.pos + offset) from None

    def expect(self, chars: str, message: str) -> str:
        ch = self.peek()
        if not ch or ch not in chars:
            raise self.malformed(message, self.pos)
        self.pos += 1
        return ch

    def line_at(self, at: int) -> int:
        return self.line0 + self.buf.count("\n", 0, at)

    def malformed(self, message: str, at: int) -> DataError:
        line_start = self.buf.rfind("\n", 0, at)
        column = at - line_start if line_start >= 0 else self.col0 + at + 1  # 1-based character of the line
        return DataError(f"malformed JSON: {message} (character {column})", file=self.path, line=self.line_at(at),
                         hint="if the file holds one object per line, name it .jsonl")


def _json_rows(text: _JsonText) -> Iterator[tuple[Location, Row]]:
    """The elements of the array at the cursor, one object at a time."""
    text.expect("[", "expected '['")
    if text.peek() == "]":
        text.pos += 1
        return
    i = 0
    while True:
        text.peek()
        line = text.line_at(text.pos)  # before value(): reading on may drop text before the cursor
        obj = text.value()
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got a JSON {type(obj).__name__}", file=text.path, row=i,
                            line=line)
        yield Location(text.path, row=i), obj
        i += 1
        ch = text.peek()
        if ch == "]":
            text.pos += 1
            return
        text.expect(",", "expected ',' or ']' after an array element" if ch else "the array is never closed")


def read_json(path: str, encoding: str = "utf-8") -> Iterator[tuple[Location, Row]]:
    """A JSON array of objects, or an object holding exactly one such array ({"data": [...]}); streamed element by
    element in both cases, whatever the file's line structure."""
    text = _JsonText(path, encoding)
    try:
        first = text.peek()
        if first == "[":
            yield from _json_rows(text)
        elif first == "{":
            text.pos += 1
            keys, rows_key = [], None
            while text.peek() != "}" or keys:
                key = text.value()
                if not isinstance(key, str):
                    raise text.malformed("expected a member name", text.pos)
                keys.append(key)
                text.expect(":", "expected ':' after a member name")
                if text.peek() == "[":  # {"data": [...]} or {"train": [...]}: a single list of rows
                    if rows_key is not None:
                        raise DataError("expected a JSON array of objects (or an object holding exactly one such "
                                        f"array); {rows_key!r} and {key!r} both hold arrays", file=path,
                                        hint="keep one array in the file, or split it into one file per array")
                    rows_key = key
                    yield from _json_rows(text)
                else:
                    text.value()  # another member (a version number, a description): not rows
                if text.expect(",}", "expected ',' or '}' after an object member") == "}":
                    break
            else:
                text.pos += 1
            if rows_key is None:
                raise DataError("expected a JSON array of objects (or an object holding exactly one such array)",
                                file=path, available=keys)
        elif first:
            line = text.line_at(text.pos)
            value = text.value()
            raise DataError(f"expected a JSON array of objects, got a JSON {type(value).__name__}", file=path,
                            line=line)
        if text.peek():
            raise text.malformed("extra data after the array", text.pos)
    finally:
        text.close()


def read_csv(path: str, delimiter: str = ",", encoding: str = "utf-8") -> Iterator[tuple[Location, Row]]:
    lines = _decoded_lines(path, encoding)
    state = {"line": 0}

    def text_lines() -> Iterator[str]:
        for number, line in lines:
            state["line"] = number
            yield line

    reader = csv.reader(text_lines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"duplicate column names {dupes} in the header", file=path, line=1)
    start = state["line"] + 1
    for fields in reader:
        here = Location(path, line=start)
        start = state["line"] + 1
        if not fields:
            continue  # blank line
        if len(fields) > len(header):
            raise DataError(f"row has {len(fields)} fields but the header has {len(header)}", location=here,
                            available=header, hint="quote fields that contain the delimiter")
        row = dict(zip(header, fields))
        for name in header[len(fields):]:
            row[name] = None  # short row: the trailing columns are missing
        yield here, row


def read_parquet(path: str, batch_size: int = 1024) -> Iterator[tuple[Location, Row]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow", file=path, hint="pip install 'fasttune[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable Parquet file: {e}", file=path) from None
    i = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield Location(path, row=i), row
            i += 1


def read_xlsx(path: str, sheet: str | None = None) -> Iterator[tuple[Location, Row]]:
    """Rows of one sheet (the first unless `sheet` is named); the first row is the header. Locations use the
    spreadsheet's own row numbers (header = row 1)."""
    try:
        import openpyxl
    except ImportError:
        raise DataError("reading Excel files needs openpyxl", file=path, hint="pip install 'fasttune[data]'") from None
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:
        raise DataError(f"not a readable .xlsx file: {e}", file=path) from None
    try:
        if sheet is not None and sheet not in wb.sheetnames:
            raise DataError(f"no sheet named {sheet!r}", file=path, available=wb.sheetnames)
        ws = wb[sheet] if sheet is not None else wb.worksheets[0]
        rows = ws.iter_rows(values_only=True)
        header = next(rows, None)
        if header is None:
            return
        header = [str(h) if h is not None else f"column_{j + 1}" for j, h in enumerate(header)]
        for number, values in enumerate(rows, start=2):
            if all(v is None for v in values):
                continue  # formatting-only empty rows
            yield Location(f"{path} [sheet {ws.title!r}]", row=number), dict(zip(header, values))
    finally:
        wb.close()


def _text_documents(path: str, split: str, encoding: str) -> Iterator[tuple[Location, Row]]:
    if split == "file":
        text = "".join(line for _, line in _decoded_lines(path, encoding))
        if text.strip():
            yield Location(path, line=1), {"text": text}
        return
    if split == "line":
        for number, line in _decoded_lines(path, encoding):
            if line.strip():
                yield Location(path, line=number), {"text": line.rstrip("\r\n")}
        return
    # paragraphs: blocks separated by blank lines, streamed
    buf: list[str] = []
    first = 0
    for number, line in _decoded_lines(path, encoding):
        if line.strip():
            if not buf:
                first = number
            buf.append(line)
        elif buf:
            yield Location(path, line=first), {"text": "".join(buf).rstrip("\r\n")}
            buf = []
    if buf:
        yield Location(path, line=first), {"text": "".join(buf).rstrip("\r\n")}


def read_text(path: str, split: str = "paragraph", encoding: str = "utf-8") -> Iterator[tuple[Location, Row]]:
    """Plain text for continued pre-training: one {"text": ...} row per file, paragraph (blank-line separated,
    the default) or line. A folder is read recursively: every .txt/.md/.text file, in sorted path order."""
    if split not in ("file", "paragraph", "line"):
        raise DataError(f"unknown text split {split!r}", file=path, available=["file", "paragraph", "line"])
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"folder has no text files ({', '.join(TEXT_SUFFIXES)})", file=path)
        for f in files:
            yield from _text_documents(f, split, encoding)
    else:
        yield from _text_documents(path, split, encoding)


def read_records(data: Iterable[Mapping], name: str = "<in-memory data>") -> Iterator[tuple[Location, Row]]:
    """In-memory rows: a list/iterable of dicts, a pandas DataFrame or a `datasets.Dataset`."""
    if type(data).__name__ == "DataFrame" and hasattr(data, "to_dict"):
        columns = [str(c) for c in data.columns]
        for i, values in enumerate(data.itertuples(index=False, name=None)):
            yield Location(name, row=i), dict(zip(columns, values))
        return
    for i, row in enumerate(data):
        if not isinstance(row, Mapping):
            raise DataError(f"expected each row to be a dict, got {type(row).__name__}", file=name, row=i)
        yield Location(name, row=i), dict(row)


def read_rows(source, *, format: str | None = None, text_split: str = "paragraph", sheet: str | None = None,
              encoding: str = "utf-8") -> Iterator[tuple[Location, Row]]:
    """Lazily read rows from `source` (a path to a file or folder, or in-memory rows). Raises DataError for an
    empty source, naming it."""
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if not os.path.exists(path):
            raise DataError("no such file or folder", file=path)
        fmt = format or detect_format(path)
        if fmt not in FORMATS:
            raise DataError(f"unknown data format {fmt!r}", file=path, available=FORMATS)
        if os.path.isdir(path) and fmt != "text":
            raise DataError(f"{fmt} format needs a file, got a folder", file=path)
        rows = {
            "jsonl": lambda: read_jsonl(path, encoding),
            "json": lambda: read_json(path, encoding),
            "csv": lambda: read_csv(path, ",", encoding),
            "tsv": lambda: read_csv(path, "\t", encoding),
            "parquet": lambda: read_parquet(path),
            "xlsx": lambda: read_xlsx(path, sheet),
            "text": lambda: read_text(path, text_split, encoding),
        }[fmt]()
        name = path
    elif type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):  # datasets.load_dataset(...) result
        kind = type(source).__name__
        raise DataError(f"got a {kind} (several splits), expected one split", file=f"<{kind}>",
                        available=list(source.keys()), hint="pass one split, e.g. ds['train']")
    elif isinstance(source, Mapping):
        raise DataError("expected rows (a list of dicts, a DataFrame or a datasets.Dataset) or a path, got a single dict",
                        hint="wrap it in a list")
    else:
        name = f"<{type(source).__name__}>" if type(source).__name__ in ("Dataset", "DataFrame", "IterableDataset") \
            else "<in-memory data>"
        rows = read_records(source, name)
    count = 0
    for item in rows:
        count += 1
        yield item
    if count == 0:
        raise DataError("empty: no rows or documents found", file=name,
                        hint="check the path, the file's contents and (for text) that it is not only whitespace")
