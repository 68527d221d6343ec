"""The events the engine sends back for a request, and the stream that carries them.

What the engine runs (`GenerationRequest`) is planned in conversation/plan.py.

The engine thread appends events; the asyncio side reads them in order. No
MLX object crosses this boundary: only token ids in, text and counts out.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass
from typing import Any, Protocol, cast


# Events the engine sends to a request's stream.
@dataclass(frozen=True)
class Admitted:
    """The request joined the batch; this much of its prompt came from the prompt cache."""

    cached_tokens: int


@dataclass(frozen=True)
class PromptProgress:
    processed: int
    total: int


@dataclass(frozen=True)
class TextDelta:
    text: str
    output_tokens: int  # generated so far, this delta's included


@dataclass(frozen=True)
class Finished:
    stop_reason: str  # end_turn | max_tokens | stop_sequence
    stop_sequence: str | None
    output_tokens: int
    # Prompt tokens that came from the prompt cache instead of prefill.
    cached_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    message: str
    error_type: str = "api_error"  # overloaded_error when the server is shutting down


SHUTTING_DOWN = Failed("the server is shutting down", "overloaded_error")


Event = Admitted | PromptProgress | TextDelta | Finished | Failed


class ClientGone(Exception):
    """The client disconnected while waiting for its generation."""


class StreamOwner(Protocol):
    """What runs a stream's request (the engine): told when its reader cancels."""

    def cancel_stream(self, stream: GenerationStream) -> None: ...


class GenerationStream:
    """The asyncio end of one request: events in order, and a way to cancel.

    The engine thread appends to a deque and wakes the event loop only while
    the reader sleeps on it: one loop wake-up per wait, not per event, and no
    tasks or `asyncio.wait` per token. The event loop shares the GIL with the
    engine thread, so every microsecond spent here is taken from decoding.
    """

    def __init__(self, owner: StreamOwner, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._loop = loop
        self._events: collections.deque[Event] = collections.deque()
        # Set by the reader just before it sleeps, cleared by whoever wakes
        # it. Under the GIL, the reader's check after setting it and the
        # engine's check after appending cannot both miss an event.
        self._sleeping = False
        # Napping: the reader holds off until a set time to gather text, and
        # only the end of the stream wakes it sooner.
        self._napping = False
        self._wakeup: asyncio.Future[None] | None = None
        self._gone: asyncio.Event | None = None
        self._gone_watch: asyncio.Future[Any] | None = None
        self.cancelled = threading.Event()
        self.done = False

    def deliver(self, event: Event) -> None:
        """Append `event` for the reader: the engine thread's one way in (tests: the loop's)."""
        self._events.append(event)
        if self._sleeping or (self._napping and isinstance(event, Finished | Failed)):
            self._sleeping = self._napping = False
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self, *_: object) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _watch(self, gone: asyncio.Event) -> None:
        """Wake the reader when `gone` is set (one watcher for the stream's life)."""
        if self._gone is not gone:
            self._stop_watching()
            self._gone = gone
            self._gone_watch = asyncio.ensure_future(gone.wait())
            self._gone_watch.add_done_callback(self._wake)

    async def next_event(
        self, gone: asyncio.Event, timeout: float | None = None, hold_until: float | None = None
    ) -> Event | None:
        """The next event; None when `timeout` passes first; `ClientGone` once `gone` is set.

        With `hold_until` (event-loop time), return nothing before then but
        the stream's end, so that the tokens made meanwhile go out together.
        """
        events = self._events
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        if hold_until is not None and not self._end_queued():
            if deadline is not None:
                hold_until = min(hold_until, deadline)
            if loop.time() < hold_until:
                if gone.is_set():
                    raise ClientGone
                self._watch(gone)
                await self._sleep(hold_until, nap=True)
        if not events:
            self._watch(gone)
            while not events:
                if gone.is_set():
                    raise ClientGone
                if deadline is not None and loop.time() >= deadline:
                    return None
                await self._sleep(deadline)
        event = events.popleft()
        if isinstance(event, Finished | Failed):
            self.done = True
            self._stop_watching()
        return event

    async def _sleep(self, deadline: float | None, nap: bool = False) -> None:
        """Until an event (only the last one when napping), the client leaving, or `deadline`."""
        wakeup = self._wakeup = self._loop.create_future()
        if nap:
            self._napping = True
        else:
            self._sleeping = True
        # What the engine appended before it could see us asleep.
        ready = self._end_queued() if nap else bool(self._events)
        if ready:
            self._sleeping = self._napping = False
            self._wakeup = None
            return
        timer = None if deadline is None else self._loop.call_at(deadline, self._wake)
        try:
            await wakeup
        finally:
            self._sleeping = self._napping = False
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _end_queued(self) -> bool:
        """The stream's last event is here (it is always the last in the queue)."""
        return bool(self._events) and isinstance(self._events[-1], Finished | Failed)

    def take_text(self) -> TextDelta | None:
        """The next event if it is already here and is text, without waiting."""
        events = self._events
        if events and isinstance(events[0], TextDelta):
            return cast(TextDelta, events.popleft())
        return None

    def _stop_watching(self) -> None:
        if self._gone_watch is not None and not self._gone_watch.done():
            self._gone_watch.cancel()

    def cancel(self) -> None:
        """Stop generating for this request (client gone). Safe to call twice."""
        self._stop_watching()
        if not self.done and not self.cancelled.is_set():
            self.cancelled.set()
            self._owner.cancel_stream(self)
