"""The decoder and caches mlx-lm's batch runs a vision model's language model with.

MLX is imported at the top: engine/vision.py imports this module on the
engine thread, when a vision model loads.

Each sequence's text positions are its cache index plus a `delta` (mRoPE:
after an image, positions continue from the image's largest one). The
caches carry each row's delta through what the batch does with them
(merge, filter, extend, extract), and `VisionDecoder` adds it to the offsets
mlx-lm keeps. A text-only sequence has a delta of 0.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache


class PositionedKVCache(KVCache):  # type: ignore[misc]
    """One sequence's cache, and how far its text positions are from its indices."""

    def __init__(self, delta: int = 0) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.delta = delta

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        return PositionedBatchKVCache.merge(caches)


class PositionedBatchKVCache(BatchKVCache):  # type: ignore[misc]
    """The batch's cache, each row's delta kept beside its offset."""

    def __init__(self, left_padding: list[int]) -> None:
        super().__init__(left_padding)
        self.delta = mx.zeros((len(left_padding),), dtype=mx.int32)

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        batch = super().merge(caches)  # type: ignore[no-untyped-call]
        batch.delta = mx.array([getattr(c, "delta", 0) for c in caches], dtype=mx.int32)
        return batch

    def filter(self, batch_indices: Any) -> None:
        super().filter(batch_indices)  # type: ignore[no-untyped-call]
        self.delta = self.delta[batch_indices]

    def extend(self, other: Any) -> None:
        super().extend(other)  # type: ignore[no-untyped-call]
        theirs = getattr(other, "delta", None)
        if theirs is None:
            theirs = mx.zeros((other.offset.shape[0],), dtype=mx.int32)
        self.delta = mx.concatenate([self.delta, theirs])

    def extract(self, idx: int) -> Any:
        plain = super().extract(idx)  # type: ignore[no-untyped-call]
        one = PositionedKVCache(int(self.delta[idx].item()))  # type: ignore[arg-type]
        one.keys, one.values, one.offset = plain.keys, plain.values, plain.offset
        return one


class VisionDecoder(nn.Module):  # type: ignore[misc,name-defined]
    """A vision model's language model as mlx-lm's batch calls a model: tokens in, logits out.

    It shares the language model's weights. Its positions are each row's
    cache offset plus the row's delta, the same in all three mRoPE sections,
    as text positions are.
    """

    def __init__(self, language_model: Any) -> None:
        super().__init__()
        self.language_model = language_model
        self.args = language_model.args

    @property
    def layers(self) -> list[Any]:
        return list(self.language_model.model.layers)

    def make_cache(self) -> list[Any]:
        return [PositionedKVCache() for _ in self.language_model.model.layers]

    def __call__(self, inputs: Any, cache: Any = None, **_: Any) -> Any:
        batch, length = inputs.shape
        first = cache[0] if cache else None
        offset = 0 if first is None else first.offset
        delta = 0 if first is None else getattr(first, "delta", 0)
        starts = mx.array([offset + int(delta)]) if isinstance(offset, int) else offset + delta
        positions = starts[:, None] + mx.arange(length)[None, :]
        positions = mx.broadcast_to(positions[None], (3, batch, length))
        hidden = self.language_model.model(inputs, cache=cache, position_ids=positions)
        head = getattr(self.language_model, "lm_head", None)
        if head is None:
            return self.language_model.model.embed_tokens.as_linear(hidden)
        return head(hidden)
