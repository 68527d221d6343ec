"""Logits processors that shape what a request may generate.

- The output grammar (grammar.py's `OutputGrammar`): compiled and checked by
  `GrammarCompiler`, relaxed where llguidance cannot enforce it, and
  enforced token by token with llguidance; near max_tokens the document is
  closed instead of cut.
- `ThinkingBudget`: `thinking.budget_tokens`, enforced by writing the model's
  end-of-thinking marker when the budget runs out.

The plans are plain data made on the asyncio side; the processors are built
and run on the engine thread, which owns every MLX array. mlx-lm calls a
processor once per decode step with the tokens so far, the last being the
token fed to that step; the first call's last token is the prompt's own.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, replace
from typing import Any

from pensieved.conversation.grammar import OutputGrammar

log = logging.getLogger(__name__)

LogitsProcessor = Any  # (tokens: mx.array, logits: mx.array) -> mx.array


class GrammarCompiler:
    """One model's llguidance tokenizer, and its checked grammars.

    Building the tokenizer takes a few hundred milliseconds, so it is built
    once, on first use. Grammars are checked on the request path, before the
    response starts, so that a grammar llguidance cannot compile leaves the
    output unconstrained (with a warning) instead of failing mid-stream.
    """

    def __init__(self, tokenizer: Any, logits_size: int) -> None:
        self._tokenizer = tokenizer
        self._logits_size = logits_size
        self._ll: Any = None
        self._lock = threading.Lock()
        # Checked grammars, each with a fresh matcher that requests copy
        # (microseconds) instead of compiling their own (milliseconds for
        # Claude Code's ~24 tool schemas), on the engine thread.
        self._grammars: dict[OutputGrammar, tuple[Any, list[str]]] = {}
        self._enforceable: dict[OutputGrammar, OutputGrammar | None] = {}

    def _ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                hf = getattr(self._tokenizer, "_tokenizer", self._tokenizer)
                self._ll = llguidance.hf.from_tokenizer(
                    hf,
                    n_vocab=self._logits_size,
                    eos_token=sorted(self._tokenizer.eos_token_ids),
                )
            return self._ll

    def enforceable(self, plan: OutputGrammar) -> OutputGrammar | None:
        """`plan` as far as llguidance can enforce it; None: nothing of it (unconstrained).

        Never refused: schema keywords llguidance does not implement are
        dropped; a schema that still does not compile is tried without its
        patterns, formats and remote `$ref`s, and then each schema alone, the
        ones that fail left free. What was dropped is named in one warning,
        the first time a plan is seen.
        """
        with self._lock:
            if plan in self._enforceable:
                return self._enforceable[plan]
        notes: list[str] = []
        result = self._relaxed(plan, notes)
        if notes:
            log.warning("output constraints relaxed: %s", "; ".join(notes))
        with self._lock:
            if len(self._enforceable) > 64:
                self._enforceable.clear()
            self._enforceable[plan] = result
        return result

    def _relaxed(self, plan: OutputGrammar, notes: list[str]) -> OutputGrammar | None:
        try:
            notes += self._compiled(plan)[1]
            return plan
        except ValueError as exc:
            notes.append(f"{exc} (so patterns, formats and remote $refs are not enforced)")
        loose = replace(plan, loose=True)
        try:
            notes += self._compiled(loose)[1]
            return loose
        except ValueError as exc:
            notes.append(f"{exc} (so that schema is not enforced)")

        def compiles(part: OutputGrammar) -> bool:
            try:
                self._compiled(part)
                return True
            except ValueError:
                return False

        # Each schema on its own: those that fail alone leave their part free.
        tools = tuple(
            (
                name,
                schema
                if compiles(replace(loose, tools=((name, schema),), reply_schema=None))
                else None,
            )
            for name, schema in loose.tools
        )
        schema = loose.reply_schema
        if schema is not None and not compiles(replace(loose, tools=(), forced=False)):
            schema = None
        rest = replace(loose, tools=tools, reply_schema=schema)
        if (rest.tools or rest.reply_schema is not None) and compiles(rest):
            return rest
        return None

    def compile(self, plan: OutputGrammar) -> Any:
        """A checked matcher for `plan` (shared: copy it); raises ValueError naming the problem."""
        return self._compiled(plan)[0]

    def _compiled(self, plan: OutputGrammar) -> tuple[Any, list[str]]:
        """The matcher and llguidance's warnings (what it does not enforce)."""
        import llguidance

        cached = self._grammars.get(plan)
        if cached is not None:
            return cached
        ll = self._ll_tokenizer()
        markers = [plan.start, *(plan.thinking or ())]
        special = {}
        for marker in filter(None, markers):
            ids = ll.tokenize_str(marker)
            if len(ids) == 1 and ll.is_special_token(ids[0]):
                special[marker] = ids[0]
        grammar = llguidance.LLMatcher.grammar_from_lark(plan.lark(special))
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if failed:
            raise ValueError(_brief(messages))
        matcher = llguidance.LLMatcher(ll, grammar)
        if matcher.is_error():
            raise ValueError(_brief([matcher.get_error()]))
        entry = (matcher, [_brief(messages)] if messages else [])
        with self._lock:
            if len(self._grammars) > 64:
                self._grammars.clear()
            self._grammars[plan] = entry
        return entry

    def processor(self, plan: OutputGrammar, budget: int | None = None) -> LogitsProcessor:
        """A processor enforcing `plan`; with `budget` (max_tokens), one that closes in time."""
        matcher = self.compile(plan).deep_copy()
        # Forced calls and JSON replies are complete wherever the grammar
        # accepts; a lazily constrained reply is free text there.
        complete = plan.forced or plan.reply_schema is not None
        return GrammarProcessor(matcher, self._ll_tokenizer(), budget, self._closers, complete)

    @functools.cached_property
    def _closers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The closers that are one token here, and the end tokens."""
        ll = self._ll_tokenizer()
        closers = []
        for text in _CLOSERS:
            ids = ll.tokenize_str(text)
            if len(ids) == 1:
                closers.append(ids[0])
        return tuple(closers), tuple(sorted(self._tokenizer.eos_token_ids))


# Near the end of its budget, a constrained reply is closed instead of cut:
# the shortest way to a complete document is written (a closing quote, the
# braces, an end token), so that it still parses. Tried in this order, where
# the grammar allows; elsewhere (a required key, an enum value) the model
# chooses among what the grammar allows.
_CLOSERS = ('"}', '"]', '""', '"', "}", "]", "0", "false", "null", "[]", "{}", ",")
# How close to the budget's end the closing path is looked for (each look is
# a few mask computations, so only here).
CLOSE_WINDOW = 32


class GrammarProcessor:
    """Masks every token the grammar does not allow next; closes the document in time."""

    def __init__(
        self,
        matcher: Any,
        ll: Any,
        budget: int | None = None,
        closers: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
        complete_when_accepting: bool = False,
    ) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = matcher
        self._ll = ll  # llguidance's tokenizer
        self._bitmask = allocate_token_bitmask(1, ll.vocab_size)
        self._calls = 0
        self._budget = budget
        self._closers, self._eos = closers
        self._complete_when_accepting = complete_when_accepting
        # The budget was about to run out and the grammar is writing the
        # shortest ending: the reply ends for max_tokens, not of its own accord.
        self.closing = False
        # The last call masked the logits (a call or document is being written).
        self.constrained = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import numpy as np
        from llguidance.numpy import fill_next_token_bitmask

        self._calls += 1
        if self._calls > 1:
            self._matcher.consume_token(int(tokens[-1].item()))
        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        if self._matcher.is_error():
            # Cannot happen for tokens the mask allowed; leave the logits be
            # rather than fail the request.
            return logits
        free = bool(np.all(self._bitmask == -1))  # free text: nothing to mask or close
        self.constrained = not free
        left = CLOSE_WINDOW + 1 if self._budget is None else self._budget - self._calls + 1
        if left <= CLOSE_WINDOW:  # left: this token included
            if self._complete_when_accepting and self._matcher.is_accepting():
                # Complete (a call, the document): end here rather than
                # start another call that the budget cannot finish.
                token = self._closing_token(self._matcher, self._bitmask)
                if token in self._eos:
                    return _only(token, logits)
            if self.closing or (not free and self._must_close(left)):
                self.closing = True
                token = self._closing_token(self._matcher, self._bitmask)
                if token is not None:
                    return _only(token, logits)
        return logits if free else _masked(self._bitmask, logits)

    def forced_after(self, token: int, limit: int) -> list[int]:
        """The tokens the grammar allows no choice in once `token` is written (a draft).

        `token` is the one sampled from this processor's last call, not yet
        consumed; the processor itself is left as it was.
        """
        if not self.constrained or self._matcher.is_error():
            return []
        matcher = self._matcher.deep_copy()
        if not matcher.consume_token(token) or matcher.is_error():
            return []
        return [int(t) for t in matcher.compute_ff_tokens()[:limit]]

    def _closing_token(self, matcher: Any, bitmask: Any) -> int | None:
        """The next token of the shortest ending, where it is clear which; else None."""
        if matcher.is_accepting():
            ends = [t for t in self._eos if _allowed(bitmask, t)]
            if ends:
                return ends[0]
        forced = matcher.compute_ff_bytes()  # text the grammar allows no choice in
        if forced:
            ids = self._ll.tokenize_bytes(forced)
            if ids and _allowed(bitmask, ids[0]):
                return int(ids[0])
        for token in self._closers:
            if _allowed(bitmask, token):
                return token
        return None

    def _must_close(self, left: int) -> bool:
        """Whether the shortest ending found from here takes all the tokens left (or one less)."""
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        matcher = self._matcher.deep_copy()
        bitmask = allocate_token_bitmask(1, self._ll.vocab_size)
        for step in range(left):
            fill_next_token_bitmask(matcher, bitmask, 0)
            if matcher.is_error():
                return False
            token = self._closing_token(matcher, bitmask)
            if token in self._eos:
                return step + 1 >= left - 1
            if token is None:
                # No closer fits (a key, an enum value): the lowest token
                # allowed, a short one in byte-level vocabularies.
                words = bitmask[0].view(np.uint32)
                word = int(np.flatnonzero(words)[0]) if words.any() else -1
                if word < 0:
                    return False
                bits = int(words[word])
                token = 32 * word + (bits & -bits).bit_length() - 1
            matcher.consume_token(token)
        return False


def _brief(messages: list[str]) -> str:
    """llguidance's messages without the grammar listing they quote (Claude Code's is ~60 KB)."""
    # One line each, for the log: what they point at is quoted inline.
    return "; ".join(sorted({" ".join(m.split("\n   1 | ")[0].split()) for m in messages}))


def _allowed(bitmask: Any, token: int) -> bool:
    return bool((int(bitmask[0, token >> 5]) >> (token & 31)) & 1)


def _only(token: int, logits: Any) -> Any:
    import mlx.core as mx

    mask = mx.full(logits.shape, -float("inf"), dtype=logits.dtype)
    mask[..., token] = 0
    return logits + mask


def _masked(bitmask: Any, logits: Any) -> Any:
    """Logits with every token whose bit is 0 set to -inf (bit i of word w is token 32w+i)."""
    import mlx.core as mx

    return _mask_applier()(mx.array(bitmask), logits)


@functools.cache
def _mask_applier() -> Any:
    import mlx.core as mx

    shifts = mx.arange(32, dtype=mx.uint32)

    def apply(bits: Any, logits: Any) -> Any:
        on = (bits.view(mx.uint32)[..., None] >> shifts) & 1
        on = on.reshape(logits.shape[0], -1)[:, : logits.shape[-1]]
        return mx.where(on.astype(mx.bool_), logits, -mx.inf)

    # Compiled, it is 3x faster than unpacking the bits with numpy on the CPU.
    return mx.compile(apply)


@dataclass(frozen=True)
class ThinkingBudget:
    budget: int
    # The prompt already opened the thinking section.
    open: bool


class _BudgetProcessor:
    """Counts thinking tokens; at the budget, forces the end-of-thinking marker."""

    def __init__(self, plan: ThinkingBudget, start: tuple[int, ...], end: tuple[int, ...]) -> None:
        self._budget = plan.budget
        self._start = start
        self._end = end
        self._thinking = plan.open
        self._spent = 0
        self._forcing = 0  # how much of the end marker has been forced so far
        self._calls = 0
        self._recent: list[int] = []

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        self._calls += 1
        if self._calls > 1:
            self._consume(int(tokens[-1].item()))
        if not self._thinking or (self._spent < self._budget and not self._forcing):
            return logits
        # Out of budget: write the end marker, one token per step.
        forced = self._end[self._forcing]
        self._forcing += 1
        if self._forcing == len(self._end):
            self._forcing = 0
        mask = mx.full(logits.shape, -float("inf"), dtype=logits.dtype)
        mask[..., forced] = 0
        return logits + mask

    def _consume(self, token: int) -> None:
        self._recent = [*self._recent[-8:], token]
        if self._thinking:
            self._spent += 1
            if tuple(self._recent[-len(self._end) :]) == self._end:
                self._thinking = False
                self._forcing = 0
        elif tuple(self._recent[-len(self._start) :]) == self._start:
            self._thinking = True


def thinking_processor(plan: ThinkingBudget, tokenizer: Any) -> LogitsProcessor | None:
    start = tokenizer.think_start_tokens
    end = tokenizer.think_end_tokens
    if not start or not end:
        return None
    return _BudgetProcessor(plan, tuple(start), tuple(end))


# Tokens back that the repetition penalty looks at (Ollama's `repeat_last_n`).
REPETITION_WINDOW = 64


def repetition_processor(
    penalty: float, exempt: tuple[int, ...], grammar: Any = None
) -> LogitsProcessor:
    """Make the last REPETITION_WINDOW tokens less likely again, by `penalty` (sign-aware).

    As mlx-lm's and llama.cpp's penalty, but `exempt` (the end-of-turn tokens)
    is never penalized: the window reaches back into the prompt, which ends
    turns with them, and a penalized end token keeps a small model writing.
    Nor is anything while `grammar` (the request's grammar processor, run
    before this one) constrains the output: a call's or a document's JSON
    repeats its quotes and braces on purpose, and a penalized closing quote
    leaves a string open until the budget closes it.
    """
    import mlx.core as mx

    kept = set(exempt)

    def penalize(tokens: Any, logits: Any) -> Any:
        if grammar is not None and grammar.constrained:
            return logits
        recent = [t for t in dict.fromkeys(tokens[-REPETITION_WINDOW:].tolist()) if t not in kept]
        if not recent:
            return logits
        index = mx.array(recent)
        chosen = logits[:, index]
        logits[:, index] = mx.where(chosen < 0, chosen * penalty, chosen / penalty)
        return logits

    return penalize
