"""Request guards of the HTTP app that need no identity: Host / Origin validation and the body cap.

Both are pure ASGI middleware composed in `taskorch.app`. Their refusals use the REST envelope
through the `ErrorResponse` callable the app hands them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# (code, message, status, details, headers) -> Response; the app binds it to the REST envelope.
ErrorResponse = Callable[..., Response]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})  # as urlsplit().hostname gives them


def split_host(host: str) -> tuple[str, str | None] | None:
    """`name[:port]` -> (lowercase name, port or None); None when malformed. IPv6 keeps its brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[: end + 1], host[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, sep, port_ = host.partition(":")
        port = port_ if sep else None
    if not name or (port is not None and not port.isdigit()):
        return None
    return name, port


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lowercase), without building a Headers object."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def normalise_origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


class HostOriginGuard:
    """DNS-rebinding protection on every route, whatever the bind address.

    Host must be a loopback name (any port) or one of `allowed_hosts` (`name` = any port,
    `name:port` = that port): else 421. Origin, when present, must be a loopback origin
    (http or https, any port) or one of `allowed_origins`: else 403. No Origin is fine
    (CLI clients and same-origin GETs send none); `Origin: null` is refused.
    """

    def __init__(
        self, app: ASGIApp, *, allowed_hosts: Iterable[str], allowed_origins: Iterable[str], error: ErrorResponse
    ) -> None:
        self.app = app
        self.error = error
        self.any_port: set[str] = set()
        self.exact: set[tuple[str, str]] = set()
        for entry in (*LOOPBACK_HOSTS, *allowed_hosts):
            parsed = split_host(entry)
            if parsed is None:
                raise ValueError(f"server.allowed_hosts: {entry!r} is not a host name or host:port")
            name, port = parsed
            if port is None:
                self.any_port.add(name)
            else:
                self.exact.add((name, port))
        self.origins = frozenset(normalise_origin(o) for o in allowed_origins)

    def host_allowed(self, host: str | None) -> bool:
        parsed = split_host(host) if host else None
        if parsed is None:
            return False
        name, port = parsed
        return name in self.any_port or (port is not None and (name, port) in self.exact)

    def origin_allowed(self, origin: str) -> bool:
        origin = normalise_origin(origin)
        if origin in self.origins:
            return True
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018 (raises ValueError on a malformed port)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK_NAMES and not parts.path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = header(scope, b"host")
        if not self.host_allowed(host):
            log.warning("refused a request with Host %.100r (DNS rebinding protection)", host)
            message = "the Host header names no host this server answers for; add it to server.allowed_hosts"
            response = self.error("FORBIDDEN", message, 421)
        elif (origin := header(scope, b"origin")) is not None and not self.origin_allowed(origin):
            log.warning("refused a request with Origin %.100r", origin)
            response = self.error("FORBIDDEN", "requests from this Origin are not allowed (server.cors_origins)", 403)
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413: by Content-Length before the app runs,
    and, for bodies of unknown length (chunked), while reading them, before the app sees any."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, error: ErrorResponse) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.error = error

    def too_large(self) -> Response:
        message = f"the request body is larger than {self.max_bytes} bytes (server.max_body_bytes)"
        return self.error("PAYLOAD_TOO_LARGE", message, 413, {"max_bytes": self.max_bytes})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        if length is not None:
            # The server reads exactly Content-Length bytes (HTTP/1.1 framing), so the header is the
            # whole check; a malformed one never gets here (the server answers 400 itself).
            if length.strip().isdigit() and int(length) > self.max_bytes:
                await self.too_large()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # Unknown length: read it all, counting, and hand the app a replay. Bodies here are small
        # JSON documents, so buffering costs at most max_bytes per request.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the end
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self.too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
