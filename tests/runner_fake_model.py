"""A scripted fake OpenAI-compatible model for the runner tests: no network, no API key.

An HTTP server on 127.0.0.1 (stdlib, in a daemon thread) answers POST /v1/chat/completions from a
script chosen by the request's model name, so litellm's real client code (openai SDK, httpx) is
exercised end to end. Every request body is recorded: the red-team tests search them for canaries.

    fake = FakeModel().start()
    fake.script("fake-model", [plan(), call("write_file", path="a.txt", content="hi"), finish()])
    ... model="openai/fake-model", api_base=fake.url, api_key="sk-fake"

A script item is a reply dict (see `reply`) or a callable taking the request body and returning one.
When a script runs out the server answers 400, which the runner does not retry.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = dict[str, Any]
ScriptItem = Reply | Callable[[dict[str, Any]], Reply]


def reply(
    content: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    *,
    usage: tuple[int, int] = (100, 20),
    sleep: float = 0.0,
    status: int | None = None,
    error: str | None = None,
) -> Reply:
    """One scripted answer. status/error make it an HTTP error; sleep delays it (for timeouts)."""
    return {"content": content, "tool_calls": tool_calls or [], "usage": usage, "sleep": sleep,
            "status": status, "error": error}  # fmt: skip


def call(name: str, /, **arguments: Any) -> Reply:
    """A reply holding one tool call."""
    return reply(None, [{"name": name, "arguments": arguments}])


def calls(*pairs: tuple[str, dict[str, Any]]) -> Reply:
    """A reply holding several tool calls, run in order."""
    return reply(None, [{"name": n, "arguments": a} for n, a in pairs])


def text(content: str) -> Reply:
    return reply(content)


def plan(**overrides: Any) -> Reply:
    """A valid submit_plan call."""
    args = {"understanding": "the task", "approach": "do it with the tools", "complexity": "simple",
            "estimated_steps": 3, "requirements": []} | overrides  # fmt: skip
    return call("submit_plan", **args)


def finish(success: bool = True, summary: str = "done", **extra: Any) -> Reply:
    return call("finish", success=success, summary=summary, **extra)


def error(status: int, message: str = "scripted error") -> Reply:
    return reply(status=status, error=message)


class FakeModel:
    """The server. Use as a context manager or call start()/close()."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.gets: list[str] = []  # paths of GET requests (nothing in the runner sends one)
        self._scripts: dict[str, list[ScriptItem]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()  # wakes scripted sleeps at close()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, model: str, items: list[ScriptItem]) -> None:
        """Set (replace) the replies for requests naming `model` (without the 'openai/' prefix)."""
        with self._lock:
            self._scripts[model] = list(items)

    def remaining(self, model: str) -> int:
        with self._lock:
            return len(self._scripts.get(model, []))

    def requests_for(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r.get("model") == model]

    def received_text(self, model: str | None = None) -> str:
        """Everything the requests carried (all, or one model's), as one string: canaries are searched here."""
        with self._lock:
            return "\n".join(json.dumps(r) for r in self.requests if model is None or r.get("model") == model)

    def tool_results(self, model: str) -> list[str]:
        """The content of every tool message in the last request for `model`."""
        reqs = self.requests_for(model)
        return [m.get("content") or "" for m in (reqs[-1]["messages"] if reqs else []) if m.get("role") == "tool"]

    def _next(self, body: dict[str, Any]) -> Reply | None:
        with self._lock:
            self.requests.append(body)
            queue = self._scripts.get(str(body.get("model")))
            if not queue:
                return None
            item = queue.pop(0)
        return item(body) if callable(item) else item

    def start(self) -> FakeModel:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with fake._lock:
                    fake.gets.append(self.path)
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                r = fake._next(body)
                if r is None:
                    self._send(400, {"error": {"message": "fake model: script exhausted", "type": "invalid_request"}})
                    return
                if r.get("sleep"):
                    fake._release.wait(r["sleep"])
                if r.get("status"):
                    self._send(r["status"], {"error": {"message": r.get("error") or "error", "type": "server_error"}})
                    return
                msg: dict[str, Any] = {"role": "assistant", "content": r.get("content")}
                if r.get("tool_calls"):
                    msg["tool_calls"] = [
                        {"id": f"call_{uuid.uuid4().hex[:10]}", "type": "function",
                         "function": {"name": tc["name"], "arguments": tc["arguments"]
                                      if isinstance(tc["arguments"], str) else json.dumps(tc["arguments"])}}
                        for tc in r["tool_calls"]
                    ]  # fmt: skip
                prompt_tokens, completion_tokens = r.get("usage") or (100, 20)
                self._send(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model"),
                    "choices": [{"index": 0, "message": msg,
                                 "finish_reason": "tool_calls" if msg.get("tool_calls") else "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                })  # fmt: skip

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (a timeout test) closed the socket: nothing to report

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-model", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- helpers for the runner tests -------------------------------------------------------------------


def make_llm(fake: FakeModel, name: str, **overrides: Any) -> Any:
    """A runner LlmClient for model `name` on the fake (imports litellm: call it inside a test)."""
    from taskorch.runner.llm import LlmClient, LlmSettings

    settings = {"model": f"openai/{name}", "api_base": fake.url, "api_key": "sk-fake", "timeout_seconds": 10.0,
                "retry_base_seconds": 0.01} | overrides  # fmt: skip
    return LlmClient(LlmSettings(**settings))


async def run_task(tmp_path: Any, work_path: Any, llm: Any, *, prompt: str = "Do the task",
                   metadata: dict[str, Any] | None = None, **settings: Any) -> tuple[Any, Any]:  # fmt: skip
    """File a task in a fresh SQLite queue under tmp_path, let a Worker claim and run it once, and
    return (the stored task, the run's outcome). `settings` are RunnerSettings (sandbox "none" by default)."""
    import taskorch
    from taskorch.config import load_config
    from taskorch.runner.session import RunnerSettings
    from taskorch.runner.worker import Worker, WorkerOptions

    async with taskorch.open_service(tmp_path / "queue.db", config=load_config(environ={})) as svc:
        created = await svc.create_task(work_path=str(work_path), prompt=prompt, metadata=metadata)
        worker = Worker(svc, RunnerSettings(**({"sandbox": "none"} | settings)), llm,
                        WorkerOptions(work_path=str(work_path), worker_id="worker-1", once=True))  # fmt: skip
        try:
            await worker.run()
        finally:
            await llm.aclose()
        stored = (await svc.get_task(task_id=created.id)).task
    return stored, worker.outcomes[-1]


def host_path_exists(path: str) -> bool:
    return os.path.exists(path)


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains `marker`."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


# -- pytest fixtures: a test module uses them with `fake_model = runner_fake_model.fake_model` -------

try:
    import pytest
except ImportError:  # pragma: no cover - the module is also usable outside pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def fake_model():
        """One fake server for the session; tests use distinct model names (see `model_name`)."""
        with FakeModel() as fake:
            yield fake

    @pytest.fixture
    def model_name(request) -> str:
        """A model name unique to the test, so scripts and recorded requests never mix."""
        return "fake-" + uuid.uuid5(uuid.NAMESPACE_URL, request.node.nodeid).hex[:12]
