"""A tiny prompt-template language for merging table columns into one prompt.

    {column}        inserts the row's value for `column` (numbers are written plainly: 3, 7.25, 22.0 -> "22").
    [[ ... ]]       an optional section: dropped when any column inside it (not counting nested sections) is
                    missing, None/NaN or an empty string. Sections nest.
    {{  }}          a literal brace.  Single `[` and `]` are ordinary text.

    PromptTemplate("{instruction}[[\\nInput: {input}]]").format({"instruction": "Add.", "input": ""})  ->  "Add."

A column outside any optional section is required: a row without it is a TemplateError that names the column and
lists the row's columns. Lists, dicts and other non-scalar values are errors too (they have no single spelling).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import Location, TemplateError


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Field:
    name: str


@dataclass(frozen=True)
class _Optional:
    parts: tuple


_MISSING = object()


def value_to_text(value: object) -> str | None:
    """A cell value as prompt text; None for missing (None, NaN). Raises TypeError for non-scalar values."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    # numpy / pandas scalars (from Parquet, Excel, DataFrames) without importing numpy
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (list, dict, tuple)) and getattr(value, "ndim", 0) == 0:
        return value_to_text(item())
    if type(value).__name__ in ("Timestamp", "datetime", "date", "time", "Decimal"):
        return str(value)
    raise TypeError(f"non-string value of type {type(value).__name__}: {value!r:.80}")


def _parse(source: str) -> tuple:
    """Parse into a tuple of _Text/_Field/_Optional nodes; raise TemplateError (with the character offset) if malformed."""
    stack: list[list] = [[]]
    opened_at: list[int] = []
    text: list[str] = []
    i, n = 0, len(source)

    def flush() -> None:
        if text:
            stack[-1].append(_Text("".join(text)))
            text.clear()

    while i < n:
        two = source[i:i + 2]
        ch = source[i]
        if two == "{{":
            text.append("{"); i += 2
        elif two == "}}":
            text.append("}"); i += 2
        elif ch == "{":
            end = source.find("}", i + 1)
            bad = [source.find(c, i + 1, end if end >= 0 else n) for c in "{\n"]
            if end < 0 or any(b >= 0 for b in bad):
                raise TemplateError(f"unclosed '{{' at character {i} of prompt template {source!r}",
                                    hint="close it with '}', or write '{{' for a literal brace")
            name = source[i + 1:end].strip()
            if not name:
                raise TemplateError(f"empty column name '{{}}' at character {i} of prompt template {source!r}",
                                    hint="write {column_name}, or '{{}}' for literal braces")
            if "[[" in name or "]]" in name:
                raise TemplateError(f"column name {name!r} at character {i} contains '[[' or ']]' in prompt template {source!r}")
            flush(); stack[-1].append(_Field(name)); i = end + 1
        elif ch == "}":
            raise TemplateError(f"unmatched '}}' at character {i} of prompt template {source!r}",
                                hint="write '}}' for a literal brace")
        elif two == "[[":
            flush(); stack.append([]); opened_at.append(i); i += 2
        elif two == "]]":
            if len(stack) == 1:
                raise TemplateError(f"']]' at character {i} closes no '[[' in prompt template {source!r}")
            flush(); parts = tuple(stack.pop()); opened_at.pop(); stack[-1].append(_Optional(parts)); i += 2
        else:
            text.append(ch); i += 1
    if len(stack) > 1:
        raise TemplateError(f"'[[' at character {opened_at[-1]} is never closed with ']]' in prompt template {source!r}")
    flush()
    return tuple(stack[0])


class PromptTemplate:
    """A compiled `{column}` / `[[...]]` template. Parsing errors are raised here, at construction."""

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise TemplateError(f"a prompt template must be a string, got {type(source).__name__}")
        self.source = source
        self._parts = _parse(source)
        self.required_columns, self.optional_columns = [], []
        self._collect(self._parts, optional=False)

    def _collect(self, parts: tuple, optional: bool) -> None:
        for p in parts:
            if isinstance(p, _Field):
                target = self.optional_columns if optional else self.required_columns
                if p.name not in target:
                    target.append(p.name)
            elif isinstance(p, _Optional):
                self._collect(p.parts, optional=True)

    @property
    def columns(self) -> list[str]:
        return self.required_columns + [c for c in self.optional_columns if c not in self.required_columns]

    def format(self, row: Mapping[str, object], location: Location | None = None) -> str:
        """Fill the template from `row`; TemplateError names the column, the row's location and its columns."""
        out = self._render(self._parts, row, location, optional=False)
        assert out is not None
        return out

    def _render(self, parts: tuple, row: Mapping, location: Location | None, optional: bool) -> str | None:
        out = []
        for p in parts:
            if isinstance(p, _Text):
                out.append(p.text)
            elif isinstance(p, _Optional):
                inner = self._render(p.parts, row, location, optional=True)
                if inner is not None:
                    out.append(inner)
            else:
                value = row.get(p.name, _MISSING) if isinstance(row, Mapping) else _MISSING
                try:
                    text = None if value is _MISSING else value_to_text(value)
                except TypeError as e:
                    raise TemplateError(str(e), location=location, column=p.name,
                                        hint="convert it to text first, or leave the column out of the template") from None
                if text is None or (optional and text == ""):
                    if optional:
                        return None  # drop the whole optional section
                    what = "is missing" if value is _MISSING else "is empty (null)"
                    raise TemplateError(f"required column {p.name!r} {what} in prompt template {self.source!r}",
                                        location=location, column=p.name, available=list(row.keys()),
                                        hint=f"put it inside [[ ... ]] to make it optional")
                out.append(text)
        return "".join(out)

    def __repr__(self) -> str:
        return f"PromptTemplate({self.source!r})"
