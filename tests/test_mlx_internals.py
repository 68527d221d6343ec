"""Canaries: each private mlx-lm name engine/mlx_internals.py reaches, checked on real objects.

A real `BatchGenerator` on the tiny model, stopped mid-decode, and a real
`LRUPromptCache`. When an mlx-lm release moves one of the names, its canary
fails with a message that names it and where to mend it, instead of a
request failing deep inside the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pensieved.config import EngineConfig, ModelConfig
from pensieved.engine import mlx_internals as internals
from pensieved.engine.loading import LoadedModel, load_weights, new_generator
from pensieved.engine.prompt_cache import MAIN, SIDE, _Order

MEND = "mlx-lm moved a private name Pensieve uses: mend engine/mlx_internals.py"


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path) -> LoadedModel:
    return load_weights(ModelConfig("tiny", str(tiny_dir)), tiny_dir, EngineConfig())


@pytest.fixture
def decoding(loaded: LoadedModel) -> Iterator[Any]:
    """A generator whose one sequence has been prefilled and is decoding."""
    generator = new_generator(loaded, EngineConfig())
    generator.insert([[1, 2, 3, 4, 5]], max_tokens=[50])
    for _ in range(8):
        generator.next()
        if len(internals.generation_batch(generator)) == 1 and internals.only_decoding(generator):
            break
    yield generator
    generator.close()


def canary(name: str, check: Callable[[], object]) -> None:
    try:
        assert check(), f"{name}: {MEND}"
    except (AttributeError, KeyError, TypeError, IndexError, ImportError) as exc:
        pytest.fail(f"{name}: {type(exc).__name__}: {exc}; {MEND}")


def test_the_batch_generators_own_names(decoding: Any) -> None:
    batch = internals.generation_batch(decoding)
    canary("BatchGenerator._generation_batch", lambda: len(batch) == 1 and batch.uids)
    canary(
        "BatchGenerator._prompt_batch/_unprocessed_sequences",
        lambda: internals.only_decoding(decoding),
    )
    with decoding.stats() as stats:
        internals.count_step(decoding, 0.5, 3)
    canary("BatchGenerator._counters", lambda: stats.generation_tokens == 3)
    internals.disown_wired_limit(decoding)
    canary(
        "BatchGenerator._old_wired_limit", lambda: internals.disown_wired_limit(decoding) is None
    )


def test_a_generation_batchs_row_names(decoding: Any) -> None:
    batch = internals.generation_batch(decoding)
    canary("GenerationBatch._next_tokens", lambda: internals.pending_token(batch) is not None)
    internals.set_pending(batch, 7, None)
    canary(
        "GenerationBatch._next_tokens (set)",
        lambda: int(internals.pending_token(batch).item()) == 7,
    )
    canary("GenerationBatch._next_logprobs", lambda: batch._next_logprobs == [None])
    written = internals.tokens_written(batch)
    canary("GenerationBatch._num_tokens", lambda: internals.count_token(batch) == written + 1)
    canary("GenerationBatch._matchers", lambda: internals.stop_matcher(batch).advance(7) is False)
    context = internals.token_context(batch)
    canary("GenerationBatch._token_context", lambda: callable(context.update_and_fetch))
    # The public names the speculator uses beside them.
    for name in ("uids", "tokens", "max_tokens", "prompt_cache", "logits_processors", "Response"):
        canary(f"GenerationBatch.{name}", lambda name=name: hasattr(batch, name))


def test_the_prompt_caches_names(loaded: LoadedModel) -> None:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    canary("models.cache._BaseCache", lambda: issubclass(KVCache, internals.base_cache_class()))
    order = _Order()
    lru = internals.prompt_cache_lru(1 << 30, order, (SIDE, MAIN))
    cache = make_prompt_cache(loaded.model)
    tokens = [1, 2, 3]
    lru.insert_cache("tiny", tokens, cache, cache_type=SIDE)
    canary("LRUPromptCache._lru", lambda: order.entries(SIDE) == [("tiny", tokens)])
    canary(
        "LRUPromptCache._trie (search)", lambda: internals.trie_search(lru, "tiny", tokens).exact
    )
    entry = internals.trie_entry(lru, "tiny", tokens)
    canary("LRUPromptCache._trie (get)", lambda: entry.cache_type == SIDE)
    canary(
        "LRUPromptCache._n_bytes_by_type",
        lambda: internals.bytes_of_kind(lru, SIDE) == entry.nbytes == lru.nbytes,
    )
    internals.forget_entry(lru, "tiny", tokens)
    canary("LRUPromptCache._n_bytes", lambda: lru.nbytes == 0 and len(lru) == 0)
    canary(
        "LRUPromptCache._trie (pop)", lambda: not internals.trie_search(lru, "tiny", tokens).exact
    )


def test_the_detokenizer_keeps_a_first_space(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    (first,) = tokenizer.encode(" def", add_special_tokens=False)
    plain = tokenizer.detokenizer
    plain.reset()
    plain.add_token(first)
    plain.finalize()
    kept = internals.keep_first_space(tokenizer.detokenizer)
    kept.reset()
    kept.add_token(first)
    kept.finalize()
    canary(
        "BPEStreamingDetokenizer._maybe_trim_space",
        lambda: (plain.text, kept.text) == ("def", " def"),
    )
