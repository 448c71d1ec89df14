//! PostgreSQL: lease finals written on a small pool of sqlx's PostgreSQL driver of their own
//! (the `Any` driver the rest of the store uses binds every value through its own enum, and its
//! `bytea` as a copy): the accounts and leases locked, the batch's pieces
//! ([`pieces`](super::pieces)) and captures written by
//! [`write_batch`](super::leases::write_batch), in one transaction — the transaction of the
//! `Any` path in [`leases`](super::leases).
//!
//! Until the records were packed, each was a `requests` row sent with `COPY … FROM STDIN` in the
//! binary format: ~3.4 µs of the database's CPU per row, most of what lease billing cost
//! PostgreSQL (BENCHMARKS.md, "Billing on vs off").

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;

use super::leases::{
    accounts_of, checked_against, lease_ids_of, leases_of, write_batch, LeaseFinal, LEASE_COLS,
    LOCK_ACCOUNTS_PG,
};
use super::{now_ms, pieces, StoreError};

/// The pool: connections are opened on first use; one batch is written at a time per process
/// (the billing layer's writer), the second connection is for the one after a broken one.
pub(super) fn pool(url: &str) -> Result<PgPool, StoreError> {
    let opts = url
        .parse::<PgConnectOptions>()?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy_with(opts))
}

/// Writes one batch (see [`Store::apply_lease_finals`](super::Store::apply_lease_finals)) in one
/// transaction; returns the records written.
pub(super) async fn apply(
    pool: &PgPool,
    finals: Vec<Arc<LeaseFinal>>,
    maybe_written: bool,
) -> Result<u64, StoreError> {
    let now = now_ms();
    let mut tx = pool.begin().await?;

    // The accounts first, then the leases (the lock order of `LOCK_ACCOUNTS_PG`).
    sqlx::query(LOCK_ACCOUNTS_PG)
        .bind(accounts_of(&finals))
        .fetch_all(&mut *tx)
        .await?;
    // The leases involved, locked so a sweeper cannot close one meanwhile.
    let lease_ids = lease_ids_of(&finals);
    let leases = leases_of(
        sqlx::query(&format!(
            "SELECT {LEASE_COLS} FROM credit_leases WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(&lease_ids)
        .fetch_all(&mut *tx)
        .await?,
    )?;
    let mut finals = checked_against(finals, &leases);

    if maybe_written {
        let buckets = pieces::buckets_of(&finals);
        let pieces_there: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT data FROM request_pieces WHERE bucket = ANY($1)")
                .bind(&buckets)
                .fetch_all(&mut *tx)
                .await?;
        let ids: Vec<&str> = finals.iter().map(|f| f.id.as_str()).collect();
        let rows: Vec<String> = sqlx::query_scalar("SELECT id FROM requests WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        let present = pieces::present_in(&finals, &pieces_there, rows)?;
        finals.retain(|f| !present.contains(&f.id));
    }

    write_batch(&mut tx, &finals, &leases, now).await?;
    tx.commit().await?;
    Ok(finals.len() as u64)
}
