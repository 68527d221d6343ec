"""The engine: one thread that owns every MLX call (load, prefill, decode).

MLX arrays and caches must not cross threads (on Metal that breaks, mlx#3727),
so the asyncio side never touches them: it sends commands over a queue and
receives events on a per-request `GenerationStream` (stream.py). Each loaded
model's batch is a `Runner` (runner.py) on mlx-lm's `BatchGenerator`, so
requests join and leave the running batch between decode steps; loading and
room-making are in loading.py.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pensieved.config import EngineConfig, ModelConfig, draft_config
from pensieved.conversation.plan import GenerationRequest
from pensieved.engine.commands import (
    Call,
    Cancel,
    Command,
    Load,
    MemoryHooks,
    Stop,
    Submit,
    Unload,
)
from pensieved.engine.loading import (
    LoadedModel,
    ModelFrontEnd,
    free_memory,
    gb,
    identity,
    load_front_end,
    load_weights,
    models_to_evict,
    persisted_cache_path,
    sampling_defaults,
)
from pensieved.engine.prompt_cache import PromptCache
from pensieved.engine.runner import Runner, SamplerPool
from pensieved.engine.stream import SHUTTING_DOWN, Failed, GenerationStream
from pensieved.models.registry import local_model_dir, materialize
from pensieved.models.residency import Resident
from pensieved.models.sampling import SamplingDefaults
from pensieved.wire.errors import Overloaded

log = logging.getLogger(__name__)

# Seconds between counts of the KV bytes in flight (status, memory guard).
KV_COUNT_INTERVAL = 0.25


class Engine:
    def __init__(
        self,
        models_dir: Path,
        settings: EngineConfig | None = None,
        memory: MemoryHooks | None = None,
    ) -> None:
        self._models_dir = models_dir
        self._settings = settings or EngineConfig()
        self._commands: queue.Queue[Command] = queue.Queue()
        # Keyed by the whole model config: a changed source is another model.
        self._runners: dict[ModelConfig, Runner] = {}
        # Unloads waiting for their model's requests to finish, and loads
        # waiting for those unloads: never two models' worth at once.
        self._retiring: dict[ModelConfig, list[concurrent.futures.Future[None]]] = {}
        self._deferred_loads: list[Load] = []
        self._thread = threading.Thread(target=self._run, name="pensieve-engine", daemon=True)
        # Requests ended by models since unloaded; the loaded ones count their own.
        self._served_before = 0
        # (time, tokens) per decode step over the last minute, and the KV
        # bytes in flight: written by the engine thread, read by status.
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.kv_cache_bytes = 0
        self._kv_counted_at = 0.0
        self.prompt_cache = PromptCache(gb(self._settings.prompt_cache_gb))
        self._samplers = SamplerPool()
        # Tokenizers of models not loaded yet, to check a request before a load.
        self._front_ends: dict[ModelConfig, ModelFrontEnd] = {}
        self._front_ends_lock = threading.Lock()  # worker threads fill it
        # Why a model's last load failed, until it loads (/health reports `degraded`).
        self.failed_loads: dict[ModelConfig, str] = {}
        # Sampling defaults of models not loaded (for /health and /v1/models/{id}).
        self._unloaded_sampling: dict[ModelConfig, SamplingDefaults] = {}
        self._memory = memory or MemoryHooks()
        self._stopping = False
        self._accepting = threading.Lock()

    # -- asyncio side -----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def configure(self, settings: EngineConfig) -> None:
        """Settings for models loaded from now on (the prompt cache's budget at once)."""
        self._settings = settings
        self.prompt_cache.max_bytes = gb(settings.prompt_cache_gb)
        self._put(Call(lambda: self.prompt_cache.shrink(self.prompt_cache.max_bytes)))

    def front_end(self, config: ModelConfig) -> ModelFrontEnd | None:
        """`config`'s model's front end (tokenizer, template, context), without its weights.

        Safe on any thread (no MLX arrays); None when the model would first
        need importing, which only the engine thread may do.
        """
        path = local_model_dir(config, self._models_dir)
        if path is None:
            return None
        with self._front_ends_lock:
            front = self._front_ends.get(config)
        if front is None:
            front = load_front_end(config, path)
            with self._front_ends_lock:
                if len(self._front_ends) >= 8:
                    self._front_ends.clear()
                self._front_ends[config] = front
        return front

    def sampling_defaults(self, config: ModelConfig) -> SamplingDefaults:
        """The sampling `config`'s model uses where a request is silent (loaded or not)."""
        runner = self._runners.get(config)
        if runner is not None:
            return runner.loaded.sampling
        # Read from the model's files once: /health asks on every call.
        with self._front_ends_lock:
            found = self._unloaded_sampling.get(config)
        if found is None:
            found = sampling_defaults(config, self._models_dir)
            with self._front_ends_lock:
                if len(self._unloaded_sampling) >= 32:
                    self._unloaded_sampling.clear()
                self._unloaded_sampling[config] = found
        return found

    def cached_length(self, model: LoadedModel, tokens: list[int]) -> int:
        """How many of `tokens` the prompt cache would serve now (for `usage` up front)."""
        return self.prompt_cache.cached_length(model.config, tokens)

    def stop(self, timeout: float = 10.0) -> None:
        with self._accepting:
            self._stopping = True
            self._commands.put(Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _put(self, command: Command) -> None:
        """Queue a command, unless stopping: then nothing would ever read it."""
        with self._accepting:
            if self._stopping:
                raise Overloaded("the server is shutting down")
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

    @property
    def requests_served(self) -> int:
        return self._served_before + sum(r.served for r in list(self._runners.values()))

    def active_requests(self) -> int:
        return sum(len(r.jobs) + len(r.held) for r in list(self._runners.values()))

    async def load(self, config: ModelConfig) -> LoadedModel:
        """The loaded model for `config`, loading it on the engine thread if needed."""
        runner = self._runners.get(config)
        if runner is not None and config not in self._retiring:
            return runner.loaded
        future: concurrent.futures.Future[LoadedModel] = concurrent.futures.Future()
        self._put(Load(config, future))
        return await asyncio.wrap_future(future)

    async def unload(self, config: ModelConfig) -> bool:
        """Free `config`'s model once its in-flight requests finish; False if it was not loaded."""
        if config not in self._runners:
            return False
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._put(Unload(config, future))
        await asyncio.wrap_future(future)
        return True

    def submit(self, model: LoadedModel, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(self, asyncio.get_running_loop())
        if self._memory.admit is not None:
            self._memory.admit(model, request, stream)
        self._put(Submit(model.config, request, stream))
        return stream

    def cancel_stream(self, stream: GenerationStream) -> None:
        """Stop generating for `stream` (its reader is gone); see `GenerationStream.cancel`."""
        # Straight onto the queue, even while stopping: the stop answers it.
        self._commands.put(Cancel(stream))

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run `function` on the engine thread between steps (MLX calls belong there)."""
        self._put(Call(function))

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
                if isinstance(command, Stop):
                    self._fail_all()
                    self._save_prompt_caches()
                    self._refuse_pending()
                    self._free_models()
                    return
                try:
                    self._handle(command)
                except Exception:
                    # The engine thread must outlive any one request's failure.
                    log.exception("engine command %s failed", type(command).__name__)
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
        self.kv_cache_bytes = sum(
            r.generator.prompt_cache_nbytes + r.speculator.cache_bytes
            for r in self._runners.values()
        )

    def _retire_idle(self) -> None:
        """Drop retiring models whose requests have all finished; then run waiting loads."""
        for config in [c for c in self._retiring if not self._runners[c].jobs]:
            self._drop(config)
            free_memory()
            log.info("unloaded model %s", config.name)
            for future in self._retiring.pop(config):
                future.set_result(None)
        if not self._retiring:
            deferred, self._deferred_loads = self._deferred_loads, []
            for load in deferred:
                self._handle(load)

    def _refuse_pending(self) -> None:
        """Answer what was queued behind `stop`, so that nothing waits forever."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            match command:
                case Submit(stream=stream):
                    stream.deliver(SHUTTING_DOWN)
                case Load(future=future) | Unload(future=future):
                    future.set_exception(Overloaded("the server is shutting down"))
        for load in self._deferred_loads:
            load.future.set_exception(Overloaded("the server is shutting down"))
        for futures in self._retiring.values():
            for retired in futures:
                retired.set_result(None)

    def _handle(self, command: Command) -> None:
        match command:
            case Load(config, future):
                if self._retiring and (config not in self._runners or config in self._retiring):
                    self._deferred_loads.append(command)
                    return
                try:
                    future.set_result(self._load(config))
                    self.failed_loads.pop(config, None)
                except Exception as exc:
                    self.failed_loads[config] = str(exc)
                    # One line: the caller reports it too (a 500, `pensievectl
                    # load`'s error, pensieved's refusal to start); the traceback
                    # is for --log-level debug.
                    log.error("loading model %s failed: %s", config.name, exc)
                    log.debug("loading model %s failed", config.name, exc_info=True)
                    future.set_exception(exc)
            case Unload(config, future):
                if config not in self._runners:
                    future.set_result(None)
                    return
                self._retiring.setdefault(config, []).append(future)
                self._retire_idle()
            case Submit(config, request, stream):
                try:
                    if config not in self._runners:
                        # Unloaded between the request's load() and this submit.
                        self._load(config)
                    self._runners[config].insert(request, stream)
                except Exception as exc:
                    stream.deliver(Failed(f"generation could not start: {exc}"))
                    raise
            case Cancel(stream):
                for runner in self._runners.values():
                    runner.cancel(stream)
            case Call(function):
                function()

    def _load(self, config: ModelConfig) -> LoadedModel:
        if config in self._runners:
            return self._runners[config].loaded
        path = materialize(config, self._models_dir)
        draft = draft_config(config)
        draft_path = None if draft is None else materialize(draft, self._models_dir)
        self._make_room(config, Path(path), None if draft_path is None else Path(draft_path))
        loaded = load_weights(config, path, self._settings, draft_path)
        with self._front_ends_lock:  # read again from the files, imported now
            self._unloaded_sampling.pop(config, None)
        self._runners[config] = Runner(loaded, self._settings, self.prompt_cache, self._samplers)
        if self._settings.persist_prompt_cache:
            saved = persisted_cache_path(self._models_dir, config)
            warm = self.prompt_cache.load(config, saved, identity(loaded))
            if warm:
                log.info("prompt cache: %d tokens of %s warm from disk", warm, config.name)
        return loaded

    def _make_room(self, config: ModelConfig, path: Path, draft_path: Path | None = None) -> None:
        """Unload least recently used idle models until `config`'s weights fit (or refuse).

        Its draft model's weights (`draft_path`) count as part of it.
        """
        resident = [
            Resident(
                c.name,
                runner.loaded.weight_bytes,
                None if runner.jobs or c in self._retiring else runner.last_used,
            )
            for c, runner in self._runners.items()
        ]
        evict = models_to_evict(
            config,
            path,
            self._settings,
            resident,
            self._memory.floor_bytes() if self._memory.floor_bytes else 0,
            self._memory.available,
            draft_path,
        )
        for name in evict:
            self._drop(next(c for c in self._runners if c.name == name))
            log.info(
                "unloaded model %s (least recently used) to make room for %s", name, config.name
            )
        if evict:
            free_memory()

    def _drop(self, config: ModelConfig) -> None:
        runner = self._runners.pop(config)
        self._served_before += runner.served
        self.prompt_cache.drop(config)

    def _step(self, runner: Runner) -> None:
        result = runner.step()
        now = time.monotonic()
        if result.generated:
            self._recent.append((now, result.generated))
        while self._recent and self._recent[0][0] < now - 60.0:
            self._recent.popleft()
        if now >= self._kv_counted_at + KV_COUNT_INTERVAL:
            # Summing every layer's cache each token would cost ~2% of a small
            # model's decode; a quarter-second-old figure serves its readers.
            self._count_kv_bytes(now)

    def _save_prompt_caches(self) -> None:
        if not self._settings.persist_prompt_cache:
            return
        for config, runner in self._runners.items():
            try:
                # The path it was loaded from: never import anything in the stop window.
                saved = persisted_cache_path(self._models_dir, config)
                self.prompt_cache.save(config, saved, identity(runner.loaded))
            except Exception:
                log.exception("prompt cache: saving %s failed", config.name)

    def _free_models(self) -> None:
        if self._runners:
            for config in list(self._runners):
                self._drop(config)
            free_memory()
            log.info("models freed")

    def _fail_all(self) -> None:
        for runner in self._runners.values():
            runner.end_all(SHUTTING_DOWN)
