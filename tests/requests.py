"""A request body as the daemon reads it: from JSON bytes, as wire/decode.py decodes them.

Not `msgspec.convert` from Python objects: fields the daemon keeps as JSON
text (`msgspec.Raw`, such as an image's source) come only from bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pensieved.wire.protocol import MessagesRequest


def request_of(body: dict[str, Any]) -> MessagesRequest:
    return msgspec.json.decode(msgspec.json.encode(body), type=MessagesRequest)
