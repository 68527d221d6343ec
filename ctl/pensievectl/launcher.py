"""`claude-local`: Claude Code on Pensieve, in this one process only.

Runs `claude` with ANTHROPIC_BASE_URL / ANTHROPIC_AUTH_TOKEN pointing at the
daemon, leaving every other terminal on the cloud API. Arguments pass through:
`claude-local --print "Hello"`.
"""

from __future__ import annotations

import os
import shutil
import sys

from pensieved.config import ConfigError, ensure_token, load_config


def main() -> None:
    try:
        config = load_config()
        token = ensure_token(config)
    except ConfigError as exc:
        sys.exit(f"claude-local: {exc}")
    claude = shutil.which("claude")
    if claude is None:
        sys.exit("claude-local: `claude` is not on PATH (npm install -g @anthropic-ai/claude-code)")
    env = dict(os.environ)
    env.pop("ANTHROPIC_API_KEY", None)  # it would win over the token
    env["ANTHROPIC_BASE_URL"] = config.base_url
    env["ANTHROPIC_AUTH_TOKEN"] = token
    os.execve(claude, [claude, *sys.argv[1:]], env)


if __name__ == "__main__":  # pragma: no cover
    main()
