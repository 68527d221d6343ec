"""The Anthropic Messages wire format: the request structs (msgspec).

Unknown fields are ignored, as Claude Code and newer SDKs send many
(`context_management`, `output_config`, `speed`, ...), and so are block types
newer than this server in assistant turns and tool results: a conversation
begun in the cloud must go on here. Decoding and the checks after it are in
decode.py; the response shapes in responses.py.

Fields nothing here reads (`cache_control`, `citations`, `metadata`) are not
declared: accepted and skipped, never built into Python objects. Declared as
any JSON, a body of `{}`s there took 24 times its size. An image's `source`
is kept as its JSON text (`msgspec.Raw`, a view of the body), decoded only
for a vision model (conversation/images.py). Lists a request can multiply
work with are bounded (`MAX_*`, in the OpenAPI document as `maxItems`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]

# The API's own limit on messages in one request.
MAX_MESSAGES = 100_000
# As many as tool search's catalog holds; Claude Code sends 24-27, plus MCP tools.
MAX_TOOLS = 10_000
# Stop sequences are matched on the engine thread that serves every request
# (conversation/stops.py): one automaton, at about a microsecond per byte to
# build and per generated character to run. The API documents no limit;
# clients send a few.
MAX_STOP_SEQUENCES = 1024
MAX_STOP_SEQUENCE_BYTES = 16 * 1024  # all of them together, UTF-8


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageBlock(msgspec.Struct, tag="image", tag_field="type"):
    """An image. A text model is shown a placeholder; a vision model's images are decoded
    within limits by conversation/images.py, which reads `source`."""

    source: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type"):
    # text, content, base64 (PDF or plain text), url or file: see conversation/attachments.py.
    source: Any = None
    title: str | None = None
    context: str | None = None


class SearchResultBlock(msgspec.Struct, tag="search_result", tag_field="type"):
    source: str
    title: str
    content: list[TextBlock]


class ToolReferenceBlock(msgspec.Struct, tag="tool_reference", tag_field="type"):
    """Tool search's answer, inside a tool result: the named tool becomes available."""

    tool_name: str


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Any


ToolResultContent = TextBlock | ImageBlock | DocumentBlock | SearchResultBlock | ToolReferenceBlock


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[ToolResultContent] = ""
    is_error: bool = False


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


# History that only Anthropic's cloud produces: a conversation begun there
# continues here. These are shown to the model as short text (or dropped),
# never refused; their inner shapes vary by tool and version, so they are
# read loosely.


class ServerToolUseBlock(msgspec.Struct, tag="server_tool_use", tag_field="type"):
    id: str
    name: str
    input: Any = None


class ServerToolResultBlock(msgspec.Struct, tag_field="type"):
    tool_use_id: str
    content: Any = None


class WebSearchToolResultBlock(ServerToolResultBlock, tag="web_search_tool_result"):
    pass


class WebFetchToolResultBlock(ServerToolResultBlock, tag="web_fetch_tool_result"):
    pass


class CodeExecutionToolResultBlock(ServerToolResultBlock, tag="code_execution_tool_result"):
    pass


class BashCodeExecutionToolResultBlock(
    ServerToolResultBlock, tag="bash_code_execution_tool_result"
):
    pass


class TextEditorCodeExecutionToolResultBlock(
    ServerToolResultBlock, tag="text_editor_code_execution_tool_result"
):
    pass


class ToolSearchToolResultBlock(ServerToolResultBlock, tag="tool_search_tool_result"):
    pass


class McpToolUseBlock(msgspec.Struct, tag="mcp_tool_use", tag_field="type"):
    id: str
    name: str
    server_name: str = ""
    input: Any = None


class McpToolResultBlock(msgspec.Struct, tag="mcp_tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False


class ContainerUploadBlock(msgspec.Struct, tag="container_upload", tag_field="type"):
    file_id: str = ""


class CompactionBlock(msgspec.Struct, tag="compaction", tag_field="type"):
    """The cloud's summary of the conversation before it (context management)."""

    content: str | None = None


CloudBlock = (
    ServerToolUseBlock
    | WebSearchToolResultBlock
    | WebFetchToolResultBlock
    | CodeExecutionToolResultBlock
    | BashCodeExecutionToolResultBlock
    | TextEditorCodeExecutionToolResultBlock
    | ToolSearchToolResultBlock
    | McpToolUseBlock
    | McpToolResultBlock
    | ContainerUploadBlock
    | CompactionBlock
)

ContentBlock = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | SearchResultBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
    | CloudBlock
)


class InputMessage(msgspec.Struct):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(msgspec.Struct):
    # Required, but checked after `type`: toolsets (computer_toolset_...) have none.
    name: str = ""
    description: str = ""
    input_schema: Any = None
    # Client tools have no type or "custom". Anthropic-defined tools the client
    # runs (bash_..., text_editor_..., memory_..., computer_...) get their
    # documented schema (client_tools.py); server tools (web_search_...,
    # code_execution_...) run on Anthropic's side and are refused.
    type: str | None = None
    # Constrain this tool's input to its schema even under tool_choice auto.
    strict: bool | None = None
    # Left out of the prompt until a tool_reference block names it (tool search).
    defer_loading: bool | None = None
    # computer_...: the screen the client drives.
    display_width_px: int | None = None
    display_height_px: int | None = None
    enable_zoom: bool | None = None


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
    display: str | None = None


class ThinkingAdaptive(msgspec.Struct, tag="adaptive", tag_field="type"):
    # "summarized" or "omitted" in the API; any value is accepted, as newer
    # clients may send more.
    display: str | None = None


class ThinkingBetweenTools(ThinkingAdaptive, tag="between_tools"):
    """Thinking between tool calls (a Claude Code beta): adaptive thinking here."""


class ThinkingDisabled(msgspec.Struct, tag="disabled", tag_field="type"):
    pass


Thinking = ThinkingEnabled | ThinkingAdaptive | ThinkingBetweenTools | ThinkingDisabled


class JsonOutputFormat(msgspec.Struct, tag="json_schema", tag_field="type"):
    """Structured output: the reply's text is JSON valid under `schema`."""

    schema: dict[str, Any]


class OutputConfig(msgspec.Struct):
    format: JsonOutputFormat | None = None
    effort: str | None = None


class CountTokensRequest(msgspec.Struct):
    model: str
    messages: Annotated[list[InputMessage], msgspec.Meta(max_length=MAX_MESSAGES)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # The older, top-level spelling of output_config.format.
    output_format: JsonOutputFormat | None = None
    # The MCP connector: remote servers the API would call. Refused when set.
    mcp_servers: list[msgspec.Raw] | None = None


class ThreadCreate(msgspec.Struct, tag="create", tag_field="type"):
    """Hold this conversation under the reply's id (the message-threads beta)."""


class ThreadContinue(msgspec.Struct, tag="continue", tag_field="type"):
    """Carry on from a held reply: `messages` holds only the new turns."""

    previous_message_id: str


class MessagesRequest(CountTokensRequest, kw_only=True):
    # 0: prefill only, a cache pre-warm (the API documents it); the reply is empty.
    max_tokens: Annotated[int, msgspec.Meta(ge=0)]
    temperature: Probability | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Pensieve's extension, as llama.cpp's server and Ollama take it: tokens
    # under this share of the likeliest one's probability are never sampled.
    min_p: Probability | None = None
    # Also an extension (vLLM's name; llama.cpp's `repeat_penalty`): > 1 makes
    # the last 64 tokens less likely again.
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=2.0)] | None = None
    # Also at most MAX_STOP_SEQUENCE_BYTES in all (checked in decode.py).
    stop_sequences: Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    thread: ThreadCreate | ThreadContinue | None = None
