"""Small HTTP helpers shared by every resource: JSON out, bounded body in."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi
import msgspec

from pensieved.errors import RequestTooLarge

# The Anthropic API's own limit for a Messages request.
MAX_BODY_BYTES = 32 * 1024 * 1024


def json_response(resp: falcon.asgi.Response, payload: Any, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = msgspec.json.encode(payload)


async def read_body(req: falcon.asgi.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole request body, refused with 413 past `limit` (chunked bodies too)."""
    too_large = RequestTooLarge(f"request body exceeds the {limit // (1024 * 1024)} MB limit")
    if req.content_length is not None and req.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
