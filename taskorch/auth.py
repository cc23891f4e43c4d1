"""API-key authentication of the HTTP app: `Authorization: Bearer <key>` on every route but /health.

Keys are kept only as SHA-256 digests and compared with `hmac.compare_digest` against every
configured key (no early exit); neither a key nor a digest is ever logged or echoed. An accepted
request carries its principal in the scope:
- `scope["user"]`: the MCP SDK's `AuthenticatedUser`. The SDK records it as the owner of the
  Streamable HTTP and SSE sessions it opens and answers 404 when another key uses them, so a
  session cannot be hijacked with a different key;
- `scope[CLIENT]`: `key:<digest prefix>`, the rate limiter's bucket.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from starlette.types import ASGIApp, Receive, Scope, Send

from .security import ErrorResponse

log = logging.getLogger(__name__)

CLIENT = "taskorch.client"  # scope key: who the request is counted against
MAX_HEADER = 1024  # longer Authorization values are refused unread
_CHALLENGE = 'Bearer realm="taskorch"'


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def route_path(scope: Scope) -> str:
    """The path the router matches (without the root_path a proxy may mount the app under)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyAuth:
    """401 with `WWW-Authenticate: Bearer` unless exactly one Authorization header carries a
    configured key. The scheme is matched case-insensitively (RFC 7235); a key in the query
    string is not looked at. With no keys configured every request passes."""

    def __init__(
        self, app: ASGIApp, *, keys: Iterable[str], error: ErrorResponse, open_paths: Iterable[str] = ("/health",)
    ) -> None:
        self.app = app
        self.error = error
        self.digests = tuple({_digest(k) for k in keys})
        self.open_paths = frozenset(open_paths)
        # Built once per key: the SDK's principal (session owner) and the rate-limit bucket name.
        self.principals = {
            d: (AuthenticatedUser(AccessToken(token=d.hex(), client_id=d.hex(), scopes=[])), "key:" + d.hex()[:16])
            for d in self.digests
        }

    def verify(self, values: list[bytes]) -> bytes | None:
        """The digest of the presented key if it is a configured one, else None."""
        if len(values) != 1 or len(values[0]) > MAX_HEADER:
            return None
        scheme, _, token = values[0].partition(b" ")
        token = token.lstrip(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        presented = _digest(token)
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(presented, digest)
        return presented if found else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.digests or route_path(scope) in self.open_paths:
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        digest = self.verify(values)
        if digest is None:
            client = scope.get("client")
            why = "no API key" if not values else "an invalid Authorization header"
            log.info("refused %s %s from %s: %s", scope.get("method", ""), route_path(scope), client and client[0], why)
            challenge = _CHALLENGE + (', error="invalid_token"' if values else "")
            message = "a valid API key is required: send the header Authorization: Bearer <key>"
            response = self.error("UNAUTHORIZED", message, 401, headers={"WWW-Authenticate": challenge})
            await response(scope, receive, send)
            return
        scope["user"], scope[CLIENT] = self.principals[digest]
        await self.app(scope, receive, send)
