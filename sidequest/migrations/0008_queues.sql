-- Workers serve queues: a task names its queue (options.queue, or its agent file's
-- `sidequest: {queue: …}`; default 'default'). An agent file resolved at submit travels with the
-- task (front matter, body, source path, content hash) so a worker on another machine runs
-- exactly what was submitted. On DuckDB (one process) both are kept for the shared schema.
ALTER TABLE task_executions ADD COLUMN queue VARCHAR DEFAULT 'default';
UPDATE task_executions SET queue = 'default' WHERE queue IS NULL;
ALTER TABLE task_executions ADD COLUMN agent_snapshot JSON;
-- The agent's max_concurrency at submit, so claims on a shared store can honour it everywhere.
ALTER TABLE task_executions ADD COLUMN agent_limit INTEGER;
