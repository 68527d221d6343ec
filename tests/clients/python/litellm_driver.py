"""LiteLLM's `anthropic/` provider, unmodified (OpenAI-shaped calls in, Anthropic's API out)."""

from __future__ import annotations

import json
from typing import Any, Literal

import litellm
from common import (
    API_KEY,
    BASE_URL,
    MODEL,
    PICK_PROMPT,
    WEATHER_DESCRIPTION,
    WEATHER_NAME,
    WEATHER_SCHEMA,
    WRONG_KEY,
    run,
)
from pydantic import BaseModel

TARGET = {"model": f"anthropic/{MODEL}", "api_base": BASE_URL, "num_retries": 0}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": WEATHER_NAME,
            "description": WEATHER_DESCRIPTION,
            "parameters": WEATHER_SCHEMA,
        },
    }
]


class Pick(BaseModel):
    colour: Literal["red", "green", "blue"]
    warm: bool


def create() -> dict[str, Any]:
    reply = litellm.completion(
        messages=[{"role": "user", "content": "Say hello."}],
        api_key=API_KEY,
        max_tokens=16,
        **TARGET,
    )
    choice = reply.choices[0]
    return {
        "text": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": reply.usage,
    }


def stream() -> dict[str, Any]:
    chunks = list(
        litellm.completion(
            messages=[{"role": "user", "content": "Count to three."}],
            api_key=API_KEY,
            max_tokens=16,
            stream=True,
            **TARGET,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return {"chunks": len(chunks), "text": text, "finish_reasons": reasons}


def tool() -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = litellm.completion(
        messages=messages,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": WEATHER_NAME}},
        parallel_tool_calls=False,
        api_key=API_KEY,
        max_tokens=128,
        **TARGET,
    )
    message = call.choices[0].message
    calls = message.tool_calls or []
    messages.append(message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "18C and sunny"} for c in calls]
    answer = litellm.completion(
        messages=messages, tools=TOOLS, api_key=API_KEY, max_tokens=16, **TARGET
    )
    return {
        "finish_reason": call.choices[0].finish_reason,
        "calls": [
            {"name": c.function.name, "input": json.loads(c.function.arguments)} for c in calls
        ],
        "answer_finish_reason": answer.choices[0].finish_reason,
    }


def structured() -> dict[str, Any]:
    reply = litellm.completion(
        messages=[{"role": "user", "content": PICK_PROMPT}],
        response_format=Pick,
        api_key=API_KEY,
        max_tokens=128,
        **TARGET,
    )
    content = reply.choices[0].message.content
    return {"content": content, "parsed": Pick.model_validate_json(content).model_dump()}


def auth() -> dict[str, Any]:
    try:
        litellm.completion(
            messages=[{"role": "user", "content": "Hello?"}],
            api_key=WRONG_KEY,
            max_tokens=8,
            **TARGET,
        )
    except litellm.AuthenticationError as exc:
        return {"authentication_error": True, "status": exc.status_code, "message": exc.message}
    raise AssertionError("the request with a wrong key succeeded")


run({"create": create, "stream": stream, "tool": tool, "structured": structured, "auth": auth})
