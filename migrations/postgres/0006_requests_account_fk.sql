-- `requests.account_id` is no longer a foreign key on PostgreSQL. Its check ran as a trigger per
-- row written (a lookup of the account with a row lock): in a plain insert of 100,000 request
-- rows it took one to two thirds of PostgreSQL's time, and lease admission writes a row per
-- request. The reference still holds by construction: a held request's row is written in the
-- transaction that moves that account's credit to held (which fails for an unknown account), and
-- a leased request's row carries the account its lease was granted for (the lease references the
-- account); accounts are never deleted. SQLite keeps the constraint (its check is one index
-- lookup: no measurable cost there).
ALTER TABLE requests DROP CONSTRAINT IF EXISTS requests_account_id_fkey;
