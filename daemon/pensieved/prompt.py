"""Anthropic request → chat messages → prompt tokens, through the model's own chat template.

`to_chat_messages` is pure (no model needed). `PromptBuilder` adds the
tokenizer: it renders with `apply_chat_template`, which is where the model's
own conventions live.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pensieved.errors import InvalidRequest
from pensieved.protocol import (
    ContentBlock,
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)

ChatMessage = dict[str, str]


def to_chat_messages(request: CountTokensRequest, model_name: str) -> list[ChatMessage]:
    """Flatten an Anthropic request into `{"role", "content"}` turns.

    - `system` (string or text blocks) becomes the leading system turn.
    - consecutive turns of the same role merge, as the API treats them as one.
    - `role: "system"` turns inside `messages` (Claude Code sends them) stay
      where they are, so earlier turns render the same as before.
    """
    turns: list[ChatMessage] = []
    system = _system_text(request.system)
    if system:
        turns.append({"role": "system", "content": system})
    for index, msg in enumerate(request.messages):
        content = msg.content
        if isinstance(content, str):
            text = content
        else:
            text = "\n".join(
                part
                for block_index, block in enumerate(content)
                if (
                    part := _block_text(
                        block, model_name, f"messages.{index}.content.{block_index}"
                    )
                )
            )
        if turns and turns[-1]["role"] == msg.role:
            turns[-1]["content"] = _join(turns[-1]["content"], text)
        else:
            turns.append({"role": msg.role, "content": text})
    return turns


def _join(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if first and second else first or second


def _system_text(system: str | list[TextBlock] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n".join(block.text for block in system if block.text)


def _block_text(block: ContentBlock, model_name: str, where: str) -> str:
    if isinstance(block, TextBlock):
        return block.text
    if isinstance(block, ImageBlock | DocumentBlock):
        kind = "image" if isinstance(block, ImageBlock) else "document"
        raise InvalidRequest(
            f"{where}: model {model_name!r} is text-only and does not accept {kind} input"
        )
    if isinstance(block, ToolUseBlock):
        # Rendered through the template's tool support by the tool-use layer;
        # until then, as readable text so the history is not lost.
        return f"[tool call {block.name} {json.dumps(block.input, ensure_ascii=False)}]"
    if isinstance(block, ToolResultBlock):
        return _tool_result_text(block, model_name, where)
    if isinstance(block, ThinkingBlock | RedactedThinkingBlock):
        return ""  # earlier reasoning is not replayed to the model
    raise InvalidRequest(f"{where}: unsupported content block")


def _tool_result_text(block: ToolResultBlock, model_name: str, where: str) -> str:
    if isinstance(block.content, str):
        body = block.content
    else:
        parts = []
        for part in block.content:
            if isinstance(part, TextBlock):
                parts.append(part.text)
            else:
                parts.append("[image omitted: this model is text-only]")
        body = "\n".join(parts)
    status = "error" if block.is_error else "result"
    return f"[tool {status} {block.tool_use_id}]\n{body}"


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    # The request ends with an assistant turn: generation continues it.
    continues_assistant: bool


class PromptBuilder:
    """Renders chat turns with one model's tokenizer and chat template."""

    def __init__(self, tokenizer: Any, model_name: str) -> None:
        self._tokenizer = tokenizer
        self._model_name = model_name

    def build(self, request: CountTokensRequest) -> Prompt:
        turns = to_chat_messages(request, self._model_name)
        continues = turns[-1]["role"] == "assistant"
        if not getattr(self._tokenizer, "has_chat_template", True):
            text = "".join(f"{t['role']}: {t['content']}\n" for t in turns)
            if not continues:
                text += "assistant: "
            tokens = list(self._tokenizer.encode(text))
            return Prompt(tokens, continues)
        tokens = self._render(turns, continues)
        return Prompt(tokens, continues)

    def _render(self, turns: list[ChatMessage], continues: bool) -> list[int]:
        kwargs: dict[str, Any] = {
            "add_generation_prompt": not continues,
            "continue_final_message": continues,
        }
        try:
            return list(self._tokenizer.apply_chat_template(turns, **kwargs))
        except Exception:
            # Some templates refuse a system turn anywhere but first; keep the
            # leading one and present later ones as user turns.
            rewritten = [
                {"role": "user", "content": t["content"]} if t["role"] == "system" and i > 0 else t
                for i, t in enumerate(turns)
            ]
            merged: list[ChatMessage] = []
            for turn in rewritten:
                if merged and merged[-1]["role"] == turn["role"]:
                    merged[-1] = {
                        "role": turn["role"],
                        "content": _join(merged[-1]["content"], turn["content"]),
                    }
                else:
                    merged.append(turn)
            try:
                return list(self._tokenizer.apply_chat_template(merged, **kwargs))
            except Exception as exc:
                raise InvalidRequest(
                    f"messages: model {self._model_name!r} chat template cannot render "
                    f"this conversation: {exc}"
                ) from exc
