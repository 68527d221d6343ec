"""One loaded model's batch: requests join, step, stream their text, and leave.

A `Runner` wraps mlx-lm's `BatchGenerator` for one model. It runs on the
engine thread only; its streams carry the results to the asyncio side.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pensieved.config import EngineConfig, stops_loops
from pensieved.conversation.constraints import repetition_processor, thinking_processor
from pensieved.conversation.plan import GenerationRequest, Sampling
from pensieved.conversation.stops import LOOP_WINDOW, StopMatcher, looping
from pensieved.engine import kv_quant, vision
from pensieved.engine.loading import LoadedModel, new_generator
from pensieved.engine.mlx_internals import keep_first_space
from pensieved.engine.prompt_cache import Divergence, PromptCache
from pensieved.engine.speculate import Speculator
from pensieved.engine.stream import (
    Admitted,
    Failed,
    Finished,
    GenerationStream,
    PromptProgress,
    TextDelta,
)

log = logging.getLogger(__name__)


class SamplerPool:
    """One sampler per sampling setting, shared by every model's batch.

    mlx-lm samples a batch in one call only when its rows share a sampler
    object; a sampler per request would sample row by row.
    """

    def __init__(self) -> None:
        self._samplers: dict[tuple[float, float, int, float], Callable[[Any], Any]] = {}

    def get(self, sampling: Sampling, logits_size: int) -> Callable[[Any], Any]:
        from mlx_lm.sample_utils import make_sampler

        # A top_k at or past the vocabulary keeps every token: no filter at all
        # (mlx-lm refuses such values).
        top_k = sampling.top_k if sampling.top_k < logits_size else 0
        settings = (sampling.temperature, sampling.top_p, top_k, sampling.min_p)
        sampler = self._samplers.get(settings)
        if sampler is None:
            sampler = make_sampler(
                temp=sampling.temperature, top_p=sampling.top_p, min_p=sampling.min_p, top_k=top_k
            )
            if len(self._samplers) >= 64:
                self._samplers.clear()
            self._samplers[settings] = sampler
        return sampler

    def reset(self) -> None:
        import mlx.core as mx

        # mlx-lm's samplers are compiled with the global random state as an
        # input and output; an exception mid-call leaves a placeholder array
        # there, and every later sampled request would fail. Reseed it.
        mx.random.seed(secrets.randbits(32))
        self._samplers.clear()


@dataclass
class Job:
    stream: GenerationStream
    request: GenerationRequest
    detokenizer: Any
    stops: StopMatcher
    output_tokens: int = 0
    cached_tokens: int = 0
    grammar: Any = None  # the request's grammar processor, if any
    decoding: bool = False  # its prompt is prefilled
    # The last tokens of free text, where the model's `stop_loops` watches them.
    recent: list[int] | None = None
    # What the prompt cache knows the prompt by (its images named by digest).
    key: list[int] = field(default_factory=list)


@dataclass
class StepResult:
    generated: int = 0  # tokens decoded in this step, over all rows
    finished: int = 0  # requests that ended (stop, limit or failure)


@dataclass
class Runner:
    """A loaded model's batch generator and the jobs it is running."""

    loaded: LoadedModel
    settings: EngineConfig
    prompt_cache: PromptCache
    samplers: SamplerPool
    generator: Any = None
    jobs: dict[int, Job] = field(default_factory=dict)
    # Side requests waiting for a main turn's prefill to finish.
    held: list[tuple[GenerationRequest, GenerationStream]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    served: int = 0
    speculator: Speculator = field(init=False)

    def __post_init__(self) -> None:
        config = self.loaded.config
        self.speculator = Speculator(
            "off" if self.loaded.vision is not None else config.speculate,
            config.speculate_tokens,
            self.loaded.draft_model,
            self.loaded.vocab_size,
        )
        if self.generator is None:
            self.generator = new_generator(self.loaded, self.settings)

    def insert(self, request: GenerationRequest, stream: GenerationStream) -> None:
        """Join the batch, reusing what the prompt cache holds of the prompt."""
        if stream.cancelled.is_set():
            log.info("request cancelled before it started")
            return
        if request.side and self._main_prefilling():
            self.held.append((request, stream))
            return
        loaded = self.loaded
        processors = []
        if request.thinking is not None:
            budget = thinking_processor(request.thinking, loaded.tokenizer)
            if budget is not None:
                processors.append(budget)
        grammar = None
        if request.grammar is not None:
            grammar = loaded.grammars.processor(request.grammar, budget=request.max_tokens)
            processors.append(grammar)
        if request.sampling.repetition_penalty != 1.0:
            # After the grammar: it is left out where the grammar constrains.
            stops = tuple(sorted(loaded.tokenizer.eos_token_ids))
            penalty = request.sampling.repetition_penalty
            processors.append(repetition_processor(penalty, stops, grammar))
        key = self._key(request)
        cache, cached, divergence = self.prompt_cache.fetch_explained(loaded.config, key)
        if divergence is not None:
            self._explain_miss(divergence, cached)
        reused = cached
        if request.images:  # through the last image now; the batch takes the rest
            cache, cached, reused = vision.prefill_images(
                request, loaded.vision, loaded.model, cache, cached, self.settings.prefill_chunk
            )
            log.info(
                "images: %d in the prompt (%d tokens); prefilled through the last one, "
                "%d tokens read from the prompt cache",
                len(request.images),
                sum(len(image.tokens) for image in request.images),
                reused,
            )
        elif cache is None and loaded.vision is None:
            # Quantized caches where the model's `kv_bits` asks for them.
            cache = kv_quant.live_caches(loaded.config, loaded.model)
        (uid,) = self.generator.insert(
            [request.prompt[cached:]],
            # max_tokens 0 is a cache pre-warm: one token is decoded and dropped.
            max_tokens=[max(request.max_tokens, 1)],
            caches=[cache],
            all_tokens=[request.prompt[:cached]],
            samplers=[self.samplers.get(request.sampling, loaded.logits_size)],
            logits_processors=[processors],
        )
        self.last_used = time.monotonic()
        self.jobs[uid] = Job(
            stream,
            request,
            keep_first_space(loaded.tokenizer.detokenizer)
            if request.keep_leading_space
            else loaded.tokenizer.detokenizer,
            StopMatcher(request.stop_sequences),
            cached_tokens=reused,
            grammar=grammar,
            recent=[] if stops_loops(loaded.config) else None,
            key=key,
        )
        stream.deliver(Admitted(reused))

    def _explain_miss(self, divergence: Divergence, cached: int) -> None:
        """Log where the prompt left the nearest cached one, and keep it for `status`."""
        vocabulary = self.loaded.vocab_size

        def decode(tokens: list[int]) -> str:  # an image's ids in the key are not text
            return str(self.loaded.tokenizer.decode([t for t in tokens if t < vocabulary]))

        texts = {
            "before": decode(divergence.before),
            "new": decode(divergence.ours),
            "cached": decode(divergence.theirs),
        }
        log.info(
            "prompt cache miss: prompt of %d tokens left a cached one at token %d "
            "(%d reused, %d cached tokens past it unused): ...%r → new %r, cached %r",
            divergence.prompt_tokens,
            divergence.at,
            cached,
            divergence.lost,
            texts["before"],
            texts["new"],
            texts["cached"],
        )
        self.prompt_cache.note_miss(self.loaded.name, divergence, texts)

    def _main_prefilling(self) -> bool:
        return any(not job.request.side and not job.decoding for job in self.jobs.values())

    def _release_held(self) -> None:
        """Let held side requests join once no main turn is prefilling."""
        while self.held and not self._main_prefilling():
            request, stream = self.held.pop(0)
            try:
                self.insert(request, stream)
            except Exception as exc:
                log.exception("a held request could not start")
                stream.deliver(Failed(f"generation could not start: {exc}"))

    def cancel(self, stream: GenerationStream) -> None:
        self.held = [(r, s) for r, s in self.held if s is not stream]
        for uid, job in list(self.jobs.items()):
            if job.stream is stream:
                self._remove(uid, job)
                del self.jobs[uid]
                self.last_used = time.monotonic()
                log.info("request cancelled after %d tokens", job.output_tokens)
        self._release_held()

    def step(self) -> StepResult:
        """One prefill chunk or decode step for the whole batch."""
        result = StepResult()
        served = self.served
        try:
            # A lone sequence may take a speculative step (several tokens).
            prompt_responses, generation_responses = self.speculator.step(
                self.generator, self._sampling
            )
        except Exception as exc:
            log.exception("generation step failed for model %s", self.loaded.name)
            self.fail(f"generation failed: {exc}")
            return result
        for response in prompt_responses:
            job = self.jobs.get(response.uid)
            if job is not None:
                processed, total = response.progress[0], response.progress[1]
                job.decoding = processed >= total
                job.stream.deliver(PromptProgress(processed, total))
        result.generated = len(generation_responses)
        for response in generation_responses:
            job = self.jobs.get(response.uid)
            if response.prompt_cache is not None and job is not None:
                # A finished sequence leaves its prompt and reply for the next turn.
                self._store(job, list(response.all_tokens), response.prompt_cache)
            if job is None:
                continue
            try:
                self._advance(response.uid, job, response.token, response.finish_reason)
            except Exception as exc:
                log.exception("decoding a token failed for model %s", self.loaded.name)
                self._finish(response.uid, Failed(f"generation failed: {exc}"))
        result.finished = self.served - served
        if self.held:
            self._release_held()
        return result

    def _sampling(self, uid: int) -> Sampling | None:
        job = self.jobs.get(uid)
        return None if job is None else job.request.sampling

    def _advance(self, uid: int, job: Job, token: int, finish_reason: str | None) -> None:
        """Turn one token into text for `job`, ending it at a stop or a limit."""
        if job.request.max_tokens == 0:
            # The prompt is prefilled, and kept in the prompt cache on removal.
            self._finish(uid, Finished("max_tokens", None, 0, job.cached_tokens))
            return
        job.output_tokens += 1
        if token >= self.loaded.vocab_size:
            # The detokenizer would quietly turn it into junk text.
            raise ValueError(
                f"model produced token id {token}, outside its tokenizer's "
                f"vocabulary of {self.loaded.vocab_size}"
            )
        detokenizer = job.detokenizer
        if finish_reason != "stop":  # "stop" means an end-of-turn token: not text
            detokenizer.add_token(token)
        if finish_reason is not None:
            detokenizer.finalize()
        text, matched = job.stops.feed(detokenizer.last_segment)
        if matched is not None:
            if text:
                job.stream.deliver(TextDelta(text, job.output_tokens))
            event = Finished("stop_sequence", matched, job.output_tokens, job.cached_tokens)
            self._finish(uid, event)
            return
        if finish_reason is None and self._looping(job, token):
            finish_reason = "stop"  # ends the turn as the model's own end token would
            log.info("stopped a reply looping on one passage after %d tokens", job.output_tokens)
            detokenizer.finalize()
            text += job.stops.feed(detokenizer.last_segment)[0]
        if finish_reason is not None:
            text += job.stops.flush()
        if text:
            job.stream.deliver(TextDelta(text, job.output_tokens))
        if finish_reason is None:
            return
        # A grammar that closed its document as the budget ran out ended it,
        # not the model: the reply is complete JSON, cut short all the same.
        closed = job.grammar is not None and job.grammar.closing
        if finish_reason == "stop" and not closed:
            reason = "end_turn"
        elif job.request.context_limited:
            reason = "model_context_window_exceeded"
        else:
            reason = "max_tokens"
        self._finish(uid, Finished(reason, None, job.output_tokens, job.cached_tokens))

    def _looping(self, job: Job, token: int) -> bool:
        """Whether free text now repeats one passage over and over (`stop_loops` models only)."""
        if job.recent is None or (job.grammar is not None and job.grammar.constrained):
            return False
        job.recent.append(token)
        del job.recent[:-LOOP_WINDOW]
        return looping(job.recent)

    def _finish(self, uid: int, event: Finished | Failed) -> None:
        self.last_used = time.monotonic()
        job = self.jobs.pop(uid, None)
        if job is None:
            return
        # A request that ended by stop sequence or failure is still in the batch.
        self._remove(uid, job)
        self.served += 1
        job.stream.deliver(event)

    def _remove(self, uid: int, job: Job) -> None:
        """Take `uid` out of the batch, keeping what it prefilled in the prompt cache."""
        for cache, tokens in self.generator.remove([uid], return_prompt_caches=True).values():
            self._store(job, list(tokens), cache)

    def _store(self, job: Job, tokens: list[int], cache: list[Any]) -> None:
        """Keep a sequence's cache for the next turn, under its images' digests where it has any."""
        request = job.request
        if request.images:
            cut = len(request.prompt)
            key = job.key
            tokens = key[: len(tokens)] if len(tokens) <= cut else key + tokens[cut:]
        self.prompt_cache.store(self.loaded.config, tokens, cache, side=request.side)

    def _key(self, request: GenerationRequest) -> list[int]:
        """What the prompt cache knows `request`'s prompt by (engine/vision.py's `prompt_key`)."""
        if not request.images:
            return request.prompt
        if self.loaded.vision is None:
            raise ValueError(f"model {self.loaded.name!r} cannot see images")
        return vision.prompt_key(request, self.loaded.logits_size)

    def fail(self, message: str) -> None:
        """Fail every request in the batch and start again from a clean one."""
        self.samplers.reset()
        self.end_all(Failed(message))
        # The batch's state is unknown after a failure.
        self.generator = new_generator(self.loaded, self.settings)

    def end_all(self, event: Failed) -> None:
        for job in self.jobs.values():
            job.stream.deliver(event)
        for _, stream in self.held:
            stream.deliver(event)
        self.jobs.clear()
        self.held.clear()
