"""Message threads: the conversation held between turns, so a turn sends only what is new.

The official TypeScript SDK's `toolRunner` threads by default (the
`message-threads-2026-08-12` beta): its first request carries
`thread: {"type": "create"}` and the full history; each later one
`{"type": "continue", "previous_message_id": <the last reply's id>}`, only the
new messages (the tool results), and no `system` or `tools` (the server keeps
those from the create). Pensieve keeps each thread's latest conversation here
and expands a `continue` into the full request before it is validated and
rendered, so the prompt is token for token the one a full-history request
gives, and the prompt cache serves it as usual.

Bounded in count, bytes and idle time, and held per token. A `continue` this
store cannot serve (an unknown, expired or evicted id, or another token's) is
a 404 with `error.details.error_code: "thread_not_found"`, on which the SDK
replays the full history under a new thread by itself; a conversation too big
to hold is a 400 `thread_unsupported_request`, on which `toolRunner` goes on
without a thread.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
from falcon.asgi import SSEvent

from pensieved.http.asgi import off_loop
from pensieved.http.work import RequestWork
from pensieved.wire.decode import decode_as
from pensieved.wire.errors import InvalidRequest, NotFound, shown

log = logging.getLogger(__name__)

MAX_THREADS = 512
MAX_BYTES = 64 * 1024**2  # all threads together
MAX_THREAD_BYTES = 16 * 1024**2  # one conversation: half the 32 MB request limit
IDLE_SECONDS = 3600.0

# Fields the thread keeps from its create; a `continue` leaves them out.
_KEPT = ("system", "tools")


class ThreadNotFound(NotFound):
    details: ClassVar[dict[str, Any] | None] = {"error_code": "thread_not_found"}


class ThreadUnsupported(InvalidRequest):
    details: ClassVar[dict[str, Any] | None] = {"error_code": "thread_unsupported_request"}


class ThreadFingerprintMismatch(InvalidRequest):
    details: ClassVar[dict[str, Any] | None] = {"error_code": "thread_fingerprint_mismatch"}


@dataclass(frozen=True)
class ThreadTurn:
    """One threaded request: whose it is, what it continues, and the full conversation sent."""

    owner: str
    previous_message_id: str | None
    # `system`, `tools` and `messages`, each message as JSON text (`msgspec.Raw`)
    conversation: dict[str, Any]


@dataclass
class _Held:
    owner: str
    conversation: bytes  # JSON of the conversation including the reply
    expires: float


class ThreadStore:
    """Each thread's latest conversation, by the id of its latest reply."""

    def __init__(
        self,
        *,
        max_threads: int = MAX_THREADS,
        max_bytes: int = MAX_BYTES,
        max_thread_bytes: int = MAX_THREAD_BYTES,
        idle_seconds: float = IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._held: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._max_threads = max_threads
        self._max_bytes = max_bytes
        self._max_thread_bytes = min(max_thread_bytes, max_bytes)
        self._idle = idle_seconds
        self._clock = clock

    def __len__(self) -> int:
        self._expire()
        return len(self._held)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def expand(self, body: bytes, credential: str) -> tuple[bytes, ThreadTurn | None]:
        """The request body with a `continue` expanded to the full conversation, and its turn.

        A body without a well-formed `thread` comes back as it is, for the
        request decoder to accept or refuse with its usual words.
        """
        parsed = _parse(body)
        if parsed is None:
            return body, None
        owner, held = self._take(parsed, credential)
        if owner is None:
            return body, None
        if held is None:
            return body, ThreadTurn(owner, None, _conversation(parsed.fields, parsed.messages))
        expanded, conversation = _continued(parsed, held)
        return expanded, ThreadTurn(owner, parsed.previous, conversation)

    async def expand_on(
        self, work: RequestWork, body: bytes, credential: str
    ) -> tuple[bytes, ThreadTurn | None]:
        """`expand`, decoding and encoding a large body on `work`'s threads, off the event loop.

        Only the store itself is read on the loop; the rest touches no shared state.
        """
        if b'"thread"' not in body:
            return body, None
        parsed = await off_loop(work, len(body), _parse, body)
        if parsed is None:
            return body, None
        owner, held = self._take(parsed, credential)
        if owner is None:
            return body, None
        if held is None:
            return body, ThreadTurn(owner, None, _conversation(parsed.fields, parsed.messages))
        expanded, conversation = await off_loop(
            work, len(body) + len(held), _continued, parsed, held
        )
        return expanded, ThreadTurn(owner, parsed.previous, conversation)

    def _take(self, parsed: _Parsed, credential: str) -> tuple[str | None, bytes | None]:
        """Whose thread `parsed` starts or continues (None: neither), and what it continues."""
        owner = hashlib.sha256(credential.encode()).hexdigest()
        if parsed.kind == "create":
            if parsed.size > self._max_thread_bytes:
                raise ThreadUnsupported(
                    f"this conversation ({parsed.size} bytes) is larger than a thread may hold "
                    f"here ({self._max_thread_bytes} bytes); send it without `thread`"
                )
            return owner, None
        if parsed.kind != "continue" or parsed.previous is None:
            return None, None
        return owner, self._lookup(parsed.previous, owner).conversation

    def record(
        self, turn: ThreadTurn | None, message_id: str, content: list[dict[str, Any]]
    ) -> None:
        """Hold `turn`'s conversation and its reply under the reply's id."""
        if turn is None:
            return
        if turn.previous_message_id is not None:
            # Each reply is continued once: the thread moves on to this one.
            self._drop(turn.previous_message_id)
        reply = {"role": "assistant", "content": content}
        conversation = {**turn.conversation, "messages": [*turn.conversation["messages"], reply]}
        encoded = msgspec.json.encode(conversation)
        if len(encoded) > self._max_thread_bytes:
            # The next `continue` gets thread_not_found; the SDK replays, and the
            # create that replay sends is refused as too big, so it goes unthreaded.
            log.info("thread of %s not held: %d bytes", message_id, len(encoded))
            return
        self._held[message_id] = _Held(turn.owner, encoded, self._clock() + self._idle)
        self._bytes += len(encoded)
        while len(self._held) > self._max_threads or self._bytes > self._max_bytes:
            self._drop(next(iter(self._held)))
        self._expire()

    async def recording(
        self,
        turn: ThreadTurn,
        events: AsyncIterator[SSEvent],
        message_id: str,
        content: Callable[[], list[dict[str, Any]]],
    ) -> AsyncIterator[SSEvent]:
        """`events`, holding the thread once the reply is complete.

        Held before `message_stop` goes out: the SDK sends the next turn as
        soon as it reads it. A stream that ends early holds nothing, as the
        SDK then starts a new thread.
        """
        try:
            async for event in events:
                if event.event == "message_stop":
                    self.record(turn, message_id, content())
                yield event
        finally:
            # Closing the inner generator runs its cleanup now (a gone client frees its slot).
            if isinstance(events, AsyncGenerator):
                await events.aclose()

    def _lookup(self, message_id: str, owner: str) -> _Held:
        self._expire()
        held = self._held.get(message_id)
        if held is None or held.owner != owner:
            raise ThreadNotFound(
                f"thread: no usable thread state was found for previous_message_id "
                f"{shown(message_id)!r}; replay the full conversation with "
                '`thread: {"type": "create"}` to start a new thread'
            )
        held.expires = self._clock() + self._idle
        self._held.move_to_end(message_id)
        return held

    def _drop(self, message_id: str) -> None:
        held = self._held.pop(message_id, None)
        if held is not None:
            self._bytes -= len(held.conversation)

    def _expire(self) -> None:
        # Least recently used first, and every use sets the same idle time: the
        # expired ones are at the front.
        now = self._clock()
        while self._held:
            message_id, held = next(iter(self._held.items()))
            if held.expires > now:
                break
            self._drop(message_id)


@dataclass(frozen=True)
class _Parsed:
    """A threaded request, taken apart only to its top-level fields and messages."""

    kind: str | None  # "create", "continue", or what the client sent
    previous: str | None
    fields: dict[str, msgspec.Raw]
    messages: list[msgspec.Raw]
    size: int


class _Thread(msgspec.Struct):
    type: str | None = None
    previous_message_id: str | None = None


def _parse(body: bytes) -> _Parsed | None:
    """`body`'s thread, fields and messages, or None where it has no well-formed `thread`.

    Each message and field stays JSON text: a body of `{}`s decoded into
    Python objects would take 24 times its size.
    """
    if b'"thread"' not in body:  # the common case costs one scan
        return None
    fields = decode_as(body, dict[str, msgspec.Raw])
    if fields is None:
        return None
    thread = decode_as(fields.get("thread"), _Thread)
    messages = decode_as(fields.get("messages"), list[msgspec.Raw])
    if thread is None or messages is None:
        return None
    return _Parsed(thread.type, thread.previous_message_id, fields, messages, len(body))


def _continued(parsed: _Parsed, held: bytes) -> tuple[bytes, dict[str, Any]]:
    """The body of a `continue` with the held conversation before its messages, and that."""
    stored = decode_as(held, dict[str, msgspec.Raw]) or {}
    fields = dict(parsed.fields)
    for field in _KEPT:
        # The SDK leaves these out; a client that repeats them must repeat them unchanged.
        sent, kept = fields.get(field), stored.get(field)
        if _present(sent) and (not _present(kept) or _value(sent) != _value(kept)):
            raise ThreadFingerprintMismatch(
                f"thread: `{field}` differs from the value stored with the thread of "
                f"{parsed.previous!r}; send the stored value, or replay the full conversation "
                'with `thread: {"type": "create"}` to change it'
            )
        if kept is not None and _present(kept):
            fields[field] = kept
    messages = (decode_as(stored.get("messages"), list[msgspec.Raw]) or []) + parsed.messages
    fields["messages"] = msgspec.Raw(msgspec.json.encode(messages))
    return msgspec.json.encode(fields), _conversation(fields, messages)


def _value(raw: msgspec.Raw | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


def _present(value: msgspec.Raw | None) -> bool:
    return value is not None and bool(value) and not (len(value) == 4 and bytes(value) == b"null")


def _conversation(fields: dict[str, msgspec.Raw], messages: list[Any]) -> dict[str, Any]:
    kept = {field: fields[field] for field in _KEPT if _present(fields.get(field))}
    return {**kept, "messages": messages}
