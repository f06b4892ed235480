-- insert_workflows --
-- New workflows, one row per array element.
INSERT INTO workflow_executions (id, name, scope, status, created_at, updated_at, finished_at)
SELECT unnest($1::VARCHAR[]), unnest($2::VARCHAR[]), unnest($3::VARCHAR[]), unnest($4::VARCHAR[]),
       unnest($5::TIMESTAMP[]), unnest($6::TIMESTAMP[]), unnest($7::TIMESTAMP[]);

-- insert_tasks --
-- New tasks, one row per array element.
INSERT INTO task_executions (id, seq, workflow_id, agent, prompt, status, priority, scope, options,
    idempotency_key, callback_url, schedule_id, attempts, failures, max_retries, timeout_s,
    created_at, updated_at, not_before)
SELECT unnest($1::VARCHAR[]), unnest($2::BIGINT[]), unnest($3::VARCHAR[]), unnest($4::VARCHAR[]),
       unnest($5::VARCHAR[]), unnest($6::VARCHAR[]), unnest($7::VARCHAR[]), unnest($8::VARCHAR[]),
       unnest($9::JSON[]), unnest($10::VARCHAR[]), unnest($11::VARCHAR[]), unnest($12::VARCHAR[]),
       unnest($13::INTEGER[]), unnest($14::INTEGER[]), unnest($15::INTEGER[]), unnest($16::DOUBLE[]),
       unnest($17::TIMESTAMP[]), unnest($18::TIMESTAMP[]), unnest($19::TIMESTAMP[]);

-- update_tasks --
-- The latest state of every task changed since the last commit, in one statement.
UPDATE task_executions AS t SET
    status = u.status, attempts = u.attempts, failures = u.failures, updated_at = u.updated_at,
    next_attempt_at = u.next_attempt_at, started_at = u.started_at, finished_at = u.finished_at,
    progress_percent = u.progress_percent, progress_message = u.progress_message, error = u.error,
    result_preview = u.result_preview, worker_id = u.worker_id, lease_expires_at = u.lease_expires_at
FROM (
    SELECT unnest($1::VARCHAR[]) AS id, unnest($2::VARCHAR[]) AS status, unnest($3::INTEGER[]) AS attempts,
           unnest($4::INTEGER[]) AS failures, unnest($5::TIMESTAMP[]) AS updated_at,
           unnest($6::TIMESTAMP[]) AS next_attempt_at, unnest($7::TIMESTAMP[]) AS started_at,
           unnest($8::TIMESTAMP[]) AS finished_at, unnest($9::DOUBLE[]) AS progress_percent,
           unnest($10::VARCHAR[]) AS progress_message, unnest($11::VARCHAR[]) AS error,
           unnest($12::VARCHAR[]) AS result_preview, unnest($13::VARCHAR[]) AS worker_id,
           unnest($14::TIMESTAMP[]) AS lease_expires_at
) AS u
WHERE t.id = u.id;

-- update_workflows --
-- The latest state of every workflow changed since the last commit.
UPDATE workflow_executions AS w SET status = u.status, updated_at = u.updated_at, finished_at = u.finished_at
FROM (
    SELECT unnest($1::VARCHAR[]) AS id, unnest($2::VARCHAR[]) AS status,
           unnest($3::TIMESTAMP[]) AS updated_at, unnest($4::TIMESTAMP[]) AS finished_at
) AS u
WHERE w.id = u.id;

-- insert_attempts --
-- Finished attempts (the history a status call shows).
INSERT INTO task_attempts (task_id, attempt, status, started_at, finished_at, error, worker_id)
SELECT unnest($1::VARCHAR[]), unnest($2::INTEGER[]), unnest($3::VARCHAR[]), unnest($4::TIMESTAMP[]),
       unnest($5::TIMESTAMP[]), unnest($6::VARCHAR[]), unnest($7::VARCHAR[]);

-- insert_results --
-- Full results of completed tasks.
INSERT OR REPLACE INTO task_results (task_id, content_type, content, size_chars, created_at)
SELECT unnest($1::VARCHAR[]), unnest($2::VARCHAR[]), unnest($3::VARCHAR[]), unnest($4::BIGINT[]),
       unnest($5::TIMESTAMP[]);

-- insert_notifications --
-- Notification rows; the cursor is assigned by the engine, which owns the store.
INSERT INTO notifications (cursor, kind, task_id, workflow_id, scope, message, created_at)
SELECT unnest($1::BIGINT[]), unnest($2::VARCHAR[]), unnest($3::VARCHAR[]), unnest($4::VARCHAR[]),
       unnest($5::VARCHAR[]), unnest($6::VARCHAR[]), unnest($7::TIMESTAMP[]);

-- insert_usage --
-- Token usage per attempt.
INSERT INTO token_usage (task_id, attempt, model, input_tokens, output_tokens, cache_creation_input_tokens,
    cache_read_input_tokens, cost_usd, recorded_at)
SELECT unnest($1::VARCHAR[]), unnest($2::INTEGER[]), unnest($3::VARCHAR[]), unnest($4::BIGINT[]),
       unnest($5::BIGINT[]), unnest($6::BIGINT[]), unnest($7::BIGINT[]), unnest($8::DOUBLE[]),
       unnest($9::TIMESTAMP[]);

-- mark_delivered --
-- Notifications handed to a client are not handed out again unless asked.
UPDATE notifications SET delivered_at = $2 WHERE cursor IN (SELECT unnest($1::BIGINT[])) AND delivered_at IS NULL;

-- live_tasks --
-- Every unfinished task, for the engine's in-memory queue at start.
SELECT * FROM task_executions WHERE status NOT IN ('completed', 'failed', 'cancelled') ORDER BY seq;

-- max_seq --
-- The last submission number used.
SELECT coalesce(max(seq), 0) FROM task_executions;

-- max_cursor --
-- The last notification cursor used.
SELECT coalesce(max(cursor), 0) FROM notifications;

-- live_workflows --
-- Workflows that are still running.
SELECT id, name, scope, status, created_at, updated_at, finished_at FROM workflow_executions WHERE status = 'running';

-- counts_for_running_workflows --
-- Task counts by status for every running workflow.
SELECT t.workflow_id, t.status, count(*) FROM task_executions t
JOIN workflow_executions w ON w.id = t.workflow_id
WHERE w.status = 'running' GROUP BY ALL;

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

-- result_sizes --
-- Result sizes for some tasks.
SELECT task_id, size_chars FROM task_results WHERE task_id IN (SELECT unnest($1::VARCHAR[]));

-- result_page --
-- A slice of a result (offset is 0-based; SQL substr is 1-based).
SELECT content_type, substr(content, $2 + 1, $3), size_chars FROM task_results WHERE task_id = $1;

-- get_workflow --
-- One workflow by id.
SELECT id, name, scope, status, created_at, updated_at, finished_at FROM workflow_executions WHERE id = $1;

-- workflow_counts --
-- Task counts by status for some workflows.
SELECT workflow_id, status, count(*) FROM task_executions
WHERE workflow_id IN (SELECT unnest($1::VARCHAR[])) GROUP BY ALL;

-- list_workflows --
-- Workflows filtered by scope, state, agent and time; newest first, paged. Also returns the total.
SELECT id, name, scope, status, created_at, updated_at, finished_at, count(*) OVER () AS total
FROM workflow_executions w
WHERE ($1::VARCHAR IS NULL OR w.scope = $1)
  AND (CASE WHEN $2::BOOLEAN THEN w.status <> 'running' ELSE w.status = 'running' END)
  AND (len($3::VARCHAR[]) = 0 OR list_contains($3::VARCHAR[], w.status))
  AND ($4::VARCHAR IS NULL OR EXISTS (SELECT 1 FROM task_executions t WHERE t.workflow_id = w.id AND t.agent = $4))
  AND ($5::TIMESTAMP IS NULL OR w.created_at >= $5)
  AND ($6::TIMESTAMP IS NULL OR w.created_at < $6)
ORDER BY w.created_at DESC, w.id
LIMIT $7 OFFSET $8;

-- list_notifications --
-- Notifications after a cursor, oldest first.
SELECT cursor, kind, task_id, workflow_id, scope, message, created_at, delivered_at FROM notifications
WHERE cursor > $2
  AND ($1::VARCHAR IS NULL OR scope = $1)
  AND ($3::VARCHAR IS NULL OR workflow_id = $3)
  AND ($4::BOOLEAN OR delivered_at IS NULL)
ORDER BY cursor
LIMIT $5;
