"""Contract tests of the service API (taskorch.open_service): the task model, the state machine,
claims, leases and fencing, dependencies, batches, retention and statistics.

Every test runs against both stores (the `db` fixture, tests/conftest.py): a real SQLite file and a
real PostgreSQL database, no mocks. Time comes from an injected clock (integer microseconds), so
nothing here sleeps to wait for time to pass.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anyio
import pytest

import taskorch
from taskorch.config import load_config
from taskorch.models import us_to_datetime

pytestmark = pytest.mark.anyio

US = 1_000_000
T0 = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z, in microseconds


class Clock:
    """A mutable clock: integer microseconds since the epoch, moved only by the test."""

    def __init__(self, start: int = T0) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * US)

    def at(self, seconds_after: float = 0) -> datetime:
        """The clock's current time (plus an offset) as the API shows it."""
        return us_to_datetime(self.now + round(seconds_after * US))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@contextlib.asynccontextmanager
async def service(db: str, clock: Clock, **overrides: Any) -> AsyncIterator[taskorch.TaskService]:
    """A service on a fresh database (`db`: a file or a URL); `overrides` are config sections."""
    cfg = load_config(environ={}, overrides=overrides)
    async with taskorch.open_service(db, config=cfg, clock=clock, sweep=False) as svc:
        yield svc


async def claim(svc: taskorch.TaskService, work_path: str = "/w", worker_id: str = "w1", **kw: Any) -> taskorch.Claim:
    c = await svc.next_task(work_path=work_path, worker_id=worker_id, **kw)
    assert c is not None, f"expected a claimable task in {work_path}"
    return c


async def complete(svc: taskorch.TaskService, c: taskorch.Claim, status: str = "success", **kw: Any) -> taskorch.Task:
    return await svc.complete_task(
        task_id=c.task.id, worker_id=c.lease.worker_id, lease_token=c.lease.token, status=status, **kw
    )


async def claim_order(svc: taskorch.TaskService, n: int, work_path: str = "/w", **kw: Any) -> list[str]:
    """Claim n tasks in a row (each by its own worker) and return their ids in claim order."""
    return [(await claim(svc, work_path, worker_id=f"w{i}", **kw)).task.id for i in range(n)]


async def events_of(svc: taskorch.TaskService, task_id: str) -> list[taskorch.TaskEvent]:
    return (await svc.get_task(task_id=task_id, include_events=True)).events


async def error_of(call) -> taskorch.TaskorchError:
    with pytest.raises(taskorch.TaskorchError) as info:
        await call
    return info.value


# -- creating -----------------------------------------------------------------------------------


async def test_create_task_fills_in_defaults_and_records_a_created_event(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/repo", prompt="  Fix the login bug  \nIt fails on empty passwords.")

        assert task.id and isinstance(task.id, str)
        assert task.title == "Fix the login bug"
        assert task.prompt == "  Fix the login bug  \nIt fails on empty passwords."
        assert task.priority is taskorch.Priority.MEDIUM
        assert task.status is taskorch.Status.WAITING
        assert task.version == 1
        assert task.attempts == 0
        assert task.max_attempts == 3
        assert task.timeout_seconds == 3600
        assert (task.tags, task.metadata, task.depends_on) == ([], {}, [])
        assert (task.worker_id, task.lease_expires_at, task.result, task.error) == (None, None, None, None)
        assert (task.idempotency_key, task.started_at, task.completed_at) == (None, None, None)
        assert task.created_at == task.updated_at == task.run_after == clock.at()

        fetched = await svc.get_task(task_id=task.id, include_events=True)
        assert fetched.task == task
        [event] = fetched.events
        assert (event.kind, event.from_status, event.to_status, event.version) == (
            "created", None, taskorch.Status.WAITING, 1,
        )  # fmt: skip
        assert event.task_id == task.id
        assert event.at == clock.at()


async def test_create_task_keeps_an_explicit_title_tags_metadata_and_limits(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(
            work_path="/repo", prompt="do it", title="A title", priority="high", tags=["a", "b", "a"],
            metadata={"k": [1, 2]}, max_attempts=7, timeout_seconds=60, idempotency_key="key-1",
        )  # fmt: skip
        assert task.title == "A title"
        assert task.priority is taskorch.Priority.HIGH
        assert task.tags == ["a", "b"]
        assert task.metadata == {"k": [1, 2]}
        assert (task.max_attempts, task.timeout_seconds, task.idempotency_key) == (7, 60, "key-1")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("normal", taskorch.Priority.MEDIUM),
        ("critical", taskorch.Priority.URGENT),
        ("Normal", taskorch.Priority.MEDIUM),
        ("low", taskorch.Priority.LOW),
        ("urgent", taskorch.Priority.URGENT),
    ],
)
async def test_priority_aliases_normal_and_critical_map_to_medium_and_urgent(db, clock, given, expected):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p", priority=given)
        assert task.priority is expected
        page = await svc.list_tasks(priority=given)
        assert [t.id for t in page.tasks] == [task.id]


# -- claim order and filters ---------------------------------------------------------------------


async def test_claims_take_the_highest_priority_first_then_the_oldest(db, clock):
    async with service(db, clock) as svc:
        ids = {}
        for name, priority in [("a", "low"), ("b", "medium"), ("c", "urgent"), ("d", "medium"), ("e", "high"),
                               ("f", "urgent")]:  # fmt: skip
            ids[name] = (await svc.create_task(work_path="/w", prompt=name, priority=priority)).id
            clock.advance(1)
        claimed = await claim_order(svc, 6)
        assert claimed == [ids[n] for n in "cfebda"]
        assert await svc.next_task(work_path="/w", worker_id="w9") is None


async def test_tasks_of_one_batch_are_claimed_in_the_order_given(db, clock):
    async with service(db, clock) as svc:
        created = await svc.create_tasks(tasks=[{"work_path": "/w", "prompt": f"step {i}"} for i in range(8)])
        assert await claim_order(svc, 8) == [t.id for t in created]


async def test_tasks_created_at_the_same_instant_are_claimed_in_creation_order(db, clock):
    # A coarse system clock (or a busy millisecond) gives several tasks the same created_at.
    async with service(db, clock) as svc:
        ids = [(await svc.create_task(work_path="/w", prompt=f"task {i}")).id for i in range(8)]
        assert await claim_order(svc, 8) == ids


async def test_next_task_claims_only_from_the_given_work_path(db, clock):
    async with service(db, clock) as svc:
        for path in ["/a/bc", "/a/b/c", "/a", "/x/a/b"]:
            await svc.create_task(work_path=path, prompt=path)
            clock.advance(1)
        mine = await svc.create_task(work_path="/a/b", prompt="mine")

        c = await claim(svc, "/a/b")
        assert c.task.id == mine.id
        assert c.task.status is taskorch.Status.WORKING
        assert await svc.next_task(work_path="/a/b", worker_id="w2") is None


async def test_include_subpaths_claims_below_the_work_path_but_not_a_sibling_sharing_its_prefix(db, clock):
    async with service(db, clock) as svc:
        ids = {}
        for path in ["/a/bc", "/a/b.x", "/a", "/a/b/c/d", "/a/b", "/a/b/c"]:
            ids[path] = (await svc.create_task(work_path=path, prompt=path)).id
            clock.advance(1)
        claimed = await claim_order(svc, 3, "/a/b", include_subpaths=True)
        assert claimed == [ids["/a/b/c/d"], ids["/a/b"], ids["/a/b/c"]]
        assert await svc.next_task(work_path="/a/b", worker_id="w9", include_subpaths=True) is None
        # Without include_subpaths a parent path does not see its children.
        assert await svc.next_task(work_path="/a", worker_id="w9") is not None  # "/a" itself
        assert await svc.next_task(work_path="/a", worker_id="w9") is None


async def test_tags_filter_claims_only_a_task_carrying_at_least_one_requested_tag(db, clock):
    async with service(db, clock) as svc:
        untagged = await svc.create_task(work_path="/w", prompt="untagged")
        clock.advance(1)
        x = await svc.create_task(work_path="/w", prompt="x", tags=["x"])
        clock.advance(1)
        yz = await svc.create_task(work_path="/w", prompt="yz", tags=["y", "z"])

        assert await svc.next_task(work_path="/w", worker_id="w1", tags=["q"]) is None
        assert (await claim(svc, tags=["z", "q"])).task.id == yz.id
        assert await svc.next_task(work_path="/w", worker_id="w1", tags=["y", "z"]) is None
        assert (await claim(svc, tags=["x"])).task.id == x.id
        assert (await claim(svc)).task.id == untagged.id


async def test_concurrent_claimers_each_win_a_different_task(db, clock):
    async with service(db, clock) as svc:
        created = {(await svc.create_task(work_path="/w", prompt=f"t{i}")).id for i in range(5)}
        results: list[taskorch.Claim | None] = []

        async def claimer(i: int) -> None:
            results.append(await svc.next_task(work_path="/w", worker_id=f"w{i}"))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(claimer, i)
        won = [c.task.id for c in results if c is not None]
        assert sorted(won) == sorted(created)


# -- dependencies ---------------------------------------------------------------------------------


async def test_a_task_is_not_claimable_until_every_dependency_is_completed(db, clock):
    async with service(db, clock) as svc:
        a = await svc.create_task(work_path="/w", prompt="a")
        b = await svc.create_task(work_path="/other", prompt="b")
        clock.advance(1)
        c = await svc.create_task(work_path="/w", prompt="c", priority="urgent", depends_on=[a.id, b.id])
        assert c.depends_on == [a.id, b.id]

        ca = await claim(svc, "/w")
        assert ca.task.id == a.id  # c is urgent but blocked
        cb = await claim(svc, "/other")
        assert await svc.next_task(work_path="/w", worker_id="w2") is None
        await complete(svc, ca)
        assert await svc.next_task(work_path="/w", worker_id="w2") is None  # b still working
        await complete(svc, cb)
        assert (await claim(svc, "/w")).task.id == c.id


@pytest.mark.parametrize("how", ["failed", "cancelled", "waiting"])
async def test_a_dependency_that_is_not_completed_keeps_its_dependant_blocked(db, clock, how):
    async with service(db, clock) as svc:
        parent = await svc.create_task(work_path="/p", prompt="parent", max_attempts=1)
        child = await svc.create_task(work_path="/w", prompt="child", depends_on=[parent.id])
        if how == "failed":
            assert (await complete(svc, await claim(svc, "/p"), "failure")).status is taskorch.Status.FAILED
        elif how == "cancelled":
            await svc.cancel_task(task_id=parent.id)
        assert await svc.next_task(work_path="/w", worker_id="w1") is None
        assert (await svc.get_task(task_id=child.id)).task.status is taskorch.Status.WAITING


async def test_a_dependency_completed_after_a_retry_unblocks_its_dependant(db, clock):
    async with service(db, clock) as svc:
        parent = await svc.create_task(work_path="/p", prompt="parent", max_attempts=1)
        child = await svc.create_task(work_path="/w", prompt="child", depends_on=[parent.id])
        await complete(svc, await claim(svc, "/p"), "failure")
        await svc.retry_task(task_id=parent.id)
        await complete(svc, await claim(svc, "/p"))
        assert (await claim(svc, "/w")).task.id == child.id


# -- batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_item", "needle"),
    [
        ({"work_path": "relative/path", "prompt": "c"}, "tasks[2].work_path"),
        ({"work_path": "/w", "prompt": "c", "depends_on": ["no-such-task"]}, "depends_on"),
        ({"work_path": "/w", "prompt": "c", "priority": "extreme"}, "tasks[2].priority"),
    ],
    ids=["validation", "unknown-dependency-found-in-the-store", "bad-priority"],
)
async def test_create_tasks_is_atomic_one_bad_item_creates_nothing(db, clock, bad_item, needle):
    async with service(db, clock) as svc:
        good = [{"work_path": "/w", "prompt": "a", "ref": "a"}, {"work_path": "/w", "prompt": "b", "depends_on": ["a"]}]
        err = await error_of(svc.create_tasks(tasks=[*good, bad_item]))
        assert err.code == "VALIDATION_ERROR"
        assert needle in str(err)
        assert (await svc.list_tasks()).total == 0
        assert (await svc.statistics()).total == 0


async def test_create_tasks_resolves_refs_to_the_ids_it_creates(db, clock):
    async with service(db, clock) as svc:
        outside = await svc.create_task(work_path="/w", prompt="outside")
        await complete(svc, await claim(svc))
        deploy, build, check = await svc.create_tasks(
            tasks=[
                {"ref": "deploy", "work_path": "/w", "prompt": "deploy", "depends_on": ["check", "build"]},
                {"ref": "build", "work_path": "/w", "prompt": "build", "depends_on": [outside.id]},
                {"ref": "check", "work_path": "/w", "prompt": "check", "depends_on": ["build"]},
            ]
        )
        assert [t.prompt for t in (deploy, build, check)] == ["deploy", "build", "check"]
        assert len({deploy.id, build.id, check.id, outside.id}) == 4
        assert sorted(deploy.depends_on) == sorted([check.id, build.id])
        assert build.depends_on == [outside.id]
        assert check.depends_on == [build.id]

        for expected in (build, check, deploy):
            c = await claim(svc)
            assert c.task.id == expected.id
            assert await svc.next_task(work_path="/w", worker_id="other") is None
            await complete(svc, c)


async def test_create_tasks_sequential_mode_chains_each_item_to_the_one_before(db, clock):
    async with service(db, clock) as svc:
        priorities = ["low", "high", "urgent"]
        items = [{"work_path": "/w", "prompt": f"step {i}", "priority": p} for i, p in enumerate(priorities)]
        created = await svc.create_tasks(tasks=items, mode="sequential")
        assert created[0].depends_on == []
        assert created[1].depends_on == [created[0].id]
        assert created[2].depends_on == [created[1].id]
        for expected in created:
            c = await claim(svc)
            assert c.task.id == expected.id
            assert await svc.next_task(work_path="/w", worker_id="other") is None
            await complete(svc, c)


@pytest.mark.parametrize(
    "items",
    [
        [{"ref": "a", "depends_on": ["b"]}, {"ref": "b", "depends_on": ["a"]}],
        [{"ref": "a", "depends_on": ["c"]}, {"ref": "b", "depends_on": ["a"]}, {"ref": "c", "depends_on": ["b"]}],
        [{"ref": "a", "depends_on": ["a"]}],
    ],
    ids=["two-cycle", "three-cycle", "self"],
)
async def test_create_tasks_rejects_a_cycle_of_refs(db, clock, items):
    async with service(db, clock) as svc:
        tasks = [{"work_path": "/w", "prompt": "p", **item} for item in items]
        err = await error_of(svc.create_tasks(tasks=tasks))
        assert err.code == "VALIDATION_ERROR"
        assert "depends_on" in str(err)
        assert (await svc.list_tasks()).total == 0


async def test_an_unknown_depends_on_id_is_a_validation_error(db, clock):
    async with service(db, clock) as svc:
        err = await error_of(svc.create_task(work_path="/w", prompt="p", depends_on=["t-missing"]))
        assert err.code == "VALIDATION_ERROR"
        assert "depends_on" in str(err)
        assert "t-missing" in str(err)
        err = await error_of(svc.create_tasks(tasks=[{"work_path": "/w", "prompt": "p", "depends_on": ["t-missing"]}]))
        assert err.code == "VALIDATION_ERROR"
        assert "t-missing" in str(err)
        assert (await svc.list_tasks()).total == 0


# -- delays and idempotency ------------------------------------------------------------------------


async def test_delay_seconds_keeps_a_task_unclaimable_until_the_clock_passes_it(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="later", delay_seconds=30)
        assert task.run_after == clock.at(30)
        assert task.status is taskorch.Status.WAITING
        assert await svc.next_task(work_path="/w", worker_id="w1") is None
        clock.now += 30 * US - 1
        assert await svc.next_task(work_path="/w", worker_id="w1") is None
        clock.now += 1
        assert (await claim(svc)).task.id == task.id


async def test_a_repeated_idempotency_key_returns_the_first_task_with_one_created_event(db, clock):
    async with service(db, clock) as svc:
        first = await svc.create_task(work_path="/w", prompt="first", idempotency_key="job-42")
        clock.advance(5)
        again = await svc.create_task(work_path="/w", prompt="second", idempotency_key="job-42", priority="urgent")
        assert again == first
        assert [e.kind for e in await events_of(svc, first.id)] == ["created"]
        assert (await svc.list_tasks()).total == 1


async def test_an_idempotency_key_inside_create_tasks_returns_the_existing_task(db, clock):
    async with service(db, clock) as svc:
        first = await svc.create_task(work_path="/w", prompt="first", idempotency_key="job-1")
        clock.advance(1)
        existing, new = await svc.create_tasks(
            tasks=[
                {"work_path": "/w", "prompt": "dup", "idempotency_key": "job-1"},
                {"work_path": "/w", "prompt": "new", "idempotency_key": "job-2"},
            ]
        )
        assert existing.id == first.id
        assert existing.prompt == "first"
        assert new.id != first.id
        assert [e.kind for e in await events_of(svc, first.id)] == ["created"]
        assert (await svc.list_tasks()).total == 2
        # and a whole batch repeated creates nothing new
        again = await svc.create_tasks(tasks=[{"work_path": "/w", "prompt": "x", "idempotency_key": "job-2"}])
        assert again[0].id == new.id
        assert (await svc.list_tasks()).total == 2


# -- failures, retries and backoff ----------------------------------------------------------------


async def test_a_failure_with_attempts_left_waits_an_exponential_capped_backoff_before_the_next_claim(db, clock):
    cfg = {"tasks": {"retry_backoff_seconds": 10, "retry_backoff_max_seconds": 25, "max_attempts": 4}}
    async with service(db, clock, **cfg) as svc:
        task = await svc.create_task(work_path="/w", prompt="flaky")
        for attempt, backoff in enumerate([10, 20, 25], start=1):
            c = await claim(svc)
            assert (c.task.id, c.task.attempts) == (task.id, attempt)
            clock.advance(1)
            failed = await complete(svc, c, "failure", output="boom")
            assert failed.status is taskorch.Status.WAITING
            assert failed.attempts == attempt
            assert failed.worker_id is None
            assert failed.run_after == clock.at(backoff)
            assert failed.error == {"code": "TASK_FAILED", "message": "boom"}
            clock.now += backoff * US - 1
            assert await svc.next_task(work_path="/w", worker_id="w1") is None
            clock.now += 1
        last = await claim(svc)
        assert last.task.attempts == 4
        final = await complete(svc, last, "failure", output="boom again")
        assert final.status is taskorch.Status.FAILED
        assert final.completed_at == clock.at()
        assert final.result["status"] == "failure"
        clock.advance(3600)
        assert await svc.next_task(work_path="/w", worker_id="w1") is None
        kinds = [e.kind for e in await events_of(svc, task.id)]
        assert kinds == ["created", *["claimed", "retry_scheduled"] * 3, "claimed", "failed"]


async def test_a_failure_marked_not_retryable_fails_the_task_at_once(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p", max_attempts=5)
        done = await complete(svc, await claim(svc), "failure", retryable=False)
        assert done.status is taskorch.Status.FAILED
        assert (done.attempts, done.id) == (1, task.id)
        assert await svc.next_task(work_path="/w", worker_id="w1") is None


async def test_a_failure_on_the_last_attempt_fails_the_task(db, clock):
    async with service(db, clock) as svc:
        await svc.create_task(work_path="/w", prompt="p", max_attempts=1)
        done = await complete(svc, await claim(svc), "failure", output="no luck")
        assert done.status is taskorch.Status.FAILED
        assert done.error["message"] == "no luck"
        assert done.completed_at == clock.at()


async def test_a_success_completes_the_task_with_its_result(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        c = await claim(svc)
        clock.advance(2)
        done = await complete(svc, c, output="all good", details={"files": 3}, artifacts=["a.txt"], duration_ms=1500)
        assert done.status is taskorch.Status.COMPLETED
        assert done.id == task.id
        assert done.version == c.lease.token + 1
        assert done.result == {
            "status": "success", "output": "all good", "details": {"files": 3}, "artifacts": ["a.txt"],
            "duration_ms": 1500,
        }  # fmt: skip
        assert done.error is None
        assert done.completed_at == clock.at()
        assert done.lease_expires_at is None


# -- leases -------------------------------------------------------------------------------------


async def test_a_claim_returns_a_lease_whose_token_is_the_new_version(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p", timeout_seconds=100)
        c = await claim(svc, lease_seconds=30)
        assert c.task.id == task.id
        assert c.lease.token == c.task.version == task.version + 1
        assert c.lease.worker_id == c.task.worker_id == "w1"
        assert c.lease.expires_at == c.task.lease_expires_at == clock.at(30)
        assert c.lease.deadline_at == clock.at(100)
        assert c.task.started_at == clock.at()
        assert c.task.attempts == 1


async def test_a_lease_longer_than_the_attempt_timeout_is_cut_to_the_deadline(db, clock):
    async with service(db, clock) as svc:
        await svc.create_task(work_path="/w", prompt="p", timeout_seconds=10)
        c = await claim(svc, lease_seconds=300)
        assert c.lease.expires_at == c.lease.deadline_at == clock.at(10)


async def test_heartbeat_extends_the_lease_but_never_past_the_attempt_deadline(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p", timeout_seconds=100)
        c = await claim(svc, lease_seconds=30)
        start = clock.now

        clock.advance(20)
        lease = await svc.heartbeat_task(task_id=task.id, worker_id="w1", lease_token=c.lease.token, lease_seconds=30)
        assert lease.expires_at == clock.at(30)
        assert lease.token == c.lease.token
        assert lease.deadline_at == us_to_datetime(start + 100 * US)

        clock.advance(25)
        lease = await svc.heartbeat_task(task_id=task.id, worker_id="w1", lease_token=c.lease.token, lease_seconds=60)
        assert lease.expires_at == us_to_datetime(start + 100 * US)  # not start + 120 s

        clock.now = start + 100 * US
        err = await error_of(svc.heartbeat_task(task_id=task.id, worker_id="w1", lease_token=c.lease.token))
        assert err.code == "LEASE_LOST"

        # Past its deadline the attempt is recovered like any expired lease.
        assert await svc.recover_expired_leases() == 1
        t = (await svc.get_task(task_id=task.id)).task
        assert t.status is taskorch.Status.WAITING
        assert (t.attempts, t.worker_id, t.lease_expires_at) == (1, None, None)
        assert t.error["code"] == "LEASE_EXPIRED"
        last = (await events_of(svc, task.id))[-1]
        assert (last.kind, last.from_status, last.to_status, last.worker_id) == (
            "lease_expired", taskorch.Status.WORKING, taskorch.Status.WAITING, "w1",
        )  # fmt: skip
        assert last.version == t.version
        err = await error_of(complete(svc, c))
        assert err.code == "LEASE_LOST"
        assert (await claim(svc, worker_id="w2")).task.attempts == 2


async def test_an_expired_lease_is_recovered_by_the_next_claim_and_the_old_worker_gets_lease_lost(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        old = await claim(svc, worker_id="slow", lease_seconds=10)
        clock.advance(10)
        new = await claim(svc, worker_id="fast")
        assert new.task.id == task.id
        assert new.task.attempts == 2
        assert new.lease.token > old.lease.token
        for call in (
            complete(svc, old),
            svc.heartbeat_task(task_id=task.id, worker_id="slow", lease_token=old.lease.token),
            svc.release_task(task_id=task.id, worker_id="slow", lease_token=old.lease.token),
        ):
            assert (await error_of(call)).code == "LEASE_LOST"
        assert (await complete(svc, new)).status is taskorch.Status.COMPLETED
        assert (await svc.statistics()).leases_recovered == 1


async def test_an_expired_lease_on_the_last_attempt_fails_the_task(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p", max_attempts=1)
        await claim(svc, lease_seconds=5)
        clock.advance(5)
        assert await svc.recover_expired_leases() == 1
        t = (await svc.get_task(task_id=task.id)).task
        assert t.status is taskorch.Status.FAILED
        assert t.completed_at == clock.at()
        assert t.error["code"] == "LEASE_EXPIRED"
        assert await svc.recover_expired_leases() == 0


async def test_release_returns_the_task_to_waiting_without_counting_the_attempt(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p", max_attempts=1)
        c = await claim(svc)
        released = await svc.release_task(task_id=task.id, worker_id="w1", lease_token=c.lease.token)
        assert released.status is taskorch.Status.WAITING
        assert (released.attempts, released.worker_id, released.lease_expires_at) == (0, None, None)
        assert released.version == c.lease.token + 1
        assert (await events_of(svc, task.id))[-1].kind == "released"
        assert (await error_of(complete(svc, c))).code == "LEASE_LOST"

        again = await claim(svc, worker_id="w2")
        assert again.task.attempts == 1
        assert (await complete(svc, again)).status is taskorch.Status.COMPLETED


async def test_release_with_a_delay_keeps_the_task_unclaimable_until_then(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        c = await claim(svc)
        released = await svc.release_task(task_id=task.id, worker_id="w1", lease_token=c.lease.token, delay_seconds=5)
        assert released.run_after == clock.at(5)
        assert await svc.next_task(work_path="/w", worker_id="w2") is None
        clock.advance(5)
        assert (await claim(svc, worker_id="w2")).task.id == task.id


async def test_max_working_per_work_path_caps_concurrent_claims_in_one_work_path(db, clock):
    async with service(db, clock, tasks={"max_working_per_work_path": 1}) as svc:
        a1 = await svc.create_task(work_path="/a", prompt="a1")
        clock.advance(1)
        a2 = await svc.create_task(work_path="/a", prompt="a2")
        b1 = await svc.create_task(work_path="/b", prompt="b1")

        first = await claim(svc, "/a")
        assert first.task.id == a1.id
        assert await svc.next_task(work_path="/a", worker_id="w2") is None
        assert (await claim(svc, "/b", worker_id="w3")).task.id == b1.id
        await complete(svc, first)
        assert (await claim(svc, "/a", worker_id="w2")).task.id == a2.id


async def test_a_completion_repeated_by_the_same_worker_and_token_returns_the_completed_task(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        c = await claim(svc)
        done = await complete(svc, c, output="ok")
        clock.advance(1)
        again = await complete(svc, c, output="ok")
        assert again == done
        assert [e.kind for e in await events_of(svc, task.id)] == ["created", "claimed", "completed"]

        err = await error_of(
            svc.complete_task(task_id=task.id, worker_id="intruder", lease_token=c.lease.token, status="success")
        )
        assert err.code == "LEASE_LOST"
        assert (await svc.get_task(task_id=task.id)).task == done


# -- cancel, retry, optimistic locking -----------------------------------------------------------


async def test_cancel_a_waiting_task(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        clock.advance(1)
        cancelled = await svc.cancel_task(task_id=task.id, reason="not needed")
        assert cancelled.status is taskorch.Status.CANCELLED
        assert cancelled.version == 2
        assert cancelled.completed_at == clock.at()
        last = (await events_of(svc, task.id))[-1]
        assert (last.kind, last.from_status, last.to_status, last.version) == (
            "cancelled", taskorch.Status.WAITING, taskorch.Status.CANCELLED, 2,
        )  # fmt: skip
        assert last.detail == {"reason": "not needed"}
        assert await svc.next_task(work_path="/w", worker_id="w1") is None


async def test_cancel_a_working_task_fences_out_its_worker(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        c = await claim(svc)
        cancelled = await svc.cancel_task(task_id=task.id)
        assert cancelled.status is taskorch.Status.CANCELLED
        assert cancelled.lease_expires_at is None
        for call in (
            complete(svc, c),
            svc.heartbeat_task(task_id=task.id, worker_id="w1", lease_token=c.lease.token),
            svc.release_task(task_id=task.id, worker_id="w1", lease_token=c.lease.token),
        ):
            assert (await error_of(call)).code == "LEASE_LOST"
        assert (await svc.get_task(task_id=task.id)).task == cancelled
        assert await svc.recover_expired_leases() == 0


@pytest.mark.parametrize("state", ["completed", "failed", "cancelled"])
async def test_cancel_a_finished_task_is_invalid_state_and_changes_nothing(db, clock, state):
    async with service(db, clock) as svc:
        task = await make_task_in(svc, state)
        before = await svc.get_task(task_id=task.id, include_events=True)
        err = await error_of(svc.cancel_task(task_id=task.id))
        assert err.code == "INVALID_STATE"
        assert state in str(err)
        assert await svc.get_task(task_id=task.id, include_events=True) == before


@pytest.mark.parametrize("state", ["failed", "cancelled"])
async def test_retry_puts_a_failed_or_cancelled_task_back_to_waiting_with_attempts_reset(db, clock, state):
    async with service(db, clock) as svc:
        task = await make_task_in(svc, state)
        clock.advance(60)
        retried = await svc.retry_task(task_id=task.id)
        assert retried.status is taskorch.Status.WAITING
        assert (retried.attempts, retried.worker_id, retried.result, retried.error) == (0, None, None, None)
        assert (retried.completed_at, retried.lease_expires_at) == (None, None)
        assert retried.run_after == clock.at()
        assert retried.version == task.version + 1
        last = (await events_of(svc, task.id))[-1]
        assert (last.kind, last.from_status, last.to_status) == ("retried", taskorch.Status(state), retried.status)
        c = await claim(svc)
        assert (c.task.id, c.task.attempts) == (task.id, 1)


@pytest.mark.parametrize("state", ["completed", "waiting", "working"])
async def test_retry_of_a_completed_waiting_or_working_task_is_invalid_state(db, clock, state):
    async with service(db, clock) as svc:
        task = await make_task_in(svc, state)
        before = await svc.get_task(task_id=task.id, include_events=True)
        err = await error_of(svc.retry_task(task_id=task.id))
        assert err.code == "INVALID_STATE"
        assert state in str(err)
        assert await svc.get_task(task_id=task.id, include_events=True) == before


async def make_task_in(svc: taskorch.TaskService, state: str) -> taskorch.Task:
    """A task on /w in the given status (max_attempts 1, so one failure fails it)."""
    task = await svc.create_task(work_path="/w", prompt=f"to be {state}", max_attempts=1)
    if state == "waiting":
        return task
    if state == "cancelled":
        return await svc.cancel_task(task_id=task.id)
    c = await claim(svc, worker_id="maker")
    if state == "working":
        return c.task
    return await complete(svc, c, "success" if state == "completed" else "failure")


async def test_an_expected_version_mismatch_is_a_conflict_and_changes_nothing(db, clock):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        before = await svc.get_task(task_id=task.id, include_events=True)
        err = await error_of(svc.cancel_task(task_id=task.id, expected_version=2))
        assert err.code == "CONFLICT"
        assert err.details.get("current_version") == 1
        assert await svc.get_task(task_id=task.id, include_events=True) == before

        cancelled = await svc.cancel_task(task_id=task.id, expected_version=1)
        assert cancelled.version == 2
        before = await svc.get_task(task_id=task.id, include_events=True)
        err = await error_of(svc.retry_task(task_id=task.id, expected_version=1))
        assert err.code == "CONFLICT"
        assert await svc.get_task(task_id=task.id, include_events=True) == before
        assert (await svc.retry_task(task_id=task.id, expected_version=2)).version == 3


# -- reads --------------------------------------------------------------------------------------


async def test_get_task_with_events_shows_the_history_in_order_with_rising_versions(db, clock):
    async with service(db, clock, tasks={"retry_backoff_seconds": 1}) as svc:
        task = await svc.create_task(work_path="/w", prompt="p")
        clock.advance(1)
        await complete(svc, await claim(svc, worker_id="w1"), "failure")
        clock.advance(2)
        c2 = await claim(svc, worker_id="w2")
        await svc.heartbeat_task(task_id=task.id, worker_id="w2", lease_token=c2.lease.token)
        await svc.release_task(task_id=task.id, worker_id="w2", lease_token=c2.lease.token)
        clock.advance(1)
        final = await complete(svc, await claim(svc, worker_id="w3"))

        plain = await svc.get_task(task_id=task.id)
        assert plain.events is None
        assert plain.task == final
        events = await events_of(svc, task.id)
        assert [(e.kind, e.worker_id) for e in events] == [
            ("created", None), ("claimed", "w1"), ("retry_scheduled", "w1"), ("claimed", "w2"),
            ("released", "w2"), ("claimed", "w3"), ("completed", "w3"),
        ]  # fmt: skip
        versions = [e.version for e in events]
        assert versions == sorted(set(versions))
        assert versions[-1] == final.version
        assert [e.at for e in events] == sorted(e.at for e in events)
        assert all(e.task_id == task.id for e in events)
        assert events[0].from_status is None
        for before, after in itertools.pairwise(events):
            assert after.from_status == before.to_status
        assert events[-1].to_status is taskorch.Status.COMPLETED


async def test_an_error_raised_inside_the_service_context_reaches_the_caller_unwrapped(db, clock):
    # `except taskorch.NotFound` around `async with open_service(...)` must catch it (not an ExceptionGroup).
    with pytest.raises(taskorch.NotFound):
        async with service(db, clock) as svc:
            await svc.get_task(task_id="t-nope")


async def test_get_task_of_an_unknown_id_is_not_found(db, clock):
    async with service(db, clock) as svc:
        err = await error_of(svc.get_task(task_id="t-nope"))
        assert err.code == "NOT_FOUND"
        assert "t-nope" in str(err)


async def test_list_tasks_filters_by_status_priority_work_path_and_tag(db, clock):
    async with service(db, clock) as svc:
        ids = {}
        for name, path, priority, tags in [
            ("a", "/p", "high", ["x"]), ("b", "/p", "low", ["y"]), ("c", "/q", "high", ["x", "y"]),
            ("d", "/q", "medium", []), ("e", "/p", "medium", []),
        ]:  # fmt: skip
            ids[name] = (await svc.create_task(work_path=path, prompt=name, priority=priority, tags=tags)).id
            clock.advance(1)
        assert (await claim(svc, "/q", tags=None)).task.id == ids["c"]
        await svc.cancel_task(task_id=ids["e"])

        async def names(**filters: Any) -> set[str]:
            page = await svc.list_tasks(**filters)
            found = {n for n, i in ids.items() if i in {t.id for t in page.tasks}}
            assert page.total == len(page.tasks) == len(found)
            return found

        assert await names() == set("abcde")
        assert await names(status="waiting") == {"a", "b", "d"}
        assert await names(status="working") == {"c"}
        assert await names(status="cancelled") == {"e"}
        assert await names(status="completed") == set()
        assert await names(priority="high") == {"a", "c"}
        assert await names(priority="normal") == {"d", "e"}
        assert await names(priority="urgent") == set()
        assert await names(work_path="/p") == {"a", "b", "e"}
        assert await names(work_path="/p/") == {"a", "b", "e"}
        assert await names(work_path="/") == set()
        assert await names(tag="x") == {"a", "c"}
        assert await names(tag="y") == {"b", "c"}
        assert await names(work_path="/q", tag="x") == {"c"}
        assert await names(status="waiting", priority="high") == {"a"}


async def test_list_tasks_pages_newest_first_with_limit_offset_and_total(db, clock):
    async with service(db, clock) as svc:
        ids = []
        for i in range(7):
            ids.append((await svc.create_task(work_path="/w", prompt=f"t{i}")).id)
            clock.advance(1)
        newest_first = ids[::-1]
        default = await svc.list_tasks()
        assert [t.id for t in default.tasks] == newest_first
        assert (default.total, default.limit, default.offset) == (7, 50, 0)
        pages = [await svc.list_tasks(limit=3, offset=o) for o in (0, 3, 6, 7)]
        assert [[t.id for t in p.tasks] for p in pages] == [newest_first[:3], newest_first[3:6], newest_first[6:], []]
        assert {p.total for p in pages} == {7}
        assert (pages[1].limit, pages[1].offset) == (3, 3)


async def _statistics_scenario(svc: taskorch.TaskService, clock: Clock) -> dict[str, str]:
    """A queue with every kind of history; times are seconds after T0 (see the comments)."""
    ids = {}
    for name, path, priority, extra in [
        ("A", "/s", "high", {}), ("B", "/s", "medium", {}), ("C", "/s", "low", {}),
        ("D", "/other", "medium", {}), ("E", "/s", "low", {"max_attempts": 1}), ("F", "/other", "low", {}),
    ]:  # fmt: skip  # created at t = 0, 1, 2, 3, 4, 5
        ids[name] = (await svc.create_task(work_path=path, prompt=name, priority=priority, **extra)).id
        clock.advance(1)
    await svc.cancel_task(task_id=ids["F"])  # t=6
    await svc.retry_task(task_id=ids["F"])  # a "retried" retry
    clock.now = T0 + 10 * US
    a = await claim(svc, "/s", "w1")  # A: waited 10 s
    clock.now = T0 + 15 * US
    await complete(svc, a)  # A: ran 5 s
    b = await claim(svc, "/s", "w2")  # B: waited 14 s
    clock.now = T0 + 20 * US
    await complete(svc, b, "failure")  # a "retry_scheduled" retry; B back at t=25
    await claim(svc, "/s", "w3", lease_seconds=10)  # C, lease until t=30
    clock.now = T0 + 30 * US
    b = await claim(svc, "/s", "w2")  # recovers C's lease first; then B (medium) beats C (low)
    assert b.task.id == ids["B"]
    clock.now = T0 + 32 * US
    await complete(svc, b)  # B: ran 2 s this attempt
    assert (await claim(svc, "/s", "w4")).task.id == ids["C"]  # C stays working, w4 active
    clock.now = T0 + 33 * US
    e = await claim(svc, "/s", "w5")  # E: waited 29 s
    clock.now = T0 + 40 * US
    await complete(svc, e, "failure")  # E: ran 7 s, failed (max_attempts 1)
    clock.now = T0 + 100 * US
    return ids


async def test_statistics_count_tasks_by_status_priority_and_work_path(db, clock):
    async with service(db, clock) as svc:
        await _statistics_scenario(svc, clock)
        stats = await svc.statistics()
        assert stats.total == 6
        assert stats.by_status == {"waiting": 2, "working": 1, "completed": 2, "failed": 1, "cancelled": 0}
        assert stats.by_priority == {"low": 3, "medium": 2, "high": 1, "urgent": 0}
        by_path = {p.work_path: p.model_dump(exclude={"work_path"}) for p in stats.by_work_path}
        assert by_path == {
            "/other": {"waiting": 2, "working": 0, "completed": 0, "failed": 0, "cancelled": 0},
            "/s": {"waiting": 0, "working": 1, "completed": 2, "failed": 1, "cancelled": 0},
        }
        other = await svc.statistics(work_path="/other/")
        assert other.total == 2
        assert other.by_status["waiting"] == 2
        assert [p.work_path for p in other.by_work_path] == ["/other"]
        assert other.success_rate is None
        assert other.retries == 1
        assert other.oldest_waiting_age_seconds == 97.0


async def test_statistics_report_ages_throughput_success_rate_workers_recoveries_retries_and_percentiles(db, clock):
    async with service(db, clock) as svc:
        await _statistics_scenario(svc, clock)
        stats = await svc.statistics()
        assert stats.oldest_waiting_age_seconds == 97.0  # D, created at t=3
        assert stats.completed_last_hour == 2
        assert stats.failed_last_hour == 1
        assert stats.success_rate == pytest.approx(2 / 3, abs=1e-4)
        assert stats.active_workers == 1
        assert stats.leases_recovered == 1
        assert stats.retries == 2
        # waits (created -> first claim) 10, 14, 29 s; runs (last claim -> finish) 5, 2, 7 s
        assert (stats.wait_time.count, stats.wait_time.p50_seconds, stats.wait_time.p95_seconds) == (3, 14.0, 29.0)
        assert (stats.run_time.count, stats.run_time.p50_seconds, stats.run_time.p95_seconds) == (3, 5.0, 7.0)
        assert stats.generated_at == clock.at()

        clock.advance(3600)
        later = await svc.statistics()
        assert (later.completed_last_hour, later.failed_last_hour) == (0, 0)
        assert later.active_workers == 0  # C's lease ran out (not yet recovered)


async def test_statistics_of_an_empty_queue(db, clock):
    async with service(db, clock) as svc:
        stats = await svc.statistics()
        assert stats.total == 0
        assert stats.oldest_waiting_age_seconds is None
        assert stats.success_rate is None
        assert (stats.wait_time.count, stats.wait_time.p50_seconds) == (0, None)
        assert stats.by_work_path == []


# -- retention --------------------------------------------------------------------------------


async def test_cleanup_by_age_removes_only_terminal_tasks_older_than_the_cutoff(db, clock):
    async with service(db, clock) as svc:
        parent = await svc.create_task(work_path="/p", prompt="parent")
        await complete(svc, await claim(svc, "/p"))
        child = await svc.create_task(work_path="/c", prompt="child of a completed parent", depends_on=[parent.id])
        done = await make_task_in(svc, "completed")
        failed = await make_task_in(svc, "failed")
        cancelled = await make_task_in(svc, "cancelled")
        await svc.create_task(work_path="/busy", prompt="working")
        working = (await claim(svc, "/busy", lease_seconds=86400)).task
        waiting = await svc.create_task(work_path="/idle", prompt="waiting")
        clock.advance(2 * 3600 - 600)
        recent = await make_task_in(svc, "completed")  # finished 10 minutes before the check
        clock.advance(600)

        result = await svc.cleanup(older_than_hours=1, max_tasks=0)
        assert (result.deleted, result.remaining) == (3, 5)
        for gone in (done, failed, cancelled):
            assert (await error_of(svc.get_task(task_id=gone.id))).code == "NOT_FOUND"
        for kept in (parent, child, waiting, working, recent):
            assert (await svc.get_task(task_id=kept.id)).task.id == kept.id
        assert (await svc.list_tasks()).total == 5
        assert await svc.store.integrity_check() == "ok"  # no event of a deleted task is left behind
        # The dependant still runs once its (kept) parent is completed.
        assert (await claim(svc, "/c")).task.id == child.id


async def test_cleanup_by_max_tasks_removes_the_oldest_terminal_tasks_first(db, clock):
    async with service(db, clock) as svc:
        parent = await make_task_in(svc, "completed")  # finished first, but a live task needs it
        child = await svc.create_task(work_path="/c", prompt="child", depends_on=[parent.id], delay_seconds=3600)
        finished = []
        for _ in range(3):
            clock.advance(10)
            finished.append(await make_task_in(svc, "completed"))
        live = await svc.create_task(work_path="/idle", prompt="waiting")

        result = await svc.cleanup(older_than_hours=0, max_tasks=4)
        assert (result.deleted, result.remaining) == (2, 4)
        remaining = {t.id for t in (await svc.list_tasks()).tasks}
        assert remaining == {parent.id, child.id, finished[2].id, live.id}

        # Over the cap, but only one task may go: live tasks and needed dependencies stay.
        result = await svc.cleanup(older_than_hours=0, max_tasks=1)
        assert (result.deleted, result.remaining) == (1, 3)
        assert {t.id for t in (await svc.list_tasks()).tasks} == {parent.id, child.id, live.id}


async def test_cleanup_with_no_rule_deletes_nothing(db, clock):
    async with service(db, clock) as svc:
        await make_task_in(svc, "completed")
        clock.advance(10**6)
        result = await svc.cleanup()
        assert (result.deleted, result.remaining) == (0, 1)


async def test_a_retried_task_stays_blocked_when_cleanup_ran_after_its_dependency_failed(db, clock):
    async with service(db, clock) as svc:
        parent = await make_task_in(svc, "failed")  # finished at t=0
        child = await svc.create_task(work_path="/c", prompt="child", depends_on=[parent.id])
        clock.advance(2 * 3600)
        await svc.cancel_task(task_id=child.id, reason="its parent failed")  # finished at t=2h
        await svc.cleanup(older_than_hours=1, max_tasks=0)  # the parent is old enough; the child is not
        await svc.retry_task(task_id=child.id)
        # The parent never completed: the retried child must not run.
        assert await svc.next_task(work_path="/c", worker_id="w1") is None


# -- work paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [("/a/b/../c/", "/a/c"), ("//x", "/x"), ("///y/", "/y"), ("/a/./b//c/", "/a/b/c"), ("/", "/")],
)
async def test_work_paths_are_normalised(db, clock, given, normalised):
    async with service(db, clock) as svc:
        task = await svc.create_task(work_path=given, prompt="p")
        assert task.work_path == normalised
        assert (await svc.list_tasks(work_path=given)).total == 1
        assert (await svc.list_tasks(work_path=normalised)).total == 1
        assert (await claim(svc, given)).task.id == task.id
        assert (await svc.statistics(work_path=given)).total == 1


# -- long polling -------------------------------------------------------------------------------


async def test_a_long_polling_next_task_gets_a_task_created_while_it_waits(db, clock):
    # A 30 s poll interval: only the in-process wake-up can deliver the task in time.
    async with service(db, clock, tasks={"poll_interval_seconds": 30}) as svc:
        got: dict[str, Any] = {}

        async def waiter() -> None:
            start = time.monotonic()
            got["claim"] = await svc.next_task(work_path="/w", worker_id="w1", wait_seconds=5)
            got["elapsed"] = time.monotonic() - start

        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                assert "claim" not in got
                created = await svc.create_task(work_path="/w", prompt="just in")
        assert got["claim"].task.id == created.id
        assert got["elapsed"] < 1


async def test_a_long_polling_next_task_gets_a_dependant_once_its_dependency_completes(db, clock):
    async with service(db, clock, tasks={"poll_interval_seconds": 30}) as svc:
        parent = await svc.create_task(work_path="/p", prompt="parent")
        child = await svc.create_task(work_path="/w", prompt="child", depends_on=[parent.id])
        c = await claim(svc, "/p")
        got: dict[str, Any] = {}

        async def waiter() -> None:
            got["claim"] = await svc.next_task(work_path="/w", worker_id="w2", wait_seconds=5)

        with anyio.fail_after(1):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await complete(svc, c)
        assert got["claim"].task.id == child.id


async def test_a_long_polling_next_task_returns_none_when_nothing_arrives(db, clock):
    async with service(db, clock, tasks={"poll_interval_seconds": 0.05}) as svc:
        await svc.create_task(work_path="/elsewhere", prompt="not for us")
        start = time.monotonic()
        with anyio.fail_after(2):
            assert await svc.next_task(work_path="/w", worker_id="w1", wait_seconds=0.2) is None
        assert 0.15 <= time.monotonic() - start < 1.5
