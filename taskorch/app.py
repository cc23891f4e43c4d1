"""The HTTP app: one Starlette app serving MCP (Streamable HTTP at /mcp, legacy SSE at /sse +
/messages/), the REST API (/api/v1/... and /openapi.json, from `taskorch.api`), /health and
/metrics, all on one service and one database opened once in the app's lifespan. Every refusal,
404 and 500 uses the REST error envelope.

Middleware, outermost first (each one sees only what the ones before it let through):
  ObserveRequests  metrics and the access log; outermost so refusals are counted too
  HostOriginGuard  DNS rebinding: a bad Host (421) or Origin (403) is refused before anything
                   answers it, preflights included; it never needs CORS headers, since what it
                   refuses is exactly what CORS would not allow
  CORSMiddleware   answers preflights (they carry no credentials, so before auth) and puts CORS
                   headers on every later answer, so a browser client can read its 401/413/429
  ApiKeyAuth       401 unless a configured key is presented (all routes but /health)
  RateLimit        per key, so after auth; anonymous clients by address
  BodyLimit        413; after auth and rate limit, so strangers and floods never get a body read
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .api import envelope_error, rest_routes
from .auth import ApiKeyAuth
from .config import Config
from .errors import TaskorchError
from .mcp_server import build_mcp
from .metrics import Metrics, ObserveRequests
from .models import Statistics
from .ratelimit import RateLimit, TokenBuckets
from .security import LOOPBACK_HOSTS, BodyLimit, HostOriginGuard, normalise_origin, split_host
from .service import TaskService, open_service

log = logging.getLogger(__name__)

CORS_HEADERS = ["Authorization", "Content-Type", "Mcp-Session-Id", "Mcp-Protocol-Version", "Last-Event-ID"]
HEALTH_MAX_AGE = 1.0  # seconds a /health answer may reuse queue statistics


class _ServiceRef:
    """The service, once the lifespan has opened it. `build_mcp` captures its service when the
    app is built, before the lifespan runs, so it is handed this stand-in."""

    def __init__(self, service: TaskService | None) -> None:
        self.service = service

    def get(self) -> TaskService:
        if self.service is None:
            raise RuntimeError("the taskorch service is not open: the app's lifespan has not started")
        return self.service

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


class _QueueSnapshot:
    """Queue statistics for /health and /metrics, read by one caller at a time. /health, which
    anyone may call, accepts a snapshot up to a second old: a full read costs tens of ms on a
    large queue."""

    def __init__(self, ref: _ServiceRef) -> None:
        self.ref = ref
        self.lock = anyio.Lock()
        self.value: Statistics | None = None
        self.at = float("-inf")

    async def get(self, max_age: float = 0.0) -> Statistics:
        async with self.lock:
            if self.value is None or time.monotonic() - self.at > max_age:
                self.value = await self.ref.get().statistics()
                self.at = time.monotonic()
            return self.value


class _AnswerOnce:
    """Drops what an endpoint sends after its response is complete. The SDK's /sse endpoint
    returns a Response after its event stream ends, which Starlette then sends: when the server
    stops, the stream ends first and uvicorn logs a RuntimeError traceback for that second answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        complete = False

        async def send_once(message: Message) -> None:
            nonlocal complete
            if complete:
                return
            complete = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        await self.app(scope, receive, send_once)


def _answer_once(route: BaseRoute) -> BaseRoute:
    if isinstance(route, Route) and route.path == "/sse":
        return Route(route.path, _AnswerOnce(route.app), methods=route.methods, name=route.name)
    return route


def _allowed_hosts(config: Config) -> list[str]:
    """Loopback names, the bind address when it is a specific one, and server.allowed_hosts."""
    bind = config.server.host
    hosts = [*LOOPBACK_HOSTS, *config.server.allowed_hosts]
    if bind not in ("0.0.0.0", "::"):
        hosts.append(f"[{bind}]" if ":" in bind else bind)
    for host in hosts:
        if split_host(host) is None:
            raise ValueError(f"server.allowed_hosts: {host!r} is not a host name or host:port")
    return hosts


def _sdk_security(hosts: list[str], origins: list[str]) -> TransportSecuritySettings:
    """The same rules for the SDK's own check, in its syntax (`name:*` for any port; a Host
    without a port must be listed as it is)."""
    sdk_hosts: list[str] = []
    for host in hosts:
        name, port = split_host(host) or (host, None)
        sdk_hosts += [f"{name}:{port}"] if port else [name, f"{name}:*"]
    loopback = [f"{scheme}://{h}{port}" for scheme in ("http", "https") for h in LOOPBACK_HOSTS for port in ("", ":*")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=sdk_hosts, allowed_origins=[*loopback, *origins]
    )


def check_server_config(config: Config) -> None:
    """Raise ValueError, naming the key, for server settings the HTTP app cannot serve."""
    if "*" in config.server.cors_origins:
        raise ValueError("server.cors_origins: '*' is not supported; list the browser origins to allow")
    _allowed_hosts(config)


def create_app(config: Config, service: TaskService | None = None, *, metrics: Metrics | None = None) -> Starlette:
    """The HTTP app. Without `service` it opens its own in its lifespan (`open_service(config=...)`,
    with `metrics` as its observer); a passed-in service stays the caller's to close (its task
    counters then move only if the caller opened it with this `metrics` as observer)."""
    server = config.server
    check_server_config(config)
    origins = [normalise_origin(o) for o in server.cors_origins]
    hosts = _allowed_hosts(config)
    metrics = metrics or Metrics()
    ref = _ServiceRef(service)

    def error(code: str, message: str, status: int, details: Any = None, headers: Any = None) -> Response:
        return envelope_error(code, message, details=details, status=status, headers=headers)

    mcp = build_mcp(cast(TaskService, ref))
    security = _sdk_security(hosts, origins)
    # json_response: each tool call is answered as one JSON body, not an SSE stream per POST. The
    # tools stream nothing (no progress, no server-initiated requests), and a plain response is one
    # that a graceful shutdown waits for: open SSE streams are closed at SIGTERM, answers and all.
    streamable = mcp.streamable_http_app(
        json_response=True, transport_security=security, max_request_body_size=server.max_body_bytes
    )
    sse = mcp.sse_app(transport_security=security, max_request_body_size=server.max_body_bytes)
    snapshot = _QueueSnapshot(ref)
    started = time.monotonic()

    async def health(request: Request) -> Response:
        return await _health(ref.get(), snapshot, started)

    async def metrics_endpoint(request: Request) -> Response:
        try:
            metrics.set_queue(await snapshot.get())
        except TaskorchError as e:  # busy: serve the counters, the gauges keep their last values
            log.warning("metrics: queue statistics unavailable: %s", e)
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    routes: list[BaseRoute] = [
        Route("/health", health),
        Route("/metrics", metrics_endpoint),
        *rest_routes(ref.get),
        *streamable.routes,
        *(_answer_once(r) for r in sse.routes),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if service is None:
                ref.service = await stack.enter_async_context(open_service(config=config, observer=metrics))
            stack.callback(setattr, ref, "service", service)
            # Runs the Streamable HTTP sessions; exits (ending them) before the database closes.
            await stack.enter_async_context(mcp.session_manager.run())
            log.info("taskorch %s serving http; database %s", __version__, ref.get().store.location)
            yield

    return Starlette(
        routes=routes,
        middleware=_middleware(config, metrics, routes, hosts, origins, error),
        lifespan=lifespan,
        exception_handlers=_exception_handlers(error),
    )


def _middleware(
    config: Config, metrics: Metrics, routes: list[BaseRoute], hosts: list[str], origins: list[str], error: Any
) -> list[Middleware]:
    """The stack, outermost first; the module docstring says why in this order."""
    server = config.server
    stack = [
        Middleware(ObserveRequests, metrics=metrics, routes=routes),
        Middleware(HostOriginGuard, allowed_hosts=hosts, allowed_origins=origins, error=error),
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=CORS_HEADERS,
            expose_headers=["Mcp-Session-Id"],
            allow_credentials=False,  # keys travel in a header the page sets, never as cookies
        ),
        Middleware(ApiKeyAuth, keys=server.api_key_values(), error=error),
    ]
    limit = server.rate_limit
    if limit.requests_per_minute:  # 0 = unlimited
        buckets = TokenBuckets(limit.requests_per_minute, limit.burst)
        stack.append(Middleware(RateLimit, buckets=buckets, error=error))
    stack.append(Middleware(BodyLimit, max_bytes=server.max_body_bytes, error=error))
    return stack


def _exception_handlers(error: Any) -> dict[Any, Any]:
    """404, 405 and 500 in the REST envelope too (the MCP endpoints answer for themselves)."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        if status == 404:
            return error("NOT_FOUND", "no such route; GET /openapi.json lists the REST API", 404)
        if status == 405:
            return error("VALIDATION_ERROR", f"{request.method} is not allowed on this route", 405, headers=exc.headers)
        return error("VALIDATION_ERROR" if status < 500 else "INTERNAL_ERROR", exc.detail, status, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        return error("INTERNAL_ERROR", "the server failed to answer; see its log", 500)

    return {HTTPException: http_error, 500: server_error}


async def _health(service: TaskService, snapshot: _QueueSnapshot, started: float) -> Response:
    """The seed's health document: 200 when the database answers, else 503."""
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    stats: Statistics | None = None
    begin = time.perf_counter()
    try:
        await service.store.ping()  # a round trip through the store's connection
        latency_ms = round((time.perf_counter() - begin) * 1e3, 3)
        stats = await snapshot.get(max_age=HEALTH_MAX_AGE)
        healthy, problem = True, None
    except TaskorchError as e:
        latency_ms = round((time.perf_counter() - begin) * 1e3, 3)
        healthy, problem = False, e.message
    uptime = time.monotonic() - started
    database: dict[str, Any] = {"healthy": healthy, "response_time": latency_ms, "last_checked": now}
    if problem:
        database["error"] = problem
    waiting = stats.by_status["waiting"] if stats else None
    working = stats.by_status["working"] if stats else None
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "timestamp": now,
        "version": __version__,
        "uptime": _duration(uptime),
        "uptime_seconds": round(uptime, 3),
        "components": {"database": database},
        "metrics": {
            "queue_size": None if stats is None else waiting + working,  # type: ignore[operator]
            "waiting": waiting,
            "working": working,
            "active_workers": stats.active_workers if stats else None,
        },
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + (f"{m}m" if d or h or m else "") + f"{s % 60}s"
