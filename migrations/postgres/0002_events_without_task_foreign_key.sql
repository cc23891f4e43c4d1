-- taskorch schema 2: the event log no longer has a foreign key to tasks (PostgreSQL).
-- Its check cost every claim and every completion an index lookup and a KEY SHARE lock (a WAL
-- record) on the task row the same statement had just written: ~0.1 ms of the database's CPU per
-- claim + complete (EXPLAIN ANALYZE: "Trigger for constraint task_events_task_id_fkey"), 10-15% of
-- the cycle. Every event row is written by the statement that writes its task, and retention now
-- deletes a task's events in the statement that deletes the task (pg_queries.DELETE_*).
ALTER TABLE task_events DROP CONSTRAINT IF EXISTS task_events_task_id_fkey;
