"""The Anthropic streaming event sequence: the one place that writes SSE.

message_start → ping → (content_block_start → content_block_delta* →
content_block_stop) → message_delta → message_stop, with `ping` while the
engine is still busy (long prefill), and `event: error` for a failure after
the 200 has been sent (never followed by `message_stop`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from falcon.asgi import SSEvent

from pensieved.engine.stream import ClientGone, Finished
from pensieved.http.reply import Reply
from pensieved.wire import responses
from pensieved.wire.errors import ApiError, error_body

log = logging.getLogger(__name__)


def sse_event(name: str, payload: dict[str, Any]) -> SSEvent:
    return SSEvent(event=name, data=msgspec.json.encode(payload))


PING = {"type": "ping"}


async def message_events(
    reply: Reply,
    *,
    message_id: str,
    model: str,
    input_tokens: int,
    cached_estimate: int = 0,
    ping_interval: float,
    request_id: str,
    gone: asyncio.Event,
) -> AsyncIterator[SSEvent]:
    """Translate a reply's events into Anthropic SSE events for one message."""
    completed = False
    try:
        usage = responses.usage(input_tokens - cached_estimate, 0, cached_estimate)
        start = responses.message(message_id, model, [], None, None, usage)
        yield sse_event("message_start", {"type": "message_start", "message": start})
        yield sse_event("ping", PING)
        # A ping goes out when nothing was written for a whole interval;
        # prefill progress writes nothing, so it does not count.
        async for event in reply.events(gone, idle=ping_interval):
            if event is None:
                yield sse_event("ping", PING)
            elif isinstance(event, tuple):
                yield sse_event(*event)
            elif isinstance(event, Finished):
                delta = {
                    "stop_reason": event.stop_reason,
                    "stop_sequence": event.stop_sequence,
                    "stop_details": None,
                    "container": None,
                }
                payload = {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": reply.delta_usage(event),
                    # Required by the beta event (`?beta=true`); the other allows it.
                    "context_management": None,
                }
                yield sse_event("message_delta", payload)
                yield sse_event("message_stop", {"type": "message_stop"})
                completed = True
            else:
                yield sse_event("error", error_body(event.error_type, event.message, request_id))
                completed = True
    except ClientGone:
        pass  # noticed by our watcher; Falcon may notice first (GeneratorExit)
    finally:
        if not completed:
            log.info("%s client disconnected mid-stream", request_id)
        # Runs however the stream ends: a gone client frees its slot at once.
        reply.stream.cancel()


async def events_when_ready(
    starting: asyncio.Future[AsyncIterator[SSEvent]], *, ping_interval: float, request_id: str
) -> AsyncIterator[SSEvent]:
    """Pings until `starting` (loading a cold model, then submitting) is done; then its events.

    SDKs skip pings wherever they come, so a stream may open with them. A
    failure while starting becomes an `error` event, as the 200 is sent.
    """
    try:
        while not starting.done():
            await asyncio.wait({starting}, timeout=ping_interval)
            if not starting.done():
                yield sse_event("ping", PING)
        try:
            events = starting.result()
        except ApiError as exc:
            yield sse_event("error", error_body(exc.error_type, exc.message, request_id))
            return
        except Exception:
            log.exception("%s starting a stream failed", request_id)
            yield sse_event("error", error_body("api_error", "internal server error", request_id))
            return
        async for event in events:
            yield event
    finally:
        if not starting.done():
            starting.cancel()  # the client left while the model loaded
