"""Stop sequences matched on generated text, not tokens.

A stop string can be tokenized differently inside generated text than on its
own, so matching token ids (as mlx-lm's `StopSequences` does) misses some.
Text that could still be the start of a stop sequence is held back until it
either completes one or cannot anymore, so a stop sequence never leaks out.

Matching runs on the engine thread, for every token of every request, so it
must not cost more with more stop sequences: one automaton (Aho-Corasick)
reads each generated character once, whatever their number, and its state
is the longest held-back suffix. A request with 100k stop sequences cost
74 ms per token when each was searched for in turn.
"""

from __future__ import annotations


class _Automaton:
    """The stop sequences as one trie with failure links (Aho-Corasick).

    A state is a node of the trie: the longest suffix of the text read so far
    that begins some stop sequence. Building costs one step per character of
    the stop sequences (bounded in decode.py).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.children: list[dict[str, int]] = [{}]
        self.depth = [0]
        # The stop sequence that ends at each state, directly or through its
        # failure links (the longest, which began first): "" for none.
        self.match = [""]
        for stop in stops:
            state = 0
            for char in stop:
                following = self.children[state].get(char)
                if following is None:
                    following = len(self.children)
                    self.children[state][char] = following
                    self.children.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.match.append("")
                state = following
            self.match[state] = self.match[state] or stop  # the first of duplicates
        # Failure links, breadth first: a state's is the state of its longest proper suffix.
        self.fail = [0] * len(self.children)
        queue = list(self.children[0].values())
        for state in queue:
            for char, following in self.children[state].items():
                fallback = self.fail[state]
                while fallback and char not in self.children[fallback]:
                    fallback = self.fail[fallback]
                self.fail[following] = self.children[fallback].get(char, 0)
                self.match[following] = self.match[following] or self.match[self.fail[following]]
                queue.append(following)

    def step(self, state: int, char: str) -> int:
        while state and char not in self.children[state]:
            state = self.fail[state]
        return self.children[state].get(char, 0)


class StopMatcher:
    def __init__(self, stop_sequences: tuple[str, ...] | list[str]) -> None:
        stops = tuple(s for s in stop_sequences if s)
        self._automaton = _Automaton(stops) if stops else None
        self._state = 0
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add generated text; return (text safe to emit, matched stop sequence or None).

        Generation stops where a stop sequence is first complete; the
        returned text is then everything before it.
        """
        automaton = self._automaton
        if automaton is None:
            return text, None
        pending = self._pending + text
        state = self._state
        offset = len(self._pending)
        for index, char in enumerate(text, offset + 1):
            state = automaton.step(state, char)
            stop = automaton.match[state]
            if stop:
                self._pending, self._state = "", 0
                return pending[: index - len(stop)], stop
        self._state = state
        hold = automaton.depth[state]
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], None

    def flush(self) -> str:
        """The held-back text, once generation has ended without a match."""
        pending, self._pending, self._state = self._pending, "", 0
        return pending


def held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that begins one of `markers`.

    For the few markers of a tool-call or thinking format; stop sequences,
    which a request may send many of, go through `StopMatcher`.
    """
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


# A passage of 8 to 64 tokens written three times running is a loop: a small
# model that starts one ("I'm ready to assist.\n\n" again and again) goes on
# until its budget. Checked on free text only (never inside a call or a JSON
# reply, where rows may repeat), for models with `stop_loops`.
LOOP_SHORTEST, LOOP_LONGEST, LOOP_TIMES = 8, 64, 3
LOOP_WINDOW = LOOP_LONGEST * LOOP_TIMES


def looping(tokens: list[int]) -> bool:
    """Whether `tokens` end in one passage of LOOP_SHORTEST..LOOP_LONGEST tokens, three times."""
    end = len(tokens)
    for size in range(LOOP_SHORTEST, LOOP_LONGEST + 1):
        if size * LOOP_TIMES > end:
            return False
        last = tokens[end - size :]
        if all(tokens[end - size * (k + 1) : end - size * k] == last for k in range(1, LOOP_TIMES)):
            return True
    return False
