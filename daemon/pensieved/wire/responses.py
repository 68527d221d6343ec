"""The response shapes of the Messages API, as plain dicts: messages, usage, content blocks.

Every field the official schemas (and their `?beta=true` counterparts)
require is present, with the values strict clients accept, so that a reply
validates against the SDKs' models; ids are made here too.
"""

from __future__ import annotations

import secrets
from typing import Any


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def usage(
    input_tokens: int, output_tokens: int, cache_read: int = 0, thinking_tokens: int = 0
) -> dict[str, Any]:
    """Every field of the official `Usage` shape, and of `BetaUsage`, so strict clients validate.

    One shape serves `/v1/messages` and `?beta=true` alike: each schema
    requires its own fields and allows the other's.
    """
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens_details": {"thinking_tokens": thinking_tokens},
        "server_tool_use": None,
        "service_tier": "standard",
        "inference_geo": None,
        "speed": "standard",
        "iterations": None,
        "fallback_credit": None,
    }


def delta_usage(
    input_tokens: int, output_tokens: int, cache_read: int = 0, thinking_tokens: int = 0
) -> dict[str, Any]:
    """A stream's closing counts: the official `MessageDeltaUsage` (and its beta) shape."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "output_tokens_details": {"thinking_tokens": thinking_tokens},
        "server_tool_use": None,
        "iterations": None,
        "fallback_credit": None,
    }


def message(
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str | None,
    stop_sequence: str | None,
    usage_: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "stop_details": None,
        "container": None,
        # Required by `BetaMessage` (`?beta=true`, as Claude Code calls).
        "context_management": None,
        "diagnostics": None,
        "usage": usage_,
    }


def token_count(input_tokens: int) -> dict[str, Any]:
    """A `count_tokens` answer; `context_management` is required by the beta shape."""
    return {"input_tokens": input_tokens, "context_management": None}


def text_block(text: str) -> dict[str, Any]:
    # The schema requires the key and allows a list or null; the Vercel AI
    # SDK rejects null. An empty list satisfies both.
    return {"type": "text", "text": text, "citations": []}


def new_tool_use_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


def tool_use_block(block_id: str, name: str, input_: Any) -> dict[str, Any]:
    # Called by the model itself: the schema's default caller, as the API sends it.
    # No branch of the schema accepts null (nor does the Vercel AI SDK).
    return {
        "type": "tool_use",
        "id": block_id,
        "name": name,
        "input": input_,
        "caller": {"type": "direct"},
    }


def thinking_block(thinking: str, signature: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": thinking, "signature": signature}
