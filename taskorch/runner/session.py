"""One task, end to end: settings + task → prompts, tools, sandbox, agent → outcome.

`execute_task` is what the worker and `taskorch run` call. It never raises for the task's own
problems (an unknown scenario, a missing work_path, a broken prompts.yaml): those become a failed
result with stop_reason "configuration_error", which is not retried.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import prompts as P
from .agent import Agent, Interrupted, Limits, ModelFailed, Progress
from .llm import LlmClient
from .paths import Workspace
from .policy import CommandPolicy
from .sandbox import CommandSandbox, MiB, SandboxSettings, resolve_mode
from .tools import Toolbox


class RunnerSettings(BaseModel):
    """How the runner works; a `runner:` configuration section, overridden by command-line flags.
    A task's metadata may lower max_steps, cost_limit_usd and wall_time_seconds, never raise them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sandbox: Literal["auto", "bwrap", "none"] = "auto"
    max_steps: int = Field(30, ge=1)
    cost_limit_usd: float = Field(1.0, ge=0)  # 0: no cost limit
    wall_time_seconds: float = Field(900.0, gt=0)
    command_timeout_seconds: float = Field(60.0, gt=0)
    max_command_timeout_seconds: float = Field(600.0, gt=0)
    allow_shell: bool = False  # run every command through bash -c (a task can ask with metadata.allow_shell)
    command_allow: tuple[str, ...] = ()  # program names; empty: any (a guardrail, not a boundary)
    command_deny: tuple[str, ...] = ()
    ro_paths: tuple[str, ...] = ()  # host paths commands may read in bwrap mode (e.g. a toolchain)
    env_passthrough: tuple[str, ...] = ()  # variables passed to commands; secret-looking names never are
    cpu_seconds: int = Field(300, ge=1)
    memory_mb: int = Field(4096, ge=16)
    file_size_mb: int = Field(512, ge=1)
    max_processes: int = Field(256, ge=8)
    output_cap_bytes: int = Field(MiB, ge=1024)
    display_chars: int = Field(10_000, ge=1000)
    keep_full_outputs: bool = True
    llm_retries: int = Field(3, ge=0)
    input_cost_per_token: float | None = Field(None, ge=0)
    output_cost_per_token: float | None = Field(None, ge=0)

    def sandbox_settings(self) -> SandboxSettings:
        return SandboxSettings(
            mode=self.sandbox, cpu_seconds=self.cpu_seconds, memory_bytes=self.memory_mb * MiB,
            file_size_bytes=self.file_size_mb * MiB, max_processes=self.max_processes,
            output_cap=self.output_cap_bytes, ro_paths=self.ro_paths, env_passthrough=self.env_passthrough,
        )  # fmt: skip


@dataclass
class RunOutcome:
    """status: success | failure | interrupted (release the task). retryable: for failures."""

    result: dict[str, Any]
    status: str
    retryable: bool = False


def _get(task: Any, name: str, default: Any = None) -> Any:
    if isinstance(task, dict):
        return task.get(name, default)
    return getattr(task, name, default)


def _lower(configured: float, asked: Any, integer: bool = False) -> float:
    if isinstance(asked, bool) or not isinstance(asked, int | float) or asked <= 0:
        return configured
    value = min(configured, asked) if configured else asked
    return int(value) if integer else float(value)


def failed(stop_reason: str, summary: str, **extra: Any) -> dict[str, Any]:
    return {"success": False, "summary": summary, "details": None, "artifacts": [], "execution_time": 0.0,
            "steps": [], "plan": None, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
            "model_calls": 0}, "cost": 0.0, "cost_known": True, "stop_reason": stop_reason, **extra}  # fmt: skip


def _tool_switches(layers: dict[str, Any]) -> tuple[list[str], re.Pattern[str] | None, dict[str, str]]:
    enabled, pattern, why = [], None, {}
    for name in P.TOOL_NAMES:
        value = (layers.get("tools") or {}).get(name, True)
        on = value.get("enabled", True) if isinstance(value, dict) else bool(value)
        if name == "finish":
            on = True  # always available (Roo-Code's attempt_completion rule)
        if on:
            enabled.append(name)
        else:
            why[name] = "this task's scenario does not offer it"
        if name == "write_file" and isinstance(value, dict) and value.get("path_pattern"):
            try:
                pattern = re.compile(str(value["path_pattern"]))
            except re.error as e:
                raise P.PromptError(f"tools.write_file.path_pattern is not a valid regular expression: {e}") from None
    return enabled, pattern, why


async def execute_task(
    task: Any,
    settings: RunnerSettings,
    llm: LlmClient,
    *,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    time_budget: float | None = None,
    max_result_bytes: int = MiB,
) -> RunOutcome:
    """Run one task (a taskorch Task or a dict with the same fields). time_budget: seconds left
    before the attempt's deadline, which caps the wall-time limit."""
    metadata = _get(task, "metadata") or {}
    prompt, title = str(_get(task, "prompt", "")), str(_get(task, "title") or "")
    base = {"model": llm.settings.model}
    try:
        workspace = Workspace(str(_get(task, "work_path")))
    except (OSError, NotADirectoryError) as e:
        return RunOutcome(failed("configuration_error", f"the work path cannot be used here: {e}", **base), "failure")
    scenario = metadata.get("scenario") if isinstance(metadata.get("scenario"), str) else None
    sandbox: CommandSandbox | None = None
    try:
        scenario = scenario or P.infer_scenario(f"{title}\n{prompt}")
        layers = P.load_prompt_layers(workspace.root, scenario)
        enabled, pattern, unavailable = _tool_switches(layers)
        writable = bool(layers.get("workspace_writable", True))
        if not writable and "write_file" in enabled:
            enabled.remove("write_file")
            unavailable["write_file"] = "this task's scenario is read-only"
        mode, sandbox_text = resolve_mode(settings.sandbox)
        if "run_command" in enabled and mode is None:
            enabled.remove("run_command")
            unavailable["run_command"] = sandbox_text
        elif "run_command" in enabled and mode == "none" and not writable:
            enabled.remove("run_command")
            sandbox_text += "; run_command is withdrawn: this scenario is read-only and mode none cannot enforce it"
            unavailable["run_command"] = "this read-only scenario needs the bwrap sandbox for commands"
        if "run_command" in enabled and mode is not None:
            sandbox = CommandSandbox(workspace.root, mode, settings.sandbox_settings())
        limits = Limits(
            max_steps=int(_lower(settings.max_steps, metadata.get("max_steps"), integer=True)),
            cost_limit_usd=_lower(settings.cost_limit_usd, metadata.get("cost_limit_usd")),
            wall_time_seconds=min(_lower(settings.wall_time_seconds, metadata.get("wall_time_seconds")),
                                  time_budget if time_budget is not None else float("inf")),
        )  # fmt: skip
        toolbox = Toolbox(
            workspace=workspace, sandbox=sandbox, enabled=tuple(enabled), task_id=str(_get(task, "id") or "task"),
            write_pattern=pattern, writable=writable,
            allow_shell=settings.allow_shell or metadata.get("allow_shell") is True,
            policy=CommandPolicy(allow=settings.command_allow, deny=settings.command_deny),
            command_timeout=settings.command_timeout_seconds,
            max_command_timeout=settings.max_command_timeout_seconds,
            display_chars=settings.display_chars, keep_full_outputs=settings.keep_full_outputs,
            unavailable=unavailable,
        )  # fmt: skip
        variables = {
            "task": {"id": _get(task, "id"), "title": title, "prompt": prompt, "tags": list(_get(task, "tags") or []),
                     "metadata": metadata},
            "work_path": str(workspace.root), "tools": enabled, "sandbox": sandbox_text, "plan": None,
            "limits": {"max_steps": limits.max_steps, "cost_limit_usd": limits.cost_limit_usd,
                       "wall_time_seconds": limits.wall_time_seconds},
        }  # fmt: skip
        rendered = P.render_prompt(scenario, variables, layers=layers, parts=("system", "planning"))
        # Render the instance once now, so that a template error fails before any model call.
        P.render_prompt(scenario, variables, layers=layers, parts=("instance",))
    except P.PromptError as e:
        if sandbox is not None:
            sandbox.close()
        return RunOutcome(failed("configuration_error", str(e), scenario=scenario, **base), "failure")

    def instance(plan: dict[str, Any]) -> str:
        return P.render_prompt(scenario, {**variables, "plan": plan or None}, layers=layers, parts=("instance",))[
            "instance"
        ]

    agent = Agent(llm, toolbox, system_prompt=rendered["system"], planning_prompt=rendered["planning"],
                  render_instance=instance, limits=limits, progress=progress, should_stop=should_stop)  # fmt: skip
    try:
        result = await agent.run()
    finally:
        if sandbox is not None:
            sandbox.close()
    result.update(scenario=scenario, model=llm.settings.model,
                  sandbox={"mode": mode if "run_command" in enabled else None, "description": sandbox_text,
                           **({"unavailable": unavailable} if unavailable else {})})  # fmt: skip
    result = fit_result(result, max_result_bytes)
    outcome = agent.outcome
    if isinstance(outcome, Interrupted):
        return RunOutcome(result, "interrupted")
    if isinstance(outcome, ModelFailed):
        return RunOutcome(result, "failure", retryable=outcome.retryable)
    return RunOutcome(result, "success" if result["success"] else "failure", retryable=False)


def fit_result(result: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """Shrink a result to fit the queue's result size: step excerpts first, then middle steps."""
    budget = int(max_bytes * 0.8)  # complete_task adds output and artifacts beside the details

    def size(r: dict[str, Any]) -> int:
        return len(json.dumps(r, ensure_ascii=False, default=str).encode())

    if size(result) <= budget:
        return result
    r = dict(result)
    r["steps"] = [{k: v for k, v in s.items() if k not in ("output_excerpt", "text", "args")} for s in r["steps"]]
    steps = r["steps"]
    for keep in (20, 5, 0):
        if size(r) > budget and len(steps) > 2 * keep:
            tail = steps[len(steps) - keep :]
            r["steps"] = [*steps[:keep], {"kind": "omitted", "count": len(steps) - 2 * keep}, *tail]
    for key in ("details", "summary"):
        if size(r) > budget and isinstance(r.get(key), str):
            r[key] = r[key][: max(200, budget // 4)] + "… [cut to fit the result size limit]"
    return r
