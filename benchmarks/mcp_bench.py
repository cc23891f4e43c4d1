"""The cost of taskorch's MCP surface over stdio, against a bare MCPServer as the SDK's floor.

    python benchmarks/mcp_bench.py [--quick] [--rounds 5] [--latency-rounds 2] [--iterations 300]
                                   [--durability both|full|normal] [--json out.json]

Both servers run as subprocesses spoken to with the official `mcp` client (stdio_client +
ClientSession, the initialize handshake):
  taskorch  `python -c "serve(load_config())"` on a temp database (TASKORCH_DB; every other TASKORCH_*
            variable is removed); by default two of them, at durability full and normal, measured in
            the same rounds: the difference of their latencies is what the durable commits cost
  floor     a bare MCPServer, written to a temp file, whose one tool `echo` returns its input

Measured, in interleaved rounds (the order flips every round; latency runs first and warms up):
  latency   one iteration = next_task + complete_task on a pre-created task (taskorch) against two echo
            calls (floor), timed on the client; blocks of 25 iterations rotate between the servers,
            all connected for the whole round. p50/p99 over every timed iteration.
  start-up  process start -> initialize answered (taskorch at full, the default); the median of the rounds.
  idle RSS  VmRSS of the server process (/proc/<pid>/status) right after initialize; the median.
  tools/list  characters of the tools/list result as JSON, and tokens: exact cl100k_base counts when
            tiktoken is installed, else chars/4.
Start-up and RSS ratios are medians of per-round ratios; latency ratios compare pooled percentiles.
Goals (from shared/notes/mcp-peers.md): latency p50, start-up and idle RSS each <= 1.3x the floor.
Compare ratios, not milliseconds: this shared 2-vCPU box drifts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

import taskorch

GOAL = 1.3
BLOCK = 25
WARMUP = 20
WORK_PATH = "/srv/bench/project"  # + "/round-<r>": each round drains its own queue
SERVE = (
    "from taskorch.mcp_server import serve; from taskorch.config import load_config; "
    "raise SystemExit(serve(load_config()))"
)
BARE_SERVER = """\
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("bare")


@mcp.tool(description="Return the input.")
async def echo(value: str) -> str:
    return value


mcp.run("stdio")
"""
ECHO_ARGS = {"value": "x" * 64}


@dataclass
class Server:
    name: str
    params: StdioServerParameters
    durability: str = "-"
    startup_s: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    round_p50_s: list[float] = field(default_factory=list)
    tools_list_chars: int = 0
    tools_list_tokens: int = 0


def child_pids() -> set[int]:
    """Direct children of this process, from /proc."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # field 4, after the "(comm)" field
            found.add(int(entry))
    return found


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def token_counter() -> tuple[str, Callable[[str], int]]:
    try:
        import tiktoken

        enc = tiktoken.get_encoding("cl100k_base")
    except Exception:  # not installed, or its encoding file cannot be fetched
        return "chars/4", lambda text: round(len(text) / 4)
    return "cl100k_base", lambda text: len(enc.encode(text))


@contextlib.asynccontextmanager
async def connect(server: Server, errlog: Any) -> AsyncIterator[tuple[ClientSession, float, int]]:
    """Start the server; yield (session, seconds from start to initialize answered, pid)."""
    before = child_pids()
    t0 = time.perf_counter()
    async with stdio_client(server.params, errlog) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        elapsed = time.perf_counter() - t0
        (pid,) = child_pids() - before
        yield session, elapsed, pid


async def call(session: ClientSession, name: str, arguments: dict[str, Any]) -> Any:
    result = await session.call_tool(name, arguments)
    if result.is_error:
        raise RuntimeError(f"{name} failed: {result.content[0].text}")
    return result.structured_content


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered) + 0.5) - 1))]


async def measure_startup(servers: list[Server], rounds: int, errlog: Any) -> None:
    for r in range(rounds):
        for server in servers if r % 2 == 0 else servers[::-1]:
            async with connect(server, errlog) as (_, elapsed, pid):
                server.startup_s.append(elapsed)
                server.rss_kib.append(vm_rss_kib(pid))


async def claim_complete(session: ClientSession, work_path: str) -> float:
    """One taskorch iteration: claim the next task and complete it. Seconds, client side."""
    t0 = time.perf_counter()
    got = await session.call_tool("next_task", {"work_path": work_path, "worker_id": "bench"})
    task, lease = got.structured_content["task"], got.structured_content["lease"]
    args = {"task_id": task["id"], "worker_id": "bench", "lease_token": lease["token"], "status": "success"}
    done = await session.call_tool("complete_task", args)
    elapsed = time.perf_counter() - t0
    if got.is_error or done.is_error:
        raise RuntimeError("claim+complete failed")
    return elapsed


async def two_echoes(session: ClientSession, _: str) -> float:
    """One floor iteration: two tool calls, as many as claim+complete."""
    t0 = time.perf_counter()
    a = await session.call_tool("echo", ECHO_ARGS)
    b = await session.call_tool("echo", ECHO_ARGS)
    elapsed = time.perf_counter() - t0
    if a.is_error or b.is_error:
        raise RuntimeError("echo failed")
    return elapsed


async def measure_latency(
    taskorch_srvs: list[Server], floor: Server, rounds: int, iterations: int, errlog: Any
) -> None:
    """Runs first: its start-ups (unmeasured) create the databases and warm the page cache."""
    for r in range(rounds):
        async with contextlib.AsyncExitStack() as stack:
            sessions = {}
            for server in [*taskorch_srvs, floor]:
                sessions[server.name] = (await stack.enter_async_context(connect(server, errlog)))[0]
            if r == 0:
                await measure_tools_list([(s, sessions[s.name]) for s in (taskorch_srvs[0], floor)])
            work_path = f"{WORK_PATH}/round-{r}"
            total = WARMUP + iterations
            for server in taskorch_srvs:
                for start in range(0, total, 500):
                    batch = [
                        {"work_path": work_path, "prompt": f"round {r} task {i}: change a file and run the tests"}
                        for i in range(start, min(total, start + 500))
                    ]
                    await call(sessions[server.name], "create_tasks", {"tasks": batch})
            steps = [(s, sessions[s.name], claim_complete) for s in taskorch_srvs]
            steps.append((floor, sessions[floor.name], two_echoes))
            for _ in range(WARMUP):
                for _, session, step in steps:
                    await step(session, work_path)
            samples: dict[str, list[float]] = {server.name: [] for server, _, _ in steps}
            for block, start in enumerate(range(0, iterations, BLOCK)):
                shift = (block + r) % len(steps)  # every server takes every place in the order in turn
                for server, session, step in steps[shift:] + steps[:shift]:
                    for _ in range(min(BLOCK, iterations - start)):
                        samples[server.name].append(await step(session, work_path))
            for server in taskorch_srvs:
                left = await call(sessions[server.name], "statistics", {"work_path": work_path})
                if left["by_status"]["completed"] != total or left["by_status"]["waiting"] != 0:
                    raise RuntimeError(f"{server.name}: the queue did not drain as expected: {left['by_status']}")
            for server, _, _ in steps:
                server.latency_s += samples[server.name]
                server.round_p50_s.append(statistics.median(samples[server.name]))


async def measure_tools_list(connected: list[tuple[Server, ClientSession]]) -> None:
    _, count = token_counter()
    for server, session in connected:
        listing = await session.list_tools()
        text = json.dumps(listing.model_dump(mode="json", by_alias=True, exclude_none=True))
        server.tools_list_chars = len(text)
        server.tools_list_tokens = count(text)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median of per-round ratios: each round's two runs are neighbours in time, so drift cancels."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def report(ts: list[Server], f: Server, encoding: str, args: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    """ts: the taskorch servers, one per durability measured; the first also gave start-up and RSS."""
    ms, p50, p99 = 1000.0, 0.5, 0.99
    t = ts[0]
    f_p50, f_p99 = percentile(f.latency_s, p50), percentile(f.latency_s, p99)
    rows: list[tuple[str, float, float, float, bool]] = []
    for srv in ts:
        t_p50, t_p99 = percentile(srv.latency_s, p50), percentile(srv.latency_s, p99)
        rows.append((f"claim+complete p50 (ms), {srv.durability}", t_p50 * ms, f_p50 * ms, t_p50 / f_p50, True))
        rows.append((f"claim+complete p99 (ms), {srv.durability}", t_p99 * ms, f_p99 * ms, t_p99 / f_p99, False))
    rows += [
        (
            "start -> initialize (ms)",
            statistics.median(t.startup_s) * ms,
            statistics.median(f.startup_s) * ms,
            paired_ratio(t.startup_s, f.startup_s),
            True,
        ),
        (
            "idle RSS (MiB)",
            statistics.median(t.rss_kib) / 1024,
            statistics.median(f.rss_kib) / 1024,
            paired_ratio([float(x) for x in t.rss_kib], [float(x) for x in f.rss_kib]),
            True,
        ),
        ("tools/list (chars)", t.tools_list_chars, f.tools_list_chars, t.tools_list_chars / f.tools_list_chars, False),
        (
            f"tools/list (tokens, {encoding})",
            t.tools_list_tokens,
            f.tools_list_tokens,
            t.tools_list_tokens / f.tools_list_tokens,
            False,
        ),
    ]
    print(
        f"\ntaskorch {taskorch.__version__}, mcp {mcp_version()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; durability {', '.join(s.durability for s in ts)}; "
        f"{args.rounds} start-up rounds ({t.durability}), {args.latency_rounds} x {args.iterations} latency "
        f"iterations; {elapsed:.1f} s"
    )
    print(f"{'metric':<40}{'taskorch':>10}{'floor':>10}{'ratio':>9}{'goal':>8}  result")
    out: dict[str, Any] = {"rows": []}
    for label, tv, fv, ratio, gated in rows:
        goal = f"<={GOAL}x" if gated else "-"
        verdict = ("ok" if ratio <= GOAL else "MISSED") if gated else ""
        print(f"{label:<40}{tv:>10.2f}{fv:>10.2f}{ratio:>8.2f}x{goal:>8}  {verdict}")
        out["rows"].append({"metric": label, "taskorch": tv, "floor": fv, "ratio": ratio, "goal": goal})
    print("start-up and RSS ratios are medians of per-round ratios; latency ratios are of pooled percentiles")
    for srv in ts:
        per_round = ", ".join(f"{a * ms:.2f}/{b * ms:.2f}" for a, b in zip(srv.round_p50_s, f.round_p50_s, strict=True))
        print(f"per-round latency p50, taskorch {srv.durability}/floor (ms): {per_round}")
    by = {srv.durability: percentile(srv.latency_s, p50) for srv in ts}
    if "full" in by and "normal" in by:
        # The same requests, the same code; only the two commits' fdatasync differ.
        sync = by["full"] - by["normal"]
        out["durable_commit_ms"] = sync * ms
        print(
            f"durable commits: full - normal = {sync * ms:.2f} ms per claim+complete = {sync / f_p50:.2f}x the floor "
            f"(the goal leaves {GOAL - 1:.2f}x for everything taskorch adds)"
        )
    print(
        f"start-up per round (ms): taskorch {[round(x * ms) for x in t.startup_s]}, "
        f"floor {[round(x * ms) for x in f.startup_s]}"
    )
    tools = t.tools_list_tokens
    print(f"tools/list: {tools} tokens for 10 tools ({tools // 10} per tool); budget 4,000")
    return out


def mcp_version() -> str:
    from importlib.metadata import version

    return version("mcp")


async def measure_all(ts: list[Server], f: Server, args: argparse.Namespace, errlog: Any) -> None:
    print("claim+complete latency, tools/list ...", file=sys.stderr, flush=True)
    await measure_latency(ts, f, args.latency_rounds, args.iterations, errlog)
    print("start-up and idle RSS ...", file=sys.stderr, flush=True)
    await measure_startup([ts[0], f], args.rounds, errlog)


def main(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mcp-bench-") as tmp:
        tmpdir = Path(tmp)
        bare = tmpdir / "bare_server.py"
        bare.write_text(BARE_SERVER)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKORCH_")}
        ts = []
        # full first: the packaged default, and the server start-up and RSS are measured on
        for durability in ("full", "normal") if args.durability == "both" else (args.durability,):
            task_env = {
                **env,
                "TASKORCH_DB": str(tmpdir / f"bench-{durability}.db"),
                "TASKORCH_STORE__DURABILITY": durability,
            }
            params = StdioServerParameters(command=sys.executable, args=["-c", SERVE], env=task_env)
            ts.append(Server(f"taskorch-{durability}", params, durability=durability))
        f = Server("floor", StdioServerParameters(command=sys.executable, args=[str(bare)], env=env))
        with open(tmpdir / "servers.log", "w") as errlog:
            try:
                anyio.run(measure_all, ts, f, args, errlog)
            except BaseException:
                errlog.flush()
                sys.stderr.write((tmpdir / "servers.log").read_text()[-4000:])
                raise
        out = report(ts, f, token_counter()[0], args, time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 start-up rounds, 1 x 60 iterations")
    p.add_argument("--rounds", type=int, default=5, help="start-up/RSS rounds (default 5)")
    p.add_argument("--latency-rounds", type=int, default=2, help="latency rounds (default 2)")
    p.add_argument("--iterations", type=int, default=300, help="timed iterations per latency round (default 300)")
    p.add_argument(
        "--durability",
        choices=("both", "full", "normal"),
        default="both",
        help="taskorch store.durability; both (default) measures a server of each in the same rounds",
    )
    p.add_argument("--json", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.latency_rounds, args.iterations = 2, 1, 60
    return args


if __name__ == "__main__":
    main(parse_args())
