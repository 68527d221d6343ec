"""Run the daemon: warm the model, serve the app with embedded Granian, stop cleanly.

Granian's embedded server runs inside our own asyncio loop, so this process
owns its signal handlers and its exit code (launchd restarts only on a
non-zero exit). Granian does not end open SSE streams when it stops, so the
engine ends them first: each gets an `error` event instead of a silent cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import logging.handlers
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pensieved.config import Config, ConfigError, ModelConfig, ensure_token
from pensieved.engine import cpu
from pensieved.engine.core import Engine
from pensieved.http.app import create_app, health_report
from pensieved.http.asgi import DisconnectWatcher
from pensieved.http.origin import is_loopback
from pensieved.http.work import RequestWork
from pensieved.memory.admission import Admission
from pensieved.memory.guard import Level, MemoryGuard, describe
from pensieved.models.registry import ModelRegistry, check_source
from pensieved.paths import private_dir
from pensieved.service.clients import client_report
from pensieved.service.control import ControlServer, ControlSocketError
from pensieved.service.limits import raise_open_files
from pensieved.service.notify import sd_notify
from pensieved.service.units import STDERR_LOG, STDOUT_LOG, supervisor
from pensieved.wire.errors import NotFound

log = logging.getLogger(__name__)


LOG_FILE = "pensieved.log"


class _RotatingLog(logging.handlers.RotatingFileHandler):
    """Rotates once the file has passed its size, checked on the open stream.

    The standard handler stats the path and formats each record twice to
    decide before writing; every message logs a line or two from the event
    loop, so that cost was paid per request. The file may pass `maxBytes` by
    one line.
    """

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        return self.stream is not None and self.maxBytes > 0 and self.stream.tell() >= self.maxBytes


LOG_BYTES = 10 * 1024**2


def log_to_file(path: Path, supervised_by: str | None = None) -> None:
    """Also log to `path` (rotated), which `pensievectl logs` reads on every platform.

    Under launchd stderr is pensieved.err.log, a file launchd appends to and
    nothing rotates: the log then goes to `path` alone, each line once, and
    stderr keeps only what bypasses logging (a crash's traceback, native
    libraries' output). An out or err log past LOG_BYTES anyway is moved to
    `.1` at start; this run keeps writing there, the next one starts afresh.
    """
    private_dir(path.parent)
    handler = _RotatingLog(path, maxBytes=LOG_BYTES, backupCount=3)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if supervised_by == "launchd":
        for stderr in [h for h in root.handlers if getattr(h, "stream", None) is sys.stderr]:
            root.removeHandler(stderr)
        for name in (STDOUT_LOG, STDERR_LOG):
            output = path.with_name(name)
            with contextlib.suppress(OSError):
                if output.stat().st_size > LOG_BYTES:
                    os.replace(output, output.with_name(f"{name}.1"))
    root.addHandler(handler)


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why."""


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already serves, with a message saying so.

    Two probes, as neither is enough alone. A connect finds any listener that
    would take this address's connections: on macOS and the BSDs a bind with
    SO_REUSEADDR to 127.0.0.1 succeeds while another process listens on
    *:PORT, and then the two split the port by address. The bind finds what
    a connect cannot (a socket bound but not listening yet); it keeps
    SO_REUSEADDR so that a previous run's TIME_WAIT connections do not count.
    """
    in_use = StartupError(
        f"{host}:{port} is already in use (another Pensieve? "
        "`pensievectl env` shows the configured address)"
    )
    if _something_answers(host, port):
        raise in_use
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise in_use from exc
            raise StartupError(f"cannot listen on {host}:{port}: {exc}") from exc


def _something_answers(host: str, port: int) -> bool:
    """Whether a connection to host:port is accepted (a wildcard host: its loopback)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=1.0):
            return True
    except OSError:
        return False


async def serve(config: Config, reread_config: Callable[[], Config] | None = None) -> int:
    """Serve until SIGTERM/SIGINT or `pensievectl stop`; return the process exit code.

    `reread_config` gives the config as it is now (file and flags), for `reload`.
    """
    token = ensure_token(config)
    log_to_file(config.paths.log_dir / LOG_FILE, supervisor())
    before, after = raise_open_files()
    if after != before:
        log.info("open-file limit raised from %d to %d", before, after)
    started_at = time.time()
    host = config.server.host
    if not is_loopback(host):
        if not config.server.allow_remote:
            raise StartupError(
                f"server.host {host!r} is not a loopback address: other machines could "
                "reach the model. Set server.allow_remote = true to mean it."
            )
        log.warning("listening on %s: reachable from other machines (token required)", host)
    stop_requested = asyncio.Event()
    engine = Engine(config.paths.models_dir, config.engine)
    registry = ModelRegistry(config)
    guard = MemoryGuard(config.memory, engine=engine)
    # Prompt builds and other request work: threads of the daemon's own (http/work.py).
    work = RequestWork()
    # A model is loaded only if available memory stays above the reject line.
    engine.memory_floor_bytes = int(config.memory.reject_below_gb * 1024**3)
    engine.admission = Admission(guard).admit
    engine.available_memory = guard.available_memory
    # Under memory pressure the prefix cache gives back half of what it holds.
    guard.shrink_callbacks.append(
        lambda: engine.prefix_cache.shrink(engine.prefix_cache.nbytes // 2)
    )

    async def status(_: dict[str, Any]) -> dict[str, Any]:
        report = health_report(registry.config, engine, started_at, guard)
        # Prompt excerpts: on the owner-only control socket, never in /health.
        report["prompt_cache"]["recent_misses"] = list(engine.prefix_cache.misses)
        return report

    async def stop_command(_: dict[str, Any]) -> dict[str, Any]:
        stop_requested.set()
        return {"stopping": True}

    async def reload(_: dict[str, Any]) -> dict[str, Any]:
        if reread_config is None:
            raise RuntimeError("this daemon was started without a config to re-read")
        # A broken file raises here, and the config in force stays.
        return await apply_config(reread_config(), registry, engine, guard)

    def named(request: dict[str, Any]) -> ModelConfig:
        name = str(request.get("model") or registry.default.name)
        try:
            return registry.get(name)
        except NotFound:
            try:
                in_file = reread_config is not None and name in {
                    m.name for m in reread_config().models
                }
            except ConfigError:
                in_file = False
            if in_file:
                raise NotFound(
                    f"model {name!r} is in the config file but not in force yet: "
                    "`pensievectl reload` applies the file"
                ) from None
            raise

    async def unload(request: dict[str, Any]) -> dict[str, Any]:
        model = named(request)
        if not await engine.unload(model):
            raise RuntimeError(f"model {model.name!r} is not loaded")
        return {"unloaded": model.name}

    async def load(request: dict[str, Any]) -> dict[str, Any]:
        loaded = await engine.load(named(request))
        return {"loaded": loaded.name, "context_length": loaded.context_length}

    async def clients(_: dict[str, Any]) -> dict[str, Any]:
        # Where `pensievectl env` & co point Claude Code, and whether it fits.
        return await work.run(client_report, registry, engine, token)

    handlers = {"status": status, "stop": stop_command, "reload": reload, "unload": unload}
    control = ControlServer(
        config.paths.control_socket, {**handlers, "load": load, "clients": clients}
    )
    try:
        await control.start()
    except ControlSocketError as exc:  # already running, path too long, not ours
        raise StartupError(str(exc)) from exc
    try:
        return await _serve(registry, token, engine, guard, stop_requested, started_at, work)
    finally:
        work.close()  # builds still running are not waited for (cli.py bounds the exit)
        await control.close()


# Settings the running server took at start: a reload reports them, a restart applies them.
RESTART_KEYS = ("host", "port", "allow_remote", "header_timeout", "max_connections", "auth_token")


async def apply_config(
    new: Config, registry: ModelRegistry, engine: Engine, guard: MemoryGuard
) -> dict[str, Any]:
    """Put `new` in force without dropping requests; report what needs a restart.

    All or nothing: the new default model is loaded first, beside the models
    in force (and every new local source must exist), so a config that
    cannot serve is refused with the reason and the one in force stays.
    Then requests resolve under the new config, and a model whose entry
    changed or went away is unloaded once its in-flight requests finish.
    """
    old = registry.config
    for model in new.models:
        if model not in old.models:
            check_source(model)
    if not engine.is_loaded(new.default_model):
        try:
            await engine.load(new.default_model)
        except Exception as exc:
            raise RuntimeError(
                f"not reloaded: the new default model {new.default_model.name!r} did not load "
                f"({exc}); the config in force stays"
            ) from exc
    changed = [key for key in RESTART_KEYS if getattr(old.server, key) != getattr(new.server, key)]
    # Until a restart the daemon keeps serving where it serves: `status`,
    # /health and `pensievectl env` must say that, not what the file says.
    kept = {key: getattr(old.server, key) for key in changed}
    new = dataclasses.replace(new, server=dataclasses.replace(new.server, **kept))
    restart = [f"server.{key}" for key in changed]
    registry.apply(new)
    engine.configure(new.engine)
    guard.configure(new.memory)
    engine.memory_floor_bytes = int(new.memory.reject_below_gb * 1024**3)
    retired = [m.config for m in engine.loaded() if m.config not in new.models]
    for config in retired:
        await engine.unload(config)
    log.info("config reloaded; unloaded %s", [c.name for c in retired] or "nothing")
    return {
        "reloaded": True,
        "unloaded": [c.name for c in retired],
        "restart_needed_for": restart,
    }


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


async def _serve(
    registry: ModelRegistry,
    token: str,
    engine: Engine,
    guard: MemoryGuard,
    stop_requested: asyncio.Event,
    started_at: float,
    work: RequestWork,
) -> int:
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    config = registry.config
    host, port = config.server.host, config.server.port
    check_port_free(host, port)

    if sys.platform == "linux":
        # Which BLAS MLX's CPU backend calls: prefill speed differs tenfold.
        blas = cpu.blas_report()
        log.log(blas.level, "CPU backend: %s", blas.describe())
    engine.start()
    guard.apply_mlx_limits()
    # Read memory before the model takes its share.
    level = guard.sample()
    if level is Level.SHUTDOWN:
        engine.stop()
        # Exit 0: launchd and systemd would restart a failure straight back into it.
        assert guard.reading is not None
        log.warning(
            "not starting: memory is critically low: %s", describe(guard.reading, guard.settings)
        )
        return 0
    if level is Level.REJECT:
        log.warning("memory is low; the model loads with the first request memory allows")
    else:
        started = time.perf_counter()
        # Warm before the first request: load the default model now.
        try:
            await engine.load(config.default_model)
        except Exception as exc:
            engine.stop()
            raise StartupError(
                f"model {config.default_model.name!r} failed to load: {exc}"
            ) from exc
        log.info("model warm in %.1fs", time.perf_counter() - started)

    app = create_app(registry, engine, token, started_at, guard, work)
    server = Server(
        DisconnectWatcher(app),
        address=host,
        port=port,
        interface=Interfaces.ASGINL,
        websockets=False,
        log_access=False,
        # A client that never finishes its headers is dropped (slow loris).
        http1_settings=HTTP1Settings(header_read_timeout=int(config.server.header_timeout * 1000)),
        backpressure=config.server.max_connections,
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    cut_drain = asyncio.Event()
    stop_tasks: set[asyncio.Task[None]] = set()

    def request_stop(reason: str, drain_first: bool = True) -> None:
        if stopping.is_set():
            # A second signal, or memory running out while draining: end now.
            log.info("%s; ending in-flight requests now", reason)
            cut_drain.set()
            return
        log.log(logging.INFO if drain_first else logging.WARNING, "%s; stopping", reason)
        stopping.set()
        guard.draining = True  # new requests get 529 from here on
        sd_notify("STOPPING=1")
        if not drain_first:
            cut_drain.set()

        async def stop() -> None:
            await drain(engine, registry.config.server.drain_seconds, cut_drain)
            # End in-flight streams with an error event, free the model, stop listening.
            await asyncio.to_thread(engine.stop)
            # Requests waiting on a prompt build get 529: Granian waits for every open request.
            work.close()
            await asyncio.sleep(0.2)
            server.stop()  # type: ignore[no-untyped-call]

        stop_tasks.add(loop.create_task(stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, f"received {signum.name}")
    guard.on_shutdown = lambda reason: request_stop(reason, drain_first=False)
    guard.start()

    async def stop_on_request() -> None:
        await stop_requested.wait()
        request_stop("asked to stop over the control socket")

    stop_watch = loop.create_task(stop_on_request())

    async def unload_idle_models() -> None:
        # `keep_alive`: free a model's memory after it sat idle that long.
        while True:
            await asyncio.sleep(1.0)
            for model, idle in engine.idle_models():
                if model.keep_alive is not None and idle > model.keep_alive:
                    log.info("model %s idle for %.0fs (keep_alive); unloading", model.name, idle)
                    await engine.unload(model)

    idle_watch = loop.create_task(unload_idle_models())
    log.info("pensieve listening on %s", config.base_url)

    async def ready_when_listening() -> None:
        # Granian binds inside serve(); tell systemd once connections succeed.
        for _ in range(200):
            try:
                _reader, writer = await asyncio.open_connection(probe_host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            sd_notify(f"READY=1\nSTATUS=serving on {config.base_url}\nMAINPID={os.getpid()}")
            return

    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    ready = loop.create_task(ready_when_listening())
    try:
        await server.serve()
    finally:
        ready.cancel()
        stop_watch.cancel()
        idle_watch.cancel()
        guard.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        engine.stop()
    log.info("stopped")
    return 0
