"""The two-tier Mac configs of docs/models.md, held to what the admission code does.

Claude Code sends `max_tokens` of 32000 and more on every turn, over a 20k-token
prefix. First the configs' own numbers, read from the docs: in the steady state
of a session (both tiers' weights resident, the prompt cache and MLX's buffer
cache full), every main-tier and haiku-tier turn is admitted, up to a full
window. Then the 16 GB config's shape scaled down to tiny models (the same
shares of the budget for weights, caches and a turn's KV cache) runs in a real
daemon: turn after turn is served, and its real memory stays under the budget.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache

from pensieved.config import ModelConfig, parse_config
from pensieved.engine.core import Engine
from pensieved.engine.prompt_cache import PromptCache
from pensieved.engine.stream import GenerationStream
from pensieved.memory.admission import Admission, ModelShape
from pensieved.memory.guard import MemoryGuard
from pensieved.memory.probe import MemoryReading
from pensieved.paths import GB, default_paths
from pensieved.service import control
from pensieved.wire.errors import Overloaded
from tests.daemon import Daemon, running_daemon, sse_events
from tests.test_control import control_socket

REPO = Path(__file__).resolve().parent.parent
MODELS_DOC = REPO / "docs" / "models.md"


@dataclass(frozen=True)
class RealModel:
    """What the docs' models weigh and need per token (their config.json, bf16 KV, file sizes)."""

    weight_bytes: int
    shape: ModelShape
    kv_heads: int
    head_dim: int
    layers: int


REAL_MODELS = {
    "mlx-community/Qwen2.5-Coder-7B-Instruct-4bit": RealModel(
        int(4.3 * GB), ModelShape(28 * 4 * 128 * 2 * 2, 28, 3584, 18944, 152064), 4, 128, 28
    ),
    "mlx-community/Qwen2.5-Coder-1.5B-Instruct-4bit": RealModel(
        int(0.9 * GB), ModelShape(28 * 2 * 128 * 2 * 2, 12, 1536, 8960, 151936), 2, 128, 28
    ),
    "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit": RealModel(
        int(17.2 * GB), ModelShape(48 * 4 * 128 * 2 * 2, 32, 2048, 6144, 151936), 4, 128, 48
    ),
    "mlx-community/Qwen2.5-Coder-3B-Instruct-4bit": RealModel(
        int(1.8 * GB), ModelShape(36 * 2 * 128 * 2 * 2, 16, 2048, 11008, 151936), 2, 128, 36
    ),
}
# Metal's max_recommended_working_set_size: about 2/3 of the RAM of a 16 GB
# Mac, 3/4 of a 64 GB one (what MLX and ollama report; [needs a Mac] to pin).
GPU_SHARE = {16: 2 / 3, 64: 3 / 4}
# Claude Code's prompts over a session: the first turn's ~20k-token prefix,
# a longer one, and one a thousand tokens short of the window.
MAIN_PROMPTS = (20_000, 25_000)
HAIKU_PROMPT = 3_000
MAX_TOKENS = 32_000
# The daemon's own resident memory besides MLX's buffers: Python, the
# libraries, the tokenizers (~0.18 GB measured here on Linux).
PROCESS_BYTES = int(0.25 * GB)


@dataclass(frozen=True)
class MacConfig:
    ram_gb: int
    text: str

    @property
    def data(self) -> dict[str, Any]:
        return tomllib.loads(self.text)


def mac_configs() -> list[MacConfig]:
    """The ```toml blocks under "Two tiers on a Mac", with the RAM their heading names."""
    section = MODELS_DOC.read_text().split("## Two tiers on a Mac", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"A (\d+) GB Mac[^\n]*:\n\n```toml\n(.*?)```", section, re.S)
    return [MacConfig(int(ram), text) for ram, text in found]


def test_the_docs_show_both_mac_configs() -> None:
    assert [c.ram_gb for c in mac_configs()] == [16, 64]


class Steady:
    """A session's steady state as the guard would read it: scripted figures, real rules."""

    def __init__(self, reading: MemoryReading) -> None:
        self.reading = reading

    def read(self) -> MemoryReading:
        return self.reading


def kv_entry(model: RealModel, tokens: int) -> list[Any]:
    """A prompt-cache entry of `tokens` for `model`: mlx-lm's KV caches, never evaluated.

    MLX arrays are lazy: their sizes are real, but nothing is allocated.
    """
    caches = []
    for _ in range(model.layers):
        cache = KVCache()
        shape = (1, model.kv_heads, tokens, model.head_dim)
        cache.update_and_fetch(mx.zeros(shape, mx.bfloat16), mx.zeros(shape, mx.bfloat16))
        caches.append(cache)
    return caches


def refusal(mac: MacConfig, tier: ModelConfig, prompt: int, tmp_path: Path) -> str | None:
    """Why a turn of `prompt` tokens on `tier` is refused in the session's steady state, or None."""
    config = parse_config(mac.data, default_paths())
    memory, engine_settings = config.memory, config.engine
    models = [REAL_MODELS[m.source] for m in config.models]
    weights = sum(m.weight_bytes for m in models)
    engine = Engine(tmp_path, engine_settings)  # never started: its prompt cache and queue
    # Entries sized as on a Mac but never allocated: copying them compact would.
    engine.prompt_cache = PromptCache(engine.prompt_cache.max_bytes, compact=False)
    main, quick = config.models
    # The prompt cache full: this conversation's entry, the rest the haiku tier's.
    conversation = kv_entry(REAL_MODELS[main.source], MAIN_PROMPTS[0])
    engine.prompt_cache.store(main, list(range(MAIN_PROMPTS[0])), conversation)
    budget = engine.prompt_cache.max_bytes
    haiku_tokens = HAIKU_PROMPT
    while engine.prompt_cache.nbytes < budget - 64 * 1024**2:
        entry = kv_entry(REAL_MODELS[quick.source], haiku_tokens)
        if sum(c.nbytes for c in entry) + engine.prompt_cache.nbytes > budget:
            break
        engine.prompt_cache.store(quick, list(range(10**6, 10**6 + haiku_tokens)), entry)
        haiku_tokens += HAIKU_PROMPT
    prefix = engine.prompt_cache.nbytes
    mlx_cache = int(memory.cache_limit_gb * GB)
    held = PROCESS_BYTES + weights + prefix + mlx_cache
    # What the machine leaves the daemon: its budget, down to the reject line.
    others = mac.ram_gb * GB - int(memory.budget_gb * GB) - int(memory.reject_below_gb * GB)
    reading = MemoryReading(
        available=mac.ram_gb * GB - others - held,
        total=mac.ram_gb * GB,
        pressure="normal",
        resident=held,
        mlx_active=weights + prefix,
        mlx_cache=mlx_cache,
        mlx_peak=held,
        kernel_first=True,
        gpu_working_set=int(GPU_SHARE[mac.ram_gb] * mac.ram_gb * GB),
    )
    guard = MemoryGuard(memory, Steady(reading), engine=engine)
    admission = Admission(guard, engine_settings.prefill_chunk)
    context = tier.context_length or 32768
    max_tokens = min(MAX_TOKENS, context - prompt)  # as the HTTP layer clamps it
    loop = asyncio.new_event_loop()
    try:
        stream = GenerationStream(engine, loop)
        admission.check(tier, REAL_MODELS[tier.source].shape, prompt, max_tokens, stream)
    except Overloaded as refused:
        return refused.message
    finally:
        loop.close()
    return None


@pytest.mark.parametrize("ram_gb", [16, 64])
def test_the_docs_mac_configs_admit_every_claude_code_turn(ram_gb: int, tmp_path: Path) -> None:
    mac = next(c for c in mac_configs() if c.ram_gb == ram_gb)
    config = parse_config(mac.data, default_paths())
    main, quick = config.models
    assert {m.source for m in config.models} <= set(REAL_MODELS), "a model the test cannot size"
    weights = sum(REAL_MODELS[m.source].weight_bytes for m in config.models)
    assert weights <= config.engine.models_budget_gb * GB  # both tiers stay resident
    main_window = main.context_length or 32768
    for tier, prompts in (
        (main, (*MAIN_PROMPTS, main_window - 1000)),
        (quick, (HAIKU_PROMPT, (quick.context_length or 32768) - 1000)),
    ):
        for prompt in prompts:
            why = refusal(mac, tier, prompt, tmp_path)
            assert why is None, f"{ram_gb} GB, {tier.name}, {prompt}-token prompt: {why}"


# The 16 GB config's shape, scaled: bytes by MEMORY_SCALE, tokens by TOKEN_SCALE.
MEMORY_SCALE = 1 / 100
TOKEN_SCALE = 1 / 32
# Tiny models with the scaled weights and KV bytes per token of the two tiers
# (2 layers, float32): the main tier ~44 MB and 18 KB/token, the quick one
# ~9 MB and 9 KB/token.
TINY_MAIN = {"hidden_size": 176, "heads": 8, "kv_heads": 8, "head_dim": 144}
TINY_QUICK = {"hidden_size": 40, "heads": 4, "kv_heads": 4, "head_dim": 144}
SHARE_TOLERANCE = 0.15
SYSTEM = (
    "You are an interactive coding agent. Use the tools to read and edit files, run the "
    "tests, and keep your answers short. "
)


def sixteen_gb() -> dict[str, Any]:
    return next(c for c in mac_configs() if c.ram_gb == 16).data


@dataclass(frozen=True)
class Tiers:
    main: Path
    quick: Path
    config: dict[str, Any]  # the daemon's config, before its budget is set
    budget_above_baseline: int  # bytes


@pytest.fixture(scope="module")
def tiers(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tiers:
    from tests.models import build_tiny_model

    docs = sixteen_gb()
    context = int(docs["models"]["coder"]["context_length"] * TOKEN_SCALE)
    root = tmp_path_factory.mktemp("tiers")
    main = build_tiny_model(root / "coder", smollm_dir, context=context, **TINY_MAIN)
    quick = build_tiny_model(root / "quick", smollm_dir, context=context, seed=1, **TINY_QUICK)
    memory, engine = docs["memory"], docs["engine"]
    config = {
        "models": {
            name: {**table, "source": str(path), "context_length": context}
            for (name, table), path in zip(docs["models"].items(), (main, quick), strict=True)
        },
        "engine": {
            **engine,
            "dequantize": "never",
            "models_budget_gb": engine["models_budget_gb"] * MEMORY_SCALE,
            "prompt_cache_gb": engine["prompt_cache_gb"] * MEMORY_SCALE,
        },
        "memory": {
            "sample_interval": 0.05,
            "kernel_pressure": False,  # the machine's own pressure is not this test's
            "cache_limit_gb": memory["cache_limit_gb"] * MEMORY_SCALE,
        },
    }
    return Tiers(main, quick, config, int(memory["budget_gb"] * GB * MEMORY_SCALE))


def test_the_tiny_tiers_have_the_16_gb_configs_shares(tiers: Tiers) -> None:
    import mlx_lm

    from pensieved.memory.admission import model_shape

    docs = sixteen_gb()
    budget = docs["memory"]["budget_gb"] * GB
    tiny_budget = tiers.budget_above_baseline
    for name, path in (("coder", tiers.main), ("quick", tiers.quick)):
        real = REAL_MODELS[docs["models"][name]["source"]]
        model = mlx_lm.load(str(path))[0]
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        window = docs["models"][name]["context_length"]
        real_window_kv = real.shape.kv_bytes_per_token * window
        tiny_window_kv = model_shape(model).kv_bytes_per_token * window * TOKEN_SCALE
        for real_share, tiny_share in (
            (real.weight_bytes / budget, weights / tiny_budget),
            (real_window_kv / budget, tiny_window_kv / tiny_budget),
        ):
            assert tiny_share == pytest.approx(real_share, rel=SHARE_TOLERANCE), name


def claude_code_turn(history: list[dict[str, Any]], words: str) -> dict[str, Any]:
    """A main-tier turn as Claude Code sends it: a long system prefix, the history, 32000."""
    return {
        "model": "claude-opus-4-8",
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "temperature": 0.0,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197;"},
            # ~61% of the window, as Claude Code's 20k tokens are of 32768.
            {"type": "text", "text": SYSTEM * 22, "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [*history, {"role": "user", "content": words}],
    }


def haiku_call(words: str) -> dict[str, Any]:
    """A background call on the haiku tier (a title, a short check): short, as they are."""
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "stream": True,
        "temperature": 0.0,
        "system": "Summarize this conversation in a short title. " + SYSTEM * 2,
        "messages": [{"role": "user", "content": words}],
    }


class PeakWatcher:
    """The highest RSS of a process, sampled every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.003)

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture(scope="module")
def two_tier_daemon(tiers: Tiers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from running_daemon(tmp_path_factory.mktemp("two-tiers"), tiers.config)


def test_turn_after_turn_is_served_within_the_scaled_budget(
    two_tier_daemon: Daemon, tiers: Tiers
) -> None:
    from tests.test_memory_daemon import health, reload_with

    daemon = two_tier_daemon
    assert control.call(control_socket(daemon), "load", model="quick")["loaded"] == "quick"
    # What the daemon holds besides MLX's buffers (Python, libraries,
    # tokenizers) is its baseline; the budget is the scaled one above it.
    memory = health(daemon)["memory"]
    rss = psutil.Process(daemon.process.pid).memory_info().rss
    baseline = rss - int((memory["mlx_active_gb"] + memory["mlx_cache_gb"]) * GB)
    budget = baseline + tiers.budget_above_baseline
    reload_with(daemon, {"budget_gb": budget / GB})
    history: list[dict[str, Any]] = []
    main_turns: list[list[tuple[str, str]]] = []
    with PeakWatcher(daemon.process.pid) as watcher, daemon.http() as http:
        for turn in range(3):
            words = f"Step {turn}: fix the failing test in module {turn}."
            for body in (claude_code_turn(history, words), haiku_call(words)):
                with http.stream("POST", "/v1/messages", json=body) as response:
                    assert response.status_code == 200, (turn, response.read())
                    events = sse_events(response)
                assert [name for name, _ in events][-1] == "message_stop", (turn, body["model"])
                if body["model"] == "claude-opus-4-8":
                    main_turns.append(events)
            reply = "".join(
                json.loads(data)["delta"].get("text", "")
                for name, data in main_turns[-1]
                if name == "content_block_delta"
            )
            history += [
                {"role": "user", "content": words},
                {"role": "assistant", "content": reply[:60] or "Done."},
            ]
    assert watcher.peak <= budget, (
        f"peak RSS {(watcher.peak - baseline) / 2**20:.1f} MB above the baseline, over the "
        f"scaled budget of {tiers.budget_above_baseline / 2**20:.1f} MB"
    )
    # Later turns fitted only once caches were given back; they still read
    # their prefix from the cache: the entry they reused became their KV.
    assert "admitting a request that fits once" in daemon.log()
    for events in main_turns[1:]:
        usage = json.loads(events[0][1])["message"]["usage"]
        assert usage["cache_read_input_tokens"] > 0, usage
