"""pensievectl's file-level commands (logs, config) and the claude-local launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from pensievectl.launcher import CLAUDE_PLACES, find_claude
from tests.daemon import Daemon, daemon_env, run_pensievectl, start_daemon
from tests.test_control import model_state


def test_logs_show_the_daemons_log(tiny_daemon: Daemon) -> None:
    result = run_pensievectl(tiny_daemon, "logs", "-n", "200")
    assert result.returncode == 0, result.stderr
    assert "pensieve listening on" in result.stdout
    assert len(run_pensievectl(tiny_daemon, "logs", "-n", "1").stdout.splitlines()) == 1


def test_logs_follow_prints_new_lines(tiny_daemon: Daemon) -> None:
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pensievectl",
            "--config",
            str(tiny_daemon.config_path),
            "logs",
            "-n",
            "0",
            "-f",
        ],
        env=daemon_env(tiny_daemon.home),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        with tiny_daemon.http() as http:
            http.post("/v1/messages", json={"model": "x", "messages": []})  # logs a 400
        assert follower.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while not any("max_tokens: Field required" in x for x in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
    finally:
        follower.terminate()
        follower.wait(10)


def test_logs_before_any_run(tmp_path: Path) -> None:
    result = run_pensievectl(tmp_path / "home", "logs")
    assert result.returncode == 1 and "has not run" in result.stderr


def test_config_path_show_and_set(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = run_pensievectl(home, "config", "path").stdout.strip()
    assert path == str(home / "config.toml")
    assert "port = 7777" in run_pensievectl(home, "config", "show").stdout

    result = run_pensievectl(home, "config", "set", "server.port", "8123")
    assert result.returncode == 0, result.stderr
    result = run_pensievectl(
        home, "config", "set", "models.big.source", "mlx-community/Some-Model-4bit"
    )
    assert result.returncode == 0, result.stderr
    run_pensievectl(home, "config", "set", "models.big.aliases", '["claude-*opus*"]')
    written = tomllib.loads((home / "config.toml").read_text())
    assert written["server"]["port"] == 8123
    assert written["models"]["big"] == {
        "source": "mlx-community/Some-Model-4bit",
        "aliases": ["claude-*opus*"],
    }
    shown = tomllib.loads(run_pensievectl(home, "config", "show").stdout)
    assert shown["server"]["port"] == 8123 and shown["models"]["big"]["default"] is False

    before = (home / "config.toml").read_text()
    for key, value in (("server.port", '"eighty"'), ("models.big.context_length", "0")):
        refused = run_pensievectl(home, "config", "set", key, value)
        assert refused.returncode == 1 and "not written" in refused.stderr
    assert (home / "config.toml").read_text() == before


def test_keep_alive_unloads_an_idle_model(tiny_dir: Path, tmp_path: Path) -> None:
    config = {"models": {"tiny": {"source": str(tiny_dir), "keep_alive": 1}}}
    daemon = start_daemon(tmp_path / "home", config)
    try:
        deadline = time.monotonic() + 15
        while model_state(daemon)["tiny"]["loaded"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert model_state(daemon)["tiny"]["loaded"] is False
        with daemon.http() as http:
            body = {"model": "x", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/v1/messages", json=body).status_code == 200
        assert model_state(daemon)["tiny"]["loaded"] is True
        assert "(keep_alive); unloading" in daemon.log()
    finally:
        daemon.stop()


def test_claude_local_runs_claude_with_the_daemons_environment(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "claude"  # stands in for Claude Code: shows what it was given
    fake.write_text(
        "#!/bin/sh\n"
        'echo "url=$ANTHROPIC_BASE_URL token=$ANTHROPIC_AUTH_TOKEN"'
        ' "key=${ANTHROPIC_API_KEY:-none}"\n'
        'echo "args=$*"\n'
    )
    fake.chmod(0o755)
    home = tmp_path / "home"
    env = {
        **daemon_env(home),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ANTHROPIC_API_KEY": "sk-cloud",
    }
    launcher = Path(sys.executable).with_name("claude-local")
    result = subprocess.run(
        [str(launcher), "--print", "Hello there"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    token = (home / "token").read_text().strip()
    assert result.stdout.splitlines() == [
        f"url=http://127.0.0.1:7777 token={token} key=none",
        "args=--print Hello there",
    ]


def fake_claude(path: Path, says: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{says} url=$ANTHROPIC_BASE_URL args=$*"\n')
    path.chmod(0o755)
    return path


def test_claude_local_finds_claude_code_off_path(tmp_path: Path) -> None:
    """`claude migrate-installer` puts it in ~/.claude/local, reached by a shell
    alias that a program cannot see."""
    user = tmp_path / "user"
    fake_claude(user / ".claude" / "local" / "claude", "found")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**daemon_env(tmp_path / "home"), "HOME": str(user), "PATH": str(empty)}
    launcher = Path(sys.executable).with_name("claude-local")
    result = subprocess.run(
        [str(launcher), "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "found url=http://127.0.0.1:7777 args=--version\n"


def test_find_claude_prefers_path_then_the_installers_places(tmp_path: Path) -> None:
    home = tmp_path / "user"
    on_path = fake_claude(tmp_path / "bin" / "claude", "path")
    local_bin = fake_claude(home / ".local" / "bin" / "claude", "native")
    fake_claude(home / ".claude" / "local" / "claude", "migrated")
    assert find_claude(str(on_path.parent), home) == str(on_path)
    assert find_claude(str(tmp_path / "nowhere"), home) == str(local_bin)
    local_bin.chmod(0o644)  # not executable: not a candidate
    assert find_claude(str(tmp_path / "nowhere"), home) == str(
        home / ".claude" / "local" / "claude"
    )


@pytest.mark.skipif(
    any(Path(place).exists() for place in CLAUDE_PLACES if place.startswith("/")),
    reason="Claude Code is installed system-wide here",
)
def test_claude_local_without_claude_code_says_how_to_install_it(tmp_path: Path) -> None:
    env = {**daemon_env(tmp_path / "home"), "HOME": str(tmp_path / "user"), "PATH": "/nowhere"}
    launcher = Path(sys.executable).with_name("claude-local")
    result = subprocess.run([str(launcher)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "~/.claude/local/claude" in result.stderr
    assert "curl -fsSL https://claude.ai/install.sh | bash" in result.stderr
