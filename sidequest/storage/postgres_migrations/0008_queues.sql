-- Workers serve queues; an agent file resolved at submit travels with the task (see DuckDB's 0008).
ALTER TABLE task_executions ADD COLUMN queue TEXT NOT NULL DEFAULT 'default';
ALTER TABLE task_executions ADD COLUMN agent_snapshot JSONB;
-- The agent's max_concurrency at submit: claims honour it over every worker (see claim).
ALTER TABLE task_executions ADD COLUMN agent_limit INTEGER;

-- What a claim reads: ready rows in (priority rank, seq) order. Partial, so finished rows (nearly
-- all of them, in a long-lived store) cost the claim nothing.
CREATE INDEX task_executions_ready ON task_executions (
    (CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END), seq
) WHERE status IN ('queued', 'retrying');

-- Each claim marks the rows it took, so a claim retried after a lost commit answer finds them.
ALTER TABLE task_executions ADD COLUMN claim_token TEXT;
CREATE INDEX task_executions_claim_token ON task_executions (claim_token) WHERE status = 'running';

-- Per-agent limits count running rows over every worker; the reaper looks for lapsed leases.
CREATE INDEX task_executions_running ON task_executions (agent, lease_expires_at) WHERE status = 'running';

-- Processes that run attempts, as their last heartbeat said (sidequest workers / status).
CREATE TABLE workers (
    id            TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    queues        TEXT[] NOT NULL,
    agents        TEXT[],
    concurrency   INTEGER NOT NULL,
    running       INTEGER NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL,
    kind          TEXT NOT NULL DEFAULT 'worker'
);

-- Write-behind batches already committed, by token: a batch retried after a commit whose answer
-- was lost (the connection dropped at COMMIT) finds its token and is not applied twice. Rows older
-- than an hour are deleted by later batches.
CREATE TABLE applied_batches (
    token       TEXT PRIMARY KEY,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    cursors     BIGINT[]
);
