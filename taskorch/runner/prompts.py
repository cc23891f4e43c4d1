"""Prompt layers as data: YAML files rendered with Jinja2 (sandboxed, StrictUndefined).

Layers, later wins: the packaged `prompts/global.yaml` < `<work_path>/.taskorch/prompts.yaml` <
`prompts/scenarios/<name>.yaml`. Scalars are replaced by a later layer, lists are appended,
mappings are merged key by key (so a scenario can switch one tool off). A template that names an
unknown variable fails when it is rendered, not silently.

This module imports neither litellm nor anything else of the runner: the MCP server serves the same
templates as MCP prompts through `list_scenarios`, `load_prompt_layers` and `render_prompt`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..resources import resource_dir

GENERAL = "general"  # no scenario file: the global and project layers only
PROJECT_FILE = Path(".taskorch") / "prompts.yaml"
MAX_LAYER_BYTES = 64 * 1024
TEMPLATES = ("system", "planning", "instance")
TOOL_NAMES = ("read_file", "write_file", "list_files", "run_command", "finish")
# Every key a layer may hold; anything else is a typo and an error.
KEYS = frozenset({"description", "keywords", "rules", "instructions", "tools", "workspace_writable", *TEMPLATES})
_SCENARIO_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


class PromptError(ValueError):
    """A layer is unreadable or malformed, a scenario is unknown, or a template failed to render."""


def _prompts_dir() -> Path:
    return resource_dir("prompts")


def list_scenarios() -> list[str]:
    """The names of the packaged scenarios, sorted."""
    return sorted(p.stem for p in (_prompts_dir() / "scenarios").glob("*.yaml"))


def _read_layer(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptError(f"cannot read prompt layer {path}: {e.strerror}") from None
    if len(raw) > MAX_LAYER_BYTES:
        raise PromptError(f"prompt layer {path} is larger than {MAX_LAYER_BYTES} bytes")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise PromptError(f"prompt layer {path} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PromptError(f"prompt layer {path}: the top level must be a mapping")
    unknown = sorted(str(k) for k in data if k not in KEYS)
    if unknown:
        raise PromptError(f"prompt layer {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    tools = data.get("tools")
    if tools is not None:
        if not isinstance(tools, dict) or any(k not in TOOL_NAMES for k in tools):
            raise PromptError(f"prompt layer {path}: tools must map tool names ({', '.join(TOOL_NAMES)}) to settings")
    return data


def merge_layers(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars: the later layer wins. Lists: appended. Mappings: merged recursively."""
    out = dict(base)
    for key, value in layer.items():
        old = out.get(key)
        if isinstance(old, list) and isinstance(value, list):
            out[key] = [*old, *value]
        elif isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = merge_layers(old, value)
        else:
            out[key] = value
    return out


def _scenario_path(scenario: str) -> Path:
    if not _SCENARIO_NAME.fullmatch(scenario):
        raise PromptError(f"scenario {scenario!r} is not a valid name")
    path = _prompts_dir() / "scenarios" / f"{scenario}.yaml"
    if not path.is_file():
        raise PromptError(f"unknown scenario {scenario!r}; known: {', '.join([GENERAL, *list_scenarios()])}")
    return path


def load_prompt_layers(work_path: str | Path | None = None, scenario: str | None = None) -> dict[str, Any]:
    """The merged layers for `scenario` (None or "general": no scenario layer). A project layer is
    read from `<work_path>/.taskorch/prompts.yaml` when the file exists."""
    merged = _read_layer(_prompts_dir() / "global.yaml")
    if work_path is not None:
        project = Path(work_path) / PROJECT_FILE
        if project.is_file():
            merged = merge_layers(merged, _read_layer(project))
    if scenario and scenario != GENERAL:
        merged = merge_layers(merged, _read_layer(_scenario_path(scenario)))
    return merged


def infer_scenario(text: str) -> str:
    """The scenario whose keywords the text mentions most; "general" when none match."""
    words = text.lower()
    best, best_score = GENERAL, 0
    for name in list_scenarios():
        keywords = _read_layer(_scenario_path(name)).get("keywords") or []
        score = sum(1 for k in keywords if re.search(r"\b" + re.escape(str(k).lower()) + r"\b", words))
        if score > best_score:
            best, best_score = name, score
    return best


def _environment() -> Any:
    # Sandboxed: a project's prompts.yaml is a template too, and must not reach Python internals.
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


def render_template(source: str, variables: Mapping[str, Any]) -> str:
    from jinja2 import TemplateError

    try:
        return _environment().from_string(source).render(**variables).strip()
    except TemplateError as e:
        raise PromptError(f"prompt template failed to render: {e}") from None


def default_variables(
    prompt: str,
    *,
    work_path: str = ".",
    title: str | None = None,
    tools: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The variables every template may use, with neutral defaults (e.g. for MCP prompts)."""
    first_line = (prompt.strip().splitlines() or [""])[0]
    variables: dict[str, Any] = {
        "task": {"id": None, "title": title or first_line[:120], "prompt": prompt, "tags": [], "metadata": {}},
        "work_path": work_path,
        "tools": list(tools if tools is not None else TOOL_NAMES),
        "plan": None,
        "sandbox": "unspecified",
        "limits": {"max_steps": None, "cost_limit_usd": None, "wall_time_seconds": None},
    }
    variables.update(extra)
    return variables


def render_prompt(
    scenario: str | None,
    variables: Mapping[str, Any],
    *,
    work_path: str | Path | None = None,
    parts: tuple[str, ...] = TEMPLATES,
    layers: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Render the named templates of a scenario's merged layers. The layers' `rules` and
    `instructions` lists, and `scenario`, are available to the templates as variables."""
    merged = layers if layers is not None else load_prompt_layers(work_path, scenario)
    context = {"rules": list(merged.get("rules") or []), "instructions": list(merged.get("instructions") or []),
               "scenario": scenario or GENERAL, **variables}  # fmt: skip
    out: dict[str, str] = {}
    for part in parts:
        source = merged.get(part)
        if not isinstance(source, str):
            raise PromptError(f"prompt template {part!r} is missing or not a string")
        out[part] = render_template(source, context)
    return out


__all__ = [
    "GENERAL",
    "PromptError",
    "default_variables",
    "infer_scenario",
    "list_scenarios",
    "load_prompt_layers",
    "merge_layers",
    "render_prompt",
]
