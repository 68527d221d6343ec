"""The official TypeScript SDK (`@anthropic-ai/sdk`), unmodified, against a real daemon.

Each scenario is a node script in `tests/clients/anthropic-sdk/` that reads
ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY as any application would and prints
one JSON line of what it saw. `make setup` installs the pinned SDK with
`npm ci` when node is present; without node (or before `make setup`) these
tests skip and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon

CLIENTS = Path(__file__).parent / "clients"
SCRIPTS = CLIENTS / "anthropic-sdk"
SDK = CLIENTS / "node_modules" / "@anthropic-ai" / "sdk" / "package.json"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed: no TypeScript SDK tests"),
    pytest.mark.skipif(
        not SDK.exists(),
        reason="the TypeScript SDK is not installed: run `make setup` (npm ci in tests/clients)",
    ),
]


def run_script(
    daemon: Daemon, name: str, model: str = "claude-sonnet-4-5", expect_ok: bool = True
) -> dict[str, Any]:
    assert NODE is not None
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": daemon.base_url,
        "ANTHROPIC_API_KEY": daemon.token,
        "PENSIEVE_MODEL": model,
    }
    env.pop("ANTHROPIC_AUTH_TOKEN", None)  # the SDK would send it as well
    done = subprocess.run(
        [NODE, str(SCRIPTS / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"{name} printed nothing; stderr:\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    if expect_ok:
        assert done.returncode == 0, f"{name} failed: {result}\n{done.stderr}"
    return result


def test_create(tiny_daemon: Daemon) -> None:
    result = run_script(tiny_daemon, "create.mjs")
    assert result["id"].startswith("msg_")
    assert (result["type"], result["role"]) == ("message", "assistant")
    assert result["stop_reason"] in ("end_turn", "max_tokens")
    assert [block["type"] for block in result["content"]] in ([], ["text"])
    assert result["usage"]["output_tokens"] >= 1
    assert result["request_id"].startswith("req_")


def test_stream(tiny_daemon: Daemon) -> None:
    result = run_script(tiny_daemon, "stream.mjs")
    events = [e for e in result["events"] if e != "ping"]
    assert events[0] == "message_start"
    assert events[-2:] == ["message_delta", "message_stop"]
    # The SDK's accumulated message holds exactly the text its deltas carried.
    assert result["text"] == result["final_text"]
    assert result["message"]["stop_reason"] in ("end_turn", "max_tokens")


def test_forced_tool_call_round_trip(tiny_daemon: Daemon) -> None:
    result = run_script(tiny_daemon, "tool-call.mjs", model="long-tools")
    assert result["call"]["stop_reason"] == "tool_use"
    assert result["tool_uses"]
    for tool_use in result["tool_uses"]:
        assert tool_use["name"] == "get_weather"
        assert tool_use["id"].startswith("toolu_")
        assert set(tool_use["input"]) <= {"city"} and isinstance(tool_use["input"]["city"], str)
    assert result["answer"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")


def test_tool_runner_completes_over_a_message_thread(tiny_daemon: Daemon) -> None:
    result = run_script(tiny_daemon, "tool-runner.mjs", model="long-tools")
    # The tool ran once, with the forced call's input, and the loop ended on an answer.
    assert len(result["calls"]) == 1 and set(result["calls"][0]) <= {"city"}
    first, last = result["messages"][0], result["messages"][-1]
    assert first["stop_reason"] == "tool_use"
    assert last["stop_reason"] in ("end_turn", "max_tokens")
    assert result["final_id"] == last["id"]
    # The SDK threaded: a create with the history, then a continue carrying
    # only the tool result (no system, no tools), both answered 200.
    requests = result["requests"]
    assert [r["status"] for r in requests] == [200] * len(requests)
    assert requests[0]["thread"] == {"type": "create"}
    second = requests[1]
    assert second["thread"] == {"type": "continue", "previous_message_id": first["id"]}
    assert second["messages"] == 1 and not second["has_tools"]
    assert second["last_content"][0]["type"] == "tool_result"


def test_auth_error_is_an_authentication_error(tiny_daemon: Daemon) -> None:
    result = run_script(tiny_daemon, "auth-error.mjs")
    assert result["authentication_error"] is True
    assert result["status"] == 401
    assert result["type"] == "authentication_error"
    assert result["request_id"].startswith("req_")
