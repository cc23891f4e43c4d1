"""The runner's agent loop against a scripted fake model, through litellm's real client code.

No network, no API key: `runner_fake_model.FakeModel` answers on 127.0.0.1. Tasks live in a real
SQLite queue in tmp_path and are claimed, run and completed by the runner's Worker. Commands run
with sandbox "none" here; the bwrap mode has its own tests (test_runner_redteam.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import runner_fake_model
from runner_fake_model import call, calls, error, finish, make_llm, plan, reply, run_task, text

import taskorch
from taskorch.config import load_config

fake_model = runner_fake_model.fake_model  # fixtures, shared by name
model_name = runner_fake_model.model_name
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(importlib.util.find_spec("litellm") is None, reason="needs the runner extra (litellm)"),
    pytest.mark.filterwarnings("ignore:.*is using the `ReadOnly` qualifier:UserWarning"),
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    wp = tmp_path / "proj"
    wp.mkdir()
    (wp / "hello.txt").write_text("hello from the project\n")
    return wp


async def test_a_task_is_planned_executed_with_tools_and_completed_in_the_store(tmp_path, project, fake_model,
                                                                                model_name):  # fmt: skip
    fake_model.script(model_name, [
        plan(understanding="copy hello.txt", complexity="simple", estimated_steps=4),
        call("list_files"),
        call("read_file", path="hello.txt"),
        call("write_file", path="out/copy.txt", content="hello from the project\n"),
        call("run_command", command="ls out"),
        finish(summary="copied hello.txt to out/copy.txt", details="one file", artifacts=["out/copy.txt"]),
    ])  # fmt: skip
    llm = make_llm(fake_model, model_name, input_cost_per_token=1e-6, output_cost_per_token=2e-6)
    task, outcome = await run_task(tmp_path, project, llm, prompt="Copy hello.txt into out/copy.txt")

    assert (project / "out/copy.txt").read_text() == "hello from the project\n"
    assert task.status == "completed" and task.result["status"] == "success"
    r = task.result["details"]
    assert r == outcome.result
    assert r["success"] is True and r["summary"] == "copied hello.txt to out/copy.txt" and r["details"] == "one file"
    assert r["artifacts"] == ["out/copy.txt"] and task.result["artifacts"] == ["out/copy.txt"]
    assert r["stop_reason"] == "finished" and r["execution_time"] > 0
    assert r["plan"]["understanding"] == "copy hello.txt" and r["plan"]["source"] == "tool"
    tool_steps = [s for s in r["steps"] if s["kind"] == "tool"]
    assert [s["tool"] for s in tool_steps] == ["list_files", "read_file", "write_file", "run_command", "finish"]
    assert all(s["ok"] for s in tool_steps) and tool_steps[3]["returncode"] == 0
    assert r["usage"] == {"prompt_tokens": 600, "completion_tokens": 120, "total_tokens": 720, "model_calls": 5}
    assert r["cost_known"] is True and r["cost"] == pytest.approx(6 * (100e-6 + 40e-6))
    assert r["files_written"] == ["out/copy.txt"] and r["scenario"] == "file_operations"
    assert r["sandbox"]["mode"] == "none"

    requests = fake_model.requests_for(model_name)
    assert requests[0]["tool_choice"] == {"type": "function", "function": {"name": "submit_plan"}}
    offered = {t["function"]["name"] for t in requests[1]["tools"]}
    assert offered == {"read_file", "write_file", "list_files", "run_command", "finish"}
    results = fake_model.tool_results(model_name)
    assert "hello.txt" in results[0] and "hello from the project" in results[1]
    assert results[3].startswith("exit code: 0") and "copy.txt" in results[3]


async def test_the_documentation_scenario_writes_only_text_files_and_runs_no_commands(tmp_path, project, fake_model,
                                                                                      model_name):  # fmt: skip
    fake_model.script(model_name, [
        plan(),
        calls(("write_file", {"path": "docs/guide.md", "content": "# Guide"}),
              ("write_file", {"path": "setup.py", "content": "import os"}),
              ("run_command", {"command": "ls"})),
        finish(),
    ])  # fmt: skip
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name), prompt="Update the README docs")
    assert task.result["details"]["scenario"] == "documentation"
    assert (project / "docs/guide.md").read_text() == "# Guide" and not (project / "setup.py").exists()
    offered = {t["function"]["name"] for t in fake_model.requests_for(model_name)[1]["tools"]}
    assert offered == {"read_file", "write_file", "list_files", "finish"}
    results = fake_model.tool_results(model_name)
    assert "ERROR WRITE_NOT_ALLOWED" in results[1] and "ERROR UNKNOWN_TOOL" in results[2]


async def test_a_plan_given_as_json_text_is_accepted(tmp_path, project, fake_model, model_name):
    plan_json = {"understanding": "u", "approach": "a", "complexity": "complex", "estimated_steps": 9}
    fake_model.script(model_name, [text("Here is my plan:\n```json\n" + json.dumps(plan_json) + "\n```"), finish()])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name))
    plan_ = task.result["details"]["plan"]
    assert plan_["source"] == "text" and plan_["complexity"] == "complex" and plan_["estimated_steps"] == 9


async def test_an_invalid_plan_falls_back_to_a_default_plan(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [call("submit_plan", understanding="u", complexity="huge"), finish()])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name), max_steps=8)
    r = task.result["details"]
    assert task.status == "completed" and r["success"] is True
    assert r["plan"]["source"] == "default" and "invalid plan" in r["plan"]["error"]
    assert r["plan"]["complexity"] == "moderate" and r["plan"]["estimated_steps"] == 4


async def test_the_step_limit_ends_the_run_as_a_failure_that_is_not_retried(tmp_path, project, fake_model,
                                                                            model_name):  # fmt: skip
    fake_model.script(model_name, [plan(), *[call("list_files", path=f"d{i}") for i in range(5)]])
    task, outcome = await run_task(tmp_path, project, make_llm(fake_model, model_name), max_steps=3)
    r = task.result["details"]
    assert r["success"] is False and r["stop_reason"] == "step_limit" and "3 model calls" in r["summary"]
    assert task.status == "failed" and task.attempts == 1 < task.max_attempts  # not put back to waiting
    assert outcome.retryable is False
    assert len(fake_model.requests_for(model_name)) == 4  # the plan + 3 steps; checked before the 4th step


async def test_the_cost_limit_is_checked_before_each_model_call(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [plan(), *[call("list_files", path=f"d{i}") for i in range(5)]])
    llm = make_llm(fake_model, model_name, input_cost_per_token=1e-4, output_cost_per_token=1e-4)  # 0.012/call
    task, _ = await run_task(tmp_path, project, llm, cost_limit_usd=0.03)
    r = task.result["details"]
    assert r["stop_reason"] == "cost_limit" and r["success"] is False and task.status == "failed"
    assert r["cost"] == pytest.approx(0.036) and len(fake_model.requests_for(model_name)) == 3


async def test_an_unknown_model_price_leaves_the_cost_unknown_and_the_run_going(tmp_path, project, fake_model,
                                                                                model_name):  # fmt: skip
    fake_model.script(model_name, [plan(), finish()])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name), cost_limit_usd=0.000001)
    r = task.result["details"]
    assert r["success"] is True and r["cost"] is None and r["cost_known"] is False


async def test_the_wall_time_limit_also_bounds_a_model_call_in_flight(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [plan(), reply(None, [{"name": "list_files", "arguments": {}}], sleep=5)])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name), wall_time_seconds=1.0)
    r = task.result["details"]
    assert r["stop_reason"] == "time_limit" and r["success"] is False and task.status == "failed"
    assert r["execution_time"] < 3


async def test_three_replies_without_a_tool_call_end_the_run(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [plan(), text("thinking"), text("still thinking"), text("I am done, it works")])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name))
    r = task.result["details"]
    assert r["stop_reason"] == "no_tool_call" and r["success"] is False and r["summary"] == "I am done, it works"
    last = fake_model.requests_for(model_name)[-1]["messages"]
    assert sum("did not call a tool" in (m.get("content") or "") for m in last) == 2  # nudged after the 1st, 2nd


async def test_repeated_identical_calls_are_nudged_then_stopped(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [plan(), *[call("read_file", path="hello.txt") for _ in range(6)]])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name))
    r = task.result["details"]
    assert r["stop_reason"] == "stuck" and r["success"] is False and task.status == "failed"
    assert len(fake_model.requests_for(model_name)) == 5  # plan + 4 identical calls
    last = fake_model.requests_for(model_name)[-1]["messages"]
    assert any("same read_file call 3 times" in (m.get("content") or "") for m in last)


async def test_tool_errors_go_back_to_the_model_and_the_run_goes_on(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [
        plan(),
        calls(("no_such_tool", {}), ("read_file", {"path": "missing.txt"}), ("read_file", {})),
        reply(None, [{"name": "write_file", "arguments": "{not json"}]),
        calls(("list_files", {}), ("finish", {"success": True, "summary": "x"})),
        call("run_command", command="ls | wc -l"),
        call("finish", success="yes"),
        finish(summary="recovered"),
    ])  # fmt: skip
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name))
    r = task.result["details"]
    assert task.status == "completed" and r["summary"] == "recovered"
    seen = "\n".join(m.get("content") or "" for m in fake_model.requests_for(model_name)[-1]["messages"])
    for expected in ("ERROR UNKNOWN_TOOL", "ERROR NOT_FOUND", "missing argument 'path'", "ERROR INVALID_ARGUMENTS",
                     "FINISH_NOT_ALONE", "SHELL_NOT_ALLOWED", "needs success"):  # fmt: skip
        assert expected in seen, expected


async def test_a_model_answering_5xx_is_retried_and_auth_errors_are_not(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [error(500), error(503), plan(), error(429), finish()])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name))
    assert task.status == "completed" and len(fake_model.requests_for(model_name)) == 5

    other = model_name + "-auth"
    fake_model.script(other, [error(401, "bad key")])
    task, outcome = await run_task(tmp_path / "b", project, make_llm(fake_model, other))
    assert task.status == "failed" and outcome.retryable is False
    assert task.result["details"]["stop_reason"] == "llm_error" and "AuthenticationError" in task.result["output"]
    assert len(fake_model.requests_for(other)) == 1


async def test_a_model_that_stays_unavailable_fails_the_attempt_for_a_retry(tmp_path, project, fake_model,
                                                                            model_name):  # fmt: skip
    fake_model.script(model_name, [plan(), *[error(500)] * 3])
    task, outcome = await run_task(tmp_path, project, make_llm(fake_model, model_name, retries=2))
    assert outcome.retryable is True and task.status == "waiting" and task.attempts == 1  # back in the queue
    assert task.error["code"] == "TASK_FAILED" and "InternalServerError" in task.error["message"]


async def test_a_read_only_scenario_withdraws_write_file(tmp_path, project, fake_model, model_name):
    fake_model.script(model_name, [plan(), call("write_file", path="x.txt", content="x"), finish()])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name),
                             metadata={"scenario": "architecture"})  # fmt: skip
    assert not (project / "x.txt").exists()
    offered = {t["function"]["name"] for t in fake_model.requests_for(model_name)[1]["tools"]}
    assert "write_file" not in offered and "run_command" not in offered  # mode none cannot make commands read-only
    assert "'write_file' is not available in this task" in fake_model.tool_results(model_name)[0]
    assert task.result["details"]["scenario"] == "architecture"


async def test_an_unknown_scenario_is_a_configuration_error_not_a_retry(tmp_path, project, fake_model, model_name):
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name), metadata={"scenario": "poetry"})
    assert task.status == "failed" and task.result["details"]["stop_reason"] == "configuration_error"
    assert "unknown scenario 'poetry'" in task.result["output"] and fake_model.requests_for(model_name) == []


async def test_sigterm_style_stop_releases_the_task_after_the_current_step(tmp_path, project, fake_model,
                                                                           model_name):  # fmt: skip
    from taskorch.runner.session import RunnerSettings
    from taskorch.runner.worker import Worker, WorkerOptions

    worker_box: list[Any] = []

    def stop_now(body: dict) -> dict:
        worker_box[0].request_stop()  # the stop arrives while this step's reply is being produced
        return call("write_file", path="step.txt", content="done")

    fake_model.script(model_name, [plan(), stop_now, finish()])
    llm = make_llm(fake_model, model_name)
    async with taskorch.open_service(tmp_path / "q.db", config=load_config(environ={})) as svc:
        created = await svc.create_task(work_path=str(project), prompt="x")
        worker = Worker(svc, RunnerSettings(sandbox="none"), llm, WorkerOptions(str(project), "w", once=True))
        worker_box.append(worker)
        try:
            await worker.run()
        finally:
            await llm.aclose()
        task = (await svc.get_task(task_id=created.id)).task
    assert (project / "step.txt").read_text() == "done"  # the current step finished
    assert task.status == "waiting" and task.worker_id is None and task.result is None  # released
    assert len(fake_model.requests_for(model_name)) == 2  # no model call after the stop


async def test_without_bwrap_and_without_mode_none_run_command_is_not_offered(tmp_path, project, fake_model,
                                                                              model_name, monkeypatch):  # fmt: skip
    from taskorch.runner import sandbox

    monkeypatch.setattr(sandbox, "probe_bwrap", lambda: (False, "bubblewrap (bwrap) is not installed"))
    fake_model.script(model_name, [plan(), call("run_command", command="ls"), finish()])
    task, _ = await run_task(tmp_path, project, make_llm(fake_model, model_name), sandbox="auto")
    offered = {t["function"]["name"] for t in fake_model.requests_for(model_name)[1]["tools"]}
    assert "run_command" not in offered
    assert "bwrap) is not installed" in fake_model.tool_results(model_name)[0]
    r = task.result["details"]
    assert r["sandbox"]["mode"] is None and "sandbox mode none was not chosen" in r["sandbox"]["description"]
    assert "not installed" in r["sandbox"]["unavailable"]["run_command"]


async def test_concurrency_runs_several_tasks_at_once_in_one_worker(tmp_path, project, fake_model, model_name):
    from taskorch.runner.session import RunnerSettings
    from taskorch.runner.worker import Worker, WorkerOptions

    def by_phase(body: dict) -> dict:  # two runs interleave: answer by what is asked, not by order
        return plan() if body.get("tool_choice") != "auto" else finish(summary="done")

    fake_model.script(model_name, [by_phase] * 4)
    llm = make_llm(fake_model, model_name)
    async with taskorch.open_service(tmp_path / "q.db", config=load_config(environ={})) as svc:
        ids = [(await svc.create_task(work_path=str(project), prompt=f"task {i}")).id for i in range(2)]
        worker = Worker(svc, RunnerSettings(sandbox="none"), llm,
                        WorkerOptions(str(project), "pool", concurrency=2, once=True))  # fmt: skip
        try:
            await worker.run()
        finally:
            await llm.aclose()
        tasks = [(await svc.get_task(task_id=i)).task for i in ids]
    assert [t.status for t in tasks] == ["completed", "completed"]
    assert sorted(t.worker_id for t in tasks) == ["pool-0", "pool-1"]
