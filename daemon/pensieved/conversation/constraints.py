"""Logits processors that shape what a request may generate.

- `ToolGrammar`: tool calls whose input matches the tools' JSON schemas,
  enforced token by token with llguidance. `forced` (tool_choice `any` or
  `tool`) allows nothing but calls; otherwise text is free until the call
  marker appears, and from there the call must be valid.
- `ThinkingBudget`: `thinking.budget_tokens`, enforced by writing the model's
  end-of-thinking marker when the budget runs out.

The plans are plain data made on the asyncio side; the processors are built
and run on the engine thread, which owns every MLX array. mlx-lm calls a
processor once per decode step with the tokens so far, the last being the
token fed to that step; the first call's last token is the prompt's own.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LogitsProcessor = Any  # (tokens: mx.array, logits: mx.array) -> mx.array


@dataclass(frozen=True)
class ToolGrammar:
    # (name, input_schema as JSON text): hashable, so compiled grammars cache.
    tools: tuple[tuple[str, str], ...]
    forced: bool
    parallel: bool
    start: str
    end: str
    # Ignore schema keywords llguidance cannot enforce (Claude Code's
    # schemas use `propertyNames`) instead of refusing the grammar.
    lenient: bool = True

    def lark(self, start_token: int | None = None) -> str:
        """The grammar in llguidance's Lark dialect.

        `start_token`: the id of the start marker when it is one special token
        (Qwen's `<tool_call>`), which plain text can never spell.
        """
        marker = f"<[{start_token}]>" if start_token is not None else _quote(self.start)
        rules = ["%llguidance {}"]
        more = ' ("\\n" more)*' if self.parallel else ""
        if self.forced:
            rules.append(f'start: {marker} "\\n" call{more}')
        else:
            # Free text, then optionally calls. FREE never contains the
            # marker, and `text` is the shortest text that ends with it, so
            # text is unconstrained until the marker appears and the call
            # after it must be valid.
            free = "/(.|\\n)*/"
            marker_text = re.escape(self.start).replace("/", "\\/")
            rules += [
                f"start: FREE | text call{more}",
                f"FREE: {free} & ~/(.|\\n)*{marker_text}(.|\\n)*/",
                f'text[lazy]: {free} {marker} "\\n"',
            ]
        rules.append(f'more: {marker} "\\n" call')
        names = " | ".join(f"call_{i}" for i in range(len(self.tools)))
        rules.append(f"call: ({names}) {_quote(chr(10) + self.end)}")
        for i, (name, schema) in enumerate(self.tools):
            # Compact JSON as json.dumps writes it: a model may not pad a
            # call with whitespace until max_tokens.
            options = {
                "whitespace_flexible": False,
                "key_separator": ": ",
                "item_separator": ", ",
                "lenient": self.lenient,
            }
            schema = json.dumps({**json.loads(schema), "x-guidance": options})
            head = _quote(f'{{"name": {json.dumps(name)}, "arguments": ')
            rules.append(f'call_{i}: {head} args_{i} "}}"')
            rules.append(f"args_{i}: %json {schema}")
        return "\n".join(rules)


def _quote(text: str) -> str:
    return json.dumps(text)


class GrammarCompiler:
    """One model's llguidance tokenizer, and its checked grammars.

    Building the tokenizer takes a few hundred milliseconds, so it is built
    once, on first use. Grammars are checked on the request path, before the
    response starts, so that a schema llguidance cannot compile is a 400.
    """

    def __init__(self, tokenizer: Any, logits_size: int) -> None:
        self._tokenizer = tokenizer
        self._logits_size = logits_size
        self._ll: Any = None
        self._lock = threading.Lock()
        # Checked grammars, each with a fresh matcher that requests copy
        # (microseconds) instead of compiling their own (milliseconds for
        # Claude Code's ~24 tool schemas), on the engine thread.
        self._grammars: dict[ToolGrammar, Any] = {}

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

    def compile(self, plan: ToolGrammar) -> Any:
        """A fresh matcher for `plan`'s grammar, checked; raises ValueError naming the problem."""
        import llguidance

        cached = self._grammars.get(plan)
        if cached is not None:
            return cached
        ll = self._ll_tokenizer()
        ids = ll.tokenize_str(plan.start)
        special = ids[0] if len(ids) == 1 and ll.is_special_token(ids[0]) else None
        grammar = llguidance.LLMatcher.grammar_from_lark(plan.lark(special))
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if failed:
            raise ValueError("; ".join(messages))
        if messages:
            log.info("tool grammar: %s", "; ".join(messages))
        matcher = llguidance.LLMatcher(ll, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        if len(self._grammars) > 64:
            self._grammars.clear()
        self._grammars[plan] = matcher
        return matcher

    def processor(self, plan: ToolGrammar) -> LogitsProcessor:
        matcher = self.compile(plan).deep_copy()
        return _GrammarProcessor(matcher, self._ll_tokenizer().vocab_size)


class _GrammarProcessor:
    """Masks every token the grammar does not allow next."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._calls = 0

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
        if bool(np.all(self._bitmask == -1)):
            return logits  # free text: nothing to mask
        return _masked(self._bitmask, logits)


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
