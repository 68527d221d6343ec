"""The Messages API against a real daemon, driven by the official SDK."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from falcon.asgi import SSEvent

from pensieved.conversation.content import ContentAssembler
from pensieved.engine.core import Engine
from pensieved.engine.stream import Finished, GenerationStream, PromptProgress, TextDelta
from pensieved.http.reply import Reply
from pensieved.http.sse import message_events
from tests.conftest import TINY_CONTEXT
from tests.daemon import Daemon, sse_events, stream_started

QUESTION = [{"role": "user", "content": "Tell me about the sea."}]
# anthropic 2.x passes sampling settings through extra_body.
GREEDY = {"temperature": 0.0}


def test_create_returns_a_full_message(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    message = client.messages.create(model="claude-opus-4-8", max_tokens=8, messages=QUESTION)
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "tiny"  # names the local model, not the client's alias
    assert message.stop_reason in {"max_tokens", "end_turn"}
    assert message.content and message.content[0].type == "text"
    assert message.usage.output_tokens <= 8
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == 8
    assert message.usage.service_tier == "standard"
    counted = client.messages.count_tokens(model="claude-opus-4-8", messages=QUESTION)
    # input_tokens excludes what the prompt cache served, as Anthropic counts.
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted.input_tokens > 5


def test_stream_accumulates_to_the_final_message(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    with client.messages.stream(
        model="claude-opus-4-8", max_tokens=12, messages=QUESTION, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.usage.output_tokens == 12
    assert final.stop_reason == "max_tokens"
    # Greedy decoding gives the same text streamed or not.
    plain = client.messages.create(
        model="claude-opus-4-8", max_tokens=12, messages=QUESTION, extra_body=GREEDY
    )
    assert plain.content[0].text == text


def test_stream_event_sequence_is_exact(tiny_daemon: Daemon) -> None:
    body = {"model": "claude-opus-4-8", "max_tokens": 5, "stream": True, "messages": QUESTION}
    with (
        tiny_daemon.http() as http,
        http.stream("POST", "/v1/messages?beta=true", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["request-id"].startswith("req_")
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[2] == "content_block_start"
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for name, data in events:
        assert json.loads(data)["type"] == name
    start = json.loads(events[0][1])["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    delta = json.loads(events[-2][1])
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 5


def text_events(
    stream: GenerationStream, *, ping_interval: float, coalesce: float = 0.0
) -> AsyncIterator[SSEvent]:
    """The SSE events of a plain-text reply read from `stream`."""
    return message_events(
        Reply(stream, ContentAssembler(tool_format=None, tools=[]), coalesce=coalesce),
        message_id="msg_1",
        model="tiny",
        input_tokens=20480,
        ping_interval=ping_interval,
        request_id="req_1",
        gone=asyncio.Event(),
    )


def test_pings_keep_coming_while_prefill_progresses(tmp_path) -> None:
    """Progress events from a long prefill write nothing, so they must not delay pings."""

    async def scenario() -> list[str]:
        stream = GenerationStream(Engine(tmp_path), asyncio.get_running_loop())

        async def engine_side() -> None:
            for chunk in range(40):  # 40 chunks, 10 ms apart: 0.4 s of prefill
                stream.deliver(PromptProgress(chunk * 512, 40 * 512))
                await asyncio.sleep(0.01)
            stream.deliver(Finished("end_turn", None, 0))

        feeder = asyncio.ensure_future(engine_side())
        events = text_events(stream, ping_interval=0.05)
        names = [event.event async for event in events]
        await feeder
        return [name or "" for name in names]

    names = asyncio.run(scenario())
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    assert names.count("ping") >= 5  # one right away, then about every 50 ms


def test_text_is_gathered_between_sends_and_the_end_comes_at_once(tmp_path) -> None:
    """Tokens made while a stream holds off go out as one delta; the end never waits."""
    words = [f"w{i} " for i in range(40)]

    async def scenario() -> tuple[list[str], float]:
        stream = GenerationStream(Engine(tmp_path), asyncio.get_running_loop())

        def engine_thread() -> None:  # as the engine delivers: from another thread
            for count, word in enumerate(words, 1):
                stream.deliver(TextDelta(word, count))
                time.sleep(0.002)
            stream.deliver(Finished("end_turn", None, len(words)))

        # A hold far longer than the test may take: only the end can wake it.
        events = text_events(stream, ping_interval=60.0, coalesce=60.0)
        started = time.monotonic()
        threading.Thread(target=engine_thread).start()
        texts = [
            json.loads(event.data)["delta"]["text"]
            async for event in events
            if event.event == "content_block_delta"
        ]
        return texts, time.monotonic() - started

    texts, seconds = asyncio.run(scenario())
    # The first word at once (unless the reader was slower than it), the rest
    # together when the stream ended.
    assert len(texts) <= 2 and "".join(texts) == "".join(words)
    assert seconds < 30


def test_system_prompt_forms_and_inline_system_turns(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()

    def count(**kwargs: object) -> int:
        return client.messages.count_tokens(model="x", **kwargs).input_tokens  # type: ignore[arg-type]

    as_string = count(system="Be brief.", messages=QUESTION)
    as_blocks = count(
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=QUESTION,
    )
    assert as_string == as_blocks
    assert count(system="Be brief. Answer in French.", messages=QUESTION) > as_string
    inline = count(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "system", "content": "The user is in Paris."},  # type: ignore[list-item]
            {"role": "user", "content": "Weather?"},
        ]
    )
    assert inline > count(
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Weather?"},
        ]
    )


def test_consecutive_same_role_turns_merge(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    split = client.messages.count_tokens(
        model="tiny",
        messages=[
            {"role": "user", "content": "First part."},
            {"role": "user", "content": [{"type": "text", "text": "Second part."}]},
        ],
    )
    merged = client.messages.count_tokens(
        model="tiny", messages=[{"role": "user", "content": "First part.\n\nSecond part."}]
    )
    assert split.input_tokens == merged.input_tokens


def test_stop_sequences(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    free = client.messages.create(model="tiny", max_tokens=30, messages=QUESTION, extra_body=GREEDY)
    text = free.content[0].text
    stop = next(
        text[i : i + 3]
        for i in range(4, len(text) - 3)
        if text[i : i + 3].strip() == text[i : i + 3]
    )
    stopped = client.messages.create(
        model="tiny",
        max_tokens=30,
        messages=QUESTION,
        extra_body=GREEDY,
        stop_sequences=[stop, "zzzz"],
    )
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]
    with client.messages.stream(
        model="tiny", max_tokens=30, messages=QUESTION, extra_body=GREEDY, stop_sequences=[stop]
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text[: text.index(stop)]
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_max_tokens_is_clamped_to_the_context_never_rejected(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    # Claude Code streams with max_tokens 64000; the SDK insists on streaming there.
    with client.messages.stream(model="tiny", max_tokens=64000, messages=QUESTION) as stream:
        message = stream.get_final_message()
    prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert message.usage.output_tokens <= TINY_CONTEXT - prompt
    # Running out of the clamped budget means the context window ended.
    assert message.stop_reason in {"end_turn", "model_context_window_exceeded"}
    if message.stop_reason == "model_context_window_exceeded":
        assert message.usage.output_tokens == TINY_CONTEXT - prompt
    small = client.messages.create(model="tiny", max_tokens=2, messages=QUESTION)
    assert small.stop_reason in {"end_turn", "max_tokens"}


def test_sampling_fields_and_unknown_fields_are_accepted(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    message = client.messages.create(
        model="claude-opus-4-8",
        max_tokens=4,
        messages=QUESTION,
        metadata={"user_id": "someone"},
        thinking={"type": "adaptive"},
        # The current SDK passes these through extra_body; older clients as fields.
        extra_body={
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "context_management": {"edits": []},
            "output_config": {"effort": "high"},
            "speed": "standard",
            "some_future_field": {"nested": [1, 2]},
        },
    )
    assert message.usage.output_tokens >= 1


def test_any_top_k_is_accepted_and_sampling_keeps_working(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    for top_k in (1, 49151, 49152, 10**12):
        message = client.messages.create(
            model="tiny", max_tokens=3, messages=QUESTION, extra_body={"top_k": top_k}
        )
        assert message.usage.output_tokens >= 1
    sampled = client.messages.create(
        model="tiny", max_tokens=3, messages=QUESTION, extra_body={"temperature": 1.0}
    )
    assert sampled.usage.output_tokens >= 1


def test_assistant_prefill_is_continued(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    message = client.messages.create(
        model="tiny",
        max_tokens=4,
        messages=[*QUESTION, {"role": "assistant", "content": "The sea is"}],
    )
    assert message.role == "assistant"
    assert message.usage.output_tokens >= 1


def test_beta_messages_route(tiny_daemon: Daemon) -> None:
    message = tiny_daemon.client().beta.messages.create(
        model="claude-opus-4-8", max_tokens=3, messages=QUESTION, betas=["some-beta-2025-01-01"]
    )
    assert message.model == "tiny"


def test_probe_and_health_need_no_token(tiny_daemon: Daemon) -> None:
    assert httpx.head(f"{tiny_daemon.base_url}/").status_code == 200
    assert httpx.get(f"{tiny_daemon.base_url}/").status_code == 401
    with tiny_daemon.http() as http:
        assert http.get("/").json()["name"] == "pensieve"
    health = tiny_daemon.health()
    assert health["status"] == "ok"
    assert health["model"] == "tiny"
    tiny = next(m for m in health["models"] if m["name"] == "tiny")
    assert tiny["loaded"] is True  # warm before the first request
    assert health["memory"]["rss_gb"] > 0
    assert health["uptime_s"] >= 0


def wait_until_idle(daemon: Daemon, seconds: float = 3.0) -> int:
    deadline = time.monotonic() + seconds
    while True:
        active: int = daemon.health()["requests"]["active"]
        if active == 0 or time.monotonic() > deadline:
            return active
        time.sleep(0.05)


def test_disconnect_of_a_non_streaming_client_frees_the_slot(tiny_daemon: Daemon) -> None:
    # Greedy: sampled, the random model may end early with its end token.
    body = {"model": "long-x", "max_tokens": 4000, "messages": QUESTION, "temperature": 0.0}
    with tiny_daemon.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/messages", json=body, timeout=1.0)
    assert wait_until_idle(tiny_daemon) == 0
    assert "client disconnected; generation dropped" in tiny_daemon.log()


def test_disconnect_frees_the_slot_at_once(tiny_daemon: Daemon) -> None:
    body = {
        "model": "long-x",
        "max_tokens": 4000,  # far more than can be decoded in the 3 s waited below
        "stream": True,
        "messages": QUESTION,
        "temperature": 0.0,  # sampled, the random model may end early
    }
    with stream_started(tiny_daemon, body):
        pass
    # The connection is closed: the engine must drop the request promptly.
    assert wait_until_idle(tiny_daemon) == 0
    assert "client disconnected mid-stream" in tiny_daemon.log()
