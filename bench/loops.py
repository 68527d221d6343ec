"""How often the embedded SmolLM2 loops on Claude Code's first turn, and what stops it.

Claude Code sends no sampling settings, so the model's defaults decide
whether a small model repeats one sentence until its budget. This sends
Claude Code's minimal-mode first turn (the captured request, pensieved/wire/)
with a dozen tasks, bare and with a git-status snapshot in the system text
(which Claude Code adds in a repository, and which made loops likelier), to
the embedded model under three settings in one daemon:

- `card`: the model card's temperature 0.2 and top_p 0.9 alone;
- `penalty`: plus Pensieve's repetition penalty of 1.1 (models/registry.py);
- `penalty-stop-loops`: plus `stop_loops`, the embedded model's default.

A reply that runs to `--max-tokens` is a loop (SmolLM2's answers to these
tasks are a few dozen tokens); one that `stop_loops` ended is counted apart.
Run: `.venv/bin/python bench/loops.py` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402
from tests.daemon import Daemon, daemon_running  # noqa: E402

from pensieved.models.gguf import import_gguf  # noqa: E402
from pensieved.models.registry import BUILTIN_SAMPLING, builtin_gguf_path  # noqa: E402
from pensieved.wire.claude_code import captured_request  # noqa: E402

TASKS = [
    "Say hello.",
    "What does this project do?",
    "List the files here.",
    "Fix the typo in README.md.",
    "Write a function that reverses a string.",
    "Run the tests.",
    "What is 2 + 2?",
    "Explain what a Makefile is.",
    "Add a comment to main.py.",
    "Which branch am I on?",
    "Summarise the last commit.",
    "Create a file hello.txt that says hi.",
]
GIT_STATUS = (
    "gitStatus: This is the git status at the start of the conversation. Note that this "
    "status is a snapshot in time, and will not update during the conversation.\n"
    "Current branch: main\n\nMain branch (you will usually use this for PRs): main\n\n"
    "Status:\n M Makefile\n M README.md\n?? notes.txt\n\nRecent commits:\n"
    "afdaa79 From make run to a working Claude Code in one line\n"
    "aa20ec9 A fast CPU path from make setup alone\n"
    "671e55e Enforce what the SDKs move into descriptions"
)
SETTINGS: dict[str, dict[str, Any]] = {
    "card": {"repetition_penalty": 1.0, "stop_loops": False},
    "penalty": {"stop_loops": False},
    "penalty-stop-loops": {"stop_loops": True},
}


def request(task: str, git: bool, max_tokens: int) -> dict[str, Any]:
    body = captured_request(minimal=True)
    body["messages"][0]["content"][-1]["text"] = task
    if git:
        body["system"].append({"type": "text", "text": GIT_STATUS})
    body["max_tokens"] = max_tokens
    return body


def run(
    daemon: Daemon, model: str, git: bool, tries: int, max_tokens: int, examples: list[str]
) -> tuple[int, int]:
    """(replies that ran to the budget, replies stop_loops ended) of `tries`.

    The end of one reply that ran to the budget goes to `examples`.
    """
    bodies = [request(TASKS[i % len(TASKS)], git, max_tokens) for i in range(tries)]
    for body in bodies:
        body["model"] = model
    before = daemon.log().count("stopped a reply looping")
    with daemon.http() as http:
        http.timeout = httpx.Timeout(1800)
        http.post("/v1/messages", json=bodies[0])  # the prefix, prefilled once

        def ask(body: dict[str, Any]) -> str:
            response = http.post("/v1/messages", json=body)
            response.raise_for_status()
            reply = response.json()
            if reply["stop_reason"] == "max_tokens" and len(examples) < 6:
                text = "".join(block.get("text", "") for block in reply["content"])
                examples.append(f"{model}: ...{text[-300:]!r}")
            return str(reply["stop_reason"])

        with ThreadPoolExecutor(8) as pool:
            reasons = list(pool.map(ask, bodies))
    stopped = daemon.log().count("stopped a reply looping") - before
    return reasons.count("max_tokens"), stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tries", type=int, default=48, help="first turns per row")
    parser.add_argument("--max-tokens", type=int, default=1024)
    args = parse(parser)
    root = Path(tempfile.mkdtemp(prefix="pensieve-loops-"))
    folder = import_gguf(builtin_gguf_path(), root / "smollm2", BUILTIN_SAMPLING)
    config = {
        "models": {
            name: {"source": str(folder), "default": name == "card", **settings}
            for name, settings in SETTINGS.items()
        }
    }
    print(f"SmolLM2 135M, Claude Code --bare first turn, {args.tries} tries a row")
    print(f"{'settings':<20} {'prompt':<6} {'to budget':>10} {'loop stopped':>13}")
    examples: list[str] = []
    with daemon_running(root / "home", config) as daemon:
        for name in SETTINGS:
            for git in (False, True):
                budget, stopped = run(daemon, name, git, args.tries, args.max_tokens, examples)
                prompt, tries = "git" if git else "bare", args.tries
                print(f"{name:<20} {prompt:<6} {budget:>6}/{tries:<3} {stopped:>9}/{tries}")
    print("\nthe ends of replies that ran to the budget:")
    print("\n".join(examples) or "none")


if __name__ == "__main__":
    main()
