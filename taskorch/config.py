"""Layered configuration: packaged defaults -> TASKORCH_ENV file -> user file -> environment -> flags."""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import platformdirs
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from taskorch.resources import resource_dir

__all__ = ["Config", "ConfigError", "default_db_path", "is_postgres_url", "load_config"]

# Ints and bools are strict so YAML like `port: "80"`, `lease_seconds: 2.5` or `max_attempts: true`
# is an error, not a silent coercion; environment strings are converted before validation.
NonNeg = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[int, Field(strict=True, ge=1)]
Bool = Annotated[bool, Field(strict=True)]
Float = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]  # strict float still takes ints
Names = tuple[Annotated[str, Field(min_length=1)], ...]


# libyaml's loader when PyYAML was built with it: parsing default.yaml is on every start-up path.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """Invalid configuration; the message has one line per problem, each naming the key and source."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Millis = Annotated[NonNeg, Field(le=2**31 - 1)]  # SQLite and PostgreSQL take 32-bit ints


class PostgresConfig(_Section):
    pool_min: NonNeg = 2
    pool_max: Positive = 8
    statement_timeout_ms: Millis = 30000
    lock_timeout_ms: Millis = 5000
    idle_in_transaction_timeout_ms: Millis = 60000

    @model_validator(mode="after")
    def _min_within_max(self) -> PostgresConfig:
        if self.pool_min > self.pool_max:
            raise ValueError(f"pool_min ({self.pool_min}) must be <= pool_max ({self.pool_max})")
        return self


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


class StoreConfig(_Section):
    # A file path (SQLite) or a postgresql:// URL, which must stay a str: Path() would fold its "//".
    path: Path | str | None = None
    durability: Literal["full", "normal"] = "full"
    busy_timeout_ms: Millis = 5000
    inline_writes: Bool = True
    postgres: PostgresConfig = Field(default_factory=PostgresConfig)

    @field_validator("path", mode="before")
    @classmethod
    def _file_or_url(cls, v: Any) -> Any:
        if v is None or isinstance(v, Path) or is_postgres_url(v):
            return v
        if isinstance(v, str):
            return Path(v)
        raise PydanticCustomError("path_type", "must be a path")


class TasksConfig(_Section):
    lease_seconds: Positive = 300
    max_lease_seconds: Positive = 86400
    timeout_seconds: Positive = 3600
    max_attempts: Annotated[Positive, Field(le=100)] = 3
    retry_backoff_seconds: NonNeg = 5
    retry_backoff_max_seconds: NonNeg = 600
    max_working_per_work_path: NonNeg = 0
    sweep_interval_seconds: Float = 5.0
    poll_interval_seconds: Float = 0.5

    @model_validator(mode="after")
    def _lease_within_max(self) -> TasksConfig:
        if self.lease_seconds > self.max_lease_seconds:
            lease, most = self.lease_seconds, self.max_lease_seconds
            raise ValueError(f"lease_seconds ({lease}) must be <= max_lease_seconds ({most})")
        return self


class LimitsConfig(_Section):
    max_prompt_chars: Positive = 100000
    max_title_chars: Positive = 500
    max_tags: Positive = 32
    max_tag_chars: Positive = 64
    max_metadata_bytes: Positive = 65536
    max_result_bytes: Positive = 1048576
    max_batch_size: Positive = 500
    max_depends_on: Positive = 100
    max_work_path_chars: Positive = 4096


class RetentionConfig(_Section):
    completed_hours: NonNeg = 0
    max_tasks: NonNeg = 0


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class RateLimitConfig(_Section):
    requests_per_minute: NonNeg = 600
    burst: Positive = 60


class ServerConfig(_Section):
    transport: Literal["stdio", "http"] = "stdio"
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[Positive, Field(le=65535)] = 8080
    # SecretStr keeps keys out of repr/str/logs; read them with api_key_values().
    api_keys: tuple[Annotated[SecretStr, Field(min_length=1)], ...] = ()
    cors_origins: Names = ()
    allowed_hosts: Names = ()
    max_body_bytes: Positive = 4194304
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)

    def api_key_values(self) -> tuple[str, ...]:
        return tuple(k.get_secret_value() for k in self.api_keys)


class LlmConfig(_Section):
    model: str | None = None
    api_base: str | None = None
    timeout_seconds: Float = 120.0


class Config(_Section):
    store: StoreConfig = Field(default_factory=StoreConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    llm: LlmConfig = Field(default_factory=LlmConfig)

    def db_path(self) -> Path:
        """The database file: store.path (with ~ expanded) or the per-user default."""
        if is_postgres_url(self.store.path):
            raise ValueError("store.path is a PostgreSQL URL, not a file; use db_location()")
        path = self.store.path
        return path.expanduser() if isinstance(path, Path) else default_db_path()

    def db_location(self) -> Path | str:
        """The database: a file path (SQLite) or a postgresql:// URL (PostgreSQL)."""
        return self.store.path if is_postgres_url(self.store.path) else self.db_path()  # type: ignore[return-value]


def default_db_path() -> Path:
    # The user data dir, not the cwd: desktop clients start the server from arbitrary directories.
    return platformdirs.user_data_path("taskorch") / "taskorch.db"


_SELECTORS = {"TASKORCH_CONFIG", "TASKORCH_ENV"}  # pick layers; they are not keys
_SHORTCUTS = {
    "TASKORCH_DB": ("store", "path"),
    "TASKORCH_API_KEYS": ("server", "api_keys"),
    "TASKORCH_LLM_MODEL": ("llm", "model"),
    "TASKORCH_LLM_API_BASE": ("llm", "api_base"),
}
_SECRET = ("server", "api_keys")


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _leaves(ann, (*prefix, name))
        else:
            out[(*prefix, name)] = ann
    return out


_LEAVES = _leaves(Config)
_ENV_NAMES = {"TASKORCH_" + "__".join(p.upper() for p in path): path for path in _LEAVES}
_ENV_BY_PATH = {path: name for name, path in _ENV_NAMES.items()}


def _from_env(raw: str, ann: Any) -> Any:
    """Turn an environment string into the field's Python type; leave it as-is if it doesn't parse so
    that validation reports it with the key and variable name."""
    args = get_args(ann)
    if get_origin(ann) in (Union, types.UnionType) and type(None) in args:
        if raw.strip().lower() in ("", "null", "none"):
            return None
        ann = next(a for a in args if a is not type(None))
    if get_origin(ann) in (list, tuple):
        return [part.strip() for part in raw.split(",") if part.strip()]
    if ann in (int, float, bool):
        try:
            return TypeAdapter(ann).validate_python(raw.strip())  # lax: "60", "0.5", "yes"
        except ValidationError:
            return raw
    return raw


def _merge(into: dict, layer: Mapping, source: str, sources: dict, prefix: tuple = ()) -> None:
    for key, value in layer.items():
        path = (*prefix, key)
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, sources, path)
        else:
            into[key] = value
            for p in [p for p in sources if p[: len(path)] == path]:
                del sources[p]
            sources[path] = source


def _plain(value: Any, drop_none: bool = False) -> Any:
    """Copy mappings (never mutate the caller's) with str keys: YAML reads `yes:` as True and `1:` as 1,
    and a str key gets the clear "unknown key" error. drop_none is for flags: None = not given."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, drop_none) for k, v in value.items() if not (drop_none and v is None)}
    return value


def _read_yaml(path: Path, why: str) -> Mapping:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} [{why}]") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        # Position only: PyYAML's own message quotes the offending line, which may hold an API key.
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = f"{getattr(exc, 'problem', None)} at {where}" if mark else " ".join(str(exc).split())
        raise ConfigError(f"cannot read config file {path}: {detail} [{why}]") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


_MESSAGES = {
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "model_type": "must be a mapping",
    "tuple_type": "must be a list",
    "path_type": "must be a path",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}
_BOUNDS = {
    "greater_than_equal": ">= {ge}",
    "greater_than": "> {gt}",
    "less_than_equal": "<= {le}",
    "less_than": "< {lt}",
    "literal_error": "one of {expected}",
}


def _problem(err: Mapping, sources: Mapping) -> str:
    loc = err["loc"]
    key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(loc))
    kind = err["type"]
    names = tuple(p for p in loc if not isinstance(p, int))  # keys are all str (see _plain)
    if kind == "extra_forbidden":
        msg = "unknown key"
        parent = Config
        for p in names[:-1]:
            parent = parent.model_fields[p].annotation
        close = difflib.get_close_matches(str(names[-1]), list(parent.model_fields), n=1)
        msg += f" (did you mean {close[0]!r}?)" if close else ""
    elif kind in _BOUNDS:
        msg = "must be " + _BOUNDS[kind].format(**err["ctx"])
    else:
        msg = _MESSAGES.get(kind) or str(err["msg"]).removeprefix("Value error, ")
    # Never echo secrets, and skip inputs that are whole mappings (extras, cross-field checks).
    if kind not in ("extra_forbidden", "value_error") and names[:2] != _SECRET:
        shown = repr(err.get("input"))
        msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    # A cross-field check (value_error on a section) has no single source; its message names both keys.
    source = kind != "value_error" and next(
        (sources[names[:n]] for n in range(len(names), 0, -1) if names[:n] in sources), None
    )
    return f"{key}: {msg}" + (f" [from {source}]" if source else "")


_ENV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config from every layer; raises ConfigError listing every problem found."""
    env = os.environ if environ is None else environ
    try:
        config_dir = resource_dir("config")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    merged: dict[str, Any] = {}
    sources: dict[tuple, str] = {}
    default_file = config_dir / "default.yaml"
    _merge(merged, _plain(_read_yaml(default_file, "packaged defaults")), str(default_file), sources)

    if env_name := env.get("TASKORCH_ENV"):
        if not _ENV_NAME.fullmatch(env_name):
            raise ConfigError(f"TASKORCH_ENV must be a plain name like 'dev' (got {env_name!r})")
        env_file = config_dir / f"{env_name}.yaml"
        _merge(merged, _plain(_read_yaml(env_file, "from TASKORCH_ENV")), str(env_file), sources)

    why = "from --config"
    if config_file is None and env.get("TASKORCH_CONFIG"):
        config_file, why = env["TASKORCH_CONFIG"], "from TASKORCH_CONFIG"
    if config_file is not None:
        user_file = Path(config_file).expanduser()
        _merge(merged, _plain(_read_yaml(user_file, why)), str(user_file), sources)

    problems: list[str] = []
    env_layer: list[tuple[str, tuple[str, ...], Any]] = []
    for var in sorted(v for v in env if v.startswith("TASKORCH_") and v not in _SELECTORS):
        path = _SHORTCUTS.get(var) or _ENV_NAMES.get(var)
        if path is None:
            # Match on the part after the prefix, else every name looks alike through "TASKORCH_".
            close = difflib.get_close_matches(var[9:], [n[9:] for n in [*_ENV_NAMES, *_SHORTCUTS]], n=1)
            hint = f" (did you mean TASKORCH_{close[0]}?)" if close else ""
            problems.append(f"{var}: environment variable does not name a taskorch setting{hint}")
            continue
        env_layer.append((var, path, _from_env(env[var], _LEAVES[path])))
    for short, path in _SHORTCUTS.items():
        long = _ENV_BY_PATH[path]
        if short in env and long in env and env[short] != env[long]:
            problems.append(f"{short} and {long} are both set and differ; set only one")
    for var, path, value in env_layer:
        layer: Any = value
        for part in reversed(path):
            layer = {part: layer}
        _merge(merged, layer, var, sources)

    if overrides:
        _merge(merged, _plain(overrides, drop_none=True), "command line", sources)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        problems += [_problem(e, sources) for e in exc.errors()]
    if problems:
        raise ConfigError("\n".join(problems))
    return config
