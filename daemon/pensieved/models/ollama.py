"""Models in a local Ollama store, found through its manifests.

An Ollama store (`~/.ollama/models`, or `$OLLAMA_MODELS`) keeps each model as
a manifest, `manifests/<registry>/<namespace>/<name>/<tag>`, whose layer of
media type `application/vnd.ollama.image.model` names the GGUF weights as a
content-addressed blob, `blobs/sha256-<hex>`; a layer of media type
`application/vnd.ollama.image.params` holds the Modelfile's `PARAMETER` lines
as JSON (the recommended sampling among them). Reading that needs no Ollama.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pensieved.models.sampling import valid_settings

MODEL_LAYER = "application/vnd.ollama.image.model"
PARAMS_LAYER = "application/vnd.ollama.image.params"
# A params layer is a few hundred bytes; anything far larger is not one.
PARAMS_MAX_BYTES = 1024**2
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
PREFIX = "ollama:"


class OllamaError(ValueError):
    """The reference does not lead to a GGUF blob in the store."""


@dataclass(frozen=True)
class OllamaModel:
    name: str  # e.g. "qwen2.5-coder-7b" for library/qwen2.5-coder:7b
    manifest: Path
    blob: Path
    # The Modelfile's recommended sampling (temperature, top_p, top_k, min_p).
    sampling: dict[str, float | int] = field(default_factory=dict)


def store_dir() -> Path:
    """The local Ollama store: `$OLLAMA_MODELS`, or `~/.ollama/models`."""
    configured = os.environ.get("OLLAMA_MODELS")
    return Path(configured).expanduser() if configured else Path.home() / ".ollama" / "models"


def is_reference(text: str) -> bool:
    """Whether `text` names an Ollama model: `ollama:NAME[:TAG]` or a path in the store."""
    if text.startswith(PREFIX):
        return True
    path = Path(text).expanduser()
    return path.exists() and _inside(path.resolve(), store_dir().resolve())


def find(reference: str) -> OllamaModel:
    """The manifest and GGUF blob behind `ollama:NAME[:TAG]` or a path in the store."""
    store = store_dir()
    if reference.startswith(PREFIX):
        return _from_manifest(_manifest_for(store, reference[len(PREFIX) :]), store)
    path = Path(reference).expanduser().resolve()
    manifests = (store / "manifests").resolve()
    if path.is_file() and _inside(path, manifests):
        return _from_manifest(path, store)
    if path.is_dir() and _inside(path, manifests) and (path / DEFAULT_TAG).is_file():
        return _from_manifest(path / DEFAULT_TAG, store)
    if path.is_file() and path.parent == (store / "blobs").resolve():
        name = path.name.removeprefix("sha256-")[:12]
        return OllamaModel(f"ollama-{name}", path, path)
    raise OllamaError(
        f"{reference}: not a manifest (manifests/REGISTRY/NAMESPACE/NAME/TAG) "
        f"or blob (blobs/sha256-...) of the Ollama store {store}"
    )


def _manifest_for(store: Path, name: str) -> Path:
    # NAME[:TAG] where NAME is `model`, `namespace/model` or `registry/namespace/model`.
    name, _, tag = name.partition(":")
    parts = [p for p in name.split("/") if p]
    if not parts or not 1 <= len(parts) <= 3 or any(p in (".", "..") for p in parts):
        raise OllamaError(f"ollama:{name}: expected ollama:NAME[:TAG], e.g. ollama:llama3.2:1b")
    if len(parts) == 1:
        parts.insert(0, DEFAULT_NAMESPACE)
    if len(parts) == 2:
        parts.insert(0, DEFAULT_REGISTRY)
    manifest = store.joinpath("manifests", *parts, tag or DEFAULT_TAG)
    if not manifest.is_file():
        raise OllamaError(
            f"ollama:{name}:{tag or DEFAULT_TAG}: not in the Ollama store {store} "
            f"(no {manifest}); `ollama pull` it first"
        )
    return manifest


def _from_manifest(manifest: Path, store: Path) -> OllamaModel:
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer["mediaType"] == MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OllamaError(f"{manifest}: not an Ollama manifest ({exc})") from exc
    except StopIteration:
        raise OllamaError(f"{manifest}: has no {MODEL_LAYER} layer") from None
    algorithm, _, hex_digest = str(digest).partition(":")
    if algorithm != "sha256" or not hex_digest.isalnum():
        raise OllamaError(f"{manifest}: unexpected digest {digest!r}")
    blob = store / "blobs" / f"sha256-{hex_digest}"
    if not blob.is_file():
        raise OllamaError(f"{manifest}: its weights {blob} are missing from the store")
    tag = manifest.name
    model = manifest.parent.name
    name = model if tag == DEFAULT_TAG else f"{model}-{tag}"
    return OllamaModel(name.replace(":", "-"), manifest, blob, _sampling(layers, store))


def _sampling(layers: list[Any], store: Path) -> dict[str, float | int]:
    """The sampling a manifest's params layer recommends; {} without a readable one."""
    digest = next(
        (layer.get("digest") for layer in layers if layer.get("mediaType") == PARAMS_LAYER), None
    )
    algorithm, _, hex_digest = str(digest).partition(":")
    if algorithm != "sha256" or not hex_digest.isalnum():
        return {}
    blob = store / "blobs" / f"sha256-{hex_digest}"
    try:
        if blob.stat().st_size > PARAMS_MAX_BYTES:
            return {}
        params = json.loads(blob.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(params, dict):
        return {}
    # Ollama's name for it; the rest are generation_config.json's names.
    if "repeat_penalty" in params:
        params["repetition_penalty"] = params.pop("repeat_penalty")
    return valid_settings(params, str(blob))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents
