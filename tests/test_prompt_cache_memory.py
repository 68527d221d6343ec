"""The prompt cache's byte budget bounds the memory MLX really holds (issue 17)."""

from __future__ import annotations

import random
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import load

from pensieved.engine.prompt_cache import PromptCache

BUDGET = 2 * 1024 * 1024
# The batch's own buffers (a few sequences, in steps of 256 tokens) and
# MLX's small scratch arrays: what is live beside the cache.
SLACK = 2 * 1024 * 1024


def serve(
    generator: BatchGenerator, cache: PromptCache, prompts: list[list[int]], reply: int
) -> None:
    """Run `prompts` as one batch, storing each finished sequence like the runner does."""
    for prompt in prompts:
        hit, cached = cache.fetch("tiny", prompt)
        generator.insert(
            [prompt[cached:]],
            max_tokens=[reply],
            caches=[hit],  # type: ignore[list-item]
            all_tokens=[prompt[:cached]],
        )
    finished = 0
    while finished < len(prompts):
        for response in generator.next()[1]:  # type: ignore[no-untyped-call]
            if response.finish_reason is not None:
                finished += 1
                if response.prompt_cache is not None:
                    cache.store("tiny", list(response.all_tokens), response.prompt_cache)


def test_active_memory_stays_within_weights_and_budget(tiny_dir: Path) -> None:
    model = load(str(tiny_dir))[0]
    mx.eval(model.parameters())
    generator = BatchGenerator(model, stop_tokens=[[0]], completion_batch_size=4)
    cache = PromptCache(BUDGET)
    rng = random.Random(0)
    mx.clear_cache()
    weights = mx.get_active_memory()
    peak = 0
    for _ in range(25):  # 100 short requests, four at a time: the cache fills past its budget
        prompts = [[rng.randrange(1, 1000) for _ in range(13)] for _ in range(4)]
        serve(generator, cache, prompts, reply=32)
        peak = max(peak, mx.get_active_memory() - weights)
    assert cache.nbytes > BUDGET * 3 // 4, "the cache must fill for the check to mean anything"
    assert peak <= BUDGET + SLACK, f"MLX holds {peak / 1e6:.1f} MB beyond the weights"


def test_requests_that_differ_only_in_their_reply_keep_one_entry(tiny_dir: Path) -> None:
    model = load(str(tiny_dir))[0]
    generator = BatchGenerator(model, stop_tokens=[[0]], completion_batch_size=4)
    cache = PromptCache(BUDGET)
    prompt = [random.Random(1).randrange(1, 1000) for _ in range(13)]
    for _ in range(8):
        serve(generator, cache, [prompt] * 4, reply=64)
    assert len(cache) == 1
    hit, cached = cache.fetch("tiny", [*prompt, 5])
    assert hit is not None and cached == len(prompt)
