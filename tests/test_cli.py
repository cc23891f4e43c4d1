import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from taskorch import cli
from taskorch.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No TASKORCH_* from the developer's shell; any default database lands under tmp_path."""
    for var in [v for v in os.environ if v.startswith("TASKORCH_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "t.db")


@pytest.fixture
def run(capsys, db):
    """main() in-process against the test database; returns (exit code, stdout, stderr)."""

    def go(*args: str, use_db: bool = True):
        code = main([*args, "--db", db] if use_db else list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return go


def add(run, work_path, *extra) -> dict:
    code, out, err = run("tasks", "add", "Write the README", "--work-path", str(work_path), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_add_list_show_cancel_retry_and_stats_agree(run, tmp_path):
    task = add(run, tmp_path, "--priority", "high", "--tag", "docs", "--metadata", '{"ticket": 7}')
    assert task["status"] == "waiting" and task["priority"] == "high" and task["tags"] == ["docs"]
    assert task["metadata"] == {"ticket": 7} and task["work_path"] == str(tmp_path)

    code, out, _ = run("tasks", "list")
    assert code == 0
    assert task["id"] in out and "STATUS" in out and "1 of 1 task(s)" in out

    code, out, _ = run("tasks", "show", task["id"], "--events")
    assert code == 0
    assert task["id"] in out and "Write the README" in out and "events:" in out and "created" in out

    code, out, _ = run("tasks", "cancel", task["id"], "--reason", "not now", "--expected-version", "1")
    assert code == 0 and "cancelled" in out
    code, out, _ = run("tasks", "retry", task["id"])
    assert code == 0 and "waiting" in out

    code, out, _ = run("tasks", "show", task["id"], "--events", "--json")
    shown = json.loads(out)
    assert [e["kind"] for e in shown["events"]] == ["created", "cancelled", "retried"]
    assert shown["task"]["version"] == 3

    code, out, _ = run("stats", "--json")
    stats = json.loads(out)
    assert code == 0
    assert stats["total"] == 1 and stats["by_status"]["waiting"] == 1 and stats["by_priority"]["high"] == 1
    assert stats["retries"] == 1
    assert [w["work_path"] for w in stats["by_work_path"]] == [str(tmp_path)]
    code, out, _ = run("stats")
    assert code == 0 and "waiting 1" in out and str(tmp_path) in out and "success rate" in out


def test_list_filters_paging_and_json(run, tmp_path):
    ids = [add(run, tmp_path / name)["id"] for name in ("a", "b", "c")]
    code, out, _ = run("tasks", "list", "--json", "--limit", "2")
    page = json.loads(out)
    assert code == 0 and page["total"] == 3 and [t["id"] for t in page["tasks"]] == ids[::-1][:2]
    code, out, _ = run("tasks", "list", "--limit", "2", "--offset", "2")
    assert ids[0] in out and "1 of 3 task(s)" in out
    code, out, _ = run("tasks", "list", "--work-path", str(tmp_path / "b"), "--json")
    assert [t["id"] for t in json.loads(out)["tasks"]] == [ids[1]]
    code, out, _ = run("tasks", "list", "--status", "failed")
    assert code == 0 and "0 of 0 task(s)" in out


def test_add_defaults_work_path_to_the_current_directory(run, tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    code, out, _ = run("tasks", "add", "fix it", "--json")
    assert code == 0 and json.loads(out)["work_path"] == str(tmp_path / "proj")
    code, out, _ = run("tasks", "add", "relative", "--work-path", "sub/..", "--json")
    assert json.loads(out)["work_path"] == str(tmp_path / "proj")


def test_migrate_twice_says_up_to_date(run, db):
    code, out, _ = run("migrate")
    assert code == 0 and "applied 0001_initial" in out and db in out
    assert Path(db).exists()
    code, out, _ = run("migrate")
    assert code == 0 and "database is up to date" in out and db in out
    code, out, _ = run("migrate", "--json")
    assert json.loads(out) == {"db_path": db, "applied": []}


def test_bad_priority_is_a_validation_error(run, tmp_path):
    code, out, err = run("tasks", "add", "x", "--work-path", str(tmp_path), "--priority", "bogus")
    assert code == 1 and out == ""
    assert err.startswith("taskorch: VALIDATION_ERROR: priority:")
    code, out, err = run("tasks", "add", "x", "--work-path", str(tmp_path), "--priority", "bogus", "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "VALIDATION_ERROR"
    code, _, err = run("tasks", "add", "x", "--metadata", "{not json")
    assert code == 1 and "VALIDATION_ERROR: metadata" in err


@pytest.mark.parametrize("action", ["show", "cancel", "retry"])
def test_unknown_id_is_not_found(run, action):
    code, out, err = run("tasks", action, "t-missing")
    assert code == 1 and out == ""
    assert "taskorch: NOT_FOUND:" in err


def test_invalid_state_and_conflict_exit_1(run, tmp_path):
    task = add(run, tmp_path)
    code, _, err = run("tasks", "retry", task["id"])
    assert code == 1 and "INVALID_STATE" in err
    code, out, err = run("tasks", "cancel", task["id"], "--expected-version", "5", "--json")
    assert code == 1 and "CONFLICT" in err and json.loads(out)["error"]["code"] == "CONFLICT"


def test_cleanup(run, tmp_path):
    for _ in range(2):
        run("tasks", "cancel", add(run, tmp_path)["id"])
    code, out, _ = run("cleanup", "--older-than-hours", "0", "--max-tasks", "1", "--json")
    assert code == 0 and json.loads(out) == {"deleted": 1, "remaining": 1}
    code, out, _ = run("cleanup")
    assert code == 0 and "deleted 0 task(s); 1 remaining" in out


def test_bad_configuration_exits_2_naming_the_key(run, monkeypatch, tmp_path):
    monkeypatch.setenv("TASKORCH_TASKS__LEASE_SECONDS", "0")
    code, out, err = run("tasks", "list")
    assert code == 2 and out == ""
    assert err.startswith("taskorch: configuration error: tasks.lease_seconds")
    assert "TASKORCH_TASKS__LEASE_SECONDS" in err
    monkeypatch.delenv("TASKORCH_TASKS__LEASE_SECONDS")
    code, _, err = run("stats", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err


def test_usage_errors_exit_2(run):
    assert run("nonsense")[0] == 2
    assert run("tasks")[0] == 2
    assert run("tasks", "list", "--limit", "many")[0] == 2
    assert run("--durability", "sloppy", "stats")[0] == 2
    code, out, _ = run("--help", use_db=False)
    assert code == 0 and "tasks" in out


def test_global_options_work_before_and_after_the_subcommand(capsys, db, tmp_path):
    assert main(["--db", db, "--json", "tasks", "add", "p", "--work-path", str(tmp_path)]) == 0
    task_id = json.loads(capsys.readouterr().out)["id"]
    assert main(["tasks", "list", "--db", db, "--durability", "normal", "--log-level", "debug"]) == 0
    assert task_id in capsys.readouterr().out


def test_json_log_format_writes_json_lines_to_stderr(run, tmp_path):
    # A file that is no database: the store logs the sqlite error before INTERNAL_ERROR.
    # (Not a directory: then aiosqlite's connect fails and its worker thread may outlive the loop.)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite database" * 100)
    code, out, err = run("migrate", "--log-format", "json", "--db", str(junk), use_db=False)
    assert code == 1 and out == ""
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and {"time", "level", "logger", "message"} <= set(records[0])
    assert "INTERNAL_ERROR" in err


def test_keyboard_interrupt_exits_130_quietly(run, monkeypatch):
    def interrupted(cfg, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_migrate", interrupted)
    assert run("migrate") == (130, "", "")


# -- serve ------------------------------------------------------------------------------------


def test_serve_without_the_mcp_module(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "taskorch.mcp_server", None)  # import fails as if absent
    code, out, err = run("serve")
    assert code == 1 and out == ""
    assert "the MCP server is not available in this build" in err


def test_serve_is_the_default_command_and_gets_the_options(run, monkeypatch, db):
    calls = []

    def fake_serve(cfg, **kwargs):
        calls.append((cfg, kwargs))
        return 0

    monkeypatch.setitem(sys.modules, "taskorch.mcp_server", types.SimpleNamespace(serve=fake_serve))
    assert run(use_db=False) == (0, "", "")
    assert calls[-1][1] == {"transport": "stdio", "host": "127.0.0.1", "port": 8080, "insecure": False}
    code, out, _ = run("--transport", "http", "--port", "9001", "--host", "0.0.0.0", "--insecure")
    assert (code, out) == (0, "")
    cfg, kwargs = calls[-1]
    assert kwargs == {"transport": "http", "host": "0.0.0.0", "port": 9001, "insecure": True}
    assert str(cfg.db_path()) == db
    assert run("serve", "--durability", "normal")[0] == 0 and calls[-1][0].store.durability == "normal"
    code, out, err = run("serve", "--port", "0")
    assert code == 2 and out == "" and "server.port" in err
    assert len(calls) == 3


# -- real processes ---------------------------------------------------------------------------


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKORCH_")}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "data"), **extra)
    return env


def _taskorch(*args, cwd, env) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "taskorch"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "taskorch.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_subprocess_add_and_list_from_another_directory(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    env = _env(tmp_path, TASKORCH_DB=str(tmp_path / "q.db"))
    added = subprocess.run(
        [sys.executable, "-m", "taskorch.cli", "tasks", "add", "hello", "--json"],
        cwd=proj, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    task = json.loads(added.stdout)
    assert task["work_path"] == str(proj.resolve())
    listed = _taskorch("tasks", "list", cwd=tmp_path, env=env)
    assert listed.returncode == 0 and task["id"] in listed.stdout
    missing = _taskorch("tasks", "show", "nope", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr
    assert _taskorch("tasks", "frobnicate", cwd=tmp_path, env=env).returncode == 2


def test_subprocess_default_database_lives_in_the_user_data_dir(tmp_path):
    result = _taskorch("migrate", cwd=tmp_path, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    expected = tmp_path / "data" / "taskorch" / "taskorch.db"
    assert expected.exists() and str(expected) in result.stdout
    assert not (tmp_path / "taskorch.db").exists()


def test_subprocess_bad_environment_exits_2(tmp_path):
    env = _env(tmp_path, TASKORCH_DB=str(tmp_path / "q.db"), TASKORCH_TASKS__LEASE_SECONDS="0")
    result = _taskorch("stats", cwd=tmp_path, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert "tasks.lease_seconds" in result.stderr and "Traceback" not in result.stderr


def test_server_py_runs_serve(tmp_path):
    # A bad port fails in configuration, before anything would start: exit 2 from the serve command.
    env = _env(tmp_path, TASKORCH_DB=str(tmp_path / "q.db"))
    result = subprocess.run(
        [sys.executable, str(REPO / "server.py"), "--port", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == "" and "server.port" in result.stderr
