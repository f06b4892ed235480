-- mark_delivered --
-- Reader $1 has had the notifications $2 (a cursor it already had keeps its first time).
INSERT OR IGNORE INTO notification_deliveries SELECT $1, unnest($2::BIGINT[]), $3;

-- live_tasks --
-- Every unfinished task, for the engine's in-memory queue at start. Large prompts and options stay
-- on disk (NULL here) and are read when an attempt starts, so a long queue fits in memory.
SELECT * REPLACE (
    CASE WHEN strlen(prompt) + strlen(options::VARCHAR) <= $1 THEN prompt END AS prompt,
    CASE WHEN strlen(prompt) + strlen(options::VARCHAR) <= $1 THEN options END AS options
) FROM task_executions WHERE status NOT IN ('completed', 'failed', 'cancelled') ORDER BY seq;

-- task_payload --
-- A task's prompt and options, for an attempt of a task whose payload was not held in memory.
SELECT prompt, options FROM task_executions WHERE id = $1;

-- idempotency_keys --
-- Every kept idempotency key, with when its task finished (NULL: not yet).
SELECT k.scope, k.key, k.task_id, t.finished_at
FROM idempotency_keys k JOIN task_executions t ON t.id = k.task_id;

-- purge_idempotency_keys --
-- Keys whose task finished before the cutoff, or is gone, no longer deduplicate.
DELETE FROM idempotency_keys WHERE task_id NOT IN (
    SELECT id FROM task_executions WHERE finished_at IS NULL OR finished_at >= $1
) RETURNING task_id;

-- max_seq --
-- The last submission number used.
SELECT coalesce(max(seq), 0) FROM task_executions;

-- max_cursor --
-- The last notification cursor used.
SELECT coalesce(max(cursor), 0) FROM notifications;

-- live_workflows --
-- Workflows that are still running.
SELECT id, name, scope, status, created_at, updated_at, finished_at FROM workflow_state WHERE status = 'running';

-- counts_for_running_workflows --
-- Task counts by status for every running workflow.
SELECT t.workflow_id, t.status, count(*) FROM task_executions t
WHERE t.workflow_id IN (
    SELECT workflow_id FROM task_executions WHERE status NOT IN ('completed', 'failed', 'cancelled')
) GROUP BY ALL;

-- get_task --
-- One task by id.
SELECT * FROM task_executions WHERE id = $1;

-- get_tasks_of_workflow --
-- Every task of a workflow, in submission order.
SELECT * FROM task_executions WHERE workflow_id = $1 ORDER BY seq;

-- get_attempts --
-- The attempt history of a task.
SELECT task_id, attempt, status, started_at, finished_at, error, worker_id
FROM task_attempts WHERE task_id = $1 ORDER BY attempt, finished_at;

-- task_events --
-- A page of a task's run log (entries from seq $2 on, at most $3) and, on every row, how many
-- entries it has: one statement, with one all-null row carrying the count when the page is empty.
WITH total AS (SELECT count(*) AS n FROM task_events WHERE task_id = $1),
page AS (
    SELECT seq, logged_at, attempt, kind, message, data::VARCHAR AS data FROM task_events
    WHERE task_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3
)
SELECT total.n, page.* FROM total LEFT JOIN page ON true ORDER BY page.seq;

-- result_sizes --
-- Result sizes for some tasks.
SELECT task_id, size_chars FROM task_results WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- result_page --
-- A slice of a result (offset is 0-based; SQL substr is 1-based).
SELECT content_type, substr(content, $2 + 1, $3), size_chars, sources FROM task_results WHERE task_id = $1;

-- get_workflow --
-- One workflow by id.
SELECT id, name, scope, status, created_at, updated_at, finished_at FROM workflow_state WHERE id = $1;

-- workflow_counts --
-- Task counts by status for some workflows.
SELECT workflow_id, status, count(*) FROM task_executions
WHERE workflow_id IN (SELECT unnest($1::VARCHAR[])) GROUP BY ALL;

-- list_workflows --
-- Workflows filtered by scope, state, agent and time; newest first, paged. Also returns the total.
SELECT id, name, scope, status, created_at, updated_at, finished_at, count(*) OVER () AS total
FROM workflow_state w
WHERE ($1::VARCHAR IS NULL OR w.scope = $1)
  AND (CASE WHEN $2::BOOLEAN THEN w.status <> 'running' ELSE w.status = 'running' END)
  AND (len($3::VARCHAR[]) = 0 OR list_contains($3::VARCHAR[], w.status))
  AND ($4::VARCHAR IS NULL OR EXISTS (SELECT 1 FROM task_executions t WHERE t.workflow_id = w.id AND t.agent = $4))
  AND ($5::TIMESTAMP IS NULL OR w.created_at >= $5)
  AND ($6::TIMESTAMP IS NULL OR w.created_at < $6)
ORDER BY w.created_at DESC, w.id
LIMIT $7 OFFSET $8;

-- list_notifications --
-- Notifications after a cursor, oldest first, with when reader $6 had each (null: not yet).
SELECT n.cursor, n.kind, n.task_id, n.workflow_id, n.scope, n.message, n.created_at, d.delivered_at
FROM notifications n
LEFT JOIN notification_deliveries d ON d.reader = $6 AND d.cursor = n.cursor
WHERE n.cursor > $2
  AND ($1::VARCHAR IS NULL OR n.scope = $1)
  AND ($3::VARCHAR IS NULL OR n.workflow_id = $3)
  AND ($4::BOOLEAN OR d.cursor IS NULL)
ORDER BY n.cursor
LIMIT $5;

-- recreate_orphan_workflows --
-- A crash between a task's commit and its workflow's (which rides the next commit) leaves tasks
-- without a workflow row: rebuild it from them. The engine then settles its status.
INSERT INTO workflow_executions (id, name, scope, created_at)
SELECT t.workflow_id,
       coalesce(arg_min(t.options->>'workflow_name', t.seq), arg_min(t.agent, t.seq)),
       arg_min(t.scope, t.seq), min(t.created_at)
FROM task_executions t
WHERE NOT EXISTS (SELECT 1 FROM workflow_executions w WHERE w.id = t.workflow_id)
GROUP BY t.workflow_id;

-- usage_totals --
SELECT task_id, list(DISTINCT model ORDER BY model) FILTER (WHERE model IS NOT NULL),
       sum(input_tokens), sum(output_tokens), sum(cache_creation_input_tokens), sum(cache_read_input_tokens),
       sum(cost_usd)
FROM token_usage WHERE task_id = ANY($1) GROUP BY task_id;

-- task_counts --
-- Tasks by status across every scope (sidequest status).
SELECT status, count(*) FROM task_executions GROUP BY status;

-- get_schedule --
-- One schedule by id.
SELECT * FROM scheduled_tasks WHERE id = $1;

-- list_schedules --
-- Schedules of a scope (or all, when $1 is null), newest first, paged.
SELECT *, count(*) OVER () AS total_rows FROM scheduled_tasks
WHERE $1 IS NULL OR scope = $1
ORDER BY created_at DESC, id
LIMIT $2 OFFSET $3;

-- count_schedules_in --
-- How many schedules a scope (or all, when $1 is null) holds.
SELECT count(*) FROM scheduled_tasks WHERE $1 IS NULL OR scope = $1;

-- due_schedules --
-- Enabled schedules due at or before $1 (oldest first, read through the next_run_at index), then
-- those holding a run queued behind an unfinished one (overlap = queue): one statement per wake-up.
SELECT * FROM (
    SELECT * FROM scheduled_tasks
    WHERE next_run_at <= $1 AND enabled AND finished_at IS NULL
    ORDER BY next_run_at, id
    LIMIT $2
)
UNION ALL
SELECT * FROM scheduled_tasks
WHERE queued_run_at IS NOT NULL AND enabled AND finished_at IS NULL
  AND (next_run_at IS NULL OR next_run_at > $1)
ORDER BY next_run_at NULLS LAST, id;

-- next_due --
-- When the scheduler must next wake.
SELECT min(next_run_at) FROM scheduled_tasks WHERE enabled AND finished_at IS NULL;

-- claim_fire --
-- The fire key: one row per (schedule, due time); nothing returned means it was already fired.
INSERT INTO schedule_fires (schedule_id, due_at, task_id, fired_at) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING RETURNING schedule_id;

-- schedule_tasks --
-- The tasks a schedule started, newest first, paged.
SELECT *, count(*) OVER () AS total_rows FROM task_executions WHERE schedule_id = $1
ORDER BY created_at DESC, seq DESC LIMIT $2 OFFSET $3;

-- count_schedule_tasks --
-- How many tasks a schedule started.
SELECT count(*) FROM task_executions WHERE schedule_id = $1;

-- task_statuses --
-- The status of some tasks (the last runs of a page of schedules).
SELECT id, status FROM task_executions WHERE id = ANY($1);

-- gc_batch --
-- Retention: up to $3 tasks that finished before $1, oldest first, except the ids in $2 (tasks the
-- engine still holds, or with writes still queued): what one retention batch deletes.
SELECT id, workflow_id FROM task_executions
WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at < $1
  AND id NOT IN (SELECT unnest($2::VARCHAR[]))
ORDER BY finished_at, id
LIMIT $3;

-- gc_delete_attempts --
-- Retention: the attempt history of the tasks in $1.
DELETE FROM task_attempts WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- gc_delete_results --
-- Retention: the results of the tasks in $1.
DELETE FROM task_results WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- gc_delete_usage --
-- Retention: the token usage of the tasks in $1.
DELETE FROM token_usage WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- gc_delete_task_notifications --
-- Retention: notifications about the tasks in $1, but never the newest notification of all: the
-- next start reads the cursor from it, and cursors only grow.
DELETE FROM notifications
WHERE task_id IN (SELECT unnest($1::VARCHAR[])) AND cursor < (SELECT max(cursor) FROM notifications);

-- gc_delete_fires --
-- Retention: fire keys of scheduled runs in $1 (their due times are long past).
DELETE FROM schedule_fires WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- gc_delete_webhooks --
-- Retention: webhook deliveries of the tasks in $1.
DELETE FROM webhook_callbacks WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- gc_delete_task_events --
-- Retention: the run logs of the tasks in $1.
DELETE FROM task_events WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- gc_delete_tasks --
-- Retention: the tasks in $1 themselves (finished ones only, whatever the caller passed).
DELETE FROM task_executions
WHERE id IN (SELECT unnest($1::VARCHAR[])) AND status IN ('completed', 'failed', 'cancelled');

-- gc_delete_workflows --
-- Retention: of the workflows in $1, those none of whose tasks remain.
DELETE FROM workflow_executions
WHERE id IN (SELECT unnest($1::VARCHAR[]))
  AND NOT EXISTS (SELECT 1 FROM task_executions t WHERE t.workflow_id = workflow_executions.id)
RETURNING id;

-- gc_delete_workflow_notifications --
-- Retention: workflow_completed notifications of the deleted workflows in $1 (newest kept, as above).
DELETE FROM notifications
WHERE task_id IS NULL AND workflow_id IN (SELECT unnest($1::VARCHAR[]))
  AND cursor < (SELECT max(cursor) FROM notifications);

-- gc_delete_schedule_notices --
-- Retention: up to $2 notifications from before $1 that name no task and no workflow (a schedule
-- skipped a due time, or could not start it); they would otherwise pile up forever.
DELETE FROM notifications WHERE cursor IN (
    SELECT cursor FROM notifications
    WHERE task_id IS NULL AND workflow_id = '' AND created_at < $1
      AND cursor < (SELECT max(cursor) FROM notifications)
    ORDER BY cursor
    LIMIT $2
);

-- gc_delete_deliveries --
-- Retention: readers' delivery marks of notifications that no longer exist.
DELETE FROM notification_deliveries
WHERE cursor NOT IN (SELECT cursor FROM notifications);

-- gc_count --
-- Retention's dry run: what the gc_delete_* statements would delete for a cutoff $1 and kept ids $2,
-- one column each, in the order of GcCounts (tasks, attempts, results, usage, notifications,
-- schedule_fires, webhook_callbacks, workflows, events).
WITH doomed AS (
    SELECT id, workflow_id FROM task_executions
    WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at < $1
      AND id NOT IN (SELECT unnest($2::VARCHAR[]))
),
emptied AS (
    SELECT DISTINCT d.workflow_id AS id FROM doomed d
    WHERE NOT EXISTS (
        SELECT 1 FROM task_executions t
        WHERE t.workflow_id = d.workflow_id AND t.id NOT IN (SELECT id FROM doomed)
    )
),
newest AS (SELECT max(cursor) AS cursor FROM notifications)
SELECT
    (SELECT count(*) FROM doomed),
    (SELECT count(*) FROM task_attempts WHERE task_id IN (SELECT id FROM doomed)),
    (SELECT count(*) FROM task_results WHERE task_id IN (SELECT id FROM doomed)),
    (SELECT count(*) FROM token_usage WHERE task_id IN (SELECT id FROM doomed)),
    (SELECT count(*) FROM notifications n, newest
     WHERE n.cursor < newest.cursor
       AND (n.task_id IN (SELECT id FROM doomed)
            OR (n.task_id IS NULL AND n.workflow_id IN (SELECT id FROM emptied))
            OR (n.task_id IS NULL AND n.workflow_id = '' AND n.created_at < $1))),
    (SELECT count(*) FROM schedule_fires WHERE task_id IN (SELECT id FROM doomed)),
    (SELECT count(*) FROM webhook_callbacks WHERE task_id IN (SELECT id FROM doomed)),
    (SELECT count(*) FROM emptied),
    (SELECT count(*) FROM task_events WHERE task_id IN (SELECT id FROM doomed));

-- checkpoint --
-- Write the WAL into the file: deleted rows' blocks become free for new rows (the file shrinks only
-- when the free blocks are at its end; VACUUM and FORCE CHECKPOINT free nothing more).
CHECKPOINT;

-- free_bytes --
-- Space inside the database file that is free for new rows.
SELECT free_blocks * block_size FROM pragma_database_size();

-- create_schema_version --
-- The table that makes a file a sidequest store: which schema versions were applied, and when.
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL);

-- store_tables --
-- Tables and views of the open file, in any schema: a file with some but no schema_version is not ours.
SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database();

-- store_columns --
-- Columns of the main schema's tables and views, to compare with what the migrations create.
SELECT table_name, column_name, data_type
FROM information_schema.columns
WHERE table_catalog = current_database() AND table_schema = 'main'
ORDER BY table_name, ordinal_position;
