-- Executors keep state across attempts: a claude-code session to resume, a message batch to poll.
ALTER TABLE task_executions ADD COLUMN session_id VARCHAR;
ALTER TABLE task_executions ADD COLUMN batch_id VARCHAR;
