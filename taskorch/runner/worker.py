"""The worker loop: claim (long-poll, capped backoff on errors), renew the lease, run, report.

The queue is anything with the service's method names and keywords: the in-process `TaskService`
(local mode, several workers sharing one SQLite file) or the REST client (remote mode). The lease
is renewed in the background at half its length; LEASE_LOST stops the run at once (its command is
killed) and nothing is reported. On the first SIGTERM/SIGINT the current step finishes, then the
task is released (or completed, if it had just finished); a second signal releases it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..errors import LeaseLost, TaskorchError
from .agent import Progress
from .llm import LlmClient
from .sandbox import MiB
from .session import RunnerSettings, RunOutcome, execute_task, failed

log = logging.getLogger(__name__)

DEADLINE_MARGIN_SECONDS = 10.0  # stop the agent this long before the attempt's deadline, to report in time


def default_worker_id() -> str:
    return f"{socket.gethostname()[:60]}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerOptions:
    work_path: str
    worker_id: str
    concurrency: int = 1
    once: bool = False
    lease_seconds: float | None = None  # None: the queue's default
    wait_seconds: float = 10.0  # long-poll; also the longest a stop waits for a claim in flight
    backoff_max_seconds: float = 30.0
    include_subpaths: bool = False
    tags: tuple[str, ...] = ()
    max_result_bytes: int = MiB


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name)


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _seconds_until(value: Any) -> float | None:
    when = _as_datetime(value)
    return None if when is None else (when - datetime.now(UTC)).total_seconds()


def _is_lease_lost(exc: BaseException) -> bool:
    return isinstance(exc, LeaseLost) or getattr(exc, "code", None) == "LEASE_LOST"


class Worker:
    """Runs tasks of one work_path until stopped (or one task with `once`)."""

    def __init__(
        self,
        queue: Any,
        settings: RunnerSettings,
        llm: LlmClient,
        options: WorkerOptions,
        *,
        progress_for: Callable[[Any], Progress | None] | None = None,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.llm = llm
        self.options = options
        self.progress_for = progress_for or (lambda task: None)
        self.stopping = False
        self.processed = 0
        self.outcomes: list[RunOutcome] = []
        self._slots: list[asyncio.Task[None]] = []
        self._stop_event = asyncio.Event()

    def request_stop(self) -> None:
        """First call: finish the current step, then release. Second: release now."""
        if not self.stopping:
            log.info("stopping: the current step finishes, then the task is released")
            self.stopping = True
            self._stop_event.set()
            return
        log.warning("stopping now")
        for slot in self._slots:
            slot.cancel()

    async def run(self) -> int:
        n = max(1, self.options.concurrency)
        ids = [self.options.worker_id] if n == 1 else [f"{self.options.worker_id}-{i}" for i in range(n)]
        self._slots = [asyncio.ensure_future(self._slot(wid)) for wid in ids]
        results = await asyncio.gather(*self._slots, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        return 0

    # -- claiming ---------------------------------------------------------------------------

    async def _slot(self, worker_id: str) -> None:
        failures = 0
        while not self.stopping:
            try:
                claim = await _maybe_await(self.queue.next_task(
                    work_path=self.options.work_path, worker_id=worker_id, lease_seconds=self.options.lease_seconds,
                    wait_seconds=0 if self.options.once else self.options.wait_seconds,
                    include_subpaths=self.options.include_subpaths, tags=list(self.options.tags) or None,
                ))  # fmt: skip
            except (TaskorchError, OSError) as e:  # busy store, server unreachable: back off, capped
                failures += 1
                delay = min(self.options.backoff_max_seconds, 0.5 * 2**failures) * random.uniform(0.8, 1.2)
                log.warning("claim failed (%s); retrying in %.1f s", e, delay)
                await self._sleep(delay)
                continue
            failures = 0
            if claim is not None:
                if self.stopping:  # stopped while the long poll was in flight: give it straight back
                    await self._release(claim, worker_id)
                    return
                await self._process(claim, worker_id)
                self.processed += 1
            if self.options.once:
                return

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    # -- one task ---------------------------------------------------------------------------

    async def _process(self, claim: Any, worker_id: str) -> None:
        task, lease = _field(claim, "task"), _field(claim, "lease")
        task_id, token = str(_field(task, "id")), int(_field(lease, "token"))
        lease_len = self.options.lease_seconds or _seconds_until(_field(lease, "expires_at")) or 60.0
        budget = _seconds_until(_field(lease, "deadline_at"))
        log.info("claimed task %s (%s)", task_id, _field(task, "title"))
        run = asyncio.ensure_future(execute_task(
            task, self.settings, self.llm, progress=self.progress_for(task), should_stop=lambda: self.stopping,
            time_budget=None if budget is None else max(1.0, budget - DEADLINE_MARGIN_SECONDS),
            max_result_bytes=self.options.max_result_bytes,
        ))  # fmt: skip
        lost = asyncio.Event()
        beat = asyncio.ensure_future(self._renew(task_id, worker_id, token, lease_len, lost, run))
        try:
            outcome = await run
        except asyncio.CancelledError:
            if lost.is_set():
                log.warning("task %s: the lease was lost; the run was stopped and nothing is reported", task_id)
                return
            await asyncio.shield(self._release(claim, worker_id))  # a hard stop: hand the task back
            raise
        except Exception:  # a bug in the runner: report it so the task is retried elsewhere
            log.exception("task %s: the runner failed", task_id)
            outcome = RunOutcome(failed("runner_error", "the runner failed unexpectedly; see its log"), "failure",
                                 retryable=True)  # fmt: skip
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
        self.outcomes.append(outcome)
        if outcome.status == "interrupted":
            await self._release(claim, worker_id)
            return
        await self._complete(task_id, worker_id, token, outcome)

    async def _renew(self, task_id: str, worker_id: str, token: int, lease_len: float, lost: asyncio.Event,
                     run: asyncio.Future[Any]) -> None:  # fmt: skip
        interval = max(0.5, lease_len / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                await _maybe_await(self.queue.heartbeat_task(task_id=task_id, worker_id=worker_id, lease_token=token,
                                                             lease_seconds=self.options.lease_seconds))  # fmt: skip
                interval = max(0.5, lease_len / 2)
            except (TaskorchError, OSError) as e:
                if _is_lease_lost(e):
                    lost.set()
                    run.cancel()  # stop at once: the task may already be someone else's
                    return
                interval = max(0.5, lease_len / 6)  # transient: try again sooner
                log.warning("task %s: lease renewal failed (%s); retrying in %.1f s", task_id, e, interval)

    async def _complete(self, task_id: str, worker_id: str, token: int, outcome: RunOutcome) -> None:
        r = outcome.result
        status = "success" if outcome.status == "success" else "failure"
        for attempt in range(5):
            try:
                await _maybe_await(self.queue.complete_task(
                    task_id=task_id, worker_id=worker_id, lease_token=token, status=status,
                    output=str(r.get("summary") or "")[:4000], details=r, artifacts=list(r.get("artifacts") or []),
                    duration_ms=int(float(r.get("execution_time") or 0) * 1000), retryable=outcome.retryable,
                ))  # fmt: skip
                log.info("task %s: %s (%s)", task_id, status, r.get("stop_reason"))
                return
            except (TaskorchError, OSError) as e:
                if _is_lease_lost(e):
                    log.warning("task %s: the lease was lost before completion; the result is dropped", task_id)
                    return
                if getattr(e, "code", None) in ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE") and r.get("steps"):
                    r = {**r, "steps": [{"kind": "omitted", "reason": f"the result was refused: {e}"}]}
                    continue
                delay = min(10.0, 0.5 * 2**attempt)
                log.warning("task %s: completion failed (%s); retrying in %.1f s", task_id, e, delay)
                await asyncio.sleep(delay)
        log.error("task %s: could not report the result; the lease will expire and the task be retried", task_id)

    async def _release(self, claim: Any, worker_id: str) -> None:
        task_id = str(_field(_field(claim, "task"), "id"))
        token = int(_field(_field(claim, "lease"), "token"))
        with contextlib.suppress(TaskorchError, OSError):
            await _maybe_await(self.queue.release_task(task_id=task_id, worker_id=worker_id, lease_token=token))
            log.info("task %s: released", task_id)
