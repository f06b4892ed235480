-- Notifications belong to their reader: what one consumer read (the CLI, one project's MCP
-- sessions, a REST client) is no longer delivered for the others. A reader is named by the
-- surface it reads through and the caller's project ('mcp:/home/me/proj', 'cli:/home/me/proj',
-- 'rest:/home/me/proj'), never by a model-typed argument.
CREATE TABLE notification_deliveries (
    reader        VARCHAR NOT NULL,
    cursor        BIGINT NOT NULL,            -- notifications.cursor
    delivered_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (reader, cursor)
);

-- Before this version one mark served everybody; it is kept for every reader of the
-- notification's own project, so an upgrade shows nobody old notifications again.
INSERT INTO notification_deliveries
SELECT r.surface || ':' || n.scope, n.cursor, n.delivered_at
FROM notifications n, (VALUES ('mcp'), ('cli'), ('rest')) AS r(surface)
WHERE n.delivered_at IS NOT NULL;

ALTER TABLE notifications DROP COLUMN delivered_at;
