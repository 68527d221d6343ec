"""`POST /v1/messages` and `POST /v1/messages/count_tokens`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import falcon
import falcon.asgi
from falcon.asgi import SSEvent

from pensieved.config import ModelConfig
from pensieved.conversation.attachments import cheap_to_render
from pensieved.conversation.plan import GenerationPlan, check_fits, needs_grammar, plan_generation
from pensieved.conversation.prompt import Prompt
from pensieved.engine.core import Engine
from pensieved.engine.loading import LoadedModel
from pensieved.http.asgi import disconnected, json_response, off_loop, read_body, release_body
from pensieved.http.metrics import Metrics
from pensieved.http.reply import Reply, sign_thinking
from pensieved.http.sse import events_when_ready, message_events
from pensieved.http.threads import ThreadStore, ThreadTurn
from pensieved.http.work import RequestWork
from pensieved.models.registry import ModelRegistry
from pensieved.wire import responses
from pensieved.wire.decode import decode_request
from pensieved.wire.errors import ApiError, Busy, EngineFailure, shown
from pensieved.wire.protocol import CountTokensRequest, MessagesRequest

log = logging.getLogger(__name__)

# Requests up to this size are rendered on the event loop (well under a
# millisecond); a thread hop would cost about as much. Larger ones, such as
# Claude Code's ~20k-token turns, tokenize for tens of milliseconds, so they
# go to a thread and other streams keep flowing. So does any request whose
# rendering costs more than its size (a PDF), however small its body.
INLINE_BYTES = 2048


@dataclass(frozen=True)
class PreparedPrompt:
    model: LoadedModel
    prompt: Prompt


class PromptPreparer:
    """Resolves the model, loads it if needed, and renders the prompt off the event loop."""

    def __init__(
        self, registry: ModelRegistry, engine: Engine, work: RequestWork | None = None
    ) -> None:
        self._registry = registry
        self._engine = engine
        # The daemon's threads for request work (http/work.py), not asyncio's default executor.
        self.work = work or RequestWork()

    async def prepare(self, request: CountTokensRequest, inline: bool = False) -> PreparedPrompt:
        config = self._registry.resolve(request.model)
        try:
            loaded = await self._engine.load(config)
        except ApiError:
            raise
        except Exception as exc:
            raise EngineFailure(f"model {config.name!r} could not be loaded: {exc}") from exc
        if inline:
            prompt = loaded.builder.build(request)
        else:
            prompt = await self.work.run(loaded.builder.build, request)
        return PreparedPrompt(loaded, prompt)

    async def check_before_load(self, request: MessagesRequest, config: ModelConfig) -> None:
        """Refuse now what would be refused once the model loads (content, length).

        A streamed request to a cold model answers 200 and pings while the
        weights load; an error found after that could only be an `event:
        error`, which the SDKs report with status 200. The tokenizer alone
        finds these, so they get their real status first.
        """
        front = await self.work.run(self._engine.front_end, config)
        if front is not None:
            check_fits(await self.work.run(front.builder.build, request), front)


class CountTokensResource:
    def __init__(self, preparer: PromptPreparer) -> None:
        self._preparer = preparer

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_body(req)
        request = await off_loop(
            self._preparer.work, len(body), decode_request, body, CountTokensRequest
        )
        inline = len(body) <= INLINE_BYTES and cheap_to_render(request)
        prepared = await self._preparer.prepare(request, inline=inline)
        json_response(resp, responses.token_count(len(prepared.prompt.tokens)))


@dataclass(frozen=True)
class _Started:
    reply: Reply
    model: LoadedModel
    input_tokens: int
    cached: int  # the prompt-cache hit expected when it was submitted
    gone: asyncio.Event


class MessagesResource:
    def __init__(
        self,
        preparer: PromptPreparer,
        engine: Engine,
        registry: ModelRegistry,
        metrics: Metrics | None = None,
        threads: ThreadStore | None = None,
    ) -> None:
        self._threads = threads or ThreadStore()
        self._preparer = preparer
        self._engine = engine
        self._metrics = metrics
        self._registry = registry

    @property
    def work(self) -> RequestWork:
        """The daemon's threads for request work (http/work.py)."""
        return self._preparer.work

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        # A full batch and queue refuse before the body is read, decoded and rendered.
        self.check_busy()
        body = await read_body(req)
        work = self._preparer.work
        # A thread's `continue` becomes the full conversation before it is checked.
        body, thread = await self._threads.expand_on(work, body, req.context.credential)
        request = await off_loop(work, len(body), decode_request, body, MessagesRequest)
        small = len(body) <= INLINE_BYTES and cheap_to_render(request)
        request_id: str = req.context.request_id
        if request.stream:
            config = self._registry.resolve(request.model)
            cold = not self._engine.is_loaded(config)
            if cold:
                await self._preparer.check_before_load(request, config)
            events = None if cold else await self._stream(req, request, small, thread)
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            if events is None:
                # A cold model: the stream starts now, with pings while it
                # loads, instead of leaving the client without a byte.
                starting = asyncio.ensure_future(self._stream(req, request, small, thread))
                resp.sse = events_when_ready(
                    starting,
                    ping_interval=self._registry.config.server.ping_interval,
                    request_id=request_id,
                )
                return
            resp.sse = events
            return
        message_id, started = await self.start(req, request, small)
        reply, model = started.reply, started.model
        event = await reply.finished(started.gone)
        if event is None:
            return
        self._threads.record(thread, message_id, reply.assembler.blocks)
        json_response(
            resp,
            responses.message(
                message_id,
                model.name,
                reply.assembler.blocks,
                event.stop_reason,
                event.stop_sequence,
                reply.usage(event),
            ),
        )

    async def _stream(
        self,
        req: falcon.asgi.Request,
        request: MessagesRequest,
        small: bool,
        thread: ThreadTurn | None = None,
    ) -> AsyncIterator[SSEvent]:
        message_id, started = await self.start(req, request, small)
        events = message_events(
            started.reply,
            message_id=message_id,
            model=started.model.name,
            input_tokens=started.input_tokens,
            cached_estimate=started.cached,
            ping_interval=self._registry.config.server.ping_interval,
            request_id=req.context.request_id,
            gone=started.gone,
        )
        if thread is None:
            return events
        return self._threads.recording(
            thread, events, message_id, lambda: started.reply.assembler.blocks
        )

    async def start(
        self, req: falcon.asgi.Request, request: MessagesRequest, small: bool
    ) -> tuple[str, _Started]:
        """Load the model, render the prompt, plan its generation, and submit it to the engine."""
        prepared = await self._preparer.prepare(request, inline=small)
        model, prompt = prepared.model, prepared.prompt

        def plan_and_look_up() -> tuple[GenerationPlan, int]:
            # Known for sure only once the engine takes the request;
            # message_start carries this estimate, message_delta the real figure.
            cached = self._engine.cached_length(model, prompt.tokens)
            return plan_generation(request, prompt, model), cached

        if small and not needs_grammar(request, prompt):
            plan, cached = plan_and_look_up()  # no grammar, a short prefix walk: microseconds
        else:
            plan, cached = await self._preparer.work.run(plan_and_look_up)
        generation, output = plan.generation, plan.output
        input_tokens, max_tokens = plan.input_tokens, generation.max_tokens
        message_id = responses.new_message_id()
        request_id: str = req.context.request_id
        log.info(
            "%s %s model=%r→%s prompt=%d max_tokens=%d%s%s",
            request_id,
            "stream" if request.stream else "create",
            shown(request.model),  # the client's string: quoted, so it cannot forge a line
            model.name,
            input_tokens,
            max_tokens,
            f" (asked {request.max_tokens})" if max_tokens != request.max_tokens else "",
            f" tools={len(output.tools)}" + (" forced" if output.forced else "")
            if output.tools
            else "",
        )
        self.check_busy()  # again: others may have been submitted meanwhile
        gone = disconnected(req)
        reply = Reply(
            self._engine.submit(model, generation),
            output.assembler(sign_thinking, continues_text=prompt.continues_assistant),
            request_id=request_id,
            prompt_tokens=input_tokens,
            metrics=self._metrics,
            coalesce=self._registry.config.server.text_interval_ms / 1000,
            thinking_end=output.thinking_markers.end if output.thinking_markers else None,
        )
        release_body(req)  # the engine has it now: its body no longer waits to be admitted
        return message_id, _Started(reply, model, input_tokens, cached, gone)

    def check_busy(self) -> None:
        settings = self._registry.config.engine
        if self._engine.active_requests() >= settings.max_sequences + settings.max_queue:
            raise Busy(
                f"{settings.max_sequences} requests are generating and {settings.max_queue} "
                "more are waiting; try again shortly",
                {"retry-after": "2"},
            )
