"""Message threads: the store on its own, then the official SDK's threads against a real daemon.

The SDK's `thread()` and `tool_runner()` send `thread: {"type": "create"}`
with the full history, then `{"type": "continue", ...}` with only the new
messages. The requests are watched on the wire (an httpx event hook on the
SDK's own client), so the tests see that the SDK continued rather than fell
back to replaying the history.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import msgspec
import pytest
from anthropic.lib.tools import beta_tool

from pensieved.http.threads import (
    ThreadFingerprintMismatch,
    ThreadNotFound,
    ThreadStore,
    ThreadUnsupported,
)
from tests.daemon import Daemon

MODEL = "long-thread"  # the tiny model without the 256-token context cap
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


def body(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 5, **fields}).encode()


USER = {"role": "user", "content": "hello"}
REPLY = [{"type": "text", "text": "hi there", "citations": []}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# The store alone: expansion, bounds, owners.


def test_a_body_without_thread_is_left_as_it_is() -> None:
    store = ThreadStore()
    raw = body(messages=[USER])
    assert store.expand(raw, "token") == (raw, None)
    # Malformed ones are the decoder's to refuse, with its usual words.
    broken = b'{"thread": {"type": "continue"}, "messages": []}'
    assert store.expand(broken, "token") == (broken, None)
    assert store.expand(b'{"thread": [', "token") == (b'{"thread": [', None)


def test_continue_expands_to_the_held_conversation() -> None:
    store = ThreadStore()
    create = body(system="be brief", tools=[WEATHER], messages=[USER], thread={"type": "create"})
    created, turn = store.expand(create, "token")
    assert created == create  # a create is served as sent
    store.record(turn, "msg_1", REPLY)
    follow = {"role": "user", "content": "and now?"}
    expanded, turn = store.expand(
        body(messages=[follow], thread={"type": "continue", "previous_message_id": "msg_1"}),
        "token",
    )
    request = msgspec.json.decode(expanded)
    assert request["system"] == "be brief"
    assert request["tools"] == [WEATHER]
    assert request["messages"] == [USER, {"role": "assistant", "content": REPLY}, follow]
    assert turn is not None and turn.previous_message_id == "msg_1"
    # The thread moves on: the continued reply is no longer held.
    store.record(turn, "msg_2", REPLY)
    assert len(store) == 1
    with pytest.raises(ThreadNotFound):
        store.expand(
            body(messages=[follow], thread={"type": "continue", "previous_message_id": "msg_1"}),
            "token",
        )


def test_a_thread_is_held_for_its_token_only() -> None:
    store = ThreadStore()
    _, turn = store.expand(body(messages=[USER], thread={"type": "create"}), "token-a")
    store.record(turn, "msg_1", REPLY)
    cont = body(messages=[USER], thread={"type": "continue", "previous_message_id": "msg_1"})
    with pytest.raises(ThreadNotFound) as caught:
        store.expand(cont, "token-b")
    assert caught.value.status == 404
    assert caught.value.details == {"error_code": "thread_not_found"}
    assert store.expand(cont, "token-a")[1] is not None


def test_threads_expire_when_idle_and_use_keeps_them() -> None:
    clock = Clock()
    store = ThreadStore(idle_seconds=60, clock=clock)
    for message_id in ("msg_old", "msg_used"):
        _, turn = store.expand(body(messages=[USER], thread={"type": "create"}), "token")
        store.record(turn, message_id, REPLY)
    clock.now += 50
    used = body(messages=[USER], thread={"type": "continue", "previous_message_id": "msg_used"})
    store.expand(used, "token")  # a lookup counts as use
    clock.now += 20
    assert len(store) == 1
    store.expand(used, "token")
    old = body(messages=[USER], thread={"type": "continue", "previous_message_id": "msg_old"})
    with pytest.raises(ThreadNotFound):
        store.expand(old, "token")


def test_the_least_recently_used_threads_go_first_by_count_and_by_bytes() -> None:
    store = ThreadStore(max_threads=2)
    for message_id in ("msg_1", "msg_2", "msg_3"):
        _, turn = store.expand(body(messages=[USER], thread={"type": "create"}), "token")
        store.record(turn, message_id, REPLY)
    assert len(store) == 2
    with pytest.raises(ThreadNotFound):
        store.expand(
            body(messages=[USER], thread={"type": "continue", "previous_message_id": "msg_1"}),
            "token",
        )

    big = {"role": "user", "content": "x" * 1000}
    store = ThreadStore(max_bytes=2500)
    for message_id in ("msg_1", "msg_2", "msg_3"):
        _, turn = store.expand(body(messages=[big], thread={"type": "create"}), "token")
        store.record(turn, message_id, REPLY)
    assert len(store) == 2
    assert store.nbytes <= 2500


def test_a_conversation_too_big_to_hold_is_refused_as_unsupported() -> None:
    store = ThreadStore(max_thread_bytes=500)
    big = {"role": "user", "content": "x" * 1000}
    with pytest.raises(ThreadUnsupported) as caught:
        store.expand(body(messages=[big], thread={"type": "create"}), "token")
    assert caught.value.status == 400
    assert caught.value.details == {"error_code": "thread_unsupported_request"}
    # Grown past the bound by a continue: served, but not held.
    _, turn = store.expand(body(messages=[USER], thread={"type": "create"}), "token")
    store.record(turn, "msg_1", REPLY)
    _, turn = store.expand(
        body(messages=[big], thread={"type": "continue", "previous_message_id": "msg_1"}),
        "token",
    )
    store.record(turn, "msg_2", REPLY)
    assert len(store) == 0 and store.nbytes == 0


def test_a_continue_may_repeat_system_and_tools_but_not_change_them() -> None:
    store = ThreadStore()
    _, turn = store.expand(
        body(system="be brief", messages=[USER], thread={"type": "create"}), "token"
    )
    store.record(turn, "msg_1", REPLY)
    same = body(
        system="be brief",
        messages=[USER],
        thread={"type": "continue", "previous_message_id": "msg_1"},
    )
    assert store.expand(same, "token")[1] is not None
    changed = body(
        system="be verbose",
        messages=[USER],
        thread={"type": "continue", "previous_message_id": "msg_1"},
    )
    with pytest.raises(ThreadFingerprintMismatch) as caught:
        store.expand(changed, "token")
    assert caught.value.details == {"error_code": "thread_fingerprint_mismatch"}


# The official Python SDK's threads against a real daemon.


class Wire:
    """The JSON bodies the SDK sent and the statuses it got, in order."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.statuses: list[int] = []

    def request(self, request: httpx2.Request) -> None:
        if request.url.path.endswith("/v1/messages"):
            self.sent.append(json.loads(request.content))

    def response(self, response: httpx2.Response) -> None:
        if response.request.url.path.endswith("/v1/messages"):
            self.statuses.append(response.status_code)

    def threads(self) -> list[Any]:
        return [sent.get("thread") for sent in self.sent]


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def client(tiny_daemon: Daemon, wire: Wire) -> Iterator[anthropic.Anthropic]:
    http = anthropic.DefaultHttpxClient(
        event_hooks={"request": [wire.request], "response": [wire.response]}
    )
    with tiny_daemon.client(http_client=http) as client:
        yield client


def test_sdk_thread_continues_with_only_the_new_messages(
    client: anthropic.Anthropic, wire: Wire
) -> None:
    thread = client.beta.messages.thread(model=MODEL, max_tokens=8, system="Answer briefly.")
    first = thread.send({"role": "user", "content": "Name a colour."})
    second = thread.send({"role": "user", "content": "And another one?"})
    assert wire.statuses == [200, 200]
    assert wire.threads() == [
        {"type": "create"},
        {"type": "continue", "previous_message_id": first.id},
    ]
    continued = wire.sent[1]
    assert len(continued["messages"]) == 1 and "system" not in continued
    assert thread.previous_message_id == second.id

    # The continue was served as the full conversation: the same prompt, token
    # for token, as the history sent whole; and the prompt cache held it.
    full = client.messages.count_tokens(
        model=MODEL,
        system="Answer briefly.",
        messages=[
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {"role": "user", "content": "And another one?"},
        ],
    )
    usage = second.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == full.input_tokens
    assert (usage.cache_read_input_tokens or 0) > 0


def test_sdk_thread_streamed_turns_continue(client: anthropic.Anthropic, wire: Wire) -> None:
    thread = client.beta.messages.thread(model=MODEL, max_tokens=8)
    with thread.stream({"role": "user", "content": "Count to three."}) as stream:
        first = stream.get_final_message()
    with thread.stream({"role": "user", "content": "Go on."}) as stream:
        second = stream.get_final_message()
    assert wire.statuses == [200, 200]
    assert wire.threads() == [
        {"type": "create"},
        {"type": "continue", "previous_message_id": first.id},
    ]
    assert second.id != first.id and second.stop_reason in ("end_turn", "max_tokens")


def test_sdk_thread_carries_a_tool_result_alone(client: anthropic.Anthropic, wire: Wire) -> None:
    """The case that failed before threads: a continue holding only a tool_result."""
    thread = client.beta.messages.thread(
        model=MODEL,
        max_tokens=128,
        tools=[WEATHER],  # type: ignore[list-item]
        # One call: parallel ones from a random model run on to max_tokens.
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    call = thread.send({"role": "user", "content": "Weather in Paris?"})
    assert call.stop_reason == "tool_use"
    tool_use = next(block for block in call.content if block.type == "tool_use")
    answer = thread.send(
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "18C"}],
        },
        tool_choice={"type": "none"},
    )
    assert wire.statuses == [200, 200]
    continued = wire.sent[1]
    assert continued["thread"] == {"type": "continue", "previous_message_id": call.id}
    assert "tools" not in continued and len(continued["messages"]) == 1
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_an_unknown_previous_message_is_thread_not_found(tiny_daemon: Daemon) -> None:
    with tiny_daemon.http() as http:
        response = http.post(
            "/v1/messages",
            json={
                "model": MODEL,
                "max_tokens": 5,
                "messages": [USER],
                "thread": {"type": "continue", "previous_message_id": "msg_nope"},
            },
        )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "not_found_error"
    assert error["details"] == {"error_code": "thread_not_found"}
    assert "msg_nope" in error["message"]


def test_sdk_thread_replays_the_history_when_the_thread_is_lost(
    client: anthropic.Anthropic, wire: Wire, tiny_daemon: Daemon
) -> None:
    """A reply is continued once; a second continue from it gets thread_not_found,
    on which the SDK replays the full history under a new thread by itself."""
    thread = client.beta.messages.thread(model=MODEL, max_tokens=8)
    first = thread.send({"role": "user", "content": "One."})
    with tiny_daemon.http() as http:  # another client continues the same reply first
        taken = http.post(
            "/v1/messages",
            json={
                "model": MODEL,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "Elsewhere."}],
                "thread": {"type": "continue", "previous_message_id": first.id},
            },
        )
    assert taken.status_code == 200
    thread.send({"role": "user", "content": "Two."})
    assert wire.statuses == [200, 404, 200]
    assert wire.threads() == [
        {"type": "create"},
        {"type": "continue", "previous_message_id": first.id},
        {"type": "create"},
    ]
    assert [m["role"] for m in wire.sent[2]["messages"]] == ["user", "assistant", "user"]


def test_sdk_tool_runner_completes_over_a_thread(client: anthropic.Anthropic, wire: Wire) -> None:
    """`tool_runner` with its default options threads: the tool result goes out alone."""
    cities: list[str] = []

    def get_weather(city: str) -> str:
        cities.append(city)
        return "18C and sunny"

    tool = beta_tool(
        get_weather,
        name=WEATHER["name"],
        description=WEATHER["description"],
        input_schema=WEATHER["input_schema"],
    )
    runner = client.beta.messages.tool_runner(
        model=MODEL,
        max_tokens=128,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    replies = []
    for message in runner:
        replies.append(message)
        if len(replies) == 1:
            # The random model calls no tool by itself: only the first turn is
            # forced. Changing params hands the history over, reply included.
            runner.set_messages_params(
                lambda params, reply=message: {  # type: ignore[misc]
                    **params,
                    "messages": [
                        *params["messages"],
                        {"role": "assistant", "content": reply.content},
                    ],
                    "tool_choice": {"type": "none"},
                }
            )
    assert len(cities) == 1
    assert replies[0].stop_reason == "tool_use"
    assert replies[-1].stop_reason in ("end_turn", "max_tokens")
    assert wire.statuses == [200, 200]
    assert wire.threads() == [
        {"type": "create"},
        {"type": "continue", "previous_message_id": replies[0].id},
    ]
    result = wire.sent[1]["messages"]
    assert len(result) == 1 and result[0]["content"][0]["type"] == "tool_result"
