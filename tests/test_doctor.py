"""`pensievectl doctor` against real daemons, and the Claude Code variables `env` prints."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pensievectl.claude_env import compact_at
from pensievectl.doctor import captured_request, offer_pulls, recommended_model, run_checks
from pensieved.config import load_config
from tests.daemon import Daemon, daemon_env, free_port, run_pensievectl, running_daemon
from tests.models import build_tiny_model

LONG_CONTEXT = 65536


@pytest.fixture(scope="module")
def long_daemon(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Iterator[Daemon]:
    """A daemon whose only model is tiny but declares a 64k context, as a real coder does."""
    long_dir = build_tiny_model(
        tmp_path_factory.mktemp("models") / "long", smollm_dir, context=LONG_CONTEXT
    )
    config = {
        "models": {"long": {"source": str(long_dir), "aliases": ["claude-*"], "default": True}}
    }
    yield from running_daemon(tmp_path_factory.mktemp("long-daemon"), config)


def doctor_command(daemon: Daemon, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`pensievectl doctor` from a shell with a stand-in `claude` on PATH and nothing else set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    claude = bin_dir / "claude"
    claude.write_text('#!/bin/sh\necho "2.1.197 (Claude Code)"\n')
    claude.chmod(0o755)
    env = {**daemon_env(daemon.home), "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for name in ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"):
        env.pop(name, None)
    command = [sys.executable, "-m", "pensievectl", "--config", str(daemon.config_path), "doctor"]
    return command, env


def doctor(daemon: Daemon, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    command, env = doctor_command(daemon, tmp_path)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def doctor_in_a_terminal(daemon: Daemon, tmp_path: Path, answer: str) -> tuple[int, str]:
    """`pensievectl doctor` on a pseudo-terminal, answering its first question; (status, output)."""
    command, env = doctor_command(daemon, tmp_path)
    terminal, child = pty.openpty()
    process = subprocess.Popen(command, env=env, stdin=child, stdout=child, stderr=child)
    os.close(child)
    output, answered = b"", False
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if not select.select([terminal], [], [], 1.0)[0]:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if not answered and b"now? [y/N]" in output:
                os.write(terminal, f"{answer}\n".encode())
                answered = True
        return process.wait(timeout=30), output.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
        os.close(terminal)


def rows(output: str) -> dict[str, str]:
    return {line.split("  ")[0]: line for line in output.splitlines()[1:]}


def test_the_captured_request_is_claude_codes_first_turn() -> None:
    request = captured_request()
    assert set(request) == {"model", "system", "messages", "tools"}
    assert len(request["tools"]) == 24 and len(json.dumps(request)) < 100_000


def test_doctor_on_a_model_too_small_for_claude_code(tiny_daemon: Daemon, tmp_path: Path) -> None:
    result = doctor(tiny_daemon, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    table = rows(result.stdout)
    assert "2.1.197 (Claude Code)" in table["claude code"]
    context = table["opus tiny context"]
    assert " fail " in context and "256 tokens: too small for Claude Code's full prompt" in context
    prompt = int(context.split("full prompt, ")[1].split()[0])
    assert 15_000 < prompt < 40_000  # Claude Code's system text and 24 tool schemas
    # Too small for its minimal mode too (~1.1k tokens: a short system text, 3 tools).
    minimal = int(context.split("minimal mode's ")[1].split()[0])
    assert 500 < minimal < 2_000
    assert "pensievectl pull mlx-community/" in context
    assert "shell env" in table and " warn " in table["shell env"]
    assert " ok " in table["opus tiny cache"]
    # Not a terminal: nothing is offered, nothing waits for an answer.
    assert "now?" not in result.stdout + result.stderr


def test_doctor_in_a_terminal_offers_the_recommended_model(
    tiny_daemon: Daemon, tmp_path: Path
) -> None:
    status, output = doctor_in_a_terminal(tiny_daemon, tmp_path, "y")
    assert status == 1, output
    offer = output.split("Pull ", 1)[1].split(" now? [y/N]")[0]
    assert offer.startswith("mlx-community/") and f"pensievectl pull {offer}" in output
    # Yes runs `pull`'s download; there is no hub here, so it says so, naming the repo.
    assert f"pull failed: {offer}: not in the local Hugging Face cache" in output


def test_offer_pulls_asks_then_pulls_the_recommended_repo(
    tiny_daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PENSIEVE_HOME", str(tiny_daemon.home))
    checks = run_checks(load_config(tiny_daemon.config_path), environ={})
    health = tiny_daemon.http().get("/health").json()
    repo = recommended_model(health["memory"]["total_gb"], health["backend"]["device"])
    asked: list[str] = []
    pulled: list[str] = []
    printed: list[str] = []

    def download(repo_id: str) -> Path:
        pulled.append(repo_id)
        return tmp_path / "snapshot"

    def offer(pull: bool | None, interactive: bool, answer: bool) -> list[str]:
        asked.clear()
        pulled.clear()

        def confirm(question: str) -> bool:
            asked.append(question)
            return answer

        return offer_pulls(
            checks,
            pull=pull,
            interactive=interactive,
            confirm=confirm,
            download=download,
            echo=printed.append,
        )

    assert offer(None, True, True) == [repo]
    assert asked == [f"Pull {repo} now?"] and pulled == [repo]
    snippet = printed[-1]
    assert f'source = "{repo}"' in snippet and "default = true" in snippet
    assert offer(None, True, False) == [] and asked and not pulled
    assert offer(None, False, True) == [] and not asked and not pulled
    assert offer(False, True, True) == [] and not asked and not pulled
    assert offer(True, False, False) == [repo] and not asked and pulled == [repo]


def test_doctor_on_a_model_that_fits(long_daemon: Daemon, tmp_path: Path) -> None:
    result = doctor(long_daemon, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert " ok " in table["daemon"]
    assert (
        " ok " in table["opus long context"]
        and f"{LONG_CONTEXT} tokens" in table["opus long context"]
    )
    assert " ok " in table["opus long memory"]
    assert "second turn read" in table["opus long cache"]
    assert "tool-call format" in table["opus long tools"]
    assert "text-only: a pasted screenshot is shown as a placeholder" in table["opus long images"]
    assert "checked above" in table["haiku tier"]
    assert not any(" fail " in line for line in table.values())


def test_doctor_with_the_daemon_down(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(f"[server]\nport = {free_port()}\n")
    result = run_pensievectl(home, "--config", str(config), "doctor")
    assert result.returncode == 1
    daemon_row = rows(result.stdout)["daemon"]
    assert " fail " in daemon_row and "model checks were skipped" in daemon_row
    assert "make run" in daemon_row


def test_env_sets_the_compact_window_and_pins_the_models(long_daemon: Daemon) -> None:
    result = run_pensievectl(long_daemon, "env")
    assert result.returncode == 0, result.stderr
    variables = dict(
        line.removeprefix("export ").split("=", 1) for line in result.stdout.split("\n") if line
    )
    assert variables["ANTHROPIC_MODEL"] == "long"
    assert variables["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "long"
    # Claude Code's window floor is 100k: the percentage lands before 64k.
    assert variables["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "100000"
    percent = int(variables["CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"])
    assert percent * 1000 < LONG_CONTEXT and percent * 1000 > LONG_CONTEXT // 2
    assert compact_at(200_000) == {
        "CLAUDE_CODE_AUTO_COMPACT_WINDOW": "200000",
        "CLAUDE_AUTOCOMPACT_PCT_OVERRIDE": "93",
    }
