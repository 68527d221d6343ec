"""pydantic-ai's `AnthropicModel`, unmodified."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

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
from pydantic_ai import Agent, ModelRequest, ToolCallPart, ToolReturnPart
from pydantic_ai.direct import model_request_sync
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.anthropic import AnthropicModel
from pydantic_ai.providers.anthropic import AnthropicProvider
from pydantic_ai.tools import ToolDefinition


class Pick(BaseModel):
    colour: Literal["red", "green", "blue"]
    warm: bool


def model(api_key: str = API_KEY) -> AnthropicModel:
    return AnthropicModel(MODEL, provider=AnthropicProvider(base_url=BASE_URL, api_key=api_key))


def create() -> dict[str, Any]:
    result = Agent(model()).run_sync("Say hello.", model_settings={"max_tokens": 16})
    response = result.response
    return {"text": result.output, "finish_reason": response.finish_reason, "usage": result.usage()}


def stream() -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        agent = Agent(model())
        async with agent.run_stream("Count to three.", model_settings={"max_tokens": 16}) as run:
            deltas = [delta async for delta in run.stream_text(delta=True)]
            return {"deltas": len(deltas), "text": "".join(deltas), "usage": run.usage()}

    return asyncio.run(go())


def tool() -> dict[str, Any]:
    # A single forced call has no agent loop to run in (an agent must be free
    # to answer), so it goes through pydantic-ai's direct requests.
    parameters = ModelRequestParameters(
        function_tools=[
            ToolDefinition(
                name=WEATHER_NAME,
                description=WEATHER_DESCRIPTION,
                parameters_json_schema=WEATHER_SCHEMA,
            )
        ]
    )
    ask = ModelRequest.user_text_prompt("What is the weather in Paris?")
    call = model_request_sync(
        model(),
        [ask],
        model_settings={
            "max_tokens": 128,
            "tool_choice": [WEATHER_NAME],
            "parallel_tool_calls": False,
        },
        model_request_parameters=parameters,
    )
    calls = [part for part in call.parts if isinstance(part, ToolCallPart)]
    results = ModelRequest(
        parts=[
            ToolReturnPart(
                tool_name=c.tool_name, content="18C and sunny", tool_call_id=c.tool_call_id
            )
            for c in calls
        ]
    )
    answer = model_request_sync(
        model(),
        [ask, call, results],
        model_settings={"max_tokens": 16},
        model_request_parameters=parameters,
    )
    return {
        "finish_reason": call.finish_reason,
        "calls": [{"name": c.tool_name, "input": c.args_as_dict()} for c in calls],
        "answer_finish_reason": answer.finish_reason,
    }


def structured() -> dict[str, Any]:
    result = Agent(model(), output_type=Pick).run_sync(
        PICK_PROMPT, model_settings={"max_tokens": 128}
    )
    return {"parsed": result.output.model_dump()}


def auth() -> dict[str, Any]:
    try:
        Agent(model(WRONG_KEY)).run_sync("Hello?", model_settings={"max_tokens": 8})
    except ModelHTTPError as exc:
        return {
            "authentication_error": exc.status_code == 401,
            "status": exc.status_code,
            "body": exc.body,
        }
    raise AssertionError("the request with a wrong key succeeded")


run({"create": create, "stream": stream, "tool": tool, "structured": structured, "auth": auth})
