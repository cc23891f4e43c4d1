"""The MCP surface: ten tools, two resources, each a thin call into the service.

Built by `build_mcp(service)`; nothing here decides a rule. Domain errors become tool results
with isError whose text starts with the stable code ("LEASE_LOST: ..."); arguments that fail the
input schema become "VALIDATION_ERROR: <argument>: ...". Descriptions are written for a model that
has never seen taskorch, and kept short: every token of tools/list is paid in every conversation.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

import mcp_types as types
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from . import __version__
from .errors import TaskorchError
from .models import Claim, Lease, Task
from .service import TaskService

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
taskorch is a shared task queue keyed by work_path (an absolute directory).
File work with create_task/create_tasks. To do work: next_task(work_path, worker_id) claims the \
best task and returns a lease; do it; call heartbeat_task every lease_seconds/2 on long work; \
finish with complete_task(status=success|failure) passing the lease_token. On LEASE_LOST stop: \
the task is no longer yours. Errors start with a code (VALIDATION_ERROR, NOT_FOUND, LEASE_LOST, \
INVALID_STATE, CONFLICT, STORE_BUSY=retry)."""

Priority = Literal["low", "medium", "high", "urgent"]
WorkPath = Annotated[str, Field(description="Absolute directory path.")]
TaskId = str
WorkerId = Annotated[str, Field(description="Your stable name, e.g. claude-1.")]
Token = Annotated[int, Field(ge=1, description="lease.token from next_task.")]


class TaskSpec(BaseModel):
    """One task of a create_tasks batch."""

    model_config = ConfigDict(extra="forbid")

    work_path: WorkPath
    prompt: str
    title: str | None = None
    priority: Priority | None = None
    tags: list[str] | None = None
    depends_on: list[str] | None = Field(None, description="Task ids or refs of this batch.")
    max_attempts: int | None = Field(None, ge=1, le=100)
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    delay_seconds: float | None = Field(None, ge=0)
    timeout_seconds: int | None = Field(None, ge=1)
    ref: str | None = Field(None, description="A local name other items can depend on.")


class TaskList(BaseModel):
    tasks: list[Task]


class NextTaskResult(BaseModel):
    task: Task | None
    lease: Lease | None = None
    hint: str | None = None


# Output schemas, written by hand: the generated ones spelled out every field of a task seven times
# (~5,000 tokens). These name only what a model acts on; every field is still returned, and the
# descriptions say what comes back.
_TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "status": {"type": "string"}, "version": {"type": "integer"}},
    "required": ["id", "status", "version"],
}
_LEASE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"token": {"type": "integer"}, "expires_at": {"type": "string"}},
    "required": ["token", "expires_at"],
}
_TASKS = {"type": "array", "items": _TASK_SCHEMA}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


OUTPUT_SCHEMAS: dict[str, dict[str, Any]] = {
    "create_task": _TASK_SCHEMA,
    "create_tasks": _object(["tasks"], tasks=_TASKS),
    "next_task": _object(["task"], task={"type": ["object", "null"]}, lease={"type": ["object", "null"]}),
    "complete_task": _TASK_SCHEMA,
    "heartbeat_task": _LEASE_SCHEMA,
    "cancel_task": _TASK_SCHEMA,
    "retry_task": _TASK_SCHEMA,
    "get_task": _object(["task"], task=_TASK_SCHEMA),
    "list_tasks": _object(["tasks", "total"], tasks=_TASKS, total={"type": "integer"}),
    "statistics": _object(["total"], total={"type": "integer"}),
}


def compact_schema(node: Any) -> Any:
    """Drop what costs tokens and tells a model nothing: titles, null defaults, `anyOf [X, null]`
    for optional arguments (omitting one is the same as null). Validation is unaffected: the SDK
    validates arguments against the pydantic model, not against this text."""
    if isinstance(node, list):
        return [compact_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "$defs"):  # names of arguments and models, not schema keywords
            out[key] = {name: compact_schema(sub) for name, sub in value.items()}
        elif key == "title" and isinstance(value, str):
            continue
        elif (key, value) in (("default", None), ("additionalProperties", True)):
            continue  # the JSON Schema defaults
        else:
            out[key] = compact_schema(value)
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options and len(options) == 2:
        other = next(o for o in options if o != {"type": "null"})
        del out["anyOf"]
        out = {**other, **out}
    return out


# Hints are given only where they differ from the spec's defaults (readOnly false, destructive
# true, idempotent false, openWorld true).
def _read_only() -> types.ToolAnnotations:
    return types.ToolAnnotations(read_only_hint=True, open_world_hint=False)


def _write(*, destructive: bool = False, idempotent: bool = False) -> types.ToolAnnotations:
    return types.ToolAnnotations(
        destructive_hint=destructive, idempotent_hint=idempotent or None, open_world_hint=False
    )


def _ok(model: BaseModel) -> types.CallToolResult:
    """A tool's answer: structured content, and the same JSON as compact text for clients that
    read only text. Built here rather than by the SDK, which re-validates the returned model and
    indents the text: both cost time and tokens on every call."""
    # pydantic's own JSON serialiser, then the C parser, beats dumping to Python and then to text.
    text = model.model_dump_json()
    content = [types.TextContent(type="text", text=text)]
    return types.CallToolResult(content=content, structured_content=json.loads(text))


def _error_result(code: str, message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"{code}: {message}")], is_error=True)


def _describe_validation(exc: PydanticValidationError) -> str:
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems) + ". Fix the argument and call again."


class TaskorchMCP(MCPServer):
    """MCPServer whose tool errors carry taskorch's stable codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._argument_names: dict[str, frozenset[str]] = {}  # per tool, filled in by build_mcp

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        known = self._argument_names.get(name)
        if known is not None and isinstance(arguments, dict) and not known.issuperset(arguments):
            # A misspelt optional argument would otherwise be dropped silently.
            unknown = sorted(set(arguments) - known)
            return _error_result("VALIDATION_ERROR", f"{unknown[0]}: unknown argument of {name}")
        try:
            result = await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(cause, TaskorchError):
                return _error_result(cause.code, cause.message)
            if isinstance(cause, PydanticValidationError):
                return _error_result("VALIDATION_ERROR", _describe_validation(cause))
            if cause is None and str(exc).startswith("Unknown tool"):
                return _error_result("NOT_FOUND", f"{exc}; tools/list shows the tools")
            log.exception("tool %r failed", name)
            return _error_result("INTERNAL_ERROR", "the server failed; see its log")
        return result


def build_mcp(service: TaskService) -> TaskorchMCP:
    """The MCP server for one open service. Transports (stdio, HTTP) run what this returns."""
    mcp = TaskorchMCP("taskorch", version=__version__, instructions=INSTRUCTIONS)

    @mcp.tool(
        description="File a task for agents working in work_path. Returns the task (status waiting). "
        "A repeated idempotency_key returns the first task instead of a duplicate.",
        annotations=_write(),
    )
    async def create_task(
        work_path: WorkPath,
        prompt: Annotated[str, Field(description="What to do, self-contained.")],
        title: str | None = None,
        priority: Priority | None = None,
        tags: list[str] | None = None,
        depends_on: Annotated[list[str] | None, Field(description="Ids that must complete first.")] = None,
        max_attempts: Annotated[int | None, Field(ge=1, le=100)] = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        delay_seconds: Annotated[float | None, Field(ge=0)] = None,
        timeout_seconds: Annotated[int | None, Field(ge=1, description="Per-attempt time limit.")] = None,
    ) -> types.CallToolResult:
        task = await service.create_task(
            work_path=work_path, prompt=prompt, title=title, priority=priority, tags=tags,
            depends_on=depends_on, max_attempts=max_attempts, idempotency_key=idempotency_key,
            metadata=metadata, delay_seconds=delay_seconds, timeout_seconds=timeout_seconds,
        )  # fmt: skip
        return _ok(task)

    @mcp.tool(
        description="File several tasks atomically (all or none). Items may depend on each other by "
        "ref; mode=sequential chains them in order.",
        annotations=_write(),
    )
    async def create_tasks(
        tasks: Annotated[list[TaskSpec], Field(min_length=1, max_length=500)],
        mode: Literal["parallel", "sequential"] = "parallel",
    ) -> types.CallToolResult:
        items = [t.model_dump(exclude_none=True) for t in tasks]
        return _ok(TaskList(tasks=await service.create_tasks(tasks=items, mode=mode)))

    @mcp.tool(
        description="Claim the next task for work_path (highest priority, then oldest). Returns "
        "{task, lease}; do the task, then complete_task with lease.token. task=null means nothing "
        "to do: retry later or pass wait_seconds (<=60) to wait for one.",
        annotations=_write(),
    )
    async def next_task(
        work_path: WorkPath,
        worker_id: WorkerId,
        lease_seconds: Annotated[float | None, Field(ge=1, description="Default 300.")] = None,
        wait_seconds: Annotated[float | None, Field(ge=0, le=60)] = None,
        include_subpaths: bool | None = None,
        tags: Annotated[list[str] | None, Field(description="Only tasks with one of these tags.")] = None,
    ) -> types.CallToolResult:
        claim: Claim | None = await service.next_task(
            work_path=work_path, worker_id=worker_id, lease_seconds=lease_seconds,
            wait_seconds=wait_seconds, include_subpaths=include_subpaths, tags=tags,
        )  # fmt: skip
        if claim is None:
            return _ok(NextTaskResult(task=None, hint="No claimable task now. Call again later or with wait_seconds."))
        return _ok(NextTaskResult(task=claim.task, lease=claim.lease))

    @mcp.tool(
        description="Report the outcome of a task you claimed. status=failure retries it later if "
        "attempts remain (retryable=false to stop). LEASE_LOST: the task is no longer yours; drop it.",
        annotations=_write(idempotent=True),
    )
    async def complete_task(
        task_id: TaskId,
        worker_id: WorkerId,
        lease_token: Token,
        status: Literal["success", "failure"],
        output: Annotated[str | None, Field(description="Summary of what was done.")] = None,
        details: Any = None,
        artifacts: Annotated[list[Any] | None, Field(description="Files or links produced.")] = None,
        duration_ms: Annotated[int | None, Field(ge=0)] = None,
        retryable: bool | None = None,
    ) -> types.CallToolResult:
        result = await service.complete_task(
            task_id=task_id, worker_id=worker_id, lease_token=lease_token, status=status, output=output,
            details=details, artifacts=artifacts, duration_ms=duration_ms, retryable=retryable,
        )  # fmt: skip
        return _ok(result)

    @mcp.tool(
        description="Keep your claim alive on long work; call at least every lease_seconds/2. "
        "LEASE_LOST means stop and do not complete.",
        annotations=_write(idempotent=True),
    )
    async def heartbeat_task(
        task_id: TaskId,
        worker_id: WorkerId,
        lease_token: Token,
        lease_seconds: Annotated[float | None, Field(ge=1)] = None,
    ) -> types.CallToolResult:
        result = await service.heartbeat_task(
            task_id=task_id, worker_id=worker_id, lease_token=lease_token, lease_seconds=lease_seconds
        )
        return _ok(result)

    @mcp.tool(
        description="Cancel a waiting or working task. Pass expected_version to fail with CONFLICT "
        "if it changed since you read it.",
        annotations=_write(destructive=True, idempotent=False),
    )
    async def cancel_task(
        task_id: TaskId,
        reason: str | None = None,
        expected_version: Annotated[int | None, Field(ge=1)] = None,
    ) -> types.CallToolResult:
        result = await service.cancel_task(task_id=task_id, reason=reason, expected_version=expected_version)
        return _ok(result)

    @mcp.tool(
        description="Put a failed or cancelled task back in the queue with fresh attempts.",
        annotations=_write(),
    )
    async def retry_task(
        task_id: TaskId, expected_version: Annotated[int | None, Field(ge=1)] = None
    ) -> types.CallToolResult:
        result = await service.retry_task(task_id=task_id, expected_version=expected_version)
        return _ok(result)

    @mcp.tool(description="One task by id; include_events adds its history.", annotations=_read_only())
    async def get_task(task_id: TaskId, include_events: bool | None = None) -> types.CallToolResult:
        result = await service.get_task(task_id=task_id, include_events=include_events)
        return _ok(result)

    @mcp.tool(
        description="Tasks newest first, filtered; returns {tasks, total}. Use limit/offset to page.",
        annotations=_read_only(),
    )
    async def list_tasks(
        status: Literal["waiting", "working", "completed", "failed", "cancelled"] | None = None,
        work_path: WorkPath | None = None,
        priority: Priority | None = None,
        tag: str | None = None,
        limit: Annotated[int | None, Field(ge=1, le=200)] = None,
        offset: Annotated[int | None, Field(ge=0)] = None,
    ) -> types.CallToolResult:
        result = await service.list_tasks(
            status=status, work_path=work_path, priority=priority, tag=tag, limit=limit, offset=offset
        )
        return _ok(result)

    @mcp.tool(
        description="Queue health: counts by status, priority and work_path, wait/run times, workers.",
        annotations=_read_only(),
    )
    async def statistics(work_path: WorkPath | None = None) -> types.CallToolResult:
        result = await service.statistics(work_path=work_path)
        return _ok(result)

    @mcp.resource(
        "taskorch://tasks/{task_id}",
        name="task",
        description="A task and its history, as JSON.",
        mime_type="application/json",
    )
    async def task_resource(task_id: str) -> str:
        try:
            found = await service.get_task(task_id=task_id, include_events=True)
        except TaskorchError as e:
            if e.code == "NOT_FOUND":
                raise ResourceNotFoundError(str(e)) from None
            raise ResourceError(str(e)) from None
        return found.model_dump_json()

    @mcp.resource(
        "taskorch://statistics",
        name="statistics",
        description="Queue statistics, as JSON.",
        mime_type="application/json",
    )
    async def statistics_resource() -> str:
        return (await service.statistics()).model_dump_json()

    _register_scenario_prompts(mcp)

    async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
        level = {"emergency": "CRITICAL", "alert": "CRITICAL", "critical": "CRITICAL", "notice": "INFO"}.get(
            params.level, params.level.upper()
        )
        logging.getLogger("taskorch").setLevel(level)
        return types.EmptyResult()

    mcp._lowlevel_server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    # The SDK has no public hook for the published schemas; they live on the registered tools.
    for tool in mcp._tool_manager.list_tools():
        tool.parameters = compact_schema(tool.parameters)
        tool.fn_metadata.output_schema = OUTPUT_SCHEMAS[tool.name]
    mcp._argument_names = {
        tool.name: frozenset(tool.parameters.get("properties", {})) for tool in mcp._tool_manager.list_tools()
    }
    return mcp


def _register_scenario_prompts(mcp: MCPServer) -> None:
    """The runner's scenario templates (prompts/scenarios/*.yaml) as MCP prompts: a person or a
    model picks one, gives the task text, and gets the same instructions the runner would use."""
    # The prompt layers module imports no litellm (tested); the runner itself is never loaded here.
    from .runner.prompts import default_variables, list_scenarios, load_prompt_layers, render_prompt

    for scenario in list_scenarios():
        layers = load_prompt_layers(None, scenario)

        def make(name: str, merged: dict[str, Any]) -> Any:
            async def scenario_prompt(prompt: str, work_path: str = ".") -> str:
                variables = default_variables(prompt, work_path=work_path)
                parts = render_prompt(name, variables, parts=("system", "instance"), layers=merged)
                return f"{parts['system']}\n\n{parts['instance']}"

            return scenario_prompt

        mcp.prompt(name=scenario, description=str(layers.get("description") or scenario))(make(scenario, layers))


def tools_list_size(mcp: MCPServer) -> int:
    """Characters of the tools/list answer (≈ tokens × 4); reported by the benchmark."""
    import anyio

    tools = anyio.run(mcp.list_tools)
    return len(json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]))


def serve(
    config: Any,
    *,
    transport: str | None = None,
    host: str | None = None,
    port: int | None = None,
    insecure: bool = False,
) -> int:
    """Run the MCP server: over stdio until the client disconnects, or over HTTP (see
    `taskorch.http_server`) until stopped. Returns the exit code."""
    import anyio

    from .service import open_service

    mode = transport or config.server.transport
    if mode == "http":
        from .http_server import serve as serve_http

        return serve_http(config, host=host, port=port, insecure=insecure)
    if mode != "stdio":
        log.error("transport %r is not available; use stdio or http", mode)
        return 2

    async def run() -> None:
        async with open_service(config=config) as service:
            log.info("taskorch %s serving MCP over stdio; database %s", __version__, service.store.location)
            await build_mcp(service).run_stdio_async()

    anyio.run(run)
    return 0
