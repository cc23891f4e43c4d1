"""The worker as a process: kill -9 mid-task, SIGTERM mid-step, the exit code without a model, and
`run` one-shot. Worker processes are started with `python -m taskorch.runner` (each pays litellm's
import, so there are only two); the queue is a real SQLite file shared with the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import runner_fake_model
from runner_fake_model import call, finish, make_llm, plan, reply

import taskorch
from taskorch.config import load_config

fake_model = runner_fake_model.fake_model  # fixtures, shared by name
model_name = runner_fake_model.model_name
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("litellm") is None, reason="needs the runner extra (litellm)"),
    pytest.mark.filterwarnings("ignore:.*is using the `ReadOnly` qualifier:UserWarning"),
]


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("TASKORCH_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def spawn_worker(db: Path, work_path: Path, fake, model: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "taskorch.runner", "--db", str(db), "worker", "--work-path", str(work_path),
           "--model", f"openai/{model}", "--api-base", fake.url, "--sandbox", "none", *extra]  # fmt: skip
    env = dict(os.environ, OPENAI_API_KEY="sk-fake")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll a condition that another process makes true (there is nothing to await across processes)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the worker")
        time.sleep(0.05)


async def _create(db: Path, work_path: Path, prompt: str) -> str:
    async with taskorch.open_service(db, config=load_config(environ={}), sweep=False) as svc:
        return (await svc.create_task(work_path=str(work_path), prompt=prompt)).id


async def _get(db: Path, task_id: str):
    async with taskorch.open_service(db, config=load_config(environ={}), sweep=False) as svc:
        return await svc.get_task(task_id=task_id, include_events=True)


def test_a_task_of_a_killed_worker_is_completed_by_another_after_its_lease(tmp_path, fake_model, model_name):
    db, wp = tmp_path / "q.db", tmp_path / "proj"
    wp.mkdir()
    task_id = anyio.run(_create, db, wp, "Write result.txt")
    hang = model_name + "-hang"
    fake_model.script(hang, [plan(), reply(None, [{"name": "list_files", "arguments": {}}], sleep=60)])
    proc = spawn_worker(db, wp, fake_model, hang, "--once", "--lease-seconds", "4")
    try:
        wait_until(lambda: len(fake_model.requests_for(hang)) == 2, proc)  # planned, waiting on its first step
    finally:
        proc.kill()  # SIGKILL: no release, no completion
        proc.communicate()
    assert anyio.run(_get, db, task_id).task.status == "working"

    fake_model.script(model_name, [plan(), call("write_file", path="result.txt", content="ok"), finish()])

    async def second_worker() -> None:
        from taskorch.runner.session import RunnerSettings
        from taskorch.runner.worker import Worker, WorkerOptions

        llm = make_llm(fake_model, model_name)
        async with taskorch.open_service(db, config=load_config(environ={})) as svc:
            # Long-poll until the dead worker's lease has expired and the task is claimable again.
            claim = await svc.next_task(work_path=str(wp), worker_id="probe", wait_seconds=20)
            assert claim is not None and claim.task.id == task_id
            await svc.release_task(task_id=task_id, worker_id="probe", lease_token=claim.lease.token)
            worker = Worker(svc, RunnerSettings(sandbox="none"), llm, WorkerOptions(str(wp), "worker-b", once=True))
            try:
                await worker.run()
            finally:
                await llm.aclose()

    anyio.run(second_worker)
    got = anyio.run(_get, db, task_id)
    assert got.task.status == "completed" and got.task.worker_id == "worker-b"
    assert (wp / "result.txt").read_text() == "ok" and got.task.result["details"]["success"] is True
    assert "lease_expired" in [e.kind for e in got.events]


def test_sigterm_finishes_the_current_step_then_releases_the_task(tmp_path, fake_model, model_name):
    db, wp = tmp_path / "q.db", tmp_path / "proj"
    wp.mkdir()
    task_id = anyio.run(_create, db, wp, "Run the slow step")
    fake_model.script(model_name, [plan(), call("run_command", command="sleep 1.5 && touch step-done"), finish()])
    proc = spawn_worker(db, wp, fake_model, model_name, "--allow-shell", "--wait-seconds", "1")
    try:
        wait_until(lambda: len(fake_model.requests_for(model_name)) == 2, proc)  # the command is starting
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert (wp / "step-done").exists()  # the step in progress was finished
    assert len(fake_model.requests_for(model_name)) == 2  # and no model call followed it
    task = anyio.run(_get, db, task_id).task
    assert task.status == "waiting" and task.worker_id is None and task.attempts == 0  # released, attempt kept
    assert "released" in err


def test_without_a_model_the_worker_exits_2_with_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "taskorch.runner", "--db", str(tmp_path / "q.db"), "worker", "--once",
           "--work-path", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no model configured" in proc.stderr and "TASKORCH_LLM_MODEL" in proc.stderr


def test_run_files_the_task_runs_it_in_the_foreground_and_prints_the_result(tmp_path, fake_model, model_name,
                                                                           monkeypatch, capsys):  # fmt: skip
    from taskorch.runner.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    wp = tmp_path / "proj"
    wp.mkdir()
    fake_model.script(model_name, [plan(), call("write_file", path="notes.md", content="# Notes"),
                                   finish(summary="notes written", artifacts=["notes.md"])])  # fmt: skip
    code = main(["--db", str(tmp_path / "q.db"), "run", "Write notes.md", "--work-path", str(wp),
                 "--model", f"openai/{model_name}", "--api-base", fake_model.url, "--sandbox", "none",
                 "--output", "json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["status"] == "success" and doc["result"]["summary"] == "notes written"
    assert doc["result"]["artifacts"] == ["notes.md"] and (wp / "notes.md").read_text() == "# Notes"
    assert "plan (tool)" in err and "step 1" in err and "write_file" in err  # live progress on stderr
    stored = anyio.run(_get, tmp_path / "q.db", doc["task_id"]).task
    assert stored.status == "completed" and stored.result["details"]["summary"] == "notes written"


def test_run_in_remote_mode_goes_through_the_rest_client(tmp_path, fake_model, model_name, monkeypatch, capsys):
    test_api = pytest.importorskip("test_api", reason="the REST test server helper")  # another module's fixture
    from taskorch.runner.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    wp = tmp_path / "proj"
    wp.mkdir()
    fake_model.script(model_name, [plan(), call("write_file", path="remote.txt", content="via REST"), finish()])
    with test_api.LiveServer(tmp_path / "server.db") as live:
        code = main(["run", "Write remote.txt", "--server", live.url, "--work-path", str(wp),
                     "--model", f"openai/{model_name}", "--api-base", fake_model.url, "--sandbox", "none",
                     "--output", "json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["status"] == "success" and (wp / "remote.txt").read_text() == "via REST"
    stored = anyio.run(_get, tmp_path / "server.db", doc["task_id"]).task  # the server's database, not a local one
    assert stored.status == "completed" and stored.result["details"]["files_written"] == ["remote.txt"]
