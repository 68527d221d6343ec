"""Prompt-cache persistence: daemon start time and first-turn TTFT, with and without it.

One long Claude-Code-shaped prefix (system prompt + question) is sent once,
the daemon is stopped and started again, and the same request is timed as
the first turn after the restart: cold without persistence, warm with it.
Run: `.venv/bin/python bench/persist.py [--model builtin:smollm2-135m-instruct] [--words 700]`.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402


def first_token_seconds(daemon: Daemon, system: str) -> tuple[float, int, int]:
    """(seconds to the first text, prompt tokens, of them read from the prompt cache)."""
    started = time.perf_counter()
    with daemon.client().messages.stream(
        model="m",
        max_tokens=4,
        system=system,
        messages=[{"role": "user", "content": "Start."}],
        extra_body={"temperature": 0},
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break
        elapsed = time.perf_counter() - started
    usage = stream.current_message_snapshot.usage
    cached = usage.cache_read_input_tokens or 0
    return elapsed, usage.input_tokens + cached, cached


def run(source: str, words: int, persist: bool) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp())
    config = {
        "engine": {"persist_prompt_cache": persist},
        "models": {"m": {"source": source}},
    }
    system = "You are a coding agent. " + " ".join(secrets.token_hex(3) for _ in range(words))
    daemon = start_daemon(home, config)
    try:
        first_token_seconds(daemon, system)
    finally:
        daemon.stop()
    started = time.perf_counter()
    daemon = start_daemon(home, config)  # returns once /health answers
    start_s = time.perf_counter() - started
    try:
        ttft, prompt, cached = first_token_seconds(daemon, system)
    finally:
        daemon.stop()
    return {"start_s": start_s, "ttft_s": ttft, "prompt": prompt, "cached": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--words", type=int, default=700, help="prefix size (~6 tokens each)")
    args = parse(parser)
    off = run(args.model, args.words, persist=False)
    on = run(args.model, args.words, persist=True)
    print(
        f"{'after a restart':<22} {'start s':>8} {'turn-1 TTFT s':>14} {'prompt tokens':>14}"
        f" {'cached tokens':>14}"
    )
    for name, row in (("persistence off", off), ("persistence on", on)):
        print(
            f"{name:<22} {row['start_s']:>8.2f} {row['ttft_s']:>14.2f} {row['prompt']:>14}"
            f" {row['cached']:>14}"
        )


if __name__ == "__main__":
    main()
