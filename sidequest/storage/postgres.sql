-- create_schema_version --
-- The table that makes a schema a sidequest store: which schema versions were applied, and when.
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL);

-- schema_version --
-- The newest version applied.
SELECT coalesce(max(version), 0) FROM schema_version;

-- record_version --
-- A version applied.
INSERT INTO schema_version (version, applied_at) VALUES (%(version)s, now()) ON CONFLICT DO NOTHING;

-- applied_batch --
-- A write-behind batch's token: nothing returned means the batch was committed before (a retry
-- after a lost commit answer), so it is not applied again.
INSERT INTO applied_batches (token) VALUES (%(token)s) ON CONFLICT DO NOTHING RETURNING token;

-- batch_cursors --
-- The notification cursors a batch committed before was given (for its retry's listeners).
SELECT cursors FROM applied_batches WHERE token = %(token)s;

-- set_batch_cursors --
-- Remember the cursors a batch's notifications got, with its token.
UPDATE applied_batches SET cursors = %(cursors)s WHERE token = %(token)s;

-- key_lock --
-- One enqueue at a time decides an idempotency key (taken before claim_key, whose snapshot then
-- sees the other enqueue's commit).
SELECT pg_advisory_xact_lock(%(key)s, hashtext(%(scope)s || chr(1) || %(idem)s));

-- forget_batches --
-- Batch tokens old enough that no retry can still be running.
DELETE FROM applied_batches WHERE applied_at < now() - interval '1 hour';

-- notification_lock --
-- Held until commit by every transaction that inserts notifications, so cursors commit in
-- order: a reader that has read up to N never later finds a row below N committed after.
SELECT pg_advisory_xact_lock(%(key)s);

-- update_running --
-- A write-behind update of an attempt in progress: only while the attempt is still the task's
-- current one (a cancel or another worker's claim wins), and only the in-attempt columns. A
-- lease is never shortened by an older write.
UPDATE task_executions SET
    progress_percent = %(progress_percent)s,
    progress_message = %(progress_message)s,
    session_id = %(session_id)s,
    batch_id = %(batch_id)s,
    updated_at = greatest(updated_at, %(updated_at)s),
    lease_expires_at = greatest(lease_expires_at, %(lease_expires_at)s)
WHERE id = %(id)s AND status = 'running' AND worker_id = %(worker_id)s AND attempts = %(attempts)s;

-- insert_attempt --
-- An attempt's history row (a repeat of the same row is ignored).
INSERT INTO task_attempts (task_id, attempt, status, started_at, finished_at, error, worker_id)
VALUES (%(task_id)s, %(attempt)s, %(status)s, %(started_at)s, %(finished_at)s, %(error)s, %(worker_id)s)
ON CONFLICT DO NOTHING;

-- insert_result --
-- A task's result (the newest wins: a requeued task that completes again replaces it).
INSERT INTO task_results (task_id, content_type, content, size_chars, created_at, sources)
VALUES (%(task_id)s, %(content_type)s, %(content)s, %(size_chars)s, %(created_at)s, %(sources)s)
ON CONFLICT (task_id) DO UPDATE SET content_type = excluded.content_type, content = excluded.content,
    size_chars = excluded.size_chars, created_at = excluded.created_at, sources = excluded.sources;

-- insert_notification --
-- A notification; the database issues its cursor.
INSERT INTO notifications (kind, task_id, workflow_id, scope, message, created_at)
VALUES (%(kind)s, %(task_id)s, %(workflow_id)s, %(scope)s, %(message)s, %(created_at)s)
RETURNING cursor;

-- insert_usage --
-- One turn's token usage.
INSERT INTO token_usage (task_id, attempt, model, input_tokens, output_tokens, cache_creation_input_tokens,
    cache_read_input_tokens, cost_usd, recorded_at)
VALUES (%(task_id)s, %(attempt)s, %(model)s, %(input_tokens)s, %(output_tokens)s,
    %(cache_creation_input_tokens)s, %(cache_read_input_tokens)s, %(cost_usd)s, %(recorded_at)s);

-- insert_task_events --
-- A batch of run-log entries (one JSON object each; `data` is the entry's JSON text).
INSERT INTO task_events (task_id, seq, logged_at, attempt, kind, message, data)
SELECT task_id, seq, logged_at, attempt, kind, message, data::jsonb
FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(
    task_id text, seq int, logged_at timestamptz, attempt int, kind text, message text, data text)
ON CONFLICT DO NOTHING;

-- insert_results --
-- A batch of results (one JSON object each; the newest wins, as insert_result).
INSERT INTO task_results (task_id, content_type, content, size_chars, created_at, sources)
SELECT task_id, content_type, content, size_chars, created_at, sources
FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(
    task_id text, content_type text, content text, size_chars bigint, created_at timestamptz, sources jsonb)
ON CONFLICT (task_id) DO UPDATE SET content_type = excluded.content_type, content = excluded.content,
    size_chars = excluded.size_chars, created_at = excluded.created_at, sources = excluded.sources;

-- max_cursor --
-- The newest notification cursor (0: none yet).
SELECT coalesce(max(cursor), 0) FROM notifications;

-- mark_delivered --
-- Reader has had the notifications (a cursor it already had keeps its first time).
INSERT INTO notification_deliveries (reader, cursor, delivered_at)
SELECT %(reader)s, c, %(at)s FROM unnest(%(cursors)s::bigint[]) AS c
ON CONFLICT DO NOTHING;

-- insert_workflow --
-- A new workflow (already there: a retried enqueue whose first commit went through).
INSERT INTO workflow_executions (id, name, scope, created_at)
VALUES (%(id)s, %(name)s, %(scope)s, %(created_at)s) ON CONFLICT DO NOTHING;

-- claim_key --
-- Take (scope, key) for a task: inserted, or taken over when its task finished before the window
-- or is gone. Nothing returned: another task holds it.
INSERT INTO idempotency_keys AS k (scope, key, task_id, created_at)
VALUES (%(scope)s, %(key)s, %(task_id)s, %(created_at)s)
ON CONFLICT (scope, key) DO UPDATE SET task_id = excluded.task_id, created_at = excluded.created_at
WHERE k.task_id = excluded.task_id OR NOT EXISTS (
    SELECT 1 FROM task_executions t
    WHERE t.id = k.task_id AND (t.finished_at IS NULL OR t.finished_at >= %(cutoff)s)
)
RETURNING task_id;

-- key_holder --
-- The task that holds (scope, key).
SELECT task_id FROM idempotency_keys WHERE scope = %(scope)s AND key = %(key)s;

-- seq_of --
-- Submission numbers of tasks already inserted (a retried enqueue).
SELECT id, seq FROM task_executions WHERE id = ANY(%(ids)s);

-- claim_candidates --
-- Ready tasks this worker may run, in priority then submission order, skipping rows another
-- claim holds and agents at their limit.
SELECT id, agent, agent_limit FROM task_executions
WHERE status IN ('queued', 'retrying')
  AND ((status = 'queued' AND (not_before IS NULL OR not_before <= now())
        AND (next_attempt_at IS NULL OR next_attempt_at <= now()))
       OR (status = 'retrying' AND (next_attempt_at IS NULL OR next_attempt_at <= now())))
  AND queue = ANY(%(queues)s)
  AND (%(agents)s::text[] IS NULL OR agent_snapshot IS NOT NULL OR agent = ANY(%(agents)s::text[]))
  AND agent <> ALL(%(full)s::text[])
ORDER BY (CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END), seq
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- agent_lock --
-- One claimer at a time counts and takes an agent's running slots (per-agent limits over every worker).
SELECT pg_advisory_xact_lock(%(key)s, hashtext(%(agent)s));

-- agent_try_lock --
-- The same lock as agent_lock, without waiting (true: taken).
SELECT pg_try_advisory_xact_lock(%(key)s, hashtext(%(agent)s));

-- running_per_agent --
-- Running rows of some agents, over every worker.
SELECT agent, count(*) FROM task_executions WHERE status = 'running' AND agent = ANY(%(agents)s) GROUP BY agent;

-- claim_tasks --
-- The chosen rows become this worker's running attempts.
UPDATE task_executions SET status = 'running', attempts = attempts + 1, started_at = now(), updated_at = now(),
    worker_id = %(worker_id)s, lease_expires_at = now() + %(lease)s * interval '1 second',
    next_attempt_at = NULL, progress_percent = NULL, progress_message = NULL, claim_token = %(token)s
WHERE id = ANY(%(ids)s)
RETURNING *;

-- claimed_by_token --
-- The rows an earlier try of the same claim took (its commit went through, its answer was lost).
SELECT * FROM task_executions
WHERE claim_token = %(token)s AND status = 'running' AND worker_id = %(worker_id)s
ORDER BY (CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END), seq;

-- renew_leases --
-- Extend the leases of attempts this worker still holds; what is not returned must stop.
UPDATE task_executions t SET lease_expires_at = now() + %(lease)s * interval '1 second'
FROM unnest(%(ids)s::text[], %(attempts)s::int[]) AS r(id, attempt)
WHERE t.id = r.id AND t.attempts = r.attempt AND t.status = 'running' AND t.worker_id = %(worker_id)s
RETURNING t.id;

-- attempt_recorded --
-- Whether an attempt's outcome row is there already (a retried finish whose commit went through).
SELECT 1 FROM task_attempts
WHERE task_id = %(task_id)s AND attempt = %(attempt)s AND status = %(status)s AND finished_at = %(finished_at)s;

-- notifications_of_task_at --
-- The notifications a finish wrote (its task's, and its workflow's end, stamped with its time).
SELECT n.cursor, n.kind, n.task_id, n.workflow_id, n.scope, n.message, n.created_at FROM notifications n
JOIN task_executions t ON t.id = %(id)s
WHERE n.created_at = %(at)s AND (n.task_id = t.id OR (n.task_id IS NULL AND n.workflow_id = t.workflow_id))
ORDER BY n.cursor;

-- lock_workflows --
-- Transitions that may finish a workflow lock its row first (in id order: no deadlocks), so two
-- workers finishing its last two tasks see each other's commit and exactly one writes
-- workflow_completed.
SELECT id, name, scope FROM workflow_executions WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE;

-- workflow_tally --
-- Task counts by status of a workflow, as of now (after the locks above).
SELECT status, count(*) FROM task_executions WHERE workflow_id = %(id)s GROUP BY status;

-- finish_tasks --
-- A batch of attempts' outcomes (one JSON object each), applied only where the attempt is still
-- current: one statement for the whole batch.
UPDATE task_executions t SET status = v.status, attempts = v.attempts, failures = v.failures,
    updated_at = v.updated_at,
    next_attempt_at = v.next_attempt_at, started_at = v.started_at, finished_at = v.finished_at,
    progress_percent = v.progress_percent, progress_message = v.progress_message, error = v.error,
    result_preview = v.result_preview, worker_id = v.new_worker_id, lease_expires_at = v.lease_expires_at,
    session_id = v.session_id, batch_id = v.batch_id, lost_attempts = v.lost_attempts
FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(
    id text, worker_id text, attempt int, attempts int, status text, failures int, updated_at timestamptz,
    next_attempt_at timestamptz, started_at timestamptz, finished_at timestamptz,
    progress_percent double precision, progress_message text, error text, result_preview text,
    new_worker_id text, lease_expires_at timestamptz, session_id text, batch_id text, lost_attempts int)
WHERE t.id = v.id AND t.status = 'running' AND t.worker_id = v.worker_id AND t.attempts = v.attempt
RETURNING t.*;

-- release_cancelled --
-- Attempts that ended after their task was cancelled: the worker lets go of the row (a retry
-- waits for this, or for the lease to lapse, so a cancelled attempt never runs beside its retry).
UPDATE task_executions t SET worker_id = NULL, lease_expires_at = NULL
FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(id text, worker_id text, attempt int)
WHERE t.id = v.id AND t.status = 'cancelled' AND t.worker_id = v.worker_id AND t.attempts = v.attempt;

-- insert_attempts --
-- A batch of attempts' history rows (a repeat of the same row is ignored).
INSERT INTO task_attempts (task_id, attempt, status, started_at, finished_at, error, worker_id)
SELECT task_id, attempt, status, started_at, finished_at, error, worker_id
FROM jsonb_to_recordset(%(rows)s::jsonb) AS v(
    task_id text, attempt int, status text, started_at timestamptz, finished_at timestamptz,
    error text, worker_id text)
ON CONFLICT DO NOTHING;

-- task_statuses_of --
-- Statuses of some tasks.
SELECT id, status FROM task_executions WHERE id = ANY(%(ids)s);

-- workflow_tallies --
-- Task counts by status of some workflows, as of now (after their rows were locked).
SELECT workflow_id, status, count(*) FROM task_executions WHERE workflow_id = ANY(%(ids)s)
GROUP BY workflow_id, status;

-- workflow_task_ids --
-- Every task of a workflow.
SELECT id FROM task_executions WHERE workflow_id = %(id)s;

-- workflows_of --
-- The workflows some tasks belong to.
SELECT DISTINCT workflow_id FROM task_executions WHERE id = ANY(%(ids)s);

-- cancel_tasks --
-- Unfinished tasks become cancelled; with each, what it was (running ones must be stopped).
WITH old AS (
    SELECT id, status, worker_id FROM task_executions
    WHERE id = ANY(%(ids)s) AND status NOT IN ('completed', 'failed', 'cancelled')
    FOR UPDATE
)
UPDATE task_executions t SET status = 'cancelled', finished_at = %(now)s, updated_at = %(now)s,
    next_attempt_at = NULL, lease_expires_at = NULL
FROM old WHERE t.id = old.id
RETURNING t.*, old.status AS old_status, old.worker_id AS old_worker_id;

-- cancelled_at --
-- Tasks a cancel at exactly this time cancelled (an earlier try of the same cancel).
SELECT * FROM task_executions
WHERE id = ANY(%(ids)s) AND status = 'cancelled' AND finished_at = %(now)s AND updated_at = %(now)s
ORDER BY seq;

-- notifications_at --
-- The notifications written at exactly this time about some tasks and their workflows' ends.
SELECT cursor, kind, task_id, workflow_id, scope, message, created_at FROM notifications
WHERE created_at = %(at)s
  AND (task_id = ANY(%(ids)s) OR (task_id IS NULL AND workflow_id = ANY(%(workflows)s)))
ORDER BY cursor;

-- finished_among --
-- Which of some tasks had finished already.
SELECT id FROM task_executions WHERE id = ANY(%(ids)s) AND status IN ('completed', 'failed', 'cancelled');

-- requeue_task --
-- A failed or cancelled task goes back in the queue: the same row, failures and lost attempts anew.
UPDATE task_executions SET status = 'queued', failures = 0, lost_attempts = 0, error = NULL,
    finished_at = NULL, updated_at = %(now)s, next_attempt_at = NULL, worker_id = NULL,
    lease_expires_at = NULL
WHERE id = %(id)s AND status IN ('failed', 'cancelled')
  AND (worker_id IS NULL OR lease_expires_at IS NULL OR lease_expires_at < now())
RETURNING *;

-- requeued_at --
-- The task, if it was requeued at exactly this time (by an earlier try of the same requeue).
SELECT * FROM task_executions WHERE id = %(id)s AND status = 'queued' AND updated_at = %(now)s;

-- lapsed --
-- Running rows whose lease lapsed (their process died), oldest first; rows another transaction holds are skipped.
SELECT id, workflow_id FROM task_executions
WHERE status = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at LIMIT %(limit)s;

-- lock_lapsed --
-- The lapsed rows themselves, once their workflows are locked (still lapsed: not renewed meanwhile).
SELECT * FROM task_executions
WHERE id = ANY(%(ids)s) AND status = 'running' AND lease_expires_at < now()
ORDER BY id FOR UPDATE SKIP LOCKED;

-- reap_task --
-- A lapsed attempt's task: queued again, or failed as poisonous.
UPDATE task_executions SET status = %(status)s, failures = %(failures)s, lost_attempts = %(lost_attempts)s,
    worker_id = NULL, lease_expires_at = NULL, updated_at = %(now)s, next_attempt_at = NULL,
    finished_at = %(finished_at)s, error = %(error)s
WHERE id = %(id)s
RETURNING *;

-- unfinished_count --
-- Tasks not yet finished, every scope.
SELECT count(*) FROM task_executions WHERE status NOT IN ('completed', 'failed', 'cancelled');

-- heartbeat --
-- A worker's row, inserted or refreshed.
INSERT INTO workers (id, host, pid, queues, agents, concurrency, running, started_at, heartbeat_at, kind)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(agents)s, %(concurrency)s, %(running)s, %(started_at)s,
    %(heartbeat_at)s, %(kind)s)
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, queues = excluded.queues,
    agents = excluded.agents, concurrency = excluded.concurrency, running = excluded.running,
    heartbeat_at = excluded.heartbeat_at, kind = excluded.kind;

-- remove_worker --
-- A worker that stopped.
DELETE FROM workers WHERE id = %(id)s;

-- list_workers --
-- Workers heard from within the last alive seconds.
SELECT id, host, pid, queues, agents, concurrency, running, started_at, heartbeat_at, kind FROM workers
WHERE heartbeat_at > now() - %(alive)s * interval '1 second' ORDER BY started_at, id;

-- notifications_by_cursor --
-- Notification rows another process announced.
SELECT cursor, kind, task_id, workflow_id, scope, message, created_at FROM notifications
WHERE cursor = ANY(%(cursors)s) ORDER BY cursor;

-- events_by_key --
-- Run-log entries another process announced.
SELECT e.task_id, e.seq, e.logged_at, e.attempt, e.kind, e.message, e.data::text
FROM task_events e JOIN unnest(%(ids)s::text[], %(seqs)s::int[]) AS k(task_id, seq)
  ON e.task_id = k.task_id AND e.seq = k.seq
ORDER BY e.task_id, e.seq;

-- task_payload --
-- A task's prompt and options.
SELECT prompt, options FROM task_executions WHERE id = %(id)s;

-- purge_idempotency_keys --
-- Keys whose task finished before the cutoff, or is gone, no longer deduplicate.
DELETE FROM idempotency_keys k WHERE NOT EXISTS (
    SELECT 1 FROM task_executions t WHERE t.id = k.task_id AND (t.finished_at IS NULL OR t.finished_at >= %(cutoff)s)
) RETURNING task_id;

-- get_task --
-- One task by id.
SELECT * FROM task_executions WHERE id = %(id)s;

-- get_tasks_of_workflow --
-- Every task of a workflow, in submission order.
SELECT * FROM task_executions WHERE workflow_id = %(id)s ORDER BY seq;

-- get_attempts --
-- The attempt history of a task.
SELECT task_id, attempt, status, started_at, finished_at, error, worker_id
FROM task_attempts WHERE task_id = %(id)s ORDER BY attempt, finished_at;

-- task_events --
-- A page of a task's run log and, on every row, how many entries it has (one statement, one snapshot).
WITH total AS (SELECT count(*) AS n FROM task_events WHERE task_id = %(id)s),
page AS (
    SELECT seq, logged_at, attempt, kind, message, data::text AS data FROM task_events
    WHERE task_id = %(id)s AND seq >= %(offset)s ORDER BY seq LIMIT %(limit)s
)
SELECT total.n, page.* FROM total LEFT JOIN page ON true ORDER BY page.seq;

-- result_sizes --
-- Result sizes for some tasks.
SELECT task_id, size_chars FROM task_results WHERE task_id = ANY(%(ids)s);

-- result_page --
-- A slice of a result (offset is 0-based; SQL substr is 1-based).
SELECT content_type, substr(content, %(offset)s + 1, %(limit)s), size_chars, sources
FROM task_results WHERE task_id = %(id)s;

-- get_workflow --
-- One workflow by id.
SELECT id, name, scope, status, created_at, updated_at, finished_at FROM workflow_state WHERE id = %(id)s;

-- workflow_counts --
-- Task counts by status for some workflows.
SELECT workflow_id, status, count(*) FROM task_executions
WHERE workflow_id = ANY(%(ids)s) GROUP BY workflow_id, status;

-- list_workflows --
-- Workflows filtered by scope, state, agent and time; newest first, paged, with the total.
SELECT id, name, scope, status, created_at, updated_at, finished_at, count(*) OVER () AS total
FROM workflow_state w
WHERE (%(scope)s::text IS NULL OR w.scope = %(scope)s::text)
  AND (CASE WHEN %(finished)s::boolean THEN w.status <> 'running' ELSE w.status = 'running' END)
  AND (cardinality(%(statuses)s::text[]) = 0 OR w.status = ANY(%(statuses)s::text[]))
  AND (%(agent)s::text IS NULL
       OR EXISTS (SELECT 1 FROM task_executions t WHERE t.workflow_id = w.id AND t.agent = %(agent)s::text))
  AND (%(since)s::timestamptz IS NULL OR w.created_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR w.created_at < %(until)s::timestamptz)
ORDER BY w.created_at DESC, w.id
LIMIT %(limit)s OFFSET %(offset)s;

-- list_notifications --
-- Notifications after a cursor, oldest first, with when the reader had each (null: not yet).
SELECT n.cursor, n.kind, n.task_id, n.workflow_id, n.scope, n.message, n.created_at, d.delivered_at
FROM notifications n
LEFT JOIN notification_deliveries d ON d.reader = %(reader)s AND d.cursor = n.cursor
WHERE n.cursor > %(since)s
  AND (%(scope)s::text IS NULL OR n.scope = %(scope)s::text)
  AND (%(workflow_id)s::text IS NULL OR n.workflow_id = %(workflow_id)s::text)
  AND (%(include_delivered)s::boolean OR d.cursor IS NULL)
ORDER BY n.cursor
LIMIT %(limit)s;

-- usage_totals --
-- Usage summed per task.
SELECT task_id, array_agg(DISTINCT model ORDER BY model) FILTER (WHERE model IS NOT NULL),
       sum(input_tokens), sum(output_tokens), sum(cache_creation_input_tokens), sum(cache_read_input_tokens),
       sum(cost_usd)
FROM token_usage WHERE task_id = ANY(%(ids)s) GROUP BY task_id;

-- task_counts --
-- Tasks by status across every scope.
SELECT status, count(*) FROM task_executions GROUP BY status;

-- task_statuses --
-- The status of some tasks.
SELECT id, status FROM task_executions WHERE id = ANY(%(ids)s);

-- get_schedule --
-- One schedule by id.
SELECT * FROM scheduled_tasks WHERE id = %(id)s;

-- delete_schedule --
-- A schedule removed.
DELETE FROM scheduled_tasks WHERE id = %(id)s RETURNING id;

-- list_schedules --
-- Schedules of a scope (or all), newest first, paged, with the total.
SELECT *, count(*) OVER () AS total_rows FROM scheduled_tasks
WHERE %(scope)s::text IS NULL OR scope = %(scope)s::text
ORDER BY created_at DESC, id
LIMIT %(limit)s OFFSET %(offset)s;

-- count_schedules_in --
-- How many schedules a scope (or all) holds.
SELECT count(*) FROM scheduled_tasks WHERE %(scope)s::text IS NULL OR scope = %(scope)s::text;

-- due_schedules --
-- Enabled schedules due by now (oldest first), then those holding a queued run.
SELECT * FROM (
    (SELECT * FROM scheduled_tasks
     WHERE next_run_at <= %(now)s AND enabled AND finished_at IS NULL
     ORDER BY next_run_at, id
     LIMIT %(limit)s)
    UNION ALL
    SELECT * FROM scheduled_tasks
    WHERE queued_run_at IS NOT NULL AND enabled AND finished_at IS NULL
      AND (next_run_at IS NULL OR next_run_at > %(now)s)
) s
ORDER BY next_run_at NULLS LAST, id;

-- next_due --
-- When the scheduler must next wake.
SELECT min(next_run_at) FROM scheduled_tasks WHERE enabled AND finished_at IS NULL;

-- claim_fire --
-- The fire key: one row per (schedule, due time); nothing returned means it was already fired.
INSERT INTO schedule_fires (schedule_id, due_at, task_id, fired_at)
VALUES (%(schedule_id)s, %(due_at)s, %(task_id)s, %(fired_at)s)
ON CONFLICT DO NOTHING RETURNING schedule_id;

-- schedule_tasks --
-- The tasks a schedule started, newest first, paged, with the total.
SELECT *, count(*) OVER () AS total_rows FROM task_executions WHERE schedule_id = %(id)s
ORDER BY created_at DESC, seq DESC LIMIT %(limit)s OFFSET %(offset)s;

-- count_schedule_tasks --
-- How many tasks a schedule started.
SELECT count(*) FROM task_executions WHERE schedule_id = %(id)s;

-- gc_batch --
-- Retention: up to limit tasks that finished before the cutoff, oldest first, except held ids.
SELECT id, workflow_id FROM task_executions
WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at < %(cutoff)s
  AND NOT (id = ANY(%(held)s::text[]))
ORDER BY finished_at, id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- gc_delete_attempts --
-- Retention: the attempt history of the tasks.
DELETE FROM task_attempts WHERE task_id = ANY(%(ids)s);

-- gc_delete_results --
-- Retention: the results of the tasks.
DELETE FROM task_results WHERE task_id = ANY(%(ids)s);

-- gc_delete_usage --
-- Retention: the token usage of the tasks.
DELETE FROM token_usage WHERE task_id = ANY(%(ids)s);

-- gc_delete_task_notifications --
-- Retention: notifications about the tasks, never the newest notification of all.
DELETE FROM notifications
WHERE task_id = ANY(%(ids)s) AND cursor < (SELECT max(cursor) FROM notifications);

-- gc_delete_fires --
-- Retention: fire keys of the scheduled runs.
DELETE FROM schedule_fires WHERE task_id = ANY(%(ids)s);

-- gc_delete_webhooks --
-- Retention: webhook deliveries of the tasks.
DELETE FROM webhook_callbacks WHERE task_id = ANY(%(ids)s);

-- gc_delete_task_events --
-- Retention: the run logs of the tasks.
DELETE FROM task_events WHERE task_id = ANY(%(ids)s);

-- gc_delete_tasks --
-- Retention: the tasks themselves (finished ones only).
DELETE FROM task_executions WHERE id = ANY(%(ids)s) AND status IN ('completed', 'failed', 'cancelled');

-- gc_delete_workflows --
-- Retention: of the workflows, those none of whose tasks remain.
DELETE FROM workflow_executions w
WHERE w.id = ANY(%(ids)s) AND NOT EXISTS (SELECT 1 FROM task_executions t WHERE t.workflow_id = w.id)
RETURNING id;

-- gc_delete_workflow_notifications --
-- Retention: workflow_completed notifications of the deleted workflows (newest kept).
DELETE FROM notifications
WHERE task_id IS NULL AND workflow_id = ANY(%(ids)s) AND cursor < (SELECT max(cursor) FROM notifications);

-- gc_delete_schedule_notices --
-- Retention: up to limit old notifications that name no task and no workflow.
DELETE FROM notifications WHERE cursor IN (
    SELECT cursor FROM notifications
    WHERE task_id IS NULL AND workflow_id = '' AND created_at < %(cutoff)s
      AND cursor < (SELECT max(cursor) FROM notifications)
    ORDER BY cursor
    LIMIT %(limit)s
);

-- gc_delete_deliveries --
-- Retention: readers' delivery marks of notifications that no longer exist.
DELETE FROM notification_deliveries d WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.cursor = d.cursor);

-- gc_count --
-- Retention's dry run: what the gc_delete_* statements would delete, in PurgeCounts order.
WITH doomed AS (
    SELECT id, workflow_id FROM task_executions
    WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at < %(cutoff)s
      AND NOT (id = ANY(%(held)s::text[]))
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
            OR (n.task_id IS NULL AND n.workflow_id = '' AND n.created_at < %(cutoff)s))),
    (SELECT count(*) FROM schedule_fires WHERE task_id IN (SELECT id FROM doomed)),
    (SELECT count(*) FROM webhook_callbacks WHERE task_id IN (SELECT id FROM doomed)),
    (SELECT count(*) FROM emptied),
    (SELECT count(*) FROM task_events WHERE task_id IN (SELECT id FROM doomed));

-- disk_usage --
-- Bytes the store's tables (with their indexes and TOAST) take.
SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm');
