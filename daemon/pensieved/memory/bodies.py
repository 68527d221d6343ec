"""Request bodies in memory before their requests reach the engine: counted, large ones few.

A body is memory from its first byte until its request reaches the engine
(decoded, rendered, planned), and up to `max_connections` are read at once.
Their bytes are counted against the reject line, and bodies over
`LARGE_BODY_BYTES` take one of `LARGE_BODIES` places for that time: the rest
wait, unread. Each is read within `[server] body_timeout`, not counting that
wait. http/admission.py gives each request its lease; http/asgi.py reads
the body through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pensieved.memory.guard import MemoryGuard
from pensieved.memory.levels import RETRY_AFTER_LOW_MEMORY
from pensieved.paths import GB
from pensieved.wire.errors import Overloaded

# Bodies past this size are read and prepared a few at a time. Claude Code's
# turns are 80 KB to a few MB (with screenshots); 64 bodies of 24 MB read at
# once took 1.3 GB before any check (security review #5).
LARGE_BODY_BYTES = 1024 * 1024
LARGE_BODIES = 2
# What a body's bytes take once decoded and rendered, for the memory check:
# fields nothing reads stay JSON text (wire/protocol.py); text and tool
# inputs become strings and small objects, then prompt text and tokens.
BODY_EXPANSION = 4
# Seconds a client has to send a whole body (`[server] body_timeout`).
BODY_TIMEOUT = 60.0


class BodyLease:
    """One request's body in `BodyAdmission`: its bytes, and a large body's place."""

    def __init__(self, owner: BodyAdmission, timeout: float) -> None:
        self._owner = owner
        self.timeout = timeout  # seconds to read the whole body
        self.nbytes = 0
        self._place = False

    def needs_place(self, size: int) -> bool:
        """Whether a body of `size` bytes must wait for a large body's place it has not got."""
        return not self._place and size > self._owner.large_bytes

    async def take_place(self) -> None:
        """Wait for one of the `LARGE_BODIES` places; held until `release`."""
        await self._owner.places.acquire()
        self._place = True

    def add(self, size: int) -> None:
        """Count `size` more bytes read."""
        self.nbytes += size
        self._owner.nbytes += size

    def release(self) -> None:
        """The request reached the engine, or ended: its body no longer counts. Idempotent."""
        self._owner.nbytes -= self.nbytes
        self.nbytes = 0
        if self._place:
            self._place = False
            self._owner.places.release()


class BodyAdmission:
    """Request bodies in memory before their requests reach the engine: counted, large ones few."""

    def __init__(
        self,
        guard: MemoryGuard,
        timeout: Callable[[], float] = lambda: BODY_TIMEOUT,
        large_bodies: int = LARGE_BODIES,
        large_bytes: int = LARGE_BODY_BYTES,
    ) -> None:
        self._guard = guard
        self._timeout = timeout
        self.large_bytes = large_bytes
        self.places = asyncio.Semaphore(large_bodies)
        self.nbytes = 0  # bytes of bodies read and not yet released

    def lease(self) -> BodyLease:
        return BodyLease(self, self._timeout())

    def refusal(self, size: int) -> Overloaded | None:
        """529 when this body and those being read would take memory below the reject line."""
        reading = self._guard.reading
        if reading is None:
            return None
        needed = (self.nbytes + size) * BODY_EXPANSION
        line = int(self._guard.settings.reject_below_gb * GB)
        if reading.available - needed >= line:
            return None
        return Overloaded(
            f"not enough memory to take this request's body ({size / 1024**2:.1f} MB, with "
            f"{self.nbytes / 1024**2:.1f} MB of others being read): it would leave "
            f"{max(reading.available - needed, 0) / GB:.2f} GB available, below the "
            f"{self._guard.settings.reject_below_gb:g} GB reject line; retry later",
            {"retry-after": RETRY_AFTER_LOW_MEMORY},
        )
