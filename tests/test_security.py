"""Who may drive the daemon, and what input it accepts (DNS rebinding, browsers, floods)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon import Daemon, run_pensieved, start_daemon
from tests.test_errors import VALID, assert_error

PROTECTED = [
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/tiny"),
    ("GET", "/metrics"),
]


def request(daemon: Daemon, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"x-api-key": daemon.token, **kwargs.pop("headers", {})}
    if method == "POST":
        kwargs.setdefault("json", VALID)
    return httpx.request(method, f"{daemon.base_url}{path}", headers=headers, timeout=60, **kwargs)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:{port}",
        "evil.example",
        "localhost:1",
        "192.168.1.10:{port}",
        "",
        "[::1]junk:{port}",
    ],
)
def test_foreign_host_is_403(tiny_daemon: Daemon, host: str) -> None:
    for method, path in [*PROTECTED, ("HEAD", "/"), ("GET", "/health")]:
        response = request(
            tiny_daemon, method, path, headers={"Host": host.format(port=tiny_daemon.port)}
        )
        assert response.status_code == 403, (method, path)
        if method != "HEAD":
            assert_error(response, 403, "permission_error")


@pytest.mark.parametrize("port", [b"\xb2", b"\xd9\xa1", b"99999999999999999999"])
def test_odd_host_ports_are_403_not_500(tiny_daemon: Daemon, port: bytes) -> None:
    # "²" passes str.isdigit() but not int(); a raw socket sends what httpx won't.
    with socket.create_connection(("127.0.0.1", tiny_daemon.port), timeout=10) as sock:
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:" + port + b"\r\nConnection: close\r\n\r\n"
        )
        status_line = sock.makefile("rb").readline()
    assert status_line.startswith(b"HTTP/1.1 403"), status_line


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}"])
def test_loopback_hosts_are_served(tiny_daemon: Daemon, host: str) -> None:
    response = request(
        tiny_daemon, "GET", "/v1/models", headers={"Host": host.format(port=tiny_daemon.port)}
    )
    assert response.status_code == 200


def test_any_origin_is_403_and_no_cors_headers_ever(tiny_daemon: Daemon) -> None:
    for origin in ("https://evil.example", "http://127.0.0.1:1234", "null"):
        for method, path in [*PROTECTED, ("HEAD", "/"), ("OPTIONS", "/v1/messages")]:
            response = request(tiny_daemon, method, path, headers={"Origin": origin})
            assert response.status_code == 403, (origin, method, path)
            assert "access-control-allow-origin" not in response.headers
    for method, path in [*PROTECTED, ("OPTIONS", "/v1/messages"), ("GET", "/health")]:
        response = request(tiny_daemon, method, path)
        assert not any(h.startswith("access-control-") for h in response.headers)


def test_non_json_content_types_are_refused(tiny_daemon: Daemon) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        response = request(
            tiny_daemon,
            "POST",
            "/v1/messages",
            content=b'{"model": "x"}',
            headers={"content-type": content_type},
        )
        assert content_type in assert_error(response, 400, "invalid_request_error")
    ok = request(
        tiny_daemon,
        "POST",
        "/v1/messages",
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_oversized_bodies_are_413_with_and_without_length(tiny_daemon: Daemon) -> None:
    limit = 32 * 1024 * 1024
    sized = request(tiny_daemon, "POST", "/v1/messages", content=b" " * (limit + 1))
    assert_error(sized, 413, "request_too_large")

    def chunks() -> Iterator[bytes]:
        block = b" " * (1024 * 1024)
        for _ in range(32):
            yield block
        yield b" "

    chunked = request(tiny_daemon, "POST", "/v1/messages", content=chunks())
    assert_error(chunked, 413, "request_too_large")


def test_deep_nesting_and_huge_numbers_are_400(tiny_daemon: Daemon) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    for body in (
        b'{"model": "x", "max_tokens": 4, "messages": [], "metadata": {"a": ' + deep + b"}}",
        b'{"model": "x", "max_tokens": 4, "extra": ' + deep + b', "messages": []}',
        b'{"model": "x", "max_tokens": 1' + b"0" * 400 + b', "messages": []}',
        b'{"model": "x", "max_tokens": 4, "temperature": 1e999, "messages": []}',
    ):
        response = request(tiny_daemon, "POST", "/v1/messages", content=body)
        assert_error(response, 400, "invalid_request_error")


def test_slow_loris_is_cut_off_while_others_are_served(tiny_config: dict, tmp_path: Path) -> None:
    config = {**tiny_config, "server": {"header_timeout": 1.0}}
    daemon = start_daemon(tmp_path / "home", config)
    try:
        slow = socket.create_connection(("127.0.0.1", daemon.port))
        slow.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        slow.settimeout(10)
        started = time.monotonic()
        # A normal client is served meanwhile.
        assert request(daemon, "GET", "/v1/models").status_code == 200
        for _ in range(3):
            time.sleep(0.3)
            try:
                slow.sendall(b"a")  # trickles, never finishing its headers
            except OSError:
                break
        try:
            leftover = slow.recv(4096)
        except ConnectionResetError:
            leftover = b""
        elapsed = time.monotonic() - started
        assert elapsed < 5.0
        assert leftover == b"" or leftover.startswith(b"HTTP/1.1 408")
        slow.close()
    finally:
        daemon.stop()


def test_group_readable_token_file_stops_the_daemon(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    token = home / "token"
    token.write_text("pensieve-sekrit\n")
    os.chmod(token, 0o644)
    result = run_pensieved(home, "--port", "1")
    assert result.returncode == 1
    assert "chmod 600" in result.stderr and str(token) in result.stderr


def test_non_loopback_bind_needs_allow_remote(tmp_path: Path) -> None:
    result = run_pensieved(tmp_path / "home", "--host", "0.0.0.0", "--port", "1")
    assert result.returncode == 1
    assert "server.allow_remote" in result.stderr
