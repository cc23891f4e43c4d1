"""Rate limiting of the HTTP app: a token bucket per API key (per client address when anonymous).

Each client's bucket holds up to `burst` requests and refills at `requests_per_minute / 60` per
second. A request that finds it empty gets 429 with `Retry-After` at once: nothing waits, so a
noisy client costs the others one dictionary lookup. Buckets live in an LRU map; a bucket idle
long enough to be full again is the same as none and is dropped, and the map never holds more
than `max_clients` (the least recently seen client then starts again with a full bucket).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import CLIENT
from .security import ErrorResponse


class TokenBuckets:
    def __init__(
        self,
        requests_per_minute: int,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if requests_per_minute <= 0 or burst < 1:
            raise ValueError("requests_per_minute and burst must be positive")
        self.rate = requests_per_minute / 60.0  # tokens per second
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self.refill_seconds = self.burst / self.rate  # an idle bucket is full again after this
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # client -> [tokens, at]

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Spend one token of `client`'s bucket: 0.0 if there was one, else the seconds until there is."""
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            self._evict(now)
            bucket = self._buckets[client] = [self.burst, now]
        else:
            self._buckets.move_to_end(client)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            _, (_, at) = next(iter(buckets.items()))
            if now - at < self.refill_seconds and len(buckets) < self.max_clients:
                break
            buckets.popitem(last=False)


class RateLimit:
    """429 + `Retry-After` (whole seconds, >= 1) when the client's bucket is empty."""

    def __init__(self, app: ASGIApp, *, buckets: TokenBuckets, error: ErrorResponse) -> None:
        self.app = app
        self.buckets = buckets
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get(CLIENT)
        if client is None:
            address = scope.get("client")
            client = "addr:" + (address[0] if address else "unknown")
        wait = self.buckets.take(client)
        if not wait:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        message = f"too many requests; retry after {retry_after} s (server.rate_limit)"
        details = {"retry_after_seconds": retry_after}
        response = self.error("RATE_LIMITED", message, 429, details, headers={"Retry-After": str(retry_after)})
        await response(scope, receive, send)
