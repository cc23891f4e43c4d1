"""Throughput of the taskorch service against raw sqlite3 on the same schema and durability.

    python benchmarks/store_bench.py [--n 2000] [--rounds 3] [--quick] [--json out.json] [--profile]
    python benchmarks/store_bench.py --db postgresql://user@host/db   # PostgreSQL: store_bench_pg.py
    python benchmarks/store_bench.py --pg                             # the same on a throwaway cluster

Workload: N tasks over 4 work_paths, priorities uniform, ~200-byte prompts. Phase 1 creates them all
(create/s); phase 2 drains them with claim + complete (cycles/s), each operation its own transaction.
FULL durability runs N/4 tasks, since every commit waits for an fsync.

Rows, for durability normal and full, each in a fresh temp dir:
  raw-equivalent  stdlib sqlite3 running the store's own statements (taskorch.queries) in the same
                  BEGIN IMMEDIATE transactions, on the schema from migrations/: the reference (1.00x)
  raw-minimal     the peer benchmark's limit a1 (shared/notes/sqlite-queue-costs.md): a tiny table,
                  one autocommit UPDATE..RETURNING claim, one fenced UPDATE complete
  taskorch        taskorch.open_service, one worker (inline writes, the default)
  taskorch aio    the same with store.inline_writes = false: every transaction on aiosqlite's thread
  taskorch x16    16 coroutines (asyncio.gather) creating, then draining the same work_paths; each
                  yields once (asyncio.sleep(0)) between claim and complete, as a worker doing
                  anything would: inline writes never suspend, so without it one coroutine drains all

Every case checks exactly-once: each created id completed once, no lost completion, no empty claim
while its work_path still had tasks, and the database shows every task completed with attempts=1
(and version=3 on taskorch's schema). Rounds are interleaved (even rounds run backwards); the table
shows medians, and each ratio is the median of per-round ratios. Compare ratios, not absolute rates:
this 2-vCPU box is shared and drifts 20-50%.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import taskorch
from taskorch import queries as q
from taskorch.config import load_config
from taskorch.db import _split_statements
from taskorch.resources import migrations_dir
from taskorch.store import new_task_id, system_clock

WORK_PATHS = [f"/srv/bench/project-{i}" for i in range(4)]
PRIORITIES = ("low", "medium", "high", "urgent")
RANK = {p: i for i, p in enumerate(PRIORITIES)}
OUTPUT = "done: 3 files changed, 12 tests pass, lint clean (1234 ms)"
WORKERS = 16
COL = {name.strip(): i for i, name in enumerate(q.TASK_COLUMNS.split(","))}
RAW_EQ, RAW_MIN, TO, TO_AIO, TO_16 = "raw-equivalent", "raw-minimal", "taskorch", "taskorch aio", "taskorch x16"
KINDS = (RAW_EQ, RAW_MIN, TO, TO_AIO, TO_16)
LABEL = {
    RAW_EQ: "raw-equivalent: sqlite3, store's SQL",
    RAW_MIN: "raw-minimal: sqlite3, limit a1",
    TO: "taskorch sequential (inline)",
    TO_AIO: "taskorch sequential, aiosqlite only",
    TO_16: f"taskorch {WORKERS} coroutines",
}
# The service's result JSON for complete_task(status="success", output=OUTPUT).
RESULT_JSON = json.dumps(
    {"status": "success", "output": OUTPUT, "details": None, "artifacts": [], "duration_ms": None},
    separators=(",", ":"),
)


def workload(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """(work_path, priority, prompt) for n tasks; the prompts are ~200 bytes."""
    rng = random.Random(seed)
    words = "refactor fix test lint build docs migrate bump split merge".split()
    items = []
    for i in range(n):
        title = f"{' '.join(rng.choices(words, k=4))} #{i}"
        body = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz     ", k=200 - len(title) - 2))
        items.append((rng.choice(WORK_PATHS), rng.choice(PRIORITIES), f"{title}\n\n{body}"))
    return items


@dataclass
class Ledger:
    """Who created, claimed and completed what: the exactly-once check of one case."""

    items: list[tuple[str, str, str]]
    remaining: Counter = field(default_factory=Counter)  # unclaimed tasks per work_path
    created: list = field(default_factory=list)
    done: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.remaining.update(wp for wp, _, _ in self.items)

    def empty(self, wp: str) -> None:
        if self.remaining[wp]:
            self.problems.append(f"no claim on {wp} while {self.remaining[wp]} tasks were unclaimed")

    def check(self) -> None:
        if len(set(self.created)) != len(self.items):
            self.problems.append(f"{len(self.created)} creates gave {len(set(self.created))} distinct ids")
        unknown = set(self.done) - set(self.created)
        missing = set(self.created) - set(self.done)
        twice = sum(1 for c in self.done.values() if c > 1)
        for count, what in ((len(unknown), "unknown ids completed"), (len(missing), "tasks never completed"),
                            (twice, "tasks completed twice")):  # fmt: skip
            if count:
                self.problems.append(f"{count} {what}")


def check_db(db: str, n: int, version: int, done_status: str) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        total, ok = conn.execute(
            "SELECT count(*), coalesce(sum(status = ? AND attempts = 1 AND version = ?), 0) FROM tasks",
            (done_status, version),
        ).fetchone()
        events = conn.execute("SELECT count(*) FROM task_events").fetchone()[0] if version == 3 else 3 * n
    finally:
        conn.close()
    bad = [] if total == n else [f"database has {total} tasks, expected {n}"]
    bad += [f"{total - ok} tasks not {done_status} with attempts=1, version={version}"] if ok != total else []
    return bad + ([f"{events} events, expected 3 per task"] if events != 3 * n else [])


def connect(db: str, durability: str) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None, timeout=5.0)  # autocommit; busy_timeout 5 s like the store
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {durability.upper()}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class RawEquivalent:
    """The statements and transactions of store.py's _insert_task, _claim and _complete, nothing else."""

    def __init__(self, db: str, durability: str) -> None:
        self.conn = c = connect(db, durability)
        for path in sorted(migrations_dir("sqlite").glob("[0-9]*.sql")):
            c.execute("BEGIN IMMEDIATE")
            for statement in _split_statements(path.read_text(encoding="utf-8")):
                c.execute(statement)
            c.execute("COMMIT")

    def create(self, wp: str, priority: str, prompt: str) -> str:
        c, now = self.conn, system_clock()
        params = {
            "id": new_task_id(now), "work_path": wp, "title": prompt.splitlines()[0][:120], "prompt": prompt,
            "priority": RANK[priority], "tags": "[]", "metadata": "{}", "depends_on": "[]", "max_attempts": 3,
            "run_after": now, "timeout_seconds": 3600, "idempotency_key": None, "now": now,
        }  # fmt: skip
        c.execute("BEGIN IMMEDIATE")
        row = c.execute(q.INSERT_TASK, params).fetchone()
        c.execute(q.INSERT_EVENT, (row[0], "created", None, row[COL["status"]], None, row[COL["version"]], now, None))
        c.execute("COMMIT")
        return row[0]

    def claim(self, wp: str, worker: str) -> tuple[str, int] | None:
        c, now = self.conn, system_clock()
        c.execute("BEGIN IMMEDIATE")
        if c.execute(q.RECORD_EXPIRED_LEASES, {"now": now, "detail": None}).rowcount:
            c.execute(q.RECOVER_EXPIRED_LEASES, {"now": now, "error": "{}"})
        params = {"work_path": wp, "worker_id": worker, "now": now, "lease_until": now + 300_000_000,
                  "tag_set": None, "max_working": 0}  # fmt: skip
        row = c.execute(q.CLAIM_NEXT, params).fetchone()
        if row is not None:
            version = row[COL["version"]]
            c.execute(q.INSERT_EVENT, (row[0], "claimed", "waiting", "working", worker, version, now, None))
        c.execute("COMMIT")
        return None if row is None else (row[0], version)

    def complete(self, ticket: tuple[str, int], worker: str) -> bool:
        c, now = self.conn, system_clock()
        params = {"id": ticket[0], "worker_id": worker, "token": ticket[1], "now": now, "success": True,
                  "retryable": True, "backoff_base": 5_000_000, "backoff_max": 600_000_000,
                  "result": RESULT_JSON, "error": None}  # fmt: skip
        c.execute("BEGIN IMMEDIATE")
        row = c.execute(q.COMPLETE_TASK, params).fetchone()
        if row is not None:
            c.execute(q.INSERT_EVENT, (row[0], "completed", "working", "completed", worker, row[COL["version"]],
                                       now, None))  # fmt: skip
        c.execute("COMMIT")
        return row is not None


class RawMinimal:
    """The limit design a1 of the peer benchmark: one autocommit statement per operation."""

    SCHEMA = """
    CREATE TABLE tasks (id INTEGER PRIMARY KEY, work_path TEXT NOT NULL, priority INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'waiting', payload TEXT NOT NULL, result TEXT, worker_id TEXT,
        lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE INDEX tasks_waiting ON tasks (work_path, priority DESC, id) WHERE status = 'waiting';
    """
    CREATE = "INSERT INTO tasks (work_path, priority, payload, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
    CLAIM = """UPDATE tasks SET status = 'working', worker_id = ?, lease_until = ?, attempts = attempts + 1,
        version = version + 1, updated_at = ?
    WHERE id = (SELECT id FROM tasks WHERE work_path = ? AND status = 'waiting' ORDER BY priority DESC, id LIMIT 1)
    RETURNING id, version, payload"""
    COMPLETE = """UPDATE tasks SET status = 'done', result = ?, lease_until = NULL, version = version + 1,
        updated_at = ? WHERE id = ? AND version = ? AND worker_id = ? AND status = 'working'"""

    def __init__(self, db: str, durability: str) -> None:
        self.conn = connect(db, durability)
        self.conn.executescript(self.SCHEMA)

    def create(self, wp: str, priority: str, prompt: str) -> int:
        now = time.time()
        return self.conn.execute(self.CREATE, (wp, RANK[priority], prompt, now, now)).lastrowid

    def claim(self, wp: str, worker: str) -> tuple[int, int] | None:
        now = time.time()
        rows = self.conn.execute(self.CLAIM, (worker, now + 300.0, now, wp)).fetchall()
        return (rows[0][0], rows[0][1]) if rows else None

    def complete(self, ticket: tuple[int, int], worker: str) -> bool:
        return self.conn.execute(self.COMPLETE, (OUTPUT, time.time(), ticket[0], ticket[1], worker)).rowcount == 1


@dataclass
class Result:
    create_s: float
    drain_s: float
    cpu_s: float  # process CPU time (all threads) of the drain
    problems: list[str]
    per_worker: tuple[int, int] | None = None  # (min, max) cycles per coroutine


def run_raw(kind: str, db: str, durability: str, items: list) -> Result:
    store = (RawEquivalent if kind == RAW_EQ else RawMinimal)(db, durability)
    led = Ledger(items)
    t0 = time.perf_counter()
    led.created = [store.create(wp, prio, prompt) for wp, prio, prompt in items]
    t1, c1 = time.perf_counter(), time.process_time()
    for wp in WORK_PATHS:
        while (ticket := store.claim(wp, "w1")) is not None:
            led.remaining[wp] -= 1
            if not store.complete(ticket, "w1"):
                led.problems.append(f"complete of {ticket[0]} changed no row")
            led.done[ticket[0]] += 1
        led.empty(wp)
    t2, c2 = time.perf_counter(), time.process_time()
    store.conn.close()
    led.check()
    version, status = (3, "completed") if kind == RAW_EQ else (2, "done")
    problems = led.problems + check_db(db, len(items), version, status)
    return Result(t1 - t0, t2 - t1, c2 - c1, problems)


async def drain(svc: taskorch.TaskService, led: Ledger, worker: str, start: int, work: bool) -> int:
    """Claim and complete until every work_path (visited from `start` on) is empty; return the cycles."""
    cycles = 0
    for j in range(len(WORK_PATHS)):
        wp = WORK_PATHS[(start + j) % len(WORK_PATHS)]
        while (claim := await svc.next_task(work_path=wp, worker_id=worker)) is not None:
            led.remaining[wp] -= 1
            if work:  # the worker's turn: let the other coroutines claim meanwhile
                await asyncio.sleep(0)
            try:
                await svc.complete_task(task_id=claim.task.id, worker_id=worker, lease_token=claim.lease.token,
                                        status="success", output=OUTPUT)  # fmt: skip
            except taskorch.TaskorchError as e:
                if e.code != "LEASE_LOST":
                    raise
                led.problems.append(f"LEASE_LOST completing {claim.task.id} by {worker}")
                continue
            led.done[claim.task.id] += 1
            cycles += 1
        led.empty(wp)
    return cycles


async def run_taskorch_async(kind: str, db: str, durability: str, items: list) -> Result:
    cfg = load_config(environ={}, overrides={"store": {"inline_writes": kind != TO_AIO}})
    led = Ledger(items)
    workers = WORKERS if kind == TO_16 else 1
    async with taskorch.open_service(db, config=cfg, durability=durability, sweep=False) as svc:

        async def create(k: int) -> list[str]:
            mine = items[k::workers]
            return [(await svc.create_task(work_path=wp, prompt=p, priority=pr)).id for wp, pr, p in mine]

        t0 = time.perf_counter()
        created = await asyncio.gather(*(create(k) for k in range(workers)))
        t1, c1 = time.perf_counter(), time.process_time()
        cycles = await asyncio.gather(*(drain(svc, led, f"w{k:02d}", k, workers > 1) for k in range(workers)))
        t2, c2 = time.perf_counter(), time.process_time()
    led.created = [tid for ids in created for tid in ids]
    led.check()
    spread = (min(cycles), max(cycles)) if workers > 1 else None
    return Result(t1 - t0, t2 - t1, c2 - c1, led.problems + check_db(db, len(items), 3, "completed"), spread)


def run_case(kind: str, durability: str, items: list) -> Result:
    tmp = tempfile.mkdtemp(prefix="taskorch-bench-", dir="/tmp")
    db = os.path.join(tmp, "bench.db")
    gc.collect()
    try:
        if kind in (RAW_EQ, RAW_MIN):
            return run_raw(kind, db, durability, items)
        return asyncio.run(run_taskorch_async(kind, db, durability, items))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_load(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"machine load at {when}: {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min), {os.cpu_count()} CPUs"


def profile_taskorch(n: int) -> None:
    """cProfile of one sequential taskorch case (NORMAL): where a cycle's time goes."""
    items, prof = workload(n), cProfile.Profile()
    prof.enable()
    res = run_case(TO, "normal", items)
    prof.disable()
    print(f"\nprofile: taskorch sequential, normal, N={n}: {n / res.create_s:,.0f} create/s, "
          f"{n / res.drain_s:,.0f} cycles/s under cProfile; top 25 by own time\n")  # fmt: skip
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(25)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="tasks per case at durability normal (full: n/4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="n=400, 1 round: a smoke run")
    ap.add_argument("--json", metavar="PATH", help="write every per-round figure here")
    ap.add_argument("--profile", action="store_true", help="then profile the sequential taskorch case")
    ap.add_argument("--db", metavar="URL", help="PostgreSQL server: run the PostgreSQL comparison there instead")
    ap.add_argument("--pg", action="store_true", help="the PostgreSQL comparison on a throwaway local cluster")
    ap.add_argument("--pool-max", type=int, default=8, help="PostgreSQL: connections per pool (store.postgres)")
    args = ap.parse_args()
    n, rounds = (400, 1) if args.quick else (args.n, args.rounds)
    if args.db or args.pg:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import store_bench_pg

        return store_bench_pg.main(args.db, n, rounds, args.pool_max, args.json)
    sizes = {"normal": n, "full": max(16, n // 4)}
    cases = [(kind, d) for d in ("normal", "full") for kind in KINDS]
    started = time.perf_counter()
    print(f"taskorch {taskorch.__version__} store benchmark: Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}, N={sizes['normal']} (normal) / {sizes['full']} (full), "
          f"{rounds} round(s)")  # fmt: skip
    print(fmt_load("start"), flush=True)
    if os.getloadavg()[0] > 0.5:
        print("note: the machine is busy; absolute rates will be low and noisy, ratios less so", flush=True)

    for kind, d in cases:  # warm-up: imports, caches, page cache; not measured
        run_case(kind, d, workload(50))
    runs: dict[tuple[str, str], list[Result]] = {c: [] for c in cases}
    for r in range(1, rounds + 1):
        for kind, d in cases if r % 2 else reversed(cases):
            runs[kind, d].append(run_case(kind, d, workload(sizes[d])))
        print(f"  round {r}/{rounds} done at {time.perf_counter() - started:.0f} s", flush=True)

    def rate(kind: str, d: str, attr: str) -> list[float]:
        return [sizes[d] / getattr(res, attr) for res in runs[kind, d]]

    def ratio(kind: str, d: str, ref: str, attr: str = "drain_s") -> float:
        return median([a / b for a, b in zip(rate(kind, d, attr), rate(ref, d, attr), strict=True)])

    header = ("case", "durability", "N", "create/s", "x raw-eq", "cycles/s", "x raw-eq", "x raw-min", "cpu us/cyc",
              "exactly-once")  # fmt: skip
    widths = (36, 10, 5, 9, 8, 9, 8, 9, 10, 12)
    table, report = [], {"n": sizes, "rounds": rounds, "cases": []}
    for kind, d in cases:
        res, failed = runs[kind, d], [p for x in runs[kind, d] for p in x.problems]
        cpu_us = median([x.cpu_s / sizes[d] * 1e6 for x in res])
        row = (LABEL[kind], d, sizes[d], f"{median(rate(kind, d, 'create_s')):,.0f}",
               f"{ratio(kind, d, RAW_EQ, 'create_s'):.2f}", f"{median(rate(kind, d, 'drain_s')):,.0f}",
               f"{ratio(kind, d, RAW_EQ):.2f}", f"{ratio(kind, d, RAW_MIN):.2f}", f"{cpu_us:,.0f}",
               "ok" if not failed else "FAIL")  # fmt: skip
        table.append(row)
        spreads = [x.per_worker for x in res if x.per_worker]
        report["cases"].append({
            "case": kind, "durability": d, "n": sizes[d], "create_s": [x.create_s for x in res],
            "drain_s": [x.drain_s for x in res], "cpu_s": [x.cpu_s for x in res],
            "cycles_ratio_raw_equivalent": ratio(kind, d, RAW_EQ), "cycles_ratio_raw_minimal": ratio(kind, d, RAW_MIN),
            "create_ratio_raw_equivalent": ratio(kind, d, RAW_EQ, "create_s"), "per_worker_min_max": spreads,
            "problems": failed,
        })  # fmt: skip
    print()
    for row in (header, *table):  # text columns left, numbers right
        cells = zip(row, widths, strict=True)
        print("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(cells)))
    print("\nratios: median over rounds of (row / reference row of the same round and durability); "
          "cpu us/cyc: process CPU time (all threads) per claim+complete")  # fmt: skip
    for c in report["cases"]:
        if c["per_worker_min_max"]:
            print(f"{LABEL[c['case']]}, {c['durability']}: cycles per coroutine (min, max) by round: "
                  + ", ".join(f"{lo}-{hi}" for lo, hi in c["per_worker_min_max"]))  # fmt: skip
        for p in sorted(set(c["problems"])):
            print(f"EXACTLY-ONCE FAILURE in {LABEL[c['case']]}, {c['durability']}: {p}")

    print("\ngoals (cycles/s as a ratio to raw-equivalent sequential, same durability):")
    report["goals"] = []
    for d in ("normal", "full"):
        for kind, goal, what in ((TO, 0.5, "sequential"), (TO_16, 1.0, f"{WORKERS} coroutines")):
            value = ratio(kind, d, RAW_EQ)
            verdict = "PASS" if value >= goal else "BELOW"
            report["goals"].append({"durability": d, "case": kind, "ratio": value, "goal": goal, "verdict": verdict})
            print(f"  {d:<7} taskorch {what:<14} {value:5.2f}x   goal >= {goal:.1f}   {verdict}")
    elapsed = time.perf_counter() - started
    report.update(load_end=os.getloadavg(), elapsed_s=elapsed)
    print(f"\n{fmt_load('end')}; took {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.profile:
        profile_taskorch(n)
    return 1 if any(c["problems"] for c in report["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
