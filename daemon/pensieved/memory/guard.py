"""The memory guard: how much memory is left, which level that is, and what each level does.

A thread of its own samples a `MemoryProbe` (probe.py) every `[memory]
sample_interval` seconds; the request path only reads the level it left
behind. The thread needs neither the event loop nor a worker (a reading
takes about a millisecond), so it keeps sampling while either is busy: a
blocked loop or a queue of prompt builds is what memory runs out under.
Levels:

- normal: serve.
- warn: log once, shrink caches (`shrink_callbacks`, then MLX's buffer
  cache), keep serving.
- reject: new requests get 529 `overloaded_error`; in-flight ones go on.
- shutdown: stop accepting, end in-flight streams with an `error` event,
  free the model, exit 0 (launchd does not restart a clean exit straight
  back into the same pressure). The stop runs on the event loop; should the
  process still be alive `SHUTDOWN_GRACE_S` later (a blocked loop, a build
  that will not end), the guard's thread ends it with `os._exit(0)`.

Levels are entered as soon as available memory falls below a line and left
only once it is `hysteresis_gb` above it, so a reading that hovers at a line
does not flap. The kernel's own pressure verdict (macOS
`kern.memorystatus_vm_pressure_level`, Linux PSI) raises the level too:
critical counts as reject, warn as warn. On macOS the kernel's verdict comes
first: "available" there is an estimate (darwin.py), so the shutdown line
alone only rejects; the daemon shuts down when the kernel also says critical.
A daemon past its `budget_gb` (a request that grew past its admission
estimate while decoding) is at warn at least, which gives its caches back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pensieved.config import MemoryConfig
from pensieved.memory import heap
from pensieved.memory.heap import HeapWatch, hand_back_freed_buffers
from pensieved.memory.levels import (
    EXIT_MEMORY_SHUTDOWN,
    RETRY_AFTER_LOW_MEMORY,
    RETRY_AFTER_SHUTTING_DOWN,
    SHUTDOWN_GRACE_S,
    Level,
    classify,
    describe,
)
from pensieved.memory.probe import MemoryProbe, MemoryReading, Probe
from pensieved.paths import GB
from pensieved.wire.errors import Overloaded

if TYPE_CHECKING:
    from pensieved.engine.core import Engine

log = logging.getLogger(__name__)


def _run_here(function: Callable[[], None]) -> None:
    function()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # not on a thread that runs a loop
        return None


class MemoryGuard:
    """Holds the memory level; refuses new work at reject, and calls for shutdown below that.

    With an `engine`, MLX calls (clearing its cache, setting limits) run on the
    engine thread, where MLX work belongs. `on_shutdown` is called once, with
    the reason, when the shutdown level is reached: on the event loop the
    guard was started on, handed over from the guard's thread. Once started,
    the guard's thread also keeps the shutdown's deadline: `exit_process`
    (`os._exit`) after `shutdown_grace` seconds, whatever the loop is doing.
    """

    def __init__(
        self,
        settings: MemoryConfig,
        probe: Probe | None = None,
        *,
        engine: Engine | None = None,
        on_shutdown: Callable[[str], None] | None = None,
        shrink: Sequence[Callable[[], None]] = (),
        shutdown_grace: float = SHUTDOWN_GRACE_S,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self._settings = settings
        self._probe: Probe = probe or MemoryProbe()
        self._engine = engine
        self._run_on_engine: Callable[[Callable[[], None]], None] = (
            engine.call_soon if engine is not None else _run_here
        )
        self.on_shutdown = on_shutdown
        self.level = Level.NORMAL
        self.reading: MemoryReading | None = None
        # KV bytes the engine held when `reading` was taken (admission's ledger).
        self.kv_at_reading = 0
        self.draining = False
        # The "shrink caches" hook: each runs on the engine thread whenever the
        # level gets worse, before MLX's buffer cache is cleared. The prompt
        # cache registers its trim here.
        self.shrink_callbacks: list[Callable[[], None]] = list(shrink)
        # Freed heap handed back once the RSS climbs (memory/heap.py).
        self._heap = HeapWatch()
        self._read_failed = False
        # Readings are acted on from the guard's thread and from the loop
        # (a reload's new lines, the first reading): one at a time.
        self._acting = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake = threading.Event()
        self._shutdown_grace = shutdown_grace
        self._exit_process = exit_process
        # When the guard's thread ends the process (monotonic); None: no shutdown under way.
        self._exit_at: float | None = None

    def available_memory(self) -> int:
        """Bytes the system can hand out now (for a model load's room check)."""
        return self._probe.read().available

    @property
    def settings(self) -> MemoryConfig:
        return self._settings

    @property
    def accepting(self) -> bool:
        return self.level < Level.REJECT and not self.draining

    # -- sampling -----------------------------------------------------------

    def sample(self) -> Level:
        """Take one reading now and act on it."""
        return self.observe(self._probe.read())

    def observe(self, reading: MemoryReading) -> Level:
        """Act on `reading`: change level, log it, release memory, or call for shutdown."""
        with self._acting:
            self.reading = reading
            self.kv_at_reading = self._engine.kv_cache_bytes if self._engine is not None else 0
            if self.level is Level.SHUTDOWN:
                return self.level  # the way down is one way
            new = classify(reading, self.level, self._settings)
            if new == self.level:
                return new
            old, self.level = self.level, new
            figures = describe(reading, self._settings)
            if new > old:
                log.warning("memory level %s → %s: %s", old.label, new.label, figures)
                self.release_memory()
            else:
                log.info("memory level %s → %s: %s", old.label, new.label, figures)
            if new is Level.SHUTDOWN:
                self._call_for_shutdown(
                    f"memory is critically low ({reading.available / GB:.2f} GB available)"
                )
            return new

    def _call_for_shutdown(self, reason: str) -> None:
        """Set the deadline, then have the loop stop the daemon (at once if this is the loop)."""
        if self._thread is not None and not self._stopping:
            self._exit_at = time.monotonic() + self._shutdown_grace
            self._wake.set()
        callback, loop = self.on_shutdown, self._loop
        if callback is None:
            return
        if loop is None or _running_loop() is loop:
            callback(reason)
            return
        try:
            loop.call_soon_threadsafe(callback, reason)
        except RuntimeError:  # the loop is closed: the process is on its way out
            log.info("%s; the daemon is already stopping", reason)

    def release_memory(self) -> None:
        """Shrink caches, then hand MLX's buffer cache back to the system."""

        def clear_mlx_cache() -> None:
            import mlx.core as mx

            mx.clear_cache()

        for function in [*self.shrink_callbacks, clear_mlx_cache]:
            try:
                self._run_on_engine(function)
            except Overloaded:
                return  # the engine is stopping: everything is being freed anyway

    def reclaimable(self) -> int:
        """Bytes the daemon can give back for good: its prompt cache.

        MLX's buffer cache is emptied too, but refills as KV caches grow, so
        admission counts it at its limit instead.
        """
        return self._engine.prompt_cache.nbytes if self._engine is not None else 0

    def reclaim(self, nbytes: int) -> None:
        """Give back `nbytes` of caches: least recently used prompt-cache entries, then MLX's.

        Runs on the engine thread, in order with the requests queued before.
        """
        engine = self._engine

        def free() -> None:
            import mlx.core as mx

            if engine is not None:
                cache = engine.prompt_cache
                cache.shrink(max(0, cache.nbytes - nbytes))
            mx.clear_cache()  # evicted entries land here first

        with contextlib.suppress(Overloaded):  # stopping: everything is being freed anyway
            self._run_on_engine(free)

    def configure(self, settings: MemoryConfig) -> None:
        """New lines (from `reload`): applied to the last reading at once."""
        self._settings = settings
        self.apply_mlx_limits()
        if self.reading is not None:
            self.observe(self.reading)

    def apply_mlx_limits(self) -> None:
        settings = self._settings

        def apply() -> None:
            import mlx.core as mx

            mx.set_cache_limit(int(settings.cache_limit_gb * GB))
            if mx.metal.is_available() and settings.wired_limit_percent > 0:
                info: dict[str, Any] = mx.device_info()
                working_set = int(info.get("max_recommended_working_set_size", 0))
                if working_set:
                    # MLX: the wired limit must not change during an async eval.
                    mx.synchronize()
                    mx.set_wired_limit(int(working_set * settings.wired_limit_percent / 100))

        with contextlib.suppress(Overloaded):  # stopping: nothing left to limit
            self._run_on_engine(apply)
        hand_back_freed_buffers()

    def start(self) -> Level:
        """Take the first reading, then keep sampling on the guard's own thread.

        Called on the event loop, `on_shutdown` is handed to that loop.
        """
        self._loop = _running_loop()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._watch, name="pensieve-memory-guard", daemon=True
        )
        level = self.sample()
        assert self.reading is not None
        log.info("memory level %s: %s", level.label, describe(self.reading, self._settings))
        self._thread.start()
        return level

    def stop(self, timeout: float = 2.0) -> None:
        """Stop sampling. A memory shutdown under way keeps its deadline until the process ends."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        if self._exit_at is None:
            thread.join(timeout)
            self._thread = None

    def _watch(self) -> None:
        """The guard's thread: a reading every `sample_interval`, and the shutdown's deadline."""
        next_sample = time.monotonic() + self._settings.sample_interval
        while True:
            now = time.monotonic()
            exit_at = self._exit_at
            if exit_at is not None and now >= exit_at:
                self._exit_now()
                return
            if self._stopping:
                if exit_at is None:
                    return
                wake = exit_at
            elif now >= next_sample:
                self._sample_here()
                next_sample = time.monotonic() + self._settings.sample_interval
                continue
            else:
                wake = next_sample if exit_at is None else min(next_sample, exit_at)
            self._wake.wait(wake - now)
            self._wake.clear()

    def _sample_here(self) -> None:
        try:
            reading = self._probe.read()
        except Exception:
            if not self._read_failed:
                log.exception("reading memory failed; keeping the last level")
                self._read_failed = True
            return
        try:
            before = self.level
            self.observe(reading)
            if before < self.level < Level.SHUTDOWN:
                # After the level's own work (a shutdown's deadline first): a
                # trim of a large heap can take a while.
                heap.trim()
            self._heap.observe(reading.resident)
        except Exception:  # the thread must outlive one bad reading
            log.exception("acting on a memory reading failed")

    def _exit_now(self) -> None:
        log.error(
            "memory shutdown: the daemon is still running %gs after it was called for; "
            "exiting now (exit %d)",
            self._shutdown_grace,
            EXIT_MEMORY_SHUTDOWN,
        )
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        self._exit_process(EXIT_MEMORY_SHUTDOWN)

    # -- the request path ---------------------------------------------------

    def refusal(self) -> Overloaded | None:
        """Why a new request must be refused now, or None. Reads state only."""
        if self.draining or self.level is Level.SHUTDOWN:
            return Overloaded(
                "the server is shutting down", {"retry-after": RETRY_AFTER_SHUTTING_DOWN}
            )
        if self.level is Level.REJECT:
            reading = self.reading
            assert reading is not None  # no level but normal without one
            settings = self._settings
            if settings.kernel_pressure and reading.pressure == "critical":
                why = "the kernel reports critical memory pressure"
            else:
                why = (
                    f"{reading.available / GB:.2f} GB available; new requests are accepted "
                    f"again above {settings.reject_below_gb + settings.hysteresis_gb:g} GB"
                )
            return Overloaded(
                f"the server is low on memory ({why}); retry later",
                {"retry-after": RETRY_AFTER_LOW_MEMORY},
            )
        return None

    def report(self) -> dict[str, Any]:
        """The level and figures for /health and `pensievectl status`."""
        reading = self.reading or self._probe.read()
        settings = self._settings
        return {
            "level": self.level.label,
            "available_gb": round(reading.available / GB, 3),
            "total_gb": round(reading.total / GB, 3),
            "pressure": reading.pressure,
            "accepting_requests": self.accepting,
            "warn_below_gb": settings.warn_below_gb,
            "reject_below_gb": settings.reject_below_gb,
            "shutdown_below_gb": settings.shutdown_below_gb,
            "budget_gb": settings.budget_gb or None,
            "gpu_working_set_gb": round(reading.gpu_working_set / GB, 3) or None,
        }
