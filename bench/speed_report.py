"""bench/speed.py's figures: a table against issue #4's targets, and a plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.api_vs_engine import Stream

MB = 1024 * 1024
Turns = tuple[Stream, Stream]


@dataclass
class Results:
    label: str
    openblas: bool
    max_tokens: int
    peer_log: Path  # mlx_lm.server's output
    raw: list[Stream] = field(default_factory=list)
    api: list[Stream] = field(default_factory=list)
    pensieve: Turns | None = None  # the Claude-Code-shaped turns 1 and 2
    # mlx_lm.server: turn 1, turn 2 with a fresh billing header (as Claude Code
    # sends it), and turn 2 again with turn 1's header.
    peer: tuple[Stream, Stream, Stream] | None = None
    aggregate: dict[int, float] = field(default_factory=dict)  # streams -> tok/s
    rss: dict[str, int] = field(default_factory=dict)  # window -> peak bytes
    seconds: float = 0.0

    def median(self, streams: list[Stream], value: Callable[[Stream], float]) -> float:
        return statistics.median(value(s) for s in streams)

    @property
    def peer_warm(self) -> Stream:
        """mlx_lm.server's faster turn 2 of the two."""
        assert self.peer
        return min(self.peer[1:], key=lambda s: s.ttft)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _ms(stream: Stream) -> float:
    return stream.ttft * 1000


def _turns(turns: Turns) -> str:
    return f"{_ms(turns[0]):.0f} -> {_ms(turns[1]):.0f}"


def _rows(r: Results) -> list[tuple[str, str, str, str, str]]:
    """(measure, value, ratio, target, verdict) per line of the table."""
    assert r.pensieve and r.peer
    raw_tps = r.median(r.raw, lambda s: s.decode_rate)
    api_tps = r.median(r.api, lambda s: s.decode_rate)
    raw_ttft = r.median(r.raw, _ms)
    api_ttft = r.median(r.api, _ms)
    t1, t2 = r.pensieve
    speedup = t2.ttft / t1.ttft
    peer = r.peer_warm.ttft
    four = r.aggregate[4] / r.aggregate[1]
    rates = " / ".join(f"{r.aggregate[n]:.1f}" for n in sorted(r.aggregate))
    rss = " / ".join(f"{r.rss[k] / MB:.0f}" for k in ("idle", "1 stream", "4 streams"))
    return [
        (
            "1 decode tok/s: raw mlx-lm -> API",
            f"{raw_tps:.1f} -> {api_tps:.1f}",
            f"{api_tps / raw_tps:.2f}x",
            ">= 0.97x",
            _verdict(api_tps / raw_tps >= 0.97),
        ),
        (
            "1 TTFT ms: raw mlx-lm -> API",
            f"{raw_ttft:.0f} -> {api_ttft:.0f}",
            f"{api_ttft - raw_ttft:+.0f} ms",
            "<= +10 ms",
            _verdict(api_ttft - raw_ttft <= 10),
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
            f"{t1.prompt_tokens} -> {t2.prompt_tokens}",
            "",
            ">= 4096",
            _verdict(t1.prompt_tokens >= 4096),
        ),
        (
            "2 Pensieve TTFT ms, turn 1 -> 2",
            _turns(r.pensieve),
            f"{speedup:.3f}x",
            "<= 0.10x",
            _verdict(speedup <= 0.1),
        ),
        ("  cache_read_input_tokens", f"{t1.cached_tokens} -> {t2.cached_tokens}", "", "", ""),
        (
            "2 mlx_lm.server TTFT ms, turn 1 -> 2",
            _turns(r.peer[:2]),
            f"{r.peer[1].ttft / r.peer[0].ttft:.2f}x",
            "",
            "",
        ),
        (
            "  turn 2 with turn 1's cch",
            f"{_ms(r.peer[2]):.0f}",
            f"{r.peer[2].ttft / r.peer[0].ttft:.2f}x",
            "",
            "",
        ),
        (
            "  mlx_lm.server cached tokens",
            f"{r.peer[1].cached_tokens}, same cch {r.peer[2].cached_tokens}",
            f"of {r.peer[1].prompt_tokens}",
            "",
            "",
        ),
        (
            "2 warm turn 2 ms: Pensieve / server",
            f"{t2.ttft * 1000:.0f} / {peer * 1000:.0f}",
            f"{t2.ttft / peer:.2f}x",
            "<= 1.00x",
            _verdict(t2.ttft <= peer),
        ),
        (
            "3 aggregate tok/s, 1/2/4/8 streams",
            rates,
            f"{four:.2f}x",
            "4 >= 2x 1",
            _verdict(four >= 2),
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

    labels = ["raw mlx-lm", "Pensieve API"]
    rates = [r.median(r.raw, lambda s: s.decode_rate), r.median(r.api, lambda s: s.decode_rate)]
    ttfts = [r.median(r.raw, _ms), r.median(r.api, _ms)]
    bars = decode.bar(labels, rates, color=["grey", "tab:blue"])
    decode.bar_label(
        bars, [f"{v:.1f} tok/s\nTTFT {t:.0f} ms" for v, t in zip(rates, ttfts, strict=True)]
    )
    decode.set_ylabel("decode tok/s")
    decode.set_title("1. streaming API vs raw engine")
    decode.margins(y=0.25)

    groups = {
        "Pensieve": r.pensieve,
        "mlx_lm.server": (r.peer[0], r.peer[1]),
        "mlx_lm.server,\nturn 2 with\nturn 1's cch": (r.peer[0], r.peer[2]),
    }
    x = range(len(groups))
    first = [_ms(t[0]) for t in groups.values()]
    second = [_ms(t[1]) for t in groups.values()]
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
    streams.plot(counts, [r.aggregate[n] for n in counts], marker="o", label="measured")
    target = 2 * r.aggregate[1]
    streams.plot([4], [target], marker="*", ms=12, ls="", c="tab:green", label="target at 4")
    streams.set_ylim(0, max(target, *r.aggregate.values()) * 1.15)
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
