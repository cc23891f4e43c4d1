"""The MCP surface, in process: tool contract, structured output, error codes, resources, logging.

Every test talks to `build_mcp(service)` through the SDK's in-memory `Client`, the way a model's
client would, so the JSON the model sees (schemas, annotations, error texts) is what is checked.
The SDK client also validates each successful result's structuredContent against the tool's
outputSchema; the tests validate it again explicitly with jsonschema.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import Client, MCPDeprecationWarning, MCPError

import taskorch
from taskorch.config import load_config
from taskorch.mcp_server import build_mcp

pytestmark = pytest.mark.anyio

TOOLS_LIST_BUDGET_CHARS = 10_000  # ≈ 2,500 tokens; every conversation pays for tools/list


def names(text: str) -> set[str]:
    return set(text.split())


# The contract: tool names -> (their arguments, the required ones).
TOOL_ARGUMENTS: dict[str, tuple[set[str], set[str]]] = {
    "create_task": (
        names(
            "work_path prompt title priority tags depends_on max_attempts idempotency_key metadata "
            "delay_seconds timeout_seconds"
        ),
        names("work_path prompt"),
    ),
    "create_tasks": (names("tasks mode"), names("tasks")),
    "next_task": (
        names("work_path worker_id lease_seconds wait_seconds include_subpaths tags"),
        names("work_path worker_id"),
    ),
    "complete_task": (
        names("task_id worker_id lease_token status output details artifacts duration_ms retryable"),
        names("task_id worker_id lease_token status"),
    ),
    "heartbeat_task": (names("task_id worker_id lease_token lease_seconds"), names("task_id worker_id lease_token")),
    "cancel_task": (names("task_id reason expected_version"), names("task_id")),
    "retry_task": (names("task_id expected_version"), names("task_id")),
    "get_task": (names("task_id include_events"), names("task_id")),
    "list_tasks": (names("status work_path priority tag limit offset"), set()),
    "statistics": (names("work_path"), set()),
}
# Fields of a create_tasks item (the TaskSpec object inside the `tasks` array).
TASK_SPEC_FIELDS = TOOL_ARGUMENTS["create_task"][0] | {"ref"}
READ_ONLY_TOOLS = {"get_task", "list_tasks", "statistics"}


@contextlib.asynccontextmanager
async def connect(tmp_path: Path, *, mode: str = "auto", **limits: int) -> AsyncIterator[Client]:
    """A Client on a fresh database; `limits` override config `limits.*` (e.g. max_metadata_bytes)."""
    config = load_config(environ={}, overrides={"limits": limits} if limits else None)
    async with taskorch.open_service(tmp_path / "t.db", config=config, sweep=False) as service:
        async with Client(build_mcp(service), mode=mode) as client:
            yield client


class Calls:
    """Tool calls that check the outcome: `ok` validates structured output, `error` returns the text."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.output_schemas: dict[str, dict[str, Any]] = {}

    async def ok(self, name: str, arguments: dict[str, Any]) -> Any:
        if not self.output_schemas:
            self.output_schemas = {t.name: t.output_schema for t in (await self.client.list_tools()).tools}
        result = await self.client.call_tool(name, arguments)
        assert not result.is_error, f"{name}({arguments}) failed: {result.content[0].text}"
        assert result.structured_content is not None, name
        jsonschema.Draft202012Validator(self.output_schemas[name]).validate(result.structured_content)
        # The text block carries the same JSON for clients that ignore structuredContent.
        assert json.loads(result.content[0].text) == result.structured_content
        return result.structured_content

    async def error(self, name: str, arguments: dict[str, Any]) -> str:
        result = await self.client.call_tool(name, arguments)
        assert result.is_error, f"{name}({arguments}) succeeded: {result.structured_content}"
        assert len(result.content) == 1 and result.content[0].type == "text"
        return result.content[0].text


# -- initialize, tools/list ---------------------------------------------------------------------


async def test_initialize_has_instructions_and_capabilities(tmp_path: Path) -> None:
    async with connect(tmp_path, mode="legacy") as c:
        init = c.session.initialize_result
        assert init is not None
        assert init.server_info.name == "taskorch"
        assert init.server_info.version == taskorch.__version__
        assert init.instructions and init.instructions == c.instructions
        for word in ("work_path", "next_task", "complete_task", "lease", "LEASE_LOST", "VALIDATION_ERROR"):
            assert word in init.instructions, word
        caps = init.capabilities
        assert caps.tools is not None and caps.resources is not None and caps.logging is not None
    async with connect(tmp_path, mode="auto") as c:  # the 2026 discover era carries them too
        assert c.instructions == init.instructions


async def test_tools_list_contract(tmp_path: Path) -> None:
    async with connect(tmp_path) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    assert set(tools) == set(TOOL_ARGUMENTS)
    problems: list[str] = []  # collected, so one broken tool does not hide another
    for name, tool in tools.items():
        arguments, required = TOOL_ARGUMENTS[name]
        assert tool.description and len(tool.description) > 20, name
        schema = tool.input_schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object", name
        published = set(schema.get("properties", {}))
        if published != arguments:
            problems.append(f"{name}: missing {sorted(arguments - published)}, extra {sorted(published - arguments)}")
        if set(schema.get("required", [])) != required:
            problems.append(f"{name}: required {sorted(schema.get('required', []))}, expected {sorted(required)}")
        assert tool.output_schema is not None, name
        jsonschema.Draft202012Validator.check_schema(tool.output_schema)
        ann = tool.annotations
        assert ann is not None, name
        # Hints are published only where they differ from the spec's defaults (readOnly false).
        assert bool(ann.read_only_hint) is (name in READ_ONLY_TOOLS), name
        if name not in READ_ONLY_TOOLS:
            assert ann.destructive_hint is (name == "cancel_task"), name
        assert ann.open_world_hint is False, name
    schema = tools["create_tasks"].input_schema
    spec = schema["properties"]["tasks"]["items"]
    if "$ref" in spec:
        spec = schema["$defs"][spec["$ref"].rsplit("/", 1)[-1]]
    if set(spec["properties"]) != TASK_SPEC_FIELDS:
        published = set(spec["properties"])
        missing, extra = sorted(TASK_SPEC_FIELDS - published), sorted(published - TASK_SPEC_FIELDS)
        problems.append(f"create_tasks item: missing {missing}, extra {extra}")
    assert set(spec["required"]) == {"work_path", "prompt"}
    assert not problems, "\n".join(problems)


async def test_tools_list_stays_within_token_budget(tmp_path: Path) -> None:
    async with connect(tmp_path) as c:
        listing = await c.list_tools()
    tools = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listing.tools]
    size = len(json.dumps({"tools": tools}))
    assert size <= TOOLS_LIST_BUDGET_CHARS, f"tools/list is {size} chars (≈{size // 4} tokens)"


# -- happy paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_every_tool_happy_path(tmp_path: Path, mode: str) -> None:
    async with connect(tmp_path, mode=mode) as c:
        t = Calls(c)
        first = await t.ok(
            "create_task",
            {
                "work_path": "/repo",
                "prompt": "Add a README\nwith usage",
                "title": "README",
                "priority": "high",
                "tags": ["docs"],
                "metadata": {"ticket": 7},
                "idempotency_key": "readme-1",
                "max_attempts": 2,
                "timeout_seconds": 600,
            },
        )
        assert first["status"] == "waiting" and first["version"] == 1 and first["attempts"] == 0
        assert (first["title"], first["priority"], first["tags"]) == ("README", "high", ["docs"])
        again = await t.ok("create_task", {"work_path": "/repo", "prompt": "other", "idempotency_key": "readme-1"})
        assert again["id"] == first["id"]

        batch = await t.ok(
            "create_tasks",
            {
                "tasks": [
                    {"work_path": "/repo/", "prompt": "step a", "ref": "a"},
                    {"work_path": "/repo", "prompt": "step b", "ref": "b", "depends_on": ["a"]},
                ]
            },
        )
        a, b = batch["tasks"]
        assert a["work_path"] == "/repo" and b["depends_on"] == [a["id"]]
        chain = (
            await t.ok(
                "create_tasks",
                {
                    "mode": "sequential",
                    "tasks": [
                        {"work_path": "/chain", "prompt": "one"},
                        {"work_path": "/chain", "prompt": "two"},
                    ],
                },
            )
        )["tasks"]
        assert chain[1]["depends_on"] == [chain[0]["id"]]

        # Claim: highest priority first; heartbeat; complete.
        claim = await t.ok("next_task", {"work_path": "/repo", "worker_id": "w1", "lease_seconds": 60})
        assert claim["task"]["id"] == first["id"] and claim["task"]["status"] == "working"
        token = claim["lease"]["token"]
        lease = await t.ok(
            "heartbeat_task", {"task_id": first["id"], "worker_id": "w1", "lease_token": token, "lease_seconds": 120}
        )
        assert lease["token"] == token and lease["expires_at"]
        done = await t.ok(
            "complete_task",
            {
                "task_id": first["id"],
                "worker_id": "w1",
                "lease_token": token,
                "status": "success",
                "output": "wrote it",
                "details": {"lines": 3},
                "artifacts": ["README.md"],
                "duration_ms": 12,
            },
        )
        assert done["status"] == "completed"

        # A failure that stops, a retry, a cancel.
        claim = await t.ok("next_task", {"work_path": "/chain", "worker_id": "w2"})
        assert claim["task"]["id"] == chain[0]["id"]
        failed = await t.ok(
            "complete_task",
            {
                "task_id": chain[0]["id"],
                "worker_id": "w2",
                "lease_token": claim["lease"]["token"],
                "status": "failure",
                "output": "broke",
                "retryable": False,
            },
        )
        assert failed["status"] == "failed"
        retried = await t.ok("retry_task", {"task_id": chain[0]["id"], "expected_version": failed["version"]})
        assert retried["status"] == "waiting" and retried["attempts"] == 0
        cancelled = await t.ok("cancel_task", {"task_id": chain[1]["id"], "reason": "not needed"})
        assert cancelled["status"] == "cancelled"

        got = await t.ok("get_task", {"task_id": first["id"], "include_events": True})
        assert got["task"]["status"] == "completed"
        assert got["task"]["result"]["output"] == "wrote it"
        assert isinstance(got["events"], list) and len(got["events"]) >= 3
        plain = await t.ok("get_task", {"task_id": first["id"]})
        assert not plain.get("events")

        page = await t.ok("list_tasks", {"work_path": "/repo", "limit": 1})
        assert page["total"] == 3 and len(page["tasks"]) == 1
        page = await t.ok("list_tasks", {"status": "completed"})
        assert [x["id"] for x in page["tasks"]] == [first["id"]]
        assert (await t.ok("list_tasks", {"tag": "docs", "priority": "high", "offset": 0}))["total"] == 1
        assert (await t.ok("list_tasks", {}))["total"] == 5

        stats = await t.ok("statistics", {})
        assert stats["total"] == 5
        assert stats["by_status"] == {"waiting": 3, "working": 0, "completed": 1, "failed": 0, "cancelled": 1}
        assert (await t.ok("statistics", {"work_path": "/chain"}))["total"] == 2

        empty = await t.ok("next_task", {"work_path": "/nowhere", "worker_id": "w1", "wait_seconds": 0})
        assert empty["task"] is None and empty.get("lease") is None and empty["hint"]


# -- errors -------------------------------------------------------------------------------------

BIG = 2**63  # one past SQLite's INTEGER range

INVALID_ARGUMENTS: list[tuple[str, dict[str, Any], str]] = [
    # caught by the input schema
    ("list_tasks", {"limit": 500}, "limit"),
    ("list_tasks", {"limit": "ten"}, "limit"),
    ("list_tasks", {"status": "done"}, "status"),
    ("list_tasks", {"offset": -1}, "offset"),
    ("create_task", {"work_path": "/r"}, "prompt"),
    ("create_task", {"work_path": "/r", "prompt": 5}, "prompt"),
    ("create_task", {"work_path": "/r", "prompt": "x", "priority": "huge"}, "priority"),
    ("create_task", {"work_path": "/r", "prompt": "x", "tags": "a"}, "tags"),
    ("create_task", {"work_path": "/r", "prompt": "x", "metadata": [1]}, "metadata"),
    ("create_task", {"work_path": "/" + "a" * 5000, "prompt": "x"}, "work_path"),
    ("create_tasks", {"tasks": []}, "tasks"),
    ("create_tasks", {"tasks": [{"work_path": "/r", "prompt": "x"}], "mode": "random"}, "mode"),
    ("create_tasks", {"tasks": [{"work_path": "/r", "prompt": "x", "zzz": 1}]}, "zzz"),
    ("next_task", {"work_path": "/r"}, "worker_id"),
    ("next_task", {"work_path": "/r", "worker_id": "w", "wait_seconds": 61}, "wait_seconds"),
    ("next_task", {"work_path": "/r", "worker_id": "w", "tags": [5]}, "tags"),
    ("complete_task", {"task_id": "t1", "worker_id": "w", "lease_token": 1, "status": "done"}, "status"),
    ("complete_task", {"task_id": "t1", "worker_id": "w", "lease_token": "abc", "status": "success"}, "lease_token"),
    ("heartbeat_task", {"task_id": "t1", "worker_id": "w", "lease_token": 0}, "lease_token"),
    ("cancel_task", {"task_id": "t1", "expected_version": 0}, "expected_version"),
    ("retry_task", {"task_id": 5}, "task_id"),
    ("get_task", {"task_id": "t1", "include_events": "maybe"}, "include_events"),
    ("statistics", {"work_path": 5}, "work_path"),
    # caught by the service
    ("create_task", {"work_path": "repo", "prompt": "x"}, "work_path"),
    ("create_task", {"work_path": "/r", "prompt": "   "}, "prompt"),
    ("create_task", {"work_path": "/r", "prompt": "x", "title": "t" * 1000}, "title"),
    ("create_task", {"work_path": "/r", "prompt": "x", "tags": [" padded "]}, "tags"),
    ("create_task", {"work_path": "/r", "prompt": "x", "depends_on": ["no-such-task"]}, "depends_on"),
    ("create_task", {"work_path": "/r", "prompt": "x", "timeout_seconds": 10**9}, "timeout_seconds"),
    ("create_tasks", {"tasks": [{"work_path": "r", "prompt": "x"}]}, "work_path"),
    ("create_tasks", {"tasks": [{"work_path": "/r", "prompt": "x", "ref": "a", "depends_on": ["a"]}]}, "depends_on"),
    ("next_task", {"work_path": "/r", "worker_id": ""}, "worker_id"),
    ("next_task", {"work_path": "/r", "worker_id": "w", "lease_seconds": 10**9}, "lease_seconds"),
    ("get_task", {"task_id": "a\nb"}, "task_id"),
    ("list_tasks", {"work_path": "relative"}, "work_path"),
    ("statistics", {"work_path": "relative"}, "work_path"),
    # integers the schema allows but SQLite cannot store
    ("cancel_task", {"task_id": "t1", "expected_version": BIG}, "expected_version"),
    ("retry_task", {"task_id": "t1", "expected_version": BIG}, "expected_version"),
    ("complete_task", {"task_id": "t1", "worker_id": "w", "lease_token": BIG, "status": "success"}, "lease_token"),
    ("heartbeat_task", {"task_id": "t1", "worker_id": "w", "lease_token": BIG}, "lease_token"),
    ("list_tasks", {"offset": BIG}, "offset"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "argument"),
    INVALID_ARGUMENTS,
    ids=[f"{tool}-{arg}-{i}" for i, (tool, _, arg) in enumerate(INVALID_ARGUMENTS)],
)
async def test_invalid_argument_is_validation_error_naming_it(
    tmp_path: Path, tool: str, arguments: dict[str, Any], argument: str
) -> None:
    async with connect(tmp_path) as c:
        text = await Calls(c).error(tool, arguments)
    assert text.startswith("VALIDATION_ERROR: "), text
    assert argument in text.split(":", 2)[1], text  # named right after the code


async def test_unknown_argument_is_validation_error(tmp_path: Path) -> None:
    """A misspelt optional argument must not be dropped silently (create_tasks items already refuse them)."""
    async with connect(tmp_path) as c:
        result = await c.call_tool("create_task", {"work_path": "/r", "prompt": "x", "priorty": "urgent"})
        text = result.content[0].text
        assert result.is_error, f"unknown argument accepted: {text[:120]}"
        assert text.startswith("VALIDATION_ERROR: ") and "priorty" in text, text


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("get_task", {"task_id": "t-missing"}),
        ("cancel_task", {"task_id": "t-missing"}),
        ("retry_task", {"task_id": "t-missing"}),
        ("complete_task", {"task_id": "t-missing", "worker_id": "w", "lease_token": 1, "status": "success"}),
        ("heartbeat_task", {"task_id": "t-missing", "worker_id": "w", "lease_token": 1}),
    ],
)
async def test_unknown_task_is_not_found(tmp_path: Path, tool: str, arguments: dict[str, Any]) -> None:
    async with connect(tmp_path) as c:
        text = await Calls(c).error(tool, arguments)
    assert text.startswith("NOT_FOUND: ") and "t-missing" in text, text


async def test_unknown_tool_is_not_found(tmp_path: Path) -> None:
    async with connect(tmp_path) as c:
        text = await Calls(c).error("submit_task", {"prompt": "x"})
    assert text.startswith("NOT_FOUND: ") and "submit_task" in text, text


async def test_stale_lease_is_lease_lost(tmp_path: Path) -> None:
    async with connect(tmp_path) as c:
        t = Calls(c)
        task = await t.ok("create_task", {"work_path": "/r", "prompt": "x"})
        old = (await t.ok("next_task", {"work_path": "/r", "worker_id": "w1"}))["lease"]["token"]
        # Taken away and handed to someone else: the first worker's token is stale.
        await t.ok("cancel_task", {"task_id": task["id"], "reason": "reassign"})
        await t.ok("retry_task", {"task_id": task["id"]})
        new = (await t.ok("next_task", {"work_path": "/r", "worker_id": "w2"}))["lease"]["token"]
        assert new != old
        for tool, extra in (("heartbeat_task", {}), ("complete_task", {"status": "success"})):
            text = await t.error(tool, {"task_id": task["id"], "worker_id": "w1", "lease_token": old, **extra})
            assert text.startswith("LEASE_LOST: "), text
        wrong_worker = {"task_id": task["id"], "worker_id": "w1", "lease_token": new, "status": "success"}
        assert (await t.error("complete_task", wrong_worker)).startswith("LEASE_LOST: ")
        args = {"task_id": task["id"], "worker_id": "w2", "lease_token": new, "status": "success"}
        done = await t.ok("complete_task", args)
        assert done["status"] == "completed"
        assert await t.ok("complete_task", args) == done  # a replayed completion (lost answer) is idempotent
        beat = {"task_id": task["id"], "worker_id": "w2", "lease_token": new}
        assert (await t.error("heartbeat_task", beat)).startswith("LEASE_LOST: ")  # no longer held


async def test_invalid_state_and_conflict(tmp_path: Path) -> None:
    async with connect(tmp_path) as c:
        t = Calls(c)
        task = await t.ok("create_task", {"work_path": "/r", "prompt": "x"})
        text = await t.error("retry_task", {"task_id": task["id"]})
        assert text.startswith("INVALID_STATE: ") and task["id"] in text, text
        text = await t.error("cancel_task", {"task_id": task["id"], "expected_version": task["version"] + 1})
        assert text.startswith("CONFLICT: "), text
        cancelled = await t.ok("cancel_task", {"task_id": task["id"], "expected_version": task["version"]})
        text = await t.error("retry_task", {"task_id": task["id"], "expected_version": task["version"]})
        assert text.startswith("CONFLICT: "), text
        text = await t.error("cancel_task", {"task_id": cancelled["id"]})
        assert text.startswith("INVALID_STATE: "), text


async def test_payload_too_large(tmp_path: Path) -> None:
    async with connect(tmp_path, max_metadata_bytes=64, max_result_bytes=256) as c:
        t = Calls(c)
        text = await t.error("create_task", {"work_path": "/r", "prompt": "x", "metadata": {"blob": "y" * 100}})
        assert text.startswith("PAYLOAD_TOO_LARGE: metadata"), text
        batch = {"tasks": [{"work_path": "/r", "prompt": "x", "metadata": {"blob": "y" * 100}}]}
        text = await t.error("create_tasks", batch)
        assert text.startswith("PAYLOAD_TOO_LARGE: tasks[0].metadata"), text
        assert (await t.ok("list_tasks", {}))["total"] == 0  # the batch was all-or-nothing
        await t.ok("create_task", {"work_path": "/r", "prompt": "x", "metadata": {"small": 1}})
        claim = await t.ok("next_task", {"work_path": "/r", "worker_id": "w"})
        args = {"task_id": claim["task"]["id"], "worker_id": "w", "lease_token": claim["lease"]["token"]}
        text = await t.error("complete_task", {**args, "status": "success", "details": {"log": "z" * 1000}})
        assert text.startswith("PAYLOAD_TOO_LARGE: "), text
        assert (await t.ok("complete_task", {**args, "status": "success"}))["status"] == "completed"


async def test_protocol_errors_stay_protocol_errors(tmp_path: Path) -> None:
    async with connect(tmp_path) as c:
        with pytest.raises(MCPError):
            await c.read_resource("taskorch://no-such-resource")
        with pytest.raises(MCPError):
            await c.get_prompt("no-such-prompt")


# -- resources, logging -------------------------------------------------------------------------


async def test_resources_read_back_json(tmp_path: Path) -> None:
    async with connect(tmp_path) as c:
        resources = {str(r.uri): r for r in (await c.list_resources()).resources}
        assert resources["taskorch://statistics"].mime_type == "application/json"
        templates = {r.uri_template: r for r in (await c.list_resource_templates()).resource_templates}
        assert templates["taskorch://tasks/{task_id}"].mime_type == "application/json"

        task = (await c.call_tool("create_task", {"work_path": "/r", "prompt": "x"})).structured_content
        read = await c.read_resource(f"taskorch://tasks/{task['id']}")
        (content,) = read.contents
        assert content.mime_type == "application/json"
        body = json.loads(content.text)
        assert body["task"]["id"] == task["id"] and body["task"]["status"] == "waiting"
        assert [e for e in body["events"]], "the task resource includes its history"

        (content,) = (await c.read_resource("taskorch://statistics")).contents
        stats = json.loads(content.text)
        assert stats["total"] == 1 and stats["by_status"]["waiting"] == 1


async def test_unknown_task_resource_is_not_found(tmp_path: Path) -> None:
    """Reading a missing task is the client's mistake: a not-found protocol error (-32602 in this SDK,
    as for ResourceNotFoundError), whose message says the task does not exist — not an internal error."""
    async with connect(tmp_path) as c:
        with pytest.raises(MCPError) as info:
            await c.read_resource("taskorch://tasks/t-missing")
    assert info.value.code != -32603, f"internal error for a missing task: {info.value.error.message!r}"
    assert "t-missing" in info.value.error.message and "does not exist" in info.value.error.message


async def test_logging_set_level(tmp_path: Path) -> None:
    logger = logging.getLogger("taskorch")
    before = logger.level
    try:
        async with connect(tmp_path, mode="legacy") as c:  # logging/setLevel is gone in the 2026 era
            assert c.server_capabilities.logging is not None
            with pytest.warns(MCPDeprecationWarning):
                await c.set_logging_level("debug")
            assert logger.level == logging.DEBUG
            with pytest.warns(MCPDeprecationWarning):
                await c.set_logging_level("emergency")
            assert logger.level == logging.CRITICAL
            with pytest.warns(MCPDeprecationWarning):
                await c.set_logging_level("warning")
            assert logger.level == logging.WARNING
            assert not (await c.call_tool("statistics", {})).is_error  # still serving
    finally:
        logger.setLevel(before)
