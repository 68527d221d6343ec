"""`llm` with the `llm-anthropic` plugin, unmodified; structured output through `llm --schema`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import llm
from common import API_KEY, MODEL, PICK_PROMPT, PICK_SCHEMA, WRONG_KEY, run

MODEL_ID = f"anthropic/{MODEL}"
CALLS: list[dict[str, Any]] = []


def get_weather(city: str) -> str:
    """The weather in a city."""
    CALLS.append({"name": "get_weather", "input": {"city": city}})
    return "18C and sunny"


def create() -> dict[str, Any]:
    response = llm.get_model(MODEL_ID).prompt("Say hello.", key=API_KEY, max_tokens=16)
    return {"text": response.text(), "stop_reason": response.response_json.get("stop_reason")}


def stream() -> dict[str, Any]:
    response = llm.get_model(MODEL_ID).prompt("Count to three.", key=API_KEY, max_tokens=16)
    chunks = list(response)
    return {"chunks": len(chunks), "text": "".join(chunks), "usage": response.usage()}


def tool() -> dict[str, Any]:
    # llm has no tool_choice: the model decides whether to call, and the
    # chain answers each call with its result.
    chain = llm.get_model(MODEL_ID).chain(
        "What is the weather in Paris? Use get_weather.",
        tools=[get_weather],
        key=API_KEY,
        options={"max_tokens": 128},
    )
    text = chain.text()
    return {
        "forced": False,
        "calls": CALLS,
        "stop_reasons": [(r.response_json or {}).get("stop_reason") for r in chain.responses()],
        "text": text,
    }


def structured() -> dict[str, Any]:
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "llm"),
            "-m",
            MODEL_ID,
            "--schema",
            json.dumps(PICK_SCHEMA),
            "-o",
            "max_tokens",
            "128",
            "--no-stream",
            PICK_PROMPT,
        ],
        env={**os.environ, "ANTHROPIC_API_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"llm --schema exited {done.returncode}: {done.stderr.strip()}")
    return {"output": done.stdout, "parsed": json.loads(done.stdout)}


def auth() -> dict[str, Any]:
    try:
        llm.get_model(MODEL_ID).prompt("Hello?", key=WRONG_KEY, max_tokens=8).text()
    except anthropic.AuthenticationError as exc:
        return {"authentication_error": True, "status": exc.status_code, "message": exc.message}
    raise AssertionError("the request with a wrong key succeeded")


run({"create": create, "stream": stream, "tool": tool, "structured": structured, "auth": auth})
