"""Prompt layers: global < project (.taskorch/prompts.yaml) < scenario, rendered with StrictUndefined."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskorch.runner import prompts as P

pytest.importorskip("jinja2", reason="prompt rendering needs Jinja2 (a dependency of the runner extra)")

SCENARIOS = ["architecture", "code_generation", "command_execution", "debugging", "documentation",
             "file_operations", "optimization", "refactoring", "testing"]  # fmt: skip


def variables(**extra):
    return P.default_variables("Fix the crash in parser.py", work_path="/w", **extra)


def test_the_nine_scenarios_ship_and_every_one_renders():
    assert P.list_scenarios() == SCENARIOS
    for name in [P.GENERAL, *SCENARIOS]:
        out = P.render_prompt(name, variables())
        assert set(out) == {"system", "planning", "instance"} and all(out.values())
        assert f"Scenario: {name}" in out["system"] and "Fix the crash in parser.py" in out["instance"]


def test_a_later_layer_overrides_scalars_appends_lists_and_merges_tools(tmp_path: Path):
    (tmp_path / ".taskorch").mkdir()
    (tmp_path / ".taskorch" / "prompts.yaml").write_text(
        "description: project\nrules: [Use tabs.]\ninstructions: [Run make check.]\ntools: {run_command: false}\n"
    )
    layers = P.load_prompt_layers(tmp_path, "debugging")
    assert layers["description"].startswith("Find the cause")  # the scenario, last, wins the scalar
    rules = layers["rules"]
    assert rules[0].startswith("Work only inside") and "Use tabs." in rules and rules[-1].startswith("Say in")
    assert rules.index("Use tabs.") < rules.index(next(r for r in rules if r.startswith("Reproduce")))
    assert layers["tools"]["run_command"] is False and layers["tools"]["read_file"] is True
    system = P.render_prompt("debugging", variables(), work_path=tmp_path)["system"]
    assert "- Use tabs." in system and "Instructions:\n- Run make check." in system


def test_scenarios_narrow_tools():
    doc = P.load_prompt_layers(None, "documentation")
    assert doc["tools"]["run_command"] is False and doc["tools"]["write_file"]["path_pattern"]
    arch = P.load_prompt_layers(None, "architecture")
    assert arch["workspace_writable"] is False and arch["tools"]["write_file"] is False


@pytest.mark.parametrize("text,scenario", [
    ("Fix the crash when parsing empty files", "debugging"), ("Write pytest tests for the cache", "testing"),
    ("Update the README and the docs", "documentation"), ("Refactor and simplify the config loader", "refactoring"),
    ("Make the search faster; profile it", "optimization"), ("Hello there", P.GENERAL),
])  # fmt: skip
def test_the_scenario_is_inferred_from_the_task_text(text, scenario):
    assert P.infer_scenario(text) == scenario


def test_an_unknown_variable_fails_loudly(tmp_path: Path):
    (tmp_path / ".taskorch").mkdir()
    (tmp_path / ".taskorch" / "prompts.yaml").write_text("instance: 'Do {{ task.promt }}'\n")
    with pytest.raises(P.PromptError, match="promt"):
        P.render_prompt(None, variables(), work_path=tmp_path)


@pytest.mark.parametrize("content,message", [
    ("bogus: 1\n", "unknown key 'bogus'"), ("tools: {shell: true}\n", "tools must map"),
    ("- a list\n", "must be a mapping"), ("system: [unclosed\n", "not valid YAML"),
    ("system: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"\n", "failed to render"),
])  # fmt: skip
def test_a_broken_or_hostile_project_layer_is_an_error(tmp_path: Path, content, message):
    (tmp_path / ".taskorch").mkdir()
    (tmp_path / ".taskorch" / "prompts.yaml").write_text(content)
    with pytest.raises(P.PromptError, match=message):
        P.render_prompt(None, variables(), work_path=tmp_path)


def test_an_unknown_or_malformed_scenario_is_refused():
    with pytest.raises(P.PromptError, match="unknown scenario 'poetry'"):
        P.load_prompt_layers(None, "poetry")
    with pytest.raises(P.PromptError, match="not a valid name"):
        P.load_prompt_layers(None, "../global")
