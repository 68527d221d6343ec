"""conversation/plan.py: what a request generates, decided in one place, on a real tiny model.

The rules run in-process on the tiny random model (its tokenizer, template
and grammar compiler are SmolLM2's); nothing is served. Tool and grammar
rules in detail are in tests/test_structured.py and tests/test_tools.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pensieved.config import EngineConfig, ModelConfig
from pensieved.conversation.plan import (
    SIDE_PROMPT_TOKENS,
    Sampling,
    check_fits,
    is_side_request,
    needs_grammar,
    plan_generation,
)
from pensieved.engine.loading import LoadedModel, load_front_end, load_weights
from pensieved.wire.decode import decode_request
from pensieved.wire.errors import ApiError
from pensieved.wire.protocol import MessagesRequest
from tests.conftest import TINY_CONTEXT

TOOL = {"name": "read", "input_schema": {"type": "object", "properties": {"p": {"type": "string"}}}}


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> LoadedModel:
    config = ModelConfig("tiny", str(tiny_dir), context_length=TINY_CONTEXT, top_k=7)
    return load_weights(config, tiny_dir, EngineConfig())


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "tiny", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    return decode_request(json.dumps({**body, **fields}).encode(), MessagesRequest)


def test_a_plain_request_samples_with_the_models_defaults_and_is_a_side_request(
    model: LoadedModel,
) -> None:
    asked = request(temperature=0.5)
    prompt = model.builder.build(asked)
    plan = plan_generation(asked, prompt, model)
    generation = plan.generation
    assert generation.prompt == prompt.tokens and plan.input_tokens == len(prompt.tokens)
    assert generation.max_tokens == 16 and not generation.context_limited
    defaults = model.sampling
    assert generation.sampling == Sampling(
        0.5, defaults.top_p, 7, defaults.min_p, defaults.repetition_penalty
    )
    assert generation.side and generation.grammar is None
    assert not needs_grammar(asked, prompt)


def test_max_tokens_is_clamped_to_the_window_and_says_so(model: LoadedModel) -> None:
    asked = request(max_tokens=64000)
    prompt = model.builder.build(asked)
    generation = plan_generation(asked, prompt, model).generation
    assert generation.max_tokens == TINY_CONTEXT - len(prompt.tokens)
    assert generation.context_limited


def test_a_prompt_without_room_for_one_token_is_refused(model: LoadedModel, tiny_dir: Path) -> None:
    asked = request(messages=[{"role": "user", "content": "word " * TINY_CONTEXT}])
    prompt = model.builder.build(asked)
    with pytest.raises(ApiError) as refused:
        plan_generation(asked, prompt, model)
    assert refused.value.status == 400 and "prompt is too long" in refused.value.message
    # The front end of a cold model (its tokenizer, no weights) refuses it the same.
    front = load_front_end(model.config, tiny_dir)
    with pytest.raises(ApiError):
        check_fits(front.builder.build(asked), front)


def test_a_forced_call_gets_a_grammar_and_the_generic_format(model: LoadedModel) -> None:
    asked = request(tools=[TOOL], tool_choice={"type": "tool", "name": "read"})
    prompt = model.builder.build(asked)
    assert needs_grammar(asked, prompt)
    plan = plan_generation(asked, prompt, model)
    assert plan.output.forced and plan.output.tool_format is not None
    assert plan.generation.grammar is plan.output.grammar is not None
    assert plan.generation.grammar.tools == (("read", json.dumps(TOOL["input_schema"])),)


def test_a_side_request_is_known_by_what_it_carries() -> None:
    tools = [{"function": {"name": "read"}}]
    assert not is_side_request("claude-opus-4-8", tools, SIDE_PROMPT_TOKENS)
    assert is_side_request("claude-opus-4-8", [], SIDE_PROMPT_TOKENS * 20)  # no tools
    assert is_side_request("claude-opus-4-8", tools, SIDE_PROMPT_TOKENS - 1)  # short
    assert is_side_request("claude-haiku-4-5", tools, SIDE_PROMPT_TOKENS * 20)  # small tier
