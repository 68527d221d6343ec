"""MLX models from the Hugging Face hub: download (`pull`) and the local cache.

Downloads go to the Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`), the
same place `mlx_lm.load` looks for a repo id, so a pulled repo works as a
`source` as it is. `huggingface_hub` is imported only when used: it is slow
to import and most commands do not need it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


class PullError(Exception):
    """The repo could not be downloaded nor found in the local cache."""


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    path: Path  # the repo's folder in the cache (models--org--name)
    snapshot: Path | None  # the newest snapshot with an MLX model in it
    size_bytes: int


def pull(repo_id: str, revision: str | None = None) -> Path:
    """Download `repo_id` (resuming a partial download) and return its snapshot folder.

    Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable), a repo already in
    the cache is found there instead.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        try:
            # Shows tqdm progress bars; interrupted files resume from their .incomplete part.
            path = snapshot_download(repo_id, revision=revision)
        except LocalEntryNotFoundError:
            raise  # offline and not cached: retrying locally cannot help
        except (OSError, ConnectionError) as exc:
            # The hub is unreachable (or refused): a cached copy still does.
            try:
                path = snapshot_download(repo_id, revision=revision, local_files_only=True)
            except LocalEntryNotFoundError:
                raise PullError(f"{repo_id}: download failed ({exc}) and not cached") from exc
    except LocalEntryNotFoundError as exc:
        raise PullError(
            f"{repo_id}: not in the local Hugging Face cache, and downloads are off "
            f"or the hub is unreachable ({exc})"
        ) from exc
    except PullError:
        raise
    except HFValidationError as exc:
        raise PullError(f"{repo_id}: not a repo id ({exc})") from exc
    except Exception as exc:  # the hub's HTTP errors: missing repo, gated, bad revision
        raise PullError(f"{repo_id}: {exc}") from exc
    snapshot = Path(str(path))
    if not is_mlx_model(snapshot):
        raise PullError(
            f"{repo_id}: downloaded to {snapshot}, but it has no config.json and "
            "*.safetensors weights, so it is not an MLX model (look for an mlx-community repo)"
        )
    return snapshot


def is_mlx_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def cached_models() -> list[CachedModel]:
    """Model repos in the Hugging Face cache that hold an MLX model."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        snapshots = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        snapshot = next(
            (Path(r.snapshot_path) for r in snapshots if is_mlx_model(Path(r.snapshot_path))),
            None,
        )
        if snapshot is not None:
            path = Path(repo.repo_path)
            found.append(CachedModel(repo.repo_id, path, snapshot, repo.size_on_disk))
    return sorted(found, key=lambda m: m.repo_id.lower())


def remove(model: CachedModel) -> None:
    shutil.rmtree(model.path)
