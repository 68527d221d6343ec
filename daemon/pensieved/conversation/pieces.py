"""Tokenizing a rendered prompt piece by piece, reusing the pieces seen before.

Claude Code resends its whole conversation every turn, and tokenizing ~20k
tokens of it takes tens of milliseconds on every turn (about 2 µs a token
here), though only the newest turns changed. A fast tokenizer cuts its input
at its added tokens (`<|im_start|>`, `<|im_end|>`, ...) before anything else
and tokenizes the text between them on its own, so a piece's tokens do not
depend on its neighbours: pieces seen before are looked up, and only new ones
are tokenized.

That holds for tokenizers whose every step works within a piece: byte-level
BPE (GPT-2, Llama 3, Qwen, SmolLM) with the usual splitters and Unicode
normalizers, and added tokens that do not eat the whitespace around them.
Anything else is tokenized whole, as is every tokenizer whose first renders
disagree with whole tokenizing (checked, then trusted).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
import threading
from array import array
from typing import Any

log = logging.getLogger(__name__)

# Steps that act within one piece of text (their settings do not matter).
PIECEWISE_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Split", "Punctuation", "Sequence"}
PIECEWISE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Sequence"}
# Renders compared with whole tokenizing before the pieces are trusted.
CHECKED_RENDERS = 3
# The cache's size: the pieces' text, their tokens and the entries themselves.
MAX_CACHED_BYTES = 64 * 1024**2
ENTRY_BYTES = 200  # an entry's dict slot and array header, about
# Shorter pieces (a role name, a short turn) are tokenized each time: cheap,
# and not worth an entry.
MIN_CACHED_CHARS = 64
# Past this many added tokens, matching them with a regex costs about what it saves.
MAX_ADDED_TOKENS = 1024
# Longer pieces (a document, a long file) are tokenized through the batch call,
# which lets go of the GIL: a million characters take about a second here,
# and the event loop must not wait for them.
LONG_PIECE_CHARS = 8192


class PieceTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._backend = _piecewise_backend(tokenizer)
        self._added: dict[str, int] = {}
        self._pattern: re.Pattern[str] | None = None
        if self._backend is not None:
            decoder = self._backend.get_added_tokens_decoder()
            self._added = {str(token.content): int(i) for i, token in decoder.items()}
            # Longest first: at one position, the longest added token wins, as in the tokenizer.
            names = sorted(self._added, key=len, reverse=True)
            self._pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        self._pieces: collections.OrderedDict[str, tuple[array[int], int]] = (
            collections.OrderedDict()
        )
        self._held = 0  # bytes in `_pieces`
        self._checks_left = CHECKED_RENDERS
        self._lock = threading.Lock()  # renders run in worker threads and on the loop

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """What `encode` splits at; None once pieces are off (read it once per render)."""
        return self._pattern

    @property
    def checking(self) -> bool:
        """The next render should also be tokenized whole, and `confirm`ed."""
        return self._pattern is not None and self._checks_left > 0

    def confirm(self, pieces: list[int], whole: list[int]) -> list[int]:
        """The whole tokens; pieces are given up for good if they differ from them."""
        if pieces == whole:
            self._checks_left -= 1
            return whole
        log.warning("prompt tokens by pieces differ from whole; tokenizing prompts whole")
        self._pattern = None
        with self._lock:
            self._pieces.clear()
            self._held = 0
        return whole

    def encode(self, text: str, pattern: re.Pattern[str]) -> list[int]:
        """`text`'s tokens, split at `pattern` (this tokenizer's `pattern`, read before)."""
        tokens: list[int] = []
        for index, piece in enumerate(pattern.split(text)):
            if index % 2:  # the pattern's group: an added token
                tokens.append(self._added[piece])
            elif piece:
                tokens.extend(self._piece(piece))
        return tokens

    def _piece(self, piece: str) -> list[int] | array[int]:
        if len(piece) < MIN_CACHED_CHARS:
            return self._encode(piece)
        with self._lock:
            found = self._pieces.get(piece)
            if found is not None:
                self._pieces.move_to_end(piece)
                return found[0]
        ids = array("I", self._encode(piece))
        size = sys.getsizeof(piece) + ids.itemsize * len(ids) + ENTRY_BYTES
        if size * 4 > MAX_CACHED_BYTES:
            return ids
        with self._lock:
            if piece not in self._pieces:
                self._pieces[piece] = (ids, size)
                self._held += size
            while self._held > MAX_CACHED_BYTES:
                _, (_, dropped) = self._pieces.popitem(last=False)
                self._held -= dropped
        return ids

    def _encode(self, piece: str) -> list[int]:
        if len(piece) >= LONG_PIECE_CHARS:
            ids: list[int] = self._backend.encode_batch([piece], add_special_tokens=False)[0].ids
            return ids
        ids = self._backend.encode(piece, add_special_tokens=False).ids
        return ids


def _piecewise_backend(tokenizer: Any) -> Any:
    """The fast tokenizer behind `tokenizer` if its pieces can be tokenized alone; else None."""
    # mlx-lm's wrapper holds the transformers tokenizer, which holds the fast one.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        backend = getattr(getattr(tokenizer, "_tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except (AttributeError, ValueError):
        return None
    pre_tokenizer = spec.get("pre_tokenizer")
    if getattr(backend, "encode_special_tokens", False):
        return None  # added tokens are tokenized as text: nothing to split at
    added_tokens = spec.get("added_tokens") or []
    if (
        not added_tokens
        or len(added_tokens) > MAX_ADDED_TOKENS
        or not _only(pre_tokenizer, "pretokenizers", PIECEWISE_PRE_TOKENIZERS)
    ):
        return None
    if spec.get("normalizer") is not None and not _only(
        spec["normalizer"], "normalizers", PIECEWISE_NORMALIZERS
    ):
        return None
    for added in added_tokens:
        # Tokens that take the whitespace around them, or match whole words
        # only, are not cut out where the text has them. Normalized ones are
        # matched in a second pass over what the others left: a single
        # longest-first split could cut at another place.
        if any(added.get(flag) for flag in ("lstrip", "rstrip", "single_word", "normalized")):
            return None
    return backend


def _only(step: Any, children: str, allowed: set[str]) -> bool:
    """`step` (a tokenizer.json pipeline step) is made only of `allowed` kinds."""
    if not isinstance(step, dict) or step.get("type") not in allowed:
        return False
    if step["type"] == "Sequence":
        return all(_only(child, children, allowed) for child in step.get(children, []))
    return True
