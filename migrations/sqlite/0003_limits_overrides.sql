-- Per-account and per-key limit overrides (issue 4). A NULL column means "no override: the plan's
-- value applies". Money is integer micro-USD; times are unix milliseconds (UTC).
CREATE TABLE account_limit_overrides (
    account_id                TEXT PRIMARY KEY REFERENCES accounts(id),
    requests_per_minute       INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute         INTEGER CHECK (tokens_per_minute > 0),
    max_concurrent            INTEGER CHECK (max_concurrent > 0),
    requests_per_day          INTEGER CHECK (requests_per_day > 0),
    tokens_per_day            INTEGER CHECK (tokens_per_day > 0),
    spend_cap_daily_micros    INTEGER CHECK (spend_cap_daily_micros > 0),
    spend_cap_monthly_micros  INTEGER CHECK (spend_cap_monthly_micros > 0),
    updated_at                INTEGER NOT NULL
);

CREATE TABLE key_limit_overrides (
    key_id                    TEXT PRIMARY KEY REFERENCES api_keys(id),
    requests_per_minute       INTEGER CHECK (requests_per_minute > 0),
    tokens_per_minute         INTEGER CHECK (tokens_per_minute > 0),
    max_concurrent            INTEGER CHECK (max_concurrent > 0),
    requests_per_day          INTEGER CHECK (requests_per_day > 0),
    tokens_per_day            INTEGER CHECK (tokens_per_day > 0),
    spend_cap_daily_micros    INTEGER CHECK (spend_cap_daily_micros > 0),
    spend_cap_monthly_micros  INTEGER CHECK (spend_cap_monthly_micros > 0),
    updated_at                INTEGER NOT NULL
);
