"""Reliability: exactly-once acceptance under concurrency, fencing, crash recovery, busy stores.

Contract (DESIGN.md "Claims, leases, fencing"): at-least-once execution, at most one accepted
completion per task, expired leases recovered by claims and by the sweep, busy is STORE_BUSY.

Multi-process tests run this very file as a child program (`python tests/test_reliability.py ROLE
ARGS_JSON`, see `_CHILD_ROLES` at the bottom). A child prints one JSON value per line on stdout;
"ready" then waiting for "go" on stdin is the start barrier. Its stderr goes to a file that failing
assertions quote. Leases are expired with injected clocks, never by sleeping on a condition; the
randomised fencing test speeds its shared clock up instead, because leases are whole seconds.

Sections 1-6 are the contract and run on both stores (the `db` fixture, tests/conftest.py):
a SQLite file shared by processes, or a PostgreSQL database shared by servers. Sections 7-8 test
SQLite's own lock, busy timeout and file, and are marked sqlite_only.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import random
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

import taskorch
from taskorch.config import Config, load_config
from taskorch.models import Status, Task, TaskEvent

HERE = Path(__file__).resolve()
_US = 1_000_000
EMPTY_COUNTS = {s.value: 0 for s in Status}


# -- helpers shared by the tests and the child processes --------------------------------------------


def make_config(*, tasks: dict[str, Any] | None = None, store: dict[str, Any] | None = None) -> Config:
    """Test configuration: fast sweeps and long-poll re-checks; the environment is ignored."""
    overrides: dict[str, Any] = {
        "tasks": {"sweep_interval_seconds": 0.05, "poll_interval_seconds": 0.02, **(tasks or {})},
    }
    if store:
        overrides["store"] = store
    return load_config(environ={}, overrides=overrides)


class FakeClock:
    """The store's injected clock: integer microseconds that move only when a test says so."""

    def __init__(self, start_us: int = 1_767_225_600 * _US) -> None:  # 2026-01-01T00:00:00Z
        self.now = start_us

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * _US)


def scaled_clock(origin_us: int, speed: float) -> Callable[[], int]:
    """Wall time running `speed` times faster from `origin_us`; equal in every process given the
    same arguments, so one-second leases last 1/speed s of real time."""

    def clock() -> int:
        return origin_us + int((time.time_ns() // 1000 - origin_us) * speed)

    return clock


def open_svc(
    db_path: str | Path, *, config: Config | None = None, clock: Callable[[], int] | None = None, sweep: bool = False
) -> contextlib.AbstractAsyncContextManager[taskorch.TaskService]:
    """A service on the database (file or URL) with durability "normal"."""
    return taskorch.open_service(db_path, config=config or make_config(), durability="normal", clock=clock, sweep=sweep)


async def wait_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait, at most 5 s, for a background task's effect (the sweep) to show."""
    with anyio.fail_after(5):
        while not await condition():  # noqa: ASYNC110 (nothing to wait on: the sweep has no event)
            await anyio.sleep(0.01)


async def is_status(svc: taskorch.TaskService, task_id: str, status: Status) -> bool:
    return (await svc.get_task(task_id=task_id)).task.status is status


async def skipped_sweeps(caplog: pytest.LogCaptureFixture, *, at_least: int) -> bool:
    return sum("sweep skipped" in r.getMessage() for r in caplog.records) >= at_least


def _emit(value: Any) -> None:
    print(json.dumps(value), flush=True)


async def _barrier() -> None:
    _emit("ready")
    line = await anyio.to_thread.run_sync(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("start barrier: the parent went away")


async def all_tasks(svc: taskorch.TaskService) -> list[Task]:
    tasks: list[Task] = []
    while True:
        page = await svc.list_tasks(limit=200, offset=len(tasks))
        tasks += page.tasks
        if not page.tasks or len(tasks) >= page.total:
            return tasks


async def events_of(svc: taskorch.TaskService, task_id: str) -> list[TaskEvent]:
    events = (await svc.get_task(task_id=task_id, include_events=True)).events
    assert events is not None
    return events


def snapshot(task: Task) -> dict[str, Any]:
    return task.model_dump()


# -- child processes, seen from the parent ---------------------------------------------------------


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-4000:]


class Child:
    """A running child role: line-oriented stdout, stdin for the barrier, stderr kept in a file."""

    def __init__(self, process: Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        assert process.stdout is not None
        self._out = BufferedByteReceiveStream(process.stdout)

    async def readline(self) -> str | None:
        """The next complete line, or None at the end of output (a partial last line is dropped)."""
        try:
            return (await self._out.receive_until(b"\n", 1 << 24)).decode()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None

    async def read_json(self) -> Any:
        line = await self.readline()
        assert line is not None, f"child {self.process.pid} ended without output; stderr:\n{self.stderr()}"
        return json.loads(line)

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(line.encode() + b"\n")

    async def exit_code(self) -> int:
        with anyio.fail_after(15):
            return await self.process.wait()

    def stderr(self) -> str:
        return _read_text(self.stderr_path)


def _open_log(path: Path) -> Any:
    return path.open("wb")


async def _reap(process: Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with anyio.fail_after(15):
        await process.aclose()


@contextlib.asynccontextmanager
async def children(log_dir: Path, role: str, arg_list: Sequence[dict[str, Any]]) -> AsyncIterator[list[Child]]:
    """Start one child per argument dict; on the way out, kill whatever still runs and reap it."""
    async with contextlib.AsyncExitStack() as stack:
        started: list[Child] = []
        for i, args in enumerate(arg_list):
            stderr_path = log_dir / f"{role}-{i}.stderr"
            log = stack.enter_context(_open_log(stderr_path))
            process = await anyio.open_process([sys.executable, str(HERE), role, json.dumps(args)], stderr=log)
            stack.push_async_callback(_reap, process)
            started.append(Child(process, stderr_path))
        yield started


async def start_together(procs: Sequence[Child]) -> None:
    """Wait until every child has opened its service, then let them all go at once."""
    with anyio.fail_after(30):
        for c in procs:
            assert await c.read_json() == "ready", f"child did not start; stderr:\n{c.stderr()}"
        for c in procs:
            await c.send("go")


async def assert_exit_ok(procs: Sequence[Child]) -> None:
    for c in procs:
        code = await c.exit_code()
        assert code == 0, f"child exited with {code}; stderr:\n{c.stderr()}"


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "taskorch.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- 1. many processes drain one queue ----------------------------------------------------------------

WORK_PATHS = ["/srv/repo-a", "/srv/repo-b", "/srv/repo-c", "/srv/repo-d"]
PRIORITIES = ["low", "medium", "high", "urgent"]


@pytest.mark.anyio
async def test_many_processes_drain_2000_tasks_over_four_work_paths_each_completed_exactly_once(
    db: str, store_kind: str, tmp_path: Path
) -> None:
    # SQLite: 8 processes on one file. PostgreSQL: 4 servers (processes, each its own service with
    # its own pool) on one database.
    n_tasks, n_workers = 2000, (8 if store_kind == "sqlite" else 4)
    started = time.monotonic()
    async with open_svc(db) as svc:
        created = []
        for first in range(0, n_tasks, 500):
            created += await svc.create_tasks(
                tasks=[
                    {"work_path": WORK_PATHS[i % 4], "prompt": f"task {i}", "priority": PRIORITIES[i // 4 % 4]}
                    for i in range(first, first + 500)
                ]
            )
    all_ids = {t.id for t in created}
    assert len(all_ids) == n_tasks
    create_s = time.monotonic() - started

    args = [{"db": db, "worker_id": f"w{k}", "offset": k} for k in range(n_workers)]
    async with children(tmp_path, "drain", args) as procs:
        await start_together(procs)
        drain_started = time.monotonic()
        with anyio.fail_after(60):
            results = [await c.read_json() for c in procs]
        drain_s = time.monotonic() - drain_started
        await assert_exit_ok(procs)

    accepted = [task_id for r in results for task_id in r["completed"]]
    counts = collections.Counter(accepted)
    assert [i for i, n in counts.items() if n > 1] == []  # no task accepted twice
    assert set(accepted) == all_ids  # none lost, none unknown
    assert sum(r["empty_claims"] for r in results) >= n_workers  # every worker saw the queue empty
    assert sum(1 for r in results if r["completed"]) >= 2  # the work really was shared

    async with open_svc(db) as svc:
        rows = await all_tasks(svc)
        assert len(rows) == n_tasks
        assert {t.id for t in rows} == all_ids
        assert [t.id for t in rows if t.status is not Status.COMPLETED or t.attempts != 1] == []
        assert all(t.result is not None and t.result["status"] == "success" for t in rows)
        stats = await svc.statistics()
        assert stats.by_status == {**EMPTY_COUNTS, "completed": n_tasks}
        assert stats.total == n_tasks
        assert sorted((w.work_path, w.completed) for w in stats.by_work_path) == [(p, 500) for p in WORK_PATHS]
        for task_id in sorted(all_ids):
            kinds = [e.kind for e in await events_of(svc, task_id)]
            assert kinds == ["created", "claimed", "completed"], (task_id, kinds)
        assert await svc.store.integrity_check() == "ok"
    print(f"\n[reliability] {store_kind}: {n_workers} procs x 2000 tasks: create {create_s:.2f}s, drain {drain_s:.2f}s "
          f"({n_tasks / drain_s:.0f} tasks/s), whole test {time.monotonic() - started:.2f}s")  # fmt: skip


async def _drain_worker(a: dict[str, Any]) -> None:
    """Claim and complete on every work_path in turn until all of them are empty."""
    completed: list[str] = []
    empty_claims = 0
    async with open_svc(a["db"]) as svc:
        await _barrier()
        i, idle = a["offset"], 0
        while idle < len(WORK_PATHS):
            work_path = WORK_PATHS[i % len(WORK_PATHS)]
            i += 1
            claim = await svc.next_task(work_path=work_path, worker_id=a["worker_id"])
            if claim is None:
                idle += 1
                empty_claims += 1
                continue
            idle = 0
            await svc.complete_task(
                task_id=claim.task.id, worker_id=a["worker_id"], lease_token=claim.lease.token,
                status="success", output=f"done by {a['worker_id']}",
            )  # fmt: skip
            completed.append(claim.task.id)
    _emit({"completed": completed, "empty_claims": empty_claims})


# -- 2. one winner across coroutines ----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("db", "inline_writes"),
    [("sqlite", True), ("sqlite", False), pytest.param("postgres", True, marks=pytest.mark.postgres)],
    ids=["sqlite-inline", "sqlite-threaded", "postgres"],
    indirect=["db"],
)
async def test_fifty_concurrent_claims_of_one_task_have_exactly_one_winner(db: str, inline_writes: bool) -> None:
    # Five services on one database, ten claimers each: with inline_writes off every SQLite write
    # runs on its service's own thread, so the claims truly race for the write lock; on
    # PostgreSQL each service has its own pool, and the claims race on the row lock.
    cfg = make_config(store={"inline_writes": inline_writes})
    async with contextlib.AsyncExitStack() as stack:
        services = [await stack.enter_async_context(open_svc(db, config=cfg)) for _ in range(5)]
        task = await services[0].create_task(work_path="/race", prompt="only one may have me")
        gate = anyio.Event()
        claims: list[taskorch.Claim | None] = []

        async def claimer(k: int) -> None:
            await gate.wait()
            claims.append(await services[k % 5].next_task(work_path="/race", worker_id=f"c{k}"))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for k in range(50):
                    tg.start_soon(claimer, k)
                await anyio.wait_all_tasks_blocked()
                gate.set()
        winners = [c for c in claims if c is not None]
        assert len(claims) == 50
        assert len(winners) == 1
        assert winners[0].task.id == task.id
        got = await services[0].get_task(task_id=task.id, include_events=True)
        assert got.task.status is Status.WORKING
        assert got.task.worker_id == winners[0].lease.worker_id
        assert got.task.attempts == 1
        assert got.task.version == winners[0].lease.token
        assert [e.kind for e in got.events or []] == ["created", "claimed"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("db", "inline_writes"),
    [("sqlite", True), ("sqlite", False), pytest.param("postgres", True, marks=pytest.mark.postgres)],
    ids=["sqlite-inline", "sqlite-threaded", "postgres"],
    indirect=["db"],
)
async def test_sixteen_coroutines_draining_500_tasks_complete_each_exactly_once(db: str, inline_writes: bool) -> None:
    cfg = make_config(store={"inline_writes": inline_writes})
    async with contextlib.AsyncExitStack() as stack:
        services = [await stack.enter_async_context(open_svc(db, config=cfg)) for _ in range(4)]
        created = await services[0].create_tasks(tasks=[{"work_path": "/drain", "prompt": f"t{i}"} for i in range(500)])
        accepted: list[str] = []

        async def worker(k: int) -> None:
            svc = services[k % 4]
            while (claim := await svc.next_task(work_path="/drain", worker_id=f"co{k}")) is not None:
                await svc.complete_task(
                    task_id=claim.task.id, worker_id=f"co{k}", lease_token=claim.lease.token, status="success"
                )
                accepted.append(claim.task.id)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for k in range(16):
                    tg.start_soon(worker, k)

        counts = collections.Counter(accepted)
        assert [i for i, n in counts.items() if n > 1] == []
        assert set(counts) == {t.id for t in created}
        rows = await all_tasks(services[0])
        assert {(t.status, t.attempts) for t in rows} == {(Status.COMPLETED, 1)}
        stats = await services[0].statistics()
        assert stats.by_status == {**EMPTY_COUNTS, "completed": 500}
        assert await services[0].store.integrity_check() == "ok"


@pytest.mark.anyio
async def test_sixteen_concurrent_creates_with_one_idempotency_key_make_one_task_and_one_event(db: str) -> None:
    # Four services (on PostgreSQL four pools: the inserts really race) with four creators each.
    async with contextlib.AsyncExitStack() as stack:
        services = [await stack.enter_async_context(open_svc(db)) for _ in range(4)]
        gate = anyio.Event()
        made: list[Task] = []

        async def creator(k: int) -> None:
            await gate.wait()
            made.append(await services[k % 4].create_task(work_path="/idem", prompt=f"try {k}", idempotency_key="once"))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for k in range(16):
                    tg.start_soon(creator, k)
                await anyio.wait_all_tasks_blocked()
                gate.set()
        assert len(made) == 16 and len({t.id for t in made}) == 1
        assert len({snapshot(t)["prompt"] for t in made}) == 1  # every caller got the first task
        assert (await services[0].list_tasks(work_path="/idem")).total == 1
        assert [e.kind for e in await events_of(services[0], made[0].id)] == ["created"]


# -- 3. fencing, deterministic ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_stale_lease_token_cannot_complete_heartbeat_or_release_after_task_is_reclaimed(
    db: str, clock: FakeClock
) -> None:
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/fence", prompt="p", max_attempts=3)
        a = await svc.next_task(work_path="/fence", worker_id="A", lease_seconds=10)
        assert a is not None and a.task.id == task.id and a.task.attempts == 1

        clock.advance(10.001)  # A is paused past its lease
        b = await svc.next_task(work_path="/fence", worker_id="B", lease_seconds=10)
        assert b is not None
        assert b.task.id == task.id
        assert b.lease.token > a.lease.token
        assert b.task.attempts == 2
        assert b.task.worker_id == "B"

        before = await svc.get_task(task_id=task.id, include_events=True)
        stale = {"task_id": task.id, "worker_id": "A", "lease_token": a.lease.token}
        attempts_by_a = [
            lambda: svc.complete_task(**stale, status="success", output="A's late answer"),
            lambda: svc.complete_task(**stale, status="failure", output="A gives up late"),
            lambda: svc.heartbeat_task(**stale, lease_seconds=10),
            lambda: svc.release_task(**stale),
            # A presenting B's token is still not B.
            lambda: svc.complete_task(task_id=task.id, worker_id="A", lease_token=b.lease.token, status="success"),
        ]
        for call in attempts_by_a:
            with pytest.raises(taskorch.LeaseLost) as info:
                await call()
            assert info.value.code == "LEASE_LOST"
            after = await svc.get_task(task_id=task.id, include_events=True)
            assert snapshot(after.task) == snapshot(before.task)
            assert after.task.version == b.lease.token and after.task.status is Status.WORKING
            assert after.task.worker_id == "B"
            assert len(after.events or []) == len(before.events or [])

        done = await svc.complete_task(
            task_id=task.id, worker_id="B", lease_token=b.lease.token, status="success", output="B's answer"
        )
        assert done.status is Status.COMPLETED
        assert done.version == b.lease.token + 1
        assert done.result is not None and done.result["output"] == "B's answer"
        events = await events_of(svc, task.id)
        assert [(e.kind, e.worker_id, e.version) for e in events] == [
            ("created", None, 1),
            ("claimed", "A", a.lease.token),
            ("lease_expired", "A", a.lease.token + 1),
            ("claimed", "B", b.lease.token),
            ("completed", "B", b.lease.token + 1),
        ]
        with pytest.raises(taskorch.LeaseLost):
            await svc.complete_task(**stale, status="success")
        assert snapshot((await svc.get_task(task_id=task.id)).task) == snapshot(done)


@pytest.mark.anyio
async def test_repeated_complete_with_the_accepted_token_returns_the_task_without_a_second_completion(
    db: str,
) -> None:
    # The worker's first answer was lost on the way back; it sends the same completion again.
    async with open_svc(db) as svc:
        task = await svc.create_task(work_path="/replay", prompt="p")
        a = await svc.next_task(work_path="/replay", worker_id="A")
        assert a is not None
        ids = {"task_id": task.id, "worker_id": "A", "lease_token": a.lease.token}
        first = await svc.complete_task(**ids, status="success", output="42")
        again = await svc.complete_task(**ids, status="success", output="42")
        assert snapshot(again) == snapshot(first)
        assert [e.kind for e in await events_of(svc, task.id)] == ["created", "claimed", "completed"]
        with pytest.raises(taskorch.LeaseLost):  # someone else's worker id with that token
            await svc.complete_task(task_id=task.id, worker_id="B", lease_token=a.lease.token, status="success")


@pytest.mark.anyio
async def test_stale_token_cannot_report_success_after_its_failure_was_retried_and_reclaimed(
    db: str, clock: FakeClock
) -> None:
    # A reports a failure (accepted: the task is rescheduled), B claims the retry, then A sends a
    # success with its old token. Its token is no longer current and someone else holds the task:
    # DESIGN.md says LEASE_LOST. A "replay" answer would tell A a success it never had was taken.
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/fence", prompt="p", max_attempts=3)
        a = await svc.next_task(work_path="/fence", worker_id="A", lease_seconds=60)
        assert a is not None
        failed = await svc.complete_task(
            task_id=task.id, worker_id="A", lease_token=a.lease.token, status="failure", output="boom"
        )
        assert failed.status is Status.WAITING
        clock.advance(3600)  # past the retry backoff
        b = await svc.next_task(work_path="/fence", worker_id="B", lease_seconds=60)
        assert b is not None and b.task.id == task.id
        before = await svc.get_task(task_id=task.id, include_events=True)
        outcome: object
        try:
            outcome = await svc.complete_task(
                task_id=task.id, worker_id="A", lease_token=a.lease.token, status="success", output="late"
            )
        except taskorch.LeaseLost as e:
            outcome = e
        after = await svc.get_task(task_id=task.id, include_events=True)
    assert snapshot(after.task) == snapshot(before.task)  # nothing changed either way
    assert len(after.events or []) == len(before.events or [])
    assert isinstance(outcome, taskorch.LeaseLost), f"A's stale success was answered as accepted: {outcome!r:.300}"


@pytest.mark.anyio
async def test_expired_lease_cannot_complete_even_before_anyone_reclaims_the_task(db: str, clock: FakeClock) -> None:
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/fence", prompt="p")
        a = await svc.next_task(work_path="/fence", worker_id="A", lease_seconds=5)
        assert a is not None
        clock.advance(5)  # the lease ends at exactly now: expired
        before = await svc.get_task(task_id=task.id, include_events=True)
        for call in (
            lambda: svc.complete_task(task_id=task.id, worker_id="A", lease_token=a.lease.token, status="success"),
            lambda: svc.heartbeat_task(task_id=task.id, worker_id="A", lease_token=a.lease.token),
            lambda: svc.release_task(task_id=task.id, worker_id="A", lease_token=a.lease.token),
        ):
            with pytest.raises(taskorch.LeaseLost):
                await call()
        after = await svc.get_task(task_id=task.id, include_events=True)
        assert snapshot(after.task) == snapshot(before.task)
        assert len(after.events or []) == len(before.events or [])


@pytest.mark.anyio
async def test_heartbeat_keeps_a_lease_alive_past_its_first_expiry(db: str, clock: FakeClock) -> None:
    async with open_svc(db, clock=clock) as svc:
        await svc.create_task(work_path="/hb", prompt="p")
        a = await svc.next_task(work_path="/hb", worker_id="A", lease_seconds=10)
        assert a is not None
        for _ in range(5):
            clock.advance(8)
            lease = await svc.heartbeat_task(
                task_id=a.task.id, worker_id="A", lease_token=a.lease.token, lease_seconds=10
            )
            assert lease.token == a.lease.token
        assert await svc.recover_expired_leases() == 0
        assert await svc.next_task(work_path="/hb", worker_id="B") is None
        done = await svc.complete_task(task_id=a.task.id, worker_id="A", lease_token=a.lease.token, status="success")
        assert done.status is Status.COMPLETED and done.attempts == 1


@pytest.mark.anyio
async def test_heartbeats_cannot_extend_an_attempt_past_its_timeout(db: str, clock: FakeClock) -> None:
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/deadline", prompt="p", timeout_seconds=30)
        a = await svc.next_task(work_path="/deadline", worker_id="A", lease_seconds=20)
        assert a is not None
        clock.advance(15)
        lease = await svc.heartbeat_task(task_id=task.id, worker_id="A", lease_token=a.lease.token, lease_seconds=60)
        assert lease.expires_at == lease.deadline_at == a.lease.deadline_at  # capped at claim + 30 s
        clock.advance(15)  # the attempt's timeout: the lease is over however often A heartbeats
        with pytest.raises(taskorch.LeaseLost):
            await svc.heartbeat_task(task_id=task.id, worker_id="A", lease_token=a.lease.token)
        assert await svc.recover_expired_leases() == 1
        assert (await svc.get_task(task_id=task.id)).task.status is Status.WAITING


@pytest.mark.anyio
async def test_worker_of_a_cancelled_task_gets_lease_lost(db: str, clock: FakeClock) -> None:
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/cancel", prompt="p")
        a = await svc.next_task(work_path="/cancel", worker_id="A", lease_seconds=60)
        assert a is not None
        cancelled = await svc.cancel_task(task_id=task.id, reason="not needed")
        ids = {"task_id": task.id, "worker_id": "A", "lease_token": a.lease.token}
        with pytest.raises(taskorch.LeaseLost):
            await svc.heartbeat_task(**ids)
        with pytest.raises(taskorch.LeaseLost):
            await svc.complete_task(**ids, status="success")
        with pytest.raises(taskorch.LeaseLost):
            await svc.release_task(**ids)
        assert snapshot((await svc.get_task(task_id=task.id)).task) == snapshot(cancelled)
        assert cancelled.status is Status.CANCELLED


# -- 4. fencing, randomised, across processes ---------------------------------------------------------

FENCE_SPEED = 3.0  # a 1 s lease lasts 1/3 s of real time


@pytest.mark.anyio
async def test_paused_and_slow_worker_processes_never_get_a_second_completion_accepted(db: str, tmp_path: Path) -> None:
    n_tasks, n_workers = 200, 4
    rng = random.Random(20260101)
    origin = time.time_ns() // 1000
    clock = scaled_clock(origin, FENCE_SPEED)
    cfg = make_config(tasks={"max_attempts": 50})
    async with open_svc(db, config=cfg, clock=clock, sweep=False) as svc:
        created = await svc.create_tasks(tasks=[{"work_path": "/fence", "prompt": f"t{i}"} for i in range(n_tasks)])
    all_ids = {t.id for t in created}

    args = [
        {"db": db, "worker_id": f"w{k}", "n_tasks": n_tasks, "origin": origin, "seed": rng.random()}
        for k in range(n_workers)
    ]
    started = time.monotonic()
    async with children(tmp_path, "fenced_worker", args) as procs:
        await start_together(procs)
        # Freeze workers for longer than a lease (0.7 s real = 2.1 lease-seconds): the GC-pause case.
        for _ in range(3):
            await anyio.sleep(rng.uniform(0.2, 0.5))
            victim = rng.choice(procs).process
            victim.send_signal(signal.SIGSTOP)
            try:
                await anyio.sleep(0.7)
            finally:
                victim.send_signal(signal.SIGCONT)
        with anyio.fail_after(30):
            results = [await c.read_json() for c in procs]
        await assert_exit_ok(procs)
    elapsed = time.monotonic() - started

    accepted: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for r in results:
        for task_id, worker_id, token in r["accepted"]:
            accepted[task_id].append((worker_id, token))
    assert {i: v for i, v in accepted.items() if len(v) != 1} == {}  # exactly one accepted per task
    assert set(accepted) == all_ids

    async with open_svc(db, config=cfg, clock=clock, sweep=False) as svc:
        for task_id in sorted(all_ids):
            got = await svc.get_task(task_id=task_id, include_events=True)
            events = got.events or []
            [(worker_id, token)] = accepted[task_id]
            completions = [i for i, e in enumerate(events) if e.kind == "completed"]
            assert len(completions) == 1, (task_id, [e.kind for e in events])
            done = events[completions[0]]
            assert (done.worker_id, done.version) == (worker_id, token + 1)
            # The token was the task's version right before the completion: the claim it fenced.
            claim = events[completions[0] - 1]
            assert (claim.kind, claim.worker_id, claim.version) == ("claimed", worker_id, token)
            assert got.task.status is Status.COMPLETED and got.task.version == token + 1
            assert got.task.attempts == sum(1 for e in events if e.kind == "claimed") - sum(
                1 for e in events if e.kind == "released"
            )
        stats = await svc.statistics()
        assert stats.by_status == {**EMPTY_COUNTS, "completed": n_tasks}
        assert await svc.store.integrity_check() == "ok"
    lease_lost = sum(r["lease_lost"] for r in results)
    executions = sum(r["executions"] for r in results)
    # The scenario did what it is for: leases expired, tasks were re-run, stale calls were refused.
    assert stats.leases_recovered > 0
    assert lease_lost > 0
    assert executions > n_tasks
    print(f"\n[reliability] fencing: {elapsed:.2f}s, {executions} executions of {n_tasks} tasks, "
          f"{stats.leases_recovered} leases recovered, {lease_lost} stale calls refused")  # fmt: skip


async def _fenced_worker(a: dict[str, Any]) -> None:
    """Claim, 'work' for a random time (sometimes past the lease), maybe heartbeat or release,
    then complete; report every accepted completion with its token."""
    rng = random.Random(a["seed"])
    wid = a["worker_id"]
    accepted: list[tuple[str, str, int]] = []
    lease_lost = executions = 0
    cfg = make_config(tasks={"max_attempts": 50})
    clock = scaled_clock(a["origin"], FENCE_SPEED)
    async with open_svc(a["db"], config=cfg, clock=clock, sweep=True) as svc:
        await _barrier()
        while True:
            claim = await svc.next_task(work_path="/fence", worker_id=wid, lease_seconds=1, wait_seconds=0.05)
            if claim is None:
                counts = (await svc.statistics(work_path="/fence")).by_status
                if counts["completed"] + counts["failed"] + counts["cancelled"] >= a["n_tasks"]:
                    break
                continue
            executions += 1
            ids = {"task_id": claim.task.id, "worker_id": wid, "lease_token": claim.lease.token}
            # Mostly quick work; a fifth of it runs around the lease (1/3 s real).
            work = rng.uniform(0, 0.02) if rng.random() < 0.8 else rng.uniform(0.2, 0.5)
            try:
                if work > 0.1 and rng.random() < 0.5:
                    await anyio.sleep(work / 2)
                    await svc.heartbeat_task(**ids, lease_seconds=1)
                    await anyio.sleep(work / 2)
                else:
                    await anyio.sleep(work)
                if rng.random() < 0.05:
                    await svc.release_task(**ids)
                    continue
                await svc.complete_task(**ids, status="success", output=f"{wid} {claim.lease.token}")
            except taskorch.LeaseLost:
                lease_lost += 1
                continue
            accepted.append((claim.task.id, wid, claim.lease.token))
    _emit({"accepted": accepted, "lease_lost": lease_lost, "executions": executions})


# -- 5. a worker killed mid-task ----------------------------------------------------------------------


async def _claim_in_child_and_kill_it(tmp_path: Path, db: str, work_path: str) -> tuple[str, int]:
    """A child process claims a task with a 1 s lease and is SIGKILLed while holding it."""
    args = [{"db": db, "work_path": work_path, "worker_id": "doomed"}]
    async with children(tmp_path, "claim_and_hang", args) as (child,):
        with anyio.fail_after(15):
            claimed = await child.read_json()
        child.process.kill()
        assert await child.exit_code() == -signal.SIGKILL
    return claimed["id"], claimed["token"]


@pytest.mark.anyio
async def test_task_of_killed_worker_is_requeued_by_the_sweep_and_reclaimed(db: str, tmp_path: Path) -> None:
    cfg = make_config()
    async with open_svc(db, config=cfg, sweep=True) as svc:
        task = await svc.create_task(work_path="/kill", prompt="p", max_attempts=3)
        task_id, dead_token = await _claim_in_child_and_kill_it(tmp_path, db, "/kill")
        assert task_id == task.id
        # Lease 1 s + sweep interval 0.05 s, with nobody claiming.
        await wait_until(lambda: is_status(svc, task.id, Status.WAITING))
        events = await events_of(svc, task.id)
        assert (events[-1].kind, events[-1].worker_id, events[-1].to_status) == ("lease_expired", "doomed", "waiting")

        with anyio.fail_after(5):
            claim = await svc.next_task(work_path="/kill", worker_id="B", wait_seconds=4)
        assert claim is not None and claim.task.id == task.id
        assert claim.task.attempts == 2
        assert claim.lease.token > dead_token
        await _assert_dead_token_is_refused(svc, task.id, dead_token)
        done = await svc.complete_task(task_id=task.id, worker_id="B", lease_token=claim.lease.token, status="success")
        assert done.status is Status.COMPLETED and done.attempts == 2


@pytest.mark.anyio
async def test_task_of_killed_worker_is_reclaimed_by_the_next_claim_without_a_sweep(db: str, tmp_path: Path) -> None:
    cfg = make_config()
    async with open_svc(db, config=cfg) as svc:
        task = await svc.create_task(work_path="/kill", prompt="p", max_attempts=3)
        task_id, dead_token = await _claim_in_child_and_kill_it(tmp_path, db, "/kill")
        assert task_id == task.id
        with anyio.fail_after(5):
            claim = await svc.next_task(work_path="/kill", worker_id="B", wait_seconds=4)
        assert claim is not None and claim.task.id == task.id
        assert claim.task.attempts == 2
        assert claim.lease.token == dead_token + 2  # one bump for the expiry, one for the claim
        await _assert_dead_token_is_refused(svc, task.id, dead_token)
        done = await svc.complete_task(task_id=task.id, worker_id="B", lease_token=claim.lease.token, status="success")
        assert done.status is Status.COMPLETED


async def _assert_dead_token_is_refused(svc: taskorch.TaskService, task_id: str, dead_token: int) -> None:
    before = await svc.get_task(task_id=task_id, include_events=True)
    with pytest.raises(taskorch.LeaseLost):
        await svc.complete_task(task_id=task_id, worker_id="doomed", lease_token=dead_token, status="success")
    with pytest.raises(taskorch.LeaseLost):
        await svc.heartbeat_task(task_id=task_id, worker_id="doomed", lease_token=dead_token)
    with pytest.raises(taskorch.LeaseLost):
        await svc.release_task(task_id=task_id, worker_id="doomed", lease_token=dead_token)
    after = await svc.get_task(task_id=task_id, include_events=True)
    assert snapshot(after.task) == snapshot(before.task)
    assert len(after.events or []) == len(before.events or [])


@pytest.mark.anyio
async def test_task_whose_lease_expires_max_attempts_times_ends_failed(db: str, clock: FakeClock) -> None:
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/poison", prompt="crashes its worker", max_attempts=3)
        tokens = []
        for attempt in range(1, 4):
            claim = await svc.next_task(work_path="/poison", worker_id=f"w{attempt}", lease_seconds=2)
            assert claim is not None and claim.task.id == task.id and claim.task.attempts == attempt
            tokens.append(claim.lease.token)
            clock.advance(3)  # the worker died: nobody heartbeats
            assert await svc.recover_expired_leases() == 1
        got = await svc.get_task(task_id=task.id, include_events=True)
        assert got.task.status is Status.FAILED
        assert got.task.attempts == 3
        assert got.task.worker_id is None and got.task.lease_expires_at is None
        assert got.task.error is not None and got.task.error["code"] == "LEASE_EXPIRED"
        assert got.task.completed_at is not None
        expiries = [(e.to_status, e.worker_id) for e in got.events or [] if e.kind == "lease_expired"]
        assert expiries == [(Status.WAITING, "w1"), (Status.WAITING, "w2"), (Status.FAILED, "w3")]
        clock.advance(3600)
        assert await svc.next_task(work_path="/poison", worker_id="w4") is None
        assert await svc.recover_expired_leases() == 0
        with pytest.raises(taskorch.LeaseLost):
            await svc.complete_task(task_id=task.id, worker_id="w3", lease_token=tokens[-1], status="success")
        stats = await svc.statistics()
        assert stats.by_status == {**EMPTY_COUNTS, "failed": 1}
        assert stats.leases_recovered == 3


@pytest.mark.anyio
async def test_task_whose_lease_expires_max_attempts_times_through_claims_ends_failed(
    db: str, clock: FakeClock
) -> None:
    # Same poison task, recovered only by the claims that look for work (no explicit sweep).
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/poison", prompt="crashes its worker", max_attempts=2)
        for attempt in (1, 2):
            claim = await svc.next_task(work_path="/poison", worker_id=f"w{attempt}", lease_seconds=2)
            assert claim is not None and claim.task.attempts == attempt
            clock.advance(3)
        assert await svc.next_task(work_path="/poison", worker_id="w3") is None
        got = (await svc.get_task(task_id=task.id)).task
        assert (got.status, got.attempts) == (Status.FAILED, 2)


# -- 6. the periodic sweep ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_expired_lease_is_recovered_by_recover_expired_leases_with_nobody_claiming(
    db: str, clock: FakeClock
) -> None:
    async with open_svc(db, clock=clock) as svc:
        task = await svc.create_task(work_path="/sweep", prompt="p")
        clock.advance(0.001)  # oldest first: `task` is claimed first
        other = await svc.create_task(work_path="/sweep", prompt="q")
        a = await svc.next_task(work_path="/sweep", worker_id="A", lease_seconds=10)
        b = await svc.next_task(work_path="/sweep", worker_id="B", lease_seconds=30)
        assert a is not None and b is not None and a.task.id == task.id and b.task.id == other.id

        clock.advance(9.9)
        assert await svc.recover_expired_leases() == 0
        assert (await svc.get_task(task_id=task.id)).task.version == a.lease.token  # untouched

        clock.advance(0.2)
        assert await svc.recover_expired_leases() == 1
        got = await svc.get_task(task_id=task.id, include_events=True)
        assert got.task.status is Status.WAITING
        assert got.task.worker_id is None and got.task.lease_expires_at is None
        assert got.task.attempts == 1  # the lost attempt counts
        assert got.task.version == a.lease.token + 1
        last = (got.events or [])[-1]
        assert (last.kind, last.worker_id, last.version) == ("lease_expired", "A", a.lease.token + 1)
        still = (await svc.get_task(task_id=other.id)).task
        assert (still.status, still.worker_id, still.version) == (Status.WORKING, "B", b.lease.token)
        assert await svc.recover_expired_leases() == 0
        assert (await svc.statistics()).leases_recovered == 1


@pytest.mark.anyio
async def test_expired_lease_is_recovered_by_the_background_sweep(db: str, clock: FakeClock) -> None:
    async with open_svc(db, clock=clock, sweep=True) as svc:
        task = await svc.create_task(work_path="/sweep", prompt="p")
        a = await svc.next_task(work_path="/sweep", worker_id="A", lease_seconds=10)
        assert a is not None
        clock.advance(11)
        await wait_until(lambda: is_status(svc, task.id, Status.WAITING))
        got = await svc.get_task(task_id=task.id, include_events=True)
        assert got.task.worker_id is None and got.task.version == a.lease.token + 1
        assert [e.kind for e in got.events or []] == ["created", "claimed", "lease_expired"]
        with pytest.raises(taskorch.LeaseLost):
            await svc.complete_task(task_id=task.id, worker_id="A", lease_token=a.lease.token, status="success")


# -- 7. a busy store ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.sqlite_only  # SQLite's write lock and busy timeout
async def test_create_while_another_connection_holds_the_write_lock_is_store_busy_then_succeeds(
    db_path: Path,
) -> None:
    cfg = make_config(store={"busy_timeout_ms": 200})
    async with open_svc(db_path, config=cfg) as svc:
        queued = await svc.create_task(work_path="/busy", prompt="before the lock")
        raw = sqlite3.connect(db_path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with pytest.raises(taskorch.StoreBusy) as info:
                await svc.create_task(work_path="/busy", prompt="while locked")
            waited = time.monotonic() - started
            assert info.value.code == "STORE_BUSY" and info.value.retryable
            assert 0.15 <= waited < 3, waited  # it waited for the busy timeout (200 ms), then gave up
            # Claims are writes too, and fail the same way; reads are not blocked in WAL mode.
            with pytest.raises(taskorch.StoreBusy):
                await svc.next_task(work_path="/busy", worker_id="A")
            assert (await svc.get_task(task_id=queued.id)).task.status is Status.WAITING
            assert (await svc.statistics()).total == 1
            raw.execute("COMMIT")
        finally:
            raw.close()
        created = await svc.create_task(work_path="/busy", prompt="after the lock")
        assert (await svc.get_task(task_id=created.id)).task.status is Status.WAITING
        claim = await svc.next_task(work_path="/busy", worker_id="A")
        assert claim is not None and claim.task.id == queued.id
        assert (await svc.statistics()).total == 2  # the failed create left nothing behind
        assert await svc.store.integrity_check() == "ok"


@pytest.mark.anyio
@pytest.mark.sqlite_only  # SQLite's write lock
async def test_claim_whose_caller_is_cancelled_while_it_waits_for_the_lock_is_released_not_left_working(
    db_path: Path,
) -> None:
    # An MCP client cancels next_task while the claim waits for another process's write lock: the
    # claim commits once the lock is free, and nobody would hear of it.
    async with open_svc(db_path, config=make_config(store={"busy_timeout_ms": 5000})) as svc:
        task = await svc.create_task(work_path="/gone", prompt="p")
        answers: list[Any] = []

        async def claim() -> None:
            answers.append(await svc.next_task(work_path="/gone", worker_id="A"))

        async def waits_on_the_database_thread() -> bool:
            return bool(svc.store.db._background)  # the inline attempt found the lock taken

        raw = sqlite3.connect(db_path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            async with anyio.create_task_group() as tg:
                tg.start_soon(claim)
                await wait_until(waits_on_the_database_thread)
                tg.cancel_scope.cancel()
                raw.execute("COMMIT")  # the claim gets the lock and commits after its caller left
        finally:
            raw.close()
        await wait_until(_nothing_on_the_database_thread(svc))  # whatever the claim did has landed
        assert answers == []
        got = await svc.get_task(task_id=task.id, include_events=True)
        assert got.task.status is Status.WAITING and got.task.attempts == 0 and got.task.worker_id is None
        assert [e.kind for e in got.events or []] == ["created", "claimed", "released"]
        again = await svc.next_task(work_path="/gone", worker_id="B")
        assert again is not None and again.task.id == task.id and again.task.attempts == 1


@pytest.mark.anyio
async def test_long_poll_cancelled_as_its_claim_commits_gives_the_task_back(db: str) -> None:
    # The long poll's re-claim runs after a wake-up; cancelling the caller right then must not
    # strand the task it claimed.
    async with open_svc(db) as svc:
        answers: list[Any] = []

        async def poll() -> None:
            answers.append(await svc.next_task(work_path="/poll", worker_id="A", wait_seconds=30))

        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await wait_until(_long_polls_waiting(svc))
            task = await svc.create_task(work_path="/poll", prompt="p")  # wakes the poll
            tg.cancel_scope.cancel()  # before the woken poll's claim can answer
        assert answers == []
        got = await svc.get_task(task_id=task.id, include_events=True)
        assert got.task.status is Status.WAITING and got.task.attempts == 0
        kinds = [e.kind for e in got.events or []]
        assert kinds in (["created"], ["created", "claimed", "released"]), kinds


def _nothing_on_the_database_thread(svc: taskorch.TaskService) -> Callable[[], Awaitable[bool]]:
    async def idle() -> bool:
        return not svc.store.db._background

    return idle


def _long_polls_waiting(svc: taskorch.TaskService) -> Callable[[], Awaitable[bool]]:
    async def waiting() -> bool:
        return svc._waiting > 0

    return waiting


@pytest.mark.anyio
@pytest.mark.sqlite_only  # SQLite's write lock
async def test_write_lock_held_elsewhere_makes_the_sweep_skip_rounds_but_not_die(
    db_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskorch.service")
    cfg = make_config(store={"busy_timeout_ms": 50})
    async with open_svc(db_path, config=cfg, clock=clock, sweep=True) as svc:
        task = await svc.create_task(work_path="/busy", prompt="p")
        a = await svc.next_task(work_path="/busy", worker_id="A", lease_seconds=10)
        assert a is not None
        raw = sqlite3.connect(db_path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            clock.advance(11)
            # Every round now runs into STORE_BUSY; wait until two rounds have been skipped.
            await wait_until(lambda: skipped_sweeps(caplog, at_least=2))
            assert (await svc.get_task(task_id=task.id)).task.status is Status.WORKING
            raw.execute("COMMIT")
        finally:
            raw.close()
        await wait_until(lambda: is_status(svc, task.id, Status.WAITING))


@pytest.mark.anyio
@pytest.mark.sqlite_only  # SQLite's write lock
async def test_long_poll_that_times_out_while_the_store_is_busy_leaves_no_task_claimed(db_path: Path) -> None:
    # A long poll re-claims every poll interval. If its wait_seconds runs out while a claim waits
    # for another connection's write lock, either the caller gets the task or the task stays
    # waiting: a claim nobody received would sit `working` until its lease (300 s) expires.
    cfg = make_config(store={"busy_timeout_ms": 5000})
    async with open_svc(db_path, config=cfg) as svc, open_svc(db_path, config=cfg) as other:
        got: list[taskorch.Claim | None] = []
        polled = anyio.Event()

        async def long_poll() -> None:
            got.append(await svc.next_task(work_path="/lp", worker_id="A", wait_seconds=0.3))
            polled.set()

        raw = sqlite3.connect(db_path, isolation_level=None)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_poll)
                await anyio.wait_all_tasks_blocked()  # A found nothing and is waiting
                # Another process files a task (A learns of it only by polling), then a writer
                # holds the lock across A's next re-claim and past A's wait_seconds.
                task = await other.create_task(work_path="/lp", prompt="p")
                raw.execute("BEGIN IMMEDIATE")
                with anyio.fail_after(5):
                    await polled.wait()
                raw.execute("COMMIT")
        finally:
            raw.close()
        await svc.statistics()  # runs on svc's database thread after anything A left queued there
        now = (await svc.get_task(task_id=task.id)).task
    [claim] = got
    if claim is None:
        assert (now.status, now.worker_id) == (Status.WAITING, None), "claimed for A, but A got None"
    else:
        assert claim.task.id == task.id and (now.status, now.worker_id) == (Status.WORKING, "A")


@pytest.mark.anyio
@pytest.mark.sqlite_only  # SQLite's busy timeout
async def test_eight_processes_creating_at_once_with_a_5_s_busy_timeout_get_no_errors(
    db_path: Path, tmp_path: Path
) -> None:
    n_workers, per_worker = 8, 150
    cfg = make_config(store={"busy_timeout_ms": 5000})
    async with taskorch.open_service(db_path, config=cfg, durability="full", sweep=False):
        pass  # create and migrate the file once
    args = [{"db": str(db_path), "worker": k, "count": per_worker} for k in range(n_workers)]
    started = time.monotonic()
    async with children(tmp_path, "create_burst", args) as procs:
        await start_together(procs)
        burst_started = time.monotonic()
        with anyio.fail_after(60):
            results = [await c.read_json() for c in procs]
        burst_s = time.monotonic() - burst_started
        await assert_exit_ok(procs)
    assert [r["errors"] for r in results] == [[]] * n_workers
    ids = [i for r in results for i in r["ids"]]
    assert len(ids) == n_workers * per_worker == len(set(ids))
    async with taskorch.open_service(db_path, config=cfg, durability="full", sweep=False) as svc:
        assert {t.id for t in await all_tasks(svc)} == set(ids)
        assert (await svc.statistics()).by_status == {**EMPTY_COUNTS, "waiting": len(ids)}
        assert await svc.store.integrity_check() == "ok"
    print(f"\n[reliability] 8 procs x {per_worker} creates (full durability): burst {burst_s:.2f}s, "
          f"whole test {time.monotonic() - started:.2f}s")  # fmt: skip


async def _create_burst(a: dict[str, Any]) -> None:
    ids: list[str] = []
    errors: list[str] = []
    cfg = make_config(store={"busy_timeout_ms": 5000})
    async with taskorch.open_service(a["db"], config=cfg, durability="full", sweep=False) as svc:
        await _barrier()
        for i in range(a["count"]):
            try:
                task = await svc.create_task(work_path=f"/burst/{i % 3}", prompt=f"w{a['worker']} #{i}")
            except taskorch.TaskorchError as e:
                errors.append(e.code)
            else:
                ids.append(task.id)
    _emit({"ids": ids, "errors": errors})


# -- 8. durability across kill -9 --------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.sqlite_only  # SQLite's file after kill -9 of its writer
async def test_every_acknowledged_create_survives_kill_9_of_the_writer(db_path: Path, tmp_path: Path) -> None:
    rng = random.Random(8)
    acknowledged: list[str] = []
    for round_no in range(3):
        target = rng.randint(100, 600)
        acked_this_round: list[str] = []
        args = [{"db": str(db_path), "round": round_no}]
        log_dir = tmp_path / f"round{round_no}"
        log_dir.mkdir()
        async with children(log_dir, "create_stream", args) as (child,):
            with anyio.fail_after(30):
                while len(acked_this_round) < target:
                    line = await child.readline()
                    assert line is not None, f"writer died early; stderr:\n{child.stderr()}"
                    acked_this_round.append(line.strip())
            child.process.kill()  # mid-stream: it never stops creating
            with anyio.fail_after(15):
                while (line := await child.readline()) is not None:  # acknowledged before the kill
                    acked_this_round.append(line.strip())
            assert await child.exit_code() == -signal.SIGKILL
        acknowledged += acked_this_round

        async with open_svc(db_path) as svc:
            assert await svc.store.integrity_check() == "ok"
            for task_id in acknowledged:
                got = await svc.get_task(task_id=task_id)
                assert got.task.status is Status.WAITING
            total = (await svc.statistics()).total
            # At most one create per round committed without its acknowledgement being printed.
            assert len(acknowledged) <= total <= len(acknowledged) + round_no + 1
    assert len(set(acknowledged)) == len(acknowledged)


async def _create_stream(a: dict[str, Any]) -> None:
    """Create tasks forever, printing each id once create_task has returned (acknowledged)."""
    async with open_svc(a["db"]) as svc:
        i = 0
        while True:
            task = await svc.create_task(work_path="/durable", prompt=f"round {a['round']} #{i}")
            print(task.id, flush=True)
            i += 1


async def _claim_and_hang(a: dict[str, Any]) -> None:
    async with open_svc(a["db"]) as svc:
        claim = await svc.next_task(work_path=a["work_path"], worker_id=a["worker_id"], lease_seconds=1)
        assert claim is not None
        _emit({"id": claim.task.id, "token": claim.lease.token})
        await anyio.sleep_forever()


_CHILD_ROLES = {
    "drain": _drain_worker,
    "fenced_worker": _fenced_worker,
    "claim_and_hang": _claim_and_hang,
    "create_burst": _create_burst,
    "create_stream": _create_stream,
}

if __name__ == "__main__":
    anyio.run(_CHILD_ROLES[sys.argv[1]], json.loads(sys.argv[2]))
