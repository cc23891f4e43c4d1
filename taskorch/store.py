"""The SQLite store: one method, one transaction. Rows become model types here.

The service hands over validated, normalised values; the store owns time (its clock, injectable
for tests), ids, transactions and the translation of "0 rows changed" into the right error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import queries as q
from .db import Database, Row, Tx
from .errors import NotFound
from .models import CleanupResult, Lease, Task, TaskEvent
from .store_api import (
    LEASE_EXPIRED_ERROR,
    ClaimFilter,
    Clock,
    Completion,
    NewTask,
    dumps,
    edit_problem,
    event_from_row,
    lease_from_row,
    lease_problem,
    missing_dependency,
    new_task_id,
    system_clock,
    task_from_row,
)

# Shared with the PostgreSQL store; re-exported for the callers that import them from here.
__all__ = ["ClaimFilter", "Clock", "Completion", "NewTask", "SqliteStore", "new_task_id", "system_clock"]

_US = 1_000_000
_dumps = dumps


def _recover_expired(tx: Tx, now: int) -> int:
    """Requeue (or fail, when out of attempts) every task whose lease has expired."""
    if tx.execute(q.RECORD_EXPIRED_LEASES, {"now": now, "detail": None}) == 0:
        return 0
    return tx.execute(q.RECOVER_EXPIRED_LEASES, {"now": now, "error": LEASE_EXPIRED_ERROR})


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
            raise missing_dependency(dep)
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
        # Other processes on the same file are seen by the service's long-poll re-checks only.
        self.on_remote_change: Callable[[], None] | None = None
        self.location = str(db.path)

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

    async def ping(self) -> None:
        """A round trip to the database (health checks)."""
        await self.db.ping()

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
    return lease_problem(tx.fetchone(q.SELECT_TASK, (task_id,)), task_id, worker_id, token, now)


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
    return edit_problem(tx.fetchone(q.SELECT_TASK, (task_id,)), task_id, expected_version, action, allowed)


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
