"""Run the daemon: warm the model, serve the app with embedded Granian, stop cleanly.

Granian's embedded server runs inside our own asyncio loop, so this process
owns its signal handlers and its exit code (launchd restarts only on a
non-zero exit). Granian does not end open SSE streams when it stops, so the
engine ends them first: each gets an `error` event instead of a silent cut.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time

from pensieved import cpu
from pensieved.app import create_app, health_report
from pensieved.config import Config, ensure_token
from pensieved.control import AlreadyRunning, ControlServer
from pensieved.engine import Engine
from pensieved.guard import is_loopback
from pensieved.http import DisconnectWatcher
from pensieved.notify import sd_notify

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the message says why."""


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"{host}:{port} is already in use (another Pensieve? "
                    "`pensievectl env` shows the configured address)"
                ) from exc
            raise StartupError(f"cannot listen on {host}:{port}: {exc}") from exc


async def serve(config: Config) -> int:
    """Serve until SIGTERM/SIGINT or `pensievectl stop`; return the process exit code."""
    token = ensure_token(config)
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

    async def status(_: dict[str, object]) -> dict[str, object]:
        return health_report(config, engine, started_at)

    async def stop_command(_: dict[str, object]) -> dict[str, object]:
        stop_requested.set()
        return {"stopping": True}

    control = ControlServer(config.paths.control_socket, {"status": status, "stop": stop_command})
    try:
        await control.start()
    except AlreadyRunning as exc:
        raise StartupError(str(exc)) from exc
    try:
        return await _serve(config, token, engine, stop_requested, started_at)
    finally:
        await control.close()


async def _serve(
    config: Config,
    token: str,
    engine: Engine,
    stop_requested: asyncio.Event,
    started_at: float,
) -> int:
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    host, port = config.server.host, config.server.port
    check_port_free(host, port)

    if cpu.openblas_active():
        log.info("CPU backend: using the system OpenBLAS")
    engine.start()
    started = time.perf_counter()
    # Warm before the first request: load the default model now.
    try:
        await engine.load(config.default_model)
    except Exception as exc:
        engine.stop()
        raise StartupError(f"model {config.default_model.name!r} failed to load: {exc}") from exc
    log.info("model warm in %.1fs", time.perf_counter() - started)

    app = create_app(config, engine, token, started_at)
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
    stop_tasks: set[asyncio.Task[None]] = set()

    def request_stop(reason: str) -> None:
        if stopping.is_set():
            return
        log.info("%s; stopping", reason)
        stopping.set()
        sd_notify("STOPPING=1")

        async def stop() -> None:
            # End in-flight streams with an error event, then stop listening.
            await asyncio.to_thread(engine.stop)
            await asyncio.sleep(0.2)
            server.stop()  # type: ignore[no-untyped-call]

        stop_tasks.add(loop.create_task(stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, f"received {signum.name}")

    async def stop_on_request() -> None:
        await stop_requested.wait()
        request_stop("asked to stop over the control socket")

    stop_watch = loop.create_task(stop_on_request())
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
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        engine.stop()
    log.info("stopped")
    return 0
