"""Every SQL statement of the SQLite store, as named constants.

Statements are composed only of constant fragments at import time; values are always bound
parameters, never text.

Rules that keep a PostgreSQL port a second module of constants, not a rewrite (DESIGN.md):
each state rule is a WHERE guard in the statement that writes; time is a bound parameter from the
store's clock; ids are server-generated strings and the last tie-breaker of every ORDER BY.
Times are integer microseconds since the epoch.
"""

TASK_COLUMNS = (
    "id, work_path, title, prompt, priority, tags, metadata, status, depends_on, attempts, "
    "max_attempts, worker_id, lease_expires_at, deadline_at, version, run_after, timeout_seconds, "
    "result, error, idempotency_key, created_at, updated_at, started_at, completed_at"
)

# A create; a repeated idempotency key inserts nothing and returns no row.
INSERT_TASK = f"""
INSERT INTO tasks (id, work_path, title, prompt, priority, tags, metadata, status, depends_on,
                   max_attempts, version, run_after, timeout_seconds, idempotency_key,
                   created_at, updated_at)
VALUES (:id, :work_path, :title, :prompt, :priority, :tags, :metadata, 'waiting', :depends_on,
        :max_attempts, 1, :run_after, :timeout_seconds, :idempotency_key, :now, :now)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING {TASK_COLUMNS}
"""

INSERT_DEPENDENCY = "INSERT INTO task_dependencies (task_id, depends_on) VALUES (?, ?)"
INSERT_TAG = "INSERT INTO task_tags (task_id, tag) VALUES (?, ?)"
TASK_EXISTS = "SELECT 1 FROM tasks WHERE id = ?"

INSERT_EVENT = """
INSERT INTO task_events (task_id, kind, from_status, to_status, worker_id, version, at, detail)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""

SELECT_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"
SELECT_TASK_BY_IDEMPOTENCY_KEY = f"SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = ?"
SELECT_EVENTS = """
SELECT task_id, kind, from_status, to_status, worker_id, version, at, detail
FROM task_events WHERE task_id = ? ORDER BY id
"""
# The event that accepted a completion made with this token (version after it = token + 1),
# with the same outcome: a replayed success matches only an accepted success.
SELECT_SUCCESS_EVENT = """
SELECT 1 FROM task_events WHERE task_id = ? AND version = ? AND worker_id = ? AND kind = 'completed'
"""
SELECT_FAILURE_EVENT = """
SELECT 1 FROM task_events
WHERE task_id = ? AND version = ? AND worker_id = ? AND kind IN ('failed', 'retry_scheduled')
"""

# Lease recovery, in two statements of one write transaction: the events first (they need the
# worker that lost the lease), then the transition, both under the same guard.
RECORD_EXPIRED_LEASES = """
INSERT INTO task_events (task_id, kind, from_status, to_status, worker_id, version, at, detail)
SELECT id, 'lease_expired', 'working',
       CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'waiting' END,
       worker_id, version + 1, :now, :detail
FROM tasks WHERE status = 'working' AND lease_expires_at <= :now
"""
RECOVER_EXPIRED_LEASES = """
UPDATE tasks
SET status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'waiting' END,
    error = :error,
    completed_at = CASE WHEN attempts >= max_attempts THEN :now ELSE NULL END,
    worker_id = NULL, lease_expires_at = NULL, deadline_at = NULL, started_at = NULL,
    run_after = :now, version = version + 1, updated_at = :now
WHERE status = 'working' AND lease_expires_at <= :now
"""

# The claim: pick the best claimable task and take it, in one statement. The lease never outlives
# the attempt's deadline, so "lease_expires_at <= now" alone finds every expired attempt.
_CLAIM_SET = f"""
UPDATE tasks
SET status = 'working', worker_id = :worker_id,
    deadline_at = :now + timeout_seconds * 1000000,
    lease_expires_at = min(:lease_until, :now + timeout_seconds * 1000000),
    attempts = attempts + 1, version = version + 1,
    started_at = :now, first_started_at = coalesce(first_started_at, :now), updated_at = :now
WHERE id = (
    SELECT t.id FROM tasks AS t
    WHERE {{where_path}}
      AND t.status = 'waiting' AND t.run_after <= :now
      AND NOT EXISTS (
          SELECT 1 FROM task_dependencies AS d JOIN tasks AS p ON p.id = d.depends_on
          WHERE d.task_id = t.id AND p.status <> 'completed')
      AND (:tag_set IS NULL OR EXISTS (
          SELECT 1 FROM task_tags AS g
          WHERE g.task_id = t.id AND instr(:tag_set, char(31) || g.tag || char(31)) > 0))
      AND (:max_working = 0 OR (
          SELECT count(*) FROM tasks AS w
          WHERE w.work_path = t.work_path AND w.status = 'working') < :max_working)
    ORDER BY t.priority DESC, t.created_at, t.id
    LIMIT 1)
RETURNING {TASK_COLUMNS}
"""
CLAIM_NEXT = _CLAIM_SET.format(where_path="t.work_path = :work_path")
# The work_path and everything below it: "/a/b" plus the key range ["/a/b/", "/a/b0").
CLAIM_NEXT_IN_SUBTREE = _CLAIM_SET.format(
    where_path="(t.work_path = :work_path OR (t.work_path >= :subtree_lo AND t.work_path < :subtree_hi))"
)

# A completion, fenced by id + version (the lease token) + worker + a live lease. Failure with
# attempts left goes back to waiting after exponential backoff, unless marked not retryable.
COMPLETE_TASK = f"""
UPDATE tasks
SET status = CASE WHEN :success THEN 'completed'
                  WHEN :retryable AND attempts < max_attempts THEN 'waiting'
                  ELSE 'failed' END,
    completed_at = CASE WHEN NOT :success AND :retryable AND attempts < max_attempts THEN NULL
                        ELSE :now END,
    worker_id = CASE WHEN NOT :success AND :retryable AND attempts < max_attempts THEN NULL
                     ELSE worker_id END,
    run_after = CASE WHEN NOT :success AND :retryable AND attempts < max_attempts
                     THEN :now + min(:backoff_base * (1 << min(attempts - 1, 30)), :backoff_max)
                     ELSE run_after END,
    result = :result, error = :error,
    lease_expires_at = NULL, deadline_at = NULL, version = version + 1, updated_at = :now
WHERE id = :id AND version = :token AND worker_id = :worker_id AND status = 'working'
  AND lease_expires_at > :now
RETURNING {TASK_COLUMNS}
"""

HEARTBEAT_TASK = f"""
UPDATE tasks
SET lease_expires_at = min(:lease_until, deadline_at), updated_at = :now
WHERE id = :id AND version = :token AND worker_id = :worker_id AND status = 'working'
  AND lease_expires_at > :now
RETURNING {TASK_COLUMNS}
"""

# The worker gives the task back: the attempt is not counted.
RELEASE_TASK = f"""
UPDATE tasks
SET status = 'waiting', attempts = attempts - 1, worker_id = NULL, lease_expires_at = NULL,
    deadline_at = NULL, started_at = NULL, run_after = :run_after, version = version + 1,
    updated_at = :now
WHERE id = :id AND version = :token AND worker_id = :worker_id AND status = 'working'
  AND lease_expires_at > :now
RETURNING {TASK_COLUMNS}
"""

# Cancel and retry record their event first (it needs the status before the change), under the
# same guard as the UPDATE that follows in the same transaction.
RECORD_CANCEL = """
INSERT INTO task_events (task_id, kind, from_status, to_status, worker_id, version, at, detail)
SELECT id, 'cancelled', status, 'cancelled', worker_id, version + 1, :now, :detail
FROM tasks
WHERE id = :id AND status IN ('waiting', 'working')
  AND (:expected_version IS NULL OR version = :expected_version)
"""
CANCEL_TASK = f"""
UPDATE tasks
SET status = 'cancelled', error = :error, lease_expires_at = NULL, deadline_at = NULL,
    completed_at = :now, version = version + 1, updated_at = :now
WHERE id = :id AND status IN ('waiting', 'working')
  AND (:expected_version IS NULL OR version = :expected_version)
RETURNING {TASK_COLUMNS}
"""

RECORD_RETRY = """
INSERT INTO task_events (task_id, kind, from_status, to_status, worker_id, version, at, detail)
SELECT id, 'retried', status, 'waiting', NULL, version + 1, :now, error
FROM tasks
WHERE id = :id AND status IN ('failed', 'cancelled')
  AND (:expected_version IS NULL OR version = :expected_version)
"""
RETRY_TASK = f"""
UPDATE tasks
SET status = 'waiting', attempts = 0, worker_id = NULL, result = NULL, error = NULL,
    lease_expires_at = NULL, deadline_at = NULL, started_at = NULL, completed_at = NULL,
    run_after = :now, version = version + 1, updated_at = :now
WHERE id = :id AND status IN ('failed', 'cancelled')
  AND (:expected_version IS NULL OR version = :expected_version)
RETURNING {TASK_COLUMNS}
"""

_LIST_WHERE = """
WHERE (:status IS NULL OR status = :status)
  AND (:priority IS NULL OR priority = :priority)
  AND (:work_path IS NULL OR work_path = :work_path)
  AND (:tag IS NULL OR EXISTS (SELECT 1 FROM task_tags AS g WHERE g.task_id = tasks.id AND g.tag = :tag))
"""
LIST_TASKS = f"""
SELECT {TASK_COLUMNS} FROM tasks {_LIST_WHERE}
ORDER BY created_at DESC, id DESC
LIMIT :limit OFFSET :offset
"""
COUNT_TASKS = f"SELECT count(*) FROM tasks {_LIST_WHERE}"

# Statistics, optionally for one work_path.
STATS_BY_STATUS_AND_PRIORITY = """
SELECT status, priority, count(*) FROM tasks
WHERE (:work_path IS NULL OR work_path = :work_path)
GROUP BY status, priority
"""
STATS_BY_WORK_PATH = """
SELECT work_path, status, count(*) FROM tasks
WHERE (:work_path IS NULL OR work_path = :work_path)
GROUP BY work_path, status
ORDER BY work_path
"""
STATS_OLDEST_WAITING = """
SELECT min(created_at) FROM tasks
WHERE status = 'waiting' AND (:work_path IS NULL OR work_path = :work_path)
"""
# Durations of tasks finished since :since (capped, newest first).
STATS_DURATIONS = """
SELECT status, first_started_at - created_at, completed_at - started_at, completed_at FROM tasks
WHERE completed_at >= :since AND status IN ('completed', 'failed') AND started_at IS NOT NULL
  AND (:work_path IS NULL OR work_path = :work_path)
ORDER BY completed_at DESC
LIMIT 100000
"""
STATS_ACTIVE_WORKERS = """
SELECT count(DISTINCT worker_id) FROM tasks
WHERE status = 'working' AND lease_expires_at > :now AND (:work_path IS NULL OR work_path = :work_path)
"""
STATS_EVENT_COUNTS = """
SELECT e.kind, count(*) FROM task_events AS e JOIN tasks AS t ON t.id = e.task_id
WHERE e.kind IN ('lease_expired', 'retry_scheduled', 'retried')
  AND (:work_path IS NULL OR t.work_path = :work_path)
GROUP BY e.kind
"""
STATS_FINISHED_SINCE = """
SELECT status, count(*) FROM tasks
WHERE completed_at >= :since AND status IN ('completed', 'failed')
  AND (:work_path IS NULL OR work_path = :work_path)
GROUP BY status
"""

# Retention: terminal tasks only, and never one that another stored task depends on (even a
# terminal one: it may be retried, and must not find its dependency gone). Dependency rows go
# with their dependant, so chains are removed from the leaves up over successive clean-ups.
_DELETABLE = """
status IN ('completed', 'failed', 'cancelled')
AND NOT EXISTS (SELECT 1 FROM task_dependencies AS d WHERE d.depends_on = tasks.id)
"""
DELETE_TERMINAL_BEFORE = f"DELETE FROM tasks WHERE completed_at < :cutoff AND {_DELETABLE}"
DELETE_OLDEST_TERMINAL = f"""
DELETE FROM tasks WHERE id IN (
    SELECT id FROM tasks WHERE {_DELETABLE} ORDER BY completed_at, id LIMIT :excess)
"""
COUNT_ALL_TASKS = "SELECT count(*) FROM tasks"

# Migrations bookkeeping.
CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)
"""
SELECT_MIGRATIONS = "SELECT name FROM schema_migrations ORDER BY name"
INSERT_MIGRATION = "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)"
