"""How one model writes tool calls: its markers, and the parser that reads them back.

mlx-lm recognises each chat template family's tool-call syntax (Qwen/Hermes
`<tool_call>{json}</tool_call>`, Mistral `[TOOL_CALLS]`, Qwen3-coder XML, GLM,
Kimi, Gemma, pythonic, ...) and ships a parser per family; Pensieve reuses
them. Llama 3.x templates ask for a bare `{"name": ..., "parameters": ...}`
object, which mlx-lm does not read; that one is parsed here. Models whose
template knows no tools get the generic format below, described to the model
in its system prompt.

Everything here is pure text work, testable without a model.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A parser turns the text between a format's markers into calls:
# [{"name": str, "arguments": dict}, ...]. It raises on text it cannot read.
Parser = Callable[[str, list[dict[str, Any]]], list[dict[str, Any]]]


@dataclass(frozen=True)
class ToolFormat:
    family: str
    start: str  # the text that opens a call (or a section of calls)
    end: str  # the text that closes it; "" means the call runs to the end of the output
    parse: Parser
    # The body is one `{"name": ..., "arguments": {...}}` object, so a
    # grammar can write it and its arguments can stream as they are generated.
    json_body: bool = False
    # The start marker is part of the body (Llama 3's bare JSON object).
    start_in_body: bool = False


def parse_json_call(body: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`{"name": ..., "arguments": {...}}` (or `"parameters"`, Llama 3's key)."""
    value = json.loads(body)
    return [_call(value)]


def _call(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError("a tool call needs a string `name`")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        # Some templates render the arguments as a JSON string.
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return {"name": value["name"], "arguments": arguments}


# The format for templates without tool support, and the one any grammar-forced
# call is written in: Hermes-style, which many small models have seen.
GENERIC = ToolFormat("generic", "<tool_call>", "</tool_call>", parse_json_call, json_body=True)

LLAMA3 = ToolFormat(
    "llama3_json", '{"name"', "", parse_json_call, json_body=True, start_in_body=True
)


def _mlx_lm_parser(function: Callable[..., Any]) -> Parser:
    def parse(body: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        result = function(body, tools)
        calls = result if isinstance(result, list) else [result]
        return [_call(call) for call in calls]

    return parse


def family_format(family: str) -> ToolFormat:
    """The format of one of mlx-lm's tool parser families (`mlx_lm.tool_parsers.<family>`)."""
    if family == LLAMA3.family:
        return LLAMA3
    module = importlib.import_module(f"mlx_lm.tool_parsers.{family}")
    if family == "json_tools":
        start, end = module.tool_call_start, module.tool_call_end
        return ToolFormat(family, start, end, parse_json_call, json_body=True)
    parser = _mlx_lm_parser(module.parse_tool_call)
    return ToolFormat(family, module.tool_call_start, module.tool_call_end or "", parser)


def detect_format(tokenizer: Any) -> ToolFormat | None:
    """The tool-call format of `tokenizer`'s chat template; None when it has no tool support."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "tools" not in template:
        return None
    family = getattr(tokenizer, "init_kwargs", {}).get("tool_parser_type")
    if getattr(tokenizer, "tool_parser", None) is not None and family:
        return family_format(str(family))
    if '"parameters"' in template and "<|start_header_id|>" in template:
        return LLAMA3
    # The template renders tools but writes calls in a way nobody parses:
    # describe the generic format instead.
    return None


def openai_tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Anthropic tools in the shape chat templates and mlx-lm's parsers expect."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.input_schema,
            },
        }
        for tool in tools
    ]


def generic_instructions(tools: list[Any]) -> str:
    """The system-prompt text that teaches a model without tool support the generic format."""
    listing = "\n".join(
        json.dumps(
            {"name": t.name, "description": t.description, "input_schema": t.input_schema},
            ensure_ascii=False,
        )
        for t in tools
    )
    return (
        "# Tools\n\n"
        "You may call one or more of these tools to help with the user's request:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a tool, write exactly this, with the input as a JSON object that "
        "matches the tool's input_schema:\n"
        '<tool_call>\n{"name": "<tool name>", "arguments": {<input>}}\n</tool_call>\n'
        "Tool results come back in <tool_response> tags."
    )


def generic_call_text(name: str, arguments: Any) -> str:
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{GENERIC.start}\n{call}\n{GENERIC.end}"


def generic_result_text(name: str, body: str, is_error: bool) -> str:
    status = ' is_error="true"' if is_error else ""
    return f'<tool_response name="{name}"{status}>\n{body}\n</tool_response>'
