"""memory/heap.py: freed heap handed back once the daemon's RSS climbs."""

from __future__ import annotations

import sys

import psutil
import pytest

from pensieved.memory import heap
from pensieved.memory.heap import HeapWatch

MB = 1024 * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_a_fragmented_heap_is_given_back() -> None:
    """Many mid-sized blocks freed but for every 64th: the heap keeps them until a trim."""
    me = psutil.Process()
    blocks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MB, below mmap's threshold
    kept = blocks[::64]
    del blocks
    before = me.memory_info().rss
    assert heap.trim()
    after = me.memory_info().rss
    assert before - after > 64 * MB, (before / MB, after / MB)
    assert kept


def test_the_watch_trims_after_growth_past_its_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[bool] = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(True) or True)
    watch = HeapWatch(growth=100)
    for rss in (1000, 900, 990, 1001):  # the floor follows the lowest reading
        watch.observe(rss)
    assert trims == [True] and watch.trims == 1
    watch.observe(1500)  # after a trim, the next reading is the new floor
    watch.observe(1550)
    assert trims == [True]
