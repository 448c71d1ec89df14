//! PostgreSQL: lease finals written with `COPY … FROM STDIN` in the binary format, on a small
//! pool of sqlx's PostgreSQL driver of their own (the `Any` driver the rest of the store uses has
//! no `COPY`).
//!
//! `COPY` inserts a batch's rows without the executor's per-row work and logs them to the WAL
//! many to a record (`heap_multi_insert`): measured on 100,000 rows in batches of 136 it took
//! ~7–9 µs of the database's time per row, against ~18–23 µs for the same rows through
//! `INSERT … SELECT FROM unnest(…)`. The transaction is otherwise the one of the sqlx path in
//! [`leases`](super::leases): the leases locked, the rows, the captures of
//! [`capture_statements`]. A `COPY` has no `ON CONFLICT`: a row already present (only a replay
//! after a crash writes one) fails the whole statement, the transaction is rolled back and the
//! rows are handed back for the sqlx path's replay, which skips what is there.
//!
//! The binary format spares the server parsing each value from text (the columns are `BIGINT`
//! and `TEXT`: an 8-byte big-endian integer, or the text's bytes) and the client escaping it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;

use super::leases::{
    accounts_of, bind_args, capture_statements, checked_against, final_values, lease_ids_of,
    leases_of, LeaseFinal, Val, FINAL_TARGET, LEASE_COLS, LOCK_ACCOUNTS_PG,
};
use super::{now_ms, StoreError};

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
/// transaction. `Err(rows)` (nothing written) when one of the ids is already present.
pub(super) async fn apply(
    pool: &PgPool,
    finals: Vec<Arc<LeaseFinal>>,
) -> Result<Result<u64, Vec<Arc<LeaseFinal>>>, StoreError> {
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
    let finals = checked_against(finals, &leases);

    let mut data = Vec::with_capacity(COPY_HEADER.len() + finals.len() * 400 + 2);
    data.extend_from_slice(COPY_HEADER);
    for f in &finals {
        push_copy_row(&mut data, &final_values(f));
    }
    data.extend_from_slice(&(-1i16).to_be_bytes());
    let mut copy = tx
        .copy_in_raw(&format!("COPY {FINAL_TARGET} FROM STDIN (FORMAT binary)"))
        .await?;
    copy.send(data).await?;
    match copy.finish().await {
        Ok(n) if n == finals.len() as u64 => {}
        Ok(n) => {
            return Err(StoreError::Invariant(format!(
                "lease finals: COPY wrote {n} of {} rows",
                finals.len()
            )))
        }
        // An id already written (a replay): the batch goes again, skipping those.
        Err(e)
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation()) =>
        {
            tx.rollback().await?;
            return Ok(Err(finals));
        }
        Err(e) => return Err(e.into()),
    }

    for (sql, args) in capture_statements(finals.iter().map(|f| &**f), &leases, now) {
        bind_args(sqlx::query(sql), args).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(Ok(finals.len() as u64))
}

/// The binary `COPY` signature, flags (no OIDs) and an empty header extension.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Appends one row in `COPY`'s binary format: the field count, then each field as its byte
/// length (-1 for NULL) and its bytes — a `BIGINT` as 8 bytes big-endian, a `TEXT` as UTF-8.
fn push_copy_row(out: &mut Vec<u8>, values: &[Val<'_>]) {
    let fields = i16::try_from(values.len()).unwrap_or(i16::MAX);
    out.extend_from_slice(&fields.to_be_bytes());
    for v in values {
        match v {
            Val::Text(None) | Val::Int(None) => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Val::Int(Some(n)) => {
                out.extend_from_slice(&8i32.to_be_bytes());
                out.extend_from_slice(&n.to_be_bytes());
            }
            Val::Text(Some(t)) => {
                // A text is far below 2 GiB (ids, names, a status); a longer one fails the batch.
                let len = i32::try_from(t.len()).unwrap_or(-2);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(t.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_binary_rows_are_length_prefixed_fields() {
        let mut out = Vec::new();
        push_copy_row(
            &mut out,
            &[
                Val::Text(Some("a\tb\\c\nd")),
                Val::Text(None),
                Val::Int(Some(-42)),
                Val::Int(None),
                Val::Text(Some("")),
            ],
        );
        let mut want = vec![0u8, 5];
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(b"a\tb\\c\nd");
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0, 0, 0, 8]);
        want.extend_from_slice(&(-42i64).to_be_bytes());
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(out, want);
        assert_eq!(COPY_HEADER.len(), 19);
        assert!(COPY_HEADER.starts_with(b"PGCOPY\n\xff\r\n\0"));
    }
}
