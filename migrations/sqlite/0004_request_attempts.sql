-- Every upstream attempt of a request that needed more than one, or whose only attempt failed
-- (issue 6: "every attempt is recorded on the request record"). A request served by its first
-- attempt has no rows here: its record's provider and upstream_model are that attempt. Times are
-- milliseconds from the request's start.
CREATE TABLE request_attempts (
    request_id      TEXT NOT NULL,
    n               INTEGER NOT NULL,
    provider        TEXT NOT NULL,
    upstream_model  TEXT NOT NULL,
    result          TEXT NOT NULL,
    http_status     INTEGER,
    started_ms      BIGINT NOT NULL,
    duration_ms     BIGINT NOT NULL,
    error           TEXT,
    PRIMARY KEY (request_id, n)
);
