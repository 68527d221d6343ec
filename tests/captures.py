"""Captured Claude Code 2.1.197 traffic, as the tests and `make bench-claude` use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The `--print` run's last main turn and the `--continue` run's first, taken
# from ../shared/claude-code (capture-print.jsonl, capture-continue.jsonl).
TWO_PROCESSES = Path(__file__).parent / "data" / "claude-code-two-processes.json"

# The first run used the [1m] model and said so in system[2] and the Bash
# tool's description; the continue run names the plain one. A pinned model
# name (`pensievectl env --model-tiers`) sends one line in both processes.
PINNED_MODEL_LINE = (
    ("Opus 4.8 (1M context)", "Opus 4.8"),
    ("claude-opus-4-8[1m]", "claude-opus-4-8"),
)


def pinned(body: dict[str, Any]) -> dict[str, Any]:
    """`body` as Claude Code sends it with the model name pinned: the plain model line."""
    text = json.dumps(body)
    for captured, pin in PINNED_MODEL_LINE:
        text = text.replace(captured, pin)
    return dict(json.loads(text))
