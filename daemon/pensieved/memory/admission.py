"""Admission: refuse work before it starts, instead of finding out halfway.

Three checks, all cheap enough for every request (`bench/admission.py`):
at the reject or shutdown level, or while draining, new requests get 529
before their body is read (http/admission.py); their bodies are counted and
the large ones taken a few at a time (memory/bodies.py); and

- `Admission.admit`: just before prefill, the request's peak memory is
  estimated (KV cache for its prompt and the output it will likely write,
  plus activations) and it is refused with 529 if it would take available
  memory below the reject line, the daemon past `[memory] budget_gb`, or (on
  Metal) MLX past the GPU's recommended working set, even once the caches
  were given back.

Serve what fits. Claude Code asks for 32000-64000 `max_tokens` on every turn
and writes a few hundred to a few thousand, so the estimate counts
`min(max_tokens, EXPECTED_OUTPUT_TOKENS)` of output, not the whole window; a
reply that grows past that is watched while it decodes by the memory levels
(warn gives caches back, past `budget_gb` too; reject stops new work;
shutdown ends the streams). The prompt cache and MLX's buffer cache are
memory the daemon can give back at once: when a request fits only without
them, it is admitted and they are shrunk right after the request has taken
its copy of the prefix it reuses, so that entry becomes part of the request's
KV instead of sitting on top of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pensieved.config import EngineConfig, MemoryConfig, ModelConfig
from pensieved.conversation.plan import GenerationRequest
from pensieved.engine.loading import LoadedModel
from pensieved.engine.stream import GenerationStream
from pensieved.memory.guard import MemoryGuard
from pensieved.memory.levels import RETRY_AFTER_LOW_MEMORY
from pensieved.memory.probe import MemoryReading
from pensieved.models.facts import facts_of, kv_bytes_per_token
from pensieved.paths import GB
from pensieved.wire.errors import Overloaded

log = logging.getLogger(__name__)

# mlx-lm's KV caches grow in steps of this many tokens.
KV_STEP = 256
# The engine's default prefill chunk, for estimates made without its settings.
PREFILL_CHUNK = EngineConfig().prefill_chunk
# For a model whose config does not say how big its KV cache is: more per
# token than any common model needs (a 70B llama in float16 needs 320 KB).
FALLBACK_KV_BYTES_PER_TOKEN = 1024 * 1024
# Activations are computed in float32 at worst.
ACTIVATION_BYTES = 4
# Decoding keeps the logits, the log-probabilities and the sampler's
# working copies of one row of vocabulary-sized floats per sequence.
LOGIT_COPIES = 8
# Output tokens a request is expected to write, at most, for the estimate.
# Clients ask for far more than they use (Claude Code: 32000-64000 on every
# turn, clamped to the whole context window); counting that would refuse
# turns that fit. Growth past it is watched by the memory levels.
EXPECTED_OUTPUT_TOKENS = 4096


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    kv_bytes_per_token: int
    attention_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    exact: bool = True  # False when the config lacked fields and fallbacks were used


def model_shape(model: Any, kv: tuple[int | None, int] = (None, 64)) -> ModelShape:
    """The shape of an mlx-lm model, from its config (`model.args`) and weights.

    KV bytes per token as models/facts.py counts them, in the activations'
    dtype, packed where `kv` = (bits, group size) says the model's KV cache
    is quantized (`kv_bits`). A missing KV head count means every attention
    head keeps its own (the larger figure); a config without layers, heads
    or head size gets `FALLBACK_KV_BYTES_PER_TOKEN`.
    """
    from mlx.utils import tree_flatten

    raw = getattr(model, "args", None)
    facts = facts_of(dict(vars(raw)) if raw is not None else {})
    if facts.layers is None and isinstance(getattr(model, "layers", None), list) and model.layers:
        facts = dataclasses.replace(facts, layers=len(model.layers))
    # Keys and values come out in the activations' dtype: the widest float weight.
    parameters = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    widths = [int(v.itemsize) for _, v in parameters if "float" in str(v.dtype)]
    dtype_bytes = max(widths, default=ACTIVATION_BYTES)
    per_token = kv_bytes_per_token(facts, dtype_bytes, kv)
    hidden = facts.hidden_size or 8192
    return ModelShape(
        kv_bytes_per_token=FALLBACK_KV_BYTES_PER_TOKEN if per_token is None else per_token,
        attention_heads=facts.attention_heads or 64,
        hidden_size=hidden,
        intermediate_size=facts.intermediate_size or 4 * hidden,
        vocab_size=facts.vocab_size or 256_000,
        exact=facts.exact,
    )


def kv_bytes(shape: ModelShape, sequences: int, tokens: int) -> int:
    """Peak KV bytes of a batch of `sequences` padded to `tokens` each.

    mlx-lm grows a cache by concatenating a new step onto the old one, and
    the old copy lives until the new one exists: twice the final size at peak.
    """
    steps = -(-tokens // KV_STEP)
    return 2 * sequences * steps * KV_STEP * shape.kv_bytes_per_token


def activation_bytes(
    shape: ModelShape, prompt_tokens: int, prefill_chunk: int = PREFILL_CHUNK
) -> int:
    """Peak activations: the last prefill chunk, then one decode step.

    Attention scores of a chunk against the whole prompt (the CPU backend
    materializes them; Metal's fused kernel needs less, so this errs high),
    the chunk's hidden and MLP states, and the logits of a decode step.
    """
    chunk = min(max(prompt_tokens, 1), prefill_chunk)
    scores = shape.attention_heads * chunk * (prompt_tokens + 1)
    states = chunk * (4 * shape.hidden_size + 3 * shape.intermediate_size)
    logits = LOGIT_COPIES * shape.vocab_size
    return (scores + states + logits) * ACTIVATION_BYTES


def expected_output(max_tokens: int) -> int:
    """The output tokens the estimate counts for a request allowed `max_tokens`."""
    return min(max_tokens, EXPECTED_OUTPUT_TOKENS)


def vision_bytes(vision_config: Any, grids: list[tuple[int, int, int]]) -> int:
    """Peak activations of a vision tower encoding images of `grids` (patches: t, h, w).

    The largest image's attention scores (one block at a time, every head,
    float32 on the CPU backend; Metal's fused kernel needs less, so this errs
    high) and every image's hidden states through a block.
    """
    if not grids:
        return 0
    patches = [t * h * w for t, h, w in grids]
    heads = int(getattr(vision_config, "num_heads", 0) or 16)
    width = int(
        getattr(vision_config, "embed_dim", 0) or getattr(vision_config, "hidden_size", 0) or 1280
    )
    scores = heads * max(patches) ** 2 * ACTIVATION_BYTES
    states = 8 * sum(patches) * width * ACTIVATION_BYTES
    return scores + states


def estimate_bytes(shape: ModelShape, prompt_tokens: int, max_tokens: int) -> int:
    """The peak memory one request alone is expected to need."""
    tokens = prompt_tokens + expected_output(max_tokens)
    return kv_bytes(shape, 1, tokens) + activation_bytes(shape, prompt_tokens)


@dataclass(frozen=True)
class _Admitted:
    stream: GenerationStream
    model: ModelConfig
    shape: ModelShape
    tokens: int  # prompt + expected output
    activations: int


class Admission:
    """The estimate check before prefill, with a ledger of what admitted requests will need."""

    def __init__(self, guard: MemoryGuard, prefill_chunk: int = PREFILL_CHUNK) -> None:
        self._guard = guard
        # The engine's prefill chunk (`[engine] prefill_chunk`; reload updates it).
        self.prefill_chunk = prefill_chunk
        self._shapes: dict[ModelConfig, ModelShape] = {}
        self._admitted: list[_Admitted] = []

    def admit(
        self, model: LoadedModel, request: GenerationRequest, stream: GenerationStream
    ) -> None:
        """Let `request` start, or raise `Overloaded` (529). The engine calls this."""
        shape = self._shapes.get(model.config)
        if shape is None:
            kv = model.config.kv_bits, model.config.kv_group_size
            shape = self._shapes[model.config] = model_shape(model.model, kv)
            if not shape.exact:
                log.warning(
                    "model %s: its config does not say how big its KV cache is; "
                    "assuming %d KB per token",
                    model.name,
                    shape.kv_bytes_per_token // 1024,
                )
        vision = 0
        if request.images and model.vision is not None:
            grids = [image.grid for image in request.images]
            vision = vision_bytes(getattr(model.vision.config, "vision_config", None), grids)
        self.check(model.config, shape, len(request.prompt), request.max_tokens, stream, vision)

    def in_flight(self) -> int:
        self._forget_finished()
        return len(self._admitted)

    def check(
        self,
        model: ModelConfig,
        shape: ModelShape,
        prompt_tokens: int,
        max_tokens: int,
        stream: GenerationStream,
        vision: int = 0,
    ) -> None:
        """`admit`'s check, on a model's shape; `vision`: its vision tower's activations."""
        guard = self._guard
        if guard.reading is None:
            guard.sample()  # a guard that was never started (the app alone, in tests)
        refusal = guard.refusal()
        if refusal is not None:
            raise refusal
        reading = guard.reading
        assert reading is not None
        self._forget_finished()
        output = expected_output(max_tokens)
        new = _Admitted(
            stream,
            model,
            shape,
            prompt_tokens + output,
            max(activation_bytes(shape, prompt_tokens, self.prefill_chunk), vision),
        )
        before = self._projected(self._admitted)
        own = self._projected([*self._admitted, new]) - before
        settings = guard.settings
        # The engine's KV at the time of the reading is already counted in
        # it; what admitted requests have yet to grow is not, and neither is
        # this one (even when the others outgrew their estimates). Nor is
        # MLX's buffer cache filling back up: a growing KV cache leaves each
        # old copy there, never reused for the larger ones that follow, until
        # the cache's limit (a short request leaves less than it needs).
        cache_room = max(0, int(settings.cache_limit_gb * GB) - reading.mlx_cache)
        cache_refill = min(cache_room, own)
        still_to_come = max(0, before - guard.kv_at_reading) + own + cache_refill
        reclaimable = guard.reclaimable()
        what = (
            f"it needs about {own / GB:.2f} GB ({prompt_tokens} prompt + {output} "
            f"expected output tokens)"
        )
        freed = f" once {reclaimable / GB:.2f} GB of caches are freed" if reclaimable else ""
        limits = _limits(reading, settings, still_to_come, reclaimable)
        for limit in limits:
            if limit.short > reclaimable:
                raise Overloaded(
                    f"not enough {limit.memory} for this request: {what}, which would "
                    f"{limit.outcome}{freed}, {limit.line}; retry later or ask for "
                    "fewer max_tokens",
                    {"retry-after": RETRY_AFTER_LOW_MEMORY},
                )
        shortfall = max([0, *(limit.short for limit in limits)])
        self._admitted.append(new)
        if shortfall > 0:
            log.info(
                "admitting a request that fits once %.1f MB of caches are given back",
                shortfall / 1024**2,
            )
            _after_submit(lambda: guard.reclaim(shortfall))

    def _forget_finished(self) -> None:
        self._admitted = [
            a for a in self._admitted if not (a.stream.done or a.stream.cancelled.is_set())
        ]

    @staticmethod
    def _projected(admitted: list[_Admitted]) -> int:
        """Peak bytes of these requests together: each model's batch pads to its longest."""
        by_model: dict[ModelConfig, list[_Admitted]] = {}
        for a in admitted:
            by_model.setdefault(a.model, []).append(a)
        total = 0
        for batch in by_model.values():
            longest = max(a.tokens for a in batch)
            total += kv_bytes(batch[0].shape, len(batch), longest)
            total += sum(a.activations for a in batch)
        return total


def _after_submit(function: Callable[[], None]) -> None:
    """Run `function` once the request being admitted is queued on the engine.

    `Engine.submit` queues the request as soon as admission returns, on this
    event-loop turn; a callback scheduled now runs on the next one, so what it
    queues reaches the engine thread after the request has taken its
    prompt-cache copy.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # called outside the event loop (tests): nothing to wait for
        function()
        return
    loop.call_soon(function)


@dataclass(frozen=True)
class _Limit:
    """One ceiling a request must fit under once the caches are freed."""

    memory: str  # "memory" or "GPU memory"
    short: int  # bytes past the ceiling before any cache is freed (<= 0: it fits)
    outcome: str  # what admitting it would do, caches freed
    line: str  # the ceiling, in words


def _limits(
    reading: MemoryReading, settings: MemoryConfig, still_to_come: int, reclaimable: int
) -> list[_Limit]:
    """The ceilings in force: the reject line, the daemon's budget, Metal's working set."""
    left = reading.available - still_to_come
    limits = [
        _Limit(
            "memory",
            int(settings.reject_below_gb * GB) - left,
            f"leave {max(left + reclaimable, 0) / GB:.2f} GB available",
            f"below the {settings.reject_below_gb:g} GB reject line",
        )
    ]
    if settings.budget_gb > 0:
        total = reading.daemon_bytes + still_to_come
        limits.append(
            _Limit(
                "memory",
                total - int(settings.budget_gb * GB),
                f"take the daemon to {(total - reclaimable) / GB:.2f} GB",
                f"past its {settings.budget_gb:g} GB budget",
            )
        )
    if reading.gpu_working_set > 0:
        # Metal: MLX's buffers stay within the GPU's working set, or the
        # command buffer fails and MLX aborts the process (no exception).
        total = reading.mlx_active + reading.mlx_cache + still_to_come
        limits.append(
            _Limit(
                "GPU memory",
                total - reading.gpu_working_set,
                f"take MLX to {(total - reclaimable) / GB:.2f} GB",
                f"past the GPU's recommended working set of {reading.gpu_working_set / GB:.2f} GB",
            )
        )
    return limits
