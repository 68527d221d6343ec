"""The Falcon ASGI app: routes, middleware, and Anthropic-shaped errors for everything."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from typing import Any

import falcon
import falcon.asgi
import psutil

from pensieved import __version__
from pensieved.config import Config, ModelConfig
from pensieved.engine import cpu, openblas
from pensieved.engine.core import Engine
from pensieved.engine.loading import LoadedModel
from pensieved.http.admission import AdmissionMiddleware
from pensieved.http.asgi import json_response
from pensieved.http.messages import CountTokensResource, MessagesResource, PromptPreparer
from pensieved.http.metrics import Metrics, MetricsMiddleware, MetricsResource
from pensieved.http.models import ModelsResource
from pensieved.http.openai_chat import ChatCompletionsResource
from pensieved.http.origin import HostOriginGuard
from pensieved.http.work import RequestWork
from pensieved.memory.guard import MemoryGuard
from pensieved.memory.levels import Level
from pensieved.models.registry import ModelRegistry
from pensieved.paths import GB
from pensieved.wire.errors import (
    MESSAGE_CHARS,
    ApiError,
    AuthenticationFailed,
    error_body,
    error_type_for_status,
    shown,
)
from pensieved.wire.openapi import DOCUMENT

log = logging.getLogger(__name__)


class RequestIdMiddleware:
    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.request_id = f"req_{secrets.token_hex(12)}"
        resp.set_header("request-id", req.context.request_id)


class AuthMiddleware:
    """Token on every route but the connectivity probe; /health without it says only the status.

    The full /health and /metrics tell who is doing what (model paths,
    requests, tokens per second, prompt-cache activity): for the token's
    holder, not for every local user.
    """

    OPEN = frozenset({("HEAD", "/")})
    BRIEF = ("GET", "/health")

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        route = (req.method, req.path.rstrip("/") or "/")
        if route in self.OPEN:
            return
        try:
            self._check(req)
        except AuthenticationFailed:
            if route != self.BRIEF:
                raise
            req.context.brief = True  # a liveness probe: the status alone

    def _check(self, req: falcon.asgi.Request) -> None:
        provided = req.get_header("x-api-key")
        if provided is None:
            authorization = req.get_header("Authorization") or ""
            scheme, _, value = authorization.partition(" ")
            provided = value.strip() if scheme.lower() == "bearer" else None
        if not provided:
            raise AuthenticationFailed(
                "missing credentials: send the token as x-api-key or Authorization: Bearer"
            )
        if not hmac.compare_digest(provided.encode(), self._token):
            raise AuthenticationFailed("invalid x-api-key")
        req.context.credential = provided  # message threads are held per token


class RootResource:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        json_response(resp, {"name": "pensieve", "version": __version__, "status": "ok"})

    async def on_head(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.status = 200
        resp.content_type = falcon.MEDIA_JSON


class OpenApiResource:
    def __init__(self) -> None:
        self._document = DOCUMENT.read_bytes()

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._document


def health_report(
    config: Config, engine: Engine, started: float, guard: MemoryGuard
) -> dict[str, Any]:
    """What `/health` and `pensievectl status` show."""
    import mlx.core as mx  # reading allocator counters is not array work

    loaded = {m.config: m for m in engine.loaded()}
    status, reason = daemon_status(config, engine, guard)
    return {
        "status": status,
        **({"reason": reason} if reason else {}),
        "version": __version__,
        "pid": os.getpid(),
        "listen": config.base_url,
        "uptime_s": round(time.time() - started, 1),
        "model": config.default_model.name,
        "models": [_model_health(m, loaded.get(m), engine) for m in config.models],
        "backend": {
            "device": str(mx.default_device().type).rsplit(".", 1)[-1],
            "openblas": openblas.openblas_active(),
            # Which BLAS: blas, blas_kernel, blas_threads, blas_coretype, blas_fallback.
            **cpu.blas_report().health(),
        },
        "requests": {
            "active": engine.active_requests(),
            "served": engine.requests_served,
            "tokens_per_s_last_minute": round(engine.tokens_per_second(), 2),
        },
        "prompt_cache": {
            "bytes": engine.prompt_cache.nbytes,
            "budget_bytes": engine.prompt_cache.max_bytes,
            "entries": len(engine.prompt_cache),
            "hit_tokens": engine.prompt_cache.hit_tokens,
        },
        "memory": {
            # level, available_gb, total_gb, pressure, accepting_requests, the lines
            **guard.report(),
            "model_gb": round(sum(m.weight_bytes for m in loaded.values()) / GB, 3),
            "rss_gb": round(psutil.Process().memory_info().rss / GB, 3),
            "mlx_active_gb": round(mx.get_active_memory() / GB, 3),
            "mlx_cache_gb": round(mx.get_cache_memory() / GB, 3),
            "mlx_peak_gb": round(mx.get_peak_memory() / GB, 3),
            "kv_cache_gb": round(engine.kv_cache_bytes / GB, 4),
        },
    }


def daemon_status(config: Config, engine: Engine, guard: MemoryGuard) -> tuple[str, str | None]:
    """ok, overloaded, stopping, or degraded (the default model cannot serve), and why."""
    if guard.draining or (not guard.accepting and guard.level is not Level.REJECT):
        return "stopping", None
    if not guard.accepting:
        return "overloaded", None
    default = config.default_model
    failed = engine.failed_loads.get(default)
    if failed is not None and not engine.is_loaded(default):
        return "degraded", f"the default model {default.name!r} cannot load: {failed}"
    return "ok", None


class HealthResource:
    def __init__(
        self, registry: ModelRegistry, engine: Engine, started: float, guard: MemoryGuard
    ) -> None:
        self._registry = registry
        self._engine = engine
        self._started = started
        self._guard = guard

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if getattr(req.context, "brief", False):
            status, _ = daemon_status(self._registry.config, self._engine, self._guard)
            json_response(resp, {"status": status})
            return
        report = health_report(self._registry.config, self._engine, self._started, self._guard)
        json_response(resp, report)


def _model_health(model: ModelConfig, loaded: LoadedModel | None, engine: Engine) -> dict[str, Any]:
    return {
        "name": model.name,
        "source": model.source,
        "loaded": loaded is not None,
        "context_length": loaded.context_length if loaded else None,
        "dequantized": loaded.dequantized if loaded else None,
        "memory_gb": round(loaded.weight_bytes / GB, 3) if loaded else None,
        # Tool calls in the model's own template format, or Pensieve's generic one.
        "tool_format": (
            ("native" if loaded.builder.native_format else "generic") if loaded else None
        ),
        # What an image block becomes: "vision" (the model sees it), or for a
        # text model its `images` setting ("placeholder" or "reject").
        "images": (("vision" if loaded.vision is not None else model.images) if loaded else None),
        # What a request that leaves temperature, top_p, top_k or min_p unset gets.
        "sampling": engine.sampling_defaults(model).report(),
    }


# The routes that answer in OpenAI's shapes.
OPENAI_ROUTES = ("/v1/chat/completions",)


def _write_error(
    req: falcon.asgi.Request,
    resp: falcon.asgi.Response,
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    request_id = getattr(req.context, "request_id", None)
    if request_id is None:  # failed before the middleware ran
        request_id = f"req_{secrets.token_hex(12)}"
        resp.set_header("request-id", request_id)
    for name, value in (headers or {}).items():
        resp.set_header(name, value)
    if req.path.startswith(OPENAI_ROUTES):
        # OpenAI's envelope, which its SDKs read (the same statuses and words).
        error = {"message": message, "type": error_type, "param": None, "code": None}
        json_response(resp, {"error": error}, status)
        return
    json_response(resp, error_body(error_type, message, request_id, details), status)


async def _handle_api_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: ApiError, params: dict[str, Any]
) -> None:
    # Quoted and cut short: a client's value in the path or message is one bounded line.
    log.info(
        "%s %s %r → %d %r",
        getattr(req.context, "request_id", "-"),
        req.method,
        shown(req.path),
        ex.status,
        shown(ex.message, MESSAGE_CHARS),
    )
    _write_error(req, resp, ex.status, ex.error_type, ex.message, ex.headers, ex.details)


async def _handle_http_error(
    req: falcon.asgi.Request,
    resp: falcon.asgi.Response,
    ex: falcon.HTTPError,
    params: dict[str, Any],
) -> None:
    status = ex.status_code
    if status == 404:
        message = f"not found: {req.method} {shown(req.path)}"
    elif status == 405:
        message = f"method {req.method} is not allowed on {shown(req.path)}"
    else:
        message = ex.description or ex.title or "request failed"
    _write_error(req, resp, status, error_type_for_status(status), message)


async def _handle_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: dict[str, Any]
) -> None:
    # Never a traceback in a response: log it, answer with the request id.
    log.exception("unhandled error on %s %r", req.method, shown(req.path))
    _write_error(req, resp, 500, "api_error", "internal server error; see the daemon log")


def create_app(
    registry: ModelRegistry,
    engine: Engine,
    token: str,
    started: float | None = None,
    guard: MemoryGuard | None = None,
    work: RequestWork | None = None,
) -> falcon.asgi.App[Any, Any]:
    started = started or time.time()
    config = registry.config
    guard = guard or MemoryGuard(config.memory, engine=engine)
    preparer = PromptPreparer(registry, engine, work)
    metrics = Metrics(engine, registry)
    middleware: list[Any] = [
        RequestIdMiddleware(),
        MetricsMiddleware(metrics),
        HostOriginGuard(config.server.port, config.server.allow_remote),
        AuthMiddleware(token),
        # Read per request: a reload's new body_timeout applies at once.
        AdmissionMiddleware(guard, lambda: registry.config.server.body_timeout),
    ]
    app: falcon.asgi.App[Any, Any] = falcon.asgi.App(
        middleware=middleware,
        cors_enable=False,
    )
    app.req_options.strip_url_path_trailing_slash = True
    models = ModelsResource(registry, engine)
    app.add_route("/", RootResource())
    app.add_route("/health", HealthResource(registry, engine, started, guard))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/openapi.json", OpenApiResource())
    app.add_route("/v1/models", models)
    app.add_route("/v1/models/{model_id}", models, suffix="one")
    messages = MessagesResource(preparer, engine, registry, metrics)
    app.add_route("/v1/messages", messages)
    app.add_route("/v1/chat/completions", ChatCompletionsResource(messages, registry))
    app.add_route("/v1/messages/count_tokens", CountTokensResource(preparer))
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(falcon.HTTPError, _handle_http_error)
    app.add_error_handler(ApiError, _handle_api_error)
    return app
