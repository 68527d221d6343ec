"""The engine: one thread that owns every MLX call (load, prefill, decode).

MLX arrays and caches must not cross threads (on Metal that breaks, mlx#3727),
so the asyncio side never touches them: it sends commands over a queue and
receives events on a per-request `asyncio.Queue`, filled with
`loop.call_soon_threadsafe`. Generation runs on mlx-lm's `BatchGenerator`, so
requests join and leave the running batch between decode steps.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pensieved.config import EngineConfig, ModelConfig
from pensieved.conversation.constraints import (
    GrammarCompiler,
    ThinkingBudget,
    ToolGrammar,
    thinking_processor,
)
from pensieved.conversation.prompt import PromptBuilder
from pensieved.conversation.stops import StopMatcher
from pensieved.engine import cpu
from pensieved.engine.prefix_cache import PrefixCache
from pensieved.models.registry import materialize
from pensieved.models.residency import Resident, expected_weight_bytes, plan_room
from pensieved.wire.errors import Overloaded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_sequences: tuple[str, ...] = ()
    # max_tokens was cut to fit the context: running out means the window ended.
    context_limited: bool = False
    grammar: ToolGrammar | None = None
    thinking: ThinkingBudget | None = None


# Events the engine sends to a request's stream.
@dataclass(frozen=True)
class Admitted:
    """The request joined the batch; this much of its prompt came from the prefix cache."""

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
    # Prompt tokens that came from the prefix cache instead of prefill.
    cached_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    message: str
    error_type: str = "api_error"  # overloaded_error when the server is shutting down


# Seconds between counts of the KV bytes in flight (status, memory guard).
KV_COUNT_INTERVAL = 0.25

SHUTTING_DOWN = Failed("the server is shutting down", "overloaded_error")


Event = Admitted | PromptProgress | TextDelta | Finished | Failed


class ClientGone(Exception):
    """The client disconnected while waiting for its generation."""


class GenerationStream:
    """The asyncio end of one request: events in order, and a way to cancel.

    The engine thread appends to a deque and wakes the event loop only while
    the reader sleeps on it: one loop wake-up per wait, not per event, and no
    tasks or `asyncio.wait` per token. The event loop shares the GIL with the
    engine thread, so every microsecond spent here is taken from decoding.
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
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

    def _deliver(self, event: Event) -> None:
        # Called on the engine thread (or the loop's, in tests).
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
            self._engine._commands.put(("cancel", self))


@dataclass
class LoadedModel:
    config: ModelConfig
    model: Any
    tokenizer: Any
    context_length: int
    builder: PromptBuilder
    vocab_size: int  # the tokenizer's
    logits_size: int  # the model's output width, which may be padded past it
    dequantized: bool = False
    weight_bytes: int = 0
    grammars: GrammarCompiler = field(init=False)

    def __post_init__(self) -> None:
        self.grammars = GrammarCompiler(self.tokenizer, self.logits_size)

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class _Job:
    stream: GenerationStream
    request: GenerationRequest
    detokenizer: Any
    stops: StopMatcher
    output_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Runner:
    """A loaded model's batch generator and the jobs it is running."""

    loaded: LoadedModel
    generator: Any
    jobs: dict[int, _Job] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(self, models_dir: Path, settings: EngineConfig | None = None) -> None:
        self._models_dir = models_dir
        self._settings = settings or EngineConfig()
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        # Keyed by the whole model config: a changed source is another model.
        self._runners: dict[ModelConfig, _Runner] = {}
        # Unloads waiting for their model's requests to finish, and loads
        # waiting for those unloads: never two models' worth at once.
        self._retiring: dict[ModelConfig, list[concurrent.futures.Future[None]]] = {}
        self._deferred_loads: list[tuple[ModelConfig, concurrent.futures.Future[LoadedModel]]] = []
        self._thread = threading.Thread(target=self._run, name="pensieve-engine", daemon=True)
        self.requests_served = 0
        # (time, tokens) per decode step over the last minute, and the KV
        # bytes in flight: written by the engine thread, read by status.
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.kv_cache_bytes = 0
        self._kv_counted_at = 0.0
        self.prefix_cache = PrefixCache(_gb(self._settings.prompt_cache_gb))
        self._samplers: dict[tuple[float, float, int], Callable[[Any], Any]] = {}
        # Free memory to keep when loading a model: the memory guard's reject line.
        self.memory_floor_bytes = 0
        self._stopping = False
        self._accepting = threading.Lock()
        # Called with each request before it is queued; raises to refuse it
        # (the memory guard's admission by estimate, admission.py).
        self.admission: (
            Callable[[LoadedModel, GenerationRequest, GenerationStream], None] | None
        ) = None

    # -- asyncio side -----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def configure(self, settings: EngineConfig) -> None:
        """Settings for models loaded from now on (the prefix cache's budget at once)."""
        self._settings = settings
        self.prefix_cache.max_bytes = _gb(settings.prompt_cache_gb)
        self._put(("call", lambda: self.prefix_cache.shrink(self.prefix_cache.max_bytes)))

    def cached_length(self, model: LoadedModel, tokens: list[int]) -> int:
        """How many of `tokens` the prefix cache would serve now (for `usage` up front)."""
        return self.prefix_cache.cached_length(model.config, tokens)

    def stop(self, timeout: float = 10.0) -> None:
        with self._accepting:
            self._stopping = True
            self._commands.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _put(self, command: tuple[str, Any]) -> None:
        """Queue a command, unless stopping: then nothing would ever read it."""
        with self._accepting:
            if self._stopping:
                raise Overloaded("the server is shutting down", {"retry-after": "5"})
            self._commands.put(command)

    def is_loaded(self, config: ModelConfig) -> bool:
        return config in self._runners and config not in self._retiring

    def loaded(self) -> list[LoadedModel]:
        return [runner.loaded for runner in list(self._runners.values())]

    def idle_models(self) -> list[tuple[ModelConfig, float]]:
        """Loaded models with no request in flight, and for how many seconds."""
        now = time.monotonic()
        return [
            (config, now - runner.last_used)
            for config, runner in list(self._runners.items())
            if not runner.jobs
        ]

    def tokens_per_second(self, window: float = 60.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t > now - window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1.0)
        return sum(n for _, n in recent) / span

    def active_requests(self) -> int:
        return sum(len(runner.jobs) for runner in list(self._runners.values()))

    async def load(self, config: ModelConfig) -> LoadedModel:
        """The loaded model for `config`, loading it on the engine thread if needed."""
        runner = self._runners.get(config)
        if runner is not None and config not in self._retiring:
            return runner.loaded
        future: concurrent.futures.Future[LoadedModel] = concurrent.futures.Future()
        self._put(("load", (config, future)))
        return await asyncio.wrap_future(future)

    async def unload(self, config: ModelConfig) -> bool:
        """Free `config`'s model once its in-flight requests finish; False if it was not loaded."""
        if config not in self._runners:
            return False
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._put(("unload", (config, future)))
        await asyncio.wrap_future(future)
        return True

    def submit(self, model: LoadedModel, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(self, asyncio.get_running_loop())
        if self.admission is not None:
            self.admission(model, request, stream)
        self._put(("submit", (model.config, request, stream)))
        return stream

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run `function` on the engine thread between steps (MLX calls belong there)."""
        self._put(("call", function))

    # -- engine thread ----------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = any(runner.jobs for runner in self._runners.values())
            if not busy:
                self._count_kv_bytes()
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._fail_all()
                    self._save_prefix_caches()
                    self._refuse_pending()
                    self._free_models()
                    return
                try:
                    self._handle(*command)
                except Exception:
                    # The engine thread must outlive any one request's failure.
                    log.exception("engine command %s failed", command[0])
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            for runner in list(self._runners.values()):
                if runner.jobs:
                    self._step(runner)
            if self._retiring:
                self._retire_idle()

    def _count_kv_bytes(self, now: float | None = None) -> None:
        self._kv_counted_at = time.monotonic() if now is None else now
        self.kv_cache_bytes = sum(r.generator.prompt_cache_nbytes for r in self._runners.values())

    def _retire_idle(self) -> None:
        """Drop retiring models whose requests have all finished; then run waiting loads."""
        import gc

        import mlx.core as mx

        for config in [c for c in self._retiring if not self._runners[c].jobs]:
            del self._runners[config]
            self.prefix_cache.drop(config)
            gc.collect()
            mx.clear_cache()
            log.info("unloaded model %s", config.name)
            for future in self._retiring.pop(config):
                future.set_result(None)
        if not self._retiring:
            deferred, self._deferred_loads = self._deferred_loads, []
            for load in deferred:
                self._handle("load", load)

    def _refuse_pending(self) -> None:
        """Answer what was queued behind `stop`, so that nothing waits forever."""
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                payload[2]._deliver(SHUTTING_DOWN)
            elif kind in ("load", "unload"):
                payload[1].set_exception(Overloaded("the server is shutting down"))
        for _, future in self._deferred_loads:
            future.set_exception(Overloaded("the server is shutting down"))
        for futures in self._retiring.values():
            for retired in futures:
                retired.set_result(None)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "load":
            config, future = payload
            if self._retiring and (config not in self._runners or config in self._retiring):
                self._deferred_loads.append((config, future))
                return
            try:
                future.set_result(self._load(config))
            except Exception as exc:
                log.exception("loading model %s failed", config.name)
                future.set_exception(exc)
        elif kind == "unload":
            config, future = payload
            if config not in self._runners:
                future.set_result(None)
                return
            self._retiring.setdefault(config, []).append(future)
            self._retire_idle()
        elif kind == "submit":
            config, request, stream = payload
            try:
                if config not in self._runners:
                    # Unloaded between the request's load() and this submit.
                    self._load(config)
                self._insert(self._runners[config], request, stream)
            except Exception as exc:
                stream._deliver(Failed(f"generation could not start: {exc}"))
                raise
        elif kind == "cancel":
            self._cancel(payload)
        elif kind == "call":
            payload()

    def _load(self, config: ModelConfig) -> LoadedModel:
        if config in self._runners:
            return self._runners[config].loaded
        import mlx_lm

        started = time.perf_counter()
        path = materialize(config, self._models_dir)
        self._make_room(config, Path(path))
        model, tokenizer = mlx_lm.load(path)[:2]
        dequantized = cpu.should_dequantize(self._settings.dequantize, model)
        if dequantized:
            cpu.dequantize(model)
            log.info("dequantized %s to float32 (faster on the CPU backend)", config.name)
        context = config.context_length or _context_length(model, tokenizer)
        from mlx.utils import tree_flatten

        parameters = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
        weight_bytes = sum(int(v.nbytes) for _, v in parameters)
        loaded = LoadedModel(
            config,
            model,
            tokenizer,
            context,
            PromptBuilder(tokenizer, config.name),
            len(tokenizer),
            int(getattr(getattr(model, "args", None), "vocab_size", 0) or len(tokenizer)),
            dequantized,
            weight_bytes,
        )
        self._runners[config] = _Runner(loaded, _new_generator(loaded, self._settings))
        if self._settings.persist_prompt_cache:
            warm = self.prefix_cache.load(config, self._persisted(config), _identity(loaded, path))
            if warm:
                log.info("prefix cache: %d tokens of %s warm from disk", warm, config.name)
        log.info(
            "loaded model %s from %s in %.1fs (context %d tokens)",
            config.name,
            path,
            time.perf_counter() - started,
            context,
        )
        return loaded

    def _make_room(self, config: ModelConfig, path: Path) -> None:
        """Unload least recently used idle models until `config`'s weights fit (or refuse)."""
        import gc

        import mlx.core as mx
        import psutil

        mode = self._settings.dequantize
        dequantizes = mode == "always" or (
            (mode == "auto" and mx.default_device().type == mx.DeviceType.cpu)
            and cpu.openblas_active()
        )
        need = expected_weight_bytes(path, dequantizes)
        resident = [
            Resident(
                c.name,
                runner.loaded.weight_bytes,
                None if runner.jobs or c in self._retiring else runner.last_used,
            )
            for c, runner in self._runners.items()
        ]
        budget = _gb(self._settings.models_budget_gb) or None
        available = psutil.virtual_memory().available if self.memory_floor_bytes else None
        evict = plan_room(config.name, need, resident, budget, available, self.memory_floor_bytes)
        for name in evict:
            victim = next(c for c in self._runners if c.name == name)
            del self._runners[victim]
            self.prefix_cache.drop(victim)
            log.info(
                "unloaded model %s (least recently used) to make room for %s", name, config.name
            )
        if evict:
            gc.collect()
            mx.clear_cache()

    def _insert(
        self, runner: _Runner, request: GenerationRequest, stream: GenerationStream
    ) -> None:
        from mlx_lm.sample_utils import make_sampler

        if stream.cancelled.is_set():
            return
        sampling = request.sampling
        # A top_k at or past the vocabulary keeps every token: no filter at all
        # (mlx-lm refuses such values).
        top_k = sampling.top_k if sampling.top_k < runner.loaded.logits_size else 0
        settings = (sampling.temperature, sampling.top_p, top_k)
        # One sampler per setting: a batch whose rows share a sampler is
        # sampled in one call, not row by row.
        sampler = self._samplers.get(settings)
        if sampler is None:
            sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p, top_k=top_k)
            if len(self._samplers) >= 64:
                self._samplers.clear()
            self._samplers[settings] = sampler
        processors = []
        if request.thinking is not None:
            budget = thinking_processor(request.thinking, runner.loaded.tokenizer)
            if budget is not None:
                processors.append(budget)
        if request.grammar is not None:
            processors.append(runner.loaded.grammars.processor(request.grammar))
        cache, cached = self.prefix_cache.fetch(runner.loaded.config, request.prompt)
        (uid,) = runner.generator.insert(
            [request.prompt[cached:]],
            max_tokens=[request.max_tokens],
            caches=[cache],
            all_tokens=[request.prompt[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        tokenizer = runner.loaded.tokenizer
        runner.last_used = time.monotonic()
        runner.jobs[uid] = _Job(
            stream,
            request,
            tokenizer.detokenizer,
            StopMatcher(request.stop_sequences),
            cached_tokens=cached,
        )
        stream._deliver(Admitted(cached))

    def _cancel(self, stream: GenerationStream) -> None:
        for runner in self._runners.values():
            for uid, job in list(runner.jobs.items()):
                if job.stream is stream:
                    self._remove(runner, uid)
                    del runner.jobs[uid]
                    runner.last_used = time.monotonic()
                    log.info("request cancelled after %d tokens", job.output_tokens)

    def _step(self, runner: _Runner) -> None:
        try:
            prompt_responses, generation_responses = runner.generator.next()
        except Exception as exc:
            log.exception("generation step failed for model %s", runner.loaded.name)
            self._fail_runner(runner, f"generation failed: {exc}")
            return
        for response in prompt_responses:
            job = runner.jobs.get(response.uid)
            if job is not None:
                processed, total = response.progress[0], response.progress[1]
                job.stream._deliver(PromptProgress(processed, total))
        now = time.monotonic()
        if generation_responses:
            self._recent.append((now, len(generation_responses)))
        while self._recent and self._recent[0][0] < now - 60.0:
            self._recent.popleft()
        if now >= self._kv_counted_at + KV_COUNT_INTERVAL:
            # Summing every layer's cache each token would cost ~2% of a small
            # model's decode; a quarter-second-old figure serves its readers.
            self._count_kv_bytes(now)
        for response in generation_responses:
            if response.prompt_cache is not None:
                # A finished sequence leaves its prompt and reply for the next turn.
                self.prefix_cache.store(
                    runner.loaded.config, list(response.all_tokens), response.prompt_cache
                )
            job = runner.jobs.get(response.uid)
            if job is None:
                continue
            try:
                self._advance(runner, response.uid, job, response.token, response.finish_reason)
            except Exception as exc:
                log.exception("decoding a token failed for model %s", runner.loaded.name)
                self._finish(runner, response.uid, Failed(f"generation failed: {exc}"))

    def _advance(
        self, runner: _Runner, uid: int, job: _Job, token: int, finish_reason: str | None
    ) -> None:
        job.output_tokens += 1
        if token >= runner.loaded.vocab_size:
            # The detokenizer would quietly turn it into junk text.
            raise ValueError(
                f"model produced token id {token}, outside its tokenizer's "
                f"vocabulary of {runner.loaded.vocab_size}"
            )
        detokenizer = job.detokenizer
        if finish_reason != "stop":  # "stop" means an end-of-turn token: not text
            detokenizer.add_token(token)
        if finish_reason is not None:
            detokenizer.finalize()
        text, matched = job.stops.feed(detokenizer.last_segment)
        if matched is not None:
            if text:
                job.stream._deliver(TextDelta(text, job.output_tokens))
            self._finish(
                runner,
                uid,
                Finished("stop_sequence", matched, job.output_tokens, job.cached_tokens),
            )
            return
        if finish_reason is not None:
            text += job.stops.flush()
        if text:
            job.stream._deliver(TextDelta(text, job.output_tokens))
        if finish_reason is not None:
            if finish_reason == "stop":
                reason = "end_turn"
            elif job.request.context_limited:
                reason = "model_context_window_exceeded"
            else:
                reason = "max_tokens"
            self._finish(runner, uid, Finished(reason, None, job.output_tokens, job.cached_tokens))

    def _finish(self, runner: _Runner, uid: int, event: Finished | Failed) -> None:
        runner.last_used = time.monotonic()
        job = runner.jobs.pop(uid, None)
        if job is None:
            return
        # A request that ended by stop sequence or failure is still in the batch.
        self._remove(runner, uid)
        self.requests_served += 1
        job.stream._deliver(event)

    def _persisted(self, config: ModelConfig) -> Path:
        return self._models_dir / ".prompt-cache" / f"{config.name}.safetensors"

    def _save_prefix_caches(self) -> None:
        if not self._settings.persist_prompt_cache:
            return
        for config, runner in self._runners.items():
            try:
                path = materialize(config, self._models_dir)
                identity = _identity(runner.loaded, path)
                self.prefix_cache.save(config, self._persisted(config), identity)
            except Exception:
                log.exception("prefix cache: saving %s failed", config.name)

    def _remove(self, runner: _Runner, uid: int) -> None:
        """Take `uid` out of the batch, keeping what it prefilled in the prefix cache."""
        for cache, tokens in runner.generator.remove([uid], return_prompt_caches=True).values():
            self.prefix_cache.store(runner.loaded.config, list(tokens), cache)

    def _fail_runner(self, runner: _Runner, message: str) -> None:
        import mlx.core as mx

        # mlx-lm's samplers are compiled with the global random state as an
        # input and output; an exception mid-call leaves a placeholder array
        # there, and every later sampled request would fail. Reseed it.
        mx.random.seed(secrets.randbits(32))
        self._samplers.clear()
        for job in runner.jobs.values():
            job.stream._deliver(Failed(message))
        runner.jobs.clear()
        # The batch's state is unknown after a failure; start from a clean one.
        runner.generator = _new_generator(runner.loaded, self._settings)

    def _free_models(self) -> None:
        import gc

        import mlx.core as mx

        if self._runners:
            self._runners.clear()
            gc.collect()
            mx.clear_cache()
            log.info("models freed")

    def _fail_all(self) -> None:
        for runner in self._runners.values():
            for job in runner.jobs.values():
                job.stream._deliver(SHUTTING_DOWN)
            runner.jobs.clear()


def _identity(loaded: LoadedModel, path: str | Path) -> dict[str, str]:
    """What a saved KV cache must match to be loaded into a model."""
    return {
        "model_path": str(path),
        "weight_bytes": str(loaded.weight_bytes),
        "dequantized": str(loaded.dequantized),
    }


def _gb(value: float) -> int:
    return int(value * 1024**3)


def _new_generator(loaded: LoadedModel, settings: EngineConfig) -> Any:
    from mlx_lm.generate import BatchGenerator

    return BatchGenerator(
        loaded.model,
        stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
        prefill_step_size=settings.prefill_chunk,
        # Past these, requests wait in the generator's own queue.
        completion_batch_size=settings.max_sequences,
        prefill_batch_size=min(settings.max_sequences, 8),
    )


def _context_length(model: Any, tokenizer: Any) -> int:
    args = getattr(model, "args", None)
    for value in (
        getattr(args, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return 4096
