"""What models this machine has: configured, downloaded or imported, and loaded.

`pensievectl models` prints it and `pensievectl rm` deletes from it. Loaded
models come from the daemon's status; everything else is read from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pensievectl import hub
from pensieved.config import BUILTIN_SOURCE, Config, ModelConfig
from pensieved.models.registry import HUB_PREFIX
from pensieved.models.registry import is_builtin as builtin_source


@dataclass(frozen=True)
class Download:
    """A model on disk that `pensievectl rm` may delete."""

    name: str  # the imported folder's name, or the repo id
    kind: str  # "imported" or "hugging face"
    path: Path
    size_bytes: int
    cached: hub.CachedModel | None = None


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def downloads(config: Config) -> list[Download]:
    """Imported model folders under the models directory, then MLX repos in the HF cache."""
    found = []
    models_dir = config.paths.models_dir
    if models_dir.is_dir():
        for folder in sorted(models_dir.iterdir()):
            if folder.is_dir() and (folder / "config.json").is_file():
                found.append(Download(folder.name, "imported", folder, folder_size(folder)))
    for cached in hub.cached_models():
        size = cached.size_bytes
        found.append(Download(cached.repo_id, "hugging face", cached.path, size, cached))
    return found


def is_builtin(model: ModelConfig) -> bool:
    return builtin_source(model.source)


def location(model: ModelConfig, config: Config, on_disk: list[Download]) -> Download | None:
    """The download that a configured model's source uses, if it is one."""
    source = model.source
    if is_builtin(model):
        wanted = config.paths.models_dir / BUILTIN_SOURCE.split(":", 1)[1]
    elif source.lower().endswith(".gguf"):
        wanted = config.paths.models_dir / model.name  # where registry.materialize imports it
    else:
        wanted = Path(source).expanduser()
    repo = source.removeprefix(HUB_PREFIX)
    for download in on_disk:
        if download.name == repo or download.path == wanted or download.path == _real(wanted):
            return download
    return None


def users(download: Download, config: Config, on_disk: list[Download]) -> list[ModelConfig]:
    """The configured models served from `download`."""
    return [m for m in config.models if location(m, config, on_disk) == download]


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover
