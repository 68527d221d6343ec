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

from pensieved.wire.errors import InvalidRequest

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
    # Client tools have no type or "custom"; Anthropic's server tools
    # (web_search_..., code_execution_...) name theirs and run remotely.
    type: str | None = None
    cache_control: Any = None
    # Constrain this tool's input to its schema even under tool_choice auto.
    strict: bool | None = None
    # Left out of the prompt until a tool_reference block names it (tool search).
    defer_loading: bool | None = None


class ToolChoiceAuto(msgspec.Struct, tag="auto", tag_field="type"):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(msgspec.Struct, tag="any", tag_field="type"):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(msgspec.Struct, tag="tool", tag_field="type"):
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(msgspec.Struct, tag="none", tag_field="type"):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class ThinkingEnabled(msgspec.Struct, tag="enabled", tag_field="type"):
    budget_tokens: Annotated[int, msgspec.Meta(ge=1024)]


class ThinkingAdaptive(msgspec.Struct, tag="adaptive", tag_field="type"):
    pass


class ThinkingDisabled(msgspec.Struct, tag="disabled", tag_field="type"):
    pass


Thinking = ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled

class JsonOutputFormat(msgspec.Struct, tag="json_schema", tag_field="type"):
    """Structured output: the reply's text is JSON valid under `schema`."""

    schema: dict[str, Any]


class OutputConfig(msgspec.Struct):
    format: JsonOutputFormat | None = None
    effort: str | None = None


# Anthropic's rule for client tool names.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


class CountTokensRequest(msgspec.Struct):
    model: str
    messages: list[InputMessage]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # The older, top-level spelling of output_config.format.
    output_format: JsonOutputFormat | None = None


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
    _check_tools(request)
    _check_tool_results(request)
    thinking = request.thinking
    if (
        isinstance(request, MessagesRequest)
        and isinstance(thinking, ThinkingEnabled)
        and thinking.budget_tokens >= request.max_tokens
    ):
        raise InvalidRequest(
            "thinking.budget_tokens: must be less than max_tokens "
            f"({thinking.budget_tokens} >= {request.max_tokens})"
        )
    return request


def _check_tools(request: CountTokensRequest) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(request.tools or []):
        where = f"tools.{i}"
        if tool.type not in (None, "custom"):
            raise InvalidRequest(
                f"{where}: tool {tool.name!r} has type {tool.type!r}, a server tool that "
                "runs on Anthropic's side; this server runs client tools only"
            )
        if not TOOL_NAME.match(tool.name):
            raise InvalidRequest(
                f"{where}.name: tool name {tool.name!r} must match ^[a-zA-Z0-9_-]{{1,128}}$"
            )
        if tool.name in seen:
            raise InvalidRequest(f"{where}.name: tool names must be unique: {tool.name!r}")
        seen.add(tool.name)
        schema = tool.input_schema
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise InvalidRequest(
                f"{where}.input_schema: tool {tool.name!r} needs a JSON schema object "
                'with "type": "object"'
            )
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceAny | ToolChoiceTool):
        if not request.tools:
            raise InvalidRequest(
                f"tool_choice: type {'any' if isinstance(choice, ToolChoiceAny) else 'tool'!r} "
                "needs tools"
            )
        if isinstance(choice, ToolChoiceTool) and choice.name not in seen:
            raise InvalidRequest(f"tool_choice.name: no tool named {choice.name!r} in tools")
        if isinstance(request.thinking, ThinkingEnabled | ThinkingAdaptive):
            raise InvalidRequest(
                "tool_choice: thinking may not be enabled when tool_choice forces tool use"
            )


def _check_tool_results(request: CountTokensRequest) -> None:
    """Each `tool_result` answers a `tool_use` of the assistant turn just before it."""
    previous_calls: set[str] = set()
    for index, msg in enumerate(request.messages):
        blocks = msg.content if isinstance(msg.content, list) else []
        if msg.role == "user":
            for block_index, block in enumerate(blocks):
                if isinstance(block, ToolResultBlock) and block.tool_use_id not in previous_calls:
                    raise InvalidRequest(
                        f"messages.{index}.content.{block_index}: unexpected `tool_use_id` "
                        f"found in `tool_result` blocks: {block.tool_use_id}. Each "
                        "`tool_result` block must have a corresponding `tool_use` block "
                        "in the previous message."
                    )
        if msg.role != "system":
            previous_calls = {b.id for b in blocks if isinstance(b, ToolUseBlock)}


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


def new_tool_use_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


def tool_use_block(block_id: str, name: str, input_: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": block_id, "name": name, "input": input_, "caller": None}


def thinking_block(thinking: str, signature: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": thinking, "signature": signature}
