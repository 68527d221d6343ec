"""What a model's config says about its size, read by one set of rules.

The daemon's memory admission, its KV quantization and `pensievectl doctor`
all need a model's KV bytes per token, and the daemon and `pensievectl env`
its context window; each used to compute them its own way, and the copies
disagreed (doctor ignored `kv_bits`, env the tokenizer's limit). Pure: a
config as a mapping in (an mlx-lm model's `args`, or a `config.json`),
numbers out, no MLX, so pensievectl may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Past this a declared context is a placeholder (some tokenizers say 1e30).
MAX_CONTEXT = 10_000_000
# A model that declares no context, and whose tokenizer says nothing either.
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ModelFacts:
    """A model's attention shape and declared window; None where its config is silent."""

    layers: int | None
    attention_heads: int | None
    kv_heads: int | None  # every attention head keeps its own, when the config is silent
    head_dim: int | None
    hidden_size: int | None
    intermediate_size: int | None
    vocab_size: int | None
    declared_context: int | None

    @property
    def exact(self) -> bool:
        """Whether the KV size is known (layers, KV heads and head size all declared)."""
        return None not in (self.layers, self.kv_heads, self.head_dim)


def _first(spec: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = spec.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def facts_of(spec: Mapping[str, Any]) -> ModelFacts:
    """Read `spec` (config.json, or an mlx-lm model's args), under each family's key names."""
    if isinstance(spec.get("text_config"), dict):  # multimodal wrappers
        spec = {**spec["text_config"], **spec}
    hidden = _first(spec, "hidden_size", "n_embd", "d_model", "dim")
    heads = _first(spec, "num_attention_heads", "n_head", "n_heads")
    declared = _first(spec, "max_position_embeddings")
    return ModelFacts(
        layers=_first(spec, "num_hidden_layers", "n_layer", "num_layers", "n_layers"),
        attention_heads=heads,
        kv_heads=_first(spec, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or heads,
        head_dim=_first(spec, "head_dim") or (hidden // heads if hidden and heads else None),
        hidden_size=hidden,
        intermediate_size=_first(spec, "intermediate_size", "ffn_dim", "n_inner"),
        vocab_size=_first(spec, "vocab_size"),
        declared_context=declared if declared is not None and declared < MAX_CONTEXT else None,
    )


def kv_bytes_per_token(
    facts: ModelFacts, dtype_bytes: int, kv: tuple[int | None, int] = (None, 64)
) -> int | None:
    """Keys and values of every layer for one token; None where the config is silent.

    `kv` = (bits, group size) of a model whose KV cache is quantized
    (`kv_bits`): each head's `head_dim` values packed at `bits`, plus a scale
    and a bias per group in the activations' dtype. A head size the group
    size does not divide stays at full precision.
    """
    layers, kv_heads, head_dim = facts.layers, facts.kv_heads, facts.head_dim
    if not (layers and kv_heads and head_dim):
        return None
    bits, group_size = kv
    if bits and head_dim % group_size == 0:
        return stored_bytes_per_token(kv_heads, head_dim, layers, dtype_bytes, bits, group_size)
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def stored_bytes_per_token(
    kv_heads: int, head_dim: int, layers: int, dtype_bytes: int, bits: int, group_size: int
) -> int:
    """Bytes one token takes quantized: keys and values of every layer.

    Per head: `head_dim` values packed at `bits` each (in 32-bit words), and
    one scale and one bias in the activations' dtype per group.
    """
    packed = head_dim * bits // 8
    scales_and_biases = 2 * (head_dim // group_size) * dtype_bytes
    return 2 * layers * kv_heads * (packed + scales_and_biases)


def context_window(declared: int | None, tokenizer_limit: Any = None) -> int:
    """The window a model serves: its declared one, else its tokenizer's, else 4096."""
    for value in (declared, tokenizer_limit):
        if isinstance(value, int) and 0 < value < MAX_CONTEXT:
            return value
    return DEFAULT_CONTEXT
