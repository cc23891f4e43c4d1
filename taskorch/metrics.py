"""Prometheus metrics of the HTTP server, all named `taskorch_*`, in a registry of their own.

`Metrics` is the service's observer (task transitions, store latencies) and holds the HTTP
request metrics; `ObserveRequests` is the outermost middleware that feeds those and writes the
access log. Each app has its own `CollectorRegistry`, so several apps in one process (tests)
do not clash and nothing lives at module level.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .auth import route_path
from .models import Statistics, Status

access_log = logging.getLogger("taskorch.access")

TASK_EVENTS = ("created", "claimed", "completed", "failed", "retried", "lease_expired")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metrics of one app; implements `taskorch.service.ServiceObserver`."""

    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        self.requests = Counter(
            "taskorch_http_requests", "HTTP requests by method, route template and status.",
            ["method", "route", "status"], registry=reg,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "taskorch_http_request_duration_seconds", "Time to answer an HTTP request (streams: until closed).",
            ["method", "route"], buckets=_FAST, registry=reg,
        )  # fmt: skip
        self.in_progress = Gauge(
            "taskorch_http_requests_in_progress", "HTTP requests being answered (open streams included).", registry=reg
        )
        self.task_events = {
            kind: Counter(f"taskorch_tasks_{kind}", f"Tasks {kind.replace('_', ' ')} by this server.", registry=reg)
            for kind in TASK_EVENTS
        }
        self.store_seconds = Histogram(
            "taskorch_store_operation_duration_seconds", "Duration of store operations (one transaction each).",
            ["operation"], buckets=_FAST, registry=reg,
        )  # fmt: skip
        self.tasks = Gauge("taskorch_tasks", "Tasks in the queue by status (at scrape time).", ["status"], registry=reg)
        self.active_workers = Gauge("taskorch_active_workers", "Distinct workers holding a live lease.", registry=reg)
        info = Gauge("taskorch_build_info", "The running taskorch version.", ["version"], registry=reg)
        info.labels(__version__).set(1)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    # ServiceObserver
    def task_event(self, kind: str, count: int) -> None:
        counter = self.task_events.get(kind)
        if counter is not None:
            counter.inc(count)

    def store_latency(self, operation: str, seconds: float) -> None:
        self.store_seconds.labels(operation).observe(seconds)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # label lookups take a lock; the set of keys is small and bounded
            children = self._children[key] = (
                self.requests.labels(method, route, str(status)),
                self.request_seconds.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def set_queue(self, stats: Statistics) -> None:
        for status in Status:
            self.tasks.labels(status.value).set(stats.by_status.get(status.value, 0))
        self.active_workers.set(stats.active_workers)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if the scraper asks) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class ObserveRequests:
    """Outermost middleware: counts and times every request, refused ones included, by route
    template (never the raw path: ids would explode the label set), and logs one access line
    without the query string."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:  # refused before routing: find what it would have matched
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "<unmatched>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = route_path(scope)  # now: a Mount rewrites root_path on the way in
        status = 500  # if the app fails before answering
        self.metrics.in_progress.inc()

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            self.metrics.in_progress.dec()
            seconds = time.perf_counter() - start
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.observe_request(method, self.template(scope), status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info("%s %s %s %d %.1fms", client[0] if client else "-", method, path, status, seconds * 1e3)
