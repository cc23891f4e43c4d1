"""The tools offered to the model, and how their results are shown to it.

A tool never raises to the agent: refusals and failures become an `ERROR <CODE>: message` text the
model can read and act on. Long command output is shown as head + tail, with the full captured text
saved under `.taskorch/runs/<task>/` where read_file can page through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .paths import ToolError, Workspace
from .policy import CommandPolicy, split_command
from .sandbox import CommandSandbox

_STR = {"type": "string"}
SCHEMAS: dict[str, dict[str, Any]] = {
    "read_file": {
        "description": "Read a text file in the work path. Lines are numbered from 1; use offset and limit to page.",
        "parameters": {"type": "object", "properties": {
            "path": {**_STR, "description": "path relative to the work path"},
            "offset": {"type": "integer", "description": "first line to read (default 1)"},
            "limit": {"type": "integer", "description": "number of lines to read (default: as many as fit)"},
        }, "required": ["path"]},
    },
    "write_file": {
        "description": "Create or replace a text file in the work path with the given content (the whole file).",
        "parameters": {"type": "object", "properties": {
            "path": {**_STR, "description": "path relative to the work path"},
            "content": {**_STR, "description": "the complete new content"},
        }, "required": ["path", "content"]},
    },
    "list_files": {
        "description": "List a directory of the work path ('/' marks directories, '@' symlinks; .git is skipped).",
        "parameters": {"type": "object", "properties": {
            "path": {**_STR, "description": "directory relative to the work path (default '.')"},
            "recursive": {"type": "boolean", "description": "descend into subdirectories (default false)"},
        }},
    },
    "run_command": {
        "description": "Run a program in the work path and return its exit code and output (stdout and stderr). "
                       "Without a shell unless the task allows one: no pipes or redirections. Stdin is closed; "
                       "background processes are stopped when the command ends.",
        "parameters": {"type": "object", "properties": {
            "command": {**_STR, "description": "the command line, e.g. 'python -m pytest -q tests'"},
            "timeout": {"type": "integer", "description": "seconds before it is killed (default 60)"},
            "cwd": {**_STR, "description": "directory relative to the work path (default '.')"},
        }, "required": ["command"]},
    },
    "finish": {
        "description": "End the task: report whether it succeeded, a one-paragraph summary, optional details, and "
                       "the paths of the files that matter (artifacts). Call it alone, as the last call.",
        "parameters": {"type": "object", "properties": {
            "success": {"type": "boolean"},
            "summary": _STR,
            "details": _STR,
            "artifacts": {"type": "array", "items": _STR},
        }, "required": ["success", "summary"]},
    },
}  # fmt: skip


def tool_schema(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **SCHEMAS[name]}}


def clip(text: str, limit: int, note: str = "") -> str:
    """Head + tail of `text` within `limit` characters (errors tend to sit at the end: more tail)."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 5
    tail = limit - head
    elided = len(text) - head - tail
    return f"{text[:head]}\n[... {elided} characters elided{note} ...]\n{text[-tail:]}"


@dataclass
class ToolOutcome:
    content: str  # what the model sees
    ok: bool
    code: str | None = None  # error code when not ok
    returncode: int | None = None
    timed_out: bool = False
    saved_to: str | None = None
    wrote: str | None = None  # relative path written by write_file


@dataclass
class Toolbox:
    """The tools of one run. `enabled` are offered to the model; `unavailable` says why others are not."""

    workspace: Workspace
    sandbox: CommandSandbox | None
    enabled: tuple[str, ...]
    task_id: str = "task"
    write_pattern: re.Pattern[str] | None = None
    writable: bool = True
    allow_shell: bool = False
    policy: CommandPolicy = field(default_factory=CommandPolicy)
    command_timeout: float = 60.0
    max_command_timeout: float = 600.0
    display_chars: int = 10_000
    keep_full_outputs: bool = True
    unavailable: dict[str, str] = field(default_factory=dict)

    def schemas(self) -> list[dict[str, Any]]:
        return [tool_schema(n) for n in self.enabled]

    async def run(self, name: str, args: dict[str, Any], step: int, time_left: float | None = None) -> ToolOutcome:
        """Run one tool call; never raises for the model's mistakes. time_left caps command timeouts."""
        try:
            if name not in self.enabled:
                why = self.unavailable.get(name)
                raise ToolError("UNKNOWN_TOOL", f"{name!r} is not available in this task"
                                + (f": {why}" if why else f"; available: {', '.join(self.enabled)}"))  # fmt: skip
            if name == "read_file":
                return self._read(args)
            if name == "write_file":
                return self._write(args)
            if name == "list_files":
                return self._list(args)
            if name == "run_command":
                return await self._command(args, step, time_left)
            raise ToolError("UNKNOWN_TOOL", f"{name!r} cannot be run here")
        except ToolError as e:
            return ToolOutcome(f"ERROR {e.code}: {e.message}", ok=False, code=e.code)
        except OSError as e:  # e.g. permission denied inside the work path
            return ToolOutcome(f"ERROR OS_ERROR: {e.strerror or e}", ok=False, code="OS_ERROR")

    # -- the tools --------------------------------------------------------------------------

    def _read(self, args: dict[str, Any]) -> ToolOutcome:
        path = _arg(args, "path", str)
        offset = _arg(args, "offset", int, default=1)
        limit = _arg(args, "limit", int, default=None)
        text, info = self.workspace.read_text(path, offset, limit)
        if len(text) > self.display_chars:  # cut at a line boundary and say where to continue
            lines = text[: self.display_chars].splitlines(keepends=True)[:-1] or [text[: self.display_chars]]
            shown = "".join(lines)
            nxt = max(1, offset) + len(lines)
            return ToolOutcome(f"{shown}\n[... showing {len(lines)} lines from line {max(1, offset)}; "
                               f"call read_file with offset={nxt} to continue]", ok=True)  # fmt: skip
        note = f"\n[file truncated at {info['truncated_at_bytes']} bytes]" if info["truncated_at_bytes"] else ""
        return ToolOutcome(text + note if text else f"[no lines in range; {info['lines']}]", ok=True)

    def _write(self, args: dict[str, Any]) -> ToolOutcome:
        path = _arg(args, "path", str)
        content = _arg(args, "content", str)
        rel = self.workspace.write_text(path, content, pattern=self.write_pattern)
        return ToolOutcome(f"wrote {len(content.encode())} bytes to {rel}", ok=True, wrote=rel)

    def _list(self, args: dict[str, Any]) -> ToolOutcome:
        path = _arg(args, "path", str, default=".")
        recursive = _arg(args, "recursive", bool, default=False)
        text, omitted = self.workspace.list_files(path, recursive)
        more = f"\n[{omitted} more entries not shown; list a subdirectory]" if omitted else ""
        return ToolOutcome((text or "[empty directory]") + more, ok=True)

    async def _command(self, args: dict[str, Any], step: int, time_left: float | None) -> ToolOutcome:
        assert self.sandbox is not None  # run_command is only enabled with a sandbox
        command = _arg(args, "command", str)
        timeout = float(_arg(args, "timeout", int, default=int(self.command_timeout)))
        timeout = max(1.0, min(timeout, self.max_command_timeout, time_left or self.max_command_timeout))
        cwd_arg = _arg(args, "cwd", str, default=".")
        cwd = self.workspace.resolve(cwd_arg)
        if not cwd.is_dir():
            raise ToolError("NOT_A_DIRECTORY", f"cwd {cwd_arg!r} is not a directory")
        argv = split_command(command, allow_shell=self.allow_shell)
        self.policy.check(argv, work_path=self.workspace.root, shell_text=command if self.allow_shell else None)
        r = await self.sandbox.run(argv, cwd=cwd, time_limit=timeout, writable=self.writable)
        output = r.output
        if r.captured_bytes < r.total_bytes:
            output += f"\n[output capped: {r.total_bytes} bytes produced, the first {r.captured_bytes} kept]"
        saved = None
        if len(output) > self.display_chars and self.keep_full_outputs:
            saved = self._save(output, step)
        note = f"; the full output is in {saved} (page it with read_file offset/limit)" if saved else ""
        shown = clip(output, self.display_chars, note)
        status = "killed (timeout)" if r.timed_out else f"{r.returncode}"
        lines = [f"exit code: {status}", *(f"note: {n}" for n in r.notes), "output:", shown or "[no output]"]
        return ToolOutcome("\n".join(lines), ok=r.returncode == 0 and not r.timed_out, returncode=r.returncode,
                           timed_out=r.timed_out, saved_to=saved)  # fmt: skip

    def _save(self, text: str, step: int) -> str | None:
        rel = f".taskorch/runs/{self.task_id}/step-{step:03d}.log"
        try:
            real = self.workspace.resolve(rel)  # .taskorch could be a symlink out of the work path
            real.parent.mkdir(parents=True, exist_ok=True)
            if real.parent.resolve() != real.parent or not real.parent.is_relative_to(self.workspace.root):
                return None
            real.write_text(text, encoding="utf-8")
        except (ToolError, OSError):
            return None
        return rel


_MISSING = object()


def _arg(args: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    value = args.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise ToolError("INVALID_ARGUMENT", f"missing argument {name!r}")
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ToolError("INVALID_ARGUMENT", f"argument {name!r} must be a {kind.__name__}")
    return value


def model_paths(paths: list[Any], workspace: Workspace) -> tuple[list[str], list[str]]:
    """Split finish's artifacts into (paths inside the work path, relative; rejected)."""
    ok: list[str] = []
    bad: list[str] = []
    for p in paths:
        if not isinstance(p, str):
            bad.append(repr(p)[:100])
            continue
        try:
            ok.append(workspace.relative(workspace.resolve(p)))
        except ToolError:
            bad.append(p[:200])
    return list(dict.fromkeys(ok)), bad


__all__ = ["SCHEMAS", "ToolOutcome", "Toolbox", "clip", "model_paths", "tool_schema"]
