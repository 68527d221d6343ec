"""What a reply may be, as a grammar: `OutputGrammar` and its text in llguidance's Lark dialect.

Tool calls whose input matches the tools' JSON schemas, and/or a text reply
that is one JSON document valid under a schema (structured output).
`forced` (tool_choice `any` or `tool`) allows nothing but calls; otherwise
text is free until the call marker appears, and from there the call must be
valid. A reasoning model's thinking section, when it has one, stays free:
the grammar starts where thinking ends. The plan is plain, hashable data
made on the asyncio side; constraints.py compiles and enforces it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pensieved.conversation.schemas import generation_schema

# Compact JSON as json.dumps writes it: a model may not pad a document with
# whitespace until max_tokens. `lenient`: schema keywords llguidance cannot
# enforce (Claude Code's schemas use `propertyNames`) are dropped, with a
# warning, instead of refusing the grammar.
_JSON_OPTIONS = {
    "whitespace_flexible": False,
    "key_separator": ": ",
    "item_separator": ", ",
    "lenient": True,
}


@dataclass(frozen=True)
class OutputGrammar:
    """What a reply may be: calls (forced, or lazily once opened) and/or a JSON document."""

    # (name, input_schema as JSON text, or None for any object): hashable, so
    # compiled grammars cache.
    tools: tuple[tuple[str, str | None], ...] = ()
    forced: bool = False
    parallel: bool = True
    start: str = ""  # the call marker
    end: str = ""
    # Structured output: the reply's text is one JSON document valid under
    # this schema (JSON text), or, when there are tools, calls instead.
    reply_schema: str | None = None
    # The model's thinking markers: an optional, free thinking section comes
    # first (opened already when `thinking_open`).
    thinking: tuple[str, str] | None = None
    thinking_open: bool = False
    # Schemas without the keywords llguidance may fail to compile at all
    # (look-around in a `pattern`, an unknown `format`, a remote `$ref`):
    # the fallback when the grammar as asked does not compile.
    loose: bool = False

    def lark(self, special: dict[str, int] | None = None) -> str:
        """The grammar in llguidance's Lark dialect.

        `special`: the ids of markers that are one special token (Qwen's
        `<tool_call>`), which plain text can never spell.
        """
        special = special or {}

        def marker(text: str) -> str:
            return f"<[{special[text]}]>" if text in special else _quote(text)

        rules = ["%llguidance {}"]
        if self.thinking is None:
            rules.append("start: reply")
        else:
            think_start, think_end = self.thinking
            opening = "" if self.thinking_open else f"{marker(think_start)} "
            # Models leave a blank line or two between thinking and the reply.
            rules.append(f"start: ({opening}thinking GAP?)? reply")
            rules.append("GAP: /[ \\t\\r\\n]{1,4}/")
            # Free text up to the end marker. Text cannot spell a special
            # token, so that one needs no exclusion; a text marker ends the
            # shortest text that ends with it.
            lazy = "" if think_end in special else "[lazy]"
            rules.append(f"thinking{lazy}: /(.|\\n)*/ {marker(think_end)}")
        calls = bool(self.tools and self.start)
        if not calls and (self.forced or self.reply_schema is None):
            raise ValueError("an output grammar needs tools and a call marker, or a reply schema")
        if self.reply_schema is not None and not self.forced:
            schema = generation_schema(json.loads(self.reply_schema), self.loose)
            document = f"%json {_with_options(schema)}"
            rules.append(f"reply: {document} | calls" if calls else f"reply: {document}")
        elif self.forced:
            rules.append("reply: calls")
        else:
            # Free text and calls in any order. FREE never contains the
            # marker, and `text` is the shortest text that ends with it, so
            # text is unconstrained until the marker appears and the call
            # after it must be valid.
            more = " reply" if self.parallel else ""
            rules.append(f"reply: FREE | text call{more}")
        if calls and (self.forced or self.reply_schema is not None):
            # Calls only: the first at once, more after whitespace. Text
            # after a call is allowed so that a model that means to end its
            # turn with words can (the turn ends there: the assembler's
            # `calls_only`) instead of being pushed into one more call.
            rules.append(f'calls: {marker(self.start)} "\\n" call after')
            rules.append("after: FREE | gap call after" if self.parallel else "after: FREE")
        if calls:
            rules += self._text_rules(marker(self.start), self.start in special)
            names = " | ".join(f"call_{i}" for i in range(len(self.tools)))
            rules.append(f"call: ({names}) {_quote(chr(10) + self.end)}")
        for i, (name, schema) in enumerate(self.tools if calls else ()):
            args = (
                {"type": "object"}
                if schema is None
                else generation_schema(json.loads(schema), self.loose)
            )
            head = _quote(f'{{"name": {json.dumps(name)}, "arguments": ')
            rules.append(f'call_{i}: {head} args_{i} "}}"')
            rules.append(f"args_{i}: %json {_with_options(args)}")
        return "\n".join(rules)

    def _text_rules(self, call_marker: str, special: bool) -> list[str]:
        """FREE: text without the call marker; `text`/`gap`: text/whitespace up to a call."""
        free = "/(.|\\n)*/"
        space = "/[ \\t\\r\\n]{0,8}/"
        if special:
            # Text cannot spell a special token: nothing to exclude.
            return [
                f"FREE: {free}",
                f'text: {free} {call_marker} "\\n"',
                f'gap: {space} {call_marker} "\\n"',
            ]
        marker_text = re.escape(self.start).replace("/", "\\/")
        return [
            f"FREE: {free} & ~/(.|\\n)*{marker_text}(.|\\n)*/",
            f'text[lazy]: {free} {call_marker} "\\n"',
            f'gap[lazy]: {space} {call_marker} "\\n"',
        ]


def _quote(text: str) -> str:
    return json.dumps(text)


def _with_options(schema: Any) -> str:
    if schema is True or not isinstance(schema, dict):
        schema = {}
    return json.dumps({**schema, "x-guidance": _JSON_OPTIONS})
