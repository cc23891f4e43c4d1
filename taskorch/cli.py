"""The `taskorch` command line: run the MCP server, migrate the database, inspect and edit tasks.

Every command is a thin call into the service API. Logs go to stderr; stdout carries only the
command's output (and, for `serve` over stdio, nothing but the MCP protocol).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
from pydantic import BaseModel

from . import __version__
from .config import Config, ConfigError, load_config
from .errors import TaskorchError, ValidationError
from .models import Statistics, Task, TaskEvent, TaskWithEvents
from .service import TaskService, open_service

_GLOBAL_VALUE_OPTIONS = ("--db", "--config", "--durability", "--log-level", "--log-format")
_GLOBAL_NAMES = ("db", "config", "durability", "log_level", "log_format", "json")


# -- output helpers ---------------------------------------------------------------------------


def _dump(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, indent=2, ensure_ascii=False)


def _when(dt: datetime | None) -> str:
    return "-" if dt is None else dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    minutes, sec = divmod(int(s), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {sec:02d}s"


def _cut(text: str, width: int, left: bool = False) -> str:
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if left else text[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _task_line(task: Task) -> str:
    return f"{task.id}  {task.status.value}  version {task.version}  {task.title}"


def _render_task(task: Task, events: list[TaskEvent] | None = None) -> str:
    def js(value: Any) -> str:
        return "-" if value is None else json.dumps(value, ensure_ascii=False)

    fields = [
        ("id", task.id), ("title", task.title), ("status", task.status.value),
        ("priority", task.priority.value), ("work_path", task.work_path),
        ("tags", ", ".join(task.tags) or "-"), ("depends_on", ", ".join(task.depends_on) or "-"),
        ("attempts", f"{task.attempts}/{task.max_attempts}"), ("version", task.version),
        ("worker", task.worker_id or "-"), ("lease expires", _when(task.lease_expires_at)),
        ("run after", _when(task.run_after)), ("timeout", f"{task.timeout_seconds}s"),
        ("idempotency key", task.idempotency_key or "-"), ("created", _when(task.created_at)),
        ("updated", _when(task.updated_at)), ("started", _when(task.started_at)),
        ("completed", _when(task.completed_at)), ("metadata", js(task.metadata or None)),
        ("result", js(task.result)), ("error", js(task.error)),
    ]  # fmt: skip
    lines = [f"{name + ':':<17}{value}" for name, value in fields]
    lines += ["", "prompt:", *("  " + line for line in task.prompt.splitlines())]
    if events is not None:
        rows = [
            (_when(e.at), e.kind, e.from_status.value if e.from_status else "-", e.to_status.value,
             e.worker_id or "-", e.version, _cut(js(e.detail), 60))
            for e in events
        ]  # fmt: skip
        lines += ["", "events:", _table(("AT", "KIND", "FROM", "TO", "WORKER", "VERSION", "DETAIL"), rows)]
    return "\n".join(lines)


def _render_stats(s: Statistics) -> str:
    def dur(d: Any) -> str:
        return f"p50 {_seconds(d.p50_seconds)}, p95 {_seconds(d.p95_seconds)} (n={d.count})"

    rate = "-" if s.success_rate is None else f"{s.success_rate:.1%}"
    lines = [
        f"tasks:            {s.total}",
        "by status:        " + ", ".join(f"{k} {n}" for k, n in s.by_status.items()),
        "by priority:      " + ", ".join(f"{k} {n}" for k, n in s.by_priority.items()),
        f"oldest waiting:   {_seconds(s.oldest_waiting_age_seconds)}",
        f"wait time (24h):  {dur(s.wait_time)}",
        f"run time (24h):   {dur(s.run_time)}",
        f"last hour:        {s.completed_last_hour} completed, {s.failed_last_hour} failed",
        f"success rate:     {rate}",
        f"active workers:   {s.active_workers}",
        f"leases recovered: {s.leases_recovered}",
        f"retries:          {s.retries}",
    ]
    if s.by_work_path:
        rows = [(w.work_path, w.waiting, w.working, w.completed, w.failed, w.cancelled) for w in s.by_work_path]
        lines += ["", _table(("WORK_PATH", "WAITING", "WORKING", "COMPLETED", "FAILED", "CANCELLED"), rows)]
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------


def _abs(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


async def _add(svc: TaskService, a: argparse.Namespace) -> Task:
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    metadata = None
    if a.metadata is not None:
        try:
            metadata = json.loads(a.metadata)
        except json.JSONDecodeError as e:
            raise ValidationError(f"metadata: is not valid JSON ({e.msg} at character {e.pos})") from None
    return await svc.create_task(
        work_path=_abs(a.work_path) or os.getcwd(), prompt=prompt, title=a.title, priority=a.priority,
        tags=a.tag, depends_on=a.depends_on, max_attempts=a.max_attempts, idempotency_key=a.idempotency_key,
        metadata=metadata, delay_seconds=a.delay, timeout_seconds=a.timeout,
    )  # fmt: skip


async def _list(svc: TaskService, a: argparse.Namespace) -> Any:
    return await svc.list_tasks(
        status=a.status, work_path=_abs(a.work_path), priority=a.priority, tag=a.tag, limit=a.limit, offset=a.offset
    )


def _render_list(page: Any) -> str:
    rows = [
        (t.id, t.status.value, t.priority.value, f"{t.attempts}/{t.max_attempts}", _cut(t.work_path, 40, left=True),
         _cut(t.title, 40), _when(t.created_at))
        for t in page.tasks
    ]  # fmt: skip
    table = _table(("ID", "STATUS", "PRIORITY", "ATTEMPTS", "WORK_PATH", "TITLE", "CREATED"), rows) if rows else ""
    start = page.offset + 1 if rows else page.offset
    summary = f"{len(rows)} of {page.total} task(s)" + (f" (from #{start})" if page.offset else "")
    return f"{table}\n{summary}" if table else summary


async def _show(svc: TaskService, a: argparse.Namespace) -> TaskWithEvents:
    return await svc.get_task(task_id=a.id, include_events=a.events)


async def _cancel(svc: TaskService, a: argparse.Namespace) -> Task:
    return await svc.cancel_task(task_id=a.id, reason=a.reason, expected_version=a.expected_version)


async def _retry(svc: TaskService, a: argparse.Namespace) -> Task:
    return await svc.retry_task(task_id=a.id, expected_version=a.expected_version)


async def _stats(svc: TaskService, a: argparse.Namespace) -> Statistics:
    return await svc.statistics(work_path=_abs(a.work_path))


async def _cleanup(svc: TaskService, a: argparse.Namespace) -> Any:
    return await svc.cleanup(older_than_hours=a.older_than_hours, max_tasks=a.max_tasks)


def _service_command(fn: Callable[..., Any], render: Callable[[Any], str]) -> Callable[..., int]:
    def run(cfg: Config, a: argparse.Namespace) -> int:
        async def go() -> Any:
            async with open_service(config=cfg, durability=a.durability, sweep=False) as svc:
                try:
                    return await fn(svc, a)
                except TaskorchError as e:  # raised inside open_service's task group it would come out
                    return e  # wrapped in an ExceptionGroup; re-raise it bare, outside

        result = anyio.run(go)
        if isinstance(result, TaskorchError):
            raise result
        print(_dump(result) if a.json else render(result))
        return 0

    return run


def _migrate(cfg: Config, a: argparse.Namespace) -> int:
    from .stores import is_postgres_url, migrate_store, redacted_url

    location = cfg.db_location()
    shown = redacted_url(location) if is_postgres_url(location) else str(location)  # type: ignore[arg-type]
    applied = anyio.run(migrate_store, location, cfg)
    if a.json:
        print(_dump({"db_path": shown, "applied": applied}))
    else:
        print("\n".join(f"applied {name}" for name in applied) if applied else "database is up to date")
        print(f"database: {shown}")
    return 0


def _serve(cfg: Config, a: argparse.Namespace) -> int:
    try:
        from .mcp_server import serve
    except ImportError as e:
        if e.name != f"{__package__}.mcp_server":
            raise
        print("taskorch: the MCP server is not available in this build", file=sys.stderr)
        return 1
    s = cfg.server
    rc = serve(cfg, transport=s.transport, host=s.host, port=s.port, insecure=a.insecure)
    return 0 if rc is None else int(rc)


# -- parsing ----------------------------------------------------------------------------------


def _global_options() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's default.
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("global options")
    g.add_argument(
        "--db", metavar="PATH|URL", help="SQLite file or postgresql:// URL (default: store.path or the user data dir)"
    )
    g.add_argument("--config", metavar="FILE", help="YAML configuration file (also TASKORCH_CONFIG)")
    g.add_argument("--durability", choices=("full", "normal"), help="store.durability: full or normal")
    g.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    g.add_argument("--log-format", choices=("text", "json"), help="log format on stderr")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def _parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog="taskorch", parents=[common], description="A durable task queue that AI assistants share over MCP."
    )
    parser.add_argument("--version", action="version", version=f"taskorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(parent: Any, name: str, help: str, run: Callable[..., int]) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(run=run)
        return p

    p = command(sub, "serve", "run the MCP server (the default command)", _serve)
    p.add_argument("--transport", choices=("stdio", "http"))
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--insecure", action="store_true", help="allow http without API keys on a non-loopback host")
    command(sub, "migrate", "create the database and apply pending migrations", _migrate)

    tasks = sub.add_parser("tasks", parents=[common], help="add, list, show, cancel and retry tasks")
    tsub = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    p = command(tsub, "add", "file a task", _service_command(_add, _render_task))
    p.add_argument("prompt", metavar="PROMPT", help="what to do ('-' reads it from stdin)")
    p.add_argument("--work-path", metavar="DIR", help="project directory (default: the current directory)")
    p.add_argument("--title")
    p.add_argument("--priority", help="low, medium, high or urgent")
    p.add_argument("--tag", action="append", metavar="TAG")
    p.add_argument("--depends-on", action="append", metavar="ID")
    p.add_argument("--max-attempts", type=int, metavar="N")
    p.add_argument("--delay", type=float, metavar="SECONDS")
    p.add_argument("--timeout", type=int, metavar="SECONDS")
    p.add_argument("--idempotency-key", metavar="KEY")
    p.add_argument("--metadata", metavar="JSON", help="a JSON object")
    p = command(tsub, "list", "list tasks, newest first", _service_command(_list, _render_list))
    p.add_argument("--status")
    p.add_argument("--work-path", metavar="DIR")
    p.add_argument("--priority")
    p.add_argument("--tag")
    p.add_argument("--limit", type=int, metavar="N")
    p.add_argument("--offset", type=int, metavar="N")
    p = command(tsub, "show", "show a task", _service_command(_show, lambda r: _render_task(r.task, r.events)))
    p.add_argument("id", metavar="ID")
    p.add_argument("--events", action="store_true", help="include the task's history")
    p = command(tsub, "cancel", "cancel a waiting or working task", _service_command(_cancel, _task_line))
    p.add_argument("id", metavar="ID")
    p.add_argument("--reason")
    p.add_argument("--expected-version", type=int, metavar="V")
    p = command(tsub, "retry", "put a failed or cancelled task back to waiting", _service_command(_retry, _task_line))
    p.add_argument("id", metavar="ID")
    p.add_argument("--expected-version", type=int, metavar="V")

    p = command(sub, "stats", "queue statistics", _service_command(_stats, _render_stats))
    p.add_argument("--work-path", metavar="DIR")
    p = command(
        sub, "cleanup", "delete old finished tasks",
        _service_command(_cleanup, lambda r: f"deleted {r.deleted} task(s); {r.remaining} remaining"),
    )  # fmt: skip
    p.add_argument("--older-than-hours", type=float, metavar="H", help="default: retention.completed_hours")
    p.add_argument("--max-tasks", type=int, metavar="N", help="default: retention.max_tasks")

    # argparse only at import time: the runner (litellm, the sandbox) loads when worker/run runs.
    from .runner.cli import add_runner_commands

    add_runner_commands(sub, common)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    """`taskorch [global options] [serve options]` means `taskorch serve ...`."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in _GLOBAL_VALUE_OPTIONS:
            i += 2
        elif tok == "--json" or tok.split("=", 1)[0] in _GLOBAL_VALUE_OPTIONS:
            i += 1
        else:
            break
    if i >= len(argv) or (argv[i].startswith("-") and argv[i] not in ("-h", "--help", "--version")):
        return ["serve", *argv]
    return argv


# -- logging ----------------------------------------------------------------------------------


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_QUIET = ("aiosqlite", "asyncio")  # at DEBUG they log every statement, parameters (prompts) included


def _setup_logging(cfg: Config) -> Callable[[], None]:
    """Log to stderr at the configured level; return the function that undoes it."""
    handler = logging.StreamHandler(sys.stderr)
    if cfg.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(), *map(logging.getLogger, _QUIET)]
    old_levels = [lg.level for lg in loggers]
    loggers[0].addHandler(handler)
    loggers[0].setLevel(cfg.logging.level)
    for lg in loggers[1:]:
        lg.setLevel(max(logging.INFO, loggers[0].level))

    def undo() -> None:
        loggers[0].removeHandler(handler)
        for lg, level in zip(loggers, old_levels, strict=True):
            lg.setLevel(level)

    return undo


# -- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(_with_default_command(argv))
    except SystemExit as e:  # usage error (2) or --help / --version (0)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    for name in _GLOBAL_NAMES:
        if not hasattr(args, name):
            setattr(args, name, False if name == "json" else None)
    overrides: dict[str, Any] = {
        "store": {"path": args.db, "durability": args.durability},
        "logging": {"level": args.log_level, "format": args.log_format},
    }
    if args.command == "serve":
        overrides["server"] = {"transport": args.transport, "host": args.host, "port": args.port}
    try:
        cfg = load_config(config_file=args.config, overrides=overrides)
    except ConfigError as e:
        print("taskorch: configuration error: " + str(e).replace("\n", "\n  "), file=sys.stderr)
        return 2
    undo_logging = _setup_logging(cfg)
    try:
        return args.run(cfg, args)
    except ConfigError as e:  # found only when the store opens (e.g. a PostgreSQL URL without asyncpg)
        print("taskorch: configuration error: " + str(e).replace("\n", "\n  "), file=sys.stderr)
        return 2
    except TaskorchError as e:
        print(f"taskorch: {e.code}: {e.message}", file=sys.stderr)
        if args.json and args.command != "serve":  # stdout is the MCP protocol in stdio mode
            print(_dump({"error": {"code": e.code, "message": e.message}}))
        return 1
    except OSError as e:  # e.g. the database directory cannot be created
        print(f"taskorch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        undo_logging()


if __name__ == "__main__":
    raise SystemExit(main())
