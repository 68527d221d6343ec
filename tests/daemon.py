"""Start a real `pensieved` process on a free port and talk to it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import tomli_w

START_TIMEOUT = 120.0

# What real Claude Code may write per turn in the tests that run it: the 135M
# model now and then rambles without repeating itself (which `stop_loops`
# would end) until Claude Code's budget, minutes on 2 cores. Those tests are
# about the commands working, not about the model's prose.
CLAUDE_CODE_MAX_OUTPUT_TOKENS = "128"
# Claude Code's words (exit 1) for a reply that ended at that budget.
OUTRAN = re.compile(r"response exceeded the \d+ output token maximum")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    home: Path
    config_path: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.home / "token").read_text().strip()

    def client(self, **kwargs: Any) -> anthropic.Anthropic:
        kwargs.setdefault("max_retries", 0)
        return anthropic.Anthropic(base_url=self.base_url, auth_token=self.token, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"x-api-key": self.token, "anthropic-version": "2023-06-01"},
            timeout=60,
        )

    def health(self) -> dict[str, Any]:
        """The full /health report (it needs the token; without it, only the status)."""
        with self.http() as http:
            report: dict[str, Any] = http.get("/health").json()
        return report

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def daemon_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PENSIEVE_HOME"] = str(home)
    env["HF_HUB_OFFLINE"] = "1"  # no model hub here; a repo id must not hang
    return env


def start_daemon(
    home: Path, config: dict[str, Any], *extra_args: str, port_flag: bool = False
) -> Daemon:
    """`pensieved --config FILE ARGS`; `port_flag`: on a port given as `--port`, not the file's."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if port_flag:
        extra_args = (*extra_args, "--port", str(port))
    file_port = free_port() if port_flag else port
    config = {**config, "server": {**config.get("server", {}), "port": file_port}}
    config_path = home / "config.toml"
    config_path.write_bytes(tomli_w.dumps(config).encode())
    log_path = home / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pensieved", "--config", str(config_path), *extra_args],
            env=daemon_env(home),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(home, config_path, port, process, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pensieved exited with {process.returncode}:\n{daemon.log()}")
        try:
            if httpx.get(f"{daemon.base_url}/health", timeout=2).status_code == 200:
                return daemon
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    daemon.stop()
    raise RuntimeError(f"pensieved did not start within {START_TIMEOUT}s:\n{daemon.log()}")


def running_daemon(home: Path, config: dict[str, Any]) -> Iterator[Daemon]:
    daemon = start_daemon(home, config)
    try:
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def daemon_running(home: Path, config: dict[str, Any]) -> Iterator[Daemon]:
    """A daemon for one test: `with daemon_running(home, config) as daemon:`."""
    yield from running_daemon(home, config)


def _run_module(module: str, home: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=daemon_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_pensieved(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `pensieved ARGS` to completion (for the ways it refuses to start)."""
    return _run_module("pensieved", home, args)


def run_pensievectl(target: Daemon | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `pensievectl ARGS` for a running daemon, or for a PENSIEVE_HOME."""
    if isinstance(target, Daemon):
        return _run_module("pensievectl", target.home, ("--config", str(target.config_path), *args))
    return _run_module("pensievectl", target, args)


@contextlib.contextmanager
def stream_started(daemon: Daemon, body: dict[str, Any]) -> Iterator[Iterator[str]]:
    """Open a streamed request and read up to its first text delta; yield the rest of its lines."""
    with (
        daemon.http() as http,
        http.stream("POST", "/v1/messages", json={**body, "stream": True}) as response,
    ):
        lines = response.iter_lines()
        for line in lines:
            if "content_block_delta" in line:
                break
        yield lines


def sse_events(body: httpx.Response | Iterator[str]) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body (or the rest of its lines), in order."""
    lines = body.iter_lines() if isinstance(body, httpx.Response) else body
    events: list[tuple[str, str]] = []
    name, data = "", ""
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = line.split(":", 1)[1].strip()
        elif not line and name:
            events.append((name, data))
            name, data = "", ""
    if name:
        events.append((name, data))
    return events
