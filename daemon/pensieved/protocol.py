"""The Anthropic Messages wire format: request structs, validation, response shapes.

Requests are decoded with msgspec straight from bytes; its error paths
(`$.messages[0].content`) become Anthropic-style field names
(`messages.0.content`). Unknown fields are ignored, as Claude Code and newer
SDKs send many (`context_management`, `output_config`, `speed`, ...).
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from pensieved.errors import InvalidRequest

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    text: str
    cache_control: Any = None
    citations: Any = None


class ImageBlock(msgspec.Struct, tag="image", tag_field="type"):
    source: Any = None
    cache_control: Any = None


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type"):
    source: Any = None
    cache_control: Any = None
    title: str | None = None


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Any
    cache_control: Any = None


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock | DocumentBlock] = ""
    is_error: bool = False
    cache_control: Any = None


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


ContentBlock = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
)


class InputMessage(msgspec.Struct):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(msgspec.Struct):
    name: str
    description: str = ""
    input_schema: Any = None


class CountTokensRequest(msgspec.Struct):
    model: str
    messages: list[InputMessage]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None
    thinking: Any = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    temperature: Probability | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


RequestT = TypeVar("RequestT", CountTokensRequest, MessagesRequest)

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def decode_request(body: bytes, kind: type[RequestT]) -> RequestT:
    """Decode and validate a request body, or raise `InvalidRequest` naming the field."""
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        request = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_field_message(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        # msgspec stops at Python's recursion limit (~1000 levels).
        raise InvalidRequest("request body is nested too deeply") from exc
    if not request.messages:
        raise InvalidRequest("messages: at least one message is required")
    for i, stop in enumerate(getattr(request, "stop_sequences", None) or []):
        if not stop:
            raise InvalidRequest(f"stop_sequences.{i}: must not be empty")
    return request


def _field_message(error: str) -> str:
    """`Expected int, got str - at `$.max_tokens`` → `max_tokens: Expected int, got str`."""
    missing = re.match(r"Object missing required field `(?P<field>\w+)`", error)
    match = _PATH.search(error)
    path = match.group("path") if match else ""
    path = re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")
    if missing:
        field = f"{path}.{missing.group('field')}" if path else missing.group("field")
        return f"{field}: Field required"
    message = _PATH.sub("", error)
    return f"{path}: {message}" if path else message


def new_message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def usage(input_tokens: int, output_tokens: int, cache_read: int = 0) -> dict[str, Any]:
    """Every field of the official `Usage` shape, so strictly typed clients validate."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": None,
        "service_tier": "standard",
        "inference_geo": None,
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
        "usage": usage_,
    }


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "citations": None}
