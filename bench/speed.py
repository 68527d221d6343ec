"""Pensieve's speed where Claude Code needs it, against raw mlx-lm and mlx_lm.server.

One run, one model, four measurements (issue #4):
1. decode tok/s and time-to-first-token through Pensieve's streaming API
   (a real `pensieved` on a free port, the official SDK's stream) vs raw
   `mlx_lm.stream_generate` in this process, in raw/API pairs: decode runs,
   then short runs for the first token. Ratios are the medians of the pairs'
   ratios (and differences), so that a machine slowing down between pairs
   moves both sides of each;
2. turn-2 vs turn-1 time-to-first-token of a Claude-Code-shaped conversation
   with a >= 4k-token shared prefix (volatile billing header, a dozen tools,
   a tool round trip), for Pensieve and for `mlx_lm.server` on the same model;
   warm turn 2 runs go to the two servers in turn, and the ratio is the
   median of the pairs';
3. aggregate decode tok/s with 1, 2, 4 and 8 concurrent SDK streams, and the
   same model in mlx-lm's own BatchGenerator with 1 and 4 sequences;
4. the daemon's peak RSS idle, during one stream and during 4 concurrent streams.
Prints a table with the issue's targets and writes a plot (PNG).

Quantized models that Pensieve would dequantize on this machine (`auto`:
MLX's CPU backend with OpenBLAS) are dequantized once into a float32 model
directory that all three run, since mlx_lm.server cannot dequantize.
Run: `make bench` (`BENCH_ARGS="--model tiny" make bench`), or
`.venv/bin/python bench/speed.py --help`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.api_vs_engine import (  # noqa: E402
    MODEL,
    PROMPT,
    RawEngine,
    Stream,
    api_stream,
    bench_daemon,
    sdk_stream,
)
from bench.args import parse, shown  # noqa: E402
from bench.claude_code import Conversation, Json, fit_conversation  # noqa: E402
from bench.mlx_server import MlxServer  # noqa: E402
from bench.speed_report import Results, plot, table  # noqa: E402
from tests.daemon import Daemon  # noqa: E402

STREAM_COUNTS = (1, 2, 4, 8)
# Tokens per generation where only the time to the first one is measured.
TTFT_TOKENS = 16
MIN_PREFIX_TOKENS = 4096
OUT = REPO / "bench" / "out"


def prepare_model(choice: str, workdir: Path) -> tuple[str, str]:
    """(model directory, label) for `--model`: builtin, tiny, or a directory."""
    from pensieved.engine import cpu
    from pensieved.models.gguf import import_gguf
    from pensieved.models.registry import builtin_gguf_path

    if choice in ("builtin", "tiny"):
        smollm = import_gguf(builtin_gguf_path(), workdir / "smollm2")
        if choice == "tiny":
            from tests.models import build_tiny_model

            # The SmolLM2 tokenizer and 8k context, so the same long prefix fits.
            return str(build_tiny_model(workdir / "tiny", smollm, context=8192)), "tiny"
        source, label = str(smollm), "smollm2-135m"
    else:
        source, label = choice, Path(choice).name
    import mlx.core as mx
    import mlx_lm.utils

    model = mlx_lm.load(source)[0]
    if not cpu.should_dequantize("auto", model):
        return source, label
    cpu.dequantize(model)
    target = workdir / f"{label}-f32"
    mlx_lm.utils.save_model(target, model)
    config = json.loads((Path(source) / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for path in Path(source).iterdir():
        if path.is_file() and not path.name.startswith(("model", "config.json")):
            shutil.copy(path, target / path.name)
    del model
    mx.clear_cache()
    return str(target), f"{label} (float32)"


class PeakRss:
    """A process's RSS (children included), sampled every 10 ms in a background thread."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._peak = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        try:
            processes = [self._process, *self._process.children(recursive=True)]
            return sum(p.memory_info().rss for p in processes)
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        while not self._stopped.wait(0.01):
            rss = self._rss()
            with self._lock:
                self._peak = max(self._peak, rss)

    @contextmanager
    def window(self, peaks: dict[str, int], name: str) -> Iterator[None]:
        """Record in `peaks[name]` the highest RSS seen while the block runs."""
        with self._lock:
            self._peak = self._rss()
        yield
        time.sleep(0.05)
        with self._lock:
            peaks[name] = self._peak

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def concurrent_rate(daemon: Daemon, streams: int, max_tokens: int) -> float:
    """Aggregate decode tok/s of `streams` SDK streams started together.

    Counted from the first token of any stream to the end of the last one:
    the tokens made in that window over its length (for one stream, its
    decode rate).
    """
    barrier = threading.Barrier(streams)

    def one(index: int) -> Stream:
        client = daemon.client()
        messages = [{"role": "user", "content": f"{PROMPT} Chapter {index + 1}."}]
        barrier.wait()
        return sdk_stream(client, max_tokens, messages)

    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    window = max(s.end for s in results) - min(s.first for s in results)
    return (sum(s.output_tokens for s in results) - 1) / window


def raw_and_api(
    engine: RawEngine, daemon: Daemon, max_tokens: int, runs: int, with_batch: bool = False
) -> tuple[list[Stream], list[Stream], list[float]]:
    """Raw engine and API runs in turn, so that a load from elsewhere slows both alike.

    With `with_batch`, each round also runs the raw BatchGenerator with one
    sequence: its decode rates come third (else that list is empty).
    """
    client = daemon.client()
    raws, apis, batch = [], [], []
    for run in range(runs + 1):  # the first round warms up
        raw = engine.stream(max_tokens)
        rate = engine.batch_rate(1, max_tokens) if with_batch else None
        api = api_stream(client, max_tokens)
        if run:
            raws.append(raw)
            apis.append(api)
            if rate is not None:
                batch.append(rate)
    return raws, apis, batch


def warm_reply(reply: str, run: int) -> str:
    """Turn 1's reply, with a word added at its end after the first run.

    Each run then reuses turn 1's prompt and reply from the cache, as the
    real turn 2 does, and not the run before it (whose history differs from
    the added word on).
    """
    return reply if run == 0 else f"{reply} ({run})"


def measure(args: argparse.Namespace, model_dir: str, results: Results) -> None:
    with tempfile.TemporaryDirectory() as home:
        daemon = bench_daemon(Path(home), model_dir)
        rss = PeakRss(daemon.process.pid)
        try:
            client = daemon.client()
            sdk_stream(client, 8, [{"role": "user", "content": PROMPT}])  # warm-up
            with rss.window(results.rss, "idle"):
                time.sleep(2)
            print("1. raw mlx_lm.stream_generate and Pensieve API streams, in turn", flush=True)
            engine = RawEngine(model_dir)
            try:
                with rss.window(results.rss, "1 stream"):
                    results.raw, results.api, results.raw_batch_one = raw_and_api(
                        engine, daemon, args.max_tokens, args.runs, with_batch=True
                    )
                results.raw_first, results.api_first, _ = raw_and_api(
                    engine, daemon, TTFT_TOKENS, args.ttft_runs
                )
                print("3. raw BatchGenerator: 1 and 4 sequences", flush=True)
                for count in (1, 4):
                    results.raw_batch[count] = engine.batch_rate(count, args.max_tokens)
            finally:
                engine.close()
            print("3. concurrent streams:", end="", flush=True)
            for count in STREAM_COUNTS:
                print(f" {count}", end="", flush=True)
                window = rss.window(results.rss, "4 streams") if count == 4 else nullcontext()
                with window:
                    results.aggregate[count] = concurrent_rate(daemon, count, args.max_tokens)
            print(flush=True)

            with daemon.http() as http:

                def count_tokens(request: Json) -> int:
                    body = {"model": MODEL, **request}
                    response = http.post("/v1/messages/count_tokens", json=body)
                    response.raise_for_status()
                    return int(response.json()["input_tokens"])

                conversation = fit_conversation(count_tokens, args.prefix_tokens)
            measure_turns(args, model_dir, daemon, conversation, results)
        finally:
            rss.stop()
            daemon.stop()


def measure_turns(
    args: argparse.Namespace,
    model_dir: str,
    daemon: Daemon,
    conversation: Conversation,
    results: Results,
) -> None:
    """Part 2 with both servers up: turn 1 on each, then their warm turn 2 runs in turn.

    Taking the warm runs in pairs, as part 1 does, keeps a machine that
    slows down for a while from favouring whichever server ran then.
    """
    client = daemon.client()
    server = MlxServer(model_dir, results.peer_log)
    try:
        server.stream([{"role": "user", "content": PROMPT}], 8)  # warm-up

        # Turn 2 = turn 1 + its reply and a tool call + the tool's result.
        # Pensieve's requests carry a fresh billing header each, as Claude
        # Code sends them.
        def ours(messages: list[Json]) -> Stream:
            extras = conversation.anthropic_extras()
            return sdk_stream(client, args.turn_tokens, messages, **extras)

        # Without the billing header, mlx_lm.server's prompts are the very
        # tokens Pensieve renders (it drops that header), so both generate the
        # same text: a random model's first visible word can come after a run
        # of newlines that any change to the prompt moves. The turn with a
        # header fresh to it is Claude Code's real case.
        def theirs(messages: list[Json], billing: bool = False) -> Stream:
            turns = conversation.openai_messages(messages, billing=billing)
            return server.stream(turns, args.turn_tokens)

        print(f"2. turn 1 ({args.prefix_tokens}+ tokens), Pensieve then mlx_lm.server", flush=True)
        first = ours(conversation.turn1())
        peer_first = theirs(conversation.turn1())
        print("2. mlx_lm.server: turn 2 with a fresh billing header", flush=True)
        fresh = theirs(conversation.turn2(peer_first.text), billing=True)
        print(f"2. {args.warm_runs} warm turn 2 runs each, in turn", flush=True)
        warm: list[Stream] = []
        peer_warm: list[Stream] = []
        for run in range(args.warm_runs):
            warm.append(ours(conversation.turn2(warm_reply(first.text, run))))
            peer_warm.append(theirs(conversation.turn2(warm_reply(peer_first.text, run))))
        results.pensieve = first, warm
        results.peer = peer_first, fresh, peer_warm
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="builtin",
        help="builtin (the embedded SmolLM2), tiny (a random 2-layer model), or an MLX model dir",
    )
    parser.add_argument(
        "--max-tokens", type=int, help="per stream, parts 1 and 3 (default: 64; tiny: 256)"
    )
    parser.add_argument("--runs", type=int, help="part 1 decode runs, median (default: 5; tiny: 9)")
    parser.add_argument(
        "--ttft-runs",
        type=int,
        help=f"part 1 time-to-first-token runs of {TTFT_TOKENS} tokens (default: 9; tiny: 15)",
    )
    parser.add_argument("--prefix-tokens", type=int, default=4300, help="turn 1's prompt size")
    parser.add_argument("--turn-tokens", type=int, default=16, help="max_tokens per turn")
    parser.add_argument(
        "--warm-runs",
        type=int,
        help="part 2 warm turn-2 runs per server: turn 1's reply, then it with a word added "
        "at its end (default: 5; tiny: 9)",
    )
    parser.add_argument(
        "--plot", type=Path, help="PNG path (default: beside the results file, else bench/out/)"
    )
    args = parse(parser)
    # The tiny model decodes ~20x faster: longer and more runs for steadier figures.
    tiny = args.model == "tiny"
    args.max_tokens = args.max_tokens or (256 if tiny else 64)
    args.runs = args.runs or (9 if tiny else 5)
    args.ttft_runs = args.ttft_runs or (15 if tiny else 9)
    args.warm_runs = args.warm_runs or (9 if tiny else 5)
    if args.prefix_tokens < MIN_PREFIX_TOKENS:
        parser.error(f"--prefix-tokens: the issue asks for at least {MIN_PREFIX_TOKENS}")
    # The same BLAS as the daemon, which preloads the system OpenBLAS too;
    # the daemon and mlx_lm.server inherit it.
    from pensieved.engine import openblas

    openblas.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])

    name = Path(args.model).name  # builtin, tiny or the directory's name
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        model_dir, label = prepare_model(args.model, Path(workdir))
        context = json.loads((Path(model_dir) / "config.json").read_text())[
            "max_position_embeddings"
        ]
        results = Results(
            label,
            openblas.openblas_active(),
            args.max_tokens,
            OUT / f"mlx_lm.server-{name}.log",
        )
        print(f"model: {label} ({model_dir}), context {context}", flush=True)
        if context < args.prefix_tokens + 1024:
            sys.exit(f"{label}: a {context}-token context cannot hold the conversation")
        measure(args, model_dir, results)
    results.seconds = time.perf_counter() - started
    print()
    print(table(results))
    path = args.plot or (
        args.results.with_suffix(".png") if args.results else OUT / f"speed-{name}.png"
    )
    plot(results, path)
    print(f"\nplot: {shown(path)}\nmlx_lm.server log: {shown(results.peer_log)}")


if __name__ == "__main__":
    main()
