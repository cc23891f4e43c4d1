"""The REST API: routes under /api/v1 over the service, and the OpenAPI document describing them.

`rest_routes(get_service)` returns the routes for the app (taskorch.app) to mount; the app owns
everything around them: auth, rate limits, the body size cap, CORS, Host/Origin checks. Each route
is one row of ENDPOINTS and does three things: parse the request with the row's pydantic model,
make one service call, render the result in the seed's envelope
`{"success", "data", "error": {"code", "message", "details"}, "timestamp"}`. Rules live in the
service. `openapi_document()` is generated from the same rows and models, so it cannot drift.

Statuses: one per error code (ERROR_STATUS). Every invalid argument, schema-level or not, is
VALIDATION_ERROR 400 with a message "<argument>: <problem>" (no 422: one code, one status, so a
client needs only the code). A POST body that is not declared as JSON is VALIDATION_ERROR 415
(requiring the JSON content type also keeps a cross-site HTML form from posting to the API).
An empty POST body means `{}`, so cancel and retry can be called without one, as in the seed.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from . import api_models as m
from .errors import TaskorchError, ValidationError
from .service import TaskService

log = logging.getLogger(__name__)

ERROR_STATUS: dict[str, int] = {
    "VALIDATION_ERROR": 400,
    "UNAUTHORIZED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "CONFLICT": 409,
    "LEASE_LOST": 409,
    "INVALID_STATE": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "RATE_LIMITED": 429,
    "STORE_BUSY": 503,
    "INTERNAL_ERROR": 500,
}
UNSUPPORTED_MEDIA_TYPE = 415  # VALIDATION_ERROR's second status: the body is not declared as JSON
_JSON = "application/json"
# Claims and task states must never be served from a cache between a worker and the server.
_NO_STORE = {"Cache-Control": "no-store"}


def _now() -> datetime:
    return datetime.now(UTC)


def envelope_error(
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error envelope, for every failed request (the app uses it for 401/404/405/413/429/500).
    `status` defaults to the code's (ERROR_STATUS); `headers` e.g. {"Retry-After": "2"}."""
    body = m.ErrorEnvelope(
        success=False, error=m.ErrorBody(code=code, message=message, details=details or {}), timestamp=_now()
    )
    status_code = status if status is not None else ERROR_STATUS.get(code, 500)
    return JSONResponse(body.model_dump(mode="json"), status_code=status_code, headers={**_NO_STORE, **(headers or {})})


class _NotJson(ValidationError):
    """A POST body without a JSON content type (answered with 415)."""


# -- the routes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One REST route: how to parse it, which service method it calls, how its answer looks."""

    method: str
    path: str
    call: str  # the TaskService method
    envelope: type[BaseModel]  # the success answer; its `data` is the service's result
    summary: str
    tag: str
    body: type[m.RequestModel] | None = None  # JSON body model (POST)
    query: type[m.RequestModel] | None = None  # query string model (GET)
    status: int = 200
    operation_id: str | None = None  # unique in the document; defaults to `call`
    render: Callable[[Any], Any] | None = None  # service result -> data, when they differ
    conflicts: bool = False  # may answer 409 (LEASE_LOST, INVALID_STATE, CONFLICT)

    def error_statuses(self) -> list[int]:
        statuses = {400, 401, 403, 429, 500, 503}
        if self.body is not None:
            statuses |= {413, UNSUPPORTED_MEDIA_TYPE}
        if "{task_id}" in self.path:
            statuses.add(404)
        if self.conflicts:
            statuses.add(409)
        return sorted(statuses)


V1 = "/api/v1"
_TASK = V1 + "/tasks/{task_id}"
# Order matters: /tasks/next must be tried before /tasks/{task_id}.
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", V1 + "/tasks", "create_task", m.TaskEnvelope, "Create a task (status waiting).", "tasks",
             body=m.CreateTaskRequest, status=201),
    Endpoint("POST", V1 + "/tasks/batch", "create_tasks", m.TaskListEnvelope,
             "Create several tasks atomically; items may depend on each other by ref.", "tasks",
             body=m.BatchRequest, status=201, render=lambda tasks: m.TaskList.model_construct(tasks=tasks)),
    Endpoint("POST", V1 + "/tasks/next", "next_task", m.ClaimEnvelope,
             "Claim the best claimable task: data {task, lease}, or null when there is none.", "claims",
             body=m.NextTaskRequest),
    Endpoint("GET", V1 + "/tasks/next", "next_task", m.ClaimEnvelope,
             "The seed's claim: like POST /tasks/next, with query parameters. Not safe: it claims.", "claims",
             query=m.NextTaskRequest, operation_id="next_task_get"),
    Endpoint("POST", _TASK + "/complete", "complete_task", m.TaskEnvelope,
             "Report the outcome of a claimed task; a repeat with the same token returns the task.", "claims",
             body=m.CompleteTaskRequest, conflicts=True),
    Endpoint("POST", _TASK + "/heartbeat", "heartbeat_task", m.LeaseEnvelope,
             "Extend a live lease. LEASE_LOST (409): stop working on the task.", "claims",
             body=m.HeartbeatRequest, conflicts=True),
    Endpoint("POST", _TASK + "/release", "release_task", m.TaskEnvelope,
             "Give a claimed task back without using up an attempt.", "claims",
             body=m.ReleaseRequest, conflicts=True),
    Endpoint("POST", _TASK + "/cancel", "cancel_task", m.TaskEnvelope, "Cancel a waiting or working task.",
             "tasks", body=m.CancelRequest, conflicts=True),
    Endpoint("POST", _TASK + "/retry", "retry_task", m.TaskEnvelope,
             "Put a failed or cancelled task back to waiting with fresh attempts.", "tasks",
             body=m.RetryRequest, conflicts=True),
    Endpoint("GET", _TASK, "get_task", m.TaskWithEventsEnvelope, "One task, with its history on request.",
             "tasks", query=m.GetTaskQuery),
    Endpoint("GET", V1 + "/tasks", "list_tasks", m.TaskPageEnvelope,
             "Tasks newest first, filtered and paged: data {tasks, total, limit, offset}.", "tasks",
             query=m.ListTasksQuery),
    Endpoint("GET", V1 + "/statistics", "statistics", m.StatisticsEnvelope,
             "Queue statistics: counts, wait and run times, throughput, workers.", "queue",
             query=m.StatisticsQuery),
)  # fmt: skip


def rest_routes(get_service: Callable[[], TaskService]) -> list[BaseRoute]:
    """The REST routes and GET /openapi.json. `get_service()` returns the app's open service."""
    routes: list[BaseRoute] = []
    for ep in ENDPOINTS:
        route = Route(ep.path, _handler(ep, get_service), methods=[ep.method], name=ep.operation_id or ep.call)
        if ep.operation_id == "next_task_get":  # Starlette adds HEAD to every GET; a HEAD must not claim
            route.methods.discard("HEAD")  # type: ignore[union-attr]
        routes.append(route)
    routes.append(Route("/openapi.json", _serve_openapi, methods=["GET"], name="openapi"))
    return routes


def _handler(ep: Endpoint, get_service: Callable[[], TaskService]) -> Callable[[Request], Any]:
    async def handle(request: Request) -> Response:
        try:
            kwargs = await _arguments(ep, request)
            result = await getattr(get_service(), ep.call)(**kwargs)
            data = result if ep.render is None else ep.render(result)
            body = ep.envelope.model_construct(success=True, data=data, error=None, timestamp=_now())
            return Response(body.model_dump_json(), ep.status, headers=_NO_STORE, media_type=_JSON)
        except TaskorchError as e:
            return _error_response(e)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening any more
        except Exception:
            log.exception("%s %s failed", ep.method, ep.path)
            return envelope_error("INTERNAL_ERROR", "the server failed to answer; see its log")

    handle.__name__ = ep.operation_id or ep.call
    return handle


async def _arguments(ep: Endpoint, request: Request) -> dict[str, Any]:
    try:
        if ep.body is not None:
            raw = await request.body()
            if raw and not _is_json(request.headers.get("content-type", "")):
                raise _NotJson("Content-Type: must be application/json (the body is read as JSON only)",
                               details={"field": "Content-Type"})  # fmt: skip
            # strict: JSON already has types; "3" is not an integer and 1 is not true.
            parsed = ep.body.model_validate_json(raw or b"{}", strict=True)
        else:
            assert ep.query is not None
            # lax: a query string is text; "10" is read as an integer and "true" as a boolean.
            parsed = ep.query.model_validate(_query_arguments(request, ep.query))
    except PydanticValidationError as e:
        raise _schema_error(e, in_query=ep.body is None) from None
    kwargs = parsed.service_kwargs()
    if "task_id" in request.path_params:
        kwargs["task_id"] = request.path_params["task_id"]
    return kwargs


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == _JSON or (media.startswith("application/") and media.endswith("+json"))


def _query_arguments(request: Request, model: type[m.RequestModel]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if key in model.list_fields:
            args.setdefault(key, []).append(value)
        elif key in args:
            raise ValidationError(f"{key}: is given more than once", details={"field": key})
        else:
            args[key] = value
    return args


_PROBLEMS = {"missing": "is required", "model_type": "must be a JSON object"}


def _schema_error(exc: PydanticValidationError, *, in_query: bool) -> ValidationError:
    """Pydantic's complaints, worded like the service's: "tasks[0].priority: must be ..."."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:10]:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "body"
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden":
            problem = "unknown query parameter" if in_query else "unknown field"
        elif kind == "json_invalid":
            problem = f"is not valid JSON ({msg.removeprefix('Invalid JSON: ')})"
        else:
            problem = _PROBLEMS.get(kind) or msg.replace("Input should be", "must be").replace("should", "must")
        problems.append({"field": field, "message": problem})
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:3])
    return ValidationError(text, details={"field": problems[0]["field"], "errors": problems})


def _error_response(e: TaskorchError) -> JSONResponse:
    status = UNSUPPORTED_MEDIA_TYPE if isinstance(e, _NotJson) else None
    headers = {"Retry-After": "1"} if e.retryable else None  # STORE_BUSY: the lock is usually brief
    return envelope_error(e.code, e.message, e.details, status, headers)


# -- the OpenAPI document ------------------------------------------------------------------------

_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "VALIDATION_ERROR: an argument is missing, of the wrong type or out of range; the message names it.",
    401: "UNAUTHORIZED: API keys are configured and the Bearer token is missing or wrong.",
    403: "FORBIDDEN.",
    404: "NOT_FOUND: no task with this id.",
    409: "LEASE_LOST (stop working on the task), INVALID_STATE (not allowed in the task's status) or "
    "CONFLICT (expected_version differs).",
    413: "PAYLOAD_TOO_LARGE: the body, or a field such as metadata, is over its limit.",
    415: "VALIDATION_ERROR: the body is not declared as application/json.",
    429: "RATE_LIMITED: retry after Retry-After seconds.",
    500: "INTERNAL_ERROR.",
    503: "STORE_BUSY: the database is busy; safe to retry after Retry-After seconds.",
}


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for the REST routes. A fresh copy: the app may add its own paths (/health...)."""
    return copy.deepcopy(_document())


@functools.cache
def _document() -> dict[str, Any]:
    models = {(ep.envelope, "serialization") for ep in ENDPOINTS} | {(m.ErrorEnvelope, "serialization")}
    models |= {(ep.body, "validation") for ep in ENDPOINTS if ep.body is not None}
    refs, defs = models_json_schema(sorted(models, key=lambda x: x[0].__name__), ref_template=_REF)  # type: ignore[arg-type]
    error_ref = refs[(m.ErrorEnvelope, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    for ep in ENDPOINTS:
        op: dict[str, Any] = {"operationId": ep.operation_id or ep.call, "summary": ep.summary, "tags": [ep.tag]}
        params = [{"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        op["parameters"] = [p for p in params if "{task_id}" in ep.path] + _query_parameters(ep.query)
        if ep.body is not None:
            required = any(f.is_required() for f in ep.body.model_fields.values())
            schema = refs[(ep.body, "validation")]
            op["requestBody"] = {"required": required, "content": {_JSON: {"schema": schema}}}
        op["responses"] = {str(ep.status): _response("Success.", refs[(ep.envelope, "serialization")])}
        for status in ep.error_statuses():
            op["responses"][str(status)] = _response(_ERROR_TEXT[status], error_ref, retry_after=status in (429, 503))
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    document = {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {"type": "object"}}}}
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "tags": ["queue"],
            "responses": {"200": document},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskorch REST API",
            "version": __version__,
            "description": "A durable task queue shared by AI agents and workers. Every answer is the envelope "
            "{success, data, error: {code, message, details}, timestamp}.",
        },
        "tags": [{"name": "tasks"}, {"name": "claims"}, {"name": "queue"}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
        # A Bearer key is required once the server has API keys configured; optional otherwise.
        "security": [{"bearerAuth": []}, {}],
    }


def _response(description: str, schema: dict[str, Any], *, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {_JSON: {"schema": schema}}}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
    return out


def _query_parameters(model: type[m.RequestModel] | None) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        # A query parameter is absent rather than null: publish the non-null alternative only.
        options = [o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"]
        plain = {k: v for k, v in options[0].items() if k not in ("title", "default", "description")}
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": plain}
        if "description" in prop:
            param["description"] = prop["description"]
        params.append(param)
    return params


@functools.cache
def _openapi_bytes() -> bytes:
    return json.dumps(_document(), separators=(",", ":")).encode()


async def _serve_openapi(request: Request) -> Response:
    return Response(_openapi_bytes(), media_type=_JSON)
