"""`make clients`: popular clients, unmodified, against a real daemon serving a tiny random model.

Every client × scenario is one test: create, stream, a forced tool call round
trip, structured output in the client's own way, and an auth error. Each
driver prints one JSON line of what the client saw (or the client's own
exception); a failing test shows it. Not part of `make test`: the clients
are installed by `make clients` (JavaScript ones with `npm ci`, Python ones
into `.venv-clients`, never the project's venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.daemon import Daemon, running_daemon

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
PYTHON = ROOT / ".venv-clients" / "bin" / "python"
NODE = shutil.which("node")

SCENARIOS = ("create", "stream", "tool", "structured", "auth")
# How each client runs a scenario: a command line, relative to tests/clients.
NODE_SDK = {
    "create": "anthropic-sdk/create.mjs",
    "stream": "anthropic-sdk/stream.mjs",
    "tool": "anthropic-sdk/tool-call.mjs",
    "tool-runner": "anthropic-sdk/tool-runner.mjs",
    "structured": "anthropic-sdk/parse.mjs",
    "auth": "anthropic-sdk/auth-error.mjs",
}
CASES: list[tuple[str, str]] = [
    *(("anthropic-sdk (ts)", scenario) for scenario in NODE_SDK),
    *(("vercel-ai", scenario) for scenario in SCENARIOS),
    *(("langchain-anthropic", s) for s in (*SCENARIOS, "structured-json-schema")),
    *(("pydantic-ai", scenario) for scenario in SCENARIOS),
    *(("litellm", scenario) for scenario in SCENARIOS),
    *(("llm-anthropic", scenario) for scenario in SCENARIOS),
]
PYTHON_DRIVERS = {
    "langchain-anthropic": "python/langchain_anthropic_driver.py",
    "pydantic-ai": "python/pydantic_ai_driver.py",
    "litellm": "python/litellm_driver.py",
    "llm-anthropic": "python/llm_driver.py",
}


def command(client: str, scenario: str) -> list[str]:
    if client == "anthropic-sdk (ts)":
        assert NODE is not None
        return [NODE, str(HERE / NODE_SDK[scenario])]
    if client == "vercel-ai":
        assert NODE is not None
        return [NODE, str(HERE / "vercel-ai" / "driver.mjs"), scenario]
    return [str(PYTHON), str(HERE / PYTHON_DRIVERS[client]), scenario]


@pytest.fixture(scope="module")
def clients_daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Every Claude name on the tiny model, with room for tool and schema prompts."""
    config = {
        "models": {
            "tiny": {
                "source": str(tiny_dir),
                "aliases": ["claude-*"],
                "default": True,
                "context_length": 1024,
            }
        }
    }
    yield from running_daemon(tmp_path_factory.mktemp("clients-daemon"), config)


def run_client(daemon: Daemon, client: str, scenario: str, tmp_path: Path) -> dict[str, Any]:
    if client in PYTHON_DRIVERS and not PYTHON.exists():
        pytest.skip("no .venv-clients: run `make clients`")
    if client not in PYTHON_DRIVERS and (NODE is None or not (HERE / "node_modules").exists()):
        pytest.skip("node or tests/clients/node_modules missing: run `make clients`")
    env = {
        **os.environ,
        "ANTHROPIC_BASE_URL": daemon.base_url,
        "ANTHROPIC_API_KEY": daemon.token,
        "PENSIEVE_MODEL": "claude-sonnet-4-5",
        "LLM_USER_PATH": str(tmp_path / "llm"),  # llm's logs database, not the user's
    }
    env.pop("ANTHROPIC_AUTH_TOKEN", None)
    done = subprocess.run(
        command(client, scenario), env=env, capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"{client} {scenario} printed nothing; stderr:\n{done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert "error" not in result, json.dumps(result["error"], indent=1)[:4000]
    return result


def check(scenario: str, result: dict[str, Any]) -> None:
    if scenario in ("create", "stream"):
        assert isinstance(result.get("text", result.get("content")), str | list)
    elif scenario == "tool":
        calls = result.get("calls", result.get("tool_uses"))
        assert calls, f"no tool call: {result}"
        for call in calls:
            assert call["name"] == "get_weather"
            assert set(call["input"]) == {"city"}, call
    elif scenario == "tool-runner":
        assert result["calls"] and result["messages"][-1]["stop_reason"] != "tool_use"
        assert [r["status"] for r in result["requests"]] == [200] * len(result["requests"])
    elif scenario.startswith("structured"):
        parsed = result["parsed"]
        assert isinstance(parsed, dict), result
        assert parsed.get("colour") in ("red", "green", "blue"), parsed
        assert isinstance(parsed.get("warm"), bool), parsed
    elif scenario == "auth":
        assert result["authentication_error"] is True and result["status"] == 401, result


@pytest.mark.parametrize(("client", "scenario"), CASES, ids=[f"{c}:{s}" for c, s in CASES])
def test_client(clients_daemon: Daemon, client: str, scenario: str, tmp_path: Path) -> None:
    result = run_client(clients_daemon, client, scenario, tmp_path)
    print(json.dumps(result)[:2000])
    if result.get("forced") is False and not result.get("calls"):
        # The request round trip worked; only the call itself was the model's to make.
        pytest.xfail(f"{client} cannot force a tool call, and the random model made none")
    check(scenario, result)
