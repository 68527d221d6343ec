"""Limits on everything a request can multiply (security review #3, #4, #5, #11, #13).

Each test is one of the review's probes: first against the functions, then
against a real daemon. Timings have wide margins: the probes took seconds
where the fixed code takes milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import falcon
import falcon.asgi
import falcon.testing
import httpx
import pytest

from pensieved.config import MemoryConfig
from pensieved.conversation.stops import StopMatcher
from pensieved.http.admission import AdmissionMiddleware
from pensieved.http.asgi import json_response, read_body, release_body
from pensieved.http.threads import ThreadStore
from pensieved.memory.bodies import LARGE_BODIES, LARGE_BODY_BYTES
from pensieved.memory.guard import MemoryGuard
from pensieved.wire.decode import decode_request
from pensieved.wire.errors import InvalidRequest
from pensieved.wire.protocol import (
    MAX_MESSAGES,
    MAX_STOP_SEQUENCE_BYTES,
    MAX_STOP_SEQUENCES,
    MAX_TOOLS,
    MessagesRequest,
)
from tests.daemon import Daemon, running_daemon

USER = {"role": "user", "content": "hi"}


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "tiny", "max_tokens": 4, "messages": [USER], **fields}).encode()


def refusal(raw: bytes) -> str:
    with pytest.raises(InvalidRequest) as caught:
        decode_request(raw, MessagesRequest)
    return caught.value.message


def tool_pairs(count: int, model: str = "tiny") -> bytes:
    """An assistant turn of `count` calls, answered in reverse order (review #3's probe)."""
    uses = [
        {"type": "tool_use", "id": f"toolu_{i:08d}", "name": "t", "input": {}} for i in range(count)
    ]
    results = [
        {"type": "tool_result", "tool_use_id": f"toolu_{i:08d}", "content": "ok"}
        for i in reversed(range(count))
    ]
    messages = [USER, {"role": "assistant", "content": uses}, {"role": "user", "content": results}]
    return json.dumps({"model": model, "max_tokens": 1, "messages": messages}).encode()


def empty_objects(megabytes: float, where: str = "metadata") -> bytes:
    """A body that is mostly `{}`s in one field (review #5's probe: 12 MB decoded to 289 MB)."""
    objects = b",".join([b"{}"] * int(megabytes * 1e6 / 3))
    if where == "metadata":
        content = b'"hi"'
        extra = b',"metadata":{"a":[' + objects + b"]}"
    else:  # an image's source, as a screenshot's would be
        content = b'[{"type":"image","source":{"a":[' + objects + b"]}}]"
        extra = b""
    return (
        b'{"model":"tiny","max_tokens":1,"messages":[{"role":"user","content":'
        + content
        + b"}]"
        + extra
        + b"}"
    )


def peak_bytes(function: Any, *args: Any) -> int:
    """The most memory `function(*args)` held at once, its result included."""
    tracemalloc.start()
    try:
        function(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


# 3: tool pairs in linear time.


def test_32k_tool_pairs_decode_in_well_under_a_second() -> None:
    raw = tool_pairs(32_000)
    started = time.perf_counter()
    request = decode_request(raw, MessagesRequest)
    # The review measured 5.1 s (a list scanned per result); linear takes ~0.2 s.
    assert time.perf_counter() - started < 1.5
    assert len(request.messages[2].content) == 32_000
    # Pairing is still checked.
    broken = raw.replace(b'"tool_use_id": "toolu_00000007"', b'"tool_use_id": "toolu_x"')
    assert "unexpected `tool_use_id`" in refusal(broken)


# 4: stop sequences bounded and matched in one pass.


def test_stop_sequences_past_the_count_or_size_are_refused_naming_the_field() -> None:
    many = [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]
    assert refusal(body(stop_sequences=many)).startswith("stop_sequences: ")
    assert decode_request(body(stop_sequences=many[:MAX_STOP_SEQUENCES]), MessagesRequest)
    big = ["x" * (MAX_STOP_SEQUENCE_BYTES // 2)] * 3
    assert refusal(body(stop_sequences=big)).startswith("stop_sequences: at most ")
    # Bytes, not characters: "é" is two.
    assert refusal(body(stop_sequences=["é" * (MAX_STOP_SEQUENCE_BYTES // 2 + 1)]))


def test_matching_a_token_costs_the_same_with_ten_thousand_stops() -> None:
    stops = [f"zq{i:07d}xx" for i in range(10_000)]
    matcher = StopMatcher(stops)
    tokens = 200
    started = time.perf_counter()
    for _ in range(tokens):
        assert matcher.feed(" the") == (" the", None)
    # The review measured 74 ms per token for 100k stops (searched one by one): ~7 ms for these.
    assert (time.perf_counter() - started) / tokens < 0.001
    assert matcher.feed(" zq0009999xx!") == (" ", "zq0009999xx")


def test_building_the_matcher_for_the_most_a_request_may_send_is_quick() -> None:
    stops = [f"{i:04d}" + "ab" * 4 for i in range(MAX_STOP_SEQUENCES)]
    stops[-1] = "x" * (MAX_STOP_SEQUENCE_BYTES - sum(len(s) for s in stops[:-1]))
    started = time.perf_counter()
    StopMatcher(stops)  # built on the engine thread, once per request
    assert time.perf_counter() - started < 0.5


# 5: what a body becomes in memory.


@pytest.mark.parametrize("where", ["metadata", "image"])
def test_fields_nothing_reads_stay_json_text(where: str) -> None:
    raw = empty_objects(4, where)
    # The review measured 24 times the body; kept as JSON text, they are a view of it.
    assert peak_bytes(decode_request, raw, MessagesRequest) < len(raw) // 4


def test_history_with_unknown_blocks_is_pruned_without_building_the_body() -> None:
    raw = empty_objects(4)
    newer = b'{"role":"assistant","content":[{"type":"advisor_result","x":1},{"type":"text",'
    raw = raw.replace(b'"messages":[', b'"messages":[' + newer + b'"text":"ok"}]},', 1)
    request = decode_request(raw, MessagesRequest)
    assert [type(b).__name__ for b in request.messages[0].content] == ["TextBlock"]
    assert peak_bytes(decode_request, raw, MessagesRequest) < 3 * len(raw)


def test_a_thread_is_expanded_without_building_the_body() -> None:
    raw = empty_objects(4)[:-1] + b',"thread":{"type":"create"}}'
    store = ThreadStore()
    assert peak_bytes(store.expand, raw, "token") < len(raw) // 4


class Held:
    """Reads the body, then holds the request until told, as a render would."""

    def __init__(self) -> None:
        self.reading = 0
        self.most = 0
        self.go = asyncio.Event()

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        payload = await read_body(req)
        self.reading += 1
        self.most = max(self.most, self.reading)
        await self.go.wait()
        self.reading -= 1
        release_body(req)
        json_response(resp, {"bytes": len(payload)})


def test_large_bodies_are_taken_a_few_at_a_time_and_small_ones_pass() -> None:
    guard = MemoryGuard(MemoryConfig())
    # Waiting for a place is not sending slowly: it does not count against the deadline.
    middleware = AdmissionMiddleware(guard, body_timeout=lambda: 0.3)
    resource = Held()
    app = falcon.asgi.App(middleware=[middleware])
    app.add_route("/v1/messages", resource)
    large = b'{"a":"' + b"x" * LARGE_BODY_BYTES + b'"}'

    async def scenario() -> list[int]:
        async with falcon.testing.ASGIConductor(app) as conductor:
            posts = [
                asyncio.ensure_future(conductor.simulate_post("/v1/messages", body=large))
                for _ in range(LARGE_BODIES + 2)
            ]
            await asyncio.sleep(0.5)
            assert resource.most == LARGE_BODIES  # the others wait, unread
            assert middleware.bodies.nbytes == LARGE_BODIES * len(large)
            small = asyncio.ensure_future(conductor.simulate_post("/v1/messages", body=b"{}"))
            await asyncio.sleep(0.2)
            assert resource.reading == LARGE_BODIES + 1  # a small body does not wait
            resource.go.set()
            results = await asyncio.gather(*posts, small)
        assert middleware.bodies.nbytes == 0  # each released once its request moved on
        return [result.status_code for result in results]

    assert asyncio.run(scenario()) == [200] * (LARGE_BODIES + 3)


def test_the_limits_on_lists_are_in_the_protocol() -> None:
    assert "messages: Expected `array` of length <= 100000" in refusal(
        json.dumps(
            {"model": "x", "max_tokens": 1, "messages": [USER] * (MAX_MESSAGES + 1)}
        ).encode()
    )
    tool = {"name": "t", "input_schema": {"type": "object"}}
    assert refusal(body(tools=[tool] * (MAX_TOOLS + 1))).startswith("tools: Expected `array`")


# 11: client values quoted short.


def test_a_long_bad_value_is_quoted_short() -> None:
    huge = "A" * 100_000
    raw = json.dumps({"model": "x", "max_tokens": 1, "messages": [{"role": huge, "content": "hi"}]})
    message = refusal(raw.encode())
    assert message.startswith("messages.0.role: Invalid enum value 'AAAA")
    assert len(message) <= 300  # the review measured 100,038
    tools = [{"name": huge, "input_schema": {"type": "object"}}]
    assert len(refusal(body(tools=tools))) <= 300
    results = [{"type": "tool_result", "tool_use_id": huge}]
    assert len(refusal(body(messages=[USER, {"role": "user", "content": results}]))) <= 400


# Against a real daemon.


def error_of(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == error_type
    assert payload["request_id"] == response.headers["request-id"]
    message: str = payload["error"]["message"]
    return message


def post(daemon: Daemon, raw: bytes, timeout: float = 120) -> httpx.Response:
    headers = {"x-api-key": daemon.token, "content-type": "application/json"}
    return httpx.post(
        f"{daemon.base_url}/v1/messages", content=raw, headers=headers, timeout=timeout
    )


def test_health_answers_while_a_big_body_decodes(tiny_daemon: Daemon) -> None:
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with tiny_daemon.http() as http:
            while not done.is_set():
                started = time.perf_counter()
                http.get("/health")
                latencies.append(time.perf_counter() - started)
                time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        # Prefill only: the tiny model's short context refuses it after it was decoded and rendered.
        response = post(tiny_daemon, tool_pairs(32_000))
    finally:
        done.set()
        poller.join()
    assert "prompt is too long" in error_of(response, 400, "invalid_request_error")
    # The review measured 5.3 s with the decode on the event loop.
    assert max(latencies) < 2.0, latencies


def test_stop_sequences_past_the_limit_are_a_400_naming_the_field(tiny_daemon: Daemon) -> None:
    raw = body(stop_sequences=[f"zq{i:07d}xx" for i in range(MAX_STOP_SEQUENCES + 1)])
    message = error_of(post(tiny_daemon, raw), 400, "invalid_request_error")
    assert message.startswith("stop_sequences: ")


def log_lines_of(daemon: Daemon, request_id: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if request_id in line]


def test_a_long_bad_value_is_answered_and_logged_short(tiny_daemon: Daemon) -> None:
    huge = "A" * 100_000
    bad = json.dumps({"model": "x", "max_tokens": 1, "messages": [{"role": huge, "content": "a"}]})
    response = post(tiny_daemon, bad.encode())
    assert len(error_of(response, 400, "invalid_request_error")) <= 300
    (line,) = log_lines_of(tiny_daemon, response.headers["request-id"])
    assert len(line) < 1000


def test_a_newline_in_the_model_cannot_forge_a_log_line(tiny_daemon: Daemon) -> None:
    # Served by the claude-* alias, and logged as the client sent it.
    forged = "claude-x\n2026-01-01 00:00:00,000 INFO pensieved: FORGED" + "B" * 100_000
    response = post(tiny_daemon, body(model=forged, max_tokens=1))
    assert response.status_code == 200, response.text
    time.sleep(0.5)  # the reply's own line follows the response
    lines = log_lines_of(tiny_daemon, response.headers["request-id"])
    assert lines and all(len(line) < 1000 for line in lines)
    assert not any(line.startswith("2026-01-01") for line in tiny_daemon.log().splitlines())


@pytest.fixture(scope="module")
def strict_daemon(
    tiny_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """One generation at a time, none waiting, and 2 s to send a body."""
    config = {
        **tiny_config,
        "server": {"body_timeout": 2.0},
        "engine": {"max_sequences": 1, "max_queue": 0},
    }
    yield from running_daemon(tmp_path_factory.mktemp("strict-daemon"), config)


def test_busy_is_answered_before_the_body_is_decoded(strict_daemon: Daemon) -> None:
    ready, done = threading.Event(), threading.Event()

    def generate() -> None:
        raw = body(model="long-x", max_tokens=3000, temperature=1.0, stream=True)
        headers = {"x-api-key": strict_daemon.token, "content-type": "application/json"}
        url = f"{strict_daemon.base_url}/v1/messages"
        with httpx.stream("POST", url, content=raw, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                if "content_block_delta" in line:
                    ready.set()
                if done.is_set():
                    break  # going away cancels the generation
        ready.set()

    long_one = threading.Thread(target=generate)
    long_one.start()
    try:
        assert ready.wait(60)
        # Invalid, and big: decoded, it would be a 400 after a while; unread, it is a 529 now.
        raw = empty_objects(8).replace(b'"max_tokens":1', b'"max_tokens":"many"')
        started = time.monotonic()
        response = post(strict_daemon, raw)
        assert "requests are generating" in error_of(response, 529, "overloaded_error")
        assert time.monotonic() - started < 5
        assert int(response.headers["retry-after"]) > 0
    finally:
        done.set()
        long_one.join()
        deadline = time.monotonic() + 30
        while strict_daemon.health()["requests"]["active"] and time.monotonic() < deadline:
            time.sleep(0.1)  # the generation ends once the engine sees its client gone
    # Nothing of it was rendered: its only log line is the refusal.
    (line,) = log_lines_of(strict_daemon, response.headers["request-id"])
    assert "→ 529" in line


def test_a_dripped_body_gets_408_after_the_deadline(strict_daemon: Daemon) -> None:
    raw = body()
    with socket.create_connection(("127.0.0.1", strict_daemon.port)) as drip:
        drip.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % (strict_daemon.port, strict_daemon.token.encode(), len(raw))
        )
        drip.settimeout(0.3)
        started = time.monotonic()
        answer = b""
        for byte in raw[:-1]:  # never the last byte
            try:
                drip.sendall(bytes([byte]))
                answer += drip.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if b"\r\n\r\n" in answer or time.monotonic() - started > 15:
                break
        drip.settimeout(5)
        while b"}" not in answer.rpartition(b"\r\n\r\n")[2]:
            more = drip.recv(65536)
            if not more:
                break
            answer += more
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 1.5 < elapsed < 10
    payload = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert payload["error"]["type"] == "timeout_error"
    assert "within 2 s" in payload["error"]["message"]
    # The daemon serves on.
    assert post(strict_daemon, body(model="long-x", max_tokens=1)).status_code == 200
