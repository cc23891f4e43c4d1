"""The only module that touches sqlite: connections, pragmas, migrations, transactions, errors.

Why two connections. One await through aiosqlite's thread costs 250-300 µs on a 2-core VM, while
a claim's statements take ~50 µs (notes/sqlite-queue-costs.md). So a transaction first runs
*inline*, on the event-loop thread, on a connection whose busy timeout is 0: it either gets the
write lock at once and finishes in microseconds, or fails at once with SQLITE_BUSY without having
changed anything. Only then is it queued on aiosqlite's thread, whose connection waits up to
`busy_timeout` for the lock, so the event loop never sleeps on another process's lock. Scans
(lists, statistics) and migrations always run on the thread. WAL checkpoints stay automatic (every
~1000 pages, run by the committing connection): a background checkpointer was measured slower.

Group commit. Writes submitted in the same turn of the event loop (concurrent requests) run in
one transaction, each inside its own SAVEPOINT: one op's error rolls back only that op, and the
batch pays one BEGIN/COMMIT (and, with durability=full, one fsync) instead of one per op.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from . import queries
from .errors import InternalError, StoreBusy

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = sqlite3.Row

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


class Tx:
    """What a transaction function sees: execute statements, get rows back."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def fetchall(self, sql: str, params: Any = ()) -> list[Row]:
        return self._conn.execute(sql, params).fetchall()

    def fetchone(self, sql: str, params: Any = ()) -> Row | None:
        return self._conn.execute(sql, params).fetchone()

    def execute(self, sql: str, params: Any = ()) -> int:
        """Run a statement without rows; return how many rows it changed."""
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Any]) -> None:
        self._conn.executemany(sql, rows)


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in _BUSY_CODES or "locked" in str(exc)


def _run_write(conn: sqlite3.Connection, fn: Callable[..., T], args: tuple) -> T:
    # BEGIN IMMEDIATE takes the write lock before the first read: a deferred transaction that
    # reads and then writes fails with SQLITE_BUSY at once, whatever the busy timeout.
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(Tx(conn), *args)
        conn.execute("COMMIT")
    except BaseException:
        # Also when COMMIT itself failed: the caller may retry the whole transaction elsewhere,
        # so this connection must not keep the write lock.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


class _Op:
    """One write waiting for the next batch."""

    __slots__ = ("args", "busy_timeout_ms", "fn", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple, future: asyncio.Future, busy_timeout_ms: int | None):
        self.fn = fn
        self.args = args
        self.future = future
        self.busy_timeout_ms = busy_timeout_ms


def _run_batch(conn: sqlite3.Connection, ops: list[_Op]) -> list[tuple[bool, Any]]:
    """Run ops in one transaction, each in a savepoint; return (ok, result or error) per op."""
    if len(ops) == 1:  # the common, sequential case: no savepoint needed
        op = ops[0]
        try:
            return [(True, _run_write(conn, op.fn, op.args))]
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise
            return [(False, _translate(e))]
        except sqlite3.Error as e:
            return [(False, _translate(e))]
        except Exception as e:
            return [(False, e)]
    outcomes: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for op in ops:
            conn.execute("SAVEPOINT op")
            try:
                result = op.fn(Tx(conn), *op.args)
            except Exception as e:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, _translate(e) if isinstance(e, sqlite3.Error) else e))
            else:
                conn.execute("RELEASE op")
                outcomes.append((True, result))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _run_batch_waiting(conn: sqlite3.Connection, ops: list[_Op], wait_ms: int, usual_ms: int) -> list[tuple[bool, Any]]:
    conn.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
    try:
        return _run_batch(conn, ops)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(usual_ms)}")


def _run_write_waiting(conn: sqlite3.Connection, fn: Callable[..., T], args: tuple, wait_ms: int, usual_ms: int) -> T:
    conn.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
    try:
        return _run_write(conn, fn, args)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(usual_ms)}")


def _run_read(conn: sqlite3.Connection, fn: Callable[..., T], args: tuple) -> T:
    # One snapshot for every statement of the read, released before returning (a read
    # transaction held across awaits would starve checkpoints).
    conn.execute("BEGIN")
    try:
        return fn(Tx(conn), *args)
    finally:
        conn.execute("COMMIT")


def _split_statements(script: str) -> list[str]:
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current)
            current = ""
    if current.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in current.splitlines()):
        raise ValueError("a migration ends with an incomplete statement")
    return statements


class Database:
    """An open SQLite database in WAL mode. Build with `await Database.open(...)`."""

    def __init__(self, path: Path, durability: str, busy_timeout_ms: int, inline_writes: bool) -> None:
        self.path = path
        self.durability = durability
        self.busy_timeout_ms = busy_timeout_ms
        self.inline_writes = inline_writes
        self._thread: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self._pending: list[_Op] = []
        self._background: set[asyncio.Task] = set()

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        durability: str = "full",
        busy_timeout_ms: int = 5000,
        inline_writes: bool = True,
        migrations_dir: Path | None = None,
    ) -> Database:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        db = cls(Path(path), durability, busy_timeout_ms, inline_writes)
        db.path.parent.mkdir(parents=True, exist_ok=True)
        connection = aiosqlite.connect(db.path, isolation_level=None)
        try:
            try:
                db._thread = await connection
            except BaseException:
                # A failed connect queues the stop of aiosqlite's thread without waiting for it;
                # wait here, or the thread reports to an event loop that may be closed by then.
                await asyncio.to_thread(connection._thread.join, 10)
                raise
            await db._thread._execute(db._configure, db._thread._conn, busy_timeout_ms)
            if migrations_dir is not None:
                await db.migrate(migrations_dir)
            if inline_writes:
                db._inline = sqlite3.connect(db.path, isolation_level=None)
                db._configure(db._inline, 0)
        except sqlite3.Error as e:
            await db.close()
            if _is_busy(e):
                raise _translate(e) from None
            log.error("cannot open the database %s: %s", db.path, e)
            raise InternalError(f"cannot open the database {db.path}: {e}") from None
        except BaseException:
            await db.close()
            raise
        return db

    def _configure(self, conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise InternalError(f"the database could not switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = " + ("FULL" if self.durability == "full" else "NORMAL"))
        conn.execute("PRAGMA foreign_keys = ON")

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._thread is not None:
            await self._thread.close()
            self._thread = None

    async def migrate(self, migrations_dir: Path) -> list[str]:
        """Apply the `NNNN_name.sql` files not applied yet, in order; return their names."""
        # A handful of small files read once at start-up: not worth a thread hop.
        files = sorted(p for p in migrations_dir.glob("*.sql") if p.name[:4].isdigit())  # noqa: ASYNC240
        scripts = [(p.stem, _split_statements(p.read_text(encoding="utf-8"))) for p in files]
        return await self._call_thread(_apply_migrations, scripts)

    async def write(self, fn: Callable[..., T], *args: Any, busy_timeout_ms: int | None = None) -> T:
        """Run `fn(tx, *args)` in a BEGIN IMMEDIATE transaction; commit unless it raises.

        `busy_timeout_ms` caps this call's wait for the write lock (default: the configured one).
        Concurrent calls may share a transaction (see "Group commit" above); each is atomic.
        """
        if self._inline is None:
            if busy_timeout_ms is not None and busy_timeout_ms < self.busy_timeout_ms:
                return await self._call_thread(_run_write_waiting, fn, args, busy_timeout_ms, self.busy_timeout_ms)
            return await self._call_thread(_run_write, fn, args)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Op(fn, args, future, busy_timeout_ms))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        # Ops whose caller was cancelled before the batch ran are dropped, not run.
        ops = [op for op in self._pending if not op.future.done()]
        self._pending = []
        if not ops:
            return
        if self._inline is None:
            _settle(ops, [(False, InternalError("the database is closed"))] * len(ops))
            return
        try:
            outcomes = _run_batch(self._inline, ops)
        except sqlite3.Error as e:
            if not _is_busy(e):
                _settle(ops, [(False, _translate(e))] * len(ops))
                return
            # Another connection holds the write lock: wait for it on the database thread,
            # never on the event loop. Nothing of this batch was committed.
            task = asyncio.get_running_loop().create_task(self._flush_on_thread(ops))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        _settle(ops, outcomes)

    async def _flush_on_thread(self, ops: list[_Op]) -> None:
        # An op that must give up early (a long poll's re-claim) waits alone with its own limit.
        hurried = [op for op in ops if op.busy_timeout_ms is not None and op.busy_timeout_ms < self.busy_timeout_ms]
        patient = [op for op in ops if op not in hurried]
        groups: list[tuple[list[_Op], int | None]] = [([op], op.busy_timeout_ms) for op in hurried]
        if patient:
            groups.append((patient, None))
        for group, wait_ms in groups:
            try:
                if wait_ms is None:
                    outcomes = await self._call_thread(_run_batch, group)
                else:
                    outcomes = await self._call_thread(_run_batch_waiting, group, wait_ms, self.busy_timeout_ms)
            except Exception as e:  # StoreBusy or a closed database: every op of the group gets it
                outcomes = [(False, e)] * len(group)
            _settle(group, outcomes)

    async def read(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        """Run `fn(tx, *args)` in a read snapshot. `inline` for short indexed reads only."""
        if inline and self._inline is not None:
            try:
                return _run_read(self._inline, fn, args)
            except sqlite3.Error as e:
                raise _translate(e) from None
        return await self._call_thread(_run_read, fn, args)

    async def _call_thread(self, runner: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise InternalError("the database is closed")
        try:
            return await self._thread._execute(runner, self._thread._conn, *args)
        except sqlite3.Error as e:
            raise _translate(e) from None

    async def integrity_check(self) -> str:
        """ "ok", or what SQLite's integrity check and foreign key check found."""
        return await self._call_thread(_integrity)

    async def ping(self) -> None:
        await self.read(lambda tx: tx.fetchone("SELECT 1"), inline=True)


def _apply_migrations(conn: sqlite3.Connection, scripts: list[tuple[str, list[str]]]) -> list[str]:
    from time import time_ns

    conn.execute(queries.CREATE_MIGRATIONS_TABLE)
    applied: list[str] = []
    for name, statements in scripts:
        # One transaction per migration, with the check inside it: servers starting together
        # serialise on the write lock and each migration runs once.
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = {r[0] for r in conn.execute(queries.SELECT_MIGRATIONS)}
            if name not in done:
                for statement in statements:
                    conn.execute(statement)
                conn.execute(queries.INSERT_MIGRATION, (name, time_ns() // 1000))
                applied.append(name)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return applied


def _integrity(conn: sqlite3.Connection) -> str:
    found = conn.execute("PRAGMA integrity_check").fetchone()[0]
    orphans = conn.execute("PRAGMA foreign_key_check").fetchall()
    if orphans:
        tables = sorted({row[0] for row in orphans})
        problem = f"{len(orphans)} rows whose parent row is missing (in {', '.join(tables)})"
        found = problem if found == "ok" else f"{found}; {problem}"
    return found


def _settle(ops: list[_Op], outcomes: list[tuple[bool, Any]]) -> None:
    for op, (ok, value) in zip(ops, outcomes, strict=True):
        if op.future.done():  # the caller was cancelled while the batch ran
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)


def _translate(exc: sqlite3.Error) -> Exception:
    """Driver errors end here: busy becomes STORE_BUSY, the rest an internal error."""
    if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
        return StoreBusy("the database is busy (locked by another writer for too long); retry shortly")
    log.error("sqlite error: %s", exc)
    return InternalError("the database reported an error; see the server log")
