"""Concurrent writes share a transaction, but each stays atomic and gets its own answer.

The first three are contract tests and run on both stores (the `db` fixture): on PostgreSQL each
write is its own statement, and the answers must be the same. The rest test SQLite's batching
and its file lock, and are SQLite-only.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import anyio
import pytest

import taskorch
from taskorch.config import load_config

pytestmark = pytest.mark.anyio


def _config(**store):
    return load_config(environ={}, overrides={"store": {"durability": "normal", **store}})


async def _gather(*aws):
    return await asyncio.gather(*aws, return_exceptions=True)


async def test_a_failing_write_does_not_roll_back_the_others_of_its_batch(db: str) -> None:
    async with taskorch.open_service(db, config=_config(), sweep=False) as svc:
        results = await _gather(
            svc.create_task(work_path="/a", prompt="one"),
            svc.create_task(work_path="/a", prompt="two", depends_on=["t-missing"]),  # fails in the store
            svc.create_task(work_path="/a", prompt="three"),
        )
        assert isinstance(results[0], taskorch.Task) and isinstance(results[2], taskorch.Task)
        assert isinstance(results[1], taskorch.ValidationError) and "depends_on" in str(results[1])
        page = await svc.list_tasks(work_path="/a")
        assert sorted(t.prompt for t in page.tasks) == ["one", "three"]
        for task in page.tasks:  # each kept its own event, none of the failed one's
            events = (await svc.get_task(task_id=task.id, include_events=True)).events
            assert [e.kind for e in events] == ["created"]


async def test_stale_and_current_completions_in_one_batch_each_get_their_own_answer(db: str) -> None:
    async with taskorch.open_service(db, config=_config(), sweep=False) as svc:
        first = await svc.create_task(work_path="/b", prompt="p1")
        second = await svc.create_task(work_path="/b", prompt="p2")
        c1 = await svc.next_task(work_path="/b", worker_id="w1")
        c2 = await svc.next_task(work_path="/b", worker_id="w2")
        assert {c1.task.id, c2.task.id} == {first.id, second.id}
        results = await _gather(
            svc.complete_task(task_id=c1.task.id, worker_id="w1", lease_token=c1.lease.token, status="success"),
            svc.complete_task(task_id=c2.task.id, worker_id="w2", lease_token=c2.lease.token + 7, status="success"),
            svc.complete_task(task_id=c2.task.id, worker_id="w2", lease_token=c2.lease.token, status="success"),
        )
        assert results[0].status is taskorch.Status.COMPLETED
        assert isinstance(results[1], taskorch.LeaseLost)
        assert results[2].status is taskorch.Status.COMPLETED


async def test_sixteen_concurrent_claims_share_transactions_and_never_share_a_task(db: str) -> None:
    async with taskorch.open_service(db, config=_config(), sweep=False) as svc:
        ids = {(await svc.create_task(work_path="/c", prompt=f"p{i}")).id for i in range(40)}
        claims = await _gather(*(svc.next_task(work_path="/c", worker_id=f"w{i}") for i in range(48)))
        won = [c for c in claims if c is not None]
        assert all(isinstance(c, taskorch.Claim) for c in won)
        assert len(won) == 40 and {c.task.id for c in won} == ids
        assert claims.count(None) == 8


@pytest.mark.sqlite_only  # PostgreSQL sends each write at once: there is no batch to drop it from
async def test_a_write_cancelled_before_its_batch_runs_is_not_applied(tmp_path: Path) -> None:
    async with taskorch.open_service(tmp_path / "t.db", config=_config(), sweep=False) as svc:
        doomed = asyncio.ensure_future(svc.create_task(work_path="/d", prompt="never"))
        kept = asyncio.ensure_future(svc.create_task(work_path="/d", prompt="kept"))
        await asyncio.sleep(0)  # both are queued for the next batch now
        doomed.cancel()
        await _gather(doomed, kept)
        assert doomed.cancelled()
        page = await svc.list_tasks(work_path="/d")
        assert [t.prompt for t in page.tasks] == ["kept"]


@pytest.mark.sqlite_only  # SQLite's file lock, held by a raw connection
async def test_a_batch_waits_on_the_database_thread_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with taskorch.open_service(db, config=_config(busy_timeout_ms=5000), sweep=False) as svc:
        raw = sqlite3.connect(db, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        try:
            pending = [asyncio.ensure_future(svc.create_task(work_path="/e", prompt=f"p{i}")) for i in range(5)]
            await anyio.wait_all_tasks_blocked()
            assert not any(p.done() for p in pending)  # blocked on the lock, off the event loop
        finally:
            raw.execute("COMMIT")
            raw.close()
        with anyio.fail_after(10):
            created = await asyncio.gather(*pending)
        assert len({t.id for t in created}) == 5
        assert (await svc.list_tasks(work_path="/e")).total == 5


@pytest.mark.sqlite_only  # SQLite's busy timeout
async def test_a_batch_that_outwaits_the_busy_timeout_fails_every_op_with_store_busy(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with taskorch.open_service(db, config=_config(busy_timeout_ms=100), sweep=False) as svc:
        raw = sqlite3.connect(db, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        try:
            with anyio.fail_after(10):
                results = await _gather(*(svc.create_task(work_path="/f", prompt=f"p{i}") for i in range(3)))
        finally:
            raw.execute("COMMIT")
            raw.close()
        assert all(isinstance(r, taskorch.StoreBusy) for r in results)
        assert (await svc.list_tasks(work_path="/f")).total == 0
