"""pensievectl's commands that get and manage models: import, pull, models, rm.

`main` in cli.py registers them. Nothing here imports MLX at module level.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click
import tomli_w

from pensievectl.daemon_link import NotRunning
from pensievectl.daemon_link import ask as _ask
from pensievectl.daemon_link import config_of as _config
from pensieved.config import Config


@click.command(name="import")
@click.argument("source")
@click.option("--name", help="Name of the model directory to create (default: from SOURCE).")
@click.pass_context
def import_(ctx: click.Context, source: str, name: str | None) -> None:
    """Import a llama-architecture GGUF model as an MLX model.

    SOURCE is a .gguf file, a model of the local Ollama store as
    ollama:NAME[:TAG] (e.g. ollama:llama3.2:1b), or a manifest or blob path
    under the store (~/.ollama/models; OLLAMA_MODELS overrides). The model
    lands in Pensieve's models directory; point a [models.NAME] source at the
    printed path.
    """
    from pensieved.models import ollama

    if ollama.is_reference(source):
        try:
            found = ollama.find(source)
        except ollama.OllamaError as exc:
            raise click.ClickException(str(exc)) from exc
        gguf_file, default_name, sampling = found.blob, found.name, found.sampling
    else:
        gguf_file = Path(source).expanduser()
        if not gguf_file.is_file():
            raise click.BadParameter(f"{source}: no such file", param_hint="SOURCE")
        default_name = gguf_file.stem.lower()
        sampling = {}
    name = name or default_name
    if not name or "/" in name or name.startswith("."):
        raise click.BadParameter("must be a plain directory name", param_hint="--name")
    from pensieved.models.gguf import GGUFImportError, import_gguf  # imports MLX: only here

    target = _config(ctx).paths.models_dir / name
    try:
        with tempfile.TemporaryDirectory() as scratch:
            # MLX picks the file format by extension, and Ollama's blobs have none.
            readable = gguf_file
            if gguf_file.suffix.lower() != ".gguf":
                readable = Path(scratch) / f"{name}.gguf"
                readable.symlink_to(gguf_file.resolve())
            import_gguf(readable, target, sampling)
    except GGUFImportError as exc:
        raise click.ClickException(str(exc)) from exc
    if readable != gguf_file:  # record where it really came from
        marker = target / "pensieve-import.json"
        recorded = json.loads(marker.read_text())
        marker.write_text(json.dumps({**recorded, "source": str(gguf_file)}))
    click.echo(str(target))


@click.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit (default: main).")
@click.option("--name", help="Model name for the printed config snippet (default: from REPO_ID).")
def pull(repo_id: str, revision: str | None, name: str | None) -> None:
    """Download an MLX model from the Hugging Face hub (e.g. an mlx-community repo).

    It goes to the Hugging Face cache, where the daemon finds it by repo id;
    an interrupted download resumes. Offline (HF_HUB_OFFLINE=1 or no network)
    a repo already in the cache is found there. Prints the local path and the
    config lines that serve it.
    """
    from pensievectl.hub import PullError
    from pensievectl.hub import pull as download

    try:
        path = download(repo_id, revision)
    except PullError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))
    click.echo("\nTo serve it, add to the config (then `pensievectl reload`):\n")
    click.echo(serving_snippet(repo_id, name))
    click.echo('# aliases = ["claude-*haiku*"]   # the client names it should serve')


def serving_snippet(repo_id: str, name: str | None = None, **settings: Any) -> str:
    """The config lines of a model served from `repo_id` (named after it by default)."""
    name = name or repo_id.rsplit("/", 1)[-1].lower()
    return tomli_w.dumps({"models": {name: {"source": repo_id, **settings}}}).rstrip()


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the lists as JSON.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List configured models, models on disk (downloaded or imported) and loaded ones.

    Loaded models come from the running daemon; without one, none are.
    """
    from pensievectl import inventory

    config = _config(ctx)
    on_disk = inventory.downloads(config)
    running = _loaded_models(config)
    loaded = {m["name"]: m for m in running or []}
    configured: list[dict[str, Any]] = []
    for model in config.models:
        download = inventory.location(model, config, on_disk)
        configured.append(
            {
                "name": model.name,
                "source": model.source,
                "aliases": list(model.aliases),
                "default": model.default,
                "context_length": model.context_length,
                "on_disk": str(download.path) if download else None,
                "size_bytes": download.size_bytes if download else None,
                "loaded": model.name in loaded,
            }
        )
    downloaded: list[dict[str, Any]] = [
        {"name": d.name, "kind": d.kind, "path": str(d.path), "size_bytes": d.size_bytes}
        for d in on_disk
    ]
    if as_json:
        report = {"configured": configured, "downloaded": downloaded}
        click.echo(json.dumps({**report, "loaded": list(loaded.values())}, indent=2))
        return
    click.echo("configured:")
    for row in configured:
        details = [row["source"]]
        if row["aliases"]:
            details.append("aliases " + ", ".join(row["aliases"]))
        if row["default"]:
            details.append("default")
        if row["context_length"]:
            details.append(f"context {row['context_length']}")
        if row["size_bytes"] is not None:
            details.append(inventory.human_size(row["size_bytes"]) + " on disk")
        click.echo(f"  {row['name']}  ({'; '.join(details)})")
    click.echo("downloaded:" + ("" if downloaded else " none"))
    for row in downloaded:
        size = inventory.human_size(row["size_bytes"])
        click.echo(f"  {row['name']}  ({row['kind']}, {size}, {row['path']})")
    if running is None:
        click.echo("loaded: none (the daemon is not running)")
    else:
        click.echo("loaded:" + ("" if loaded else " none"))
    for entry in loaded.values():
        click.echo(
            f"  {entry['name']}  ({entry['memory_gb']:.2f} GB, context {entry['context_length']})"
        )


def _loaded_models(config: Config) -> list[dict[str, Any]] | None:
    """The daemon's loaded models; None when it is not running."""
    try:
        report = _ask(config, "status")
    except NotRunning:
        return None
    return [m for m in report["models"] if m.get("loaded")]


@click.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def rm(ctx: click.Context, name: str, yes: bool) -> None:
    """Delete a downloaded or imported model from disk.

    NAME is a folder in the models directory, a Hugging Face repo id in the
    cache, or a configured model's name. Refused while a configured model
    served from it is loaded, and for the embedded model.
    """
    from pensievectl import inventory

    config = _config(ctx)
    on_disk = inventory.downloads(config)
    download = next((d for d in on_disk if d.name == name), None)
    configured = next((m for m in config.models if m.name == name), None)
    if download is None and configured is not None:
        if inventory.is_builtin(configured):
            raise click.ClickException(f"{name} is the embedded model; it cannot be removed")
        download = inventory.location(configured, config, on_disk)
        if download is None:
            raise click.ClickException(
                f"{name}: its source {configured.source} is not a download or import of "
                "Pensieve's; delete it yourself if you mean to"
            )
    if download is None:
        raise click.ClickException(f"{name}: no such downloaded or imported model (see `models`)")
    served = inventory.users(download, config, on_disk)
    if any(inventory.is_builtin(m) for m in served):
        raise click.ClickException(f"{name} holds the embedded model; it cannot be removed")
    loaded = {m["name"] for m in _loaded_models(config) or []}
    busy = [m.name for m in served if m.name in loaded]
    if busy:
        raise click.ClickException(
            f"{name} is loaded as {', '.join(busy)}; `pensievectl unload --model {busy[0]}` first"
        )
    size = inventory.human_size(download.size_bytes)
    if not yes:
        click.confirm(f"Delete {download.path} ({size})?", abort=True)
    if download.cached is not None:
        from pensievectl.hub import remove

        remove(download.cached)
    else:
        shutil.rmtree(download.path)
    click.echo(f"removed {download.path} ({size})")
    if served:
        names = ", ".join(m.name for m in served)
        click.echo(f"still configured: {names} (its next load will fail or download again)")


COMMANDS = (import_, pull, models, rm)
