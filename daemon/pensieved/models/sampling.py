"""Sampling for requests that leave it unset: the config's, the model's own, else Pensieve's.

The settings are temperature, top_p, top_k, min_p and repetition_penalty
(over the last 64 tokens, end-of-turn tokens exempt: constraints.py).
Claude Code sends no `temperature`, `top_p` or `top_k`, so every turn would
sample a local model's whole distribution at the API's default temperature
of 1.0, and a small model then writes junk. Each setting a request leaves
unset is taken, in order, from the model's `[models.NAME]` table, from its
authors' recommendation (`generation_config.json` beside the weights, which
a GGUF import writes from the file's `general.sampling.*` metadata or an
Ollama Modelfile's `PARAMETER` lines), and else from `FALLBACK`. A value the
request sets always wins. This is what Ollama, LM Studio and llama.cpp's
server do with their own defaults.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pensieved.config import SAMPLING_RANGES, ModelConfig

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# llama.cpp's defaults (LM Studio uses the same): a temperature a little under
# 1, and a tail cut three ways, so that a token the model gives almost no
# chance is never written. min_p 0.05 drops what is under 5% of the likeliest
# token's probability, the cut that keeps a small model out of junk strings.
# No repetition penalty (1.0), as llama.cpp: code repeats itself on purpose.
FALLBACK: dict[str, float | int] = {
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repetition_penalty": 1.0,
}

# Where a setting came from, as `status` and `/health` show it.
FROM_CONFIG, FROM_MODEL, FROM_PENSIEVE = "config", "model", "pensieve"


@dataclass(frozen=True)
class SamplingDefaults:
    """The settings in force for requests that leave them unset, and where each came from."""

    temperature: float = float(FALLBACK["temperature"])
    top_p: float = float(FALLBACK["top_p"])
    top_k: int = int(FALLBACK["top_k"])
    min_p: float = float(FALLBACK["min_p"])
    repetition_penalty: float = float(FALLBACK["repetition_penalty"])
    sources: Mapping[str, str] = field(default_factory=lambda: dict.fromkeys(FIELDS, FROM_PENSIEVE))

    def report(self) -> dict[str, Any]:
        """`{"temperature": {"value": 0.2, "from": "model"}, ...}` for status and /health."""
        return {name: {"value": getattr(self, name), "from": self.sources[name]} for name in FIELDS}


def recommended(model_dir: Path | None) -> dict[str, float | int]:
    """The sampling a model's `generation_config.json` recommends (valid values only)."""
    if model_dir is None:
        return {}
    path = model_dir / GENERATION_CONFIG
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    return valid_settings(data, str(path)) if isinstance(data, dict) else {}


def valid_settings(values: Mapping[str, Any], origin: str) -> dict[str, float | int]:
    """The sampling keys of `values` that are numbers in their range; others are logged and left."""
    found: dict[str, float | int] = {}
    for name in FIELDS:
        value = values.get(name)
        if value is None:
            continue
        low, high, low_allowed = SAMPLING_RANGES[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            not number
            or not math.isfinite(value)
            or not low <= value <= high
            or (value == low and not low_allowed)
            or (name == "top_k" and value != int(value))
        ):
            log.warning("ignoring %s = %r in %s: out of range", name, value, origin)
            continue
        found[name] = int(value) if name == "top_k" else float(value)
    return found


def defaults_for(
    config: ModelConfig, model_recommends: Mapping[str, float | int]
) -> SamplingDefaults:
    """Each setting from the config, else the model's recommendation, else `FALLBACK`."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in FIELDS:
        configured = getattr(config, name)
        if configured is not None:
            values[name], sources[name] = configured, FROM_CONFIG
        elif name in model_recommends:
            values[name], sources[name] = model_recommends[name], FROM_MODEL
        else:
            values[name], sources[name] = FALLBACK[name], FROM_PENSIEVE
    return SamplingDefaults(
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        top_k=int(values["top_k"]),
        min_p=float(values["min_p"]),
        repetition_penalty=float(values["repetition_penalty"]),
        sources=sources,
    )


def write_recommendation(model_dir: Path, settings: Mapping[str, float | int]) -> None:
    """Record `settings` in `model_dir`'s generation_config.json (merged into one there)."""
    path = model_dir / GENERATION_CONFIG
    try:
        existing = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        existing = {}
    if not isinstance(existing, dict):
        existing = {}
    path.write_text(json.dumps({**existing, **settings}, indent=2))
