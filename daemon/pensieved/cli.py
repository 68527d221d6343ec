"""`pensieved`: the daemon's command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

import click

from pensieved import __version__
from pensieved.config import Config, ConfigError, config_option, load_config, with_overrides
from pensieved.service.units import EXIT_CANNOT_START, EXIT_CRASHED, supervisor

log = logging.getLogger("pensieved")

# Seconds the process may take to end once the daemon has stopped: streams
# are ended, the model freed and the log written by then, and a prompt build
# still running on a worker thread (its result has no reader) must not keep
# the process alive and growing. asyncio.run and the interpreter's exit both
# wait for worker threads, with no limit.
EXIT_WAIT_S = 3.0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--host", help="Address to listen on (overrides [server] host).")
@click.option("--port", type=int, help="Port to listen on (overrides [server] port).")
@click.option(
    "--model",
    help="Source for the default model: a local MLX directory, a .gguf file, "
    "a Hugging Face repo id, or builtin:smollm2-135m-instruct.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.version_option(__version__, prog_name="pensieved")
def main(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    model: str | None,
    log_level: str,
) -> None:
    """Serve a warm local MLX model through the Anthropic Messages API.

    Exits 0 once stopped, 1 when it cannot start (port in use, bad config, a
    model that fails to load, a Mac MLX does not run on), 70 after a crash.
    Started by launchd (PENSIEVE_SUPERVISOR=launchd), it exits 0 instead of 1:
    launchd would restart it every 10 s, and starting again fixes none of those.

    On Linux the daemon re-executes itself with OpenBLAS preloaded (the
    system's, else the wheel `make setup` installs): MLX's CPU backend
    prefills an order of magnitude faster with it. Its first lines and
    /health say which BLAS runs; PENSIEVE_OPENBLAS=0 keeps the reference
    BLAS, PENSIEVE_OPENBLAS=/path/to/libopenblas.so names the library.
    """
    from pensieved.service.preflight import this_host, unsupported

    # Before anything imports MLX, which is not even installed on an Intel Mac.
    if problem := unsupported(this_host()):
        _cannot_start(problem)
    from pensieved.engine.openblas import reexec_with_openblas

    reexec_with_openblas([sys.executable, "-m", "pensieved", *sys.argv[1:]])
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pensieved.service.listen import StartupError
    from pensieved.service.server import serve

    try:

        def current_config() -> Config:
            return with_overrides(load_config(config_path), host, port, model)

        async def serve_then_leave() -> int:
            try:
                code = await serve(current_config(), current_config)
            except (ConfigError, StartupError):
                raise  # refused before serving: no worker has started
            except Exception:
                exit_within(EXIT_WAIT_S, EXIT_CRASHED)
                raise
            exit_within(EXIT_WAIT_S, code)
            return code

        code = asyncio.run(serve_then_leave())
    except (ConfigError, StartupError) as exc:
        _cannot_start(str(exc))
    except Exception:
        log.exception("pensieved crashed")
        sys.exit(EXIT_CRASHED)
    sys.exit(code)


def exit_within(seconds: float, code: int) -> None:
    """End the process with `code` in `seconds`, unless it has ended by then."""

    def leave() -> None:
        stuck = [
            thread.name
            for thread in threading.enumerate()
            if not thread.daemon and thread is not threading.main_thread()
        ]
        log.warning("exiting without waiting for %s", ", ".join(stuck) or "the interpreter")
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(code)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def _cannot_start(message: str) -> NoReturn:
    if supervisor() == "launchd":
        # Logged, not echoed: under launchd stderr is the unrotated err log,
        # and the log file (once open) is what `pensievectl logs` shows.
        log.error(
            "not starting: %s. launchd will not restart it: fix this, then run "
            "`pensievectl service install` (or log out and in)",
            message,
        )
        sys.exit(0)
    click.echo(f"pensieved: {message}", err=True)
    sys.exit(EXIT_CANNOT_START)
