"""What the service needs of a store, and the value types both stores share.

Two dialects sit behind `Store`: SqliteStore (store.py, one file) and PostgresStore (pg_store.py,
many servers on one database). Both keep the same columns in the same representation (times as
integer microseconds since the epoch, JSON as text), so a row of either becomes the same model
here and the service never learns which store it talks to.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import Conflict, InvalidState, LeaseLost, NotFound, ValidationError
from .models import RANK_PRIORITY, CleanupResult, Lease, Status, Task, TaskEvent, construct, us_to_datetime

Clock = Callable[[], int]
_B32 = "0123456789abcdefghjkmnpqrstvwxyz"


def system_clock() -> int:
    """Microseconds since the epoch, UTC."""
    return time.time_ns() // 1000


class _IdState:
    last = 0


def new_task_id(now_us: int) -> str:
    """17 characters: the millisecond, then 32 random bits, rising within this process.

    Ids are the last tie-breaker of the claim order, so tasks created in the same instant (a
    batch shares one) must be claimed in creation order: like a monotonic ULID, an id made in
    the same millisecond as the previous one is the previous one plus one.
    """
    n = ((now_us // 1000) << 32) | int.from_bytes(os.urandom(4), "big")
    if n <= _IdState.last:
        n = _IdState.last + 1
    _IdState.last = n
    chars = []
    for _ in range(16):
        chars.append(_B32[n & 31])
        n >>= 5
    return "t" + "".join(reversed(chars))


@dataclass(frozen=True, slots=True)
class NewTask:
    """A validated create request."""

    work_path: str
    title: str
    prompt: str
    priority: int
    tags: tuple[str, ...]
    metadata: dict[str, Any]
    depends_on: tuple[str, ...]
    max_attempts: int
    idempotency_key: str | None
    delay_us: int
    timeout_seconds: int


@dataclass(frozen=True, slots=True)
class ClaimFilter:
    work_path: str
    worker_id: str
    lease_us: int
    include_subpaths: bool = False
    tags: tuple[str, ...] = ()
    max_working: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    task_id: str
    worker_id: str
    token: int
    success: bool
    retryable: bool
    result: dict[str, Any]
    error: dict[str, Any] | None
    backoff_base_us: int
    backoff_max_us: int


@runtime_checkable
class Store(Protocol):
    """The store interface. Every method is one atomic operation; errors are TaskorchErrors.

    `clock()` is the store's time in microseconds (the injected test clock, or the database's);
    the service uses it for retention cut-offs. `on_leases_recovered(n)` is told how many expired
    leases a claim recovered on its way; `on_remote_change()` is called when another server may
    have made a task claimable (the service wakes its long polls). `location` names the database
    for logs and /health, never with a password.
    """

    clock: Clock
    location: str
    on_leases_recovered: Callable[[int], None] | None
    on_remote_change: Callable[[], None] | None

    async def create(self, spec: NewTask) -> Task: ...
    async def create_many(self, specs: Sequence[NewTask], refs: Sequence[Sequence[int]]) -> list[Task]: ...
    async def claim(self, f: ClaimFilter, busy_timeout_ms: int | None = None) -> tuple[Task, Lease] | None: ...
    async def complete(self, c: Completion) -> Task: ...
    async def heartbeat(self, task_id: str, worker_id: str, token: int, lease_us: int) -> Lease: ...
    async def release(self, task_id: str, worker_id: str, token: int, delay_us: int) -> Task: ...
    async def recover_expired(self) -> int: ...
    async def cancel(self, task_id: str, reason: str | None, expected_version: int | None) -> Task: ...
    async def retry(self, task_id: str, expected_version: int | None) -> Task: ...
    async def get(self, task_id: str, include_events: bool = False) -> tuple[Task, list[TaskEvent] | None]: ...
    async def list(
        self,
        *,
        status: str | None,
        priority: int | None,
        work_path: str | None,
        tag: str | None,
        limit: int,
        offset: int,
    ) -> tuple[list[Task], int]: ...
    async def statistics_rows(self, work_path: str | None) -> dict[str, Any]: ...
    async def cleanup(self, cutoff_us: int | None, max_tasks: int) -> CleanupResult: ...
    async def ping(self) -> None: ...
    async def integrity_check(self) -> str: ...
    async def close(self) -> None: ...


# -- rows to models (both dialects return the same columns: sqlite3.Row and asyncpg.Record) ------

Row = Mapping[str, Any]

LEASE_EXPIRED_ERROR = json.dumps(
    {"code": "LEASE_EXPIRED", "message": "the worker's lease or the attempt's timeout expired"}, separators=(",", ":")
)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _json_list(text: str) -> list:
    return [] if text == "[]" else json.loads(text)  # the common case, without the parser


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def task_from_row(row: Row) -> Task:
    # Rows were validated on the way in; this path runs on every claim.
    return construct(
        Task,
        dict(
            id=row["id"],
            work_path=row["work_path"],
            title=row["title"],
            prompt=row["prompt"],
            priority=RANK_PRIORITY[row["priority"]],
            tags=_json_list(row["tags"]),
            metadata={} if row["metadata"] == "{}" else json.loads(row["metadata"]),
            status=Status(row["status"]),
            depends_on=_json_list(row["depends_on"]),
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            worker_id=row["worker_id"],
            lease_expires_at=us_to_datetime(row["lease_expires_at"]),
            version=row["version"],
            run_after=us_to_datetime(row["run_after"]),
            timeout_seconds=row["timeout_seconds"],
            result=loads(row["result"]),
            error=loads(row["error"]),
            idempotency_key=row["idempotency_key"],
            created_at=us_to_datetime(row["created_at"]),
            updated_at=us_to_datetime(row["updated_at"]),
            started_at=us_to_datetime(row["started_at"]),
            completed_at=us_to_datetime(row["completed_at"]),
        ),
    )


def lease_from_row(row: Row) -> Lease:
    return construct(
        Lease,
        {
            "token": row["version"],
            "worker_id": row["worker_id"],
            "expires_at": us_to_datetime(row["lease_expires_at"]),
            "deadline_at": us_to_datetime(row["deadline_at"]),
        },
    )


def event_from_row(row: Row) -> TaskEvent:
    return TaskEvent.model_construct(
        task_id=row["task_id"],
        kind=row["kind"],
        from_status=Status(row["from_status"]) if row["from_status"] else None,
        to_status=Status(row["to_status"]),
        worker_id=row["worker_id"],
        version=row["version"],
        at=us_to_datetime(row["at"]),
        detail=loads(row["detail"]),
    )


# -- why a guarded write changed no row (the same answers on both dialects) -----------------------


def lease_problem(row: Row | None, task_id: str, worker_id: str, token: int, now: int) -> Exception:
    """Explain why a fenced write (complete, heartbeat, release) changed no row; `row` is the task now."""
    if row is None:
        return NotFound(f"task {task_id!r} does not exist")
    if row["version"] != token or row["worker_id"] != worker_id:
        return LeaseLost(
            f"task {task_id} is no longer claimed by {worker_id} with token {token} "
            f"(it is {row['status']} at version {row['version']}); stop working on it and do not "
            "complete it: call next_task for new work"
        )
    if row["status"] != "working" or (row["lease_expires_at"] or 0) <= now:
        return LeaseLost(
            f"the lease on task {task_id} expired; stop working on it: the task will be retried. "
            "Call heartbeat_task at least every lease_seconds/2 on long work"
        )
    return InvalidState(f"task {task_id} is {row['status']}")


def edit_problem(row: Row | None, task_id: str, expected_version: int | None, action: str, allowed: str) -> Exception:
    """Explain why a cancel or retry changed no row; `row` is the task now."""
    if row is None:
        return NotFound(f"task {task_id!r} does not exist")
    if expected_version is not None and row["version"] != expected_version:
        return Conflict(
            f"task {task_id} is at version {row['version']}, not {expected_version}: it changed since "
            "you read it; get_task and decide again",
            details={"current_version": row["version"]},
        )
    return InvalidState(
        f"cannot {action} task {task_id}: it is {row['status']}; {action} applies to {allowed} tasks only",
        details={"status": row["status"]},
    )


def missing_dependency(dep: str) -> ValidationError:
    return ValidationError(f"depends_on: task {dep!r} does not exist", details={"field": "depends_on"})
