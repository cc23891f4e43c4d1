"""The PostgreSQL half of store_bench.py: taskorch on PostgreSQL against raw asyncpg running the
same single statements, and beside taskorch on SQLite at the same durability and concurrency.

    python benchmarks/store_bench.py --db postgresql://user@host/db [--n 2000] [--rounds 3]
    python benchmarks/store_bench.py --pg        # a throwaway cluster on 127.0.0.1 (as the tests)

The benchmark never touches the database named in --db: it creates its own database on that
server (taskorch_bench_<pid>, dropped at the end), so the role needs CREATEDB.

Cases, for durability normal (synchronous_commit=off) and full (on), with 1 and 16 workers:
  raw asyncpg    pg_queries' CREATE_TASK / CLAIM_NEXT / COMPLETE_TASK with the same arguments on a
                 pool of the same size and session settings as taskorch's: the reference (1.00x)
  taskorch pg    taskorch.open_service on the database
  taskorch sqlite  the same service on a SQLite file in a temp dir
Each case creates N tasks over 4 work_paths (create/s) and drains them with claim + complete
(cycles/s); 16 workers are 16 coroutines, each walking the work_paths from its own offset and
yielding once between claim and complete. Exactly-once is checked in every case: every created id
completed once, none unknown, and the database shows every task completed with attempts=1,
version=3 and 3 events. Rounds are interleaved; figures are medians, ratios medians of per-round
ratios. The database is emptied (TRUNCATE) between cases, so dead rows of one do not slow the next.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# One workload for both halves of the benchmark (store_bench.py is beside this file).
from store_bench import OUTPUT, PRIORITIES, RESULT_JSON, WORK_PATHS, workload

import taskorch
from taskorch import pg_queries as pq
from taskorch.config import load_config
from taskorch.pg_db import _keep_session, _session_settings
from taskorch.store_api import LEASE_EXPIRED_ERROR, new_task_id
from taskorch.stores import redacted_url

RANK = {p: i for i, p in enumerate(PRIORITIES)}
RAW, PG, SQ = "raw asyncpg", "taskorch pg", "taskorch sqlite"
KINDS = (RAW, PG, SQ)
WORKERS = (1, 16)


@dataclass
class Result:
    create_s: float
    drain_s: float
    cpu_s: float
    problems: list[str] = field(default_factory=list)


class Ledger:
    """Who created and completed what; the client side of the exactly-once check."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.created: list[str] = []
        self.done: Counter[str] = Counter()
        self.problems: list[str] = []

    def check(self) -> list[str]:
        created = set(self.created)
        bad = list(self.problems)
        if len(created) != self.n:
            bad.append(f"{len(self.created)} creates gave {len(created)} distinct ids, expected {self.n}")
        for count, what in ((len(set(self.done) - created), "unknown ids completed"),
                            (len(created - set(self.done)), "tasks never completed"),
                            (sum(1 for c in self.done.values() if c > 1), "tasks completed twice")):  # fmt: skip
            if count:
                bad.append(f"{count} {what}")
        return bad


# -- the clients ----------------------------------------------------------------------------------


class RawAsyncpg:
    """The store's own statements, with the arguments the store passes, and nothing else."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, wp: str, priority: str, prompt: str) -> str:
        args = (None, new_task_id(time.time_ns() // 1000), wp, prompt.splitlines()[0][:120], prompt, RANK[priority],
                "[]", "{}", "[]", 3, 0, 3600, [], None, [])  # fmt: skip
        async with self.pool.acquire() as conn:
            return (await conn.fetchrow(pq.CREATE_TASK, *args))["id"]

    async def claim(self, wp: str, worker: str) -> tuple[str, int] | None:
        args = (None, LEASE_EXPIRED_ERROR, worker, 300_000_000, None, 0, wp)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(pq.CLAIM_NEXT, *args)
        return None if row["id"] is None else (row["id"], row["version"])

    async def complete(self, ticket: tuple[str, int], worker: str) -> bool:
        args = (None, ticket[0], ticket[1], worker, True, True, 5_000_000, 600_000_000, RESULT_JSON, None)
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(pq.COMPLETE_TASK, *args) is not None


class Service:
    """taskorch's service, seen through the same three calls."""

    def __init__(self, svc: taskorch.TaskService) -> None:
        self.svc = svc

    async def create(self, wp: str, priority: str, prompt: str) -> str:
        return (await self.svc.create_task(work_path=wp, prompt=prompt, priority=priority)).id

    async def claim(self, wp: str, worker: str) -> tuple[str, int] | None:
        c = await self.svc.next_task(work_path=wp, worker_id=worker)
        return None if c is None else (c.task.id, c.lease.token)

    async def complete(self, ticket: tuple[str, int], worker: str) -> bool:
        try:
            await self.svc.complete_task(task_id=ticket[0], worker_id=worker, lease_token=ticket[1],
                                         status="success", output=OUTPUT)  # fmt: skip
        except taskorch.LeaseLost:
            return False
        return True


async def drive(client: Any, items: list, workers: int, led: Ledger) -> tuple[float, float, float]:
    async def create(k: int) -> list[str]:
        return [await client.create(wp, pr, p) for wp, pr, p in items[k::workers]]

    async def drain(k: int) -> None:
        worker = f"w{k:02d}"
        for j in range(len(WORK_PATHS)):
            wp = WORK_PATHS[(k + j) % len(WORK_PATHS)]
            while (ticket := await client.claim(wp, worker)) is not None:
                if workers > 1:  # the worker's turn: let the other coroutines claim meanwhile
                    await asyncio.sleep(0)
                if not await client.complete(ticket, worker):
                    led.problems.append(f"complete of {ticket[0]} by {worker} was refused")
                    continue
                led.done[ticket[0]] += 1

    t0 = time.perf_counter()
    led.created = [i for ids in await asyncio.gather(*(create(k) for k in range(workers))) for i in ids]
    t1, c1 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(drain(k) for k in range(workers)))
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c1


# -- one case -------------------------------------------------------------------------------------

CHECK_PG = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE status = 'completed' AND attempts = 1 AND version = 3) AS ok,
       (SELECT count(*) FROM task_events) AS events
FROM tasks
"""


def db_problems(total: int, ok: int, events: int, n: int) -> list[str]:
    bad = [] if total == n else [f"database has {total} tasks, expected {n}"]
    bad += [f"{total - ok} tasks not completed with attempts=1, version=3"] if ok != total else []
    return bad + ([f"{events} events, expected {3 * n}"] if events != 3 * n else [])


async def run_pg(kind: str, url: str, durability: str, workers: int, items: list, pool_max: int) -> Result:
    led = Ledger(len(items))
    admin = await asyncpg.connect(url)
    try:
        await admin.execute("TRUNCATE tasks, task_events, task_tags, task_dependencies")
        # Pools open full (pool_min = pool_max): connection start-up stays out of the timed phases.
        cfg = load_config(environ={}, overrides={"store": {"postgres": {"pool_min": pool_max, "pool_max": pool_max}}})
        if kind == RAW:
            settings = _session_settings(cfg.store.postgres, durability)
            pool = await asyncpg.create_pool(
                url, min_size=pool_max, max_size=pool_max, reset=_keep_session, server_settings=settings
            )
            try:
                create_s, drain_s, cpu_s = await drive(RawAsyncpg(pool), items, workers, led)
            finally:
                await pool.close()
        else:
            async with taskorch.open_service(url, config=cfg, durability=durability, sweep=False) as svc:
                create_s, drain_s, cpu_s = await drive(Service(svc), items, workers, led)
        row = await admin.fetchrow(CHECK_PG)
    finally:
        await admin.close()
    return Result(create_s, drain_s, cpu_s, led.check() + db_problems(*row, len(items)))


async def run_sqlite(durability: str, workers: int, items: list) -> Result:
    tmp = tempfile.mkdtemp(prefix="taskorch-bench-", dir="/tmp")
    try:
        db = os.path.join(tmp, "bench.db")
        led = Ledger(len(items))
        async with taskorch.open_service(db, config=load_config(environ={}), durability=durability, sweep=False) as svc:
            create_s, drain_s, cpu_s = await drive(Service(svc), items, workers, led)
        conn = sqlite3.connect(db)
        try:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(status = 'completed' AND attempts = 1 AND version = 3), 0), "
                "(SELECT count(*) FROM task_events) FROM tasks"
            ).fetchone()
        finally:
            conn.close()
        return Result(create_s, drain_s, cpu_s, led.check() + db_problems(*row, len(items)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_case(kind: str, url: str, durability: str, workers: int, items: list, pool_max: int) -> Result:
    gc.collect()
    if kind == SQ:
        return asyncio.run(run_sqlite(durability, workers, items))
    return asyncio.run(run_pg(kind, url, durability, workers, items, pool_max))


# -- the run --------------------------------------------------------------------------------------


def _own_database(server: str) -> tuple[str, str]:
    name = f"taskorch_bench_{os.getpid()}"

    async def create() -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    p = urlsplit(server)
    return name, urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


def _drop_database(server: str, name: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


async def _server_facts(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        version = (await conn.fetchval("SELECT version()")).split(",")[0]
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'max_connections', 'shared_buffers', "
            "'wal_sync_method') ORDER BY name"
        )
        return f"{version}; " + ", ".join(f"{r['name']}={r['setting']}" for r in rows)
    finally:
        await conn.close()


def main(db_url: str | None, n: int, rounds: int, pool_max: int, json_path: str | None) -> int:
    """Run the PostgreSQL comparison; `db_url` None starts a throwaway cluster."""
    cluster = None
    if db_url is None:
        from taskorch.pg_cluster import Cluster

        cluster = Cluster()
        server = cluster.start()
        where = f"throwaway cluster on 127.0.0.1:{cluster.port}"
    else:
        server, where = db_url, redacted_url(db_url)
    name, url = _own_database(server)
    try:
        return _run(url, where, n, rounds, pool_max, json_path)
    finally:
        _drop_database(server, name)
        if cluster is not None:
            cluster.stop()


def _run(url: str, where: str, n: int, rounds: int, pool_max: int, json_path: str | None) -> int:
    sizes = {"normal": n, "full": max(64, n // 2)}
    cases = [(k, d, w) for d in ("normal", "full") for w in WORKERS for k in KINDS]
    print(f"taskorch {taskorch.__version__} PostgreSQL store benchmark: server {where}")
    print(f"  {asyncio.run(_server_facts(url))}")
    print(f"  asyncpg {asyncpg.__version__}, SQLite {sqlite3.sqlite_version}; pool_max {pool_max}; "
          f"N={sizes['normal']} (normal) / {sizes['full']} (full), {rounds} round(s); "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    asyncio.run(taskorch_migrate(url))
    for kind, d, w in cases:  # warm-up: imports, prepared statements, caches; not measured
        run_case(kind, url, d, w, workload(64), pool_max)
    runs: dict[tuple[str, str, int], list[Result]] = {c: [] for c in cases}
    started = time.perf_counter()
    for r in range(1, rounds + 1):
        for kind, d, w in cases if r % 2 else reversed(cases):
            runs[kind, d, w].append(run_case(kind, url, d, w, workload(sizes[d]), pool_max))
        print(f"  round {r}/{rounds} done at {time.perf_counter() - started:.0f} s", flush=True)

    def rates(c: tuple[str, str, int], attr: str = "drain_s") -> list[float]:
        return [sizes[c[1]] / getattr(x, attr) for x in runs[c]]

    def ratio(a: tuple[str, str, int], b: tuple[str, str, int], attr: str = "drain_s") -> float:
        return statistics.median([x / y for x, y in zip(rates(a, attr), rates(b, attr), strict=True)])

    header = ("case", "durability", "workers", "create/s", "cycles/s", "x raw", "x pg 1-worker", "pg / sqlite",
              "cpu us/cyc", "exactly-once")  # fmt: skip
    widths = (16, 10, 7, 9, 9, 6, 13, 11, 10, 12)
    print()
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    report: dict[str, Any] = {"n": sizes, "rounds": rounds, "pool_max": pool_max, "cases": [], "goals": []}
    for c in cases:
        kind, d, w = c
        failed = sorted({p for x in runs[c] for p in x.problems})
        cpu = statistics.median([x.cpu_s / sizes[d] * 1e6 for x in runs[c]])
        vs_raw = ratio(c, (RAW, d, w)) if kind != SQ else float("nan")
        vs_one = ratio(c, (kind, d, 1))
        pg_sq = ratio((PG, d, w), (SQ, d, w)) if kind == PG else float("nan")
        row = (kind, d, str(w), f"{statistics.median(rates(c, 'create_s')):,.0f}",
               f"{statistics.median(rates(c)):,.0f}", _f(vs_raw), _f(vs_one), _f(pg_sq), f"{cpu:,.0f}",
               "ok" if not failed else "FAIL")  # fmt: skip
        cells = enumerate(zip(row, widths, strict=True))
        print("  ".join(v.ljust(wd) if i < 2 else v.rjust(wd) for i, (v, wd) in cells))
        report["cases"].append({"case": kind, "durability": d, "workers": w, "create_s": [x.create_s for x in runs[c]],
                                "drain_s": [x.drain_s for x in runs[c]], "x_raw": vs_raw, "x_one_worker": vs_one,
                                "pg_over_sqlite": pg_sq, "problems": failed})  # fmt: skip
        for p in failed:
            print(f"EXACTLY-ONCE FAILURE in {kind}, {d}, {w} worker(s): {p}")
    print("\nratios: medians over rounds of (row / reference of the same round); cpu: process CPU per cycle")
    print("goals:")
    goals = [(f"taskorch pg / raw asyncpg, 16 workers, {d}", ratio((PG, d, 16), (RAW, d, 16)), 0.7)
             for d in ("normal", "full")]  # fmt: skip
    goals.append(("taskorch pg 16 workers / 1 worker, full", ratio((PG, "full", 16), (PG, "full", 1)), 2.5))
    for what, value, goal in goals:
        verdict = "PASS" if value >= goal else "BELOW"
        report["goals"].append({"what": what, "ratio": value, "goal": goal, "verdict": verdict})
        print(f"  {what:<45} {value:5.2f}x   goal >= {goal:.1f}   {verdict}")
    print(f"\nload at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; took {time.perf_counter() - started:.0f} s")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 1 if any(c["problems"] for c in report["cases"]) else 0


def _f(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


async def taskorch_migrate(url: str) -> None:
    async with taskorch.open_service(url, config=load_config(environ={}), sweep=False):
        pass
