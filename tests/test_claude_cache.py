"""Claude Code over a working day: warm new sessions, side requests, explained misses."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.utils import load_tokenizer

from pensieved.conversation.prompt import PromptBuilder
from pensieved.wire.decode import decode_request
from pensieved.wire.protocol import MessagesRequest
from tests.captures import TWO_PROCESSES, pinned
from tests.daemon import Daemon, daemon_running, run_pensievectl, running_daemon
from tests.models import HERMES_TEMPLATE, build_tiny_model

# The tiny model's KV cache: 2 layers x (keys, values) x 2 heads x 16 dims x 4 bytes.
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4
GB = 1024**3


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture(scope="module")
def hermes_dir(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hermes") / "hermes"
    return build_tiny_model(path, smollm_dir, chat_template=HERMES_TEMPLATE)


@pytest.mark.parametrize("template", ["generic", "native"])
def test_a_second_process_shares_its_first_prompt_with_the_first(
    template: str, tiny_dir: Path, hermes_dir: Path
) -> None:
    """The captured `--continue` run's first turn against the `--print` run's last."""
    tokenizer = load_tokenizer(hermes_dir if template == "native" else tiny_dir)
    builder = PromptBuilder(tokenizer, "tiny")
    assert (builder.native_format is not None) == (template == "native")
    captured = json.loads(TWO_PROCESSES.read_text())
    last = pinned(captured["print_last"])
    first = captured["continue_first"]
    before = builder.build(decode_request(json.dumps(last).encode(), MessagesRequest))
    after = builder.build(decode_request(json.dumps(first).encode(), MessagesRequest))
    shared = common_prefix(before.tokens, after.tokens)
    assert shared / len(after.tokens) >= 0.60, (shared, len(after.tokens))
    # Nothing the model is told is lost: the git-status snapshot is still there.
    text = tokenizer.decode(after.tokens)
    assert "Status:\nM notes.txt\n?? summary.md" in text
    assert text.count("gitStatus: ") == 1


# -- against a daemon ---------------------------------------------------------

TOOLS = [
    {
        "name": f"tool_{i}",
        "description": f"Tool number {i}. " + "It does a careful, well described thing. " * 40,
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
    for i in range(3)
]


def main_request(status: str, turns: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A Claude-Code-shaped main turn: tools, a system prompt ending in a git snapshot."""
    system = (
        "You are an interactive agent that helps users with software engineering tasks. "
        * 20
        + f"\n\ngitStatus: This is the git status at the start of the conversation.\n\n"
        f"Status:\n{status}\n\nRecent commits:\n3c1648f Add calculator notes"
    )
    return {
        "model": "claude-opus-4-8",
        "max_tokens": 4,
        "system": [{"type": "text", "text": system}],
        "tools": TOOLS,
        "messages": turns,
        **extra,
    }


def cached_share(usage: Any) -> float:
    read = usage.cache_read_input_tokens or 0
    return float(read) / (read + usage.input_tokens)


@pytest.fixture(scope="module")
def long_tiny(tiny_dir: Path) -> dict[str, Any]:
    return {"source": str(tiny_dir), "aliases": ["claude-*"], "default": True}


@pytest.fixture(scope="module")
def roomy_daemon(tmp_path_factory: pytest.TempPathFactory, long_tiny: dict) -> Iterator[Daemon]:
    yield from running_daemon(tmp_path_factory.mktemp("roomy"), {"models": {"tiny": long_tiny}})


def test_a_new_process_after_a_file_changed_starts_warm(roomy_daemon: Daemon) -> None:
    client = roomy_daemon.client()
    task = [{"role": "user", "content": "Fix the bug in notes.txt."}]
    client.messages.create(**main_request("(clean)", task))
    # A new process: the project has changed, so the snapshot differs.
    reply = client.messages.create(**main_request("M notes.txt\n?? summary.md", task))
    assert cached_share(reply.usage) >= 0.60, reply.usage


def test_a_miss_is_explained_in_the_log_and_in_status(roomy_daemon: Daemon) -> None:
    client = roomy_daemon.client()
    words = " ".join(f"word{i}" for i in range(600))
    first = "Today is Monday. " + words
    second = "Today is Friday. " + words
    client.messages.create(
        model="claude-x", max_tokens=2, messages=[{"role": "user", "content": first}]
    )
    client.messages.create(
        model="claude-x", max_tokens=2, messages=[{"role": "user", "content": second}]
    )
    assert "prompt cache miss" in roomy_daemon.log()
    shown = run_pensievectl(roomy_daemon, "status")
    assert shown.returncode == 0, shown.stderr
    assert "recent prompt-cache misses" in shown.stdout
    report = json.loads(run_pensievectl(roomy_daemon, "status", "--json").stdout)
    miss = report["prompt_cache"]["recent_misses"][-1]
    assert miss["lost_tokens"] > 256
    assert "Friday" in miss["new"] and "Monday" in miss["cached"], miss
    assert "Today is" in miss["before"] + miss["new"]
    # The health endpoint anyone on the port can read carries no prompt text.
    assert "recent_misses" not in roomy_daemon.http().get("/health").text


def test_side_requests_never_evict_the_main_conversation(tmp_path: Path, long_tiny: dict) -> None:
    turns = [{"role": "user", "content": "Fix the bug in notes.txt."}]
    probe = main_request("(clean)", turns)
    # Room for the main conversation and a little more, not for the side requests too.
    budget = 1.25 * 1800 * KV_BYTES_PER_TOKEN / GB
    config = {"models": {"tiny": long_tiny}, "engine": {"prompt_cache_gb": budget}}
    with daemon_running(tmp_path / "daemon", config) as daemon:
        client = daemon.client()
        first = client.messages.create(**probe)
        assert first.usage.input_tokens > 1200, "the main prompt must fill most of the budget"
        title_system = "Generate a concise title for this coding session. " * 60
        client.messages.create(
            model="claude-opus-4-8",
            max_tokens=4,
            system=title_system,
            messages=[{"role": "user", "content": "Fix the bug in notes.txt."}],
            extra_body={
                "output_config": {
                    "format": {
                        "type": "json_schema",
                        "schema": {
                            "type": "object",
                            "properties": {"title": {"type": "string"}},
                            "required": ["title"],
                            "additionalProperties": False,
                        },
                    }
                }
            },
        )
        for _ in range(14):  # /context
            client.messages.count_tokens(**{k: v for k, v in probe.items() if k != "max_tokens"})
        client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=4,
            system="Answer with one word. " * 150,
            messages=[{"role": "user", "content": "Is this a git command: git status"}],
        )
        reply_text = "".join(b.text for b in first.content if b.type == "text")
        following = [
            *turns,
            {"role": "assistant", "content": reply_text or "ok"},
            {"role": "user", "content": "Now write a summary."},
        ]
        second = client.messages.create(**main_request("(clean)", following))
        assert cached_share(second.usage) >= 0.95, second.usage


def test_a_main_turn_prefills_before_side_requests_that_wait_with_it(
    tmp_path: Path, long_tiny: dict
) -> None:
    config = {"models": {"tiny": long_tiny}, "engine": {"prefill_chunk": 64}}
    firsts: dict[str, float] = {}
    main_started = threading.Event()

    def stream(name: str, body: dict[str, Any]) -> None:
        with daemon.client().messages.stream(**body) as events:
            for event in events:
                main_started.set()  # message_start: the engine has the request
                if event.type == "content_block_delta":
                    firsts.setdefault(name, time.monotonic())

    with daemon_running(tmp_path / "daemon", config) as daemon:
        daemon.client().messages.create(  # the model is loaded before the race
            model="claude-x", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
        )
        words = " ".join(f"item{i}" for i in range(400))
        main = main_request("(clean)", [{"role": "user", "content": words}], max_tokens=8)
        side = {
            "model": "claude-opus-4-8",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Title this session. " * 30}],
        }
        threads = [threading.Thread(target=stream, args=("main", main))]
        threads[0].start()
        assert main_started.wait(60)
        threads.append(threading.Thread(target=stream, args=("side", side)))
        threads[1].start()
        for thread in threads:
            thread.join(120)
    assert set(firsts) == {"main", "side"}, firsts
    assert firsts["main"] < firsts["side"], "the side request's prefill went first"
