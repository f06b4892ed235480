-- sidequest schema, version 1.
-- Times are TIMESTAMP holding UTC (the code converts at the boundary).
-- Later versions go in sidequest/migrations/NNNN_name.sql, applied in order.

-- A workflow's status is derived from its tasks (see workflow_state), so finishing a task
-- never costs a second row update.
CREATE TABLE workflow_executions (
    id            VARCHAR PRIMARY KEY,
    name          VARCHAR NOT NULL,
    scope         VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE task_executions (
    id               VARCHAR PRIMARY KEY,
    seq              BIGINT NOT NULL,         -- submission order: FIFO within a priority
    workflow_id      VARCHAR NOT NULL,
    agent            VARCHAR NOT NULL,
    prompt           VARCHAR NOT NULL,
    status           VARCHAR NOT NULL,        -- queued | waiting | running | retrying | completed | failed | cancelled
    priority         VARCHAR NOT NULL,        -- high | normal | low
    scope            VARCHAR NOT NULL,
    options          JSON NOT NULL,           -- the validated TaskOptions
    idempotency_key  VARCHAR,
    callback_url     VARCHAR,
    schedule_id      VARCHAR,
    attempts         INTEGER NOT NULL,        -- attempts started
    failures         INTEGER NOT NULL,        -- attempts that failed (errors, timeouts, lapsed leases)
    max_retries      INTEGER NOT NULL,
    timeout_s        DOUBLE,
    created_at       TIMESTAMP NOT NULL,
    updated_at       TIMESTAMP NOT NULL,
    not_before       TIMESTAMP,
    next_attempt_at  TIMESTAMP,
    started_at       TIMESTAMP,
    finished_at      TIMESTAMP,
    progress_percent DOUBLE,
    progress_message VARCHAR,
    error            VARCHAR,
    result_preview   VARCHAR,
    worker_id        VARCHAR,
    lease_expires_at TIMESTAMP
);

CREATE TABLE task_attempts (
    task_id      VARCHAR NOT NULL,
    attempt      INTEGER NOT NULL,
    status       VARCHAR NOT NULL,            -- completed | failed | timed_out | cancelled | lost | interrupted
    started_at   TIMESTAMP,
    finished_at  TIMESTAMP NOT NULL,
    error        VARCHAR,
    worker_id    VARCHAR
);

CREATE TABLE task_results (
    task_id       VARCHAR PRIMARY KEY,
    content_type  VARCHAR NOT NULL,           -- text | json
    content       VARCHAR NOT NULL,
    size_chars    BIGINT NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

CREATE TABLE notifications (
    cursor        BIGINT PRIMARY KEY,         -- monotonically increasing
    kind          VARCHAR NOT NULL,           -- task_completed | task_failed | task_cancelled | workflow_completed
    task_id       VARCHAR,
    workflow_id   VARCHAR NOT NULL,
    scope         VARCHAR NOT NULL,
    message       VARCHAR NOT NULL,
    created_at    TIMESTAMP NOT NULL,
    delivered_at  TIMESTAMP
);

CREATE TABLE webhook_callbacks (
    id               VARCHAR PRIMARY KEY,
    task_id          VARCHAR NOT NULL,
    url              VARCHAR NOT NULL,
    status           VARCHAR NOT NULL,        -- pending | delivered | failed
    attempts         INTEGER NOT NULL,
    last_error       VARCHAR,
    next_attempt_at  TIMESTAMP,
    created_at       TIMESTAMP NOT NULL,
    delivered_at     TIMESTAMP
);

CREATE TABLE scheduled_tasks (
    id            VARCHAR PRIMARY KEY,
    name          VARCHAR,
    agent         VARCHAR NOT NULL,
    prompt        VARCHAR NOT NULL,
    cron          VARCHAR NOT NULL,
    timezone      VARCHAR NOT NULL,
    options       JSON NOT NULL,
    scope         VARCHAR NOT NULL,
    enabled       BOOLEAN NOT NULL,
    next_run_at   TIMESTAMP,
    last_run_at   TIMESTAMP,
    created_at    TIMESTAMP NOT NULL,
    updated_at    TIMESTAMP NOT NULL
);

CREATE TABLE token_usage (
    task_id                      VARCHAR NOT NULL,
    attempt                      INTEGER NOT NULL,
    model                        VARCHAR,
    input_tokens                 BIGINT NOT NULL,
    output_tokens                BIGINT NOT NULL,
    cache_creation_input_tokens  BIGINT NOT NULL,
    cache_read_input_tokens      BIGINT NOT NULL,
    cost_usd                     DOUBLE,
    recorded_at                  TIMESTAMP NOT NULL
);

-- running while any task is unfinished; then failed if any failed, completed if any completed,
-- else cancelled.
CREATE VIEW workflow_state AS
SELECT w.id, w.name, w.scope,
       CASE
           WHEN count(t.id) FILTER (WHERE t.status NOT IN ('completed', 'failed', 'cancelled')) > 0 THEN 'running'
           WHEN count(t.id) FILTER (WHERE t.status = 'failed') > 0 THEN 'failed'
           WHEN count(t.id) FILTER (WHERE t.status = 'completed') > 0 THEN 'completed'
           WHEN count(t.id) = 0 THEN 'running'
           ELSE 'cancelled'
       END AS status,
       w.created_at,
       coalesce(max(t.updated_at), w.created_at) AS updated_at,
       CASE
           WHEN count(t.id) FILTER (WHERE t.status NOT IN ('completed', 'failed', 'cancelled')) = 0
           THEN max(t.finished_at)
       END AS finished_at
FROM workflow_executions w
LEFT JOIN task_executions t ON t.workflow_id = w.id
GROUP BY w.id, w.name, w.scope, w.created_at;
