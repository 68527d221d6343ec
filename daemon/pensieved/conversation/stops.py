"""Stop sequences matched on generated text, not tokens.

A stop string can be tokenized differently inside generated text than on its
own, so matching token ids (as mlx-lm's `StopSequences` does) misses some.
Text that could still be the start of a stop sequence is held back until it
either completes one or cannot anymore, so a stop sequence never leaks out.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stop_sequences: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add generated text; return (text safe to emit, matched stop sequence or None).

        After a match, the returned text is everything before the stop sequence.
        """
        if not self._stops:
            return text, None
        pending = self._pending + text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            index = pending.find(stop)
            if index >= 0 and (first is None or index < first[0]):
                first = (index, stop)
        if first is not None:
            self._pending = ""
            return pending[: first[0]], first[1]
        hold = held_suffix(pending, self._stops)
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold], None

    def flush(self) -> str:
        """The held-back text, once generation has ended without a match."""
        pending, self._pending = self._pending, ""
        return pending


def held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that begins one of `markers`."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest
