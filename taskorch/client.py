"""An async client for taskorch's REST API, with the service's method names and arguments.

A worker on another machine is a few lines; the same code runs against an in-process service:

    async with TaskorchClient("http://queue:8080", api_key="k1") as tasks:
        claim = await tasks.next_task(work_path="/repo", worker_id="box-1", wait_seconds=30)
        if claim is not None:
            await tasks.complete_task(task_id=claim.task.id, worker_id="box-1",
                                      lease_token=claim.lease.token, status="success", output="done")

Methods return the service's model types and raise its errors (taskorch.LeaseLost, NotFound...)
from the envelope's code. Retries, with exponential backoff and the server's Retry-After:
- every call, when the request provably did nothing: the connection could not be opened, or
  the server answered RATE_LIMITED (429);
- idempotent calls only, for STORE_BUSY (503) and for errors after the request was sent
  (timeouts, dropped connections): get_task, list_tasks, statistics, heartbeat_task,
  complete_task (a repeated complete with the same token returns the completed task), and
  create_task with an idempotency_key. next_task, release, cancel and retry are not retried
  there: a lost answer may hide a change that a repeat would make twice, or fail on.
When the server cannot be reached, `ServerUnavailable` (retryable) is raised.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import httpx2
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from . import __version__
from .api_models import TaskList
from .errors import (
    Conflict,
    Forbidden,
    InternalError,
    InvalidState,
    LeaseLost,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StoreBusy,
    TaskorchError,
    Unauthorized,
    ValidationError,
)
from .models import Claim, Lease, Statistics, Task, TaskPage, TaskWithEvents


class ServerUnavailable(TaskorchError):
    """The server could not be reached or did not answer in time (raised by the client only)."""

    code = "SERVER_UNAVAILABLE"
    retryable = True


ERROR_CLASSES: dict[str, type[TaskorchError]] = {
    cls.code: cls
    for cls in (ValidationError, Unauthorized, Forbidden, NotFound, Conflict, LeaseLost, InvalidState,
                PayloadTooLarge, RateLimited, StoreBusy, InternalError)
}  # fmt: skip
# For answers without an envelope (a proxy's error page, a route the server does not have).
_STATUS_CLASSES: dict[int, type[TaskorchError]] = {
    400: ValidationError, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: ValidationError, 429: RateLimited, 503: StoreBusy,
}  # fmt: skip
_MAX_RETRY_AFTER = 30.0
M = TypeVar("M", bound=BaseModel)


def _args(**kwargs: Any) -> dict[str, Any]:
    """Arguments left out (None) are left out of the request: the server applies its defaults."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if v is not None}


class TaskorchClient:
    """`async with TaskorchClient(base_url, api_key=None, timeout=30.0) as client: ...`

    `retries`: extra attempts for a retryable failure (see the module's docstring); `backoff`:
    the first pause in seconds, doubled on each attempt. `transport`: an httpx2 transport, e.g.
    `httpx2.ASGITransport(app)` to talk to an app in process.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.25,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json", "User-Agent": f"taskorch-client/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        root = base_url.rstrip("/").removesuffix("/api/v1")  # either the server's URL or the API's
        self._http = httpx2.AsyncClient(
            base_url=root + "/api/v1", headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> TaskorchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- creating --------------------------------------------------------------------------------

    async def create_task(
        self,
        *,
        work_path: str,
        prompt: str,
        title: str | None = None,
        priority: str | None = None,
        tags: Sequence[str] | None = None,
        depends_on: Sequence[str] | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        delay_seconds: float | None = None,
        timeout_seconds: int | None = None,
    ) -> Task:
        body = _args(
            work_path=work_path, prompt=prompt, title=title, priority=priority, tags=tags, depends_on=depends_on,
            max_attempts=max_attempts, idempotency_key=idempotency_key, metadata=metadata,
            delay_seconds=delay_seconds, timeout_seconds=timeout_seconds,
        )  # fmt: skip
        # With a key, a repeat returns the first task: safe to retry.
        return _model(Task, await self._call("POST", "/tasks", body, idempotent=idempotency_key is not None))

    async def create_tasks(self, *, tasks: Sequence[dict[str, Any]], mode: str | None = None) -> list[Task]:
        data = await self._call("POST", "/tasks/batch", _args(tasks=list(tasks), mode=mode))
        return _model(TaskList, data).tasks

    # -- claims ----------------------------------------------------------------------------------

    async def next_task(
        self,
        *,
        work_path: str,
        worker_id: str,
        lease_seconds: float | None = None,
        wait_seconds: float | None = None,
        include_subpaths: bool | None = None,
        tags: Sequence[str] | None = None,
    ) -> Claim | None:
        body = _args(work_path=work_path, worker_id=worker_id, lease_seconds=lease_seconds,
                     wait_seconds=wait_seconds, include_subpaths=include_subpaths, tags=tags)  # fmt: skip
        # A long poll holds the answer back for up to wait_seconds: read for longer than that.
        wait = wait_seconds if isinstance(wait_seconds, int | float) and wait_seconds > 0 else 0
        read = httpx2.Timeout(self._timeout, read=self._timeout + min(float(wait), 3600.0))
        data = await self._call("POST", "/tasks/next", body, read_timeout=read)
        return None if data is None else _model(Claim, data)

    async def complete_task(
        self,
        *,
        task_id: str,
        worker_id: str,
        lease_token: int,
        status: str,
        output: str | None = None,
        details: Any = None,
        artifacts: Sequence[Any] | None = None,
        duration_ms: int | None = None,
        retryable: bool | None = None,
    ) -> Task:
        body = _args(worker_id=worker_id, lease_token=lease_token, status=status, output=output, details=details,
                     artifacts=artifacts, duration_ms=duration_ms, retryable=retryable)  # fmt: skip
        return _model(Task, await self._call("POST", _task(task_id, "/complete"), body, idempotent=True))

    async def heartbeat_task(
        self, *, task_id: str, worker_id: str, lease_token: int, lease_seconds: float | None = None
    ) -> Lease:
        body = _args(worker_id=worker_id, lease_token=lease_token, lease_seconds=lease_seconds)
        return _model(Lease, await self._call("POST", _task(task_id, "/heartbeat"), body, idempotent=True))

    async def release_task(
        self, *, task_id: str, worker_id: str, lease_token: int, delay_seconds: float | None = None
    ) -> Task:
        body = _args(worker_id=worker_id, lease_token=lease_token, delay_seconds=delay_seconds)
        return _model(Task, await self._call("POST", _task(task_id, "/release"), body))

    # -- edits -----------------------------------------------------------------------------------

    async def cancel_task(
        self, *, task_id: str, reason: str | None = None, expected_version: int | None = None
    ) -> Task:
        body = _args(reason=reason, expected_version=expected_version)
        return _model(Task, await self._call("POST", _task(task_id, "/cancel"), body))

    async def retry_task(self, *, task_id: str, expected_version: int | None = None) -> Task:
        body = _args(expected_version=expected_version)
        return _model(Task, await self._call("POST", _task(task_id, "/retry"), body))

    # -- reads -----------------------------------------------------------------------------------

    async def get_task(self, *, task_id: str, include_events: bool | None = None) -> TaskWithEvents:
        query = None if include_events is None else {"include_events": "true" if include_events else "false"}
        return _model(TaskWithEvents, await self._call("GET", _task(task_id), query=query, idempotent=True))

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        work_path: str | None = None,
        priority: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> TaskPage:
        query = _args(status=status, work_path=work_path, priority=priority, tag=tag, limit=limit, offset=offset)
        return _model(TaskPage, await self._call("GET", "/tasks", query=query, idempotent=True))

    async def statistics(self, *, work_path: str | None = None) -> Statistics:
        query = _args(work_path=work_path)
        return _model(Statistics, await self._call("GET", "/statistics", query=query, idempotent=True))

    # -- the wire --------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        query: dict[str, Any] | None = None,
        idempotent: bool = False,
        read_timeout: httpx2.Timeout | None = None,
    ) -> Any:
        """One request, retried as the module's docstring says; returns the envelope's data."""
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                resp = await self._http.request(
                    method, path, json=body, params=query, timeout=read_timeout or httpx2.USE_CLIENT_DEFAULT
                )
            except httpx2.ConnectError as e:  # the request was never sent
                error: TaskorchError = ServerUnavailable(f"cannot connect to {self._http.base_url}: {e}")
                may_retry = True
            except httpx2.TransportError as e:  # sent: the server may have acted on it
                error = ServerUnavailable(f"{method} {path} failed: {type(e).__name__}: {e}")
                may_retry = idempotent
            else:
                ok, result = _decode(resp)
                if ok:
                    return result
                error = result
                may_retry = error.code == "RATE_LIMITED" or (error.code == "STORE_BUSY" and idempotent)
                retry_after = _retry_after(resp)
            if not may_retry or attempt >= self._retries:
                raise error
            pause = self._backoff * 2**attempt * random.uniform(0.5, 1.0)  # jitter: workers spread out
            await anyio.sleep(pause if retry_after is None else min(retry_after, _MAX_RETRY_AFTER))
            attempt += 1


def _model(cls: type[M], data: Any) -> M:
    try:
        return cls.model_validate(data)
    except PydanticValidationError as e:
        raise InternalError(f"the server's answer is not a valid {cls.__name__}: {e.errors()[0]['msg']}") from None


def _task(task_id: str, suffix: str = "") -> str:
    return f"/tasks/{quote(str(task_id), safe='')}{suffix}"


def _decode(resp: httpx2.Response) -> tuple[bool, Any]:
    """(True, data) for a success envelope; (False, the error to raise) otherwise."""
    try:
        body = json.loads(resp.content)
        envelope = isinstance(body, dict) and {"success", "data", "error"} <= body.keys()
    except ValueError:
        body, envelope = None, False
    if not envelope:
        cls = _STATUS_CLASSES.get(resp.status_code, InternalError)
        return False, cls(f"HTTP {resp.status_code} from {resp.request.url} without taskorch's envelope")
    if body["success"] and resp.status_code < 400:
        return True, body["data"]
    err = body["error"] if isinstance(body["error"], dict) else {}
    code, message = str(err.get("code", "INTERNAL_ERROR")), str(err.get("message", f"HTTP {resp.status_code}"))
    details = err.get("details") if isinstance(err.get("details"), dict) else None
    cls = ERROR_CLASSES.get(code, InternalError)
    return False, cls(message if cls.code == code else f"{code}: {message}", details=details)


def _retry_after(resp: httpx2.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


__all__ = ["ERROR_CLASSES", "ServerUnavailable", "TaskorchClient"]
