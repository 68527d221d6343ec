"""The OpenAPI document matches the code, and fuzzing it finds no server error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import falcon.inspect
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from pensieved.config import Config
from pensieved.engine.core import Engine
from pensieved.http.app import create_app
from pensieved.models.registry import ModelRegistry
from pensieved.wire.openapi import DOCUMENT, render
from pensieved.wire.protocol import (
    MAX_MESSAGES,
    MAX_STOP_SEQUENCE_BYTES,
    MAX_STOP_SEQUENCES,
    MAX_TOOLS,
)
from tests.conftest import TINY_CONTEXT
from tests.daemon import Daemon, running_daemon

# `make test` keeps this small; `make fuzz` raises it.
EXAMPLES = int(os.environ.get("PENSIEVE_FUZZ_EXAMPLES", "25"))


def test_kept_document_is_current() -> None:
    assert DOCUMENT.read_text() == render(), "run `make openapi` and commit the result"


def test_document_names_exactly_the_app_routes(tmp_path: Path) -> None:
    app = create_app(ModelRegistry(Config()), Engine(tmp_path), "token")
    in_code = {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal and method.method not in ("OPTIONS",)
    }
    document = json.loads(DOCUMENT.read_text())
    in_document = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert in_document == in_code


def test_served_document_is_the_kept_one(tiny_daemon: Daemon) -> None:
    with tiny_daemon.http() as http:
        assert http.get("/openapi.json").json() == json.loads(DOCUMENT.read_text())


@pytest.fixture(scope="module")
def fuzz_daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # A short context keeps every generated request quick.
    config = {"models": {"tiny": {"source": str(tiny_dir), "context_length": TINY_CONTEXT // 4}}}
    yield from running_daemon(tmp_path_factory.mktemp("fuzz-daemon"), config)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_daemon: Daemon) -> Any:
    schema = schemathesis.openapi.from_dict(json.loads(DOCUMENT.read_text()))
    schema.config.update(base_url=fuzz_daemon.base_url)
    return schema


def anthropic_shaped_errors(ctx: Any, response: Any, case: Any) -> bool:
    """Every error is `{"type": "error", "error": {...}, "request_id"}` with the header."""
    if response.status_code < 400:
        return True
    body = response.json()
    assert body["type"] == "error", body
    assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str)
    assert body["request_id"] == response.headers["request-id"][0]
    assert "Traceback" not in response.text
    return True


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# Negative data only where there is an input to break.
OPERATIONS = [
    ("post", "/v1/messages", POSITIVE),
    ("post", "/v1/messages", NEGATIVE),
    ("post", "/v1/messages/count_tokens", POSITIVE),
    ("post", "/v1/messages/count_tokens", NEGATIVE),
    ("get", "/v1/models/{model_id}", POSITIVE),
    ("get", "/v1/models", POSITIVE),
    ("get", "/health", POSITIVE),
    ("head", "/", POSITIVE),
]


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_fuzzing_finds_no_server_error(
    fuzz_schema: Any, fuzz_daemon: Daemon, method: str, path: str, mode: GenerationMode
) -> None:
    operation = fuzz_schema[path][method.upper()]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        calls.append(case)
        case.call_and_validate(
            headers={"x-api-key": fuzz_daemon.token},
            checks=[not_a_server_error, anthropic_shaped_errors],
            timeout=60,
        )

    run()
    assert calls  # hypothesis really generated and sent requests


# A campaign over the limits: the lists the document bounds (`maxItems`) and
# the bytes of stop sequences it cannot state, on both sides of each bound.
# Within them a request is served; past them it is a 400 that names the field.
USER = {"role": "user", "content": "hi"}
STOP_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1)


@st.composite
def stop_count(draw: st.DrawFn) -> tuple[str, dict[str, Any], bool]:
    count = draw(st.integers(MAX_STOP_SEQUENCES - 2, MAX_STOP_SEQUENCES + 2))
    stops = draw(st.lists(STOP_TEXT.map(lambda s: s[:4]), min_size=count, max_size=count))
    return "stop_sequences", {"stop_sequences": stops}, count > MAX_STOP_SEQUENCES


@st.composite
def stop_bytes(draw: st.DrawFn) -> tuple[str, dict[str, Any], bool]:
    stops = draw(st.lists(STOP_TEXT, min_size=1, max_size=4))
    # Stretch the last one until all of them are about the limit, in UTF-8 bytes.
    used = sum(len(stop.encode()) for stop in stops[:-1])
    target = MAX_STOP_SEQUENCE_BYTES + draw(st.integers(-3, 3))
    last = stops[-1]
    stops[-1] = last * max(1, (target - used) // len(last.encode()))
    total = sum(len(stop.encode()) for stop in stops)
    return "stop_sequences", {"stop_sequences": stops}, total > MAX_STOP_SEQUENCE_BYTES


@st.composite
def past_a_list_limit(draw: st.DrawFn) -> tuple[str, dict[str, Any], bool]:
    extra = draw(st.integers(1, 2))
    if draw(st.booleans()):
        return "messages", {"messages": [USER] * (MAX_MESSAGES + extra)}, True
    tools = [
        {"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(MAX_TOOLS + extra)
    ]
    return "tools", {"tools": tools}, True


LIMIT_CASES = st.one_of(stop_count(), stop_bytes(), past_a_list_limit())


def test_fuzzing_the_limits_finds_each_refused_by_name(fuzz_daemon: Daemon) -> None:
    calls = []

    @given(case=LIMIT_CASES)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: tuple[str, dict[str, Any], bool]) -> None:
        field, fields, over = case
        calls.append(field)
        payload = {"model": "tiny", "max_tokens": 1, "messages": [USER], **fields}
        response = httpx.post(
            f"{fuzz_daemon.base_url}/v1/messages",
            json=payload,
            headers={"x-api-key": fuzz_daemon.token},
            timeout=120,
        )
        if not over:
            assert response.status_code == 200, response.text
            return
        assert response.status_code == 400, response.text
        error = response.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"].startswith(f"{field}: "), error
        assert error["request_id"] == response.headers["request-id"]

    run()
    assert calls
