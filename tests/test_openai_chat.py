"""Chat Completions requests read as the Messages requests they mean (issue 26, first part)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import msgspec
import openai
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
from tests.daemon import Daemon
from tests.requests import request_of

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
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


# -- the route, through the official `openai` SDK ------------------------------------


def openai_client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key=daemon.token, max_retries=0)


def test_create_and_stream_through_the_openai_sdk(tiny_daemon: Daemon) -> None:
    client = openai_client(tiny_daemon)
    messages = [{"role": "user", "content": "Say hello. " + secrets.token_hex(4)}]
    made = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert made.object == "chat.completion" and made.id.startswith("chatcmpl-")
    assert made.choices[0].finish_reason in ("stop", "length")
    assert made.usage is not None and made.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == made.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == made.usage.prompt_tokens
    # The second time, the prompt came from the cache.
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_a_forced_tool_call_through_the_openai_sdk(tiny_daemon: Daemon) -> None:
    client = openai_client(tiny_daemon)
    made = client.chat.completions.create(
        model="long-tools",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[{"type": "function", "function": {"name": "w", "parameters": WEATHER}}],
        tool_choice={"type": "function", "function": {"name": "w"}},
        max_completion_tokens=256,
    )
    choice = made.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "w"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) == {"city"}  # type: ignore[union-attr]


def test_the_same_conversation_hits_the_cache_across_the_apis(tiny_daemon: Daemon) -> None:
    question = "Tell me about " + " ".join(secrets.token_hex(3) for _ in range(120))
    first = tiny_daemon.client().messages.create(
        model="tiny-long", max_tokens=2, messages=[{"role": "user", "content": question}]
    )
    then = openai_client(tiny_daemon).chat.completions.create(
        model="tiny-long",
        max_completion_tokens=2,
        messages=[{"role": "user", "content": question}],
    )
    assert then.usage is not None and then.usage.prompt_tokens_details is not None
    prompt = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert then.usage.prompt_tokens == prompt
    assert then.usage.prompt_tokens_details.cached_tokens == prompt - 1


def test_errors_come_in_openais_envelope(tiny_daemon: Daemon) -> None:
    client = openai_client(tiny_daemon)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], n=2
        )
    body = refused.value.body
    assert isinstance(body, dict) and "n: only 1 choice" in body["message"]
    bad_key = openai.OpenAI(base_url=f"{tiny_daemon.base_url}/v1", api_key="no", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
