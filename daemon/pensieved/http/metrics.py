"""`GET /metrics`: Prometheus text format, from prometheus-client.

Counters and histograms are fed as requests finish; the engine's state
(queue, batch, prompt cache) is read when the endpoint is scraped. Each app
has its own registry, so nothing is shared between daemons in one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import falcon
import falcon.asgi
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pensieved.engine.core import Engine
    from pensieved.models.registry import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, engine: Engine, registry: ModelRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pensieve_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "pensieve_tokens",
            "Tokens of finished messages: input (prefilled), cached (from the prefix "
            "cache) and output.",
            ["kind"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "pensieve_time_to_first_token_seconds",
            "From the request's arrival at the engine to its first output token.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.decode_rate = Histogram(
            "pensieve_decode_tokens_per_second",
            "Output tokens per second after the first, per message.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine, registry))

    def observe_reply(
        self, prefilled: int, cached: int, output: int, ttft: float | None, rate: float | None
    ) -> None:
        self.tokens.labels("input").inc(prefilled)
        self.tokens.labels("cached").inc(cached)
        self.tokens.labels("output").inc(output)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        if rate is not None:
            self.decode_rate.observe(rate)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, registry: ModelRegistry) -> None:
        self._engine = engine
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        active = self._engine.active_requests()
        batch = self._registry.config.engine.max_sequences
        cache = self._engine.prompt_cache
        yield GaugeMetricFamily(
            "pensieve_queue_depth",
            "Requests waiting for a place in the batch.",
            value=max(0, active - batch),
        )
        yield GaugeMetricFamily(
            "pensieve_inflight_sequences", "Sequences in the batch.", value=min(active, batch)
        )
        yield GaugeMetricFamily(
            "pensieve_prompt_cache_bytes", "Bytes held by the prompt cache.", value=cache.nbytes
        )
        yield GaugeMetricFamily(
            "pensieve_prompt_cache_budget_bytes",
            "The prompt cache's byte budget.",
            value=cache.max_bytes,
        )
        yield CounterMetricFamily(
            "pensieve_prompt_cache_hit_tokens",
            "Prompt tokens served from the prompt cache instead of prefill.",
            value=cache.hit_tokens,
        )


class MetricsMiddleware:
    """Counts every response by its route template and status."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        route = req.uri_template or "unmatched"
        self._metrics.requests.labels(route, str(resp.status_code)).inc()


class MetricsResource:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = CONTENT_TYPE
        resp.data = generate_latest(self._metrics.registry)
