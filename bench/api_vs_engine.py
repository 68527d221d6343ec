"""Decode speed and time-to-first-token: Pensieve's streaming API vs raw mlx-lm.

Same model, same prompt tokens, same greedy settings, measured in one run on
one machine. Raw is `mlx_lm.stream_generate` in this process; the API is a
real `pensieved` on a free port, driven by the official SDK's stream.
Run: `.venv/bin/python bench/api_vs_engine.py --help` (`make bench` runs
bench/speed.py, which measures this and more).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import anthropic  # noqa: E402
from bench.args import parse  # noqa: E402
from tests.daemon import Daemon, start_daemon  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def system_line() -> str:
    """A system prompt that starts with a fresh nonce: no prompt cache can serve the prompt.

    Every run then prefills the whole prompt, in the daemon as in the raw engine.
    """
    return f"Session {secrets.randbelow(10**8):08d}. You are a storyteller."


MODEL = "claude-opus-4-8"  # any name: the daemon maps it to its default model


@dataclass(frozen=True)
class Stream:
    """The timeline of one streamed generation (perf_counter seconds) and its counts."""

    started: float
    # The first visible text arrived. Pensieve's text blocks never start
    # with whitespace (Anthropic's do not either), so raw mlx-lm and
    # mlx_lm.server are timed to their first non-whitespace text too.
    first: float
    end: float
    output_tokens: int
    prompt_tokens: int = 0  # the whole prompt, cached part included
    cached_tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.first - self.started

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one."""
        return (self.output_tokens - 1) / (self.end - self.first)


def load_model(model_dir: str, dequantize: str = "auto") -> tuple[Any, Any]:
    """The model and tokenizer as the daemon loads them (dequantized where it would)."""
    import mlx_lm

    from pensieved.engine import cpu

    model, tokenizer = mlx_lm.load(model_dir)[:2]
    if cpu.should_dequantize(dequantize, model):
        cpu.dequantize(model)
    return model, tokenizer


class RawEngine:
    """`mlx_lm.stream_generate` in this process: greedy generations of PROMPT."""

    def __init__(self, model_dir: str, dequantize: str = "auto") -> None:
        import mlx.core as mx

        self.model, self.tokenizer = load_model(model_dir, dequantize)
        self.sampler = lambda logprobs: mx.argmax(logprobs, axis=-1)

    def stream(self, max_tokens: int) -> Stream:
        import mlx_lm

        prompt = self.tokenizer.apply_chat_template(
            [{"role": "system", "content": system_line()}, {"role": "user", "content": PROMPT}],
            add_generation_prompt=True,
        )
        started = time.perf_counter()
        first = first_any = None
        count = 0
        for response in mlx_lm.stream_generate(
            self.model, self.tokenizer, prompt, max_tokens=max_tokens, sampler=self.sampler
        ):
            count += 1
            first_any = first_any or time.perf_counter()
            if first is None and response.text.strip():
                first = time.perf_counter()
        first = first or first_any
        assert first is not None
        return Stream(started, first, time.perf_counter(), count, len(prompt))

    def batch_rate(self, sequences: int, max_tokens: int) -> float:
        """Aggregate decode tok/s of `sequences` greedy generations in mlx-lm's BatchGenerator.

        Set up as the daemon's engine sets it up (one sampler shared by the
        batch, 256-token prefill steps); counted as the bench counts streams,
        from the first token to the last.
        """
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(
            self.model, stop_tokens=[], prefill_step_size=256, completion_batch_size=8
        )
        prompts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{PROMPT} Chapter {i + 1}."}],
                add_generation_prompt=True,
            )
            for i in range(sequences)
        ]
        generator.insert(
            prompts, max_tokens=[max_tokens] * sequences, samplers=[self.sampler] * sequences
        )
        first = None
        tokens = finished = 0
        try:
            while finished < sequences:
                for response in generator.next()[1]:
                    first = first or time.perf_counter()
                    tokens += 1
                    finished += response.finish_reason is not None
        finally:
            generator.close()
        assert first is not None
        return (tokens - 1) / (time.perf_counter() - first)

    def close(self) -> None:
        import mlx.core as mx

        del self.model
        mx.clear_cache()


def raw_engine(model_dir: str, dequantize: str, max_tokens: int, runs: int) -> list[Stream]:
    """`runs` greedy generations of PROMPT, after one warm-up."""
    engine = RawEngine(model_dir, dequantize)
    try:
        return [engine.stream(max_tokens) for _ in range(runs + 1)][1:]
    finally:
        engine.close()


def sdk_stream(
    client: anthropic.Anthropic, max_tokens: int, messages: list[dict[str, Any]], **request: Any
) -> Stream:
    """One greedy `messages.stream` call, timed to its first text delta and its end."""
    started = time.perf_counter()
    first = None
    with client.messages.stream(
        model=MODEL,
        max_tokens=max_tokens,
        messages=messages,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
        **request,
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta" and first is None:
                first = time.perf_counter()
        message = stream.get_final_message()
    end = time.perf_counter()
    assert first is not None, "the stream carried no content"
    usage = message.usage
    cached = usage.cache_read_input_tokens or 0
    text = "".join(block.text for block in message.content if block.type == "text")
    return Stream(
        started, first, end, usage.output_tokens, usage.input_tokens + cached, cached, text
    )


def through_api(daemon: Daemon, max_tokens: int, runs: int) -> list[Stream]:
    """`runs` streams of PROMPT through a running daemon, after one warm-up."""
    client = daemon.client()
    return [api_stream(client, max_tokens) for _ in range(runs + 1)][1:]


def api_stream(client: anthropic.Anthropic, max_tokens: int) -> Stream:
    """PROMPT through the API, as RawEngine.stream generates it."""
    messages = [{"role": "user", "content": PROMPT}]
    return sdk_stream(client, max_tokens, messages, system=system_line())


def bench_daemon(home: Path, model_dir: str, dequantize: str = "auto") -> Daemon:
    """A real `pensieved` serving `model_dir` as its default model, on a free port."""
    config = {
        "engine": {"dequantize": dequantize},
        "models": {"bench": {"source": model_dir, "default": True}},
    }
    return start_daemon(home, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLX model directory (default: the embedded SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dequantize", default="auto", choices=["auto", "always", "never"])
    args = parse(parser)
    # The same BLAS as the daemon, which preloads the system OpenBLAS too.
    from pensieved.engine import openblas

    openblas.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])
    model_dir = args.model
    if model_dir is None:
        from pensieved.models.gguf import import_gguf
        from pensieved.models.registry import builtin_gguf_path

        model_dir = str(import_gguf(builtin_gguf_path(), Path(tempfile.mkdtemp()) / "smollm2"))

    raw = raw_engine(model_dir, args.dequantize, args.max_tokens, args.runs)
    with tempfile.TemporaryDirectory() as home:
        daemon = bench_daemon(Path(home), model_dir, args.dequantize)
        try:
            api = through_api(daemon, args.max_tokens, args.runs)
        finally:
            daemon.stop()
    raw_ttft = statistics.median(r.ttft for r in raw) * 1000
    api_ttft = statistics.median(r.ttft for r in api) * 1000
    raw_tps = statistics.median(r.decode_rate for r in raw)
    api_tps = statistics.median(r.decode_rate for r in api)
    print(f"model: {model_dir}  max_tokens: {args.max_tokens}  runs: {args.runs} (median)")
    print(f"OpenBLAS: {openblas.openblas_active()}  dequantize: {args.dequantize}")
    print(f"{'':28}{'raw mlx-lm':>12}{'Pensieve API':>14}{'ratio':>8}")
    print(f"{'decode tok/s':28}{raw_tps:12.1f}{api_tps:14.1f}{api_tps / raw_tps:8.2f}")
    print(
        f"{'time to first token (ms)':28}{raw_ttft:12.0f}{api_ttft:14.0f}"
        f"{api_ttft / raw_ttft:8.2f}   ({api_ttft - raw_ttft:+.0f} ms)"
    )


if __name__ == "__main__":
    main()
