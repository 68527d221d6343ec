"""Speculative decoding with a draft model: the same greedy tokens, the draft's guesses kept.

A real `Runner` over the tiny random model, drafting with itself (every guess
should be kept, so the test fails if drafting is silently off) and with
another tiny model (most guesses rejected: the draft's cache must rewind).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pensieved.config import ConfigError, EngineConfig, ModelConfig, draft_config, parse_config
from pensieved.conversation.plan import GenerationRequest, Sampling
from pensieved.engine import speculate
from pensieved.engine.core import Engine
from pensieved.engine.loading import LoadedModel, load_weights, models_to_evict
from pensieved.engine.speculate import Speculator
from pensieved.engine.stream import Finished
from pensieved.paths import GB, default_paths
from pensieved.wire.errors import Overloaded
from tests.models import build_tiny_model
from tests.test_speculate import GREEDY, Recorder, prompt


def drafting(target: Path, draft: Path) -> LoadedModel:
    config = ModelConfig("tiny", str(target), draft=str(draft), speculate="draft")
    return load_weights(config, target, EngineConfig())


def with_draft(loaded: LoadedModel) -> Recorder:
    recorder = Recorder(loaded, "off")
    recorder.runner.speculator = Speculator("draft", 8, loaded.draft_model, loaded.vocab_size)
    return recorder


@pytest.fixture(scope="module")
def self_drafted(tiny_dir: Path) -> LoadedModel:
    return drafting(tiny_dir, tiny_dir)


def test_a_model_drafting_for_itself_keeps_its_guesses(
    self_drafted: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A random model soon loops, and long n-gram matches would draft instead:
    # with no match long enough, every draft is the draft model's.
    monkeypatch.setattr(speculate, "MAX_MATCH", 10**6)
    topics = ("the sea", "the sea, and ships", "mountains", "a city at night", "bread")
    fast = with_draft(self_drafted)
    for topic in topics:
        # Each next turn shares a prefix with the last: the draft's cache keeps it.
        request = GenerationRequest(prompt(self_drafted, f"Tell me about {topic}."), 40, GREEDY)
        (plain,) = Recorder(self_drafted, "off").run(request)
        (drafted,) = fast.run(request)
        assert drafted.tokens == plain.tokens and drafted.text == plain.text
        assert drafted.finished == plain.finished == Finished("max_tokens", None, 40, 0)
    stats = fast.runner.speculator.stats
    assert stats.guessed == stats.proposed >= 60
    # Every guess kept but a rare near-tie the single-token passes break otherwise.
    assert stats.accepted >= stats.proposed - 2
    # The draft's KV cache counts among the engine's KV bytes (status, memory guard).
    assert fast.runner.speculator.cache_bytes > 0


def test_another_draft_model_gives_the_same_text(
    tiny_dir: Path, smollm_dir: Path, tmp_path: Path
) -> None:
    other = build_tiny_model(tmp_path / "other", smollm_dir, seed=1)
    loaded = drafting(tiny_dir, other)
    request = GenerationRequest(prompt(loaded, "Say something."), 100, GREEDY)
    (plain,) = Recorder(loaded, "off").run(request)
    fast = with_draft(loaded)
    (drafted,) = fast.run(request)
    assert drafted.tokens == plain.tokens
    assert fast.runner.speculator.stats.guessed > 0
    # Sampled replies run through the same drafts.
    sampled = GenerationRequest(request.prompt, 40, Sampling(temperature=0.8, top_p=0.9))
    (reply,) = fast.run(sampled)
    assert reply.finished == Finished("max_tokens", None, 40, 0)


def test_a_draft_with_another_vocabulary_is_refused(
    tiny_dir: Path, smollm_dir: Path, tmp_path: Path
) -> None:
    # Two more tokens (<think>, </think>): ids past 49152 mean nothing to the target.
    other = build_tiny_model(tmp_path / "thinker", smollm_dir, thinking=True)
    with pytest.raises(ValueError, match=r"another vocabulary.*same tokenizer"):
        drafting(tiny_dir, other)


def test_the_draft_weights_count_as_the_model(tiny_dir: Path, self_drafted: LoadedModel) -> None:
    alone = load_weights(ModelConfig("tiny", str(tiny_dir)), tiny_dir, EngineConfig())
    assert alone.draft_model is None
    assert self_drafted.weight_bytes == 2 * alone.weight_bytes
    # Room is made for both: a budget that holds the model alone refuses it with its draft.
    size = alone.weight_bytes
    settings = EngineConfig(models_budget_gb=1.5 * size / GB, dequantize="never")
    config = self_drafted.config
    assert models_to_evict(config, tiny_dir, settings, [], 0) == []
    with pytest.raises(Overloaded, match="more than the whole model budget"):
        models_to_evict(config, tiny_dir, settings, [], 0, draft_path=tiny_dir)


def test_draft_settings() -> None:
    paths = default_paths()
    models = {
        "big": {"source": "/models/big", "draft": "small"},
        "small": {"source": "/models/small"},
        "own": {"source": "/models/own", "draft": "/models/drafter"},
        "paused": {"source": "/models/big", "draft": "small", "speculate": "off"},
    }
    big, small, own, paused = parse_config({"models": models}, paths).models
    # A draft implies speculate = "draft"; a configured model's name stands for its source.
    assert (big.speculate, big.draft) == ("draft", "/models/small")
    assert (small.speculate, small.draft) == ("ngram", None)
    assert (own.speculate, own.draft) == ("draft", "/models/drafter")
    drafter = draft_config(big)
    assert drafter is not None and drafter.source == "/models/small"
    # Speculation turned off: the draft model is not loaded.
    assert draft_config(paused) is None and draft_config(small) is None
    with pytest.raises(ConfigError, match="needs a draft model"):
        parse_config({"models": {"m": {"source": "x", "speculate": "draft"}}}, paths)


def test_the_engine_loads_the_draft_with_its_model(tiny_dir: Path, tmp_path: Path) -> None:
    engine = Engine(tmp_path / "models")
    engine.start()
    try:
        config = ModelConfig("tiny", str(tiny_dir), draft=str(tiny_dir), speculate="draft")
        loaded = asyncio.run(engine.load(config))
        assert loaded.draft_model is not None
        alone = load_weights(ModelConfig("tiny", str(tiny_dir)), tiny_dir, EngineConfig())
        assert loaded.weight_bytes == 2 * alone.weight_bytes
    finally:
        engine.stop()
