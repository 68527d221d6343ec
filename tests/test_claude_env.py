"""What points Claude Code at Pensieve: `env`, `claude-local`, `setup-claude`, on real daemons.

The README's line, `eval "$(pensievectl env)"`, sets everything: the running
daemon's address and token, the pinned tier names, the compaction window,
and Claude Code's minimal mode when the model cannot hold its full prompt.
The stand-in `claude` here prints what it was given; tests/test_claude_code.py
runs the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pensievectl.claude_env import ClaudeSetup, ModelFit, shell_lines
from pensieved.wire.claude_code import REPLY_ROOM
from tests.conftest import TINY_CONTEXT
from tests.daemon import Daemon, daemon_env, free_port, run_pensievectl, start_daemon
from tests.models import build_tiny_model

LONG_CONTEXT = 65536


def exported(output: str) -> dict[str, str]:
    """The variables `env` sets (bash syntax), in order."""
    return dict(
        line.removeprefix("export ").split("=", 1)
        for line in output.splitlines()
        if line.startswith("export ")
    )


@pytest.fixture(scope="module")
def small_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[Daemon]:
    """A tiny model with a 256-token window, on a port the config file does not name."""
    home = tmp_path_factory.mktemp("small-daemon")
    config = {
        "models": {
            "tiny": {
                "source": str(tiny_dir),
                "aliases": ["claude-*"],
                "default": True,
                "context_length": TINY_CONTEXT,
            }
        }
    }
    # The flag wins over the file, which names another port.
    daemon = start_daemon(home, config, port_flag=True)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def big_daemon(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Iterator[Daemon]:
    """A tiny model that declares a 64k window: big enough for Claude Code's full prompt."""
    long_dir = build_tiny_model(
        tmp_path_factory.mktemp("models") / "long", smollm_dir, context=LONG_CONTEXT
    )
    config = {"models": {"long": {"source": str(long_dir), "aliases": ["claude-*"]}}}
    daemon = start_daemon(tmp_path_factory.mktemp("big-daemon"), config)
    try:
        yield daemon
    finally:
        daemon.stop()


def ctl(daemon: Daemon, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`pensievectl ARGS` as a user runs it: no --config, PENSIEVE_HOME set."""
    return subprocess.run(
        [sys.executable, "-m", "pensievectl", *args],
        env={**daemon_env(daemon.home), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_env_on_a_small_model_sets_everything_and_minimal_mode(small_daemon: Daemon) -> None:
    result = ctl(small_daemon, "env")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # One comment first, saying why and what to do.
    assert lines[0].startswith("# pensieve: tiny's 256-token context cannot hold")
    assert "minimal mode" in lines[0] and "pensievectl doctor" in lines[0]
    assert sum(line.startswith("#") for line in lines) == 1
    variables = exported(result.stdout)
    # The running daemon's address and token, not the config file's port.
    assert variables["ANTHROPIC_BASE_URL"] == small_daemon.base_url
    assert variables["ANTHROPIC_AUTH_TOKEN"] == small_daemon.token
    assert variables["ANTHROPIC_MODEL"] == "tiny"
    for tier in ("OPUS", "SONNET", "HAIKU"):
        assert variables[f"ANTHROPIC_DEFAULT_{tier}_MODEL"] == "tiny"
    assert variables["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "100000"
    assert variables["CLAUDE_CODE_SIMPLE"] == "1"
    assert "ANTHROPIC_API_KEY" not in variables
    # The prompt was measured through the model's template by the daemon.
    prompt = int(lines[0].split("full prompt (")[1].split(" tokens")[0])
    assert 15_000 < prompt < 40_000
    # The old flag is an alias.
    assert ctl(small_daemon, "env", "--model-tiers").stdout == result.stdout


def test_env_on_a_big_enough_model_leaves_claude_code_whole(big_daemon: Daemon) -> None:
    result = ctl(big_daemon, "env")
    assert result.returncode == 0, result.stderr
    assert not any(line.startswith("#") for line in result.stdout.splitlines())
    variables = exported(result.stdout)
    assert "CLAUDE_CODE_SIMPLE" not in variables
    assert variables["ANTHROPIC_MODEL"] == "long"
    assert int(variables["CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"]) * 1000 < LONG_CONTEXT
    # A shell an earlier `env` put in minimal mode is taken out of it.
    again = ctl(big_daemon, "env", CLAUDE_CODE_SIMPLE="1")
    assert again.stdout.splitlines()[-1] == "unset CLAUDE_CODE_SIMPLE"
    fish = ctl(big_daemon, "env", "--shell", "fish", CLAUDE_CODE_SIMPLE="1").stdout
    assert fish.splitlines()[-1] == "set -e CLAUDE_CODE_SIMPLE"
    assert "set -gx ANTHROPIC_MODEL long" in fish


def test_the_decision_is_the_full_prompt_plus_room_for_a_reply() -> None:
    def setup(context: int, prompt: int) -> ClaudeSetup:
        fit = ModelFit("m", context, prompt, measured=True)
        return ClaudeSetup("http://127.0.0.1:1", "t", {"opus": "m"}, {"m": fit})

    assert not setup(20_000 + REPLY_ROOM, 20_000).minimal
    assert setup(20_000 + REPLY_ROOM - 1, 20_000).minimal
    unknown = ClaudeSetup("u", "t", {"opus": "m"}, {"m": ModelFit("m", None, 20_000)})
    assert not unknown.minimal  # never minimal on a guess
    assert shell_lines(setup(8192, 20_000), "bash", environ={})[0].startswith("# pensieve: ")


def test_env_with_the_daemon_down_reads_the_config(tmp_path: Path) -> None:
    """Fresh home: the embedded model, not imported yet, declares 8192 tokens in its GGUF."""
    home = tmp_path / "home"
    result = run_pensievectl(home, "env")
    assert result.returncode == 0, result.stderr
    variables = exported(result.stdout)
    assert variables["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:7777"
    assert variables["CLAUDE_CODE_SIMPLE"] == "1"
    assert "8192-token context" in result.stdout and "(~24000 tokens" in result.stdout


def test_a_token_file_others_can_read_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_pensievectl(home, "env").returncode == 0  # makes the token
    (home / "token").chmod(0o644)
    for command in (["env"], ["setup-claude"]):
        result = subprocess.run(
            [sys.executable, "-m", "pensievectl", *command],
            env={**daemon_env(home), "CLAUDE_CONFIG_DIR": str(tmp_path / "claude")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "chmod 600" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def stand_in_claude(folder: Path) -> Path:
    """A `claude` that prints the variables it was given, and its arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    claude = folder / "claude"
    claude.write_text(
        "#!/bin/sh\n"
        'echo "url=$ANTHROPIC_BASE_URL simple=${CLAUDE_CODE_SIMPLE:-unset}'
        ' model=$ANTHROPIC_MODEL key=${ANTHROPIC_API_KEY:-none}"\n'
        'echo "args=$*"\n'
    )
    claude.chmod(0o755)
    return claude


@pytest.mark.parametrize("fixture", ["small_daemon", "big_daemon"])
def test_claude_local_runs_minimal_mode_only_on_a_small_model(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    daemon: Daemon = request.getfixturevalue(fixture)
    claude = stand_in_claude(tmp_path / "bin")
    env = {
        **daemon_env(daemon.home),
        "PATH": f"{claude.parent}:{os.environ['PATH']}",
        "ANTHROPIC_API_KEY": "sk-cloud",
    }
    launcher = Path(sys.executable).with_name("claude-local")
    result = subprocess.run(
        [str(launcher), "-p", "Say hello."], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    small = fixture == "small_daemon"
    model = "tiny" if small else "long"
    assert result.stdout.splitlines() == [
        f"url={daemon.base_url} simple={'1' if small else 'unset'} model={model} key=none",
        "args=-p Say hello.",
    ]
    if small:
        assert result.stderr.startswith("claude-local: tiny's 256-token context")
        assert result.stderr.count("\n") == 1
    else:
        assert result.stderr == ""


def test_setup_claude_writes_minimal_mode_and_takes_it_out_again(
    small_daemon: Daemon, big_daemon: Daemon, tmp_path: Path
) -> None:
    claude_dir = tmp_path / "claude"
    settings = claude_dir / "settings.json"
    small = ctl(small_daemon, "setup-claude", CLAUDE_CONFIG_DIR=str(claude_dir))
    assert small.returncode == 0, small.stderr
    assert "note: tiny's 256-token context" in small.stdout
    env = json.loads(settings.read_text())["env"]
    assert env["CLAUDE_CODE_SIMPLE"] == "1"
    assert env["ANTHROPIC_BASE_URL"] == small_daemon.base_url
    big = ctl(big_daemon, "setup-claude", CLAUDE_CONFIG_DIR=str(claude_dir))
    assert big.returncode == 0, big.stderr
    env = json.loads(settings.read_text())["env"]
    assert "CLAUDE_CODE_SIMPLE" not in env and env["ANTHROPIC_MODEL"] == "long"
    assert "note:" not in big.stdout


def test_the_doctors_shell_env_row_passes_after_the_readme_line(
    small_daemon: Daemon, tmp_path: Path
) -> None:
    """`eval "$(pensievectl env)"`, then `pensievectl doctor`, in one shell."""
    stand_in_claude(tmp_path / "bin")
    script = 'eval "$(python -m pensievectl env)" && python -m pensievectl doctor --no-pull'
    env = {
        **daemon_env(small_daemon.home),
        "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    for name in list(env):
        if name.startswith(("ANTHROPIC_", "CLAUDE_")):
            del env[name]
    result = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    shell_row = next(line for line in result.stdout.splitlines() if line.startswith("shell env"))
    assert " ok " in shell_row, result.stdout
    # Too small for the full prompt and for the minimal one (256 tokens): fail.
    context_row = next(line for line in result.stdout.splitlines() if " context " in line)
    assert " fail " in context_row and "minimal mode" in context_row


def test_a_reload_keeps_reporting_the_port_it_serves(tiny_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = {"models": {"tiny": {"source": str(tiny_dir), "context_length": TINY_CONTEXT}}}
    daemon = start_daemon(home, config)
    try:
        other = free_port()
        assert run_pensievectl(daemon, "config", "set", "server.port", str(other)).returncode == 0
        reloaded = run_pensievectl(daemon, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert "restart to apply: server.port" in reloaded.stdout
        status = json.loads(run_pensievectl(daemon, "status", "--json").stdout)
        assert status["listen"] == daemon.base_url
        assert exported(run_pensievectl(daemon, "env").stdout)["ANTHROPIC_BASE_URL"] == (
            daemon.base_url
        )
    finally:
        daemon.stop()
