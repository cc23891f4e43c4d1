"""The runner's scenario templates are served as MCP prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client

import taskorch
from taskorch.config import load_config
from taskorch.mcp_server import build_mcp
from taskorch.runner.prompts import list_scenarios

pytestmark = pytest.mark.anyio
SCENARIOS = {
    "code_generation", "refactoring", "debugging", "testing", "documentation",
    "architecture", "optimization", "file_operations", "command_execution",
}  # fmt: skip


async def test_every_scenario_is_an_mcp_prompt_that_renders_the_task_text(tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    assert set(list_scenarios()) >= SCENARIOS
    async with taskorch.open_service(tmp_path / "t.db", config=load_config(environ={}), sweep=False) as svc:
        async with Client(build_mcp(svc)) as c:
            listed = {p.name: p for p in (await c.list_prompts()).prompts}
            assert set(listed) >= SCENARIOS
            assert all(p.description for p in listed.values())
            assert [a.name for a in listed["debugging"].arguments] == ["prompt", "work_path"]
            result = await c.get_prompt(
                "debugging", {"prompt": "The login test fails on Mondays", "work_path": "/srv/app"}
            )
            text = result.messages[0].content.text
            assert "The login test fails on Mondays" in text
            assert "/srv/app" in text
