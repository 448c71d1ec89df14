//! Credit leases: the database side of lease admission (`[billing] admission = "lease"`).
//!
//! A lease is one durable hold on a slice of an account's available balance (and of its key's
//! spend cap), owned by one gateway instance, which admits requests against it in memory. The
//! ledger sees, per lease: `hold` transactions for each grant (phase `grant:…`), `capture`
//! transactions for the batched charges of its requests (phase `capture:…`), and `release` /
//! `expire` transactions for what goes back (phase `release:…`). Leased requests' records are
//! written once, already final, by [`Store::apply_lease_finals`] (packed, see
//! [`pieces`](super::pieces)), in the same transaction as the capture that charges them, so a
//! request is charged exactly once even when the same batch is applied twice (a batch that may
//! have been written before leaves out the records already there, and only records actually
//! written are captured). On a SQLite file that transaction runs on the lease writer's thread
//! ([`lease_writer`](super::lease_writer)); here, through sqlx's `Any` pool, are PostgreSQL's
//! and an in-memory SQLite database's batches.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sqlx::Row;

use super::batch::{bind_strs, in_list};
use super::ledger::{available_of, held_of, REVENUE_FEE, REVENUE_NETWORK};
use super::usage::{usage_statements, UsageRow};
use super::{new_id, now_ms, pieces, Backend, Store, StoreError};

/// A request for (more) lease credit.
#[derive(Debug, Clone)]
pub struct LeaseGrant {
    /// Top up this open lease; `None` opens a new one.
    pub lease_id: Option<String>,
    pub account_id: String,
    pub key_id: Option<String>,
    /// The key has a spend cap: reserve against it too.
    pub key_capped: bool,
    pub owner: String,
    /// Grant up to this much…
    pub want_micros: i64,
    /// …but at least this much, or nothing.
    pub min_micros: i64,
    pub expires_at: i64,
}

/// What a grant did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOutcome {
    Granted {
        lease_id: String,
        micros: i64,
    },
    InsufficientCredits {
        available_micros: i64,
    },
    KeySpendCapReached,
    /// The lease to top up is closed (released by a sweeper after it expired): open a new one.
    LeaseClosed,
    NoAccount,
}

/// A leased request's row, final, as the lease's owner recorded it. (`Default`: empty texts and
/// zeros, for building a row from the fields that matter.)
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LeaseFinal {
    pub id: String,
    pub lease_id: String,
    pub account_id: String,
    pub key_id: Option<String>,
    pub model: String,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub price_id: Option<i64>,
    /// `settled`, `released` or `expired`.
    pub state: String,
    pub hold_micros: i64,
    pub hold_expires_at: i64,
    pub status: Option<String>,
    pub http_status: Option<i64>,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_micros: i64,
    pub computed_cost_micros: i64,
    pub input_cost_micros: i64,
    pub cached_cost_micros: i64,
    pub output_cost_micros: i64,
    pub network_cost_micros: i64,
    pub estimated: bool,
    pub delivered: bool,
    pub latency_ms: Option<i64>,
    pub created_at: i64,
    pub finished_at: i64,
}

impl LeaseFinal {
    /// The part of the charge that is network cost (the rest is the platform fee): never more
    /// than the charge, never negative.
    pub fn network_share(&self) -> i64 {
        self.network_cost_micros.min(self.cost_micros).max(0)
    }

    /// The row as [`Store::request_by_id`] would return it once written.
    pub fn into_row(self) -> super::RequestRow {
        let net = self.network_share();
        super::RequestRow {
            id: self.id,
            account_id: self.account_id,
            key_id: self.key_id,
            model: self.model,
            provider: self.provider,
            upstream_model: self.upstream_model,
            price_id: self.price_id,
            state: self.state,
            hold_micros: self.hold_micros,
            hold_expires_at: self.hold_expires_at,
            status: self.status,
            http_status: self.http_status,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.completion_tokens,
            reasoning_tokens: self.reasoning_tokens,
            cost_micros: self.cost_micros,
            computed_cost_micros: self.computed_cost_micros,
            input_cost_micros: self.input_cost_micros,
            cached_cost_micros: self.cached_cost_micros,
            output_cost_micros: self.output_cost_micros,
            network_cost_micros: net,
            platform_fee_micros: self.cost_micros - net,
            estimated: self.estimated,
            delivered: self.delivered,
            latency_ms: self.latency_ms,
            created_at: self.created_at,
            finished_at: Some(self.finished_at),
        }
    }

    /// The same request, never charged: its lease was closed before the charge reached the
    /// database (or it never finished before its owner stopped).
    pub fn expired(mut self, status: &str) -> LeaseFinal {
        self.state = "expired".to_string();
        self.status = Some(status.to_string());
        self.cost_micros = 0;
        self.network_cost_micros = 0;
        self
    }
}

/// The rows as they are written: each as recorded if its lease is open (or it costs nothing),
/// else expired at no charge (its lease was closed, and what it held given back, before the
/// charge arrived, or it is unknown).
pub(super) fn checked_against(
    finals: Vec<Arc<LeaseFinal>>,
    leases: &HashMap<String, LeaseInfo>,
) -> Vec<Arc<LeaseFinal>> {
    finals
        .into_iter()
        .map(|f| {
            if f.cost_micros == 0 || leases.get(&f.lease_id).is_some_and(|l| l.open) {
                f
            } else {
                Arc::new(Arc::unwrap_or_clone(f).expired("lease_closed"))
            }
        })
        .collect()
}

/// The leases a batch's rows belong to, from sqlx rows of [`LEASE_COLS`] (either driver), by id.
pub(super) fn leases_of<R>(rows: Vec<R>) -> Result<HashMap<String, LeaseInfo>, sqlx::Error>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    rows.iter()
        .map(|r| {
            let state: String = r.try_get(4)?;
            Ok((
                r.try_get(0)?,
                LeaseInfo {
                    account_id: r.try_get(1)?,
                    key_id: r.try_get(2)?,
                    key_reserved: r.try_get::<i64, _>(3)? != 0,
                    open: state == "open",
                },
            ))
        })
        .collect()
}

/// The columns [`leases_of`] reads, in its order.
pub(super) const LEASE_COLS: &str = "id, account_id, key_id, key_reserved, state";

/// Most records in one batch of the journal's replay (a batch that may have been written before
/// reads, per record, whether `requests` has it: one bind each, far below SQLite's 32,766).
pub const MAX_FINALS: usize = 512;

fn for_update(b: Backend) -> &'static str {
    match b {
        Backend::Postgres => " FOR UPDATE",
        Backend::Sqlite => "",
    }
}

/// The lock order of every transaction that changes a lease and its account's balance — a grant,
/// a release, a batch of finals: the accounts' rows first (in id order), then the leases', then
/// the keys'. A grant locks its account before it tops up the lease; a batch of finals that
/// locked the lease first and the account after could wait on a grant waiting on it, and
/// PostgreSQL's deadlock detector would abort one of the two (a refused request, or a batch to
/// retry). SQLite needs no row locks: its write transactions exclude each other.
/// `$1` is the batch's account ids as a JSON array (see [`accounts_of`]), as [`in_list`] reads
/// them: the statement is the same for sqlx's `Any` driver (no arrays) and its PostgreSQL driver.
pub(super) const LOCK_ACCOUNTS_PG: &str = "SELECT id FROM accounts \
     WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb)) ORDER BY id FOR UPDATE";

/// The distinct leases of a batch of finals, in order (the order PostgreSQL locks them in).
pub(super) fn lease_ids_of(finals: &[Arc<LeaseFinal>]) -> Vec<&str> {
    let mut ids: Vec<&str> = finals.iter().map(|f| f.lease_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The distinct accounts of a batch of finals, as the JSON array [`LOCK_ACCOUNTS_PG`] binds.
pub(super) fn accounts_of(finals: &[Arc<LeaseFinal>]) -> String {
    let ids: std::collections::BTreeSet<&str> =
        finals.iter().map(|f| f.account_id.as_str()).collect();
    serde_json::Value::from_iter(ids).to_string()
}

/// The statements of a batch's captures, run by every writer of lease finals through
/// [`capture_statements`] (SQLite numbers `$n` parameters in order of appearance, which here is
/// `n`'s order).
const ADD_KEY_SPENT: &str = "UPDATE api_keys SET spent_micros = spent_micros + $1 WHERE id = $2";
const ADD_LEASE_CAPTURED: &str =
    "UPDATE credit_leases SET captured_micros = captured_micros + $1 WHERE id = $2";
const TAKE_ACCOUNT_HELD: &str = "UPDATE accounts SET held_micros = held_micros - $1 WHERE id = $2";
const TAKE_KEY_RESERVED: &str =
    "UPDATE api_keys SET reserved_micros = reserved_micros - $1 WHERE id = $2";
const INSERT_LEDGER_TXN: &str = "INSERT INTO ledger_transactions (id, kind, \
     account_id, request_id, phase, amount_micros, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";
const INSERT_LEDGER_ENTRY: &str = "INSERT INTO ledger_entries (txn_id, \
     ledger_account, amount_micros, created_at) VALUES ($1, $2, $3, $4)";

/// The ledger lines of a lease's capture: `captured` out of the account's held balance (`held`,
/// see [`held_of`]) into revenue, split into network cost and platform fee. Zero lines are not
/// written.
fn capture_lines(held: &str, captured: i64, network: i64) -> [(&str, i64); 3] {
    [
        (held, -captured),
        (REVENUE_NETWORK, network),
        (REVENUE_FEE, captured - network),
    ]
}

/// What a batch's newly written rows charge: per lease (charged, network share) and per key
/// (spent). Rows charged nothing add nothing.
#[derive(Debug, Default)]
struct Charges<'a> {
    per_lease: BTreeMap<&'a str, (i64, i64)>,
    per_key: BTreeMap<&'a str, i64>,
}

impl<'a> Charges<'a> {
    fn add(&mut self, f: &'a LeaseFinal) {
        if f.cost_micros <= 0 {
            return;
        }
        let e = self.per_lease.entry(f.lease_id.as_str()).or_default();
        e.0 += f.cost_micros;
        e.1 += f.network_share();
        if let Some(k) = &f.key_id {
            *self.per_key.entry(k.as_str()).or_default() += f.cost_micros;
        }
    }
}

/// A lease as a batch of its requests' rows needs it.
#[derive(Debug, Clone)]
pub(super) struct LeaseInfo {
    pub(super) account_id: String,
    pub(super) key_id: Option<String>,
    /// The lease reserved its credit on the key's spend cap too.
    pub(super) key_reserved: bool,
    pub(super) open: bool,
}

/// One argument of a [`capture_statements`] statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Arg {
    Text(String),
    Int(i64),
}

impl Arg {
    /// The argument as the batch writer's JSON-carried arguments hold it.
    pub(super) fn into_json(self) -> serde_json::Value {
        match self {
            Arg::Text(t) => t.into(),
            Arg::Int(n) => n.into(),
        }
    }
}

/// The statements that charge a batch's newly written rows (`written`: a replay leaves out those
/// already there), in the order every writer of lease finals runs them, in the transaction that
/// inserted the rows: per key its spend; per lease its captured total, the account's held
/// balance, the key's reservation, and the capture's ledger transaction with its (non-zero)
/// lines; last, the settled rows' usage (see [`usage_statements`]). A lease missing from
/// `leases` charges nothing.
pub(super) fn capture_statements<'a>(
    written: impl IntoIterator<Item = &'a LeaseFinal>,
    leases: &HashMap<String, LeaseInfo>,
    now: i64,
) -> Vec<(&'static str, Vec<Arg>)> {
    use Arg::{Int, Text};
    let mut charges = Charges::default();
    let mut settled = Vec::new();
    for f in written {
        charges.add(f);
        settled.extend(UsageRow::of_final(f));
    }
    let mut out = Vec::new();
    for (key_id, spent) in &charges.per_key {
        out.push((ADD_KEY_SPENT, vec![Int(*spent), Text(key_id.to_string())]));
    }
    for (lease_id, (captured, network)) in &charges.per_lease {
        let Some(lease) = leases.get(*lease_id) else {
            continue;
        };
        let (captured, account) = (*captured, &lease.account_id);
        out.push((
            ADD_LEASE_CAPTURED,
            vec![Int(captured), Text(lease_id.to_string())],
        ));
        out.push((
            TAKE_ACCOUNT_HELD,
            vec![Int(captured), Text(account.clone())],
        ));
        if let (Some(k), true) = (&lease.key_id, lease.key_reserved) {
            out.push((TAKE_KEY_RESERVED, vec![Int(captured), Text(k.clone())]));
        }
        let txn_id = new_id("tx");
        out.push((
            INSERT_LEDGER_TXN,
            vec![
                Text(txn_id.clone()),
                Text("capture".to_string()),
                Text(account.clone()),
                Text(lease_id.to_string()),
                Text(format!("capture:{}", new_id("c"))),
                Int(captured),
                Int(now),
            ],
        ));
        for (acct, v) in capture_lines(&held_of(account), captured, *network) {
            if v != 0 {
                out.push((
                    INSERT_LEDGER_ENTRY,
                    vec![
                        Text(txn_id.clone()),
                        Text(acct.to_string()),
                        Int(v),
                        Int(now),
                    ],
                ));
            }
        }
    }
    out.extend(usage_statements(settled));
    out
}

/// Binds a [`capture_statements`] statement's arguments (sqlx, either driver).
pub(super) fn bind_args<'q, DB>(
    mut q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for a in args {
        q = match a {
            Arg::Text(t) => q.bind(t),
            Arg::Int(n) => q.bind(n),
        };
    }
    q
}

#[allow(clippy::too_many_arguments)]
async fn ledger_txn(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    kind: &str,
    account_id: &str,
    lease_id: &str,
    phase: &str,
    amount: i64,
    lines: &[(&str, i64)],
    now: i64,
) -> Result<(), sqlx::Error> {
    let txn_id = new_id("tx");
    sqlx::query(INSERT_LEDGER_TXN)
        .bind(&txn_id)
        .bind(kind)
        .bind(account_id)
        .bind(lease_id)
        .bind(phase)
        .bind(amount)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    for (acct, v) in lines.iter().filter(|(_, v)| *v != 0) {
        sqlx::query(INSERT_LEDGER_ENTRY)
            .bind(&txn_id)
            .bind(*acct)
            .bind(*v)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl Store {
    /// Grants lease credit: moves `min(want, available, key headroom)` from the account's
    /// available balance to held (and reserves it on a capped key), if that is at least `min`.
    pub async fn grant_lease(&self, g: &LeaseGrant) -> Result<GrantOutcome, StoreError> {
        let b = self.backend;
        let _gate = self.write_gate().await;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let acct = sqlx::query(&format!(
            "SELECT balance_micros FROM accounts WHERE id = $1{}",
            for_update(b)
        ))
        .bind(&g.account_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(acct) = acct else {
            tx.rollback().await?;
            return Ok(GrantOutcome::NoAccount);
        };
        let available: i64 = acct.try_get(0)?;
        // At most half of what is left once `min` is covered, so that other instances (and
        // capped keys, which lease on their own) of the same account still find credit.
        let mut grant = g
            .want_micros
            .min((available / 2).max(g.min_micros))
            .min(available);
        let capped = g.key_capped && g.key_id.is_some();
        if let (Some(key_id), true) = (&g.key_id, capped) {
            let k = sqlx::query(&format!(
                "SELECT spend_cap_micros, spent_micros, reserved_micros FROM api_keys WHERE id = $1{}",
                for_update(b)
            ))
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(k) = k {
                let cap: Option<i64> = k.try_get(0)?;
                if let Some(cap) = cap {
                    let used: i64 = k.try_get::<i64, _>(1)? + k.try_get::<i64, _>(2)?;
                    let headroom = (cap - used).max(0);
                    if headroom < g.min_micros {
                        tx.rollback().await?;
                        return Ok(GrantOutcome::KeySpendCapReached);
                    }
                    grant = grant.min(headroom);
                }
            }
        }
        if grant < g.min_micros || grant <= 0 {
            tx.rollback().await?;
            return Ok(GrantOutcome::InsufficientCredits {
                available_micros: available,
            });
        }
        let lease_id = match &g.lease_id {
            Some(id) => {
                let r = sqlx::query(
                    "UPDATE credit_leases SET granted_micros = granted_micros + $1, \
                     grants = grants + 1, expires_at = $2 WHERE id = $3 AND state = 'open'",
                )
                .bind(grant)
                .bind(g.expires_at)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if r.rows_affected() != 1 {
                    tx.rollback().await?;
                    return Ok(GrantOutcome::LeaseClosed);
                }
                id.clone()
            }
            None => {
                let id = new_id("lease");
                sqlx::query(
                    "INSERT INTO credit_leases (id, account_id, key_id, key_reserved, owner, state, \
                     granted_micros, grants, expires_at, created_at) \
                     VALUES ($1, $2, $3, $4, $5, 'open', $6, 1, $7, $8)",
                )
                .bind(&id)
                .bind(&g.account_id)
                .bind(g.key_id.as_deref())
                .bind(i64::from(capped))
                .bind(&g.owner)
                .bind(grant)
                .bind(g.expires_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                id
            }
        };
        sqlx::query(
            "UPDATE accounts SET balance_micros = balance_micros - $1, held_micros = held_micros + $1 \
             WHERE id = $2",
        )
        .bind(grant)
        .bind(&g.account_id)
        .execute(&mut *tx)
        .await?;
        if let (Some(key_id), true) = (&g.key_id, capped) {
            sqlx::query("UPDATE api_keys SET reserved_micros = reserved_micros + $1 WHERE id = $2")
                .bind(grant)
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
        }
        let phase = format!("grant:{}", new_id("g"));
        ledger_txn(
            &mut tx,
            "hold",
            &g.account_id,
            &lease_id,
            &phase,
            grant,
            &[
                (&available_of(&g.account_id), -grant),
                (&held_of(&g.account_id), grant),
            ],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(GrantOutcome::Granted {
            lease_id,
            micros: grant,
        })
    }

    /// Extends the expiry of open leases; returns the ids that were still open.
    pub async fn renew_leases(
        &self,
        ids: &[String],
        expires_at: i64,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let _gate = self.write_gate().await;
        let list = in_list(self.backend, ids.len());
        let ids = ids.iter().map(String::as_str);
        // PostgreSQL: `$1` is the JSON list of ids, `$2` the expiry; SQLite: the expiry, then ids.
        let sql = match self.backend {
            // The rows locked in id order, as a batch of finals locks them (`LOCK_ACCOUNTS_PG`).
            Backend::Postgres => format!(
                "UPDATE credit_leases SET expires_at = $2 WHERE id IN (SELECT id FROM credit_leases \
                 WHERE state = 'open' AND id IN ({list}) ORDER BY id FOR UPDATE) RETURNING id"
            ),
            Backend::Sqlite => format!(
                "UPDATE credit_leases SET expires_at = ? WHERE state = 'open' AND id IN ({list}) RETURNING id"
            ),
        };
        let q = match self.backend {
            Backend::Postgres => bind_strs(sqlx::query(&sql), self.backend, ids).bind(expires_at),
            Backend::Sqlite => bind_strs(sqlx::query(&sql).bind(expires_at), self.backend, ids),
        };
        q.fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Gives back `amount` (all that is outstanding if `None`) of a lease to the account's
    /// available balance, and closes the lease if `close`. `kind` is `release` (by its owner) or
    /// `expire` (by a sweeper, after the owner stopped renewing it). Returns the amount released,
    /// `None` if the lease is unknown or already closed (or, with `only_if_expired_before`, not
    /// expired by then).
    pub async fn release_lease(
        &self,
        lease_id: &str,
        amount: Option<i64>,
        close: bool,
        kind: &str,
        only_if_expired_before: Option<i64>,
    ) -> Result<Option<i64>, StoreError> {
        let b = self.backend;
        let _gate = self.write_gate().await;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        if b == Backend::Postgres {
            // The account first (see `LOCK_ACCOUNTS_PG`): a lease's account never changes.
            sqlx::query(
                "SELECT a.id FROM accounts a JOIN credit_leases l ON l.account_id = a.id \
                 WHERE l.id = $1 FOR UPDATE OF a",
            )
            .bind(lease_id)
            .fetch_optional(&mut *tx)
            .await?;
        }
        let row = sqlx::query(&format!(
            "SELECT account_id, key_id, key_reserved, granted_micros, captured_micros, \
             released_micros, expires_at FROM credit_leases WHERE id = $1 AND state = 'open'{}",
            for_update(b)
        ))
        .bind(lease_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let account_id: String = row.try_get(0)?;
        let key_id: Option<String> = row.try_get(1)?;
        let key_reserved: i64 = row.try_get(2)?;
        let outstanding: i64 =
            row.try_get::<i64, _>(3)? - row.try_get::<i64, _>(4)? - row.try_get::<i64, _>(5)?;
        let expires_at: i64 = row.try_get(6)?;
        if only_if_expired_before.is_some_and(|t| expires_at > t) {
            tx.rollback().await?;
            return Ok(None);
        }
        let amt = amount.map_or(outstanding, |a| a.min(outstanding)).max(0);
        sqlx::query(
            "UPDATE credit_leases SET released_micros = released_micros + $1, \
             state = CASE WHEN $2 = 1 THEN 'closed' ELSE state END, \
             closed_at = CASE WHEN $2 = 1 THEN $3 ELSE closed_at END WHERE id = $4",
        )
        .bind(amt)
        .bind(i64::from(close))
        .bind(now)
        .bind(lease_id)
        .execute(&mut *tx)
        .await?;
        if amt > 0 {
            sqlx::query(
                "UPDATE accounts SET held_micros = held_micros - $1, \
                 balance_micros = balance_micros + $1 WHERE id = $2",
            )
            .bind(amt)
            .bind(&account_id)
            .execute(&mut *tx)
            .await?;
            if let (Some(k), true) = (&key_id, key_reserved != 0) {
                sqlx::query(
                    "UPDATE api_keys SET reserved_micros = reserved_micros - $1 WHERE id = $2",
                )
                .bind(amt)
                .bind(k)
                .execute(&mut *tx)
                .await?;
            }
            let phase = format!("release:{}", new_id("r"));
            ledger_txn(
                &mut tx,
                kind,
                &account_id,
                lease_id,
                &phase,
                amt,
                &[
                    (&held_of(&account_id), -amt),
                    (&available_of(&account_id), amt),
                ],
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(amt))
    }

    /// Ids of open leases past their expiry (their owner stopped renewing them).
    pub async fn expired_leases(&self, now: i64, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM credit_leases WHERE state = 'open' AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Ids of the open leases an owner holds (a restarted instance closes its predecessor's).
    pub async fn open_leases_of(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id FROM credit_leases WHERE state = 'open' AND owner = $1")
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Writes final records of leased requests (packed, see [`pieces`](super::pieces)) and
    /// captures their charges from their leases, in one transaction; records of a lease that is
    /// closed are written `expired` and charge nothing. Returns the number of records written.
    ///
    /// `maybe_written`: the batch may have been written before (a retry after an unknown
    /// outcome, the journal's replay after a crash): the records already in the database are
    /// left out, and only the others are written and charged. Without it every record is taken
    /// as new, unchecked — a request is charged exactly once only if its record is handed over
    /// once without the flag and every later time with it.
    ///
    /// On a SQLite file the batch is handed to the lease writer's thread (one hand-off, under the
    /// write gate); PostgreSQL's and an in-memory SQLite database's go through the `Any` pool.
    /// (Until the records were packed, PostgreSQL's rows were sent with a binary `COPY` on a pool
    /// of sqlx's PostgreSQL driver: ~3.4 µs of the database's CPU per row; see BENCHMARKS.md.)
    pub async fn apply_lease_finals(
        &self,
        finals: Vec<Arc<LeaseFinal>>,
        maybe_written: bool,
    ) -> Result<u64, StoreError> {
        if finals.is_empty() {
            return Ok(0);
        }
        if let Some(w) = &self.lease_writer {
            let _gate = self.write_gate().await;
            return w.apply(finals, maybe_written).await;
        }
        self.apply_lease_finals_sqlx(finals, maybe_written).await
    }

    /// [`Self::apply_lease_finals`] through sqlx's `Any` pool, in one transaction.
    async fn apply_lease_finals_sqlx(
        &self,
        finals: Vec<Arc<LeaseFinal>>,
        maybe_written: bool,
    ) -> Result<u64, StoreError> {
        let b = self.backend;
        let _gate = self.write_gate().await;
        let now = now_ms();
        let mut tx = self.begin_write().await?;

        if b == Backend::Postgres {
            // The accounts first (see `LOCK_ACCOUNTS_PG`).
            sqlx::query(LOCK_ACCOUNTS_PG)
                .bind(accounts_of(&finals))
                .fetch_all(&mut *tx)
                .await?;
        }
        // The leases involved, locked (PostgreSQL) so a sweeper cannot close one meanwhile.
        let lease_ids = lease_ids_of(&finals);
        let sql = format!(
            "SELECT {LEASE_COLS} FROM credit_leases WHERE id IN ({}) ORDER BY id{}",
            in_list(b, lease_ids.len()),
            for_update(b)
        );
        let leases = leases_of(
            bind_strs(sqlx::query(&sql), b, lease_ids.iter().copied())
                .fetch_all(&mut *tx)
                .await?,
        )?;
        let mut finals = checked_against(finals, &leases);

        if maybe_written {
            let mut pieces = Vec::new();
            for bucket in pieces::buckets_of(&finals) {
                for r in sqlx::query(pieces::PIECES_OF_BUCKET)
                    .bind(bucket)
                    .fetch_all(&mut *tx)
                    .await?
                {
                    pieces.push(r.try_get::<Vec<u8>, _>(0)?);
                }
            }
            let sql = format!(
                "SELECT id FROM requests WHERE id IN ({})",
                in_list(b, finals.len())
            );
            let rows = bind_strs(sqlx::query(&sql), b, finals.iter().map(|f| f.id.as_str()))
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<Vec<_>, _>>()?;
            let present = pieces::present_in(&finals, &pieces, rows)?;
            finals.retain(|f| !present.contains(&f.id));
        }

        for p in pieces::pack(&finals)? {
            sqlx::query(pieces::INSERT_PIECE)
                .bind(p.bucket)
                .bind(p.rows)
                .bind(p.data)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        for (sql, args) in capture_statements(finals.iter().map(|f| &**f), &leases, now) {
            bind_args(sqlx::query(sql), args).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(finals.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn final_row(
        id: &str,
        lease: &str,
        account: &str,
        key: Option<&str>,
        cost: i64,
    ) -> Arc<LeaseFinal> {
        let now = now_ms();
        Arc::new(LeaseFinal {
            id: id.to_string(),
            lease_id: lease.to_string(),
            account_id: account.to_string(),
            key_id: key.map(str::to_string),
            model: "m".to_string(),
            provider: Some("p".to_string()),
            upstream_model: None,
            price_id: None,
            state: "settled".to_string(),
            hold_micros: 10_000,
            hold_expires_at: now + 60_000,
            status: Some("ok".to_string()),
            http_status: Some(200),
            prompt_tokens: 3,
            cached_tokens: 1,
            completion_tokens: 2,
            reasoning_tokens: 0,
            cost_micros: cost,
            computed_cost_micros: cost,
            input_cost_micros: 0,
            cached_cost_micros: 0,
            output_cost_micros: cost,
            network_cost_micros: cost * 3 / 5,
            estimated: false,
            delivered: true,
            latency_ms: Some(5),
            created_at: now,
            finished_at: now,
        })
    }

    async fn one_i64(store: &Store, sql: &str, arg: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(arg)
            .fetch_one(store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// An in-memory SQLite database has no file for a second connection: its batches stay on
    /// the sqlx path.
    #[tokio::test]
    async fn in_memory_sqlite_has_no_lease_writer() {
        let store = Store::connect("sqlite::memory:")
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        assert!(store.lease_writer.is_none());
        store.close().await;
    }

    /// On a SQLite file, batches go through the lease writer's thread: the same batch applied
    /// twice (the second time as a replay) is written and captured once, a batch partly written before (here through the sqlx
    /// path) is completed without charging twice, and rows of a closed lease are written expired
    /// at no charge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_writer_applies_a_batch_once() {
        let (_dir, store, acct) = crate::store::test_support::funded_file_store().await;
        let writer = store
            .lease_writer
            .clone()
            .unwrap_or_else(|| panic!("a SQLite file has a lease writer"));
        assert!(!writer.started(), "started on first use only");
        let key = match store
            .insert_key(&acct.id, "tg_lw", "digest", false, None, Some(800_000))
            .await
        {
            Ok(Some(k)) => k,
            other => panic!("key: {other:?}"),
        };
        let grant = |key_id: Option<String>, micros: i64| LeaseGrant {
            lease_id: None,
            account_id: acct.id.clone(),
            key_capped: key_id.is_some(),
            key_id,
            owner: "test".to_string(),
            want_micros: micros,
            min_micros: micros,
            expires_at: now_ms() + 60_000,
        };
        let lease_of = |g: Result<GrantOutcome, StoreError>| match g {
            Ok(GrantOutcome::Granted { lease_id, .. }) => lease_id,
            other => panic!("grant: {other:?}"),
        };
        let open = lease_of(
            store
                .grant_lease(&grant(Some(key.id.clone()), 400_000))
                .await,
        );
        let closed = lease_of(store.grant_lease(&grant(None, 100_000)).await);
        let released = store
            .release_lease(&closed, None, true, "release", None)
            .await
            .unwrap_or_else(|e| panic!("release: {e}"));
        assert_eq!(released, Some(100_000));

        let mut batch: Vec<Arc<LeaseFinal>> = (0..20)
            .map(|i| final_row(&format!("a{i}"), &open, &acct.id, Some(&key.id), 1_000))
            .collect();
        batch.push(final_row("a-free", &open, &acct.id, Some(&key.id), 0));
        batch.push(final_row("b0", &closed, &acct.id, None, 500));
        batch.push(final_row("b1", &closed, &acct.id, None, 500));
        let apply = |rows: Vec<Arc<LeaseFinal>>, maybe_written: bool| {
            let store = store.clone();
            async move {
                store
                    .apply_lease_finals(rows, maybe_written)
                    .await
                    .unwrap_or_else(|e| panic!("apply: {e}"))
            }
        };
        assert_eq!(apply(batch.clone(), false).await, 23);
        assert!(writer.started(), "written by the lease writer");
        assert_eq!(
            apply(batch.clone(), true).await,
            0,
            "a replay writes nothing"
        );

        let captures = "SELECT COUNT(*) FROM ledger_transactions \
                        WHERE kind = 'capture' AND request_id = $1";
        let captured = "SELECT captured_micros FROM credit_leases WHERE id = $1";
        let entries = "SELECT COALESCE(SUM(e.amount_micros), 0) FROM ledger_entries e \
                       JOIN ledger_transactions t ON t.id = e.txn_id \
                       WHERE t.kind = 'capture' AND e.ledger_account = $1";
        assert_eq!(one_i64(&store, captures, &open).await, 1, "captured once");
        assert_eq!(one_i64(&store, captures, &closed).await, 0);
        assert_eq!(one_i64(&store, captured, &open).await, 20_000);
        assert_eq!(one_i64(&store, captured, &closed).await, 0);
        assert_eq!(one_i64(&store, entries, &held_of(&acct.id)).await, -20_000);
        assert_eq!(one_i64(&store, entries, REVENUE_NETWORK).await, 12_000);
        assert_eq!(one_i64(&store, entries, REVENUE_FEE).await, 8_000);
        // The account's columns as stored (an `AccountRow` counts open leases as available).
        let balance = "SELECT balance_micros FROM accounts WHERE id = $1";
        let held = "SELECT held_micros FROM accounts WHERE id = $1";
        assert_eq!(one_i64(&store, balance, &acct.id).await, 600_000);
        assert_eq!(one_i64(&store, held, &acct.id).await, 380_000);
        let spent = "SELECT spent_micros FROM api_keys WHERE id = $1";
        let reserved = "SELECT reserved_micros FROM api_keys WHERE id = $1";
        assert_eq!(one_i64(&store, spent, &key.id).await, 20_000);
        assert_eq!(one_i64(&store, reserved, &key.id).await, 380_000);
        let b0 = store
            .request_by_id("b0")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("b0 not written"));
        assert_eq!(
            (b0.state.as_str(), b0.status.as_deref(), b0.cost_micros),
            ("expired", Some("lease_closed"), 0)
        );
        let a0 = store
            .request_by_id("a0")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("a0 not written"));
        assert_eq!(
            serde_json::to_value(&a0).ok(),
            serde_json::to_value(LeaseFinal::clone(&batch[0]).into_row()).ok(),
            "every column as recorded"
        );

        // Half a batch written (through sqlx), then all of it (through the writer).
        let more: Vec<Arc<LeaseFinal>> = (0..4)
            .map(|i| final_row(&format!("c{i}"), &open, &acct.id, Some(&key.id), 1_000))
            .collect();
        let half = store
            .apply_lease_finals_sqlx(more[..2].to_vec(), false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(half, 2);
        assert_eq!(apply(more, true).await, 2);
        assert_eq!(one_i64(&store, captures, &open).await, 3);
        assert_eq!(one_i64(&store, captured, &open).await, 24_000);

        let rep = store
            .check_ledger(None)
            .await
            .unwrap_or_else(|e| panic!("check: {e}"));
        assert!(rep.is_ok(), "ledger problems: {:#?}", rep.problems);
        store.close().await;
        assert!(
            store.apply_lease_finals(batch, true).await.is_err(),
            "a closed store writes nothing"
        );
    }
}
