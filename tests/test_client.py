"""The worker client against a real server (uvicorn on 127.0.0.1, real database): every method,
the error classes, auth, retries and long polls. Only the retry-policy tests at the end use a
scripted HTTP transport, to count requests exactly."""

from __future__ import annotations

import inspect
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response
from test_api import LiveServer  # the same minimal app and server as the REST tests

import taskorch
from taskorch.api import envelope_error
from taskorch.client import ServerUnavailable, TaskorchClient

pytestmark = pytest.mark.anyio

Next = Callable[[Request], Awaitable[Response]]


@pytest.fixture
def live(tmp_path: Path) -> Any:
    with LiveServer(tmp_path / "t.db") as server:
        yield server


@pytest.fixture
async def client(live: LiveServer) -> AsyncIterator[TaskorchClient]:
    async with TaskorchClient(live.url, timeout=10) as c:
        yield c


def test_every_method_has_the_services_signature() -> None:
    names = [n for n, f in inspect.getmembers(TaskorchClient, inspect.iscoroutinefunction) if not n.startswith("_")]
    assert set(names) - {"aclose"} == {
        "create_task", "create_tasks", "next_task", "complete_task", "heartbeat_task", "release_task",
        "cancel_task", "retry_task", "get_task", "list_tasks", "statistics",
    }  # fmt: skip
    for name in set(names) - {"aclose"}:
        ours = inspect.signature(getattr(TaskorchClient, name)).parameters
        theirs = inspect.signature(getattr(taskorch.TaskService, name)).parameters
        assert [(p.name, p.kind, p.default, p.annotation) for p in ours.values()] == [
            (p.name, p.kind, p.default, p.annotation) for p in theirs.values()
        ], name
        assert inspect.signature(getattr(TaskorchClient, name)).return_annotation == (
            inspect.signature(getattr(taskorch.TaskService, name)).return_annotation
        ), name


async def test_every_method_round_trips_with_the_services_types(client: TaskorchClient) -> None:
    task = await client.create_task(work_path="/w", prompt="build", priority="high", tags=("ci",), metadata={"n": 1})
    assert isinstance(task, taskorch.Task) and task.priority is taskorch.Priority.HIGH and task.tags == ["ci"]
    again = await client.create_task(work_path="/w", prompt="build", idempotency_key="k")
    assert (await client.create_task(work_path="/w", prompt="other", idempotency_key="k")).id == again.id
    batch = await client.create_tasks(
        tasks=[{"work_path": "/w", "prompt": "a", "ref": "a"}, {"work_path": "/w", "prompt": "b", "depends_on": ["a"]}]
    )
    assert [type(t) for t in batch] == [taskorch.Task, taskorch.Task] and batch[1].depends_on == [batch[0].id]

    claim = await client.next_task(work_path="/w", worker_id="w1", lease_seconds=60, tags=["ci"])
    assert isinstance(claim, taskorch.Claim) and claim.task.id == task.id
    lease = await client.heartbeat_task(task_id=task.id, worker_id="w1", lease_token=claim.lease.token)
    assert isinstance(lease, taskorch.Lease) and lease.token == claim.lease.token
    done = await client.complete_task(
        task_id=task.id, worker_id="w1", lease_token=claim.lease.token, status="success", output="ok",
        details={"x": 1}, artifacts=["a.txt"], duration_ms=5,
    )  # fmt: skip
    assert done.status is taskorch.Status.COMPLETED and done.result is not None and done.result["output"] == "ok"

    second = await client.next_task(work_path="/w", worker_id="w2")
    assert second is not None
    released = await client.release_task(task_id=second.task.id, worker_id="w2", lease_token=second.lease.token)
    assert released.status is taskorch.Status.WAITING
    cancelled = await client.cancel_task(task_id=released.id, reason="no", expected_version=released.version)
    assert cancelled.status is taskorch.Status.CANCELLED
    retried = await client.retry_task(task_id=cancelled.id)
    assert retried.status is taskorch.Status.WAITING

    got = await client.get_task(task_id=task.id, include_events=True)
    assert isinstance(got, taskorch.TaskWithEvents) and got.events is not None
    assert [e.kind for e in got.events] == ["created", "claimed", "completed"]
    assert (await client.get_task(task_id=task.id)).events is None
    page = await client.list_tasks(work_path="/w", status="completed", priority="high", tag="ci", limit=5, offset=0)
    assert isinstance(page, taskorch.TaskPage) and [t.id for t in page.tasks] == [task.id] and page.total == 1
    stats = await client.statistics(work_path="/w")
    assert isinstance(stats, taskorch.Statistics) and stats.total == 4 and stats.by_status["completed"] == 1
    assert await client.next_task(work_path="/elsewhere", worker_id="w3") is None


async def test_errors_raise_the_services_classes(client: TaskorchClient) -> None:
    with pytest.raises(taskorch.NotFound):
        await client.get_task(task_id="t-missing")
    with pytest.raises(taskorch.ValidationError, match=r"^VALIDATION_ERROR: work_path: must be an absolute") as info:
        await client.create_task(work_path="relative", prompt="p")
    assert info.value.details == {"field": "work_path"}
    with pytest.raises(taskorch.ValidationError, match="wait_seconds"):
        await client.next_task(work_path="/w", worker_id="w", wait_seconds=600)
    with pytest.raises(taskorch.PayloadTooLarge, match="metadata"):
        await client.create_task(work_path="/w", prompt="p", metadata={"big": "x" * 70_000})
    task = await client.create_task(work_path="/w", prompt="p")
    claim = await client.next_task(work_path="/w", worker_id="w")
    assert claim is not None
    with pytest.raises(taskorch.LeaseLost):
        await client.heartbeat_task(task_id=task.id, worker_id="w", lease_token=claim.lease.token + 1)
    with pytest.raises(taskorch.Conflict):
        await client.cancel_task(task_id=task.id, expected_version=1)
    with pytest.raises(taskorch.InvalidState):
        await client.retry_task(task_id=task.id)
    # A repeated complete with the same token returns the task: why complete_task may be retried.
    first = await client.complete_task(task_id=task.id, worker_id="w", lease_token=claim.lease.token, status="failure")
    again = await client.complete_task(task_id=task.id, worker_id="w", lease_token=claim.lease.token, status="failure")
    assert first == again


async def test_store_busy_is_retried_for_idempotent_calls_only(tmp_path: Path) -> None:
    with LiveServer(tmp_path / "t.db", overrides={"store": {"busy_timeout_ms": 50}}) as live:
        async with TaskorchClient(live.url, retries=5) as client:
            task = await client.create_task(work_path="/w", prompt="p")
            claim = await client.next_task(work_path="/w", worker_id="w")
            assert claim is not None
            # Another process's writer holds the lock; a timer thread lets go of it after 0.3 s.
            raw = sqlite3.connect(tmp_path / "t.db", isolation_level=None, check_same_thread=False)
            raw.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(taskorch.StoreBusy):  # cancel is not idempotent: not retried
                    await client.cancel_task(task_id=task.id)
                timer = threading.Timer(0.3, lambda: raw.execute("ROLLBACK"))
                timer.start()
                start = time.monotonic()
                lease = await client.heartbeat_task(task_id=task.id, worker_id="w", lease_token=claim.lease.token)
                assert lease.token == claim.lease.token and time.monotonic() - start >= 0.3
                timer.join()
            finally:
                raw.close()


async def test_the_api_key_is_sent_as_a_bearer_header(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def require_key(request: Request, call_next: Next) -> Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != "Bearer k1":
            return envelope_error("UNAUTHORIZED", "send Authorization: Bearer <key>")
        return await call_next(request)

    with LiveServer(tmp_path / "t.db", middleware=[Middleware(BaseHTTPMiddleware, dispatch=require_key)]) as live:
        async with TaskorchClient(live.url) as anonymous:
            with pytest.raises(taskorch.TaskorchError) as info:
                await anonymous.statistics()
            assert info.value.code == "UNAUTHORIZED" and not info.value.retryable
        async with TaskorchClient(live.url, api_key="k1") as client:
            assert (await client.statistics()).total == 0
    assert seen == [None, "Bearer k1"]


async def test_rate_limited_is_retried_for_every_call(tmp_path: Path) -> None:
    refusals = [2]

    async def limit(request: Request, call_next: Next) -> Response:
        if refusals[0] > 0:
            refusals[0] -= 1
            return envelope_error("RATE_LIMITED", "slow down", headers={"Retry-After": "0"})
        return await call_next(request)

    with LiveServer(tmp_path / "t.db", middleware=[Middleware(BaseHTTPMiddleware, dispatch=limit)]) as live:
        async with TaskorchClient(live.url, retries=3, backoff=0.01) as client:
            # next_task is not idempotent, but a 429 means the server did nothing: safe to repeat.
            assert await client.next_task(work_path="/w", worker_id="w") is None
            refusals[0] = 1
        async with TaskorchClient(live.url, retries=0) as impatient:
            with pytest.raises(taskorch.TaskorchError) as info:
                await impatient.next_task(work_path="/w", worker_id="w")
            assert info.value.code == "RATE_LIMITED" and info.value.retryable


async def test_a_long_poll_outlasts_the_client_timeout(live: LiveServer) -> None:
    async with TaskorchClient(live.url + "/api/v1/", timeout=0.5, retries=0) as client:  # the API's URL works too
        start = time.monotonic()
        assert await client.next_task(work_path="/w", worker_id="w", wait_seconds=1.5) is None
        assert time.monotonic() - start >= 1.4
        async with anyio.create_task_group() as tg:

            async def create_later() -> None:
                await anyio.sleep(0.3)
                await client.create_task(work_path="/w", prompt="late")

            tg.start_soon(create_later)
            claim = await client.next_task(work_path="/w", worker_id="w", wait_seconds=5)
        assert claim is not None and claim.task.prompt == "late"


async def test_an_unreachable_server_raises_server_unavailable_after_retries() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with TaskorchClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.01) as client:
        with pytest.raises(ServerUnavailable) as info:
            await client.next_task(work_path="/w", worker_id="w")
    assert info.value.retryable and isinstance(info.value, taskorch.TaskorchError)


# -- the retry policy, counted on a scripted transport ------------------------------------------


def _scripted(answers: list[Any]) -> tuple[httpx2.MockTransport, list[str]]:
    calls: list[str] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        calls.append(f"{request.method} {request.url.path}")
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx2.MockTransport(handle), calls


async def test_a_timeout_after_sending_is_retried_only_when_idempotent() -> None:
    timeout = httpx2.ReadTimeout("slow")
    transport, calls = _scripted([timeout])
    async with TaskorchClient("http://q", retries=2, backoff=0.001, transport=transport) as client:
        with pytest.raises(ServerUnavailable, match="ReadTimeout"):
            await client.cancel_task(task_id="t-1")
        assert calls == ["POST /api/v1/tasks/t-1/cancel"]
        with pytest.raises(ServerUnavailable):
            await client.complete_task(task_id="t-1", worker_id="w", lease_token=1, status="success")
        assert calls[1:] == ["POST /api/v1/tasks/t-1/complete"] * 3


async def test_answers_without_the_envelope_map_by_status() -> None:
    html = httpx2.Response(502, text="<html>Bad Gateway</html>")
    transport, _ = _scripted([html])
    async with TaskorchClient("http://q", retries=0, transport=transport) as client:
        with pytest.raises(taskorch.InternalError, match="HTTP 502"):
            await client.statistics()
    transport, calls = _scripted([httpx2.Response(503, text="busy"), httpx2.Response(200, json={"nope": 1})])
    async with TaskorchClient("http://q", retries=1, backoff=0.001, transport=transport) as client:
        with pytest.raises(taskorch.InternalError, match="without taskorch's envelope"):
            await client.statistics()  # 503 retried (idempotent), then a 200 that is not an envelope
    assert len(calls) == 2
    bad = {"success": True, "data": {"id": 1}, "error": None, "timestamp": "2026-01-01T00:00:00Z"}
    transport, _ = _scripted([httpx2.Response(200, json=bad)])
    async with TaskorchClient("http://q", transport=transport) as client:
        with pytest.raises(taskorch.InternalError, match="not a valid Task"):
            await client.retry_task(task_id="t-1")
