"""The memory guard acts whatever the event loop and the worker threads are doing.

It samples on a thread of its own, hands its shutdown to the loop, and ends
the process itself when the loop cannot: a blocked loop or a queue of
prompt builds is what memory runs out under. Low memory comes from a probe
seam (real readings, with `available` set on demand); everything else is
real: the threads, the loop, and in the last test a daemon process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pensieved.config import MemoryConfig
from pensieved.http.work import RequestWork
from pensieved.memory.guard import MemoryGuard
from pensieved.memory.levels import EXIT_MEMORY_SHUTDOWN, SHUTDOWN_GRACE_S, Level
from pensieved.memory.probe import MemoryProbe, MemoryReading
from pensieved.paths import GB
from tests.daemon import start_daemon

INTERVAL = 0.05


class LowOnDemand:
    """Real readings; once `low` is set, 0.1 GB available (below every default line)."""

    def __init__(self) -> None:
        self._real = MemoryProbe()
        self.low = False
        self.reads = 0

    def read(self) -> MemoryReading:
        self.reads += 1
        reading = self._real.read()
        if self.low:
            return dataclasses.replace(reading, available=int(0.1 * GB), pressure=None)
        return reading


def starve(loop: asyncio.AbstractEventLoop, release: threading.Event) -> list[Any]:
    """Fill asyncio's default executor with work that waits for `release`."""
    workers = min(32, (os.cpu_count() or 1) + 4)  # its size
    return [loop.run_in_executor(None, release.wait) for _ in range(workers + 4)]


def sampled_while(probe: LowOnDemand, seconds: float) -> int:
    """Readings taken over `seconds` during which this thread (the loop's) is blocked."""
    before = probe.reads
    time.sleep(seconds)
    return probe.reads - before


def test_the_guard_samples_while_the_workers_are_busy_and_the_loop_is_blocked() -> None:
    probe = LowOnDemand()
    called_on: list[tuple[str, int]] = []

    def on_shutdown(reason: str) -> None:
        called_on.append((reason, threading.get_ident()))

    exits: list[int] = []
    guard = MemoryGuard(
        MemoryConfig(sample_interval=INTERVAL),
        probe,
        on_shutdown=on_shutdown,
        shutdown_grace=0.5,
        exit_process=exits.append,  # os._exit, which would end pytest too
    )

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        release = threading.Event()
        guard.start()
        try:
            busy = starve(loop, release)
            before = probe.reads
            await asyncio.sleep(1.0)  # the loop is free, every worker waits
            assert probe.reads - before >= 8, "no readings while the workers were busy"

            assert sampled_while(probe, 1.0) >= 8, "no readings while the loop was blocked"
            probe.low = True
            deadline = time.monotonic() + 2.0
            while guard.level is not Level.SHUTDOWN and time.monotonic() < deadline:
                time.sleep(0.01)  # still blocking the loop
            assert guard.level is Level.SHUTDOWN and not guard.accepting
            assert guard.refusal() is not None
            assert called_on == []  # handed to the loop, which is blocked

            await asyncio.sleep(0.1)  # the loop runs again: the shutdown reaches it
            assert len(called_on) == 1
            reason, thread = called_on[0]
            assert "memory is critically low" in reason
            assert thread == threading.get_ident()  # on the loop's thread
            release.set()
            await asyncio.gather(*busy)
        finally:
            release.set()
            guard.stop()

    asyncio.run(scenario())
    time.sleep(1.0)
    assert exits == [0]  # the process did not exit in the grace period: the guard's thread ends it


def test_a_shutdown_the_loop_cannot_run_ends_the_process_after_the_grace() -> None:
    probe = LowOnDemand()
    exits: list[tuple[int, float]] = []
    exited = threading.Event()
    grace = 1.0

    def exit_process(code: int) -> None:  # os._exit, which would end pytest too
        exits.append((code, time.monotonic()))
        exited.set()

    shutdowns: list[str] = []
    guard = MemoryGuard(
        MemoryConfig(sample_interval=INTERVAL),
        probe,
        on_shutdown=shutdowns.append,
        shutdown_grace=grace,
        exit_process=exit_process,
    )

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        release = threading.Event()
        work = RequestWork(2)
        guard.start()
        try:
            busy = starve(loop, release)
            busy += [asyncio.ensure_future(work.run(release.wait)) for _ in range(4)]
            await asyncio.sleep(0.2)
            probe.low = True
            called = time.monotonic()
            # The loop is blocked from here on: it never sees the shutdown.
            assert exited.wait(grace + 2.0), "the guard never ended the process"
            assert shutdowns == []
            code, at = exits[0]
            assert code == EXIT_MEMORY_SHUTDOWN == 0
            assert grace <= at - called < grace + 1.0
            release.set()
            await asyncio.gather(*busy)
        finally:
            release.set()
            work.close()
            guard.stop()

    asyncio.run(scenario())
    assert len(exits) == 1


def test_stopping_the_guard_keeps_a_shutdowns_deadline() -> None:
    """The stop path calls `guard.stop()`; a stop that then hangs still ends in time."""
    probe = LowOnDemand()
    exited = threading.Event()
    guard = MemoryGuard(
        MemoryConfig(sample_interval=INTERVAL),
        probe,
        on_shutdown=lambda _: None,
        shutdown_grace=0.5,
        exit_process=lambda _: exited.set(),
    )

    async def scenario() -> None:
        guard.start()
        probe.low = True
        while guard.level is not Level.SHUTDOWN:
            await asyncio.sleep(0.01)
        guard.stop()
        stopped_reads = probe.reads
        assert exited.wait(2.0)
        assert probe.reads <= stopped_reads + 1  # no more sampling once stopped

    asyncio.run(scenario())


def test_a_stopped_guard_without_a_shutdown_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    guard = MemoryGuard(MemoryConfig(sample_interval=INTERVAL), LowOnDemand())
    guard.start()
    (thread,) = set(threading.enumerate()) - before
    assert thread.name == "pensieve-memory-guard" and thread.daemon
    guard.stop()
    assert not thread.is_alive()


EXIT_WAIT = """
import asyncio, threading, time
from pensieved.cli import exit_within
from pensieved.http.work import RequestWork

async def main() -> int:
    work = RequestWork(2)
    asyncio.ensure_future(work.run(time.sleep, 60))  # a build that will not end soon
    asyncio.ensure_future(asyncio.to_thread(time.sleep, 60))  # and one on the default executor
    await asyncio.sleep(0.2)
    work.close()
    exit_within(1.0, 0)
    return 0

asyncio.run(main())
"""


def test_the_process_does_not_wait_for_request_work_once_stopped() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", EXIT_WAIT], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    assert "exiting without waiting for" in result.stderr


def test_request_work_runs_on_its_own_bounded_threads() -> None:
    work = RequestWork(2)
    names: set[str] = set()
    release = threading.Event()

    def job() -> None:
        names.add(threading.current_thread().name)
        release.wait(5)

    async def scenario() -> None:
        jobs = [asyncio.ensure_future(work.run(job)) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert len(names) == 2  # two run, three wait
        release.set()
        await asyncio.gather(*jobs)

    try:
        asyncio.run(scenario())
    finally:
        work.close()
    assert all(name.startswith("pensieve-request") for name in names)


# -- a real daemon ----------------------------------------------------------

# Loaded into the daemon's interpreter (PYTHONPATH): its real memory probe,
# with `available` read from a file once the test writes it.
PROBE_SEAM = """
import dataclasses
import os
from pathlib import Path

from pensieved.memory import probe

_read = probe.MemoryProbe.read


def _read_scripted(self):
    reading = _read(self)
    try:
        gb = float(Path(os.environ["PENSIEVE_TEST_AVAILABLE_GB"]).read_text())
    except (OSError, ValueError):
        return reading
    return dataclasses.replace(reading, available=int(gb * 1024**3), pressure=None)


probe.MemoryProbe.read = _read_scripted
"""
BUILDS = 4  # two run on the request threads of a 2-core machine, two wait
BUILD_MB = 12  # about 30 s of tokenizing each: far past the grace period


def test_a_memory_shutdown_ends_a_daemon_busy_building_prompts(
    tiny_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seam = tmp_path / "seam"
    seam.mkdir()
    (seam / "sitecustomize.py").write_text(PROBE_SEAM)
    available = tmp_path / "available_gb"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(seam), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("PENSIEVE_TEST_AVAILABLE_GB", str(available))
    daemon = start_daemon(tmp_path / "home", {**tiny_config, "memory": {"sample_interval": 0.05}})
    process = psutil.Process(daemon.process.pid)
    sea = "Tell me everything about the sea. " * (BUILD_MB * 2**20 // 34)

    def count_tokens(index: int) -> int | None:
        # Each one different: a prompt seen before is partly cached.
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"{index}: {sea}"}]}
        with daemon.http() as http:
            try:
                return http.post("/v1/messages/count_tokens", json=body, timeout=120).status_code
            except httpx.HTTPError:
                return None  # the daemon went away mid-request

    pool = ThreadPoolExecutor(BUILDS)
    try:
        cpu = sum(process.cpu_times()[:2])
        answers = [pool.submit(count_tokens, index) for index in range(BUILDS)]
        # Builds are running once the daemon has spent a few CPU seconds on them.
        deadline = time.monotonic() + 60
        while sum(process.cpu_times()[:2]) - cpu < 3.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(answer.done() for answer in answers)

        available.write_text("0.1")  # below every line: the guard calls for shutdown
        called = time.monotonic()
        try:
            code = daemon.process.wait(SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {SHUTDOWN_GRACE_S:g}s after memory ran out")
        assert code == 0
        assert time.monotonic() - called < SHUTDOWN_GRACE_S
        log = daemon.log()
        assert "memory level normal → shutdown" in log
        assert "memory is critically low" in log and "stopping" in log
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        pool.shutdown(wait=True, cancel_futures=True)
