"""The MCP server as a real subprocess over stdio: two processes sharing one database, garbage on
stdin, clean shutdown, and no litellm import.

Servers are started as `python -c "...serve(load_config())"` with TASKORCH_DB pointing into the
test's tmp_path and every other TASKORCH_* variable removed from the environment.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
from mcp import ClientSession, MCPDeprecationWarning, StdioServerParameters, stdio_client

SERVE = (
    "from taskorch.mcp_server import serve; from taskorch.config import load_config; "
    "raise SystemExit(serve(load_config()))"
)
PROTOCOL_VERSION = "2025-11-25"


@pytest.fixture
def errlog(tmp_path: Path) -> Iterator[IO[str]]:
    """Where the servers' stderr goes (stdio_client needs a real file)."""
    with open(tmp_path / "servers.log", "w") as f:
        yield f


def server_env(db: Path | str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKORCH_")}
    env["TASKORCH_DB"] = str(db)
    env.update(extra)
    return env


def server_params(db: Path | str, **extra_env: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-c", SERVE], env=server_env(db, **extra_env))


@contextlib.asynccontextmanager
async def open_sessions(
    db: Path | str, count: int, errlog: IO[str], **extra_env: str
) -> AsyncIterator[list[ClientSession]]:
    """`count` server processes on one database, started together and initialized concurrently."""
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for _ in range(count):
            read, write = await stack.enter_async_context(stdio_client(server_params(db, **extra_env), errlog))
            sessions.append(await stack.enter_async_context(ClientSession(read, write)))
        async with anyio.create_task_group() as tg:
            for s in sessions:
                tg.start_soon(s.initialize)
        yield sessions


async def ok(session: ClientSession, name: str, arguments: dict[str, Any]) -> Any:
    result = await session.call_tool(name, arguments)  # the SDK validates structuredContent
    assert not result.is_error, f"{name}: {result.content[0].text}"
    return result.structured_content


@pytest.mark.anyio
async def test_two_processes_drain_one_queue(db: str, errlog: IO[str]) -> None:
    # Two stdio servers on one SQLite file, or on one PostgreSQL database (the `db` fixture).
    n = 40
    with anyio.fail_after(60):
        async with open_sessions(db, 2, errlog) as (a, b):
            assert a.initialize_result is not None and a.initialize_result.instructions
            with pytest.warns(MCPDeprecationWarning):
                await b.set_logging_level("debug")
            created = await ok(
                a, "create_tasks", {"tasks": [{"work_path": "/proj", "prompt": f"job {i}"} for i in range(n)]}
            )
            ids = {t["id"] for t in created["tasks"]}
            assert len(ids) == n

            claims: list[tuple[str, str]] = []

            async def worker(session: ClientSession, name: str) -> None:
                while True:
                    got = await ok(session, "next_task", {"work_path": "/proj", "worker_id": name})
                    if got["task"] is None:
                        return
                    claims.append((got["task"]["id"], name))
                    done = await ok(
                        session,
                        "complete_task",
                        {
                            "task_id": got["task"]["id"],
                            "worker_id": name,
                            "lease_token": got["lease"]["token"],
                            "status": "success",
                            "output": name,
                        },
                    )
                    assert done["status"] == "completed"

            async with anyio.create_task_group() as tg:
                for label, session in (("a", a), ("b", b)):
                    for k in range(3):  # concurrent requests within each session too
                        tg.start_soon(worker, session, f"{label}{k}")

            per_task = collections.Counter(task_id for task_id, _ in claims)
            assert set(per_task) == ids, "every task claimed"
            assert [t for t, c in per_task.items() if c > 1] == [], "no task claimed twice"
            by_process = collections.Counter(worker[0] for _, worker in claims)
            assert sum(by_process.values()) == n and set(by_process) == {"a", "b"}, f"claims per process: {by_process}"

            for session in (a, b):  # both processes see the same truth
                stats = await ok(session, "statistics", {"work_path": "/proj"})
                assert stats["total"] == n and stats["by_status"]["completed"] == n, stats
                assert stats["by_status"]["waiting"] == stats["by_status"]["working"] == 0, stats
            assert (await ok(b, "list_tasks", {"status": "completed", "limit": 1}))["total"] == n

            # A lease that expires in one process is reclaimed by the other; the old token is refused.
            task = await ok(a, "create_task", {"work_path": "/stale", "prompt": "slow job"})
            first = await ok(a, "next_task", {"work_path": "/stale", "worker_id": "slow", "lease_seconds": 1})
            assert first["task"]["id"] == task["id"]
            second = await ok(b, "next_task", {"work_path": "/stale", "worker_id": "fast", "wait_seconds": 15})
            assert second["task"] is not None and second["task"]["id"] == task["id"], "expired lease reclaimed"
            stale = {"task_id": task["id"], "worker_id": "slow", "lease_token": first["lease"]["token"]}
            for name, extra in (("heartbeat_task", {}), ("complete_task", {"status": "success"})):
                result = await a.call_tool(name, {**stale, **extra})
                assert result.is_error and result.content[0].text.startswith("LEASE_LOST: "), result.content[0].text
            fresh = {"task_id": task["id"], "worker_id": "fast", "lease_token": second["lease"]["token"]}
            assert (await ok(b, "complete_task", {**fresh, "status": "success"}))["status"] == "completed"
            stats = await ok(a, "statistics", {"work_path": "/stale"})
            assert stats["by_status"]["completed"] == 1 and stats["leases_recovered"] >= 1, stats


class RawServer:
    """A server subprocess driven by hand-written JSON-RPC lines; every stdout line is kept."""

    def __init__(self, db: Path, errlog: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            env=server_env(db),
        )
        self.lines: list[bytes] = []
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._queue.put(line)
        self._queue.put(None)

    def send(self, data: bytes | dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, request_id: int, method: str, params: Any = None) -> dict[str, Any]:
        """Send a request and return its answer."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self.response(request_id)

    def response(self, request_id: int, timeout: float = 15) -> dict[str, Any]:
        """Read stdout until the answer to request_id arrives."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no answer to request {request_id} within {timeout}s") from None
            if line is None:
                raise AssertionError(f"stdout closed before the answer to request {request_id}")
            self.lines.append(line)
            message = json.loads(line)
            if isinstance(message, dict) and message.get("id") == request_id:
                return message

    def rest(self, timeout: float = 15) -> None:
        """Collect stdout up to EOF."""
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)


def test_garbage_on_stdin_keeps_stdout_pure_json_rpc(tmp_path: Path) -> None:
    with open(tmp_path / "server.log", "wb") as errlog:
        server = RawServer(tmp_path / "garbage.db", errlog)
        try:
            hello = {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"},
            }
            init = server.request(1, "initialize", hello)
            assert init["result"]["serverInfo"]["name"] == "taskorch" and init["result"]["instructions"]
            server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

            rng = random.Random(20261123)
            garbage: list[bytes | dict[str, Any]] = [
                b"this is not json\n",
                b'{"jsonrpc": "2.0", "id": 50, "method": "ping"\n',  # truncated
                b"[1, 2, 3]\n",
                b"42\n",
                b'"a string"\n',
                b"null\n",
                b"{}\n",
                b"\n",
                {"jsonrpc": "2.0", "id": "x", "method": 5},
                {"jsonrpc": "1.0", "id": 51, "method": "ping"},
                {"jsonrpc": "2.0", "id": 52, "method": "tools/call", "params": "not an object"},
                {"jsonrpc": "2.0", "id": 53, "method": "tools/call", "params": {"name": 5}},
                {
                    "jsonrpc": "2.0",
                    "id": 54,
                    "method": "tools/call",
                    "params": {"name": "create_task", "arguments": "x"},
                },
                {"jsonrpc": "2.0", "id": 55, "result": {"unsolicited": True}},
                {"jsonrpc": "2.0", "method": "notifications/unknown", "params": [1]},
                b"\xff\xfe\x00\x01 invalid utf-8 \xc3\x28\n",
                rng.randbytes(16384),
                b"\n",
                b"{" * 10000 + b"\n",  # deep nesting
                rng.randbytes(70000).replace(b"\n", b" ") + b"\n",  # one long line of noise
            ]
            for item in garbage:
                server.send(item)

            # A tools/call with a 1 MiB string argument: a domain error, not a crash.
            mib = "x" * (1 << 20)
            big = server.request(
                60, "tools/call", {"name": "create_task", "arguments": {"work_path": "/r", "prompt": mib}}
            )
            assert big["result"]["isError"] is True
            assert big["result"]["content"][0]["text"].startswith("VALIDATION_ERROR: prompt"), big
            big = server.request(
                61, "tools/call", {"name": "create_task", "arguments": {"work_path": "/" + mib, "prompt": "p"}}
            )
            assert big["result"]["content"][0]["text"].startswith("VALIDATION_ERROR: work_path"), big

            # Protocol errors stay protocol errors.
            assert server.request(62, "no/such/method")["error"]["code"] == -32601
            assert "error" in server.request(63, "tools/call", {"name": "create_task", "arguments": [1, 2]})

            assert server.request(99, "ping") == {"jsonrpc": "2.0", "id": 99, "result": {}}
            arguments = {"work_path": "/r", "prompt": "still here"}
            created = server.request(100, "tools/call", {"name": "create_task", "arguments": arguments})["result"]
            assert created.get("isError") is not True and created["structuredContent"]["status"] == "waiting"

            assert server.proc.poll() is None, "the server must survive garbage"
            assert server.proc.stdin is not None
            server.proc.stdin.close()
            assert server.proc.wait(timeout=10) == 0
            server.rest()
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
            if server.proc.stdin is not None and not server.proc.stdin.closed:
                server.proc.stdin.close()

    assert server.lines
    for line in server.lines:
        message = json.loads(line)  # every stdout line is JSON ...
        assert isinstance(message, dict) and message.get("jsonrpc") == "2.0", line[:200]  # ... and JSON-RPC
        assert "method" in message or ("id" in message and ("result" in message or "error" in message)), line[:200]
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


CHECK_IN_PROCESS = """
import sys, tempfile, anyio
from pathlib import Path
import taskorch
from taskorch.config import load_config
from taskorch.mcp_server import build_mcp
from mcp import Client

async def main():
    async with taskorch.open_service(Path(tempfile.mkdtemp()) / "t.db", config=load_config(environ={}),
                                     sweep=False) as svc:
        async with Client(build_mcp(svc)) as c:
            await c.list_tools()
            t = (await c.call_tool("create_task", {"work_path": "/r", "prompt": "x"})).structured_content
            claim = (await c.call_tool("next_task", {"work_path": "/r", "worker_id": "w"})).structured_content
            await c.call_tool("complete_task", {"task_id": t["id"], "worker_id": "w",
                              "lease_token": claim["lease"]["token"], "status": "failure"})
            await c.call_tool("statistics", {})
            await c.read_resource("taskorch://statistics")

anyio.run(main)
print("litellm" in sys.modules)
"""


@pytest.mark.anyio
async def test_litellm_is_never_imported(tmp_path: Path, errlog: IO[str]) -> None:
    # A stand-in litellm that leaves a mark when imported, so an import is caught even where the
    # real package is not installed (or would be imported behind try/except ImportError).
    fake = tmp_path / "fake"
    (fake / "litellm").mkdir(parents=True)
    marker = tmp_path / "litellm-imported"
    (fake / "litellm" / "__init__.py").write_text(
        "import os, pathlib\npathlib.Path(os.environ['LITELLM_MARKER']).write_text('imported')\n"
    )
    pythonpath = os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH")) if p)
    env = server_env(tmp_path / "t.db", PYTHONPATH=pythonpath, LITELLM_MARKER=str(marker))

    with anyio.fail_after(60):
        child = await anyio.run_process([sys.executable, "-c", CHECK_IN_PROCESS], env=env, check=False)
        assert child.returncode == 0, child.stderr.decode()[-3000:]
        assert child.stdout.decode().strip().splitlines()[-1] == "False"

        extra = {"PYTHONPATH": pythonpath, "LITELLM_MARKER": str(marker)}
        async with open_sessions(tmp_path / "t.db", 1, errlog, **extra) as (s,):
            await s.list_tools()
            task = await ok(s, "create_task", {"work_path": "/r", "prompt": "x"})
            claim = await ok(s, "next_task", {"work_path": "/r", "worker_id": "w"})
            lease = {"task_id": task["id"], "worker_id": "w", "lease_token": claim["lease"]["token"]}
            await ok(s, "complete_task", {**lease, "status": "success"})
            await ok(s, "statistics", {})
    assert not marker.exists(), "the MCP server imported litellm"
