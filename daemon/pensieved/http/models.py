"""`GET /v1/models` and `GET /v1/models/{model_id}`: the models served, in Anthropic's shape.

The list holds each configured model, then, for each Claude tier (opus,
sonnet, haiku) whose name resolves to a local model, an entry under that
`claude-` name: Claude Code's model picker keeps only ids matching
`^(claude|anthropic)`, so a list of local names alone would show it nothing.
A single model is looked up like any request's `model`: by id, alias or the
fallback, so every name `/v1/messages` serves is found and any other is a
404. Pages follow the API's cursors (`limit`, `after_id`, `before_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import falcon
import falcon.asgi

from pensieved.config import ModelConfig
from pensieved.engine.core import Engine
from pensieved.http.asgi import json_response
from pensieved.models.registry import CLAUDE_TIERS, ModelRegistry
from pensieved.wire.errors import InvalidRequest

# The API documents an epoch `created_at` when the release date is unknown,
# as it is for a local model.
UNKNOWN_RELEASE = "1970-01-01T00:00:00Z"
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


@dataclass(frozen=True)
class ModelEntry:
    id: str
    display_name: str
    model: ModelConfig


def model_entries(registry: ModelRegistry) -> list[ModelEntry]:
    """What `GET /v1/models` lists, in order."""
    entries = [ModelEntry(m.name, m.name, m) for m in registry.models]
    taken = {entry.id for entry in entries}
    for tier, name in CLAUDE_TIERS.items():
        model = registry.tier(tier)
        if model is not None and name not in taken:
            entries.append(ModelEntry(name, f"{model.name} (as Claude {tier.title()})", model))
            taken.add(name)
    return entries


def page(
    ids: list[str], limit: int, after_id: str | None, before_id: str | None
) -> tuple[slice, bool]:
    """The slice of `ids` a page holds, and whether more lie beyond it in its direction."""
    if after_id is not None and before_id is not None:
        raise InvalidRequest("after_id and before_id cannot be used together")
    if before_id is not None:
        end = _position(ids, before_id, "before_id")
        start = max(0, end - limit)
        return slice(start, end), start > 0
    start = 0 if after_id is None else _position(ids, after_id, "after_id") + 1
    end = min(len(ids), start + limit)
    return slice(start, end), end < len(ids)


def _position(ids: list[str], cursor: str, field: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        raise InvalidRequest(f"{field}: no model has the id {cursor!r}") from None


def _limit(req: falcon.asgi.Request) -> int:
    raw = req.get_param("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit: must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
    return limit


class ModelsResource:
    def __init__(self, registry: ModelRegistry, engine: Engine) -> None:
        self._registry = registry
        self._engine = engine

    def _info(self, entry: ModelEntry) -> dict[str, Any]:
        model = entry.model
        context = model.context_length
        if context is None:
            loaded = {m.config: m for m in self._engine.loaded()}
            context = loaded[model].context_length if model in loaded else None
        return {
            "type": "model",
            "id": entry.id,
            "display_name": entry.display_name,
            "created_at": UNKNOWN_RELEASE,
            "max_input_tokens": context,
            "max_tokens": context,
            "capabilities": None,
            # Required by the beta shape (`?beta=true`); no fallbacks here.
            "allowed_fallback_models": None,
        }

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        entries = model_entries(self._registry)
        ids = [entry.id for entry in entries]
        window, has_more = page(
            ids, _limit(req), req.get_param("after_id"), req.get_param("before_id")
        )
        data = [self._info(entry) for entry in entries[window]]
        json_response(
            resp,
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            },
        )

    async def on_get_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model_id: str
    ) -> None:
        # A listed id answers as listed; any other name as the model it
        # resolves to (as the API answers an alias with its snapshot).
        for entry in model_entries(self._registry):
            if entry.id == model_id:
                break
        else:
            model = self._registry.resolve(model_id)
            entry = ModelEntry(model.name, model.name, model)
        # Pensieve's extension: the sampling a request that leaves it unset gets.
        sampling = self._engine.sampling_defaults(entry.model).report()
        json_response(resp, {**self._info(entry), "sampling_defaults": sampling})
