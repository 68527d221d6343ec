"""Quantized KV caches for mlx-lm's batch: a request's on its way in, and the batch's own.

mlx-lm 0.32's `BatchKVCache` holds a batch's keys and values at full
precision and `QuantizedKVCache` has no `merge`, so a model with `kv_bits`
(engine/kv_quant.py) gets these: `BatchQuantizedKVCache` mirrors
`BatchKVCache`'s layout (left padding, `offset` per row, `_idx` the filled
length) with packed keys and values, and `JoiningCache` is what the batch's
`merge` takes them from. They extend mlx-lm's private base class through
engine/mlx_internals.py. MLX is imported at the top: kv_quant.py imports
this module only on the engine thread, when a quantized model needs it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import QuantizedKVCache, dynamic_roll

from pensieved.engine import mlx_internals
from pensieved.engine.kv_quant import plain_layer, quantize_layer

_BaseCache = mlx_internals.base_cache_class()


def _cut(parts: Any, end: int) -> Any:
    return tuple(x[..., :end, :] for x in parts)


class JoiningCache(QuantizedKVCache):  # type: ignore[misc]
    """A request's quantized cache on its way into the batch."""

    @classmethod
    def of(cls, layer: Any) -> Any:
        joining = cls(layer.group_size, layer.bits)
        joining.offset = layer.offset
        if layer.keys is not None and layer.offset:
            joining.keys = _cut(layer.keys, layer.offset)
            joining.values = _cut(layer.values, layer.offset)
        return joining

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        first = caches[0]
        return BatchQuantizedKVCache.merge(caches, first.group_size, first.bits)


class BatchQuantizedKVCache(_BaseCache):  # type: ignore[misc,valid-type]
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

    def quantize_layer(self, x: Any) -> Any:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update_and_fetch(self, keys: Any, values: Any) -> Any:
        qk, qv = self.quantize_layer(keys), self.quantize_layer(values)
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
        return _cut(self.keys, self._idx), _cut(self.values, self._idx)

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
                    tuple(x[..., shift:, :] for x in parts) for parts in (self.keys, self.values)
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
            c
            if getattr(c, "bits", None) == bits
            else quantize_layer(plain_layer(c), bits, group_size)
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
            return tuple(mx.zeros((batch, x.shape[1], longest, x.shape[3]), x.dtype) for x in parts)

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
