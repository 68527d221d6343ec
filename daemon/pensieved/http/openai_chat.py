"""`POST /v1/chat/completions`: OpenAI's Chat Completions on the same engine and prompt cache.

The request is read as the Messages request it means (wire/openai_chat.py)
and started as `/v1/messages` starts one (`MessagesResource.start`: the model
loaded, the prompt rendered and planned, the generation submitted); only the
reply's shape is OpenAI's. So the same conversation sent through either API
renders the same tokens and reads the same prompt-cache entries.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import falcon
import falcon.asgi
import msgspec
from falcon.asgi import SSEvent

from pensieved.conversation.attachments import cheap_to_render
from pensieved.engine.stream import ClientGone, Failed, Finished
from pensieved.http.asgi import json_response, off_loop, read_body
from pensieved.http.messages import INLINE_BYTES, MessagesResource
from pensieved.http.reply import Reply
from pensieved.models.registry import ModelRegistry
from pensieved.wire.decode import check_request, decode_body
from pensieved.wire.openai_chat import ChatCompletionRequest, as_messages_request
from pensieved.wire.protocol import MessagesRequest

log = logging.getLogger(__name__)

# Where a request names no limit, the plan clamps this to what the model's window leaves.
UNLIMITED = 1 << 24
# Messages' stop reasons as Chat Completions' finish reasons.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class ChatCompletionsResource:
    def __init__(self, messages: MessagesResource, registry: ModelRegistry) -> None:
        self._messages = messages
        self._registry = registry

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self._messages.check_busy()
        body = await read_body(req)
        work = self._messages.work
        chat, request = await off_loop(work, len(body), _read, body)
        small = len(body) <= INLINE_BYTES and cheap_to_render(request)
        message_id, started = await self._messages.start(req, request, small)
        completion = {
            "id": "chatcmpl-" + message_id.removeprefix("msg_"),
            "created": int(time.time()),
            "model": started.model.name,
        }
        reply, gone = started.reply, started.gone
        if chat.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            usage = chat.stream_options is not None and chat.stream_options.include_usage
            resp.sse = _chunks(reply, gone, completion, usage)
            return
        event = await reply.finished(gone)
        if event is None:
            return
        message = _message(reply.assembler.blocks)
        reason = FINISH_REASONS.get(event.stop_reason, "stop")
        json_response(
            resp,
            {
                **completion,
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
                ],
                "usage": _usage(reply.usage(event)),
            },
        )


def _read(body: bytes) -> tuple[ChatCompletionRequest, MessagesRequest]:
    """The body as a Chat Completions request, and the Messages request it means, checked."""
    chat = decode_body(body, ChatCompletionRequest)
    request = as_messages_request(chat, UNLIMITED)
    check_request(request)
    return chat, request


def _message(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """A Messages reply's blocks as one Chat Completions assistant message."""
    text = "".join(block["text"] for block in blocks if block["type"] == "text")
    thinking = "".join(block["thinking"] for block in blocks if block["type"] == "thinking")
    calls = [
        {
            "id": block["id"],
            "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"])},
        }
        for block in blocks
        if block["type"] == "tool_use"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = thinking  # where vLLM, DeepSeek and their clients read it
    return message


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    cached = int(usage["cache_read_input_tokens"] or 0)
    prompt = int(usage["input_tokens"]) + cached
    output = int(usage["output_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {
            "reasoning_tokens": int(usage["output_tokens_details"]["thinking_tokens"])
        },
    }


async def _chunks(
    reply: Reply, gone: Any, completion: dict[str, Any], include_usage: bool
) -> AsyncIterator[SSEvent]:
    """The reply as `chat.completion.chunk` events, then `[DONE]`."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> SSEvent:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body = {**completion, "object": "chat.completion.chunk", "choices": [choice]}
        return SSEvent(data=msgspec.json.encode(body))

    tools: dict[int, int] = {}  # a tool_use block's index -> its place in tool_calls
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in reply.events(gone):
            if event is None:
                continue
            if isinstance(event, Failed):
                error = {"message": event.message, "type": event.error_type, "code": None}
                yield SSEvent(data=msgspec.json.encode({"error": error}))
                return
            if isinstance(event, Finished):
                yield chunk({}, FINISH_REASONS.get(event.stop_reason, "stop"))
                if include_usage:
                    usage = _usage(reply.usage(event))
                    body = {**completion, "object": "chat.completion.chunk", "choices": []}
                    yield SSEvent(data=msgspec.json.encode({**body, "usage": usage}))
                yield SSEvent(data=b"[DONE]")
                return
            if not isinstance(event, tuple):
                continue
            name, payload = event
            if name == "content_block_start" and payload["content_block"]["type"] == "tool_use":
                block = payload["content_block"]
                tools[payload["index"]] = place = len(tools)
                function = {"name": block["name"], "arguments": ""}
                call = {"index": place, "id": block["id"], "type": "function", "function": function}
                yield chunk({"tool_calls": [call]})
            elif name == "content_block_delta":
                delta = payload["delta"]
                if delta["type"] == "text_delta":
                    yield chunk({"content": delta["text"]})
                elif delta["type"] == "thinking_delta":
                    yield chunk({"reasoning_content": delta["thinking"]})
                elif delta["type"] == "input_json_delta":
                    place = tools[payload["index"]]
                    call = {"index": place, "function": {"arguments": delta["partial_json"]}}
                    yield chunk({"tool_calls": [call]})
    except ClientGone:
        return
    finally:
        reply.stream.cancel()
