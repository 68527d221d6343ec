"""Decode speed with speculative decoding vs without, through the engine's own `Runner`.

Same model, same prompt, greedy, in one process; each case alternates a plain
run and a speculative run, and reports the medians and their ratio:
- code edit: the model repeats a ~300-token file from its prompt with one change
  (prompt-lookup drafts should be accepted for most of it);
- prose: a story, which rarely repeats its context (speculation must not slow it);
- Edit tool call: a forced Claude-Code-shaped `Edit` call under the tool grammar,
  with grammar fast-forward only (`speculate = "grammar"`) and with n-gram
  drafts as well (`"ngram"`), each vs plain;
- draft model (`speculate = "draft"`): code edit and prose again, with a draft
  model guessing: SmolLM2 Q4 drafting for SmolLM2 float32 (the same weights,
  so most guesses are kept), and the tiny model drafting for itself.
Greedy text must be identical with and without speculation; the table says so.
Run: `.venv/bin/python bench/speculation.py [--model builtin|tiny|DIR] [--draft-only]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.args import parse  # noqa: E402

from pensieved.config import EngineConfig, ModelConfig  # noqa: E402
from pensieved.conversation.grammar import OutputGrammar  # noqa: E402
from pensieved.conversation.plan import GenerationRequest, Sampling  # noqa: E402
from pensieved.conversation.toolcalls import GENERIC  # noqa: E402
from pensieved.engine import openblas  # noqa: E402
from pensieved.engine.loading import LoadedModel, load_weights  # noqa: E402
from pensieved.engine.prompt_cache import PromptCache  # noqa: E402
from pensieved.engine.runner import Runner, SamplerPool  # noqa: E402
from pensieved.engine.speculate import Speculator  # noqa: E402
from pensieved.engine.stream import Failed, Finished, GenerationStream, TextDelta  # noqa: E402

# A ~300-token file for the code-edit case.
SOURCE = '''import json
from pathlib import Path


class Inventory:
    """Items in a warehouse, saved as JSON."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, int] = {}

    def load(self) -> None:
        if self.path.exists():
            self.items = json.loads(self.path.read_text())

    def save(self) -> None:
        self.path.write_text(json.dumps(self.items, indent=2))

    def add(self, name: str, count: int = 1) -> None:
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name: str, count: int = 1) -> None:
        left = self.items.get(name, 0) - count
        if left <= 0:
            self.items.pop(name, None)
        else:
            self.items[name] = left

    def total(self) -> int:
        return sum(self.items.values())


def main() -> None:
    inventory = Inventory(Path("inventory.json"))
    inventory.load()
    inventory.add("apples", 3)
    inventory.remove("pears")
    inventory.save()
    print(inventory.total())


if __name__ == "__main__":
    main()
'''
CODE_EDIT = (
    "Here is a Python file:\n\n```python\n" + SOURCE + "```\n\n"
    "Rewrite the whole file with the method `total` renamed to `count_all` "
    "(and its call updated). Reply with the complete file only."
)
PROSE = "Write a short story about a lighthouse keeper who finds a message in a bottle."
EDIT_SCHEMA = {
    "type": "object",
    "properties": {
        "file_path": {"type": "string"},
        "old_string": {"type": "string"},
        "new_string": {"type": "string"},
        "replace_all": {"type": "boolean", "default": False},
    },
    "required": ["file_path", "old_string", "new_string"],
    "additionalProperties": False,
}
EDIT_PROMPT = (
    "The file /src/inventory.py is:\n\n```python\n" + SOURCE + "```\n\n"
    "Use the Edit tool to rename the method `total` to `count_all` in /src/inventory.py."
)


@dataclass
class Run:
    text: str
    tokens: int
    seconds: float  # from the first generated token to the last

    @property
    def rate(self) -> float:
        return (self.tokens - 1) / self.seconds if self.seconds > 0 else 0.0


def decode(runner: Runner, request: GenerationRequest) -> Run:
    """One request through `runner` alone: its text and its decode time."""
    stream = GenerationStream(None, None)  # type: ignore[arg-type]  # read here, no loop
    runner.insert(request, stream)
    first = 0.0
    text: list[str] = []
    while True:
        result = runner.step()
        if result.generated and not first:
            first = time.perf_counter()
        while stream._events:
            event = stream._events.popleft()
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                return Run("".join(text), event.output_tokens, time.perf_counter() - first)
            elif isinstance(event, Failed):
                raise RuntimeError(event.message)


def prompt(loaded: LoadedModel, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def compare(
    runner: Runner, request: GenerationRequest, mode: str, runs: int, draft_model: Any = None
) -> tuple[Run, Run, float, float]:
    """(plain, speculative) runs with median tok/s each, plain and `mode` alternating."""
    plain: list[Run] = []
    fast: list[Run] = []
    tokens = runner.loaded.config.speculate_tokens
    vocab = runner.loaded.vocab_size
    for _ in range(runs):
        runner.speculator = Speculator("off", tokens)
        plain.append(decode(runner, request))
        runner.speculator = Speculator(mode, tokens, draft_model, vocab)
        fast.append(decode(runner, request))
    return (
        plain[0],
        fast[-1],
        statistics.median(r.rate for r in plain),
        statistics.median(r.rate for r in fast),
    )


def measure(label: str, source: str, runs: int, max_tokens: int) -> list[tuple[str, Any]]:
    loaded = load_weights(ModelConfig(label, source), source, EngineConfig())
    runner = Runner(loaded, EngineConfig(), PromptCache(0), SamplerPool())
    greedy = Sampling(temperature=0.0)
    edit = OutputGrammar(
        (("Edit", json.dumps(EDIT_SCHEMA)),),
        forced=True,
        parallel=False,
        start=GENERIC.start,
        end=GENERIC.end,
    )
    cases = [
        ("code edit", CODE_EDIT, None, "ngram", max_tokens),
        ("prose", PROSE, None, "ngram", max_tokens),
        ("Edit call, fast-forward", EDIT_PROMPT, edit, "grammar", max_tokens),
        ("Edit call, ff + n-gram", EDIT_PROMPT, edit, "ngram", max_tokens),
    ]
    decode(runner, GenerationRequest(prompt(loaded, PROSE), 8, greedy))  # warm up
    rows = []
    for name, text, grammar, mode, budget in cases:
        request = GenerationRequest(prompt(loaded, text), budget, greedy, grammar=grammar)
        rows.append(row(runner, f"{label}: {name}", compare(runner, request, mode, runs)))
    return rows


def measure_draft(
    label: str, source: str, draft_source: str, runs: int, max_tokens: int
) -> list[tuple[str, Any]]:
    """Code edit and prose with `draft_source` drafting for `source` (float32 on the CPU)."""
    import mlx_lm

    loaded = load_weights(ModelConfig(label, source), source, EngineConfig(dequantize="always"))
    # The draft as stored (a quantized one stays quantized).
    draft_model = mlx_lm.load(draft_source)[0]
    runner = Runner(loaded, EngineConfig(), PromptCache(0), SamplerPool())
    greedy = Sampling(temperature=0.0)
    decode(runner, GenerationRequest(prompt(loaded, PROSE), 8, greedy))  # warm up
    rows = []
    for name, text in (("code edit", CODE_EDIT), ("prose", PROSE)):
        request = GenerationRequest(prompt(loaded, text), max_tokens, greedy)
        measured = compare(runner, request, "draft", runs, draft_model)
        rows.append(row(runner, f"{label}: {name}", measured))
    return rows


def row(runner: Runner, name: str, measured: tuple[Run, Run, float, float]) -> tuple[str, Any]:
    """A table row: tokens, both rates, the share of drafts kept, whether the text matched."""
    plain, fast, plain_rate, fast_rate = measured
    stats = runner.speculator.stats
    accepted = stats.accepted / stats.proposed if stats.proposed else 0.0
    print(f"  {name}: {plain.tokens} tokens", file=sys.stderr, flush=True)
    return name, (plain.tokens, plain_rate, fast_rate, accepted, plain.text == fast.text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", help="builtin, tiny, both, or an MLX dir")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=360)
    parser.add_argument("--draft-only", action="store_true", help="only the draft-model rows")
    parser.add_argument("--no-draft", action="store_true", help="leave out the draft-model rows")
    args = parse(parser)
    openblas.reexec_with_openblas([sys.executable, __file__, *sys.argv[1:]])
    from tests.models import build_tiny_model

    from pensieved.models.gguf import import_gguf
    from pensieved.models.registry import builtin_gguf_path

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        models: list[tuple[str, str]] = []
        # (label, target, draft)
        drafted: list[tuple[str, str, str]] = []
        if args.model in ("builtin", "tiny", "both"):
            smollm = import_gguf(builtin_gguf_path(), Path(workdir) / "smollm2")
            if args.model in ("builtin", "both"):
                models.append(("smollm2-135m", str(smollm)))
                drafted.append(("smollm2 f32 + Q4 draft", str(smollm), str(smollm)))
            if args.model in ("tiny", "both"):
                tiny = build_tiny_model(Path(workdir) / "tiny", smollm)
                models.append(("tiny", str(tiny)))
                drafted.append(("tiny + itself as draft", str(tiny), str(tiny)))
        else:
            models.append((Path(args.model).name, args.model))
        if not args.draft_only:
            for label, source in models:
                rows += measure(label, source, args.runs, args.max_tokens)
        for label, source, draft_source in [] if args.no_draft else drafted:
            rows += measure_draft(label, source, draft_source, args.runs, args.max_tokens)
    blas = "OpenBLAS" if openblas.openblas_active() else "reference BLAS"
    print(f"greedy, median of {args.runs} runs each, {blas}")
    print(
        f"{'case':<38}{'tokens':>7}{'plain tok/s':>13}{'spec tok/s':>12}{'ratio':>7}"
        f"{'accepted':>10}{'same text':>11}"
    )
    for name, (tokens, plain, fast, accepted, same) in rows:
        print(
            f"{name:<38}{tokens:>7}{plain:>13.1f}{fast:>12.1f}{fast / plain:>6.2f}x"
            f"{accepted:>9.0%}{'yes' if same else 'NO':>11}"
        )


if __name__ == "__main__":
    main()
