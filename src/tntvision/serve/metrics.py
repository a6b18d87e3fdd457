"""Prometheus metrics of `tnt serve` (``GET /metrics``), in a registry of their own per app."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["MetricsMiddleware", "ServeMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _batch_buckets(max_batch: int) -> list[float]:
    """1, 2, 4, ... up to ``max_batch`` (included): a histogram that resolves every power of two."""
    edges, b = [], 1
    while b < max_batch:
        edges.append(float(b))
        b *= 2
    return [*edges, float(max_batch)]


class ServeMetrics:
    """Requests and errors by endpoint and status code, latency, batch sizes, queue depth.

    Args:
        max_batch: the largest batch, the top of the batch-size histogram.
        queue_depth: called at every scrape for the number of images waiting for an answer from the
            model (queued, gathered into the batch being formed, or running).
        endpoints: the paths counted under their own name; any other path is counted as ``other`` (a
            client cannot grow the label set).
    """

    def __init__(self, max_batch: int, queue_depth: Callable[[], float], endpoints: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self.endpoints = frozenset(endpoints)
        labels = ["endpoint", "code"]
        self.requests = Counter(
            "tnt_serve_requests", "HTTP requests answered", labels, registry=self.registry
        )
        self.errors = Counter(
            "tnt_serve_errors", "requests answered with a 4xx or 5xx status", labels, registry=self.registry
        )
        self.latency = Histogram(
            "tnt_serve_request_seconds",
            "time from a request's arrival to its response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tnt_serve_batch_size",
            "images per forward pass",
            buckets=_batch_buckets(max_batch),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "tnt_serve_batch_seconds",
            "model time per forward pass",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tnt_serve_queue_depth", "images waiting for the model's answer", registry=self.registry
        )
        self.queue_depth.set_function(queue_depth)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_request(self, path: str, code: int, seconds: float) -> None:
        endpoint = path if path in self.endpoints else "other"
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class MetricsMiddleware:
    """ASGI middleware: every HTTP response's status and latency into :class:`ServeMetrics`."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it answers, the server answers 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - started)
