"""Prefix-cache entries kept quantized: 8 or 4 bits per key and value, per model.

A model with `kv_bits` set (`[models.<name>]`) has its prefix-cache entries
stored as mlx-lm `QuantizedKVCache` layers: each group of `kv_group_size`
values becomes `kv_bits`-bit integers plus one scale and one bias in the
activations' dtype, so the byte budget, which counts each entry's real
arrays, holds correspondingly more of them. A fetched entry is dequantized
back to a plain `KVCache` before it joins the batch.

Only stored entries: live sequences stay at full precision. mlx-lm 0.32's
`BatchGenerator` merges each joining sequence's cache into a `BatchKVCache`,
`QuantizedKVCache` has no `merge` ("does not yet support batching with
history"), and there is no batched quantized cache; `generate_step`'s
`kv_bits` is the single-stream path, which the engine does not use.
"""

from __future__ import annotations

from typing import Any

from pensieved.config import ModelConfig


def model_setting(model: Any) -> tuple[int, int] | None:
    """(bits, group size) for `model` (a `ModelConfig`), or None: full precision.

    The prefix cache is keyed by the model's config; any other key (the
    tests' plain names) means full precision.
    """
    bits = getattr(model, "kv_bits", None)
    if bits is None:
        return None
    return int(bits), int(getattr(model, "kv_group_size", ModelConfig.kv_group_size))


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
            layer = _quantize(layer, *setting)
        stored.append(layer)
    return stored


def for_batch(cache: list[Any]) -> list[Any]:
    """`cache` with its quantized layers back at full precision (the batch merges only those)."""
    from mlx_lm.models.cache import QuantizedKVCache

    return [_dequantize(c) if type(c) is QuantizedKVCache else c for c in cache]


def stored_bytes_per_token(
    kv_heads: int, head_dim: int, layers: int, dtype_bytes: int, bits: int, group_size: int
) -> int:
    """Bytes one token takes in a quantized entry: keys and values of every layer.

    Per head: `head_dim` values packed at `bits` each (in 32-bit words), and
    one scale and one bias in the activations' dtype per group.
    """
    packed = head_dim * bits // 8
    scales_and_biases = 2 * (head_dim // group_size) * dtype_bytes
    return 2 * layers * kv_heads * (packed + scales_and_biases)


def _quantize(layer: Any, bits: int, group_size: int) -> Any:
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
