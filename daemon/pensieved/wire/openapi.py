"""Pensieve's own OpenAPI document, built from the request structs it validates with.

`daemon/pensieved/wire/openapi.json` is this module's output, kept in the repo
and served at `/openapi.json`; a test fails when the two drift apart.
Regenerate with `make openapi`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from pensieved import __version__
from pensieved.wire.openai_chat import ChatCompletionRequest
from pensieved.wire.protocol import CountTokensRequest, MessagesRequest

DOCUMENT = Path(__file__).with_name("openapi.json")
REF = "#/components/schemas/{name}"


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(name=schema)}}},
    }


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): _json("Error", "An Anthropic-shaped error") for status in statuses}


# 408: the body came too slowly ([server] body_timeout). 529: refused for
# memory, load, a full batch and queue, or shutdown.
PROTECTED_ERRORS = (400, 401, 403, 404, 408, 413, 500, 529)

RESPONSE_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["type", "error", "request_id"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
            "request_id": {"type": ["string", "null"]},
        },
    },
    "Usage": {
        "type": "object",
        "required": ["input_tokens", "output_tokens"],
        "properties": {
            "input_tokens": {"type": "integer", "minimum": 0},
            "output_tokens": {"type": "integer", "minimum": 0},
            "cache_creation_input_tokens": {"type": "integer", "minimum": 0},
            "cache_read_input_tokens": {"type": "integer", "minimum": 0},
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "model": {"type": "string"},
            "content": {"type": "array", "items": {"type": "object"}},
            "stop_reason": {"type": ["string", "null"]},
            "stop_sequence": {"type": ["string", "null"]},
            "usage": {"$ref": REF.format(name="Usage")},
        },
    },
    "TokenCount": {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {"input_tokens": {"type": "integer", "minimum": 0}},
    },
    "ModelInfo": {
        "type": "object",
        "required": ["type", "id", "display_name", "created_at"],
        "properties": {
            "type": {"const": "model"},
            "id": {"type": "string"},
            "display_name": {"type": "string"},
            "created_at": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["data", "has_more", "first_id", "last_id"],
        "properties": {
            "data": {"type": "array", "items": {"$ref": REF.format(name="ModelInfo")}},
            "has_more": {"type": "boolean"},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "model", "models", "memory"],
        "properties": {
            "status": {"enum": ["ok", "overloaded", "stopping"]},
            "model": {"type": "string"},
            "memory": {"$ref": REF.format(name="Memory")},
        },
    },
    "Memory": {
        "type": "object",
        "required": [
            "level",
            "available_gb",
            "pressure",
            "model_gb",
            "kv_cache_gb",
            "accepting_requests",
        ],
        "properties": {
            "level": {"enum": ["normal", "warn", "reject", "shutdown"]},
            "available_gb": {"type": "number"},
            "total_gb": {"type": "number"},
            "pressure": {"enum": ["normal", "warn", "critical", None]},
            "model_gb": {"type": "number"},
            "kv_cache_gb": {"type": "number"},
            "accepting_requests": {"type": "boolean"},
            "warn_below_gb": {"type": "number"},
            "reject_below_gb": {"type": "number"},
            "shutdown_below_gb": {"type": "number"},
            "budget_gb": {"type": ["number", "null"]},
            "rss_gb": {"type": "number"},
            "mlx_active_gb": {"type": "number"},
            "mlx_cache_gb": {"type": "number"},
            "mlx_peak_gb": {"type": "number"},
        },
    },
}


# OpenAI's error envelope, on its routes.
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def build_openapi() -> dict[str, Any]:
    (messages_ref, count_ref, chat_ref), components = msgspec.json.schema_components(
        [MessagesRequest, CountTokensRequest, ChatCompletionRequest], ref_template=REF
    )
    secured: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}]
    open_route: list[dict[str, list[str]]] = []
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Pensieve",
            "version": __version__,
            "description": "A local MLX model behind the Anthropic Messages API.",
        },
        "servers": [{"url": "http://127.0.0.1:7777"}],
        "security": secured,
        "paths": {
            "/": {
                "get": {
                    "operationId": "root",
                    "responses": {"200": {"description": "Name and version"}, **_errors(401, 403)},
                },
                "head": {
                    "operationId": "probe",
                    "security": open_route,
                    "responses": {"200": {"description": "Claude Code's connectivity probe"}},
                },
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "security": open_route,
                    "responses": {"200": _json("Health", "Status, models and memory")},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "security": open_route,
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "responses": {"200": {"description": "This document"}, **_errors(401, 403)},
                }
            },
            "/v1/models": {
                "get": {
                    "operationId": "listModels",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {"name": "after_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "before_id", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": _json("ModelList", "The configured models and Claude tiers"),
                        **_errors(400, 401, 403),
                    },
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "operationId": "getModel",
                    "parameters": [
                        {
                            "name": "model_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json("ModelInfo", "A configured model"),
                        **_errors(401, 403, 404),
                    },
                }
            },
            "/v1/messages": {
                "post": {
                    "operationId": "createMessage",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": messages_ref}},
                    },
                    "responses": {
                        "200": {
                            "description": "The message, or an SSE stream when `stream` is true",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": REF.format(name="Message")}
                                },
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **_errors(*PROTECTED_ERRORS),
                    },
                }
            },
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "description": "OpenAI's Chat Completions, on the same engine and prompt "
                    "cache; responses and errors in OpenAI's shapes (its published document).",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": chat_ref}},
                    },
                    "responses": {
                        "200": {
                            "description": "The completion, or chunks when `stream` is true",
                            "content": {
                                "application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **{
                            str(status): {
                                "description": "OpenAI's error envelope",
                                "content": {"application/json": {"schema": OPENAI_ERROR}},
                            }
                            for status in PROTECTED_ERRORS
                        },
                    },
                }
            },
            "/v1/messages/count_tokens": {
                "post": {
                    "operationId": "countTokens",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": count_ref}},
                    },
                    "responses": {
                        "200": _json("TokenCount", "Prompt tokens, counted with the chat template"),
                        **_errors(*PROTECTED_ERRORS),
                    },
                }
            },
        },
        "components": {
            "schemas": {**components, **RESPONSE_SCHEMAS},
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def render() -> str:
    return json.dumps(build_openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
