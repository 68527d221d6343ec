"""Anthropic's published OpenAPI document as the oracle for every response the tests receive.

`OfficialSchema` validates a value against one of the document's schemas
(JSON Schema 2020-12, `$ref`s resolved over the whole document).
`ResponseMonitor` hooks httpx's and httpx2's transports (the `anthropic` SDK
uses httpx2, the tests' raw clients httpx), falcon's test client and the
fuzzing tests' sender (schemathesis, through `requests`): it picks
the schema by route and status and checks each body as it passes, each SSE
event as soon as it is complete, so a drift from the official shape fails
the test that received it (see `tests/conftest.py`).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import httpx2
import jsonschema
from falcon import testing as falcon_testing
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).parent / "data" / "anthropic-openapi.json"
_BASE = "urn:anthropic:openapi"

# Pensieve's own routes, with no counterpart in Anthropic's API: their
# successful responses are not Anthropic's to shape (their errors still are).
OWN_ROUTES = frozenset(
    {("HEAD", "/"), ("GET", "/"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/openapi.json")}
)

_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time")
def _is_rfc3339(value: object) -> bool:
    # jsonschema checks date-time only with an optional package installed;
    # `created_at` must be RFC 3339, so the check is ours.
    if not isinstance(value, str):
        return True
    if _RFC3339.fullmatch(value) is None:
        return False
    try:
        datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError:
        return False
    return True


class SchemaViolation(AssertionError):
    """A response that the official document does not allow."""


class OfficialSchema:
    """The document's component schemas as validators."""

    def __init__(self, path: Path = DOCUMENT, base: str = _BASE) -> None:
        document = _nullable(json.loads(path.read_text()))
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._base = base
        self._registry: Registry[Any] = Registry().with_resource(base, resource)
        self.names = frozenset(document["components"]["schemas"])
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._lock = threading.Lock()

    def _validator(self, name: str) -> jsonschema.protocols.Validator:
        with self._lock:
            if name not in self._validators:
                if name not in self.names:
                    raise KeyError(f"no schema {name!r} in the document")
                self._validators[name] = jsonschema.Draft202012Validator(
                    {"$ref": f"{self._base}#/components/schemas/{name}"},
                    registry=self._registry,
                    format_checker=_FORMATS,
                )
            return self._validators[name]

    def check(self, name: str, value: object) -> None:
        """Raise `SchemaViolation` naming every place `value` breaks schema `name`."""
        errors = list(self._validator(name).iter_errors(value))
        if errors:
            reasons = [_describe(leaf) for error in errors for leaf in _reasons(error)]
            raise SchemaViolation(f"{name}: " + "; ".join(dict.fromkeys(reasons)))


def _nullable(node: Any) -> Any:
    """An OpenAPI 3.0 document's `nullable: true` in JSON Schema's terms (3.1's documents
    already say it with a null type), so that a validator of today reads it as meant."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            return {"anyOf": [node, {"type": "null"}]}
    return node


def _reasons(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """The errors under a oneOf/anyOf failure in the branch the value meant to take.

    On its own such a failure says only "is not valid under any of the given
    schemas". The branch meant is the one whose `type` constant the value
    carries (the document's discriminator), or not the `null` of a nullable.
    """
    if not error.context:
        return [error]
    branches: dict[object, list[jsonschema.ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)

    def other_branch(errors: list[jsonschema.ValidationError]) -> bool:
        return any(
            (e.validator == "const" and list(e.relative_path) == ["type"])
            or (e.validator == "type" and not e.relative_path)
            for e in errors
        )

    meant = [errors for errors in branches.values() if not other_branch(errors)]
    chosen = min(meant or list(branches.values()), key=len)
    return [leaf for sub in chosen for leaf in _reasons(sub)]


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(top)"
    return f"at {where}: {error.message}"


@cache
def official_schema() -> OfficialSchema:
    return OfficialSchema()


# OpenAI's published document ("OpenAI API" 2.3.0, a copy of ../shared's), for
# the OpenAI routes: their schemas are named `openai:Name` here.
OPENAI_DOCUMENT = Path(__file__).parent / "data" / "openai-openapi.json"
OPENAI = "openai:"


@cache
def openai_schema() -> OfficialSchema:
    return OfficialSchema(OPENAI_DOCUMENT, "urn:openai:openapi")


def schema_check(name: str, value: object) -> None:
    """Check `value` against `name` in Anthropic's document, or OpenAI's for `openai:` names."""
    if name.startswith(OPENAI):
        openai_schema().check(name.removeprefix(OPENAI), value)
    else:
        official_schema().check(name, value)


# Streamed events by their `type`; `ping` and `error` are outside the
# document's event union: a ping carries nothing else, an error is an
# ErrorResponse body.
_EVENTS = {
    "message_start": "MessageStartEvent",
    "message_delta": "MessageDeltaEvent",
    "message_stop": "MessageStopEvent",
    "content_block_start": "ContentBlockStartEvent",
    "content_block_delta": "ContentBlockDeltaEvent",
    "content_block_stop": "ContentBlockStopEvent",
    "error": "ErrorResponse",
}


def body_schema(method: str, path: str, status: int, beta: bool) -> str | None:
    """The schema a JSON body on this route and status must follow; None: Pensieve's own."""
    path = path.rstrip("/") or "/"
    prefix = "Beta" if beta else ""
    if path == "/v1/chat/completions" and method == "POST":
        return OPENAI + ("ErrorResponse" if status >= 400 else "CreateChatCompletionResponse")
    if status >= 400:
        return prefix + "ErrorResponse"
    if (method, path) in OWN_ROUTES:
        return None
    if (method, path) == ("POST", "/v1/messages"):
        return prefix + "Message"
    if (method, path) == ("POST", "/v1/messages/count_tokens"):
        return prefix + "CountMessageTokensResponse"
    if (method, path) == ("GET", "/v1/models"):
        return prefix + "ListResponse_ModelInfo_"
    if method == "GET" and path.startswith("/v1/models/") and path.count("/") == 3:
        return prefix + "ModelInfo"
    raise SchemaViolation(f"{status} for {method} {path}: no route of Anthropic's answers it")


def _documented_divergences(schema: str, value: object) -> object:
    """`value` with what Anthropic documents but its schema lacks put in schema terms.

    The one case: a 413's error type is `request_too_large` in Anthropic's
    errors documentation (and the SDKs' `RequestTooLargeError`), but no
    branch of `ErrorResponse` names it. It is checked as the
    `invalid_request_error` it is a kind of; everything else must match as is.
    """
    if schema.endswith("ErrorResponse") and isinstance(value, dict):
        error = value.get("error")
        if isinstance(error, dict) and error.get("type") == "request_too_large":
            return {**value, "error": {**error, "type": "invalid_request_error"}}
    return value


class BodyCheck:
    """Checks one response body, fed as it arrives."""

    def __init__(
        self,
        monitor: ResponseMonitor,
        what: str,
        schema: str,
        beta: bool,
        event_stream: bool,
    ) -> None:
        self._monitor = monitor
        self._what = what
        self._schema = schema
        self._beta = beta
        self._stream = event_stream
        self._buffer = b""
        self._events = 0
        self._ended = False

    def feed(self, chunk: bytes) -> None:
        if not self._stream:
            self._buffer += chunk
            return
        self._buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n\n", 1)
            self._event(raw)

    def end(self, cut_short: bool = False) -> None:
        """The whole body has passed (or the client stopped reading a stream)."""
        if self._ended:
            return
        self._ended = True
        if cut_short:
            return
        if self._stream:
            if self._buffer.strip():
                # A client drops an event the stream ends inside (SSE spec).
                self._monitor.report(f"{self._what}: the stream ended inside an event")
            return
        value = self._json(self._buffer)
        if value is not None:
            self._check(self._schema, value, self._what)

    def _event(self, raw: bytes) -> None:
        name, data = "", []
        for line in raw.decode("utf-8", errors="replace").split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        index = self._events
        self._events += 1
        what = f"{self._what}, event {index} ({name or 'unnamed'})"
        text = "\n".join(data)
        if self._schema.startswith(OPENAI):
            self._openai_event(text, what)
            return
        payload = self._json(text.encode())
        if payload is None:
            return
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind != name:
            self._monitor.report(f"{what}: `event: {name}` carries a payload of type {kind!r}")
        elif name == "ping":
            if payload != {"type": "ping"}:
                self._monitor.report(f"{what}: a ping carries more than its type: {payload}")
        elif name in _EVENTS:
            self._check(("Beta" if self._beta else "") + _EVENTS[name], payload, what)
        else:
            self._monitor.report(f"{what}: no event of Anthropic's is named {name!r}")

    def _openai_event(self, text: str, what: str) -> None:
        """A Chat Completions stream: chunks, an error body, then `[DONE]`."""
        if text == "[DONE]":
            return
        payload = self._json(text.encode())
        if isinstance(payload, dict) and "error" in payload:
            self._check(OPENAI + "ErrorResponse", payload, what)
        elif payload is not None:
            self._check(OPENAI + "CreateChatCompletionStreamResponse", payload, what)

    def _json(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError as exc:
            if not self._monitor.lenient:
                self._monitor.report(
                    f"{self._what}: not JSON ({exc}): {data[:200]!r}; a test that means to "
                    "receive such bodies is marked `non_json_responses`"
                )
            return None

    def _check(self, schema: str, value: object, what: str) -> None:
        self._monitor.count()
        value = _documented_divergences(schema, value)
        try:
            schema_check(schema, value)
        except SchemaViolation as exc:
            self._monitor.report(f"{what}: {exc}\n  body: {json.dumps(value)[:1000]}")


class ResponseMonitor:
    """Collects the violations found in the responses received since the last `take`."""

    def __init__(self) -> None:
        self._violations: list[str] = []
        self._lock = threading.Lock()
        # Set for tests marked `non_json_responses`: bodies that are not JSON
        # pass; JSON bodies are still checked.
        self.lenient = False
        self.checked = 0  # bodies and events validated so far

    def count(self) -> None:
        with self._lock:
            self.checked += 1

    def report(self, violation: str) -> None:
        with self._lock:
            self._violations.append(violation)

    def take(self) -> list[str]:
        with self._lock:
            taken, self._violations = self._violations, []
        return taken

    @contextlib.contextmanager
    def expecting_violations(self) -> Iterator[list[str]]:
        """Collect the violations of the responses received inside, instead of failing."""
        before = self.take()
        found: list[str] = []
        try:
            yield found
        finally:
            found.extend(self.take())
            for violation in before:
                self.report(violation)

    def begin(
        self, method: str, path: str, query: str, status: int, headers: Any
    ) -> BodyCheck | None:
        """The check for one response, or None when it has no Anthropic shape to keep."""
        what = f"{method} {path}{'?' + query if query else ''} → {status}"
        if method in ("HEAD", "OPTIONS"):
            return None  # no body; OPTIONS is HTTP's (CORS preflight), not an API operation
        beta = "beta=true" in query.split("&")
        try:
            schema = body_schema(method, path, status, beta)
        except SchemaViolation as exc:
            self.report(str(exc))
            return None
        if schema is None:
            return None
        encoding = headers.get("content-encoding", "identity")
        if encoding != "identity":
            self.report(f"{what}: encoded {encoding!r}; Pensieve sends plain bodies")
            return None
        content_type = headers.get("content-type", "")
        event_stream = content_type.startswith("text/event-stream")
        streams = ("Message", "BetaMessage", OPENAI + "CreateChatCompletionResponse")
        if event_stream and schema not in streams:
            self.report(f"{what}: an event stream where Anthropic answers with JSON")
            return None
        return BodyCheck(self, what, schema, beta, event_stream)

    # -- hooks --------------------------------------------------------------

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Check every response httpx, httpx2 and falcon's test client hand to the tests."""
        with contextlib.ExitStack() as stack:
            for module in (httpx, httpx2):
                stack.enter_context(self._hook_httpx(module))
            stack.enter_context(self._hook_falcon())
            stack.enter_context(self._hook_schemathesis())
            yield

    @contextlib.contextmanager
    def _hook_httpx(self, module: Any) -> Iterator[None]:
        monitor = self

        class CheckedStream(module.SyncByteStream):  # type: ignore[misc,name-defined]
            def __init__(self, inner: Any, check: BodyCheck) -> None:
                self._inner = inner
                self._check = check

            def __iter__(self) -> Iterator[bytes]:
                for chunk in self._inner:
                    self._check.feed(chunk)
                    yield chunk
                self._check.end()

            def close(self) -> None:
                self._inner.close()

        class AsyncCheckedStream(module.AsyncByteStream):  # type: ignore[misc,name-defined]
            def __init__(self, inner: Any, check: BodyCheck) -> None:
                self._inner = inner
                self._check = check

            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in self._inner:
                    self._check.feed(chunk)
                    yield chunk
                self._check.end()

            async def aclose(self) -> None:
                await self._inner.aclose()

        def checked(response: Any, request: Any, wrap: Callable[[Any, BodyCheck], Any]) -> Any:
            # The path as sent: a model id may hold an escaped `/`.
            path, _, query = request.url.raw_path.decode("ascii").partition("?")
            check = monitor.begin(
                request.method, path, query, response.status_code, response.headers
            )
            if check is not None:
                response.stream = wrap(response.stream, check)
            return response

        sync_send = module.HTTPTransport.handle_request
        async_send = module.AsyncHTTPTransport.handle_async_request

        def handle_request(transport: Any, request: Any) -> Any:
            return checked(sync_send(transport, request), request, CheckedStream)

        async def handle_async_request(transport: Any, request: Any) -> Any:
            return checked(await async_send(transport, request), request, AsyncCheckedStream)

        module.HTTPTransport.handle_request = handle_request
        module.AsyncHTTPTransport.handle_async_request = handle_async_request
        try:
            yield
        finally:
            module.HTTPTransport.handle_request = sync_send
            module.AsyncHTTPTransport.handle_async_request = async_send

    @contextlib.contextmanager
    def _hook_schemathesis(self) -> Iterator[None]:
        # The fuzzing tests send through `requests`, all by this one function,
        # which has read the body (or as much of a stream as it wanted) when
        # it returns.
        from schemathesis.core.transport import STREAM_CUT_SHORT_ATTRIBUTE
        from schemathesis.transport import requests as transport

        send = transport._request

        def checked_send(*args: Any, **kwargs: Any) -> Any:
            response = send(*args, **kwargs)
            path, _, query = response.request.path_url.partition("?")
            check = self.begin(
                response.request.method, path, query, response.status_code, response.headers
            )
            if check is not None:
                check.feed(response.content)
                check.end(cut_short=getattr(response, STREAM_CUT_SHORT_ATTRIBUTE, False))
            return response

        transport._request = checked_send
        try:
            yield
        finally:
            transport._request = send

    @contextlib.contextmanager
    def _hook_falcon(self) -> Iterator[None]:
        # TestClient.simulate_* look this module function up on each call.
        simulate = falcon_testing.client.simulate_request

        def checked_simulate(*args: Any, **kwargs: Any) -> Any:
            result = simulate(*args, **kwargs)
            method = kwargs.get("method", args[1] if len(args) > 1 else "GET")
            path = kwargs.get("path", args[2] if len(args) > 2 else "/")
            path, _, query = path.partition("?")
            query = kwargs.get("query_string") or query
            if kwargs.get("params"):
                query = urlencode(kwargs["params"], doseq=True)
            check = self.begin(method, path, query, result.status_code, result.headers)
            if check is not None:
                check.feed(result.content)
                check.end()
            return result

        falcon_testing.client.simulate_request = checked_simulate
        try:
            yield
        finally:
            falcon_testing.client.simulate_request = simulate


MONITOR = ResponseMonitor()
