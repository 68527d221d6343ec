"""Constraints the official SDKs move into descriptions, read back and enforced.

The SDKs' `messages.parse` and strict-tool helpers strip what Anthropic's
structured outputs refuse (`maxLength`, `minimum`, `pattern`, ...) and append
it to the field's description as `{maxLength: 24}`, then validate the reply
against the original schema. These tests run the SDKs' real transforms
(Python's `transform_schema`, TypeScript's `transformJSONSchema` through
node), check what comes back, check with llguidance what a grammar then
enforces, and ask a real daemon with a tiny random model, through both SDKs,
for replies that must validate every time.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pytest
from anthropic.lib._parse._transform import transform_schema
from mlx_lm.utils import load_tokenizer
from pydantic import Field

from pensieved.conversation.constraints import GrammarCompiler
from pensieved.conversation.grammar import OutputGrammar
from pensieved.conversation.schemas import generation_schema
from pensieved.conversation.sdk_hints import FORMATS, sdk_hints
from tests.daemon import Daemon
from tests.test_structured import accepts
from tests.test_ts_sdk import NODE, SCRIPTS, SDK, run_script

needs_node = pytest.mark.skipif(
    NODE is None or not SDK.exists(),
    reason="node and the TypeScript SDK (`make setup`: npm ci in tests/clients) are needed",
)

# What the grammar enforces once put back (see test_llguidance_enforces_what_is_put_back).
ENFORCED = {
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
}
ASK = [{"role": "user", "content": "Label this ticket and rate it."}]
# Sampled, not greedy: each try is a different random reply. (The SDK's
# parse and create take no `temperature`: Claude's newest models refuse it.)
SAMPLED = {"temperature": 1.0}


class Label(pydantic.BaseModel):
    label: str = Field(max_length=24)
    rating: int = Field(ge=1, le=10)
    # ", " inside a value Python's transform leaves unquoted.
    code: str = Field(pattern=r"^[a-z]{1,8}, [0-9]{2}$")


class Part(pydantic.BaseModel):
    serial: str = Field(min_length=4, max_length=8, description="Serial, as printed")


class Ticket(pydantic.BaseModel):
    label: str = Field(max_length=24, description="A short label.\n\n{not: this}")
    rating: int = Field(ge=1, le=10)
    ratio: float = Field(gt=0, lt=1, multiple_of=0.25)
    scale: float = Field(ge=1e-5, le=1e20)  # Python writes 1e-05 and 1e+20
    code: str = Field(pattern=r"^[a-z]{1,8}, [0-9]{2}$")
    note: str = Field(default="hi, there", min_length=1)  # a default with ", " first
    tags: list[str] = Field(min_length=2, max_length=4)
    seen: set[int]  # uniqueItems: moved, and not put back (llguidance ignores it)
    blob: bytes  # format "binary": moved, and not put back (unknown to llguidance)
    short: Annotated[str, Field(max_length=3)] | None = None
    part: Part


def constraints(node: Any) -> dict[str, Any]:
    """What of `node` a grammar enforces."""
    if not isinstance(node, dict):
        return {}
    return {k: v for k, v in node.items() if k in ENFORCED and (k != "format" or v in FORMATS)}


def compared(original: Any, generated: Any, path: str = "#") -> Iterator[tuple[str, Any, Any]]:
    """(path, constraints in the original, constraints in the generation schema), node by node."""
    yield path, constraints(original), constraints(generated)
    for key in ("properties", "$defs"):
        for name, sub in (original.get(key) or {}).items():
            yield from compared(sub, generated[key][name], f"{path}/{key}/{name}")
    if isinstance(original.get("items"), dict):
        yield from compared(original["items"], generated["items"], f"{path}/items")
    for i, sub in enumerate(original.get("anyOf") or []):
        yield from compared(sub, generated["anyOf"][i], f"{path}/anyOf/{i}")


def ts_transform(*schemas: dict[str, Any]) -> list[dict[str, Any]]:
    """The TypeScript SDK's transformJSONSchema, run by node, on each schema."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(SCRIPTS / "transform-schema.mjs")],
        input=json.dumps(schemas),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


# -- what is read back ----------------------------------------------------------


def test_python_transform_constraints_come_back() -> None:
    original = Ticket.model_json_schema()
    sent = transform_schema(Ticket)
    # The SDK really moved them: nothing enforceable is left in what it sends.
    assert not any(sent_ for _, _, sent_ in compared(original, sent))
    generated = generation_schema(sent)
    for path, wanted, got in compared(original, generated):
        assert got == wanted, path
    props = generated["properties"]
    assert props["code"]["pattern"] == r"^[a-z]{1,8}, [0-9]{2}$"
    assert (props["scale"]["minimum"], props["scale"]["maximum"]) == (1e-5, 1e20)
    # Recognised, left in the description: what llguidance would not enforce.
    assert props["seen"]["description"] == "{uniqueItems: True}"
    assert "uniqueItems" not in props["seen"]
    assert props["blob"]["description"] == "{format: binary}"
    assert "format" not in props["blob"]


@needs_node
def test_typescript_transform_constraints_come_back() -> None:
    original = Ticket.model_json_schema()
    (sent,) = ts_transform(original)
    assert not any(sent_ for _, _, sent_ in compared(original, sent))
    assert sent["properties"]["code"]["description"] == '{pattern: "^[a-z]{1,8}, [0-9]{2}$"}'
    generated = generation_schema(sent)
    for path, wanted, got in compared(original, generated):
        assert got == wanted, path


@pytest.mark.parametrize(
    ("description", "hints"),
    [
        # As the TypeScript SDK 1.14 writes them (JSON.stringify values; captured).
        ("A name\n\n{maxLength: 24}", {"maxLength": 24}),
        ("{minimum: 1, maximum: 10}", {"minimum": 1, "maximum": 10}),
        ('{pattern: "^[a-z]+, \\\\d{2}$"}', {"pattern": "^[a-z]+, \\d{2}$"}),
        ('{default: "hi, there", minLength: 1}', {"minLength": 1}),
        (
            "{exclusiveMinimum: 0, exclusiveMaximum: 1, multipleOf: 0.25}",
            {"exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.25},
        ),
        # As the Python SDK writes them (str() values: raw strings, True, 1e-05).
        ("{pattern: ^[a-z]+, \\d{2}$}", {"pattern": "^[a-z]+, \\d{2}$"}),
        ("{default: hi, there, minLength: 1}", {"minLength": 1}),
        ("{minimum: 1e-05, maximum: 1e+20}", {"minimum": 1e-05, "maximum": 1e20}),
        ("{uniqueItems: True, maxItems: 3}", {"maxItems": 3}),
        ("{default: None}", {}),
        ("Score\n\n{not: this}\n\n{maximum: 10}", {"maximum": 10}),  # the last suffix
        ("\n\n{maxLength: 5}", {"maxLength": 5}),  # Python, description ""
    ],
)
def test_both_sdks_suffixes_are_read(description: str, hints: dict[str, Any]) -> None:
    assert sdk_hints(description) == hints


@pytest.mark.parametrize(
    "description",
    [
        "{maxLength: 24 characters}",  # a value that does not parse
        "{maxLength: 24, note: short}",  # a key that is no JSON Schema keyword
        "{Keep it short}",  # free text in braces
        "{maxLength:24}",  # not `key: value`
        "{maxLength: 5,minLength: 2}",
        "{maxLength: 3, maxLength: 4}",  # a keyword twice
        "{minimum: 1, exclusiveMinimum: True}",  # draft 4's boolean: no number
        "{multipleOf: 0}",
        "{minItems: -1}",
        "{minimum: inf}",
        "Use {maxLength: 5} at most",  # not a suffix
        "At most:\n\n{maxLength: 5} characters",
        "{maxLength: 5}\n\n{Keep it short}",  # the suffix comes last
        "{}",
        "maxLength: 5",
    ],
)
def test_look_alikes_are_left_alone(description: str) -> None:
    assert sdk_hints(description) is None
    for kind in ("string", "integer", "array"):
        node = {"type": kind, "description": description}
        assert generation_schema(node) == node


def test_only_what_fits_the_node_and_is_not_set_comes_back() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "description": "{maxLength: 5, minimum: 2}"},
            "s": {"type": "string", "maxLength": 10, "description": "{maxLength: 5, minLength: 1}"},
            "when": {"type": ["string", "null"], "description": "{format: date-time}"},
            "odd": {"type": "string", "description": "{format: int32}"},
            "untyped": {"enum": ["a", "bb"], "description": "{maxLength: 1}"},
            "obj": {"type": "object", "description": "{minProperties: 1}"},
        },
        "description": "{maxProperties: 3}",
    }
    original = json.dumps(schema)
    props = generation_schema(schema)["properties"]
    assert json.dumps(schema) == original  # what is echoed and stored is left as it came
    assert constraints(props["n"]) == {"minimum": 2}
    assert constraints(props["s"]) == {"maxLength": 10, "minLength": 1}
    assert constraints(props["when"]) == {"format": "date-time"}
    assert constraints(props["odd"]) == {}
    assert constraints(props["untyped"]) == {}
    assert constraints(props["obj"]) == {"minProperties": 1}
    assert generation_schema(schema)["maxProperties"] == 3


def test_loose_schemas_still_drop_patterns_and_formats() -> None:
    node = {"type": ["string", "null"], "description": "{pattern: ^a, format: date, maxLength: 4}"}
    assert constraints(generation_schema(node)) == {
        "pattern": "^a",
        "format": "date",
        "maxLength": 4,
    }
    assert constraints(generation_schema(node, loose=True)) == {"maxLength": 4}


# -- what llguidance enforces --------------------------------------------------


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_dir: Path) -> Any:
    return load_tokenizer(str(smollm_dir))


@pytest.fixture(scope="module")
def compiler(smollm_tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(smollm_tokenizer, len(smollm_tokenizer))


INTS = {"type": "array", "items": {"type": "integer"}}
AB = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("schema", "valid", "invalid"),
    [
        ({"type": "string", "minLength": 3}, '"abc"', '"ab"'),
        ({"type": "string", "maxLength": 3}, '"abc"', '"abcd"'),
        ({"type": "string", "pattern": "^[a-z]+, [0-9]{2}$"}, '"ab, 12"', '"ab,12"'),
        ({"type": "string", "format": "date"}, '"2024-01-31"', '"today"'),
        ({"type": "integer", "minimum": 1}, "1", "0"),
        ({"type": "integer", "maximum": 10}, "10", "11"),
        ({"type": "number", "exclusiveMinimum": 0}, "0.5", "0"),
        ({"type": "number", "exclusiveMaximum": 1}, "0.5", "1"),
        ({"type": "number", "multipleOf": 0.25}, "0.75", "0.3"),
        ({**INTS, "minItems": 2}, "[1, 2]", "[1]"),
        ({**INTS, "maxItems": 2}, "[1, 2]", "[1, 2, 3]"),
        ({**AB, "minProperties": 1}, '{"a": 1}', "{}"),
        ({**AB, "maxProperties": 1}, '{"a": 1}', '{"a": 1, "b": 2}'),
    ],
)
def test_llguidance_enforces_what_is_put_back(
    compiler: GrammarCompiler,
    smollm_tokenizer: Any,
    caplog: pytest.LogCaptureFixture,
    schema: dict[str, Any],
    valid: str,
    invalid: str,
) -> None:
    plan = OutputGrammar(reply_schema=json.dumps(schema))
    with caplog.at_level(logging.WARNING):
        assert compiler.enforceable(plan) == plan  # as asked, nothing relaxed
    assert not [r for r in caplog.records if "relaxed" in r.getMessage()]
    assert accepts(compiler, plan, smollm_tokenizer, valid)
    assert not accepts(compiler, plan, smollm_tokenizer, invalid)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_llguidance_knows_every_format_put_back(
    compiler: GrammarCompiler, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    plan = OutputGrammar(reply_schema=json.dumps({"type": "string", "format": name}))
    with caplog.at_level(logging.WARNING):
        assert compiler.enforceable(plan) == plan
    assert not [r for r in caplog.records if "relaxed" in r.getMessage()]


@pytest.mark.parametrize(
    "schema", [{**INTS, "uniqueItems": True}, {"type": "string", "format": "binary"}]
)
def test_llguidance_ignores_what_stays_in_the_description(
    compiler: GrammarCompiler, caplog: pytest.LogCaptureFixture, schema: dict[str, Any]
) -> None:
    """Put back, these would be dropped with a warning: if this fails, llguidance
    learnt them, and sdk_hints.py may put them back too."""
    with caplog.at_level(logging.WARNING):
        compiler.enforceable(OutputGrammar(reply_schema=json.dumps(schema)))
    assert [r for r in caplog.records if "relaxed" in r.getMessage()]


# -- replies from a real daemon --------------------------------------------------


def test_python_sdk_parse_meets_the_constraints_it_moved(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    sent = transform_schema(Label)["properties"]
    assert sent["label"]["description"] == "{maxLength: 24}"  # what goes over the wire
    for _ in range(10):
        message = client.messages.parse(
            model="tiny", max_tokens=96, messages=ASK, output_format=Label, extra_body=SAMPLED
        )
        # parse validated the reply against Label itself (it raises otherwise).
        assert isinstance(message.parsed_output, Label)


@needs_node
def test_typescript_sdk_parse_meets_the_constraints_it_moved(tiny_daemon: Daemon) -> None:
    result = run_script(tiny_daemon, "parse-constraints.mjs", model="tiny")
    sent = result["sent"]["properties"]
    assert sent["label"]["description"] == "{maxLength: 24}"
    assert sent["rating"]["description"] == "{minimum: 1, maximum: 10}"
    # zod validated each reply (parse throws otherwise); Label agrees.
    assert len(result["parsed"]) == 10
    for parsed in result["parsed"]:
        Label.model_validate(parsed)


def test_a_forced_strict_tool_from_the_sdk_transform_meets_its_constraints(
    tiny_daemon: Daemon,
) -> None:
    client = tiny_daemon.client()
    tool = {
        "name": "label_ticket",
        "description": "Label a ticket.",
        "input_schema": transform_schema(Label),
        "strict": True,
    }
    for _ in range(10):
        message = client.messages.create(
            model="long-tools",
            max_tokens=160,
            messages=ASK,
            tools=[tool],
            tool_choice={"type": "tool", "name": "label_ticket"},
            extra_body=SAMPLED,
        )
        calls = [block for block in message.content if block.type == "tool_use"]
        assert calls and message.stop_reason == "tool_use"
        for call in calls:
            Label.model_validate(call.input)
