"""Request bodies decoded and validated: what the API refuses, refused in its own words.

Requests are decoded with msgspec straight from bytes into the structs of
protocol.py; its error paths (`$.messages[0].content`) become Anthropic-style
field names (`messages.0.content`). Block types newer than this server in
assistant turns and tool results are dropped, not refused: a conversation
begun in the cloud must go on here. The checks after decoding refuse what the
API refuses, in its own words.

Every check is linear in the body, and client values quoted in an error are
cut short (`shown`): a 32 MB body must cost neither minutes nor a 32 MB message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar, get_args

import msgspec

from pensieved.wire.client_tools import KNOWN_CLIENT_TOOL_TYPES, client_tool_definition
from pensieved.wire.errors import InvalidRequest, shown
from pensieved.wire.protocol import (
    MAX_STOP_SEQUENCE_BYTES,
    ContentBlock,
    CountTokensRequest,
    InputMessage,
    MessagesRequest,
    TextBlock,
    ThinkingAdaptive,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceTool,
    ToolResultBlock,
    ToolResultContent,
    ToolUseBlock,
)

log = logging.getLogger(__name__)

# Anthropic's rule for client tool names.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

RequestT = TypeVar("RequestT", CountTokensRequest, MessagesRequest)

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def decode_request(body: bytes, kind: type[RequestT]) -> RequestT:
    """Decode and validate a request body, or raise `InvalidRequest` naming the field."""
    request = decode_body(body, kind, _decode)
    check_request(request)
    return request


AnyT = TypeVar("AnyT")


def decode_body(
    body: bytes, kind: type[AnyT], decode: Callable[[bytes, type[AnyT]], AnyT] | None = None
) -> AnyT:
    """`body` as a `kind`, or `InvalidRequest` naming the field (any API's request struct)."""
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        if decode is None:
            return msgspec.json.decode(body, type=kind)
        return decode(body, kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_field_message(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        # msgspec checks UTF-8 only inside strings, and raises this, not DecodeError.
        raise InvalidRequest(f"request body is not valid UTF-8: {exc.reason}") from exc
    except RecursionError as exc:
        # msgspec stops at Python's recursion limit (~1000 levels).
        raise InvalidRequest("request body is nested too deeply") from exc


def check_request(request: CountTokensRequest) -> None:
    """The checks past the struct's types: stops, tools, turns, tool pairs, the thinking budget."""
    if not request.messages:
        raise InvalidRequest("messages: at least one message is required")
    _check_stop_sequences(getattr(request, "stop_sequences", None) or [])
    _check_tools(request)
    _check_messages(request.messages)
    _check_tool_pairs(request.messages)
    thinking = request.thinking
    if (
        isinstance(request, MessagesRequest)
        and isinstance(thinking, ThinkingEnabled)
        # max_tokens 0 only prefills: there is no budget to compare.
        and 0 < request.max_tokens <= thinking.budget_tokens
    ):
        raise InvalidRequest(
            "thinking.budget_tokens: must be less than max_tokens "
            f"({thinking.budget_tokens} >= {request.max_tokens})"
        )


def _decode(body: bytes, kind: type[RequestT]) -> RequestT:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError:
        # Perhaps a block type newer than this server in the history: drop
        # those and try again; else the first error.
        pruned = _drop_unknown_blocks(body)
        if pruned is None:
            raise
    return msgspec.json.decode(pruned, type=kind)


_KNOWN_BLOCKS = {block.__struct_config__.tag for block in get_args(ContentBlock)}
_KNOWN_RESULT_PARTS = {part.__struct_config__.tag for part in get_args(ToolResultContent)}


class _Tagged(msgspec.Struct):
    """A block read only as far as its type: the rest is skipped, not built."""

    type: str | None = None


_Object = dict[str, msgspec.Raw]


def _drop_unknown_blocks(body: bytes) -> bytes | None:
    """The body without blocks of unknown types in assistant turns and tool results; None if none.

    A conversation begun in the cloud may hold blocks newer than this server
    (beta tools, fallbacks): in the history they are no request, and the
    model could not use them anyway. A user turn's own unknown blocks are
    still an error. The body is taken apart only down to each block's type,
    the rest kept as JSON text, so this costs about the body's size in memory,
    whatever it holds.
    """
    dropped: list[str] = []

    def known(block: msgspec.Raw, tags: set[Any]) -> bool:
        kind = _tag(block)
        if kind is not None and kind not in tags:
            dropped.append(kind)
            return False
        return True

    def kept_parts(block: msgspec.Raw) -> msgspec.Raw:
        if _tag(block) != "tool_result":
            return block
        fields = decode_as(block, _Object)
        parts = decode_as(fields.get("content"), list[msgspec.Raw]) if fields else None
        if fields is None or parts is None:
            return block
        fields["content"] = _raw([part for part in parts if known(part, _KNOWN_RESULT_PARTS)])
        return _raw(fields)

    data = decode_as(body, _Object)
    messages = decode_as(data.get("messages"), list[_Object]) if data else None
    if data is None or messages is None:
        return None
    kept: list[_Object] = []
    for message in messages:
        content = decode_as(message.get("content"), list[msgspec.Raw])
        if content is None:
            kept.append(message)
            continue
        blocks = [kept_parts(block) for block in content]
        if decode_as(message.get("role"), str) == "assistant":
            blocks = [block for block in blocks if known(block, _KNOWN_BLOCKS)]
            if content and not blocks:
                continue  # nothing left of it to show
        message["content"] = _raw(blocks)
        kept.append(message)
    if not dropped:
        return None
    kinds = sorted(set(dropped))
    log.info(
        "history blocks of unknown types dropped: %s",
        shown(", ".join(repr(kind) for kind in kinds[:10]))
        + (f" and {len(kinds) - 10} more" if len(kinds) > 10 else ""),
    )
    data["messages"] = _raw(kept)
    return msgspec.json.encode(data)


LooseT = TypeVar("LooseT")


def decode_as(raw: bytes | msgspec.Raw | None, kind: type[LooseT]) -> LooseT | None:
    """`raw` decoded as `kind`, or None where it is absent, not JSON or not a `kind`.

    For reading a body loosely before it is validated: with `msgspec.Raw`
    in `kind`, the parts not needed stay JSON text.
    """
    if raw is None or not raw:
        return None
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None  # the typed decode refuses it in its own words


def _tag(block: msgspec.Raw) -> str | None:
    tagged = decode_as(block, _Tagged)
    return tagged.type if tagged is not None else None


def _raw(value: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(value))


def _check_stop_sequences(stops: list[str]) -> None:
    """Stop sequences are matched on every token: their number and size are bounded."""
    total = 0
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidRequest(f"stop_sequences.{i}: must not be empty")
        total += len(stop.encode())
        if total > MAX_STOP_SEQUENCE_BYTES:
            raise InvalidRequest(
                f"stop_sequences: at most {MAX_STOP_SEQUENCE_BYTES} bytes of stop sequences in "
                f"all; these pass that at stop_sequences.{i}"
            )


def _check_tools(request: CountTokensRequest) -> None:
    if request.mcp_servers:
        raise InvalidRequest(
            "mcp_servers: MCP connector servers are not supported: this server does not "
            "call remote MCP servers; connect them to the client instead"
        )
    seen: set[str] = set()
    for i, tool in enumerate(request.tools or []):
        where = f"tools.{i}"
        if tool.type not in (None, "custom"):
            definition = client_tool_definition(
                tool.type,
                width=tool.display_width_px,
                height=tool.display_height_px,
                zoom=bool(tool.enable_zoom),
            )
            if definition is None:
                # The API's own words where a platform lacks a tool type.
                expected = ", ".join(repr(name) for name in KNOWN_CLIENT_TOOL_TYPES)
                raise InvalidRequest(
                    f"{where}: Input tag {shown(tool.type)!r} found using 'type' does not match "
                    f"any of the expected tags: {expected}. Server tools run on Anthropic's "
                    "side; this server runs client tools only."
                )
            # The client sends the type alone: give the model the documented tool.
            tool.description = tool.description or definition[0]
            tool.input_schema = definition[1]
        if not tool.name:
            raise InvalidRequest(f"{where}.name: Field required")
        if not TOOL_NAME.match(tool.name):
            raise InvalidRequest(
                f"{where}.name: tool name {shown(tool.name)!r} must match ^[a-zA-Z0-9_-]{{1,128}}$"
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
            raise InvalidRequest(f"tool_choice.name: no tool named {shown(choice.name)!r} in tools")
        if isinstance(request.thinking, ThinkingEnabled | ThinkingAdaptive):
            raise InvalidRequest(
                "tool_choice: thinking may not be enabled when tool_choice forces tool use"
            )


def _check_messages(messages: list[InputMessage]) -> None:
    """Content the API refuses, in its words: empty turns, blank text, a prefill ending in space."""
    last = len(messages) - 1
    for index, msg in enumerate(messages):
        prefill = index == last and msg.role == "assistant"
        if not msg.content and not prefill:
            raise InvalidRequest(
                f"messages.{index}: all messages must have non-empty content except for "
                "the optional final assistant message"
            )
        if isinstance(msg.content, str):
            if msg.content.isspace() and not prefill:
                raise InvalidRequest(
                    f"messages.{index}.content: text content blocks must contain "
                    "non-whitespace text"
                )
            tail = msg.content
        else:
            for block_index, block in enumerate(msg.content):
                if not isinstance(block, TextBlock):
                    continue
                where = f"messages.{index}.content.{block_index}.text"
                if not block.text:
                    raise InvalidRequest(f"{where}: text content blocks must be non-empty")
                if block.text.isspace():
                    raise InvalidRequest(
                        f"{where}: text content blocks must contain non-whitespace text"
                    )
            end = msg.content[-1] if msg.content else None
            tail = end.text if isinstance(end, TextBlock) else ""
        if prefill and tail[-1:].isspace():
            raise InvalidRequest("final assistant content cannot end with trailing whitespace")


def _check_tool_pairs(messages: list[InputMessage]) -> None:
    """Each `tool_use` is answered by a `tool_result` in the next turn, and only those are.

    Consecutive turns of one role count as one turn, as the API merges them
    before it checks (tool results split over two user turns, or text then
    results); `role: "system"` turns in between are passed over.
    """
    turns: list[tuple[str, int, list[tuple[str, ContentBlock]]]] = []
    for index, msg in enumerate(messages):
        if msg.role == "system":
            continue
        content = msg.content if isinstance(msg.content, list) else []
        blocks = [
            (f"messages.{index}.content.{block_index}", block)
            for block_index, block in enumerate(content)
        ]
        if turns and turns[-1][0] == msg.role:
            turns[-1][2].extend(blocks)
        else:
            turns.append((msg.role, index, blocks))
    # The calls in order, as dict keys: looked up once per result (a list was
    # quadratic: 32k pairs took 5 s on the event loop).
    calls: dict[str, None] = {}
    for role, first, blocks in turns:
        if role == "assistant":
            calls = dict.fromkeys(
                block.id for _, block in blocks if isinstance(block, ToolUseBlock)
            )
            continue
        answered: set[str] = set()
        for where, block in blocks:
            if not isinstance(block, ToolResultBlock):
                continue
            if block.tool_use_id not in calls:
                raise InvalidRequest(
                    f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{shown(block.tool_use_id)}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
            answered.add(block.tool_use_id)
        missing = [call for call in calls if call not in answered]
        if missing:
            raise InvalidRequest(
                f"messages.{first}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {shown(', '.join(missing))}. Each `tool_use` block must "
                "have a corresponding `tool_result` block in the next message."
            )
        calls = {}


def _field_message(error: str) -> str:
    """`Expected int, got str - at `$.max_tokens`` → `max_tokens: Expected int, got str`.

    msgspec quotes the value it refused: that part is cut short.
    """
    missing = re.match(r"Object missing required field `(?P<field>\w+)`", error)
    match = _PATH.search(error)
    path = match.group("path") if match else ""
    path = shown(re.sub(r"\[(\d+)\]", r".\1", path).lstrip("."))
    if missing:
        field = f"{path}.{missing.group('field')}" if path else missing.group("field")
        return f"{field}: Field required"
    message = shown(_PATH.sub("", error))
    return f"{path}: {message}" if path else message
