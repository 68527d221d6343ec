"""bench/speed.py's figures: a table against issue #4's targets, and a plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.api_vs_engine import Stream

MB = 1024 * 1024


@dataclass
class Results:
    label: str
    openblas: bool
    max_tokens: int
    peer_log: Path  # mlx_lm.server's output
    # Part 1 in pairs, raw then API: decode runs, and short runs for TTFT.
    raw: list[Stream] = field(default_factory=list)
    api: list[Stream] = field(default_factory=list)
    raw_first: list[Stream] = field(default_factory=list)
    api_first: list[Stream] = field(default_factory=list)
    # The Claude-Code-shaped turn 1, and the warm turn 2 runs (fresh billing headers).
    pensieve: tuple[Stream, list[Stream]] | None = None
    # mlx_lm.server: turn 1, turn 2 with a fresh billing header (as Claude Code
    # sends it), and the warm turn 2 runs (turn 1's prefix, no header).
    peer: tuple[Stream, Stream, list[Stream]] | None = None
    aggregate: dict[int, float] = field(default_factory=dict)  # streams -> tok/s
    raw_batch: dict[int, float] = field(default_factory=dict)  # sequences -> tok/s
    # Part 1's decode pairs also ran mlx-lm's BatchGenerator with one sequence:
    # the rate every server built on it starts from.
    raw_batch_one: list[float] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)  # window -> peak bytes
    seconds: float = 0.0

    def median(self, streams: list[Stream], value: Callable[[Stream], float]) -> float:
        return statistics.median(value(s) for s in streams)

    def decode_ratio(self) -> float:
        """API over raw decode rate: the median of the pairs' ratios (drift cancels)."""
        return statistics.median(
            a.decode_rate / r.decode_rate for r, a in zip(self.raw, self.api, strict=True)
        )

    def batch_ratio(self) -> float:
        """Raw BatchGenerator (one sequence) over raw stream_generate: the median pair's."""
        return statistics.median(
            b / r.decode_rate for r, b in zip(self.raw, self.raw_batch_one, strict=True)
        )

    def ttft_overhead_ms(self) -> float:
        """API minus raw time to first token: the median of the pairs' differences."""
        return statistics.median(
            _ms(a) - _ms(r) for r, a in zip(self.raw_first, self.api_first, strict=True)
        )

    def warm_ratio(self) -> float:
        """Pensieve's warm turn 2 over mlx_lm.server's: the median of the runs' ratios."""
        assert self.pensieve and self.peer
        pairs = zip(self.pensieve[1], self.peer[2], strict=True)
        return statistics.median(ours.ttft / theirs.ttft for ours, theirs in pairs)

    def warm_ms(self) -> tuple[float, float]:
        """Median warm turn 2, Pensieve and mlx_lm.server."""
        assert self.pensieve and self.peer
        return self.median(self.pensieve[1], _ms), self.median(self.peer[2], _ms)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _span(streams: list[Stream]) -> str:
    """The runs' cached tokens: one figure, or the lowest and highest."""
    low, high = min(s.cached_tokens for s in streams), max(s.cached_tokens for s in streams)
    return str(low) if low == high else f"{low}-{high}"


def _ms(stream: Stream) -> float:
    return stream.ttft * 1000


def _rows(r: Results) -> list[tuple[str, str, str, str, str]]:
    """(measure, value, ratio, target, verdict) per line of the table."""
    assert r.pensieve and r.peer
    raw_tps = r.median(r.raw, lambda s: s.decode_rate)
    api_tps = r.median(r.api, lambda s: s.decode_rate)
    decode = r.decode_ratio()
    raw_ttft = r.median(r.raw_first, _ms)
    api_ttft = r.median(r.api_first, _ms)
    overhead = r.ttft_overhead_ms()
    t1, warm = r.pensieve
    ours, peers = r.warm_ms()
    speedup = ours / _ms(t1)
    four = r.aggregate[4] / r.aggregate[1]
    raw_four = r.raw_batch[4] / r.raw_batch[1]
    rates = " / ".join(f"{r.aggregate[n]:.1f}" for n in sorted(r.aggregate))
    rss = " / ".join(f"{r.rss[k] / MB:.0f}" for k in ("idle", "1 stream", "4 streams"))
    return [
        (
            f"1 decode tok/s: raw mlx-lm -> API ({len(r.raw)} pairs)",
            f"{raw_tps:.1f} -> {api_tps:.1f}",
            f"{decode:.2f}x",
            ">= 0.97x",
            _verdict(decode >= 0.97),
        ),
        (
            "  raw BatchGenerator, one sequence",
            f"{statistics.median(r.raw_batch_one):.1f}",
            f"{r.batch_ratio():.2f}x",
            "",
            "",
        ),
        (
            f"1 TTFT ms: raw mlx-lm -> API ({len(r.raw_first)} pairs)",
            f"{raw_ttft:.0f} -> {api_ttft:.0f}",
            f"{overhead:+.0f} ms",
            "<= +10 ms",
            _verdict(overhead <= 10),
        ),
        (
            "  prompt tokens: raw / API (cached)",
            f"{r.raw[0].prompt_tokens} / {r.api[0].prompt_tokens} "
            f"({max(s.cached_tokens for s in r.api)})",
            "",
            "",
            "",
        ),
        (
            "2 prompt tokens, turn 1 -> 2",
            f"{t1.prompt_tokens} -> {warm[0].prompt_tokens}",
            "",
            ">= 4096",
            _verdict(t1.prompt_tokens >= 4096),
        ),
        (
            f"2 Pensieve TTFT ms, turn 1 -> 2 ({len(warm)} runs)",
            f"{_ms(t1):.0f} -> {ours:.0f}",
            f"{speedup:.3f}x",
            "<= 0.10x",
            _verdict(speedup <= 0.1),
        ),
        (
            "  cache_read_input_tokens",
            f"{t1.cached_tokens} -> {_span(warm)}",
            "",
            "",
            "",
        ),
        (
            "2 mlx_lm.server TTFT ms, turn 1 -> 2",
            f"{_ms(r.peer[0]):.0f} -> {_ms(r.peer[1]):.0f}",
            f"{r.peer[1].ttft / r.peer[0].ttft:.2f}x",
            "",
            "",
        ),
        (
            "  warm turn 2 (Pensieve's prompts)",
            f"{peers:.0f}",
            f"{peers / _ms(r.peer[0]):.2f}x",
            "",
            "",
        ),
        (
            "  mlx_lm.server cached tokens",
            f"{r.peer[1].cached_tokens}, warm {_span(r.peer[2])}",
            f"of {r.peer[1].prompt_tokens}",
            "",
            "",
        ),
        (
            f"2 warm turn 2 ms: Pensieve / server ({len(warm)} pairs)",
            f"{ours:.0f} / {peers:.0f}",
            f"{r.warm_ratio():.2f}x",
            "<= 1.00x",
            _verdict(r.warm_ratio() <= 1.0),
        ),
        (
            "3 aggregate tok/s, 1/2/4/8 streams",
            rates,
            f"{four:.2f}x",
            "4 >= 2x 1",
            _verdict(four >= 2),
        ),
        (
            "  raw BatchGenerator, 1 / 4 sequences",
            f"{r.raw_batch[1]:.1f} / {r.raw_batch[4]:.1f}",
            f"{raw_four:.2f}x",
            "",
            "",
        ),
        ("4 peak RSS MB, idle/1/4 streams", rss, "", "", ""),
    ]


def table(r: Results) -> str:
    blas = "OpenBLAS" if r.openblas else "reference BLAS"
    lines = [
        f"Pensieve speed: {r.label}, {blas}, {r.max_tokens} tokens per stream "
        f"(parts 1 and 3), {r.seconds / 60:.1f} min",
        f"{'measure':38}{'value':>26}{'ratio':>10}{'target':>11}  ",
    ]
    lines += [f"{m:38}{v:>26}{q:>10}{t:>11}  {ok}" for m, v, q, t, ok in _rows(r)]
    return "\n".join(lines)


def plot(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    assert r.pensieve and r.peer
    fig, ((decode, turns), (streams, rss)) = plt.subplots(2, 2, figsize=(11, 8))
    fig.suptitle(f"Pensieve speed: {r.label}")

    labels = ["raw mlx-lm", "raw\nBatchGenerator", "Pensieve API"]
    rates = [
        r.median(r.raw, lambda s: s.decode_rate),
        statistics.median(r.raw_batch_one),
        r.median(r.api, lambda s: s.decode_rate),
    ]
    ttfts = [
        f"TTFT {r.median(r.raw_first, _ms):.0f} ms",
        "",
        f"TTFT {r.median(r.api_first, _ms):.0f} ms",
    ]
    bars = decode.bar(labels, rates, color=["grey", "silver", "tab:blue"])
    decode.bar_label(bars, [f"{v:.1f} tok/s\n{t}" for v, t in zip(rates, ttfts, strict=True)])
    decode.set_ylabel("decode tok/s")
    decode.set_title("1. streaming API vs raw engine")
    decode.margins(y=0.25)

    ours, peers = r.warm_ms()
    groups = {
        "Pensieve": (_ms(r.pensieve[0]), ours),
        "mlx_lm.server": (_ms(r.peer[0]), _ms(r.peer[1])),
        "mlx_lm.server,\nwarm turn 2": (_ms(r.peer[0]), peers),
    }
    x = range(len(groups))
    first = [t[0] for t in groups.values()]
    second = [t[1] for t in groups.values()]
    for offset, values, name, color in (
        (-0.2, first, "turn 1", "grey"),
        (0.2, second, "turn 2", "tab:blue"),
    ):
        bars = turns.bar([i + offset for i in x], values, 0.4, label=name, color=color)
        turns.bar_label(bars, fmt="%.0f", fontsize=8)
    turns.set_xticks(list(x), list(groups))
    turns.set_yscale("log")
    turns.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    turns.yaxis.set_minor_formatter(NullFormatter())
    turns.margins(y=0.15)
    turns.set_ylabel("time to first token, ms (log)")
    turns.set_title(f"2. {r.pensieve[0].prompt_tokens}-token Claude-Code-shaped prefix")
    turns.legend()

    counts = sorted(r.aggregate)
    streams.plot(counts, [r.aggregate[n] for n in counts], marker="o", label="Pensieve API")
    raw_counts = sorted(r.raw_batch)
    streams.plot(
        raw_counts,
        [r.raw_batch[n] for n in raw_counts],
        marker="s",
        ls="--",
        c="grey",
        label="raw BatchGenerator",
    )
    target = 2 * r.aggregate[1]
    streams.plot([4], [target], marker="*", ms=12, ls="", c="tab:green", label="target at 4")
    streams.set_ylim(0, max(target, *r.aggregate.values(), *r.raw_batch.values()) * 1.15)
    streams.set_xticks(counts)
    streams.set_xlabel("concurrent streams")
    streams.set_ylabel("aggregate decode tok/s")
    streams.set_title("3. concurrent streams")
    streams.legend()

    windows = ["idle", "1 stream", "4 streams"]
    bars = rss.bar(windows, [r.rss[w] / MB for w in windows], color="tab:purple")
    rss.bar_label(bars, fmt="%.0f")
    rss.set_ylabel("peak RSS, MB")
    rss.set_title("4. daemon memory")
    rss.margins(y=0.15)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
