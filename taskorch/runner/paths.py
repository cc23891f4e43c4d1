"""The file tools' half of the sandbox: every path is confined to the work_path by its real path.

`..`, absolute paths and symlinks that lead outside are refused with PATH_OUTSIDE_WORKSPACE, and so
is reading a file with more than one hard link (its other name may be outside; realpath cannot
tell). Writes go to a temporary file in the same directory and are renamed over the target, so a
hard link to an outside file is replaced, never written through. `.git/` and `.taskorch/` are
read-only to the tools. A symlink swapped in between the check and the open is the remaining race
(Python has no openat2 RESOLVE_BENEATH); the final component is opened with O_NOFOLLOW, and the
bwrap mode, where commands cannot reach outside paths at all, closes the rest for commands.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path

PROTECTED_DIRS = (".git", ".taskorch")  # read-only to the file tools
SKIP_IN_LISTINGS = frozenset({".git"})


class ToolError(Exception):
    """A tool call that cannot be carried out; its message goes back to the model."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def outside(path: str) -> ToolError:
    return ToolError("PATH_OUTSIDE_WORKSPACE", f"{path!r} is outside the work path; use a path inside it")


class Workspace:
    """The work_path, resolved once, and the confined file operations on it."""

    def __init__(self, root: str | os.PathLike[str], *, max_read_bytes: int = 256 * 1024,
                 max_write_bytes: int = 1024 * 1024, max_list_entries: int = 500) -> None:  # fmt: skip
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"work path is not a directory: {self.root}")
        self.max_read_bytes = max_read_bytes
        self.max_write_bytes = max_write_bytes
        self.max_list_entries = max_list_entries

    # -- containment ------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """The real path of `path` (relative to the root, or absolute), if it stays inside."""
        if not isinstance(path, str) or "\x00" in path:
            raise ToolError("INVALID_ARGUMENT", "path must be a string without NUL characters")
        candidate = Path(path) if os.path.isabs(path) else self.root / (path or ".")
        real = candidate.resolve(strict=False)
        if real != self.root and not real.is_relative_to(self.root):
            raise outside(path)
        return real

    def relative(self, real: Path) -> str:
        return "." if real == self.root else real.relative_to(self.root).as_posix()

    def is_protected(self, real: Path) -> bool:
        parts = real.relative_to(self.root).parts
        return bool(parts) and parts[0] in PROTECTED_DIRS

    # -- operations -------------------------------------------------------------------------

    def read_text(self, path: str, offset: int = 1, limit: int | None = None) -> tuple[str, dict]:
        """Lines offset.. (1-based) of a text file, at most `limit` lines and max_read_bytes."""
        real = self.resolve(path)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ToolError("NOT_FOUND", f"{path!r} does not exist") from None
        except OSError as e:
            if e.errno == 40:  # ELOOP: a symlink appeared after the check
                raise outside(path) from None
            raise ToolError("OS_ERROR", f"cannot open {path!r}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise ToolError("IS_A_DIRECTORY", f"{path!r} is a directory; use list_files")
            if not stat.S_ISREG(st.st_mode):
                raise ToolError("NOT_A_FILE", f"{path!r} is not a regular file")
            if st.st_nlink > 1:
                raise ToolError("PATH_OUTSIDE_WORKSPACE", f"{path!r} has {st.st_nlink} hard links; "
                                "another name of it may be outside the work path, so it is not read")  # fmt: skip
            data = f.read(self.max_read_bytes + 1)
        if b"\x00" in data[:8192]:
            raise ToolError("BINARY_FILE", f"{path!r} looks binary; only text files can be read")
        cut = len(data) > self.max_read_bytes
        lines = data[: self.max_read_bytes].decode("utf-8", errors="replace").splitlines(keepends=True)
        start = max(1, int(offset)) - 1
        end = len(lines) if limit is None else start + max(0, int(limit))
        chunk = "".join(lines[start:end])
        info = {"path": self.relative(real), "lines": f"{start + 1}-{min(end, len(lines))} of {len(lines)}",
                "truncated_at_bytes": self.max_read_bytes if cut else None}  # fmt: skip
        return chunk, info

    def write_text(self, path: str, content: str, *, pattern: re.Pattern[str] | None = None) -> str:
        """Write atomically (temp file + rename). Returns the relative path written."""
        if not isinstance(content, str):
            raise ToolError("INVALID_ARGUMENT", "content must be a string")
        data = content.encode("utf-8")
        if len(data) > self.max_write_bytes:
            raise ToolError("TOO_LARGE", f"content is {len(data)} bytes; the limit is {self.max_write_bytes}")
        real = self.resolve(path)
        if real == self.root:
            raise ToolError("IS_A_DIRECTORY", "cannot write to the work path itself; name a file")
        if self.is_protected(real):
            raise ToolError("READ_ONLY_PATH", f"{self.relative(real)!r} is inside a read-only directory "
                            f"({', '.join(PROTECTED_DIRS)})")  # fmt: skip
        rel = self.relative(real)
        if pattern is not None and not pattern.search(rel):
            raise ToolError("WRITE_NOT_ALLOWED", f"this task may only write files matching {pattern.pattern!r}")
        if real.is_dir():
            raise ToolError("IS_A_DIRECTORY", f"{rel!r} is a directory")
        self._make_parents(real.parent, path)
        mode = 0o644
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(os.stat(real, follow_symlinks=False).st_mode)
        fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=".taskorch-tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, real)  # replaces the directory entry: an outside hard link is left untouched
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return rel

    def _make_parents(self, parent: Path, asked: str) -> None:
        for d in [*reversed(parent.parents), parent]:
            if d == self.root or not d.is_relative_to(self.root):
                continue
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                # resolve() already followed any symlink; one here appeared since: refuse.
                if d.is_symlink():
                    raise outside(asked)
                raise ToolError("NOT_A_DIRECTORY", f"{self.relative(d)!r} is not a directory")
            if not d.exists():
                d.mkdir()

    def list_files(self, path: str = ".", recursive: bool = False, max_depth: int = 4) -> tuple[str, int]:
        """A listing (directories end with '/', symlinks with '@'), .git skipped, symlinked
        directories not followed. Returns (text, number of entries left out)."""
        real = self.resolve(path)
        if not real.is_dir():
            raise ToolError("NOT_A_DIRECTORY", f"{path!r} is not a directory")
        lines: list[str] = []
        omitted = 0
        stack = [(real, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                lines.append(f"{self.relative(Path(d))}/ (unreadable: {e.strerror})")
                continue
            subdirs = []
            for e in entries:
                if e.name in SKIP_IN_LISTINGS:
                    continue
                if len(lines) >= self.max_list_entries:
                    omitted += 1
                    continue
                rel = self.relative(Path(e.path))
                if e.is_symlink():
                    lines.append(rel + "@")
                elif e.is_dir(follow_symlinks=False):
                    lines.append(rel + "/")
                    if recursive and depth + 1 < max_depth:
                        subdirs.append((Path(e.path), depth + 1))
                else:
                    lines.append(rel)
            stack.extend(reversed(subdirs))
        return "\n".join(lines), omitted
