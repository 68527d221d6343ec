"""Admission: refuse work before it starts, instead of finding out halfway.

Three checks, all cheap enough for every request (`bench/admission.py`):

- `AdmissionMiddleware`: at the reject or shutdown level (or while
  draining), new `/v1/messages` requests get 529 before their body is read or
  a model loaded; so does one whose body, with the others being read,
  would take available memory below the reject line.
- `BodyAdmission`: a body is memory from its first byte until its request
  reaches the engine (decoded, rendered, planned), and up to
  `max_connections` are read at once. Their bytes are counted, and bodies
  over `LARGE_BODY_BYTES` take one of `LARGE_BODIES` places for that time:
  the rest wait, unread. Each is read within `[server] body_timeout`, not
  counting that wait.
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
shutdown ends the streams). The prefix cache and MLX's buffer cache are
memory the daemon can give back at once: when a request fits only without
them, it is admitted and they are shrunk right after the request has taken
its copy of the prefix it reuses, so that entry becomes part of the request's
KV instead of sitting on top of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import falcon
import falcon.asgi

from pensieved.config import EngineConfig, ModelConfig
from pensieved.engine.kv_quant import stored_bytes_per_token
from pensieved.engine.loading import LoadedModel
from pensieved.engine.stream import GenerationRequest, GenerationStream
from pensieved.memory.guard import GB, RETRY_AFTER_LOW_MEMORY, MemoryGuard
from pensieved.wire.errors import Overloaded

log = logging.getLogger(__name__)

# mlx-lm's KV caches grow in steps of this many tokens.
KV_STEP = 256
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

ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})

# Bodies past this size are read and prepared a few at a time. Claude Code's
# turns are 80 KB to a few MB (with screenshots); 64 bodies of 24 MB read at
# once took 1.3 GB before any check (security review #5).
LARGE_BODY_BYTES = 1024 * 1024
LARGE_BODIES = 2
# What a body's bytes take once decoded and rendered, for the memory check:
# fields nothing reads stay JSON text (wire/protocol.py); text and tool
# inputs become strings and small objects, then prompt text and tokens.
BODY_EXPANSION = 4
# Seconds a client has to send a whole body (`[server] body_timeout`).
BODY_TIMEOUT = 60.0


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    kv_bytes_per_token: int
    attention_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    exact: bool = True  # False when the config lacked fields and fallbacks were used


def _first(args: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = args.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_shape(model: Any, kv: tuple[int | None, int] = (None, 64)) -> ModelShape:
    """The shape of an mlx-lm model, from its config (`model.args`) and weights.

    KV bytes per token = layers × KV heads × head dim × 2 (keys and values) ×
    bytes per activation, or, with `kv` = (bits, group size) of a model whose
    KV cache is quantized (`kv_bits`), the packed size (kv_quant.py). A
    missing KV head count means every attention head keeps its own (the
    larger figure); a config without layers, heads or head size gets
    `FALLBACK_KV_BYTES_PER_TOKEN`.
    """
    from mlx.utils import tree_flatten

    raw = getattr(model, "args", None)
    args: dict[str, Any] = dict(vars(raw)) if raw is not None else {}
    if isinstance(args.get("text_config"), dict):  # multimodal wrappers
        args = {**args["text_config"], **args}
    layers = _first(args, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if layers is None and isinstance(getattr(model, "layers", None), list):
        layers = len(model.layers) or None
    hidden = _first(args, "hidden_size", "n_embd", "d_model", "dim")
    heads = _first(args, "num_attention_heads", "n_head", "n_heads")
    kv_heads = _first(args, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or heads
    head_dim = _first(args, "head_dim") or (hidden // heads if hidden and heads else None)
    # Keys and values come out in the activations' dtype: the widest float weight.
    parameters = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    widths = [int(v.itemsize) for _, v in parameters if "float" in str(v.dtype)]
    dtype_bytes = max(widths, default=ACTIVATION_BYTES)
    exact = None not in (layers, kv_heads, head_dim)
    bits, group_size = kv
    if layers and kv_heads and head_dim and bits and head_dim % group_size == 0:
        per_token = stored_bytes_per_token(
            kv_heads, head_dim, layers, dtype_bytes, bits, group_size
        )
    elif layers and kv_heads and head_dim:
        per_token = layers * kv_heads * head_dim * 2 * dtype_bytes
    else:
        per_token = FALLBACK_KV_BYTES_PER_TOKEN
    hidden = hidden or 8192
    return ModelShape(
        kv_bytes_per_token=per_token,
        attention_heads=heads or 64,
        hidden_size=hidden,
        intermediate_size=_first(args, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden,
        vocab_size=_first(args, "vocab_size") or 256_000,
        exact=exact,
    )


def kv_bytes(shape: ModelShape, sequences: int, tokens: int) -> int:
    """Peak KV bytes of a batch of `sequences` padded to `tokens` each.

    mlx-lm grows a cache by concatenating a new step onto the old one, and
    the old copy lives until the new one exists: twice the final size at peak.
    """
    steps = -(-tokens // KV_STEP)
    return 2 * sequences * steps * KV_STEP * shape.kv_bytes_per_token


def activation_bytes(
    shape: ModelShape, prompt_tokens: int, prefill_chunk: int = EngineConfig.prefill_chunk
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

    def __init__(self, guard: MemoryGuard, prefill_chunk: int = EngineConfig.prefill_chunk) -> None:
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
        self.check(model.config, shape, len(request.prompt), request.max_tokens, stream)

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
    ) -> None:
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
            activation_bytes(shape, prompt_tokens, self.prefill_chunk),
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
        after_freeing = ""
        if reclaimable:
            after_freeing = f" once {reclaimable / GB:.2f} GB of caches are freed"
        shortfall = 0
        # Available memory stays above the reject line.
        left = reading.available - still_to_come
        short = int(settings.reject_below_gb * GB) - left
        if short > reclaimable:
            raise Overloaded(
                f"not enough memory for this request: {what}, which would leave "
                f"{max(left + reclaimable, 0) / GB:.2f} GB available{after_freeing}, below the "
                f"{settings.reject_below_gb:g} GB reject line; retry later or ask for "
                "fewer max_tokens",
                {"retry-after": RETRY_AFTER_LOW_MEMORY},
            )
        shortfall = max(shortfall, short)
        # The daemon stays within its budget.
        if settings.budget_gb > 0:
            total = reading.daemon_bytes + still_to_come
            short = total - int(settings.budget_gb * GB)
            if short > reclaimable:
                raise Overloaded(
                    f"not enough memory for this request: {what}, which would take the "
                    f"daemon to {(total - reclaimable) / GB:.2f} GB{after_freeing}, past its "
                    f"{settings.budget_gb:g} GB budget; retry later or ask for fewer max_tokens",
                    {"retry-after": RETRY_AFTER_LOW_MEMORY},
                )
            shortfall = max(shortfall, short)
        # Metal: MLX's buffers stay within the GPU's working set, or the
        # command buffer fails and MLX aborts the process (no exception).
        if reading.gpu_working_set > 0:
            total = reading.mlx_active + reading.mlx_cache + still_to_come
            short = total - reading.gpu_working_set
            if short > reclaimable:
                raise Overloaded(
                    f"not enough GPU memory for this request: {what}, which would take MLX "
                    f"to {(total - reclaimable) / GB:.2f} GB{after_freeing}, past the GPU's "
                    f"recommended working set of {reading.gpu_working_set / GB:.2f} GB; retry "
                    "later or ask for fewer max_tokens",
                    {"retry-after": RETRY_AFTER_LOW_MEMORY},
                )
            shortfall = max(shortfall, short)
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
    prefix-cache copy.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # called outside the event loop (tests): nothing to wait for
        function()
        return
    loop.call_soon(function)


class BodyLease:
    """One request's body in `BodyAdmission`: its bytes, and a large body's place."""

    def __init__(self, owner: BodyAdmission, timeout: float) -> None:
        self._owner = owner
        self.timeout = timeout  # seconds to read the whole body
        self.nbytes = 0
        self._place = False

    def needs_place(self, size: int) -> bool:
        """Whether a body of `size` bytes must wait for a large body's place it has not got."""
        return not self._place and size > self._owner.large_bytes

    async def take_place(self) -> None:
        """Wait for one of the `LARGE_BODIES` places; held until `release`."""
        await self._owner.places.acquire()
        self._place = True

    def add(self, size: int) -> None:
        """Count `size` more bytes read."""
        self.nbytes += size
        self._owner.nbytes += size

    def release(self) -> None:
        """The request reached the engine, or ended: its body no longer counts. Idempotent."""
        self._owner.nbytes -= self.nbytes
        self.nbytes = 0
        if self._place:
            self._place = False
            self._owner.places.release()


class BodyAdmission:
    """Request bodies in memory before their requests reach the engine: counted, large ones few."""

    def __init__(
        self,
        guard: MemoryGuard,
        timeout: Callable[[], float] = lambda: BODY_TIMEOUT,
        large_bodies: int = LARGE_BODIES,
        large_bytes: int = LARGE_BODY_BYTES,
    ) -> None:
        self._guard = guard
        self._timeout = timeout
        self.large_bytes = large_bytes
        self.places = asyncio.Semaphore(large_bodies)
        self.nbytes = 0  # bytes of bodies read and not yet released

    def lease(self) -> BodyLease:
        return BodyLease(self, self._timeout())

    def refusal(self, size: int) -> Overloaded | None:
        """529 when this body and those being read would take memory below the reject line."""
        reading = self._guard.reading
        if reading is None:
            return None
        needed = (self.nbytes + size) * BODY_EXPANSION
        line = int(self._guard.settings.reject_below_gb * GB)
        if reading.available - needed >= line:
            return None
        return Overloaded(
            f"not enough memory to take this request's body ({size / 1024**2:.1f} MB, with "
            f"{self.nbytes / 1024**2:.1f} MB of others being read): it would leave "
            f"{max(reading.available - needed, 0) / GB:.2f} GB available, below the "
            f"{self._guard.settings.reject_below_gb:g} GB reject line; retry later",
            {"retry-after": RETRY_AFTER_LOW_MEMORY},
        )


BODY_KEY = "pensieve.body"


class AdmissionMiddleware:
    """New work is refused at the reject and shutdown levels, while draining, and for its body.

    A request it admits carries its `BodyLease` (`body_lease`); the body
    reader fills it, the resource releases it once the request reaches the
    engine, and this releases it at the latest when the responder returns.
    """

    def __init__(
        self, guard: MemoryGuard, body_timeout: Callable[[], float] = lambda: BODY_TIMEOUT
    ) -> None:
        self._guard = guard
        self.bodies = BodyAdmission(guard, body_timeout)

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if req.method == "POST" and req.path.rstrip("/") in ROUTES:
            refusal = self._guard.refusal() or self.bodies.refusal(req.content_length or 0)
            if refusal is not None:
                raise refusal
            req.scope[BODY_KEY] = self.bodies.lease()

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        lease = body_lease(req)
        if lease is not None:
            lease.release()


def body_lease(req: falcon.asgi.Request) -> BodyLease | None:
    """The lease `AdmissionMiddleware` gave `req`'s body, if it gave one."""
    lease: BodyLease | None = req.scope.get(BODY_KEY)
    return lease
