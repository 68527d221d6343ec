"""Constraints the official SDKs moved into descriptions, read back so a grammar enforces them.

Anthropic's structured outputs refuse some JSON Schema keywords, so the
SDKs' `messages.parse` and strict-tool helpers (Python `transform_schema`,
TypeScript `transformJSONSchema`) strip them from the schema they send,
append them to the field's description, and validate the reply against the
original schema. The suffix is the whole description, or follows it after a
blank line:

    Python:      {maxLength: 24, pattern: ^[a-z]+, \\d$, uniqueItems: True}
    TypeScript:  {maxLength: 24, pattern: "^[a-z]+, \\\\d$", uniqueItems: true}

(Python writes each value with `str()`, TypeScript with `JSON.stringify`.)
Claude obeys it by reading; a small model does not, and the client's
validation fails. `restored_keywords` reads the suffix back.

Only a description that is exactly that suffix is read: every key a JSON
Schema keyword the transforms can move, in `key: value, key: value` form,
and every value of a keyword put back parsing as that keyword's type;
anything else (free text in braces, an unknown key, `{maxLength: 24
characters}`) is left alone. Python leaves strings unquoted, so a value
may hold ", ": items split only at `, <keyword>: `. A string in double
quotes that decodes as JSON is read as TypeScript wrote it, anything else
as Python did (the one ambiguity: a Python pattern that is itself a quoted
JSON string, such as `"[a-z]+"`, loses its quotes).

Put back are the keywords llguidance enforces in `%json` grammars (checked
against llguidance 1.9 in tests/test_sdk_hints.py): minLength, maxLength,
pattern and the formats below for strings; minimum, maximum,
exclusiveMinimum, exclusiveMaximum and multipleOf for numbers; minItems and
maxItems for arrays; minProperties and maxProperties for objects. The rest
stay in the description: `uniqueItems` and formats such as pydantic's
`binary` llguidance would only drop, with a warning; annotations such as
`default` constrain nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

# Formats llguidance enforces. The SDKs keep these in the schema for a
# `"type": "string"` node; they move them only where `type` is a list.
FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"}
)

_STRING = frozenset({"string"})
_NUMERIC = frozenset({"integer", "number"})
_ARRAY = frozenset({"array"})
_OBJECT = frozenset({"object"})

_COUNT = re.compile(r"0|[1-9][0-9]*")
# JSON's numbers; Python's `str()` of an int or a finite float is one too.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


class _Invalid:
    """A value that does not parse as its keyword's type."""


_INVALID = _Invalid()


def _count(text: str) -> object:
    return int(text) if _COUNT.fullmatch(text) else _INVALID


def _number(text: str) -> object:
    if not _NUMBER.fullmatch(text):
        return _INVALID
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    value = float(text)
    return value if math.isfinite(value) else _INVALID


def _positive(text: str) -> object:
    value = _number(text)
    return value if isinstance(value, (int, float)) and value > 0 else _INVALID


def _string(text: str) -> object:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text  # Python's raw form that happens to start and end with a quote
        if isinstance(value, str):
            return value
    return text


# The keywords put back: the types they apply to and how their value parses.
_RESTORED: dict[str, tuple[frozenset[str], Callable[[str], object]]] = {
    "minLength": (_STRING, _count),
    "maxLength": (_STRING, _count),
    "pattern": (_STRING, _string),
    "format": (_STRING, _string),
    "minimum": (_NUMERIC, _number),
    "maximum": (_NUMERIC, _number),
    "exclusiveMinimum": (_NUMERIC, _number),
    "exclusiveMaximum": (_NUMERIC, _number),
    "multipleOf": (_NUMERIC, _positive),
    "minItems": (_ARRAY, _count),
    "maxItems": (_ARRAY, _count),
    "minProperties": (_OBJECT, _count),
    "maxProperties": (_OBJECT, _count),
}

# Every JSON Schema keyword (2020-12, and draft 7's that pydantic and zod
# still write) a transform can leave over for the description. Never there:
# `type`, `title`, `description`, `$ref`, `$defs`, `anyOf`, `oneOf`,
# `allOf`, which both transforms always keep or drop.
_KEYWORDS = frozenset(_RESTORED) | {
    "$schema",
    "$id",
    "$anchor",
    "$dynamicRef",
    "$dynamicAnchor",
    "$vocabulary",
    "$comment",
    "$recursiveRef",
    "$recursiveAnchor",
    "definitions",
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "dependencies",
    "prefixItems",
    "items",
    "additionalItems",
    "contains",
    "minContains",
    "maxContains",
    "properties",
    "patternProperties",
    "additionalProperties",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "required",
    "dependentRequired",
    "enum",
    "const",
    "uniqueItems",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
}
_KEY = "|".join(re.escape(key) for key in sorted(_KEYWORDS, key=len, reverse=True))
_FIRST = re.compile(rf"({_KEY}): ")
_NEXT = re.compile(rf", ({_KEY}): ")


def restored_keywords(node: Mapping[str, Any]) -> dict[str, Any]:
    """What to add to `node` from the constraints an SDK moved into its description.

    Only keywords that fit the node's `type` and that it does not set
    already; nothing when the description holds no SDK suffix.
    """
    description = node.get("description")
    hints = sdk_hints(description) if isinstance(description, str) else None
    if not hints:
        return {}
    kind = node.get("type")
    types = {kind} if isinstance(kind, str) else set()
    if isinstance(kind, list):
        types = {name for name in kind if isinstance(name, str)}
    return {
        key: value
        for key, value in hints.items()
        if key not in node and types & _RESTORED[key][0] and (key != "format" or value in FORMATS)
    }


def sdk_hints(description: str) -> dict[str, Any] | None:
    """The keywords a grammar could enforce from `description`'s SDK suffix, parsed.

    None when the description ends in no such suffix. The SDKs append it
    last, so it starts at the last `{<keyword>: ` that opens the description
    or follows a blank line (the text before may hold braces of its own);
    only that one is tried, so a long description costs one pass.
    """
    starts = [0] if description.startswith("{") else []
    starts += [match.end() for match in re.finditer(r"\n\n(?=\{)", description)]
    for start in reversed(starts):
        if _FIRST.match(description, start + 1):
            return _parsed(description[start:])
    return None


def _parsed(suffix: str) -> dict[str, Any] | None:
    if len(suffix) < 2 or suffix[0] != "{" or suffix[-1] != "}":
        return None
    items = _split(suffix[1:-1])
    if items is None:
        return None
    hints: dict[str, Any] = {}
    for key, text in items:
        if key in _RESTORED:
            value = _RESTORED[key][1](text)
            if isinstance(value, _Invalid):
                return None
            hints[key] = value
    return hints


def _split(body: str) -> list[tuple[str, str]] | None:
    """`key: value, key: value` as (key, value text) pairs; None if it is not that."""
    first = _FIRST.match(body)
    if first is None:
        return None
    keys = [first.group(1)]
    bounds = [first.end()]
    ends = []
    for boundary in _NEXT.finditer(body, first.end()):
        ends.append(boundary.start())
        keys.append(boundary.group(1))
        bounds.append(boundary.end())
    ends.append(len(body))
    if len(set(keys)) != len(keys):
        return None  # the SDKs write each keyword once
    return [(key, body[start:end]) for key, start, end in zip(keys, bounds, ends, strict=True)]
