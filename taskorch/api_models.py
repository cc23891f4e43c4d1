"""The REST API's request and response models.

The handlers in api.py parse every request with these models and render every response with
them, and `openapi_document()` is generated from the same classes: the published schema cannot
drift from what the server does.

Request models check only the shape (types, required fields, unknown fields, and the fixed ranges
the service also enforces, so that the OpenAPI document shows them). Every rule that depends on
configuration or on the queue's state stays in the service, which names the argument it rejects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, create_model

from .errors import ERROR_CODES, ValidationError
from .models import Claim, Lease, Statistics, Task, TaskPage, TaskWithEvents

PriorityName = Literal["low", "medium", "high", "urgent", "normal", "critical"]
StatusName = Literal["waiting", "working", "completed", "failed", "cancelled"]
ErrorCode = Literal[ERROR_CODES]  # type: ignore[valid-type]

_WORK_PATH = "Absolute directory path the task belongs to."
_WORKER_ID = "The worker's stable name, e.g. build-box-1."
_TOKEN = "lease.token from next_task."


class RequestModel(BaseModel):
    # Unknown fields are an error: a misspelt optional argument would otherwise be dropped silently.
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Query parameters that may repeat (?tags=a&tags=b); see api._query_arguments.
    list_fields: ClassVar[frozenset[str]] = frozenset()

    def service_kwargs(self) -> dict[str, Any]:
        """The service method's keyword arguments (omitted fields are None: the service's default)."""
        return dict(self)


# -- creating ------------------------------------------------------------------------------------


class CreateTaskRequest(RequestModel):
    """Body of POST /api/v1/tasks: create_task's arguments."""

    work_path: str = Field(
        validation_alias=AliasChoices("work_path", "work_directory"),
        description=_WORK_PATH + " The seed's name `work_directory` is accepted too.",
    )
    prompt: str = Field(description="What to do, self-contained.")
    title: str | None = Field(None, description="Defaults to the prompt's first line.")
    priority: PriorityName | None = Field(None, description="Default medium; normal=medium, critical=urgent.")
    tags: list[str] | None = None
    depends_on: list[str] | None = Field(None, description="Task ids that must complete first.")
    max_attempts: int | None = Field(None, ge=1, le=100)
    idempotency_key: str | None = Field(None, description="A repeated key returns the first task.")
    metadata: dict[str, Any] | None = None
    delay_seconds: float | None = Field(None, ge=0, description="Not claimable before this delay.")
    timeout_seconds: int | None = Field(None, ge=1, description="Per-attempt time limit.")


class BatchItem(CreateTaskRequest):
    """One task of a batch; `ref` names it for the other items' depends_on."""

    ref: str | None = Field(None, description="A local name other items of the batch can depend on.")


class BatchRequest(RequestModel):
    """Body of POST /api/v1/tasks/batch: all tasks are created, or none."""

    tasks: list[BatchItem] = Field(min_length=1)
    mode: Literal["parallel", "sequential"] | None = Field(
        None, description="sequential makes each item depend on the one before it. Default parallel."
    )

    def service_kwargs(self) -> dict[str, Any]:
        return {"tasks": [t.model_dump(exclude_none=True) for t in self.tasks], "mode": self.mode}


class TaskList(BaseModel):
    tasks: list[Task]


# -- claims --------------------------------------------------------------------------------------


class NextTaskRequest(RequestModel):
    """Body of POST /api/v1/tasks/next, or the query of GET /api/v1/tasks/next."""

    list_fields: ClassVar[frozenset[str]] = frozenset({"tags"})

    work_path: str = Field(description=_WORK_PATH)
    worker_id: str = Field(description=_WORKER_ID)
    lease_seconds: float | None = Field(None, ge=1, description="Lease length; renew with heartbeat. Default 300.")
    wait_seconds: float | None = Field(None, ge=0, le=60, description="Long-poll up to this long for a task.")
    include_subpaths: bool | None = Field(None, description="Also claim tasks of directories below work_path.")
    tags: list[str] | None = Field(None, description="Only tasks with one of these tags.")


# The seed's clients report several spellings of the two outcomes.
_SEED_STATUS = {
    "success": "success", "completed": "success", "failure": "failure", "failed": "failure", "error": "failure",
}  # fmt: skip


class SeedResult(RequestModel):
    """The seed's result object: {status, output, duration (milliseconds)}."""

    status: Literal["success", "completed", "failure", "failed", "error"]
    output: Any = Field(None, description="A string becomes output; any other JSON becomes details.")
    duration: float | None = Field(None, ge=0, description="Milliseconds.")


class CompleteTaskRequest(RequestModel):
    """Body of POST /api/v1/tasks/{task_id}/complete.

    Either taskorch's shape (status, output, details, artifacts, duration_ms) or the seed's
    (`result: {status, output, duration}`); `original_prompt` is accepted and ignored.
    """

    worker_id: str = Field(description=_WORKER_ID)
    lease_token: int = Field(ge=1, description=_TOKEN)
    status: Literal["success", "failure"] | None = Field(
        None, description="Required unless the seed's `result` is given."
    )
    output: str | None = Field(None, description="Summary of what was done (or why it failed).")
    details: Any = None
    artifacts: list[Any] | None = Field(None, description="Files or links produced.")
    duration_ms: int | None = Field(None, ge=0)
    retryable: bool | None = Field(None, description="false: a failure is final, no retry.")
    original_prompt: str | None = Field(None, description="Accepted for the seed's clients; ignored.")
    result: SeedResult | None = Field(None, description="The seed's shape of the outcome.")

    def service_kwargs(self) -> dict[str, Any]:
        kw = {k: v for k, v in self if k not in ("original_prompt", "result")}
        seed = self.result
        if seed is None:
            return kw
        if self.status is not None or self.output is not None or self.duration_ms is not None:
            raise ValidationError(
                "result: give either the seed's result object or status/output/duration_ms, not both",
                details={"field": "result"},
            )
        kw["status"] = _SEED_STATUS[seed.status]
        if isinstance(seed.output, str) or seed.output is None:
            kw["output"] = seed.output
        elif self.details is None:
            kw["details"] = seed.output
        else:
            raise ValidationError(
                "result.output: must be a string when details is given too", details={"field": "result.output"}
            )
        kw["duration_ms"] = None if seed.duration is None else round(seed.duration)
        return kw


class HeartbeatRequest(RequestModel):
    """Body of POST /api/v1/tasks/{task_id}/heartbeat."""

    worker_id: str = Field(description=_WORKER_ID)
    lease_token: int = Field(ge=1, description=_TOKEN)
    lease_seconds: float | None = Field(None, ge=1, description="New lease length from now. Default 300.")


class ReleaseRequest(RequestModel):
    """Body of POST /api/v1/tasks/{task_id}/release: give the task back without using an attempt."""

    worker_id: str = Field(description=_WORKER_ID)
    lease_token: int = Field(ge=1, description=_TOKEN)
    delay_seconds: float | None = Field(None, ge=0, description="Not claimable again before this delay.")


# -- edits ---------------------------------------------------------------------------------------


class CancelRequest(RequestModel):
    """Body of POST /api/v1/tasks/{task_id}/cancel (may be empty)."""

    reason: str | None = None
    expected_version: int | None = Field(None, ge=1, description="CONFLICT if the task's version differs.")


class RetryRequest(RequestModel):
    """Body of POST /api/v1/tasks/{task_id}/retry (may be empty)."""

    expected_version: int | None = Field(None, ge=1, description="CONFLICT if the task's version differs.")


# -- reads (query parameters) --------------------------------------------------------------------


class GetTaskQuery(RequestModel):
    include_events: bool | None = Field(None, description="Add the task's history of transitions.")


class ListTasksQuery(RequestModel):
    status: StatusName | None = None
    work_path: str | None = Field(None, description=_WORK_PATH)
    priority: PriorityName | None = None
    tag: str | None = None
    limit: int | None = Field(None, ge=1, le=200, description="Page size, default 50.")
    offset: int | None = Field(None, ge=0)


class StatisticsQuery(RequestModel):
    work_path: str | None = Field(None, description="Only this work_path (default: the whole queue).")


# -- responses -----------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: ErrorCode = Field(description="Stable; act on it (STORE_BUSY and RATE_LIMITED: retry later).")
    message: str = Field(description="What was wrong and what to do; names the argument.")
    details: dict[str, Any] = Field(description="e.g. {field: the argument's name}.")


# Every key of an envelope is always present: say so in the schema (serialization mode).
_ENVELOPE = ConfigDict(json_schema_serialization_defaults_required=True)


class ErrorEnvelope(BaseModel):
    """The answer to every failed request."""

    model_config = _ENVELOPE

    success: Literal[False]
    data: None = None
    error: ErrorBody
    timestamp: datetime


def _envelope(name: str, data: Any) -> type[BaseModel]:
    return create_model(
        name,
        __config__=_ENVELOPE,
        __doc__=f"A successful answer; data is {name.removesuffix('Envelope')}.",
        success=(Literal[True], ...),
        data=(data, ...),
        error=(None, None),
        timestamp=(datetime, ...),
    )


TaskEnvelope = _envelope("TaskEnvelope", Task)
TaskListEnvelope = _envelope("TaskListEnvelope", TaskList)
ClaimEnvelope = _envelope("ClaimEnvelope", Claim | None)  # data null: nothing claimable now
LeaseEnvelope = _envelope("LeaseEnvelope", Lease)
TaskWithEventsEnvelope = _envelope("TaskWithEventsEnvelope", TaskWithEvents)
TaskPageEnvelope = _envelope("TaskPageEnvelope", TaskPage)
StatisticsEnvelope = _envelope("StatisticsEnvelope", Statistics)
