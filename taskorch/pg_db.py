"""The only module that touches asyncpg: the pool and its session settings, migrations, the
translation of driver errors, and wake-ups between servers (LISTEN/NOTIFY).

One operation, one round trip. Every state transition is one statement (pg_queries.py), run on a
pooled connection in its own implicit transaction; the pool hands connections back without
asyncpg's reset query (we never change session state), which would be a second round trip.

Wake-ups. A server that made tasks claimable sends `pg_notify` AFTER its commit, at most once
per work_path per NOTIFY_INTERVAL, from a background task: a NOTIFY inside the create's
transaction would take PostgreSQL's cluster-wide notify lock across the commit's WAL flush and
serialise every commit (measured 0.26x, notes/postgres-scaleout.md). Each server keeps one LISTEN
connection outside the pool, reconnecting on loss; a notification from another server calls
`on_remote_change`. It is only a hint: the service's long polls re-check every poll interval, and
after every reconnect, which covers missed notifications, run_after and lease expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from . import pg_queries as pq
from .config import ConfigError, PostgresConfig
from .errors import InternalError, StoreBusy, TaskorchError
from .stores import redacted_url

log = logging.getLogger(__name__)

T = TypeVar("T")
CHANNEL = "taskorch_changes"
NOTIFY_INTERVAL = 0.1  # seconds: at most one NOTIFY per work_path per interval
KEEPALIVE = 10.0  # seconds between checks that the LISTEN connection is alive
_MAX_PAYLOAD = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes and more
_CONFLICT_RETRIES = 3
_RETRY = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
# The server cannot take the operation now; nothing about it is wrong: retryable.
_UNAVAILABLE = frozenset({"53300", "57P01", "57P02", "57P03"})  # too many connections, shutting down


def translate(exc: BaseException, location: str) -> TaskorchError:
    """Driver errors end here: contention and unavailability become STORE_BUSY, the rest an
    internal error with a log line. Messages name settings, never SQL or a password."""
    code = getattr(exc, "sqlstate", None) or ""
    if code in _RETRY:
        return StoreBusy("the database kept aborting the operation on conflicting writes; retry shortly")
    if code == "55P03":
        return StoreBusy("the task was locked by another operation for longer than lock_timeout_ms; retry shortly")
    if code == "57014":
        return StoreBusy("the database took longer than statement_timeout_ms; retry shortly")
    if code in _UNAVAILABLE or code.startswith("08") or isinstance(exc, OSError | TimeoutError):
        log.warning("database %s unavailable: %s", location, exc)
        return StoreBusy(f"the database {location} is unavailable or all connections are busy; retry shortly")
    log.error("postgresql error %s at %s: %s", code or type(exc).__name__, location, exc)
    return InternalError("the database reported an error; see the server log")


def _bad_url(url: str, exc: ValueError) -> ConfigError:
    reason = str(exc)
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        if password:
            reason = reason.replace(password, "***")
    return ConfigError(f"store.path: {redacted_url(url)} is not a usable PostgreSQL URL ({reason})")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing to undo (no SET, no LISTEN on pooled connections)."""


def _session_settings(cfg: PostgresConfig, durability: str) -> dict[str, str]:
    return {
        "application_name": "taskorch",
        # full: a commit returns once its WAL is on disk; normal: the WAL writer flushes within
        # ~3 x wal_writer_delay, so a database server crash can lose that much acknowledged work.
        "synchronous_commit": "on" if durability == "full" else "off",
        "statement_timeout": str(cfg.statement_timeout_ms),
        "lock_timeout": str(cfg.lock_timeout_ms),
        # A session idle inside a transaction holds a snapshot: every claim then walks dead index
        # entries it cannot clean (0.25x at 2,500 per work_path). The server ends such sessions.
        "idle_in_transaction_session_timeout": str(cfg.idle_in_transaction_timeout_ms),
        # Plan each prepared statement once. Left to choose, PostgreSQL re-plans the claim on
        # every call (its custom plans look cheaper than the generic one), and planning the claim
        # costs more than running it: measured 2x on claim + complete. No statement here needs a
        # plan that depends on its parameter values.
        "plan_cache_mode": "force_generic_plan",
    }


async def _migrate(conn: asyncpg.Connection, scripts: list[tuple[str, str]]) -> list[str]:
    applied: list[str] = []
    for name, script in scripts:
        # One transaction per file, the check inside it, under one advisory lock: servers
        # starting together wait for each other and every migration runs once. DDL is
        # transactional here, so a failing file leaves nothing half-applied.
        async with conn.transaction():
            await conn.execute(pq.MIGRATION_SETTINGS)
            await conn.execute(pq.MIGRATION_LOCK)
            await conn.execute(pq.CREATE_MIGRATIONS_TABLE)
            if await conn.fetchval(pq.SELECT_MIGRATION, name) is None:
                await conn.execute(script)
                await conn.execute(pq.INSERT_MIGRATION, name)
                applied.append(name)
    return applied


def _read_scripts(migrations: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in migrations.glob("*.sql") if p.name[:4].isdigit())
    return [(p.stem, p.read_text(encoding="utf-8")) for p in files]


class PgDatabase:
    """A pool of connections to one PostgreSQL database. Build with `await PgDatabase.open(...)`."""

    def __init__(self, url: str, cfg: PostgresConfig, durability: str) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        self._url = url
        self.location = redacted_url(url)
        self.cfg = cfg
        self.durability = durability
        self.pool: asyncpg.Pool | None = None
        # How long an operation may wait for a free connection before it is STORE_BUSY.
        self.acquire_timeout = (cfg.statement_timeout_ms or 30_000) / 1000
        self.clock_offset_us = 0
        self.on_remote_change: Callable[[], None] | None = None
        self._instance = uuid.uuid4().hex[:16]  # tells our own notifications from other servers'
        self._in_use = 0  # operations holding or waiting for a pooled connection
        self._pending: set[str] = set()
        self._sending = False
        self._notifier: asyncio.Task | None = None
        self._listener: asyncio.Task | None = None
        self._listen_conn: asyncpg.Connection | None = None

    @classmethod
    async def open(cls, url: str, cfg: PostgresConfig, *, durability: str, migrations: Path) -> PgDatabase:
        db = cls(url, cfg, durability)
        scripts = _read_scripts(migrations)  # a few small files, once at start-up
        try:
            db.pool = await asyncpg.create_pool(
                url,
                min_size=cfg.pool_min,
                max_size=cfg.pool_max,
                server_settings=_session_settings(cfg, durability),
                reset=_keep_session,
                timeout=db.acquire_timeout,
            )
            async with db.pool.acquire() as conn:
                await _migrate(conn, scripts)
                before = time.time_ns()
                db_now = await conn.fetchval(pq.DB_CLOCK)
                # The database's clock relative to ours, measured once: store.clock() is only
                # used where a round trip's error does not matter (retention cut-offs).
                db.clock_offset_us = db_now - (before + time.time_ns()) // 2000
            lost = await db._connect_listener()
            db._listener = asyncio.get_running_loop().create_task(db._listen(lost))
        except BaseException as e:
            await db.close()
            if isinstance(e, ValueError):  # the URL itself (asyncpg's ClientConfigurationError too)
                raise _bad_url(url, e) from None
            if isinstance(e, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | TimeoutError):
                raise translate(e, db.location) from None
            raise
        return db

    @classmethod
    async def migrate_only(cls, url: str, cfg: PostgresConfig, migrations: Path) -> list[str]:
        """Apply pending migrations on one connection (the `taskorch migrate` command)."""
        location = redacted_url(url)
        scripts = _read_scripts(migrations)
        try:
            conn = await asyncpg.connect(url, server_settings=_session_settings(cfg, "full"), timeout=30)
        except ValueError as e:
            raise _bad_url(url, e) from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
            raise translate(e, location) from None
        try:
            return await _migrate(conn, scripts)
        except asyncpg.PostgresError as e:
            raise translate(e, location) from None
        finally:
            await conn.close()

    def clock(self) -> int:
        """The database's time in microseconds, estimated from ours and the offset measured at open."""
        return time.time_ns() // 1000 + self.clock_offset_us

    async def close(self) -> None:
        # Changes made just before closing (a `taskorch tasks add`) still wake other servers;
        # then the notifier's rate-limit pause need not run out.
        deadline = time.monotonic() + 2
        while self._notifier is not None and not self._notifier.done() and (self._pending or self._sending):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        for task in (self._notifier, self._listener):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._notifier = self._listener = None
        if self._listen_conn is not None:  # also when the listener task never got to run
            self._listen_conn.terminate()
            self._listen_conn = None
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    # -- running operations ---------------------------------------------------------------------

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any, acquire_timeout: float | None = None) -> T:
        """`await fn(conn, *args)` on a pooled connection. Serialization failures and deadlocks
        (the operation was rolled back whole) are retried up to 3 times with jitter; every driver
        error is translated. TaskorchErrors raised by `fn` pass through."""
        pool = self.pool
        if pool is None:
            raise InternalError("the database is closed")
        limit = self.acquire_timeout if acquire_timeout is None else acquire_timeout
        for attempt in range(_CONFLICT_RETRIES + 1):
            # While a connection is free the acquire cannot wait (a new one has its connect
            # time-out), so it needs no time-out; otherwise asyncio.timeout, not asyncpg's own
            # time-out, which wraps every acquire in a task of its own (~30 µs).
            waits = self._in_use >= self.cfg.pool_max
            self._in_use += 1
            try:
                async with asyncio.timeout(limit if waits else None):
                    conn = await pool.acquire()
                try:
                    return await fn(conn, *args)
                finally:
                    await pool.release(conn)
            except asyncpg.PostgresError as e:
                if e.sqlstate in _RETRY and attempt < _CONFLICT_RETRIES:
                    await asyncio.sleep(random.uniform(0.002, 0.01) * 2**attempt)
                    continue
                raise translate(e, self.location) from None
            except (OSError, TimeoutError, asyncpg.InterfaceError) as e:
                raise translate(e, self.location) from None
            finally:
                self._in_use -= 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.run(_fetchrow, sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.run(_fetch, sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.run(_fetchval, sql, args)

    # -- wake-ups between servers -----------------------------------------------------------------

    def notify(self, work_paths: Iterable[str | None]) -> None:
        """Tell other servers that these work_paths may have claimable tasks. Call after commit."""
        self._pending.update(p for p in work_paths if p)
        if self._pending and (self._notifier is None or self._notifier.done()) and self.pool is not None:
            self._notifier = asyncio.get_running_loop().create_task(self._send_notifications())

    async def _send_notifications(self) -> None:
        while self._pending and self.pool is not None:
            paths, self._pending = self._pending, set()
            payloads = {f"{self._instance}\n{p}" for p in paths}
            payloads = {p if len(p.encode()) < _MAX_PAYLOAD else f"{self._instance}\n*" for p in payloads}
            self._sending = True
            try:
                await self.run(_execute, pq.NOTIFY, (CHANNEL, sorted(payloads)))
            except TaskorchError as e:
                log.debug("wake-up notification not sent (waiters re-poll): %s", e)
            finally:
                self._sending = False
            await asyncio.sleep(NOTIFY_INTERVAL)

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        sender = payload.partition("\n")[0]
        if sender != self._instance and self.on_remote_change is not None:
            self.on_remote_change()

    async def _connect_listener(self) -> asyncio.Event:
        """Open the LISTEN connection (self._listen_conn); the event is set when it is lost."""
        conn = await asyncpg.connect(self._url, server_settings={"application_name": "taskorch-listen"}, timeout=10)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            await conn.add_listener(CHANNEL, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        self._listen_conn = conn
        return lost

    async def _listen(self, lost: asyncio.Event | None) -> None:
        """Keep the LISTEN connection alive: a keepalive query every KEEPALIVE seconds, and a
        reconnect with backoff when it is lost, then a wake-up (we may have missed changes)."""
        delay = 0.1
        while True:
            try:
                if lost is None:
                    lost = await self._connect_listener()
                    log.info("LISTEN connection to %s restored", self.location)
                    delay = 0.1
                    if self.on_remote_change is not None:
                        self.on_remote_change()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), KEEPALIVE)
                if lost.is_set() or self._listen_conn is None:
                    raise ConnectionError("the LISTEN connection was closed")
                await self._listen_conn.execute("SELECT 1", timeout=KEEPALIVE)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
                log.warning("LISTEN connection to %s lost (%s); reconnecting in %.1f s", self.location, e, delay)
                if self._listen_conn is not None:
                    self._listen_conn.terminate()
                    self._listen_conn = None
                lost = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


async def _fetchrow(conn: asyncpg.Connection, sql: str, args: tuple) -> asyncpg.Record | None:
    return await conn.fetchrow(sql, *args)


async def _fetch(conn: asyncpg.Connection, sql: str, args: tuple) -> list[asyncpg.Record]:
    return await conn.fetch(sql, *args)


async def _fetchval(conn: asyncpg.Connection, sql: str, args: tuple) -> Any:
    return await conn.fetchval(sql, *args)


async def _execute(conn: asyncpg.Connection, sql: str, args: tuple) -> str:
    return await conn.execute(sql, *args)
