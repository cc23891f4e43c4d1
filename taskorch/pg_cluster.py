"""A throwaway PostgreSQL cluster on 127.0.0.1, for the test suite and the benchmark.

Not used by the server. `initdb` takes ~0.5 s and `pg_ctl start` ~0.1 s; the cluster lives in its
own temp dir, trusts loopback connections, listens on a free port with its socket in that dir,
and is stopped and removed by `stop()`. PostgreSQL refuses to run as root, so as root the
binaries run as the `postgres` user through runuser (the temp dir is handed to that user).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile


def find_bindir() -> str | None:
    """The newest installed server's bin directory (Debian keeps them off PATH), or None."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for cand in candidates:
        if cand and os.path.exists(os.path.join(cand, "initdb")) and os.path.exists(os.path.join(cand, "pg_ctl")):
            return cand
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(initdb))
    return None


def _version_key(path: str) -> int:
    part = path.rstrip("/").split("/")[-2]
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`url = Cluster().start()`; `stop()` when done (also after a failed start)."""

    def __init__(self, bindir: str | None = None, *, fsync: bool = True, max_connections: int = 100) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError("no PostgreSQL server binaries found (apt-get install postgresql)")
        self.bindir = found
        self.fsync = fsync
        self.max_connections = max_connections
        self.dir = tempfile.mkdtemp(prefix="taskorch-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = _free_port()
        self.started = False
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, program: str, *args: str) -> str:
        cmd = [*self._as_user, os.path.join(self.bindir, program), *args]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stdout[-2000:]}")
        return done.stdout

    def start(self) -> str:
        """Create and start the cluster; return its URL (user postgres, database postgres)."""
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections={self.max_connections}"
            + ("" if self.fsync else " -c fsync=off -c full_page_writes=off")
        )
        log = os.path.join(self.dir, "server.log")
        self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-t", "60", "-o", opts, "start")
        self.started = True
        return self.url

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
