"""Anthropic request → chat messages → prompt tokens, through the model's own chat template.

`to_chat_messages` is pure (no model needed). `PromptBuilder` adds the
tokenizer: it renders with `apply_chat_template`, which is where the model's
own conventions live.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pensieved.conversation.attachments import (
    IMAGE_CLOSE,
    IMAGE_OPEN,
    BlockText,
    join_blocks,
    referenced_tools,
)
from pensieved.conversation.control_tokens import ControlTokens, after_newline
from pensieved.conversation.images import ImagePreparer, PreparedImage
from pensieved.conversation.pieces import PieceTokenizer
from pensieved.conversation.toolcalls import (
    GENERIC,
    ToolFormat,
    detect_format,
    generic_call_text,
    generic_instructions,
    generic_result_text,
    openai_tools,
)
from pensieved.wire.errors import InvalidRequest
from pensieved.wire.protocol import (
    CountTokensRequest,
    TextBlock,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingEnabled,
    Tool,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)

ChatMessage = dict[str, Any]


def to_chat_messages(
    request: CountTokensRequest,
    model_name: str,
    *,
    native_tools: bool = False,
    images: str = "placeholder",
    as_text: BlockText | None = None,
) -> list[ChatMessage]:
    """Flatten an Anthropic request into chat-template turns.

    - `system` (string or text blocks) becomes the leading system turn.
    - consecutive turns of the same role merge, as the API treats them as one.
    - `role: "system"` turns inside `messages` (Claude Code sends them) stay
      where they are, so earlier turns render the same as before.
    - with `native_tools`, `tool_use` blocks become the assistant turn's
      `tool_calls` and each `tool_result` a `tool` turn, as chat templates
      expect; without, both are written in the generic text format.
    - thinking blocks from earlier turns are dropped: templates that keep
      reasoning keep only the current turn's.
    - every other block (images, documents, search results, the cloud's
      server-tool history) becomes text, or nothing (attachments.py).
    """
    as_text = as_text or BlockText(model_name, images)
    # Unmerged: `_merged` joins each run of one role once at the end (merging
    # as they come would copy the growing turn each time: quadratic).
    turns: list[ChatMessage] = []
    system = _system_text(request.system)
    if system:
        turns.append({"role": "system", "content": system})
    names = {
        block.id: block.name
        for msg in request.messages
        if isinstance(msg.content, list)
        for block in msg.content
        if isinstance(block, ToolUseBlock)
    }
    for index, msg in enumerate(request.messages):
        blocks = [TextBlock(msg.content)] if isinstance(msg.content, str) else msg.content
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block_index, block in enumerate(blocks):
            where = f"messages.{index}.content.{block_index}"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                if native_tools:
                    calls.append(_native_call(block))
                else:
                    texts.append(generic_call_text(block.name, block.input))
            elif isinstance(block, ToolResultBlock):
                body = as_text.parts(block.content, where)
                name = names.get(block.tool_use_id, "")
                if not native_tools:
                    texts.append(generic_result_text(name, body, block.is_error))
                    continue
                if texts:  # text before a result stays before it
                    turns.append({"role": msg.role, "content": join_blocks(texts)})
                    texts = []
                turns.append(_tool_turn(block, name, body))
            elif not isinstance(block, ThinkingBlock):  # thinking: dropped (see above)
                shown = as_text.text(block, where)
                if shown:
                    texts.append(shown)
        turn: ChatMessage = {"role": msg.role, "content": join_blocks([t for t in texts if t])}
        if calls:
            turn["tool_calls"] = calls
        if turn["content"] or calls or not turns or turns[-1]["role"] != "tool":
            turns.append(turn)
    return _merged(turns)


def _native_call(block: ToolUseBlock) -> dict[str, Any]:
    """A `tool_use` block as a chat template's `tool_calls` entry."""
    return {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": block.input},
    }


def _tool_turn(block: ToolResultBlock, name: str, body: str) -> ChatMessage:
    """A `tool_result` block as a chat template's `tool` turn."""
    content = f"Error: {body}" if block.is_error else body
    return {"role": "tool", "tool_call_id": block.tool_use_id, "name": name, "content": content}


def _merged(turns: Iterable[ChatMessage]) -> list[ChatMessage]:
    """`turns` with each run of turns of one role (tool turns aside) merged into one turn:
    contents joined by a blank line, calls in order. Each run is joined once."""
    merged: list[ChatMessage] = []
    parts: list[list[str]] = []  # the contents of each merged turn
    for turn in turns:
        last = merged[-1] if merged else None
        if last is None or last["role"] != turn["role"] or turn["role"] == "tool":
            merged.append(dict(turn))
            parts.append([turn["content"]])
            if "tool_calls" in turn:
                merged[-1]["tool_calls"] = list(turn["tool_calls"])
            continue
        parts[-1].append(turn["content"])
        if "tool_calls" in turn:
            last.setdefault("tool_calls", []).extend(turn["tool_calls"])
    for turn, contents in zip(merged, parts, strict=True):
        if len(contents) > 1:
            turn["content"] = "\n\n".join(text for text in contents if text)
    return merged


def _join(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if first and second else first or second


# Claude Code's first system block is a billing line whose `cch=` value
# changes on every request. At the very front of the prompt it would make
# every turn miss the prompt cache, and it means nothing to a local model.
BILLING_HEADER = "x-anthropic-billing-header:"


def _system_text(system: str | list[TextBlock] | None) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n".join(
        block.text
        for block in system
        if block.text and not block.text.lstrip().startswith(BILLING_HEADER)
    )


def shown_tools(request: CountTokensRequest) -> list[Tool]:
    """The tools the model is shown: none under tool_choice "none", and no deferred ones.

    A `defer_loading` tool stays out of the prompt (saving its context) until a
    tool search names it with a `tool_reference` anywhere in the conversation,
    or tool_choice forces it.
    """
    if isinstance(request.tool_choice, ToolChoiceNone):
        return []
    tools = request.tools or []
    if not any(tool.defer_loading for tool in tools):
        return tools
    loaded = referenced_tools(request.messages)
    if isinstance(request.tool_choice, ToolChoiceTool):
        loaded.add(request.tool_choice.name)
    return [tool for tool in tools if not tool.defer_loading or tool.name in loaded]


# Claude Code ends its system prompt with a snapshot of `git status` taken
# when the process started. A template that renders the tool definitions
# after the system text (Qwen's, Llama's) would prefill all ~15k tokens of
# them again in every new process of a project where a file changed.
SNAPSHOT_START = "\ngitStatus: "


def stable_first(turns: list[ChatMessage]) -> list[ChatMessage]:
    """Move a trailing environment snapshot from the system turn into the first user turn.

    It goes where Claude Code itself carries volatile context: a
    `<system-reminder>` at the start of the first user turn, so that the
    system text and the tool block the template renders after it stay the
    same between processes. Nothing else changes; conversations without
    such a snapshot are returned as they are.
    """
    if len(turns) < 2 or turns[0]["role"] != "system":
        return turns
    system = turns[0]["content"]
    start = system.rfind(SNAPSHOT_START)
    first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
    if start < 0 or first_user is None or not isinstance(turns[first_user]["content"], str):
        return turns
    snapshot = system[start + 1 :].strip()
    reminder = f"<system-reminder>\n{snapshot}\n</system-reminder>"
    moved = list(turns)
    moved[0] = {**turns[0], "content": system[:start].rstrip()}
    user = turns[first_user]
    moved[first_user] = {**user, "content": _join(reminder, user["content"])}
    return moved


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    # The request ends with an assistant turn: generation continues it.
    continues_assistant: bool
    # The tools the model was shown (none when tool_choice is "none"), in the
    # shape the format's parser takes, and the format it writes calls in.
    tools: list[dict[str, Any]]
    tool_format: ToolFormat | None
    # The prompt ends inside an open reasoning section (`<think>`): the
    # output starts with thinking.
    thinking_open: bool = False
    # A vision model's images, in order, and where each one's run of tokens starts.
    images: tuple[PreparedImage, ...] = ()
    image_starts: tuple[int, ...] = ()


class PromptBuilder:
    """Renders requests with one model's tokenizer and chat template."""

    def __init__(
        self,
        tokenizer: Any,
        model_name: str,
        images: str = "placeholder",
        vision: ImagePreparer | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._images = images
        self.vision = vision
        self.native_format = detect_format(tokenizer)
        self._pieces = PieceTokenizer(tokenizer)
        self._control = ControlTokens(tokenizer)
        self.has_thinking = bool(getattr(tokenizer, "has_thinking", False))

    def tool_format(self) -> ToolFormat:
        """How this model writes calls: its template's format, or the generic one."""
        return self.native_format or GENERIC

    def build(self, request: CountTokensRequest) -> Prompt:
        native = self.native_format is not None
        as_text = BlockText(self._model_name, self._images, self.vision)
        turns = to_chat_messages(request, self._model_name, native_tools=native, as_text=as_text)
        shown = shown_tools(request)
        tools = openai_tools(shown)
        if shown and not native:
            # The tool definitions lead: they are the same in every process
            # of a project, while the system text ends in a snapshot of the
            # environment that changes between processes (see `stable_first`).
            instructions = generic_instructions(shown)
            if turns and turns[0]["role"] == "system":
                turns[0] = {**turns[0], "content": _join(instructions, turns[0]["content"])}
            else:
                turns.insert(0, {"role": "system", "content": instructions})
        elif shown:
            turns = stable_first(turns)
        continues = turns[-1]["role"] == "assistant"
        # Everything the template is given is the client's (control_tokens.py).
        turns, marked = self._control.mark(turns)
        if not getattr(self._tokenizer, "has_chat_template", True):
            text = "".join(f"{t['role']}: {t['content']}\n" for t in turns)
            if not continues:
                text += "assistant: "
            if marked:
                text = self._control.unmarked(text)
            tokens = list(self._tokenizer.encode(text))
            return Prompt(tokens, continues, tools, self.tool_format())
        kwargs: dict[str, Any] = {
            "add_generation_prompt": not continues,
            "continue_final_message": continues,
        }
        if tools and native:
            kwargs["tools"], marked_tools = self._control.mark(tools)
            marked = marked or marked_tools
        if self.has_thinking:
            thinking = isinstance(request.thinking, ThinkingEnabled | ThinkingAdaptive)
            kwargs["enable_thinking"] = thinking
        if as_text.images:
            tokens, images, starts = self._with_images(turns, kwargs, marked, as_text)
            thinking_open = self._ends_in_thinking(tokens)
            return Prompt(
                tokens, continues, tools, self.tool_format(), thinking_open, images, starts
            )
        tokens = self._render(turns, kwargs, marked)
        return Prompt(tokens, continues, tools, self.tool_format(), self._ends_in_thinking(tokens))

    def _with_images(
        self, turns: list[ChatMessage], kwargs: dict[str, Any], marked: bool, as_text: BlockText
    ) -> tuple[list[int], tuple[PreparedImage, ...], tuple[int, ...]]:
        """The prompt's tokens with each image's run where its mark was rendered.

        The text between marks is tokenized as any prompt is (client text stays
        text); an image whose mark the template left out is left out too.
        """
        text = self._tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)
        mark = re.compile(re.escape(IMAGE_OPEN + as_text.nonce + ":") + r"(\d+)" + IMAGE_CLOSE)
        pattern = self._pieces.pattern

        def encode(part: str, first: bool) -> list[int]:
            if pattern is None:
                return self._whole(part, first)
            return self._pieces.encode(part, pattern)

        def encode_later(part: str, _first: bool) -> list[int]:
            return encode(part, False)  # after an image: not the prompt's start

        tokens: list[int] = []
        images: list[PreparedImage] = []
        starts: list[int] = []
        for index, part in enumerate(mark.split(text)):
            if index % 2:
                image = as_text.images[int(part)]
                starts.append(len(tokens))
                images.append(image)
                tokens.extend(image.tokens)
                continue
            if not part:
                continue
            if marked:
                tokens.extend(self._control.encode(part, encode if index == 0 else encode_later))
            else:
                tokens.extend(encode(part, index == 0))
        return tokens, tuple(images), tuple(starts)

    def _ends_in_thinking(self, tokens: list[int]) -> bool:
        if not self.has_thinking:
            return False
        start = self._tokenizer.rfind_think_start(tokens)
        # Only a section the generation prompt opened (the last few tokens).
        return bool(
            start >= max(0, len(tokens) - 8) and self._tokenizer.rfind_think_end(tokens) < start
        )

    def _tokens(self, turns: list[ChatMessage], kwargs: dict[str, Any], marked: bool) -> list[int]:
        """The template's tokens for `turns`: by pieces where the tokenizer allows (pieces.py);
        with `marked` data, its marked spans as text (control_tokens.py)."""
        pieces = self._pieces
        # Read once: another render may turn pieces off meanwhile.
        pattern = pieces.pattern
        checking = pieces.checking
        if pattern is None and not marked:
            return list(self._tokenizer.apply_chat_template(turns, **kwargs))
        text = self._tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)
        if marked:
            if pattern is None:
                return self._control.encode(text, self._whole)
            tokens = self._control.encode(text, lambda part, _: pieces.encode(part, pattern))
            if checking:
                return pieces.confirm(tokens, self._control.encode(text, self._whole))
            return tokens
        assert pattern is not None
        tokens = pieces.encode(text, pattern)
        if checking:
            whole = list(self._tokenizer.apply_chat_template(turns, **kwargs))
            return pieces.confirm(tokens, whole)
        return tokens

    def _whole(self, text: str, first: bool) -> list[int]:
        """Part of a prompt, tokenized whole (`first`: it starts the prompt)."""

        def encode(part: str) -> list[int]:
            return list(self._tokenizer.encode(part, add_special_tokens=False))

        return encode(text) if first else after_newline(encode, text)

    def _render(self, turns: list[ChatMessage], kwargs: dict[str, Any], marked: bool) -> list[int]:
        try:
            return self._tokens(turns, kwargs, marked)
        except Exception:
            # Some templates refuse a system turn anywhere but first; keep the
            # leading one and present later ones as user turns.
            merged = _merged(
                {"role": "user", "content": turn["content"]}
                if turn["role"] == "system" and i > 0
                else turn
                for i, turn in enumerate(turns)
            )
            try:
                return self._tokens(merged, kwargs, marked)
            except Exception as exc:
                raise InvalidRequest(
                    f"messages: model {self._model_name!r} chat template cannot render "
                    f"this conversation: {exc}"
                ) from exc
