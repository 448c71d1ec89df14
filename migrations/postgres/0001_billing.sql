-- tollgate billing schema (PostgreSQL). Money is integer micro-USD; times are unix milliseconds (UTC).
CREATE TABLE accounts (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    plan            TEXT,
    balance_micros  BIGINT NOT NULL DEFAULT 0 CHECK (balance_micros >= 0),
    held_micros     BIGINT NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    created_at      BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id                TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL REFERENCES accounts(id),
    prefix            TEXT NOT NULL UNIQUE,
    key_hash          TEXT NOT NULL UNIQUE,
    is_admin          BIGINT NOT NULL DEFAULT 0,
    name              TEXT,
    spend_cap_micros  BIGINT,
    spent_micros      BIGINT NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    reserved_micros   BIGINT NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    created_at        BIGINT NOT NULL,
    revoked_at        BIGINT,
    last_used_at      BIGINT
);
CREATE INDEX api_keys_account ON api_keys(account_id);

CREATE TABLE prices (
    id                     BIGSERIAL PRIMARY KEY,
    model                  TEXT NOT NULL,
    provider               TEXT NOT NULL DEFAULT '',
    input_micros_per_m     BIGINT NOT NULL CHECK (input_micros_per_m >= 0),
    cached_micros_per_m    BIGINT NOT NULL CHECK (cached_micros_per_m >= 0),
    output_micros_per_m    BIGINT NOT NULL CHECK (output_micros_per_m >= 0),
    fee_input_micros_per_m  BIGINT NOT NULL DEFAULT 0 CHECK (fee_input_micros_per_m >= 0),
    fee_cached_micros_per_m BIGINT NOT NULL DEFAULT 0 CHECK (fee_cached_micros_per_m >= 0),
    fee_output_micros_per_m BIGINT NOT NULL DEFAULT 0 CHECK (fee_output_micros_per_m >= 0),
    markup_bps             BIGINT NOT NULL DEFAULT 0 CHECK (markup_bps >= 0),
    source                 TEXT NOT NULL DEFAULT 'admin',
    effective_at           BIGINT NOT NULL,
    created_at             BIGINT NOT NULL
);
CREATE INDEX prices_model ON prices(model, provider, effective_at);

-- One row per request id: the hold and its single final state.
CREATE TABLE requests (
    id                   TEXT PRIMARY KEY,
    account_id           TEXT NOT NULL REFERENCES accounts(id),
    key_id               TEXT,
    key_reserved         BIGINT NOT NULL DEFAULT 0,
    model                TEXT NOT NULL,
    provider             TEXT,
    upstream_model       TEXT,
    price_id             BIGINT,
    state                TEXT NOT NULL CHECK (state IN ('held', 'settled', 'released', 'expired')),
    hold_micros          BIGINT NOT NULL CHECK (hold_micros >= 0),
    hold_expires_at      BIGINT NOT NULL,
    status               TEXT,
    http_status          BIGINT,
    prompt_tokens        BIGINT NOT NULL DEFAULT 0,
    cached_tokens        BIGINT NOT NULL DEFAULT 0,
    completion_tokens    BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens     BIGINT NOT NULL DEFAULT 0,
    cost_micros          BIGINT NOT NULL DEFAULT 0,
    computed_cost_micros BIGINT NOT NULL DEFAULT 0,
    input_cost_micros    BIGINT NOT NULL DEFAULT 0,
    cached_cost_micros   BIGINT NOT NULL DEFAULT 0,
    output_cost_micros   BIGINT NOT NULL DEFAULT 0,
    network_cost_micros  BIGINT NOT NULL DEFAULT 0,
    platform_fee_micros  BIGINT NOT NULL DEFAULT 0,
    estimated            BIGINT NOT NULL DEFAULT 0,
    delivered            BIGINT NOT NULL DEFAULT 0,
    latency_ms           BIGINT,
    created_at           BIGINT NOT NULL,
    finished_at          BIGINT
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
    amount_micros    BIGINT NOT NULL,
    reason           TEXT,
    created_at       BIGINT NOT NULL
);
-- A request id is held once and finalised once, enforced by the database.
CREATE UNIQUE INDEX ledger_request_phase ON ledger_transactions(request_id, phase);
CREATE UNIQUE INDEX ledger_idempotency ON ledger_transactions(account_id, idempotency_key);
CREATE INDEX ledger_tx_account ON ledger_transactions(account_id, created_at);

CREATE TABLE ledger_entries (
    id             BIGSERIAL PRIMARY KEY,
    txn_id         TEXT NOT NULL REFERENCES ledger_transactions(id),
    ledger_account TEXT NOT NULL,
    amount_micros  BIGINT NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE INDEX ledger_entries_txn ON ledger_entries(txn_id);
CREATE INDEX ledger_entries_account ON ledger_entries(ledger_account);

CREATE FUNCTION tollgate_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION tollgate_append_only();
CREATE TRIGGER ledger_transactions_append_only BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION tollgate_append_only();
