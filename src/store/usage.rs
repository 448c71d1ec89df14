//! Usage of settled requests, grouped by UTC day, model or key: read from `usage_by_second`
//! (migration 0007), which every write that settles a request adds to in its transaction.

use std::collections::BTreeMap;

use sqlx::Row;

use super::leases::Arg;
use super::{Store, StoreError};

/// How usage rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageGroup {
    Day,
    Model,
    Key,
}

impl std::str::FromStr for UsageGroup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(UsageGroup::Day),
            "model" => Ok(UsageGroup::Model),
            "key" => Ok(UsageGroup::Key),
            other => Err(format!(
                "group_by must be day, model or key (got {other:?})"
            )),
        }
    }
}

/// A usage query: `[from_ms, to_ms)` over one account or all accounts. A request counts by the
/// second it started in (its `created_at`): the seconds that start inside the range count, which
/// is exact for bounds on whole seconds (all the API and the CLI take).
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub account_id: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub group: UsageGroup,
}

/// One usage group. For `Day` the group is the UTC day number since 1970-01-01.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageBucket {
    pub group: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_micros: i64,
}

impl Store {
    /// Aggregates settled requests. Only fixed SQL fragments are interpolated.
    pub async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageBucket>, StoreError> {
        let group_expr = match q.group {
            UsageGroup::Day => "CAST(CAST(u.at_second / 86400 AS BIGINT) AS TEXT)",
            UsageGroup::Model => "u.model",
            UsageGroup::Key => "COALESCE(k.prefix, '')",
        };
        let account_filter = if q.account_id.is_some() {
            "AND u.account_id = $3"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {group_expr} AS g, CAST(COALESCE(SUM(u.requests), 0) AS BIGINT) AS n, \
             CAST(COALESCE(SUM(u.prompt_tokens), 0) AS BIGINT) AS p, \
             CAST(COALESCE(SUM(u.cached_tokens), 0) AS BIGINT) AS c, \
             CAST(COALESCE(SUM(u.completion_tokens), 0) AS BIGINT) AS o, \
             CAST(COALESCE(SUM(u.reasoning_tokens), 0) AS BIGINT) AS rs, \
             CAST(COALESCE(SUM(u.cost_micros), 0) AS BIGINT) AS cost \
             FROM usage_by_second u LEFT JOIN api_keys k ON k.id = u.key_id \
             WHERE u.at_second >= $1 AND u.at_second < $2 {account_filter} \
             GROUP BY {group_expr} ORDER BY {group_expr}"
        );
        let mut query = sqlx::query(&sql)
            .bind(second_from(q.from_ms))
            .bind(second_from(q.to_ms));
        if let Some(a) = &q.account_id {
            query = query.bind(a);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(UsageBucket {
                    group: r.try_get("g")?,
                    requests: r.try_get("n")?,
                    prompt_tokens: r.try_get("p")?,
                    cached_tokens: r.try_get("c")?,
                    completion_tokens: r.try_get("o")?,
                    reasoning_tokens: r.try_get("rs")?,
                    cost_micros: r.try_get("cost")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

/// The first second that starts at or after `ms`.
fn second_from(ms: i64) -> i64 {
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
}

/// Adds a group of settled requests to `usage_by_second` (SQLite numbers `$n` parameters in
/// order of appearance, which here is `n`'s order).
pub(super) const ADD_USAGE: &str =
    "INSERT INTO usage_by_second (account_id, at_second, key_id, model, \
     requests, prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, cost_micros) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (account_id, at_second, key_id, model) DO UPDATE SET \
     requests = usage_by_second.requests + excluded.requests, \
     prompt_tokens = usage_by_second.prompt_tokens + excluded.prompt_tokens, \
     cached_tokens = usage_by_second.cached_tokens + excluded.cached_tokens, \
     completion_tokens = usage_by_second.completion_tokens + excluded.completion_tokens, \
     reasoning_tokens = usage_by_second.reasoning_tokens + excluded.reasoning_tokens, \
     cost_micros = usage_by_second.cost_micros + excluded.cost_micros";

/// [`ADD_USAGE`] with `?` parameters, for a SQLite batch of several statements (where `$n`
/// would number across all of them).
pub(super) static ADD_USAGE_SQLITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    (1..=10).rev().fold(ADD_USAGE.to_string(), |sql, n| {
        sql.replace(&format!("${n}"), "?")
    })
});

/// One settled request as `usage_by_second` counts it.
#[derive(Debug, Clone, Copy)]
pub(super) struct UsageRow<'a> {
    pub(super) account_id: &'a str,
    pub(super) key_id: Option<&'a str>,
    pub(super) model: &'a str,
    pub(super) created_at: i64,
    /// Prompt, cached, completion and reasoning tokens.
    pub(super) tokens: [i64; 4],
    pub(super) cost_micros: i64,
}

impl<'a> UsageRow<'a> {
    pub(super) fn of_final(f: &'a super::leases::LeaseFinal) -> Option<Self> {
        (f.state == "settled").then(|| UsageRow {
            account_id: &f.account_id,
            key_id: f.key_id.as_deref(),
            model: &f.model,
            created_at: f.created_at,
            tokens: [
                f.prompt_tokens,
                f.cached_tokens,
                f.completion_tokens,
                f.reasoning_tokens,
            ],
            cost_micros: f.cost_micros,
        })
    }

    pub(super) fn of_row(r: &'a super::RequestRow) -> Option<Self> {
        (r.state == "settled").then(|| UsageRow {
            account_id: &r.account_id,
            key_id: r.key_id.as_deref(),
            model: &r.model,
            created_at: r.created_at,
            tokens: [
                r.prompt_tokens,
                r.cached_tokens,
                r.completion_tokens,
                r.reasoning_tokens,
            ],
            cost_micros: r.cost_micros,
        })
    }
}

/// The statements that add settled requests to `usage_by_second`: one per account, second, key
/// and model, in that order (every writer locks the rows in the same order).
pub(super) fn usage_statements<'a>(
    settled: impl IntoIterator<Item = UsageRow<'a>>,
) -> Vec<(&'static str, Vec<Arg>)> {
    // (requests, prompt, cached, completion, reasoning, cost)
    let mut groups: BTreeMap<(&str, i64, &str, &str), [i64; 6]> = BTreeMap::new();
    for s in settled {
        let key = (
            s.account_id,
            s.created_at.div_euclid(1000),
            s.key_id.unwrap_or(""),
            s.model,
        );
        let g = groups.entry(key).or_default();
        g[0] += 1;
        for (t, n) in g[1..5].iter_mut().zip(s.tokens) {
            *t += n;
        }
        g[5] += s.cost_micros;
    }
    groups
        .into_iter()
        .map(|((account, second, key, model), totals)| {
            let mut args = vec![
                Arg::Text(account.to_string()),
                Arg::Int(second),
                Arg::Text(key.to_string()),
                Arg::Text(model.to_string()),
            ];
            args.extend(totals.map(Arg::Int));
            (ADD_USAGE, args)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 0007 adds up the settled requests already written (and only those), and drops
    /// the request table's index by account and time.
    #[test]
    fn migration_0007_adds_up_the_settled_requests_already_written() {
        let conn = rusqlite::Connection::open_in_memory().unwrap_or_else(|e| panic!("open: {e}"));
        let before = [
            include_str!("../../migrations/sqlite/0001_billing.sql"),
            include_str!("../../migrations/sqlite/0003_limits_overrides.sql"),
            include_str!("../../migrations/sqlite/0004_request_attempts.sql"),
            include_str!("../../migrations/sqlite/0005_credit_leases.sql"),
            include_str!("../../migrations/sqlite/0006_requests_state_check.sql"),
        ];
        for m in before {
            conn.execute_batch(m)
                .unwrap_or_else(|e| panic!("migration: {e}"));
        }
        // (id, key, model, state, tokens, cost, created_at)
        let rows = [
            ("r1", Some("k1"), "m", "settled", 10, 100, 5_000),
            ("r2", Some("k1"), "m", "settled", 20, 200, 5_999),
            ("r3", Some("k1"), "m", "settled", 40, 400, 6_000),
            ("r4", None, "m", "settled", 80, 800, 5_100),
            ("r5", Some("k1"), "n", "settled", 160, 1_600, 5_200),
            ("r6", Some("k1"), "m", "released", 320, 0, 5_300),
            ("r7", Some("k1"), "m", "held", 0, 0, 5_400),
        ];
        conn.execute(
            "INSERT INTO accounts (id, name, created_at) VALUES ('a1', 'acme', 0)",
            [],
        )
        .unwrap_or_else(|e| panic!("account: {e}"));
        for (id, key, model, state, tokens, cost, at) in rows {
            conn.execute(
                "INSERT INTO requests (id, account_id, key_id, model, state, hold_micros, \
                 hold_expires_at, prompt_tokens, cached_tokens, completion_tokens, \
                 reasoning_tokens, cost_micros, created_at) \
                 VALUES (?1, 'a1', ?2, ?3, ?4, 5000, 0, ?5, ?5 / 10, ?5 * 2, ?5 / 2, ?6, ?7)",
                rusqlite::params![id, key, model, state, tokens, cost, at],
            )
            .unwrap_or_else(|e| panic!("row {id}: {e}"));
        }
        conn.execute_batch(include_str!(
            "../../migrations/sqlite/0007_usage_by_second.sql"
        ))
        .unwrap_or_else(|e| panic!("migration 0007: {e}"));
        let got: Vec<(String, i64, String, String, [i64; 6])> = conn
            .prepare(
                "SELECT account_id, at_second, key_id, model, requests, prompt_tokens, \
                 cached_tokens, completion_tokens, reasoning_tokens, cost_micros \
                 FROM usage_by_second ORDER BY account_id, at_second, key_id, model",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    let mut t = [0i64; 6];
                    for (i, v) in t.iter_mut().enumerate() {
                        *v = r.get(4 + i)?;
                    }
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, t))
                })?
                .collect()
            })
            .unwrap_or_else(|e| panic!("usage: {e}"));
        let g = |second, key: &str, model: &str, t: [i64; 6]| {
            (
                "a1".to_string(),
                second,
                key.to_string(),
                model.to_string(),
                t,
            )
        };
        assert_eq!(
            got,
            vec![
                g(5, "", "m", [1, 80, 8, 160, 40, 800]),
                g(5, "k1", "m", [2, 30, 3, 60, 15, 300]),
                g(5, "k1", "n", [1, 160, 16, 320, 80, 1_600]),
                g(6, "k1", "m", [1, 40, 4, 80, 20, 400]),
            ]
        );
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' \
                 ORDER BY name",
            )
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .unwrap_or_else(|e| panic!("indexes: {e}"));
        assert_eq!(
            indexes,
            ["requests_open_holds", "sqlite_autoindex_requests_1"]
        );
    }

    #[test]
    fn a_range_counts_the_seconds_that_start_inside_it() {
        assert_eq!(second_from(5_000), 5);
        assert_eq!(second_from(5_001), 6);
        assert_eq!(second_from(5_999), 6);
        assert_eq!(second_from(-1), 0);
        assert_eq!(second_from(-1_000), -1);
        // `to` = now + 1 ms still counts the second now is in.
        assert_eq!(second_from(5_400 + 1), 6);
    }

    #[test]
    fn settled_requests_are_added_per_account_second_key_and_model() {
        let s = |account, key, model, created_at, cost| UsageRow {
            account_id: account,
            key_id: key,
            model,
            created_at,
            tokens: [10, 2, 5, 1],
            cost_micros: cost,
        };
        let stmts = usage_statements([
            s("b", Some("k1"), "m", 2_500, 7),
            s("a", Some("k1"), "m", 2_999, 3),
            s("a", Some("k1"), "m", 2_000, 4),
            s("a", None, "m", 2_000, 5),
            s("a", Some("k1"), "m", 3_000, 6),
            s("a", Some("k1"), "n", 2_000, 8),
        ]);
        let rows: Vec<Vec<Arg>> = stmts
            .into_iter()
            .map(|(sql, args)| {
                assert_eq!(sql, ADD_USAGE);
                args
            })
            .collect();
        use Arg::{Int, Text};
        let row = |a: &str, sec, k: &str, m: &str, n, cost| {
            vec![
                Text(a.into()),
                Int(sec),
                Text(k.into()),
                Text(m.into()),
                Int(n),
                Int(10 * n),
                Int(2 * n),
                Int(5 * n),
                Int(n),
                Int(cost),
            ]
        };
        assert_eq!(
            rows,
            vec![
                row("a", 2, "", "m", 1, 5),
                row("a", 2, "k1", "m", 2, 7),
                row("a", 2, "k1", "n", 1, 8),
                row("a", 3, "k1", "m", 1, 6),
                row("b", 2, "k1", "m", 1, 7),
            ]
        );
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::store::ledger::HoldOutcome;
    use crate::store::{FinalState, HoldInsert, SettleWrite};

    /// A settlement in a transaction of its own (the path a failed group commit falls back to)
    /// adds to the usage table as the grouped one does: the checker finds them equal, and usage
    /// reads it back.
    #[tokio::test]
    async fn a_settlement_on_its_own_adds_its_usage() {
        let (_dir, store, acct) = crate::store::test_support::funded_file_store().await;
        for (id, state) in [("r1", FinalState::Settled), ("r2", FinalState::Released)] {
            let hold = HoldInsert {
                request_id: id.to_string(),
                account_id: acct.id.clone(),
                key_id: None,
                key_capped: false,
                model: "m".to_string(),
                provider: None,
                price_id: None,
                hold_micros: 5_000,
                expires_at: super::super::now_ms() + 60_000,
            };
            let held = store.place_hold_direct(&hold).await;
            assert!(matches!(held, Ok(HoldOutcome::Held)), "{held:?}");
            let settled = state == FinalState::Settled;
            let w = SettleWrite {
                captured_micros: if settled { 1_234 } else { 0 },
                prompt_tokens: 10,
                cached_tokens: 2,
                completion_tokens: 5,
                reasoning_tokens: 1,
                ..SettleWrite::default()
            };
            let done = store.finalize_direct(id, state, &w, None).await;
            assert!(matches!(done, Ok(Some(_))), "{done:?}");
        }
        let rep = store
            .check_ledger(None)
            .await
            .unwrap_or_else(|e| panic!("check: {e}"));
        assert!(rep.is_ok(), "{:?}", rep.problems);
        let usage = store
            .usage(&UsageQuery {
                account_id: Some(acct.id.clone()),
                from_ms: 0,
                to_ms: super::super::now_ms() + 1,
                group: UsageGroup::Model,
            })
            .await
            .unwrap_or_else(|e| panic!("usage: {e}"));
        assert_eq!(
            usage,
            vec![UsageBucket {
                group: "m".to_string(),
                requests: 1,
                prompt_tokens: 10,
                cached_tokens: 2,
                completion_tokens: 5,
                reasoning_tokens: 1,
                cost_micros: 1_234,
            }]
        );
        store.close().await;
    }
}
