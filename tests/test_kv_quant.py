"""Prompt-cache entries kept quantized (`kv_bits`): their real size, their answers, their files."""

from __future__ import annotations

import random
import secrets
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
from mlx_lm.utils import load

from pensieved.config import ConfigError, ModelConfig, parse_config
from pensieved.engine.prompt_cache import PromptCache
from pensieved.models.facts import stored_bytes_per_token
from pensieved.paths import default_paths
from tests.daemon import daemon_running
from tests.models import build_tiny_model

GREEDY = {"temperature": 0.0}
FULL = ModelConfig("m", "/m")
EIGHT = ModelConfig("m", "/m", kv_bits=8)
FOUR = ModelConfig("m", "/m", kv_bits=4, kv_group_size=32)
# The tiny model's attention, shaped like a real model's heads (64 values
# each): the group sizes must divide the head size.
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64


@pytest.fixture(scope="module")
def model_dir(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny64",
        smollm_dir,
        hidden_size=128,
        heads=2,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
    )


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    model = load(str(model_dir))[0]
    mx.eval(model.parameters())
    return model


def prompt(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 49152) for _ in range(length)]


def prefilled(model: Any, tokens: list[int]) -> list[Any]:
    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def entry(cache: PromptCache, config: ModelConfig, tokens: list[int]) -> list[Any]:
    return cache.stored(config, tokens)


def full_bytes(length: int) -> int:
    """A full-precision (float32) entry of `length` tokens: keys and values of every layer."""
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * 4 * length


def array_bytes(layers: list[Any]) -> int:
    """What the entry's arrays really hold: packed values, scales and biases."""
    arrays = tree_flatten([c.state for c in layers])
    return sum(int(a.nbytes) for _, a in arrays if isinstance(a, mx.array))


def test_quantized_entries_are_counted_at_their_packed_size(model: Any) -> None:
    tokens = prompt(300)
    for config in (EIGHT, FOUR):
        cache = PromptCache(1 << 30)
        cache.store(config, tokens, prefilled(model, tokens))
        layers = entry(cache, config, tokens)
        assert all(type(c) is QuantizedKVCache for c in layers)
        assert all((c.bits, c.group_size) == (config.kv_bits, config.kv_group_size) for c in layers)
        assert cache.nbytes == array_bytes(layers)
        assert config.kv_bits is not None
        expected = stored_bytes_per_token(
            KV_HEADS, HEAD_DIM, LAYERS, 4, config.kv_bits, config.kv_group_size
        )
        assert cache.nbytes == expected * len(tokens)
    # float32 keys and values take 4 bytes each; 8 bits in groups of 64, 1 + 2 * 4 / 64
    # = 1.125 (9/32 of that); 4 bits in groups of 32, 0.5 + 2 * 4 / 32 = 0.75 (3/16).
    assert stored_bytes_per_token(KV_HEADS, HEAD_DIM, LAYERS, 4, 8, 64) * 32 == full_bytes(1) * 9
    assert stored_bytes_per_token(KV_HEADS, HEAD_DIM, LAYERS, 4, 4, 32) * 16 == full_bytes(1) * 3


def test_the_budget_holds_correspondingly_more_quantized_entries(model: Any) -> None:
    length = 200
    full_size = full_bytes(length)
    budget = 2 * full_size + full_size // 2
    kept = {}
    for config in (FULL, EIGHT):
        cache = PromptCache(budget)
        for seed in range(12):
            tokens = prompt(length, seed)
            cache.store(config, tokens, prefilled(model, tokens))
            assert cache.nbytes <= budget
        size = array_bytes(entry(cache, config, tokens))
        assert len(cache) == budget // size  # evicted down to what the budget holds
        kept[config.kv_bits] = len(cache)
    assert kept == {None: 2, 8: 8}


def greedy(model: Any, cache: PromptCache, config: ModelConfig, tokens: list[int]) -> list[int]:
    """Decode 32 greedy tokens after `tokens`, from what the prompt cache holds of them."""
    hit, cached = cache.fetch(config, tokens)
    assert hit is not None and cached == len(tokens) - 1
    # Joining the batch as the model keeps its live sequences.
    assert all(getattr(c, "bits", None) == config.kv_bits for c in hit)
    generator = BatchGenerator(model)
    generator.insert([tokens[cached:]], max_tokens=[32], caches=[hit], all_tokens=[tokens[:cached]])
    out: list[int] = []
    while len(out) < 32:
        out += [r.token for r in generator.next()[1]]  # type: ignore[no-untyped-call]
    generator.close()
    return out


def test_a_request_served_from_a_quantized_entry_answers_like_a_full_one(model: Any) -> None:
    tokens = prompt(400)
    answers = {}
    for config in (FULL, EIGHT, FOUR):
        cache = PromptCache(1 << 30)
        cache.store(config, tokens, prefilled(model, tokens))
        answers[config.kv_bits] = greedy(model, cache, config, [*tokens, 7])
    same = {
        bits: sum(a == b for a, b in zip(out, answers[None], strict=True))
        for bits, out in answers.items()
    }
    assert same[8] >= 30, same
    assert same[4] >= 24, same


def test_the_daemon_serves_turns_from_quantized_entries(model_dir: Path, tmp_path: Path) -> None:
    config = {"models": {"q": {"source": str(model_dir), "kv_bits": 8}}}
    with daemon_running(tmp_path / "home", config) as daemon:
        client = daemon.client()
        turn = [{"role": "user", "content": " ".join(secrets.token_hex(3) for _ in range(150))}]
        first = client.messages.create(model="q", max_tokens=8, messages=turn, extra_body=GREEDY)
        with daemon.http() as http:
            held = http.get("/health").json()["prompt_cache"]["bytes"]
        again = client.messages.create(model="q", max_tokens=8, messages=turn, extra_body=GREEDY)
    assert again.usage.cache_read_input_tokens == first.usage.input_tokens - 1
    assert again.content == first.content
    # One entry: the prompt and the reply, at 9/32 of float32's 4 bytes a value.
    per_token = stored_bytes_per_token(KV_HEADS, HEAD_DIM, LAYERS, 4, 8, 64)
    tokens = first.usage.input_tokens + first.usage.output_tokens
    assert (tokens - 1) * per_token <= held <= tokens * per_token


def test_the_batch_cannot_merge_a_quantized_cache(model: Any) -> None:
    """Why entries join the batch as `JoiningCache`: mlx-lm's batch merges plain KV caches only."""
    tokens = prompt(50)
    quantized = [c.to_quantized(64, 8) for c in prefilled(model, tokens)]
    generator = BatchGenerator(model)
    generator.insert([[7]], max_tokens=[1], caches=[quantized], all_tokens=[tokens])
    with pytest.raises(ValueError, match="does not yet support batching"):
        generator.next()  # type: ignore[no-untyped-call]
    generator.close()


def test_quantized_entries_persist_and_load_back(model: Any, tmp_path: Path) -> None:
    tokens = prompt(120)
    cache = PromptCache(1 << 30)
    cache.store(EIGHT, tokens, prefilled(model, tokens))
    identity = {"model_path": "/m"}
    path = tmp_path / "m.safetensors"
    assert cache.save(EIGHT, path, identity)
    before = cache.fetch(EIGHT, [*tokens, 7])[0]
    assert before is not None

    again = PromptCache(1 << 30)
    assert again.load(EIGHT, path, identity) == len(tokens)
    assert again.nbytes == cache.nbytes
    assert all(type(c) is QuantizedKVCache for c in entry(again, EIGHT, tokens))
    after, cached = again.fetch(EIGHT, [*tokens, 7])
    assert after is not None and cached == len(tokens)
    for old, new in zip(before, after, strict=True):
        pairs = zip(tree_flatten(old.state), tree_flatten(new.state), strict=True)
        assert all(mx.array_equal(a, b) for (_, a), (_, b) in pairs)

    # Loaded into a model set otherwise, the entry follows the model's setting.
    for config, kind in ((FULL, KVCache), (FOUR, QuantizedKVCache)):
        other = PromptCache(1 << 30)
        assert other.load(config, path, identity) == len(tokens)
        layers = entry(other, config, tokens)
        assert all(type(c) is kind for c in layers)
        assert other.nbytes == array_bytes(layers)


def test_kv_settings_are_validated() -> None:
    def model_table(**keys: Any) -> ModelConfig:
        table = {"models": {"m": {"source": "/m", **keys}}}
        return parse_config(table, default_paths()).models[0]

    assert (model_table().kv_bits, model_table().kv_group_size) == (None, 64)
    assert model_table(kv_bits=8).kv_bits == 8
    assert model_table(kv_bits=4, kv_group_size=128).kv_group_size == 128
    for bad in ({"kv_bits": 6}, {"kv_bits": "8"}, {"kv_bits": True}, {"kv_bits": 16}):
        with pytest.raises(ConfigError, match=r"models\.m\.kv_bits"):
            model_table(**bad)
    for bad in ({"kv_group_size": 48}, {"kv_group_size": 64.0}, {"kv_group_size": 0}):
        with pytest.raises(ConfigError, match=r"models\.m\.kv_group_size"):
            model_table(**bad)


def decode_batch(model: Any, config: ModelConfig, prompts: list[list[int]]) -> tuple[Any, list]:
    """Greedy replies to `prompts`, joining one batch one step apart, as the runner makes them."""
    from pensieved.engine.kv_quant import live_caches

    generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    replies: dict[int, list[int]] = {}
    kinds = set()
    for prompt_tokens in prompts:
        caches = live_caches(config, model)
        (uid,) = generator.insert([prompt_tokens], max_tokens=[24], caches=[caches])
        replies[uid] = []
        for response in generator.next()[1]:  # type: ignore[no-untyped-call]
            replies[response.uid].append(response.token)
    while any(len(r) < 24 for r in replies.values()):
        kinds |= {type(c).__name__ for c in generator._generation_batch.prompt_cache}
        for response in generator.next()[1]:  # type: ignore[no-untyped-call]
            replies[response.uid].append(response.token)
    generator.close()
    return kinds, list(replies.values())


def test_live_sequences_are_quantized_in_the_batch(model: Any) -> None:
    """Four sequences of different lengths join, decode and leave a quantized batch."""
    prompts = [prompt(n, seed) for seed, n in enumerate((40, 300, 7, 130))]
    full_kinds, full = decode_batch(model, FULL, prompts)
    kinds, quantized = decode_batch(model, EIGHT, prompts)
    assert full_kinds == {"BatchKVCache"}
    assert kinds == {"BatchQuantizedKVCache"}
    rows = zip(full, quantized, strict=True)
    same = sum(a == b for x, y in rows for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * 4 * 24, (same, full, quantized)


def test_a_quantized_batch_holds_about_a_quarter_of_the_bytes(model: Any) -> None:
    from pensieved.engine.kv_quant import live_caches

    sizes = {}
    for config in (FULL, EIGHT):
        generator = BatchGenerator(model)
        generator.insert([prompt(500)], max_tokens=[4], caches=[live_caches(config, model)])
        generator.next()  # type: ignore[no-untyped-call]
        sizes[config.kv_bits] = generator.prompt_cache_nbytes
        generator.close()
    # 8 bits in groups of 64 with float32 scales and biases: 9/32 of float32.
    assert sizes[8] * 32 == sizes[None] * 9, sizes


def test_admission_counts_a_quantized_model_at_its_packed_size(model: Any) -> None:
    from pensieved.memory.admission import model_shape

    full = model_shape(model)
    eight = model_shape(model, (8, 64))
    assert full.kv_bytes_per_token == full_bytes(1)
    assert eight.kv_bytes_per_token == stored_bytes_per_token(KV_HEADS, HEAD_DIM, LAYERS, 4, 8, 64)
    # A group size the heads cannot hold: the model stays (and is counted) at full precision.
    assert model_shape(model, (8, 128)).kv_bytes_per_token == full.kv_bytes_per_token
