"""Bad input to every public service call: the right error, a message naming the argument, and no
change to the database.

Each table row calls one method with its valid base arguments, one of them replaced by a bad value.
"Changes nothing" is checked on the SQLite file itself, read through a separate connection: every row
of tasks, task_events, task_dependencies and task_tags before and after the call. Small limits keep
the oversized inputs small. The whole table is replayed on PostgreSQL too, in one test at the end.
"""

from __future__ import annotations

import functools
import math
import reprlib
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskorch
from taskorch.config import load_config
from taskorch.errors import ERROR_CODES

US = 1_000_000
T0 = 1_700_000_000_000_000

LIMITS = {
    "max_prompt_chars": 100,
    "max_title_chars": 20,
    "max_tags": 3,
    "max_tag_chars": 10,
    "max_metadata_bytes": 100,
    "max_result_bytes": 200,
    "max_batch_size": 3,
    "max_depends_on": 2,
    "max_work_path_chars": 50,
}
CONFIG = load_config(environ={}, overrides={"limits": LIMITS, "store": {"durability": "normal"}})

VALIDATION = "VALIDATION_ERROR"
TOO_LARGE = "PAYLOAD_TOO_LARGE"
NOT_FOUND = "NOT_FOUND"
LEASE_LOST = "LEASE_LOST"
CONFLICT = "CONFLICT"
INVALID_STATE = "INVALID_STATE"


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


# -- the database, read around the service ------------------------------------------------------

_TABLES = {
    "tasks": "id",
    "task_events": "id",
    "task_dependencies": "task_id, depends_on",
    "task_tags": "task_id, tag",
}


def snapshot(db_path: Path) -> dict[str, list[tuple]]:
    """Every row of every task table, in a stable order, read through a connection of our own."""
    conn = sqlite3.connect(db_path)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            for table, order in _TABLES.items()
        }
    finally:
        conn.close()


# -- a seeded queue -------------------------------------------------------------------------------


class Seed:
    """Placeholders in the table, replaced by the seeded queue's real ids and token."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


WAITING, WORKING, COMPLETED, CANCELLED = Seed("waiting"), Seed("working"), Seed("completed"), Seed("cancelled")
TOKEN, STALE_TOKEN = Seed("token"), Seed("stale_token")


async def seed_queue(svc: taskorch.TaskService, clock: Clock) -> dict[str, Any]:
    """One task in each interesting state. worker-1 holds the working one with TOKEN."""
    working = await svc.create_task(work_path="/w", prompt="working one", tags=["t1"])
    claim = await svc.next_task(work_path="/w", worker_id="worker-1")
    clock.now += US
    waiting = await svc.create_task(work_path="/w", prompt="waiting one", tags=["t1"], depends_on=[working.id])
    clock.now += US
    done = await svc.create_task(work_path="/done", prompt="completed one")
    c = await svc.next_task(work_path="/done", worker_id="worker-9")
    await svc.complete_task(task_id=done.id, worker_id="worker-9", lease_token=c.lease.token, status="success")
    clock.now += US
    cancelled = await svc.create_task(work_path="/x", prompt="cancelled one")
    await svc.cancel_task(task_id=cancelled.id)
    clock.now += US
    return {
        "waiting": waiting.id,
        "working": claim.task.id,
        "completed": done.id,
        "cancelled": cancelled.id,
        "token": claim.lease.token,
        "stale_token": claim.lease.token - 1,
    }


def resolve(value: Any, seeded: dict[str, Any]) -> Any:
    return seeded[value.name] if isinstance(value, Seed) else value


# -- the table ------------------------------------------------------------------------------------

BASE: dict[str, dict[str, Any]] = {
    "create_task": {"work_path": "/w", "prompt": "do it"},
    "create_tasks": {"tasks": [{"work_path": "/w", "prompt": "do it"}]},
    "next_task": {"work_path": "/w", "worker_id": "worker-2"},
    "complete_task": {"task_id": WORKING, "worker_id": "worker-1", "lease_token": TOKEN, "status": "success"},
    "heartbeat_task": {"task_id": WORKING, "worker_id": "worker-1", "lease_token": TOKEN},
    "release_task": {"task_id": WORKING, "worker_id": "worker-1", "lease_token": TOKEN},
    "cancel_task": {"task_id": WAITING},
    "retry_task": {"task_id": CANCELLED},
    "get_task": {"task_id": WAITING},
    "list_tasks": {},
    "statistics": {},
    "cleanup": {},
}


def deep(levels: int, container: str = "dict") -> Any:
    """A JSON value nested `levels` deep (deeper than json.dumps can recurse)."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value} if container == "dict" else [value]
    return value


def item(**fields: Any) -> dict[str, Any]:
    return {"work_path": "/w", "prompt": "p", **fields}


CASES: list[Any] = []


def bad(method: str, arg: str, value: Any, code: str | tuple[str, ...] = VALIDATION, needle: Any = None, *, id: str):
    """A row: `method` with its base arguments and `arg` set to `value` fails with `code`, and the
    message contains `needle` (the argument's name unless given)."""
    codes = (code,) if isinstance(code, str) else code
    assert set(codes) <= set(ERROR_CODES), codes
    CASES.append(pytest.param(method, arg, value, codes, arg if needle is None else needle, id=f"{method}-{arg}-{id}"))


HUGE_PATH = "/" + "a" * 60
SURROGATE = "\ud800"  # a lone surrogate: valid in a Python str and in JSON text ("\ud800"), not in UTF-8

for method in ("create_task", "next_task"):
    bad(method, "work_path", 1, id="int")
    bad(method, "work_path", None, id="missing")
    bad(method, "work_path", "", id="empty")
    bad(method, "work_path", "   ", id="blank")
    bad(method, "work_path", "/w\x00x", id="nul")
    bad(method, "work_path", "/w\nx", id="newline")
    bad(method, "work_path", HUGE_PATH, id="huge")
    bad(method, "work_path", "relative/path", id="relative")
    bad(method, "work_path", "~/x", id="tilde")
    bad(method, "work_path", ["/w"], id="list")
    bad(method, "work_path", {"path": "/w"}, id="dict")
    bad(method, "work_path", "/w" + SURROGATE, id="surrogate")
    bad(method, "tags", "a", id="str")
    bad(method, "tags", {"a": 1}, id="dict")
    bad(method, "tags", ["a", "b", "c", "d"], id="too-many")
    bad(method, "tags", [""], id="empty-item")
    bad(method, "tags", [1], id="int-item")
    bad(method, "tags", ["x" * 11], id="huge-item")
    bad(method, "tags", ["a\x00"], id="nul-item")
    bad(method, "tags", ["a\tb"], id="control-item")
    bad(method, "tags", [SURROGATE], id="surrogate-item")

bad("create_task", "prompt", None, id="missing")
bad("create_task", "prompt", 1, id="int")
bad("create_task", "prompt", "", id="empty")
bad("create_task", "prompt", " \n\t ", id="blank")
bad("create_task", "prompt", "a\x00b", id="nul")
bad("create_task", "prompt", "x" * 101, id="huge")
bad("create_task", "prompt", ["do it"], id="list")
bad("create_task", "prompt", {"text": "do it"}, id="dict")
bad("create_task", "prompt", "do it " + SURROGATE, id="surrogate")
bad("create_task", "title", 1, id="int")
bad("create_task", "title", "t\x00", id="nul")
bad("create_task", "title", "t" * 21, id="huge")
bad("create_task", "title", ["t"], id="list")
bad("create_task", "priority", "extreme", id="unknown")
bad("create_task", "priority", "", id="empty")
bad("create_task", "priority", 1, id="int")
bad("create_task", "priority", True, id="bool")
bad("create_task", "priority", ["high"], id="list")
bad("create_task", "priority", deep(5000), id="too-deep")
bad("create_task", "depends_on", "abc", id="str")
bad("create_task", "depends_on", {"a": 1}, id="dict")
bad("create_task", "depends_on", [1], id="int-item")
bad("create_task", "depends_on", [""], id="empty-item")
bad("create_task", "depends_on", ["a", "b", "c"], id="too-many")
bad("create_task", "depends_on", ["t-does-not-exist"], id="unknown-id")
bad("create_task", "max_attempts", 0, id="zero")
bad("create_task", "max_attempts", -1, id="negative")
bad("create_task", "max_attempts", 101, id="over")
bad("create_task", "max_attempts", "3", id="str")
bad("create_task", "max_attempts", True, id="bool")
bad("create_task", "max_attempts", 1.5, id="fraction")
bad("create_task", "max_attempts", math.inf, id="inf")
bad("create_task", "max_attempts", [3], id="list")
bad("create_task", "idempotency_key", 1, id="int")
bad("create_task", "idempotency_key", "", id="empty")
bad("create_task", "idempotency_key", " k", id="leading-space")
bad("create_task", "idempotency_key", "k\x00", id="nul")
bad("create_task", "idempotency_key", "k\n", id="control")
bad("create_task", "idempotency_key", "k" * 201, id="huge")
bad("create_task", "metadata", [1], id="list")
bad("create_task", "metadata", "x", id="str")
bad("create_task", "metadata", 1, id="int")
bad("create_task", "metadata", {"big": "x" * 200}, TOO_LARGE, id="too-big")
bad("create_task", "metadata", {"k": object()}, id="not-json")
bad("create_task", "metadata", deep(5000), (VALIDATION, TOO_LARGE), id="too-deep")
bad("create_task", "delay_seconds", -1, id="negative")
bad("create_task", "delay_seconds", "5", id="str")
bad("create_task", "delay_seconds", True, id="bool")
bad("create_task", "delay_seconds", 366 * 86_400 + 1, id="over")
bad("create_task", "delay_seconds", math.nan, id="nan")
bad("create_task", "delay_seconds", math.inf, id="inf")
bad("create_task", "delay_seconds", 10**400, id="huge-int")
bad("create_task", "delay_seconds", [5], id="list")
bad("create_task", "timeout_seconds", 0, id="zero")
bad("create_task", "timeout_seconds", "60", id="str")
bad("create_task", "timeout_seconds", True, id="bool")
bad("create_task", "timeout_seconds", 7 * 86_400 + 1, id="over")

bad("create_tasks", "tasks", None, id="missing")
bad("create_tasks", "tasks", {"work_path": "/w", "prompt": "p"}, id="dict")
bad("create_tasks", "tasks", "tasks", id="str")
bad("create_tasks", "tasks", 1, id="int")
bad("create_tasks", "tasks", [], id="empty")
bad("create_tasks", "tasks", [item(), item(), item(), item()], id="too-many")
bad("create_tasks", "tasks", [1], VALIDATION, "tasks[0]", id="int-item")
bad("create_tasks", "tasks", [[item()]], VALIDATION, "tasks[0]", id="list-item")
bad("create_tasks", "tasks", [item(), item(work_path="rel")], VALIDATION, "tasks[1].work_path", id="relative-work-path")
bad("create_tasks", "tasks", [item(prompt="x" * 101)], VALIDATION, "tasks[0].prompt", id="huge-prompt")
bad("create_tasks", "tasks", [item(prompt=None)], VALIDATION, "tasks[0].prompt", id="missing-prompt")
bad("create_tasks", "tasks", [item(metadata={"big": "x" * 200})], TOO_LARGE, "tasks[0].metadata", id="big-metadata")
bad("create_tasks", "tasks", [item(bogus=1)], VALIDATION, "bogus", id="unknown-field")
bad("create_tasks", "tasks", [{1: "x", "b": "y"}], VALIDATION, "tasks[0]", id="non-string-keys")
bad("create_tasks", "tasks", [item(ref=1)], VALIDATION, "tasks[0].ref", id="int-ref")
bad("create_tasks", "tasks", [item(ref="")], VALIDATION, "tasks[0].ref", id="empty-ref")
bad("create_tasks", "tasks", [item(ref="a"), item(ref="a")], VALIDATION, "ref", id="duplicate-ref")
bad("create_tasks", "tasks", [item(depends_on="a")], VALIDATION, "depends_on", id="str-depends-on")
bad("create_tasks", "tasks", [item(depends_on="")], VALIDATION, "depends_on", id="empty-str-depends-on")
bad("create_tasks", "tasks", [item(depends_on={})], VALIDATION, "depends_on", id="dict-depends-on")
bad("create_tasks", "tasks", [item(depends_on=[1])], VALIDATION, "tasks[0].depends_on", id="int-dependency")
bad("create_tasks", "tasks", [item(depends_on=["t-nope"])], VALIDATION, "depends_on", id="unknown-dependency")
bad(
    "create_tasks",
    "tasks",
    [item(ref="a", depends_on=["b"]), item(ref="b", depends_on=["a"])],
    VALIDATION,
    "cycle",
    id="cycle",
)
bad("create_tasks", "tasks", [item(ref="a", depends_on=["a"])], VALIDATION, "depends_on", id="self-dependency")
bad("create_tasks", "tasks", [item(), item(priority="extreme")], VALIDATION, "tasks[1].priority", id="bad-priority")
bad("create_tasks", "mode", "random", id="unknown")
bad("create_tasks", "mode", "", id="empty")
bad("create_tasks", "mode", 1, id="int")
bad("create_tasks", "mode", deep(5000, "list"), id="too-deep")

bad("next_task", "worker_id", None, id="missing")
bad("next_task", "worker_id", 1, id="int")
bad("next_task", "worker_id", "", id="empty")
bad("next_task", "worker_id", "w\x00", id="nul")
bad("next_task", "worker_id", "w\n1", id="newline")
bad("next_task", "worker_id", "w\x1b[31m", id="escape")
bad("next_task", "worker_id", "w\x7f", id="delete")
bad("next_task", "worker_id", " w", id="leading-space")
bad("next_task", "worker_id", "w" * 201, id="huge")
bad("next_task", "worker_id", ["w"], id="list")
bad("next_task", "worker_id", "w" + SURROGATE, id="surrogate")
bad("next_task", "lease_seconds", 0, id="zero")
bad("next_task", "lease_seconds", -1, id="negative")
bad("next_task", "lease_seconds", 86_401, id="over")
bad("next_task", "lease_seconds", "30", id="str")
bad("next_task", "lease_seconds", True, id="bool")
bad("next_task", "lease_seconds", math.nan, id="nan")
bad("next_task", "lease_seconds", 10**400, id="huge-int")
bad("next_task", "wait_seconds", -1, id="negative")
bad("next_task", "wait_seconds", 61, id="over")
bad("next_task", "wait_seconds", "1", id="str")
bad("next_task", "wait_seconds", True, id="bool")
bad("next_task", "wait_seconds", math.inf, id="inf")
bad("next_task", "wait_seconds", 10**400, id="huge-int")
bad("next_task", "include_subpaths", "yes", id="str")
bad("next_task", "include_subpaths", 1, id="int")
bad("next_task", "include_subpaths", [True], id="list")

for method in ("complete_task", "heartbeat_task", "release_task"):
    bad(method, "task_id", None, id="missing")
    bad(method, "task_id", 1, id="int")
    bad(method, "task_id", "", id="empty")
    bad(method, "task_id", "t\x00", id="nul")
    bad(method, "task_id", "t" * 201, id="huge")
    bad(method, "task_id", ["t"], id="list")
    bad(method, "task_id", "t-nope", NOT_FOUND, "t-nope", id="unknown")
    bad(method, "task_id", WAITING, LEASE_LOST, WAITING, id="not-claimed")
    bad(method, "worker_id", None, id="missing")
    bad(method, "worker_id", 1, id="int")
    bad(method, "worker_id", "", id="empty")
    bad(method, "worker_id", "w\n", id="control")
    bad(method, "worker_id", "worker-2", LEASE_LOST, "worker-2", id="other-worker")
    bad(method, "lease_token", None, id="missing")
    bad(method, "lease_token", 0, id="zero")
    bad(method, "lease_token", -1, id="negative")
    bad(method, "lease_token", "1", id="str")
    bad(method, "lease_token", True, id="bool")
    bad(method, "lease_token", 1.5, id="fraction")
    bad(method, "lease_token", [1], id="list")
    bad(method, "lease_token", 2**63, (LEASE_LOST, VALIDATION), "token", id="beyond-int64")
    bad(method, "lease_token", STALE_TOKEN, LEASE_LOST, WORKING, id="stale")

bad("complete_task", "status", None, id="missing")
bad("complete_task", "status", "done", id="unknown")
bad("complete_task", "status", "", id="empty")
bad("complete_task", "status", 1, id="int")
bad("complete_task", "status", True, id="bool")
bad("complete_task", "status", deep(5000), id="too-deep")
bad("complete_task", "output", 1, id="int")
bad("complete_task", "output", "o\x00", id="nul")
bad("complete_task", "output", "x" * 201, (VALIDATION, TOO_LARGE), id="huge")
bad("complete_task", "output", ["o"], id="list")
bad("complete_task", "output", "ok " + SURROGATE, id="surrogate")
bad("complete_task", "details", {"k": object()}, id="not-json")
bad("complete_task", "details", "x" * 300, TOO_LARGE, id="too-big")
bad("complete_task", "details", deep(5000, "list"), (VALIDATION, TOO_LARGE), id="too-deep")
bad("complete_task", "artifacts", "a.txt", id="str")
bad("complete_task", "artifacts", {"a": 1}, id="dict")
bad("complete_task", "artifacts", ["x" * 300], TOO_LARGE, id="too-big")
bad("complete_task", "artifacts", [object()], id="not-json")
bad("complete_task", "duration_ms", -1, id="negative")
bad("complete_task", "duration_ms", "5", id="str")
bad("complete_task", "duration_ms", True, id="bool")
bad("complete_task", "duration_ms", 1.5, id="fraction")
bad("complete_task", "retryable", "no", id="str")
bad("complete_task", "retryable", 0, id="int")
bad("heartbeat_task", "lease_seconds", 0, id="zero")
bad("heartbeat_task", "lease_seconds", 86_401, id="over")
bad("heartbeat_task", "lease_seconds", "30", id="str")
bad("heartbeat_task", "lease_seconds", True, id="bool")
bad("heartbeat_task", "lease_seconds", math.nan, id="nan")
bad("heartbeat_task", "lease_seconds", 10**400, id="huge-int")
bad("release_task", "delay_seconds", -1, id="negative")
bad("release_task", "delay_seconds", "1", id="str")
bad("release_task", "delay_seconds", True, id="bool")
bad("release_task", "delay_seconds", math.nan, id="nan")
bad("release_task", "delay_seconds", 366 * 86_400 + 1, id="over")
bad("release_task", "delay_seconds", 10**400, id="huge-int")

for method in ("cancel_task", "retry_task", "get_task"):
    bad(method, "task_id", None, id="missing")
    bad(method, "task_id", 1, id="int")
    bad(method, "task_id", "", id="empty")
    bad(method, "task_id", "t\x00", id="nul")
    bad(method, "task_id", "t\r", id="control")
    bad(method, "task_id", "t" * 201, id="huge")
    bad(method, "task_id", ["t"], id="list")
    bad(method, "task_id", {"id": "t"}, id="dict")
    bad(method, "task_id", "t-nope", NOT_FOUND, "t-nope", id="unknown")
    bad(method, "task_id", "t" + SURROGATE, (NOT_FOUND, VALIDATION), id="surrogate")

for method in ("cancel_task", "retry_task"):
    bad(method, "expected_version", 0, id="zero")
    bad(method, "expected_version", -1, id="negative")
    bad(method, "expected_version", "1", id="str")
    bad(method, "expected_version", True, id="bool")
    bad(method, "expected_version", 1.5, id="fraction")
    bad(method, "expected_version", 99, CONFLICT, "version", id="mismatch")
    bad(method, "expected_version", 2**63, (CONFLICT, VALIDATION), "version", id="beyond-int64")

bad("cancel_task", "task_id", COMPLETED, INVALID_STATE, "completed", id="completed")
bad("cancel_task", "task_id", CANCELLED, INVALID_STATE, "cancelled", id="cancelled")
bad("cancel_task", "reason", 1, id="int")
bad("cancel_task", "reason", "r\x00", id="nul")
bad("cancel_task", "reason", "r" * 2001, id="huge")
bad("cancel_task", "reason", ["r"], id="list")
bad("retry_task", "task_id", WAITING, INVALID_STATE, "waiting", id="waiting")
bad("retry_task", "task_id", WORKING, INVALID_STATE, "working", id="working")
bad("retry_task", "task_id", COMPLETED, INVALID_STATE, "completed", id="completed")
bad("get_task", "include_events", "yes", id="str")
bad("get_task", "include_events", 1, id="int")
bad("get_task", "include_events", [True], id="list")

bad("list_tasks", "status", "done", id="unknown")
bad("list_tasks", "status", "", id="empty")
bad("list_tasks", "status", 1, id="int")
bad("list_tasks", "status", ["waiting"], id="list")
bad("list_tasks", "status", deep(5000), id="too-deep")
bad("list_tasks", "priority", "extreme", id="unknown")
bad("list_tasks", "priority", "", id="empty")
bad("list_tasks", "priority", 1, id="int")
bad("list_tasks", "priority", deep(5000, "list"), id="too-deep")
bad("list_tasks", "tag", 1, id="int")
bad("list_tasks", "tag", "", id="empty")
bad("list_tasks", "tag", "t\x00", id="nul")
bad("list_tasks", "tag", "x" * 11, id="huge")
bad("list_tasks", "tag", ["t1"], id="list")
bad("list_tasks", "limit", 0, id="zero")
bad("list_tasks", "limit", 201, id="over")
bad("list_tasks", "limit", -1, id="negative")
bad("list_tasks", "limit", "10", id="str")
bad("list_tasks", "limit", True, id="bool")
bad("list_tasks", "limit", 1.5, id="fraction")
bad("list_tasks", "offset", -1, id="negative")
bad("list_tasks", "offset", "0", id="str")
bad("list_tasks", "offset", True, id="bool")
bad("list_tasks", "offset", 2**63, id="beyond-int64")

for method in ("list_tasks", "statistics"):
    bad(method, "work_path", 1, id="int")
    bad(method, "work_path", "", id="empty")
    bad(method, "work_path", "relative", id="relative")
    bad(method, "work_path", "~/x", id="tilde")
    bad(method, "work_path", "/w\x00", id="nul")
    bad(method, "work_path", HUGE_PATH, id="huge")
    bad(method, "work_path", ["/w"], id="list")

bad("cleanup", "older_than_hours", -1, id="negative")
bad("cleanup", "older_than_hours", "1", id="str")
bad("cleanup", "older_than_hours", True, id="bool")
bad("cleanup", "older_than_hours", math.nan, id="nan")
bad("cleanup", "older_than_hours", math.inf, id="inf")
bad("cleanup", "older_than_hours", 10**7, id="over")
bad("cleanup", "older_than_hours", 10**400, id="huge-int")
bad("cleanup", "max_tasks", -1, id="negative")
bad("cleanup", "max_tasks", "5", id="str")
bad("cleanup", "max_tasks", True, id="bool")
bad("cleanup", "max_tasks", 1.5, id="fraction")


# -- the tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, Any], int]:
    """The seeded queue, built once; each test gets a copy of the file (a fresh open is ~10x cheaper
    than creating and migrating a database)."""
    db = tmp_path_factory.mktemp("template") / "seed.db"
    clock = Clock()

    async def build() -> dict[str, Any]:
        async with taskorch.open_service(db, config=CONFIG, clock=clock, sweep=False) as svc:
            ids = await seed_queue(svc, clock)
            for i in range(3):  # claimable work for the property tests
                await svc.create_task(work_path="/w/sub", prompt=f"spare {i}")
            return ids

    ids = anyio.run(build)
    return db, ids, clock.now


@pytest.fixture
def db_copy(template, tmp_path) -> tuple[Path, dict[str, Any], Clock]:
    src, ids, now = template
    db = tmp_path / "t.db"
    shutil.copyfile(src, db)
    return db, ids, Clock(now)


@pytest.fixture
async def seeded(db_copy) -> Any:
    db, ids, clock = db_copy
    async with taskorch.open_service(db, config=CONFIG, clock=clock, sweep=False) as svc:
        yield svc, db, ids


@pytest.mark.anyio
@pytest.mark.parametrize("method", sorted(BASE))
async def test_the_base_arguments_of_every_method_are_valid(seeded, method):
    svc, _, ids = seeded
    kwargs = {k: resolve(v, ids) for k, v in BASE[method].items()}
    await getattr(svc, method)(**kwargs)


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "arg", "value", "codes", "needle"), CASES)
async def test_a_bad_argument_gets_the_right_error_naming_it_and_changes_nothing(
    seeded, method, arg, value, codes, needle
):
    svc, db, ids = seeded
    kwargs = {k: resolve(v, ids) for k, v in BASE[method].items()}
    kwargs[arg] = resolve(value, ids)
    before = snapshot(db)

    with pytest.raises(taskorch.TaskorchError) as info:
        await getattr(svc, method)(**kwargs)

    err = info.value
    message = str(err)
    assert err.code in codes, message
    assert str(resolve(needle, ids)) in message
    assert "Traceback" not in message
    assert "sqlite" not in message.lower()
    assert snapshot(db) == before


# -- property tests: anything JSON can carry, in every argument ----------------------------------

# Text includes lone surrogates and control characters: JSON ("\ud800", "\u0000") can carry both.
_text = st.text(max_size=12) | st.text(st.characters(categories=["Cs", "Cc", "Ll"]), max_size=4)
# JSON numbers have no size limit: json.loads("1" + "0" * 400) is a Python int beyond any float.
_big_ints = st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400)])
_scalars = st.none() | st.booleans() | st.integers() | _big_ints | st.floats() | _text
json_ish = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# The usual suspects, tried in every argument: boundaries, sizes and encodings that break naive checks.
USUAL_SUSPECTS = [
    None, True, False, 0, -1, 0.5, 2**63, -(2**63) - 1, 10**400, -(10**400), math.nan, math.inf, -math.inf,
    "", " ", "\x00", "\ud800", "~/x", "a/b", "/" + "a" * 60, [], {}, [None], [[]], {"": None}, {1: 2},
    deep(5000), deep(5000, "list"),
]  # fmt: skip
_edge = st.sampled_from(USUAL_SUSPECTS[:-2])
_word = st.text("abcxyz-_0123456789", min_size=1, max_size=8)


def _would_wait(value: Any) -> bool:
    """A valid positive wait_seconds would make an example block for up to a minute."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
        and value > 0
    )


# Valid values for every argument; each example then replaces one argument (or all) by anything.
VALID_CREATE = {
    "work_path": st.sampled_from(["/w", "/w/sub", "/w/../w", "//w/"]) | _word.map(lambda s: "/" + s),
    "prompt": st.sampled_from(["do it", "fix it\nnow"]),
    "title": _word,
    "priority": st.sampled_from(["low", "normal", "high", "critical"]),
    "tags": st.lists(_word, max_size=3),
    "depends_on": st.just([]),
    "max_attempts": st.integers(1, 100),
    "idempotency_key": _word,
    "metadata": st.dictionaries(_word, st.integers() | _word, max_size=3),
    "delay_seconds": st.floats(0, 10),
    "timeout_seconds": st.integers(1, 3600),
}
VALID_NEXT = {
    "work_path": st.sampled_from(["/w", "/w/sub", "/done", "/"]),
    "worker_id": _word,
    "lease_seconds": st.floats(1, 600),
    "wait_seconds": st.just(0),
    "include_subpaths": st.booleans(),
    "tags": st.lists(_word, max_size=3),
}
REQUIRED = {"create_task": ("work_path", "prompt"), "next_task": ("work_path", "worker_id")}


def _anything(name: str) -> st.SearchStrategy[Any]:
    strategy = _edge | json_ish
    return strategy.filter(lambda v: not _would_wait(v)) if name == "wait_seconds" else strategy


def one_bad_argument(method: str, name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Valid arguments (required ones always, optional ones sometimes) with `name` set to anything."""
    valid = VALID[method]
    fixed = {k: valid[k] for k in REQUIRED[method]} | {name: _anything(name)}
    return st.fixed_dictionaries(fixed, optional={k: v for k, v in valid.items() if k not in fixed})


def all_random_arguments(method: str) -> st.SearchStrategy[dict[str, Any]]:
    required = REQUIRED[method]
    return st.fixed_dictionaries(
        {k: _anything(k) for k in required}, optional={k: _anything(k) for k in VALID[method] if k not in required}
    )


VALID = {"create_task": VALID_CREATE, "next_task": VALID_NEXT}
FUZZED = [(method, name) for method, valid in VALID.items() for name in valid]


@pytest.fixture
def portal_service(db_copy) -> Iterator[tuple[anyio.from_thread.BlockingPortal, taskorch.TaskService, Path]]:
    """One seeded service on its own event-loop thread, driven from synchronous hypothesis examples."""
    db, _, clock = db_copy
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        opened = taskorch.open_service(db, config=CONFIG, clock=clock, sweep=False)
        with portal.wrap_async_context_manager(opened) as svc:
            yield portal, svc, db


def check_call(portal, svc, db, method: str, kwargs: dict[str, Any]) -> None:
    """The call either works, or raises a TaskorchError and leaves the database as it was. Anything
    else (TypeError, KeyError, OverflowError, RecursionError...) escapes and fails the example."""
    before = snapshot(db)
    try:
        portal.call(functools.partial(getattr(svc, method), **kwargs))
    except taskorch.TaskorchError:
        assert snapshot(db) == before


_FUZZ = {
    "deadline": None,
    "derandomize": True,  # the same examples on every run: a failure here is a bug, never a fluke
    "database": None,  # leave no .hypothesis directory behind
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}


@settings(max_examples=20, **_FUZZ)
@given(data=st.data())
@pytest.mark.parametrize(("method", "name"), FUZZED, ids=[f"{m}-{n}" for m, n in FUZZED])
def test_anything_in_one_argument_raises_only_taskorch_errors_and_changes_nothing(portal_service, method, name, data):
    check_call(*portal_service, method, data.draw(one_bad_argument(method, name), label="kwargs"))


@pytest.mark.parametrize(("method", "name"), FUZZED, ids=[f"{m}-{n}" for m, n in FUZZED])
def test_every_usual_suspect_in_every_argument_raises_only_taskorch_errors_and_changes_nothing(
    portal_service, method, name
):
    problems = []
    for value in USUAL_SUSPECTS:
        if name == "wait_seconds" and _would_wait(value):
            continue
        try:
            check_call(*portal_service, method, {**BASE[method], name: value})
        except Exception as e:  # collect every escape, not only the first
            problems.append(f"{name}={_short(value)}: {type(e).__name__}: {str(e)[:100]}")
    assert not problems, "\n".join(problems)


def _short(value: Any) -> str:
    return reprlib.repr(value)  # bounded: safe for 400-digit ints and 5000-deep nesting


@settings(max_examples=100, **_FUZZ)
@given(data=st.data())
@pytest.mark.parametrize("method", sorted(VALID))
def test_anything_in_every_argument_raises_only_taskorch_errors_and_changes_nothing(portal_service, method, data):
    check_call(*portal_service, method, data.draw(all_random_arguments(method), label="kwargs"))


# -- the same table on PostgreSQL -------------------------------------------------------------------


def _pg_snapshot(pg_db: Any) -> dict[str, list[tuple]]:
    return {
        table: [tuple(r) for r in pg_db.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
        for table, order in _TABLES.items()
    }


@pytest.mark.anyio
@pytest.mark.postgres
async def test_every_bad_argument_gets_the_same_error_on_postgresql_and_changes_nothing(pg_db) -> None:
    # The table above, replayed in one test on one seeded PostgreSQL queue: a bad call changes
    # nothing, so every row can share the seed, and each is still checked against the rows of
    # every task table (read through a connection of the test's own) before and after it.
    clock = Clock()
    problems: list[str] = []
    async with taskorch.open_service(pg_db.url, config=CONFIG, clock=clock, sweep=False) as svc:
        ids = await seed_queue(svc, clock)
        for i in range(3):
            await svc.create_task(work_path="/w/sub", prompt=f"spare {i}")
        for case in CASES:
            method, arg, value, codes, needle = case.values
            kwargs = {k: resolve(v, ids) for k, v in BASE[method].items()}
            kwargs[arg] = resolve(value, ids)
            before = _pg_snapshot(pg_db)
            try:
                await getattr(svc, method)(**kwargs)
            except taskorch.TaskorchError as err:
                message = str(err)
                if err.code not in codes or str(resolve(needle, ids)) not in message:
                    problems.append(f"{case.id}: {message[:200]}")
                if any(word in message.lower() for word in ("traceback", "sqlite", "postgres", "asyncpg")):
                    problems.append(f"{case.id}: leaks internals: {message[:200]}")
            else:
                problems.append(f"{case.id}: no error")
            if _pg_snapshot(pg_db) != before:
                problems.append(f"{case.id}: changed the database")
    assert not problems, "\n".join(problems)
