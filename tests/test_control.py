"""The control socket and `pensievectl status|stop`, against real daemons."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from pensieved import paths
from pensieved.service import control
from pensieved.service.control import ControlServer, ControlSocketError
from tests.daemon import (
    Daemon,
    run_pensievectl,
    run_pensieved,
    sse_events,
    start_daemon,
    stream_started,
)


def control_socket(daemon: Daemon) -> Path:
    """Where a daemon whose PENSIEVE_HOME is `daemon.home` serves its control socket."""
    return paths.runtime_dir(daemon.home / "run") / paths.SOCKET_NAME


def long_home(tmp_path: Path, length: int) -> Path:
    """A PENSIEVE_HOME path of exactly `length` bytes under `tmp_path`."""
    home = tmp_path / "h"
    return home.with_name("h" + "o" * (length - len(os.fsencode(home))))


@pytest.fixture
def cleanup_runtime_dirs() -> Iterator[list[Path]]:
    """Short runtime dirs made under /tmp by a test, removed after it."""
    made: list[Path] = []
    yield made
    for path in made:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def test_socket_is_private(tiny_daemon: Daemon) -> None:
    path = control_socket(tiny_daemon)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_status_reports_the_running_daemon(tiny_daemon: Daemon) -> None:
    tiny_daemon.client().messages.create(
        model="tiny", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    result = run_pensievectl(tiny_daemon, "status")
    assert result.returncode == 0, result.stderr
    assert f"running (pid {tiny_daemon.process.pid}" in result.stdout
    assert tiny_daemon.base_url in result.stdout
    assert "model tiny (default)" in result.stdout
    report = json.loads(run_pensievectl(tiny_daemon, "status", "--json").stdout)
    assert report["pid"] == tiny_daemon.process.pid
    assert report["listen"] == tiny_daemon.base_url
    tiny = next(m for m in report["models"] if m["name"] == "tiny")
    assert tiny["loaded"] and tiny["memory_gb"] > 0
    assert report["requests"]["tokens_per_s_last_minute"] > 0
    assert report["memory"]["kv_cache_gb"] >= 0
    assert "tok/s over the last minute" in result.stdout
    # The message just sent left its KV cache for the next turn.
    assert 0 < report["prompt_cache"]["bytes"] <= report["prompt_cache"]["budget_bytes"]
    assert "prompt cache " in result.stdout and " entries, " in result.stdout


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    result = run_pensievectl(tmp_path / "home", "status")
    assert result.returncode == 3
    assert "pensieve is not running" in result.stderr
    assert "Traceback" not in result.stderr
    stop = run_pensievectl(tmp_path / "home", "stop")
    assert stop.returncode == 3 and "not running" in stop.stderr


def test_bad_commands_get_an_error_answer(tiny_daemon: Daemon) -> None:
    path = control_socket(tiny_daemon)
    answer = control.call(path, "dance")
    assert answer["ok"] is False and "unknown command 'dance'" in answer["error"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"not json\n[1]\n")
        # One reader: a second makefile() would miss a line the first one buffered.
        answers = sock.makefile()
        lines = answers.readline(), answers.readline()
    assert all(json.loads(line)["ok"] is False for line in lines)


def test_second_daemon_with_the_same_socket_refuses(tiny_daemon: Daemon) -> None:
    result = run_pensieved(
        tiny_daemon.home, "--config", str(tiny_daemon.config_path), "--port", "1"
    )
    assert result.returncode == 1
    assert "already running" in result.stderr
    # The running daemon keeps its socket.
    assert control.call(control_socket(tiny_daemon), "status")["ok"]


def test_stale_socket_is_replaced_and_stop_works(
    tiny_config: dict, tmp_path: Path, cleanup_runtime_dirs: list[Path]
) -> None:
    run = paths.runtime_dir(tmp_path / "home" / "run")
    cleanup_runtime_dirs.append(run)
    run.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run / "pensieve.sock"))
    stale.close()  # as after a crash: the file stays, nobody listens
    daemon = start_daemon(tmp_path / "home", tiny_config)
    try:
        assert run_pensievectl(daemon, "status").returncode == 0
        result = run_pensievectl(daemon, "stop")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "stopped"
        assert daemon.process.wait(30) == 0
        assert not (run / "pensieve.sock").exists()
    finally:
        daemon.stop()


def test_a_peer_of_another_uid_is_refused(tmp_path: Path, cleanup_runtime_dirs: list[Path]) -> None:
    run = paths.runtime_dir(tmp_path / "run")
    cleanup_runtime_dirs.append(run)

    async def scenario() -> dict[str, Any]:
        async def status(_: dict[str, Any]) -> dict[str, Any]:
            return {"secret": "figures"}

        # The server believes it belongs to another user, so this process is a stranger.
        server = ControlServer(run / "c.sock", {"status": status}, uid=os.getuid() + 1)
        await server.start()
        try:
            return await asyncio.to_thread(control.call, server.path, "status")
        finally:
            await server.close()

    answer = asyncio.run(scenario())
    assert answer == {"ok": False, "error": "permission denied: another user"}


def model_state(daemon: Daemon) -> dict[str, dict[str, Any]]:
    report = control.call(control_socket(daemon), "status")
    return {m["name"]: m for m in report["models"]}


def test_unload_then_a_request_loads_it_again(tiny_dir: Path, tmp_path: Path) -> None:
    config = {
        "models": {
            "tiny": {"source": str(tiny_dir), "default": True},
            "spare": {"source": str(tiny_dir), "context_length": 128},
        }
    }
    daemon = start_daemon(tmp_path / "home", config)
    try:
        assert model_state(daemon)["spare"]["loaded"] is False
        result = run_pensievectl(daemon, "load", "--model", "spare")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "loaded spare (context 128 tokens)"
        assert model_state(daemon)["spare"]["loaded"] is True

        result = run_pensievectl(daemon, "unload")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "unloaded tiny"
        assert model_state(daemon)["tiny"]["loaded"] is False
        again = run_pensievectl(daemon, "unload")
        assert again.returncode == 1 and "not loaded" in again.stderr

        message = daemon.client().messages.create(
            model="claude-opus-4-8", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.model == "tiny"
        assert model_state(daemon)["tiny"]["loaded"] is True
        missing = run_pensievectl(daemon, "load", "--model", "nope")
        assert missing.returncode == 1 and "'nope' is not a configured model" in missing.stderr
    finally:
        daemon.stop()


def test_reload_refuses_a_broken_config_and_swaps_a_model_under_a_stream(
    tiny_dir: Path, smollm_dir: Path, tmp_path: Path
) -> None:
    import tomli_w

    from tests.models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", smollm_dir, seed=1)
    daemon = start_daemon(tmp_path / "home", {"models": {"tiny": {"source": str(tiny_dir)}}})
    try:
        good = daemon.config_path.read_text()
        daemon.config_path.write_text(good + "\n[server\n")
        broken = run_pensievectl(daemon, "reload")
        assert broken.returncode == 1
        assert "config.toml" in broken.stderr and "Traceback" not in broken.stderr
        assert model_state(daemon)["tiny"]["source"] == str(tiny_dir)

        # Point "tiny" at another model while a long stream runs on the old one.
        swapped = {"server": {"port": daemon.port}, "models": {"tiny": {"source": str(other)}}}
        daemon.config_path.write_bytes(tomli_w.dumps(swapped).encode())
        body = {
            "model": "tiny",
            "max_tokens": 1500,
            "messages": [{"role": "user", "content": "Go on."}],
        }
        with stream_started(daemon, body) as lines, ThreadPoolExecutor(1) as pool:
            reload = pool.submit(run_pensievectl, daemon, "reload")
            rest = sse_events(lines)
            result = reload.result(timeout=120)
        assert [name for name, _ in rest][-1] == "message_stop"  # the old model finished it
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == "reloaded (unloaded: tiny)"
        state = model_state(daemon)["tiny"]
        assert state["source"] == str(other) and state["loaded"] is True
    finally:
        daemon.stop()


def test_a_socket_path_too_long_for_macos_is_a_clear_startup_error(tmp_path: Path) -> None:
    async def start(platform: str) -> None:
        server = ControlServer(path, {}, platform=platform)
        try:
            await server.start()
        finally:
            await server.close()

    path = long_home(tmp_path, 92) / "pensieve.sock"  # 106 bytes
    with pytest.raises(ControlSocketError, match=r"106 bytes, longer than the 103 .* on darwin"):
        asyncio.run(start("darwin"))
    asyncio.run(start("linux"))  # where it fits
    path = long_home(tmp_path, 100) / "pensieve.sock"  # 114 bytes
    with pytest.raises(ControlSocketError, match=r"longer than the 107 .* on linux"):
        asyncio.run(start("linux"))
    assert not path.exists()


def test_a_daemon_with_a_long_home_serves_its_socket_from_tmp(
    tiny_config: dict, tmp_path: Path, cleanup_runtime_dirs: list[Path]
) -> None:
    home = long_home(tmp_path, 150)  # past even Linux's sun_path
    path = paths.runtime_dir(home / "run") / paths.SOCKET_NAME
    cleanup_runtime_dirs.append(path.parent)
    daemon = start_daemon(home, tiny_config)
    try:
        assert control_socket(daemon) == path and path.parent.parent == Path("/tmp")
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.parent.stat().st_uid == os.getuid()
        status = run_pensievectl(daemon, "status")
        assert status.returncode == 0, status.stderr
        assert f"running (pid {daemon.process.pid}" in status.stdout
    finally:
        daemon.stop()


def test_an_unusable_runtime_dir_is_a_clear_startup_error(
    tiny_config: dict, tmp_path: Path, cleanup_runtime_dirs: list[Path]
) -> None:
    home = long_home(tmp_path, 150)
    taken = paths.runtime_dir(home / "run")
    cleanup_runtime_dirs.append(taken)
    taken.write_text("not a directory")  # what another program left in /tmp
    home.mkdir()
    config_path = home / "config.toml"
    config_path.write_bytes(tomli_w.dumps(tiny_config).encode())
    result = run_pensieved(home, "--config", str(config_path))
    assert result.returncode == 1
    assert f"pensieved: cannot use {taken} for the control socket" in result.stderr
    assert "Traceback" not in result.stderr
