"""Speculative decoding for a lone sequence: guess tokens, check them in one forward pass.

When one sequence decodes alone (Claude Code's main loop), each step feeds one
token, and the forward pass costs about the same for a few tokens as for one.
So the step feeds the sampled token and a guess at the next few (a draft) at
once, and keeps the guesses the model agrees with:

- Drafts come from the reply's own context ("prompt lookup"): the tokens that
  followed the last earlier place where the reply's last tokens appeared. A
  code edit repeats most of the file it was shown; prose rarely repeats.
- A draft model (`speculate = "draft"`, draft.py), a smaller one with the
  same tokenizer, guesses greedily; prompt lookup still drafts where the
  reply's end matches its context for `MAX_MATCH` tokens.
- Where the output grammar (a tool call, a JSON reply) allows only one
  continuation, the draft is that continuation ("fast-forward"): the grammar
  masks every other token, so it is accepted by construction.

Checking is exact: greedy requests keep a draft token only where it is the
argmax, so the text is the one plain decoding writes; sampled requests use
speculative sampling (Leviathan et al., 2023) with a deterministic draft, so
the output distribution is unchanged. Logits processors (grammar, thinking
budget) see each position in order and stop at the first rejected token, so
their state never has to be rolled back.

Per sequence, the draft length adapts to how often drafts are accepted, and
speculative steps are timed against plain ones: where they do not pay (prose
that does not repeat; a CPU whose BLAS costs every drafted token a full
token's compute) the sequence decodes plainly for a while, longer each time.
Two or more sequences in flight decode as a plain batch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pensieved.conversation.constraints import GrammarProcessor
from pensieved.conversation.plan import Sampling
from pensieved.engine.draft import Drafter
from pensieved.engine.mlx_internals import (
    count_step,
    count_token,
    generation_batch,
    only_decoding,
    pending_token,
    set_pending,
    stop_matcher,
    token_context,
    tokens_written,
)

# The longest earlier match looked for, in tokens; matches start at 2.
MAX_MATCH = 8
# Earlier places of the last two tokens tried, most recent first.
CANDIDATES = 32


@dataclass
class _Sequence:
    """One sequence's lookup index, and how its speculative steps have paid."""

    uid: int
    batch: Any  # uids restart in a new generator
    draft: int  # tokens proposed per step now
    # (a, b) -> positions of b in the history where a precedes it, in order.
    index: dict[tuple[int, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    indexed: int = 0  # history tokens in the index
    plain: float = 0.0  # seconds per plain step (moving average)
    plain_steps: int = 0
    gain: float = 1.0  # tokens per plain step's time, over speculative steps (moving average)
    resting: int = 0  # plain steps left before drafting again
    rest: int = 8  # the next rest's length (doubles while speculation does not pay)
    drafted: bool = False  # the draft model has seen its prompt


@dataclass
class SpeculationStats:
    steps: int = 0  # speculative steps taken
    proposed: int = 0  # draft tokens checked
    accepted: int = 0  # draft tokens kept
    guessed: int = 0  # draft tokens that came from a draft model


class Speculator:
    """One model's decode steps: speculative when the batch holds one sequence, else plain."""

    def __init__(
        self, mode: str, max_draft: int, draft_model: Any = None, vocab_size: int = 0
    ) -> None:
        """`draft_model` drafts in mode "draft", for a target of `vocab_size` tokens."""
        self.mode = mode
        self.max_draft = max_draft
        self.stats = SpeculationStats()
        self._sequence: _Sequence | None = None
        self._drafter = (
            Drafter(draft_model, vocab_size)
            if mode == "draft" and draft_model is not None
            else None
        )

    @property
    def cache_bytes(self) -> int:
        """The draft model's KV cache (kept between sequences)."""
        return 0 if self._drafter is None else self._drafter.cache_bytes

    def step(
        self, gen: Any, sampling: Callable[[int], Sampling | None]
    ) -> tuple[list[Any], list[Any]]:
        """One step of mlx-lm's `BatchGenerator` `gen`: its (prompt, generation) responses.

        `sampling` gives a sequence's sampling settings by uid.
        """
        import mlx.core as mx

        state = self._lone(gen)
        if state is None:
            return gen.next()  # type: ignore[no-any-return]
        if state.resting > 0 or state.plain_steps < 2:
            state.resting = max(0, state.resting - 1)
            return self._plain(gen, state)
        batch = generation_batch(gen)
        settings = sampling(batch.uids[0])
        history = batch.tokens[0]
        grammar = _grammar(batch.logits_processors[0])
        lookup = self.mode in ("ngram", "draft")
        if lookup:
            _index(state, history)
        drafter = self._drafter
        # Only a possible draft is worth waiting for the pending token: a plain
        # step overlaps that wait with building the next step.
        if settings is None or (
            grammar is None and drafter is None and not (lookup and _could_match(state, history))
        ):
            return self._plain(gen, state)
        with mx.stream(gen.stream):
            if drafter is not None and not state.drafted:
                # The draft model's prefill of the prompt, outside the step's
                # timing; later catching up (after plain steps) is timed.
                drafter.catch_up(history)
                state.drafted = True
            started = time.perf_counter()
            token = int(pending_token(batch).item())
            limit = min(state.draft, batch.max_tokens[0] - tokens_written(batch) - 1)
            draft: list[int] = []
            if grammar is not None and limit > 0:
                draft = grammar.forced_after(token, limit)
            if not draft and lookup and limit > 0:
                # Beside a draft model, only a long match is worth more than its guess.
                shortest = 2 if drafter is None else MAX_MATCH
                draft = _lookup(state, history, token, limit, shortest)
            if not draft and drafter is not None:
                draft = drafter.propose(history, token, limit)
                self.stats.guessed += len(draft)
            if not draft:
                return self._plain(gen, None)  # the wait made it an untypical step
            responses = _verify(batch, token, draft, settings)
            seconds = time.perf_counter() - started
        count_step(gen, seconds, len(responses))
        self._learn(state, len(draft), len(responses), seconds)
        return [], responses

    def _lone(self, gen: Any) -> _Sequence | None:
        """The state of the batch's one decoding sequence; None: not that case."""
        if self.mode == "off":
            return None
        batch = generation_batch(gen)
        if len(batch) != 1 or not only_decoding(gen):
            return None
        if pending_token(batch) is None or not all(c.is_trimmable() for c in batch.prompt_cache):
            return None
        state = self._sequence
        if state is None or state.uid != batch.uids[0] or state.batch is not batch:
            state = self._sequence = _Sequence(batch.uids[0], batch, min(4, self.max_draft))
            if self._drafter is not None:
                self._drafter.forget()
        return state

    def _plain(self, gen: Any, state: _Sequence | None) -> tuple[list[Any], list[Any]]:
        started = time.perf_counter()
        responses = gen.next()
        if state is not None:
            seconds = time.perf_counter() - started
            state.plain = seconds if not state.plain_steps else 0.8 * state.plain + 0.2 * seconds
            state.plain_steps += 1
        return responses  # type: ignore[no-any-return]

    def _learn(self, state: _Sequence, proposed: int, emitted: int, seconds: float) -> None:
        accepted = max(0, min(proposed, emitted - 1))
        self.stats.steps += 1
        self.stats.proposed += proposed
        self.stats.accepted += accepted
        if accepted == proposed:
            state.draft = min(self.max_draft, state.draft * 2)
        elif accepted < proposed // 2:
            state.draft = max(1, state.draft // 2)
        # What this step was worth in plain steps: the machine's own measure
        # (a compute-bound CPU pays for every drafted token; Metal barely does).
        gain = emitted * state.plain / seconds
        state.gain = 0.7 * state.gain + 0.3 * gain
        if state.gain < 1.0:
            # Slower than plain decoding: plain steps for a while, longer each time.
            state.resting = state.rest
            state.rest = min(256, state.rest * 2)
            state.gain = 1.0
        elif gain >= 1.0:
            state.rest = 8


def _grammar(processors: list[Any] | None) -> Any:
    """The grammar processor, while it constrains the reply (not in free text)."""
    for processor in processors or ():
        if isinstance(processor, GrammarProcessor):
            return processor if processor.constrained else None
    return None


def _index(state: _Sequence, history: list[int]) -> None:
    """Add the history's new tokens to the lookup index."""
    index = state.index
    for i in range(max(1, state.indexed), len(history)):
        index[(history[i - 1], history[i])].append(i)
    state.indexed = len(history)


def _could_match(state: _Sequence, history: list[int]) -> bool:
    """Whether the history's last two tokens appeared before (with something after)."""
    if len(history) < 3:
        return False
    places = state.index.get((history[-2], history[-1]))
    return places is not None and len(places) > 1


def _lookup(
    state: _Sequence, history: list[int], token: int, limit: int, shortest: int = 2
) -> list[int]:
    """What followed the longest recent earlier match of the history's end, `token` last.

    Nothing when that match is shorter than `shortest` tokens.
    """
    if not history:
        return []
    places = state.index.get((history[-1], token))
    if not places:
        return []
    end = len(history)
    best, best_length = -1, 0
    for place in reversed(places[-CANDIDATES:]):
        if place + 1 >= end:
            continue
        # The match so far: history[place - 1 : place + 1] == history[-1:] + [token].
        length = 2
        while (
            length < MAX_MATCH
            and place - length >= 0
            and history[place - length] == history[end - length]
        ):
            length += 1
        if length > best_length:
            best, best_length = place, length
            if length == MAX_MATCH:
                break
    if best < 0 or best_length < shortest:
        return []
    draft = history[best + 1 : best + 1 + limit]
    # A match close to the end repeats a loop: continue it past the history,
    # through `token` and the draft itself.
    for offset in range(len(draft), limit):
        at = best + 1 + offset - end
        draft.append(token if at == 0 else draft[at - 1])
    return draft


def _verify(batch: Any, token: int, draft: list[int], settings: Sampling) -> list[Any]:
    """Feed `token` and `draft` in one pass, keep what the model agrees with, and respond."""
    import mlx.core as mx

    fed = [token, *draft]
    logits = batch.model(mx.array([fed]), cache=batch.prompt_cache)[0]
    processors = batch.logits_processors[0] or ()
    greedy = settings.temperature == 0
    chosen: list[int] = []  # the model's token after each fed position, while it agrees
    if greedy and not processors:
        # One evaluation for every position.
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picks: list[int] = _values(mx.argmax(logprobs, axis=-1))
        for position, pick in enumerate(picks):
            chosen.append(pick)
            if position == len(draft) or pick != draft[position]:
                break
        last = logprobs[len(chosen) - 1]
    else:
        context = token_context(batch)
        for position in range(len(fed)):
            row = logits[position : position + 1]
            if processors:
                tokens = context.update_and_fetch(mx.array([fed[position]]))
                for processor in processors:
                    row = processor(tokens, row)
            row = row - mx.logsumexp(row, axis=-1, keepdims=True)
            guess = draft[position] if position < len(draft) else None
            pick, agrees = _choose(row, guess, settings)
            chosen.append(pick)
            last = row[0]
            if not agrees:
                break
    kept = len(chosen) - 1  # draft tokens accepted
    return _respond(batch, fed[: kept + 1], len(fed), chosen[-1], last)


def _choose(logprobs: Any, guess: int | None, settings: Sampling) -> tuple[int, bool]:
    """The token at one position, and whether it is `guess` (the draft's)."""
    import mlx.core as mx

    if settings.temperature == 0:
        pick = int(_values(mx.argmax(logprobs, axis=-1))[0])
        return pick, pick == guess
    scores = _sampling_scores(logprobs, settings)
    if guess is None:
        return int(_values(mx.random.categorical(scores))[0]), False
    # A deterministic draft is kept with the probability the sampler gives it;
    # otherwise the token is drawn from the rest, renormalized.
    probability = _values(mx.softmax(scores, axis=-1)[0, guess : guess + 1])[0]
    if _values(mx.random.uniform(shape=(1,)))[0] < probability:
        return guess, True
    scores[0, guess] = -mx.inf
    return int(_values(mx.random.categorical(scores))[0]), False


def _values(array: Any) -> list[Any]:
    """A 1-D array's values (evaluating it)."""
    return list(array.tolist())


def _sampling_scores(logprobs: Any, settings: Sampling) -> Any:
    """Log-weights of the sampler's actual distribution (top-p, min-p, top-k, temperature).

    The cuts run in the order mlx-lm's `make_sampler` runs them.
    """
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if 0 < settings.top_p < 1.0:
        logprobs = apply_top_p(logprobs, settings.top_p)
    if settings.min_p != 0.0:
        logprobs = apply_min_p(logprobs, settings.min_p)
    if 0 < settings.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, settings.top_k)
    return logprobs * (1 / settings.temperature)


def _respond(batch: Any, emitted: list[int], fed: int, following: int, logprobs: Any) -> list[Any]:
    """One response per emitted token, in order, ending the sequence at its stop or limit.

    The cache holds `fed` new tokens; the ones past what is kept are trimmed, so
    that the cache and `batch.tokens` stay the same length.
    """

    responses = []
    for position, token in enumerate(emitted):
        reason = None
        if count_token(batch) >= batch.max_tokens[0]:
            reason = "length"
        if stop_matcher(batch).advance(token):
            reason = "stop"
        if reason is None:
            responses.append(batch.Response(batch.uids[0], token, logprobs, None, None, None))
            continue
        _keep(batch, emitted[: position + 1], fed)
        responses.append(
            batch.Response(
                batch.uids[0],
                token,
                logprobs,
                reason,
                batch.extract_cache(0),
                batch.tokens[0],
            )
        )
        batch.filter([])
        return responses
    _keep(batch, emitted, fed)
    set_pending(batch, following, logprobs)
    return responses


def _keep(batch: Any, kept: list[int], fed: int) -> None:
    for cache in batch.prompt_cache:
        cache.trim(fed - len(kept))
    batch.tokens[0].extend(kept)
