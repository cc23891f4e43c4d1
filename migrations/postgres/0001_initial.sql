-- taskorch schema 1 for PostgreSQL: the same tables, columns and representation as
-- migrations/sqlite/0001_initial.sql, so rows of both stores become the same models.
-- Times are integer microseconds since the Unix epoch (UTC), from the database clock (or a test's
-- injected clock). JSON is stored as text: the service validates it, and the text comes back
-- byte for byte as written (jsonb would reorder keys and refuse \u0000).
-- COLLATE "C" on ids and work_path: byte order, as SQLite's BINARY, for ids as the last
-- tie-breaker of the claim order and for the work_path subtree range ["/a/b/", "/a/b0").
-- Applied in one transaction under pg_advisory_xact_lock (see pg_db.py).

CREATE TABLE tasks (
    id               text COLLATE "C" NOT NULL PRIMARY KEY,
    work_path        text COLLATE "C" NOT NULL,
    title            text     NOT NULL,
    prompt           text     NOT NULL,
    priority         smallint NOT NULL,           -- 0 low, 1 medium, 2 high, 3 urgent
    tags             text     NOT NULL,           -- JSON list, for display; task_tags is for filters
    metadata         text     NOT NULL,           -- JSON object
    status           text     NOT NULL,
    depends_on       text     NOT NULL,           -- JSON list, for display; task_dependencies for claims
    attempts         integer  NOT NULL DEFAULT 0,
    max_attempts     integer  NOT NULL,
    worker_id        text,
    lease_expires_at bigint,
    deadline_at      bigint,                      -- end of the current attempt's timeout
    version          bigint   NOT NULL DEFAULT 1, -- rises on every transition; the lease token
    run_after        bigint   NOT NULL,
    timeout_seconds  integer  NOT NULL,
    result           text,
    error            text,
    idempotency_key  text,
    created_at       bigint   NOT NULL,
    updated_at       bigint   NOT NULL,
    started_at       bigint,
    first_started_at bigint,                      -- for wait-time statistics across retries
    completed_at     bigint,
    CHECK (status IN ('waiting', 'working', 'completed', 'failed', 'cancelled'))
) WITH (
    -- A claim + complete leaves two dead row versions (status and lease are indexed, so no update
    -- is HOT), and dead entries ahead in the claim index slow every claim: vacuum early.
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim's scan: claimable tasks of one work_path in contract order.
CREATE INDEX tasks_claimable ON tasks (work_path, priority DESC, created_at, id) WHERE status = 'waiting';
-- Lease recovery: live claims ordered by expiry.
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE status = 'working';
-- The per-work_path cap on running tasks, and statistics.
CREATE INDEX tasks_work_path ON tasks (work_path, status);
CREATE INDEX tasks_completed ON tasks (completed_at) WHERE completed_at IS NOT NULL;
CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE task_dependencies (
    task_id    text COLLATE "C" NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    -- A foreign key here (SQLite has none): with many writers, retention deleting a task while a
    -- dependant referencing it is being inserted must fail one of them, never leave a dangling
    -- dependency that the claim would read as satisfied.
    depends_on text COLLATE "C" NOT NULL REFERENCES tasks (id),
    PRIMARY KEY (task_id, depends_on)
);
CREATE INDEX task_dependencies_parent ON task_dependencies (depends_on);

CREATE TABLE task_tags (
    task_id text COLLATE "C" NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    tag     text NOT NULL,
    PRIMARY KEY (task_id, tag)
);
CREATE INDEX task_tags_tag ON task_tags (tag, task_id);

CREATE TABLE task_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     text COLLATE "C" NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    kind        text    NOT NULL,   -- created, claimed, completed, failed, lease_expired, ...
    from_status text,
    to_status   text    NOT NULL,
    worker_id   text,
    version     bigint  NOT NULL,   -- the task's version after the transition
    at          bigint  NOT NULL,
    detail      text                -- JSON object
);
CREATE INDEX task_events_task ON task_events (task_id, id);
-- Only the rare kinds that statistics count: the common ones then cost no index write.
CREATE INDEX task_events_counted ON task_events (kind)
    WHERE kind IN ('lease_expired', 'retry_scheduled', 'retried');
