"""Responses valid under Anthropic's published OpenAPI document, and the check that says so.

Every response the suite receives is checked by the monitor in
`tests/schema.py` (installed in `tests/conftest.py`). Here: that the check
really fails on what the document forbids (bodies served by a stub server,
through the SDK, httpx and falcon's test client), that Pensieve's shapes pass
it on every route and both API flavours, and the values behind them.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import falcon
import falcon.asgi
import falcon.testing
import httpx
import pytest

from pensieved.wire import responses
from pensieved.wire.errors import error_body
from tests.daemon import Daemon, running_daemon, sse_events
from tests.models import THINKING_TEMPLATE, build_tiny_model
from tests.schema import (
    DOCUMENT,
    MONITOR,
    OPENAI_DOCUMENT,
    SchemaViolation,
    official_schema,
    openai_schema,
)

SHARED_DOCUMENT = Path(__file__).parents[2] / "shared" / "anthropic-openapi.json"
HI = [{"role": "user", "content": "Hi"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def full_message(*content: dict[str, Any], thinking_tokens: int = 0) -> dict[str, Any]:
    usage = responses.usage(10, 7, 3, thinking_tokens)
    return responses.message("msg_1", "tiny", list(content), "end_turn", None, usage)


# -- the oracle ---------------------------------------------------------------


def test_the_document_is_anthropics() -> None:
    document = json.loads(DOCUMENT.read_text())
    assert document["openapi"].startswith("3.1")
    if SHARED_DOCUMENT.exists():  # the copy this one was taken from
        assert DOCUMENT.read_bytes() == SHARED_DOCUMENT.read_bytes()


def test_the_openai_document_is_openais_and_its_nullables_are_read() -> None:
    document = json.loads(OPENAI_DOCUMENT.read_text())
    assert (document["openapi"], document["info"]["title"]) == ("3.0.0", "OpenAI API")
    shared = SHARED_DOCUMENT.with_name("openai-openapi.json")
    if shared.exists():
        assert OPENAI_DOCUMENT.read_bytes() == shared.read_bytes()
    # OpenAPI 3.0's `nullable: true` allows null; a field without it does not.
    error = {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }
    openai_schema().check("ErrorResponse", error)
    with pytest.raises(SchemaViolation):
        openai_schema().check("ErrorResponse", {"error": {**error["error"], "message": None}})


@pytest.mark.parametrize("beta", ["", "Beta"])
def test_pensieves_shapes_are_valid(beta: str) -> None:
    schema = official_schema()
    message = full_message(
        responses.thinking_block("hmm", "c2ln"),
        responses.text_block("Hello"),
        responses.tool_use_block(responses.new_tool_use_id(), "get_weather", {"city": "Paris"}),
        thinking_tokens=2,
    )
    schema.check(f"{beta}Message", message)
    schema.check(f"{beta}MessageStartEvent", {"type": "message_start", "message": message})
    for block in message["content"]:
        start = {"type": "content_block_start", "index": 0, "content_block": block}
        schema.check(f"{beta}ContentBlockStartEvent", start)
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": responses.delta_usage(10, 7, 3),
        "context_management": None,
    }
    delta["delta"] |= {"stop_details": None, "container": None}
    schema.check(f"{beta}MessageDeltaEvent", delta)
    for kind in ("invalid_request_error", "not_found_error", "overloaded_error", "api_error"):
        schema.check(f"{beta}ErrorResponse", error_body(kind, "no", "req_1"))


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        # What a strict validator of the document found in Pensieve's replies.
        (lambda m: m["content"][1].update(caller=None), "content/1/caller"),
        (lambda m: m["usage"].pop("output_tokens_details"), "'output_tokens_details'"),
        (lambda m: m["content"][0].pop("citations"), "'citations' is a required property"),
        (lambda m: m["content"][1].update(id="toolu 1"), "content/1/id"),
        (lambda m: m.update(stop_reason="done"), "stop_reason"),
        (lambda m: m["usage"].update(output_tokens=-1), "usage/output_tokens"),
        (lambda m: m.pop("container"), "'container' is a required property"),
    ],
    ids=["caller-null", "no-token-details", "no-citations", "bad-id", "stop-reason", "neg", "box"],
)
def test_the_oracle_rejects_what_the_document_forbids(break_it: Any, reason: str) -> None:
    message = full_message(
        responses.text_block("Hello"), responses.tool_use_block("toolu_1", "get_weather", {})
    )
    official_schema().check("Message", message)
    break_it(message)
    with pytest.raises(SchemaViolation, match=reason):
        official_schema().check("Message", message)


# -- the monitor, against a server that answers wrongly ------------------------

BAD_MESSAGE = full_message(
    responses.text_block("Hi"), {"type": "tool_use", "id": "toolu_1", "name": "x", "input": {}}
)
BAD_MESSAGE["content"][1]["caller"] = None


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events
    )


BAD_STREAM = _sse(
    {"type": "message_start", "message": full_message()},
    {"type": "ping"},
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "x", "input": {}},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 1},
    },
    {"type": "message_stop"},
)

# (method, path) → status, content type, body
STUB_ROUTES: dict[tuple[str, str], tuple[int, str, bytes]] = {
    ("POST", "/v1/messages"): (200, "application/json", json.dumps(BAD_MESSAGE).encode()),
    ("POST", "/v1/messages/count_tokens"): (200, "text/plain", b"seven"),
    ("GET", "/v1/models"): (200, "application/json", b'{"data": [], "has_more": false}'),
    ("GET", "/v1/models/x"): (404, "application/json", b'{"type": "error", "error": {}}'),
    ("GET", "/health"): (200, "text/plain", b"fine"),
    ("GET", "/v1/secret"): (200, "application/json", b"{}"),
}


class _StubHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        path = self.path.split("?")[0]
        status, content_type, body = STUB_ROUTES[(self.command, path)]
        if request.get("stream"):
            content_type, body = "text/event-stream", BAD_STREAM
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_monitor_catches_a_bad_message_through_the_sdk(stub_url: str) -> None:
    client = anthropic.Anthropic(base_url=stub_url, api_key="k", max_retries=0)
    with MONITOR.expecting_violations() as found:
        message = client.messages.create(model="m", max_tokens=1, messages=HI)  # type: ignore[arg-type]
    # The SDK took it; the check did not.
    assert message.content[1].type == "tool_use"
    assert len(found) == 1
    assert found[0].startswith("POST /v1/messages → 200: Message: at content/1/caller:")


def test_the_monitor_catches_bad_stream_events(stub_url: str) -> None:
    client = anthropic.Anthropic(base_url=stub_url, api_key="k", max_retries=0)
    with (
        MONITOR.expecting_violations() as found,
        client.messages.stream(model="m", max_tokens=1, messages=HI) as stream,  # type: ignore[arg-type]
    ):
        stream.get_final_message()
    assert len(found) == 2
    assert found[0].startswith(
        "POST /v1/messages → 200, event 2 (content_block_start): ContentBlockStartEvent: "
        "at content_block: 'caller' is a required property"
    )
    assert found[1].startswith("POST /v1/messages → 200, event 4 (message_delta):")
    assert "'output_tokens_details' is a required property" in found[1]


def test_the_beta_route_is_checked_against_the_beta_schemas(stub_url: str) -> None:
    body = {"model": "m", "max_tokens": 1, "messages": HI, "stream": True}
    with (
        MONITOR.expecting_violations() as found,
        httpx.Client(base_url=stub_url) as http,
        http.stream("POST", "/v1/messages?beta=true", json=body) as response,
    ):
        response.read()
    # The beta tool_use block may leave `caller` out; its closing delta needs more.
    assert len(found) == 1
    assert found[0].startswith(
        "POST /v1/messages?beta=true → 200, event 4 (message_delta): BetaMessageDeltaEvent:"
    )
    assert "'context_management' is a required property" in found[0]


def test_the_monitor_catches_the_async_client(stub_url: str) -> None:
    async def ask() -> None:
        client = anthropic.AsyncAnthropic(base_url=stub_url, api_key="k", max_retries=0)
        async with client:
            await client.messages.create(model="m", max_tokens=1, messages=HI)  # type: ignore[arg-type]

    with MONITOR.expecting_violations() as found:
        asyncio.run(ask())
    assert len(found) == 1 and "content/1/caller" in found[0]


def test_the_monitor_checks_raw_httpx_by_route(stub_url: str) -> None:
    with MONITOR.expecting_violations() as found, httpx.Client(base_url=stub_url) as http:
        http.get("/v1/models")
        http.get("/v1/models/x")
        http.post("/v1/messages/count_tokens", json={})
        http.get("/health")  # Pensieve's own: not Anthropic's to shape
        http.get("/v1/secret")
    assert len(found) == 4
    assert "ListResponse_ModelInfo_: at (top): 'first_id' is a required property" in found[0]
    assert found[1].startswith("GET /v1/models/x → 404: ErrorResponse:")
    assert "not JSON" in found[2] and "non_json_responses" in found[2]
    assert found[3] == "200 for GET /v1/secret: no route of Anthropic's answers it"


@pytest.mark.non_json_responses
def test_a_marked_test_may_receive_bodies_that_are_not_json(stub_url: str) -> None:
    with MONITOR.expecting_violations() as found, httpx.Client(base_url=stub_url) as http:
        assert http.post("/v1/messages/count_tokens", json={}).text == "seven"
        http.get("/v1/models")  # JSON: still checked
    assert len(found) == 1 and "'first_id' is a required property" in found[0]


def test_the_monitor_checks_falcons_test_client() -> None:
    class Models:
        async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
            resp.media = {"data": [{"type": "model", "id": "x"}], "has_more": False}

    app = falcon.asgi.App()
    app.add_route("/v1/models", Models())
    with MONITOR.expecting_violations() as found:
        falcon.testing.TestClient(app).simulate_get("/v1/models")
    assert len(found) == 1 and "at data/0: 'display_name' is a required property" in found[0]


def _check_body(status: int, content_type: str, body: bytes) -> list[str]:
    with MONITOR.expecting_violations() as found:
        check = MONITOR.begin("POST", "/v1/messages", "", status, {"content-type": content_type})
        assert check is not None
        check.feed(body)
        check.end()
    return found


def test_a_413_may_say_request_too_large_and_nothing_else_unlisted() -> None:
    # Anthropic's errors documentation names it; the document's union does not.
    too_large = json.dumps(error_body("request_too_large", "too big", "req_1")).encode()
    assert _check_body(413, "application/json", too_large) == []
    made_up = json.dumps(error_body("too_big", "too big", "req_1")).encode()
    assert "at error/type" in _check_body(413, "application/json", made_up)[0]


def test_a_stream_that_ends_inside_an_event_is_reported() -> None:
    cut = _sse({"type": "message_stop"}) + b"event: ping\ndata: {"
    found = _check_body(200, "text/event-stream", cut)
    assert found == ["POST /v1/messages → 200: the stream ended inside an event"]


# -- Pensieve, on every route ---------------------------------------------------


def test_every_route_and_flavour_passes_the_check(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    before = MONITOR.checked
    with MONITOR.expecting_violations() as found:
        client.messages.create(model="tiny", max_tokens=3, messages=HI)  # type: ignore[arg-type]
        client.beta.messages.create(model="tiny", max_tokens=3, messages=HI)  # type: ignore[arg-type]
        for messages in (client.messages, client.beta.messages):
            with messages.stream(model="tiny", max_tokens=3, messages=HI) as stream:  # type: ignore[arg-type]
                stream.get_final_message()
            messages.count_tokens(model="tiny", messages=HI)  # type: ignore[arg-type]
        forced = client.messages.create(
            model="tiny",
            max_tokens=60,
            messages=HI,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "get_weather"},
            extra_body={"temperature": 0.0},
        )
        client.models.list()
        client.beta.models.retrieve("claude-opus-4-8")
        with tiny_daemon.http() as http:
            # The SDK's beta methods name the beta in a header; Claude Code
            # calls `?beta=true`, whose answers follow the Beta* schemas.
            ask = {"model": "tiny", "max_tokens": 3, "messages": HI}
            assert http.post("/v1/messages?beta=true", json=ask).status_code == 200
            streamed = http.post("/v1/messages?beta=true", json={**ask, "stream": True})
            assert "event: message_stop" in streamed.text
            counted = http.post("/v1/messages/count_tokens?beta=true", json=ask)
            assert counted.status_code == 200
            assert http.get("/v1/models?beta=true&limit=2").status_code == 200
            assert http.get("/v1/models/claude-haiku-4-5?beta=true").status_code == 200
            assert http.get("/v1/nothing").status_code == 404
            assert http.post("/v1/messages", json={"model": "tiny"}).status_code == 400
            assert http.post("/v1/messages/count_tokens?beta=true", json={}).status_code == 400
            assert http.get("/v1/models", headers={"x-api-key": "no"}).status_code == 401
    assert found == []
    # Each body and event went through the check (a stream is ~8 events).
    assert MONITOR.checked - before > 25
    assert forced.content[0].type == "tool_use"


def test_values_behind_the_shapes(tiny_daemon: Daemon) -> None:
    body = {
        "model": "tiny",
        "max_tokens": 60,
        "messages": HI,
        "tools": [WEATHER],
        "tool_choice": {"type": "any"},
        "temperature": 0.0,
    }
    with tiny_daemon.http() as http:
        whole = http.post("/v1/messages", json=body).json()
        text = http.post("/v1/messages", json={**body, "tools": [], "tool_choice": None}).json()
        with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as response:
            events = [json.loads(data) for _, data in sse_events(response)]
    call = whole["content"][0]
    assert call["type"] == "tool_use" and call["caller"] == {"type": "direct"}
    assert text["content"][0]["citations"] == []
    assert whole["usage"]["output_tokens_details"] == {"thinking_tokens": 0}
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts[0]["caller"] == {"type": "direct"} and starts[0]["input"] == {}
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["usage"]["output_tokens_details"] == {"thinking_tokens": 0}
    assert delta["usage"]["output_tokens"] == whole["usage"]["output_tokens"]


@pytest.fixture(scope="module")
def thinker_daemon(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("models")
    thinker = build_tiny_model(
        root / "thinker", smollm_dir, chat_template=THINKING_TEMPLATE, thinking=True
    )
    config = {"models": {"thinker": {"source": str(thinker), "context_length": 2048}}}
    yield from running_daemon(tmp_path_factory.mktemp("thinker-daemon"), config)


def test_thinking_tokens_are_counted(thinker_daemon: Daemon) -> None:
    client = thinker_daemon.client()
    ask: dict[str, Any] = {
        "model": "thinker",
        "max_tokens": 1100,
        "messages": HI,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        # Greedy: the random model thinks until the budget closes it.
        "extra_body": {"temperature": 0.0},
    }
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    for message in (whole, streamed):
        assert message.content[0].type == "thinking"
        details = message.usage.output_tokens_details
        assert details is not None
        # The budget closed the reasoning after 1024 tokens; the rest is text.
        assert 1000 <= details.thinking_tokens < message.usage.output_tokens
    assert whole.usage.output_tokens_details == streamed.usage.output_tokens_details
