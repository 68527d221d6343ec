"""Generated text → Anthropic content blocks: thinking, text and tool_use.

The engine streams text. `ContentAssembler` splits it at the model's markers
(`<think>`...`</think>`, the tool-call format's start and end) into the
Messages API's blocks, as the events a stream sends (`content_block_start`,
`content_block_delta`, `content_block_stop`) and as the finished `content`
list a whole response returns; both come from the same code.

Text that could be the start of a marker is held back until it is known not
to be one, so markers never leak into text. A call whose text the format's
parser cannot read, or that names no offered tool, is returned as text:
never dropped, never an error. Arguments of grammar-constrained calls stream
as `input_json_delta` pieces while they are generated; other calls are sent
whole once their closing marker arrives, because until then nobody knows
whether they are valid.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pensieved.conversation.arguments import ArgumentScanner, partial_json
from pensieved.conversation.stops import held_suffix
from pensieved.conversation.toolcalls import ToolFormat
from pensieved.wire import responses

log = logging.getLogger(__name__)

BlockEvent = tuple[str, dict[str, Any]]  # (SSE event name, payload)

# The fixed head of a JSON-bodied call, up to where its arguments begin.
_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


@dataclass(frozen=True)
class ThinkingMarkers:
    start: str
    end: str


class ContentAssembler:
    def __init__(
        self,
        *,
        tool_format: ToolFormat | None,
        tools: list[dict[str, Any]],
        thinking: ThinkingMarkers | None = None,
        thinking_open: bool = False,
        constrained: bool = False,
        single_call: bool = False,
        calls_only: bool = False,
        signer: Callable[[str], str] = lambda _: "",
        continues_text: bool = False,
    ) -> None:
        self._format = tool_format if tools else None
        self._tool_names = {tool["function"]["name"] for tool in tools}
        self._tools = tools
        self._thinking = thinking
        self._constrained = constrained and self._format is not None and self._format.json_body
        self._single_call = single_call
        # The reply is tool calls only (forced, or calls in place of a JSON
        # reply): text after a call means the model is done calling, so the
        # turn ends there.
        self._calls_only = calls_only
        self._signer = signer
        self.blocks: list[dict[str, Any]] = []
        # The reply continues a prefilled assistant turn: its leading
        # whitespace is the prefill's continuation (indentation), not layout.
        self._keep_leading_space = continues_text
        self._open: dict[str, Any] | None = None
        self._events: list[BlockEvent] = []
        self._mode = "thinking" if thinking is not None and thinking_open else "text"
        self._pending = ""  # text not yet placed in a block
        self._body = ""  # the current call's text after its start marker
        self._args = ""  # a streaming call's argument text so far
        self._scanner: ArgumentScanner | None = None
        self.calls = 0
        # A call has closed and only one was allowed: the rest is ignored.
        self.done = False
        # The output ended inside a call that could not be completed.
        self.cut_short = False

    # -- feeding ----------------------------------------------------------

    def feed(self, text: str) -> list[BlockEvent]:
        if not self.done:
            self._pending += text
            self._advance(final=False)
        return self._take()

    def finish(self) -> list[BlockEvent]:
        """The output has ended: place what was held back and close the last block."""
        if self._calls_only and self.calls and self._mode == "text":
            self._pending = ""  # after the calls: nothing but (the start of) another one
        if not self.done:
            self._advance(final=True)
            if self._mode == "call":
                self._end_call(final=True)
            elif self._pending:
                self._emit(self._mode, self._pending)
                self._pending = ""
        self._close()
        return self._take()

    def _take(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    def _advance(self, final: bool) -> None:
        while self._pending and not self.done:
            if self._mode == "thinking":
                assert self._thinking is not None
                if not self._until(self._thinking.end, "thinking", final):
                    return
                self._close()
                self._mode = "text"
            elif self._mode == "text":
                if self._calls_only and self.calls and self._words_after_calls():
                    self.done = True
                    self._pending = ""
                    return
                marker = self._text_until_marker(final)
                if marker is None:
                    return
                if self._thinking is not None and marker == self._thinking.start:
                    self._mode = "thinking"
                else:
                    assert self._format is not None
                    self._mode = "call"
                    self._body = marker if self._format.start_in_body else ""
                    self._args = ""
                    self._scanner = None
            else:
                self._body += self._pending
                self._pending = ""
                self._advance_call()

    def _until(self, marker: str, kind: str, final: bool) -> bool:
        """Emit `kind` text up to `marker`; True once the marker was consumed."""
        index = self._pending.find(marker)
        if index >= 0:
            self._emit(kind, self._pending[:index])
            self._pending = self._pending[index + len(marker) :]
            return True
        hold = 0 if final else held_suffix(self._pending, (marker,))
        self._emit(kind, self._pending[: len(self._pending) - hold])
        self._pending = self._pending[len(self._pending) - hold :]
        return False

    def _text_until_marker(self, final: bool) -> str | None:
        markers: list[str] = []
        if self._format is not None:
            markers.append(self._format.start)
        # Reasoning models open their thinking themselves, before anything else.
        if self._thinking is not None and not self.blocks:
            markers.append(self._thinking.start)
        found: tuple[int, str] | None = None
        for marker in markers:
            index = self._pending.find(marker)
            thinking = self._thinking is not None and marker == self._thinking.start
            if thinking and self._pending[:index].strip():
                continue  # thinking opens only before anything else
            if index >= 0 and (found is None or index < found[0]):
                found = (index, marker)
        if found is not None:
            self._emit("text", self._pending[: found[0]])
            self._pending = self._pending[found[0] + len(found[1]) :]
            return found[1]
        hold = 0 if final else held_suffix(self._pending, tuple(markers))
        self._emit("text", self._pending[: len(self._pending) - hold])
        self._pending = self._pending[len(self._pending) - hold :]
        return None

    def _words_after_calls(self) -> bool:
        """The text after a call is more than whitespace and not the start of another call."""
        assert self._format is not None
        text = self._pending.lstrip()
        start = self._format.start
        return bool(text) and not (text.startswith(start) or start.startswith(text))

    # -- tool calls -------------------------------------------------------

    def _advance_call(self) -> None:
        assert self._format is not None
        if self._constrained:
            self._stream_arguments()
        end = self._format.end
        if end and end in self._body:
            index = self._body.index(end)
            self._pending = self._body[index + len(end) :]
            self._body = self._body[:index]
            self._end_call(final=False)

    def _stream_arguments(self) -> None:
        """Open the tool_use block once the name is known; send arguments as they come."""
        if self._scanner is None:
            head = _CALL_HEAD.match(self._body)
            if head is None:
                return
            self._scanner = ArgumentScanner()
            name = json.loads(f'"{head.group("name")}"')
            self._open_block(responses.tool_use_block(responses.new_tool_use_id(), name, {}))
            self._body = self._body[head.end() :]
        if self._scanner.done:
            return
        taken = self._scanner.feed(self._body)
        piece, self._body = self._body[:taken], self._body[taken:]
        if piece:
            self._args += piece
            self._delta({"type": "input_json_delta", "partial_json": piece})

    def _end_call(self, final: bool) -> None:
        """The call's text is complete (or the output ended inside it)."""
        assert self._format is not None
        self._mode = "text"
        if self._scanner is not None:
            # A streamed call: its block is open and its arguments were sent.
            assert self._open is not None
            try:
                self._open["input"] = json.loads(self._args)
            except ValueError:
                # Cut short (max_tokens): the complete part of what was
                # streamed, as the SDKs read a stream's partial input.
                self._open["input"] = partial_json(self._args)
                self.cut_short = True
                log.info("tool call cut short after %d characters of arguments", len(self._args))
            self._scanner = None
            self._close()
            self._called(1)
            return
        # A format with a closing marker that never came: the call was cut
        # short (some parsers would read it anyway, losing what was cut).
        unclosed = final and bool(self._format.end)
        calls = None if unclosed else self._parse(self._body)
        if calls is None:
            self.cut_short = final
            start = "" if self._format.start_in_body else self._format.start
            end = "" if final else self._format.end
            self._emit("text", f"{start}{self._body}{end}")
            return
        for call in calls:
            block = responses.tool_use_block(responses.new_tool_use_id(), call["name"], {})
            self._open_block(block)
            arguments = json.dumps(call["arguments"], ensure_ascii=False)
            self._delta({"type": "input_json_delta", "partial_json": arguments})
            block["input"] = call["arguments"]
            self._close()
        self._called(len(calls))

    def _parse(self, body: str) -> list[dict[str, Any]] | None:
        assert self._format is not None
        try:
            calls = self._format.parse(body, self._tools)
        except Exception as exc:  # each family's parser raises its own way
            log.info("unreadable %s tool call returned as text: %s", self._format.family, exc)
            return None
        if not calls or any(call["name"] not in self._tool_names for call in calls):
            log.info("tool call names no offered tool; returned as text")
            return None
        # One call allowed: a section holding several keeps the first.
        return calls[:1] if self._single_call else calls

    def _called(self, count: int) -> None:
        self.calls += count
        if self._single_call:
            self.done = True
            self._pending = ""

    # -- blocks -----------------------------------------------------------

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        if self._open is not None and self._open["type"] != kind:
            self._close()
        if self._open is None:
            if kind == "text":
                # Whitespace between blocks (after `</think>`, between
                # calls) is layout, not an answer.
                if not (self._keep_leading_space and not self.blocks):
                    text = text.lstrip()
                if not text:
                    return
                self._open_block(responses.text_block(""))
            else:
                self._open_block(responses.thinking_block("", ""))
        assert self._open is not None
        if kind == "text":
            self._open["text"] += text
            self._delta({"type": "text_delta", "text": text})
        else:
            self._open["thinking"] += text
            self._delta({"type": "thinking_delta", "thinking": text})

    def _open_block(self, block: dict[str, Any]) -> None:
        self._close()
        self._open = block
        self.blocks.append(block)
        start = dict(block)
        if block["type"] == "tool_use":
            start["input"] = {}
        index = len(self.blocks) - 1
        payload = {"type": "content_block_start", "index": index, "content_block": start}
        self._events.append(("content_block_start", payload))

    def _delta(self, delta: dict[str, Any]) -> None:
        index = len(self.blocks) - 1
        self._events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        )

    def _close(self) -> None:
        if self._open is None:
            return
        if self._open["type"] == "thinking":
            signature = self._signer(self._open["thinking"])
            self._open["signature"] = signature
            self._delta({"type": "signature_delta", "signature": signature})
        self._events.append(
            ("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1})
        )
        self._open = None
