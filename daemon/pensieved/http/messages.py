"""`POST /v1/messages` and `POST /v1/messages/count_tokens`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import falcon
import falcon.asgi
from falcon.asgi import SSEvent

from pensieved.config import ModelConfig
from pensieved.conversation.attachments import cheap_to_render
from pensieved.conversation.constraints import ThinkingBudget
from pensieved.conversation.content import ContentAssembler, ThinkingMarkers
from pensieved.conversation.grammar import OutputGrammar
from pensieved.conversation.prompt import Prompt
from pensieved.conversation.toolcalls import GENERIC, ToolFormat
from pensieved.engine.core import Engine
from pensieved.engine.loading import LoadedModel
from pensieved.engine.stream import ClientGone, Failed, Finished, GenerationRequest, Sampling
from pensieved.http.asgi import disconnected, json_response, off_loop, read_body, release_body
from pensieved.http.metrics import Metrics
from pensieved.http.reply import Reply, sign_thinking
from pensieved.http.sse import events_when_ready, message_events
from pensieved.http.threads import ThreadStore, ThreadTurn
from pensieved.http.work import RequestWork
from pensieved.models.registry import ModelRegistry, small_tier
from pensieved.wire import responses
from pensieved.wire.decode import decode_request
from pensieved.wire.errors import ApiError, Busy, EngineFailure, Overloaded, prompt_too_long, shown
from pensieved.wire.protocol import (
    CountTokensRequest,
    MessagesRequest,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceTool,
)

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
        side = await self.work.run(self._engine.prompt_side, config)
        if side is not None:
            prompt = await self.work.run(side.builder.build, request)
            check_fits(len(prompt.tokens), side.context_length)


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


def check_fits(input_tokens: int, context_length: int) -> None:
    # One token of room is the least a reply needs.
    if input_tokens > context_length - 1:
        raise prompt_too_long(input_tokens, context_length - 1)


@dataclass(frozen=True)
class _Started:
    reply: Reply
    model: LoadedModel
    input_tokens: int
    cached: int  # the prefix-cache hit expected when it was submitted
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

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        # A full batch and queue refuse before the body is read, decoded and rendered.
        self._check_busy()
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
        message_id, started = await self._start(req, request, small)
        reply, model = started.reply, started.model
        gone = started.gone
        try:
            async for event in reply.events(gone):
                if isinstance(event, Finished):
                    break
                if isinstance(event, Failed):
                    if event.error_type == Overloaded.error_type:
                        raise Overloaded(event.message)
                    raise EngineFailure(event.message)
        except ClientGone:
            log.info("%s client disconnected; generation dropped", request_id)
            return
        finally:
            reply.stream.cancel()
        assert isinstance(event, Finished)
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
        message_id, started = await self._start(req, request, small)
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

    async def _start(
        self, req: falcon.asgi.Request, request: MessagesRequest, small: bool
    ) -> tuple[str, _Started]:
        """Load the model, render and check the prompt, and submit it to the engine."""
        prepared = await self._preparer.prepare(request, inline=small)
        model = prepared.model
        input_tokens = len(prepared.prompt.tokens)
        check_fits(input_tokens, model.context_length)
        # Claude Code asks for 64000; clamp to what fits, never reject.
        max_tokens = min(request.max_tokens, model.context_length - input_tokens)
        sampling = request_sampling(request, model)

        def plan_and_look_up() -> tuple[OutputPlan, int]:
            # Known for sure only once the engine takes the request;
            # message_start carries this estimate, message_delta the real figure.
            cached = self._engine.cached_length(model, prepared.prompt.tokens)
            return plan_output(request, prepared), cached

        if small and not prepared.prompt.tools and reply_schema(request) is None:
            plan, cached = plan_and_look_up()  # no grammar, a short prefix walk: microseconds
        else:
            plan, cached = await self._preparer.work.run(plan_and_look_up)
        generation = GenerationRequest(
            prompt=prepared.prompt.tokens,
            max_tokens=max_tokens,
            sampling=sampling,
            stop_sequences=tuple(request.stop_sequences or ()),
            context_limited=max_tokens < request.max_tokens,
            grammar=plan.grammar,
            thinking=plan.thinking,
            keep_leading_space=prepared.prompt.continues_assistant,
            side=is_side_request(request.model, prepared.prompt.tools, input_tokens),
        )
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
            f" tools={len(plan.tools)}" + (" forced" if plan.forced else "") if plan.tools else "",
        )
        self._check_busy()  # again: others may have been submitted meanwhile
        gone = disconnected(req)
        reply = Reply(
            self._engine.submit(model, generation),
            plan.assembler(continues_text=prepared.prompt.continues_assistant),
            request_id=request_id,
            prompt_tokens=input_tokens,
            metrics=self._metrics,
            coalesce=self._registry.config.server.text_interval_ms / 1000,
            thinking_end=plan.thinking_markers.end if plan.thinking_markers else None,
        )
        release_body(req)  # the engine has it now: its body no longer waits to be admitted
        return message_id, _Started(reply, model, input_tokens, cached, gone)

    def _check_busy(self) -> None:
        settings = self._registry.config.engine
        if self._engine.active_requests() >= settings.max_sequences + settings.max_queue:
            raise Busy(
                f"{settings.max_sequences} requests are generating and {settings.max_queue} "
                "more are waiting; try again shortly",
                {"retry-after": "2"},
            )


def request_sampling(request: MessagesRequest, model: LoadedModel) -> Sampling:
    """The request's sampling; what it leaves unset, the model's defaults (models/sampling.py)."""
    defaults = model.sampling
    return Sampling(
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        top_k=defaults.top_k if request.top_k is None else request.top_k,
        min_p=defaults.min_p if request.min_p is None else request.min_p,
        repetition_penalty=(
            defaults.repetition_penalty
            if request.repetition_penalty is None
            else request.repetition_penalty
        ),
    )


@dataclass(frozen=True)
class OutputPlan:
    """How a request's output is constrained and read back."""

    tools: list[dict[str, Any]]
    tool_format: ToolFormat | None
    forced: bool
    grammar: OutputGrammar | None
    thinking: ThinkingBudget | None
    thinking_markers: ThinkingMarkers | None
    thinking_open: bool
    single_call: bool

    def assembler(self, continues_text: bool = False) -> ContentAssembler:
        grammar = self.grammar
        calls = grammar is not None and bool(grammar.tools)
        json_reply = grammar is not None and grammar.reply_schema is not None
        return ContentAssembler(
            tool_format=self.tool_format,
            tools=self.tools,
            thinking=self.thinking_markers,
            thinking_open=self.thinking_open,
            constrained=calls,
            single_call=self.single_call,
            # Where the grammar allows calls or nothing else (forced, or
            # calls instead of the JSON reply), words after them end the turn.
            calls_only=calls and (self.forced or json_reply),
            signer=sign_thinking,
            continues_text=continues_text,
        )


def reply_schema(request: MessagesRequest) -> dict[str, Any] | None:
    """The JSON schema the reply's text must follow (structured output), if any."""
    config = request.output_config
    output_format = config.format if config is not None and config.format else request.output_format
    return output_format.schema if output_format is not None else None


def plan_output(request: MessagesRequest, prepared: PreparedPrompt) -> OutputPlan:
    """Which tools the output may call, in what format, under which grammar."""
    prompt = prepared.prompt
    loaded = prepared.model
    choice = request.tool_choice
    tools = prompt.tools
    forced = isinstance(choice, ToolChoiceAny | ToolChoiceTool)
    if isinstance(choice, ToolChoiceTool):
        tools = [t for t in tools if t["function"]["name"] == choice.name]
    single = bool(getattr(choice, "disable_parallel_tool_use", False))
    tool_format = prompt.tool_format
    thinks = loaded.builder.has_thinking
    strict = {tool.name for tool in request.tools or () if tool.strict}
    # A prefilled reply is the client's own start, which a grammar for a
    # whole document cannot continue: it is left free.
    schema = None if forced or prompt.continues_assistant else reply_schema(request)
    # Calls under tool_choice auto are constrained once they open, where the
    # format's body is JSON. Text before them must be free, and llguidance
    # lets no special token through free text: a reasoning model's thinking
    # markers are written into the grammar, but its optional calls stay
    # unconstrained (and are parsed whole) unless a tool asks to be strict or
    # the reply must be JSON (then its calls are in the grammar, as any object).
    lazy = (
        tool_format is not None
        and tool_format.json_body
        and not tool_format.start_in_body
        and (
            not thinks or schema is not None or any(t["function"]["name"] in strict for t in tools)
        )
    )
    if forced:
        # Forced calls are written in the generic format, whatever the
        # template's own: the grammar guarantees it, so it parses.
        tool_format = GENERIC
    tokenizer = loaded.tokenizer
    markers = ThinkingMarkers(tokenizer.think_start, tokenizer.think_end) if thinks else None
    budget = None
    if thinks and isinstance(request.thinking, ThinkingEnabled):
        budget = ThinkingBudget(request.thinking.budget_tokens, prompt.thinking_open)
    called = tools if tool_format is not None and (forced or lazy) else []
    grammar = None
    if called or schema is not None:
        grammar = loaded.grammars.enforceable(
            OutputGrammar(
                tools=tuple(
                    (
                        t["function"]["name"],
                        # A reasoning model's calls are constrained only to strict tools.
                        json.dumps(t["function"]["parameters"])
                        if forced or not thinks or t["function"]["name"] in strict
                        else None,
                    )
                    for t in called
                ),
                forced=forced,
                parallel=not single,
                start=tool_format.start if called and tool_format else "",
                end=tool_format.end if called and tool_format else "",
                reply_schema=None if schema is None else json.dumps(schema),
                # Thinking stays free: the grammar starts where it ends.
                thinking=(markers.start, markers.end) if markers and not forced else None,
                thinking_open=prompt.thinking_open,
            ),
        )
    return OutputPlan(
        tools=tools,
        tool_format=tool_format,
        forced=forced,
        grammar=grammar,
        thinking=budget,
        thinking_markers=markers,
        thinking_open=prompt.thinking_open,
        single_call=single and (grammar is None or not grammar.tools),
    )


# Below this many prompt tokens a request is a side request whatever it carries.
SIDE_PROMPT_TOKENS = 1024


def is_side_request(requested: str, tools: list[Any], prompt_tokens: int) -> bool:
    """Whether a request is a side request, by what it carries, not by its text.

    A main conversation turn shows the model tools and carries a long
    prompt; a session title, a quick helper call or a small-tier request
    does not (see `GenerationRequest.side`).
    """
    return not tools or prompt_tokens < SIDE_PROMPT_TOKENS or small_tier(requested)
