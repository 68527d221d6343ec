"""Per-token cost of grammar-constrained output vs free decoding, through the engine.

Same model, same prompt, same greedy settings, one run, Pensieve's own engine
thread and logits processors. The ways to decode:
- free: no grammar (tool_choice absent);
- lazy: tool_choice `auto` with tools: text is free until a call starts;
- forced: tool_choice `any`: every token is masked by the tool's JSON schema
  (a long required string keeps the call going for the whole budget);
- json: structured output (`output_config.format`): every token is masked by
  the reply's JSON schema (again a long required string);
- json, closing: the same in the last tokens before max_tokens, where each
  step also looks for the shortest way to close the document.
Speculative decoding is off unless `--speculate` says otherwise: prompt
lookup speeds up some modes and not others, which would hide the grammar's cost.
Run: `.venv/bin/python bench/tool_grammar.py [--model builtin:smollm2-135m-instruct]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402

from pensieved.config import ModelConfig  # noqa: E402
from pensieved.conversation.constraints import CLOSE_WINDOW  # noqa: E402
from pensieved.conversation.grammar import OutputGrammar  # noqa: E402
from pensieved.conversation.plan import GenerationRequest, Sampling  # noqa: E402
from pensieved.conversation.toolcalls import GENERIC  # noqa: E402
from pensieved.engine import openblas  # noqa: E402
from pensieved.engine.core import Engine  # noqa: E402
from pensieved.engine.stream import Finished, TextDelta  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"command": {"type": "string", "minLength": 2000}},
    "required": ["command"],
}
STORY = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string", "minLength": 2000}},
    "required": ["title", "story"],
}
PROMPT = "Write a shell command that prints a long story about a lighthouse keeper."


async def decode_ms(
    engine: Engine, config: ModelConfig, grammar: OutputGrammar | None, n: int, closing: bool
) -> float:
    """ms per token over `n` tokens: the last `n` of the budget if `closing`, else the first."""
    loaded = await engine.load(config)
    tokens = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    # Past the closing window unless it is what is measured.
    budget = n if closing else n + CLOSE_WINDOW + 8
    request = GenerationRequest(
        prompt=list(tokens), max_tokens=budget, sampling=Sampling(temperature=0.0), grammar=grammar
    )
    stream = engine.submit(loaded, request)
    gone = asyncio.Event()
    first = last = 0.0
    count = 0
    while True:
        event = await stream.next_event(gone)
        if isinstance(event, TextDelta):
            last = time.perf_counter()
            first = first or last
            count = event.output_tokens
            if count >= n:
                break
        elif isinstance(event, Finished):
            break
    stream.cancel()
    if count < 2:
        raise RuntimeError("too few tokens to time")
    return (last - first) / (count - 1) * 1000


async def run(source: str, n: int, runs: int, speculate: str) -> None:
    engine = Engine(Path(tempfile.mkdtemp()))
    engine.start()
    config = ModelConfig("bench", source, speculate=speculate)
    tools = (("Bash", json.dumps(SCHEMA)),)
    json_reply = OutputGrammar(reply_schema=json.dumps(STORY))
    modes: dict[str, tuple[OutputGrammar | None, bool]] = {
        "free": (None, False),
        "lazy (auto)": (OutputGrammar(tools, start=GENERIC.start, end=GENERIC.end), False),
        "forced (any)": (
            OutputGrammar(tools, forced=True, parallel=False, start=GENERIC.start, end=GENERIC.end),
            False,
        ),
        "json": (json_reply, False),
        f"json, last {CLOSE_WINDOW}": (json_reply, True),
    }
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    await decode_ms(engine, config, None, 8, False)  # load and warm up
    for _ in range(runs):
        for mode, (grammar, closing) in modes.items():
            size = CLOSE_WINDOW if closing else n
            results[mode].append(await decode_ms(engine, config, grammar, size, closing))
    engine.stop()
    base = statistics.median(results["free"])
    print(
        f"model {source}, {n} tokens, median of {runs}, speculate {speculate!r}, "
        f"OpenBLAS {openblas.openblas_active()}"
    )
    print(f"{'decoding':<16} {'ms/token':>9} {'vs free':>8}")
    for mode, times in results.items():
        ms = statistics.median(times)
        print(f"{mode:<16} {ms:>9.2f} {ms / base:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--speculate",
        default="off",
        choices=("off", "grammar", "ngram"),
        help="the model's `speculate` (default: off, the grammar's cost alone; "
        "the daemon's default is ngram)",
    )
    args = parse(parser)
    openblas.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])
    asyncio.run(run(args.model, args.tokens, args.runs, args.speculate))


if __name__ == "__main__":
    main()
