"""Memory safety in a real daemon: each level reached on real readings, drain, stress.

The lines are set relative to the memory available right now and applied
with `reload`, so the daemon's own sampler really crosses them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import msgspec
import psutil
import pytest
import tomli_w

from pensieved.memory.levels import Level
from pensieved.paths import GB
from pensieved.service import control
from tests.daemon import (
    Daemon,
    free_port,
    run_pensievectl,
    run_pensieved,
    running_daemon,
    sse_events,
    start_daemon,
)
from tests.test_control import control_socket
from tests.test_errors import assert_error
from tests.test_memory import available_gb, lines

HI = [{"role": "user", "content": "Hi"}]
GO_ON = [{"role": "user", "content": "Go on."}]
# Streams that must outlast a step of a test decode greedily: sampled, the
# random model ends about one 4000-token stream in eight early with its end
# token.
GREEDY = 0.0
SAMPLE_INTERVAL = 0.05
DRAIN = 4.0


def with_memory(tiny_config: dict[str, Any], tiny_dir: Path, **memory: Any) -> dict[str, Any]:
    models = {
        **tiny_config["models"],
        # A context so long that a request asking for all of it cannot fit.
        "roomy": {"source": str(tiny_dir), "aliases": ["roomy-*"], "context_length": 4_000_000},
    }
    return {
        **tiny_config,
        "models": models,
        "memory": {"sample_interval": SAMPLE_INTERVAL, **memory},
    }


def reload_with(daemon: Daemon, memory: dict[str, Any]) -> None:
    config = tomllib.loads(daemon.config_path.read_text())
    config["memory"] = {**config.get("memory", {}), **memory}
    daemon.config_path.write_bytes(tomli_w.dumps(config).encode())
    answer = control.call(control_socket(daemon), "reload", timeout=60)
    assert answer["ok"], answer


def reach(daemon: Daemon, level: Level) -> dict[str, Any]:
    """Set the lines so that `level` is where the machine is now; return /health's memory."""
    settings = msgspec.structs.asdict(lines(level))
    reload_with(daemon, {k: v for k, v in settings.items() if k.endswith("_below_gb")})
    memory: dict[str, Any] = health(daemon)["memory"]
    return memory


def health(daemon: Daemon) -> dict[str, Any]:
    report: dict[str, Any] = daemon.health()
    return report


@pytest.fixture(scope="module")
def memory_daemon(
    tiny_config: dict[str, Any],
    tiny_dir: Path,
    smollm_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Daemon]:
    from tests.models import build_tiny_model

    config = with_memory(tiny_config, tiny_dir)
    # "roomy" keeps 128 KB of KV per token (8 KV heads of 1024): a request
    # that may write thousands of tokens needs about a GB.
    wide = build_tiny_model(
        tmp_path_factory.mktemp("models") / "wide", smollm_dir, heads=8, kv_heads=8, head_dim=1024
    )
    config["models"]["roomy"]["source"] = str(wide)
    yield from running_daemon(tmp_path_factory.mktemp("memory-daemon"), config)


def test_reject_refuses_new_requests_and_lets_running_streams_finish(
    memory_daemon: Daemon,
) -> None:
    daemon = memory_daemon
    assert reach(daemon, Level.NORMAL)["level"] == "normal"
    body = {
        "model": "long-x",
        "max_tokens": 1000,
        "messages": GO_ON,
        "stream": True,
        "temperature": GREEDY,
    }
    with (
        daemon.http() as http,
        http.stream("POST", "/v1/messages", json=body) as stream,
    ):
        events = stream.iter_lines()
        for line in events:
            if "content_block_delta" in line:
                break
        memory = reach(daemon, Level.REJECT)
        report = health(daemon)
        assert report["requests"]["active"] == 1  # the stream is still running
        assert memory["level"] == "reject" and memory["accepting_requests"] is False
        assert report["status"] == "overloaded"

        refused = http.post("/v1/messages", json={"model": "x", "max_tokens": 4, "messages": HI})
        message = assert_error(refused, 529, "overloaded_error")
        assert "low on memory" in message and "accepted again above" in message
        assert int(refused.headers["retry-after"]) > 0
        with pytest.raises(anthropic.InternalServerError) as caught:
            daemon.client().messages.create(model="tiny", max_tokens=4, messages=HI)
        assert caught.value.status_code == 529
        assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]

        rest = sse_events(events)
    assert [name for name, _ in rest][-1] == "message_stop"  # finished, not cut
    assert json.loads(rest[-2][1])["delta"]["stop_reason"] == "max_tokens"

    # Memory recovers: requests are accepted again.
    assert reach(daemon, Level.NORMAL)["accepting_requests"] is True
    message_back = daemon.client().messages.create(model="tiny", max_tokens=4, messages=HI)
    assert message_back.usage.output_tokens > 0
    log = daemon.log()
    assert "memory level normal → reject" in log and "GB available" in log
    assert "memory level reject → normal" in log


def test_warn_keeps_serving_and_status_shows_the_level(memory_daemon: Daemon) -> None:
    daemon = memory_daemon
    memory = reach(daemon, Level.WARN)
    assert memory["level"] == "warn" and memory["accepting_requests"] is True
    assert memory["available_gb"] == pytest.approx(available_gb(), abs=1.0)
    assert memory["model_gb"] > 0 and memory["kv_cache_gb"] >= 0
    assert health(daemon)["status"] == "ok"
    message = daemon.client().messages.create(model="tiny", max_tokens=4, messages=HI)
    assert message.usage.output_tokens > 0
    status = run_pensievectl(daemon, "status")
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if line.startswith("memory level"))
    assert "warn (accepting requests" in row
    assert "memory level normal → warn" in daemon.log()
    reach(daemon, Level.NORMAL)


def test_a_request_whose_estimate_crosses_the_reject_line_is_refused(
    memory_daemon: Daemon,
) -> None:
    daemon = memory_daemon
    # The reject line 1 GB below what is available: the machine is fine, but a
    # request allowed thousands of output tokens (its estimate counts 4096 of
    # them: about 2 GB of KV cache here) would cross it.
    line = available_gb() - 1.0
    reload_with(daemon, {"warn_below_gb": line, "reject_below_gb": line, "shutdown_below_gb": 0.0})
    try:
        assert health(daemon)["memory"]["level"] == "normal"
        with daemon.http() as http:
            too_big = {"model": "roomy", "max_tokens": 4_000_000, "messages": HI}
            message = assert_error(http.post("/v1/messages", json=too_big), 529, "overloaded_error")
            assert "not enough memory for this request" in message
            assert "below the" in message and "reject line" in message
            streamed = http.post("/v1/messages", json={**too_big, "stream": True})
            assert_error(streamed, 529, "overloaded_error")  # refused before the 200
            small = http.post("/v1/messages", json={**too_big, "max_tokens": 4})
            assert small.status_code == 200, small.text
    finally:
        reach(daemon, Level.NORMAL)


def test_memory_shutdown_ends_streams_with_an_error_and_exits_0(
    tiny_config: dict[str, Any], tiny_dir: Path, tmp_path: Path
) -> None:
    daemon = start_daemon(tmp_path / "home", with_memory(tiny_config, tiny_dir))
    try:
        client = daemon.client()
        with (
            pytest.raises(anthropic.APIStatusError) as caught,
            client.messages.stream(
                model="long-x",
                max_tokens=3000,
                messages=GO_ON,
                extra_body={"temperature": GREEDY},
            ) as stream,
        ):
            for _ in stream.text_stream:
                started = time.monotonic()
                # Every line above what is available: the guard calls for shutdown.
                settings = msgspec.structs.asdict(lines(Level.SHUTDOWN))
                reload_with(daemon, {k: v for k, v in settings.items() if k.endswith("_below_gb")})
                break
            stream.get_final_message()
        assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        assert daemon.process.wait(10) == 0
        assert time.monotonic() - started < 10
        log = daemon.log()
        assert "memory level normal → shutdown" in log
        assert "memory is critically low" in log and "stopping" in log
        assert "models freed" in log
    finally:
        daemon.stop()


def test_sigterm_drains_short_streams_and_ends_long_ones(
    tiny_config: dict[str, Any], tiny_dir: Path, tmp_path: Path
) -> None:
    config = {**with_memory(tiny_config, tiny_dir), "server": {"drain_seconds": DRAIN}}
    daemon = start_daemon(tmp_path / "home", config)
    try:

        def stream(max_tokens: int, started: threading.Event) -> list[tuple[str, str]]:
            body = {
                "model": "long-x",
                "max_tokens": max_tokens,
                "messages": GO_ON,
                "stream": True,
                "temperature": GREEDY,
            }
            with daemon.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
                lines = response.iter_lines()
                for line in lines:
                    if "content_block_delta" in line:
                        started.set()
                        break
                return sse_events(lines)

        short_started, long_started = threading.Event(), threading.Event()
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(stream, 4000, long_started)
            short = pool.submit(stream, 300, short_started)
            assert short_started.wait(30) and long_started.wait(30)
            signalled = time.monotonic()
            os.kill(daemon.process.pid, signal.SIGTERM)
            time.sleep(0.2)
            with daemon.http() as http:  # new work is refused while draining
                refused = http.post(
                    "/v1/messages", json={"model": "x", "max_tokens": 4, "messages": HI}
                )
            assert "shutting down" in assert_error(refused, 529, "overloaded_error")
            short_events, long_events = short.result(30), long.result(30)
        assert [name for name, _ in short_events][-1] == "message_stop"
        assert [name for name, _ in long_events][-1] == "error"
        assert "message_stop" not in [name for name, _ in long_events]
        assert daemon.process.wait(15) == 0
        assert time.monotonic() - signalled < DRAIN + 5.0
        log = daemon.log()
        assert "draining: 2 request(s)" in log
        assert "1 request(s) still running; ending them" in log
    finally:
        daemon.stop()


def test_a_daemon_started_below_the_shutdown_line_exits_0_without_loading(
    tiny_config: dict[str, Any], tiny_dir: Path, tmp_path: Path
) -> None:
    settings = msgspec.structs.asdict(lines(Level.SHUTDOWN))
    memory = {k: v for k, v in settings.items() if k.endswith("_below_gb")}
    config = {**with_memory(tiny_config, tiny_dir, **memory), "server": {"port": free_port()}}
    home = tmp_path / "home"
    home.mkdir()
    config_path = home / "config.toml"
    config_path.write_bytes(tomli_w.dumps(config).encode())
    result = run_pensieved(home, "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert "not starting: memory is critically low" in result.stderr
    assert "loaded model" not in result.stderr


def test_concurrent_long_streams_stay_within_the_memory_budget(
    tiny_config: dict[str, Any], tiny_dir: Path, tmp_path: Path
) -> None:
    daemon = start_daemon(tmp_path / "home", with_memory(tiny_config, tiny_dir))
    try:
        process = psutil.Process(daemon.process.pid)
        prompt = [{"role": "user", "content": "Tell me everything about the sea. " * 120}]
        body = {"model": "long-x", "max_tokens": 200, "messages": prompt, "stream": True}

        def run(body: dict[str, Any]) -> tuple[int, list[str]]:
            with daemon.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    return response.status_code, [response.json()["error"]["message"]]
                return 200, [name for name, _ in sse_events(response)]

        assert run(body)[1][-1] == "message_stop"  # warm-up: one stream, alone
        baseline = process.memory_info().rss
        # Room for about two of these streams (each estimated at ~14 MB) above
        # what the daemon holds now; six arrive at once.
        budget = baseline + 30 * 1024**2
        reload_with(daemon, {"budget_gb": budget / GB})
        peak = baseline
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(6) as pool:
                outcomes = list(pool.map(run, [body] * 6, timeout=90))
        finally:
            done.set()
            watcher.join()
        assert time.monotonic() - started < 90
        admitted = [names for status, names in outcomes if status == 200]
        refused = [names[0] for status, names in outcomes if status == 529]
        assert peak <= budget, f"peak RSS {peak / 2**20:.1f} MB > budget {budget / 2**20:.1f} MB"
        assert len(admitted) + len(refused) == 6
        assert admitted and refused, outcomes
        assert all(names[-1] == "message_stop" for names in admitted)
        assert all("budget" in message for message in refused)
    finally:
        daemon.stop()
