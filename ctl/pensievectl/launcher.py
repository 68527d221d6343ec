"""`claude-local`: Claude Code on Pensieve, in this one process only.

Runs `claude` with what `pensievectl env` prints (the running daemon's address
and token, the model tiers, and minimal mode for a model too small for Claude
Code's full prompt), leaving every other terminal on the cloud API. Arguments
pass through: `claude-local --print "Hello"`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pensievectl.claude_env import claude_setup
from pensieved.config import ConfigError, load_config

# Where Claude Code's installers put `claude` when it is not on PATH: the
# native installer's ~/.local/bin (often not exported), `claude
# migrate-installer`'s ~/.claude/local (reached through a shell alias, which a
# program cannot see), Homebrew on Apple silicon and on Intel.
CLAUDE_PLACES = (
    "~/.local/bin/claude",
    "~/.claude/local/claude",
    "/opt/homebrew/bin/claude",
    "/usr/local/bin/claude",
)


def find_claude(path: str | None = None, home: Path | None = None) -> str | None:
    """`claude` on PATH, else in the places its installers use; None if nowhere."""
    if found := shutil.which("claude", path=path):
        return found
    home = home or Path.home()
    for place in CLAUDE_PLACES:
        candidate = home / place[2:] if place.startswith("~/") else Path(place)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def main() -> None:
    try:
        setup = claude_setup(load_config())
    except ConfigError as exc:
        sys.exit(f"claude-local: {exc}")
    claude = find_claude()
    if claude is None:
        sys.exit(
            "claude-local: Claude Code's `claude` is not on PATH nor in "
            + ", ".join(CLAUDE_PLACES)
            + " (install it: curl -fsSL https://claude.ai/install.sh | bash)"
        )
    env = dict(os.environ)
    env.pop("ANTHROPIC_API_KEY", None)  # it would win over the token
    # The daemon's address and token, pinned model names, the local model's
    # compaction window and, for a small model, minimal mode: as `pensievectl
    # env` prints them.
    env.update(setup.variables())
    if setup.minimal:
        print(f"claude-local: {setup.minimal_reason()}", file=sys.stderr)
    os.execve(claude, [claude, *sys.argv[1:]], env)


if __name__ == "__main__":  # pragma: no cover
    main()
