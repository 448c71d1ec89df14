//! The lease writer: on a SQLite file, [`Store::apply_lease_finals`] runs on a thread of its own
//! (`lease-writer`) with one rusqlite connection, one hand-off per batch.
//!
//! Through sqlx's `Any` driver a batch of leased requests' rows (a row each, as they were then)
//! cost ~13 µs of CPU per row, of which SQLite itself was 1–2 µs: the rest was converting binds,
//! allocating, and waking sqlx's worker thread per statement. Here a batch is one hand-off, and
//! its records are packed ([`pieces`](super::pieces)): a row per id bucket.
//!
//! The transaction is the one of the sqlx path in [`leases`](super::leases) (which an in-memory
//! SQLite database still uses): the same pieces, the same captures
//! ([`capture_statements`](super::leases::capture_statements)), in one `BEGIN IMMEDIATE` …
//! `COMMIT`. The connection has the pool's settings
//! (WAL, `synchronous=NORMAL`, `busy_timeout`, `temp_store`, foreign keys); the caller holds the
//! store's write gate while the thread works, so in-process writers stay one at a time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rusqlite::types::ToSqlOutput;
use rusqlite::{
    params_from_iter, Connection, OpenFlags, OptionalExtension, ToSql, TransactionBehavior,
};
use tokio::sync::oneshot;

use super::leases::{
    capture_statements, checked_against, lease_ids_of, Arg, LeaseFinal, LeaseInfo,
};
use super::{now_ms, pieces, StoreError, SQLITE_PRAGMAS};

/// How long a caller waits for its batch (the thread may first wait up to `busy_timeout`, 10 s,
/// for another process's write lock).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = oneshot::Sender<Result<u64, StoreError>>;

struct Job {
    finals: Vec<Arc<LeaseFinal>>,
    maybe_written: bool,
    reply: Reply,
}

enum State {
    /// No thread yet (or the last one is gone): the next batch starts one.
    Idle,
    Running(mpsc::Sender<Job>),
    /// [`LeaseWriter::close`] ran: batches are refused.
    Closed,
}

/// Handle to the writer thread of one SQLite file (shared by every clone of the [`Store`](super::Store)).
pub(crate) struct LeaseWriter {
    path: PathBuf,
    state: Mutex<State>,
    /// Fires (by being dropped) when the running thread ends.
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
}

impl LeaseWriter {
    /// A writer for the database file `path`; its thread starts with the first batch.
    pub(crate) fn new(path: PathBuf) -> LeaseWriter {
        LeaseWriter {
            path,
            state: Mutex::new(State::Idle),
            stopped: Mutex::new(None),
        }
    }

    /// Writes one batch (see [`Store::apply_lease_finals`](super::Store::apply_lease_finals)) on
    /// the writer thread; the caller holds the store's write gate. Returns the rows inserted.
    pub(crate) async fn apply(
        &self,
        finals: Vec<Arc<LeaseFinal>>,
        maybe_written: bool,
    ) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job {
            finals,
            maybe_written,
            reply,
        })?;
        match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            Ok(Ok(res)) => res,
            Ok(Err(_)) => Err(StoreError::LeaseWriter(
                "the writer thread stopped before answering".to_string(),
            )),
            // The batch may still commit: the caller re-applies it, and a replay writes nothing
            // twice.
            Err(_) => Err(StoreError::LeaseWriter(format!(
                "no answer within {}s",
                REPLY_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Queues `job` for the thread, starting one if there is none (or the last one ended).
    fn send(&self, job: Job) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let job = match &*state {
            State::Closed => {
                return Err(StoreError::LeaseWriter("the store is closed".to_string()));
            }
            State::Running(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(job)) => job,
            },
            State::Idle => job,
        };
        let (tx, rx) = mpsc::channel();
        let (done, stopped) = oneshot::channel::<()>();
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("lease-writer".to_string())
            .spawn(move || {
                run(&path, rx);
                drop(done);
            })?;
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(stopped);
        let sent = tx
            .send(job)
            .map_err(|_| StoreError::LeaseWriter("the writer thread ended at start".to_string()));
        *state = State::Running(tx);
        sent
    }

    /// Refuses further batches and waits (a bounded time) for the thread to finish the queued
    /// ones and close its connection.
    pub(crate) async fn close(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = State::Closed;
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stopped) = stopped {
            let _ = tokio::time::timeout(REPLY_TIMEOUT, stopped).await;
        }
    }

    /// Whether a writer thread has been started (tests).
    #[cfg(test)]
    pub(crate) fn started(&self) -> bool {
        !matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            State::Idle
        )
    }
}

/// The thread: one connection, opened at the first batch and again after one that left it inside
/// a transaction; ends when every sender is gone.
fn run(path: &std::path::Path, jobs: mpsc::Receiver<Job>) {
    let mut conn: Option<Connection> = None;
    for job in jobs {
        let res = match &mut conn {
            Some(c) => apply(c, job.finals, job.maybe_written),
            None => match open(path) {
                Ok(c) => apply(conn.insert(c), job.finals, job.maybe_written),
                Err(e) => Err(e),
            },
        };
        if res.is_err() && conn.as_ref().is_some_and(|c| !c.is_autocommit()) {
            // The rollback on drop failed: start over on a fresh connection.
            conn = None;
        }
        // The caller may have given up waiting; the outcome is in the database either way.
        let _ = job.reply.send(res);
    }
}

/// Opens the database file with the pool's settings (see [`SQLITE_PRAGMAS`]).
fn open(path: &std::path::Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.execute_batch(SQLITE_PRAGMAS)?;
    // sqlx's defaults, which the pool's connections have.
    conn.execute_batch("PRAGMA foreign_keys=ON; PRAGMA journal_mode=WAL;")?;
    Ok(conn)
}

impl ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Arg::Text(t) => t.to_sql(),
            Arg::Int(n) => n.to_sql(),
        }
    }
}

/// One batch in one transaction (the sqlx path's, statement for statement).
fn apply(
    conn: &mut Connection,
    finals: Vec<Arc<LeaseFinal>>,
    maybe_written: bool,
) -> Result<u64, StoreError> {
    let now = now_ms();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;

    // The leases involved (few per batch: one per account or capped key).
    let mut leases: HashMap<String, LeaseInfo> = HashMap::new();
    {
        let mut get = tx.prepare_cached(
            "SELECT account_id, key_id, key_reserved, state FROM credit_leases WHERE id = ?1",
        )?;
        for id in lease_ids_of(&finals) {
            let lease = get
                .query_row([id], |r| {
                    Ok(LeaseInfo {
                        account_id: r.get(0)?,
                        key_id: r.get(1)?,
                        key_reserved: r.get::<_, i64>(2)? != 0,
                        open: r.get::<_, String>(3)? == "open",
                    })
                })
                .optional()?;
            if let Some(lease) = lease {
                leases.insert(id.to_string(), lease);
            }
        }
    }
    let mut finals = checked_against(finals, &leases);

    if maybe_written {
        let mut there = Vec::new();
        {
            let mut get = tx.prepare_cached(pieces::PIECES_OF_BUCKET)?;
            for bucket in pieces::buckets_of(&finals) {
                for data in get.query_map([bucket], |r| r.get::<_, Vec<u8>>(0))? {
                    there.push(data?);
                }
            }
        }
        let mut rows = Vec::new();
        {
            let mut get = tx.prepare_cached("SELECT id FROM requests WHERE id = ?1")?;
            for f in &finals {
                if get.exists([&f.id])? {
                    rows.push(f.id.clone());
                }
            }
        }
        let present = pieces::present_in(&finals, &there, rows)?;
        finals.retain(|f| !present.contains(&f.id));
    }

    {
        let mut insert = tx.prepare_cached(pieces::INSERT_PIECE)?;
        for p in pieces::pack(&finals)? {
            insert.execute(rusqlite::params![p.bucket, p.rows, p.data, now])?;
        }
    }
    for (sql, args) in capture_statements(finals.iter().map(|f| &**f), &leases, now) {
        tx.prepare_cached(sql)?.execute(params_from_iter(args))?;
    }
    tx.commit()?;
    Ok(finals.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// A migrated SQLite file and a connection of the writer's kind to it.
    async fn migrated() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("t.db");
        let store = Store::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        store.close().await;
        let conn = open(&path).unwrap_or_else(|e| panic!("open: {e}"));
        (dir, conn)
    }

    /// A batch whose records differ in some fields and repeat others (NULLs among them) is
    /// written field for field, packed by bucket; the same batch again as a replay writes
    /// nothing.
    #[tokio::test]
    async fn a_batch_is_written_column_for_column() {
        let (_dir, mut conn) = migrated().await;
        conn.execute_batch(
            "INSERT INTO accounts (id, name, balance_micros, held_micros, created_at)
                 VALUES ('a1', 'acme', 1000000, 1000000, 0);
             INSERT INTO credit_leases (id, account_id, owner, state, granted_micros, expires_at,
                 created_at) VALUES ('l1', 'a1', 'o', 'open', 1000000, 9999999999999, 0);",
        )
        .unwrap_or_else(|e| panic!("setup: {e}"));
        let base = LeaseFinal {
            id: String::new(),
            lease_id: "l1".into(),
            account_id: "a1".into(),
            key_id: Some("k1".into()),
            model: "m".into(),
            provider: Some("p1".into()),
            upstream_model: Some("um".into()),
            price_id: Some(3),
            state: "settled".into(),
            hold_micros: 900,
            hold_expires_at: 50,
            status: Some("ok".into()),
            http_status: Some(200),
            prompt_tokens: 11,
            cached_tokens: 2,
            completion_tokens: 13,
            reasoning_tokens: 4,
            cost_micros: 600,
            computed_cost_micros: 650,
            input_cost_micros: 100,
            cached_cost_micros: 20,
            output_cost_micros: 480,
            network_cost_micros: 360,
            estimated: false,
            delivered: true,
            latency_ms: Some(42),
            created_at: 3,
            finished_at: 4,
        };
        let finals: Vec<Arc<LeaseFinal>> = vec![
            LeaseFinal {
                id: "r1".into(),
                ..base.clone()
            },
            LeaseFinal {
                id: "r2".into(),
                key_id: None,
                provider: None,
                upstream_model: None,
                price_id: None,
                state: "released".into(),
                status: Some("upstream_error".into()),
                http_status: None,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_micros: 0,
                network_cost_micros: 0,
                delivered: false,
                latency_ms: None,
                ..base.clone()
            },
            LeaseFinal {
                id: "r3".into(),
                provider: Some("p2".into()),
                estimated: true,
                ..base.clone()
            },
            LeaseFinal {
                id: "r4".into(),
                provider: Some("p2".into()),
                estimated: true,
                ..base
            },
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let written =
            apply(&mut conn, finals.clone(), false).unwrap_or_else(|e| panic!("apply: {e}"));
        assert_eq!(written, 4);
        let read = |conn: &Connection| -> Vec<LeaseFinal> {
            let mut stmt = conn
                .prepare("SELECT bucket, rows, data FROM request_pieces ORDER BY id")
                .unwrap_or_else(|e| panic!("select: {e}"));
            let pieces: Vec<(i64, i64, Vec<u8>)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .and_then(|rows| rows.collect())
                .unwrap_or_else(|e| panic!("pieces: {e}"));
            let mut out = Vec::new();
            for (bucket, rows, data) in pieces {
                let records = pieces::decode(&data).unwrap_or_else(|e| panic!("decode: {e}"));
                assert_eq!(records.len() as i64, rows, "the piece's count");
                assert!(records.iter().all(|f| pieces::bucket_of(&f.id) == bucket));
                out.extend(records);
            }
            out.sort_by(|a, b| a.id.cmp(&b.id));
            out
        };
        let want: Vec<LeaseFinal> = finals.iter().map(|f| LeaseFinal::clone(f)).collect();
        assert_eq!(read(&conn), want, "every field as recorded");
        assert_eq!(
            apply(&mut conn, finals.clone(), true).unwrap_or_else(|e| panic!("replay: {e}")),
            0
        );
        assert_eq!(read(&conn), want, "the replay wrote nothing");

        // A replayed batch leaves out ids a `requests` row has (lease rows of earlier versions),
        // and writes the rest.
        conn.execute(
            "INSERT INTO requests (id, account_id, lease_id, model, state, hold_micros, \
             hold_expires_at, created_at) VALUES ('r5', 'a1', 'l1', 'm', 'settled', 0, 0, 0)",
            [],
        )
        .unwrap_or_else(|e| panic!("old row: {e}"));
        let more: Vec<Arc<LeaseFinal>> = ["r5", "r6", "r1"]
            .iter()
            .map(|id| {
                Arc::new(LeaseFinal {
                    id: id.to_string(),
                    ..LeaseFinal::clone(&finals[0])
                })
            })
            .collect();
        assert_eq!(
            apply(&mut conn, more, true).unwrap_or_else(|e| panic!("replay: {e}")),
            1,
            "only r6 is new"
        );
        let ids: Vec<String> = read(&conn).into_iter().map(|f| f.id).collect();
        assert_eq!(ids, ["r1", "r2", "r3", "r4", "r6"]);
    }

    /// Writing a request row (hold admission's) builds no temporary B-tree: a CHECK's `IN` over
    /// more than two constants made SQLite build and drop one per row (a third of the row's
    /// CPU), so the state CHECK is written as comparisons (migration 0006).
    #[tokio::test]
    async fn a_request_row_insert_opens_no_ephemeral_table() {
        let (_dir, conn) = migrated().await;
        let mut stmt = conn
            .prepare(
                "EXPLAIN INSERT INTO requests (id, account_id, model, state, hold_micros, \
                 hold_expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .unwrap_or_else(|e| panic!("explain: {e}"));
        let ops: Vec<String> = stmt
            .query_map(
                params_from_iter(std::iter::repeat_n(rusqlite::types::Null, 7)),
                |r| r.get::<_, String>(1),
            )
            .unwrap_or_else(|e| panic!("query: {e}"))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("row: {e}"));
        assert!(ops.iter().any(|o| o == "Insert"), "the plan: {ops:?}");
        assert!(
            !ops.iter().any(|o| o == "OpenEphemeral"),
            "a temporary B-tree per row: {ops:?}"
        );
    }

    /// The rewritten CHECK still refuses a state that is not one of the four.
    #[tokio::test]
    async fn the_state_check_still_refuses_unknown_states() {
        let (_dir, conn) = migrated().await;
        conn.execute(
            "INSERT INTO accounts (id, name, created_at) VALUES ('a1', 'acme', 0)",
            [],
        )
        .unwrap_or_else(|e| panic!("account: {e}"));
        let insert = |id: &str, state: &str| {
            conn.execute(
                "INSERT INTO requests (id, account_id, model, state, hold_micros, \
                 hold_expires_at, created_at) VALUES (?1, 'a1', 'm', ?2, 0, 0, 0)",
                [id, state],
            )
        };
        for (i, s) in ["held", "settled", "released", "expired"]
            .iter()
            .enumerate()
        {
            assert_eq!(insert(&format!("r{i}"), s).ok(), Some(1), "{s} is a state");
        }
        let refused = insert("r9", "pending");
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("CHECK constraint failed")),
            "{refused:?}"
        );
    }

    /// Migration 0006 rebuilds `requests`: every row and column is kept, and the indexes are
    /// back (the migration files applied in order, as sqlx applies them).
    #[test]
    fn migration_0006_keeps_every_request_row() {
        let conn = Connection::open_in_memory().unwrap_or_else(|e| panic!("open: {e}"));
        let before = [
            include_str!("../../migrations/sqlite/0001_billing.sql"),
            include_str!("../../migrations/sqlite/0003_limits_overrides.sql"),
            include_str!("../../migrations/sqlite/0004_request_attempts.sql"),
            include_str!("../../migrations/sqlite/0005_credit_leases.sql"),
        ];
        for m in before {
            conn.execute_batch(m)
                .unwrap_or_else(|e| panic!("migration: {e}"));
        }
        conn.execute_batch(
            "INSERT INTO accounts (id, name, created_at) VALUES ('a1', 'acme', 0);
             INSERT INTO requests (id, account_id, key_id, key_reserved, model, provider,
                 upstream_model, price_id, state, hold_micros, hold_expires_at, status,
                 http_status, prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens,
                 cost_micros, computed_cost_micros, input_cost_micros, cached_cost_micros,
                 output_cost_micros, network_cost_micros, platform_fee_micros, estimated,
                 delivered, latency_ms, created_at, finished_at, lease_id)
             VALUES ('r1', 'a1', 'k1', 1, 'm', 'p', 'um', 7, 'settled', 900, 5, 'completed', 200,
                 11, 2, 13, 4, 600, 650, 100, 20, 480, 360, 240, 1, 1, 42, 3, 4, 'l1'),
                ('r2', 'a1', NULL, 0, 'm', NULL, NULL, NULL, 'held', 500, 9, NULL, NULL,
                 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, 8, NULL, NULL);",
        )
        .unwrap_or_else(|e| panic!("rows: {e}"));
        let dump = |conn: &Connection| -> Vec<String> {
            let mut stmt = conn
                .prepare("SELECT * FROM requests ORDER BY id")
                .unwrap_or_else(|e| panic!("select: {e}"));
            let n = stmt.column_count();
            let names: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
            stmt.query_map([], |r| {
                let mut cols: Vec<String> = (0..n)
                    .map(|i| {
                        let v = r.get_ref(i).map(|v| format!("{v:?}")).unwrap_or_default();
                        format!("{}={v}", names[i])
                    })
                    .collect();
                cols.sort();
                Ok(cols.join(","))
            })
            .unwrap_or_else(|e| panic!("query: {e}"))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("row: {e}"))
        };
        let rows = dump(&conn);
        assert_eq!(rows.len(), 2);
        conn.execute_batch(include_str!(
            "../../migrations/sqlite/0006_requests_state_check.sql"
        ))
        .unwrap_or_else(|e| panic!("migration 0006: {e}"));
        assert_eq!(dump(&conn), rows, "every row and column as it was");
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' ORDER BY name")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .unwrap_or_else(|e| panic!("indexes: {e}"));
        assert_eq!(
            indexes,
            [
                "requests_account_time",
                "requests_open_holds",
                "sqlite_autoindex_requests_1"
            ]
        );
    }
}
