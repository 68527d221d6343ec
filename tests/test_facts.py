"""models/facts.py: one reading of a model's config for the daemon and pensievectl."""

from __future__ import annotations

from pensieved.models.facts import (
    DEFAULT_CONTEXT,
    MAX_CONTEXT,
    context_window,
    facts_of,
    kv_bytes_per_token,
    stored_bytes_per_token,
)

LLAMA = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
}


def test_a_llama_config_gives_its_kv_size_and_window() -> None:
    facts = facts_of(LLAMA)
    assert (facts.layers, facts.kv_heads, facts.head_dim) == (30, 3, 64) and facts.exact
    assert kv_bytes_per_token(facts, 2) == 30 * 3 * 64 * 2 * 2  # keys and values, float16
    assert facts.declared_context == 8192 == context_window(facts.declared_context, 2048)


def test_other_families_key_names_and_wrappers_are_read() -> None:
    gpt2 = facts_of({"n_layer": 12, "n_head": 12, "n_embd": 768})
    assert (gpt2.layers, gpt2.kv_heads, gpt2.head_dim) == (12, 12, 64)
    wrapped = facts_of({"model_type": "llava", "text_config": LLAMA})
    assert wrapped == facts_of(LLAMA)


def test_a_quantized_kv_cache_is_counted_packed() -> None:
    facts = facts_of(LLAMA)
    assert kv_bytes_per_token(facts, 2, (8, 64)) == stored_bytes_per_token(3, 64, 30, 2, 8, 64)
    assert kv_bytes_per_token(facts, 2, (8, 128)) == kv_bytes_per_token(facts, 2)  # 128 ∤ 64


def test_a_silent_or_placeholder_config_says_so() -> None:
    silent = facts_of({"hidden_size": 64})
    assert not silent.exact and kv_bytes_per_token(silent, 2) is None
    placeholder = facts_of({**LLAMA, "max_position_embeddings": MAX_CONTEXT * 10})
    assert placeholder.declared_context is None
    assert context_window(None, 4096 * 8) == 4096 * 8  # the tokenizer's limit
    assert context_window(None, int(1e30)) == DEFAULT_CONTEXT
