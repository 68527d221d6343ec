"""KV caches of earlier requests, found again by token prefix, within a byte budget.

Claude Code resends its whole conversation every turn: system prompt, ~20k
tokens of tool schemas, the history. Each finished request leaves the KV
cache of its prompt and reply here, keyed by those tokens; the next request
takes the entry sharing the longest prefix with its prompt (trimmed to that
prefix) and prefills only the rest.

Built on mlx-lm's `LRUPromptCache` (a token trie with LRU eviction), with the
byte budget enforced on every path (mlx-lm's own server leaves it off on one,
mlx-lm#1390): an entry larger than the whole budget is never stored, storing
evicts least recently used entries until the total fits, and `shrink` lets
the memory guard take more back. All MLX work here runs on the engine thread;
the lock lets the event loop ask how long a hit would be (for `usage` in
`message_start`) without racing the engine's changes to the trie.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pensieved.engine import kv_quant, mlx_internals
from pensieved.paths import private_dir

log = logging.getLogger(__name__)

# An older entry that shares a prefix with a new one and holds at most this
# many tokens beyond it is dropped when the new one is stored: a short reply
# (a one-off exchange, a side request) is rarely continued, and the shared
# prefix, which is what later prompts hit, lives on in the new entry. A
# conversation's own entry differs from its siblings by far more and is kept.
SIBLING_TAIL = 512
# A saved entry's metadata key for a vision model's position delta (engine/vision.py).
POSITION_DELTA = "position_delta"

# Entry classes, evicted in this order. A side request's entry (a session
# title, a one-off helper: see `GenerationRequest.side`) goes before any main
# conversation's, and never evicts one to make room for itself.
SIDE, MAIN = "side", "main"

# A prompt that re-prefills more than this many tokens a cached entry held
# (it diverged from it) is a miss worth explaining in the log and status.
MISS_TOKENS = 256
# How many tokens of each side an explained miss shows.
EXCERPT_TOKENS = 24


@dataclass(frozen=True)
class Divergence:
    """Where a prompt left the cached entry nearest to it."""

    at: int  # tokens shared with the entry; the prompt differs from here on
    prompt_tokens: int
    lost: int  # tokens the entry held past `at` that the prompt could not use
    before: list[int]  # the shared tokens just before `at`
    ours: list[int]  # the prompt's tokens from `at`
    theirs: list[int]  # the entry's tokens from `at`


class _Order:
    """mlx-lm's LRU order, made strict: every side entry goes before any main one."""

    def __init__(self) -> None:
        self._ordering = [SIDE, MAIN]
        self._lrus: dict[str, collections.deque[tuple[Any, list[int]]]] = {
            kind: collections.deque() for kind in self._ordering
        }

    def __len__(self) -> int:
        return sum(len(lru) for lru in self._lrus.values())

    def push(self, model: Any, tokens: list[int], cache_type: str = MAIN) -> None:
        self._lrus[cache_type].append((model, tokens))

    def remove(self, model: Any, tokens: list[int]) -> None:
        for lru in self._lrus.values():
            try:
                lru.remove((model, tokens))
                return
            except ValueError:
                pass

    def entries(self, *kinds: str) -> list[tuple[Any, list[int]]]:
        """(model, tokens) of the entries of `kinds` (all by default), least recent first."""
        return [entry for kind in kinds or self._ordering for entry in self._lrus[kind]]

    def pop(self) -> tuple[Any, list[int]]:
        for kind in self._ordering:
            if self._lrus[kind]:
                return self._lrus[kind].popleft()
        raise IndexError("the prompt cache is empty")


class PromptCache:
    def __init__(self, max_bytes: int, compact: bool = True) -> None:
        self.max_bytes = max_bytes
        # Entries are copied to exactly what they cover; off only where a
        # test sizes entries it never means to allocate (lazy arrays).
        self._compact = compact
        # mlx-lm's LRUPromptCache, evicting every side entry before any main one.
        self._order = _Order()
        self._entries = mlx_internals.prompt_cache_lru(max_bytes, self._order, (SIDE, MAIN))
        self._lock = threading.Lock()
        self.hit_tokens = 0  # prompt tokens served from the cache, all time
        # The last few explained misses, newest last (for `pensievectl status`).
        self.misses: collections.deque[dict[str, Any]] = collections.deque(maxlen=8)

    @property
    def nbytes(self) -> int:
        return int(self._entries.nbytes)

    def __len__(self) -> int:
        return len(self._entries)

    def cached_length(self, model: Any, tokens: list[int]) -> int:
        """How many of `tokens` a `fetch` now would take from the cache (event-loop safe)."""
        if not tokens or self.max_bytes <= 0:
            return 0
        with self._lock:
            result = mlx_internals.trie_search(self._entries, model, tokens)
        if result.exact is not None:
            return len(tokens) - 1
        shorter = len(result.shorter) if result.shorter is not None else 0
        if result.longer is not None and result.common_prefix > shorter:
            return min(len(tokens) - 1, int(result.common_prefix))
        return shorter

    def fetch(self, model: Any, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the best cache for `tokens` and how many tokens it covers.

        At least the last token is always left to prefill: generation starts
        from its logits.
        """
        cache, cached, _ = self.fetch_explained(model, tokens)
        return cache, cached

    def fetch_explained(
        self, model: Any, tokens: list[int]
    ) -> tuple[list[Any] | None, int, Divergence | None]:
        """`fetch`, and where `tokens` left a cached entry when that cost a re-prefill."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if self.max_bytes <= 0 or len(tokens) < 2:
            return None, 0, None
        with self._lock:
            divergence = self._divergence(model, tokens)
            cache, rest = self._entries.fetch_nearest_cache(model, tokens)
        if cache is None:
            return None, 0, divergence
        cached = len(tokens) - len(rest)
        if cached >= len(tokens):
            if not can_trim_prompt_cache(cache):
                return None, 0, divergence
            trim_prompt_cache(cache, cached - len(tokens) + 1)
            cached = len(tokens) - 1
        self.hit_tokens += cached
        cache = kv_quant.for_batch_of(model, cache)  # as the model's batch holds them
        return cache, cached, divergence

    def _divergence(self, model: Any, tokens: list[int]) -> Divergence | None:
        """The entry sharing the longest prefix with `tokens`, when it held much more of them.

        A prompt that only extends an entry (the next turn of a conversation)
        is not a miss; one that departs from an entry at token `at`, with more
        than `MISS_TOKENS` of the entry's tokens wasted past it, is.
        """
        found = mlx_internals.trie_search(self._entries, model, tokens)
        if found.exact is not None:
            return None
        theirs = found.longer
        at = found.common_prefix
        if theirs is None:
            if at > 0 or found.shorter is not None:
                return None
            # Nothing shared at all: compare with this model's newest entry.
            newest = [t for owner, t in self._order.entries(MAIN) if owner == model]
            if not newest:
                return None
            theirs = newest[-1]
        lost = min(len(theirs), len(tokens)) - at
        if lost <= MISS_TOKENS:
            return None
        return Divergence(
            at=at,
            prompt_tokens=len(tokens),
            lost=lost,
            before=tokens[max(0, at - EXCERPT_TOKENS) : at],
            ours=tokens[at : at + EXCERPT_TOKENS],
            theirs=list(theirs[at : at + EXCERPT_TOKENS]),
        )

    def note_miss(self, model_name: str, divergence: Divergence, texts: dict[str, str]) -> None:
        """Keep an explained miss for `pensievectl status` (the last few only)."""
        self.misses.append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "model": model_name,
                "prompt_tokens": divergence.prompt_tokens,
                "diverged_at": divergence.at,
                "lost_tokens": divergence.lost,
                **texts,
            }
        )

    def store(self, model: Any, tokens: list[int], cache: list[Any], side: bool = False) -> None:
        """Keep `cache` (covering exactly `tokens`) for later requests.

        A `side` entry is evicted before any main one and never evicts one:
        when it fits only by pushing out a main conversation, it is not kept.
        """
        if not tokens or not cache:
            return
        cache = kv_quant.for_storage(model, cache)  # quantized when the model says so
        if self._compact:
            _compact(cache)
        size = sum(int(c.nbytes) for c in cache)
        if size > self.max_bytes:
            log.debug("prompt cache: %d bytes for %d tokens exceed the budget", size, len(tokens))
            return
        with self._lock:
            found = mlx_internals.trie_search(self._entries, model, tokens)
            kind = SIDE if side and not self._extends_main(model, found) else MAIN
            if kind == SIDE and self.nbytes - self._side_bytes() + size > self.max_bytes:
                log.debug("prompt cache: a side entry of %d tokens not kept", len(tokens))
                return
            self._drop_short_sibling(model, tokens, found)
            # Evicts entries (side ones first, then least recently used) until the total fits.
            self._entries.insert_cache(model, tokens, cache, cache_type=kind)

    def _side_bytes(self) -> int:
        return mlx_internals.bytes_of_kind(self._entries, SIDE)

    def _extends_main(self, model: Any, found: Any) -> bool:
        """Whether a main entry is a prefix of the tokens the trie search `found` was for.

        Storing those tokens replaces that entry, so the new one takes its class.
        """
        prefix = found.exact if found.exact is not None else found.shorter
        if prefix is None:
            return False
        return bool(mlx_internals.trie_entry(self._entries, model, prefix).cache_type == MAIN)

    def _drop_short_sibling(self, model: Any, tokens: list[int], found: Any) -> None:
        """Forget the entry that shares a prefix with `tokens` and adds little beyond it.

        `found` is the trie's search for `tokens`.
        """
        sibling = found.longer
        if sibling is None or found.exact is not None or found.common_prefix >= len(tokens):
            return  # none, or `tokens` is a prefix of it: it holds more than the new one
        if len(sibling) - found.common_prefix > SIBLING_TAIL:
            return
        self._forget(model, sibling)

    def _forget(self, model: Any, tokens: list[int]) -> None:
        mlx_internals.forget_entry(self._entries, model, tokens)

    def stored(self, model: Any, tokens: list[int]) -> list[Any]:
        """The cache layers of the entry for exactly `tokens` (as kept: maybe quantized)."""
        with self._lock:
            return list(mlx_internals.trie_entry(self._entries, model, tokens).prompt_cache)

    def shrink(self, max_bytes: int) -> None:
        """Evict least recently used entries until at most `max_bytes` remain."""
        with self._lock:
            self._entries.trim_to(n_bytes=max_bytes)

    def drop(self, model: Any) -> None:
        """Forget every entry of `model` (it was unloaded)."""
        with self._lock:
            entries = [tokens for owner, tokens in self._order.entries() if owner == model]
            for tokens in entries:
                self._forget(model, tokens)

    # -- persistence ------------------------------------------------------

    def save(self, model: Any, path: Path, identity: dict[str, str]) -> bool:
        """Write `model`'s most recently used entry to `path`; False when there is none.

        `identity` says which model made it: a cache is only ever loaded back
        into the same model.
        """
        from mlx_lm.models.cache import save_prompt_cache

        with self._lock:
            recent = [tokens for owner, tokens in self._order.entries() if owner == model]
            if not recent:
                return False
            tokens = recent[-1]
            entry = mlx_internals.trie_entry(self._entries, model, tokens)
        # The token ids of the last prompt are in it: a private folder, a 0600
        # file, and written beside the old one then renamed over it, so that a
        # stop cut short leaves the previous file whole.
        private_dir(path.parent)
        partial = path.with_name(f".{path.stem}.partial.safetensors")
        metadata = {**identity, "tokens": json.dumps(tokens)}
        layers = entry.prompt_cache
        delta = getattr(layers[0], "delta", None) if layers else None
        if delta is not None:  # a vision model's: saved as plain layers, its delta beside them
            layers = [_plain(layer) for layer in layers]
            metadata[POSITION_DELTA] = str(delta)
        old_umask = os.umask(0o077)
        try:
            save_prompt_cache(str(partial), layers, metadata)
        finally:
            os.umask(old_umask)
        partial.chmod(0o600)
        with partial.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, path)
        log.info("prompt cache: saved %d tokens to %s", len(tokens), path)
        return True

    def load(self, model: Any, path: Path, identity: dict[str, str]) -> int:
        """Read back an entry `save` wrote for the same model; the tokens it covers (0: none)."""
        from mlx_lm.models.cache import load_prompt_cache

        if not path.exists():
            return 0
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)  # type: ignore[no-untyped-call]
            tokens = [int(t) for t in json.loads(metadata.pop("tokens"))]
        except Exception as exc:  # a damaged file must not stop the daemon
            log.warning("prompt cache: ignoring %s: %s", path, exc)
            return 0
        delta = metadata.pop(POSITION_DELTA, None)
        if metadata != identity:
            log.info("prompt cache: %s was made by another model; ignored", path)
            return 0
        if delta is not None:
            cache = [_positioned(layer, int(delta)) for layer in cache]
        self.store(model, tokens, cache)
        return len(tokens)


def _plain(layer: Any) -> Any:
    """A vision model's cache layer as a plain `KVCache` (mlx-lm's loader knows only its own)."""
    from mlx_lm.models.cache import KVCache

    plain = KVCache()  # type: ignore[no-untyped-call]
    plain.keys, plain.values, plain.offset = layer.keys, layer.values, layer.offset
    return plain


def _positioned(layer: Any, delta: int) -> Any:
    from pensieved.engine.vision_batch import PositionedKVCache

    positioned = PositionedKVCache(delta)
    positioned.keys, positioned.values, positioned.offset = layer.keys, layer.values, layer.offset
    return positioned


def _compact(cache: list[Any]) -> None:
    """Make each layer of `cache` own exactly what it counts, evaluated.

    A cache taken out of a batch is a lazy slice of the batch's buffers (all
    its sequences, allocated in steps of 256 tokens): until evaluated it keeps
    that whole buffer alive, several times what `nbytes` counts (issue 17).
    A plain `KVCache` (or a vision model's, with its position delta) is cut to
    its `offset` tokens and copied; other kinds
    (rotating, quantized) count their whole buffers already and are only
    evaluated.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from pensieved.engine.vision_batch import PositionedKVCache

    for layer in cache:
        if type(layer) in (KVCache, PositionedKVCache) and layer.keys is not None:
            end = layer.offset
            # `+ 0` makes a new array of exactly the slice's size; a view, or
            # `mx.contiguous` of an already contiguous slice, would share the
            # batch's buffer.
            keys, values = layer.keys, layer.values
            assert values is not None
            layer.keys = keys[..., :end, :] + 0
            layer.values = values[..., :end, :] + 0
    mx.eval([layer.state for layer in cache if not layer.empty()])
