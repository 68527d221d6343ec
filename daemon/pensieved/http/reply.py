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
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from pensieved.conversation.content import BlockEvent, ContentAssembler
from pensieved.engine.stream import (
    Admitted,
    ClientGone,
    Failed,
    Finished,
    GenerationStream,
    TextDelta,
)
from pensieved.http.metrics import Metrics
from pensieved.wire import responses
from pensieved.wire.errors import EngineFailure, Overloaded

log = logging.getLogger(__name__)

# Thinking signatures let us tell our own reasoning from edited text; the key
# lives as long as the process, as the reasoning is not replayed anyway.
_SIGNING_KEY = secrets.token_bytes(32)


def sign_thinking(thinking: str) -> str:
    digest = hmac.new(_SIGNING_KEY, thinking.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class Reply:
    def __init__(
        self,
        stream: GenerationStream,
        assembler: ContentAssembler,
        *,
        request_id: str = "-",
        prompt_tokens: int = 0,
        metrics: Metrics | None = None,
        coalesce: float = 0.0,
        thinking_end: str | None = None,
    ) -> None:
        self._coalesce = coalesce
        # The marker that closes reasoning, and the output token count at
        # the delta that carried it (None until then).
        self._thinking_end = thinking_end
        self._thinking_ended_at: int | None = None
        self._recent = ""  # the last text seen, to find a marker split across deltas
        self.stream = stream
        self.assembler = assembler
        self._request_id = request_id
        self._prompt_tokens = prompt_tokens
        self._metrics = metrics
        self._started = time.perf_counter()
        self._first_token: float | None = None
        self._cached = 0

    def thinking_tokens(self, output_tokens: int) -> int:
        """How many of the output tokens were reasoning, its closing marker included.

        Counted as generated: up to the token that closed the reasoning, or
        all of them if it never closed.
        """
        if not any(block["type"] == "thinking" for block in self.assembler.blocks):
            return 0
        if self._thinking_ended_at is None:
            return output_tokens
        return min(self._thinking_ended_at, output_tokens)

    def _watch_thinking(self, delta: TextDelta) -> None:
        marker = self._thinking_end
        if marker is None or self._thinking_ended_at is not None:
            return
        # Reasoning comes first, so the first marker is the one that closes it.
        seen = self._recent + delta.text
        if marker in seen:
            self._thinking_ended_at = delta.output_tokens
        self._recent = seen[-(len(marker) - 1) :] if len(marker) > 1 else ""

    def usage(self, event: Finished) -> dict[str, Any]:
        """The finished message's `usage`."""
        return responses.usage(
            self._prompt_tokens - event.cached_tokens,
            event.output_tokens,
            event.cached_tokens,
            self.thinking_tokens(event.output_tokens),
        )

    def delta_usage(self, event: Finished) -> dict[str, Any]:
        """The closing `message_delta`'s `usage` of a stream."""
        return responses.delta_usage(
            self._prompt_tokens - event.cached_tokens,
            event.output_tokens,
            event.cached_tokens,
            self.thinking_tokens(event.output_tokens),
        )

    def _finished(self, event: Finished) -> None:
        """One log line and the metrics for a finished message."""
        now = time.perf_counter()
        ttft = None if self._first_token is None else self._first_token - self._started
        rate = None
        if self._first_token is not None and event.output_tokens > 1 and now > self._first_token:
            rate = (event.output_tokens - 1) / (now - self._first_token)
        prefilled = self._prompt_tokens - event.cached_tokens
        log.info(
            "%s done: %s in=%d cached=%d out=%d ttft=%s rate=%s",
            self._request_id,
            event.stop_reason,
            prefilled,
            event.cached_tokens,
            event.output_tokens,
            "-" if ttft is None else f"{ttft * 1000:.0f}ms",
            "-" if rate is None else f"{rate:.1f}tok/s",
        )
        if self._metrics is not None:
            self._metrics.observe_reply(
                prefilled, event.cached_tokens, event.output_tokens, ttft, rate
            )

    async def finished(self, gone: asyncio.Event) -> Finished | None:
        """Run a reply that is not streamed to its end; None when the client left first.

        A failure is raised as the API error it is: 529 for an overload, 500 otherwise.
        """
        try:
            async for event in self.events(gone):
                if isinstance(event, Finished):
                    return event
                if isinstance(event, Failed):
                    if event.error_type == Overloaded.error_type:
                        raise Overloaded(event.message)
                    raise EngineFailure(event.message)
        except ClientGone:
            log.info("%s client disconnected; generation dropped", self._request_id)
            return None
        finally:
            self.stream.cancel()
        raise AssertionError("a reply's events ended without Finished or Failed")

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
        # Text is sent at most every `coalesce` seconds: a small model makes
        # a token every few milliseconds, and an SSE event for each would
        # cost the decoding thread its share of the GIL.
        hold_until = None
        while True:
            wait = None if idle is None else max(0.0, last + idle - clock())
            event = await self.stream.next_event(gone, timeout=wait, hold_until=hold_until)
            if event is None:
                last = clock()
                yield None
            elif isinstance(event, Admitted):
                self._cached = event.cached_tokens
            elif isinstance(event, TextDelta):
                if self._first_token is None:
                    self._first_token = time.perf_counter()
                text = event.text
                self._watch_thinking(event)
                # Tokens that came while we were busy go out as one delta
                # (as Anthropic's own deltas hold several tokens).
                while (more := self.stream.take_text()) is not None:
                    text += more.text
                    event = more
                    self._watch_thinking(event)
                sent = False
                for block_event in assembler.feed(text):
                    last = clock()
                    sent = True
                    yield block_event
                if sent and self._coalesce:
                    hold_until = last + self._coalesce
                if assembler.done:
                    # The one call allowed is complete: stop generating.
                    self.stream.cancel()
                    for block_event in assembler.finish():
                        yield block_event
                    finished = Finished("tool_use", None, event.output_tokens, self._cached)
                    self._finished(finished)
                    yield finished
                    return
            elif isinstance(event, Finished):
                for block_event in assembler.finish():
                    yield block_event
                ended = event.stop_reason == "end_turn"
                if assembler.calls and ended and not assembler.cut_short:
                    event = replace(event, stop_reason="tool_use")
                self._finished(event)
                yield event
                return
            elif isinstance(event, Failed):
                yield event
                return
