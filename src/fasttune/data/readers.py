"""Readers: turn a file, folder or in-memory table into a lazy stream of (Location, row dict).

Formats: JSONL (.jsonl/.ndjson), JSON array (.json), CSV (.csv), TSV (.tsv/.tab), Parquet (.parquet), Excel (.xlsx),
plain text (.txt/.md/.text, or a folder of them: one row {"text": ...} per document), and in-memory data: a list
of dicts, a pandas DataFrame, or a `datasets.Dataset` (used only if the user passes one; never imported here).

Everything streams (a file larger than memory is never loaded at once) except text read with split="file":
line-based formats are decoded line by line, JSON in chunks whatever its layout (pretty-printed, on one line, or
wrapped as {"data": [...]}); invalid bytes are reported with their line.

Bounded work on untrusted files: one row may take at most `max_line_bytes` (a line, or an element of a JSON array)
and one value at most `max_field_chars` characters (a string anywhere in a row, a CSV field, a spreadsheet cell),
both far above real data; a spreadsheet is read by the rows it really holds, not the extent it declares. Each
problem is a DataError naming the file, line or row and the setting to raise. Row-level problems a reader can
step over (a malformed or oversized JSONL line, a CSV field over the limit, invalid bytes in a line) go to
`on_bad_row` when one is given (build_dataset's on_error="skip" counts them) and the reader goes on.
"""
from __future__ import annotations

import codecs
import csv
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .errors import DataError, Location

Row = dict
BadRow = Callable[[DataError], None]  # receives a row-level DataError the reader steps over
MAX_LINE_BYTES = 64 * 2**20  # one row: a line of a line-based file, an element of a JSON array
MAX_FIELD_CHARS = 16 * 2**20  # one value: a string anywhere in a row, a CSV field, a spreadsheet cell
_LINE_HINT = "set data.max_line_bytes (max_line_bytes=) higher if the row is real, or use on_error: skip"
_FIELD_HINT = "set data.max_field_chars (max_field_chars=) higher if the value is real, or use on_error: skip"
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


def _raise(error: DataError) -> None:
    raise error


def _encoding_hint(encoding: str) -> str:
    return (f"re-save the file as {encoding.upper()}, or set data.encoding (encoding=) to the encoding it is in, "
            "e.g. cp1252 or latin-1")


def _decoded_lines(path: str, encoding: str = "utf-8", max_line_bytes: int = MAX_LINE_BYTES,
                   on_bad_row: BadRow = _raise) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its newline). A line over `max_line_bytes` (never held whole) or
    with bytes that are not valid text is a DataError passed to `on_bad_row`; the lines after it are still read."""
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # step over the rest of the line, a chunk at a time
                    raw = f.readline(2**20)
                    size += len(raw)
                on_bad_row(DataError(f"line of {size:,} bytes is over the limit of {max_line_bytes:,}", file=path,
                                     line=number, hint=_LINE_HINT))
                continue
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                on_bad_row(DataError(
                    f"invalid {encoding.upper()} (byte 0x{raw[e.start]:02x} at byte {e.start} of the line)",
                    file=path, line=number,
                    hint=_encoding_hint(encoding)))
                continue
            if number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # byte-order mark written by some editors
            yield number, line


def _parse_json(text: str):
    """json.loads, with nesting too deep for Python's parser (RecursionError) as a JSONDecodeError-like report."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply for Python's JSON parser", text, 0) from None


def read_jsonl(path: str, encoding: str = "utf-8", max_line_bytes: int = MAX_LINE_BYTES,
               on_bad_row: BadRow = _raise) -> Iterator[tuple[Location, Row]]:
    for number, line in _decoded_lines(path, encoding, max_line_bytes, on_bad_row):
        if not line.strip():
            continue  # blank lines separate nothing and hold no data
        try:
            obj = _parse_json(line)
        except json.JSONDecodeError as e:
            where = f" at character {e.colno}" if e.pos else ""
            on_bad_row(DataError(f"malformed JSON: {e.msg}{where}: {line.strip()[:80]!r}", file=path, line=number,
                                 hint="each line of a JSONL file must be one complete JSON object"))
            continue
        if not isinstance(obj, dict):
            on_bad_row(DataError(f"expected a JSON object per line, got a JSON {type(obj).__name__}", file=path,
                                 line=number))
            continue
        yield Location(path, line=number), obj


_JSON_CHUNK_BYTES = 2**20  # a JSON file is read this many bytes at a time, whatever its line structure


class _JsonText:
    """A JSON file as decoded text read in chunks and consumed left to right: only the unconsumed part (at least
    the value being parsed) is held, so neither a pretty-printed array nor one written on a single line is loaded
    whole. Positions are indices into `buf`; `line0`/`col0` say where `buf[0]` sits in the file (for errors)."""

    def __init__(self, path: str, encoding: str, max_value_chars: int = MAX_LINE_BYTES):
        self.path, self.encoding, self.max_value_chars = path, encoding, max_value_chars
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
                hint=_encoding_hint(self.encoding))
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
                try:
                    obj, end = decoder.raw_decode(self.buf, self.pos)
                except RecursionError:
                    raise DataError("a JSON value nested too deeply for Python's JSON parser", file=self.path,
                                    line=self.line_at(self.pos),
                                    hint="flatten the data; to skip such rows, write the file as JSONL and use "
                                         "on_error: skip") from None
                # a number cut by the chunk's end parses too soon: `12|34` as 12, `1.|5` as 1 (then a stray `.`)
                cut = end == len(self.buf) or (isinstance(obj, (int, float)) and self.buf[end] in ".eE+-")
                if not cut or self.eof or not self.more():
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:  # incomplete: read on; malformed: report where
                offset = e.pos - self.pos  # `more` may drop the consumed text before the cursor
                if len(self.buf) - self.pos > self.max_value_chars:
                    raise DataError(f"a JSON value longer than {self.max_value_chars:,} characters",
                                    file=self.path, line=self.line_at(self.pos), hint=_LINE_HINT) from None
                if not self.more():
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


def read_json(path: str, encoding: str = "utf-8", max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[Location, Row]]:
    """A JSON array of objects, or an object holding exactly one such array ({"data": [...]}); streamed element by
    element in both cases, whatever the file's line structure. One element may take `max_line_bytes` characters."""
    text = _JsonText(path, encoding, max_line_bytes)
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


def read_csv(path: str, delimiter: str = ",", encoding: str = "utf-8", max_line_bytes: int = MAX_LINE_BYTES,
             max_field_chars: int = MAX_FIELD_CHARS, on_bad_row: BadRow = _raise) -> Iterator[tuple[Location, Row]]:
    lines = _decoded_lines(path, encoding, max_line_bytes, on_bad_row)
    state = {"line": 0}

    def text_lines() -> Iterator[str]:
        for number, line in lines:
            state["line"] = number
            yield line

    # The csv module's field limit is process-wide (131,072 by default): raised to ours, never lowered; fields
    # between the two limits are refused below, so the limit that applies is always max_field_chars.
    if csv.field_size_limit() < max_field_chars:
        csv.field_size_limit(max_field_chars)
    reader = csv.reader(text_lines(), delimiter=delimiter)

    def records() -> Iterator[tuple[int, list[str] | None]]:
        """(first line, fields), fields None for a record the csv parser refused (a field over its limit). After
        an error the parser starts afresh on the next line, so only that record is lost."""
        start = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                too_long = "field limit" in str(e)  # csv's limit is ours or above: ours is the one passed
                on_bad_row(DataError(f"a field is over the limit of {max_field_chars:,} characters" if too_long
                                     else f"unreadable CSV record: {e}", file=path, line=start,
                                     hint=_FIELD_HINT if too_long else None))
                start = state["line"] + 1
                continue
            yield start, fields
            start = state["line"] + 1

    rows = records()
    first = next(rows, None)
    if first is None:
        return
    header = first[1]
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"duplicate column names {dupes} in the header", file=path, line=1)
    for start, fields in rows:
        here = Location(path, line=start)
        if not fields:
            continue  # blank line
        if len(fields) > len(header):
            on_bad_row(DataError(f"row has {len(fields)} fields but the header has {len(header)}", location=here,
                                 available=header, hint="quote fields that contain the delimiter"))
            continue
        long = next((i for i, v in enumerate(fields) if len(v) > max_field_chars), None)
        if long is not None:
            on_bad_row(DataError(f"field of {len(fields[long]):,} characters is over the limit of "
                                 f"{max_field_chars:,}", location=here, column=header[long], hint=_FIELD_HINT))
            continue
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


def _xlsx_long_text(path: str, max_field_chars: int) -> str | None:
    """Where a workbook holds a text over `max_field_chars` characters, found by streaming its XML before openpyxl
    loads it (openpyxl reads the whole shared-string table, so a 1 GB cell zipped into 1 MB would be held whole).
    Only parts whose unzipped size exceeds the limit can hold such a text, so ordinary files are not scanned."""
    from xml.parsers import expat

    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename
            if info.file_size <= max_field_chars or not (
                    name == "xl/sharedStrings.xml" or name.startswith("xl/worksheets/")):
                continue
            count = {"item": -1, "chars": 0}
            item_tag = "si" if name == "xl/sharedStrings.xml" else "c"

            def start(tag, _attrs, count=count, item_tag=item_tag):
                if tag.rpartition(":")[2] == item_tag:
                    count["item"] += 1
                    count["chars"] = 0

            def text(data, count=count):
                count["chars"] += len(data)
                if count["chars"] > max_field_chars:
                    raise _TooLong

            parser = expat.ParserCreate()
            parser.StartElementHandler, parser.CharacterDataHandler = start, text
            try:
                with z.open(info) as f:
                    while chunk := f.read(2**20):
                        parser.Parse(chunk, False)
            except _TooLong:
                what = f"shared string {count['item']}" if item_tag == "si" else f"cell {count['item'] + 1}"
                return f"{name}, {what}"
            except expat.ExpatError:
                return None  # malformed XML: openpyxl reports it
    return None


class _TooLong(Exception):
    pass


def read_xlsx(path: str, sheet: str | None = None, max_field_chars: int = MAX_FIELD_CHARS,
              on_bad_row: BadRow = _raise) -> Iterator[tuple[Location, Row]]:
    """Rows of one sheet (the first unless `sheet` is named); the first row is the header. Locations use the
    spreadsheet's own row numbers (header = row 1). Rows are those the sheet holds, as wide as the header: the
    extent a sheet declares (A1:XFD1048576 costs nothing to write) is ignored."""
    try:
        import openpyxl
    except ImportError:
        raise DataError("reading Excel files needs openpyxl", file=path, hint="pip install 'fasttune[data]'") from None
    try:
        where = _xlsx_long_text(path, max_field_chars)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"not a readable .xlsx file: {e}", file=path) from None
    if where is not None:
        raise DataError(f"a cell holds more than {max_field_chars:,} characters ({where})", file=path,
                        hint="set data.max_field_chars (max_field_chars=) higher if the cell is real, or remove it")
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:
        raise DataError(f"not a readable .xlsx file: {e}", file=path) from None
    try:
        if sheet is not None and sheet not in wb.sheetnames:
            raise DataError(f"no sheet named {sheet!r}", file=path, available=wb.sheetnames)
        ws = wb[sheet] if sheet is not None else wb.worksheets[0]
        if hasattr(ws, "reset_dimensions"):  # read-only sheets trust the declared extent; read the real rows
            ws.reset_dimensions()
        header = next(ws.iter_rows(max_row=1, values_only=True), None)
        if header is None:
            return
        header = list(header)
        while header and header[-1] is None:
            header.pop()  # formatting-only cells at the end of the header row
        if not header:
            return
        header = [str(h) if h is not None else f"column_{j + 1}" for j, h in enumerate(header)]
        name = f"{path} [sheet {ws.title!r}]"
        number = 1
        for values in ws.iter_rows(min_row=2, max_col=len(header), values_only=True):
            number += 1
            if values.count(None) == len(values):
                continue  # formatting-only empty rows
            yield Location(name, row=number), dict(zip(header, values))
    finally:
        wb.close()


def _text_documents(path: str, split: str, encoding: str, max_line_bytes: int = MAX_LINE_BYTES,
                    on_bad_row: BadRow = _raise) -> Iterator[tuple[Location, Row]]:
    if split == "file":
        text = "".join(line for _, line in _decoded_lines(path, encoding, max_line_bytes))
        if text.strip():
            yield Location(path, line=1), {"text": text}
        return
    if split == "line":
        for number, line in _decoded_lines(path, encoding, max_line_bytes, on_bad_row):
            if line.strip():
                yield Location(path, line=number), {"text": line.rstrip("\r\n")}
        return
    # paragraphs: blocks separated by blank lines, streamed
    buf: list[str] = []
    first = 0
    for number, line in _decoded_lines(path, encoding, max_line_bytes, on_bad_row):
        if line.strip():
            if not buf:
                first = number
            buf.append(line)
        elif buf:
            yield Location(path, line=first), {"text": "".join(buf).rstrip("\r\n")}
            buf = []
    if buf:
        yield Location(path, line=first), {"text": "".join(buf).rstrip("\r\n")}


def read_text(path: str, split: str = "paragraph", encoding: str = "utf-8", max_line_bytes: int = MAX_LINE_BYTES,
              on_bad_row: BadRow = _raise) -> Iterator[tuple[Location, Row]]:
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
            yield from _text_documents(f, split, encoding, max_line_bytes, on_bad_row)
    else:
        yield from _text_documents(path, split, encoding, max_line_bytes, on_bad_row)


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


def _long_value(row: Row, max_field_chars: int) -> tuple[str, int] | None:
    """(column, length) of a string over the limit anywhere in the row (nested lists and dicts included)."""
    stack = [(str(k), v) for k, v in row.items()]
    while stack:
        column, value = stack.pop()
        if isinstance(value, str):
            if len(value) > max_field_chars:
                return column, len(value)
        elif isinstance(value, dict):
            stack.extend((column, v) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((column, v) for v in value)
    return None


def read_rows(source, *, format: str | None = None, text_split: str = "paragraph", sheet: str | None = None,
              encoding: str = "utf-8", max_line_bytes: int = MAX_LINE_BYTES, max_field_chars: int = MAX_FIELD_CHARS,
              on_bad_row: BadRow | None = None) -> Iterator[tuple[Location, Row]]:
    """Lazily read rows from `source` (a path to a file or folder, or in-memory rows). Raises DataError for an
    empty source, naming it, and for a row over the size limits (see the module docstring). With `on_bad_row`,
    row-level problems are passed to it and reading goes on; without, they are raised."""
    bad = on_bad_row or _raise
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
            "jsonl": lambda: read_jsonl(path, encoding, max_line_bytes, bad),
            "json": lambda: read_json(path, encoding, max_line_bytes),
            "csv": lambda: read_csv(path, ",", encoding, max_line_bytes, max_field_chars, bad),
            "tsv": lambda: read_csv(path, "\t", encoding, max_line_bytes, max_field_chars, bad),
            "parquet": lambda: read_parquet(path),
            "xlsx": lambda: read_xlsx(path, sheet, max_field_chars, bad),
            "text": lambda: read_text(path, text_split, encoding, max_line_bytes, bad),
        }[fmt]()
        name = path
        check_fields = fmt != "text"  # a text document is one value of any length, cut before tokenising
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
        check_fields = False  # already in memory: nothing to bound
    count = 0
    for location, row in rows:
        count += 1
        long = _long_value(row, max_field_chars) if check_fields else None
        if long is not None:
            bad(DataError(f"value of {long[1]:,} characters is over the limit of {max_field_chars:,}",
                          location=location, column=long[0], hint=_FIELD_HINT))
            continue
        yield location, row
    if count == 0:
        raise DataError("empty: no rows or documents found", file=name,
                        hint="check the path, the file's contents and (for text) that it is not only whitespace")
