"""Claude Code's first main request, as captured: the yardstick for "does Claude Code fit".

`claude_code_request.json` is Claude Code 2.1's first main turn (its system
text, 24 tools and a short task); `claude_code_bare_request.json` is the same
turn in its minimal mode (`claude --bare`, `CLAUDE_CODE_SIMPLE=1`: a short
system text and the Bash, Read and Edit tools). Metadata is stripped from
both. Rendered through a model's chat template, each is the prompt every
session of that mode starts with: `pensievectl doctor` sends them to
count_tokens, and the daemon renders them for `pensievectl env`, which runs
Claude Code in its minimal mode when the full prompt does not fit.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

# What a turn needs beyond the prompt: Claude Code's reply and a few tool results.
REPLY_ROOM = 8_192
# The same in minimal mode, whose sessions are short by design.
MINIMAL_REPLY_ROOM = 2_048
# The full prompt through a small model's template, when nothing can measure it.
ESTIMATED_PROMPT_TOKENS = 24_000


def captured_request(minimal: bool = False) -> dict[str, Any]:
    """The captured request as JSON (a new copy each call); `minimal`: the --bare one."""
    name = "claude_code_bare_request.json" if minimal else "claude_code_request.json"
    text = resources.files("pensieved.wire").joinpath(name).read_text()
    request: dict[str, Any] = json.loads(text)
    return request


def fits(context: int, prompt_tokens: int, minimal: bool = False) -> bool:
    """Whether a model of `context` tokens holds the prompt and room for a reply."""
    return context >= prompt_tokens + (MINIMAL_REPLY_ROOM if minimal else REPLY_ROOM)
