"""One contract suite, two stores.

The `db` fixture is a fresh, empty database location per test, parametrised over "sqlite" (a file
in tmp_path) and "postgres" (a URL), so the same test runs against both stores through the same
service API. Tests that need a particular store say so: `sqlite_only` ones hold raw SQLite locks,
read the file or time SQLite's busy timeout; `postgres` ones need several servers on one database.

PostgreSQL comes from TEST_POSTGRES_URL or, when that is unset and PostgreSQL's binaries are
installed, from a throwaway cluster started here on 127.0.0.1 (fsync off: nothing here tests the
database server's own durability) and stopped at the end of the session. Either way the session
gets its own database, migrated once by the real migration runner; each test starts from empty
tables (DELETE FROM: ~0.1 ms, where a database per test costs ~30 ms). With neither available the
PostgreSQL half is skipped with the reason, unless CI is set: then it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

T = TypeVar("T")
STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
_TABLES = ("task_events", "task_tags", "task_dependencies", "tasks")  # children first


@pytest.fixture
def anyio_backend() -> str:
    """Every async test runs on asyncio (aiosqlite and asyncpg are asyncio-only)."""
    return "asyncio"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the PostgreSQL tests must run in CI, but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


class PgTestDatabase:
    """The session's PostgreSQL database, and one admin connection to it on its own thread
    (asyncpg is async-only; the thread keeps it usable from sync fixtures and any event loop)."""

    def __init__(self, url: str) -> None:
        import asyncpg

        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-admin", daemon=True)
        self._thread.start()
        self.conn: Any = self.call(lambda: asyncpg.connect(url))

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(60)

    def reset(self) -> None:
        """Empty every table (the schema stays: it was migrated once for the session)."""
        self.call(lambda: self.conn.execute("; ".join(f"DELETE FROM {t}" for t in _TABLES)))

    def fetch(self, sql: str, *args: Any) -> list[Any]:
        return self.call(lambda: self.conn.fetch(sql, *args))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(lambda: self.conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg() -> Iterator[PgTestDatabase]:
    """The PostgreSQL database of this test session (see the module docstring)."""
    if importlib.util.find_spec("asyncpg") is None:
        _unavailable("asyncpg is not installed (pip install -e '.[test]')")
    import asyncpg

    from taskorch.config import PostgresConfig
    from taskorch.pg_cluster import Cluster, find_bindir
    from taskorch.pg_db import PgDatabase
    from taskorch.resources import migrations_dir

    cluster = None
    server = os.environ.get("TEST_POSTGRES_URL")
    if not server:
        if find_bindir() is None:
            _unavailable("TEST_POSTGRES_URL is unset and no PostgreSQL server binaries are installed")
        cluster = Cluster(fsync=False, max_connections=300)
        try:
            server = cluster.start()
        except (RuntimeError, OSError) as e:
            cluster.stop()
            _unavailable(f"the throwaway cluster did not start: {e}")
    assert server is not None
    name = f"taskorch_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def create() -> bool:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
            return True
        except asyncpg.InsufficientPrivilegeError:
            return False  # use the given database itself
        finally:
            await conn.close()

    created = asyncio.run(create())
    url = _with_database(server, name) if created else server
    asyncio.run(PgDatabase.migrate_only(url, PostgresConfig(), migrations_dir("postgres")))
    db = PgTestDatabase(url)
    try:
        yield db
    finally:
        db.close()
        if created and cluster is None:

            async def drop() -> None:
                conn = await asyncpg.connect(server)
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await conn.close()

            asyncio.run(drop())
        if cluster is not None:
            cluster.stop()


@pytest.fixture
def pg_db(pg: PgTestDatabase) -> PgTestDatabase:
    """The session's PostgreSQL database, emptied for this test."""
    pg.reset()
    return pg


@pytest.fixture(params=STORES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database for this test: a SQLite file path or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "t.db")
    return request.getfixturevalue("pg_db").url


@pytest.fixture
def store_kind(db: str) -> str:
    return "postgres" if db.startswith("postgresql://") else "sqlite"
