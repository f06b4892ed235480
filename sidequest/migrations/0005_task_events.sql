-- Each task's run log: attempts, progress, agent turns, tool calls, stderr lines, in order.
-- seq counts from 0 per task, so a reader pages by offset = seq. Capped per task by
-- [task_log] max_events (one `log_cut` marker at the cut); deleted with its task by retention.
-- No primary key on purpose: a key conflict would fail the whole group commit it rides (and
-- stop the store), and a log entry is never worth that.
CREATE TABLE task_events (
    task_id  VARCHAR NOT NULL,
    seq      INTEGER NOT NULL,
    logged_at TIMESTAMP NOT NULL,
    attempt  INTEGER NOT NULL,
    kind     VARCHAR NOT NULL,
    message  VARCHAR NOT NULL,
    data     JSON
);
CREATE INDEX task_events_task ON task_events (task_id);
