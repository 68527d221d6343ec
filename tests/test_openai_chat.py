"""Chat Completions requests read as the Messages requests they mean (issue 26, first part)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from mlx_lm.utils import load_tokenizer

from pensieved.conversation.prompt import PromptBuilder
from pensieved.wire.errors import InvalidRequest
from pensieved.wire.openai_chat import ChatCompletionRequest, as_messages_request
from pensieved.wire.protocol import (
    ImageBlock,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from tests.requests import request_of

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def call(call_id: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "w", "arguments": arguments}}


def image_url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(**body: Any) -> ChatCompletionRequest:
    body.setdefault("model", "m")
    return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)


def test_a_tool_conversation_reads_as_its_messages_request() -> None:
    request = as_messages_request(
        chat(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": "Weather in Oslo and Bergen?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "w", "arguments": '{"city":"Oslo"}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "w", "arguments": '{"city":"Bergen"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "4C"},
                {"role": "tool", "tool_call_id": "c2", "content": "7C"},
            ],
            tools=[{"type": "function", "function": {"name": "w", "parameters": WEATHER}}],
            tool_choice="required",
            parallel_tool_calls=False,
            max_completion_tokens=50,
            stop="END",
        ),
        max_tokens=4096,
    )
    assert request.system == "Be brief.\n\nUse tools."
    assert [m.role for m in request.messages] == ["user", "assistant", "user"]
    calls = request.messages[1].content
    assert isinstance(calls, list) and all(isinstance(b, ToolUseBlock) for b in calls)
    assert [b.input for b in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]  # type: ignore[union-attr]
    results = request.messages[2].content
    assert isinstance(results, list) and [type(b) for b in results] == [ToolResultBlock] * 2
    assert request.tools is not None and request.tools[0].input_schema == WEATHER
    assert request.tool_choice == ToolChoiceAny(disable_parallel_tool_use=True)
    assert (request.max_tokens, request.stop_sequences) == (50, ["END"])


def test_the_same_conversation_renders_the_same_tokens_through_either_api(
    smollm_dir: Path,
) -> None:
    """One prompt cache serves both APIs only if both render the very same tokens."""
    builder = PromptBuilder(load_tokenizer(smollm_dir), "m")
    anthropic = request_of(
        {
            "model": "m",
            "max_tokens": 20,
            "system": "You help.",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Weather?"},
            ],
        }
    )
    openai = as_messages_request(
        chat(
            messages=[
                {"role": "system", "content": "You help."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            ]
        ),
        max_tokens=20,
    )
    assert builder.build(openai).tokens == builder.build(anthropic).tokens


def test_named_choices_effort_formats_and_images() -> None:
    request = as_messages_request(
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is it?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0K"},
                        },
                    ],
                }
            ],
            tools=[{"type": "function", "function": {"name": "w"}}],
            tool_choice={"type": "function", "function": {"name": "w"}},
            reasoning_effort="low",
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": WEATHER},
            },
        ),
        max_tokens=100,
    )
    assert request.tool_choice == ToolChoiceTool("w")
    assert request.thinking == ThinkingEnabled(budget_tokens=2048)
    assert request.max_tokens == 2049  # room for the budget and an answer
    assert request.output_config is not None and request.output_config.format is not None
    assert request.output_config.format.schema == WEATHER
    image = request.messages[0].content[1]  # type: ignore[index]
    assert isinstance(image, ImageBlock)
    assert msgspec.json.decode(image.source) == {
        "type": "base64",
        "media_type": "image/png",
        "data": "iVBORw0K",
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"n": 2}, "n: only 1 choice"),
        ({"logprobs": True}, "logprobs"),
        ({"tool_choice": "required"}, "no tools were given"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            },
            "fetches no URL",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "function": {"name": "w", "arguments": "{oops"}}
                        ],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments: not valid JSON",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id: required"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "r"}}},
            "schema: required",
        ),
    ],
)
def test_what_messages_cannot_mean_is_refused_naming_the_field(
    body: dict[str, Any], words: str
) -> None:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    with pytest.raises(InvalidRequest, match=words):
        as_messages_request(chat(**body), max_tokens=10)
