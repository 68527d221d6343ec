"""`RequestWork`: the daemon's own threads for request work kept off the event loop.

Prompt builds, output plans (grammars) and tokenizer loads take from
milliseconds to seconds of CPU each. They run here, on a bounded pool the
daemon owns, not on asyncio's default executor: that one is shared with
everything that calls `asyncio.to_thread` (the stop path's `engine.stop`
among them), and a queue of slow builds there would hold it up. The memory
guard samples on a thread of its own (memory/guard.py), so no amount of
work here keeps it from acting.

Closing the pool (the stop path, once streams have ended) answers every
request still waiting on it with 529 "shutting down": the HTTP server waits
for open requests before it stops. It does not wait for builds still
running: their results have no reader, and the process exits without them
(cli.py bounds how long it waits).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from pensieved.memory.levels import RETRY_AFTER_SHUTTING_DOWN
from pensieved.wire.errors import Overloaded

P = ParamSpec("P")
T = TypeVar("T")

MAX_WORKERS = 4


def default_workers(cpus: int | None = None) -> int:
    """One worker per core, at least 2 and at most `MAX_WORKERS`.

    A build is Python and tokenizer work that holds the GIL most of the
    time: more threads than cores would only interleave builds, each
    holding its prompt in memory meanwhile, while a waiting request holds
    only its decoded body. Two keep one slow build from holding up the rest.
    """
    count = cpus if cpus is not None else os.cpu_count() or 1
    return max(2, min(MAX_WORKERS, count))


class RequestWork:
    """A bounded pool of threads for request work; `await work.run(f, *args)`."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pensieve-request")
        self._waiting: set[asyncio.Future[Any]] = set()
        self._closed = False

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`function(*args, **kwargs)` on one of the pool's threads (with the caller's context).

        Raises `Overloaded` once the pool is closed, also while waiting.
        """
        if self._closed:
            raise _shutting_down()
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        future = loop.run_in_executor(self._pool, call)
        self._waiting.add(future)
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise _shutting_down() from None  # close() let go of this request
            raise
        finally:
            self._waiting.discard(future)

    def close(self) -> None:
        """Take no more work and answer what waits; builds already running are not waited for."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for future in list(self._waiting):
            future.cancel()


def _shutting_down() -> Overloaded:
    return Overloaded("the server is shutting down", {"retry-after": RETRY_AFTER_SHUTTING_DOWN})
