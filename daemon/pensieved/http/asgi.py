"""Small HTTP helpers shared by every resource: JSON out, bounded body in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import falcon
import falcon.asgi
import msgspec

from pensieved.http.admission import body_lease
from pensieved.http.work import RequestWork
from pensieved.memory.bodies import BODY_TIMEOUT
from pensieved.wire.errors import InvalidRequest, RequestTimeout, RequestTooLarge

P = ParamSpec("P")
T = TypeVar("T")

# The Anthropic API's own limit for a Messages request.
MAX_BODY_BYTES = 32 * 1024 * 1024
# An oversized body is read (and dropped) up to this size so that its 413 reaches the client.
DRAIN_BYTES = 4 * MAX_BODY_BYTES
# Bodies past this size are decoded on a worker thread: msgspec and the
# checks after it take about a millisecond per 64 KB, and the event loop
# serves every stream.
OFF_LOOP_BYTES = 64 * 1024


def json_response(resp: falcon.asgi.Response, payload: Any, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = msgspec.json.encode(payload)


async def read_body(req: falcon.asgi.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole request body, refused with 413 past `limit` (chunked bodies too).

    Admitted through the request's `BodyLease` (memory/bodies.py): counted,
    a large one waiting for its place, and all of it within the lease's
    deadline (not counting that wait), else 408.
    """
    content_type = (req.content_type or "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        # Also shuts out the form and text/plain posts a web page may send
        # without a CORS preflight.
        raise InvalidRequest(f"content-type must be application/json, not {content_type!r}")
    too_large = RequestTooLarge(f"request body exceeds the {limit // (1024 * 1024)} MB limit")
    if req.content_length is not None and req.content_length > DRAIN_BYTES:
        raise too_large  # past what is worth reading only to refuse it
    lease = body_lease(req)
    timeout = lease.timeout if lease is not None else BODY_TIMEOUT
    # A body to be refused as too large is read on and dropped, never kept.
    keep = req.content_length is None or req.content_length <= limit
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout) as deadline:

            async def admitted(expected: int) -> None:
                # A large body waits for its place unread; the wait is not the
                # sender's slowness, so the deadline stops meanwhile.
                if lease is None or not lease.needs_place(expected):
                    return
                when, started = deadline.when(), time.monotonic()
                deadline.reschedule(None)
                await lease.take_place()
                if when is not None:
                    deadline.reschedule(when + time.monotonic() - started)

            if keep and req.content_length is not None:
                await admitted(req.content_length)
            async for chunk in req.stream:
                size += len(chunk)
                if size > DRAIN_BYTES:
                    break
                if keep and size > limit:
                    # Past the limit the rest is read and dropped before
                    # answering: closing on a client that is still sending
                    # resets the connection, and the client then sees a
                    # broken pipe (and retries), not the 413.
                    keep = False
                    chunks.clear()
                    if lease is not None:
                        lease.release()
                if keep:
                    await admitted(size)  # a body of unknown size may turn out large
                    chunks.append(chunk)
                    if lease is not None:
                        lease.add(len(chunk))
    except TimeoutError:
        expected = "" if req.content_length is None else f" of {req.content_length}"
        raise RequestTimeout(
            f"request body not received within {timeout:g} s ({size}{expected} bytes came)",
            {"connection": "close"},
        ) from None
    if size > limit:
        raise too_large
    if req.content_length is not None and size < req.content_length:
        # The client stopped sending (or went away) mid-body.
        raise InvalidRequest(f"request body ended after {size} of {req.content_length} bytes")
    return b"".join(chunks)


def release_body(req: falcon.asgi.Request) -> None:
    """`req`'s body no longer counts against admission (its request reached the engine)."""
    lease = body_lease(req)
    if lease is not None:
        lease.release()


async def off_loop(
    work: RequestWork | None, size: int, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`function(*args)`: on `work`'s threads when its input of `size` bytes is large."""
    if work is None or size <= OFF_LOOP_BYTES:
        return function(*args, **kwargs)
    return await work.run(function, *args, **kwargs)


CONNECTION_KEY = "pensieve.connection"


class ClientConnection:
    """Tells a request when its client has gone away."""

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self.gone = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def watch(self) -> asyncio.Event:
        """Start watching (once the body has been read); returns the `gone` event."""
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())
        return self.gone

    async def _watch(self) -> None:
        # Skips a trailing empty body message Falcon did not need to read.
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def receive(self) -> dict[str, Any]:
        """What the app sees as `receive`: the real one until we watch, then our verdict."""
        if self._watcher is not None:
            await self.gone.wait()
            return {"type": "http.disconnect"}
        message: dict[str, Any] = await self._receive()
        if message["type"] == "http.disconnect":
            self.gone.set()
        return message

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


class DisconnectWatcher:
    """ASGI wrapper that lets a request notice its client going away.

    Falcon learns of a gone client only while it streams SSE, and a
    non-streamed request never does. Per the ASGI spec, `receive()` after the
    body blocks until `http.disconnect`, so one task awaiting it tells the
    request the moment the client leaves, and the engine drops the generation
    instead of computing for nobody.
    """

    def __init__(self, app: Any) -> None:
        self._app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        connection = ClientConnection(receive)
        scope[CONNECTION_KEY] = connection
        try:
            await self._app(scope, connection.receive, send)
        finally:
            connection.close()


def disconnected(req: falcon.asgi.Request) -> asyncio.Event:
    """An event set when the client of `req` goes away. Call after reading the body."""
    connection: ClientConnection = req.scope[CONNECTION_KEY]
    return connection.watch()
