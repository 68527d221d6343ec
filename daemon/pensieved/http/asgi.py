"""Small HTTP helpers shared by every resource: JSON out, bounded body in."""

from __future__ import annotations

import asyncio
from typing import Any

import falcon
import falcon.asgi
import msgspec

from pensieved.wire.errors import InvalidRequest, RequestTooLarge

# The Anthropic API's own limit for a Messages request.
MAX_BODY_BYTES = 32 * 1024 * 1024
# An oversized body is read (and dropped) up to this size so that its 413 reaches the client.
DRAIN_BYTES = 4 * MAX_BODY_BYTES


def json_response(resp: falcon.asgi.Response, payload: Any, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = msgspec.json.encode(payload)


async def read_body(req: falcon.asgi.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole request body, refused with 413 past `limit` (chunked bodies too)."""
    content_type = (req.content_type or "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        # Also shuts out the form and text/plain posts a web page may send
        # without a CORS preflight.
        raise InvalidRequest(f"content-type must be application/json, not {content_type!r}")
    too_large = RequestTooLarge(f"request body exceeds the {limit // (1024 * 1024)} MB limit")
    if req.content_length is not None and req.content_length > DRAIN_BYTES:
        raise too_large  # past what is worth reading only to refuse it
    chunks: list[bytes] = []
    size = 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > DRAIN_BYTES:
            break
        if size <= limit:
            chunks.append(chunk)
        # Past the limit the rest is read and dropped before answering:
        # closing on a client that is still sending resets the connection,
        # and the client then sees a broken pipe (and retries), not the 413.
    if size > limit:
        raise too_large
    if req.content_length is not None and size < req.content_length:
        # The client stopped sending (or went away) mid-body.
        raise InvalidRequest(f"request body ended after {size} of {req.content_length} bytes")
    return b"".join(chunks)


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
