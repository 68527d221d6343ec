"""Every use of mlx-lm's private surface, named in one place.

Pensieve builds on mlx-lm's `BatchGenerator`, its prompt cache and its
detokenizers, and in a few places reaches past what mlx-lm promises: the
token a batch will feed next (speculative decoding steps the batch itself),
the prompt cache's trie and LRU order (side entries are evicted first), the
wired-memory limit a generator restores. Each such touch is a function here,
and tests/test_mlx_internals.py checks each one against real mlx-lm objects:
an mlx-lm release that moves one fails there, with the name, instead of deep
inside a request. mlx-lm's version is pinned in pyproject.toml; the canaries
(part of `make test`) are what make the pin safe to move.

MLX and mlx-lm are imported inside the functions: importing this module
costs nothing.
"""

from __future__ import annotations

from typing import Any

# -- mlx_lm.generate.BatchGenerator -------------------------------------------


def generation_batch(generator: Any) -> Any:
    """The generator's batch of decoding sequences (a `GenerationBatch`)."""
    return generator._generation_batch


def only_decoding(generator: Any) -> bool:
    """Whether nothing waits to be prefilled: every sequence is decoding."""
    return not len(generator._prompt_batch) and not generator._unprocessed_sequences


def count_step(generator: Any, seconds: float, tokens: int) -> None:
    """Add a step the generator did not take itself (a verified draft) to its statistics."""
    counters = generator._counters
    counters.decode_time += seconds
    counters.generation_tokens += tokens
    counters.generation_steps += 1


def disown_wired_limit(generator: Any) -> int | None:
    """The wired limit the generator would restore when closed; it will restore none now."""
    previous: int | None = generator._old_wired_limit
    generator._old_wired_limit = None
    return previous


# -- mlx_lm.generate.GenerationBatch (one row: `index`) -------------------------


def pending_token(batch: Any) -> Any:
    """The sampled token(s) the next step feeds (an MLX array), or None before any."""
    return batch._next_tokens


def set_pending(batch: Any, token: int, logprobs: Any) -> None:
    """Make `token` (with its log-probabilities) what a lone row's next step feeds."""
    import mlx.core as mx

    batch._next_tokens = mx.array([token], dtype=mx.uint32)
    batch._next_logprobs = [logprobs]


def tokens_written(batch: Any, index: int = 0) -> int:
    """How many tokens row `index` has generated (against its `max_tokens`)."""
    return int(batch._num_tokens[index])


def count_token(batch: Any, index: int = 0) -> int:
    """Count one more generated token for row `index`; the new count."""
    batch._num_tokens[index] += 1
    return int(batch._num_tokens[index])


def stop_matcher(batch: Any, index: int = 0) -> Any:
    """Row `index`'s stop-token matcher (`advance(token)` is True at a stop)."""
    return batch._matchers[index]


def token_context(batch: Any, index: int = 0) -> Any:
    """Row `index`'s token history as its logits processors see it."""
    return batch._token_context[index]


# -- mlx_lm.models.cache ------------------------------------------------------


def base_cache_class() -> Any:
    """mlx-lm's base class of KV caches, which its batch caches extend."""
    from mlx_lm.models.cache import _BaseCache

    return _BaseCache


def prompt_cache_lru(max_bytes: int, order: Any, kinds: tuple[str, ...]) -> Any:
    """mlx-lm's `LRUPromptCache`, evicting in `order` (push/remove/pop/len), bytes by kind."""
    from mlx_lm.models.cache import LRUPromptCache

    lru = LRUPromptCache(max_size=1 << 30, max_bytes=max(max_bytes, 0))
    lru._lru = order
    lru._n_bytes_by_type = dict.fromkeys(kinds, 0)
    return lru


def trie_search(lru: Any, model: Any, tokens: list[int]) -> Any:
    """The trie's search for `tokens`: `.exact`, `.shorter`, `.longer`, `.common_prefix`."""
    return lru._trie.search(model, tokens)


def trie_entry(lru: Any, model: Any, tokens: list[int]) -> Any:
    """The entry stored for exactly `tokens` (`.prompt_cache`, `.nbytes`, `.cache_type`)."""
    return lru._trie.get(model, tokens)


def forget_entry(lru: Any, model: Any, tokens: list[int]) -> None:
    """Remove the entry for exactly `tokens`, keeping the byte counts right."""
    entry = lru._trie.pop(model, tokens)
    lru._lru.remove(model, tokens)
    lru._n_bytes -= entry.nbytes
    lru._n_bytes_by_type[entry.cache_type] -= entry.nbytes


def bytes_of_kind(lru: Any, kind: str) -> int:
    """Bytes held by entries of one kind (side or main)."""
    return int(lru._n_bytes_by_type[kind])


def eviction_order(lru: Any) -> Any:
    """The order object `prompt_cache_lru` installed."""
    return lru._lru


# -- mlx_lm.tokenizer_utils ---------------------------------------------------


def keep_first_space(detokenizer: Any) -> Any:
    """`detokenizer`, made to keep the first token's leading space (in place).

    mlx-lm's SPM and BPE detokenizers drop it, which suits the start of a
    reply but loses a continued turn's indentation.
    """
    if hasattr(detokenizer, "trim_space"):  # SPMStreamingDetokenizer (public)
        detokenizer.trim_space = False
    if hasattr(detokenizer, "_maybe_trim_space"):  # BPEStreamingDetokenizer
        detokenizer._maybe_trim_space = lambda text: text
    return detokenizer
