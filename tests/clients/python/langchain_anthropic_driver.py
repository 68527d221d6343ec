"""LangChain's `ChatAnthropic`, unmodified."""

from __future__ import annotations

from typing import Any, Literal

import anthropic
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
from langchain_anthropic import ChatAnthropic
from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
from pydantic import BaseModel

WEATHER = {"name": WEATHER_NAME, "description": WEATHER_DESCRIPTION, "input_schema": WEATHER_SCHEMA}


class Pick(BaseModel):
    colour: Literal["red", "green", "blue"]
    warm: bool


def chat(max_tokens: int = 16, api_key: str = API_KEY) -> ChatAnthropic:
    return ChatAnthropic(
        model=MODEL, base_url=BASE_URL, api_key=api_key, max_tokens=max_tokens, max_retries=0
    )


def create() -> dict[str, Any]:
    reply = chat().invoke("Say hello.")
    return {
        "text": reply.text,
        "stop_reason": reply.response_metadata.get("stop_reason"),
        "usage": reply.usage_metadata,
    }


def stream() -> dict[str, Any]:
    chunks = list(chat().stream("Count to three."))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    return {
        "chunks": len(chunks),
        "text": whole.text,
        "stop_reason": whole.response_metadata.get("stop_reason"),
        "usage": whole.usage_metadata,
    }


def tool() -> dict[str, Any]:
    forced = chat(128).bind_tools([WEATHER], tool_choice=WEATHER_NAME, parallel_tool_calls=False)
    ask = HumanMessage("What is the weather in Paris?")
    call = forced.invoke([ask])
    history: list[BaseMessage] = [ask, call]
    history += [ToolMessage("18C and sunny", tool_call_id=c["id"]) for c in call.tool_calls]
    answer = chat().bind_tools([WEATHER]).invoke(history)
    return {
        "stop_reason": call.response_metadata.get("stop_reason"),
        "calls": [{"name": c["name"], "input": c["args"]} for c in call.tool_calls],
        "answer_stop_reason": answer.response_metadata.get("stop_reason"),
    }


def structured() -> dict[str, Any]:
    pick = chat(128).with_structured_output(Pick).invoke(PICK_PROMPT)
    assert isinstance(pick, Pick)
    return {"parsed": pick.model_dump()}


def structured_json_schema() -> dict[str, Any]:
    runnable = chat(128).with_structured_output(Pick, method="json_schema")
    pick = runnable.invoke(PICK_PROMPT)
    assert isinstance(pick, Pick)
    return {"parsed": pick.model_dump()}


def auth() -> dict[str, Any]:
    try:
        chat(api_key=WRONG_KEY).invoke("Hello?")
    except anthropic.AuthenticationError as exc:
        return {"authentication_error": True, "status": exc.status_code, "message": exc.message}
    raise AssertionError("the request with a wrong key succeeded")


run(
    {
        "create": create,
        "stream": stream,
        "tool": tool,
        "structured": structured,
        "structured-json-schema": structured_json_schema,
        "auth": auth,
    }
)
