"""`pensievectl`: commands for the user's shell.

Kept fast to start: importing this module loads no MLX; commands that need
it (`import`) import it when they run.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from pensievectl import model_commands
from pensievectl.claude_env import MINIMAL_MODE, ClaudeSetup, claude_setup, shell_lines
from pensievectl.config_commands import config_group
from pensievectl.daemon_link import ask, config_of
from pensievectl.service_commands import service
from pensieved.config import (
    ConfigError,
    config_option,
    load_config,
)
from pensieved.service import control


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """Control the Pensieve daemon."""
    try:
        ctx.obj = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option(
    "--shell",
    type=click.Choice(["bash", "zsh", "fish"]),
    default="bash",
    show_default=True,
    help="Syntax of the lines printed.",
)
@click.option(
    "--model-tiers",
    is_flag=True,
    hidden=True,
    help="Kept for older scripts: the tiers are always printed now.",
)
@click.pass_context
def env(ctx: click.Context, shell: str, model_tiers: bool) -> None:
    """Print the environment that points Claude Code and the SDKs at Pensieve.

    Use it as: eval "$(pensievectl env)". It asks the running daemon (else
    reads the config): ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN, the local
    model each Claude Code tier resolves to (ANTHROPIC_DEFAULT_{OPUS,SONNET,
    HAIKU}_MODEL, ANTHROPIC_MODEL), and the model's compaction window. When
    that model cannot hold Claude Code's full prompt, it also sets
    CLAUDE_CODE_SIMPLE=1 (Claude Code's minimal mode) and says why in a
    comment line.
    """
    for line in shell_lines(_claude_setup(ctx), shell):
        click.echo(line)


def _claude_setup(ctx: click.Context) -> ClaudeSetup:
    try:
        return claude_setup(config_of(ctx))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command(name="setup-claude")
@click.option("--undo", is_flag=True, help="Put the settings file back as it was before.")
@click.pass_context
def setup_claude(ctx: click.Context, undo: bool) -> None:
    """Point Claude Code at Pensieve in its user settings (~/.claude/settings.json).

    Merges what `env` prints (address, token, model tiers, compaction window,
    and CLAUDE_CODE_SIMPLE=1 when the model is too small for Claude Code's
    full prompt) into the file's `env` object, and leaves every other setting
    as it is. The file is first backed up to settings.json.pensieve-backup
    (once: running again keeps the original); --undo restores it byte for
    byte, or removes the file if there was none. CLAUDE_CONFIG_DIR overrides
    ~/.claude.
    """
    from pensievectl import claude_settings

    path = claude_settings.settings_file()
    try:
        if undo:
            click.echo(claude_settings.undo(path))
            return
        setup = _claude_setup(ctx)
        variables = setup.variables()
        remove = () if setup.minimal else (MINIMAL_MODE,)
        backup = claude_settings.install(path, variables, remove)
    except (claude_settings.SettingsError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if backup is not None and backup.name.endswith(claude_settings.ABSENT_SUFFIX):
        click.echo(f"created {path} (there was none: --undo removes it)")
    elif backup is not None:
        click.echo(f"backed up {path} to {backup.name}")
    click.echo(f"updated {path}: " + ", ".join(variables))
    if setup.minimal:
        click.echo(f"note: {setup.minimal_reason()}")
    click.echo("undo with: pensievectl setup-claude --undo")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's report as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show whether the daemon runs, its models, requests and memory.

    Exits 0 when it is running and 3 when it is not.
    """
    report = ask(config_of(ctx), "status")
    report.pop("ok", None)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    memory, requests, cache = report["memory"], report["requests"], report["prompt_cache"]
    rows = [
        ("status", f"running (pid {report['pid']}, up {_duration(report['uptime_s'])})"),
        ("version", report["version"]),
        ("listening", report["listen"]),
        ("backend", _backend(report["backend"])),
        (
            "requests",
            f"{requests['active']} active, {requests['served']} served, "
            f"{requests['tokens_per_s_last_minute']:.1f} tok/s over the last minute",
        ),
        (
            "memory",
            f"{memory['rss_gb']:.2f} GB resident, {memory['mlx_active_gb']:.2f} GB MLX, "
            f"{memory['available_gb']:.1f} GB of {memory['total_gb']:.1f} GB available, "
            f"KV cache {memory['kv_cache_gb'] * 1024:.1f} MB",
        ),
        (
            "prompt cache",
            f"{cache['bytes'] / MB:.1f} MB of {cache['budget_bytes'] / MB:.0f} MB, "
            f"{cache['entries']} entries, {cache['hit_tokens']} prompt tokens served from it",
        ),
        (
            "memory level",
            f"{memory['level']} ("
            f"{'accepting' if memory['accepting_requests'] else 'refusing'} requests; "
            f"warn below {memory['warn_below_gb']:g} GB, reject below "
            f"{memory['reject_below_gb']:g} GB, shutdown below {memory['shutdown_below_gb']:g} GB"
            f"; kernel pressure {memory['pressure'] or 'unknown'})",
        ),
    ]
    for model in report["models"]:
        state = "loaded" if model["loaded"] else "not loaded"
        if model["loaded"]:
            state += f", {model['memory_gb']:.2f} GB, context {model['context_length']}"
        default = " (default)" if model["name"] == report["model"] else ""
        rows.append((f"model {model['name']}{default}", f"{state} — {model['source']}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
    misses = cache.get("recent_misses") or []
    if misses:
        click.echo("\nrecent prompt-cache misses (where a prompt left its nearest cached one):")
    for miss in misses:
        click.echo(
            f"  {miss['at']}  {miss['model']}: token {miss['diverged_at']} of "
            f"{miss['prompt_tokens']}, {miss['lost_tokens']} cached tokens past it unused"
        )
        click.echo(f"    shared  …{_excerpt(miss['before'])}")
        click.echo(f"    new     {_excerpt(miss['new'])}…")
        click.echo(f"    cached  {_excerpt(miss['cached'])}…")


MB = 1024**2


def _backend(backend: dict[str, Any]) -> str:
    """`device cpu, OpenBLAS 0.3.33 (... wheel), kernel Haswell, 1 thread` and the like."""
    parts = [f"device {backend['device']}"]
    if backend.get("blas"):
        parts.append(backend["blas"])
    if backend.get("blas_kernel"):
        parts.append(f"kernel {backend['blas_kernel']}")
    threads = backend.get("blas_threads")
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if backend.get("blas_coretype"):
        parts.append(f"OPENBLAS_CORETYPE={backend['blas_coretype']}")
    if backend.get("blas_fallback"):
        parts.append(f"not OpenBLAS: {backend['blas_fallback']}")
    return ", ".join(parts)


def _excerpt(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@main.command()
@click.option("--timeout", default=40.0, show_default=True, help="Seconds to wait for the exit.")
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop the daemon gracefully: open streams end with an error event, it exits 0.

    A daemon installed as a service stays stopped until the next login or
    `pensievectl service install`.
    """
    config = config_of(ctx)
    ask(config, "stop")
    deadline = time.monotonic() + timeout
    while control.socket_answers(config.paths.control_socket):
        if time.monotonic() > deadline:
            raise click.ClickException(f"the daemon did not exit within {timeout:.0f}s")
        time.sleep(0.1)
    click.echo("stopped")


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read the config and apply it without dropping in-flight requests.

    A changed model is unloaded once its requests finish, then the new one is
    loaded; requests arriving meanwhile wait. A broken config is refused with
    its error and the one in force stays.
    """
    answer = ask(config_of(ctx), "reload")
    unloaded = ", ".join(answer["unloaded"]) or "nothing"
    click.echo(f"reloaded (unloaded: {unloaded})")
    if answer["restart_needed_for"]:
        click.echo("restart to apply: " + ", ".join(answer["restart_needed_for"]))


@main.command()
@click.option("--model", help="Model name (default: the default model).")
@click.pass_context
def unload(ctx: click.Context, model: str | None) -> None:
    """Free a model's memory now; the next request for it loads it again."""
    answer = ask(config_of(ctx), "unload", model=model)
    click.echo(f"unloaded {answer['unloaded']}")


@main.command()
@click.option("--model", help="Model name (default: the default model).")
@click.pass_context
def load(ctx: click.Context, model: str | None) -> None:
    """Load a model now, so that its first request is warm."""
    answer = ask(config_of(ctx), "load", model=model)
    click.echo(f"loaded {answer['loaded']} (context {answer['context_length']} tokens)")


@main.command()
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.pass_context
def logs(ctx: click.Context, lines: int, follow: bool) -> None:
    """Show the daemon's log (LOG_DIR/pensieved.log)."""
    path = config_of(ctx).paths.log_dir / "pensieved.log"
    if not path.exists() and not follow:
        raise click.ClickException(f"no log yet at {path}: the daemon has not run")
    if path.exists():
        with path.open(errors="replace") as fh:
            for line in collections.deque(fh, maxlen=lines):
                click.echo(line, nl=False)
    if follow:
        _follow(path)


def _follow(path: Path) -> None:
    position = path.stat().st_size if path.exists() else 0
    identity = path.stat().st_ino if path.exists() else None
    try:
        while True:
            if path.exists():
                info = path.stat()
                if info.st_ino != identity or info.st_size < position:
                    identity, position = info.st_ino, 0  # rotated: start the new file
                if info.st_size > position:
                    with path.open(errors="replace") as fh:
                        fh.seek(position)
                        click.echo(fh.read(), nl=False)
                        position = fh.tell()
            time.sleep(0.25)
    except KeyboardInterrupt:
        pass


@main.command()
@click.pass_context
def prepare(ctx: click.Context) -> None:
    """Import the embedded and GGUF-sourced models now, so the first start is quick.

    `make setup` runs this. Models already imported are left as they are.
    """
    from pensieved.models.gguf import GGUFImportError
    from pensieved.models.registry import materialize

    config = config_of(ctx)
    for model in config.models:
        try:
            location = materialize(model, config.paths.models_dir)
        except (GGUFImportError, FileNotFoundError) as exc:
            raise click.ClickException(f"{model.name}: {exc}") from exc
        click.echo(f"{model.name}: {location}")


@main.command()
@click.option(
    "--pull/--no-pull",
    default=None,
    help="Download the model a fix recommends without asking, or never offer to "
    "(default: ask when run in a terminal).",
)
@click.pass_context
def doctor(ctx: click.Context, pull: bool | None) -> None:
    """Check what makes Claude Code work on Pensieve, and say how to fix what fails.

    Asks the running daemon and this machine: the daemon and its token, Claude
    Code's install and version, this shell's environment against `env
    --model-tiers`, and for each tier's model its context against Claude
    Code's prompt rendered through its template, its tool-call format,
    structured output, memory for weights plus a Claude-Code-sized KV, and a
    two-turn prompt-cache check. When a model is too small or too big for
    Claude Code, offers to pull the recommended one (as `pull` does) and says
    how to make it the default. Exits 1 when Claude Code cannot work.
    """
    from pensievectl import doctor as checks
    from pensievectl.hub import pull as download

    results = checks.run_checks(config_of(ctx))
    click.echo(checks.table(results))
    checks.offer_pulls(
        results,
        pull=pull,
        interactive=sys.stdin.isatty() and sys.stdout.isatty(),
        confirm=lambda question: click.confirm(question, default=False),
        download=download,
        echo=click.echo,
    )
    if checks.cannot_work(results):
        raise click.exceptions.Exit(1)


for command in (*model_commands.COMMANDS, config_group, service):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
