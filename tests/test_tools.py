"""Tool use and thinking against a real daemon, driven by the official SDK.

The models are tiny and random: what they say is noise, so these tests check
what the server guarantees whatever the model says. With `tool_choice` `any`
or `tool` the grammar makes every reply a valid call; the rest is shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import jiter
import jsonschema
import pytest

from tests.daemon import Daemon, running_daemon
from tests.models import HERMES_TEMPLATE, THINKING_TEMPLATE, build_tiny_model

BASH = {
    "name": "Bash",
    "description": "Run a shell command.",
    "input_schema": {
        "type": "object",
        "properties": {
            "command": {"type": "string", "maxLength": 40},
            "timeout": {"type": "integer", "minimum": 1, "maximum": 600},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
}
READ = {
    "name": "Read",
    "description": "Read a file.",
    "input_schema": {
        "type": "object",
        "properties": {
            "file_path": {"type": "string", "maxLength": 40},
            "limit": {"type": "integer", "minimum": 0, "maximum": 5000},
            "mode": {"enum": ["text", "bytes"]},
        },
        "required": ["file_path", "mode"],
        "additionalProperties": False,
    },
}
TOOLS = [BASH, READ]
SCHEMAS = {tool["name"]: tool["input_schema"] for tool in TOOLS}
ASK = [{"role": "user", "content": "List the files here."}]


@pytest.fixture(scope="module")
def tool_daemon(
    smollm_dir: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """Three tiny models: SmolLM2's template (no tool support, so the generic
    format), a Qwen-style template with tool support, and a reasoning model."""
    root = tmp_path_factory.mktemp("models")
    hermes = build_tiny_model(root / "hermes", smollm_dir, chat_template=HERMES_TEMPLATE)
    thinker = build_tiny_model(
        root / "thinker", smollm_dir, chat_template=THINKING_TEMPLATE, thinking=True
    )
    config = {
        "models": {
            "tiny": {"source": str(tiny_dir), "default": True, "context_length": 2048},
            "hermes": {"source": str(hermes), "context_length": 2048},
            "thinker": {"source": str(thinker), "context_length": 4096},
        }
    }
    yield from running_daemon(tmp_path_factory.mktemp("tool-daemon"), config)


def tool_uses(content: list[Any]) -> list[Any]:
    return [block for block in content if block.type == "tool_use"]


def check_call(block: Any, allowed: set[str]) -> None:
    assert block.id.startswith("toolu_")
    assert block.name in allowed
    jsonschema.validate(block.input, SCHEMAS[block.name])


@pytest.mark.parametrize("model", ["tiny", "hermes"])
def test_tool_choice_any_always_returns_a_valid_call(tool_daemon: Daemon, model: str) -> None:
    client = tool_daemon.client()
    for seed_text in ("List the files here.", "What time is it?", "Read setup.py"):
        message = client.messages.create(
            model=model,
            max_tokens=600,
            messages=[{"role": "user", "content": seed_text}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "any"},
        )
        assert message.stop_reason == "tool_use", message.content
        calls = tool_uses(message.content)
        assert calls and len(calls) == len(message.content)  # nothing but calls
        for call in calls:
            check_call(call, {"Bash", "Read"})


def test_named_tool_streams_its_input_as_it_is_generated(tool_daemon: Daemon) -> None:
    client = tool_daemon.client()
    with client.messages.stream(
        model="tiny",
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "tool", "name": "Read", "disable_parallel_tool_use": True},
    ) as stream:
        pieces: list[str] = []
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                pieces.append(event.delta.partial_json)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (call,) = final.content  # one call: parallel use was disabled
    assert call.type == "tool_use"
    check_call(call, {"Read"})
    assert len(pieces) > 1  # sent while generated, not in one piece at the end
    assert json.loads("".join(pieces)) == call.input


def test_parallel_calls_each_validate(tool_daemon: Daemon) -> None:
    client = tool_daemon.client()
    message = client.messages.create(
        model="tiny",
        max_tokens=600,
        messages=ASK,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "any"},
        extra_body={"temperature": 1.0},
    )
    calls = tool_uses(message.content)
    assert calls
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        check_call(call, {"Bash", "Read"})


@pytest.mark.parametrize("model", ["tiny", "hermes"])
def test_round_trip_tool_use_then_result_then_answer(tool_daemon: Daemon, model: str) -> None:
    client = tool_daemon.client()
    first = client.messages.create(
        model=model,
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "tool", "name": "Bash"},
    )
    calls = tool_uses(first.content)
    history = [
        *ASK,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": call.id, "content": "README.md\nsetup.py"}
                for call in calls
            ],
        },
    ]
    answer = client.messages.create(
        model=model,
        max_tokens=10,
        messages=history,
        tools=TOOLS,  # type: ignore[arg-type]
    )
    assert answer.stop_reason in {"end_turn", "max_tokens", "tool_use"}
    # The result reached the prompt: a longer result means a longer prompt.
    longer = json.loads(json.dumps(history))
    longer[2]["content"][0]["content"] = "README.md\nsetup.py\n" + "more.py\n" * 20
    counted = client.messages.count_tokens(model=model, messages=longer, tools=TOOLS)  # type: ignore[arg-type]
    prompt = answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens > prompt + 20


def test_tools_are_rendered_through_the_template(tool_daemon: Daemon) -> None:
    client = tool_daemon.client()

    def count(model: str, **kwargs: Any) -> int:
        return client.messages.count_tokens(model=model, messages=ASK, **kwargs).input_tokens

    for model in ("tiny", "hermes"):
        bare = count(model)
        with_tools = count(model, tools=TOOLS)
        assert with_tools > bare + 50  # the schemas are in the prompt
        # tool_choice "none" hides the tools from the model.
        assert count(model, tools=TOOLS, tool_choice={"type": "none"}) == bare


def test_tool_choice_none_never_calls(tool_daemon: Daemon) -> None:
    message = tool_daemon.client().messages.create(
        model="tiny",
        max_tokens=30,
        messages=ASK,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "none"},
    )
    assert not tool_uses(message.content)
    assert message.stop_reason in {"end_turn", "max_tokens"}


BAD_TOOL_REQUESTS = [
    ({"tools": [{**BASH, "name": "run bash"}]}, "tools.0.name"),
    ({"tools": [{**BASH, "input_schema": {"type": "string"}}]}, "tools.0.input_schema"),
    ({"tools": [{**BASH, "input_schema": None}]}, "tools.0.input_schema"),
    ({"tools": [BASH, BASH]}, "tools.1.name: tool names must be unique"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0: "),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "Edit"}}, "tool_choice.name"),
    ({"tool_choice": {"type": "any"}}, "tool_choice: type 'any' needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice"),
    (
        {
            "tools": TOOLS,
            "tool_choice": {"type": "any"},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "max_tokens": 2000,
        },
        "thinking may not be enabled",
    ),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking.budget_tokens"),
    (
        {"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 2048},
        "must be less than max_tokens",
    ),
    ({"thinking": {"type": "sometimes"}}, "thinking"),
    (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "?"}],
                },
            ]
        },
        "messages.2.content.0: unexpected `tool_use_id`",
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_TOOL_REQUESTS)
def test_bad_tool_input_gets_a_400_naming_it(
    tool_daemon: Daemon, fields: dict[str, Any], message: str
) -> None:
    body = {"model": "tiny", "max_tokens": 10, "messages": ASK, **fields}
    with tool_daemon.http() as http:
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            if path.endswith("count_tokens") and "must be less than max_tokens" in message:
                continue  # count_tokens takes no max_tokens
            response = http.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert message in error["message"]


def test_claude_code_agent_fields_are_accepted(tool_daemon: Daemon) -> None:
    with tool_daemon.http() as http:
        response = http.post(
            "/v1/messages",
            json={
                "model": "claude-opus-4-8",
                "max_tokens": 5,
                "messages": ASK,
                "tools": TOOLS,
                "thinking": {"type": "adaptive"},
                "output_config": {"effort": "high"},
                "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
                "metadata": {"user_id": "u"},
            },
        )
    assert response.status_code == 200, response.text


# -- thinking -----------------------------------------------------------------


def test_thinking_budget_closes_the_reasoning_and_the_answer_follows(tool_daemon: Daemon) -> None:
    client = tool_daemon.client()
    with client.messages.stream(
        model="thinker",
        max_tokens=1100,
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 1024},
        # Greedy: sampled, a random model ends its turn early in ~5% of runs.
        extra_body={"temperature": 0.0},
    ) as stream:
        kinds = [
            (event.type, getattr(getattr(event, "delta", None), "type", None))
            for event in stream
            if event.type.startswith("content_block")  # not the SDK's own derived events
        ]
        final = stream.get_final_message()
    thinking = final.content[0]
    assert thinking.type == "thinking"
    assert thinking.thinking and thinking.signature
    # The random model never closes its reasoning itself: the budget did,
    # early enough for an answer to follow within max_tokens.
    assert len(final.content) == 2 and final.content[1].type == "text"
    assert final.usage.output_tokens == 1100
    assert ("content_block_delta", "thinking_delta") in kinds
    signature_at = kinds.index(("content_block_delta", "signature_delta"))
    assert kinds[signature_at + 1] == ("content_block_stop", None)
    assert "<think>" not in final.content[1].text and "</think>" not in final.content[1].text


def test_thinking_blocks_sent_back_are_accepted(tool_daemon: Daemon) -> None:
    client = tool_daemon.client()
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "They want ls.", "signature": "c2ln"},
                {"type": "redacted_thinking", "data": "abc"},
                {"type": "text", "text": "Sure."},
            ],
        },
        {"role": "user", "content": "Thanks."},
    ]
    for model in ("thinker", "tiny"):
        for thinking in ({"type": "adaptive"}, {"type": "disabled"}):
            message = client.messages.create(
                model=model,
                max_tokens=4,
                messages=history,  # type: ignore[arg-type]
                thinking=thinking,  # type: ignore[arg-type]
            )
            assert message.stop_reason in {"end_turn", "max_tokens"}


def test_thinking_is_ignored_by_models_without_reasoning(tool_daemon: Daemon) -> None:
    client = tool_daemon.client()
    with client.messages.stream(
        model="tiny",
        max_tokens=1100,  # more than the budget, which must be 1024 at least
        messages=ASK,
        thinking={"type": "enabled", "budget_tokens": 1024},
    ) as stream:
        for event in stream:
            if event.type == "content_block_start":
                # The first block is the answer; leaving frees the slot.
                assert event.content_block.type == "text"
                break
        else:
            pytest.fail("no content block")


def test_disabled_thinking_is_not_opened(tool_daemon: Daemon) -> None:
    client = tool_daemon.client()

    def count(thinking: dict[str, Any]) -> int:
        return client.messages.count_tokens(
            model="thinker",
            messages=ASK,
            thinking=thinking,  # type: ignore[arg-type]
        ).input_tokens

    # The template opens <think> in the generation prompt only when asked.
    assert count({"type": "adaptive"}) > count({"type": "disabled"})


def test_sdk_error_type_for_a_bad_tool(tool_daemon: Daemon) -> None:
    with pytest.raises(anthropic.BadRequestError, match=r"tools\.0\.input_schema"):
        tool_daemon.client().messages.create(
            model="tiny",
            max_tokens=5,
            messages=ASK,
            tools=[{"name": "x", "input_schema": {"type": "array"}}],  # type: ignore[list-item]
        )


# -- grammar-forced calls close ---------------------------------------------------

GET_WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. Paris, FR"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
}
# Undeclared properties are not generated: a call must meet the schema closed.
CLOSED_WEATHER = {**GET_WEATHER["input_schema"], "additionalProperties": False}
CITIES = [
    "Paris", "London", "Tokyo", "Oslo", "Lima", "Cairo", "Delhi", "Rome", "Berlin", "Madrid",
    "Sydney", "Toronto", "Nairobi", "Seoul", "Dublin", "Vienna", "Prague", "Lisbon", "Athens",
    "Quito",
]  # fmt: skip


# Greedy tries, one per city, and sampled ones: all decode in one batch.
SAMPLED_TRIES = 40


@pytest.fixture(scope="module")
def smollm_daemon(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The embedded SmolLM2, every try of a test in one batch."""
    batch = len(CITIES) + SAMPLED_TRIES
    config = {
        "models": {"smollm2": {"source": str(smollm_dir), "default": True, "context_length": 1024}},
        # float32 decodes faster than Q4 on MLX's CPU backend, OpenBLAS or not.
        "engine": {"max_sequences": batch, "max_queue": 8, "dequantize": "always"},
    }
    yield from running_daemon(tmp_path_factory.mktemp("smollm-daemon"), config)


def test_forced_calls_on_the_embedded_model_close_with_declared_properties(
    smollm_daemon: Daemon,
) -> None:
    """20 greedy tries (one city each) and 40 sampled at temperature 1.0, in one batch.

    The sampled ones set only the temperature, as a client that leaves the
    rest to the server does: the model's own top_p and Pensieve's top_k and
    min_p cut the tail (models/sampling.py). Before they did, at temperature
    1.0 and nothing else, 0 to 3 tries in 40 wrote a junk location until the
    budget closed it. The budget is roomy: a call closed by the budget
    (valid, but `max_tokens`) is not the model closing it.
    """
    client = smollm_daemon.client(timeout=600)
    greedy = {"temperature": 0.0}
    sampled = {"temperature": 1.0}

    def ask(city: str, sampling: dict[str, float]) -> Any:
        return client.messages.create(
            model="smollm2",
            max_tokens=200,
            messages=[{"role": "user", "content": f"What is the weather like in {city}?"}],
            tools=[GET_WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "any"},
            extra_body=sampling,
        )

    # The tools' system prompt is prefilled once; the tries read it from the prompt cache.
    ask("Paris", greedy)
    tries = [(city, greedy) for city in CITIES]
    tries += [(CITIES[i % len(CITIES)], sampled) for i in range(SAMPLED_TRIES)]
    with ThreadPoolExecutor(len(tries)) as pool:
        messages = list(pool.map(lambda t: ask(*t), tries))
    for (city, sampling), message in zip(tries, messages, strict=True):
        where = f"{city}, {sampling}: {message.content}"
        assert message.stop_reason == "tool_use", where
        calls = tool_uses(message.content)
        assert calls and len(calls) == len(message.content), where
        for block in calls:
            assert block.name == "get_weather"
            jsonschema.validate(block.input, CLOSED_WEATHER)
    # The greedy calls answer the question asked.
    places = [tool_uses(m.content)[0].input["location"] for m in messages[: len(CITIES)]]
    assert sum(city in place for city, place in zip(CITIES, places, strict=True)) >= 10


def test_a_call_cut_by_max_tokens_has_one_input_streamed_or_not(tool_daemon: Daemon) -> None:
    """Too few tokens to close the call: both give the complete part of its arguments."""
    read = {
        "name": "Read",
        "input_schema": {
            "type": "object",
            "properties": {
                "mode": {"enum": ["text", "bytes"]},
                "file_path": {"type": "string"},
            },
            "required": ["mode", "file_path"],
        },
    }
    client = tool_daemon.client()
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": ASK,
        "tools": [read],
        "tool_choice": {"type": "tool", "name": "Read"},
        "extra_body": {"temperature": 0.0},
    }
    partial = []
    for max_tokens in range(18, 27):
        message = client.messages.create(max_tokens=max_tokens, **body)
        with client.messages.stream(max_tokens=max_tokens, **body) as stream:
            pieces = [
                event.delta.partial_json
                for event in stream
                if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
            ]
            streamed = stream.get_final_message()
        if message.stop_reason == "max_tokens" and message.content:
            (cut,) = message.content
            assert cut.type == "tool_use"
            assert streamed.stop_reason == "max_tokens"
            assert streamed.content[0].input == cut.input
            assert jiter.from_json("".join(pieces).encode(), partial_mode=True) == cut.input
            partial.append(cut.input)
    # Some cut fell after the first value and before the second one closed.
    assert any(set(value) == {"mode"} for value in partial), partial
