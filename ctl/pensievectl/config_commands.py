"""`pensievectl config`: where the config file is, what is in force, and one key changed.

`main` in cli.py registers the group.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import tomli_w

from pensievectl.daemon_link import config_of
from pensieved.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_as_toml,
    parse_config,
)
from pensieved.paths import write_private


@click.group(name="config")
def config_group() -> None:
    """Read or change the config file (changes take effect with `pensievectl reload`)."""


@config_group.command(name="path")
@click.pass_context
def config_path(ctx: click.Context) -> None:
    """Print where the config file is (it may not exist yet)."""
    click.echo(str(_config_file(ctx)))


@config_group.command(name="show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the config in force, defaults included, as TOML."""
    config = config_of(ctx)
    click.echo(tomli_w.dumps(config_as_toml(config)), nl=False)


@config_group.command(name="set")
@click.argument("key")
@click.argument("value")
@click.pass_context
def config_set(ctx: click.Context, key: str, value: str) -> None:
    """Set KEY (dotted, e.g. server.port or models.NAME.source) to VALUE.

    VALUE is read as TOML (9000, true, 2.5, ["claude-*"]) and otherwise as a
    string. The result is validated before the file is written.
    """
    path = _config_file(ctx)
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    seeded = []
    if key.startswith("models.") and "models" not in data:
        # [models.*] tables replace the built-in list as a whole: write the
        # models in force first, so that adding one keeps the embedded model.
        data["models"] = model_tables(config_of(ctx))
        seeded = list(data["models"])
    parts = key.split(".")
    table = data
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise click.ClickException(f"{key}: {part} is not a table")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    table[parts[-1]] = parsed
    try:
        parse_config(data, config_of(ctx).paths)
    except ConfigError as exc:
        raise click.ClickException(f"not written: {exc}") from exc
    # 0600, renamed into place: the file may hold the token (server.auth_token).
    write_private(path, tomli_w.dumps(data).encode())
    click.echo(f"{key} = {tomli_w.dumps({'v': parsed})[4:].strip()}  ({path})")
    if seeded:
        click.echo(f"kept {', '.join(seeded)} (the models in force) beside it; apply with reload")


def model_tables(config: Config) -> dict[str, dict[str, object]]:
    """`config`'s models as [models.*] tables, each with only what differs from the defaults."""
    defaults = config_as_toml(Config(models=(ModelConfig("-", "-"),)))["models"]["-"]
    tables = config_as_toml(config)["models"]
    return {
        name: {k: v for k, v in table.items() if k == "source" or defaults.get(k) != v}
        for name, table in tables.items()
    }


def _config_file(ctx: click.Context) -> Path:
    explicit: Path | None = ctx.find_root().params.get("config_path")
    return explicit or config_of(ctx).paths.config_file
