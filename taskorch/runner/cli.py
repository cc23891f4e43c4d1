"""`taskorch worker` and `taskorch run`: the runner's commands.

This module imports only the standard library at import time, so that `taskorch/cli.py` can add
the commands to its parser without loading the runner: the agent, the sandbox and litellm are
imported inside `run_worker` / `run_once`. Wiring (taskorch/cli.py, in `_parser()`):

    from .runner.cli import add_runner_commands
    add_runner_commands(sub, common)

`python -m taskorch.runner worker|run ...` runs the same commands on their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

log = logging.getLogger("taskorch.runner")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _common_runner_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="litellm model name, e.g. openai/gpt-4o-mini (default: llm.model)")
    g.add_argument("--api-base", metavar="URL", help="model API base URL (default: llm.api_base)")
    g = p.add_argument_group("queue (default: the local database, see --db)")
    g.add_argument("--server", metavar="URL", help="use a taskorch HTTP server instead of the local database")
    g.add_argument("--api-key", metavar="KEY", help="the server's API key (visible in ps: prefer --api-key-env)")
    g.add_argument("--api-key-env", metavar="NAME", help="read the server's API key from this environment variable")
    g = p.add_argument_group("limits and sandbox")
    g.add_argument("--sandbox", choices=("auto", "bwrap", "none"),
                   help="auto (default): bwrap when it works, else no run_command; none: no isolation")  # fmt: skip
    g.add_argument("--max-steps", type=int, metavar="N", help="model calls per task (default 30)")
    g.add_argument("--cost-limit", type=float, metavar="USD", help="cost per task; 0 = none (default 1.0)")
    g.add_argument("--wall-time", type=float, metavar="SECONDS", help="time per task (default 900)")
    g.add_argument("--command-timeout", type=float, metavar="SECONDS", help="default per-command timeout (60)")
    g.add_argument("--allow-shell", action="store_true", default=None, help="run commands through bash -c")


def add_runner_commands(subparsers: Any, parent_parser: argparse.ArgumentParser) -> None:
    """Add `worker` and `run` to taskorch's subcommands. `parent_parser` carries the global options."""
    p = subparsers.add_parser("worker", parents=[parent_parser], help="claim and run tasks of a work path with an LLM",
                              description="Claim tasks for a work path and run each with an LLM "
                              "(needs the runner extra: pip install 'taskorch[runner]').")  # fmt: skip
    p.set_defaults(run=run_worker)
    p.add_argument("--work-path", metavar="DIR", help="project directory (default: the current directory)")
    p.add_argument("--once", action="store_true", help="run one task, or exit 0 at once if there is none")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="tasks run at once (default 1)")
    p.add_argument("--lease-seconds", type=float, metavar="S", help="lease length (default: tasks.lease_seconds)")
    p.add_argument("--wait-seconds", type=float, default=10.0, metavar="S", help="long-poll wait per claim (10)")
    p.add_argument("--include-subpaths", action="store_true", help="also claim tasks of directories below DIR")
    p.add_argument("--tag", action="append", metavar="TAG", help="claim only tasks with one of these tags")
    p.add_argument("--worker-id", metavar="ID", help="default: hostname-pid")
    _common_runner_options(p)

    p = subparsers.add_parser("run", parents=[parent_parser], help="run one task now, in the foreground",
                              description="File a task, run it here with live progress on stderr, and print "
                              "the result (needs the runner extra).")  # fmt: skip
    p.set_defaults(run=run_once)
    p.add_argument("prompt", metavar="PROMPT", help="what to do ('-' reads it from stdin)")
    p.add_argument("--work-path", metavar="DIR", help="project directory (default: the current directory)")
    p.add_argument("--output", choices=("text", "verbose", "json"), default=None, help="result format (text)")
    p.add_argument("--scenario", help="prompt scenario (default: inferred from the prompt)")
    p.add_argument("--title")
    _common_runner_options(p)


# -- building the pieces ------------------------------------------------------------------------


class UsageError(Exception):
    """Bad settings: exit code 2."""


def _opt(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, None)


def _runner_settings(cfg: Any, args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from .session import RunnerSettings

    section = getattr(cfg, "runner", None)  # a `runner:` configuration section, once config.py has one
    base = section.model_dump() if hasattr(section, "model_dump") else dict(section or {})
    flags = {"sandbox": _opt(args, "sandbox"), "max_steps": _opt(args, "max_steps"),
             "cost_limit_usd": _opt(args, "cost_limit"), "wall_time_seconds": _opt(args, "wall_time"),
             "command_timeout_seconds": _opt(args, "command_timeout"),
             "allow_shell": _opt(args, "allow_shell")}  # fmt: skip
    try:
        return RunnerSettings(**{**base, **{k: v for k, v in flags.items() if v is not None}})
    except ValidationError as e:
        raise UsageError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None


def _llm(cfg: Any, args: argparse.Namespace, settings: Any) -> Any:
    from .llm import LlmClient, LlmSettings, NoModelConfigured

    llm_cfg = getattr(cfg, "llm", None)
    s = LlmSettings(
        model=_opt(args, "model") or getattr(llm_cfg, "model", None),
        api_base=_opt(args, "api_base") or getattr(llm_cfg, "api_base", None),
        timeout_seconds=float(getattr(llm_cfg, "timeout_seconds", 120.0)),
        retries=settings.llm_retries,
        input_cost_per_token=settings.input_cost_per_token,
        output_cost_per_token=settings.output_cost_per_token,
    )
    try:
        return LlmClient(s)
    except NoModelConfigured as e:
        raise UsageError(str(e)) from None
    except ModuleNotFoundError as e:
        if e.name not in ("litellm", "openai"):
            raise
        raise UsageError("the runner needs litellm: pip install 'taskorch[runner]'") from None


def _check_sandbox(settings: Any) -> str:
    from .sandbox import resolve_mode

    try:
        mode, text = resolve_mode(settings.sandbox)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    if mode is None:
        log.warning("%s", text)
    return text


def _api_key(args: argparse.Namespace) -> str | None:
    if _opt(args, "api_key_env"):
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UsageError(f"--api-key-env: the environment variable {args.api_key_env} is not set")
        return key
    return _opt(args, "api_key")


class _Queue:
    """The local service or the remote client, as an async context manager."""

    def __init__(self, cfg: Any, args: argparse.Namespace) -> None:
        self.cfg, self.args = cfg, args
        self._cm: Any = None

    async def __aenter__(self) -> Any:
        if _opt(self.args, "server"):
            from ..client import TaskorchClient  # written alongside: same method names as the service

            client = TaskorchClient(self.args.server, api_key=_api_key(self.args))
            if hasattr(client, "__aenter__"):
                self._cm = client
                return await client.__aenter__()
            self._cm = client
            return client
        from ..service import open_service

        self._cm = open_service(config=self.cfg, durability=_opt(self.args, "durability"))
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        if hasattr(self._cm, "__aexit__"):
            await self._cm.__aexit__(*exc)
        elif hasattr(self._cm, "aclose"):
            await self._cm.aclose()


def _install_signals(stop: Any) -> None:
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def _work_path(args: argparse.Namespace) -> str:
    return os.path.abspath(os.path.expanduser(_opt(args, "work_path") or os.getcwd()))


# -- worker -------------------------------------------------------------------------------------


def run_worker(cfg: Any, args: argparse.Namespace) -> int:
    """`taskorch worker`: claim and run tasks until stopped (or one with --once)."""
    import asyncio

    try:
        settings = _runner_settings(cfg, args)
        sandbox_text = _check_sandbox(settings)
        llm = _llm(cfg, args, settings)
        _api_key(args)
    except UsageError as e:
        print(f"taskorch: {e}", file=sys.stderr)
        return EXIT_USAGE
    from .worker import Worker, WorkerOptions, default_worker_id

    options = WorkerOptions(
        work_path=_work_path(args), worker_id=_opt(args, "worker_id") or default_worker_id(),
        concurrency=max(1, _opt(args, "concurrency") or 1), once=bool(_opt(args, "once")),
        lease_seconds=_opt(args, "lease_seconds"), wait_seconds=_opt(args, "wait_seconds") or 10.0,
        include_subpaths=bool(_opt(args, "include_subpaths")), tags=tuple(_opt(args, "tag") or ()),
        max_result_bytes=cfg.limits.max_result_bytes,
    )  # fmt: skip

    async def main() -> int:
        try:
            async with _Queue(cfg, args) as queue:
                worker = Worker(queue, settings, llm, options, progress_for=_log_progress)
                _install_signals(worker.request_stop)
                await llm.warm_up()
                log.info("worker %s: work path %s, model %s, sandbox %s", options.worker_id, options.work_path,
                         llm.settings.model, sandbox_text)  # fmt: skip
                return await worker.run()
        finally:
            await llm.aclose()

    return asyncio.run(main())


def _log_progress(task: Any) -> Any:
    task_id = task.get("id") if isinstance(task, dict) else task.id

    def progress(kind: str, data: dict[str, Any]) -> None:
        if kind == "plan":
            plan = data["plan"]
            log.info("task %s: plan (%s): %s, ~%s steps", task_id, data.get("source"), plan["complexity"],
                     plan["estimated_steps"])  # fmt: skip
        elif kind == "tool":
            log.info("task %s: step %s: %s %s", task_id, data["step"], data["tool"],
                     "ok" if data["ok"] else data.get("error_code") or "failed")  # fmt: skip

    return progress


# -- run ----------------------------------------------------------------------------------------


def _stderr_progress(kind: str, data: dict[str, Any]) -> None:
    if kind == "plan":
        p = data["plan"]
        print(f"plan ({data.get('source')}): {p['complexity']}, ~{p['estimated_steps']} steps: {p['approach']}",
              file=sys.stderr, flush=True)  # fmt: skip
    elif kind == "llm":
        cost = f"${data['cost']:.4f}" if data.get("cost_known", True) else "cost unknown"
        calls = ", ".join(data["tool_calls"]) or "no tool call"
        print(f"step {data['step']} · {cost} · {calls}", file=sys.stderr, flush=True)
    elif kind == "tool":
        args = json.dumps(data.get("args") or {}, ensure_ascii=False)
        args = args if len(args) <= 100 else args[:99] + "…"
        status = "ok" if data["ok"] else data.get("error_code") or "failed"
        print(f"  {data['tool']} {args} → {status}", file=sys.stderr, flush=True)


def render_result(result: dict[str, Any], verbose: bool = False) -> str:
    mark = "succeeded" if result.get("success") else "failed"
    cost = result.get("cost")
    cost_text = f"${cost:.4f}" if isinstance(cost, int | float) else "cost unknown"
    usage = result.get("usage") or {}
    lines = [f"{mark}: {result.get('summary') or ''}",
             f"stop: {result.get('stop_reason')} · {usage.get('model_calls', 0)} model calls · "
             f"{usage.get('total_tokens', 0)} tokens · {cost_text} · "
             f"{result.get('execution_time', 0):.1f}s"]  # fmt: skip
    if result.get("artifacts"):
        lines.append("artifacts: " + ", ".join(result["artifacts"]))
    if verbose:
        plan = result.get("plan") or {}
        if plan:
            lines += ["", f"plan ({plan.get('source')}): {plan.get('understanding')}",
                      f"  approach: {plan.get('approach')}",
                      f"  complexity {plan.get('complexity')}, ~{plan.get('estimated_steps')} steps"]  # fmt: skip
        lines += ["", "steps:"]
        for s in result.get("steps") or []:
            if s.get("kind") == "tool":
                status = "ok" if s.get("ok") else s.get("error_code") or "failed"
                args = json.dumps(s.get("args") or {}, ensure_ascii=False)[:80]
                lines.append(f"  {s['index']:>3} tool {s.get('tool')} {args} → {status}")
            else:
                lines.append(f"  {s.get('index', ''):>3} {s.get('kind')}")
        if result.get("details"):
            lines += ["", "details:", str(result["details"])]
        if result.get("sandbox"):
            lines += ["", f"sandbox: {result['sandbox'].get('description')}"]
    return "\n".join(lines)


def run_once(cfg: Any, args: argparse.Namespace) -> int:
    """`taskorch run PROMPT`: file the task, run it in the foreground, print the result."""
    import asyncio
    import uuid

    output = _opt(args, "output") or ("json" if _opt(args, "json") else "text")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        settings = _runner_settings(cfg, args)
        _check_sandbox(settings)
        llm = _llm(cfg, args, settings)
        _api_key(args)
    except UsageError as e:
        print(f"taskorch: {e}", file=sys.stderr)
        return EXIT_USAGE
    from .worker import Worker, WorkerOptions, default_worker_id

    tag = f"run-{uuid.uuid4().hex[:16]}"  # claims exactly this task, whatever else waits in the work path
    work_path = _work_path(args)
    metadata = {"scenario": args.scenario} if _opt(args, "scenario") else None

    async def main() -> tuple[int, Any, Any]:
        try:
            async with _Queue(cfg, args) as queue:
                await llm.warm_up()
                task = await queue.create_task(work_path=work_path, prompt=prompt, title=_opt(args, "title"),
                                               tags=[tag], metadata=metadata)  # fmt: skip
                task_id = task["id"] if isinstance(task, dict) else task.id
                print(f"task {task_id} in {work_path}", file=sys.stderr, flush=True)
                options = WorkerOptions(work_path=work_path, worker_id=default_worker_id(), once=True, tags=(tag,),
                                        max_result_bytes=cfg.limits.max_result_bytes)  # fmt: skip
                worker = Worker(queue, settings, llm, options, progress_for=lambda t: _stderr_progress)
                _install_signals(worker.request_stop)
                await worker.run()
                return task_id, worker.outcomes[-1] if worker.outcomes else None, worker.stopping
        finally:
            await llm.aclose()

    task_id, outcome, stopped = asyncio.run(main())
    if outcome is None or outcome.status == "interrupted":
        if stopped:
            print(f"taskorch: interrupted; task {task_id} was released to the queue "
                  f"(cancel it with `taskorch tasks cancel {task_id}`)", file=sys.stderr)  # fmt: skip
            return EXIT_INTERRUPTED
        print(f"taskorch: task {task_id} could not be claimed", file=sys.stderr)
        return EXIT_FAILED
    result = outcome.result
    if output == "json":
        print(json.dumps({"task_id": task_id, "status": outcome.status, "result": result}, indent=2,
                         ensure_ascii=False, default=str))  # fmt: skip
    else:
        print(render_result(result, verbose=output == "verbose"))
    return EXIT_OK if outcome.status == "success" else EXIT_FAILED


# -- standalone entry point ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m taskorch.runner worker|run ...`, with --db, --config and --log-level."""
    from ..config import ConfigError, load_config

    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--db", metavar="PATH")
    common.add_argument("--config", metavar="FILE")
    common.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    common.add_argument("--json", action="store_true")
    parser = argparse.ArgumentParser(prog="python -m taskorch.runner", parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_runner_commands(sub, common)
    args = parser.parse_args(argv)
    overrides = {"store": {"path": getattr(args, "db", None)}, "logging": {"level": getattr(args, "log_level", None)}}
    try:
        cfg = load_config(config_file=getattr(args, "config", None), overrides=overrides)
    except ConfigError as e:
        print("taskorch: configuration error: " + str(e).replace("\n", "\n  "), file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=cfg.logging.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    return args.run(cfg, args)
