"""What the memory admission check costs a request (target: < 0.1 ms).

Every `POST /v1/messages` pays two checks: the middleware's level check
(`MemoryGuard.refusal`) before the body is read, and the estimate check
(`Admission.admit`) before prefill, which walks the ledger of requests in
flight. Both are timed here on the real objects: the embedded SmolLM2 loaded
by a real engine, a guard holding a real memory reading, real generation
streams in the ledger. The background sample (`MemoryProbe.read`), which is
not on the request path, is timed for comparison.

Run: `.venv/bin/python bench/admission.py` (after `make setup`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402

from pensieved.config import BUILTIN_SOURCE, EngineConfig, MemoryConfig, ModelConfig  # noqa: E402
from pensieved.conversation.plan import GenerationRequest  # noqa: E402
from pensieved.engine.core import Engine  # noqa: E402
from pensieved.engine.stream import GenerationStream  # noqa: E402
from pensieved.memory.admission import Admission  # noqa: E402
from pensieved.memory.guard import MemoryGuard  # noqa: E402
from pensieved.memory.probe import MemoryProbe  # noqa: E402
from pensieved.wire.errors import Overloaded  # noqa: E402

# The cost does not depend on the sizes; these keep 64 such requests
# admissible on a laptop, so that every check runs to its end.
PROMPT_TOKENS = 2000
MAX_TOKENS = 1000
REPEATS = 7


def per_call_us(function: Callable[[], object], calls: int, repeats: int = REPEATS) -> float:
    """Median over `repeats` runs of the mean time of one call, in microseconds."""
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(runs)


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as models:
        engine = Engine(Path(models), EngineConfig(dequantize="never"))
        engine.start()
        try:
            loaded = await engine.load(ModelConfig("smollm2", BUILTIN_SOURCE))
            loop = asyncio.get_running_loop()
            # A budget makes the check do all of its work.
            guard = MemoryGuard(MemoryConfig(budget_gb=1024.0))
            guard.sample()
            admission = Admission(guard)
            request = GenerationRequest(list(range(PROMPT_TOKENS)), MAX_TOKENS)

            refused = 0
            streams: list[GenerationStream] = []

            def admit_one() -> None:
                nonlocal refused
                # Made beforehand: submit() makes a request's stream anyway.
                stream = streams.pop()
                try:
                    admission.admit(loaded, request, stream)
                except Overloaded:
                    refused += 1
                stream.done = True  # leaves the ledger at its size for the next call

            streams.append(GenerationStream(engine, loop))
            admit_one()  # the model's shape is worked out once, on its first request
            rows = []
            for in_flight in (0, 1, 8, 64):
                try:
                    while admission.in_flight() < in_flight:
                        admission.admit(loaded, request, GenerationStream(engine, loop))
                except Overloaded:
                    pass  # this machine has no room for that many: time what it has
                refused = 0
                streams[:] = [GenerationStream(engine, loop) for _ in range(calls * REPEATS)]
                level = per_call_us(guard.refusal, calls)
                estimate = per_call_us(admit_one, calls)
                rows.append((admission.in_flight(), level, estimate, refused > 0))
            probe = MemoryProbe()
            sample = per_call_us(probe.read, max(calls // 100, 10))
        finally:
            engine.stop()

    print(f"admission check per request, µs (median of {REPEATS} runs × {calls} calls)")
    print(f"model {loaded.name}, prompt {PROMPT_TOKENS} + max_tokens {MAX_TOKENS} tokens\n")
    print("| requests in flight | level check (middleware) | estimate check (admit) | total |")
    print("|---|---|---|---|")
    for in_flight, level, estimate, refusing in rows:
        outcome = " (refused: no room)" if refusing else ""
        print(f"| {in_flight} | {level:.2f} | {estimate:.2f}{outcome} | {level + estimate:.2f} |")
    print(f"\nbackground sample (MemoryProbe.read, not on the request path): {sample:.1f} µs")
    worst = max(level + estimate for _, level, estimate, _ in rows)
    print(
        f"worst total: {worst / 1000:.4f} ms (target < 0.1 ms): {'ok' if worst < 100 else 'MISSED'}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed run")
    asyncio.run(main(parse(parser).calls))
