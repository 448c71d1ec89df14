//! Ledger invariant checker, run after every billing test and by `tollgate ledger check`.

use std::collections::{HashMap, HashSet};

use sqlx::Row;

use super::leases::LeaseFinal;
use super::ledger::{available_of, held_of};
use super::{pieces, Store, StoreError};

/// Totals the checker saw (for reporting); `problems` is empty when the ledger is consistent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LedgerReport {
    pub transactions: i64,
    pub entries: i64,
    pub requests: i64,
    pub open_holds: i64,
    pub expired_open_holds: i64,
    pub leases: i64,
    pub open_leases: i64,
    pub revenue_micros: i64,
    pub problems: Vec<String>,
}

impl LedgerReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn get_i64(r: &sqlx::any::AnyRow, i: usize) -> Result<i64, sqlx::Error> {
    r.try_get::<i64, _>(i)
}

/// What is wrong with a final request's charge, however it was admitted: above its hold, or
/// charged without being settled.
fn charge_problems(rep: &mut LedgerReport, id: &str, state: &str, cost: i64, hold: i64) {
    if cost > hold {
        rep.problems
            .push(format!("request {id}: cost {cost} > hold {hold}"));
    }
    if state != "settled" && cost != 0 {
        rep.problems
            .push(format!("request {id}: {state} with cost {cost}"));
    }
}

impl Store {
    /// Verifies the ledger invariants:
    /// 1. every transaction's entries sum to zero, and every transaction has entries unless zero;
    /// 2. each account's `balance_micros`/`held_micros` equal the sums of its ledger entries;
    /// 3. each account's `held_micros` equals the sum of its open holds;
    /// 4. every request has exactly one hold transaction, open holds have no final transaction,
    ///    final requests have exactly one, and captured ≤ held;
    /// 5. no balance is negative; no open hold is older than `now_ms` + `grace_ms` past expiry
    ///    (pass `None` to skip this check);
    /// 6. credit leases (see [`leases`](super::leases)): each lease's granted, captured and
    ///    released totals equal its `hold`, `capture` and `release`/`expire` transactions, its
    ///    captured total equals the charges of its requests, a closed lease holds nothing, and
    ///    no open lease is past its expiry at the cutoff. A leased request has no transactions of
    ///    its own: it is final, charged at most its hold, and only `settled` ones cost anything;
    ///    its packed record (see [`pieces`](super::pieces)) decodes, is in its id's bucket, and
    ///    no id is written twice (in two pieces, or in a piece and `requests`);
    /// 7. `usage_by_second` adds up the settled requests, group for group.
    pub async fn check_ledger(
        &self,
        expiry_cutoff_ms: Option<i64>,
    ) -> Result<LedgerReport, StoreError> {
        let mut rep = LedgerReport::default();
        // One snapshot for every query: a live gateway (lease admission's background writer,
        // other requests) may commit between them.
        let mut tx = self.pool.begin().await?;
        if self.backend == super::Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
        }

        let rows = sqlx::query(
            "SELECT t.id, t.kind, t.amount_micros, CAST(COALESCE(SUM(e.amount_micros), 0) AS BIGINT), \
             CAST(COUNT(e.id) AS BIGINT) FROM ledger_transactions t \
             LEFT JOIN ledger_entries e ON e.txn_id = t.id GROUP BY t.id, t.kind, t.amount_micros",
        )
        .fetch_all(&mut *tx)
        .await?;
        rep.transactions = rows.len() as i64;
        for r in &rows {
            let id: String = r.try_get(0)?;
            let amount = get_i64(r, 2)?;
            let sum = get_i64(r, 3)?;
            let n = get_i64(r, 4)?;
            rep.entries += n;
            if sum != 0 {
                rep.problems
                    .push(format!("transaction {id} entries sum to {sum}"));
            }
            if n == 0 && amount != 0 {
                rep.problems
                    .push(format!("transaction {id} has no entries"));
            }
        }

        let sums: HashMap<String, i64> = sqlx::query(
            "SELECT ledger_account, CAST(SUM(amount_micros) AS BIGINT) FROM ledger_entries GROUP BY ledger_account",
        )
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, get_i64(r, 1)?)))
        .collect::<Result<_, sqlx::Error>>()?;
        rep.revenue_micros = sums
            .get(super::ledger::REVENUE_NETWORK)
            .copied()
            .unwrap_or(0)
            + sums.get(super::ledger::REVENUE_FEE).copied().unwrap_or(0);

        let open: HashMap<String, i64> = sqlx::query(
            "SELECT account_id, CAST(SUM(hold_micros) AS BIGINT) FROM requests WHERE state = 'held' GROUP BY account_id",
        )
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, get_i64(r, 1)?)))
        .collect::<Result<_, sqlx::Error>>()?;

        let mut open = open;
        for r in sqlx::query(
            "SELECT account_id, CAST(SUM(granted_micros - captured_micros - released_micros) AS BIGINT) \
             FROM credit_leases WHERE state = 'open' GROUP BY account_id",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            *open.entry(r.try_get::<String, _>(0)?).or_insert(0) += get_i64(&r, 1)?;
        }

        for r in sqlx::query("SELECT id, balance_micros, held_micros FROM accounts")
            .fetch_all(&mut *tx)
            .await?
        {
            let id: String = r.try_get(0)?;
            let bal = get_i64(&r, 1)?;
            let held = get_i64(&r, 2)?;
            let lbal = sums.get(&available_of(&id)).copied().unwrap_or(0);
            let lheld = sums.get(&held_of(&id)).copied().unwrap_or(0);
            if bal != lbal {
                rep.problems
                    .push(format!("account {id}: balance {bal} != ledger {lbal}"));
            }
            if held != lheld {
                rep.problems
                    .push(format!("account {id}: held {held} != ledger {lheld}"));
            }
            let oh = open.get(&id).copied().unwrap_or(0);
            if held != oh {
                rep.problems
                    .push(format!("account {id}: held {held} != open holds {oh}"));
            }
            if bal < 0 || held < 0 {
                rep.problems
                    .push(format!("account {id}: negative balance {bal}/{held}"));
            }
        }

        // Leases: their totals against their transactions.
        let mut leased: HashMap<String, i64> = HashMap::new();
        let mut lease_totals: Vec<(String, i64, i64, i64, String, i64)> = Vec::new();
        for r in sqlx::query(
            "SELECT l.id, l.granted_micros, l.captured_micros, l.released_micros, l.state, l.expires_at, \
             CAST(COALESCE((SELECT SUM(t.amount_micros) FROM ledger_transactions t WHERE t.request_id = l.id AND t.kind = 'hold'), 0) AS BIGINT), \
             CAST(COALESCE((SELECT SUM(t.amount_micros) FROM ledger_transactions t WHERE t.request_id = l.id AND t.kind = 'capture'), 0) AS BIGINT), \
             CAST(COALESCE((SELECT SUM(t.amount_micros) FROM ledger_transactions t WHERE t.request_id = l.id AND t.kind IN ('release', 'expire')), 0) AS BIGINT) \
             FROM credit_leases l",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            let id: String = r.try_get(0)?;
            let (granted, captured, released) = (get_i64(&r, 1)?, get_i64(&r, 2)?, get_i64(&r, 3)?);
            let state: String = r.try_get(4)?;
            let expires = get_i64(&r, 5)?;
            let (tg, tc, tr) = (get_i64(&r, 6)?, get_i64(&r, 7)?, get_i64(&r, 8)?);
            rep.leases += 1;
            if (granted, captured, released) != (tg, tc, tr) {
                rep.problems.push(format!(
                    "lease {id}: granted/captured/released {granted}/{captured}/{released} != ledger {tg}/{tc}/{tr}"
                ));
            }
            let outstanding = granted - captured - released;
            if outstanding < 0 {
                rep.problems
                    .push(format!("lease {id}: over-drawn by {}", -outstanding));
            }
            match state.as_str() {
                "closed" if outstanding != 0 => rep
                    .problems
                    .push(format!("lease {id}: closed but still holds {outstanding}")),
                "open" => {
                    rep.open_leases += 1;
                    if expiry_cutoff_ms.is_some_and(|cut| expires < cut) {
                        rep.problems
                            .push(format!("lease {id}: open past its expiry"));
                    }
                }
                _ => {}
            }
            leased.insert(id.clone(), 0);
            lease_totals.push((id, granted, captured, released, state, expires));
        }

        let rows = sqlx::query(
            "SELECT r.id, r.state, r.hold_micros, r.cost_micros, r.hold_expires_at, r.lease_id, \
             CAST((SELECT COUNT(*) FROM ledger_transactions t WHERE t.request_id = r.id AND t.phase = 'hold') AS BIGINT), \
             CAST((SELECT COUNT(*) FROM ledger_transactions t WHERE t.request_id = r.id AND t.phase = 'final') AS BIGINT), \
             CAST(COALESCE((SELECT SUM(t.amount_micros) FROM ledger_transactions t WHERE t.request_id = r.id AND t.phase = 'final'), 0) AS BIGINT) \
             FROM requests r",
        )
        .fetch_all(&mut *tx)
        .await?;
        rep.requests = rows.len() as i64;
        let mut ids: HashSet<String> = HashSet::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get(0)?;
            ids.insert(id.clone());
            let state: String = r.try_get(1)?;
            let hold = get_i64(r, 2)?;
            let cost = get_i64(r, 3)?;
            let expires = get_i64(r, 4)?;
            let lease: Option<String> = r.try_get(5)?;
            let holds = get_i64(r, 6)?;
            let finals = get_i64(r, 7)?;
            let captured = get_i64(r, 8)?;
            if let Some(lease) = lease {
                if let Some(e) = leased.get_mut(&lease) {
                    *e += cost;
                } else {
                    rep.problems
                        .push(format!("request {id}: unknown lease {lease}"));
                }
                if holds != 0 || finals != 0 {
                    rep.problems.push(format!(
                        "request {id}: leased but has transactions of its own"
                    ));
                }
                match state.as_str() {
                    "settled" | "released" | "expired" => {}
                    other => rep
                        .problems
                        .push(format!("request {id}: leased request in state {other}")),
                }
                charge_problems(&mut rep, &id, &state, cost, hold);
                continue;
            }
            if holds != 1 {
                rep.problems
                    .push(format!("request {id}: {holds} hold transactions"));
            }
            match state.as_str() {
                "held" => {
                    rep.open_holds += 1;
                    if finals != 0 {
                        rep.problems
                            .push(format!("request {id}: open but has a final transaction"));
                    }
                    if let Some(cut) = expiry_cutoff_ms {
                        if expires < cut {
                            rep.expired_open_holds += 1;
                            rep.problems
                                .push(format!("request {id}: hold open past its expiry"));
                        }
                    }
                }
                "settled" | "released" | "expired" => {
                    if finals != 1 {
                        rep.problems
                            .push(format!("request {id}: {finals} final transactions"));
                    }
                    if captured != cost {
                        rep.problems
                            .push(format!("request {id}: captured {captured} != cost {cost}"));
                    }
                    charge_problems(&mut rep, &id, &state, cost, hold);
                }
                other => rep
                    .problems
                    .push(format!("request {id}: unknown state {other}")),
            }
        }
        // Leased requests' packed records: each in the bucket of its id, each id written once
        // (in one piece, or in `requests` by an earlier version), with no transaction of its own.
        let own_txns: HashSet<String> = sqlx::query(
            "SELECT DISTINCT request_id FROM ledger_transactions \
             WHERE phase IN ('hold', 'final') AND request_id IS NOT NULL",
        )
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<_, _>>()?;
        let mut packed_settled: Vec<LeaseFinal> = Vec::new();
        for r in sqlx::query("SELECT id, bucket, rows, data FROM request_pieces")
            .fetch_all(&mut *tx)
            .await?
        {
            let piece = get_i64(&r, 0)?;
            let (bucket, count) = (get_i64(&r, 1)?, get_i64(&r, 2)?);
            let data: Vec<u8> = r.try_get(3)?;
            let records = match pieces::decode(&data) {
                Ok(records) => records,
                Err(e) => {
                    rep.problems.push(format!("request piece {piece}: {e}"));
                    continue;
                }
            };
            if records.len() as i64 != count {
                rep.problems.push(format!(
                    "request piece {piece}: {} records, {count} counted",
                    records.len()
                ));
            }
            for f in records {
                let id = f.id.as_str();
                rep.requests += 1;
                if pieces::bucket_of(id) != bucket {
                    rep.problems
                        .push(format!("request {id}: in piece {piece} of another bucket"));
                }
                if !ids.insert(f.id.clone()) {
                    rep.problems.push(format!("request {id}: written twice"));
                }
                if own_txns.contains(id) {
                    rep.problems.push(format!(
                        "request {id}: leased but has transactions of its own"
                    ));
                }
                if let Some(e) = leased.get_mut(&f.lease_id) {
                    *e += f.cost_micros;
                } else {
                    rep.problems
                        .push(format!("request {id}: unknown lease {}", f.lease_id));
                }
                match f.state.as_str() {
                    "settled" | "released" | "expired" => {}
                    other => rep
                        .problems
                        .push(format!("request {id}: leased request in state {other}")),
                }
                charge_problems(&mut rep, id, &f.state, f.cost_micros, f.hold_micros);
                if f.state == "settled" {
                    packed_settled.push(f);
                }
            }
        }
        for (id, _, captured, _, _, _) in &lease_totals {
            let charged = leased.get(id).copied().unwrap_or(0);
            if *captured != charged {
                rep.problems.push(format!(
                    "lease {id}: captured {captured} != its requests' charges {charged}"
                ));
            }
        }
        usage_problems(&mut rep, &mut tx, &packed_settled).await?;
        tx.rollback().await?;
        Ok(rep)
    }
}

/// Check 7: `usage_by_second` holds exactly the settled requests' counts, tokens and costs, per
/// account, second, key and model.
async fn usage_problems(
    rep: &mut LedgerReport,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    packed_settled: &[LeaseFinal],
) -> Result<(), StoreError> {
    type Groups = HashMap<(String, i64, String, String), [i64; 6]>;
    fn groups(rows: &[sqlx::any::AnyRow]) -> Result<Groups, sqlx::Error> {
        rows.iter()
            .map(|r| {
                let key = (r.try_get(0)?, get_i64(r, 1)?, r.try_get(2)?, r.try_get(3)?);
                let mut totals = [0; 6];
                for (i, t) in totals.iter_mut().enumerate() {
                    *t = get_i64(r, 4 + i)?;
                }
                Ok((key, totals))
            })
            .collect()
    }
    let from_requests = groups(
        &sqlx::query(
            "SELECT account_id, CAST(created_at / 1000 AS BIGINT), COALESCE(key_id, ''), model, \
             CAST(COUNT(*) AS BIGINT), CAST(SUM(prompt_tokens) AS BIGINT), \
             CAST(SUM(cached_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT), \
             CAST(SUM(reasoning_tokens) AS BIGINT), CAST(SUM(cost_micros) AS BIGINT) \
             FROM requests WHERE state = 'settled' \
             GROUP BY account_id, CAST(created_at / 1000 AS BIGINT), COALESCE(key_id, ''), model",
        )
        .fetch_all(&mut **tx)
        .await?,
    )?;
    let mut from_requests = from_requests;
    for f in packed_settled {
        let key = (
            f.account_id.clone(),
            f.created_at / 1000,
            f.key_id.clone().unwrap_or_default(),
            f.model.clone(),
        );
        let t = from_requests.entry(key).or_insert([0; 6]);
        for (t, v) in t.iter_mut().zip([
            1,
            f.prompt_tokens,
            f.cached_tokens,
            f.completion_tokens,
            f.reasoning_tokens,
            f.cost_micros,
        ]) {
            *t += v;
        }
    }
    let rolled_up = groups(
        &sqlx::query(
            "SELECT account_id, at_second, key_id, model, requests, prompt_tokens, cached_tokens, \
             completion_tokens, reasoning_tokens, cost_micros FROM usage_by_second",
        )
        .fetch_all(&mut **tx)
        .await?,
    )?;
    let mut keys: Vec<_> = from_requests.keys().chain(rolled_up.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (want, got) = (from_requests.get(k), rolled_up.get(k));
        if want != got {
            let (account, second, key, model) = k;
            rep.problems.push(format!(
                "usage of account {account} at second {second} (key {key:?}, model {model}): \
                 {got:?} != its settled requests' {want:?}"
            ));
        }
    }
    Ok(())
}
