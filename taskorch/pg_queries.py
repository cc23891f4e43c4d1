"""Every SQL statement of the PostgreSQL store, as named constants ($n parameters, asyncpg).

The same rules as queries.py (SQLite), and the same columns in the same representation (times
in integer microseconds, JSON as text), so rows of both dialects become the same models. What
differs: each state transition is ONE statement, its event rows written by a data-modifying CTE
in the same statement, so an operation is one round trip and one implicit transaction.

Time. `$1` of every time-dependent statement is the injected clock's value (tests) or NULL, and
NOW stands for "that, or the database's clock": every server sharing the database agrees on
lease expiry without trusting its own clock. now() is the transaction's start, so one statement
sees one instant, as the SQLite store's single `now` per transaction.
"""

from .queries import TASK_COLUMNS

NOW = "coalesce($1::bigint, (extract(epoch FROM now()) * 1000000)::bigint)"
_T_COLUMNS = ", ".join("t." + c.strip() for c in TASK_COLUMNS.split(","))
_EVENT_COLUMNS = "task_id, kind, from_status, to_status, worker_id, version, at, detail"

# -- creating ------------------------------------------------------------------------------------

# A create with its dependency rows, tag rows and "created" event. Nothing is inserted when a
# dependency does not exist (missing_dep names it) or the idempotency key is taken (no task row:
# the caller reads the first task with SELECT_TASK_BY_IDEMPOTENCY_KEY; DO NOTHING has waited for
# a concurrent insert of the same key to commit, so that read finds it).
# $2 id, $3 work_path, $4 title, $5 prompt, $6 priority, $7 tags JSON, $8 metadata JSON,
# $9 depends_on JSON, $10 max_attempts, $11 delay µs, $12 timeout_seconds, $13 depends_on[],
# $14 idempotency_key, $15 tags[]
CREATE_TASK = f"""
WITH missing AS (
    SELECT d.dep FROM unnest($13::text[]) AS d(dep)
    WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE id = d.dep)
    LIMIT 1),
created AS (
    INSERT INTO tasks (id, work_path, title, prompt, priority, tags, metadata, status, depends_on,
                       max_attempts, version, run_after, timeout_seconds, idempotency_key,
                       created_at, updated_at)
    SELECT $2, $3, $4, $5, $6, $7, $8, 'waiting', $9, $10, 1, {NOW} + $11::bigint, $12, $14, {NOW}, {NOW}
    WHERE NOT EXISTS (SELECT 1 FROM missing)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING {TASK_COLUMNS}),
created_deps AS (
    INSERT INTO task_dependencies (task_id, depends_on)
    SELECT created.id, d.dep FROM created, unnest($13::text[]) AS d(dep)),
created_tags AS (
    INSERT INTO task_tags (task_id, tag)
    SELECT created.id, g.tag FROM created, unnest($15::text[]) AS g(tag)),
created_event AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, 'created', NULL, status, NULL, version, {NOW}, NULL FROM created)
SELECT (SELECT dep FROM missing) AS missing_dep, created.*
FROM (SELECT 1) AS one LEFT JOIN created ON true
"""

SELECT_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"
SELECT_TASK_BY_IDEMPOTENCY_KEY = f"SELECT {TASK_COLUMNS} FROM tasks WHERE idempotency_key = $1"
SELECT_EVENTS = f"SELECT {_EVENT_COLUMNS} FROM task_events WHERE task_id = $1 ORDER BY id"
# The task as it is now, with the time, to explain why a fenced write changed no row.
SELECT_TASK_NOW = f"SELECT {TASK_COLUMNS}, {NOW} AS now FROM tasks WHERE id = $2"

# -- claims --------------------------------------------------------------------------------------

# Lease recovery: tasks whose lease ran out go back to waiting (failed when out of attempts), with
# their lease_expired events. SKIP LOCKED: a row another statement is changing is left to it.
# Locking re-reads a row changed since the snapshot, so a lease extended meanwhile is not taken.
# The locked row's worker_id is the one that lost the lease (RETURNING only sees new values).
# $2 the error JSON recorded on the task.
_SWEEP = f"""
expired AS (
    SELECT id, worker_id FROM tasks
    WHERE status = 'working' AND lease_expires_at <= {NOW}
    ORDER BY lease_expires_at
    LIMIT 100
    FOR NO KEY UPDATE SKIP LOCKED),
swept AS (
    UPDATE tasks AS t
    SET status = CASE WHEN t.attempts >= t.max_attempts THEN 'failed' ELSE 'waiting' END,
        error = $2,
        completed_at = CASE WHEN t.attempts >= t.max_attempts THEN {NOW} END,
        worker_id = NULL, lease_expires_at = NULL, deadline_at = NULL, started_at = NULL,
        run_after = {NOW}, version = t.version + 1, updated_at = {NOW}
    FROM expired AS e
    WHERE t.id = e.id
    RETURNING t.id, t.work_path, t.status, t.version, e.worker_id),
swept_events AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, 'lease_expired', 'working', status, worker_id, version, {NOW}, NULL FROM swept)"""

# The periodic sweep alone: how many were recovered, and the work_paths now claimable again.
RECOVER_EXPIRED = f"""
WITH {_SWEEP}
SELECT count(*) AS recovered,
       array_agg(DISTINCT work_path) FILTER (WHERE status = 'waiting') AS swept_paths
FROM swept
"""

# The claim: one statement, one round trip. It recovers expired leases first (those tasks are
# claimable from the next statement on: all parts of a statement share one snapshot), then picks
# the best claimable task, locking it with SKIP LOCKED so concurrent claims pass each other, and
# takes it. FOR NO KEY UPDATE does not conflict with the KEY SHARE lock a dependant's insert takes.
# $3 worker_id, $4 lease µs, $5 tags[] or NULL, $6 max_working (0 = no cap), $7 work_path,
# subtree only: $8 "/a/b/", $9 "/a/b0" (COLLATE "C" compares bytes: "0" sorts right after "/").
_CLAIM = f"""
WITH {_SWEEP},
claimed AS (
    UPDATE tasks
    SET status = 'working', worker_id = $3,
        deadline_at = {NOW} + timeout_seconds * 1000000::bigint,
        lease_expires_at = least({NOW} + $4::bigint, {NOW} + timeout_seconds * 1000000::bigint),
        attempts = attempts + 1, version = version + 1,
        started_at = {NOW}, first_started_at = coalesce(first_started_at, {NOW}), updated_at = {NOW}
    WHERE id = (
        SELECT t.id FROM tasks AS t
        WHERE {{where_path}}
          AND t.status = 'waiting' AND t.run_after <= {NOW}
          AND NOT EXISTS (
              SELECT 1 FROM task_dependencies AS d JOIN tasks AS p ON p.id = d.depends_on
              WHERE d.task_id = t.id AND p.status <> 'completed')
          AND ($5::text[] IS NULL OR EXISTS (
              SELECT 1 FROM task_tags AS g WHERE g.task_id = t.id AND g.tag = ANY($5::text[])))
          AND ($6::int = 0 OR (
              SELECT count(*) FROM tasks AS w
              WHERE w.work_path = t.work_path AND w.status = 'working') < $6::int)
        ORDER BY t.priority DESC, t.created_at, t.id
        LIMIT 1
        FOR NO KEY UPDATE OF t SKIP LOCKED)
    RETURNING {TASK_COLUMNS}),
claimed_event AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, 'claimed', 'waiting', 'working', worker_id, version, {NOW}, NULL FROM claimed)
SELECT s.recovered, s.swept_paths, claimed.*
FROM (SELECT count(*) AS recovered,
             array_agg(DISTINCT work_path) FILTER (WHERE status = 'waiting') AS swept_paths
      FROM swept) AS s
LEFT JOIN claimed ON true
"""
CLAIM_NEXT = _CLAIM.format(where_path="t.work_path = $7")
CLAIM_NEXT_IN_SUBTREE = _CLAIM.format(where_path="(t.work_path = $7 OR (t.work_path >= $8 AND t.work_path < $9))")

# With max_working set, two claims could each count the same free slot (READ COMMITTED, other
# rows): such claims take this lock first, for the rest of their transaction.
LOCK_WORK_PATH = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7208))"

# -- the worker's calls, fenced by id + version (the lease token) + worker + a live lease ----------

# "status = 'working'" written as NOT IN the other four (the CHECK constraint allows no fifth): the
# plain form implies tasks_leases' predicate, and when statistics saw few working tasks the planner
# then scanned that index (every live lease, and the dead entries of recent completions) instead of
# looking the id up in the primary key, at a cost growing with the queue. Measured: 1.3x per cycle.
_FENCE = f"""id = $2 AND version = $3 AND worker_id = $4 AND lease_expires_at > {NOW}
      AND status NOT IN ('waiting', 'completed', 'failed', 'cancelled')"""

# $5 success, $6 retryable, $7 backoff base µs, $8 backoff cap µs, $9 result JSON, $10 error JSON.
# A failure with attempts left goes back to waiting after exponential backoff (numeric: no
# overflow). `unblocked`: work_paths of dependants this completion may have made claimable.
COMPLETE_TASK = f"""
WITH done AS (
    UPDATE tasks
    SET status = CASE WHEN $5 THEN 'completed'
                      WHEN $6 AND attempts < max_attempts THEN 'waiting'
                      ELSE 'failed' END,
        completed_at = CASE WHEN NOT $5 AND $6 AND attempts < max_attempts THEN NULL ELSE {NOW} END,
        worker_id = CASE WHEN NOT $5 AND $6 AND attempts < max_attempts THEN NULL ELSE worker_id END,
        run_after = CASE WHEN NOT $5 AND $6 AND attempts < max_attempts
                         THEN {NOW} + least($7::numeric * power(2::numeric, least(attempts - 1, 30)),
                                            $8::numeric)::bigint
                         ELSE run_after END,
        result = $9, error = $10,
        lease_expires_at = NULL, deadline_at = NULL, version = version + 1, updated_at = {NOW}
    WHERE {_FENCE}
    RETURNING {TASK_COLUMNS}),
done_event AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, CASE status WHEN 'completed' THEN 'completed' WHEN 'failed' THEN 'failed'
                           ELSE 'retry_scheduled' END,
           'working', status, $4, version, {NOW}, CASE WHEN $5 THEN NULL ELSE $10 END
    FROM done)
SELECT done.*,
       ARRAY(SELECT DISTINCT c.work_path FROM task_dependencies AS d JOIN tasks AS c ON c.id = d.task_id
             WHERE done.status = 'completed' AND d.depends_on = done.id AND c.status = 'waiting') AS unblocked
FROM done
"""

# After a complete changed nothing: the task now, and whether this very completion (same worker,
# same outcome) was accepted with this token and nothing happened since (a retried request whose
# answer was lost on the way). $3 token, $4 worker_id, $5 success.
COMPLETE_PROBLEM = f"""
SELECT {TASK_COLUMNS}, {NOW} AS now,
       EXISTS (SELECT 1 FROM task_events AS e
               WHERE e.task_id = $2 AND e.version = $3 + 1 AND e.worker_id = $4
                 AND e.kind = ANY(CASE WHEN $5 THEN ARRAY['completed']
                                       ELSE ARRAY['failed', 'retry_scheduled'] END)) AS accepted
FROM tasks WHERE id = $2
"""

# $5 lease µs. A heartbeat never extends past the attempt's deadline, and writes no event.
HEARTBEAT_TASK = f"""
UPDATE tasks SET lease_expires_at = least({NOW} + $5::bigint, deadline_at), updated_at = {NOW}
WHERE {_FENCE}
RETURNING {TASK_COLUMNS}
"""

# The worker gives the task back: the attempt is not counted. $5 delay µs.
RELEASE_TASK = f"""
WITH back AS (
    UPDATE tasks
    SET status = 'waiting', attempts = attempts - 1, worker_id = NULL, lease_expires_at = NULL,
        deadline_at = NULL, started_at = NULL, run_after = {NOW} + $5::bigint, version = version + 1,
        updated_at = {NOW}
    WHERE {_FENCE}
    RETURNING {TASK_COLUMNS}),
back_event AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, 'released', 'working', 'waiting', $4, version, {NOW}, NULL FROM back)
SELECT * FROM back
"""

# -- edits by clients: the row is locked first, for the status it had (its event needs it) ---------

# $2 id, $3 expected_version or NULL, $4 error JSON, $5 event detail JSON or NULL.
CANCEL_TASK = f"""
WITH target AS (
    SELECT id, status FROM tasks
    WHERE id = $2 AND status IN ('waiting', 'working') AND ($3::bigint IS NULL OR version = $3)
    FOR NO KEY UPDATE),
gone AS (
    UPDATE tasks AS t
    SET status = 'cancelled', error = $4, lease_expires_at = NULL, deadline_at = NULL,
        completed_at = {NOW}, version = t.version + 1, updated_at = {NOW}
    FROM target WHERE t.id = target.id
    RETURNING {_T_COLUMNS}, target.status AS from_status),
gone_event AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, 'cancelled', from_status, 'cancelled', worker_id, version, {NOW}, $5 FROM gone)
SELECT * FROM gone
"""

# $2 id, $3 expected_version or NULL. The event keeps the error the task had.
RETRY_TASK = f"""
WITH target AS (
    SELECT id, status, error FROM tasks
    WHERE id = $2 AND status IN ('failed', 'cancelled') AND ($3::bigint IS NULL OR version = $3)
    FOR NO KEY UPDATE),
again AS (
    UPDATE tasks AS t
    SET status = 'waiting', attempts = 0, worker_id = NULL, result = NULL, error = NULL,
        lease_expires_at = NULL, deadline_at = NULL, started_at = NULL, completed_at = NULL,
        run_after = {NOW}, version = t.version + 1, updated_at = {NOW}
    FROM target WHERE t.id = target.id
    RETURNING {_T_COLUMNS}, target.status AS from_status, target.error AS old_error),
again_event AS (
    INSERT INTO task_events ({_EVENT_COLUMNS})
    SELECT id, 'retried', from_status, 'waiting', NULL, version, {NOW}, old_error FROM again)
SELECT * FROM again
"""

# -- reads ---------------------------------------------------------------------------------------

_LIST_WHERE = """
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::int IS NULL OR priority = $2)
  AND ($3::text IS NULL OR work_path = $3)
  AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM task_tags AS g WHERE g.task_id = tasks.id AND g.tag = $4))
"""
# One statement, one snapshot: the total and the page agree. Always one row (id NULL: empty page).
LIST_TASKS = f"""
SELECT c.total, p.*
FROM (SELECT count(*) AS total FROM tasks {_LIST_WHERE}) AS c
LEFT JOIN LATERAL (
    SELECT {TASK_COLUMNS} FROM tasks {_LIST_WHERE}
    ORDER BY created_at DESC, id DESC
    LIMIT $5 OFFSET $6) AS p ON true
"""

# Statistics in ONE statement: one short snapshot instead of seven, none held open across round
# trips (a held snapshot keeps dead claim-index entries alive and slows every claim). $2 work_path.
_WP = "($2::text IS NULL OR work_path = $2)"
STATISTICS = f"""
SELECT {NOW} AS now,
  (SELECT json_agg(json_build_array(status, priority, n)) FROM (
      SELECT status, priority, count(*) AS n FROM tasks WHERE {_WP} GROUP BY status, priority) AS s
  ) AS by_status_priority,
  (SELECT json_agg(json_build_array(work_path, status, n) ORDER BY work_path, status) FROM (
      SELECT work_path, status, count(*) AS n FROM tasks WHERE {_WP} GROUP BY work_path, status) AS s
  ) AS by_work_path,
  (SELECT min(created_at) FROM tasks WHERE status = 'waiting' AND {_WP}) AS oldest_waiting,
  (SELECT json_object_agg(status, n) FROM (
      SELECT status, count(*) AS n FROM tasks
      WHERE completed_at >= {NOW} - 3600000000 AND status IN ('completed', 'failed') AND {_WP}
      GROUP BY status) AS f
  ) AS finished_last_hour,
  (SELECT count(DISTINCT worker_id) FROM tasks
   WHERE status = 'working' AND lease_expires_at > {NOW} AND {_WP}) AS active_workers,
  (SELECT json_object_agg(kind, n) FROM (
      SELECT e.kind, count(*) AS n FROM task_events AS e JOIN tasks AS t ON t.id = e.task_id
      WHERE e.kind IN ('lease_expired', 'retry_scheduled', 'retried')
        AND ($2::text IS NULL OR t.work_path = $2)
      GROUP BY e.kind) AS k
  ) AS event_counts,
  d.waits, d.runs
FROM (
    SELECT array_agg(w) AS waits, array_agg(r) AS runs FROM (
        SELECT first_started_at - created_at AS w, completed_at - started_at AS r FROM tasks
        WHERE completed_at >= {NOW} - 86400000000 AND status IN ('completed', 'failed')
          AND started_at IS NOT NULL AND {_WP}
        ORDER BY completed_at DESC
        LIMIT 100000) AS recent
) AS d
"""

# -- retention: in batches, each its own short transaction ----------------------------------------

# Terminal tasks only, and never one that another stored task depends on (the same rule as
# queries.py). SKIP LOCKED leaves alone a task whose dependant is being inserted right now.
_DELETABLE = """
status IN ('completed', 'failed', 'cancelled')
AND NOT EXISTS (SELECT 1 FROM task_dependencies AS d WHERE d.depends_on = tasks.id)
"""
# A task's events go with it, in the same statement (the event log has no foreign key here:
# migration 0002). The statement's row count is the tasks deleted.
_DELETE_DOOMED = """
events_gone AS (DELETE FROM task_events AS e USING doomed WHERE e.task_id = doomed.id)
DELETE FROM tasks AS t USING doomed WHERE t.id = doomed.id
"""
# $1 cutoff µs, $2 batch size.
DELETE_TERMINAL_BEFORE = f"""
WITH doomed AS (
    SELECT id FROM tasks WHERE completed_at < $1 AND {_DELETABLE}
    ORDER BY completed_at, id LIMIT $2
    FOR UPDATE SKIP LOCKED),
{_DELETE_DOOMED}"""
# $1 how many to delete in this batch.
DELETE_OLDEST_TERMINAL = f"""
WITH doomed AS (
    SELECT id FROM tasks WHERE {_DELETABLE}
    ORDER BY completed_at, id LIMIT $1
    FOR UPDATE SKIP LOCKED),
{_DELETE_DOOMED}"""
COUNT_ALL_TASKS = "SELECT count(*) FROM tasks"

# -- checks and bookkeeping ----------------------------------------------------------------------

# Invariants every transition keeps; integrity_check() reports the ones broken.
INTEGRITY = """
SELECT
  (SELECT count(*) FROM tasks WHERE status = 'working'
     AND (worker_id IS NULL OR lease_expires_at IS NULL OR deadline_at IS NULL)) AS "working tasks without a lease",
  (SELECT count(*) FROM tasks WHERE status <> 'working' AND lease_expires_at IS NOT NULL)
     AS "leases on tasks that are not working",
  (SELECT count(*) FROM tasks AS t WHERE NOT EXISTS (
     SELECT 1 FROM task_events AS e WHERE e.task_id = t.id AND e.version = t.version))
     AS "tasks whose version has no event",
  (SELECT count(*) FROM task_dependencies AS d WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE id = d.depends_on))
     AS "dependencies on missing tasks",
  (SELECT count(*) FROM task_events AS e WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE id = e.task_id))
     AS "events of missing tasks"
"""

DB_CLOCK = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"

# Wake-ups for other servers, sent after the change committed, outside any transaction; only a
# hint (waiters also re-poll), so it never waits for a WAL flush. $1 channel, $2 payloads.
NOTIFY = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, p) FROM unnest($2::text[]) AS p"

# Migrations run one file per transaction under this advisory lock: servers starting together
# apply each migration once. The key is "taskorch" in ASCII.
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(8386110886409036648)"
# A migration may rewrite a big table, and servers starting meanwhile wait for it: neither is
# bounded by the time-outs meant for queue operations.
MIGRATION_SETTINGS = "SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0"
CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (name text COLLATE "C" PRIMARY KEY, applied_at bigint NOT NULL)
"""
SELECT_MIGRATION = "SELECT 1 FROM schema_migrations WHERE name = $1"
INSERT_MIGRATION = (
    "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, (extract(epoch FROM now()) * 1000000)::bigint)"
)
