-- taskorch schema 1: tasks, their dependencies and tags, and the event log.
-- Times are integer microseconds since the Unix epoch (UTC), taken from the store's clock.
-- Portable on purpose (see DESIGN.md "Storage"): no rowid tricks, no JSON functions in queries.

CREATE TABLE tasks (
    id               TEXT    NOT NULL PRIMARY KEY,
    work_path        TEXT    NOT NULL,
    title            TEXT    NOT NULL,
    prompt           TEXT    NOT NULL,
    priority         INTEGER NOT NULL,            -- 0 low, 1 medium, 2 high, 3 urgent
    tags             TEXT    NOT NULL,            -- JSON list, for display; task_tags is for filters
    metadata         TEXT    NOT NULL,            -- JSON object
    status           TEXT    NOT NULL,
    depends_on       TEXT    NOT NULL,            -- JSON list, for display; task_dependencies for claims
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    worker_id        TEXT,
    lease_expires_at INTEGER,
    deadline_at      INTEGER,                     -- end of the current attempt's timeout
    version          INTEGER NOT NULL DEFAULT 1,  -- rises on every transition; the lease token
    run_after        INTEGER NOT NULL,
    timeout_seconds  INTEGER NOT NULL,
    result           TEXT,
    error            TEXT,
    idempotency_key  TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    first_started_at INTEGER,                     -- for wait-time statistics across retries
    completed_at     INTEGER,
    CHECK (status IN ('waiting', 'working', 'completed', 'failed', 'cancelled'))
);

-- The claim's scan: claimable tasks of one work_path in contract order.
CREATE INDEX tasks_claimable ON tasks (work_path, priority DESC, created_at, id) WHERE status = 'waiting';
-- Lease recovery: live claims ordered by expiry.
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE status = 'working';
-- The per-work_path cap on running tasks, and statistics. (No index on status alone: every
-- transition would pay for it, and without ANALYZE the planner preferred it to tasks_leases.)
CREATE INDEX tasks_work_path ON tasks (work_path, status);
CREATE INDEX tasks_completed ON tasks (completed_at) WHERE completed_at IS NOT NULL;
CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE task_dependencies (
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    depends_on TEXT NOT NULL,
    PRIMARY KEY (task_id, depends_on)
);
CREATE INDEX task_dependencies_parent ON task_dependencies (depends_on);

CREATE TABLE task_tags (
    task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    tag     TEXT NOT NULL,
    PRIMARY KEY (task_id, tag)
);
CREATE INDEX task_tags_tag ON task_tags (tag, task_id);

CREATE TABLE task_events (
    id          INTEGER PRIMARY KEY,
    task_id     TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    kind        TEXT    NOT NULL,   -- created, claimed, completed, failed, requeued, lease_expired, ...
    from_status TEXT,
    to_status   TEXT    NOT NULL,
    worker_id   TEXT,
    version     INTEGER NOT NULL,   -- the task's version after the transition
    at          INTEGER NOT NULL,
    detail      TEXT                -- JSON object
);
CREATE INDEX task_events_task ON task_events (task_id, id);
-- Only the rare kinds that statistics count: the common ones then cost no index write.
CREATE INDEX task_events_counted ON task_events (kind)
    WHERE kind IN ('lease_expired', 'retry_scheduled', 'retried');
