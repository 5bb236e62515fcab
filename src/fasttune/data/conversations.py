"""Standardise conversations to one form: a list of {"role": "system"|"user"|"assistant", "content": str}.

Accepted input forms (per turn): ShareGPT {"from": "human"|"gpt"|"system", "value": ...} and OpenAI
{"role": "user"|"assistant"|"system", "content": ...}; OpenAI content may also be a list of {"type": "text",
"text": ...} parts, which are joined.
"""
from __future__ import annotations

from collections.abc import Mapping

from .errors import DataError, Location

ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}
CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")
_KEY_PAIRS = (("role", "content"), ("from", "value"))


def find_conversation_column(row: Mapping) -> str | None:
    return next((c for c in CONVERSATION_COLUMNS if c in row), None)


def _content_text(content: object, location: Location | None, column: str, turn: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        texts = []
        for part in content:
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"turn {turn} has a non-text content part {dict(part)!r:.80}", location=location,
                                column=column, hint="only text content can be trained on")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"turn {turn} content is a non-string value of type {type(content).__name__}: {content!r:.80}",
                    location=location, column=column)


def standardize_conversation(conversation: object, location: Location | None = None,
                             column: str = "conversations", require_assistant: bool = True) -> list[dict]:
    """Return [{"role", "content"}, ...] or raise DataError naming the turn, its keys and the accepted roles."""
    if not isinstance(conversation, list):
        raise DataError(f"expected a list of turns, got {type(conversation).__name__}", location=location, column=column)
    if not conversation:
        raise DataError("conversation has no turns", location=location, column=column)
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise DataError(f"turn {i} is a {type(turn).__name__}, expected an object", location=location, column=column)
        pair = next(((r, c) for r, c in _KEY_PAIRS if r in turn and c in turn), None)
        if pair is None:
            raise DataError(f"turn {i} has neither role/content (OpenAI) nor from/value (ShareGPT) keys",
                            location=location, column=column, available=list(turn.keys()))
        raw_role = turn[pair[0]]
        role = ROLE_ALIASES.get(raw_role.lower() if isinstance(raw_role, str) else raw_role)
        if role is None:
            raise DataError(f"turn {i} has unknown role {raw_role!r}", location=location, column=column,
                            available=sorted(ROLE_ALIASES))
        if role == "system" and i != 0:
            raise DataError(f"turn {i} is a system message; only the first turn may be one", location=location,
                            column=column)
        messages.append({"role": role, "content": _content_text(turn[pair[1]], location, column, i)})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant turn, so there is nothing to learn from", location=location,
                        column=column, available=[m["role"] for m in messages])
    return messages
