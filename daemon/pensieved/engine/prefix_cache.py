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

import json
import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# An older entry that shares a prefix with a new one and holds at most this
# many tokens beyond it is dropped when the new one is stored: a short reply
# (a one-off exchange, a side request) is rarely continued, and the shared
# prefix, which is what later prompts hit, lives on in the new entry. A
# conversation's own entry differs from its siblings by far more and is kept.
SIBLING_TAIL = 512


class PrefixCache:
    def __init__(self, max_bytes: int, compact: bool = True) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.max_bytes = max_bytes
        # Entries are copied to exactly what they cover; off only where a
        # test sizes entries it never means to allocate (lazy arrays).
        self._compact = compact
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=max(max_bytes, 0))
        self._lock = threading.Lock()
        self.hit_tokens = 0  # prompt tokens served from the cache, all time

    @property
    def nbytes(self) -> int:
        return int(self._lru.nbytes)

    def __len__(self) -> int:
        return len(self._lru)

    def cached_length(self, model: Any, tokens: list[int]) -> int:
        """How many of `tokens` a `fetch` now would take from the cache (event-loop safe)."""
        if not tokens or self.max_bytes <= 0:
            return 0
        with self._lock:
            result = self._lru._trie.search(model, tokens)
        if result.exact is not None:
            return len(tokens) - 1
        shorter = len(result.shorter) if result.shorter is not None else 0
        if result.longer is not None and result.common_prefix > shorter:
            return min(len(tokens) - 1, result.common_prefix)
        return shorter

    def fetch(self, model: Any, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A copy of the best cache for `tokens` and how many tokens it covers.

        At least the last token is always left to prefill: generation starts
        from its logits.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if self.max_bytes <= 0 or len(tokens) < 2:
            return None, 0
        with self._lock:
            cache, rest = self._lru.fetch_nearest_cache(model, tokens)
        if cache is None:
            return None, 0
        cached = len(tokens) - len(rest)
        if cached >= len(tokens):
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, cached - len(tokens) + 1)
            cached = len(tokens) - 1
        self.hit_tokens += cached
        return cache, cached

    def store(self, model: Any, tokens: list[int], cache: list[Any]) -> None:
        """Keep `cache` (covering exactly `tokens`) for later requests."""
        if not tokens or not cache:
            return
        if self._compact:
            _compact(cache)
        size = sum(int(c.nbytes) for c in cache)
        if size > self.max_bytes:
            log.debug("prefix cache: %d bytes for %d tokens exceed the budget", size, len(tokens))
            return
        with self._lock:
            self._drop_short_sibling(model, tokens)
            # Evicts least recently used entries until the total fits.
            self._lru.insert_cache(model, tokens, cache)

    def _drop_short_sibling(self, model: Any, tokens: list[int]) -> None:
        """Forget the entry that shares a prefix with `tokens` and adds little beyond it."""
        found = self._lru._trie.search(model, tokens)
        sibling = found.longer
        if sibling is None or found.exact is not None or found.common_prefix >= len(tokens):
            return  # none, or `tokens` is a prefix of it: it holds more than the new one
        if len(sibling) - found.common_prefix > SIBLING_TAIL:
            return
        self._forget(model, sibling)

    def _forget(self, model: Any, tokens: list[int]) -> None:
        keep = self._lru
        entry = keep._trie.pop(model, tokens)
        keep._lru.remove(model, tokens)
        keep._n_bytes -= entry.nbytes
        keep._n_bytes_by_type[entry.cache_type] -= entry.nbytes

    def shrink(self, max_bytes: int) -> None:
        """Evict least recently used entries until at most `max_bytes` remain."""
        with self._lock:
            self._lru.trim_to(n_bytes=max_bytes)

    def drop(self, model: Any) -> None:
        """Forget every entry of `model` (it was unloaded)."""
        with self._lock:
            entries = [
                tokens
                for lru in self._lru._lru._lrus.values()
                for owner, tokens in list(lru)
                if owner == model
            ]
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
            recent = [
                tokens
                for lru in self._lru._lru._lrus.values()
                for owner, tokens in lru
                if owner == model
            ]
            if not recent:
                return False
            tokens = recent[-1]
            entry = self._lru._trie.get(model, tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**identity, "tokens": json.dumps(tokens)}
        save_prompt_cache(str(path), entry.prompt_cache, metadata)
        log.info("prefix cache: saved %d tokens to %s", len(tokens), path)
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
            log.warning("prefix cache: ignoring %s: %s", path, exc)
            return 0
        if metadata != identity:
            log.info("prefix cache: %s was made by another model; ignored", path)
            return 0
        self.store(model, tokens, cache)
        return len(tokens)


def _compact(cache: list[Any]) -> None:
    """Make each layer of `cache` own exactly what it counts, evaluated.

    A cache taken out of a batch is a lazy slice of the batch's buffers (all
    its sequences, allocated in steps of 256 tokens): until evaluated it keeps
    that whole buffer alive, several times what `nbytes` counts (issue 17).
    A plain `KVCache` is cut to its `offset` tokens and copied; other kinds
    (rotating, quantized) count their whole buffers already and are only
    evaluated.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    for layer in cache:
        if type(layer) is KVCache and layer.keys is not None:
            end = layer.offset
            # `+ 0` makes a new array of exactly the slice's size; a view, or
            # `mx.contiguous` of an already contiguous slice, would share the
            # batch's buffer.
            keys, values = layer.keys, layer.values
            assert values is not None
            layer.keys = keys[..., :end, :] + 0
            layer.values = values[..., :end, :] + 0
    mx.eval([layer.state for layer in cache if not layer.empty()])
