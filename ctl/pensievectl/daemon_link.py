"""What every pensievectl command shares: the config in force and the daemon's answers."""

from __future__ import annotations

from typing import Any

import click

from pensieved.config import Config
from pensieved.service import control


def config_of(ctx: click.Context) -> Config:
    config: Config = ctx.obj
    return config


def ask(config: Config, command: str, **arguments: Any) -> dict[str, Any]:
    """The daemon's answer to `command`, or a one-line error when it is not running."""
    path = config.paths.control_socket
    try:
        # Loading a big model can take minutes.
        answer = control.call(path, command, timeout=600, **arguments)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"pensieve is not running (no daemon on {path})") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"the daemon on {path} did not answer: {exc}") from exc
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error", "the daemon refused")))
    return answer


class NotRunning(click.ClickException):
    exit_code = 3  # like `systemctl status` for a stopped unit
