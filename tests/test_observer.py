"""The service tells an observer (metrics) of every task transition and store latency."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import taskorch
from taskorch.config import load_config

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.operations: Counter[str] = Counter()

    def task_event(self, kind: str, count: int) -> None:
        self.events[kind] += count

    def store_latency(self, operation: str, seconds: float) -> None:
        assert seconds >= 0
        self.operations[operation] += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000_000_000

    def __call__(self) -> int:
        return self.now


async def test_observer_counts_every_kind_of_transition(tmp_path: Path) -> None:
    rec, clock = Recorder(), Clock()
    cfg = load_config(environ={}, overrides={"store": {"durability": "normal"}})
    async with taskorch.open_service(tmp_path / "t.db", config=cfg, clock=clock, sweep=False, observer=rec) as svc:
        await svc.create_tasks(tasks=[{"work_path": "/o", "prompt": f"p{i}"} for i in range(4)])
        ok = await svc.next_task(work_path="/o", worker_id="w")
        await svc.complete_task(task_id=ok.task.id, worker_id="w", lease_token=ok.lease.token, status="success")
        bad = await svc.next_task(work_path="/o", worker_id="w")
        await svc.complete_task(task_id=bad.task.id, worker_id="w", lease_token=bad.lease.token, status="failure")
        final = await svc.next_task(work_path="/o", worker_id="w")
        await svc.complete_task(
            task_id=final.task.id, worker_id="w", lease_token=final.lease.token, status="failure", retryable=False
        )
        await svc.retry_task(task_id=final.task.id)
        await svc.next_task(work_path="/o", worker_id="w", lease_seconds=1)
        clock.now += 5_000_000
        await svc.next_task(work_path="/o", worker_id="w2")  # recovers the expired lease on its way
    assert rec.events == Counter(created=4, claimed=5, completed=1, failed=1, retried=2, lease_expired=1), rec.events
    assert rec.operations["claim"] == 5 and rec.operations["complete"] == 3 and rec.operations["create_many"] == 1
