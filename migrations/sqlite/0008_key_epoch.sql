-- A count of changes to what an authenticated key carries: its revocation and spend cap, its
-- account's plan, limit overrides. Each such change adds one in its own transaction. An instance
-- that caches key rows (lease admission's `key_cache`) reads the count every 100 ms and drops its
-- cache when it has moved, so a key revoked by another process (the CLI, another instance) is
-- refused within that interval rather than after the cache's lifetime.
CREATE TABLE key_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);
INSERT INTO key_epoch (id, epoch) VALUES (1, 0);
