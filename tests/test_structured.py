"""Structured output (`output_config.format` json_schema) and the grammars behind it.

The grammar parts run on the embedded SmolLM2's real tokenizer; the replies
come from a real daemon with tiny random models, through the official SDK
and, for Claude Code's own request, the exact body it sends. A random model
writes noise, so these tests check what the server guarantees whatever the
model says: the reply's text is JSON valid under the schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jiter
import jsonschema
import mlx.core as mx
import pydantic
import pytest
from mlx_lm.utils import load_tokenizer

from pensieved.config import EngineConfig, ModelConfig
from pensieved.conversation.arguments import partial_json
from pensieved.conversation.constraints import GrammarCompiler
from pensieved.conversation.content import ContentAssembler
from pensieved.conversation.grammar import OutputGrammar
from pensieved.conversation.plan import plan_output
from pensieved.conversation.schemas import generation_schema
from pensieved.conversation.toolcalls import GENERIC
from pensieved.engine.loading import load_weights
from pensieved.wire.decode import decode_request
from pensieved.wire.protocol import MessagesRequest
from tests.daemon import Daemon, running_daemon, sse_events
from tests.models import THINKING_TEMPLATE, build_tiny_model

# The session-title request of Claude Code 2.1.197, as it sent it
# (../shared/claude-code/capture-interactive.jsonl, kind side:json-schema).
TITLE_REQUEST = Path(__file__).parent / "data" / "claude-code-session-title.json"
# Claude Code's prompt hooks ask for this shape.
HOOK = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "reason": {"type": "string"},
        "impossible": {"type": "boolean"},
    },
    "required": ["ok", "reason", "impossible"],
}
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location"],
}
ASK = [{"role": "user", "content": "Is the build green?"}]


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with undeclared properties refused: what a generated value must also meet."""
    return {**schema, "additionalProperties": False}


# -- the schema a grammar generates from ------------------------------------


def test_objects_get_only_their_declared_properties_unless_they_say_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
            "tags": {"type": "array", "items": {"properties": {"k": {"type": "string"}}}},
            "extra": {"type": "object", "additionalProperties": True},
            "env": {
                "type": "object",
                "additionalProperties": {"type": "object", "properties": {"v": {}}},
            },
            "note": {"type": "string", "format": "text"},
            "ref": {"$ref": "#/$defs/Point"},
        },
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    original = json.dumps(schema)
    out = generation_schema(schema)
    assert json.dumps(schema) == original  # the request's schema is left as it came
    assert out["additionalProperties"] is False
    props = out["properties"]
    assert props["where"]["additionalProperties"] is False
    assert props["tags"]["items"]["additionalProperties"] is False
    assert props["extra"]["additionalProperties"] is True  # said so: kept
    assert props["env"]["additionalProperties"]["additionalProperties"] is False
    assert "format" not in props["note"]  # the SDK's "free text" mark, unknown to llguidance
    assert out["$defs"]["Point"]["additionalProperties"] is False


def test_a_combinator_under_an_object_closes_the_object_with_all_its_parts() -> None:
    schema = {
        "type": "object",
        "properties": {"kind": {"type": "string"}},
        "anyOf": [
            {"properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"$ref": "#/$defs/B"},
        ],
        "$defs": {"B": {"properties": {"b": {"type": "integer"}}, "required": ["b"]}},
    }
    out = generation_schema(schema)
    # Each member describes part of one object: the object holds every part's properties.
    assert out["additionalProperties"] is False
    assert set(out["properties"]) == {"kind", "a", "b"}
    assert "additionalProperties" not in out["anyOf"][0]
    # At the top, alternatives are whole schemas: each is closed.
    alternatives = generation_schema({"anyOf": [{"type": "object", "properties": {"a": {}}}]})
    assert alternatives["anyOf"][0]["additionalProperties"] is False


def test_loose_schemas_drop_what_may_not_compile() -> None:
    schema = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^(?!tmp)[a-z]+$", "format": "uuid"},
            "link": {"$ref": "https://example.com/link.json"},
        },
    }
    loose = generation_schema(schema, loose=True)
    assert loose["properties"]["id"] == {"type": "string"}
    assert loose["properties"]["link"] == {}
    assert generation_schema(schema)["properties"]["id"]["pattern"] == "^(?!tmp)[a-z]+$"


# -- grammars on a real tokenizer ---------------------------------------------


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_dir: Path) -> Any:
    return load_tokenizer(str(smollm_dir))


@pytest.fixture(scope="module")
def compiler(smollm_tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(smollm_tokenizer, len(smollm_tokenizer))


def accepts(compiler: GrammarCompiler, plan: OutputGrammar, tokenizer: Any, text: str) -> bool:
    """Whether `plan`'s grammar allows `text` as a whole reply (then the end token)."""
    matcher = compiler.compile(plan).deep_copy()
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token):
            return False
    return bool(matcher.is_accepting())


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_forced_calls_hold_to_declared_properties(
    compiler: GrammarCompiler, smollm_tokenizer: Any
) -> None:
    plan = OutputGrammar(
        (("get_weather", json.dumps(WEATHER)),), forced=True, start=GENERIC.start, end=GENERIC.end
    )
    tok = smollm_tokenizer
    assert accepts(compiler, plan, tok, call("get_weather", '{"location": "Paris"}'))
    valid = call("get_weather", '{"location": "Paris", "unit": "celsius"}')
    assert accepts(compiler, plan, tok, valid)
    # What SmolLM2 used to write: valid JSON Schema (undeclared keys are
    # allowed by default), but not what a call may hold.
    assert not accepts(compiler, plan, tok, call("get_weather", '{"location": "Paris", "sku": 1}'))
    # Words after the call are allowed: they end the turn (the assembler stops there).
    assert accepts(compiler, plan, tok, valid + "\nThe weather is fine.")
    assert accepts(compiler, plan, tok, valid + "\n" + valid)
    open_schema = json.dumps({**WEATHER, "additionalProperties": True})
    open_plan = OutputGrammar(
        (("get_weather", open_schema),), forced=True, start=GENERIC.start, end=GENERIC.end
    )
    assert accepts(compiler, open_plan, tok, call("get_weather", '{"location": "Paris", "sku": 1}'))


def test_a_json_reply_comes_after_free_thinking(
    compiler: GrammarCompiler, smollm_tokenizer: Any
) -> None:
    plan = OutputGrammar(reply_schema=json.dumps(HOOK), thinking=("<think>", "</think>"))
    tok = smollm_tokenizer
    document = '{"ok": true, "reason": "tests pass", "impossible": false}'
    assert accepts(compiler, plan, tok, document)
    assert accepts(compiler, plan, tok, '<think>Anything { " } goes here.</think>\n\n' + document)
    assert not accepts(compiler, plan, tok, "Sure! " + document)
    assert not accepts(compiler, plan, tok, '{"ok": true, "reason": "x"}')  # a required key missing
    assert not accepts(compiler, plan, tok, document + " Done.")


def test_a_strict_tool_is_constrained_under_auto_and_the_others_are_any_object(
    compiler: GrammarCompiler, smollm_tokenizer: Any
) -> None:
    plan = OutputGrammar(
        (("get_weather", json.dumps(WEATHER)), ("Notes", None)),
        start=GENERIC.start,
        end=GENERIC.end,
        thinking=("<think>", "</think>"),
    )
    tok = smollm_tokenizer
    lead = "<think>The user wants the weather.</think>\n\nLet me check. "
    assert accepts(compiler, plan, tok, lead + call("get_weather", '{"location": "Oslo"}'))
    assert not accepts(compiler, plan, tok, lead + call("get_weather", '{"city": "Oslo"}'))
    assert accepts(compiler, plan, tok, lead + call("Notes", '{"anything": [1, 2]}'))
    assert accepts(compiler, plan, tok, lead + "No call needed.")


@pytest.mark.parametrize("budget", [24, 40, 64])
def test_a_document_closes_before_the_budget_runs_out(
    compiler: GrammarCompiler, smollm_tokenizer: Any, budget: int
) -> None:
    """A stand-in for a model that never closes a string on its own: random
    logits, and every token holding a quote or a brace the least likely."""
    tok = smollm_tokenizer
    closing = [i for i in range(len(tok)) if any(c in tok.decode([i]) for c in '"}')]
    penalty = mx.zeros((1, len(tok))).at[:, mx.array(closing)].add(-100.0)
    plan = OutputGrammar(reply_schema=json.dumps(HOOK))
    processor = compiler.processor(plan, budget=budget)
    mx.random.seed(budget)
    tokens = [0]
    for _ in range(budget):
        logits = processor(mx.array(tokens), mx.random.normal((1, len(tok))) + penalty)
        token = int(mx.argmax(logits, axis=-1).item())
        if token in smollm_tokenizer.eos_token_ids:
            break
        tokens.append(token)
    assert len(tokens) - 1 < budget  # ended by the end token, inside the budget
    assert processor.closing  # and it was the grammar that closed it
    jsonschema.validate(json.loads(smollm_tokenizer.decode(tokens[1:])), HOOK)


# -- reading a call back ------------------------------------------------------


def test_a_cut_call_keeps_what_the_sdk_keeps_of_its_stream() -> None:
    """Non-streamed `input` of a call cut short = the SDK's reading of the streamed pieces."""
    value = {
        "path": 'C:\\tmp\\"x"',
        "n": -12.5e3,
        "zero": 0,
        "items": [1, {"deep": True, "none": None}, "é"],
        "empty": {},
        "flag": False,
    }
    for text in (json.dumps(value), json.dumps(value, separators=(",", ":"), ensure_ascii=False)):
        for end in range(len(text) + 1):
            piece = text[:end]
            expected = jiter.from_json(piece.encode(), partial_mode=True) if piece else {}
            assert partial_json(piece) == expected, piece


def test_words_after_forced_calls_end_the_turn() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    one = call("get_weather", '{"location": "Paris"}')
    for tail, calls in (("\nThe weather in Paris is", 1), ("\n" + one + "\nDone", 2)):
        assembler = ContentAssembler(
            tool_format=GENERIC, tools=tools, constrained=True, calls_only=True
        )
        assembler.feed(one + tail)
        assert assembler.done
        assembler.finish()
        assert [b["type"] for b in assembler.blocks] == ["tool_use"] * calls
    # A second call begun as the budget ran out is not a call, nor text.
    assembler = ContentAssembler(
        tool_format=GENERIC, tools=tools, constrained=True, calls_only=True
    )
    assembler.feed(one + "\n<tool_c")
    assembler.finish()
    assert [b["type"] for b in assembler.blocks] == ["tool_use"]


# -- the plan a request gets ---------------------------------------------------


def test_a_reasoning_model_constrains_its_strict_tools_under_auto(
    smollm_dir: Path, tmp_path: Path
) -> None:
    path = build_tiny_model(
        tmp_path / "thinker", smollm_dir, chat_template=THINKING_TEMPLATE, thinking=True
    )
    loaded = load_weights(ModelConfig("thinker", str(path)), path, EngineConfig())
    body = {
        "model": "thinker",
        "max_tokens": 2048,
        "messages": ASK,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [
            {"name": "get_weather", "input_schema": WEATHER, "strict": True},
            {"name": "Notes", "input_schema": {"type": "object"}},
        ],
    }
    request = decode_request(json.dumps(body).encode(), MessagesRequest)
    plan = plan_output(request, loaded.builder.build(request), loaded)
    assert plan.grammar is not None
    assert plan.grammar.tools == (("get_weather", json.dumps(WEATHER)), ("Notes", None))
    assert plan.grammar.thinking == ("<think>", "</think>") and plan.grammar.thinking_open
    # Without a strict tool, a reasoning model's optional calls stay free.
    for tool in body["tools"]:
        tool.pop("strict", None)
    request = decode_request(json.dumps(body).encode(), MessagesRequest)
    assert plan_output(request, loaded.builder.build(request), loaded).grammar is None


# -- replies from a real daemon ------------------------------------------------


@pytest.fixture(scope="module")
def structured_daemon(
    smollm_dir: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    thinker = build_tiny_model(
        tmp_path_factory.mktemp("models") / "thinker",
        smollm_dir,
        chat_template=THINKING_TEMPLATE,
        thinking=True,
    )
    config = {
        "models": {
            # Claude Code's 64000 max_tokens clamps to what is left of this.
            "tiny": {
                "source": str(tiny_dir),
                "default": True,
                "aliases": ["claude-*"],
                "context_length": 640,
            },
            "thinker": {"source": str(thinker), "context_length": 2048},
        }
    }
    yield from running_daemon(tmp_path_factory.mktemp("structured-daemon"), config)


def test_claude_code_session_title_request_gets_a_title_that_parses(
    structured_daemon: Daemon,
) -> None:
    body = json.loads(TITLE_REQUEST.read_text())
    schema = body["output_config"]["format"]["schema"]
    assert body["stream"] is True and body["max_tokens"] == 64000
    with structured_daemon.http() as http:
        response = http.post("/v1/messages?beta=true", json=body)
        assert response.status_code == 200
        events = [(name, json.loads(data)) for name, data in sse_events(response)]
        unstreamed = http.post("/v1/messages?beta=true", json={**body, "stream": False}).json()
    starts = [e for name, e in events if name == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text"]  # one text block
    text = "".join(e["delta"]["text"] for name, e in events if name == "content_block_delta")
    jsonschema.validate(json.loads(text), schema)
    (block,) = unstreamed["content"]
    jsonschema.validate(json.loads(block["text"]), schema)


@pytest.mark.parametrize("spelling", ["output_config", "output_format"])
def test_prompt_hook_schema_streamed_and_not(structured_daemon: Daemon, spelling: str) -> None:
    client = structured_daemon.client()
    output_format = {"type": "json_schema", "schema": HOOK}
    extra = (
        {"output_config": {"format": output_format}}
        if spelling == "output_config"
        else {"output_format": output_format}  # the older, top-level spelling
    )
    message = client.messages.create(model="tiny", max_tokens=64, messages=ASK, extra_body=extra)
    (block,) = message.content
    assert block.type == "text"
    jsonschema.validate(json.loads(block.text), closed(HOOK))
    with client.messages.stream(
        model="tiny", max_tokens=64, messages=ASK, extra_body=extra
    ) as stream:
        final = stream.get_final_message()
    (block,) = final.content
    assert block.type == "text"
    jsonschema.validate(json.loads(block.text), closed(HOOK))


class Verdict(pydantic.BaseModel):
    ok: bool
    reason: str
    impossible: bool


def test_sdk_messages_parse_returns_the_model(structured_daemon: Daemon) -> None:
    client = structured_daemon.client()
    for _ in range(3):
        parsed = client.messages.parse(
            model="claude-haiku-4-5", max_tokens=48, messages=ASK, output_format=Verdict
        )
        assert isinstance(parsed.parsed_output, Verdict)


def test_thinking_stays_free_and_the_answer_is_the_json(structured_daemon: Daemon) -> None:
    client = structured_daemon.client()
    message = client.messages.create(
        model="thinker",
        max_tokens=1100,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"format": {"type": "json_schema", "schema": HOOK}},
    )
    kinds = [block.type for block in message.content]
    assert kinds == ["thinking", "text"], kinds
    jsonschema.validate(json.loads(message.content[1].text), closed(HOOK))


def test_schema_features_the_grammar_cannot_enforce_are_named_once_and_dropped(
    structured_daemon: Daemon,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12, "pattern": "^(?!tmp)"},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        "required": ["name", "tags"],
        "propertyNames": {"pattern": "^[a-z]+$"},
    }
    client = structured_daemon.client()
    for _ in range(2):
        message = client.messages.create(
            model="tiny",
            max_tokens=64,
            messages=ASK,
            output_config={"format": {"type": "json_schema", "schema": schema}},
        )
        (block,) = message.content
        value = json.loads(block.text)
        # Enforced: everything but the look-ahead pattern (llguidance's regexes have none).
        relaxed = json.loads(json.dumps(schema))
        del relaxed["properties"]["name"]["pattern"]
        jsonschema.validate(value, closed(relaxed))
    warnings = [
        line
        for line in structured_daemon.log().splitlines()
        if "output constraints relaxed" in line
    ]
    assert len(warnings) == 1, warnings
    assert "propertyNames" in warnings[0] and "look-around" in warnings[0]
