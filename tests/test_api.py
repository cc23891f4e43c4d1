"""The REST API through real HTTP: uvicorn on 127.0.0.1, a real database, no mocks.

The app here is the smallest one that hosts `rest_routes` (taskorch.app adds auth, limits, CORS...):
a Starlette app whose lifespan opens the service, served by uvicorn in a thread with its own event
loop. Every answer is checked against the OpenAPI document: the envelope, and the schema documented
for that operation and status (an undocumented status fails the test).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

import taskorch
from taskorch.api import ENDPOINTS, ERROR_STATUS, envelope_error, openapi_document, rest_routes
from taskorch.config import load_config
from taskorch.errors import ERROR_CODES

DOC = openapi_document()


class LiveServer:
    """`rest_routes` in a minimal app under uvicorn on a free loopback port, in a thread.

    A thread of its own, not a task on the test's loop: a blocking client (schemathesis, sqlite3)
    must not freeze the server, and the server must not share the client's event loop.
    """

    def __init__(
        self,
        db: Path,
        *,
        overrides: dict[str, Any] | None = None,
        routes: Sequence[BaseRoute] = (),
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.db = db
        self.config = load_config(environ={}, overrides={"store": {"durability": "normal"}, **(overrides or {})})
        service: list[taskorch.TaskService] = []

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with taskorch.open_service(db, config=self.config, sweep=False) as svc:
                service.append(svc)
                yield

        async def http_error(request: Any, exc: Exception) -> Any:
            assert isinstance(exc, HTTPException)
            code = {404: "NOT_FOUND", 405: "VALIDATION_ERROR"}.get(exc.status_code, "INTERNAL_ERROR")
            return envelope_error(code, str(exc.detail), status=exc.status_code)

        app = Starlette(
            routes=[*rest_routes(lambda: service[0]), *routes],
            middleware=list(middleware),
            lifespan=lifespan,
            exception_handlers={HTTPException: http_error},
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.005)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(tmp_path / "t.db") as server:
        yield server


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=live.url, timeout=10) as client:
        yield client


# -- checking answers against the document -------------------------------------------------------


def _operation(method: str, path: str) -> dict[str, Any]:
    # Literal paths first: /tasks/next before /tasks/{task_id}.
    for template in sorted(DOC["paths"], key=lambda t: t.count("{")):
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path) and method.lower() in DOC["paths"][template]:
            return DOC["paths"][template][method.lower()]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def check(resp: httpx2.Response, status: int | None = None) -> Any:
    """The envelope, valid against the documented schema for this operation and status; returns data
    (or the error object of a failed request)."""
    if status is not None:
        assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"success", "data", "error", "timestamp"}
    assert body["success"] is (resp.status_code < 400)
    assert datetime.fromisoformat(body["timestamp"]).utcoffset() is not None
    op = _operation(resp.request.method, resp.request.url.path)
    documented = op["responses"].get(str(resp.status_code))
    assert documented is not None, f"status {resp.status_code} is not documented for {op['operationId']}"
    schema = documented["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": DOC["components"]}).validate(body)
    if body["success"]:
        assert body["error"] is None
        return body["data"]
    assert body["data"] is None
    assert ERROR_STATUS[body["error"]["code"]] == resp.status_code or resp.status_code == 415
    return body["error"]


def error(resp: httpx2.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    err = check(resp, status)
    assert err["code"] == code, err
    if field is not None:
        assert err["message"].startswith(f"{field}: "), err["message"]
        assert err["details"]["field"] == field
    assert "Traceback" not in err["message"]
    return err


def create(http: httpx2.Client, **fields: Any) -> dict[str, Any]:
    return check(http.post("/api/v1/tasks", json={"work_path": "/repo", "prompt": "do it", **fields}), 201)


def claim(http: httpx2.Client, work_path: str = "/repo", worker_id: str = "w1", **more: Any) -> dict[str, Any]:
    data = check(http.post("/api/v1/tasks/next", json={"work_path": work_path, "worker_id": worker_id, **more}), 200)
    assert data is not None, "nothing to claim"
    return data


# -- the life cycle ------------------------------------------------------------------------------


def test_full_life_cycle(http: httpx2.Client) -> None:
    low = create(http, prompt="Write docs\nin detail", priority="low", tags=["docs"], metadata={"k": [1, 2]})
    assert low["status"] == "waiting" and low["title"] == "Write docs" and low["metadata"] == {"k": [1, 2]}
    seed = check(
        http.post("/api/v1/tasks", json={"work_directory": "/repo/", "prompt": "seed", "priority": "critical"})
    )
    assert seed["work_path"] == "/repo" and seed["priority"] == "urgent"
    again = create(http, prompt="once", idempotency_key="k-1")
    assert create(http, prompt="once", idempotency_key="k-1")["id"] == again["id"]

    batch = check(
        http.post(
            "/api/v1/tasks/batch",
            json={
                "tasks": [
                    {"work_path": "/repo", "prompt": "build", "ref": "build", "priority": "high"},
                    {"work_path": "/repo", "prompt": "test", "depends_on": ["build"], "priority": "urgent"},
                ],
                "mode": "parallel",
            },
        ),
        201,
    )
    build, test = batch["tasks"]
    assert test["depends_on"] == [build["id"]]

    # GET (the seed's) claims the most urgent claimable task: the seed's one; `test` waits for `build`.
    first = check(http.get("/api/v1/tasks/next", params={"work_path": "/repo", "worker_id": "w1"}), 200)
    assert first["task"]["id"] == seed["id"] and first["lease"]["worker_id"] == "w1"
    second = claim(http, worker_id="w2", lease_seconds=60)
    assert second["task"]["id"] == build["id"]

    token = second["lease"]["token"]
    lease = check(http.post(f"/api/v1/tasks/{build['id']}/heartbeat",
                            json={"worker_id": "w2", "lease_token": token, "lease_seconds": 120}), 200)  # fmt: skip
    assert lease["token"] == token and lease["expires_at"] > second["lease"]["expires_at"]

    done_body = {"worker_id": "w2", "lease_token": token, "status": "success", "output": "built",
                 "details": {"files": 3}, "artifacts": ["dist/app"], "duration_ms": 42}  # fmt: skip
    done = check(http.post(f"/api/v1/tasks/{build['id']}/complete", json=done_body), 200)
    assert done["status"] == "completed"
    assert done["result"] == {"status": "success", "output": "built", "details": {"files": 3},
                              "artifacts": ["dist/app"], "duration_ms": 42}  # fmt: skip
    # A repeated complete (its answer was lost) returns the completed task again.
    assert check(http.post(f"/api/v1/tasks/{build['id']}/complete", json=done_body), 200)["version"] == done["version"]

    # The seed's complete body: result {status, output, duration}, original_prompt ignored.
    third = claim(http, worker_id="w3")
    assert third["task"]["id"] == test["id"]
    seed_body = {"worker_id": "w3", "lease_token": third["lease"]["token"], "original_prompt": "test",
                 "result": {"status": "completed", "output": "all green", "duration": 1500}}  # fmt: skip
    tested = check(http.post(f"/api/v1/tasks/{test['id']}/complete", json=seed_body), 200)
    assert tested["status"] == "completed"
    assert tested["result"]["output"] == "all green" and tested["result"]["duration_ms"] == 1500

    # The first claim fails for good: a seed "failed" with retryable false.
    failed = check(http.post(f"/api/v1/tasks/{seed['id']}/complete", json={
        "worker_id": "w1", "lease_token": first["lease"]["token"], "retryable": False,
        "result": {"status": "failed", "output": {"reason": "boom"}}}), 200)  # fmt: skip
    assert failed["status"] == "failed" and failed["result"]["details"] == {"reason": "boom"}

    got = check(http.get(f"/api/v1/tasks/{build['id']}", params={"include_events": "true"}), 200)
    assert got["task"]["id"] == build["id"]
    assert [e["kind"] for e in got["events"]] == ["created", "claimed", "completed"]
    assert check(http.get(f"/api/v1/tasks/{build['id']}"), 200)["events"] is None

    page = check(http.get("/api/v1/tasks", params={"work_path": "/repo", "limit": 2, "offset": 0}), 200)
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 0 and len(page["tasks"]) == 2
    rest = check(http.get("/api/v1/tasks", params={"work_path": "/repo", "limit": 2, "offset": 4}), 200)
    assert len(rest["tasks"]) == 1
    ids = {t["id"] for t in page["tasks"]} | {t["id"] for t in rest["tasks"]}
    mid = check(http.get("/api/v1/tasks", params={"work_path": "/repo", "limit": 2, "offset": 2}), 200)
    assert len(ids | {t["id"] for t in mid["tasks"]}) == 5
    assert [t["id"] for t in check(http.get("/api/v1/tasks?status=completed&priority=high"))["tasks"]] == [build["id"]]
    assert [t["id"] for t in check(http.get("/api/v1/tasks?tag=docs"))["tasks"]] == [low["id"]]

    cancelled = check(http.post(f"/api/v1/tasks/{low['id']}/cancel",
                                json={"reason": "not needed", "expected_version": low["version"]}), 200)  # fmt: skip
    assert cancelled["status"] == "cancelled"
    retried = check(http.post(f"/api/v1/tasks/{low['id']}/retry"), 200)  # no body, as in the seed
    assert retried["status"] == "waiting" and retried["attempts"] == 0

    stats = check(http.get("/api/v1/statistics"), 200)
    assert stats["total"] == 5 and stats["by_status"]["completed"] == 2 and stats["by_status"]["failed"] == 1
    assert check(http.get("/api/v1/statistics", params={"work_path": "/elsewhere"}), 200)["total"] == 0


def test_release_gives_the_task_back_and_an_empty_queue_answers_null(http: httpx2.Client) -> None:
    task = create(http)
    got = claim(http)
    released = check(http.post(f"/api/v1/tasks/{task['id']}/release",
                               json={"worker_id": "w1", "lease_token": got["lease"]["token"]}), 200)  # fmt: skip
    assert released["status"] == "waiting" and released["attempts"] == 0
    assert claim(http, worker_id="w2")["task"]["id"] == task["id"]
    assert check(http.get("/api/v1/tasks/next?work_path=/repo&worker_id=w3"), 200) is None
    assert check(http.post("/api/v1/tasks/next", json={"work_path": "/repo", "worker_id": "w3"}), 200) is None


def test_next_filters_by_tags_and_subpaths_from_the_query_string(http: httpx2.Client) -> None:
    create(http, work_path="/repo/sub", prompt="a", tags=["x"])
    b = create(http, work_path="/repo/sub", prompt="b", tags=["y"])
    resp = http.get("/api/v1/tasks/next?work_path=/repo&worker_id=w&include_subpaths=true&tags=y&tags=z")
    assert check(resp, 200)["task"]["id"] == b["id"]
    assert check(http.get("/api/v1/tasks/next?work_path=/repo&worker_id=w&tags=x"), 200) is None


def test_next_long_polls_until_a_task_arrives(live: LiveServer, http: httpx2.Client) -> None:
    def create_later() -> None:
        time.sleep(0.3)
        with httpx2.Client(base_url=live.url) as other:
            create(other, prompt="late")

    threading.Thread(target=create_later).start()
    start = time.monotonic()
    got = claim(http, wait_seconds=5)
    assert got["task"]["prompt"] == "late" and time.monotonic() - start < 4


def test_head_does_not_claim(http: httpx2.Client) -> None:
    create(http)
    # HEAD falls through to GET /tasks/{task_id}, which rejects the claim's query parameters.
    assert http.head("/api/v1/tasks/next?work_path=/repo&worker_id=w").status_code in (400, 405)
    assert claim(http)["task"]["prompt"] == "do it"


# -- error codes and statuses --------------------------------------------------------------------


def test_not_found_and_the_409s(http: httpx2.Client) -> None:
    error(http.get("/api/v1/tasks/t-nope"), 404, "NOT_FOUND")
    error(http.post("/api/v1/tasks/t-nope/cancel"), 404, "NOT_FOUND")
    task = create(http)
    got = claim(http)
    token = got["lease"]["token"]
    error(http.post(f"/api/v1/tasks/{task['id']}/heartbeat", json={"worker_id": "w1", "lease_token": token + 7}),
          409, "LEASE_LOST")  # fmt: skip
    stranger = {"worker_id": "other", "lease_token": token, "status": "success"}
    error(http.post(f"/api/v1/tasks/{task['id']}/complete", json=stranger), 409, "LEASE_LOST")
    error(http.post(f"/api/v1/tasks/{task['id']}/cancel", json={"expected_version": 1}), 409, "CONFLICT")
    error(http.post(f"/api/v1/tasks/{task['id']}/retry"), 409, "INVALID_STATE")  # working, not failed
    check(http.post(f"/api/v1/tasks/{task['id']}/complete",
                    json={"worker_id": "w1", "lease_token": token, "status": "success"}), 200)  # fmt: skip
    error(http.post(f"/api/v1/tasks/{task['id']}/cancel"), 409, "INVALID_STATE")


def test_payload_too_large_from_the_services_limits(tmp_path: Path) -> None:
    with LiveServer(tmp_path / "t.db", overrides={"limits": {"max_metadata_bytes": 100}}) as live:
        with httpx2.Client(base_url=live.url) as http:
            resp = http.post("/api/v1/tasks", json={"work_path": "/r", "prompt": "p", "metadata": {"k": "x" * 200}})
            error(resp, 413, "PAYLOAD_TOO_LARGE", "metadata")


def test_store_busy_is_503_with_retry_after(tmp_path: Path) -> None:
    with LiveServer(tmp_path / "t.db", overrides={"store": {"busy_timeout_ms": 50}}) as live:
        with httpx2.Client(base_url=live.url) as http:
            create(http)  # the database exists and is migrated
            raw = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
            raw.execute("BEGIN IMMEDIATE")
            try:
                resp = http.post("/api/v1/tasks", json={"work_path": "/r", "prompt": "p"})
                error(resp, 503, "STORE_BUSY")
                assert resp.headers["retry-after"] == "1"
                check(http.get("/api/v1/tasks"), 200)  # WAL: readers are not blocked by the writer
            finally:
                raw.execute("ROLLBACK")
                raw.close()
            create(http)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b'{"work_path": "/r", "prompt": ', "body", "is not valid JSON"),
        (b"\xff\xfe", "body", "is not valid JSON"),
        (b"[1, 2]", "body", "must be a JSON object"),
        (b'"just a string"', "body", "must be a JSON object"),
        (b"   ", "body", "is not valid JSON"),
        (b'{"prompt": "p"}', "work_path", "is required"),
        (b'{"work_path": 1, "prompt": "p"}', "work_path", "must be a valid string"),
        (b'{"work_path": "/r", "prompt": "p", "max_attempts": "3"}', "max_attempts", "valid integer"),
        (b'{"work_path": "/r", "prompt": "p", "max_attempts": 101}', "max_attempts", "less than or equal to 100"),
        (b'{"work_path": "/r", "prompt": "p", "priority": "HUGE"}', "priority", "must be 'low'"),
        (b'{"work_path": "/r", "prompt": "p", "tags": "a"}', "tags", "valid array"),
        (b'{"work_path": "/r", "prompt": "p", "tags": ["ok", 1]}', "tags[1]", "valid string"),
        (b'{"work_path": "/r", "prompt": "p", "bogus": 1}', "bogus", "unknown field"),
        (b'{"work_path": "relative/dir", "prompt": "p"}', "work_path", "must be an absolute path"),
        (b'{"work_path": "/r", "prompt": "   "}', "prompt", "must not be empty"),
        (b'{"work_path": "/r", "prompt": "p", "tags": ["a\\u0000"]}', "tags[0]", "NUL"),
        (b'{"work_path": "/r", "prompt": "p", "delay_seconds": NaN}', "delay_seconds", "greater than or equal to 0"),
        (b'{"work_path": "/r", "prompt": "p", "metadata": ' + b"[" * 300 + b"]" * 300 + b"}", "body", "recursion"),
    ],
)
def test_bad_create_bodies_name_the_argument(http: httpx2.Client, body: bytes, field: str, words: str) -> None:
    err = error(http.post("/api/v1/tasks", content=body, headers={"content-type": "application/json"}),
                400, "VALIDATION_ERROR", field)  # fmt: skip
    assert words in err["message"], err["message"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/tasks/batch", {"tasks": []}, "tasks"),
        ("/api/v1/tasks/batch", {"tasks": [{"work_path": "/r", "prompt": "p", "oops": 1}]}, "tasks[0].oops"),
        ("/api/v1/tasks/batch", {"tasks": [{"work_path": "/r", "prompt": "p"}], "mode": "chaos"}, "mode"),
        ("/api/v1/tasks/next", {"work_path": "/r"}, "worker_id"),
        ("/api/v1/tasks/next", {"work_path": "/r", "worker_id": "w", "wait_seconds": 61}, "wait_seconds"),
        ("/api/v1/tasks/next", {"work_path": "/r", "worker_id": "w", "lease_seconds": 1e9}, "lease_seconds"),
        ("/api/v1/tasks/next", {"work_path": "/r", "worker_id": "w", "include_subpaths": 1}, "include_subpaths"),
        ("/api/v1/tasks/t-1/complete", {"worker_id": "w", "lease_token": "1", "status": "success"}, "lease_token"),
        ("/api/v1/tasks/t-1/complete", {"worker_id": "w", "lease_token": 1}, "status"),
        ("/api/v1/tasks/t-1/complete", {"worker_id": "w", "lease_token": 1, "status": "ok"}, "status"),
        ("/api/v1/tasks/t-1/complete", {"worker_id": "w", "lease_token": 1, "status": "success",
                                        "result": {"status": "success"}}, "result"),
        ("/api/v1/tasks/t-1/complete", {"worker_id": "w", "lease_token": 1, "result": {"status": "meh"}},
         "result.status"),
        ("/api/v1/tasks/t-1/complete", {"worker_id": "w", "lease_token": 1, "status": "success",
                                        "artifacts": {"a": 1}}, "artifacts"),
        ("/api/v1/tasks/t-1/heartbeat", {"worker_id": "w", "lease_token": 0}, "lease_token"),
        ("/api/v1/tasks/t-1/release", {"worker_id": " w", "lease_token": 1}, "worker_id"),
        ("/api/v1/tasks/t-1/cancel", {"expected_version": True}, "expected_version"),
        ("/api/v1/tasks/t-1/cancel", {"reason": "x" * 3000}, "reason"),
        ("/api/v1/tasks/t-1/retry", {"expected_version": 0}, "expected_version"),
        ("/api/v1/tasks/%00bad/cancel", {}, "task_id"),
        ("/api/v1/tasks/" + "x" * 300 + "/retry", {}, "task_id"),
    ],
)  # fmt: skip
def test_bad_post_bodies_name_the_argument(http: httpx2.Client, path: str, body: dict[str, Any], field: str) -> None:
    error(http.post(path, json=body), 400, "VALIDATION_ERROR", field)


def test_a_batch_cycle_is_a_validation_error(http: httpx2.Client) -> None:
    item = {"work_path": "/r", "prompt": "p", "depends_on": ["x"], "ref": "x"}
    err = error(http.post("/api/v1/tasks/batch", json={"tasks": [item]}), 400, "VALIDATION_ERROR")
    # The service names the argument in the message (but leaves details.field out, unlike elsewhere).
    assert err["message"].startswith("tasks[0].depends_on: ")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/v1/tasks?limit=abc", "limit"),
        ("/api/v1/tasks?limit=0", "limit"),
        ("/api/v1/tasks?limit=201", "limit"),
        ("/api/v1/tasks?offset=-1", "offset"),
        ("/api/v1/tasks?status=lost", "status"),
        ("/api/v1/tasks?priority=whenever", "priority"),
        ("/api/v1/tasks?work_path=relative", "work_path"),
        ("/api/v1/tasks?limit=1&limit=2", "limit"),
        ("/api/v1/tasks?colour=red", "colour"),
        ("/api/v1/tasks?priority=", "priority"),  # empty is not absent: leave a parameter out instead
        ("/api/v1/tasks?tag=", "tag"),
        ("/api/v1/tasks/t-1?include_events=perhaps", "include_events"),
        ("/api/v1/tasks/next?work_path=/r", "worker_id"),
        ("/api/v1/tasks/next?work_path=/r&worker_id=w&wait_seconds=soon", "wait_seconds"),
        ("/api/v1/tasks/next?work_path=/r&worker_id=w&lease_seconds=nan", "lease_seconds"),
        ("/api/v1/statistics?work_path=~/x", "work_path"),
    ],
)
def test_bad_query_strings_name_the_argument(http: httpx2.Client, query: str, field: str) -> None:
    error(http.get(query), 400, "VALIDATION_ERROR", field)


def test_a_body_not_declared_as_json_is_415(http: httpx2.Client) -> None:
    body = b'{"work_path": "/r", "prompt": "p"}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if ctype is None else {"content-type": ctype}
        error(http.post("/api/v1/tasks", content=body, headers=headers), 415, "VALIDATION_ERROR", "Content-Type")
    check(http.post("/api/v1/tasks", content=body, headers={"content-type": "application/json; charset=utf-8"}), 201)
    check(http.post("/api/v1/tasks", content=body, headers={"content-type": "application/merge-patch+json"}), 201)


def test_large_and_odd_input_never_breaks_the_server(http: httpx2.Client) -> None:
    big = "x" * 1_000_000
    error(http.post("/api/v1/tasks", json={"work_path": "/r", "prompt": big}), 400, "VALIDATION_ERROR", "prompt")
    error(http.post("/api/v1/tasks", json={"work_path": "/r", "prompt": "p", "tags": ["t"] * 10_000}),
          400, "VALIDATION_ERROR", "tags")  # fmt: skip
    error(http.post("/api/v1/tasks", json={"work_path": "/r", "prompt": "p", "max_attempts": 10**30}),
          400, "VALIDATION_ERROR", "max_attempts")  # fmt: skip
    resp = http.post("/api/v1/tasks", content=b'{"work_path": "/r", "prompt": "\\ud800"}',
                     headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code in (201, 400)  # a lone surrogate: rejected by the parser or the service
    check(resp)
    check(http.get("/api/v1/tasks"), 200)


def test_every_error_code_has_a_status_and_envelope_error_builds_the_envelope() -> None:
    assert set(ERROR_STATUS) == set(ERROR_CODES)
    assert ERROR_STATUS["VALIDATION_ERROR"] == 400 and ERROR_STATUS["STORE_BUSY"] == 503
    resp = envelope_error("RATE_LIMITED", "slow down", status=None, headers={"Retry-After": "3"})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    import json

    body = json.loads(bytes(resp.body))
    assert body["error"] == {"code": "RATE_LIMITED", "message": "slow down", "details": {}}
    assert body["success"] is False and body["data"] is None
    schema = DOC["paths"]["/api/v1/tasks"]["get"]["responses"]["429"]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": DOC["components"]}).validate(body)


# -- the OpenAPI document ------------------------------------------------------------------------


def test_the_openapi_document_is_valid_and_covers_every_route(http: httpx2.Client) -> None:
    validate = pytest.importorskip("openapi_spec_validator").validate  # in the test extra

    served = http.get("/openapi.json")
    assert served.status_code == 200 and served.json() == DOC
    validate(DOC)
    routes = rest_routes(lambda: None)  # type: ignore[arg-type,return-value]
    for route in routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in DOC["paths"][route.path], (method, route.path)
    documented = {(path, method) for path, ops in DOC["paths"].items() for method in ops}
    assert len(documented) == len(ENDPOINTS) + 1  # + /openapi.json
    assert len({op["operationId"] for ops in DOC["paths"].values() for op in ops.values()}) == len(documented)
    # A fresh copy each time: the app may add its own paths.
    openapi_document()["paths"]["/health"] = {}
    assert "/health" not in openapi_document()["paths"]


# -- schemathesis: generated requests, positive and negative, against the live server -------------

try:
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )
except ImportError:  # pragma: no cover - the test extra installs it
    schemathesis = None


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer(tmp_path_factory.mktemp("schemathesis") / "t.db") as server:
        yield server


if schemathesis is not None:
    SCHEMA = schemathesis.openapi.from_dict(DOC)

    @SCHEMA.parametrize()
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    def test_generated_requests_match_the_document(case: Any, module_server: LiveServer) -> None:
        case.call_and_validate(
            base_url=module_server.url,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                    response_schema_conformance, negative_data_rejection],
        )  # fmt: skip
