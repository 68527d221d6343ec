"""Replay the captured Claude Code traffic against a daemon and print what the prefix cache served.

Reads `../shared/claude-code/*.jsonl` as captured (one request a line: `kind`,
`path`, `body`), in the order print → continue → interactive, and sends each
`POST /v1/messages` to one daemon serving a tiny random model with a 65k
window, replies capped at `--max-tokens`. Per request: capture, kind, status,
prompt tokens, tokens read from the prefix cache, seconds. Then the hit rate:
all requests, and the main turns after each process's first.
Run: `.venv/bin/python bench/claude_replay.py` (`--help` for options).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon import start_daemon  # noqa: E402
from tests.models import build_tiny_model  # noqa: E402

from pensieved.models.gguf import import_gguf  # noqa: E402
from pensieved.models.registry import builtin_gguf_path  # noqa: E402

CAPTURES = ("capture-print.jsonl", "capture-continue.jsonl", "capture-interactive.jsonl")


def requests(folder: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(capture, kind, path, body) of every POST, in the order Claude Code sent them."""
    found = []
    for name in CAPTURES:
        for line in (folder / name).read_text().splitlines():
            record = json.loads(line)
            if record["method"] == "POST" and record["body"] is not None:
                found.append((name, record["kind"], record["path"], record["body"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", type=Path, default=REPO.parent / "shared" / "claude-code")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prompt-cache-gb", type=float, default=2.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pensieve-replay-"))
    smollm = import_gguf(builtin_gguf_path(), work / "smollm2")
    tiny = build_tiny_model(work / "tiny", smollm)
    models = {"tiny": {"source": str(tiny), "context_length": 65536, "aliases": ["claude-*"]}}
    engine = {"prompt_cache_gb": args.prompt_cache_gb}
    daemon = start_daemon(work / "home", {"models": models, "engine": engine})
    rows = []
    try:
        with daemon.http() as http:
            for capture, kind, path, body in requests(args.captures):
                body = {**body, "stream": False, "max_tokens": args.max_tokens}
                body.pop("metadata", None)
                started = time.perf_counter()
                response = http.post(path, json=body, timeout=600)
                seconds = time.perf_counter() - started
                usage = response.json().get("usage", {}) if response.status_code == 200 else {}
                cached = usage.get("cache_read_input_tokens") or 0
                prompt = (usage.get("input_tokens") or 0) + cached
                rows.append((capture, kind, response.status_code, prompt, cached, seconds))
                print(
                    f"{capture:26}{kind:18}{response.status_code:5}{prompt:8}{cached:8}"
                    f"{seconds:8.1f}s",
                    flush=True,
                )
    finally:
        daemon.stop()
    total = sum(r[3] for r in rows)
    hit = sum(r[4] for r in rows)
    print(f"all requests: {hit} of {total} prompt tokens from the cache ({hit / total:.1%})")
    later = [r for i, r in enumerate(rows) if i and r[0] == rows[i - 1][0] and "main" in r[1]]
    if later:
        rate = sum(r[4] for r in later) / sum(r[3] for r in later)
        print(f"later main turns of a process: {rate:.1%} from the cache")
    print(f"unexpected statuses: {sum(r[2] != 200 for r in rows)}")


if __name__ == "__main__":
    main()
