"""The PostgreSQL store: many taskorch servers on one queue. Same interface as SqliteStore.

Each operation is one statement (one round trip, READ COMMITTED, autocommit) whose CTEs write
the event rows; a fenced write that changes nothing is followed by one read that tells
LEASE_LOST, NOT_FOUND and INVALID_STATE apart. A claim that recovered expired leases but found
nothing else claimable runs once more (what it recovered is visible from the next statement on).
Only create_tasks (a batch: all or nothing) and a claim under a max_working cap run an explicit
transaction.

Time: with an injected clock (tests) every statement gets its value; without one, statements
use the database's clock, so every server agrees on lease expiry. `clock()` then estimates the
database's time from ours plus the offset measured at open: the service reads it only for
retention cut-offs (hours), and statistics take their "now" from the database itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from . import pg_queries as pq
from .config import PostgresConfig
from .errors import NotFound
from .models import CleanupResult, Lease, Task, TaskEvent
from .pg_db import PgDatabase
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

Record = asyncpg.Record
_CLEANUP_BATCH = 1000  # rows per retention DELETE: short transactions, short row locks
_SWEEP_LIMIT = 100  # expired leases recovered per statement (the LIMIT in pg_queries._SWEEP)
_CAPPED_CLAIMS = "taskorch:max_working"  # the advisory lock key of claims under a cap


class PostgresStore:
    """Tasks in a PostgreSQL database shared by any number of servers."""

    def __init__(self, db: PgDatabase, clock: Clock | None = None) -> None:
        self.db = db
        self._injected = clock
        self.clock: Clock = clock or db.clock
        self.location = db.location
        self.on_leases_recovered: Callable[[int], None] | None = None
        db.on_remote_change = self._remote_change
        self.on_remote_change: Callable[[], None] | None = None

    @classmethod
    async def open(
        cls, url: str, cfg: PostgresConfig, *, durability: str, migrations: Path, clock: Clock | None = None
    ) -> PostgresStore:
        return cls(await PgDatabase.open(url, cfg, durability=durability, migrations=migrations), clock)

    async def close(self) -> None:
        await self.db.close()

    def _now(self) -> int | None:
        """The injected clock's value, or None: the database's clock (see pg_queries.NOW)."""
        return None if self._injected is None else self._injected()

    def _remote_change(self) -> None:
        if self.on_remote_change is not None:
            self.on_remote_change()

    # -- creating ---------------------------------------------------------------------------

    async def create(self, spec: NewTask) -> Task:
        now = self._now()
        row, created = await self.db.run(_create, spec, new_task_id(system_clock() if now is None else now), now, ())
        if created:
            self.db.notify([spec.work_path])
        return task_from_row(row)

    async def create_many(self, specs: Sequence[NewTask], refs: Sequence[Sequence[int]]) -> list[Task]:
        """Create all or nothing; `refs[i]` are indexes of earlier items task i depends on."""
        now = self._now()
        ids = [new_task_id(system_clock() if now is None else now) for _ in specs]
        rows = await self.db.run(_create_many, specs, refs, ids, now)
        self.db.notify({spec.work_path for spec in specs})
        return [task_from_row(r) for r in rows]

    # -- claims -----------------------------------------------------------------------------

    async def claim(self, f: ClaimFilter, busy_timeout_ms: int | None = None) -> tuple[Task, Lease] | None:
        tags = list(f.tags) or None
        args: tuple = (self._now(), LEASE_EXPIRED_ERROR, f.worker_id, f.lease_us, tags, f.max_working, f.work_path)
        sql = pq.CLAIM_NEXT
        if f.include_subpaths:
            prefix = f.work_path if f.work_path.endswith("/") else f.work_path + "/"
            args, sql = (*args, prefix, prefix[:-1] + "0"), pq.CLAIM_NEXT_IN_SUBTREE
        # A long poll's re-claim waits for a connection no longer than its caller waits.
        timeout = None if busy_timeout_ms is None else busy_timeout_ms / 1000
        recovered = 0
        for _ in range(2):
            row = await self.db.run(_claim, sql, args, f.max_working > 0, acquire_timeout=timeout)
            recovered += row["recovered"]
            if row["swept_paths"]:
                self.db.notify(row["swept_paths"])
            # Tasks whose lease this statement recovered become claimable from the next one
            # (one snapshot per statement): try once more, as the SQLite store's claim sees them.
            if row["id"] is not None or not row["recovered"]:
                break
        if recovered and self.on_leases_recovered is not None:
            self.on_leases_recovered(recovered)
        if row["id"] is None:
            return None
        return task_from_row(row), lease_from_row(row)

    async def complete(self, c: Completion) -> Task:
        row, unblocked = await self.db.run(_complete, c, self._now())
        if unblocked:  # dependants in other work_paths may be claimable now
            self.db.notify(unblocked)
        return task_from_row(row)

    async def heartbeat(self, task_id: str, worker_id: str, token: int, lease_us: int) -> Lease:
        args = (self._now(), task_id, token, worker_id, lease_us)
        return lease_from_row(await self.db.run(_fenced, pq.HEARTBEAT_TASK, args))

    async def release(self, task_id: str, worker_id: str, token: int, delay_us: int) -> Task:
        row = await self.db.run(_fenced, pq.RELEASE_TASK, (self._now(), task_id, token, worker_id, delay_us))
        self.db.notify([row["work_path"]])
        return task_from_row(row)

    async def recover_expired(self) -> int:
        total = 0
        while True:
            row = await self.db.fetchrow(pq.RECOVER_EXPIRED, self._now(), LEASE_EXPIRED_ERROR)
            total += row["recovered"]
            if row["swept_paths"]:
                self.db.notify(row["swept_paths"])
            if row["recovered"] < _SWEEP_LIMIT:
                return total

    # -- edits by clients -------------------------------------------------------------------

    async def cancel(self, task_id: str, reason: str | None, expected_version: int | None) -> Task:
        error = dumps({"code": "CANCELLED", "message": reason or "cancelled"})
        detail = dumps({"reason": reason}) if reason else None
        args = (self._now(), task_id, expected_version, error, detail)
        return task_from_row(await self.db.run(_edit, pq.CANCEL_TASK, args, "cancel", "waiting or working"))

    async def retry(self, task_id: str, expected_version: int | None) -> Task:
        args = (self._now(), task_id, expected_version)
        row = await self.db.run(_edit, pq.RETRY_TASK, args, "retry", "failed or cancelled")
        self.db.notify([row["work_path"]])
        return task_from_row(row)

    # -- reads ------------------------------------------------------------------------------

    async def get(self, task_id: str, include_events: bool = False) -> tuple[Task, list[TaskEvent] | None]:
        row, events = await self.db.run(_get, task_id, include_events)
        if row is None:
            raise NotFound(f"task {task_id!r} does not exist; list_tasks shows the ids")
        return task_from_row(row), [event_from_row(e) for e in events] if include_events else None

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
        rows = await self.db.fetch(pq.LIST_TASKS, status, priority, work_path, tag, limit, offset)
        return [task_from_row(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def statistics_rows(self, work_path: str | None) -> dict[str, Any]:
        row = await self.db.fetchrow(pq.STATISTICS, self._now(), work_path)
        assert row is not None
        waits, runs = row["waits"] or [], row["runs"] or []
        return {
            "now": row["now"],
            "by_status_priority": json.loads(row["by_status_priority"] or "[]"),
            "by_work_path": json.loads(row["by_work_path"] or "[]"),
            "oldest_waiting": row["oldest_waiting"],
            "durations": [(None, w, r, None) for w, r in zip(waits, runs, strict=True)],
            "finished_last_hour": json.loads(row["finished_last_hour"] or "{}"),
            "active_workers": row["active_workers"],
            "event_counts": json.loads(row["event_counts"] or "{}"),
        }

    async def cleanup(self, cutoff_us: int | None, max_tasks: int) -> CleanupResult:
        """Retention in batches of _CLEANUP_BATCH, each its own short transaction."""
        deleted = 0
        while cutoff_us is not None:
            n = await self.db.run(_delete, pq.DELETE_TERMINAL_BEFORE, (cutoff_us, _CLEANUP_BATCH))
            deleted += n
            if n < _CLEANUP_BATCH:
                break
        total = await self.db.fetchval(pq.COUNT_ALL_TASKS)
        excess = total - max_tasks if max_tasks else 0
        while excess > 0:
            batch = min(excess, _CLEANUP_BATCH)
            n = await self.db.run(_delete, pq.DELETE_OLDEST_TERMINAL, (batch,))
            deleted, total, excess = deleted + n, total - n, excess - n
            if n < batch:  # the rest are live tasks or needed dependencies
                break
        return CleanupResult(deleted=deleted, remaining=total)

    async def ping(self) -> None:
        """A round trip to the database (health checks)."""
        await self.db.fetchval("SELECT 1")

    async def integrity_check(self) -> str:
        """ "ok", or the invariants that some rows break (as SQLite's PRAGMA integrity_check)."""
        row = await self.db.fetchrow(pq.INTEGRITY)
        assert row is not None
        broken = [f"{n} {what}" for what, n in row.items() if n]
        return "; ".join(broken) or "ok"


# -- operations on one pooled connection ------------------------------------------------------------


async def _create(
    conn: asyncpg.Connection, spec: NewTask, task_id: str, now: int | None, extra_deps: Sequence[str]
) -> tuple[Record, bool]:
    """Insert one task; (its row, True), or (the task holding its idempotency key, False)."""
    depends_on = list(dict.fromkeys([*spec.depends_on, *extra_deps]))
    tags = list(spec.tags)
    while True:
        row = await conn.fetchrow(
            pq.CREATE_TASK, now, task_id, spec.work_path, spec.title, spec.prompt, spec.priority, dumps(tags),
            dumps(spec.metadata), dumps(depends_on), spec.max_attempts, spec.delay_us, spec.timeout_seconds,
            depends_on, spec.idempotency_key, tags,
        )  # fmt: skip
        if row["missing_dep"] is not None:
            raise missing_dependency(row["missing_dep"])
        if row["id"] is not None:
            return row, True
        first = await conn.fetchrow(pq.SELECT_TASK_BY_IDEMPOTENCY_KEY, spec.idempotency_key)
        if first is not None:
            return first, False
        # The task holding the key was deleted by retention in between: insert again.


async def _create_many(
    conn: asyncpg.Connection, specs: Sequence[NewTask], refs: Sequence[Sequence[int]], ids: list[str], now: int | None
) -> list[Record]:
    rows: list[Record] = []
    async with conn.transaction():
        for i, spec in enumerate(specs):
            # An item whose idempotency key exists is the existing task: dependants name its id.
            row, _ = await _create(conn, spec, ids[i], now, [rows[j]["id"] for j in refs[i]])
            rows.append(row)
    return rows


async def _claim(conn: asyncpg.Connection, sql: str, args: tuple, capped: bool) -> Record:
    if not capped:
        return await conn.fetchrow(sql, *args)
    # Under max_working, claims that could count the same free slot must not overlap: they take
    # one advisory lock until commit (only when the cap is configured).
    async with conn.transaction():
        await conn.execute(pq.LOCK_WORK_PATH, _CAPPED_CLAIMS)
        return await conn.fetchrow(sql, *args)


async def _complete(conn: asyncpg.Connection, c: Completion, now: int | None) -> tuple[Record, list[str]]:
    error = None if c.error is None else dumps(c.error)
    row = await conn.fetchrow(
        pq.COMPLETE_TASK, now, c.task_id, c.token, c.worker_id, c.success, c.retryable, c.backoff_base_us,
        c.backoff_max_us, dumps(c.result), error,
    )  # fmt: skip
    if row is not None:
        return row, row["unblocked"]
    current = await conn.fetchrow(pq.COMPLETE_PROBLEM, now, c.task_id, c.token, c.worker_id, c.success)
    # A complete retried with the token that completed it (its answer was lost on the way) gets
    # the task back instead of an error: the completion was accepted once. Only while nothing
    # has happened to the task since; later, the token is just stale.
    if current is not None and current["version"] == c.token + 1 and current["accepted"]:
        return current, []
    raise lease_problem(current, c.task_id, c.worker_id, c.token, current["now"] if current else 0)


async def _fenced(conn: asyncpg.Connection, sql: str, args: tuple) -> Record:
    """A heartbeat or release; on 0 rows, one read to say why."""
    row = await conn.fetchrow(sql, *args)
    if row is not None:
        return row
    now, task_id, token, worker_id = args[:4]
    current = await conn.fetchrow(pq.SELECT_TASK_NOW, now, task_id)
    raise lease_problem(current, task_id, worker_id, token, current["now"] if current else 0)


async def _edit(conn: asyncpg.Connection, sql: str, args: tuple, action: str, allowed: str) -> Record:
    row = await conn.fetchrow(sql, *args)
    if row is not None:
        return row
    current = await conn.fetchrow(pq.SELECT_TASK, args[1])
    raise edit_problem(current, args[1], args[2], action, allowed)


async def _get(conn: asyncpg.Connection, task_id: str, include_events: bool) -> tuple[Record | None, list[Record]]:
    row = await conn.fetchrow(pq.SELECT_TASK, task_id)
    events = await conn.fetch(pq.SELECT_EVENTS, task_id) if include_events and row is not None else []
    return row, events


async def _delete(conn: asyncpg.Connection, sql: str, args: tuple) -> int:
    for _ in range(3):
        try:
            status = await conn.execute(sql, *args)
        except asyncpg.ForeignKeyViolationError:
            # A dependant naming one of these tasks committed after this statement's snapshot:
            # the next statement sees it and keeps that task.
            continue
        return int(status.split()[-1])
    return 0
