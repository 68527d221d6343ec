"""One reply in the making: engine events in, content-block events out.

Streams and whole responses read the same sequence from `Reply.events`:
block events as the text is split into blocks, `None` when nothing happened
for a while (a stream sends a `ping`), and last the `Finished` or `Failed`
that ends it, with the stop reason the content implies (`tool_use` when the
turn ended with calls).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

from pensieved.content import BlockEvent, ContentAssembler
from pensieved.engine import Failed, Finished, GenerationStream, TextDelta

# Thinking signatures let us tell our own reasoning from edited text; the key
# lives as long as the process, as the reasoning is not replayed anyway.
_SIGNING_KEY = secrets.token_bytes(32)


def sign_thinking(thinking: str) -> str:
    digest = hmac.new(_SIGNING_KEY, thinking.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class Reply:
    def __init__(self, stream: GenerationStream, assembler: ContentAssembler) -> None:
        self.stream = stream
        self.assembler = assembler

    async def events(
        self, gone: asyncio.Event, idle: float | None = None
    ) -> AsyncIterator[BlockEvent | Finished | Failed | None]:
        """Block events, `None` after `idle` seconds without any, then the end.

        Raises `ClientGone` when `gone` is set.
        """
        assembler = self.assembler
        clock = asyncio.get_running_loop().time
        # Idle time counts from the last thing yielded: prefill progress
        # events yield nothing, so they must not reset it.
        last = clock()
        while True:
            wait = None if idle is None else max(0.0, last + idle - clock())
            event = await self.stream.next_event(gone, timeout=wait)
            if event is None:
                last = clock()
                yield None
            elif isinstance(event, TextDelta):
                for block_event in assembler.feed(event.text):
                    last = clock()
                    yield block_event
                if assembler.done:
                    # The one call allowed is complete: stop generating.
                    self.stream.cancel()
                    for block_event in assembler.finish():
                        yield block_event
                    yield Finished("tool_use", None, event.output_tokens)
                    return
            elif isinstance(event, Finished):
                for block_event in assembler.finish():
                    yield block_event
                ended = event.stop_reason == "end_turn"
                if assembler.calls and ended and not assembler.cut_short:
                    event = replace(event, stop_reason="tool_use")
                yield event
                return
            elif isinstance(event, Failed):
                yield event
                return
