"""What the client commands need from the running daemon: its address, and whether Claude Code fits.

`pensievectl env`, `setup-claude`, `claude-local` and `doctor` ask the daemon
that is running (over the control socket) rather than read the config file:
a daemon started with `--port` or `--config`, or one whose file changed since,
serves what it serves, not what the file says. For each model a Claude Code
tier resolves to, the report gives its context and Claude Code's full
prompt rendered through its template with the tokenizer alone (no weights
are loaded for this), which decides Claude Code's minimal mode.
"""

from __future__ import annotations

import json
from typing import Any

from pensieved.config import ModelConfig
from pensieved.engine.core import Engine
from pensieved.models.registry import CLAUDE_TIERS, ModelRegistry
from pensieved.wire.claude_code import captured_request
from pensieved.wire.decode import decode_request
from pensieved.wire.protocol import CountTokensRequest


def client_report(registry: ModelRegistry, engine: Engine, token: str) -> dict[str, Any]:
    """`{"base_url", "token", "tiers": {tier: model}, "models": {model: {context, prompt}}}`.

    Renders up to three prompts of ~20k tokens: call it off the event loop.
    """
    config = registry.config
    tiers: dict[str, str] = {}
    for tier in CLAUDE_TIERS:
        model = registry.tier(tier)
        if model is not None:
            tiers[tier] = model.name
    requests = {
        key: decode_request(json.dumps(captured_request(minimal)).encode(), CountTokensRequest)
        for key, minimal in (("claude_code_prompt_tokens", False), ("minimal_prompt_tokens", True))
    }
    models = {
        name: _fit(registry.get(name), engine, requests) for name in dict.fromkeys(tiers.values())
    }
    return {"base_url": config.base_url, "token": token, "tiers": tiers, "models": models}


def _fit(
    model: ModelConfig, engine: Engine, requests: dict[str, CountTokensRequest]
) -> dict[str, Any]:
    """The model's context and Claude Code's prompts through its template (None: unknown)."""
    loaded = next((m for m in engine.loaded() if m.config == model), None)
    if loaded is not None:
        builder, context = loaded.builder, loaded.context_length
    else:
        front = engine.front_end(model)  # None until a GGUF source is imported
        if front is None:
            return {"context_length": model.context_length, **dict.fromkeys(requests)}
        builder, context = front.builder, front.context_length
    counts = {key: len(builder.build(request).tokens) for key, request in requests.items()}
    return {"context_length": context, **counts}
