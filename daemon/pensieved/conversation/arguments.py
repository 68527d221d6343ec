"""A tool call's JSON arguments as they stream: where the object ends, and its complete part.

`ArgumentScanner` follows the text one character at a time to find where a
call's arguments object closes, so they can stream as `input_json_delta`
pieces; `partial_json` reads the complete part of an object cut short (by
max_tokens), by the rule the Python SDK's stream reader follows.
"""

from __future__ import annotations

import json
import re
from typing import Any


class ArgumentScanner:
    """Finds where a JSON object ends, one character at a time."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.done = False

    def feed(self, text: str) -> int:
        """Consume `text`; return how many characters belong to the object."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}


def partial_json(text: str) -> Any:
    """The complete part of a JSON object cut short: `{"a": 1, "b": "x` gives `{"a": 1}`.

    The rule of the Python SDK's stream reader (jiter's partial mode): a
    value is kept once it is complete, open objects and arrays are closed,
    and a key whose value was cut is left out. So a call cut by max_tokens
    has the same `input` streamed and not. Anything unreadable gives `{}`.
    """
    try:
        value, _ = _partial_value(text, _skip_space(text, 0))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class _Cut(ValueError):
    """The text ended inside this value."""


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _partial_value(text: str, i: int) -> tuple[Any, int]:
    """The value starting at `i` and where it ends; containers cut short are closed."""
    if i >= len(text):
        raise _Cut
    char = text[i]
    if char in "{[":
        closing = "}" if char == "{" else "]"
        items: Any = {} if char == "{" else []
        i = _skip_space(text, i + 1)
        while i < len(text) and text[i] != closing:
            try:
                if char == "{":
                    key, i = _partial_value(text, i)
                    i = _skip_space(text, i)
                    if i >= len(text):
                        raise _Cut
                    if text[i] != ":" or not isinstance(key, str):
                        raise ValueError("expected a key and a colon")
                    value, i = _partial_value(text, _skip_space(text, i + 1))
                    items[key] = value
                else:
                    value, i = _partial_value(text, i)
                    items.append(value)
            except _Cut:
                return items, len(text)
            i = _skip_space(text, i)
            if i < len(text) and text[i] == ",":
                i = _skip_space(text, i + 1)
        return items, i + 1
    if char == '"':
        end = i + 1
        while end < len(text) and text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        if end >= len(text):
            raise _Cut
        return json.loads(text[i : end + 1]), end + 1
    if char == "-" or char.isdigit():
        end = i
        while end < len(text) and text[end] in "0123456789+-.eE":
            end += 1
        if not _NUMBER.fullmatch(text, i, end):
            if end == len(text):
                raise _Cut  # `1.` or `-` at the very end
            raise ValueError(f"bad number {text[i:end]!r}")
        return json.loads(text[i:end]), end
    for word, literal in _LITERALS.items():
        if text.startswith(word, i):
            return literal, i + len(word)
        if word.startswith(text[i:]):
            raise _Cut
    raise ValueError(f"unexpected {char!r}")
