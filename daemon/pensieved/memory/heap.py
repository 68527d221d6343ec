"""Freed heap memory handed back to the system.

The C allocator keeps what Python frees for reuse, and a few large, short
requests (a body of megabytes, a prompt of 32k tool results) leave the
heap fragmented: the daemon's RSS climbs and stays there although nothing
is alive in it. glibc's `malloc_trim` returns the free pages (from every
arena, holes included); on macOS `malloc_zone_pressure_relief` does the
same. Both are C calls that ctypes runs without the GIL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# RSS growth past the lowest reading since the last trim that asks for one.
TRIM_GROWTH_BYTES = 64 * 1024 * 1024


@functools.cache
def _trimmer() -> Callable[[], object] | None:
    try:
        if sys.platform == "linux":
            malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            malloc_trim.argtypes = [ctypes.c_size_t]
            return lambda: malloc_trim(0)
        if sys.platform == "darwin":
            relief = ctypes.CDLL(None).malloc_zone_pressure_relief
            relief.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            return lambda: relief(None, 0)
    except (OSError, AttributeError):  # musl and other libcs without it
        pass
    return None


def trim() -> bool:
    """Hand the allocator's free pages back to the system; False where it cannot."""
    trimmer = _trimmer()
    if trimmer is None:
        return False
    trimmer()
    return True


class HeapWatch:
    """Trims once the RSS has grown `TRIM_GROWTH_BYTES` past its lowest since the last trim."""

    def __init__(self, growth: int = TRIM_GROWTH_BYTES) -> None:
        self._growth = growth
        self._floor: int | None = None
        self.trims = 0

    def observe(self, rss: int) -> None:
        if self._floor is None or rss < self._floor:
            self._floor = rss
        elif rss - self._floor > self._growth and trim():
            self.trims += 1
            self._floor = None  # the next reading, after the trim, is the new floor


# glibc's mallopt parameter for the size from which malloc maps memory of its own.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept fixed


def hand_back_freed_buffers(platform: str = sys.platform) -> bool:
    """Make freed large buffers go back to the system at once (Linux, glibc); True if set.

    MLX's CPU backend allocates with malloc. glibc raises its mmap threshold
    each time a mapped block is freed (up to 32 MB), after which KV-cache-sized
    buffers come from the heap and stay in the process when freed: the
    daemon's resident size, which `budget_gb` and the levels read, would
    count memory it no longer uses. Setting the threshold turns that off.
    """
    if platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False
