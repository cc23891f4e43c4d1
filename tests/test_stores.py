"""Choosing a store, and what both dialects must agree on; no database server needed here."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

import taskorch
import taskorch.store_api
from taskorch import errors
from taskorch.config import Config, ConfigError, load_config
from taskorch.resources import migrations_dir
from taskorch.stores import redacted_url

pytestmark = pytest.mark.anyio


async def test_both_stores_implement_the_store_interface(db: str) -> None:
    from taskorch.store_api import Store

    async with taskorch.open_service(db, config=load_config(environ={}), sweep=False) as svc:
        assert isinstance(svc.store, Store)
        assert svc.store.on_remote_change is not None  # the service listens for other servers
        assert abs(svc.store.clock() - taskorch.store_api.system_clock()) < 5_000_000


def test_both_dialects_have_the_same_migrations_by_number_and_name() -> None:
    sqlite = sorted(p.name for p in migrations_dir("sqlite").glob("*.sql"))
    postgres = sorted(p.name for p in migrations_dir("postgres").glob("*.sql"))
    assert sqlite == postgres
    assert sqlite and all(name[:4].isdigit() and name[4] == "_" for name in sqlite)


def test_both_dialects_create_the_same_tables_and_columns() -> None:
    # A cheap schema comparison: every column named in one dialect's CREATE TABLE is in the other's.
    def columns(dialect: str) -> dict[str, set[str]]:
        tables: dict[str, set[str]] = {}
        current = None
        for line in (migrations_dir(dialect) / "0001_initial.sql").read_text(encoding="utf-8").splitlines():
            words = line.split()
            if line.startswith("CREATE TABLE"):
                current = tables.setdefault(words[2], set())
            elif line.startswith(")"):
                current = None
            elif current is not None and words and words[0].islower() and not words[0].startswith("--"):
                current.add(words[0])
        return tables

    assert columns("sqlite") == columns("postgres")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@db.example:5433/queue", "postgresql://u:***@db.example:5433/queue"),
        ("postgres://u@db/queue", "postgres://u@db/queue"),
        (
            "postgresql://db/queue?password=s3cret&sslmode=require",
            "postgresql://db/queue?password=%2A%2A%2A&sslmode=require",
        ),
        ("postgresql://u:p%40ss@h/d", "postgresql://u:***@h/d"),
    ],
)
def test_redacted_url_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    assert "s3cret" not in redacted_url(url)


def test_a_postgresql_url_in_store_path_stays_a_url_and_a_file_stays_a_path(tmp_path: Path) -> None:
    url = "postgresql://u:pw@localhost:5432/tasks"
    cfg = load_config(environ={"TASKORCH_DB": url})
    assert cfg.store.path == url
    assert cfg.db_location() == url
    with pytest.raises(ValueError, match="URL"):
        cfg.db_path()
    cfg = load_config(environ={"TASKORCH_DB": str(tmp_path / "q.db")})
    assert cfg.db_location() == tmp_path / "q.db"


def test_postgres_settings_come_from_yaml_and_environment_and_are_checked() -> None:
    cfg = load_config(environ={"TASKORCH_STORE__POSTGRES__POOL_MAX": "16", "TASKORCH_STORE__POSTGRES__POOL_MIN": "4"})
    assert (cfg.store.postgres.pool_min, cfg.store.postgres.pool_max) == (4, 16)
    assert Config().store.postgres.pool_min == 2 and Config().store.postgres.pool_max == 8
    with pytest.raises(ConfigError, match="pool_min"):
        load_config(environ={"TASKORCH_STORE__POSTGRES__POOL_MIN": "9"})
    with pytest.raises(ConfigError, match=r"store\.path: must be a path"):
        load_config(environ={}, overrides={"store": {"path": 5}})


async def test_a_postgresql_url_without_asyncpg_stops_start_up_naming_the_extra(monkeypatch, caplog) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "asyncpg" else real(name, *a))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as info:
        async with taskorch.open_service("postgresql://me:s3cret@localhost/q", config=load_config(environ={})):
            pass
    message = str(info.value)
    assert "pip install 'taskorch[postgres]'" in message
    assert "postgresql://me:***@localhost/q" in message
    assert "s3cret" not in message + caplog.text


def test_the_cli_reports_the_missing_driver_as_a_configuration_error(monkeypatch, capsys) -> None:
    from taskorch.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "asyncpg" else real(name, *a))
    assert main(["--db", "postgresql://me:s3cret@localhost/q", "tasks", "list"]) == 2
    err = capsys.readouterr().err
    assert "taskorch[postgres]" in err and "s3cret" not in err


# -- the PostgreSQL store's error boundary, with a fake pool (no server) ---------------------------


class _FakeConn:
    pass


class _FakePool:
    def __init__(self) -> None:
        self.acquired = 0

    async def acquire(self) -> _FakeConn:
        self.acquired += 1
        return _FakeConn()

    async def release(self, conn: _FakeConn) -> None:
        return None


def _db_with_fake_pool():
    pytest.importorskip("asyncpg")
    from taskorch.config import PostgresConfig
    from taskorch.pg_db import PgDatabase

    db = PgDatabase("postgresql://u:s3cret@h/d", PostgresConfig(), "full")
    db.pool = _FakePool()  # type: ignore[assignment]
    return db


def _pg_error(sqlstate: str, message: str = "boom") -> Exception:
    import asyncpg

    exc = asyncpg.PostgresError.get_message_class_for_sqlstate(sqlstate)(message)
    assert exc.sqlstate == sqlstate
    return exc


def _raising(*errors_: Exception):
    remaining = list(errors_)

    async def op(conn: _FakeConn) -> str:
        if remaining:
            raise remaining.pop(0)
        return "done"

    return op


async def test_serialization_failures_and_deadlocks_are_retried_up_to_three_times() -> None:
    db = _db_with_fake_pool()
    assert await db.run(_raising(_pg_error("40001"), _pg_error("40P01"), _pg_error("40001"))) == "done"
    assert db.pool.acquired == 4
    with pytest.raises(errors.StoreBusy):
        await db.run(_raising(*[_pg_error("40001")] * 4))


@pytest.mark.parametrize("sqlstate", ["55P03", "57014", "53300", "57P01", "08006"])
async def test_lock_and_statement_timeouts_and_unavailability_are_store_busy(sqlstate: str) -> None:
    db = _db_with_fake_pool()
    with pytest.raises(errors.StoreBusy) as info:
        await db.run(_raising(_pg_error(sqlstate)))
    assert db.pool.acquired == 1  # not retried: the caller decides
    assert info.value.retryable and "s3cret" not in str(info.value)


async def test_other_database_errors_are_internal_errors_with_a_log_line(caplog) -> None:
    db = _db_with_fake_pool()
    caplog.set_level(logging.ERROR, logger="taskorch.pg_db")
    with pytest.raises(errors.InternalError) as info:
        await db.run(_raising(_pg_error("42P01", 'relation "tasks" does not exist')))
    assert "SQL" not in str(info.value) and "tasks" not in str(info.value)
    assert "42P01" in caplog.text


async def test_a_taskorch_error_raised_inside_an_operation_passes_through() -> None:
    db = _db_with_fake_pool()
    with pytest.raises(errors.ValidationError):
        await db.run(_raising(errors.ValidationError("depends_on: nope")))
