-- The request table again, with its state CHECK written as comparisons instead of `IN (...)`.
-- SQLite evaluates a CHECK's `IN` over more than two constants through a temporary B-tree that
-- it builds and drops on every row written (OpenEphemeral: a page cache, a table, its mutexes):
-- about a third of the CPU of inserting a request row. Same columns, same meaning; the table is
-- rebuilt because SQLite cannot alter a CHECK in place (sqlite.org/lang_altertable.html).
CREATE TABLE requests_new (
    id                   TEXT PRIMARY KEY,
    account_id           TEXT NOT NULL REFERENCES accounts(id),
    key_id               TEXT,
    key_reserved         INTEGER NOT NULL DEFAULT 0,
    model                TEXT NOT NULL,
    provider             TEXT,
    upstream_model       TEXT,
    price_id             INTEGER,
    state                TEXT NOT NULL CHECK (state = 'held' OR state = 'settled'
                                              OR state = 'released' OR state = 'expired'),
    hold_micros          INTEGER NOT NULL CHECK (hold_micros >= 0),
    hold_expires_at      INTEGER NOT NULL,
    status               TEXT,
    http_status          INTEGER,
    prompt_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_tokens        INTEGER NOT NULL DEFAULT 0,
    completion_tokens    INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens     INTEGER NOT NULL DEFAULT 0,
    cost_micros          INTEGER NOT NULL DEFAULT 0,
    computed_cost_micros INTEGER NOT NULL DEFAULT 0,
    input_cost_micros    INTEGER NOT NULL DEFAULT 0,
    cached_cost_micros   INTEGER NOT NULL DEFAULT 0,
    output_cost_micros   INTEGER NOT NULL DEFAULT 0,
    network_cost_micros  INTEGER NOT NULL DEFAULT 0,
    platform_fee_micros  INTEGER NOT NULL DEFAULT 0,
    estimated            INTEGER NOT NULL DEFAULT 0,
    delivered            INTEGER NOT NULL DEFAULT 0,
    latency_ms           INTEGER,
    created_at           INTEGER NOT NULL,
    finished_at          INTEGER,
    lease_id             TEXT
);
INSERT INTO requests_new (id, account_id, key_id, key_reserved, model, provider, upstream_model,
    price_id, state, hold_micros, hold_expires_at, status, http_status, prompt_tokens,
    cached_tokens, completion_tokens, reasoning_tokens, cost_micros, computed_cost_micros,
    input_cost_micros, cached_cost_micros, output_cost_micros, network_cost_micros,
    platform_fee_micros, estimated, delivered, latency_ms, created_at, finished_at, lease_id)
SELECT id, account_id, key_id, key_reserved, model, provider, upstream_model,
    price_id, state, hold_micros, hold_expires_at, status, http_status, prompt_tokens,
    cached_tokens, completion_tokens, reasoning_tokens, cost_micros, computed_cost_micros,
    input_cost_micros, cached_cost_micros, output_cost_micros, network_cost_micros,
    platform_fee_micros, estimated, delivered, latency_ms, created_at, finished_at, lease_id
FROM requests;
DROP TABLE requests;
ALTER TABLE requests_new RENAME TO requests;
CREATE INDEX requests_account_time ON requests(account_id, created_at);
CREATE INDEX requests_open_holds ON requests(hold_expires_at) WHERE state = 'held';
