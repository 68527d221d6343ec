"""Prefix KV reuse across turns, and concurrent requests, against a real daemon."""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load

from pensieved.engine.prompt_cache import PromptCache
from tests.daemon import Daemon, running_daemon, sse_events, start_daemon

GREEDY = {"temperature": 0.0}


def words(count: int) -> str:
    """Text no other test sends, so that only this test's turns can hit."""
    return " ".join(secrets.token_hex(3) for _ in range(count))


@pytest.fixture(scope="module")
def cache_daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = {
        "engine": {"prompt_cache_gb": 0.002},  # ~2 MB: a handful of entries
        "models": {"tiny": {"source": str(tiny_dir), "context_length": 4096}},
    }
    yield from running_daemon(tmp_path_factory.mktemp("cache-daemon"), config)


def prompt_length(daemon: Daemon, **body: Any) -> int:
    return daemon.client().messages.count_tokens(model="tiny", **body).input_tokens


def test_turn_two_reads_turn_one_from_the_cache(cache_daemon: Daemon) -> None:
    client = cache_daemon.client()
    first_turn = [{"role": "user", "content": words(300)}]
    first = client.messages.create(
        model="tiny", max_tokens=8, messages=first_turn, extra_body=GREEDY
    )
    assert first.usage.cache_read_input_tokens == 0
    shared = prompt_length(cache_daemon, messages=first_turn)
    assert first.usage.input_tokens == shared
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And then?"},
    ]
    with client.messages.stream(
        model="tiny", max_tokens=8, messages=second_turn, extra_body=GREEDY
    ) as stream:
        second = stream.get_final_message()
    # Turn 1's prompt is exactly the prefix the two turns share (the reply it
    # generated is not "Noted.").
    assert second.usage.cache_read_input_tokens == shared
    assert second.usage.input_tokens == prompt_length(cache_daemon, messages=second_turn) - shared


def test_a_changed_billing_header_still_hits(cache_daemon: Daemon) -> None:
    client = cache_daemon.client()
    instructions = "You are Claude Code. " + words(200)

    def system() -> list[dict[str, Any]]:
        return [
            {
                "type": "text",
                "text": "x-anthropic-billing-header: cc_version=2.1.197; "
                f"cc_entrypoint=cli; cch={secrets.token_hex(4)};",
            },
            {"type": "text", "text": instructions},
        ]

    question = [{"role": "user", "content": words(20)}]
    client.messages.create(model="tiny", max_tokens=4, system=system(), messages=question)  # type: ignore[arg-type]
    again = client.messages.create(model="tiny", max_tokens=4, system=system(), messages=question)  # type: ignore[arg-type]
    prompt = prompt_length(cache_daemon, system=system(), messages=question)
    # The same prompt again: everything but the last token comes from the cache.
    assert again.usage.cache_read_input_tokens == prompt - 1
    assert again.usage.input_tokens == 1


def test_the_cache_stays_within_its_byte_budget(cache_daemon: Daemon) -> None:
    client = cache_daemon.client()
    with cache_daemon.http() as http:
        for _ in range(12):
            client.messages.create(
                model="tiny", max_tokens=4, messages=[{"role": "user", "content": words(150)}]
            )
            cache = http.get("/health").json()["prompt_cache"]
            assert 0 < cache["bytes"] <= cache["budget_bytes"] == int(0.002 * 1024**3)
    assert cache["entries"] < 12  # older entries were evicted to stay within it


def test_prompt_cache_byte_budget_on_every_path(tiny_dir: Path) -> None:
    """Store real KV caches of growing size: the total never passes the budget."""
    model, _ = load(str(tiny_dir))[:2]
    per_token = None
    budget = 200_000
    cache = PromptCache(budget)
    for length in (10, 50, 100, 300, 400, 20, 1000, 30):
        kv = make_prompt_cache(model)
        tokens = [int(t) for t in mx.random.randint(0, 1000, (length,)).tolist()]
        model(mx.array(tokens)[None], cache=kv)
        mx.eval([c.state for c in kv])
        per_token = sum(c.nbytes for c in kv) / length
        cache.store("tiny", tokens, kv)
        assert cache.nbytes <= budget
        hit, cached = cache.fetch("tiny", [*tokens, 7])
        fits = sum(c.nbytes for c in kv) <= budget
        assert (hit is not None and cached == length) == fits
    assert per_token is not None
    cache.shrink(0)
    assert cache.nbytes == 0 and len(cache) == 0


# -- several requests at once -------------------------------------------------


@pytest.fixture(scope="module")
def one_slot_daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One sequence at a time, none waiting: the second request is refused."""
    config = {
        "engine": {"max_sequences": 1, "max_queue": 1, "prefill_chunk": 16},
        "models": {"tiny": {"source": str(tiny_dir), "context_length": 8192}},
    }
    yield from running_daemon(tmp_path_factory.mktemp("one-slot-daemon"), config)


def test_concurrent_streams_match_their_single_outputs(tiny_daemon: Daemon) -> None:
    client = tiny_daemon.client()
    prompts = [f"Story number {i}: {words(5)}" for i in range(4)]

    def run(prompt: str) -> str:
        message = client.messages.create(
            model="tiny-long",
            max_tokens=24,
            messages=[{"role": "user", "content": prompt}],
            extra_body=GREEDY,
        )
        return "".join(block.text for block in message.content if block.type == "text")

    alone = [run(prompt) for prompt in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    # Each stream got its own prompt's greedy output, as if it had run alone.
    assert together == alone
    assert all(alone)


def test_beyond_the_queue_requests_get_529(one_slot_daemon: Daemon) -> None:
    body = {
        "model": "tiny",
        "max_tokens": 2000,
        "messages": [{"role": "user", "content": words(10)}],
        "stream": True,
    }
    with one_slot_daemon.http() as first, one_slot_daemon.http() as second:
        with first.stream("POST", "/v1/messages", json=body) as running:
            lines = running.iter_lines()
            next(line for line in lines if "content_block_delta" in line)
            with second.stream("POST", "/v1/messages", json=body) as waiting:
                assert waiting.status_code == 200  # queued: the one waiting place
                third = httpx.post(
                    f"{one_slot_daemon.base_url}/v1/messages",
                    json={**body, "stream": False, "max_tokens": 2},
                    headers={"x-api-key": one_slot_daemon.token},
                )
        assert third.status_code == 529
        assert third.headers["retry-after"]
        assert third.json()["error"]["type"] == "overloaded_error"


def wait_until_idle(daemon: Daemon) -> None:
    with daemon.http() as http:
        deadline = time.monotonic() + 30
        while http.get("/health").json()["requests"]["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_disconnect_mid_prefill_frees_the_slot(one_slot_daemon: Daemon) -> None:
    # ~7300 tokens: a whole prefill in 16-token chunks takes ~4 s here.
    long_prompt = {
        "model": "tiny",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": words(1200)}],
        "stream": True,
    }
    # Cancelled in its prefill, or (the client left first) before it joined the batch.
    cancelled = "request cancelled "
    wait_until_idle(one_slot_daemon)  # earlier tests' requests are gone
    before = one_slot_daemon.log().count(cancelled)
    with one_slot_daemon.http() as http:
        with http.stream("POST", "/v1/messages", json=long_prompt) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("event: message_start"):
                    break  # prefill has begun: leave now
        started = time.monotonic()
        quick = {
            "model": "tiny",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        with http.stream("POST", "/v1/messages", json=quick) as response:
            events = sse_events(response)
        waited = time.monotonic() - started
    assert events[-1][0] == "message_stop"
    log = one_slot_daemon.log()
    assert log.count(cancelled) == before + 1
    assert waited < 2.0, log  # not after the long prefill


def test_a_persisted_prefix_is_warm_after_a_restart(tiny_dir: Path, tmp_path: Path) -> None:
    config = {
        "engine": {"persist_prompt_cache": True},
        "models": {"tiny": {"source": str(tiny_dir), "context_length": 4096}},
    }
    question = [{"role": "user", "content": words(300)}]
    daemon = start_daemon(tmp_path, config)
    try:
        cold = daemon.client().messages.create(model="tiny", max_tokens=4, messages=question)
    finally:
        assert daemon.stop() == 0
    assert cold.usage.cache_read_input_tokens == 0
    saved = list((tmp_path / "models" / ".prompt-cache").glob("*.safetensors"))
    assert [path.name for path in saved] == ["tiny.safetensors"]
    daemon = start_daemon(tmp_path, config)
    try:
        warm = daemon.client().messages.create(model="tiny", max_tokens=4, messages=question)
        assert "warm from disk" in daemon.log()
    finally:
        daemon.stop()
    prompt = cold.usage.input_tokens
    assert warm.usage.cache_read_input_tokens == prompt - 1
