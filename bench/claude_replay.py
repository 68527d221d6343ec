"""`make bench-claude`: real Claude Code traffic replayed, and what the prompt cache served.

Reads the captures in `--captures` (default `../shared/claude-code/`, beside
the repository: they are not part of it; Claude Code 2.1.197: a
`--print` run, its `--continue` in a new process, an interactive session
with `/compact`; one request a line) and sends them, streamed, replies
capped at `--max-tokens`, to daemons serving a tiny random model with a 65k
window (or `--model NAME`, a model of your config). Four scenarios, each on
a fresh daemon:

- replay: print → continue → interactive, as captured;
- pinned: the same print run with its model line rewritten to the one the
  continue run sent, as a pinned model name (`pensievectl env`) would have
  kept it, then the continue run;
- restart: `persist_prompt_cache = true`; the pinned print run, the daemon
  stopped and started again, then continue;
- side requests: a prompt-cache budget that holds one main conversation and
  little more (from the KV bytes per token measured in the replay); a main
  turn, the session-title request, 14 `count_tokens` calls like `/context`'s,
  a short haiku-tier request, then the next main turn.

Per request: scenario, capture, kind, status, prompt tokens, tokens read
from the prompt cache, time to the first content event, total seconds.
Then the ratios against their targets (all of it recorded in
`bench/results/claude-replay-MODEL.txt` by bench/args.py), and a plot of
cached vs prompt tokens per request beside it.
Run: `make bench-claude` (`BENCH_ARGS="--model NAME" make bench-claude`), or
`.venv/bin/python bench/claude_replay.py --help`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse, shown  # noqa: E402
from tests.captures import pinned as pinned_body  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402

OUT = REPO / "bench" / "out"
GB = 1024**3  # as the engine counts `prompt_cache_gb`
PRINT, CONTINUE, INTERACTIVE = "print", "continue", "interactive"
CAPTURES = {
    PRINT: "capture-print.jsonl",
    CONTINUE: "capture-continue.jsonl",
    INTERACTIVE: "capture-interactive.jsonl",
}
COUNT_TOKENS = "/v1/messages/count_tokens?beta=true"
# What `/context` sends about the conversation: count_tokens takes no
# generation settings.
NOT_COUNTED = ("max_tokens", "stream", "metadata", "context_management")
CONTEXT_CALLS = 14
# The tight budget's room beyond the next main turn's entry, in tokens: the
# first main turn's entry and the title request's (~400 tokens) do not fit
# together, so keeping the title must evict something.
SIDE_HEADROOM_TOKENS = 64
HAIKU_BODY: dict[str, Any] = {
    "model": "claude-haiku-4-5",
    "system": [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}
    ],
    "messages": [
        {"role": "user", "content": "In five words or fewer, what does `cat notes.txt` do?"}
    ],
}


@dataclass(frozen=True)
class Request:
    capture: str
    kind: str  # the capture's label (main:T1, side:json-schema, compact), or count_tokens, haiku
    path: str
    body: dict[str, Any]

    @property
    def main(self) -> bool:
        return self.kind.startswith("main:")


@dataclass(frozen=True)
class Row:
    scenario: str
    request: Request
    status: str
    prompt: int
    cached: int
    ttft: float | None
    seconds: float

    @property
    def share(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0

    def line(self) -> str:
        ttft = f"{self.ttft:7.2f}s" if self.ttft is not None else "       -"
        share = f"{self.share:7.1%}" if self.request.path != COUNT_TOKENS else "       -"
        return (
            f"{self.scenario:9}{self.request.capture:12}{self.request.kind:18}{self.status:>7}"
            f"{self.prompt:8}{self.cached:8}{share}{ttft}{self.seconds:8.2f}s"
        )


HEADER = (
    f"{'scenario':9}{'capture':12}{'kind':18}{'status':>7}{'prompt':>8}{'cached':>8}"
    f"{'share':>7}{'ttft':>8}{'total':>9}"
)


def load(folder: Path, capture: str) -> list[Request]:
    """Every POST of one capture, in the order Claude Code sent them."""
    found = []
    for line in (folder / CAPTURES[capture]).read_text().splitlines():
        record = json.loads(line)
        if record["method"] == "POST" and record["body"] is not None:
            found.append(Request(capture, record["kind"], record["path"], record["body"]))
    return found


def pinned(requests: Iterable[Request]) -> list[Request]:
    """`requests` with the print run's model line as the continue run sent it."""
    return [Request(r.capture, r.kind, r.path, pinned_body(r.body)) for r in requests]


def side_requests(main: Request, title: Request) -> list[Request]:
    """What Claude Code sends between two main turns: a title, `/context`'s counts, a haiku call."""
    counted = {k: v for k, v in main.body.items() if k not in NOT_COUNTED}
    counts = [Request(main.capture, "count_tokens", COUNT_TOKENS, counted)] * CONTEXT_CALLS
    haiku = Request(main.capture, "haiku", main.path, HAIKU_BODY)
    return [title, *counts, haiku]


def send(
    http: httpx.Client, request: Request, max_tokens: int
) -> tuple[str, int, int, float | None]:
    """(status, prompt tokens, cached tokens, seconds to the first content event)."""
    started = time.perf_counter()
    if request.path == COUNT_TOKENS:
        response = http.post(request.path, json=request.body, timeout=600)
        tokens = response.json().get("input_tokens", 0) if response.is_success else 0
        return str(response.status_code), tokens, 0, None
    body = {**request.body, "stream": True, "max_tokens": max_tokens}
    ttft = None
    usage: dict[str, Any] = {}
    with http.stream("POST", request.path, json=body, timeout=600) as response:
        status = str(response.status_code)
        if not response.is_success:
            response.read()
            return status, 0, 0, None
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif not line.startswith("data:"):
                continue
            elif event == "content_block_delta" and ttft is None:
                ttft = time.perf_counter() - started
            elif event == "message_delta":
                usage = json.loads(line.split(":", 1)[1])["usage"]
            elif event == "error":
                status += " error"
    cached = usage.get("cache_read_input_tokens") or 0
    return status, (usage.get("input_tokens") or 0) + cached, cached, ttft


class Bench:
    """Fresh daemons for the scenarios, one model, and every request's row."""

    def __init__(
        self, work: Path, model: dict[str, Any], engine: dict[str, Any], max_tokens: int
    ) -> None:
        self.work = work
        self.model = model
        self.engine = engine
        self.max_tokens = max_tokens
        self.rows: list[Row] = []
        (work / "models").mkdir(parents=True, exist_ok=True)

    def start(self, scenario: str, **engine: Any) -> Daemon:
        home = self.work / scenario
        if not home.exists():
            # One models folder for all: a GGUF is imported once.
            home.mkdir(parents=True)
            (home / "models").symlink_to(self.work / "models")
        config = {"models": {"bench": self.model}, "engine": {**self.engine, **engine}}
        return start_daemon(home, config)

    def replay(
        self,
        scenario: str,
        daemon: Daemon,
        requests: Iterable[Request],
        after: Callable[[Row, Daemon], None] | None = None,
    ) -> None:
        with daemon.http() as http:
            for request in requests:
                started = time.perf_counter()
                status, prompt, cached, ttft = send(http, request, self.max_tokens)
                row = Row(
                    scenario, request, status, prompt, cached, ttft, time.perf_counter() - started
                )
                self.rows.append(row)
                print(row.line(), flush=True)
                if after is not None:
                    after(row, daemon)

    def find(self, scenario: str, capture: str, kind: str) -> Row | None:
        return next(
            (
                r
                for r in self.rows
                if (r.scenario, r.request.capture, r.request.kind) == (scenario, capture, kind)
            ),
            None,
        )


def kv_bytes_per_token(daemon: Daemon, row: Row) -> float:
    """The prompt cache's bytes per token, from its one entry after `row` (prompt and reply)."""
    for _ in range(50):  # the entry is stored as the stream ends
        cache = daemon.health()["prompt_cache"]
        if cache["entries"]:
            return float(cache["bytes"]) / (row.prompt + 1)
        time.sleep(0.1)
    raise RuntimeError("the first main turn left nothing in the prompt cache")


def run(bench: Bench, captures: Path) -> dict[str, Any]:
    """Every scenario; returns what the summary needs beyond the rows."""
    prints, continues = load(captures, PRINT), load(captures, CONTINUE)
    interactive = load(captures, INTERACTIVE)
    facts: dict[str, Any] = {}

    def measure(row: Row, daemon: Daemon) -> None:
        if "bytes_per_token" not in facts and row.request.main:
            facts["bytes_per_token"] = kv_bytes_per_token(daemon, row)

    print(HEADER, flush=True)
    daemon = bench.start("replay")
    try:
        bench.replay("replay", daemon, [*prints, *continues, *interactive], measure)
    finally:
        daemon.stop()

    daemon = bench.start("pinned")
    try:
        bench.replay("pinned", daemon, [*pinned(prints), *continues])
    finally:
        daemon.stop()

    daemon = bench.start("restart", persist_prompt_cache=True)
    try:
        bench.replay("restart", daemon, pinned(prints))
    finally:
        daemon.stop()
    daemon = bench.start("restart", persist_prompt_cache=True)
    try:
        bench.replay("restart", daemon, continues)
    finally:
        daemon.stop()

    # A budget for the next main turn's entry and SIDE_HEADROOM_TOKENS more.
    first, title = next(r for r in interactive if r.main), interactive[0]
    second = next(r for r in interactive if r.main and r is not first)
    next_turn = bench.find("replay", INTERACTIVE, second.kind)
    assert next_turn is not None and title.kind == "side:json-schema"
    tokens = next_turn.prompt + bench.max_tokens + SIDE_HEADROOM_TOKENS
    budget_gb = tokens * facts["bytes_per_token"] / GB
    facts["side_budget"] = (budget_gb, tokens)
    print(f"side requests: prompt cache budget {budget_gb * GB / 2**20:.1f} MB ({tokens} tokens)")
    daemon = bench.start("side", prompt_cache_gb=budget_gb)
    try:
        bench.replay("side", daemon, [first, *side_requests(first, title)])
        cache = daemon.health()["prompt_cache"]
        facts["side_cache"] = (cache["entries"], cache["bytes"] / facts["bytes_per_token"])
        bench.replay("side", daemon, [second])
    finally:
        daemon.stop()
    return facts


def share(rows: Iterable[Row]) -> tuple[float, int, int]:
    rows = list(rows)
    cached, prompt = sum(r.cached for r in rows), sum(r.prompt for r in rows)
    return (cached / prompt if prompt else 0.0), cached, prompt


def summary(bench: Bench) -> list[tuple[str, tuple[float, int, int] | None, float | None]]:
    """(measure, (share, cached, prompt), target) for the table."""
    rows = bench.rows
    replay = [r for r in rows if r.scenario == "replay"]

    def one(scenario: str, capture: str, kind: str) -> tuple[float, int, int] | None:
        row = bench.find(scenario, capture, kind)
        return share([row]) if row else None

    # Main turns after the first of their process, and not the one rebuilt by /compact.
    later = [
        r
        for i, r in enumerate(replay)
        if r.request.main
        and any(p.request.main for p in replay[:i] if p.request.capture == r.request.capture)
        and replay[i - 1].request.kind != "compact"
    ]
    after_compact = next(
        (r for i, r in enumerate(replay) if i and replay[i - 1].request.kind == "compact"), None
    )
    side = [r for r in rows if r.scenario == "side" and r.request.main]
    return [
        ("later main turns of a process (replay)", share(later), 0.95),
        ("2nd process, 1st turn, as captured", one("replay", CONTINUE, "main:F1"), 0.60),
        ("2nd process, 1st turn, pinned model line", one("pinned", CONTINUE, "main:F1"), 0.60),
        (
            "2nd process, 1st turn, pinned, after a restart",
            one("restart", CONTINUE, "main:F1"),
            0.60,
        ),
        ("main turn after side requests, tight budget", share(side[-1:]) if side else None, 0.95),
        ("/compact", one("replay", INTERACTIVE, "compact"), 0.80),
        ("main turn after /compact", share([after_compact]) if after_compact else None, None),
        ("all requests (replay)", share(r for r in replay if r.request.path != COUNT_TOKENS), None),
    ]


def table(bench: Bench, label: str, facts: dict[str, Any], seconds: float) -> str:
    budget_gb, tokens = facts["side_budget"]
    entries, held = facts["side_cache"]
    lines = [
        f"Claude Code replay: {label}, replies capped at {bench.max_tokens} tokens, "
        f"{seconds / 60:.1f} min; KV {facts['bytes_per_token']:.0f} bytes/token",
        f"side requests: budget {budget_gb * GB / 2**20:.1f} MB ({tokens} tokens); before the "
        f"next main turn the cache held {entries} entries, {held:.0f} tokens",
        f"{'cached share of prompt tokens':46}{'share':>8}{'cached / prompt':>20}{'target':>9}",
    ]
    for name, figures, target in summary(bench):
        if figures is None:
            lines.append(f"{name:46}{'-':>8}")
            continue
        ratio, cached, prompt = figures
        mark = "" if target is None else ("  PASS" if ratio >= target else "  FAIL")
        goal = "" if target is None else f">= {target:.0%}"
        lines.append(f"{name:46}{ratio:8.1%}{f'{cached} / {prompt}':>20}{goal:>9}{mark}")
    unexpected = [r for r in bench.rows if r.status != "200"]
    lines.append(f"unexpected statuses: {len(unexpected)}")
    return "\n".join(lines)


def plot(bench: Bench, label: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(
            f"no plot: matplotlib is not installed (pip install -e '.[bench]'); {path} not written"
        )
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in bench.rows))
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(12, 3.2 * len(scenarios)), sharey=True)
    fig.suptitle(
        f"Claude Code replay: prompt tokens and those read from the prompt cache ({label})"
    )
    for ax, scenario in zip(axes, scenarios, strict=True):
        rows = [r for r in bench.rows if r.scenario == scenario and r.request.path != COUNT_TOKENS]
        x = range(len(rows))
        ax.bar(x, [r.prompt for r in rows], color="lightgrey", label="prompt")
        ax.bar(x, [r.cached for r in rows], color="tab:blue", label="cached")
        ax.set_xticks(list(x), [f"{r.request.capture[:5]} {r.request.kind}" for r in rows])
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.set_ylabel("tokens")
        counted = sum(r.scenario == scenario and r.request.path == COUNT_TOKENS for r in bench.rows)
        note = f" ({counted} count_tokens calls not shown)" if counted else ""
        ax.set_title(f"{scenario}{note}", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_model(
    name: str | None, config_path: Path | None, work: Path
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(label, [models.bench] table, [engine] table) for `--model`."""
    if name is None:
        from tests.models import build_tiny_model

        from pensieved.models.gguf import import_gguf
        from pensieved.models.registry import builtin_gguf_path

        smollm = import_gguf(builtin_gguf_path(), work / "smollm2")
        tiny = build_tiny_model(work / "tiny", smollm)
        return "tiny", {"source": str(tiny), "context_length": 65536, "aliases": ["claude-*"]}, {}
    from pensieved.config import config_as_toml, load_config

    config = load_config(config_path)
    tables = config_as_toml(config)
    if name not in tables["models"]:
        names = ", ".join(m.name for m in config.models)
        sys.exit(f"--model: {name!r} is not a model of {config_path or 'your config'} ({names})")
    model = {**tables["models"][name], "aliases": ["claude-*"], "default": True}
    return name, model, tables["engine"]


def captures_folder(value: str) -> Path:
    """`--captures`, checked before anything runs: one line says what is missing."""
    folder = Path(value)
    missing = [name for name in CAPTURES.values() if not (folder / name).is_file()]
    if missing:
        sys.exit(f"no {', '.join(missing)} in {folder}: name the captures' folder with --captures")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="a model of your config, pulled beforehand: the daemons run offline "
        "(default: a tiny random model with a 65k window)",
    )
    parser.add_argument("--config", type=Path, help="the config --model is read from")
    parser.add_argument(
        "--captures",
        type=captures_folder,
        default=str(REPO.parent / "shared" / "claude-code"),
        help="the folder of capture-*.jsonl (default: ../shared/claude-code, not in the repo)",
    )
    parser.add_argument("--max-tokens", type=int, default=8, help="every reply's cap")
    parser.add_argument(
        "--prompt-cache-gb",
        type=float,
        help="the budget outside the side-request scenario (default: the config's, or 2.0)",
    )
    parser.add_argument(
        "--plot", type=Path, help="PNG path (default: beside the results file, else bench/out/)"
    )
    args = parse(parser, model="tiny")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pensieve-replay-") as tmp:
        work = Path(tmp)
        label, model, engine = bench_model(args.model, args.config, work)
        engine = {**engine, "persist_prompt_cache": False}
        if args.prompt_cache_gb is not None:
            engine["prompt_cache_gb"] = args.prompt_cache_gb
        bench = Bench(work, model, engine, args.max_tokens)
        facts = run(bench, args.captures)
    report = table(bench, label, facts, time.perf_counter() - started)
    print()
    print(report)
    path = args.plot or (
        args.results.with_suffix(".png") if args.results else OUT / f"claude-replay-{label}.png"
    )
    plot(bench, label, path)
    print(f"\nplot: {shown(path)}")


if __name__ == "__main__":
    main()
