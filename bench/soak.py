"""Long-day behaviour: thousands of mixed requests to a tiny model, memory sampled.

Bounded in count and time, loopback only. Prints the request mix, the
unexpected responses (should be 0), the daemon's RSS, MLX memory and the
prompt cache's bytes and entries at start, once the cache is full and at the
end, and the slope of memory beyond the cache from then on: the cache may
grow to its budget, nothing else may. A slope within a few MB per 1000
requests is flat. Prompts vary (a number in each), so the cache fills.
Run: `make soak` (or `.venv/bin/python bench/soak.py --help`).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon import Daemon, start_daemon  # noqa: E402
from tests.models import build_tiny_model  # noqa: E402

from pensieved.models.gguf import import_gguf  # noqa: E402
from pensieved.models.registry import builtin_gguf_path  # noqa: E402

MB = 1024 * 1024
USER = [{"role": "user", "content": "Tell me about the sea."}]
TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]
TOOL_HISTORY = [
    *USER,
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a"}},
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sea water"}],
    },
]


def one_request(http: httpx.Client, kind: str, n: int = 0) -> tuple[str, bool]:
    """Send one request of `kind`; return (kind, whether the outcome was the expected one)."""
    user = [{"role": "user", "content": f"Tell me about the sea, story {n}."}]
    base = {"model": "claude-opus-4-8", "max_tokens": 8, "messages": user}
    if kind == "create":
        return kind, http.post("/v1/messages", json=base).status_code == 200
    if kind == "stream":
        with http.stream("POST", "/v1/messages", json={**base, "stream": True}) as response:
            body = response.read()
        return kind, response.status_code == 200 and b"message_stop" in body
    if kind == "cancelled_stream":
        body_ = {**base, "max_tokens": 200, "stream": True}
        with http.stream("POST", "/v1/messages", json=body_) as response:
            for line in response.iter_lines():
                if "content_block_delta" in line:
                    break
        return kind, response.status_code == 200
    if kind == "tools":
        # A long history of its own (past the prefix cache's 512-token sibling
        # rule), so that these fill the cache while the short ones come and go.
        notes = " ".join(WORDS[(n * 7 + i) % len(WORDS)] for i in range(600))
        history = [{"role": "user", "content": f"Notes {n}: {notes}"}, *TOOL_HISTORY[1:]]
        body_ = {**base, "messages": history, "tools": TOOLS}
        return kind, http.post("/v1/messages", json=body_).status_code == 200
    if kind == "count_tokens":
        body_ = {"model": "x", "messages": USER}
        return kind, http.post("/v1/messages/count_tokens", json=body_).status_code == 200
    if kind == "bad_request":
        return kind, http.post("/v1/messages", json={"model": "x"}).status_code == 400
    if kind == "models":
        return kind, http.get("/v1/models").status_code == 200
    raise ValueError(kind)


WORDS = [
    "tide",
    "harbour",
    "gull",
    "keel",
    "mast",
    "rope",
    "anchor",
    "brine",
    "current",
    "reef",
    "shoal",
    "swell",
    "wake",
    "drift",
    "lantern",
    "compass",
    "chart",
    "hull",
    "sail",
    "deck",
    "storm",
    "calm",
    "dawn",
    "dusk",
    "island",
    "coral",
    "kelp",
    "pearl",
]
KINDS = ["create", "stream", "cancelled_stream", "tools", "count_tokens", "bad_request", "models"]
WEIGHTS = [3, 3, 2, 2, 2, 1, 1]


def sample(daemon: Daemon, process: psutil.Process, done: int) -> dict[str, float]:
    health = httpx.get(f"{daemon.base_url}/health").json()
    memory, cache = health["memory"], health["prompt_cache"]
    rss = process.memory_info().rss / MB
    active = memory["mlx_active_gb"] * 1024
    cached = cache["bytes"] / MB
    return {
        "requests": done,
        "rss_mb": rss,
        "mlx_active_mb": active,
        "mlx_cache_mb": memory["mlx_cache_gb"] * 1024,
        "prompt_cache_mb": cached,
        "prompt_cache_entries": cache["entries"],
        "rss_beyond_cache_mb": rss - cached,
        "active_beyond_cache_mb": active - cached,
    }


def slope_per_1000(points: list[dict[str, float]], key: str = "rss_mb") -> float:
    xs = [p["requests"] for p in points]
    ys = [p[key] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=900)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--prompt-cache-mb", type=float, default=32, help="the prompt cache's budget"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pensieve-soak-"))
    smollm = import_gguf(builtin_gguf_path(), work / "smollm2")
    tiny = build_tiny_model(work / "tiny", smollm)
    daemon = start_daemon(
        work / "home",
        {
            "models": {"tiny": {"source": str(tiny), "context_length": 2048}},
            "engine": {"prompt_cache_gb": args.prompt_cache_mb / 1024},
        },
    )
    process = psutil.Process(daemon.process.pid)
    rng = random.Random(0)
    counts: collections.Counter[str] = collections.Counter()
    unexpected: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    samples = [sample(daemon, process, 0)]
    deadline = time.monotonic() + args.seconds

    def worker(seed: int) -> None:
        local = random.Random(seed)
        with daemon.http() as http:
            while time.monotonic() < deadline:
                with lock:
                    if sum(counts.values()) >= args.requests:
                        return
                    kind = local.choices(KINDS, WEIGHTS)[0]
                    counts[kind] += 1
                    n = sum(counts.values())
                try:
                    _, ok = one_request(http, kind, n)
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    with lock:
                        unexpected[kind] += 1

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(worker, rng.randrange(1 << 30)) for _ in range(args.concurrency)]
            while not all(f.done() for f in futures):
                time.sleep(2.0)
                samples.append(sample(daemon, process, sum(counts.values())))
            for future in futures:
                future.result()
        samples.append(sample(daemon, process, sum(counts.values())))
    finally:
        code = daemon.stop()
    elapsed = time.monotonic() - started

    total = sum(counts.values())
    # From the first sample with the cache at 90% of its budget (or 20% of the run).
    full = [s for s in samples if s["prompt_cache_mb"] >= 0.9 * args.prompt_cache_mb]
    warm = full or [s for s in samples if s["requests"] >= total * 0.2] or samples
    print(
        f"{total} requests in {elapsed:.0f} s, concurrency {args.concurrency}, daemon exit {code}"
    )
    print("mix: " + ", ".join(f"{k} {counts[k]}" for k in KINDS))
    print(f"unexpected responses: {sum(unexpected.values())} {dict(unexpected) or ''}")
    when = f"cache full at {warm[0]['requests']:.0f}" if full else "warm (20%)"
    print(f"prompt cache budget {args.prompt_cache_mb:g} MB")
    print(f"{'':24}{'start':>10}{when:>22}{'end':>10}")
    for key in (
        "rss_mb",
        "mlx_active_mb",
        "mlx_cache_mb",
        "prompt_cache_mb",
        "prompt_cache_entries",
        "rss_beyond_cache_mb",
        "active_beyond_cache_mb",
    ):
        print(f"{key:24}{samples[0][key]:10.1f}{warm[0][key]:22.1f}{samples[-1][key]:10.1f}")
    rss_slope = slope_per_1000(warm, "rss_beyond_cache_mb")
    active_slope = slope_per_1000(warm, "active_beyond_cache_mb")
    print(
        f"slope beyond the cache since {when}: RSS {rss_slope:+.2f}, "
        f"MLX active {active_slope:+.2f} MB per 1000 requests"
    )
    flat = abs(rss_slope) <= 5 and abs(active_slope) <= 5
    print(f"verdict: {'flat' if flat and full else 'NOT flat' if full else 'cache never filled'}")


if __name__ == "__main__":
    main()
