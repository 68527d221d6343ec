"""`pensievectl service`: the daemon at login, as a LaunchAgent or a systemd user unit.

`main` in cli.py registers the group.
"""

from __future__ import annotations

import sys

import click

from pensievectl.daemon_link import config_of
from pensieved.service.manager import ServiceError, ServiceManager
from pensieved.service.units import describe


@click.group()
def service() -> None:
    """Run the daemon at login: a LaunchAgent on macOS, a systemd user unit on Linux."""


def _manager(ctx: click.Context, platform: str = sys.platform) -> ServiceManager:
    return ServiceManager(describe(config_of(ctx.find_root())), platform=platform)


@service.command()
@click.pass_context
def install(ctx: click.Context) -> None:
    """Write the service file and start the daemon; run again after an upgrade to restart it.

    On macOS it loads into gui/UID in a GUI login and user/UID otherwise (ssh,
    headless); a daemon already loaded is stopped (drained) and loaded again
    from the new plist. It refuses a checkout or PENSIEVE_HOME in a folder
    macOS keeps launchd's programs out of (~/Documents, ~/Desktop, ~/Downloads,
    iCloud Drive, /Volumes). HF_HOME, HF_HUB_CACHE, HF_TOKEN and the proxy
    variables, when set, are copied into the service's environment; with
    HF_TOKEN the file is written 0600.
    """
    manager = _manager(ctx)
    try:
        path = manager.install()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"installed {path}")
    for note in manager.notes():
        click.echo(f"note: {note}", err=True)


@service.command()
@click.pass_context
def uninstall(ctx: click.Context) -> None:
    """Stop the daemon and remove the service file."""
    manager = _manager(ctx)
    try:
        manager.uninstall()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"removed {manager.service_file}")


@service.command()
@click.option(
    "--platform",
    type=click.Choice(["macos", "linux"]),
    default="macos" if sys.platform == "darwin" else "linux",
    show_default="this one",
    help="Whose service file to print: the launchd plist or the systemd user unit.",
)
@click.pass_context
def show(ctx: click.Context, platform: str) -> None:
    """Print the service file that `install` would write, and install nothing.

    Stdout is exactly the file (`pensievectl service show > FILE` works);
    the path `install` would write it to goes to stderr.
    """
    manager = _manager(ctx, "darwin" if platform == "macos" else "linux")
    click.echo(manager.render(), nl=False)
    click.echo(f"would be written to {manager.service_file}", err=True)
