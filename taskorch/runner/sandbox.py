"""Running the model's commands: bwrap (the boundary) or none (the runner's own rights).

Every mode: argv exec (a shell only when the task allows it), stdin closed, a new session and
process group killed as a whole on timeout and when the command ends, rlimits through `prlimit`
(CPU, address space, file size, open files, no core files), at most `output_cap` bytes captured while
the rest is drained, and an environment built from an allowlist: the runner's API keys never reach
a command. Where a pids cgroup can be created (cgroup v1 `pids` or v2 with `pids` delegated), each
command runs in its own with `pids.max`, which stops fork bombs and lets every process the command
started be killed, including ones that left its session (`setsid`).

bwrap: the work_path read-write (read-only for read-only scenarios) with its `.git/` and
`.taskorch/` read-only, `/usr`, `/bin`, `/lib*`, `/etc` (less its secrets: shadow, sudoers, ssh
host keys) and configured `ro_paths` read-only, an
empty `/tmp`, fresh /proc and /dev, every namespace unshared (no network, no other processes),
all capabilities dropped (the runner may be root, and root with capabilities can remount a
read-only bind read-write), a new session, and death with the runner. Nothing else of the host is
visible. Files of the work path with several hard links are masked (/dev/null bound over them):
another name of such a file may be outside, and a bind mount would show its content. `none` is
chosen explicitly and contains nothing but the process tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION", re.IGNORECASE)
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Inside bwrap the command is uid 0 without capabilities: owner permissions still let it read
# root-only files of /etc. These are hidden (files: /dev/null over them; directories: a tmpfs).
ETC_SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers", "/etc/sudoers.d",
               "/etc/ssh", "/etc/ssl/private", "/etc/taskorch")  # fmt: skip
MAX_SCAN_ENTRIES = 200_000  # files scanned for hard links per task
EXIT_GRACE_SECONDS = 0.5  # after the command exits, how long its pipe may stay open (backgrounded children)


@dataclass(frozen=True)
class SandboxSettings:
    """How commands run. mode: auto (bwrap when it works, else no run_command), bwrap, none."""

    mode: str = "auto"
    cpu_seconds: int = 300
    memory_bytes: int = 4096 * MiB  # RLIMIT_AS; runtimes that reserve large ranges (JVM, Go) may need more
    file_size_bytes: int = 512 * MiB
    open_files: int = 1024
    max_processes: int = 256  # pids.max when a pids cgroup is available
    output_cap: int = MiB
    ro_paths: tuple[str, ...] = ()  # extra host paths visible read-only in bwrap (e.g. a venv)
    env_passthrough: tuple[str, ...] = ()  # variables copied from the runner; secret-looking names never are
    env: tuple[tuple[str, str], ...] = ()  # fixed extra variables


@dataclass
class CommandResult:
    returncode: int | None
    output: str
    total_bytes: int
    captured_bytes: int
    timed_out: bool
    duration_s: float
    notes: list[str] = field(default_factory=list)


# -- bwrap --------------------------------------------------------------------------------------


@functools.cache
def probe_bwrap() -> tuple[bool, str]:
    """(works, why not). Runs `bwrap ... true` once per process: user namespaces can be blocked
    (containers' seccomp profiles, AppArmor), and then bwrap is installed but useless."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False, "bubblewrap (bwrap) is not installed"
    cmd = [exe, "--ro-bind", "/", "/", "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--new-session",
           "--", "/bin/true"]  # fmt: skip
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=20, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bwrap failed to run: {e}"
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        return False, f"bwrap cannot create its sandbox here: {err[-1] if err else f'exit {r.returncode}'}"
    return True, ""


def resolve_mode(requested: str) -> tuple[str | None, str]:
    """The mode in effect: ("bwrap" | "none" | None, explanation). None: no run_command."""
    if requested == "none":
        return "none", "none: commands run with the runner's own rights (chosen explicitly)"
    ok, why = probe_bwrap()
    if ok:
        return "bwrap", "bwrap: commands see only the work path, system directories (read-only) and an empty /tmp"
    if requested == "bwrap":
        raise RuntimeError(f"sandbox mode bwrap was requested but {why}")
    return None, f"run_command is not available: {why}, and sandbox mode none was not chosen"


# -- pids cgroup --------------------------------------------------------------------------------


class PidsCgroup:
    """A throwaway pids cgroup for one command: a cap on processes and a way to kill them all."""

    _ids = itertools.count()

    def __init__(self, path: Path, v2: bool) -> None:
        self.path = path
        self.v2 = v2

    @classmethod
    def create(cls, max_pids: int) -> PidsCgroup | None:
        parent, v2 = _pids_parent()
        if parent is None:
            return None
        path = parent / f"taskorch-{os.getpid()}-{next(cls._ids)}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(max_pids))
        except OSError as e:
            log.debug("no pids cgroup: %s", e)
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path, v2)

    def join_prefix(self) -> list[str]:
        # The command joins the cgroup before it execs, so no child can be forked outside it.
        return ["/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', str(self.path / "cgroup.procs")]

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> int:
        """SIGKILL everything in the cgroup; returns how many processes were signalled."""
        if self.v2 and (self.path / "cgroup.kill").exists():
            n = len(self.pids())
            with contextlib.suppress(OSError):
                (self.path / "cgroup.kill").write_text("1")
            return n
        n = 0
        for i in range(200):  # v1: a forking process can add members between passes; pids.max bounds them
            found = self.pids()
            if not found:
                break
            for pid in found:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    n += 1
            if i >= 3:
                time.sleep(0.001)  # let the killed ones exit
        return n

    def remove_now(self) -> None:
        """Kill and remove without awaiting (on cancellation); a brief synchronous wait at most."""
        for _ in range(100):
            self.kill_all()
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.005)
        log.warning("could not remove cgroup %s", self.path)

    async def remove(self) -> None:
        for _ in range(100):
            self.kill_all()
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                await asyncio.sleep(0.02)
        log.warning("could not remove cgroup %s", self.path)


@functools.cache
def _pids_parent() -> tuple[Path | None, bool]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, False
    for line in lines:  # cgroup v1: "8:pids:/path"
        _, controllers, rel = line.split(":", 2)
        if "pids" in controllers.split(","):
            base = Path("/sys/fs/cgroup/pids") / rel.lstrip("/")
            if (base / "cgroup.procs").exists() and os.access(base, os.W_OK):
                return base, False
    for line in lines:  # cgroup v2: "0::/path", usable when pids is delegated to our subtree
        if line.startswith("0::"):
            for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                base = Path(mount) / line[3:].lstrip("/")
                try:
                    delegated = "pids" in (base / "cgroup.subtree_control").read_text().split()
                except OSError:
                    continue
                if delegated and os.access(base, os.W_OK):
                    return base, True
    return None, False


def pids_cgroup_available() -> bool:
    return _pids_parent()[0] is not None


# -- the sandbox --------------------------------------------------------------------------------


def scrubbed_env(base: dict[str, str], settings: SandboxSettings) -> dict[str, str]:
    env = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb", "PAGER": "cat", "GIT_PAGER": "cat",
           "PIP_PROGRESS_BAR": "off", "TQDM_DISABLE": "1", "NO_COLOR": "1", "CI": "1",
           "GIT_TERMINAL_PROMPT": "0"}  # fmt: skip
    for name in settings.env_passthrough:
        if name in os.environ and not SECRET_NAME.search(name):
            env[name] = os.environ[name]
    env.update((k, v) for k, v in settings.env if not SECRET_NAME.search(k))
    env.update(base)
    return env


class CommandSandbox:
    """Runs argv in the work_path under one mode. Create with the mode from `resolve_mode`."""

    def __init__(self, work_path: Path, mode: str, settings: SandboxSettings) -> None:
        if mode not in ("bwrap", "none"):
            raise ValueError(f"unknown sandbox mode {mode!r}")
        self.root = work_path
        self.mode = mode
        self.settings = settings
        self._private: Path | None = None  # HOME and TMPDIR of mode none, made on first use
        if mode == "bwrap":
            # Bound read-only only if it exists: without it a command could plant a prompts.yaml
            # that later tasks of this work path would read.
            with contextlib.suppress(OSError):
                (work_path / ".taskorch").mkdir(exist_ok=True)
        self.prlimit = shutil.which("prlimit")
        self._linked: list[str] | None = None

    def close(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "pids_limit": self.settings.max_processes if pids_cgroup_available() else None,
                "rlimits": self.prlimit is not None}  # fmt: skip

    def _path_var(self) -> str:
        host = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
        if self.mode == "none":
            return os.pathsep.join(host)
        visible = ("/usr/", "/bin", "/sbin", *(p.rstrip("/") + "/" for p in self.settings.ro_paths))
        keep = [p for p in host if p.startswith(visible) or p in ("/bin", "/sbin")]
        return os.pathsep.join(dict.fromkeys([*keep, "/usr/local/bin", "/usr/bin", "/bin"]))

    def _env(self) -> dict[str, str]:
        if self.mode == "bwrap":
            base = {"HOME": "/tmp", "TMPDIR": "/tmp", "PATH": self._path_var()}
        else:
            if self._private is None:
                self._private = Path(tempfile.mkdtemp(prefix="taskorch-cmd-"))
            base = {"HOME": str(self._private), "TMPDIR": str(self._private), "PATH": self._path_var()}
        return scrubbed_env(base, self.settings)

    def _bwrap_args(self, cwd: Path, writable: bool) -> list[str]:
        root = str(self.root)
        args = [shutil.which("bwrap") or "bwrap", "--tmpfs", "/tmp"]  # /tmp first: the work path may be under it
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                args += ["--ro-bind", d, d]
        for p in ETC_SECRETS:
            if os.path.isdir(p) and not os.path.islink(p):
                args += ["--tmpfs", p]
            elif os.path.isfile(p) and not os.path.islink(p):
                args += ["--ro-bind", "/dev/null", p]
        for p in self.settings.ro_paths:
            args += ["--ro-bind-try", p, p]
        args += ["--bind" if writable else "--ro-bind", root, root]
        for name in (".git", ".taskorch"):
            inner = self.root / name
            if inner.is_dir() and not inner.is_symlink():
                args += ["--ro-bind", str(inner), str(inner)]
        for path in self._hard_links():  # another name of the file may be outside: hide its content
            args += ["--ro-bind", "/dev/null", path]
        args += ["--proc", "/proc", "--dev", "/dev", "--unshare-all", "--cap-drop", "ALL", "--die-with-parent",
                 "--new-session", "--chdir", str(cwd), "--"]  # fmt: skip
        return args

    def _hard_links(self) -> list[str]:
        """Regular files of the work path (outside .git) with more than one hard link, found once per
        sandbox: bwrap binds the directory, and a hard link would show an outside file's content."""
        if self._linked is None:
            found: list[str] = []
            seen = 0
            for top, dirs, files in os.walk(self.root):
                if top == str(self.root):
                    dirs[:] = [d for d in dirs if d != ".git"]
                for name in files:
                    seen += 1
                    path = os.path.join(top, name)
                    with contextlib.suppress(OSError):
                        st = os.lstat(path)
                        if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                            found.append(path)
                if seen > MAX_SCAN_ENTRIES:
                    log.warning("work path has over %d files; hard links beyond them are not masked", seen)
                    break
            self._linked = found
        return self._linked

    def _rlimit_args(self, timeout: float) -> list[str]:
        if self.prlimit is None:
            return []
        s = self.settings
        cpu = max(1, min(s.cpu_seconds, int(timeout) + 1))
        return [self.prlimit, f"--cpu={cpu}:{cpu + 1}", f"--as={s.memory_bytes}", f"--fsize={s.file_size_bytes}",
                f"--nofile={s.open_files}", "--core=0", "--"]  # fmt: skip

    async def run(self, argv: Sequence[str], *, cwd: Path | None = None, time_limit: float = 60.0,
                  writable: bool = True) -> CommandResult:  # fmt: skip
        """Run to completion or for time_limit seconds; every process it started is gone when this returns."""
        timeout = time_limit
        cwd = cwd or self.root
        inner = list(argv)
        if self.mode == "bwrap":
            cmd = [*self._rlimit_args(timeout), *self._bwrap_args(cwd, writable), *inner]
        else:
            cmd = [*self._rlimit_args(timeout), *inner]
        cgroup = PidsCgroup.create(self.settings.max_processes)
        if cgroup is not None:
            cmd = [*cgroup.join_prefix(), *cmd]
        start = time.monotonic()
        notes: list[str] = []
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=str(cwd) if self.mode == "none" else None, env=self._env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            if cgroup is not None:
                await cgroup.remove()
            return CommandResult(127, f"cannot start {inner[0]!r}: {e.strerror}", 0, 0, False, 0.0)
        buf = bytearray()
        total = 0

        async def drain() -> None:
            nonlocal total
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                total += len(chunk)
                room = self.settings.output_cap - len(buf)
                if room > 0:
                    buf.extend(chunk[:room])
                await asyncio.sleep(0)  # a fast producer keeps read() ready: let the timeout fire

        reader = asyncio.ensure_future(drain())
        timed_out = False
        try:
            try:
                # Not proc.wait(): asyncio's wait() also waits for the pipes, which a backgrounded
                # child can hold open forever.
                await asyncio.wait_for(_exited(proc.pid), timeout)
            except TimeoutError:
                timed_out = True
            else:
                try:  # children still holding the pipe must not keep us waiting (they are killed below)
                    await asyncio.wait_for(asyncio.shield(reader), EXIT_GRACE_SECONDS)
                except TimeoutError:
                    notes.append("processes left running in the background were stopped")
        except BaseException:  # cancelled (the lease was lost, the worker is stopping): kill, then re-raise
            _killpg(proc.pid)
            reader.cancel()
            if cgroup is not None:
                cgroup.remove_now()
            raise
        _killpg(proc.pid)
        killed = cgroup.kill_all() if cgroup is not None else 0
        if killed and self.mode == "none" and not timed_out and not notes:  # bwrap: its namespace ends them
            notes.append("processes left running in the background were stopped")
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await _reap(proc, cgroup)
        if cgroup is not None:
            await cgroup.remove()
        if timed_out:
            notes.append(f"timed out after {timeout:g} s; the command and its processes were killed")
        return CommandResult(proc.returncode, buf.decode("utf-8", errors="replace"), total, len(buf), timed_out,
                             time.monotonic() - start, notes)  # fmt: skip


async def _reap(proc: asyncio.subprocess.Process, cgroup: PidsCgroup | None) -> None:
    """Wait for the killed command, bounded: asyncio's wait() also waits for the pipe, and a process
    that slipped through a kill pass (a fork bomb forking) may still hold it. Kill again until done."""
    for _ in range(20):
        try:
            await asyncio.wait_for(proc.wait(), 0.5)
            return
        except TimeoutError:
            _killpg(proc.pid)
            if cgroup is not None:
                cgroup.kill_all()
    log.warning("command %s did not finish after being killed; its pipe is closed", proc.pid)
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


async def _exited(pid: int) -> None:
    """Return when process `pid` has exited (without reaping it: asyncio's child watcher does)."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already exited and reaped
    except (AttributeError, OSError):  # no pidfd (old kernel): peek with waitid, never reaping
        while True:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:  # noqa: ASYNC222 (WNOHANG)
                    return
            except ChildProcessError:
                return
            await asyncio.sleep(0.05)
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
