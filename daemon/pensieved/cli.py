"""`pensieved`: the daemon's command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from pensieved import __version__
from pensieved.config import Config, ConfigError, config_option, load_config, with_overrides


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

    On Linux, when the system has OpenBLAS, the daemon re-executes itself with
    it preloaded (MLX's CPU backend is several times faster with it); set
    PENSIEVE_OPENBLAS=0 to prevent that.
    """
    from pensieved.engine.cpu import reexec_with_openblas

    reexec_with_openblas([sys.executable, "-m", "pensieved", *sys.argv[1:]])
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from pensieved.service.server import StartupError, serve

    try:

        def current_config() -> Config:
            return with_overrides(load_config(config_path), host, port, model)

        code = asyncio.run(serve(current_config(), current_config))
    except (ConfigError, StartupError) as exc:
        click.echo(f"pensieved: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)
