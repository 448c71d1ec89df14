//! Accounts and API-key rows: create, list, look up by key digest, revoke, spend caps.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use sqlx::Row;

use super::{new_id, now_ms, Store, StoreError};

/// One customer account with its available and held balance (micro-USD). Credit that gateway
/// instances have leased (lease admission) but not yet spent counts as available here, as it is
/// to the customer; the `accounts` columns themselves count it as held.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountRow {
    pub id: String,
    pub name: String,
    pub plan: Option<String>,
    pub balance_micros: i64,
    pub held_micros: i64,
    pub created_at: i64,
}

/// One API key as listed (never contains the key or its digest).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyRow {
    pub id: String,
    pub account_id: String,
    pub account_name: String,
    pub prefix: String,
    pub is_admin: bool,
    pub name: Option<String>,
    pub spend_cap_micros: Option<i64>,
    pub spent_micros: i64,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// What authentication needs about a key, looked up by its digest.
#[derive(Debug, Clone)]
pub struct KeyAuthRow {
    pub id: String,
    pub account_id: String,
    pub account_name: String,
    pub prefix: String,
    pub key_hash: String,
    pub is_admin: bool,
    pub spend_cap_micros: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// The account's plan and the limit overrides of the account and the key, read in the same
    /// query (so the limiter needs no query of its own).
    pub limits: std::sync::Arc<crate::limits::overrides::SubjectRow>,
}

/// The account columns [`account_from`] reads, from `accounts a`.
const ACCOUNT_SELECT: &str = "SELECT a.id, a.name, a.plan, a.balance_micros, a.held_micros, \
     a.created_at, CAST(COALESCE((SELECT SUM(l.granted_micros - l.captured_micros - l.released_micros) \
     FROM credit_leases l WHERE l.account_id = a.id AND l.state = 'open'), 0) AS BIGINT) AS leased \
     FROM accounts a";

fn account_from(row: &sqlx::any::AnyRow) -> Result<AccountRow, sqlx::Error> {
    let leased: i64 = row.try_get("leased")?;
    let balance: i64 = row.try_get("balance_micros")?;
    let held: i64 = row.try_get("held_micros")?;
    Ok(AccountRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        plan: row.try_get("plan")?,
        balance_micros: balance + leased,
        held_micros: held - leased,
        created_at: row.try_get("created_at")?,
    })
}

const KEY_COLS: &str = "k.id, k.account_id, a.name AS account_name, k.prefix, k.is_admin, k.name, \
     k.spend_cap_micros, k.spent_micros, k.created_at, k.revoked_at, k.last_used_at";

fn key_from(row: &sqlx::any::AnyRow) -> Result<KeyRow, sqlx::Error> {
    Ok(KeyRow {
        id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        account_name: row.try_get("account_name")?,
        prefix: row.try_get("prefix")?,
        is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        name: row.try_get("name")?,
        spend_cap_micros: row.try_get("spend_cap_micros")?,
        spent_micros: row.try_get("spent_micros")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

/// True when a database error is a unique-constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation() || {
                let m = d.message();
                m.contains("UNIQUE constraint failed") || m.contains("duplicate key value")
            }
        }
        _ => false,
    }
}

impl Store {
    /// Creates an account with a zero balance. Returns None if the name is taken.
    pub async fn create_account(
        &self,
        name: &str,
        plan: Option<&str>,
    ) -> Result<Option<AccountRow>, StoreError> {
        let _gate = self.write_gate().await;
        let id = new_id("acct");
        let now = now_ms();
        let res = sqlx::query(
            "INSERT INTO accounts (id, name, plan, balance_micros, held_micros, created_at) \
             VALUES ($1, $2, $3, 0, 0, $4)",
        )
        .bind(&id)
        .bind(name)
        .bind(plan)
        .bind(now)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(Some(AccountRow {
                id,
                name: name.to_string(),
                plan: plan.map(str::to_string),
                balance_micros: 0,
                held_micros: 0,
                created_at: now,
            })),
            Err(e) if is_unique_violation(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_accounts(&self) -> Result<Vec<AccountRow>, StoreError> {
        let rows = sqlx::query(&format!("{ACCOUNT_SELECT} ORDER BY a.name"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(account_from).collect::<Result<_, _>>()?)
    }

    pub async fn account_by_name(&self, name: &str) -> Result<Option<AccountRow>, StoreError> {
        let row = sqlx::query(&format!("{ACCOUNT_SELECT} WHERE a.name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(account_from).transpose()?)
    }

    pub async fn account_by_id(&self, id: &str) -> Result<Option<AccountRow>, StoreError> {
        let row = sqlx::query(&format!("{ACCOUNT_SELECT} WHERE a.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(account_from).transpose()?)
    }

    /// Inserts a key row. Returns false if the prefix or digest already exists (caller retries).
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_key(
        &self,
        account_id: &str,
        prefix: &str,
        key_hash: &str,
        is_admin: bool,
        name: Option<&str>,
        spend_cap_micros: Option<i64>,
    ) -> Result<Option<KeyRow>, StoreError> {
        let _gate = self.write_gate().await;
        let id = new_id("key");
        let now = now_ms();
        let res = sqlx::query(
            "INSERT INTO api_keys (id, account_id, prefix, key_hash, is_admin, name, spend_cap_micros, \
             spent_micros, reserved_micros, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0, $8)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(prefix)
        .bind(key_hash)
        .bind(i64::from(is_admin))
        .bind(name)
        .bind(spend_cap_micros)
        .bind(now)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        drop(_gate);
        self.key_by_prefix(prefix).await
    }

    pub async fn key_by_prefix(&self, prefix: &str) -> Result<Option<KeyRow>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.prefix = $1"
        );
        let row = sqlx::query(&sql)
            .bind(prefix)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(key_from).transpose()?)
    }

    /// Lists keys, optionally for one account id.
    pub async fn list_keys(&self, account_id: Option<&str>) -> Result<Vec<KeyRow>, StoreError> {
        let rows = match account_id {
            Some(acct) => {
                let sql = format!(
                    "SELECT {KEY_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id \
                     WHERE k.account_id = $1 ORDER BY k.created_at"
                );
                sqlx::query(&sql).bind(acct).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!(
                    "SELECT {KEY_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id \
                     ORDER BY a.name, k.created_at"
                );
                sqlx::query(&sql).fetch_all(&self.pool).await?
            }
        };
        Ok(rows.iter().map(key_from).collect::<Result<_, _>>()?)
    }

    /// Looks a key up by its HMAC digest (an indexed equality lookup). Concurrent lookups are
    /// folded into one query by the store's reader task; each still reads the row as committed
    /// when its query starts, so a revocation is seen by the next request.
    pub async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyAuthRow>, StoreError> {
        if let Some(b) = &self.batcher {
            if let Some(r) = b.lookup(key_hash).await {
                return r;
            }
        }
        self.key_by_hash_direct(key_hash).await
    }

    /// [`Self::key_by_hash`] as a query of its own.
    pub async fn key_by_hash_direct(
        &self,
        key_hash: &str,
    ) -> Result<Option<KeyAuthRow>, StoreError> {
        Ok(self.keys_by_hashes(&[key_hash]).await?.remove(key_hash))
    }

    /// Looks several keys up by digest in one query.
    pub async fn keys_by_hashes(
        &self,
        hashes: &[&str],
    ) -> Result<HashMap<String, KeyAuthRow>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.keys_by_hashes_on(&mut conn, hashes).await
    }

    /// [`Self::keys_by_hashes`] on a given connection.
    pub(crate) async fn keys_by_hashes_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        hashes: &[&str],
    ) -> Result<HashMap<String, KeyAuthRow>, StoreError> {
        let mut out = HashMap::new();
        if hashes.is_empty() {
            return Ok(out);
        }
        // One JSON parameter whatever the number of keys: one statement text to prepare.
        let list = super::batch::in_list(self.backend, hashes.len());
        let sql = format!(
            "SELECT k.id, k.account_id, a.name AS account_name, k.prefix, k.key_hash, k.is_admin, \
             k.spend_cap_micros, k.revoked_at, k.last_used_at, {} \
             FROM api_keys k JOIN accounts a ON a.id = k.account_id \
             LEFT JOIN account_limit_overrides ao ON ao.account_id = a.id \
             LEFT JOIN key_limit_overrides ko ON ko.key_id = k.id \
             WHERE k.key_hash IN ({list})",
            *crate::limits::overrides::SUBJECT_COLS
        );
        let q = super::batch::bind_strs(sqlx::query(&sql), self.backend, hashes.iter().copied());
        for row in q.fetch_all(&mut *conn).await? {
            let r = KeyAuthRow {
                id: row.try_get("id")?,
                account_id: row.try_get("account_id")?,
                account_name: row.try_get("account_name")?,
                prefix: row.try_get("prefix")?,
                key_hash: row.try_get("key_hash")?,
                is_admin: row.try_get::<i64, _>("is_admin")? != 0,
                spend_cap_micros: row.try_get("spend_cap_micros")?,
                revoked_at: row.try_get("revoked_at")?,
                last_used_at: row.try_get("last_used_at")?,
                limits: std::sync::Arc::new(crate::limits::overrides::subject_from(&row)?),
            };
            out.insert(r.key_hash.clone(), r);
        }
        Ok(out)
    }

    pub async fn touch_key(&self, key_id: &str, now: i64) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Revokes a key by prefix. Returns false when no active key has that prefix.
    pub async fn revoke_key(&self, prefix: &str) -> Result<bool, StoreError> {
        let _gate = self.write_gate().await;
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE prefix = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(prefix)
        .execute(&mut *tx)
        .await?;
        self.commit_key_change(tx, res.rows_affected() > 0).await?;
        Ok(res.rows_affected() == 1)
    }

    /// Sets or clears a key's spend cap (micro-USD over the key's lifetime).
    pub async fn set_key_cap(&self, prefix: &str, cap: Option<i64>) -> Result<bool, StoreError> {
        let _gate = self.write_gate().await;
        let mut tx = self.begin_write().await?;
        let res = sqlx::query("UPDATE api_keys SET spend_cap_micros = $1 WHERE prefix = $2")
            .bind(cap)
            .bind(prefix)
            .execute(&mut *tx)
            .await?;
        self.commit_key_change(tx, res.rows_affected() > 0).await?;
        Ok(res.rows_affected() == 1)
    }

    /// Commits a transaction that changed what an authenticated key carries (its revocation or
    /// spend cap, its account's plan, limit overrides) when `changed`: the database's key epoch
    /// (migration 0008) moves in the same transaction, for other processes, and this process's
    /// count of key changes after the commit, for its own caches.
    pub(crate) async fn commit_key_change(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        changed: bool,
    ) -> Result<(), StoreError> {
        if changed {
            sqlx::query("UPDATE key_epoch SET epoch = epoch + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if changed {
            self.keys_changed();
        }
        Ok(())
    }

    /// How many times what an authenticated key carries has changed, by the database's count
    /// (every process's changes; see migration 0008).
    pub async fn key_epoch(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT epoch FROM key_epoch WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// How many key changes this process knows of: its own, counted as they commit, and other
    /// processes', counted when [`key_epoch`](Self::key_epoch) is seen to move. A cache of key
    /// rows filled at a lower count may be stale.
    pub fn key_changes(&self) -> u64 {
        self.key_changes.load(Ordering::Acquire)
    }

    /// Counts a key change (see [`Self::key_changes`]).
    pub fn keys_changed(&self) {
        self.key_changes.fetch_add(1, Ordering::Release);
    }
}
