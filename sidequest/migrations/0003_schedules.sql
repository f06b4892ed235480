-- Cron schedules: policies, counters, and one row per fired due time.
ALTER TABLE scheduled_tasks ADD COLUMN overlap VARCHAR DEFAULT 'skip';
ALTER TABLE scheduled_tasks ADD COLUMN misfire VARCHAR DEFAULT 'run_once';
ALTER TABLE scheduled_tasks ADD COLUMN start_at TIMESTAMP;
ALTER TABLE scheduled_tasks ADD COLUMN end_at TIMESTAMP;
ALTER TABLE scheduled_tasks ADD COLUMN max_runs INTEGER;
ALTER TABLE scheduled_tasks ADD COLUMN runs INTEGER DEFAULT 0;
ALTER TABLE scheduled_tasks ADD COLUMN last_task_id VARCHAR;
ALTER TABLE scheduled_tasks ADD COLUMN queued_run_at TIMESTAMP;  -- overlap=queue: due time waiting
ALTER TABLE scheduled_tasks ADD COLUMN finished_at TIMESTAMP;
ALTER TABLE scheduled_tasks ADD COLUMN last_error VARCHAR;

-- The scheduler asks "what is due?" and "when is the next one?": both read this index.
CREATE INDEX scheduled_tasks_next_run ON scheduled_tasks (next_run_at);

-- The fire key: a due time of a schedule starts at most one task, whatever races or restarts.
CREATE TABLE schedule_fires (
    schedule_id  VARCHAR NOT NULL,
    due_at       TIMESTAMP NOT NULL,
    task_id      VARCHAR,                     -- null when the due time was skipped
    fired_at     TIMESTAMP NOT NULL,
    PRIMARY KEY (schedule_id, due_at)
);
