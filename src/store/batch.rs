//! Group commit on the request path: one writer task per store folds the holds and settlements
//! of many concurrent requests into one transaction of multi-row statements and answers each
//! caller through a oneshot after COMMIT; one reader task batches key lookups the same way.
//!
//! The guarantees are those of the single-request path ([`Store::place_hold_direct`],
//! [`Store::finalize_direct`]), which stays the reference and the fallback:
//! * a caller is answered only after the transaction holding its write has committed, so a hold
//!   is durable before the upstream is called;
//! * admission is decided inside the transaction on rows it has locked (PostgreSQL `FOR UPDATE`,
//!   SQLite's single writer), one hold after the other in arrival order, so concurrent holds never
//!   overdraw a balance or a key's spend cap; one hold refused for balance does not affect others;
//! * a settlement is written only for a request still `held` (the same conditional update as the
//!   single path, plus the unique `(request_id, phase)` index), so it happens exactly once;
//! * if the batch fails for any reason (a duplicate request id, a lost connection, a deadlock
//!   abort, a busy SQLite file), nothing of it is committed and every operation is re-run alone on
//!   the single path, which returns its exact per-request outcome. Re-running is safe because both
//!   paths are idempotent per request id.
//!
//! A crash between a batch's commit and the answers leaves committed holds open; the sweeper
//! releases them at expiry, exactly as for the single path.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use sqlx::pool::PoolConnection;
use sqlx::{Any, Connection, Row};
use tokio::sync::{mpsc, oneshot, watch};

use super::accounts::KeyAuthRow;
use super::leases::Arg;
use super::ledger::{
    available_of, held_of, request_from, FinalState, HoldInsert, HoldOutcome, RequestRow,
    SettleWrite, REQUEST_COLS, REVENUE_FEE, REVENUE_NETWORK,
};
use super::usage::{usage_statements, UsageRow, ADD_USAGE_SQLITE};
use super::{new_id, now_ms, Backend, Store, StoreError};

/// Most operations folded into one transaction (keeps every statement far below the backends'
/// bind-parameter limits: 20 × 128 for the settlement update).
pub const MAX_BATCH: usize = 128;
const QUEUE: usize = 4096;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A settlement as queued for the writer.
pub(crate) struct FinalizeOp {
    pub request_id: String,
    pub state: FinalState,
    pub w: SettleWrite,
}

pub(crate) enum WriteOp {
    Hold(HoldInsert, Reply<HoldOutcome>),
    Finalize(FinalizeOp, Reply<Option<RequestRow>>),
}

pub(crate) struct LookupOp {
    key_hash: String,
    reply: Reply<Option<KeyAuthRow>>,
}

/// Queues to the store's writer and reader tasks. Dropping every clone ends the tasks.
#[derive(Clone)]
pub(crate) struct Batcher {
    writes: mpsc::Sender<WriteOp>,
    lookups: mpsc::Sender<LookupOp>,
    /// Set by [`Store::close`]: the tasks give their kept connections back to the pool (which
    /// waits for every connection) and stop keeping one.
    closing: std::sync::Arc<watch::Sender<bool>>,
}

/// Starts the writer and reader tasks for `store` (which must not carry a batcher itself, so the
/// tasks end when the last user-facing handle is dropped). `None` outside a Tokio runtime.
pub(crate) fn spawn(store: &Store) -> Option<Batcher> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let mut inner = store.clone();
    inner.batcher = None;
    let (wtx, wrx) = mpsc::channel(QUEUE);
    let (ltx, lrx) = mpsc::channel(QUEUE);
    let (ctx, crx) = watch::channel(false);
    handle.spawn(batch_loop(inner.clone(), wrx, crx.clone()));
    handle.spawn(batch_loop(inner, lrx, crx));
    Some(Batcher {
        writes: wtx,
        lookups: ltx,
        closing: std::sync::Arc::new(ctx),
    })
}

impl Batcher {
    /// Tells the tasks the pool is closing (see [`Batcher::closing`]).
    pub(crate) fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Queues a hold; `None` when the writer is gone (the caller then takes the single path).
    pub(crate) async fn hold(&self, h: &HoldInsert) -> Option<Result<HoldOutcome, StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.writes.send(WriteOp::Hold(h.clone(), tx)).await.ok()?;
        rx.await.ok()
    }

    pub(crate) async fn finalize(
        &self,
        op: FinalizeOp,
    ) -> Option<Result<Option<RequestRow>, StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.writes.send(WriteOp::Finalize(op, tx)).await.ok()?;
        rx.await.ok()
    }

    pub(crate) async fn lookup(
        &self,
        key_hash: &str,
    ) -> Option<Result<Option<KeyAuthRow>, StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.lookups
            .send(LookupOp {
                key_hash: key_hash.to_string(),
                reply: tx,
            })
            .await
            .ok()?;
        rx.await.ok()
    }
}

/// A pool connection a batching task keeps between batches, so a batch does not pay the pool's
/// acquire (and its liveness ping, one more database turn). After any error it is closed, and
/// the next batch takes a fresh, tested one from the pool.
pub(crate) struct Held(Option<PoolConnection<Any>>);

impl Held {
    pub(crate) fn none() -> Held {
        Held(None)
    }

    async fn get(&mut self, store: &Store) -> Result<&mut PoolConnection<Any>, StoreError> {
        if self.0.is_none() {
            self.0 = Some(store.pool.acquire().await?);
        }
        self.0
            .as_mut()
            .ok_or_else(|| StoreError::Invariant("no connection".to_string()))
    }

    /// Drops the connection after an error (it may be broken).
    fn discard(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.close_on_drop();
        }
    }
}

/// Waits for the next batch of operations: `false` when every sender is gone. Once the store is
/// closing, the kept connection is given back (now, and after every later batch).
async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    ops: &mut Vec<T>,
    closing: &mut watch::Receiver<bool>,
    conn: &mut Held,
) -> bool {
    loop {
        if *closing.borrow() {
            conn.0 = None;
            return rx.recv_many(ops, MAX_BATCH).await > 0;
        }
        tokio::select! {
            n = rx.recv_many(ops, MAX_BATCH) => return n > 0,
            r = closing.changed() => {
                if r.is_err() {
                    conn.0 = None;
                    return rx.recv_many(ops, MAX_BATCH).await > 0;
                }
            }
        }
    }
}

/// An operation kind with its own writer/lookup task: how a batch of it runs.
trait Batched: Sized + Send + 'static {
    async fn run(store: &Store, conn: &mut Held, ops: Vec<Self>);
}

impl Batched for WriteOp {
    async fn run(store: &Store, conn: &mut Held, ops: Vec<Self>) {
        store.run_write_batch(conn, ops).await
    }
}

impl Batched for LookupOp {
    async fn run(store: &Store, conn: &mut Held, ops: Vec<Self>) {
        store.run_lookup_batch(conn, ops).await
    }
}

/// One queue's task: takes what is waiting (up to `MAX_BATCH`) and runs it as one batch, on a
/// connection kept between batches and given back when the store closes.
async fn batch_loop<O: Batched>(
    store: Store,
    mut rx: mpsc::Receiver<O>,
    mut closing: watch::Receiver<bool>,
) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    let mut conn = Held::none();
    while next_batch(&mut rx, &mut ops, &mut closing, &mut conn).await {
        O::run(&store, &mut conn, std::mem::take(&mut ops)).await;
        if *closing.borrow() {
            conn.0 = None;
        }
    }
}

/// The rows of a batch as a table with the columns `cols` (name, PostgreSQL type), to select
/// from; [`bind_rows`] binds the rows.
/// * PostgreSQL: ONE parameter `$1`, a JSON array of arrays, so one statement text serves every
///   batch size (prepared once per connection, parsed and planned once instead of per size).
/// * SQLite: `VALUES` rows of anonymous `?` parameters. (Preparing a statement is cheap in-process,
///   but named parameters such as `$7` are looked up by sqlx through a linear scan each, which
///   costs quadratic time in a batch of hundreds of values; and JSON would be parsed once per
///   column.)
pub(super) fn batch_rows(backend: Backend, rows: usize, cols: &[(&str, &str)]) -> String {
    match backend {
        Backend::Postgres => {
            let sel: Vec<String> = cols
                .iter()
                .enumerate()
                .map(|(i, (name, ty))| format!("(e.v->>{i})::{ty} AS {name}"))
                .collect();
            format!(
                "SELECT {} FROM jsonb_array_elements($1::jsonb) AS e(v)",
                sel.join(", ")
            )
        }
        Backend::Sqlite => {
            let sel: Vec<String> = cols
                .iter()
                .enumerate()
                .map(|(i, (name, _))| format!("column{} AS {name}", i + 1))
                .collect();
            let row = format!("({})", vec!["?"; cols.len()].join(", "));
            format!(
                "SELECT {} FROM (VALUES {})",
                sel.join(", "),
                vec![row.as_str(); rows].join(", ")
            )
        }
    }
}

pub(super) type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

/// The bind values of the rows of [`batch_rows`] (each row a JSON array of strings, integers
/// and nulls).
fn row_args(backend: Backend, rows: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    match backend {
        Backend::Postgres => vec![serde_json::Value::String(
            serde_json::Value::Array(rows).to_string(),
        )],
        Backend::Sqlite => rows
            .into_iter()
            .flat_map(|row| match row {
                serde_json::Value::Array(vals) => vals,
                other => vec![other],
            })
            .collect(),
    }
}

/// Binds values in order (strings, integers, nulls).
fn bind_all(q: AnyQuery<'_>, args: Vec<serde_json::Value>) -> AnyQuery<'_> {
    let mut q = q;
    for v in args {
        q = match v {
            serde_json::Value::String(s) => q.bind(s),
            serde_json::Value::Number(n) => q.bind(n.as_i64()),
            serde_json::Value::Bool(b) => q.bind(i64::from(b)),
            _ => q.bind(None::<i64>),
        };
    }
    q
}

/// Binds the rows of [`batch_rows`].
pub(super) fn bind_rows(
    q: AnyQuery<'_>,
    backend: Backend,
    rows: Vec<serde_json::Value>,
) -> AnyQuery<'_> {
    bind_all(q, row_args(backend, rows))
}

/// On SQLite, the writes of a batch that return nothing (balance and key updates, inserts) are
/// collected and sent as ONE multi-statement call before COMMIT: one hand-off to SQLite's worker
/// thread instead of one per statement. Each statement's expected row count is known (every row
/// it touches is locked: SQLite has one writer), and the call must touch exactly their sum, or
/// the batch is rolled back and re-run on the single path.
#[derive(Default)]
struct Deferred {
    sql: String,
    args: Vec<serde_json::Value>,
    rows: u64,
}

/// Where a batch's answer-less writes go: run now (PostgreSQL) or into a [`Deferred`] (SQLite).
type Writes = Option<Deferred>;

/// The list of an `IN (…)` over `n` text values that [`bind_strs`] binds.
pub(super) fn in_list(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => "SELECT jsonb_array_elements_text($1::jsonb)".to_string(),
        Backend::Sqlite => vec!["?"; n].join(", "),
    }
}

/// Binds the values of [`in_list`].
pub(super) fn bind_strs<'q, 'a>(
    q: AnyQuery<'q>,
    backend: Backend,
    items: impl IntoIterator<Item = &'a str>,
) -> AnyQuery<'q> {
    match backend {
        Backend::Postgres => q.bind(
            serde_json::Value::Array(
                items
                    .into_iter()
                    .map(|s| serde_json::Value::String(s.to_string()))
                    .collect(),
            )
            .to_string(),
        ),
        Backend::Sqlite => {
            let mut q = q;
            for s in items {
                q = q.bind(s.to_string());
            }
            q
        }
    }
}

/// One ledger transaction row to insert.
struct TxnRow {
    id: String,
    kind: &'static str,
    account_id: String,
    request_id: String,
    phase: &'static str,
    amount: i64,
}

/// What a batch's settlements change, for the holds decided after them in the same batch:
/// account → (held released, returned to available); key → (spent, unreserved).
#[derive(Default)]
struct Settled {
    accounts: BTreeMap<String, (i64, i64)>,
    keys: BTreeMap<String, (i64, i64)>,
}

/// What a batch decided, aligned with its inputs.
struct BatchOutcome {
    holds: Vec<HoldOutcome>,
    finals: Vec<Option<RequestRow>>,
}

type Conn = sqlx::AnyConnection;

impl Store {
    /// Places several holds as one batch (one transaction), decided in the given order; each
    /// result is what [`Store::place_hold`] would have returned for it.
    pub async fn place_holds(
        &self,
        holds: Vec<HoldInsert>,
    ) -> Vec<Result<HoldOutcome, StoreError>> {
        let mut rxs = Vec::with_capacity(holds.len());
        let mut ops = Vec::with_capacity(holds.len());
        for h in holds {
            let (tx, rx) = oneshot::channel();
            ops.push(WriteOp::Hold(h, tx));
            rxs.push(rx);
        }
        self.run_write_batch(&mut Held::none(), ops).await;
        collect_replies(rxs).await
    }

    /// Finalises several requests as one batch; each result is what [`Store::finalize`] would
    /// have returned for it.
    pub async fn finalize_many(
        &self,
        finals: Vec<(String, FinalState, SettleWrite)>,
    ) -> Vec<Result<Option<RequestRow>, StoreError>> {
        let mut rxs = Vec::with_capacity(finals.len());
        let mut ops = Vec::with_capacity(finals.len());
        for (request_id, state, w) in finals {
            let (tx, rx) = oneshot::channel();
            ops.push(WriteOp::Finalize(
                FinalizeOp {
                    request_id,
                    state,
                    w,
                },
                tx,
            ));
            rxs.push(rx);
        }
        self.run_write_batch(&mut Held::none(), ops).await;
        collect_replies(rxs).await
    }

    async fn run_write_batch(&self, conn: &mut Held, ops: Vec<WriteOp>) {
        let mut holds: Vec<(HoldInsert, Reply<HoldOutcome>)> = Vec::new();
        let mut finals: Vec<(FinalizeOp, Reply<Option<RequestRow>>)> = Vec::new();
        // The same request id twice in one batch: the later ones run alone after the commit.
        let mut later_holds = Vec::new();
        let mut later_finals = Vec::new();
        let (mut seen_h, mut seen_f) = (HashSet::new(), HashSet::new());
        for op in ops {
            match op {
                WriteOp::Hold(h, r) => {
                    if seen_h.insert(h.request_id.clone()) {
                        holds.push((h, r));
                    } else {
                        later_holds.push((h, r));
                    }
                }
                WriteOp::Finalize(f, r) => {
                    if seen_f.insert(f.request_id.clone()) {
                        finals.push((f, r));
                    } else {
                        later_finals.push((f, r));
                    }
                }
            }
        }
        let hold_ins: Vec<&HoldInsert> = holds.iter().map(|(h, _)| h).collect();
        let fin_ops: Vec<&FinalizeOp> = finals.iter().map(|(f, _)| f).collect();
        match self.write_batch(conn, &hold_ins, &fin_ops).await {
            Ok(out) => {
                for ((_, reply), o) in holds.into_iter().zip(out.holds) {
                    let _ = reply.send(Ok(o));
                }
                for ((op, reply), row) in finals.into_iter().zip(out.finals) {
                    match row {
                        Some(r) => {
                            let _ = reply.send(Ok(Some(r)));
                        }
                        // Not held (already final, unknown) or capture above the hold: the single
                        // path reports which, writing nothing.
                        None => later_finals.push((op, reply)),
                    }
                }
            }
            Err(e) => {
                conn.discard();
                tracing::debug!(error = %e, holds = holds.len(), settlements = finals.len(),
                    "batch failed; running its operations one by one");
                // Settlements first: they return money the holds may need.
                for (op, reply) in finals {
                    let r = self
                        .finalize_direct(&op.request_id, op.state, &op.w, None)
                        .await;
                    let _ = reply.send(r);
                }
                for (h, reply) in holds {
                    let _ = reply.send(self.place_hold_direct(&h).await);
                }
            }
        }
        for (op, reply) in later_finals {
            let r = self
                .finalize_direct(&op.request_id, op.state, &op.w, None)
                .await;
            let _ = reply.send(r);
        }
        for (h, reply) in later_holds {
            let _ = reply.send(self.place_hold_direct(&h).await);
        }
    }

    /// One transaction for the whole batch: settlements first (they free held money), then holds.
    async fn write_batch(
        &self,
        conn: &mut Held,
        holds: &[&HoldInsert],
        finals: &[&FinalizeOp],
    ) -> Result<BatchOutcome, StoreError> {
        for f in finals {
            if f.state != FinalState::Settled && f.w.captured_micros != 0 {
                return Err(StoreError::Invariant(
                    "release/expire must capture 0".to_string(),
                ));
            }
            if f.w.captured_micros < 0 || f.w.network_cost_micros < 0 {
                return Err(StoreError::Invariant("negative capture".to_string()));
            }
        }
        let _gate = self.write_gate().await;
        let now = now_ms();
        let c = conn.get(self).await?;
        let mut tx = c.begin_with(self.begin_write_sql()).await?;
        let mut txns: Vec<TxnRow> = Vec::new();
        let mut entries: Vec<(usize, String, i64)> = Vec::new();
        let mut writes: Writes = (self.backend == Backend::Sqlite).then(Deferred::default);
        let mut settled = Settled::default();
        let finals_out = if finals.is_empty() {
            Vec::new()
        } else {
            self.batch_finalize(
                &mut tx,
                &mut writes,
                finals,
                now,
                &mut txns,
                &mut entries,
                &mut settled,
            )
            .await?
        };
        let holds_out = if holds.is_empty() {
            Vec::new()
        } else {
            self.batch_hold(
                &mut tx,
                &mut writes,
                holds,
                now,
                &mut txns,
                &mut entries,
                &settled,
            )
            .await?
        };
        self.insert_ledger(&mut tx, &mut writes, &txns, &entries, now)
            .await?;
        if let Some(d) = writes.filter(|d| !d.sql.is_empty()) {
            let done = bind_all(sqlx::query(&d.sql), d.args)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != d.rows {
                return Err(StoreError::Invariant(format!(
                    "batch writes touched {} rows, expected {}",
                    done.rows_affected(),
                    d.rows
                )));
            }
        }
        tx.commit().await?;
        Ok(BatchOutcome {
            holds: holds_out,
            finals: finals_out,
        })
    }

    /// One answer-less write of a batch: `pg` (`$n` parameters) runs now on PostgreSQL, where
    /// `expect` (if any) is checked; `sqlite` (`?` parameters) is deferred (see [`Deferred`]) and
    /// must touch exactly `rows` rows.
    async fn write(
        &self,
        tx: &mut Conn,
        writes: &mut Writes,
        sql: (&str, &str),
        args: Vec<serde_json::Value>,
        rows: u64,
        expect: bool,
    ) -> Result<(), StoreError> {
        let (pg, sqlite) = sql;
        match writes {
            Some(d) => {
                d.sql.push_str(sqlite);
                d.sql.push_str(";\n");
                d.args.extend(args);
                d.rows += rows;
            }
            None => {
                let done = bind_all(sqlx::query(pg), args).execute(&mut *tx).await?;
                if expect && done.rows_affected() != rows {
                    return Err(StoreError::Invariant(format!(
                        "a batch write touched {} rows, expected {rows}",
                        done.rows_affected()
                    )));
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn batch_finalize(
        &self,
        tx: &mut Conn,
        writes: &mut Writes,
        finals: &[&FinalizeOp],
        now: i64,
        txns: &mut Vec<TxnRow>,
        entries: &mut Vec<(usize, String, i64)>,
        settled: &mut Settled,
    ) -> Result<Vec<Option<RequestRow>>, StoreError> {
        const COLS: [(&str, &str); 20] = [
            ("v_id", "text"),
            ("v_state", "text"),
            ("v_cost", "bigint"),
            ("v_computed", "bigint"),
            ("v_input", "bigint"),
            ("v_cached", "bigint"),
            ("v_output", "bigint"),
            ("v_network", "bigint"),
            ("v_fee", "bigint"),
            ("v_pt", "bigint"),
            ("v_ct", "bigint"),
            ("v_comp", "bigint"),
            ("v_rt", "bigint"),
            ("v_est", "bigint"),
            ("v_deliv", "bigint"),
            ("v_provider", "text"),
            ("v_upstream", "text"),
            ("v_status", "text"),
            ("v_http", "bigint"),
            ("v_latency", "bigint"),
        ];
        let b = self.backend;
        let sql = format!(
            "WITH v AS ({}) \
             UPDATE requests SET state = v_state, cost_micros = v_cost, \
             computed_cost_micros = v_computed, input_cost_micros = v_input, \
             cached_cost_micros = v_cached, output_cost_micros = v_output, \
             network_cost_micros = v_network, platform_fee_micros = v_fee, prompt_tokens = v_pt, \
             cached_tokens = v_ct, completion_tokens = v_comp, reasoning_tokens = v_rt, \
             estimated = v_est, delivered = v_deliv, provider = COALESCE(v_provider, provider), \
             upstream_model = v_upstream, status = v_status, http_status = v_http, \
             latency_ms = v_latency, finished_at = {} \
             FROM v WHERE id = v_id AND state = 'held' AND hold_micros >= v_cost \
             RETURNING {REQUEST_COLS}, key_reserved",
            batch_rows(b, finals.len(), &COLS),
            if b == Backend::Postgres { "$2" } else { "?" },
        );
        // (captured, network, fee) per op, as the single path computes them.
        let split: Vec<(i64, i64, i64)> = finals
            .iter()
            .map(|f| {
                let c = f.w.captured_micros;
                let fee = c - f.w.network_cost_micros.min(c);
                (c, c - fee, fee)
            })
            .collect();
        let rows_json: Vec<serde_json::Value> = finals
            .iter()
            .zip(&split)
            .map(|(f, (c, network, fee))| {
                let w = &f.w;
                serde_json::json!([
                    f.request_id,
                    f.state.as_str(),
                    c,
                    w.computed_cost_micros,
                    w.input_cost_micros,
                    w.cached_cost_micros,
                    w.output_cost_micros,
                    network,
                    fee,
                    w.prompt_tokens,
                    w.cached_tokens,
                    w.completion_tokens,
                    w.reasoning_tokens,
                    i64::from(w.estimated),
                    i64::from(w.delivered),
                    w.provider,
                    w.upstream_model,
                    w.status,
                    w.http_status,
                    w.latency_ms
                ])
            })
            .collect();
        let q = bind_rows(sqlx::query(&sql), b, rows_json);
        let rows = q.bind(now).fetch_all(&mut *tx).await?;
        let index: HashMap<&str, usize> = finals
            .iter()
            .enumerate()
            .map(|(i, f)| (f.request_id.as_str(), i))
            .collect();
        let mut out: Vec<Option<RequestRow>> = vec![None; finals.len()];
        // account → (held released, returned to available); key → (spent, unreserved)
        let mut accts: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let mut keys: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for row in &rows {
            let rec = request_from(row)?;
            let key_reserved: i64 = row.try_get("key_reserved")?;
            let Some(&i) = index.get(rec.id.as_str()) else {
                return Err(StoreError::Invariant(format!(
                    "batch settlement returned an unknown request {}",
                    rec.id
                )));
            };
            let (captured, network, fee) = split[i];
            let hold = rec.hold_micros;
            let a = accts.entry(rec.account_id.clone()).or_default();
            a.0 += hold;
            a.1 += hold - captured;
            if let Some(k) = &rec.key_id {
                let e = keys.entry(k.clone()).or_default();
                e.0 += captured;
                e.1 += if key_reserved != 0 { hold } else { 0 };
            }
            let t = txns.len();
            txns.push(TxnRow {
                id: new_id("tx"),
                kind: finals[i].state.kind(),
                account_id: rec.account_id.clone(),
                request_id: rec.id.clone(),
                phase: "final",
                amount: captured,
            });
            entries.push((t, held_of(&rec.account_id), -hold));
            entries.push((t, available_of(&rec.account_id), hold - captured));
            entries.push((t, REVENUE_NETWORK.to_string(), network));
            entries.push((t, REVENUE_FEE.to_string(), fee));
            out[i] = Some(rec);
        }
        for (id, (held, back)) in &accts {
            self.write(
                tx,
                writes,
                (
                    "UPDATE accounts SET held_micros = held_micros - $1, \
                     balance_micros = balance_micros + $2 WHERE id = $3",
                    "UPDATE accounts SET held_micros = held_micros - ?, \
                     balance_micros = balance_micros + ? WHERE id = ?",
                ),
                vec![(*held).into(), (*back).into(), id.as_str().into()],
                1,
                false,
            )
            .await?;
        }
        for (id, (spent, unreserved)) in &keys {
            if *spent == 0 && *unreserved == 0 {
                continue;
            }
            self.write(
                tx,
                writes,
                (
                    "UPDATE api_keys SET spent_micros = spent_micros + $1, \
                     reserved_micros = reserved_micros - $2 WHERE id = $3",
                    "UPDATE api_keys SET spent_micros = spent_micros + ?, \
                     reserved_micros = reserved_micros - ? WHERE id = ?",
                ),
                vec![(*spent).into(), (*unreserved).into(), id.as_str().into()],
                1,
                false,
            )
            .await?;
        }
        let rows = out.iter().flatten().filter_map(UsageRow::of_row);
        for (sql, args) in usage_statements(rows) {
            let args = args.into_iter().map(Arg::into_json).collect();
            self.write(tx, writes, (sql, &ADD_USAGE_SQLITE), args, 1, false)
                .await?;
        }
        settled.accounts = accts;
        settled.keys = keys;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    async fn batch_hold(
        &self,
        tx: &mut Conn,
        writes: &mut Writes,
        holds: &[&HoldInsert],
        now: i64,
        txns: &mut Vec<TxnRow>,
        entries: &mut Vec<(usize, String, i64)>,
        settled: &Settled,
    ) -> Result<Vec<HoldOutcome>, StoreError> {
        // Settlement writes still deferred (SQLite) are not in the rows read below yet: add
        // their effect, so admission sees the balances the single path would see.
        let pending = writes.is_some();
        let b = self.backend;
        let lock = match b {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        // Lock and read the balances (in id order, so two writers never deadlock).
        let acct_ids: BTreeSet<&str> = holds.iter().map(|h| h.account_id.as_str()).collect();
        let sql = format!(
            "SELECT id, balance_micros FROM accounts WHERE id IN ({}) ORDER BY id{lock}",
            in_list(b, acct_ids.len())
        );
        let q = bind_strs(sqlx::query(&sql), b, acct_ids.iter().copied());
        let mut balance: HashMap<String, i64> = HashMap::new();
        for r in q.fetch_all(&mut *tx).await? {
            let id: String = r.try_get(0)?;
            let mut avail: i64 = r.try_get(1)?;
            if pending {
                avail += settled.accounts.get(&id).map_or(0, |a| a.1);
            }
            balance.insert(id, avail);
        }
        // Keys with a spend cap: their spent and reserved amounts.
        let capped: BTreeSet<&str> = holds
            .iter()
            .filter(|h| h.key_capped)
            .filter_map(|h| h.key_id.as_deref())
            .collect();
        // key → (cap, spent + reserved)
        let mut key_use: HashMap<String, (Option<i64>, i64)> = HashMap::new();
        if !capped.is_empty() {
            let sql = format!(
                "SELECT id, spend_cap_micros, spent_micros, reserved_micros FROM api_keys \
                 WHERE id IN ({}) ORDER BY id{lock}",
                in_list(b, capped.len())
            );
            let q = bind_strs(sqlx::query(&sql), b, capped.iter().copied());
            for r in q.fetch_all(&mut *tx).await? {
                let spent: i64 = r.try_get(2)?;
                let reserved: i64 = r.try_get(3)?;
                let id: String = r.try_get(0)?;
                let mut used = spent + reserved;
                if pending {
                    // spent + captured, reserved − released hold
                    used += settled.keys.get(&id).map_or(0, |k| k.0 - k.1);
                }
                key_use.insert(id, (r.try_get(1)?, used));
            }
        }
        // Admission, one hold after the other, exactly as the single path would decide them in
        // this order.
        let mut out = Vec::with_capacity(holds.len());
        let mut admitted: Vec<&HoldInsert> = Vec::new();
        let mut debit: BTreeMap<&str, i64> = BTreeMap::new();
        let mut reserve: BTreeMap<&str, i64> = BTreeMap::new();
        for h in holds {
            let avail = balance.get(&h.account_id).copied().unwrap_or(0);
            if avail < h.hold_micros {
                out.push(HoldOutcome::InsufficientCredits {
                    available_micros: avail,
                });
                continue;
            }
            let capped_key = h.key_id.as_deref().filter(|_| h.key_capped);
            if let Some(k) = capped_key {
                let fits = match key_use.get(k) {
                    None => false,
                    Some((None, _)) => true,
                    Some((Some(cap), used)) => used.saturating_add(h.hold_micros) <= *cap,
                };
                if !fits {
                    out.push(HoldOutcome::KeySpendCapReached);
                    continue;
                }
                if let Some(u) = key_use.get_mut(k) {
                    u.1 += h.hold_micros;
                }
                *reserve.entry(k).or_default() += h.hold_micros;
            }
            balance.insert(h.account_id.clone(), avail - h.hold_micros);
            *debit.entry(h.account_id.as_str()).or_default() += h.hold_micros;
            admitted.push(h);
            out.push(HoldOutcome::Held);
        }
        if admitted.is_empty() {
            return Ok(out);
        }
        // The balance guard re-checks under the lock; a row it does not touch fails the batch.
        for (id, amount) in &debit {
            self.write(
                tx,
                writes,
                (
                    "UPDATE accounts SET balance_micros = balance_micros - $1, \
                     held_micros = held_micros + $1 WHERE id = $2 AND balance_micros >= $1",
                    "UPDATE accounts SET balance_micros = balance_micros - ?, \
                     held_micros = held_micros + ? WHERE id = ? AND balance_micros >= ?",
                ),
                match writes {
                    Some(_) => vec![
                        (*amount).into(),
                        (*amount).into(),
                        (*id).into(),
                        (*amount).into(),
                    ],
                    None => vec![(*amount).into(), (*id).into()],
                },
                1,
                true,
            )
            .await?;
        }
        for (id, amount) in &reserve {
            self.write(
                tx,
                writes,
                (
                    "UPDATE api_keys SET reserved_micros = reserved_micros + $1 WHERE id = $2",
                    "UPDATE api_keys SET reserved_micros = reserved_micros + ? WHERE id = ?",
                ),
                vec![(*amount).into(), (*id).into()],
                1,
                false,
            )
            .await?;
        }
        const COLS: [(&str, &str); 10] = [
            ("v_id", "text"),
            ("v_account", "text"),
            ("v_key", "text"),
            ("v_reserved", "bigint"),
            ("v_model", "text"),
            ("v_provider", "text"),
            ("v_price", "bigint"),
            ("v_hold", "bigint"),
            ("v_expires", "bigint"),
            ("v_now", "bigint"),
        ];
        let sql = format!(
            "INSERT INTO requests (id, account_id, key_id, key_reserved, model, provider, price_id, \
             hold_micros, hold_expires_at, created_at, state) \
             SELECT v_id, v_account, v_key, v_reserved, v_model, v_provider, v_price, v_hold, \
             v_expires, v_now, 'held' FROM ({}) AS v",
            batch_rows(b, admitted.len(), &COLS)
        );
        let rows_json: Vec<serde_json::Value> = admitted
            .iter()
            .map(|h| {
                serde_json::json!([
                    h.request_id,
                    h.account_id,
                    h.key_id,
                    i64::from(h.key_capped && h.key_id.is_some()),
                    h.model,
                    h.provider,
                    h.price_id,
                    h.hold_micros,
                    h.expires_at,
                    now
                ])
            })
            .collect();
        self.write(
            tx,
            writes,
            (&sql, &sql),
            row_args(b, rows_json),
            admitted.len() as u64,
            false,
        )
        .await?;
        for h in &admitted {
            let t = txns.len();
            txns.push(TxnRow {
                id: new_id("tx"),
                kind: "hold",
                account_id: h.account_id.clone(),
                request_id: h.request_id.clone(),
                phase: "hold",
                amount: h.hold_micros,
            });
            entries.push((t, available_of(&h.account_id), -h.hold_micros));
            entries.push((t, held_of(&h.account_id), h.hold_micros));
        }
        Ok(out)
    }

    /// Inserts the batch's ledger transactions and their non-zero entries.
    async fn insert_ledger(
        &self,
        tx: &mut Conn,
        writes: &mut Writes,
        txns: &[TxnRow],
        entries: &[(usize, String, i64)],
        now: i64,
    ) -> Result<(), StoreError> {
        if txns.is_empty() {
            return Ok(());
        }
        let b = self.backend;
        let sql = format!(
            "INSERT INTO ledger_transactions (id, kind, account_id, request_id, phase, \
             amount_micros, created_at) \
             SELECT v_id, v_kind, v_account, v_request, v_phase, v_amount, v_now FROM ({}) AS v",
            batch_rows(
                b,
                txns.len(),
                &[
                    ("v_id", "text"),
                    ("v_kind", "text"),
                    ("v_account", "text"),
                    ("v_request", "text"),
                    ("v_phase", "text"),
                    ("v_amount", "bigint"),
                    ("v_now", "bigint"),
                ]
            )
        );
        let rows_json: Vec<serde_json::Value> = txns
            .iter()
            .map(|t| {
                serde_json::json!([
                    t.id,
                    t.kind,
                    t.account_id,
                    t.request_id,
                    t.phase,
                    t.amount,
                    now
                ])
            })
            .collect();
        self.write(
            tx,
            writes,
            (&sql, &sql),
            row_args(b, rows_json),
            txns.len() as u64,
            false,
        )
        .await?;

        let lines: Vec<serde_json::Value> = entries
            .iter()
            .filter(|e| e.2 != 0)
            .map(|(t, acct, amount)| serde_json::json!([txns[*t].id, acct, amount, now]))
            .collect();
        if lines.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO ledger_entries (txn_id, ledger_account, amount_micros, created_at) \
             SELECT v_txn, v_account, v_amount, v_now FROM ({}) AS v",
            batch_rows(
                b,
                lines.len(),
                &[
                    ("v_txn", "text"),
                    ("v_account", "text"),
                    ("v_amount", "bigint"),
                    ("v_now", "bigint"),
                ]
            )
        );
        let n = lines.len() as u64;
        self.write(tx, writes, (&sql, &sql), row_args(b, lines), n, false)
            .await?;
        Ok(())
    }

    async fn run_lookup_batch(&self, conn: &mut Held, ops: Vec<LookupOp>) {
        let hashes: BTreeSet<&str> = ops.iter().map(|o| o.key_hash.as_str()).collect();
        let hashes: Vec<&str> = hashes.into_iter().collect();
        let found = match conn.get(self).await {
            Ok(c) => self.keys_by_hashes_on(c, &hashes).await,
            Err(e) => Err(e),
        };
        match found {
            Ok(found) => {
                for op in ops {
                    let row = found.get(&op.key_hash).cloned();
                    let _ = op.reply.send(Ok(row));
                }
            }
            Err(e) => {
                conn.discard();
                tracing::debug!(error = %e, "batched key lookup failed; looking up one by one");
                for op in ops {
                    let _ = op.reply.send(self.key_by_hash_direct(&op.key_hash).await);
                }
            }
        }
    }
}

/// Each batched operation's answer, in order (an operation the batch dropped is an invariant error).
async fn collect_replies<T>(
    rxs: Vec<oneshot::Receiver<Result<T, StoreError>>>,
) -> Vec<Result<T, StoreError>> {
    let mut out = Vec::with_capacity(rxs.len());
    for rx in rxs {
        out.push(rx.await.unwrap_or_else(|_| {
            Err(StoreError::Invariant(
                "batch dropped an operation".to_string(),
            ))
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_tables_per_backend() {
        assert_eq!(
            batch_rows(Backend::Postgres, 2, &[("a", "text"), ("b", "bigint")]),
            "SELECT (e.v->>0)::text AS a, (e.v->>1)::bigint AS b \
             FROM jsonb_array_elements($1::jsonb) AS e(v)"
        );
        assert_eq!(
            batch_rows(Backend::Sqlite, 2, &[("a", "text"), ("b", "bigint")]),
            "SELECT column1 AS a, column2 AS b FROM (VALUES (?, ?), (?, ?))"
        );
        assert_eq!(in_list(Backend::Sqlite, 3), "?, ?, ?");
    }
}
