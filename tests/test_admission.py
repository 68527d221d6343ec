"""Admission by estimate: the estimate against MLX's measured peak, and the rule it enforces."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pensieved.config import EngineConfig, MemoryConfig, ModelConfig
from pensieved.conversation.plan import GenerationRequest
from pensieved.engine.commands import MemoryHooks
from pensieved.engine.core import Engine
from pensieved.engine.stream import Failed, Finished, GenerationStream
from pensieved.memory.admission import (
    EXPECTED_OUTPUT_TOKENS,
    FALLBACK_KV_BYTES_PER_TOKEN,
    Admission,
    ModelShape,
    activation_bytes,
    estimate_bytes,
    kv_bytes,
    model_shape,
)
from pensieved.memory.guard import MemoryGuard
from pensieved.memory.levels import Level
from pensieved.paths import GB
from pensieved.wire.errors import Overloaded
from tests.test_memory import ScriptedProbe

# The estimate is never below the measured peak, and at most this many times it
# (4 batched 400-token prompts in 256-token prefill chunks come to ~4.2x: rows
# that share a sampler are sampled in one call, which needs less than the sum
# of four, and the estimate counts each request as if it ran alone).
ESTIMATE_FACTOR = 4.5


async def on_engine(engine: Engine, function: Callable[[], int | None]) -> None:
    """Run `function` on the engine thread (where MLX's allocator is busy) and wait."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def run() -> None:
        function()
        loop.call_soon_threadsafe(done.set)

    engine.call_soon(run)
    await done.wait()


async def measure_peaks(
    model_dir: Path, cases: list[tuple[int, int, int]]
) -> tuple[ModelShape, list[int]]:
    """MLX's peak memory above the loaded model, for each (prompt, max_tokens, concurrent)."""
    engine = Engine(model_dir.parent, EngineConfig(dequantize="never"))
    engine.start()
    try:
        loaded = await engine.load(ModelConfig("tiny", str(model_dir)))
        shape = model_shape(loaded.model)
        peaks = []
        baseline = 0
        for prompt, max_tokens, concurrent in cases:

            def reset() -> None:
                nonlocal baseline
                mx.clear_cache()
                mx.reset_peak_memory()
                baseline = mx.get_active_memory()

            await on_engine(engine, reset)
            request = GenerationRequest(list(range(200, 200 + prompt)), max_tokens)
            streams = [engine.submit(loaded, request) for _ in range(concurrent)]
            for stream in streams:
                while not isinstance(
                    event := await stream.next_event(asyncio.Event()), Finished | Failed
                ):
                    pass
                assert isinstance(event, Finished) and event.output_tokens == max_tokens
            peaks.append(mx.get_peak_memory() - baseline)
        return shape, peaks
    finally:
        engine.stop()


def test_estimate_bounds_the_measured_mlx_peak(tiny_dir: Path) -> None:
    cases = [(16, 16, 1), (1000, 64, 1), (400, 32, 4)]
    shape, peaks = asyncio.run(measure_peaks(tiny_dir, cases))
    for (prompt, max_tokens, concurrent), peak in zip(cases, peaks, strict=True):
        estimate = kv_bytes(shape, concurrent, prompt + max_tokens) + concurrent * activation_bytes(
            shape, prompt
        )
        assert peak <= estimate <= ESTIMATE_FACTOR * peak, (prompt, max_tokens, peak, estimate)


def test_kv_bytes_per_token_come_from_the_model_config(tiny_dir: Path) -> None:
    import mlx_lm

    model = mlx_lm.load(str(tiny_dir))[0]
    # 2 layers × 2 KV heads × head dim 64/4 × (keys, values) × float32
    assert model_shape(model) == ModelShape(
        kv_bytes_per_token=2 * 2 * 16 * 2 * 4,
        attention_heads=4,
        hidden_size=64,
        intermediate_size=128,
        vocab_size=49152,
    )


class Bare(nn.Module):
    """An MLX model whose config lacks what the estimate wants."""

    def __init__(self, args: SimpleNamespace | None) -> None:
        super().__init__()
        if args is not None:
            self.args = args
        self.proj = nn.Linear(8, 8)
        self.proj.set_dtype(mx.float16)


def test_models_lacking_fields_are_estimated_conservatively() -> None:
    # No KV head count: every attention head keeps its own keys and values.
    no_kv_heads = model_shape(
        Bare(SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4))
    )
    assert no_kv_heads.kv_bytes_per_token == 2 * 4 * 16 * 2 * 2
    assert no_kv_heads.exact
    nothing = model_shape(Bare(None))
    assert nothing.kv_bytes_per_token == FALLBACK_KV_BYTES_PER_TOKEN
    assert not nothing.exact


def test_a_batch_pads_to_its_longest_request() -> None:
    shape = model_shape(Bare(SimpleNamespace(num_hidden_layers=2, hidden_size=64, n_head=4)))
    short, long = 300, 3000
    # mlx-lm pads every sequence of a batch to the longest one.
    assert kv_bytes(shape, 2, long) > kv_bytes(shape, 1, short) + kv_bytes(shape, 1, long)


# An 8B-class model: requests of a few thousand tokens cross lines of a few GB.
BIG = ModelShape(
    kv_bytes_per_token=128 * 1024,
    attention_heads=32,
    hidden_size=4096,
    intermediate_size=14336,
    vocab_size=128_256,
)
MODEL = ModelConfig("big", "/models/big")


class AdmissionMachine(RuleBasedStateMachine):
    """Memory moves, lines change, requests come and go: none is admitted at reject or below."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = ScriptedProbe()
        self.guard = MemoryGuard(MemoryConfig(), self.probe, on_shutdown=self.shut_down)
        self.admission = Admission(self.guard)
        self.engine = Engine(Path(tempfile.gettempdir()))  # never started: streams only
        self.loop = asyncio.new_event_loop()
        self.streams: list[GenerationStream] = []
        self.guard.sample()

    def shut_down(self, reason: str) -> None:
        self.guard.draining = True  # what the daemon does on its way out

    def teardown(self) -> None:
        self.loop.close()

    @rule(
        available=st.floats(0.0, 12.0),
        pressure=st.sampled_from(["normal", "warn", "critical", None]),
    )
    def memory_moves(self, available: float, pressure: str | None) -> None:
        self.probe.available_gb = available
        self.probe.pressure = pressure
        self.guard.sample()

    @rule(
        gbs=st.lists(st.floats(0.0, 6.0), min_size=3, max_size=3),
        budget=st.sampled_from([0.0, 2.0, 8.0]),
    )
    def lines_change(self, gbs: list[float], budget: float) -> None:
        shutdown, reject, warn = sorted(gbs)
        self.guard.configure(
            MemoryConfig(
                warn_below_gb=warn,
                reject_below_gb=reject,
                shutdown_below_gb=shutdown,
                budget_gb=budget,
            )
        )

    @rule(prompt=st.integers(1, 40_000), max_tokens=st.integers(1, 40_000))
    def request(self, prompt: int, max_tokens: int) -> None:
        level, draining = self.guard.level, self.guard.draining
        middleware_refuses = self.guard.refusal() is not None
        stream = GenerationStream(self.engine, self.loop)
        try:
            self.admission.check(MODEL, BIG, prompt, max_tokens, stream)
        except Overloaded as refused:
            assert refused.status == 529 and refused.headers["retry-after"]
            return
        assert level < Level.REJECT and not draining and not middleware_refuses
        reading = self.guard.reading
        assert reading is not None
        own = estimate_bytes(BIG, prompt, max_tokens)
        assert reading.available - own >= self.guard.settings.reject_below_gb * GB
        self.streams.append(stream)

    @precondition(lambda self: bool(self.streams))
    @rule(data=st.data())
    def request_ends(self, data: st.DataObject) -> None:
        stream = self.streams.pop(data.draw(st.integers(0, len(self.streams) - 1)))
        if data.draw(st.booleans()):
            stream.done = True  # read to its end
        else:
            stream.cancelled.set()  # client gone

    @invariant()
    def accepting_only_below_reject(self) -> None:
        if self.guard.level >= Level.REJECT:
            assert not self.guard.accepting and self.guard.refusal() is not None
        assert self.admission.in_flight() == len(self.streams)


AdmissionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_no_admission_at_reject_or_shutdown = AdmissionMachine.TestCase


@pytest.mark.parametrize("prompt", [1, 511, 512, 20_000])
def test_activation_estimate_grows_with_the_prompt(prompt: int) -> None:
    assert activation_bytes(BIG, prompt + 1) >= activation_bytes(BIG, prompt) > 0


def test_the_estimate_counts_a_likely_output_not_the_whole_window() -> None:
    # Claude Code asks for 32000 over a 20k prompt; in a 32768 window that is
    # clamped to 12768, of which a few thousand are likely.
    clamped = 32_768 - 20_000
    estimate = estimate_bytes(BIG, 20_000, clamped)
    assert estimate == kv_bytes(BIG, 1, 20_000 + EXPECTED_OUTPUT_TOKENS) + activation_bytes(
        BIG, 20_000
    )
    assert estimate < kv_bytes(BIG, 1, 32_768)
    # Fewer than that are counted as asked.
    assert estimate_bytes(BIG, 20_000, 500) == kv_bytes(BIG, 1, 20_500) + activation_bytes(
        BIG, 20_000
    )


async def finish(stream: GenerationStream) -> Finished:
    while not isinstance(event := await stream.next_event(asyncio.Event()), Finished | Failed):
        pass
    assert isinstance(event, Finished), event
    return event


def test_a_turn_that_fits_once_the_prompt_cache_gives_way_is_served_from_it(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[Finished, int, str]:
        # The guard is made once the first turn's entry is measured, below.
        admissions: list[Admission] = []

        def admit(*request: Any) -> None:
            for admission in admissions:
                admission.admit(*request)

        hooks = MemoryHooks(admit=admit)
        engine = Engine(tiny_dir.parent, EngineConfig(dequantize="never"), hooks)
        engine.start()
        try:
            loaded = await engine.load(ModelConfig("tiny", str(tiny_dir)))
            first = list(range(200, 1200))
            await finish(engine.submit(loaded, GenerationRequest(first, 8)))
            entry = engine.prompt_cache.nbytes
            assert len(engine.prompt_cache) == 1 and entry > 0
            # The next turn: the same prefix and more. Its own need (KV,
            # activations, and MLX's buffer cache refilling) fits the budget
            # only with the prompt cache's entry given back.
            second = [*first, *range(3000, 3100)]
            shape = model_shape(loaded.model)
            need = 2 * (kv_bytes(shape, 1, len(second) + 8) + activation_bytes(shape, len(second)))
            probe = ScriptedProbe()
            guard = MemoryGuard(
                MemoryConfig(budget_gb=(probe.resident + need - entry // 2) / GB),
                probe,
                engine=engine,
            )
            admissions.append(Admission(guard))
            too_big = GenerationRequest(second, 8)
            tight = MemoryGuard(
                MemoryConfig(budget_gb=(probe.resident + need - entry - 4096) / GB),
                probe,
                engine=engine,
            )
            with pytest.raises(Overloaded) as refused:
                Admission(tight).admit(loaded, too_big, GenerationStream(engine, engine_loop()))
            event = await finish(engine.submit(loaded, GenerationRequest(second, 8)))
            return event, len(engine.prompt_cache), refused.value.message
        finally:
            engine.stop()

    def engine_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    with caplog.at_level(logging.INFO, "pensieved.memory.admission"):
        event, entries, refusal = asyncio.run(scenario())
    assert "admitting a request that fits once" in caplog.text
    # It prefilled only what the cache lacked, and the entry it reused is
    # gone from the cache (it became this request's KV); its own took its place.
    assert event.cached_tokens == 1000
    assert entries == 1
    assert "past its" in refusal and "budget" in refusal and "caches are freed" in refusal


def test_metal_requests_stay_within_the_gpu_working_set() -> None:
    probe = ScriptedProbe()
    guard = MemoryGuard(MemoryConfig(), probe)
    admission = Admission(guard)
    engine = Engine(Path(tempfile.gettempdir()))  # never started: streams only
    loop = asyncio.new_event_loop()
    try:
        need = estimate_bytes(BIG, 8_000, 2_000)
        probe.gpu_working_set = need  # MLX's own buffers plus this request: over it
        guard.sample()
        with pytest.raises(Overloaded) as refused:
            admission.check(MODEL, BIG, 8_000, 2_000, GenerationStream(engine, loop))
        assert "GPU's recommended working set" in refused.value.message
        probe.gpu_working_set = 4 * need
        guard.sample()
        admission.check(MODEL, BIG, 8_000, 2_000, GenerationStream(engine, loop))
        probe.gpu_working_set = 0  # the CPU backend: no such ceiling
        guard.sample()
        admission.check(MODEL, BIG, 8_000, 2_000, GenerationStream(engine, loop))
    finally:
        loop.close()
