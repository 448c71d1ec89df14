//! PostgreSQL: lease finals written with `COPY … FROM STDIN`, on a small pool of sqlx's
//! PostgreSQL driver of their own (the `Any` driver the rest of the store uses has no `COPY`).
//!
//! `COPY` inserts a batch's rows without the executor's per-row work and logs them to the WAL
//! many to a record (`heap_multi_insert`): measured on 100,000 rows in batches of 136 it took
//! ~7–9 µs of the database's time per row, against ~18–23 µs for the same rows through
//! `INSERT … SELECT FROM unnest(…)`. The transaction is otherwise the one of the sqlx path in
//! [`leases`](super::leases): the leases locked, the rows, the captures of
//! [`capture_statements`]. A `COPY` has no `ON CONFLICT`: a row already present (only a replay
//! after a crash writes one) fails the whole statement, the transaction is rolled back and the
//! rows are handed back for the sqlx path's replay, which skips what is there.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;

use super::leases::{
    accounts_of, bind_args, capture_statements, checked_against, final_values, leases_of,
    LeaseFinal, Val, FINAL_TARGET, LEASE_COLS, LOCK_ACCOUNTS_PG,
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
    finals: Vec<LeaseFinal>,
) -> Result<Result<u64, Vec<LeaseFinal>>, StoreError> {
    let now = now_ms();
    let mut tx = pool.begin().await?;

    // The accounts first, then the leases (the lock order of `LOCK_ACCOUNTS_PG`).
    sqlx::query(LOCK_ACCOUNTS_PG)
        .bind(accounts_of(&finals))
        .fetch_all(&mut *tx)
        .await?;
    // The leases involved, locked so a sweeper cannot close one meanwhile.
    let mut lease_ids: Vec<&str> = finals.iter().map(|f| f.lease_id.as_str()).collect();
    lease_ids.sort_unstable();
    lease_ids.dedup();
    let leases = leases_of(
        sqlx::query(&format!(
            "SELECT {LEASE_COLS} FROM credit_leases WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(&lease_ids)
        .fetch_all(&mut *tx)
        .await?,
    )?;
    let finals = checked_against(finals, &leases);

    let mut data = String::with_capacity(finals.len() * 320);
    for f in &finals {
        push_copy_row(&mut data, &final_values(f));
    }
    let mut copy = tx
        .copy_in_raw(&format!("COPY {FINAL_TARGET} FROM STDIN"))
        .await?;
    copy.send(data.as_bytes()).await?;
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

    for (sql, args) in capture_statements(&finals, &leases, now) {
        bind_args(sqlx::query(sql), args).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(Ok(finals.len() as u64))
}

/// Appends one row in `COPY`'s text format: values separated by tabs, `\N` for NULL, a text's
/// backslashes, tabs, newlines and carriage returns escaped; a newline at the end.
fn push_copy_row(out: &mut String, values: &[Val<'_>]) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        match v {
            Val::Text(None) | Val::Int(None) => out.push_str("\\N"),
            Val::Int(Some(n)) => out.push_str(itoa::Buffer::new().format(*n)),
            Val::Text(Some(t)) => {
                for c in t.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\t' => out.push_str("\\t"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        c => out.push(c),
                    }
                }
            }
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_rows_escape_what_copy_reads_specially() {
        let mut out = String::new();
        push_copy_row(
            &mut out,
            &[
                Val::Text(Some("a\tb\\c\nd\re \"f\" {g},h")),
                Val::Text(None),
                Val::Int(Some(-42)),
                Val::Int(None),
                Val::Text(Some("")),
            ],
        );
        assert_eq!(out, "a\\tb\\\\c\\nd\\re \"f\" {g},h\t\\N\t-42\t\\N\t\n");
    }
}
