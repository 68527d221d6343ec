"""Real statuses, 529, prefills, the cache pre-warm: what the API promises beyond content blocks."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import pytest

from pensieved.engine.mlx_internals import keep_first_space
from pensieved.wire.errors import Busy, Overloaded
from tests.daemon import Daemon, running_daemon, sse_events


@pytest.fixture(scope="module")
def cold_daemon(
    tmp_path_factory: pytest.TempPathFactory, tiny_config: dict, tiny_dir: Path
) -> Iterator[Daemon]:
    """A daemon with a model no request has loaded yet (`cold-*`, a 256-token window)."""
    models = {
        **tiny_config["models"],
        "cold": {"source": str(tiny_dir), "aliases": ["cold-*"], "context_length": 256},
    }
    yield from running_daemon(tmp_path_factory.mktemp("cold"), {**tiny_config, "models": models})


def _loaded(daemon: Daemon, name: str) -> bool:
    health = daemon.health()
    return next(m["loaded"] for m in health["models"] if m["name"] == name)


def test_a_cold_models_stream_refuses_a_long_prompt_with_its_real_status(
    cold_daemon: Daemon,
) -> None:
    client = cold_daemon.client(max_retries=0)
    long_prompt = "the sea is wide and deep " * 200
    with (
        pytest.raises(anthropic.BadRequestError) as caught,
        client.messages.stream(
            model="cold-1", max_tokens=8, messages=[{"role": "user", "content": long_prompt}]
        ) as stream,
    ):
        stream.get_final_message()
    assert caught.value.status_code == 400
    assert "prompt is too long" in caught.value.message
    # Found with the tokenizer alone: the weights were never loaded for it.
    assert not _loaded(cold_daemon, "cold")
    # A prompt that fits streams as before, loading the model on the way.
    with client.messages.stream(
        model="cold-1", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert _loaded(cold_daemon, "cold")


def test_refusals_for_load_or_memory_are_529_with_retry_after() -> None:
    for refusal in (Overloaded("not enough memory"), Busy("queue full")):
        assert refusal.status == 529 and refusal.error_type == "overloaded_error"
        assert int(refusal.headers["retry-after"]) > 0
    assert Overloaded("x", {"retry-after": "30"}).headers["retry-after"] == "30"


def test_max_tokens_0_prewarms_the_prompt_cache(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    messages = [{"role": "user", "content": "Pre-warm this prompt about lighthouses, please."}]
    warmed = client.messages.create(model="claude-x", max_tokens=0, messages=messages)
    assert warmed.content == [] and warmed.stop_reason == "max_tokens"
    assert warmed.usage.output_tokens == 0
    reply = client.messages.create(model="claude-x", max_tokens=2, messages=messages)
    # Everything but the last prompt token comes from the cache.
    prompt = warmed.usage.input_tokens + (warmed.usage.cache_read_input_tokens or 0)
    assert reply.usage.cache_read_input_tokens == prompt - 1

    body = {"model": "claude-x", "max_tokens": 0, "messages": messages, "stream": True}
    response = tiny_daemon.http().post("/v1/messages", json=body)
    names = [name for name, _ in sse_events(response)]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" not in names


def test_a_continued_assistant_turn_keeps_its_leading_whitespace(tiny_daemon: Daemon) -> None:
    """A prefill's continuation may start with a space or newline (code indentation)."""
    client = tiny_daemon.client()

    def first_text(prefill: str | None) -> str:
        messages = [{"role": "user", "content": "Write a Python function."}]
        if prefill is not None:
            messages.append({"role": "assistant", "content": prefill})
        reply = client.messages.create(model="claude-x", max_tokens=1, messages=messages)
        return reply.content[0].text if reply.content else ""

    with ThreadPoolExecutor(8) as pool:
        continued = list(pool.map(first_text, ["def add(a, b):"] * 24))
        fresh = list(pool.map(first_text, [None] * 8))
    # A random model starts many of its tokens with a space; a continuation keeps them.
    assert any(text[:1].isspace() for text in continued), continued
    # A reply that starts a turn never begins with whitespace.
    assert not any(text[:1].isspace() for text in fresh), fresh


def test_the_untrimmed_detokenizer_keeps_the_first_space(smollm_dir: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(smollm_dir)
    tokens = tokenizer.encode("    return a + b", add_special_tokens=False)
    # mlx-lm's own drops the first space, which loses indentation mid-turn.
    for detokenizer, expected in (
        (tokenizer.detokenizer, "   return a + b"),
        (keep_first_space(tokenizer.detokenizer), "    return a + b"),
    ):
        for token in tokens:
            detokenizer.add_token(token)
        detokenizer.finalize()
        assert detokenizer.text == expected
