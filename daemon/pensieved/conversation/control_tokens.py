"""Client text stays text: nothing a request says becomes one of the model's control tokens.

A tokenizer cuts its input at its added tokens (`<|im_start|>`, `<|im_end|>`,
`<think>`, ...) wherever they appear, before anything else. Rendered naively, a
tool result, a file or a web page that spells `<|im_end|>\\n<|im_start|>system`
would forge real turn boundaries: a fake system turn, a fake tool call.
Anthropic's API never gives content that power, and Claude Code's permission
model assumes tool results cannot forge turns.

So the data handed to the chat template (turns, tools) is marked first:
every added token's text in it is wrapped in two private-use characters. The
template renders as usual: the tokens it writes itself are bare, the
client's are marked. The rendered prompt is then cut at the marked spans;
each becomes that token's text tokenized as ordinary text (fixed ids, found
once per tokenizer: `<|im_start|>` reads `<|`, `im`, `_`, `start`, `|>` to the
model), and the text between is tokenized as before. The same content gives
the same tokens every time (the prompt cache relies on it), and a request
without such text renders exactly as it did.

Whitespace added tokens (Gemma's "\\n") are left alone: they are text anyway.
Tokens matched after normalization (`normalized: true`, rare in chat models)
are marked only as spelled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# The marks (in a private-use plane that no text needs). Marks already in
# client text are dropped, so they cannot forge a marked span either.
OPEN = "\U000f2000"
CLOSE = "\U000f2001"
# For a tokenizer that cannot tokenize a token's text as text (no fast
# tokenizer to do it with): the text with a word joiner after its first
# character, which no added token matches.
WORD_JOINER = "\u2060"


class ControlTokens:
    """Marks one tokenizer's added tokens in client data, and tokenizes the marks as text."""

    def __init__(self, tokenizer: Any) -> None:
        added = _added_tokens(tokenizer)
        self._ids = set(added.values())
        names = [name for name in added if name.strip()]
        self._find = _alternation(names)
        self._spans = re.compile(
            f"{OPEN}({self._find.pattern if self._find else '(?!)'}){CLOSE}|[{OPEN}{CLOSE}]"
        )
        self._as_text = {name: self._text_ids(tokenizer, name) for name in names}

    def mark(self, value: Any) -> tuple[Any, bool]:
        """`value` (strings in lists and dicts, keys too) with added tokens marked; and whether
        anything changed."""
        find = self._find
        if find is None:
            return value, False
        template = rf"{OPEN}\g<0>{CLOSE}"
        changed = False

        def walk(item: Any) -> Any:
            nonlocal changed
            if isinstance(item, str):
                text = item
                if OPEN in text or CLOSE in text:
                    text = text.replace(OPEN, "").replace(CLOSE, "")
                text = find.sub(template, text)  # `text` itself when nothing matches
                changed = changed or text is not item
                return text
            if isinstance(item, dict):
                return {walk(key): walk(inner) for key, inner in item.items()}
            if isinstance(item, list | tuple):
                return [walk(inner) for inner in item]
            return item

        return walk(value), changed

    def encode(self, text: str, encode_text: Callable[[str, bool], list[int]]) -> list[int]:
        """Tokens of a prompt rendered from marked data: each marked span as ordinary text, the
        text between by `encode_text(text, first)` (`first`: it starts the prompt)."""
        tokens: list[int] = []
        for index, part in enumerate(self._spans.split(text)):
            if index % 2:
                if part is not None:  # None: a lone mark (the template cut a span); dropped
                    tokens.extend(self._as_text[part])
            elif part:
                tokens.extend(encode_text(part, index == 0))
        return tokens

    def unmarked(self, text: str) -> str:
        """`text` with each marked span spelled so that no added token matches it (for
        tokenizing whole, where marked spans cannot be cut out)."""
        return self._spans.sub(
            lambda m: _broken(m.group(1)) if m.group(1) is not None else "", text
        )

    def _text_ids(self, tokenizer: Any, name: str) -> list[int]:
        backend = _backend(tokenizer)
        if backend is not None:
            ids = after_newline(lambda text: _plain_ids(backend, text), name)
            if not self._ids.intersection(ids):
                return ids
        ids = list(tokenizer.encode(_broken(name), add_special_tokens=False))
        if not self._ids.intersection(ids):
            return ids
        log.warning("added token %r cannot be written as text; it is left out of client text", name)
        return []


def after_newline(encode: Callable[[str], list[int]], text: str) -> list[int]:
    """`text`'s tokens as they read after other text, where a tokenizer that adds a prefix
    space at the start (SentencePiece) adds none: tokenized after a newline, which is then
    taken off."""
    newline = encode("\n")
    ids = encode("\n" + text)
    if newline and ids[: len(newline)] == newline:
        return ids[len(newline) :]
    return encode(text)


def _broken(name: str) -> str:
    return name[:1] + WORD_JOINER + name[1:]


def _added_tokens(tokenizer: Any) -> dict[str, int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if not isinstance(decoder, dict):
        backend = _backend(tokenizer)
        decoder = backend.get_added_tokens_decoder() if backend is not None else {}
    return {str(getattr(token, "content", token)): int(i) for i, token in decoder.items()}


def _backend(tokenizer: Any) -> Any:
    """The fast (Rust) tokenizer behind `tokenizer`, if any (mlx-lm wraps transformers')."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        backend = getattr(getattr(tokenizer, "_tokenizer", None), "backend_tokenizer", None)
    return backend


def _plain_ids(backend: Any, text: str) -> list[int]:
    """`text`'s tokens by the tokenizer's own steps, without its added tokens."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    words = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, 0)]
    return [token.id for word, _ in words for token in backend.model.tokenize(word)]


def _alternation(names: list[str]) -> re.Pattern[str] | None:
    """A regex matching any of `names`, longest first at each position, as tokenizers match
    added tokens; built as a trie, so thousands of names cost little more than a few."""
    if not names:
        return None
    trie: dict[str, Any] = {}
    for name in names:
        node = trie
        for char in name:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + pattern(child) for char, child in node.items() if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # a name ends here: the longer ones are tried first
            return f"(?:{body})?"
        return body

    return re.compile(pattern(trie))
