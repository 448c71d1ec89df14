-- tollgate billing schema (SQLite). Money is integer micro-USD; times are unix milliseconds (UTC).
CREATE TABLE accounts (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    plan            TEXT,
    balance_micros  INTEGER NOT NULL DEFAULT 0 CHECK (balance_micros >= 0),
    held_micros     INTEGER NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    created_at      INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id                TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL REFERENCES accounts(id),
    prefix            TEXT NOT NULL UNIQUE,
    key_hash          TEXT NOT NULL UNIQUE,
    is_admin          INTEGER NOT NULL DEFAULT 0,
    name              TEXT,
    spend_cap_micros  INTEGER,
    spent_micros      INTEGER NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    reserved_micros   INTEGER NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    created_at        INTEGER NOT NULL,
    revoked_at        INTEGER,
    last_used_at      INTEGER
);
CREATE INDEX api_keys_account ON api_keys(account_id);

CREATE TABLE prices (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    model                  TEXT NOT NULL,
    provider               TEXT NOT NULL DEFAULT '',
    input_micros_per_m     INTEGER NOT NULL CHECK (input_micros_per_m >= 0),
    cached_micros_per_m    INTEGER NOT NULL CHECK (cached_micros_per_m >= 0),
    output_micros_per_m    INTEGER NOT NULL CHECK (output_micros_per_m >= 0),
    fee_input_micros_per_m  INTEGER NOT NULL DEFAULT 0 CHECK (fee_input_micros_per_m >= 0),
    fee_cached_micros_per_m INTEGER NOT NULL DEFAULT 0 CHECK (fee_cached_micros_per_m >= 0),
    fee_output_micros_per_m INTEGER NOT NULL DEFAULT 0 CHECK (fee_output_micros_per_m >= 0),
    markup_bps             INTEGER NOT NULL DEFAULT 0 CHECK (markup_bps >= 0),
    source                 TEXT NOT NULL DEFAULT 'admin',
    effective_at           INTEGER NOT NULL,
    created_at             INTEGER NOT NULL
);
CREATE INDEX prices_model ON prices(model, provider, effective_at);

-- One row per request id: the hold and its single final state.
CREATE TABLE requests (
    id                   TEXT PRIMARY KEY,
    account_id           TEXT NOT NULL REFERENCES accounts(id),
    key_id               TEXT,
    key_reserved         INTEGER NOT NULL DEFAULT 0,
    model                TEXT NOT NULL,
    provider             TEXT,
    upstream_model       TEXT,
    price_id             INTEGER,
    state                TEXT NOT NULL CHECK (state IN ('held', 'settled', 'released', 'expired')),
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
    finished_at          INTEGER
);
CREATE INDEX requests_account_time ON requests(account_id, created_at);
CREATE INDEX requests_open_holds ON requests(state, hold_expires_at);

-- Append-only double-entry ledger. Each transaction's entries sum to zero.
CREATE TABLE ledger_transactions (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL CHECK (kind IN ('topup', 'adjustment', 'hold', 'capture', 'release', 'expire')),
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    request_id       TEXT,
    phase            TEXT,
    idempotency_key  TEXT,
    amount_micros    INTEGER NOT NULL,
    reason           TEXT,
    created_at       INTEGER NOT NULL
);
-- A request id is held once and finalised once, enforced by the database.
CREATE UNIQUE INDEX ledger_request_phase ON ledger_transactions(request_id, phase);
CREATE UNIQUE INDEX ledger_idempotency ON ledger_transactions(account_id, idempotency_key);
CREATE INDEX ledger_tx_account ON ledger_transactions(account_id, created_at);

CREATE TABLE ledger_entries (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id         TEXT NOT NULL REFERENCES ledger_transactions(id),
    ledger_account TEXT NOT NULL,
    amount_micros  INTEGER NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE INDEX ledger_entries_txn ON ledger_entries(txn_id);
CREATE INDEX ledger_entries_account ON ledger_entries(ledger_account);

CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END;
CREATE TRIGGER ledger_transactions_no_update BEFORE UPDATE ON ledger_transactions
BEGIN SELECT RAISE(ABORT, 'ledger_transactions is append-only'); END;
CREATE TRIGGER ledger_transactions_no_delete BEFORE DELETE ON ledger_transactions
BEGIN SELECT RAISE(ABORT, 'ledger_transactions is append-only'); END;
