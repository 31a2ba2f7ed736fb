"""Prometheus metrics for one app: requests by route and status, latency, queue depth, in-flight,
and the CLIP score of each image that asked for one (`sdrt_clip_score`: watch it for drift).

Each app owns its registry (no process-global state), so several servers or tests can live in
one process. Route labels are the route templates ("/v2/models/{name}/infer"), never raw paths,
so a scanner cannot blow up the label cardinality.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.serving.engine import Engine
from runtime.serving.errors import CLIENT_CLOSED

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# CLIP scores run 0-100; SD 1.x images of their prompts score mostly 20-35 with ViT-L/14, unrelated
# pairs 10-20: fine buckets there, so drift of a few points shows.
CLIP_SCORE_BUCKETS = (5, 10, 15, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 40, 50, 75, 100)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sdrt_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "sdrt_http_request_duration_seconds", "HTTP request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.http_in_flight = Gauge(
            "sdrt_http_requests_in_flight", "HTTP requests being handled (counted once their body arrived)",
            registry=r,
        )  # fmt: skip
        queue = Gauge("sdrt_queue_depth", "generation jobs waiting for a worker", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        running = Gauge("sdrt_in_flight", "generation jobs running in workers", registry=r)
        running.set_function(lambda: engine.in_flight)
        ready = Gauge("sdrt_ready", "1 when warmed up and accepting work", registry=r)
        ready.set_function(lambda: float(engine.ready))
        self.batch_size = Histogram(
            "sdrt_batch_size", "requests per generate() call", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.images = Counter("sdrt_images_generated", "images returned to clients", registry=r)
        self.clip_score = Histogram(
            "sdrt_clip_score", "CLIP score of each image generated with clip_score (0-100)",
            buckets=CLIP_SCORE_BUCKETS, registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects from handlers)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            status = status or 500  # the app raised before answering
            raise
        finally:
            status = status or CLIENT_CLOSED  # returned without answering: the client left first
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
