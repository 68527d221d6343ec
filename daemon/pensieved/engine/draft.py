"""A draft model's guesses for speculative decoding (`speculate = "draft"`).

A smaller model with the same tokenizer guesses the next few tokens greedily;
the target checks them in one forward pass (speculate.py). The draft model
keeps its own KV cache of the sequence it last drafted for, and before each
guess rewinds it to where it still agrees with the sequence's tokens and
feeds it the rest: the target's rejections, plain steps and n-gram or
grammar drafts all come down to a common prefix, so nothing has to tell it
what was kept. A new sequence keeps what it shares with the last one (a
conversation's next turn repeats the previous turn's tokens).
"""

from __future__ import annotations

from typing import Any, cast

# Tokens fed to the draft model per pass when it catches up on a prompt.
CATCH_UP_CHUNK = 512


class Drafter:
    """One draft model's cache and the tokens in it (engine thread only)."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size  # the target tokenizer's: guesses stay below it
        self._cache: list[Any] | None = None
        self._tokens: list[int] = []  # what the cache holds, in order
        self._trusted = 0  # a prefix of `_tokens` known to be the current sequence's

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self._cache or ())

    def forget(self) -> None:
        """The sequence changed: compare it in full before reusing the cache."""
        self._trusted = 0

    def catch_up(self, tokens: list[int]) -> None:
        """Make the cache hold exactly `tokens` (rewinding, then feeding what it lacks)."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        if self._cache is None or self._cache[0].offset != len(self._tokens):
            # New, or left behind by a failed step: start over.
            self._cache = make_prompt_cache(self.model)
            self._tokens = []
        held = self._tokens
        limit = min(len(held), len(tokens))
        same = min(self._trusted, limit)
        while same < limit and held[same] == tokens[same]:
            same += 1
        if same < len(held):
            trim_prompt_cache(self._cache, len(held) - same)
            del held[same:]
        for start in range(same, len(tokens), CATCH_UP_CHUNK):
            chunk = tokens[start : start + CATCH_UP_CHUNK]
            self.model(mx.array([chunk]), cache=self._cache)
            mx.eval([c.state for c in self._cache])
            held.extend(chunk)
        self._trusted = len(tokens)  # all the sequence's own

    def propose(self, history: list[int], token: int, limit: int) -> list[int]:
        """Up to `limit` greedy guesses of what follows `history` and then `token`."""
        import mlx.core as mx

        if limit <= 0:
            return []
        self.catch_up(history)
        # Each pass's guess feeds the next without waiting for it (one sync
        # at the end), as mlx-lm's own speculative step does.
        feed = mx.array([[token]])
        picks = []
        for _ in range(limit):
            logits = self.model(feed, cache=self._cache)
            pick = mx.argmax(logits[:, -1], axis=-1)
            mx.async_eval(pick)  # type: ignore[no-untyped-call]
            picks.append(pick)
            feed = pick[None]
        guesses = cast(list[int], mx.concatenate(picks).tolist())
        self._tokens.extend([token, *guesses[:-1]])
        for position, guess in enumerate(guesses):
            if guess >= self.vocab_size:
                # A padded output id: no token the target could accept.
                del guesses[position:]
                break
        # The cache now also holds guesses the target may reject: compare them
        # next time.
        self._trusted = len(history) + 1
        return guesses
