"""DataError: every data problem names where it happened (file, line/row, column) and what was available."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where a row came from: `file` (None for in-memory data), 1-based `line` (text formats) or 0-based `row`."""

    file: str | None = None
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        parts = [self.file if self.file is not None else "<in-memory data>"]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.row is not None:
            parts.append(f"row {self.row}")
        return ", ".join(parts)


class DataError(ValueError):
    """A problem with the user's data or data configuration.

    The message reads `<file>, line <n>, column '<c>': <what is wrong>. Available: <...>. <hint>`; the same facts are
    kept as attributes so callers (the CLI, the doctor) can format them differently.
    """

    def __init__(self, message: str, *, location: Location | None = None, file: str | None = None,
                 line: int | None = None, row: int | None = None, column: str | None = None,
                 available: Iterable[str] | None = None, hint: str | None = None):
        if location is not None:
            file = file if file is not None else location.file
            line = line if line is not None else location.line
            row = row if row is not None else location.row
        self.file, self.line, self.row, self.column = file, line, row, column
        self.available = list(available) if available is not None else None
        self.hint = hint
        self.reason = message
        where = []
        if file is not None or line is not None or row is not None:
            where.append(str(Location(file, line, row)))
        if column is not None:
            where.append(f"column {column!r}")
        text = (", ".join(where) + ": " if where else "") + message
        if self.available is not None:
            text += f". Available: {', '.join(map(repr, self.available)) or '(none)'}"
        if hint:
            text += f". {hint}"
        super().__init__(text)


class TemplateError(DataError):
    """A prompt template (the `{column}` / `[[...]]` language) is malformed or cannot be filled from a row."""
