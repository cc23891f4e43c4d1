"""The HTTP app's guards through real HTTP (uvicorn on 127.0.0.1): API keys on every route but
/health and on the MCP endpoints, MCP sessions bound to the key that opened them, rate limits,
Host / Origin checks at any bind address, the body cap, CORS, and the refusal to serve an open
server beyond loopback. The bypass corpus follows reliability-plan R11 and R13.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client.sse import sse_client
from test_http_app import KEY, auth, call, http_config, mcp_session, serve_app

from taskorch.app import create_app
from taskorch.ratelimit import TokenBuckets

pytestmark = pytest.mark.anyio
OTHER_KEY = "second-key-fedcba9876543210"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def client_for(tmp_path: Path, **server: Any) -> AsyncIterator[httpx2.AsyncClient]:
    async with serve_app(create_app(http_config(tmp_path, **server))) as base:
        async with httpx2.AsyncClient(base_url=base, timeout=10) as client:
            yield client


# -- authentication --------------------------------------------------------------------------------

# Every way of not presenting exactly one valid key (R11), as header lists and a query string.
BYPASSES: dict[str, tuple[list[tuple[str, str]], str]] = {
    "no header": ([], ""),
    "empty bearer": ([("Authorization", "Bearer")], ""),
    "key and more": ([("Authorization", f"Bearer {KEY} {KEY}")], ""),
    "comma list": ([("Authorization", f"Bearer {KEY}, Bearer {KEY}")], ""),
    "basic": ([("Authorization", f"Basic {KEY}")], ""),
    "bare key": ([("Authorization", KEY)], ""),
    "wrong key": ([("Authorization", "Bearer not-the-key")], ""),
    "one char off": ([("Authorization", f"Bearer {KEY[:-1]}X")], ""),
    "prefix": ([("Authorization", f"Bearer {KEY[:-3]}")], ""),
    "suffix": ([("Authorization", f"Bearer {KEY}0")], ""),
    "two headers": ([("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")], ""),
    "key in query": ([], f"?api_key={KEY}&access_token={KEY}&key={KEY}"),
    "key as token param": ([("Authorization", "Bearer")], f"?token={KEY}"),
    "long header": ([("Authorization", "Bearer " + "k" * 12_000)], ""),
}
GUARDED = [
    ("GET", "/api/v1/statistics"),
    ("POST", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks/next"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("POST", "/mcp"),
    ("GET", "/mcp"),
    ("GET", "/sse"),
    ("POST", "/messages/"),
]


async def test_every_bypass_attempt_on_every_guarded_route_gets_401(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    async with client_for(tmp_path, api_keys=[KEY]) as client:
        for name, (headers, query) in BYPASSES.items():
            for method, path in GUARDED:
                r = await client.request(method, path + query, headers=[*headers, *MCP_HEADERS.items()], json=INIT)
                where = f"{name}: {method} {path}"
                assert r.status_code == 401, where
                assert r.headers["www-authenticate"].startswith('Bearer realm="taskorch"'), where
                assert r.json()["error"]["code"] == "UNAUTHORIZED", where
                assert KEY not in r.text and KEY[:-3] not in r.text, where
    server_logs = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx2", "httpcore2"))]
    assert server_logs and not any(KEY[:-3] in line for line in server_logs)  # no key material, tried or real


async def test_16_kib_authorization_header_is_refused(tmp_path: Path) -> None:
    async with client_for(tmp_path, api_keys=[KEY]) as client:
        r = await client.get("/api/v1/statistics", headers={"Authorization": "Bearer " + "k" * 16_384})
        assert r.status_code in (400, 401, 431)  # the server's header limit or ours; never accepted


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_a_configured_key_is_accepted_with_the_scheme_in_any_case(tmp_path: Path, scheme: str) -> None:
    async with client_for(tmp_path, api_keys=[OTHER_KEY, KEY]) as client:
        r = await client.get("/api/v1/statistics", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200 and r.json()["success"] is True


async def test_health_is_open_and_everything_else_needs_a_key(tmp_path: Path) -> None:
    async with client_for(tmp_path, api_keys=[KEY]) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=auth())).status_code == 200
        assert (await client.get("/openapi.json", headers=auth())).status_code == 200


async def test_mcp_over_both_transports_needs_the_key(tmp_path: Path) -> None:
    app = create_app(http_config(tmp_path, api_keys=[KEY]))
    async with serve_app(app) as base:
        for transport in ("http", "sse"):
            async with mcp_session(base, transport, auth()) as session:
                assert (await call(session, "statistics", {}))["total"] == 0
            # The SDK reports the 401 differently per transport (HTTPStatusError, MCPError -32603);
            # the statuses themselves are checked request by request above.
            with anyio.fail_after(5), pytest.raises(Exception):  # noqa: B017
                async with mcp_session(base, transport, auth("wrong")):
                    pass


async def test_a_streamable_http_session_cannot_be_used_with_another_key(tmp_path: Path) -> None:
    async with client_for(tmp_path, api_keys=[KEY, OTHER_KEY]) as client:
        r = await client.post("/mcp", json=INIT, headers={**MCP_HEADERS, **auth(KEY)})
        assert r.status_code == 200
        session = r.headers["mcp-session-id"]
        headers = {**MCP_HEADERS, "Mcp-Session-Id": session, "Mcp-Protocol-Version": "2025-11-25"}
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        hijack = await client.post("/mcp", json=ping, headers={**headers, **auth(OTHER_KEY)})
        assert hijack.status_code == 404  # as if the session did not exist
        assert (await client.get("/mcp", headers={**headers, **auth(OTHER_KEY)})).status_code == 404
        assert (await client.delete("/mcp", headers={**headers, **auth(OTHER_KEY)})).status_code == 404
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await client.post("/mcp", json=initialized, headers={**headers, **auth(KEY)})).status_code == 202
        owner = await client.post("/mcp", json=ping, headers={**headers, **auth(KEY)})
        assert owner.status_code == 200 and '"result"' in owner.text


async def test_an_sse_session_cannot_be_used_with_another_key(tmp_path: Path) -> None:
    app = create_app(http_config(tmp_path, api_keys=[KEY, OTHER_KEY]))
    sessions: list[str] = []
    async with serve_app(app) as base, httpx2.AsyncClient(base_url=base) as client:
        async with sse_client(f"{base}/sse", headers=auth(KEY), on_session_created=sessions.append):
            ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
            path = f"/messages/?session_id={sessions[0]}"
            assert (await client.post(path, json=ping, headers=auth(OTHER_KEY))).status_code == 404
            assert (await client.post(path, json=ping)).status_code == 401
            assert (await client.post(path, json=ping, headers=auth(KEY))).status_code == 202


# -- rate limiting ---------------------------------------------------------------------------------


async def test_a_burst_beyond_the_bucket_gets_429_and_another_key_is_unaffected(tmp_path: Path) -> None:
    limit = {"requests_per_minute": 6, "burst": 3}  # one token per 10 s: nothing refills during the test
    async with client_for(tmp_path, api_keys=[KEY, OTHER_KEY], rate_limit=limit) as client:
        codes = [(await client.get("/api/v1/statistics", headers=auth(KEY))).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        r = await client.get("/api/v1/statistics", headers=auth(KEY))
        assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED"
        assert 1 <= int(r.headers["retry-after"]) <= 10
        other = [(await client.get("/api/v1/statistics", headers=auth(OTHER_KEY))).status_code for _ in range(3)]
        assert other == [200, 200, 200]
        assert (await client.post("/mcp", json=INIT, headers={**MCP_HEADERS, **auth(KEY)})).status_code == 429


async def test_anonymous_clients_are_limited_by_address(tmp_path: Path) -> None:
    async with client_for(tmp_path, rate_limit={"requests_per_minute": 6, "burst": 2}) as client:
        codes = [(await client.get("/health")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]


def test_token_buckets_refill_and_stay_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(60, 2, max_clients=100, clock=lambda: now[0])  # 1 token/s
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 1.0]
    now[0] += 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += 1.0
    assert buckets.take("a") == 0.0
    for i in range(1000):  # a crowd of clients never holds more than max_clients buckets
        buckets.take(f"c{i}")
    assert len(buckets) == 100
    now[0] += 10  # all idle long enough to be full: dropped as soon as someone new comes
    buckets.take("late")
    assert len(buckets) == 1


# -- Host and Origin (DNS rebinding) ---------------------------------------------------------------


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
async def test_evil_host_and_origin_are_refused_on_every_transport_at_any_bind(tmp_path: Path, bind: str) -> None:
    # The app is built for `bind` but served on loopback: the checks must not depend on the SDK's
    # loopback-only default.
    async with client_for(tmp_path, host=bind, cors_origins=["https://app.example.com"]) as client:
        requests = [("POST", "/mcp"), ("GET", "/sse"), ("GET", "/api/v1/statistics"), ("POST", "/api/v1/tasks")]
        for method, path in requests:
            r = await client.request(method, path, headers={**MCP_HEADERS, "Host": "evil.example"}, json=INIT)
            assert r.status_code == 421, (method, path)
            assert r.json()["error"]["code"] == "FORBIDDEN"
            assert (await client.request(method, path, headers={"Host": "evil.example:80"})).status_code == 421
            for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example", "https://app.example.com.x"):
                r = await client.request(method, path, headers={**MCP_HEADERS, "Origin": origin}, json=INIT)
                assert r.status_code == 403, (method, path, origin)
        for origin in (None, "http://localhost:5173", "https://app.example.com"):
            headers = {**MCP_HEADERS, **({"Origin": origin} if origin else {})}
            assert (await client.post("/mcp", json=INIT, headers=headers)).status_code == 200, origin
            assert (await client.get("/api/v1/statistics", headers=headers)).status_code == 200, origin
        assert (await client.get("/health", headers={"Host": "localhost:8080"})).status_code == 200
        assert (await client.get("/health", headers={"Host": "[::1]:9"})).status_code == 200


async def test_configured_hosts_are_accepted(tmp_path: Path) -> None:
    hosts = ["tasks.example.com", "10.1.2.3:8080"]
    async with client_for(tmp_path, host="0.0.0.0", allowed_hosts=hosts) as client:
        for host, status in [("tasks.example.com", 200), ("TASKS.example.com:443", 200), ("10.1.2.3:8080", 200),
                             ("10.1.2.3:8081", 421), ("sub.tasks.example.com", 421)]:  # fmt: skip
            assert (await client.get("/health", headers={"Host": host})).status_code == status, host


# -- body cap, CORS ----------------------------------------------------------------------------------


async def test_bodies_over_the_cap_get_413_whether_declared_or_streamed(tmp_path: Path) -> None:
    async with client_for(tmp_path, max_body_bytes=1000) as client:
        big = {"work_path": "/b", "prompt": "x" * 2000}
        for path in ("/api/v1/tasks", "/mcp"):
            r = await client.post(path, json=big, headers=MCP_HEADERS)
            assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", path

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer
            for _ in range(20):
                yield b" " * 100

        r = await client.post("/api/v1/tasks", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["details"]["max_bytes"] == 1000

        async def small() -> AsyncIterator[bytes]:
            yield b'{"work_path": "/b", '
            yield b'"prompt": "fits"}'

        r = await client.post("/api/v1/tasks", content=small(), headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text
        r = await client.post("/api/v1/tasks", json={"work_path": "/b", "prompt": "fits"})
        assert r.status_code == 201


async def test_cors_preflight_allows_only_configured_origins(tmp_path: Path) -> None:
    allowed = "https://app.example.com"
    async with client_for(tmp_path, api_keys=[KEY], cors_origins=[allowed]) as client:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type,mcp-session-id",
        }
        for path in ("/mcp", "/api/v1/tasks"):
            r = await client.options(path, headers={**preflight, "Origin": allowed})
            assert r.status_code == 200, path  # answered before auth: preflights carry no key
            assert r.headers["access-control-allow-origin"] == allowed
            assert "access-control-allow-credentials" not in r.headers
            assert "authorization" in r.headers["access-control-allow-headers"].lower()
            r = await client.options(path, headers={**preflight, "Origin": "https://evil.example"})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = await client.post("/mcp", json=INIT, headers={**MCP_HEADERS, **auth(), "Origin": allowed})
        assert r.headers["access-control-allow-origin"] == allowed
        assert r.headers["access-control-expose-headers"] == "Mcp-Session-Id"
        r = await client.get("/api/v1/statistics", headers={"Origin": allowed})  # no key
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == allowed  # readable by the page


def test_a_wildcard_cors_origin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cors_origins"):
        create_app(http_config(tmp_path, cors_origins=["*"]))


# -- refusing to serve an open server beyond loopback ------------------------------------------------


def test_serve_refuses_a_non_loopback_bind_without_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskorch import cli

    for var in ("TASKORCH_API_KEYS", "TASKORCH_SERVER__API_KEYS", "TASKORCH_CONFIG", "TASKORCH_ENV"):
        monkeypatch.delenv(var, raising=False)
    db = str(tmp_path / "never.db")
    assert cli.main(["--db", db, "serve", "--transport", "http", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve http on 0.0.0.0 without API keys" in err and "--insecure" in err
    assert not Path(db).exists()


@pytest.mark.parametrize(
    ("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.8.0.1", True),
                           ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_detection(host: str, loopback: bool) -> None:
    from taskorch.http_server import is_loopback

    assert is_loopback(host) is loopback
