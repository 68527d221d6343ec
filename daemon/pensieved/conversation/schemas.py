"""JSON schemas rewritten for generation: objects closed, what llguidance cannot compile dropped.

A schema as a client sends it allows more than a grammar should generate
from: undeclared properties by default (a small model given that freedom
invents keys until max_tokens), the Anthropic SDK's `"format": "text"`.
`generation_schema` makes the copy a grammar generates from; its `loose`
form also drops what may keep a schema from compiling at all (patterns,
formats, remote `$ref`s), the fallback `GrammarCompiler` relaxes to. The
constraints an official SDK moved into a description (sdk_hints.py) are put
back in the copy, so the grammar enforces what the client will validate.
"""

from __future__ import annotations

from typing import Any

from pensieved.conversation.sdk_hints import restored_keywords

_COMBINATORS = ("allOf", "anyOf", "oneOf")
# Keywords whose values are schemas an instance is checked against as they
# are; `not`, `if` and `propertyNames` are left alone: closing them would
# change what they mean.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMAS = ("items", "additionalItems", "additionalProperties", "contains", "unevaluatedItems")


def generation_schema(schema: Any, loose: bool = False) -> Any:
    """The copy of a JSON schema that a grammar generates from.

    Objects get only their declared properties unless they say otherwise:
    JSON Schema allows undeclared ones by default, and a small model given
    that freedom invents keys until max_tokens. An object with
    `additionalProperties` (other than false) keeps what it says.
    `"format": "text"`, the Anthropic SDK's mark for free text, is dropped
    (llguidance knows no such format). Keywords an SDK moved into a
    description as `{maxLength: 24, minimum: 1}` are put back where they fit
    the node (sdk_hints.py). `loose` drops what may keep a schema from
    compiling at all: `pattern`, `patternProperties`, `format` and `$ref`s
    outside the schema, restored ones included.
    """
    return _close(schema, schema, partial=False, loose=loose)


_LOOSE_DROPS = ("pattern", "patternProperties", "format")


def _close(node: Any, root: Any, partial: bool, loose: bool) -> Any:
    if not isinstance(node, dict):
        return node
    out = dict(node)
    out.update(restored_keywords(node))
    if out.get("format") == "text":
        del out["format"]
    if loose:
        for key in _LOOSE_DROPS:
            out.pop(key, None)
        ref = out.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            del out["$ref"]
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {name: _close(sub, root, False, loose) for name, sub in node[key].items()}
    for key in _SCHEMAS:
        if isinstance(node.get(key), dict):
            out[key] = _close(node[key], root, False, loose)
    for key in ("prefixItems", "items"):
        if isinstance(node.get(key), list):
            out[key] = [_close(sub, root, False, loose) for sub in node[key]]
    objectish = _is_object(node)
    for key in _COMBINATORS:
        if isinstance(node.get(key), list):
            # Members of an object's combinator describe parts of one object:
            # the object closes with all their properties, not each member.
            out[key] = [_close(sub, root, objectish, loose) for sub in node[key]]
    if (
        objectish
        and not partial
        and not {"additionalProperties", "unevaluatedProperties"} & set(node)
    ):
        properties = dict(out.get("properties") or {})
        for key in _COMBINATORS:
            for member in node.get(key) or []:
                resolved = _resolve(member, root)
                declared = resolved.get("properties") if isinstance(resolved, dict) else None
                for name in declared if isinstance(declared, dict) else ():
                    properties.setdefault(name, {})
        if properties or "properties" in out:
            out["properties"] = properties
        out["additionalProperties"] = False
    return out


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    if isinstance(kind, str):
        return kind == "object"
    if isinstance(kind, list):
        return "object" in kind
    return "properties" in node


def _resolve(node: Any, root: Any) -> Any:
    """A local `$ref` (`#/$defs/Name`) followed once; anything else as it is."""
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return node
    target = root
    for part in ref[2:].split("/"):
        if not isinstance(target, dict):
            return node
        target = target.get(part.replace("~1", "/").replace("~0", "~"))
    return target if isinstance(target, dict) else node
