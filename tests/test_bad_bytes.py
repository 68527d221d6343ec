"""Bad input beyond valid JSON: bytes that are not UTF-8, truncated bodies, odd sizes.

Every one gets an Anthropic-shaped 4xx, never a 5xx or a dropped connection.
"""

from __future__ import annotations

import json
import socket

import anthropic
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon import Daemon
from tests.test_errors import VALID, assert_error

VALID_BYTES = json.dumps(VALID).encode()


def post_bytes(
    daemon: Daemon, body: bytes, path: str = "/v1/messages", content_type: str = "application/json"
) -> httpx.Response:
    headers = {"x-api-key": daemon.token, "content-type": content_type}
    return httpx.post(f"{daemon.base_url}{path}", content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_bytes_that_are_not_utf8_are_400(tiny_daemon: Daemon, path: str) -> None:
    inside_a_string = VALID_BYTES.replace(b'"Hi', b'"\xff\xfeHi')
    assert inside_a_string != VALID_BYTES
    for body in (inside_a_string, b"\xff\xfe{}", b"\xc3\x28", VALID_BYTES + b"\x80"):
        message = assert_error(post_bytes(tiny_daemon, body, path), 400, "invalid_request_error")
        assert "UTF-8" in message or "JSON" in message


def test_truncated_bodies_are_400(tiny_daemon: Daemon) -> None:
    for cut in (1, len(VALID_BYTES) // 2, len(VALID_BYTES) - 1):
        assert_error(post_bytes(tiny_daemon, VALID_BYTES[:cut]), 400, "invalid_request_error")


def test_a_body_shorter_than_its_length_is_not_a_5xx(tiny_daemon: Daemon) -> None:
    """The client promises more bytes than it sends, then stops sending."""
    host, port = tiny_daemon.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            f"POST /v1/messages HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"x-api-key: {tiny_daemon.token}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(VALID_BYTES) + 100}\r\n\r\n"
        )
        sock.sendall(head.encode() + VALID_BYTES)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    # The server may answer 400 or just close; it must never answer 5xx.
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:200]
    # And it keeps serving.
    assert post_bytes(tiny_daemon, VALID_BYTES).status_code == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_wrong_content_types_are_400(tiny_daemon: Daemon, content_type: str) -> None:
    response = post_bytes(tiny_daemon, VALID_BYTES, content_type=content_type)
    assert "content-type" in assert_error(response, 400, "invalid_request_error")


def test_huge_numbers_and_wide_nesting_are_400(tiny_daemon: Daemon) -> None:
    huge = VALID_BYTES.replace(b'"max_tokens": 4', b'"max_tokens": ' + b"9" * 400)
    assert huge != VALID_BYTES
    # A max_tokens past any window is clamped to what fits, as Claude Code's 64000 is.
    assert post_bytes(tiny_daemon, huge).status_code == 200
    huge = VALID_BYTES.replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": 1e400')
    wide = json.dumps({**VALID, "messages": [[]] * 200_000}).encode()
    deep = b'{"model": "claude-x", "max_tokens": 4, "messages": ' + b"[" * 50_000
    for body in (huge, wide, deep):
        assert_error(post_bytes(tiny_daemon, body), 400, "invalid_request_error")


def test_an_oversized_body_gets_its_413_through_the_sdk(tiny_daemon: Daemon) -> None:
    """The 413 must reach a client that is still sending, not a reset connection."""
    client = tiny_daemon.client(max_retries=0)
    big = "x" * (33 * 1024 * 1024)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(
            model="claude-x", max_tokens=4, messages=[{"role": "user", "content": big}]
        )
    assert caught.value.status_code == 413
    assert caught.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


def _mutations() -> st.SearchStrategy[bytes]:
    flips = st.tuples(st.integers(0, len(VALID_BYTES) - 1), st.binary(min_size=1, max_size=4))
    return st.one_of(
        st.binary(max_size=512),
        st.integers(0, len(VALID_BYTES)).map(lambda cut: VALID_BYTES[:cut]),
        flips.map(lambda f: VALID_BYTES[: f[0]] + f[1] + VALID_BYTES[f[0] + len(f[1]) :]),
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_mutations())
def test_fuzzed_bytes_never_get_a_5xx(tiny_daemon: Daemon, body: bytes) -> None:
    response = post_bytes(tiny_daemon, body, "/v1/messages/count_tokens")
    assert response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        error = response.json()
        assert error["type"] == "error" and error["error"]["message"]
