"""Decode speed and time-to-first-token: Pensieve's streaming API vs raw mlx-lm.

Same model, same prompt tokens, same greedy settings, measured in one run on
one machine. Raw is `mlx_lm.stream_generate` in this process; the API is a
real `pensieved` on a free port, driven by the official SDK's stream.
Run: `make bench` (or `.venv/bin/python bench/api_vs_engine.py --help`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.daemon import start_daemon  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def raw_engine(
    model_dir: str, dequantize: str, max_tokens: int, runs: int
) -> list[tuple[float, float]]:
    import mlx.core as mx
    import mlx_lm

    from pensieved import cpu

    model, tokenizer = mlx_lm.load(model_dir)[:2]
    if cpu.should_dequantize(dequantize, model):
        cpu.dequantize(model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    sampler = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731  greedy
    results = []
    for _ in range(runs + 1):  # the first run warms up
        started = time.perf_counter()
        first = None
        count = 0
        for _response in mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler
        ):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        results.append((first - started, (count - 1) / (end - first)))
    del model
    mx.clear_cache()
    return results[1:]


def through_api(
    model_dir: str, dequantize: str, max_tokens: int, runs: int
) -> list[tuple[float, float]]:
    with tempfile.TemporaryDirectory() as home:
        config = {
            "engine": {"dequantize": dequantize},
            "models": {"bench": {"source": model_dir, "default": True}},
        }
        daemon = start_daemon(Path(home), config)
        try:
            client = daemon.client()
            results = []
            for _ in range(runs + 1):
                started = time.perf_counter()
                first = None
                with client.messages.stream(
                    model="claude-opus-4-8",
                    max_tokens=max_tokens,
                    messages=[{"role": "user", "content": PROMPT}],
                    extra_body={"temperature": 0.0},
                ) as stream:
                    for event in stream:
                        if event.type == "content_block_delta" and first is None:
                            first = time.perf_counter()
                    message = stream.get_final_message()
                end = time.perf_counter()
                assert first is not None
                results.append((first - started, (message.usage.output_tokens - 1) / (end - first)))
            return results[1:]
        finally:
            daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLX model directory (default: the embedded SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dequantize", default="auto", choices=["auto", "always", "never"])
    args = parser.parse_args()
    # The same BLAS as the daemon, which preloads the system OpenBLAS too.
    from pensieved import cpu

    cpu.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])
    model_dir = args.model
    if model_dir is None:
        from pensieved.config import Config
        from pensieved.registry import materialize

        model_dir = materialize(Config().default_model, Path(tempfile.mkdtemp()) / "models")

    raw = raw_engine(model_dir, args.dequantize, args.max_tokens, args.runs)
    api = through_api(model_dir, args.dequantize, args.max_tokens, args.runs)
    raw_ttft = statistics.median(r[0] for r in raw) * 1000
    api_ttft = statistics.median(r[0] for r in api) * 1000
    raw_tps = statistics.median(r[1] for r in raw)
    api_tps = statistics.median(r[1] for r in api)
    print(f"model: {model_dir}  max_tokens: {args.max_tokens}  runs: {args.runs} (median)")
    print(f"OpenBLAS: {cpu.openblas_active()}  dequantize: {args.dequantize}")
    print(f"{'':28}{'raw mlx-lm':>12}{'Pensieve API':>14}{'ratio':>8}")
    print(f"{'decode tok/s':28}{raw_tps:12.1f}{api_tps:14.1f}{api_tps / raw_tps:8.2f}")
    print(
        f"{'time to first token (ms)':28}{raw_ttft:12.0f}{api_ttft:14.0f}"
        f"{api_ttft / raw_ttft:8.2f}   (+{api_ttft - raw_ttft:.0f} ms)"
    )


if __name__ == "__main__":
    main()
