-- Credit leases (`[billing] admission = "lease"`): an instance reserves a slice of an account's
-- available balance (and of its key's spend cap) with one durable ledger hold, admits requests
-- against it in memory, records each request's hold and charge in its local journal before
-- answering, and writes request rows and aggregated captures here in batches. Outstanding (still
-- held) = granted - captured - released. An open lease past `expires_at` (its owner stopped
-- renewing it) is released by any instance's sweeper.
CREATE TABLE credit_leases (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts(id),
    key_id           TEXT,
    key_reserved     INTEGER NOT NULL DEFAULT 0,
    owner            TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    granted_micros   INTEGER NOT NULL DEFAULT 0 CHECK (granted_micros >= 0),
    captured_micros  INTEGER NOT NULL DEFAULT 0 CHECK (captured_micros >= 0),
    released_micros  INTEGER NOT NULL DEFAULT 0 CHECK (released_micros >= 0),
    grants           INTEGER NOT NULL DEFAULT 0,
    expires_at       INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    closed_at        INTEGER,
    CHECK (captured_micros + released_micros <= granted_micros)
);
CREATE INDEX credit_leases_open ON credit_leases(state, expires_at);
CREATE INDEX credit_leases_owner ON credit_leases(owner, state);

-- A request admitted under a lease has no hold of its own in the ledger: its row is written once,
-- already final, and its charge is part of one of the lease's capture transactions.
ALTER TABLE requests ADD COLUMN lease_id TEXT;

-- Only held rows are looked up by expiry (the sweeper), and most rows are final (leased requests
-- are written final): index just the held ones, one B-tree insert less per written request.
DROP INDEX requests_open_holds;
CREATE INDEX requests_open_holds ON requests(hold_expires_at) WHERE state = 'held';
