"""The fast construction path builds the same models as validation does."""

from datetime import UTC, datetime

import pydantic
import pytest

from taskorch.models import Lease, Priority, Status, Task, construct


def _task_values() -> dict:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return {
        "id": "t1",
        "work_path": "/repo",
        "title": "Title",
        "prompt": "Do it",
        "priority": Priority.HIGH,
        "tags": ["a"],
        "metadata": {"k": 1},
        "status": Status.WORKING,
        "depends_on": [],
        "attempts": 1,
        "max_attempts": 3,
        "worker_id": "w",
        "lease_expires_at": now,
        "version": 2,
        "run_after": now,
        "timeout_seconds": 60,
        "result": None,
        "error": None,
        "idempotency_key": None,
        "created_at": now,
        "updated_at": now,
        "started_at": now,
        "completed_at": None,
    }


def test_constructed_task_equals_validated_task():
    fast = construct(Task, _task_values())
    slow = Task.model_validate(_task_values())
    assert fast == slow
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set


def test_constructed_lease_serialises_like_a_validated_one():
    values = {"token": 3, "worker_id": "w", "expires_at": datetime(2026, 1, 1, tzinfo=UTC),
              "deadline_at": datetime(2026, 1, 2, tzinfo=UTC)}  # fmt: skip
    assert construct(Lease, dict(values)).model_dump(mode="json") == Lease(**values).model_dump(mode="json")


def test_constructed_models_are_frozen():
    task = construct(Task, _task_values())
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        task.status = Status.COMPLETED
