"""Run the daemon: warm the model, serve the app with embedded Granian, stop cleanly.

Granian's embedded server runs inside our own asyncio loop, so this process
owns its signal handlers and its exit code (launchd restarts only on a
non-zero exit). Granian does not end open SSE streams when it stops, so the
engine ends them first: each gets an `error` event instead of a silent cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from msgspec.structs import replace

from pensieved.config import Config, ConfigError, ModelConfig, ensure_token, loopback_for
from pensieved.engine import cpu
from pensieved.engine.commands import MemoryHooks
from pensieved.engine.core import Engine
from pensieved.http.app import create_app, health_report
from pensieved.http.asgi import DisconnectWatcher
from pensieved.http.work import RequestWork
from pensieved.memory.admission import Admission
from pensieved.memory.guard import MemoryGuard
from pensieved.memory.levels import Level, describe
from pensieved.models.registry import ModelRegistry, check_source
from pensieved.paths import GB
from pensieved.service.clients import client_report
from pensieved.service.control import ControlServer, ControlSocketError
from pensieved.service.limits import raise_open_files
from pensieved.service.listen import StartupError, check_host, check_port_free
from pensieved.service.logfile import LOG_FILE, log_to_file
from pensieved.service.notify import sd_notify
from pensieved.service.units import supervisor
from pensieved.wire.errors import NotFound

log = logging.getLogger(__name__)


async def serve(config: Config, reread_config: Callable[[], Config] | None = None) -> int:
    """Serve until SIGTERM/SIGINT or `pensievectl stop`; return the process exit code.

    `reread_config` gives the config as it is now (file and flags), for `reload`.
    """
    log_to_file(config.paths.log_dir / LOG_FILE, supervisor())
    before, after = raise_open_files()
    if after != before:
        log.info("open-file limit raised from %d to %d", before, after)
    check_host(config.server.host, config.server.allow_remote)
    return await Daemon(config, reread_config).run()


# Settings the running server took at start: a reload reports them, a restart applies them.
RESTART_KEYS = ("host", "port", "allow_remote", "header_timeout", "max_connections", "auth_token")


class Daemon:
    """What a running pensieved owns, and its life: start, serve, drain, stop.

    The engine (one MLX thread), the model registry (the config in force),
    the memory guard (its own thread), the request work pool, the control
    socket and, once serving, the Granian server. The control socket's
    commands are the `_on_*` methods; the background loops are `_watch_*`.
    """

    def __init__(self, config: Config, reread_config: Callable[[], Config] | None) -> None:
        self.token = ensure_token(config)
        self.started_at = time.time()
        self._reread_config = reread_config
        self.registry = ModelRegistry(config)
        # The engine and the guard each need the other: the engine's hooks
        # reach the guard through this object, made just below.
        self.engine = Engine(
            config.paths.models_dir,
            config.engine,
            MemoryHooks(
                # A model is loaded only if available memory stays above the reject line.
                floor_bytes=lambda: int(self.registry.config.memory.reject_below_gb * GB),
                available=lambda: self.guard.available_memory(),
                admit=lambda model, request, stream: self.admission.admit(model, request, stream),
            ),
        )
        prompt_cache = self.engine.prompt_cache
        self.guard = MemoryGuard(
            config.memory,
            engine=self.engine,
            on_shutdown=lambda reason: self.request_stop(reason, drain_first=False),
            # Under memory pressure the prompt cache gives back half of what it holds.
            shrink=[lambda: prompt_cache.shrink(prompt_cache.nbytes // 2)],
        )
        self.admission = Admission(self.guard)
        # Prompt builds and other request work: threads of the daemon's own (http/work.py).
        self.work = RequestWork()
        self.control = ControlServer(
            config.paths.control_socket,
            {
                "status": self._on_status,
                "stop": self._on_stop,
                "reload": self._on_reload,
                "unload": self._on_unload,
                "load": self._on_load,
                "clients": self._on_clients,
            },
        )
        self._stop_requested = asyncio.Event()  # by the control socket
        self._stopping = asyncio.Event()
        self._cut_drain = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: Any = None

    async def run(self) -> int:
        try:
            await self.control.start()
        except ControlSocketError as exc:  # already running, path too long, not ours
            raise StartupError(str(exc)) from exc
        try:
            return await self._serve()
        finally:
            self.work.close()  # builds still running are not waited for (cli.py bounds the exit)
            await self.control.close()

    # -- the control socket's commands ------------------------------------

    async def _on_status(self, _: dict[str, Any]) -> dict[str, Any]:
        report = health_report(self.registry.config, self.engine, self.started_at, self.guard)
        # Prompt excerpts: on the owner-only control socket, never in /health.
        report["prompt_cache"]["recent_misses"] = list(self.engine.prompt_cache.misses)
        return report

    async def _on_stop(self, _: dict[str, Any]) -> dict[str, Any]:
        self._stop_requested.set()
        return {"stopping": True}

    async def _on_reload(self, _: dict[str, Any]) -> dict[str, Any]:
        if self._reread_config is None:
            raise RuntimeError("this daemon was started without a config to re-read")
        # A broken file raises here, and the config in force stays.
        return await self.apply_config(self._reread_config())

    async def _on_unload(self, request: dict[str, Any]) -> dict[str, Any]:
        model = self._named(request)
        if not await self.engine.unload(model):
            raise RuntimeError(f"model {model.name!r} is not loaded")
        return {"unloaded": model.name}

    async def _on_load(self, request: dict[str, Any]) -> dict[str, Any]:
        loaded = await self.engine.load(self._named(request))
        return {"loaded": loaded.name, "context_length": loaded.context_length}

    async def _on_clients(self, _: dict[str, Any]) -> dict[str, Any]:
        # Where `pensievectl env` & co point Claude Code, and whether it fits.
        return await self.work.run(client_report, self.registry, self.engine, self.token)

    def _named(self, request: dict[str, Any]) -> ModelConfig:
        """The model a control command names (default: the default model)."""
        registry = self.registry
        name = str(request.get("model") or registry.default.name)
        try:
            return registry.get(name)
        except NotFound:
            try:
                reread = self._reread_config
                in_file = reread is not None and name in {m.name for m in reread().models}
            except ConfigError:
                in_file = False
            if in_file:
                raise NotFound(
                    f"model {name!r} is in the config file but not in force yet: "
                    "`pensievectl reload` applies the file"
                ) from None
            raise

    async def apply_config(self, new: Config) -> dict[str, Any]:
        """Put `new` in force without dropping requests; report what needs a restart.

        All or nothing: the new default model is loaded first, beside the models
        in force (and every new local source must exist), so a config that
        cannot serve is refused with the reason and the one in force stays.
        Then requests resolve under the new config, and a model whose entry
        changed or went away is unloaded once its in-flight requests finish.
        """
        engine, old = self.engine, self.registry.config
        for model in new.models:
            if model not in old.models:
                check_source(model)
        if not engine.is_loaded(new.default_model):
            try:
                await engine.load(new.default_model)
            except Exception as exc:
                raise RuntimeError(
                    f"not reloaded: the new default model {new.default_model.name!r} did not "
                    f"load ({exc}); the config in force stays"
                ) from exc
        changed = [k for k in RESTART_KEYS if getattr(old.server, k) != getattr(new.server, k)]
        # Until a restart the daemon keeps serving where it serves: `status`,
        # /health and `pensievectl env` must say that, not what the file says.
        kept = {key: getattr(old.server, key) for key in changed}
        new = replace(new, server=replace(new.server, **kept))
        self.registry.apply(new)
        engine.configure(new.engine)
        self.guard.configure(new.memory)
        retired = [m.config for m in engine.loaded() if m.config not in new.models]
        for model in retired:
            await engine.unload(model)
        log.info("config reloaded; unloaded %s", [m.name for m in retired] or "nothing")
        return {
            "reloaded": True,
            "unloaded": [m.name for m in retired],
            "restart_needed_for": [f"server.{key}" for key in changed],
        }

    # -- serving ----------------------------------------------------------

    async def _serve(self) -> int:
        config = self.registry.config
        check_port_free(config.server.host, config.server.port)
        if sys.platform == "linux":
            # Which BLAS MLX's CPU backend calls: prefill speed differs tenfold.
            blas = cpu.blas_report()
            log.log(blas.level, "CPU backend: %s", blas.describe())
        self.engine.start()
        self.guard.apply_mlx_limits()
        if not await self._warm(config):
            return 0
        self._server = self._granian(config)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, f"received {signum.name}")
        self.guard.start()
        watches = [
            loop.create_task(self._watch_stop_request()),
            loop.create_task(self._watch_idle_models()),
            loop.create_task(self._watch_listening()),
        ]
        log.info("pensieve listening on %s", config.base_url)
        try:
            await self._server.serve()
        finally:
            for watch in watches:
                watch.cancel()
            self.guard.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            self.engine.stop()
        log.info("stopped")
        return 0

    async def _warm(self, config: Config) -> bool:
        """Load the default model before the first request; False: memory says do not start."""
        guard, engine = self.guard, self.engine
        level = guard.sample()  # memory before the model takes its share
        if level is Level.SHUTDOWN:
            engine.stop()
            # Exit 0: launchd and systemd would restart a failure straight back into it.
            assert guard.reading is not None
            log.warning(
                "not starting: memory is critically low: %s",
                describe(guard.reading, guard.settings),
            )
            return False
        if level is Level.REJECT:
            log.warning("memory is low; the model loads with the first request memory allows")
            return True
        started = time.perf_counter()
        try:
            await engine.load(config.default_model)
        except Exception as exc:
            engine.stop()
            raise StartupError(
                f"model {config.default_model.name!r} failed to load: {exc}"
            ) from exc
        log.info("model warm in %.1fs", time.perf_counter() - started)
        return True

    def _granian(self, config: Config) -> Any:
        from granian.constants import Interfaces
        from granian.http import HTTP1Settings
        from granian.server.embed import Server

        app = create_app(
            self.registry, self.engine, self.token, self.started_at, self.guard, self.work
        )
        return Server(
            DisconnectWatcher(app),
            address=config.server.host,
            port=config.server.port,
            interface=Interfaces.ASGINL,
            websockets=False,
            log_access=False,
            # A client that never finishes its headers is dropped (slow loris).
            http1_settings=HTTP1Settings(
                header_read_timeout=int(config.server.header_timeout * 1000)
            ),
            backpressure=config.server.max_connections,
        )

    def request_stop(self, reason: str, drain_first: bool = True) -> None:
        """Stop serving: drain first (bounded by `drain_seconds`), or end requests now."""
        if self._server is None:
            return  # not serving yet: the start sees the memory level itself
        if self._stopping.is_set():
            # A second signal, or memory running out while draining: end now.
            log.info("%s; ending in-flight requests now", reason)
            self._cut_drain.set()
            return
        log.log(logging.INFO if drain_first else logging.WARNING, "%s; stopping", reason)
        self._stopping.set()
        self.guard.draining = True  # new requests get 529 from here on
        sd_notify("STOPPING=1")
        if not drain_first:
            self._cut_drain.set()
        self._tasks.add(asyncio.get_running_loop().create_task(self._stop()))

    async def _stop(self) -> None:
        seconds = self.registry.config.server.drain_seconds
        await drain(self.engine, seconds, self._cut_drain)
        # End in-flight streams with an error event, free the model, stop listening.
        await asyncio.to_thread(self.engine.stop)
        # Requests waiting on a prompt build get 529: Granian waits for every open request.
        self.work.close()
        await asyncio.sleep(0.2)
        self._server.stop()

    async def _watch_stop_request(self) -> None:
        await self._stop_requested.wait()
        self.request_stop("asked to stop over the control socket")

    async def _watch_idle_models(self) -> None:
        # `keep_alive`: free a model's memory after it sat idle that long.
        while True:
            await asyncio.sleep(1.0)
            for model, idle in self.engine.idle_models():
                if model.keep_alive is not None and idle > model.keep_alive:
                    log.info("model %s idle for %.0fs (keep_alive); unloading", model.name, idle)
                    await self.engine.unload(model)

    async def _watch_listening(self) -> None:
        # Granian binds inside serve(); tell systemd once connections succeed.
        config = self.registry.config
        for _ in range(200):
            try:
                _reader, writer = await asyncio.open_connection(
                    loopback_for(config.server.host), config.server.port
                )
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            sd_notify(f"READY=1\nSTATUS=serving on {config.base_url}\nMAINPID={os.getpid()}")
            return


async def drain(engine: Engine, seconds: float, cut: asyncio.Event) -> None:
    """Give in-flight requests up to `seconds` to finish (less once `cut` is set)."""
    active = engine.active_requests()
    if not active or cut.is_set():
        return
    log.info("draining: %d request(s) in flight get %gs to finish", active, seconds)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while engine.active_requests() and not cut.is_set():
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cut.wait(), min(0.05, remaining))
    left = engine.active_requests()
    if left:
        log.info("%d request(s) still running; ending them with an error event", left)
    else:
        log.info("drained")
