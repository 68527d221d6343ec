"""A Claude Code turn rendered to tokens: tokenized whole vs by pieces (pieces.py).

The captured `--print` run's last main turn (tests/data, Claude Code 2.1.197)
is rendered with the embedded SmolLM2's tokenizer by Pensieve's own
`PromptBuilder`, after the turn before it (the same conversation less its last
exchange), as the daemon renders a conversation turn after turn. Each run
adds a word to the last user message, so that its piece is new, as a new
turn's is. Timed: the whole render (template and tokens) with pieces, and
with pieces off (tokenized whole); medians.
Run: `.venv/bin/python bench/pieces.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
from bench.args import parse  # noqa: E402
from tests.captures import TWO_PROCESSES  # noqa: E402

from pensieved.conversation.pieces import CHECKED_RENDERS  # noqa: E402
from pensieved.conversation.prompt import PromptBuilder  # noqa: E402
from pensieved.wire.protocol import MessagesRequest  # noqa: E402


def variant(body: dict[str, Any], run: int) -> MessagesRequest:
    """`body` with a word of its own at the end of its last message."""
    body = copy.deepcopy(body)
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        body["messages"][-1]["content"] = f"{content} ({run})"
    else:
        content.append({"type": "text", "text": f"({run})"})
    return msgspec.convert(body, MessagesRequest)


def render_ms(builder: PromptBuilder, body: dict[str, Any], runs: int) -> tuple[float, int]:
    """Median ms of a render of `body` (a new last message each run), and its tokens."""
    times, tokens = [], 0
    for run in range(runs):
        request = variant(body, run)
        started = time.perf_counter()
        tokens = len(builder.build(request).tokens)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parse(parser)
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from pensieved.models.gguf import import_gguf
    from pensieved.models.registry import builtin_gguf_path

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = load_tokenizer(import_gguf(builtin_gguf_path(), Path(workdir) / "smollm2"))
    turn = json.loads(TWO_PROCESSES.read_text())["print_last"]
    earlier = {**turn, "messages": turn["messages"][:-2]}
    pieces = PromptBuilder(tokenizer, "smollm")
    whole = PromptBuilder(tokenizer, "smollm")
    whole._pieces._pattern = None  # pieces off: every render tokenized whole
    for builder in (pieces, whole):
        for run in range(CHECKED_RENDERS + 1):  # past the checks: pieces trusted, and cached
            builder.build(variant(earlier, -run - 1))
    whole_ms, tokens = render_ms(whole, turn, args.runs)
    pieces_ms, same = render_ms(pieces, turn, args.runs)
    assert same == tokens, (same, tokens)
    print(f"SmolLM2 tokenizer, Claude Code's turn of {tokens} tokens, median of {args.runs}")
    print(f"{'render':<34}{'ms':>8}")
    print(f"{'tokenized whole':<34}{whole_ms:>8.1f}")
    print(f"{'by pieces (the turn before seen)':<34}{pieces_ms:>8.1f}")
    print(f"{'ratio':<34}{pieces_ms / whole_ms:>7.3f}x")


if __name__ == "__main__":
    main()
