"""Argument checks shared by every service call: each names the argument and says what to fix.

Plain functions, not pydantic: they run on every claim and their messages are part of the
product (a model reads them and must be able to correct its call).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from typing import Any

from .errors import PayloadTooLarge, ValidationError
from .models import PRIORITY_ALIASES, PRIORITY_RANK, Priority, Status


def _fail(name: str, problem: str) -> ValidationError:
    return ValidationError(f"{name}: {problem}", details={"field": name})


def _show(value: Any) -> str:
    """A short, safe rendering of a rejected value (never recursing into big structures)."""
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, bool | int | float) or value is None:
        return str(value)[:40]
    return f"a {type(value).__name__}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def _has_control_chars(value: str) -> bool:
    return _CONTROL.search(value) is not None


def text(
    name: str,
    value: Any,
    *,
    max_chars: int,
    required: bool = True,
    allow_control: bool = True,
) -> str | None:
    if value is None:
        if required:
            raise _fail(name, "is required")
        return None
    if not isinstance(value, str):
        raise _fail(name, f"must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise _fail(name, "must not contain NUL bytes")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(name, "must be valid Unicode text (it holds a lone surrogate)") from None
    if required and not value.strip():
        raise _fail(name, "must not be empty")
    if len(value) > max_chars:
        raise _fail(name, f"is too long ({len(value)} characters; the limit is {max_chars})")
    if not allow_control and _has_control_chars(value):
        raise _fail(name, "must not contain control characters")
    return value


def identifier(name: str, value: Any, *, required: bool = True, max_chars: int = 200) -> str | None:
    """Ids, worker ids, keys and tags: short, printable, no surrounding spaces."""
    value = text(name, value, max_chars=max_chars, required=required, allow_control=False)
    if value is not None and not value:
        raise _fail(name, "must not be empty (leave it out instead)")
    if value is not None and value != value.strip():
        raise _fail(name, "must not start or end with spaces")
    return value


MAX_INT = 2**63 - 1  # what SQLite (and PostgreSQL's bigint) can store


def integer(name: str, value: Any, *, lo: int, hi: int = MAX_INT, default: int | None = None) -> int:
    if value is None:
        if default is None:
            raise _fail(name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _fail(name, f"must be an integer, not {type(value).__name__}")
    if value < lo or value > hi:
        bound = f"between {lo} and {hi}" if hi != MAX_INT else f"at least {lo}"
        raise _fail(name, f"must be {bound} (got {str(value)[:40]})")
    return value


def number(name: str, value: Any, *, lo: float, hi: float, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(name, f"must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(name, f"must be a finite number (got {value})")
    if value < lo or value > hi:  # compared before float(): a huge int would overflow it
        raise _fail(name, f"must be between {lo:g} and {hi:g} (got {_show(value)})")
    return float(value)


def boolean(name: str, value: Any, *, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _fail(name, f"must be true or false, not {type(value).__name__}")
    return value


def work_path(value: Any, *, max_chars: int, name: str = "work_path") -> str:
    """An absolute path, normalised lexically: no trailing slash, `.` and `..` resolved."""
    value = text(name, value, max_chars=max_chars, allow_control=False)
    assert value is not None
    if not value.startswith("/"):
        raise _fail(name, f"must be an absolute path such as /home/me/project (got {value[:80]!r})")
    normalised = posixpath.normpath(value)
    if normalised.startswith("//"):  # POSIX keeps a leading "//"; one root is enough
        normalised = "/" + normalised.lstrip("/")
    return normalised


def priority(value: Any, *, name: str = "priority", default: Priority | None = Priority.MEDIUM) -> Priority | None:
    if value is None:
        return default
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in PRIORITY_ALIASES:
            return PRIORITY_ALIASES[key]
        try:
            return Priority(key)
        except ValueError:
            pass
    raise _fail(name, f"must be one of low, medium, high, urgent (got {_show(value)})")


def priority_rank(p: Priority) -> int:
    return PRIORITY_RANK[p]


def status(value: Any, *, name: str = "status") -> Status | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError
        return Status(value.lower())
    except ValueError:
        allowed = ", ".join(s.value for s in Status)
        raise _fail(name, f"must be one of {allowed} (got {_show(value)})") from None


def string_list(name: str, value: Any, *, max_items: int, max_chars: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise _fail(name, f"must be a list of strings, not {type(value).__name__}")
    if len(value) > max_items:
        raise _fail(name, f"has {len(value)} items; the limit is {max_items}")
    items = [identifier(f"{name}[{i}]", v, max_chars=max_chars) for i, v in enumerate(value)]
    return tuple(dict.fromkeys(items))  # type: ignore[arg-type]


def json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def json_object(name: str, value: Any, *, max_bytes: int) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(name, f"must be a JSON object, not {type(value).__name__}")
    return json_value(name, value, max_bytes=max_bytes)


def json_value(name: str, value: Any, *, max_bytes: int) -> Any:
    try:
        size = json_size(value)
    except (TypeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:100]
        raise _fail(name, f"must be JSON-serialisable ({reason})") from None
    if size > max_bytes:
        raise PayloadTooLarge(f"{name}: is {size} bytes as JSON; the limit is {max_bytes}", details={"field": name})
    return value


def choice(name: str, value: Any, allowed: tuple[str, ...], *, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str) or value not in allowed:
        raise _fail(name, f"must be one of {', '.join(allowed)} (got {_show(value)})")
    return value
