//! The append-only double-entry ledger: holds, final settlement (capture/release/expire), top-ups.
//!
//! Ledger accounts (strings in `ledger_entries.ledger_account`):
//! `customer:{id}:available`, `customer:{id}:held`, `platform:revenue:network`,
//! `platform:revenue:fee`, `external:funding`. Every transaction's entries sum to zero, and the
//! `accounts.balance_micros` / `held_micros` columns are projections of the customer entries
//! (checked by [`Store::check_ledger`](super::Store::check_ledger)).
//!
//! Exactly-once: `requests.id` is the request id (primary key) and `ledger_transactions` has a
//! unique index on `(request_id, phase)`, so a request can be held once and finalised once even if
//! two settlements race or a recovery job runs twice.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::accounts::is_unique_violation;
use super::leases::bind_args;
use super::usage::{usage_statements, UsageRow};
use super::{new_id, now_ms, Store, StoreError};

pub const FUNDING: &str = "external:funding";
pub const REVENUE_NETWORK: &str = "platform:revenue:network";
pub const REVENUE_FEE: &str = "platform:revenue:fee";

pub fn available_of(account_id: &str) -> String {
    format!("customer:{account_id}:available")
}
pub fn held_of(account_id: &str) -> String {
    format!("customer:{account_id}:held")
}

/// A hold to place before the upstream call.
#[derive(Debug, Clone)]
pub struct HoldInsert {
    pub request_id: String,
    pub account_id: String,
    pub key_id: Option<String>,
    /// The key has a spend cap: reserve against it too.
    pub key_capped: bool,
    pub model: String,
    pub provider: Option<String>,
    pub price_id: Option<i64>,
    pub hold_micros: i64,
    pub expires_at: i64,
}

/// Result of trying to place a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    Held,
    InsufficientCredits { available_micros: i64 },
    KeySpendCapReached,
    DuplicateRequest,
}

/// The single final state of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalState {
    Settled,
    Released,
    Expired,
}

impl FinalState {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalState::Settled => "settled",
            FinalState::Released => "released",
            FinalState::Expired => "expired",
        }
    }
    pub(crate) fn kind(self) -> &'static str {
        match self {
            FinalState::Settled => "capture",
            FinalState::Released => "release",
            FinalState::Expired => "expire",
        }
    }
}

/// Everything written when a request is finalised.
#[derive(Debug, Clone, Default)]
pub struct SettleWrite {
    pub captured_micros: i64,
    pub computed_cost_micros: i64,
    pub input_cost_micros: i64,
    pub cached_cost_micros: i64,
    pub output_cost_micros: i64,
    /// Captured amount booked as network cost; the rest of `captured_micros` is platform fee.
    pub network_cost_micros: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub estimated: bool,
    pub delivered: bool,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub status: Option<String>,
    pub http_status: Option<i64>,
    pub latency_ms: Option<i64>,
}

/// A request record as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestRow {
    pub id: String,
    pub account_id: String,
    pub key_id: Option<String>,
    pub model: String,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub price_id: Option<i64>,
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
    pub platform_fee_micros: i64,
    pub estimated: bool,
    pub delivered: bool,
    pub latency_ms: Option<i64>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

pub(crate) const REQUEST_COLS: &str = "id, account_id, key_id, model, provider, upstream_model, price_id, state, \
     hold_micros, hold_expires_at, status, http_status, prompt_tokens, cached_tokens, completion_tokens, \
     reasoning_tokens, cost_micros, computed_cost_micros, input_cost_micros, cached_cost_micros, \
     output_cost_micros, network_cost_micros, platform_fee_micros, estimated, delivered, latency_ms, \
     created_at, finished_at";

pub(crate) fn request_from(row: &AnyRow) -> Result<RequestRow, sqlx::Error> {
    Ok(RequestRow {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        key_id: row.try_get("key_id")?,
        model: row.try_get("model")?,
        provider: row.try_get("provider")?,
        upstream_model: row.try_get("upstream_model")?,
        price_id: row.try_get("price_id")?,
        state: row.try_get("state")?,
        hold_micros: row.try_get("hold_micros")?,
        hold_expires_at: row.try_get("hold_expires_at")?,
        status: row.try_get("status")?,
        http_status: row.try_get("http_status")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        cached_tokens: row.try_get("cached_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        reasoning_tokens: row.try_get("reasoning_tokens")?,
        cost_micros: row.try_get("cost_micros")?,
        computed_cost_micros: row.try_get("computed_cost_micros")?,
        input_cost_micros: row.try_get("input_cost_micros")?,
        cached_cost_micros: row.try_get("cached_cost_micros")?,
        output_cost_micros: row.try_get("output_cost_micros")?,
        network_cost_micros: row.try_get("network_cost_micros")?,
        platform_fee_micros: row.try_get("platform_fee_micros")?,
        estimated: row.try_get::<i64, _>("estimated")? != 0,
        delivered: row.try_get::<i64, _>("delivered")? != 0,
        latency_ms: row.try_get("latency_ms")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// Result of a credit top-up or adjustment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopUpOutcome {
    Applied {
        txn_id: String,
        balance_micros: i64,
    },
    /// Same idempotency key and same parameters: the first result, not applied again.
    Replayed {
        txn_id: String,
        balance_micros: i64,
    },
    /// Same idempotency key, different parameters.
    Conflict,
    /// A negative adjustment larger than the available balance.
    InsufficientBalance {
        available_micros: i64,
    },
    NoAccount,
}

async fn insert_entries(
    tx: &mut Transaction<'static, Any>,
    txn_id: &str,
    now: i64,
    lines: &[(&str, i64)],
) -> Result<(), sqlx::Error> {
    let lines: Vec<&(&str, i64)> = lines.iter().filter(|(_, a)| *a != 0).collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut sql = String::from(
        "INSERT INTO ledger_entries (txn_id, ledger_account, amount_micros, created_at) VALUES ",
    );
    for i in 0..lines.len() {
        if i > 0 {
            sql.push_str(", ");
        }
        let b = i * 3;
        sql.push_str(&format!("($1, ${}, ${}, ${})", b + 2, b + 3, b + 4));
    }
    let mut q = sqlx::query(&sql).bind(txn_id);
    for (acct, amount) in lines {
        q = q.bind(*acct).bind(*amount).bind(now);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn insert_txn(
    tx: &mut Transaction<'static, Any>,
    txn_id: &str,
    kind: &str,
    account_id: &str,
    request_id: Option<&str>,
    phase: Option<&str>,
    idempotency_key: Option<&str>,
    amount: i64,
    reason: Option<&str>,
    now: i64,
) -> Result<u64, sqlx::Error> {
    let res = sqlx::query(
        "INSERT INTO ledger_transactions (id, kind, account_id, request_id, phase, idempotency_key, \
         amount_micros, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT DO NOTHING",
    )
    .bind(txn_id)
    .bind(kind)
    .bind(account_id)
    .bind(request_id)
    .bind(phase)
    .bind(idempotency_key)
    .bind(amount)
    .bind(reason)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(res.rows_affected())
}

impl Store {
    /// Atomically reserves `hold_micros` of the account's available balance (and of the key's
    /// spend cap), records the request as `held`, and books the hold in the ledger. Returns after
    /// the hold is committed. Concurrent holds and settlements share one transaction (group
    /// commit, see [`batch`](super::batch)); the outcome is the same as [`Self::place_hold_direct`].
    pub async fn place_hold(&self, h: &HoldInsert) -> Result<HoldOutcome, StoreError> {
        if let Some(b) = &self.batcher {
            if let Some(r) = b.hold(h).await {
                return r;
            }
        }
        self.place_hold_direct(h).await
    }

    /// [`Self::place_hold`] in a transaction of its own.
    pub async fn place_hold_direct(&self, h: &HoldInsert) -> Result<HoldOutcome, StoreError> {
        let _gate = self.write_gate().await;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        // The conditional UPDATE is the admission decision: one atomic statement, so concurrent
        // holds can never overdraw the balance (no read-then-write window).
        let res = sqlx::query(
            "UPDATE accounts SET balance_micros = balance_micros - $1, held_micros = held_micros + $1 \
             WHERE id = $2 AND balance_micros >= $1",
        )
        .bind(h.hold_micros)
        .bind(&h.account_id)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() != 1 {
            tx.rollback().await?;
            let available = self
                .account_by_id(&h.account_id)
                .await?
                .map(|a| a.balance_micros)
                .unwrap_or(0);
            return Ok(HoldOutcome::InsufficientCredits {
                available_micros: available,
            });
        }
        if let (Some(key_id), true) = (&h.key_id, h.key_capped) {
            let res = sqlx::query(
                "UPDATE api_keys SET reserved_micros = reserved_micros + $1 WHERE id = $2 AND \
                 (spend_cap_micros IS NULL OR spent_micros + reserved_micros + $1 <= spend_cap_micros)",
            )
            .bind(h.hold_micros)
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(HoldOutcome::KeySpendCapReached);
            }
        }
        let res = sqlx::query(
            "INSERT INTO requests (id, account_id, key_id, key_reserved, model, provider, price_id, state, \
             hold_micros, hold_expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'held', $8, $9, $10)",
        )
        .bind(&h.request_id)
        .bind(&h.account_id)
        .bind(h.key_id.as_deref())
        .bind(i64::from(h.key_capped && h.key_id.is_some()))
        .bind(&h.model)
        .bind(h.provider.as_deref())
        .bind(h.price_id)
        .bind(h.hold_micros)
        .bind(h.expires_at)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                tx.rollback().await?;
                return Ok(HoldOutcome::DuplicateRequest);
            }
            Err(e) => return Err(e.into()),
        }
        let txn_id = new_id("tx");
        let n = insert_txn(
            &mut tx,
            &txn_id,
            "hold",
            &h.account_id,
            Some(&h.request_id),
            Some("hold"),
            None,
            h.hold_micros,
            None,
            now,
        )
        .await?;
        if n != 1 {
            tx.rollback().await?;
            return Ok(HoldOutcome::DuplicateRequest);
        }
        insert_entries(
            &mut tx,
            &txn_id,
            now,
            &[
                (&available_of(&h.account_id), -h.hold_micros),
                (&held_of(&h.account_id), h.hold_micros),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(HoldOutcome::Held)
    }

    /// Finalises a held request exactly once: captures `captured_micros` (≤ the hold) and returns
    /// the rest to the available balance. Returns `Ok(None)` when the request is already final (or
    /// unknown), in which case nothing is written. Settlements of concurrent requests share one
    /// transaction (group commit); the sweeper's conditional expiry runs alone.
    pub async fn finalize(
        &self,
        request_id: &str,
        state: FinalState,
        w: &SettleWrite,
        only_if_expired_before: Option<i64>,
    ) -> Result<Option<RequestRow>, StoreError> {
        if let (Some(b), None) = (&self.batcher, only_if_expired_before) {
            let op = super::batch::FinalizeOp {
                request_id: request_id.to_string(),
                state,
                w: w.clone(),
            };
            if let Some(r) = b.finalize(op).await {
                return r;
            }
        }
        self.finalize_direct(request_id, state, w, only_if_expired_before)
            .await
    }

    /// [`Self::finalize`] in a transaction of its own.
    pub async fn finalize_direct(
        &self,
        request_id: &str,
        state: FinalState,
        w: &SettleWrite,
        only_if_expired_before: Option<i64>,
    ) -> Result<Option<RequestRow>, StoreError> {
        if state != FinalState::Settled && w.captured_micros != 0 {
            return Err(StoreError::Invariant(
                "release/expire must capture 0".to_string(),
            ));
        }
        if w.captured_micros < 0 || w.network_cost_micros < 0 {
            return Err(StoreError::Invariant("negative capture".to_string()));
        }
        let _gate = self.write_gate().await;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let fee = w.captured_micros - w.network_cost_micros.min(w.captured_micros);
        let network = w.captured_micros - fee;
        let sql = format!(
            "UPDATE requests SET state = $2, cost_micros = $3, computed_cost_micros = $4, \
             input_cost_micros = $5, cached_cost_micros = $6, output_cost_micros = $7, \
             network_cost_micros = $8, platform_fee_micros = $9, prompt_tokens = $10, cached_tokens = $11, \
             completion_tokens = $12, reasoning_tokens = $13, estimated = $14, delivered = $15, \
             provider = COALESCE($16, provider), upstream_model = $17, status = $18, http_status = $19, \
             latency_ms = $20, finished_at = $21 \
             WHERE id = $1 AND state = 'held' AND hold_micros >= $3 {} \
             RETURNING {REQUEST_COLS}, key_reserved",
            if only_if_expired_before.is_some() {
                "AND hold_expires_at <= $22"
            } else {
                ""
            }
        );
        let mut q = sqlx::query(&sql)
            .bind(request_id)
            .bind(state.as_str())
            .bind(w.captured_micros)
            .bind(w.computed_cost_micros)
            .bind(w.input_cost_micros)
            .bind(w.cached_cost_micros)
            .bind(w.output_cost_micros)
            .bind(network)
            .bind(fee)
            .bind(w.prompt_tokens)
            .bind(w.cached_tokens)
            .bind(w.completion_tokens)
            .bind(w.reasoning_tokens)
            .bind(i64::from(w.estimated))
            .bind(i64::from(w.delivered))
            .bind(w.provider.as_deref())
            .bind(w.upstream_model.as_deref())
            .bind(w.status.as_deref())
            .bind(w.http_status)
            .bind(w.latency_ms)
            .bind(now);
        if let Some(t) = only_if_expired_before {
            q = q.bind(t);
        }
        let row = q.fetch_optional(&mut *tx).await?;
        let Some(row) = row else {
            tx.rollback().await?;
            drop(_gate);
            if let Some(r) = self.request_by_id(request_id).await? {
                if r.state == "held" && r.hold_micros < w.captured_micros {
                    return Err(StoreError::Invariant(format!(
                        "capture {} exceeds hold {} for request {request_id}",
                        w.captured_micros, r.hold_micros
                    )));
                }
            }
            return Ok(None);
        };
        let rec = request_from(&row)?;
        let key_reserved: i64 = row.try_get("key_reserved")?;
        let hold = rec.hold_micros;
        sqlx::query(
            "UPDATE accounts SET held_micros = held_micros - $1, balance_micros = balance_micros + $2 \
             WHERE id = $3",
        )
        .bind(hold)
        .bind(hold - w.captured_micros)
        .bind(&rec.account_id)
        .execute(&mut *tx)
        .await?;
        if let Some(key_id) = &rec.key_id {
            sqlx::query(
                "UPDATE api_keys SET spent_micros = spent_micros + $1, \
                 reserved_micros = reserved_micros - $2 WHERE id = $3",
            )
            .bind(w.captured_micros)
            .bind(if key_reserved != 0 { hold } else { 0 })
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        }
        let txn_id = new_id("tx");
        let n = insert_txn(
            &mut tx,
            &txn_id,
            state.kind(),
            &rec.account_id,
            Some(request_id),
            Some("final"),
            None,
            w.captured_micros,
            None,
            now,
        )
        .await?;
        if n != 1 {
            // The unique (request_id, phase) index says it is already final.
            tx.rollback().await?;
            return Ok(None);
        }
        insert_entries(
            &mut tx,
            &txn_id,
            now,
            &[
                (&held_of(&rec.account_id), -hold),
                (&available_of(&rec.account_id), hold - w.captured_micros),
                (REVENUE_NETWORK, network),
                (REVENUE_FEE, fee),
            ],
        )
        .await?;
        for (sql, args) in usage_statements(UsageRow::of_row(&rec)) {
            bind_args(sqlx::query(sql), args).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Some(rec))
    }

    /// Fetches one request record: a `requests` row (hold admission), else a leased request's
    /// record from the pieces of its id's bucket (see [`pieces`](super::pieces)).
    pub async fn request_by_id(&self, id: &str) -> Result<Option<RequestRow>, StoreError> {
        let sql = format!("SELECT {REQUEST_COLS} FROM requests WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return Ok(Some(request_from(&row)?));
        }
        let pieces = sqlx::query(super::pieces::PIECES_OF_BUCKET)
            .bind(super::pieces::bucket_of(id))
            .fetch_all(&self.pool)
            .await?;
        for p in pieces {
            let data: Vec<u8> = p.try_get(0)?;
            if let Some(f) = super::pieces::decode(&data)?
                .into_iter()
                .find(|f| f.id == id)
            {
                return Ok(Some(f.into_row()));
            }
        }
        Ok(None)
    }

    /// How long before its record's creation a listed request's id may have been given (the
    /// request's body read meanwhile): the pieces searched for a time range start this much
    /// earlier.
    const MAX_ADMISSION_LAG_SECS: i64 = 3600;

    /// Request records (rows and leased requests' packed records) of `account_id` (or every
    /// account) created in `[from_ms, to_ms)`, oldest first, at most `limit`.
    pub async fn requests_between(
        &self,
        account_id: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<RequestRow>, StoreError> {
        // The oldest `limit` rows (of the account) suffice: the result is the oldest `limit` of
        // the rows and the packed records together.
        let sql = format!(
            "SELECT {REQUEST_COLS} FROM requests WHERE created_at >= $1 AND created_at < $2{} \
             ORDER BY created_at, id LIMIT {}",
            if account_id.is_some() {
                " AND account_id = $3"
            } else {
                ""
            },
            i64::try_from(limit).unwrap_or(i64::MAX)
        );
        let mut q = sqlx::query(&sql).bind(from_ms).bind(to_ms);
        if let Some(a) = account_id {
            q = q.bind(a.to_string());
        }
        let mut out = q
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(request_from)
            .collect::<Result<Vec<_>, _>>()?;
        // A packed record is in the bucket of its id's second, which is at or before its
        // creation (the id is given on arrival, the record created at admission, after the
        // request's body is read); ids of another form are in the negative buckets.
        for r in sqlx::query(
            "SELECT data FROM request_pieces WHERE (bucket >= $1 AND bucket < $2) OR bucket < 0",
        )
        .bind(from_ms.div_euclid(1000) - Self::MAX_ADMISSION_LAG_SECS)
        .bind(to_ms.div_euclid(1000) + 1)
        .fetch_all(&self.pool)
        .await?
        {
            let data: Vec<u8> = r.try_get(0)?;
            out.extend(
                super::pieces::decode(&data)?
                    .into_iter()
                    .filter(|f| {
                        account_id.is_none_or(|a| a == f.account_id)
                            && (from_ms..to_ms).contains(&f.created_at)
                    })
                    .map(super::leases::LeaseFinal::into_row),
            );
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out.truncate(limit);
        Ok(out)
    }

    /// Ids of holds whose expiry has passed (oldest first).
    pub async fn expired_holds(&self, now: i64, limit: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM requests WHERE state = 'held' AND hold_expires_at <= $1 \
             ORDER BY hold_expires_at LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Adds (amount > 0, kind `topup`) or removes (amount < 0, kind `adjustment`) credit.
    /// With an idempotency key, a repeat with the same parameters returns the first result.
    pub async fn apply_credit(
        &self,
        account_id: &str,
        amount_micros: i64,
        kind: &str,
        reason: &str,
        idempotency_key: Option<&str>,
    ) -> Result<TopUpOutcome, StoreError> {
        let _gate = self.write_gate().await;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "UPDATE accounts SET balance_micros = balance_micros + $1 \
             WHERE id = $2 AND balance_micros + $1 >= 0",
        )
        .bind(amount_micros)
        .bind(account_id)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() != 1 {
            tx.rollback().await?;
            drop(_gate);
            // Either no such account, or an adjustment below zero — unless it is a replay.
            if let Some(k) = idempotency_key {
                if let Some(o) = self
                    .replay_credit(account_id, amount_micros, kind, reason, k)
                    .await?
                {
                    return Ok(o);
                }
            }
            return Ok(match self.account_by_id(account_id).await? {
                None => TopUpOutcome::NoAccount,
                Some(a) => TopUpOutcome::InsufficientBalance {
                    available_micros: a.balance_micros,
                },
            });
        }
        let txn_id = new_id("tx");
        let n = insert_txn(
            &mut tx,
            &txn_id,
            kind,
            account_id,
            None,
            None,
            idempotency_key,
            amount_micros,
            Some(reason),
            now,
        )
        .await?;
        if n != 1 {
            tx.rollback().await?;
            drop(_gate);
            let k = idempotency_key.unwrap_or_default();
            return Ok(self
                .replay_credit(account_id, amount_micros, kind, reason, k)
                .await?
                .unwrap_or(TopUpOutcome::Conflict));
        }
        insert_entries(
            &mut tx,
            &txn_id,
            now,
            &[
                (&available_of(account_id), amount_micros),
                (FUNDING, -amount_micros),
            ],
        )
        .await?;
        let balance: i64 = sqlx::query("SELECT balance_micros FROM accounts WHERE id = $1")
            .bind(account_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        tx.commit().await?;
        Ok(TopUpOutcome::Applied {
            txn_id,
            balance_micros: balance,
        })
    }

    async fn replay_credit(
        &self,
        account_id: &str,
        amount_micros: i64,
        kind: &str,
        reason: &str,
        key: &str,
    ) -> Result<Option<TopUpOutcome>, StoreError> {
        let row = sqlx::query(
            "SELECT id, kind, amount_micros, reason FROM ledger_transactions \
             WHERE account_id = $1 AND idempotency_key = $2",
        )
        .bind(account_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let same = row.try_get::<String, _>("kind")? == kind
            && row.try_get::<i64, _>("amount_micros")? == amount_micros
            && row.try_get::<Option<String>, _>("reason")?.as_deref() == Some(reason);
        if !same {
            return Ok(Some(TopUpOutcome::Conflict));
        }
        let balance = self
            .account_by_id(account_id)
            .await?
            .map(|a| a.balance_micros)
            .unwrap_or(0);
        Ok(Some(TopUpOutcome::Replayed {
            txn_id: row.try_get("id")?,
            balance_micros: balance,
        }))
    }
}
