"""The agent loop: one planning call, then tool calls until `finish` or a limit.

Shaped after mini-swe-agent's DefaultAgent: control flow by exceptions that carry the outcome
(`Submitted`, `LimitsExceeded`, `RepeatedFormatError`, `Stuck`, `Interrupted`, `ModelFailed`), and
the limits checked before every model call. Tool errors go back to the model as tool messages; a
reply without a tool call is a format error, and three in a row end the run. Hitting a limit is an
outcome of the run (success false, with a stop_reason), not an error of the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .llm import LlmClient, LlmError, LlmReply, parse_arguments
from .tools import Toolbox, model_paths

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]


class TaskPlan(BaseModel):
    """What the planning call must return."""

    model_config = ConfigDict(extra="ignore")

    understanding: str = Field(min_length=1, description="what the task asks, in your words")
    approach: str = Field(min_length=1, description="how you will do it")
    complexity: Literal["simple", "moderate", "complex"]
    estimated_steps: int = Field(ge=1, le=50, description="tool calls you expect to need")
    requirements: list[str] = Field(default_factory=list, description="files, commands or facts you need")


PLAN_TOOL = {"type": "function", "function": {
    "name": "submit_plan", "description": "Submit your plan for the task.",
    "parameters": TaskPlan.model_json_schema(),
}}  # fmt: skip
PLAN_CHOICE = {"type": "function", "function": {"name": "submit_plan"}}
NUDGE_NO_TOOL = ("Your reply did not call a tool. Continue the task by calling a tool, or call finish(success, "
                 "summary, details, artifacts) if you are done.")  # fmt: skip


def default_plan(max_steps: int) -> TaskPlan:
    return TaskPlan(understanding="(the model gave no valid plan)", approach="work step by step with the tools",
                    complexity="moderate", estimated_steps=max(1, min(50, max_steps // 2)))  # fmt: skip


@dataclass(frozen=True)
class Limits:
    max_steps: int = 30  # model calls in the execution loop
    cost_limit_usd: float = 1.0  # 0: off (and unenforceable for models without prices)
    wall_time_seconds: float = 900.0
    max_format_errors: int = 3
    repeat_nudge: int = 3  # the same call with the same result this often: a nudge
    repeat_stop: int = 4  # ... and this often: the run stops as stuck


# -- control flow -------------------------------------------------------------------------------


class InterruptAgentFlow(Exception):
    """Ends the run; carries its outcome."""

    stop_reason = "interrupted"

    def __init__(self, message: str, *, success: bool = False, summary: str | None = None,
                 details: str | None = None, artifacts: list[str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.success = success
        self.summary = summary if summary is not None else message
        self.details = details
        self.artifacts = artifacts or []


class Submitted(InterruptAgentFlow):
    stop_reason = "finished"


class LimitsExceeded(InterruptAgentFlow):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.stop_reason = reason  # step_limit, cost_limit or time_limit


class RepeatedFormatError(InterruptAgentFlow):
    stop_reason = "no_tool_call"


class Stuck(InterruptAgentFlow):
    stop_reason = "stuck"


class Interrupted(InterruptAgentFlow):
    """The worker is stopping: the task goes back to the queue, nothing is reported."""

    stop_reason = "interrupted"


class ModelFailed(InterruptAgentFlow):
    stop_reason = "llm_error"

    def __init__(self, error: LlmError) -> None:
        super().__init__(str(error))
        self.retryable = error.retryable
        self.status = error.status


class FormatError(Exception):
    """One reply the loop cannot use; its message goes back to the model."""


# -- the agent ----------------------------------------------------------------------------------


class Agent:
    """Runs one task. `prompts` are the rendered templates: system, planning, instance (the
    instance template is rendered after planning, with the plan; see `render_instance`)."""

    def __init__(
        self,
        llm: LlmClient,
        toolbox: Toolbox,
        *,
        system_prompt: str,
        planning_prompt: str,
        render_instance: Callable[[dict[str, Any]], str],
        limits: Limits,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.llm = llm
        self.toolbox = toolbox
        self.system_prompt = system_prompt
        self.planning_prompt = planning_prompt
        self.render_instance = render_instance
        self.limits = limits
        self.progress = progress or (lambda kind, data: None)
        self.should_stop = should_stop
        self.clock = clock
        self.messages: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.plan: TaskPlan | None = None
        self.plan_info: dict[str, Any] = {}
        self.model_calls = 0  # in the execution loop (the step limit counts these)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0
        self.cost_known = True
        self.format_errors = 0
        self.seen: Counter[str] = Counter()
        self.files_written: list[str] = []
        self.start = 0.0
        self._last_duration_ms: int | None = None
        self.outcome: InterruptAgentFlow | None = None

    async def run(self) -> dict[str, Any]:
        """Plan, then loop until an outcome. Returns the result dict (see `result`)."""
        self.start = self.clock()
        try:
            await self._plan()
            plan = self.plan.model_dump() if self.plan else None
            self.messages = [{"role": "system", "content": self.system_prompt},
                             {"role": "user", "content": self.render_instance(plan or {})}]  # fmt: skip
            while True:
                await self.step()
        except InterruptAgentFlow as outcome:
            self.outcome = outcome
        return self.result()

    # -- one step ---------------------------------------------------------------------------

    def check_limits(self, *, planning: bool = False) -> None:
        lim = self.limits
        if self.should_stop():
            raise Interrupted("the worker is stopping")
        if not planning and self.model_calls >= lim.max_steps:
            raise LimitsExceeded("step_limit", f"step limit reached: {lim.max_steps} model calls")
        if lim.cost_limit_usd and self.cost >= lim.cost_limit_usd:
            raise LimitsExceeded("cost_limit", f"cost limit reached: {self.cost:.4f} of {lim.cost_limit_usd} USD")
        if self.clock() - self.start >= lim.wall_time_seconds:
            raise LimitsExceeded("time_limit", f"time limit reached: {lim.wall_time_seconds:g} s")

    def time_left(self) -> float:
        return max(0.0, self.limits.wall_time_seconds - (self.clock() - self.start))

    async def query(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], tool_choice: Any) -> LlmReply:
        t0 = self.clock()
        try:
            # The wall-time limit bounds a call in flight too, not only the start of the next one.
            reply = await asyncio.wait_for(self.llm.complete(messages, tools, tool_choice), self.time_left() or 0.001)
        except TimeoutError:
            raise LimitsExceeded("time_limit", f"time limit reached: {self.limits.wall_time_seconds:g} s") from None
        except LlmError as e:
            raise ModelFailed(e) from None
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        if reply.cost is None:
            self.cost_known = False
        else:
            self.cost += reply.cost  # charged even when the reply turns out unusable
        self._last_duration_ms = int((self.clock() - t0) * 1000)
        return reply

    async def _plan(self) -> None:
        self.check_limits(planning=True)
        messages = [{"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": self.planning_prompt}]  # fmt: skip
        source, error = "default", None
        try:
            reply = await self.query(messages, [PLAN_TOOL], PLAN_CHOICE)
        except ModelFailed as e:
            if e.status not in (400, 422):
                raise
            # A provider that rejects forced tool calls: go on without a plan rather than fail.
            reply, error = None, str(e)[:300]
        plan = None
        if reply is not None:
            plan, source, error = _parse_plan(reply)
        self.plan = plan or default_plan(self.limits.max_steps)
        self.plan_info = {"source": source if plan else "default", **({"error": error} if error else {})}
        self._record("plan", source=self.plan_info["source"], error=error,
                     **(self._usage_fields(reply) if reply else {}))  # fmt: skip
        self.progress("plan", {"plan": self.plan.model_dump(), **self.plan_info})

    async def step(self) -> None:
        self.check_limits()
        reply = await self.query(self.messages, self.toolbox.schemas(), "auto")
        self.model_calls += 1
        self._record("llm", tool_calls=[c.name for c in reply.tool_calls], text=_excerpt(reply.content or "", 300),
                     **self._usage_fields(reply))  # fmt: skip
        self.progress("llm", {"step": self.model_calls, "cost": self.cost, "cost_known": self.cost_known,
                              "tool_calls": [c.name for c in reply.tool_calls]})  # fmt: skip
        if not reply.tool_calls:
            self.format_errors += 1
            self.messages += [{"role": "assistant", "content": reply.content or ""},
                              {"role": "user", "content": NUDGE_NO_TOOL}]  # fmt: skip
            if self.format_errors >= self.limits.max_format_errors:
                raise RepeatedFormatError(
                    f"{self.format_errors} replies in a row without a tool call",
                    summary=(reply.content or "").strip()[:2000] or "the model stopped calling tools",
                )
            return
        self.format_errors = 0
        self.messages.append(reply.assistant_message())
        nudge = None
        for call in reply.tool_calls:
            if call.name == "finish":
                self._finish(call, alone=len(reply.tool_calls) == 1)
                continue
            t0 = self.clock()
            try:
                args = parse_arguments(call.arguments)
            except ValueError as e:
                self._tool_message(call.id, f"ERROR INVALID_ARGUMENTS: {e}")
                self._record("tool", tool=call.name, args=_excerpt(call.arguments, 200), ok=False,
                             error_code="INVALID_ARGUMENTS")  # fmt: skip
                continue
            outcome = await self.toolbox.run(call.name, args, self.model_calls, time_left=self.time_left())
            if outcome.wrote and outcome.wrote not in self.files_written:
                self.files_written.append(outcome.wrote)
            self._tool_message(call.id, outcome.content)
            self._record("tool", tool=call.name, args=_args_excerpt(args), ok=outcome.ok, error_code=outcome.code,
                         output_excerpt=_excerpt(outcome.content, 300), returncode=outcome.returncode,
                         timed_out=outcome.timed_out, saved_to=outcome.saved_to,
                         duration_ms=int((self.clock() - t0) * 1000))  # fmt: skip
            self.progress("tool", {"step": self.model_calls, "tool": call.name, "args": _args_excerpt(args),
                                   "ok": outcome.ok, "error_code": outcome.code})  # fmt: skip
            key = hashlib.sha256(json.dumps([call.name, args, outcome.content], sort_keys=True,
                                            default=str).encode()).hexdigest()  # fmt: skip
            self.seen[key] += 1
            if self.seen[key] >= self.limits.repeat_stop:
                raise Stuck(
                    f"the same {call.name} call gave the same result {self.seen[key]} times",
                    summary=f"stopped: the model repeated the same {call.name} call without progress",
                )
            if self.seen[key] >= self.limits.repeat_nudge:
                nudge = (f"You have made the same {call.name} call {self.seen[key]} times and got the same result. "
                         "Do something different, or call finish if you cannot make progress.")  # fmt: skip
        if nudge:
            self.messages.append({"role": "user", "content": nudge})

    def _finish(self, call: Any, *, alone: bool) -> None:
        if not alone:
            self._tool_message(call.id, "ERROR FINISH_NOT_ALONE: call finish alone, after you have seen the "
                               "results of your other calls")  # fmt: skip
            return
        try:
            args = parse_arguments(call.arguments)
            success, summary = args.get("success"), args.get("summary")
            details, artifacts = args.get("details"), args.get("artifacts") or []
            if not isinstance(success, bool) or not isinstance(summary, str) or not summary.strip():
                raise ValueError("finish needs success (true or false) and a non-empty summary")
            if details is not None and not isinstance(details, str):
                details = json.dumps(details, ensure_ascii=False)
            if not isinstance(artifacts, list):
                raise ValueError("artifacts must be a list of paths")
        except ValueError as e:
            self._tool_message(call.id, f"ERROR INVALID_ARGUMENTS: {e}")
            self._record("tool", tool="finish", ok=False, error_code="INVALID_ARGUMENTS")
            return
        kept, rejected = model_paths(artifacts, self.toolbox.workspace)
        self._tool_message(call.id, "finished")
        self._record("tool", tool="finish", ok=True, args={"success": success, "summary": _excerpt(summary, 200)})
        if rejected:
            self.plan_info["artifacts_rejected"] = rejected
        raise Submitted("finished", success=success, summary=summary, details=details, artifacts=kept)

    # -- bookkeeping ------------------------------------------------------------------------

    def _tool_message(self, call_id: str, content: str) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": content})

    def _usage_fields(self, reply: LlmReply) -> dict[str, Any]:
        return {"tokens_in": reply.prompt_tokens, "tokens_out": reply.completion_tokens, "cost": reply.cost,
                "duration_ms": self._last_duration_ms}  # fmt: skip

    def _record(self, kind: str, **fields: Any) -> None:
        self.steps.append({"index": len(self.steps), "kind": kind,
                           **{k: v for k, v in fields.items() if v is not None}})  # fmt: skip

    def result(self) -> dict[str, Any]:
        """{success, summary, details, artifacts, execution_time, steps, plan, usage, cost, stop_reason, ...}"""
        o = self.outcome or InterruptAgentFlow("the run ended without an outcome")
        result: dict[str, Any] = {
            "success": bool(o.success),
            "summary": o.summary,
            "details": o.details,
            "artifacts": o.artifacts,
            "execution_time": round(self.clock() - self.start, 3),
            "steps": self.steps,
            "plan": {**(self.plan.model_dump() if self.plan else {}), **self.plan_info},
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens, "model_calls": self.model_calls},
            "cost": round(self.cost, 6) if self.cost_known else None,
            "cost_known": self.cost_known,
            "stop_reason": o.stop_reason,
            "files_written": self.files_written,
        }  # fmt: skip
        if not self.cost_known and self.cost:
            result["cost_partial"] = round(self.cost, 6)
        return result


def _parse_plan(reply: LlmReply) -> tuple[TaskPlan | None, str, str | None]:
    """(plan, source, error): a submit_plan call, else JSON in the text, else None."""
    raw, source = None, "tool"
    for c in reply.tool_calls:
        if c.name == "submit_plan":
            raw = c.arguments
            break
    if raw is None and reply.content:
        raw, source = _json_in_text(reply.content), "text"
    if raw is None:
        return None, "default", "the reply held neither a submit_plan call nor JSON"
    try:
        return TaskPlan.model_validate_json(raw), source, None
    except ValidationError as e:
        return None, "default", f"invalid plan: {_excerpt(str(e), 300)}"


def _json_in_text(text: str) -> str | None:
    fenced = re.search(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.DOTALL)
    if fenced:
        return fenced.group(1)
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else None


def _excerpt(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _args_excerpt(args: dict[str, Any]) -> dict[str, Any]:
    return {k: (_excerpt(v, 200) if isinstance(v, str) else v) for k, v in args.items()}
