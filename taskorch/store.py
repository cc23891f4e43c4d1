"""The SQLite store: one method, one transaction. Rows become model types here.

The service hands over validated, normalised values; the store owns time (its clock, injectable
for tests), ids, transactions and the translation of "0 rows changed" into the right error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import queries as q
from .db import Database, Row, Tx
from .errors import Conflict, InvalidState, LeaseLost, NotFound, ValidationError
from .models import (
    RANK_PRIORITY,
    CleanupResult,
    Lease,
    Status,
    Task,
    TaskEvent,
    construct,
    us_to_datetime,
)

Clock = Callable[[], int]
_US = 1_000_000


def system_clock() -> int:
    """Microseconds since the epoch, UTC."""
    return time.time_ns() // 1000


_B32 = "0123456789abcdefghjkmnpqrstvwxyz"


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


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _json_list(text: str) -> list:
    return [] if text == "[]" else json.loads(text)  # the common case, without the parser


def _dumps(value: Any) -> str:
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
            result=_loads(row["result"]),
            error=_loads(row["error"]),
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
        detail=_loads(row["detail"]),
    )


_LEASE_EXPIRED_ERROR = _dumps(
    {"code": "LEASE_EXPIRED", "message": "the worker's lease or the attempt's timeout expired"}
)


def _recover_expired(tx: Tx, now: int) -> int:
    """Requeue (or fail, when out of attempts) every task whose lease has expired."""
    if tx.execute(q.RECORD_EXPIRED_LEASES, {"now": now, "detail": None}) == 0:
        return 0
    return tx.execute(q.RECOVER_EXPIRED_LEASES, {"now": now, "error": _LEASE_EXPIRED_ERROR})


def _event(tx: Tx, row: Row, kind: str, from_status: str | None, now: int, detail: Any = None) -> None:
    tx.execute(
        q.INSERT_EVENT,
        (
            row["id"],
            kind,
            from_status,
            row["status"],
            row["worker_id"],
            row["version"],
            now,
            None if detail is None else _dumps(detail),
        ),
    )


def _insert_task(tx: Tx, spec: NewTask, task_id: str, now: int, extra_deps: Sequence[str] = ()) -> Row:
    depends_on = list(dict.fromkeys([*spec.depends_on, *extra_deps]))
    for dep in depends_on:
        if tx.fetchone(q.TASK_EXISTS, (dep,)) is None:
            raise ValidationError(f"depends_on: task {dep!r} does not exist", details={"field": "depends_on"})
    params = {
        "id": task_id,
        "work_path": spec.work_path,
        "title": spec.title,
        "prompt": spec.prompt,
        "priority": spec.priority,
        "tags": _dumps(list(spec.tags)),
        "metadata": _dumps(spec.metadata),
        "depends_on": _dumps(depends_on),
        "max_attempts": spec.max_attempts,
        "run_after": now + spec.delay_us,
        "timeout_seconds": spec.timeout_seconds,
        "idempotency_key": spec.idempotency_key,
        "now": now,
    }
    row = tx.fetchone(q.INSERT_TASK, params)
    if row is None:  # the idempotency key exists: the first task is the answer
        return tx.fetchone(q.SELECT_TASK_BY_IDEMPOTENCY_KEY, (spec.idempotency_key,))
    if depends_on:
        tx.executemany(q.INSERT_DEPENDENCY, [(task_id, d) for d in depends_on])
    if spec.tags:
        tx.executemany(q.INSERT_TAG, [(task_id, t) for t in spec.tags])
    _event(tx, row, "created", None, now)
    return row


class SqliteStore:
    """Tasks in one SQLite file. Every public method is one transaction."""

    def __init__(self, db: Database, clock: Clock = system_clock) -> None:
        self.db = db
        self.clock = clock
        # Told how many expired leases a claim recovered on its way (for metrics).
        self.on_leases_recovered: Callable[[int], None] | None = None

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        durability: str = "full",
        busy_timeout_ms: int = 5000,
        inline_writes: bool = True,
        migrations_dir: Path,
        clock: Clock = system_clock,
    ) -> SqliteStore:
        db = await Database.open(
            path,
            durability=durability,
            busy_timeout_ms=busy_timeout_ms,
            inline_writes=inline_writes,
            migrations_dir=migrations_dir,
        )
        return cls(db, clock)

    async def close(self) -> None:
        await self.db.close()

    # -- creating ---------------------------------------------------------------------------

    async def create(self, spec: NewTask) -> Task:
        now = self.clock()
        row = await self.db.write(_insert_task, spec, new_task_id(now), now)
        return task_from_row(row)

    async def create_many(self, specs: Sequence[NewTask], refs: Sequence[Sequence[int]]) -> list[Task]:
        """Create all or nothing; `refs[i]` are indexes of earlier items task i depends on."""
        now = self.clock()
        ids = [new_task_id(now) for _ in specs]

        def run(tx: Tx) -> list[Row]:
            rows: list[Row] = []
            for i, spec in enumerate(specs):
                row = _insert_task(tx, spec, ids[i], now, [rows[j]["id"] for j in refs[i]])
                rows.append(row)
            return rows

        return [task_from_row(r) for r in await self.db.write(run)]

    # -- claims -----------------------------------------------------------------------------

    async def claim(self, f: ClaimFilter, busy_timeout_ms: int | None = None) -> tuple[Task, Lease] | None:
        now = self.clock()
        row, recovered = await self.db.write(_claim, f, now, busy_timeout_ms=busy_timeout_ms)
        if recovered and self.on_leases_recovered is not None:
            self.on_leases_recovered(recovered)
        if row is None:
            return None
        return task_from_row(row), lease_from_row(row)

    async def complete(self, c: Completion) -> Task:
        now = self.clock()
        return task_from_row(await self.db.write(_complete, c, now))

    async def heartbeat(self, task_id: str, worker_id: str, token: int, lease_us: int) -> Lease:
        now = self.clock()
        row = await self.db.write(_heartbeat, task_id, worker_id, token, now, now + lease_us)
        return lease_from_row(row)

    async def release(self, task_id: str, worker_id: str, token: int, delay_us: int) -> Task:
        now = self.clock()
        return task_from_row(await self.db.write(_release, task_id, worker_id, token, now, delay_us))

    async def recover_expired(self) -> int:
        return await self.db.write(_recover_expired, self.clock())

    # -- edits by clients -------------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str | None, expected_version: int | None) -> Task:
        now = self.clock()
        return task_from_row(await self.db.write(_cancel, task_id, reason, expected_version, now))

    async def retry(self, task_id: str, expected_version: int | None) -> Task:
        now = self.clock()
        return task_from_row(await self.db.write(_retry, task_id, expected_version, now))

    # -- reads ------------------------------------------------------------------------------

    async def get(self, task_id: str, include_events: bool = False) -> tuple[Task, list[TaskEvent] | None]:
        row, events = await self.db.read(_get, task_id, include_events, inline=True)
        if row is None:
            raise NotFound(f"task {task_id!r} does not exist; list_tasks shows the ids")
        evs = [event_from_row(e) for e in events] if include_events else None
        return task_from_row(row), evs

    async def list(
        self,
        *,
        status: str | None,
        priority: int | None,
        work_path: str | None,
        tag: str | None,
        limit: int,
        offset: int,
    ) -> tuple[list[Task], int]:
        params = {
            "status": status,
            "priority": priority,
            "work_path": work_path,
            "tag": tag,
            "limit": limit,
            "offset": offset,
        }
        rows, total = await self.db.read(_list, params)
        return [task_from_row(r) for r in rows], total

    async def statistics_rows(self, work_path: str | None) -> dict[str, Any]:
        now = self.clock()
        return await self.db.read(_statistics, work_path, now)

    async def cleanup(self, cutoff_us: int | None, max_tasks: int) -> CleanupResult:
        return await self.db.write(_cleanup, cutoff_us, max_tasks)

    async def integrity_check(self) -> str:
        return await self.db.integrity_check()


# -- transaction bodies (run inline or on the database thread) ----------------------------------


def _claim(tx: Tx, f: ClaimFilter, now: int) -> tuple[Row | None, int]:
    recovered = _recover_expired(tx, now)
    params = {
        "work_path": f.work_path,
        "worker_id": f.worker_id,
        "now": now,
        "lease_until": now + f.lease_us,
        "tag_set": ("\x1f" + "\x1f".join(f.tags) + "\x1f") if f.tags else None,
        "max_working": f.max_working,
    }
    if f.include_subpaths:
        prefix = f.work_path if f.work_path.endswith("/") else f.work_path + "/"
        params["subtree_lo"] = prefix
        params["subtree_hi"] = prefix[:-1] + "0"  # "0" sorts right after "/"
        row = tx.fetchone(q.CLAIM_NEXT_IN_SUBTREE, params)
    else:
        row = tx.fetchone(q.CLAIM_NEXT, params)
    if row is not None:
        _event(tx, row, "claimed", "waiting", now)
    return row, recovered


def _lease_problem(tx: Tx, task_id: str, worker_id: str, token: int, now: int) -> Exception:
    """Explain why a fenced write changed no row."""
    row = tx.fetchone(q.SELECT_TASK, (task_id,))
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


def _complete(tx: Tx, c: Completion, now: int) -> Row:
    params = {
        "id": c.task_id,
        "worker_id": c.worker_id,
        "token": c.token,
        "now": now,
        "success": c.success,
        "retryable": c.retryable,
        "backoff_base": c.backoff_base_us,
        "backoff_max": c.backoff_max_us,
        "result": _dumps(c.result),
        "error": None if c.error is None else _dumps(c.error),
    }
    row = tx.fetchone(q.COMPLETE_TASK, params)
    if row is None:
        # A complete retried with the token that completed it (its answer was lost on the way)
        # gets the task back instead of an error: the completion was accepted once.
        # Only while nothing has happened to the task since; later, the token is just stale.
        accepted = q.SELECT_SUCCESS_EVENT if c.success else q.SELECT_FAILURE_EVENT
        current = tx.fetchone(q.SELECT_TASK, (c.task_id,))
        if (
            current is not None
            and current["version"] == c.token + 1
            and tx.fetchone(accepted, (c.task_id, c.token + 1, c.worker_id)) is not None
        ):
            return current
        raise _lease_problem(tx, c.task_id, c.worker_id, c.token, now)
    status = row["status"]
    kind = {"completed": "completed", "failed": "failed", "waiting": "retry_scheduled"}[status]
    detail = None if c.success else c.error
    tx.execute(
        q.INSERT_EVENT,
        (
            row["id"],
            kind,
            "working",
            status,
            c.worker_id,
            row["version"],
            now,
            None if detail is None else _dumps(detail),
        ),
    )
    return row


def _heartbeat(tx: Tx, task_id: str, worker_id: str, token: int, now: int, lease_until: int) -> Row:
    row = tx.fetchone(
        q.HEARTBEAT_TASK,
        {"id": task_id, "worker_id": worker_id, "token": token, "now": now, "lease_until": lease_until},
    )
    if row is None:
        raise _lease_problem(tx, task_id, worker_id, token, now)
    return row


def _release(tx: Tx, task_id: str, worker_id: str, token: int, now: int, delay_us: int) -> Row:
    params = {"id": task_id, "worker_id": worker_id, "token": token, "now": now, "run_after": now + delay_us}
    row = tx.fetchone(q.RELEASE_TASK, params)
    if row is None:
        raise _lease_problem(tx, task_id, worker_id, token, now)
    tx.execute(q.INSERT_EVENT, (task_id, "released", "working", "waiting", worker_id, row["version"], now, None))
    return row


def _edit_problem(tx: Tx, task_id: str, expected_version: int | None, action: str, allowed: str) -> Exception:
    row = tx.fetchone(q.SELECT_TASK, (task_id,))
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


def _cancel(tx: Tx, task_id: str, reason: str | None, expected_version: int | None, now: int) -> Row:
    detail = _dumps({"reason": reason}) if reason else None
    params = {"id": task_id, "expected_version": expected_version, "now": now, "detail": detail}
    if tx.execute(q.RECORD_CANCEL, params) == 0:
        raise _edit_problem(tx, task_id, expected_version, "cancel", "waiting or working")
    error = _dumps({"code": "CANCELLED", "message": reason or "cancelled"})
    return tx.fetchone(q.CANCEL_TASK, {"id": task_id, "expected_version": expected_version, "now": now, "error": error})


def _retry(tx: Tx, task_id: str, expected_version: int | None, now: int) -> Row:
    params = {"id": task_id, "expected_version": expected_version, "now": now}
    if tx.execute(q.RECORD_RETRY, params) == 0:
        raise _edit_problem(tx, task_id, expected_version, "retry", "failed or cancelled")
    return tx.fetchone(q.RETRY_TASK, params)


def _get(tx: Tx, task_id: str, include_events: bool) -> tuple[Row | None, list[Row]]:
    row = tx.fetchone(q.SELECT_TASK, (task_id,))
    events = tx.fetchall(q.SELECT_EVENTS, (task_id,)) if include_events and row is not None else []
    return row, events


def _list(tx: Tx, params: dict[str, Any]) -> tuple[list[Row], int]:
    rows = tx.fetchall(q.LIST_TASKS, params)
    total = tx.fetchone(q.COUNT_TASKS, params)[0]
    return rows, total


def _statistics(tx: Tx, work_path: str | None, now: int) -> dict[str, Any]:
    wp = {"work_path": work_path}
    day_ago, hour_ago = now - 86_400 * _US, now - 3_600 * _US
    return {
        "now": now,
        "by_status_priority": [tuple(r) for r in tx.fetchall(q.STATS_BY_STATUS_AND_PRIORITY, wp)],
        "by_work_path": [tuple(r) for r in tx.fetchall(q.STATS_BY_WORK_PATH, wp)],
        "oldest_waiting": tx.fetchone(q.STATS_OLDEST_WAITING, wp)[0],
        "durations": [tuple(r) for r in tx.fetchall(q.STATS_DURATIONS, {**wp, "since": day_ago})],
        "finished_last_hour": dict(tuple(r) for r in tx.fetchall(q.STATS_FINISHED_SINCE, {**wp, "since": hour_ago})),
        "active_workers": tx.fetchone(q.STATS_ACTIVE_WORKERS, {**wp, "now": now})[0],
        "event_counts": dict(tuple(r) for r in tx.fetchall(q.STATS_EVENT_COUNTS, wp)),
    }


def _cleanup(tx: Tx, cutoff_us: int | None, max_tasks: int) -> CleanupResult:
    deleted = 0
    if cutoff_us is not None:
        deleted += tx.execute(q.DELETE_TERMINAL_BEFORE, {"cutoff": cutoff_us})
    total = tx.fetchone(q.COUNT_ALL_TASKS)[0]
    if max_tasks and total > max_tasks:
        n = tx.execute(q.DELETE_OLDEST_TERMINAL, {"excess": total - max_tasks})
        deleted += n
        total -= n
    return CleanupResult(deleted=deleted, remaining=total)
