"""`POST /v1/messages` and `POST /v1/messages/count_tokens`."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import falcon
import falcon.asgi

from pensieved import protocol
from pensieved.engine import (
    ClientGone,
    Engine,
    Failed,
    Finished,
    GenerationRequest,
    LoadedModel,
    Sampling,
    TextDelta,
)
from pensieved.errors import ApiError, EngineFailure, Overloaded, prompt_too_long
from pensieved.http import disconnected, json_response, read_body
from pensieved.prompt import Prompt
from pensieved.protocol import CountTokensRequest, MessagesRequest, decode_request
from pensieved.registry import ModelRegistry
from pensieved.sse import message_events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedPrompt:
    model: LoadedModel
    prompt: Prompt


class PromptPreparer:
    """Resolves the model, loads it if needed, and renders the prompt off the event loop."""

    def __init__(self, registry: ModelRegistry, engine: Engine) -> None:
        self._registry = registry
        self._engine = engine

    async def prepare(self, request: CountTokensRequest) -> PreparedPrompt:
        config = self._registry.resolve(request.model)
        try:
            loaded = await self._engine.load(config)
        except ApiError:
            raise
        except Exception as exc:
            raise EngineFailure(f"model {config.name!r} could not be loaded: {exc}") from exc
        # Chat templates and tokenizing ~20k-token prompts take milliseconds:
        # keep them off the event loop.
        prompt = await asyncio.to_thread(loaded.builder.build, request)
        return PreparedPrompt(loaded, prompt)


class CountTokensResource:
    def __init__(self, preparer: PromptPreparer) -> None:
        self._preparer = preparer

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        request = decode_request(await read_body(req), CountTokensRequest)
        prepared = await self._preparer.prepare(request)
        json_response(resp, {"input_tokens": len(prepared.prompt.tokens)})


class MessagesResource:
    def __init__(self, preparer: PromptPreparer, engine: Engine, registry: ModelRegistry) -> None:
        self._preparer = preparer
        self._engine = engine
        self._registry = registry

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        request = decode_request(await read_body(req), MessagesRequest)
        prepared = await self._preparer.prepare(request)
        model = prepared.model
        input_tokens = len(prepared.prompt.tokens)
        # One token of room is the least a reply needs.
        maximum = model.context_length - 1
        if input_tokens > maximum:
            raise prompt_too_long(input_tokens, maximum)
        # Claude Code asks for 64000; clamp to what fits, never reject.
        max_tokens = min(request.max_tokens, model.context_length - input_tokens)
        sampling = Sampling(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
        )
        generation = GenerationRequest(
            prompt=prepared.prompt.tokens,
            max_tokens=max_tokens,
            sampling=sampling,
            stop_sequences=tuple(request.stop_sequences or ()),
            context_limited=max_tokens < request.max_tokens,
        )
        message_id = protocol.new_message_id()
        request_id: str = req.context.request_id
        log.info(
            "%s %s model=%s→%s prompt=%d max_tokens=%d%s",
            request_id,
            "stream" if request.stream else "create",
            request.model,
            model.name,
            input_tokens,
            max_tokens,
            f" (asked {request.max_tokens})" if max_tokens != request.max_tokens else "",
        )
        started = time.perf_counter()
        gone = disconnected(req)
        stream = self._engine.submit(model, generation)
        if request.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            resp.sse = message_events(
                stream,
                message_id=message_id,
                model=model.name,
                input_tokens=input_tokens,
                ping_interval=self._registry.config.server.ping_interval,
                request_id=request_id,
                gone=gone,
            )
            return
        try:
            parts: list[str] = []
            while True:
                event = await stream.next_event(gone)
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Finished):
                    break
                elif isinstance(event, Failed):
                    if event.error_type == Overloaded.error_type:
                        raise Overloaded(event.message, {"retry-after": "5"})
                    raise EngineFailure(event.message)
        except ClientGone:
            log.info("%s client disconnected; generation dropped", request_id)
            return
        finally:
            stream.cancel()
        text = "".join(parts)
        log.info(
            "%s done: %s out=%d in %.2fs",
            request_id,
            event.stop_reason,
            event.output_tokens,
            time.perf_counter() - started,
        )
        content = [protocol.text_block(text)] if text else []
        json_response(
            resp,
            protocol.message(
                message_id,
                model.name,
                content,
                event.stop_reason,
                event.stop_sequence,
                protocol.usage(input_tokens, event.output_tokens),
            ),
        )
