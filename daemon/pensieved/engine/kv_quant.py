"""A model's KV cache kept quantized: 8 or 4 bits per key and value, per model.

A model with `kv_bits` set (`[models.<name>]`) keeps its KV cache as groups
of `kv_group_size` values, each `kv_bits`-bit integers plus one scale and
one bias in the activations' dtype:

- live sequences, in `BatchQuantizedKVCache` (below): mlx-lm's batch has no
  quantized cache of its own (`QuantizedKVCache` has no `merge`);
- prefix-cache entries, as mlx-lm `QuantizedKVCache` layers, so the byte
  budget, which counts each entry's real arrays, holds more of them. A
  fetched entry joins the batch as it is stored (`for_batch_of`).
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
    hidden, heads = getattr(args, "hidden_size", 0), getattr(args, "num_attention_heads", 0)
    head_dim = getattr(args, "head_dim", None) or (hidden // heads if heads else 0)
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
            layer = _quantize(_plain(layer), *setting)
        if getattr(layer, "bits", None) is None:
            return for_batch(cache)  # a layer this setting cannot hold: all at full precision
        joined.append(joining.of(layer))
    return joined


def _plain(layer: Any) -> Any:
    from mlx_lm.models.cache import QuantizedKVCache

    return _dequantize(layer) if isinstance(layer, QuantizedKVCache) else layer


_TYPES: dict[str, Any] = {}


def _joining_type() -> Any:
    """The two cache classes, made on first use (mlx-lm is imported on the engine thread)."""
    if "joining" not in _TYPES:
        _TYPES["joining"], _TYPES["batch"] = _make_types()
    return _TYPES["joining"]


def _make_types() -> tuple[Any, Any]:
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.models.base import create_causal_mask
    from mlx_lm.models.cache import QuantizedKVCache, _BaseCache, dynamic_roll

    def cut(parts: Any, end: int) -> Any:
        return tuple(x[..., :end, :] for x in parts)

    class JoiningCache(QuantizedKVCache):  # type: ignore[misc]
        """A request's quantized cache on its way into the batch."""

        @classmethod
        def of(cls, layer: Any) -> Any:
            joining = cls(layer.group_size, layer.bits)
            joining.offset = layer.offset
            if layer.keys is not None and layer.offset:
                joining.keys = cut(layer.keys, layer.offset)
                joining.values = cut(layer.values, layer.offset)
            return joining

        @classmethod
        def merge(cls, caches: list[Any]) -> Any:
            first = caches[0]
            return BatchQuantizedKVCache.merge(caches, first.group_size, first.bits)

    class BatchQuantizedKVCache(_BaseCache):  # type: ignore[misc]
        """mlx-lm's `BatchKVCache`, with keys and values quantized."""

        step = 256

        def __init__(self, left_padding: list[int], group_size: int, bits: int) -> None:
            self.keys: Any = None
            self.values: Any = None
            self.left_padding: Any = mx.array(left_padding)
            self.offset: Any = mx.array([-p for p in left_padding])
            self._idx = 0
            self._right_padding: Any = None
            self.group_size = group_size
            self.bits = bits

        def _quantize(self, x: Any) -> Any:
            return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

        def update_and_fetch(self, keys: Any, values: Any) -> Any:
            qk, qv = self._quantize(keys), self._quantize(values)
            prev, n = self._idx, keys.shape[2]
            if self.keys is None or prev + n > self.keys[0].shape[2]:
                steps = (self.step + n - 1) // self.step * self.step

                def grow(parts: Any, new: Any) -> Any:
                    fresh = tuple(mx.zeros((*x.shape[:2], steps, x.shape[3]), x.dtype) for x in new)
                    if parts is None:
                        return fresh
                    return tuple(
                        mx.concatenate([x[..., :prev, :], f], axis=2)
                        for x, f in zip(parts, fresh, strict=True)
                    )

                self.keys, self.values = grow(self.keys, qk), grow(self.values, qv)
            self.offset = self.offset + n
            self._idx += n
            for parts, new in ((self.keys, qk), (self.values, qv)):
                for x, y in zip(parts, new, strict=True):
                    x[..., prev : self._idx, :] = y
            return self.keys_and_values()

        def keys_and_values(self) -> Any:
            return cut(self.keys, self._idx), cut(self.values, self._idx)

        def prepare(
            self, *, left_padding: Any = None, lengths: Any = None, right_padding: Any = None
        ) -> None:
            if left_padding is not None:
                if self.keys is not None:
                    raise ValueError("left padding goes only into an empty cache")
                padding = mx.array(left_padding)
                self.left_padding += padding
                self.offset = self.offset - padding
            if right_padding is not None and max(right_padding) > 0:
                self._right_padding = mx.array(right_padding)

        def finalize(self) -> None:
            if self._right_padding is None:
                return
            padding = self._right_padding
            self.keys, self.values = (
                tree_map(lambda x: dynamic_roll(x, padding[:, None], axis=2), parts)  # type: ignore[no-untyped-call]
                for parts in (self.keys, self.values)
            )
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

        @property
        def state(self) -> Any:
            return self.keys, self.values, self.offset, self.left_padding

        @state.setter
        def state(self, v: Any) -> None:
            self.keys, self.values, self.offset, self.left_padding = v

        def is_trimmable(self) -> bool:
            return True

        def trim(self, n: int) -> int:
            n = min(self._idx, n)
            self._idx -= n
            self.offset = self.offset - n
            return n

        def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> Any:
            return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

        def filter(self, batch_indices: Any) -> None:
            if self.keys is not None:
                self.keys, self.values = (
                    tuple(x[batch_indices] for x in parts) for parts in (self.keys, self.values)
                )
            self.offset = self.offset[batch_indices]
            self.left_padding = self.left_padding[batch_indices]
            shift = min(self.left_padding.tolist())
            if shift > 0:
                if self.keys is not None:
                    self.keys, self.values = (
                        tuple(x[..., shift:, :] for x in parts)
                        for parts in (self.keys, self.values)
                    )
                self._idx -= shift
                self.left_padding -= shift

        def extend(self, other: Any) -> None:
            if self.keys is None and other.keys is None:
                self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
                self.offset = mx.concatenate([self.offset, other.offset])
                return
            idx = max(self._idx, other._idx)
            size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
            template = self if self.keys is not None else other

            def pad(c: Any) -> Any:
                rows = c.offset.shape[0]
                left = idx - c._idx
                padded = []
                for parts, like in ((c.keys, template.keys), (c.values, template.values)):
                    if parts is None:
                        parts = tuple(
                            mx.zeros((rows, x.shape[1], 0, x.shape[3]), x.dtype) for x in like
                        )
                    out = []
                    for x in parts:
                        right = size - x.shape[2] - left
                        if right < 0:
                            x, right = x[..., :right, :], 0
                        if left or right:
                            x = mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)])
                        out.append(x)
                    padded.append(tuple(out))
                return padded[0], padded[1], c.offset, c.left_padding + left

            (k1, v1, o1, p1), (k2, v2, o2, p2) = pad(self), pad(other)
            self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2, strict=True))
            self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2, strict=True))
            self.offset = mx.concatenate([o1, o2])
            self.left_padding = mx.concatenate([p1, p2])
            self._idx = idx

        def extract(self, idx: int) -> Any:
            mx.eval(self.left_padding)
            start = self.left_padding.tolist()[idx]
            layer: Any = QuantizedKVCache(self.group_size, self.bits)
            layer.keys, layer.values = (
                tuple(mx.contiguous(x[idx : idx + 1, :, start : self._idx]) for x in parts)
                for parts in (self.keys, self.values)
            )
            layer.offset = self._idx - start
            return layer

        @classmethod
        def merge(cls, caches: list[Any], group_size: int, bits: int) -> Any:
            caches = [
                c if getattr(c, "bits", None) == bits else _quantize(_plain(c), bits, group_size)
                for c in caches
            ]
            lengths = [c.offset if c.keys is not None else 0 for c in caches]
            longest = max(lengths)
            if longest == 0:
                return cls([0] * len(caches), group_size, bits)
            padding = [longest - n for n in lengths]
            like = next(c for c in caches if c.keys is not None)
            batch = len(caches)

            def empty(parts: Any) -> Any:
                return tuple(
                    mx.zeros((batch, x.shape[1], longest, x.shape[3]), x.dtype) for x in parts
                )

            keys, values = empty(like.keys), empty(like.values)
            for i, (p, c) in enumerate(zip(padding, caches, strict=True)):
                if c.keys is None:
                    continue
                for into, parts in ((keys, c.keys), (values, c.values)):
                    for x, y in zip(into, parts, strict=True):
                        x[i : i + 1, :, p : p + c.offset] = y[..., : c.offset, :]
            cache = cls(padding, group_size, bits)
            cache.keys, cache.values = keys, values
            cache.offset += longest
            cache._idx = longest
            return cache

        def size(self) -> int:
            return self._idx

        def empty(self) -> bool:
            return self.keys is None

        @property
        def nbytes(self) -> int:
            if self.keys is None:
                return 0
            return sum(int(x.nbytes) for parts in (self.keys, self.values) for x in parts)

    return JoiningCache, BatchQuantizedKVCache
