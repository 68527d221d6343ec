"""OpenAI's Chat Completions request, and the Messages request it means (issue 26, first part).

Both APIs must render the same conversation into the same tokens, so that one
prompt cache serves both and no planning rule is written twice: a Chat
Completions request is read into these structs and turned into the
`MessagesRequest` the conversation layer already renders and plans
(`as_messages_request`). What has no Messages counterpart is refused with a
400 naming the field (`n` > 1, `logprobs`), never silently dropped.

Not routed yet: the route, the response and stream shapes and OpenAI's error
envelope come next.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from pensieved.wire.errors import InvalidRequest
from pensieved.wire.protocol import (
    MAX_MESSAGES,
    MAX_STOP_SEQUENCES,
    MAX_TOOLS,
    ContentBlock,
    ImageBlock,
    InputMessage,
    JsonOutputFormat,
    MessagesRequest,
    OutputConfig,
    TextBlock,
    ThinkingEnabled,
    Tool,
    ToolChoice,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)

# Thinking budgets for `reasoning_effort` (OpenAI names an effort, Anthropic a budget).
EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageUrl(msgspec.Struct):
    url: str
    detail: str | None = None


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: ImageUrl


Part = TextPart | ImagePart


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDefinition(msgspec.Struct):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(msgspec.Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: Literal["function"] = "function"


class JsonSchemaSpec(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    seed: int | None = None


def as_messages_request(chat: ChatCompletionRequest, max_tokens: int) -> MessagesRequest:
    """The Messages request `chat` means; `max_tokens` where it names none (OpenAI has no
    required limit: the caller passes the model's window, which the plan clamps)."""
    if chat.n is not None and chat.n != 1:
        raise InvalidRequest("n: only 1 choice is generated; send the request n times")
    if chat.logprobs:
        raise InvalidRequest("logprobs: log probabilities are not returned by this server")
    system, messages = _conversation(chat.messages)
    limit = chat.max_completion_tokens or chat.max_tokens or max_tokens
    request = MessagesRequest(
        model=chat.model,
        messages=messages,
        system=system or None,
        max_tokens=limit,
        # Up to 2, as OpenAI allows (the model config allows it too); Messages stops at 1.
        temperature=chat.temperature,
        top_p=chat.top_p,
        stop_sequences=[chat.stop] if isinstance(chat.stop, str) else chat.stop,
        stream=chat.stream,
    )
    if chat.tools:
        request.tools = [_tool(tool.function) for tool in chat.tools]
        request.tool_choice = _tool_choice(chat.tool_choice, chat.parallel_tool_calls)
    elif chat.tool_choice not in (None, "none", "auto"):
        raise InvalidRequest("tool_choice: a tool is required, but no tools were given")
    if chat.response_format is not None and chat.response_format.type != "text":
        request.output_config = OutputConfig(format=_json_format(chat.response_format))
    if chat.reasoning_effort is not None:
        budget = EFFORT_BUDGETS[chat.reasoning_effort]
        request.thinking = ThinkingEnabled(budget_tokens=budget)
        request.max_tokens = max(request.max_tokens, budget + 1)
    return request


def _conversation(
    turns: list[ChatMessage],
) -> tuple[str, list[InputMessage]]:
    """(the system text, the turns) of a Chat Completions conversation, as Messages has them.

    System and developer turns at the start become the system prompt; later
    ones stay where they are (as Claude Code's do); tool turns become
    `tool_result` blocks of one user turn.
    """
    system: list[str] = []
    messages: list[InputMessage] = []
    leading = True
    for index, turn in enumerate(turns):
        where = f"messages.{index}"
        if turn.role in ("system", "developer"):
            text = _text(turn.content, where)
            if leading:
                system.append(text)
            else:
                messages.append(InputMessage("system", text))
            continue
        leading = False
        if turn.role == "tool":
            if not turn.tool_call_id:
                raise InvalidRequest(f"{where}.tool_call_id: required on a tool message")
            result = ToolResultBlock(turn.tool_call_id, _text(turn.content, where))
            if messages and messages[-1].role == "user" and _all_results(messages[-1]):
                assert isinstance(messages[-1].content, list)
                messages[-1].content.append(result)
            else:
                messages.append(InputMessage("user", [result]))
        elif turn.role == "assistant":
            blocks: list[ContentBlock] = []
            if turn.content:
                blocks.append(TextBlock(_text(turn.content, where)))
            for number, call in enumerate(turn.tool_calls or []):
                blocks.append(
                    ToolUseBlock(
                        call.id,
                        call.function.name,
                        _arguments(call.function.arguments, f"{where}.tool_calls.{number}"),
                    )
                )
            messages.append(InputMessage("assistant", blocks or ""))
        else:
            messages.append(InputMessage("user", _user_content(turn.content, where)))
    return "\n\n".join(text for text in system if text), messages


def _all_results(message: InputMessage) -> bool:
    content = message.content
    return isinstance(content, list) and all(isinstance(b, ToolResultBlock) for b in content)


def _text(content: str | list[Part] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(isinstance(part, ImagePart) for part in content):
        raise InvalidRequest(f"{where}.content: images go in user turns")
    return "".join(part.text for part in content if isinstance(part, TextPart))


def _user_content(content: str | list[Part] | None, where: str) -> str | list[ContentBlock]:
    if content is None or isinstance(content, str):
        return content or ""
    blocks: list[ContentBlock] = []
    for number, part in enumerate(content):
        if isinstance(part, TextPart):
            blocks.append(TextBlock(part.text))
        else:
            blocks.append(_image(part.image_url.url, f"{where}.content.{number}.image_url.url"))
    return blocks


def _image(url: str, where: str) -> ImageBlock:
    """A `data:` URL as an Anthropic base64 image source; no other URL is fetched."""
    head, comma, data = url.partition(",")
    if not (url.startswith("data:") and head.endswith(";base64") and comma):
        raise InvalidRequest(
            f"{where}: only data: URLs (base64) are read; this server fetches no URL"
        )
    source = {"type": "base64", "media_type": head[len("data:") : -len(";base64")], "data": data}
    return ImageBlock(source=msgspec.Raw(msgspec.json.encode(source)))


def _arguments(text: str, where: str) -> Any:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        raise InvalidRequest(f"{where}.function.arguments: not valid JSON") from None


def _tool(function: FunctionDefinition) -> Tool:
    schema = function.parameters or {"type": "object", "properties": {}}
    return Tool(
        name=function.name,
        description=function.description,
        input_schema=schema,
        strict=function.strict,
    )


def _tool_choice(
    choice: Literal["auto", "none", "required"] | NamedToolChoice | None, parallel: bool | None
) -> ToolChoice:
    single = parallel is False
    if choice is None or choice == "auto":
        return ToolChoiceAuto(disable_parallel_tool_use=single)
    if choice == "none":
        return ToolChoiceNone()
    if choice == "required":
        return ToolChoiceAny(disable_parallel_tool_use=single)
    assert isinstance(choice, NamedToolChoice)
    return ToolChoiceTool(choice.function.name, disable_parallel_tool_use=single)


def _json_format(response_format: ResponseFormat) -> JsonOutputFormat:
    if response_format.type == "json_object":
        return JsonOutputFormat(schema={"type": "object"})
    spec = response_format.json_schema
    if spec is None or spec.schema is None:
        raise InvalidRequest("response_format.json_schema.schema: required for json_schema")
    return JsonOutputFormat(schema=spec.schema)
