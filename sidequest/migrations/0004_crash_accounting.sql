-- A lost attempt (the process died while it ran) is not a failed one: counted apart, capped by
-- max_lost_attempts. Idempotency keys outlive their tasks for idempotency_window.
ALTER TABLE task_executions ADD COLUMN lost_attempts INTEGER DEFAULT 0;
UPDATE task_executions SET lost_attempts = 0 WHERE lost_attempts IS NULL;

CREATE TABLE idempotency_keys (
    scope       VARCHAR NOT NULL,
    key         VARCHAR NOT NULL,
    task_id     VARCHAR NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (scope, key)
);
INSERT INTO idempotency_keys
SELECT scope, idempotency_key, arg_max(id, created_at), max(created_at) FROM task_executions
WHERE idempotency_key IS NOT NULL GROUP BY scope, idempotency_key;

-- The caller's own project (from the front's header, never from a model-typed argument): the only
-- place besides allowed_roots where the task's processes may run and its agent files are read.
-- NULL for tasks from before this version and from callers that named no project.
ALTER TABLE task_executions ADD COLUMN project VARCHAR;
ALTER TABLE scheduled_tasks ADD COLUMN project VARCHAR;
