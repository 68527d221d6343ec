"""A model's KV cache kept quantized: 8 or 4 bits per key and value, per model.

A model with `kv_bits` set (`[models.<name>]`) keeps its KV cache as groups
of `kv_group_size` values, each `kv_bits`-bit integers plus one scale and
one bias in the activations' dtype:

- live sequences, in `BatchQuantizedKVCache` (below): mlx-lm's batch has no
  quantized cache of its own (`QuantizedKVCache` has no `merge`);
- prompt-cache entries, as mlx-lm `QuantizedKVCache` layers, so the byte
  budget, which counts each entry's real arrays, holds more of them. A
  fetched entry joins the batch as it is stored (`for_batch_of`).
"""

from __future__ import annotations

from typing import Any

from pensieved.config import KV_GROUP_SIZE
from pensieved.models.facts import facts_of


def model_setting(model: Any) -> tuple[int, int] | None:
    """(bits, group size) for `model` (a `ModelConfig`), or None: full precision.

    The prompt cache is keyed by the model's config; any other key (the
    tests' plain names) means full precision.
    """
    bits = getattr(model, "kv_bits", None)
    if bits is None:
        return None
    return int(bits), int(getattr(model, "kv_group_size", KV_GROUP_SIZE))


def for_storage(model: Any, cache: list[Any]) -> list[Any]:
    """`cache` as `model`'s entries are kept: its plain layers quantized per its setting.

    Keys are quantized from exactly the `offset` tokens the layer holds, so
    the result owns no part of the batch's larger buffers. Layers that are
    not plain `KVCache`s (rotating windows, state-space caches) stay as they
    are, and so does a layer whose head size the group size does not divide.
    An entry quantized otherwise (a persisted file, a changed setting) is
    brought to the model's setting.
    """
    from mlx_lm.models.cache import QuantizedKVCache

    setting = model_setting(model)
    stored = []
    for layer in cache:
        if type(layer) is QuantizedKVCache and setting != (layer.bits, layer.group_size):
            layer = _dequantize(layer)
        if setting is not None:
            layer = quantize_layer(layer, *setting)
        stored.append(layer)
    return stored


def for_batch(cache: list[Any]) -> list[Any]:
    """`cache` with its quantized layers back at full precision (the batch merges only those)."""
    from mlx_lm.models.cache import QuantizedKVCache

    return [_dequantize(c) if type(c) is QuantizedKVCache else c for c in cache]


def quantize_layer(layer: Any, bits: int, group_size: int) -> Any:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    if type(layer) is not KVCache or layer.keys is None or layer.offset == 0:
        return layer
    keys, values = layer.keys, layer.values
    assert values is not None
    if keys.shape[-1] % group_size or values.shape[-1] % group_size:
        return layer
    end = layer.offset
    quantized: Any = QuantizedKVCache(group_size=group_size, bits=bits)
    quantized.offset = end
    quantized.keys = mx.quantize(keys[..., :end, :], group_size=group_size, bits=bits)
    quantized.values = mx.quantize(values[..., :end, :], group_size=group_size, bits=bits)
    return quantized


def _dequantize(layer: Any) -> Any:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    plain: Any = KVCache()  # type: ignore[no-untyped-call]
    end = layer.offset
    if layer.keys is None or end == 0:
        return plain
    # A trimmed entry keeps its whole buffer; only `offset` tokens are real.
    keys, values = ([x[..., :end, :] for x in part] for part in (layer.keys, layer.values))
    settings = {"group_size": layer.group_size, "bits": layer.bits}
    plain.keys = mx.dequantize(*keys, **settings)
    plain.values = mx.dequantize(*values, **settings)
    plain.offset = end
    return plain


# -- live sequences -----------------------------------------------------------
#
# mlx-lm's batch keeps every sequence's keys and values in one `BatchKVCache`
# per layer. `BatchQuantizedKVCache` is the same layout with each of keys and
# values held as (packed, scales, biases), so a model with `kv_bits` keeps its
# live sequences quantized too; its `bits` attribute sends attention through
# mlx-lm's quantized attention. Requests join it through `JoiningCache`, a
# `QuantizedKVCache` whose `merge` builds the batch cache.


def live_caches(model: Any, network: Any) -> list[Any] | None:
    """Empty caches for a request of `model` (its config) that keep its batch quantized.

    None where `model` keeps full precision, or where `network` (the loaded
    mlx-lm model) has caches other than plain ones or heads the group size
    does not divide: its sequences stay at full precision.
    """
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    setting = model_setting(model)
    if setting is None:
        return None
    plain = make_prompt_cache(network)
    args = getattr(network, "args", None)
    head_dim = facts_of(dict(vars(args)) if args is not None else {}).head_dim
    if not head_dim or head_dim % setting[1] or not all(type(c) is KVCache for c in plain):
        return None
    return [_joining_type()(setting[1], setting[0]) for _ in plain]


def for_batch_of(model: Any, cache: list[Any]) -> list[Any]:
    """A fetched entry made ready to join `model`'s batch (quantized there when it is)."""
    setting = model_setting(model)
    if setting is None:
        return for_batch(cache)
    joining = _joining_type()
    joined = []
    for layer in cache:
        if getattr(layer, "bits", None) != setting[0] or layer.group_size != setting[1]:
            layer = quantize_layer(plain_layer(layer), *setting)
        if getattr(layer, "bits", None) is None:
            return for_batch(cache)  # a layer this setting cannot hold: all at full precision
        joined.append(joining.of(layer))
    return joined


def plain_layer(layer: Any) -> Any:
    from mlx_lm.models.cache import QuantizedKVCache

    return _dequantize(layer) if isinstance(layer, QuantizedKVCache) else layer


def _joining_type() -> Any:
    """The class a request's quantized cache joins the batch as (MLX imported on first use)."""
    from pensieved.engine.quantized_batch_cache import JoiningCache

    return JoiningCache
