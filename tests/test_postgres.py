"""What only PostgreSQL does: several servers on one database wake each other, migrate once
together, map durability and time-outs onto session settings, and keep passwords out of sight.

The contract itself (claims, fencing, leases, statistics...) runs on both stores in
test_service.py and test_reliability.py; these tests need the `pg_db` fixture (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

import taskorch
from taskorch.config import Config, ConfigError, load_config

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def config(**sections: Any) -> Config:
    return load_config(environ={}, overrides=sections)


@contextlib.asynccontextmanager
async def server(url: str, **sections: Any) -> AsyncIterator[taskorch.TaskService]:
    """One taskorch server (a service with its own pool and LISTEN connection) on the database."""
    async with taskorch.open_service(url, config=config(**sections), sweep=False) as svc:
        yield svc


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, parts.fragment))


# -- wake-ups across servers --------------------------------------------------------------------------

SLOW_POLL = {"tasks": {"poll_interval_seconds": 30}}  # only a notification can wake a waiter in time


async def _wait_for_claim(svc: taskorch.TaskService, got: dict[str, Any], work_path: str = "/w") -> None:
    got["claim"] = await svc.next_task(work_path=work_path, worker_id="A", wait_seconds=10)
    got["at"] = time.monotonic()


async def test_a_long_poll_on_one_server_wakes_within_a_second_of_a_create_on_another(pg_db) -> None:
    async with server(pg_db.url, **SLOW_POLL) as a, server(pg_db.url, **SLOW_POLL) as b:
        got: dict[str, Any] = {}
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_wait_for_claim, a, got)
                await anyio.sleep(0.2)  # A found nothing and waits
                created = await b.create_task(work_path="/w", prompt="from server B")
                acknowledged = time.monotonic()
        assert got["claim"] is not None and got["claim"].task.id == created.id
        assert got["at"] - acknowledged < 1.0


async def test_a_completion_on_one_server_wakes_a_waiter_for_its_dependant_on_another(pg_db) -> None:
    async with server(pg_db.url, **SLOW_POLL) as a, server(pg_db.url, **SLOW_POLL) as b:
        parent = await b.create_task(work_path="/p", prompt="parent")
        child = await b.create_task(work_path="/w", prompt="child", depends_on=[parent.id])
        claim = await b.next_task(work_path="/p", worker_id="B")
        got: dict[str, Any] = {}
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_wait_for_claim, a, got)
                await anyio.sleep(0.2)
                await b.complete_task(task_id=parent.id, worker_id="B", lease_token=claim.lease.token, status="success")
                acknowledged = time.monotonic()
        assert got["claim"].task.id == child.id
        assert got["at"] - acknowledged < 1.0


async def test_the_listen_connection_comes_back_after_the_database_drops_it(pg_db, caplog) -> None:
    caplog.set_level(logging.INFO, logger="taskorch.pg_db")
    async with server(pg_db.url, **SLOW_POLL) as a, server(pg_db.url, **SLOW_POLL) as b:
        killed = pg_db.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'taskorch-listen' AND datname = current_database()"
        )
        assert len(killed) == 2
        with anyio.fail_after(10):
            while caplog.text.count("restored") < 2:  # noqa: ASYNC110 (the log is what tells)
                await anyio.sleep(0.05)
        got: dict[str, Any] = {}
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_wait_for_claim, a, got)
                await anyio.sleep(0.2)
                created = await b.create_task(work_path="/w", prompt="after the reconnect")
                acknowledged = time.monotonic()
        assert got["claim"].task.id == created.id and got["at"] - acknowledged < 1.0
    assert "s3cret" not in caplog.text


# -- migrations ----------------------------------------------------------------------------------------


def _fresh_database(pg_db, name: str) -> str:
    pg_db.call(lambda: pg_db.conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    pg_db.call(lambda: pg_db.conn.execute(f'CREATE DATABASE "{name}"'))
    parts = urlsplit(pg_db.url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def test_servers_starting_together_apply_each_migration_once(pg_db) -> None:
    url = _fresh_database(pg_db, pg_db.url.rsplit("/", 1)[1] + "_migrate")
    try:
        from taskorch.config import PostgresConfig
        from taskorch.pg_db import PgDatabase
        from taskorch.resources import migrations_dir

        results = await asyncio.gather(
            *(PgDatabase.migrate_only(url, PostgresConfig(), migrations_dir("postgres")) for _ in range(6))
        )
        # Each migration applied by exactly one of them (one may take 0001 while another takes 0002).
        every = sorted(p.stem for p in migrations_dir("postgres").glob("*.sql"))
        assert sorted(name for applied in results for name in applied) == every
        assert await PgDatabase.migrate_only(url, PostgresConfig(), migrations_dir("postgres")) == []
        async with server(url) as svc:  # and the schema works
            task = await svc.create_task(work_path="/m", prompt="p")
            assert (await svc.next_task(work_path="/m", worker_id="w")).task.id == task.id
    finally:
        pg_db.call(lambda: pg_db.conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)'))


def test_the_migrate_command_works_against_postgresql_and_hides_the_password(pg_db, capsys) -> None:
    from taskorch.cli import main

    url = with_password(pg_db.url, "s3cret")  # the test cluster trusts loopback: any password works
    assert main(["migrate", "--db", url, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"applied": []' in out and "s3cret" not in out and ":***@" in out
    assert main(["--db", url, "tasks", "add", "from the CLI", "--work-path", "/cli"]) == 0
    assert main(["--db", url, "--json", "tasks", "list", "--work-path", "/cli"]) == 0
    assert '"total": 1' in capsys.readouterr().out


# -- session settings, time-outs and errors ------------------------------------------------------------


@pytest.mark.parametrize(("durability", "setting"), [("full", "on"), ("normal", "off")])
async def test_durability_maps_to_synchronous_commit_and_timeouts_to_session_settings(
    pg_db, durability: str, setting: str
) -> None:
    pg = {"statement_timeout_ms": 1234, "lock_timeout_ms": 567, "idle_in_transaction_timeout_ms": 8900}
    async with server(pg_db.url, store={"durability": durability, "postgres": pg}) as svc:
        row = await svc.store.db.fetchrow(
            "SELECT current_setting('synchronous_commit') AS sc, current_setting('statement_timeout') AS st, "
            "current_setting('lock_timeout') AS lt, current_setting('idle_in_transaction_session_timeout') AS it, "
            "current_setting('transaction_isolation') AS iso"
        )
    assert dict(row) == {"sc": setting, "st": "1234ms", "lt": "567ms", "it": "8900ms", "iso": "read committed"}


async def test_a_task_locked_by_another_session_is_skipped_by_claims_and_a_cancel_of_it_is_store_busy(
    pg_db,
) -> None:
    async with server(pg_db.url, store={"postgres": {"lock_timeout_ms": 100}}) as svc:
        locked = await svc.create_task(work_path="/l", prompt="held elsewhere")
        free = await svc.create_task(work_path="/l", prompt="free")
        holder = await taskorch_raw_connection(pg_db.url)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", locked.id)
            started = time.monotonic()
            claim = await svc.next_task(work_path="/l", worker_id="w")  # SKIP LOCKED: no waiting
            assert claim.task.id == free.id and time.monotonic() - started < 1
            with pytest.raises(taskorch.StoreBusy) as info:
                await svc.cancel_task(task_id=locked.id)
            assert "lock_timeout_ms" in str(info.value)
            await tx.rollback()
        finally:
            await holder.close()
        assert (await svc.cancel_task(task_id=locked.id)).status is taskorch.Status.CANCELLED


async def test_a_statement_running_past_statement_timeout_is_store_busy(pg_db) -> None:
    async with server(pg_db.url, store={"postgres": {"lock_timeout_ms": 0, "statement_timeout_ms": 150}}) as svc:
        task = await svc.create_task(work_path="/t", prompt="p")
        holder = await taskorch_raw_connection(pg_db.url)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", task.id)
            with pytest.raises(taskorch.StoreBusy) as info:
                await svc.cancel_task(task_id=task.id)  # waits for the row lock until statement_timeout
            assert "statement_timeout_ms" in str(info.value)
            await tx.rollback()
        finally:
            await holder.close()


async def test_an_unreachable_database_is_store_busy_and_never_shows_the_password(pg_db, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    parts = urlsplit(pg_db.url)
    dead = urlunsplit((parts.scheme, f"postgres:s3cret@127.0.0.1:{_closed_port()}", parts.path, "", ""))
    with pytest.raises(taskorch.StoreBusy) as info:
        async with server(dead):
            pass
    assert "postgres:***@127.0.0.1" in str(info.value)
    assert "s3cret" not in str(info.value) + caplog.text


@pytest.mark.parametrize("bad", ["postgresql://u:s3cret@h:notaport/db", "postgresql://u:s3cret@h/db?sslmode=wat"])
async def test_a_malformed_url_is_a_configuration_error_without_the_password(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        async with server(bad):
            pass
    assert "u:***@h" in str(info.value) and "s3cret" not in str(info.value)


async def test_the_store_location_for_logs_and_health_has_no_password(pg_db) -> None:
    async with server(with_password(pg_db.url, "s3cret")) as svc:
        assert ":***@" in svc.store.location and "s3cret" not in svc.store.location


# -- time from the database clock ----------------------------------------------------------------------


async def test_without_an_injected_clock_times_come_from_the_database_clock(pg_db) -> None:
    async with server(pg_db.url) as svc:
        db_now = await svc.store.db.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
        assert abs(svc.store.clock() - db_now) < 1_000_000
        task = await svc.create_task(work_path="/c", prompt="p")
        claim = await svc.next_task(work_path="/c", worker_id="w", lease_seconds=60)
        after = await svc.store.db.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
    created_us = task.created_at.timestamp() * 1e6
    assert db_now - 1e6 < created_us <= after
    assert abs((claim.lease.expires_at - claim.task.started_at).total_seconds() - 60) < 1e-3


# -- helpers ------------------------------------------------------------------------------------------


async def taskorch_raw_connection(url: str) -> Any:
    import asyncpg

    return await asyncpg.connect(url)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
