"""The daemon as a user runs it: the embedded model, `pensievectl env`, signals, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import (
    Daemon,
    daemon_env,
    run_pensievectl,
    run_pensieved,
    running_daemon,
    sse_events,
    start_daemon,
    stream_started,
)

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def smollm_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon on its defaults: no models configured, so the embedded SmolLM2."""
    yield from running_daemon(tmp_path_factory.mktemp("smollm-daemon"), {})


def test_embedded_model_answers_paris(smollm_daemon: Daemon) -> None:
    client = smollm_daemon.client()
    message = client.messages.create(
        model="claude-opus-4-8", max_tokens=16, messages=PARIS, extra_body=GREEDY
    )
    assert message.model == "smollm2-135m-instruct"
    assert "Paris" in message.content[0].text  # type: ignore[union-attr]
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=16, messages=PARIS, extra_body=GREEDY
    ) as stream:
        streamed = "".join(stream.text_stream)
    assert "Paris" in streamed
    assert stream.get_final_message().stop_reason in {"end_turn", "max_tokens"}


def test_embedded_model_is_imported_under_pensieve_home(smollm_daemon: Daemon) -> None:
    model_dir = smollm_daemon.home / "models" / "smollm2-135m-instruct"
    assert (model_dir / "model.safetensors").is_file()
    health = smollm_daemon.health()
    assert health["models"][0]["context_length"] == 8192


def test_pensievectl_env_points_the_sdk_at_the_daemon(tiny_daemon: Daemon) -> None:
    result = run_pensievectl(tiny_daemon, "env")
    assert result.returncode == 0, result.stderr
    exports = [line for line in result.stdout.splitlines() if line.startswith("export ")]
    assert exports[:2] == [
        f"export ANTHROPIC_BASE_URL={tiny_daemon.base_url}",
        f"export ANTHROPIC_AUTH_TOKEN={tiny_daemon.token}",
    ]
    script = (
        f'eval "$({sys.executable} -m pensievectl --config {tiny_daemon.config_path} env)"\n'
        f"{sys.executable} -c 'import anthropic; "
        'm = anthropic.Anthropic(max_retries=0).messages.create(model="claude-opus-4-8", '
        'max_tokens=3, messages=[{"role": "user", "content": "hi"}]); print(m.model)\''
    )
    env = daemon_env(tiny_daemon.home)
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        env.pop(name, None)
    shell = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip() == "tiny"


def test_pensievectl_env_for_fish(pensieve_home: Path) -> None:
    result = run_pensievectl(pensieve_home, "env", "--shell", "fish")
    assert result.returncode == 0, result.stderr
    # The embedded model is too small for Claude Code's full prompt: a comment says so.
    comment, *lines = result.stdout.splitlines()
    assert comment.startswith("# pensieve: smollm2-135m-instruct's 8192-token context")
    assert "set -gx CLAUDE_CODE_SIMPLE 1" in lines
    assert lines[0] == "set -gx ANTHROPIC_BASE_URL http://127.0.0.1:7777"
    assert lines[1].startswith("set -gx ANTHROPIC_AUTH_TOKEN pensieve-")


def test_pensievectl_does_not_import_mlx() -> None:
    code = (
        "import sys, pensievectl.cli; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mlx'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import json; {code}"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_pensievectl_bad_config_is_one_line(pensieve_home: Path) -> None:
    pensieve_home.mkdir()
    (pensieve_home / "config.toml").write_text("[server]\nport = 'x'\n")
    result = run_pensievectl(pensieve_home, "env")
    assert result.returncode == 1
    assert "server.port" in result.stderr and "Traceback" not in result.stderr


def test_second_daemon_on_the_same_port_exits_1_with_a_message(
    tiny_daemon: Daemon, tmp_path: Path
) -> None:
    result = run_pensieved(tmp_path / "other-home", "--config", str(tiny_daemon.config_path))
    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_exits_1_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[models.a]\nsource = "/a"\ncontext_length = -1\n')
    result = run_pensieved(tmp_path, "--config", str(config))
    assert result.returncode == 1
    assert "models.a.context_length" in result.stderr


def test_sigterm_ends_streams_with_an_error_event_and_exits_0(
    tiny_config: dict, tmp_path: Path
) -> None:
    # A short drain: the stream outlasts it (test_memory_daemon.py covers the drain).
    daemon = start_daemon(tmp_path / "home", {**tiny_config, "server": {"drain_seconds": 0.5}})
    try:
        body = {
            "model": "long-x",
            "max_tokens": 3000,
            "messages": [{"role": "user", "content": "Go on."}],
            "temperature": 0.0,  # sampled, the random model may end early
        }
        with stream_started(daemon, body) as lines:
            os.kill(daemon.process.pid, signal.SIGTERM)
            events = sse_events(lines)
        names = [name for name, _ in events]
        assert names[-1] == "error"
        assert "message_stop" not in names
        assert json.loads(events[-1][1])["error"]["type"] == "overloaded_error"
        assert daemon.process.wait(30) == 0
    finally:
        daemon.stop()


def test_model_flag_replaces_the_default_source(tiny_dir: Path, tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "home", {}, "--model", str(tiny_dir))
    try:
        health = daemon.health()
        assert health["models"][0]["source"] == str(tiny_dir)
        assert health["models"][0]["context_length"] == 4096
    finally:
        assert daemon.stop() == 0


def test_the_log_file_rotates_past_its_size(tmp_path: Path) -> None:
    import logging

    from pensieved.service.logfile import _RotatingLog

    handler = _RotatingLog(tmp_path / "pensieved.log", maxBytes=1000, backupCount=2)
    logger = logging.getLogger("pensieve-rotation-test")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(100):
            logger.warning("line %03d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    current = (tmp_path / "pensieved.log").read_text()
    rotated = (tmp_path / "pensieved.log.1").read_text()
    # At most one line past the limit, none lost between the two newest files.
    assert len(current) < 1000 + 50 and len(rotated) < 1000 + 50
    assert "line 099" in current and not (tmp_path / "pensieved.log.3").exists()
    lines = [*rotated.splitlines(), *current.splitlines()]
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], 100))
