"""The service: every rule of the queue, and the public in-process Python API.

Transports (MCP tools, REST handlers, the CLI) are thin calls into `TaskService`; its methods
carry the tools' names and keyword arguments. It validates and normalises input, applies the
configuration, wakes long-polling claimers, and sweeps expired leases in the background. The
store decides nothing on its own but the atomic guards.

    async with taskorch.open_service(db_path) as svc:
        task = await svc.create_task(work_path="/repo", prompt="Add a README")
        claim = await svc.next_task(work_path="/repo", worker_id="agent-1")
        await svc.complete_task(task_id=claim.task.id, worker_id="agent-1",
                                lease_token=claim.lease.token, status="success", output="done")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from . import validation as v
from .config import Config, load_config
from .errors import StoreBusy, TaskorchError, ValidationError
from .models import (
    TERMINAL,
    Claim,
    CleanupResult,
    DurationStats,
    Lease,
    Priority,
    Statistics,
    Status,
    Task,
    TaskPage,
    TaskWithEvents,
    WorkPathStats,
    us_to_datetime,
)
from .store_api import ClaimFilter, Clock, Completion, NewTask, Store
from .stores import open_store

log = logging.getLogger(__name__)

_US = 1_000_000
MAX_WAIT_SECONDS = 60.0
MAX_DELAY_SECONDS = 366 * 86_400
_TASK_SPEC_KEYS = frozenset(
    {
        "work_path", "prompt", "title", "priority", "tags", "depends_on", "max_attempts",
        "idempotency_key", "metadata", "delay_seconds", "timeout_seconds", "ref",
    }
)  # fmt: skip


def _percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(p * len(sorted_values)) - 1)
    return round(sorted_values[k], 6)


class ServiceObserver(Protocol):
    """What metrics need to see of the service (taskorch.metrics implements it)."""

    def task_event(self, kind: str, count: int) -> None:
        """kind: created, claimed, completed, failed, retried or lease_expired."""

    def store_latency(self, operation: str, seconds: float) -> None: ...


class _TimedStore:
    """The store, with every operation's duration reported to an observer."""

    def __init__(self, store: Store, observer: ServiceObserver) -> None:
        self._store = store
        self._observer = observer

    def __getattr__(self, name: str) -> Any:
        # Only reached on the first use of a name: the wrapper is then cached on the instance.
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        observer = self._observer

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                observer.store_latency(name, time.perf_counter() - start)

        setattr(self, name, timed)
        return timed


class TaskService:
    """The queue's rules. Build it with `open_service`; all methods are coroutines."""

    def __init__(self, store: Store, config: Config, observer: ServiceObserver | None = None) -> None:
        self.store = store if observer is None else _TimedStore(store, observer)
        self.config = config
        self._observer = observer
        if observer is not None:
            store.on_leases_recovered = lambda n: observer.task_event("lease_expired", n)
        # Another server sharing the database (PostgreSQL) made something claimable.
        store.on_remote_change = self._notify
        self._changed = anyio.Event()  # set (and replaced) when something may have become claimable
        self._waiting = 0  # long polls in progress

    # -- creating ---------------------------------------------------------------------------

    async def create_task(
        self,
        *,
        work_path: str,
        prompt: str,
        title: str | None = None,
        priority: str | None = None,
        tags: Sequence[str] | None = None,
        depends_on: Sequence[str] | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        delay_seconds: float | None = None,
        timeout_seconds: int | None = None,
    ) -> Task:
        """File a task against a work_path. A repeated idempotency_key returns the first task."""
        spec = self._new_task(
            work_path=work_path, prompt=prompt, title=title, priority=priority, tags=tags,
            depends_on=depends_on, max_attempts=max_attempts, idempotency_key=idempotency_key,
            metadata=metadata, delay_seconds=delay_seconds, timeout_seconds=timeout_seconds,
        )  # fmt: skip
        task = await self.store.create(spec)
        self._count("created")
        self._notify()
        return task

    async def create_tasks(self, *, tasks: Sequence[dict[str, Any]], mode: str | None = None) -> list[Task]:
        """Create a batch atomically. Items may name each other in depends_on by their `ref`;
        mode="sequential" makes each item depend on the one before it."""
        mode = v.choice("mode", mode, ("parallel", "sequential"), default="parallel")
        if not isinstance(tasks, list | tuple):
            raise ValidationError("tasks: must be a list of task objects", details={"field": "tasks"})
        limit = self.config.limits.max_batch_size
        if not tasks:
            raise ValidationError("tasks: must hold at least one task", details={"field": "tasks"})
        if len(tasks) > limit:
            raise ValidationError(f"tasks: has {len(tasks)} items; the limit is {limit}", details={"field": "tasks"})
        refs: dict[str, int] = {}
        for i, item in enumerate(tasks):
            if not isinstance(item, dict):
                raise ValidationError(f"tasks[{i}]: must be an object", details={"field": f"tasks[{i}]"})
            ref = v.identifier(f"tasks[{i}].ref", item.get("ref"), required=False)
            if ref is not None:
                if ref in refs:
                    raise ValidationError(f"tasks[{i}].ref: {ref!r} is used twice", details={"field": "ref"})
                refs[ref] = i
        specs: list[NewTask] = []
        deps_by_index: list[list[int]] = []
        for i, item in enumerate(tasks):
            unknown = sorted(str(k) for k in set(item) - _TASK_SPEC_KEYS)
            if unknown:
                raise ValidationError(
                    f"tasks[{i}]: unknown field {unknown[0][:40]!r}", details={"field": f"tasks[{i}]"}
                )
            raw_deps = item.get("depends_on")
            if raw_deps is None:
                raw_deps = []
            if not isinstance(raw_deps, list | tuple):
                raise ValidationError(f"tasks[{i}].depends_on: must be a list", details={"field": "depends_on"})
            local = [refs[d] for d in raw_deps if isinstance(d, str) and d in refs]
            external = [d for d in raw_deps if not (isinstance(d, str) and d in refs)]
            if mode == "sequential" and i > 0:
                local.append(i - 1)
            if i in local:
                raise ValidationError(f"tasks[{i}].depends_on: a task cannot depend on itself")
            deps_by_index.append(sorted(set(local)))
            fields = {k: val for k, val in item.items() if k != "ref"}
            fields["depends_on"] = external
            specs.append(self._new_task(prefix=f"tasks[{i}].", **fields))
        order = _topological_order(deps_by_index)
        # Insert in dependency order so every local dependency exists before its dependant.
        position = {old: new for new, old in enumerate(order)}
        ordered_specs = [specs[i] for i in order]
        ordered_refs = [[position[j] for j in deps_by_index[i]] for i in order]
        created = await self.store.create_many(ordered_specs, ordered_refs)
        self._count("created", len(created))
        self._notify()
        return [created[position[i]] for i in range(len(specs))]

    def _new_task(self, *, prefix: str = "", **a: Any) -> NewTask:
        lim, tasks_cfg = self.config.limits, self.config.tasks
        prompt = v.text(prefix + "prompt", a.get("prompt"), max_chars=lim.max_prompt_chars)
        title = v.text(prefix + "title", a.get("title"), max_chars=lim.max_title_chars, required=False)
        if title is None or not title.strip():
            first_line = prompt.strip().splitlines()[0].strip()
            title = first_line[: min(lim.max_title_chars, 120)]
        depends_on = v.string_list(
            prefix + "depends_on", a.get("depends_on"), max_items=lim.max_depends_on, max_chars=200
        )
        return NewTask(
            work_path=v.work_path(a.get("work_path"), max_chars=lim.max_work_path_chars, name=prefix + "work_path"),
            title=title,
            prompt=prompt,
            priority=v.priority_rank(v.priority(a.get("priority"), name=prefix + "priority")),
            tags=v.string_list(prefix + "tags", a.get("tags"), max_items=lim.max_tags, max_chars=lim.max_tag_chars),
            metadata=v.json_object(prefix + "metadata", a.get("metadata"), max_bytes=lim.max_metadata_bytes),
            depends_on=depends_on,
            max_attempts=v.integer(prefix + "max_attempts", a.get("max_attempts"), lo=1, hi=100,
                                   default=tasks_cfg.max_attempts),
            idempotency_key=v.identifier(prefix + "idempotency_key", a.get("idempotency_key"), required=False),
            delay_us=int(v.number(prefix + "delay_seconds", a.get("delay_seconds"), lo=0,
                                  hi=MAX_DELAY_SECONDS, default=0) * _US),
            timeout_seconds=v.integer(prefix + "timeout_seconds", a.get("timeout_seconds"), lo=1,
                                      hi=7 * 86_400, default=tasks_cfg.timeout_seconds),
        )  # fmt: skip

    # -- claims -----------------------------------------------------------------------------

    async def next_task(
        self,
        *,
        work_path: str,
        worker_id: str,
        lease_seconds: float | None = None,
        wait_seconds: float | None = None,
        include_subpaths: bool | None = None,
        tags: Sequence[str] | None = None,
    ) -> Claim | None:
        """Claim the best claimable task for work_path: highest priority, then oldest. With
        wait_seconds > 0, wait up to that long for one to appear. None when there is nothing."""
        lim, cfg = self.config.limits, self.config.tasks
        f = ClaimFilter(
            work_path=v.work_path(work_path, max_chars=lim.max_work_path_chars),
            worker_id=v.identifier("worker_id", worker_id),  # type: ignore[arg-type]
            lease_us=int(v.number("lease_seconds", lease_seconds, lo=1, hi=cfg.max_lease_seconds,
                                  default=cfg.lease_seconds) * _US),
            include_subpaths=v.boolean("include_subpaths", include_subpaths, default=False),
            tags=v.string_list("tags", tags, max_items=lim.max_tags, max_chars=lim.max_tag_chars),
            max_working=cfg.max_working_per_work_path,
        )  # fmt: skip
        wait = v.number("wait_seconds", wait_seconds, lo=0, hi=MAX_WAIT_SECONDS, default=0)
        claimed = await self._claim_for_caller(f)
        if claimed is None and wait > 0:
            claimed = await self._wait_and_claim(f, wait)
        if claimed is None:
            return None
        self._count("claimed")
        task, lease = claimed
        return Claim.model_construct(task=task, lease=lease)

    async def _claim_for_caller(self, f: ClaimFilter, busy_timeout_ms: int | None = None) -> tuple[Task, Lease] | None:
        """A claim that its caller hears of, or that is undone.

        A caller can be cancelled while its claim commits (an MCP client's notifications/cancelled,
        a long poll's deadline), e.g. while the claim waits for another process's write lock. The
        claim is never cancelled half-way, and if the caller is gone once it committed, the task is
        released at once (the attempt not counted) instead of staying `working` for nobody until
        its lease expires. Then the cancellation goes on."""
        with anyio.CancelScope(shield=True):
            claimed = await self.store.claim(f, busy_timeout_ms=busy_timeout_ms)
        if claimed is None:
            return None
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            task, lease = claimed
            with anyio.CancelScope(shield=True):
                try:
                    await self.store.release(task.id, f.worker_id, lease.token, 0)
                except TaskorchError as e:  # e.g. the lease was already taken back: nothing to undo
                    log.warning("could not release task %s claimed for a cancelled caller: %s", task.id, e)
                else:
                    self._notify()
            raise
        return claimed

    async def _wait_and_claim(self, f: ClaimFilter, wait: float) -> tuple[Task, Lease] | None:
        deadline = anyio.current_time() + wait
        self._waiting += 1
        try:
            return await self._wait_loop(f, deadline, wait)
        finally:
            self._waiting -= 1

    async def _wait_loop(self, f: ClaimFilter, deadline: float, wait: float) -> tuple[Task, Lease] | None:
        while True:
            changed = self._changed
            # Our own creates wake us at once, other servers' through the store's notifications
            # (PostgreSQL); polling covers the rest: SQLite processes, run_after, lease expiry.
            with anyio.move_on_after(min(self.config.tasks.poll_interval_seconds, wait)):
                await changed.wait()
            remaining = deadline - anyio.current_time()
            # The re-claim waits for the write lock no longer than the caller waits.
            try:
                claimed = await self._claim_for_caller(f, busy_timeout_ms=max(1, int(remaining * 1000)))
            except StoreBusy:
                claimed = None
            if claimed is not None or anyio.current_time() >= deadline:
                return claimed

    async def complete_task(
        self,
        *,
        task_id: str,
        worker_id: str,
        lease_token: int,
        status: str,
        output: str | None = None,
        details: Any = None,
        artifacts: Sequence[Any] | None = None,
        duration_ms: int | None = None,
        retryable: bool | None = None,
    ) -> Task:
        """Report the outcome of a claimed task. A failure with attempts left goes back to
        waiting after a backoff, unless retryable is false."""
        lim, cfg = self.config.limits, self.config.tasks
        task_id = v.identifier("task_id", task_id)  # type: ignore[assignment]
        worker_id = v.identifier("worker_id", worker_id)  # type: ignore[assignment]
        token = v.integer("lease_token", lease_token, lo=1)
        outcome = v.choice("status", status, ("success", "failure"))
        output = v.text("output", output, max_chars=lim.max_result_bytes, required=False)
        if artifacts is not None and not isinstance(artifacts, list | tuple):
            raise ValidationError("artifacts: must be a list", details={"field": "artifacts"})
        # Each part is checked on its own only when given, so an error names it; the common call
        # (no details, no artifacts) pays for one serialisation, of the whole result.
        if details is not None:
            v.json_value("details", details, max_bytes=lim.max_result_bytes)
        if artifacts:
            v.json_value("artifacts", artifacts, max_bytes=lim.max_result_bytes)
        result = {
            "status": outcome,
            "output": output,
            "details": details,
            "artifacts": list(artifacts or []),
            "duration_ms": v.integer("duration_ms", duration_ms, lo=0, default=0) if duration_ms is not None else None,
        }
        v.json_value("output, details and artifacts together", result, max_bytes=lim.max_result_bytes)
        success = outcome == "success"
        error = (
            None if success else {"code": "TASK_FAILED", "message": (output or "the worker reported failure")[:2000]}
        )
        task = await self.store.complete(
            Completion(
                task_id=task_id, worker_id=worker_id, token=token, success=success,
                retryable=v.boolean("retryable", retryable, default=True), result=result, error=error,
                backoff_base_us=int(cfg.retry_backoff_seconds * _US),
                backoff_max_us=int(cfg.retry_backoff_max_seconds * _US),
            )
        )  # fmt: skip
        self._count({Status.COMPLETED: "completed", Status.FAILED: "failed"}.get(task.status, "retried"))
        if task.status is Status.COMPLETED or task.status is Status.WAITING:
            self._notify()  # dependants may be claimable now, or the task itself later
        return task

    async def heartbeat_task(
        self, *, task_id: str, worker_id: str, lease_token: int, lease_seconds: float | None = None
    ) -> Lease:
        """Extend a live lease (never past the attempt's timeout). LEASE_LOST means stop."""
        cfg = self.config.tasks
        return await self.store.heartbeat(
            v.identifier("task_id", task_id),  # type: ignore[arg-type]
            v.identifier("worker_id", worker_id),  # type: ignore[arg-type]
            v.integer("lease_token", lease_token, lo=1),
            int(v.number("lease_seconds", lease_seconds, lo=1, hi=cfg.max_lease_seconds,
                         default=cfg.lease_seconds) * _US),
        )  # fmt: skip

    async def release_task(
        self, *, task_id: str, worker_id: str, lease_token: int, delay_seconds: float | None = None
    ) -> Task:
        """Give a claimed task back without using up an attempt (e.g. on shutdown)."""
        task = await self.store.release(
            v.identifier("task_id", task_id),  # type: ignore[arg-type]
            v.identifier("worker_id", worker_id),  # type: ignore[arg-type]
            v.integer("lease_token", lease_token, lo=1),
            int(v.number("delay_seconds", delay_seconds, lo=0, hi=MAX_DELAY_SECONDS, default=0) * _US),
        )
        self._notify()
        return task

    # -- edits ------------------------------------------------------------------------------

    async def cancel_task(
        self, *, task_id: str, reason: str | None = None, expected_version: int | None = None
    ) -> Task:
        """Cancel a waiting or working task. Its worker's lease token stops working."""
        return await self.store.cancel(
            v.identifier("task_id", task_id),  # type: ignore[arg-type]
            v.text("reason", reason, max_chars=2000, required=False),
            None if expected_version is None else v.integer("expected_version", expected_version, lo=1),
        )

    async def retry_task(self, *, task_id: str, expected_version: int | None = None) -> Task:
        """Put a failed or cancelled task back to waiting with its attempts reset."""
        task = await self.store.retry(
            v.identifier("task_id", task_id),  # type: ignore[arg-type]
            None if expected_version is None else v.integer("expected_version", expected_version, lo=1),
        )
        self._count("retried")
        self._notify()
        return task

    # -- reads ------------------------------------------------------------------------------

    async def get_task(self, *, task_id: str, include_events: bool | None = None) -> TaskWithEvents:
        """A task, and its history of transitions on request."""
        task, events = await self.store.get(
            v.identifier("task_id", task_id),  # type: ignore[arg-type]
            v.boolean("include_events", include_events, default=False),
        )
        return TaskWithEvents.model_construct(task=task, events=events)

    async def list_tasks(
        self,
        *,
        status: str | None = None,
        work_path: str | None = None,
        priority: str | None = None,
        tag: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> TaskPage:
        """Tasks newest first, filtered; `total` counts every match."""
        lim = self.config.limits
        st = v.status(status)
        pr = v.priority(priority, default=None)
        limit_ = v.integer("limit", limit, lo=1, hi=200, default=50)
        offset_ = v.integer("offset", offset, lo=0, default=0)
        tasks, total = await self.store.list(
            status=st.value if st else None,
            priority=v.priority_rank(pr) if pr else None,
            work_path=None if work_path is None else v.work_path(work_path, max_chars=lim.max_work_path_chars),
            tag=v.identifier("tag", tag, required=False, max_chars=lim.max_tag_chars),
            limit=limit_,
            offset=offset_,
        )
        return TaskPage.model_construct(tasks=tasks, total=total, limit=limit_, offset=offset_)

    async def statistics(self, *, work_path: str | None = None) -> Statistics:
        """Counts, ages, wait and run times, throughput and worker activity."""
        lim = self.config.limits
        wp = None if work_path is None else v.work_path(work_path, max_chars=lim.max_work_path_chars)
        raw = await self.store.statistics_rows(wp)
        now = raw["now"]
        by_status = {s.value: 0 for s in Status}
        by_priority = {p.value: 0 for p in Priority}
        from .models import RANK_PRIORITY

        for status, rank, count in raw["by_status_priority"]:
            by_status[status] += count
            by_priority[RANK_PRIORITY[rank].value] += count
        per_path: dict[str, dict[str, int]] = {}
        for path, status, count in raw["by_work_path"]:
            per_path.setdefault(path, {s.value: 0 for s in Status})[status] = count
        waits = sorted(w / _US for _, w, _, _ in raw["durations"] if w is not None)
        runs = sorted(r / _US for _, _, r, _ in raw["durations"] if r is not None)
        finished = by_status["completed"] + by_status["failed"]
        events = raw["event_counts"]
        oldest = raw["oldest_waiting"]
        return Statistics(
            total=sum(by_status.values()),
            by_status=by_status,
            by_priority=by_priority,
            by_work_path=[WorkPathStats(work_path=p, **counts) for p, counts in per_path.items()],
            oldest_waiting_age_seconds=None if oldest is None else round((now - oldest) / _US, 3),
            wait_time=DurationStats(count=len(waits), p50_seconds=_percentile(waits, 0.5),
                                    p95_seconds=_percentile(waits, 0.95)),
            run_time=DurationStats(count=len(runs), p50_seconds=_percentile(runs, 0.5),
                                   p95_seconds=_percentile(runs, 0.95)),
            completed_last_hour=raw["finished_last_hour"].get("completed", 0),
            failed_last_hour=raw["finished_last_hour"].get("failed", 0),
            success_rate=None if finished == 0 else round(by_status["completed"] / finished, 4),
            active_workers=raw["active_workers"],
            leases_recovered=events.get("lease_expired", 0),
            retries=events.get("retry_scheduled", 0) + events.get("retried", 0),
            generated_at=us_to_datetime(now),
        )  # fmt: skip

    # -- housekeeping -----------------------------------------------------------------------

    async def recover_expired_leases(self) -> int:
        """Requeue (or fail) tasks whose lease expired. Claims do this too; the sweep makes
        sure it happens when nobody claims."""
        n = await self.store.recover_expired()
        self._count("lease_expired", n)
        if n:
            log.info("recovered %d expired lease(s)", n)
            self._notify()
        return n

    async def cleanup(self, *, older_than_hours: float | None = None, max_tasks: int | None = None) -> CleanupResult:
        """Delete terminal tasks finished more than older_than_hours ago, then the oldest
        terminal tasks beyond max_tasks. Defaults come from the retention configuration;
        0 turns either rule off. Tasks a live task depends on are kept."""
        ret = self.config.retention
        hours = v.number("older_than_hours", older_than_hours, lo=0, hi=10**6, default=ret.completed_hours)
        cap = v.integer("max_tasks", max_tasks, lo=0, default=ret.max_tasks)
        cutoff = self.store.clock() - int(hours * 3600 * _US) if hours > 0 else None
        return await self.store.cleanup(cutoff, cap)

    async def run_sweeper(self) -> None:
        """Forever: recover expired leases and apply retention every sweep interval."""
        interval = self.config.tasks.sweep_interval_seconds
        while True:
            await anyio.sleep(interval)
            try:
                await self.recover_expired_leases()
                if self.config.retention.completed_hours or self.config.retention.max_tasks:
                    await self.cleanup()
            except TaskorchError as e:  # busy or transient: the next round tries again
                log.warning("sweep skipped: %s", e)

    def _count(self, kind: str, n: int = 1) -> None:
        if self._observer is not None and n:
            self._observer.task_event(kind, n)

    def _notify(self) -> None:
        if self._waiting:  # a new Event per write costs more than the write's Python part
            self._changed.set()
            self._changed = anyio.Event()


def _topological_order(deps: list[list[int]]) -> list[int]:
    """Indexes so that every item comes after those it depends on; a cycle is an error."""
    order: list[int] = []
    state = [0] * len(deps)  # 0 new, 1 visiting, 2 done
    for start in range(len(deps)):
        stack = [(start, iter(deps[start]))]
        if state[start]:
            continue
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[node] = 2
                order.append(node)
            elif state[nxt] == 1:
                raise ValidationError(f"tasks[{nxt}].depends_on: the batch's dependencies form a cycle")
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return order


@contextlib.asynccontextmanager
async def open_service(
    db_path: str | os.PathLike[str] | None = None,
    *,
    config: Config | None = None,
    durability: str | None = None,
    clock: Clock | None = None,
    sweep: bool = True,
    observer: ServiceObserver | None = None,
) -> AsyncIterator[TaskService]:
    """Open the database (creating and migrating it on first use) and yield the service.

    `db_path` overrides the configured database: a SQLite file path or a postgresql:// URL;
    `durability` ("full" or "normal") the configured durability. `clock` (tests) replaces the
    store's time. The background sweep of expired leases runs while the context is open.
    `observer` (e.g. taskorch.metrics) is told of task transitions and store latencies.
    """
    cfg = config if config is not None else load_config()
    location = str(db_path) if db_path is not None else cfg.db_location()
    mode = v.choice("durability", durability, ("full", "normal"), default=cfg.store.durability)
    store = await open_store(location, cfg, durability=mode, clock=clock)
    service = TaskService(store, cfg, observer)
    # A plain task, not a task group: a group would wrap every error raised by the caller's block
    # in an ExceptionGroup, and callers expect `except taskorch.NotFound` to work.
    sweeper = asyncio.get_running_loop().create_task(service.run_sweeper()) if sweep else None
    try:
        yield service
    finally:
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
        with anyio.CancelScope(shield=True):
            await store.close()


__all__ = ["TERMINAL", "ServiceObserver", "TaskService", "open_service"]
