"""taskorch over HTTP against the bare Starlette + uvicorn stack and a bare MCPServer, in one run.

    python benchmarks/http_bench.py [--quick] [--rounds 3] [--tasks 3000] [--mcp-iterations 200]
                                    [--durability full|normal] [--json out.json]

Three servers run as subprocesses on 127.0.0.1, each a uvicorn process:
  floor     a bare Starlette app whose one route, GET /empty, answers `{}` (the framework's floor)
  taskorch  `python -m taskorch.cli serve --transport http` on a temp database, with an API key
            configured (so authentication runs) and a rate limit too high to trigger (so the
            limiter runs); every middleware of the real server is on, the access log included
  bare-mcp  a bare MCPServer with one tool, `echo`, on Streamable HTTP answering in JSON, as taskorch
            does (`mcp.streamable_http_app(json_response=True)`)

REST (16 concurrent workers, each an httpx2.AsyncClient with keep-alive, in this process):
  taskorch  each worker loops POST /api/v1/tasks/next -> POST /api/v1/tasks/{id}/complete over one
            shared work_path until the round's --tasks tasks (created beforehand, in batches) are
            drained; every task must be completed exactly once
  floor     the same workers send as many GET /empty requests (2 x --tasks)
  Reported: requests/s, claim+complete cycles/s, per-request p50/p99 (client side). Goals: taskorch
  requests/s >= 0.5x the floor's, and p99 < 100 ms.
MCP (Streamable HTTP, the SDK's client, one session each, sequential calls):
  taskorch next_task/complete_task calls against bare-mcp echo calls, in alternating blocks of 25.
  Goal: tool-call p50 <= 1.3x the bare server's.
Rounds interleave the servers and flip their order; ratios are medians of per-round ratios.
Compare ratios, not absolute figures: this shared 2-vCPU box drifts, and client and servers
share it (the client is a Python process too, so the floor is partly the client's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

WORKERS = 16
REST_GOAL, P99_GOAL_MS, MCP_GOAL = 0.5, 100.0, 1.3
BLOCK = 25
WORK_PATH = "/srv/bench/http"
ROUND_TIMEOUT_S = 60.0

FLOOR_APP = """\
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def empty(request):
    return JSONResponse({})

app = Starlette(routes=[Route("/empty", empty)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""
BARE_MCP = """\
import sys
import uvicorn
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("bare")

@mcp.tool(description="Return the input.")
async def echo(value: str) -> str:
    return value

app = mcp.streamable_http_app(json_response=True)  # answers as taskorch does: one JSON body per call
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
ECHO_ARGS = {"value": "x" * 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered) + 0.5) - 1))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; 0.0 where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"


@dataclass
class RestRound:
    requests: int
    seconds: float
    latencies_s: list[float] = field(repr=False)
    server_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class Results:
    rounds: int
    tasks: int
    durability: str
    floor_rps: list[float] = field(default_factory=list)
    taskorch_rps: list[float] = field(default_factory=list)
    floor_cpu_us: list[float] = field(default_factory=list)  # server CPU per request
    taskorch_cpu_us: list[float] = field(default_factory=list)
    taskorch_cycles: list[float] = field(default_factory=list)
    rest_ratios: list[float] = field(default_factory=list)
    floor_latency_s: list[float] = field(default_factory=list, repr=False)
    taskorch_latency_s: list[float] = field(default_factory=list, repr=False)
    mcp_taskorch_s: list[float] = field(default_factory=list, repr=False)
    mcp_bare_s: list[float] = field(default_factory=list, repr=False)
    mcp_ratios: list[float] = field(default_factory=list)


@contextlib.contextmanager
def subprocess_server(argv: list[str], port: int, env: dict[str, str], log: Path) -> Any:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(url: str, proc: subprocess.Popen[bytes], headers: dict[str, str] | None = None) -> None:
    async with httpx2.AsyncClient(headers=headers) as client:
        with anyio.fail_after(30):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode} during start-up")
                with contextlib.suppress(httpx2.TransportError):
                    await client.get(url)
                    return
                await anyio.sleep(0.05)


async def run_workers(
    base: str,
    headers: dict[str, str],
    warm: str,
    pid: int,
    work: Callable[[httpx2.AsyncClient, list[float]], Awaitable[int]],
) -> RestRound:
    """WORKERS coroutines, each with its own keep-alive client, until each `work` returns."""
    latencies: list[float] = []
    counts: list[int] = []
    clients = [httpx2.AsyncClient(base_url=base, headers=headers, timeout=30) for _ in range(WORKERS)]
    try:
        for c in clients:  # open the connections before the clock starts
            await c.get(warm)

        async def one(c: httpx2.AsyncClient) -> None:
            counts.append(await work(c, latencies))

        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        with anyio.fail_after(ROUND_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for c in clients:
                    tg.start_soon(one, c)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    finally:
        for c in clients:
            await c.aclose()
    return RestRound(sum(counts), seconds, latencies, cpu)


async def floor_round(base: str, pid: int, total_requests: int) -> RestRound:
    per_worker = total_requests // WORKERS

    async def work(c: httpx2.AsyncClient, latencies: list[float]) -> int:
        for _ in range(per_worker):
            t0 = time.perf_counter()
            r = await c.get("/empty")
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"GET /empty: {r.status_code}")
        return per_worker

    return await run_workers(base, {}, "/empty", pid, work)


async def create_tasks(client: httpx2.AsyncClient, work_path: str, n: int) -> set[str]:
    ids: set[str] = set()
    for start in range(0, n, 500):
        batch = [{"work_path": work_path, "prompt": f"task {i}: change a file and run the tests"}
                 for i in range(start, min(n, start + 500))]  # fmt: skip
        r = await client.post("/api/v1/tasks/batch", json={"tasks": batch})
        if r.status_code != 201:
            raise RuntimeError(f"batch create: {r.status_code} {r.text[:200]}")
        ids |= {t["id"] for t in r.json()["data"]["tasks"]}
    return ids


async def taskorch_round(base: str, pid: int, headers: dict[str, str], work_path: str, n: int) -> tuple[RestRound, int]:
    async with httpx2.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        created = await create_tasks(client, work_path, n)
    completed: list[str] = []

    async def work(c: httpx2.AsyncClient, latencies: list[float]) -> int:
        worker, requests = f"worker-{id(c)}", 0
        while True:
            t0 = time.perf_counter()
            r = await c.post("/api/v1/tasks/next", json={"work_path": work_path, "worker_id": worker})
            latencies.append(time.perf_counter() - t0)
            requests += 1
            if r.status_code != 200:
                raise RuntimeError(f"next: {r.status_code} {r.text[:200]}")
            claim = r.json()["data"]
            if claim is None:
                return requests
            task_id = claim["task"]["id"]
            body = {"worker_id": worker, "lease_token": claim["lease"]["token"], "status": "success"}
            t0 = time.perf_counter()
            r = await c.post(f"/api/v1/tasks/{task_id}/complete", json=body)
            latencies.append(time.perf_counter() - t0)
            requests += 1
            if r.status_code != 200:
                raise RuntimeError(f"complete: {r.status_code} {r.text[:200]}")
            completed.append(task_id)

    result = await run_workers(base, headers, "/health", pid, work)
    if len(completed) != len(set(completed)) or set(completed) != created:
        raise RuntimeError(f"not exactly once: {len(created)} created, {len(completed)} completions")
    result.requests -= WORKERS  # each worker's last, empty claim is not part of a cycle
    return result, len(completed)


@contextlib.asynccontextmanager
async def mcp_session(url: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def mcp_round(taskorch_url: str, bare_url: str, headers: dict[str, str], r: int, iterations: int,
                    results: Results) -> None:  # fmt: skip
    work_path = f"{WORK_PATH}/mcp-{r}"
    async with mcp_session(taskorch_url, headers) as ts, mcp_session(bare_url, {}) as bs:
        batch = [{"work_path": work_path, "prompt": f"task {i}"} for i in range(iterations + 10)]
        made = await ts.call_tool("create_tasks", {"tasks": batch})
        if made.is_error:
            raise RuntimeError(made.content[0].text)

        async def claim_complete(samples: list[float]) -> None:
            t0 = time.perf_counter()
            got = await ts.call_tool("next_task", {"work_path": work_path, "worker_id": "bench"})
            t1 = time.perf_counter()
            task, lease = got.structured_content["task"], got.structured_content["lease"]
            args = {"task_id": task["id"], "worker_id": "bench", "lease_token": lease["token"], "status": "success"}
            done = await ts.call_tool("complete_task", args)
            samples += [t1 - t0, time.perf_counter() - t1]
            if got.is_error or done.is_error:
                raise RuntimeError("claim+complete failed")

        async def two_echoes(samples: list[float]) -> None:
            for _ in range(2):
                t0 = time.perf_counter()
                if (await bs.call_tool("echo", ECHO_ARGS)).is_error:
                    raise RuntimeError("echo failed")
                samples.append(time.perf_counter() - t0)

        for _ in range(5):  # warm-up
            await claim_complete([])
            await two_echoes([])
        mine: list[float] = []
        bare: list[float] = []
        steps = [(claim_complete, mine), (two_echoes, bare)]
        for block, start in enumerate(range(0, iterations - 5, BLOCK)):
            for step, samples in steps if (block + r) % 2 == 0 else steps[::-1]:
                for _ in range(min(BLOCK, iterations - 5 - start)):
                    await step(samples)
    results.mcp_taskorch_s += mine
    results.mcp_bare_s += bare
    results.mcp_ratios.append(statistics.median(mine) / statistics.median(bare))


async def main_async(args: argparse.Namespace) -> Results:
    key = secrets.token_urlsafe(32)
    headers = {"Authorization": f"Bearer {key}"}
    results = Results(rounds=args.rounds, tasks=args.tasks, durability=args.durability)
    with tempfile.TemporaryDirectory(prefix="taskorch-http-bench-") as tmp:
        tmp_path = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKORCH_")}
        taskorch_env = {
            **env,
            "TASKORCH_DB": str(tmp_path / "bench.db"),
            "TASKORCH_API_KEYS": key,
            "TASKORCH_STORE__DURABILITY": args.durability,
            # High enough never to refuse, so the limiter's cost is in the figures.
            "TASKORCH_SERVER__RATE_LIMIT__REQUESTS_PER_MINUTE": "100000000",
            "TASKORCH_SERVER__RATE_LIMIT__BURST": "1000000",
        }
        ports = {name: free_port() for name in ("floor", "taskorch", "bare")}
        py = sys.executable
        with (
            subprocess_server([py, "-c", FLOOR_APP, str(ports["floor"])], ports["floor"], env,
                              tmp_path / "floor.log") as floor,
            subprocess_server([py, "-m", "taskorch.cli", "serve", "--transport", "http", "--port",
                               str(ports["taskorch"])], ports["taskorch"], taskorch_env,
                              tmp_path / "taskorch.log") as served,
            subprocess_server([py, "-c", BARE_MCP, str(ports["bare"])], ports["bare"], env,
                              tmp_path / "bare.log") as bare,
        ):  # fmt: skip
            floor_base, taskorch_base = (f"http://127.0.0.1:{ports[n]}" for n in ("floor", "taskorch"))
            await wait_ready(f"{floor_base}/empty", floor)
            await wait_ready(f"{taskorch_base}/health", served)
            await wait_ready(f"http://127.0.0.1:{ports['bare']}/mcp", bare)
            # Warm-up (unmeasured): imports, the page cache, the first connections.
            warm = max(WORKERS, args.tasks // 10)
            await taskorch_round(taskorch_base, served.pid, headers, f"{WORK_PATH}/warmup", warm)
            await floor_round(floor_base, floor.pid, 2 * warm)
            for r in range(args.rounds):
                order = ["floor", "taskorch"] if r % 2 == 0 else ["taskorch", "floor"]
                for which in order:
                    if which == "floor":
                        f = await floor_round(floor_base, floor.pid, 2 * args.tasks)
                    else:
                        t, cycles = await taskorch_round(
                            taskorch_base, served.pid, headers, f"{WORK_PATH}/round-{r}", args.tasks
                        )
                        results.taskorch_cycles.append(cycles / t.seconds)
                results.floor_rps.append(f.rps)
                results.taskorch_rps.append(t.rps)
                results.rest_ratios.append(t.rps / f.rps)
                results.floor_cpu_us.append(f.server_cpu_s / f.requests * 1e6)
                results.taskorch_cpu_us.append(t.server_cpu_s / t.requests * 1e6)
                results.floor_latency_s += f.latencies_s
                results.taskorch_latency_s += t.latencies_s
                print(f"  round {r + 1}: floor {f.rps:,.0f} req/s, taskorch {t.rps:,.0f} req/s "
                      f"({results.taskorch_cycles[-1]:,.0f} cycles/s), ratio {t.rps / f.rps:.2f}; load {load()}",
                      flush=True)  # fmt: skip
            for r in range(args.rounds if args.mcp_iterations else 0):
                await mcp_round(f"{taskorch_base}/mcp", f"http://127.0.0.1:{ports['bare']}/mcp", headers, r,
                                args.mcp_iterations, results)  # fmt: skip
            log_text = (tmp_path / "taskorch.log").read_text()
            if "Traceback" in log_text:
                raise RuntimeError("the taskorch server logged a traceback:\n" + log_text[-3000:])
    return results


def report(res: Results) -> bool:
    ms = 1e3
    rows = [
        ("empty route (floor)", statistics.median(res.floor_rps), res.floor_latency_s, None),
        ("taskorch claim+complete", statistics.median(res.taskorch_rps), res.taskorch_latency_s,
         statistics.median(res.taskorch_cycles)),
    ]  # fmt: skip
    cpu = {"empty route (floor)": statistics.median(res.floor_cpu_us),
           "taskorch claim+complete": statistics.median(res.taskorch_cpu_us)}  # fmt: skip
    print(f"\n{'REST, 16 workers':<26}{'req/s':>9}{'cycles/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'server CPU us/req':>19}")
    for name, rps, lat, cycles in rows:
        cyc = f"{cycles:,.0f}" if cycles else "-"
        p50, p99 = percentile(lat, 0.5) * ms, percentile(lat, 0.99) * ms
        print(f"{name:<26}{rps:>9,.0f}{cyc:>10}{p50:>9.2f}{p99:>9.2f}{cpu[name]:>19,.0f}")
    rest_ratio = statistics.median(res.rest_ratios)
    p99 = percentile(res.taskorch_latency_s, 0.99) * ms
    ok = rest_ratio >= REST_GOAL and p99 < P99_GOAL_MS
    cpu_ratio = statistics.median(f / t for f, t in zip(res.floor_cpu_us, res.taskorch_cpu_us, strict=True))
    print(f"ratio taskorch/floor req/s: {rest_ratio:.2f} (goal >= {REST_GOAL}); by server CPU per request: "
          f"{cpu_ratio:.2f}; taskorch p99: {p99:.1f} ms (goal < {P99_GOAL_MS:.0f})")  # fmt: skip
    if res.mcp_ratios:
        t50, b50 = percentile(res.mcp_taskorch_s, 0.5) * ms, percentile(res.mcp_bare_s, 0.5) * ms
        t99, b99 = percentile(res.mcp_taskorch_s, 0.99) * ms, percentile(res.mcp_bare_s, 0.99) * ms
        mcp_ratio = statistics.median(res.mcp_ratios)
        print(f"\n{'MCP Streamable HTTP tool call':<32}{'p50 ms':>9}{'p99 ms':>9}")
        print(f"{'taskorch next/complete':<32}{t50:>9.2f}{t99:>9.2f}")
        print(f"{'bare MCPServer echo':<32}{b50:>9.2f}{b99:>9.2f}")
        print(f"ratio p50: {mcp_ratio:.2f} (goal <= {MCP_GOAL})")
        ok = ok and mcp_ratio <= MCP_GOAL
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short round (< 20 s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=3000, help="tasks drained per REST round")
    p.add_argument("--mcp-iterations", type=int, default=200, help="claim+complete per MCP round (0: skip)")
    p.add_argument("--durability", choices=("full", "normal"), default="full")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.tasks, args.mcp_iterations = 2, 300, 50
    print(f"taskorch HTTP bench: {WORKERS} workers, {args.rounds} round(s) of {args.tasks} tasks, durability "
          f"{args.durability}; python {platform.python_version()}, {os.cpu_count()} CPUs, load {load()}")  # fmt: skip
    t0 = time.perf_counter()
    res = anyio.run(main_async, args)
    ok = report(res)
    print(f"\n{time.perf_counter() - t0:.1f} s, load {load()}; goals {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(res), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
