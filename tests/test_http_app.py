"""The HTTP app through real HTTP: uvicorn on 127.0.0.1 (in-process, port 0), MCP through the
SDK's Streamable HTTP and SSE clients, /health, /metrics, and a SIGTERM during a long poll of a
`taskorch serve --transport http` subprocess.

`serve_app` and `http_config` are shared with test_http_security.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette

from taskorch.app import create_app
from taskorch.config import Config, load_config

pytestmark = pytest.mark.anyio
KEY = "test-key-0123456789abcdef"


def http_config(tmp_path: Path, **server: Any) -> Config:
    """A config on a temp database; rate limiting off unless the test sets it."""
    server.setdefault("rate_limit", {"requests_per_minute": 0, "burst": 1})
    overrides = {"store": {"path": str(tmp_path / "http.db"), "durability": "normal"}, "server": server}
    return load_config(environ={}, overrides=overrides)


@contextlib.asynccontextmanager
async def serve_app(app: Starlette) -> AsyncIterator[str]:
    """Run `app` under uvicorn on 127.0.0.1 (a free port) for the block; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        with anyio.fail_after(10):
            while not server.started:  # uvicorn offers no event; poll, bounded
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped during start-up")
                await asyncio.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with anyio.fail_after(10):
            await task


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def mcp_session(base: str, transport: str, headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session over `transport` ("http" or "sse")."""
    async with contextlib.AsyncExitStack() as stack:
        if transport == "http":
            client = await stack.enter_async_context(httpx2.AsyncClient(headers=headers, timeout=30))
            read, write = await stack.enter_async_context(streamable_http_client(f"{base}/mcp", http_client=client))
        else:
            read, write = await stack.enter_async_context(sse_client(f"{base}/sse", headers=headers))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        yield session


async def call(session: ClientSession, name: str, arguments: dict[str, Any]) -> Any:
    result = await session.call_tool(name, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


@pytest.mark.parametrize("transport", ["http", "sse"])
async def test_mcp_tools_create_claim_and_complete_over_http_transports(tmp_path: Path, transport: str) -> None:
    app = create_app(http_config(tmp_path, api_keys=[KEY]))
    async with serve_app(app) as base, mcp_session(base, transport, auth()) as session:
        names = {t.name for t in (await session.list_tools()).tools}
        assert {"create_task", "next_task", "complete_task", "statistics"} <= names
        created = await call(session, "create_task", {"work_path": "/repo", "prompt": "write the README"})
        claim = await call(session, "next_task", {"work_path": "/repo", "worker_id": "w1"})
        assert claim["task"]["id"] == created["id"]
        done = await call(
            session,
            "complete_task",
            {"task_id": created["id"], "worker_id": "w1", "lease_token": claim["lease"]["token"], "status": "success"},
        )
        assert done["status"] == "completed"


async def test_every_transport_shares_one_database(tmp_path: Path) -> None:
    # SSE runs the MCP server's lifespan per connection: the service must come from the app's.
    app = create_app(http_config(tmp_path))
    async with serve_app(app) as base:
        async with mcp_session(base, "sse") as first, mcp_session(base, "sse") as second:
            created = await call(first, "create_task", {"work_path": "/shared", "prompt": "p"})
            assert (await call(second, "get_task", {"task_id": created["id"]}))["task"]["id"] == created["id"]
        async with mcp_session(base, "http") as session:
            claim = await call(session, "next_task", {"work_path": "/shared", "worker_id": "w"})
            assert claim["task"]["id"] == created["id"]
        async with httpx2.AsyncClient(base_url=base) as client:
            r = await client.get(f"/api/v1/tasks/{created['id']}")
            assert r.status_code == 200 and r.json()["data"]["task"]["status"] == "working"


async def test_health_reports_version_uptime_database_and_queue(tmp_path: Path) -> None:
    app = create_app(http_config(tmp_path, api_keys=[KEY]))
    async with serve_app(app) as base, httpx2.AsyncClient(base_url=base) as client:
        for prompt in ("a", "b"):
            r = await client.post("/api/v1/tasks", json={"work_path": "/h", "prompt": prompt}, headers=auth())
            assert r.status_code == 201, r.text
        r = await client.post("/api/v1/tasks/next", json={"work_path": "/h", "worker_id": "w"}, headers=auth())
        assert r.status_code == 200 and r.json()["data"]["task"]
        r = await client.get("/health")  # open: no key needed
        assert r.status_code == 200
        health = r.json()
        assert health["status"] == "healthy" and health["version"]
        assert health["uptime_seconds"] >= 0 and health["uptime"].endswith("s")
        database = health["components"]["database"]
        assert database["healthy"] is True and 0 <= database["response_time"] < 1000
        assert health["metrics"]["waiting"] == 1 and health["metrics"]["working"] == 1
        assert health["metrics"]["queue_size"] == 2


async def test_health_is_503_when_the_database_does_not_answer(tmp_path: Path) -> None:
    import taskorch

    cfg = http_config(tmp_path)
    async with taskorch.open_service(config=cfg, sweep=False) as service:
        async with serve_app(create_app(cfg, service)) as base, httpx2.AsyncClient(base_url=base) as client:
            assert (await client.get("/health")).status_code == 200
            await service.store.close()
            r = await client.get("/health")
            assert r.status_code == 503
            health = r.json()
            assert health["status"] == "unhealthy" and health["components"]["database"]["healthy"] is False
            assert health["metrics"]["queue_size"] is None


def metric(text: str, name: str) -> float:
    """The value of the sample `name` (with its labels, as printed) in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exposed")


async def test_metrics_count_requests_and_task_transitions(tmp_path: Path) -> None:
    app = create_app(http_config(tmp_path, api_keys=[KEY]))
    async with serve_app(app) as base, httpx2.AsyncClient(base_url=base, headers=auth()) as client:
        before = (await client.get("/metrics")).text
        assert metric(before, "taskorch_tasks_created_total") == 0
        async with mcp_session(base, "http", auth()) as session:
            task = await call(session, "create_task", {"work_path": "/m", "prompt": "p"})
            claim = await call(session, "next_task", {"work_path": "/m", "worker_id": "w"})
            await call(
                session,
                "complete_task",
                {"task_id": task["id"], "worker_id": "w", "lease_token": claim["lease"]["token"], "status": "success"},
            )
        await client.get(f"/api/v1/tasks/{task['id']}")
        await client.get("/api/v1/tasks/does-not-exist")
        await client.get("/api/v1/statistics", headers={"Authorization": "Bearer wrong"})
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    for kind in ("created", "claimed", "completed"):
        assert metric(text, f"taskorch_tasks_{kind}_total") == 1
    for kind in ("failed", "retried", "lease_expired"):
        assert metric(text, f"taskorch_tasks_{kind}_total") == 0
    assert metric(text, 'taskorch_tasks{status="completed"}') == 1
    assert metric(text, 'taskorch_tasks{status="waiting"}') == 0
    assert metric(text, "taskorch_active_workers") == 0
    # by route template, never by raw path (ids would explode the label set)
    assert metric(text, 'taskorch_http_requests_total{method="GET",route="/api/v1/tasks/{task_id}",status="200"}') == 1
    assert metric(text, 'taskorch_http_requests_total{method="GET",route="/api/v1/tasks/{task_id}",status="404"}') == 1
    assert metric(text, 'taskorch_http_requests_total{method="GET",route="/api/v1/statistics",status="401"}') == 1
    assert metric(text, 'taskorch_http_requests_total{method="POST",route="/mcp",status="200"}') >= 3
    assert metric(text, 'taskorch_http_request_duration_seconds_count{method="GET",route="/metrics"}') == 1
    assert 'taskorch_store_operation_duration_seconds_count{operation="claim"}' in text
    assert "does-not-exist" not in text


async def test_metrics_registries_are_per_app(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = create_app(http_config(tmp_path / "a")), create_app(http_config(tmp_path / "b"))
    async with serve_app(first) as base_a, serve_app(second) as base_b, httpx2.AsyncClient() as client:
        await client.post(f"{base_a}/api/v1/tasks", json={"work_path": "/x", "prompt": "p"})
        a, b = (await client.get(f"{base_a}/metrics")).text, (await client.get(f"{base_b}/metrics")).text
    assert metric(a, "taskorch_tasks_created_total") == 1
    assert metric(b, "taskorch_tasks_created_total") == 0


async def test_unknown_routes_and_methods_answer_with_the_envelope(tmp_path: Path) -> None:
    app = create_app(http_config(tmp_path))
    async with serve_app(app) as base, httpx2.AsyncClient(base_url=base) as client:
        r = await client.get("/nowhere")
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
        assert r.json()["success"] is False and "timestamp" in r.json()
        r = await client.delete("/api/v1/statistics")
        assert r.status_code == 405 and r.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_a_passed_in_service_is_used_and_left_open(tmp_path: Path) -> None:
    import taskorch

    cfg = http_config(tmp_path)
    async with taskorch.open_service(config=cfg, sweep=False) as service:
        task = await service.create_task(work_path="/p", prompt="made before the app")
        async with serve_app(create_app(cfg, service)) as base, mcp_session(base, "http") as session:
            assert (await call(session, "get_task", {"task_id": task.id}))["task"]["id"] == task.id
        assert (await service.get_task(task_id=task.id)).task.id == task.id  # still open


async def test_the_rest_worker_client_works_through_the_whole_stack(tmp_path: Path) -> None:
    from taskorch.client import TaskorchClient
    from taskorch.errors import Unauthorized

    app = create_app(http_config(tmp_path, api_keys=[KEY], rate_limit={"requests_per_minute": 6000, "burst": 50}))
    async with serve_app(app) as base:
        async with TaskorchClient(base, api_key=KEY) as tasks:
            task = await tasks.create_task(work_path="/c", prompt="via the client")
            claim = await tasks.next_task(work_path="/c", worker_id="remote-1")
            assert claim is not None and claim.task.id == task.id
            done = await tasks.complete_task(
                task_id=task.id, worker_id="remote-1", lease_token=claim.lease.token, status="success"
            )
            assert done.status == "completed"
        async with TaskorchClient(base, api_key="not-the-key") as intruder:
            with pytest.raises(Unauthorized):
                await intruder.statistics()


# -- the real command, stopped with SIGTERM ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until_serving(client: httpx2.AsyncClient, proc: subprocess.Popen[bytes]) -> None:
    with anyio.fail_after(20):
        while True:
            assert proc.poll() is None, "the server exited during start-up"
            with contextlib.suppress(httpx2.TransportError):
                if (await client.get("/health")).status_code == 200:
                    return
            await anyio.sleep(0.05)


def start_server(db: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`taskorch serve --transport http` on `db` and `port`, with every TASKORCH_* variable removed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKORCH_")}
    cmd = [sys.executable, "-m", "taskorch.cli", "--db", str(db), "--log-level", "WARNING",
           "serve", "--transport", "http", "--port", str(port)]  # fmt: skip
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


async def open_mcp_session(client: httpx2.AsyncClient) -> dict[str, str]:
    """A Streamable HTTP session opened with plain requests (no background GET stream, unlike the
    SDK's client): the headers for its next requests."""
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
    headers = {"Accept": "application/json, text/event-stream"}
    r = await client.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
                          headers=headers)  # fmt: skip
    headers |= {"Mcp-Session-Id": r.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-11-25"}
    r = await client.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    assert r.status_code == 202
    return headers


async def test_sigterm_lets_requests_in_flight_finish_ends_streams_and_closes_the_database(tmp_path: Path) -> None:
    db, port, log_path = tmp_path / "served.db", free_port(), tmp_path / "server.log"
    proc = start_server(db, port, log_path)
    try:
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            await wait_until_serving(client, proc)
            mcp_headers = await open_mcp_session(client)
            answer: dict[str, Any] = {}
            async with anyio.create_task_group() as tg:

                async def rest_long_poll() -> None:
                    body = {"work_path": "/slow", "worker_id": "w", "wait_seconds": 2}
                    answer["rest"] = await client.post("/api/v1/tasks/next", json=body)
                    answer["rest_at"] = time.monotonic()

                async def mcp_long_poll() -> None:
                    arguments = {"work_path": "/slow", "worker_id": "m", "wait_seconds": 2}
                    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                            "params": {"name": "next_task", "arguments": arguments}}  # fmt: skip
                    answer["mcp"] = await client.post("/mcp", json=call, headers=mcp_headers)
                    answer["mcp_at"] = time.monotonic()

                async def hold_sse_stream() -> None:
                    async with client.stream("GET", "/sse") as stream:
                        async for _ in stream.aiter_lines():  # until the server ends the stream
                            pass
                    answer["sse_closed"] = True

                for task in (rest_long_poll, mcp_long_poll, hold_sse_stream):
                    tg.start_soon(task)
                with anyio.fail_after(5):  # until all three are inside the server (this scrape is the 4th)
                    while metric((await client.get("/metrics")).text, "taskorch_http_requests_in_progress") < 4:
                        pass
                proc.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
        # Answered in full after the signal, not cut off.
        assert answer["rest"].status_code == 200 and answer["rest"].json()["data"] is None
        assert answer["rest_at"] - stopped_at > 1.0
        assert answer["mcp"].status_code == 200, answer["mcp"].text
        assert answer["mcp"].json()["result"]["structuredContent"]["task"] is None
        assert answer["mcp_at"] - stopped_at > 1.0
        assert answer["sse_closed"]  # idle streams are closed, not waited for
        assert await anyio.to_thread.run_sync(proc.wait, 20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Closed cleanly: the last connection checkpointed and removed the WAL.
    assert not (tmp_path / "served.db-wal").exists() or (tmp_path / "served.db-wal").stat().st_size == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text


def test_serve_http_dispatches_from_mcp_server_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from taskorch import http_server, mcp_server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(http_server, "serve", lambda config, **kw: seen.update(kw) or 7)
    cfg = http_config(tmp_path)
    assert mcp_server.serve(cfg, transport="http", host="127.0.0.1", port=9, insecure=False) == 7
    assert seen == {"host": "127.0.0.1", "port": 9, "insecure": False}


def test_serve_reports_an_unusable_database_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskorch import cli

    monkeypatch.delenv("TASKORCH_CONFIG", raising=False)
    (tmp_path / "file").write_text("")
    db = tmp_path / "file" / "taskorch.db"  # its directory is a file
    assert cli.main(["--db", str(db), "serve", "--transport", "http", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("taskorch: error:") and "Traceback" not in err


def test_serve_exits_3_when_the_port_is_taken(tmp_path: Path) -> None:
    from taskorch.http_server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve(http_config(tmp_path), port=taken.getsockname()[1]) == 3
