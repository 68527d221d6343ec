"""A turn with a screenshot against the same turn as text, and the turn after it, on a tiny VLM.

A random Qwen2-VL (tests/vision_models.py: SmolLM2's tokenizer, 2 text
layers, 2 vision blocks) on a real daemon. Each row is the time to the first
token of a streamed request, the median of `--runs`:

- text: a question and a ~1.3k-token stand-in for the screenshot as words;
- image: the question and a 1024x768 PNG (through the vision tower);
- image, next turn: the same conversation one turn on, the screenshot read
  from the prompt cache through its image tokens.

The baseline is the text turn of the same run; the ratios are what to read.
Run: `.venv/bin/python bench/vision.py [--runs 3]`.
"""

from __future__ import annotations

import argparse
import base64
import io
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402


def screenshot() -> dict[str, Any]:
    """A 1024x768 PNG shaped like a screenshot: a window, panes, and lines of "text"."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1024, 768), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 1024, 28), fill=(60, 60, 70))
    draw.rectangle((0, 28, 220, 768), fill=(235, 236, 240))
    for row in range(40, 760, 18):
        width = 180 + (row * 37) % 560
        draw.rectangle((240, row, 240 + width, row + 9), fill=(40, 40, 40))
        draw.rectangle((12, row, 12 + (row * 13) % 180, row + 8), fill=(120, 120, 130))
    out = io.BytesIO()
    image.save(out, format="PNG")
    data = base64.b64encode(out.getvalue()).decode()
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}


def first_token(daemon: Daemon, messages: list[dict[str, Any]]) -> tuple[float, int, int]:
    """(seconds to the first token, prompt tokens, of them read from the cache)."""
    started = time.perf_counter()
    with daemon.client().messages.stream(
        model="vlm", max_tokens=4, messages=messages, extra_body={"temperature": 0}
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break
        elapsed = time.perf_counter() - started
        stream.until_done()
        usage = stream.current_message_snapshot.usage
    cached = usage.cache_read_input_tokens or 0
    return elapsed, usage.input_tokens + cached, cached


def same_size_text(daemon: Daemon, question: dict[str, Any], tokens: int) -> list[dict[str, Any]]:
    """The question and words in place of the image, as many prompt tokens as the image turn."""
    words: list[str] = []
    while True:
        text = {"type": "text", "text": " ".join(words) or "."}
        messages = [{"role": "user", "content": [question, text]}]
        counted = daemon.client().messages.count_tokens(model="vlm", messages=messages)
        if counted.input_tokens >= tokens:
            return messages
        words += [secrets.token_hex(2) for _ in range(max(1, (tokens - counted.input_tokens) // 4))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parse(parser)
    from tests.vision_models import build_tiny_vlm

    from pensieved.models.gguf import import_gguf
    from pensieved.models.registry import builtin_gguf_path

    root = Path(tempfile.mkdtemp())
    smollm = import_gguf(builtin_gguf_path(), root / "smollm2")
    model = build_tiny_vlm(root / "tiny-vlm", smollm)
    daemon = start_daemon(root / "home", {"models": {"vlm": {"source": str(model)}}})
    image = screenshot()
    rows: dict[str, list[tuple[float, int, int]]] = {}
    try:
        for _ in range(args.runs):
            question = {"type": "text", "text": f"What is on this screen? {secrets.token_hex(4)}"}
            counted = daemon.client().messages.count_tokens(
                model="vlm", messages=[{"role": "user", "content": [question, image]}]
            )
            as_text = same_size_text(daemon, question, counted.input_tokens)
            rows.setdefault("text", []).append(first_token(daemon, as_text))
            turn = [{"role": "user", "content": [question, image]}]
            rows.setdefault("image", []).append(first_token(daemon, turn))
            turn += [
                {"role": "assistant", "content": "A screen."},
                {"role": "user", "content": "What else?"},
            ]
            rows.setdefault("image, next turn", []).append(first_token(daemon, turn))
    finally:
        daemon.stop()
    baseline = statistics.median(r[0] for r in rows["text"])
    print(f"tiny Qwen2-VL, 1024x768 PNG, median of {args.runs}")
    print(f"{'turn':<18} {'prompt':>7} {'cached':>7} {'TTFT ms':>8} {'vs text':>8}")
    for name, runs in rows.items():
        ttft = statistics.median(r[0] for r in runs)
        print(
            f"{name:<18} {runs[-1][1]:>7} {runs[-1][2]:>7} {ttft * 1000:>8.1f} "
            f"{ttft / baseline:>7.2f}x"
        )


if __name__ == "__main__":
    main()
