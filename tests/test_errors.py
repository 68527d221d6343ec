"""Every failure is Anthropic-shaped, carries a request id, and never shows a traceback."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import TINY_CONTEXT
from tests.daemon import Daemon, sse_events

VALID: dict[str, Any] = {
    "model": "claude-opus-4-8",
    "max_tokens": 4,
    "messages": [{"role": "user", "content": "Hi"}],
}


def assert_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    assert response.headers["request-id"].startswith("req_")
    assert "Traceback" not in response.text
    message: str = body["error"]["message"]
    return message


def post(daemon: Daemon, body: Any, path: str = "/v1/messages", **kwargs: Any) -> httpx.Response:
    with daemon.http() as http:
        if isinstance(body, bytes | str):
            return http.post(path, content=body, **kwargs)
        return http.post(path, json=body, **kwargs)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"model": "x", "max_tokens": ', "JSON"),
        (b"", "empty"),
        (b"[1, 2]", "object"),
        ({"model": "x", "messages": VALID["messages"]}, "max_tokens"),
        ({"max_tokens": 4, "messages": VALID["messages"]}, "model"),
        ({**VALID, "max_tokens": "many"}, "max_tokens"),
        ({**VALID, "max_tokens": -1}, "max_tokens"),  # 0 is a cache pre-warm
        ({**VALID, "messages": []}, "messages"),
        ({**VALID, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({**VALID, "messages": [{"role": "user"}]}, "messages.0.content"),
        (
            {**VALID, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
            "messages.0.content.0.type",
        ),
        (
            {**VALID, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
        ),
        ({**VALID, "temperature": 2.5}, "temperature"),
        ({**VALID, "top_p": -1}, "top_p"),
        ({**VALID, "stop_sequences": "END"}, "stop_sequences"),
        ({**VALID, "stop_sequences": [""]}, "stop_sequences.0"),
        ({**VALID, "system": 42}, "system"),
    ],
)
def test_invalid_requests_name_the_problem(tiny_daemon: Daemon, body: Any, field: str) -> None:
    message = assert_error(post(tiny_daemon, body), 400, "invalid_request_error")
    assert field in message


def test_count_tokens_validates_too(tiny_daemon: Daemon) -> None:
    response = post(tiny_daemon, {"model": "x"}, "/v1/messages/count_tokens")
    assert "messages" in assert_error(response, 400, "invalid_request_error")


def test_sdk_raises_bad_request(tiny_daemon: Daemon) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        tiny_daemon.client().messages.create(model="x", max_tokens=4, messages=[])
    assert caught.value.status_code == 400
    assert caught.value.request_id is not None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
def test_missing_or_wrong_token_is_401(tiny_daemon: Daemon, headers: dict[str, str]) -> None:
    for method, path in (
        ("POST", "/v1/messages"),
        ("POST", "/v1/messages/count_tokens"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/nowhere"),
    ):
        response = httpx.request(
            method, f"{tiny_daemon.base_url}{path}", json=VALID, headers=headers
        )
        assert_error(response, 401, "authentication_error")


def test_sdk_with_a_wrong_token(tiny_daemon: Daemon) -> None:
    client = anthropic.Anthropic(base_url=tiny_daemon.base_url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(**VALID)


def test_bearer_and_api_key_both_work(tiny_daemon: Daemon) -> None:
    for headers in (
        {"x-api-key": tiny_daemon.token},
        {"Authorization": f"Bearer {tiny_daemon.token}"},
    ):
        response = httpx.post(f"{tiny_daemon.base_url}/v1/messages", json=VALID, headers=headers)
        assert response.status_code == 200


def test_unknown_route_and_wrong_method(tiny_daemon: Daemon) -> None:
    with tiny_daemon.http() as http:
        assert "/v1/completions" in assert_error(
            http.post("/v1/completions", json=VALID), 404, "not_found_error"
        )
        assert_error(http.get("/v1/messages"), 405, "invalid_request_error")


def test_prompt_too_long_uses_the_exact_wording(tiny_daemon: Daemon) -> None:
    body = {**VALID, "messages": [{"role": "user", "content": "word " * 400}]}
    message = assert_error(post(tiny_daemon, body), 400, "invalid_request_error")
    match = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", message)
    assert match is not None, message
    assert int(match.group(1)) > int(match.group(2)) == TINY_CONTEXT - 1
    # Streaming requests are refused before the 200, with the same error.
    message = assert_error(
        post(tiny_daemon, {**body, "stream": True}), 400, "invalid_request_error"
    )
    assert message.startswith("prompt is too long: ")


def test_model_that_fails_to_load_is_a_500(tiny_daemon: Daemon) -> None:
    message = assert_error(post(tiny_daemon, {**VALID, "model": "unloadable"}), 500, "api_error")
    assert "unloadable" in message
    # The daemon is still serving.
    assert post(tiny_daemon, VALID).status_code == 200


def test_engine_failure_without_streaming_is_a_500(tiny_daemon: Daemon) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        tiny_daemon.client().messages.create(**{**VALID, "model": "broken-1"})
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "generation failed" in caught.value.body["error"]["message"]  # type: ignore[index]


def test_engine_failure_mid_stream_is_an_error_event(tiny_daemon: Daemon) -> None:
    body = {**VALID, "model": "broken-1", "max_tokens": 20, "stream": True}
    with tiny_daemon.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert names[-1] == "error"
    assert "message_stop" not in names
    error = json.loads(events[-1][1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    # The SDK surfaces it as an exception, not a truncated message.
    with (
        pytest.raises(anthropic.APIStatusError),
        tiny_daemon.client().messages.stream(**{**VALID, "model": "broken-1"}) as stream,
    ):
        stream.get_final_message()
    # Other models keep working.
    assert post(tiny_daemon, VALID).status_code == 200


def test_oversized_body_is_413(tiny_daemon: Daemon) -> None:
    too_big = b" " * (32 * 1024 * 1024 + 1)
    assert_error(post(tiny_daemon, too_big), 413, "request_too_large")
