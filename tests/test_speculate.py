"""Speculative decoding in the engine: the same greedy tokens, fewer steps.

Each test runs a real `Runner` over a tiny random model (real SmolLM2
tokenizer, mlx-lm's llama), once with speculation off and once with it on, and
compares every token. A random model loops on short token cycles, which is
exactly what prompt lookup drafts well, so drafts are accepted here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import pytest

from pensieved.config import ConfigError, EngineConfig, ModelConfig, parse_config
from pensieved.conversation.constraints import ThinkingBudget
from pensieved.conversation.grammar import OutputGrammar
from pensieved.conversation.plan import GenerationRequest, Sampling
from pensieved.conversation.toolcalls import GENERIC
from pensieved.engine import speculate
from pensieved.engine.loading import LoadedModel, load_weights
from pensieved.engine.prompt_cache import PromptCache
from pensieved.engine.runner import Job, Runner, SamplerPool
from pensieved.engine.speculate import Speculator
from pensieved.engine.stream import Event, Finished, GenerationStream, TextDelta
from pensieved.paths import default_paths
from tests.models import THINKING_TEMPLATE, build_tiny_model

GREEDY = Sampling(temperature=0.0)
EDIT = {
    "type": "object",
    "properties": {
        "file_path": {"type": "string"},
        "old_string": {"type": "string"},
        "new_string": {"type": "string"},
    },
    "required": ["file_path", "old_string", "new_string"],
    "additionalProperties": False,
}


@dataclass
class Reply:
    tokens: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def finished(self) -> Event:
        return self.events[-1]


class Recorder:
    """A runner whose every emitted token is noted per stream (a seam, not a mock)."""

    def __init__(self, loaded: LoadedModel, mode: str) -> None:
        self.runner = Runner(loaded, EngineConfig(), PromptCache(0), SamplerPool())
        self.runner.speculator = Speculator(mode, 8)
        self.replies: dict[GenerationStream, Reply] = {}
        self.steps = 0
        advance = self.runner._advance

        def noting(uid: int, job: Job, token: int, reason: str | None) -> None:
            self.replies[job.stream].tokens.append(token)
            advance(uid, job, token, reason)

        self.runner._advance = noting  # type: ignore[method-assign]

    def start(self, request: GenerationRequest) -> GenerationStream:
        stream = GenerationStream(None, None)  # type: ignore[arg-type]  # read here, no loop
        self.replies[stream] = Reply()
        self.runner.insert(request, stream)
        return stream

    def step(self) -> None:
        self.runner.step()
        self.steps += 1
        for stream, reply in self.replies.items():
            while stream._events:
                reply.events.append(stream._events.popleft())

    def run(self, *requests: GenerationRequest) -> list[Reply]:
        streams = [self.start(r) for r in requests]
        while self.runner.jobs:
            self.step()
        return [self.replies[s] for s in streams]


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_weights(ModelConfig("tiny", str(tiny_dir)), tiny_dir, EngineConfig())


def prompt(loaded: LoadedModel, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def both(loaded: LoadedModel, *requests: GenerationRequest, mode: str = "ngram") -> Iterator[Reply]:
    """Each request's plain and speculative replies, checked equal token for token."""
    plain = Recorder(loaded, "off").run(*requests)
    fast = Recorder(loaded, mode)
    spoken = fast.run(*requests)
    for a, b in zip(plain, spoken, strict=True):
        assert b.tokens == a.tokens
        assert b.text == a.text
        assert b.finished == a.finished
    assert fast.runner.speculator.stats.accepted > 0
    yield from spoken


def test_greedy_text_is_the_same_and_drafts_are_accepted(tiny: LoadedModel) -> None:
    request = GenerationRequest(prompt(tiny, "Repeat: one two three " * 8), 160, GREEDY)
    plain = Recorder(tiny, "off")
    (reply,) = plain.run(request)
    fast = Recorder(tiny, "ngram")
    (again,) = fast.run(request)
    assert again.tokens == reply.tokens and again.text == reply.text
    assert again.finished == reply.finished == Finished("max_tokens", None, 160, 0)
    stats = fast.runner.speculator.stats
    # Speculation really ran: drafts were kept, and it took fewer steps.
    assert stats.accepted >= 40 and stats.steps > 0
    assert fast.steps < plain.steps - 30


def test_a_stop_sequence_mid_draft_ends_in_the_same_place(tiny: LoadedModel) -> None:
    tokens = prompt(tiny, "Say something.")
    (reply,) = Recorder(tiny, "off").run(GenerationRequest(tokens, 120, GREEDY))
    stop = reply.text[len(reply.text) * 2 // 3 :][:3]
    assert stop.strip()
    request = GenerationRequest(tokens, 120, GREEDY, stop_sequences=(stop,))
    (stopped,) = both(tiny, request)
    assert isinstance(stopped.finished, Finished)
    assert stopped.finished.stop_reason == "stop_sequence"


def test_a_forced_tool_call_fast_forwards(tiny: LoadedModel) -> None:
    grammar = OutputGrammar(
        (("Edit", json.dumps(EDIT)),),
        forced=True,
        parallel=False,
        start=GENERIC.start,
        end=GENERIC.end,
    )
    request = GenerationRequest(prompt(tiny, "Edit the file."), 80, GREEDY, grammar=grammar)
    # Grammar fast-forward alone: the forced keys are drafted and kept.
    (reply,) = both(tiny, request, mode="grammar")
    assert reply.text.startswith(GENERIC.start)
    assert '"file_path"' in reply.text
    (again,) = both(tiny, request)
    assert again.tokens == reply.tokens


def test_a_lazy_tool_grammar_drafts_from_context(tiny: LoadedModel) -> None:
    # Claude Code's main requests: tools with tool_choice auto, free text until a call.
    grammar = OutputGrammar((("Edit", json.dumps(EDIT)),), start=GENERIC.start, end=GENERIC.end)
    request = GenerationRequest(prompt(tiny, "Hello " * 10), 80, GREEDY, grammar=grammar)
    list(both(tiny, request))


def test_a_thinking_budget_is_kept(smollm_dir: Path, tmp_path: Path) -> None:
    path = build_tiny_model(
        tmp_path / "thinker", smollm_dir, chat_template=THINKING_TEMPLATE, thinking=True
    )
    loaded = load_weights(ModelConfig("thinker", str(path)), path, EngineConfig())
    end = loaded.tokenizer.think_end_tokens
    assert end
    request = GenerationRequest(
        prompt(loaded, "Think, then answer."), 60, GREEDY, thinking=ThinkingBudget(12, True)
    )
    (reply,) = both(loaded, request)
    # The budget forced the end marker after 12 thinking tokens.
    assert reply.tokens[12 : 12 + len(end)] == list(end)


def test_four_streams_decode_the_same(tiny: LoadedModel) -> None:
    requests = [
        GenerationRequest(prompt(tiny, f"Story {n}: " + "la " * n), 40 + 10 * n, GREEDY)
        for n in range(4)
    ]
    # Four at once decode as a plain batch; the last one left speculates.
    replies = list(both(tiny, *requests))
    assert [r.finished for r in replies] == [
        Finished("max_tokens", None, 40 + 10 * n, 0) for n in range(4)
    ]


def test_a_cancelled_stream_leaves_within_a_step(tiny: LoadedModel) -> None:
    fast = Recorder(tiny, "ngram")
    stream = fast.start(GenerationRequest(prompt(tiny, "Go on " * 20), 400, GREEDY))
    while not fast.runner.speculator.stats.accepted:
        fast.step()
    stream.cancelled.set()
    fast.runner.cancel(stream)  # what the engine does between steps, told by the stream
    assert not fast.runner.jobs
    assert len(fast.runner.generator._generation_batch) == 0
    # The batch is whole: the next request decodes as it would alone.
    request = GenerationRequest(prompt(tiny, "Again."), 30, GREEDY)
    (after,) = fast.run(request)
    (alone,) = Recorder(tiny, "off").run(request)
    assert after.tokens == alone.tokens


def test_sampled_drafts_keep_the_distribution() -> None:
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    settings = Sampling(temperature=1.0)
    mx.random.seed(7)
    counts = [0] * 4
    draws = 4000
    for _ in range(draws):
        token, _ = speculate._choose(logits, 1, settings)
        counts[token] += 1
    assert [round(c / draws, 2) for c in counts] == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)


def test_sampled_replies_run(tiny: LoadedModel) -> None:
    request = GenerationRequest(
        prompt(tiny, "Repeat: a b c " * 6), 60, Sampling(temperature=0.7, top_p=0.9, top_k=50)
    )
    (reply,) = Recorder(tiny, "ngram").run(request)
    assert reply.finished == Finished("max_tokens", None, 60, 0)


def test_speculation_settings() -> None:
    paths = default_paths()
    table = {"models": {"m": {"source": "x", "speculate": "off", "speculate_tokens": 4}}}
    config = parse_config(table, paths)
    assert (config.models[0].speculate, config.models[0].speculate_tokens) == ("off", 4)
    assert ModelConfig("m", "x").speculate == "ngram"
    with pytest.raises(ConfigError, match="speculate"):
        parse_config({"models": {"m": {"source": "x", "speculate": "maybe"}}}, paths)
    with pytest.raises(ConfigError, match="speculate_tokens"):
        parse_config({"models": {"m": {"source": "x", "speculate_tokens": 0}}}, paths)
