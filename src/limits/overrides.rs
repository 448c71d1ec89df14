//! Per-account and per-key limit overrides in the database (`account_limit_overrides`,
//! `key_limit_overrides`): the one read per request of a key's plan and overrides, the changes
//! made by the admin API and CLI, and their JSON and command-line forms.
//!
//! An override row holds one nullable column per limit; NULL means "the plan's value applies".

use std::sync::LazyLock;

use serde_json::{json, Map, Value};
use sqlx::Row;

use super::LimitKind;
use crate::config::PlanConfig;
use crate::store::{now_ms, Store, StoreError};

/// Largest count a limit may be set to (as in `[[plans]]`).
pub const MAX_COUNT: u64 = 1_000_000_000;
/// Largest spend cap in micro-USD (USD 1e9; exact in the Redis script's doubles).
pub const MAX_MICROS: u64 = 1_000_000_000_000_000;

/// What a request's limits are computed from: the account's plan name and both override sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectRow {
    pub plan: Option<String>,
    pub account: PlanConfig,
    pub key: PlanConfig,
}

/// Whose overrides: an account or a key, by id.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Account(&'a str),
    Key(&'a str),
}

impl Target<'_> {
    fn table(&self) -> (&'static str, &'static str, &str) {
        match self {
            Target::Account(id) => ("account_limit_overrides", "account_id", id),
            Target::Key(id) => ("key_limit_overrides", "key_id", id),
        }
    }
}

/// A change to a subject's overrides: optionally clear all first, then set (`Some`) or clear
/// (`None`) each listed limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patch {
    pub clear_all: bool,
    pub set: Vec<(LimitKind, Option<u64>)>,
}

impl Patch {
    pub fn is_empty(&self) -> bool {
        !self.clear_all && self.set.is_empty()
    }
}

/// The column of a limit in the override tables.
fn column(k: LimitKind) -> &'static str {
    match k {
        LimitKind::RequestsPerMinute => "requests_per_minute",
        LimitKind::TokensPerMinute => "tokens_per_minute",
        LimitKind::MaxConcurrent => "max_concurrent",
        LimitKind::RequestsPerDay => "requests_per_day",
        LimitKind::TokensPerDay => "tokens_per_day",
        LimitKind::SpendCapDaily => "spend_cap_daily_micros",
        LimitKind::SpendCapMonthly => "spend_cap_monthly_micros",
    }
}

/// The JSON field of a limit (money in USD, as in `[[plans]]`).
pub fn json_name(k: LimitKind) -> &'static str {
    match k {
        LimitKind::SpendCapDaily => "spend_cap_daily_usd",
        LimitKind::SpendCapMonthly => "spend_cap_monthly_usd",
        other => other.name(),
    }
}

fn checked(k: LimitKind, v: u64) -> Result<u64, String> {
    let max = if k.is_money() { MAX_MICROS } else { MAX_COUNT };
    if v == 0 {
        Err(format!(
            "{} must be at least 1 (clear the override with null / none instead)",
            json_name(k)
        ))
    } else if v > max {
        Err(format!(
            "{} = {v} is larger than the supported {max}",
            json_name(k)
        ))
    } else {
        Ok(v)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_db(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn overrides_from(row: &sqlx::any::AnyRow, prefix: &str) -> Result<PlanConfig, sqlx::Error> {
    let mut p = PlanConfig::default();
    for (i, k) in LimitKind::ALL.iter().enumerate() {
        let v: Option<i64> = row.try_get(format!("{prefix}{i}").as_str())?;
        k.set(&mut p, from_db(v));
    }
    Ok(p)
}

/// The columns of a key's plan and overrides, for a query over `accounts a` with
/// `account_limit_overrides ao` and `key_limit_overrides ko` joined (`a.plan, ao.… AS a0, ko.… AS
/// k0, …`); [`subject_from`] reads them back. The key lookup of authentication selects them too,
/// so a billed request reads its limits in the same batched query as its key.
pub static SUBJECT_COLS: LazyLock<String> = LazyLock::new(|| {
    let mut cols = vec!["a.plan".to_string()];
    for (i, k) in LimitKind::ALL.iter().enumerate() {
        cols.push(format!("ao.{} AS a{i}", column(*k)));
        cols.push(format!("ko.{} AS k{i}", column(*k)));
    }
    cols.join(", ")
});

/// The plan and overrides from a row that selected [`SUBJECT_COLS`].
pub fn subject_from(row: &sqlx::any::AnyRow) -> Result<SubjectRow, sqlx::Error> {
    Ok(SubjectRow {
        plan: row.try_get("plan")?,
        account: overrides_from(row, "a")?,
        key: overrides_from(row, "k")?,
    })
}

/// The per-request read: plan, account overrides and key overrides in one indexed query.
static SUBJECT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM accounts a \
         LEFT JOIN account_limit_overrides ao ON ao.account_id = a.id \
         LEFT JOIN key_limit_overrides ko ON ko.key_id = $2 \
         WHERE a.id = $1",
        *SUBJECT_COLS
    )
});

/// The plan and overrides of key `key_id` of account `account_id` (`None`: no such account).
pub async fn read_subject(
    store: &Store,
    account_id: &str,
    key_id: &str,
) -> Result<Option<SubjectRow>, StoreError> {
    let row = sqlx::query(&SUBJECT_SQL)
        .bind(account_id)
        .bind(key_id)
        .fetch_optional(store.pool())
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(subject_from(&row)?))
}

/// The overrides of an account or key (all `None` when it has none).
pub async fn read(store: &Store, target: Target<'_>) -> Result<PlanConfig, StoreError> {
    let (table, id_col, id) = target.table();
    let cols: Vec<String> = LimitKind::ALL
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} AS o{i}", column(*k)))
        .collect();
    let sql = format!(
        "SELECT {} FROM {table} WHERE {id_col} = $1",
        cols.join(", ")
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(store.pool())
        .await?;
    match row {
        Some(r) => Ok(overrides_from(&r, "o")?),
        None => Ok(PlanConfig::default()),
    }
}

/// Applies `patch` to the overrides of `target` (one atomic upsert) and returns the result.
pub async fn apply(
    store: &Store,
    target: Target<'_>,
    patch: &Patch,
) -> Result<PlanConfig, StoreError> {
    let (table, id_col, id) = target.table();
    {
        let _gate = store.write_gate().await;
        let mut tx = store.begin_write().await?;
        if patch.clear_all {
            sqlx::query(&format!("DELETE FROM {table} WHERE {id_col} = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        if !patch.set.is_empty() {
            let cols: Vec<&str> = patch.set.iter().map(|(k, _)| column(*k)).collect();
            let params: Vec<String> = (0..cols.len()).map(|i| format!("${}", i + 2)).collect();
            let updates: Vec<String> = cols
                .iter()
                .chain(std::iter::once(&"updated_at"))
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            let sql = format!(
                "INSERT INTO {table} ({id_col}, {}, updated_at) VALUES ($1, {}, ${}) \
                 ON CONFLICT ({id_col}) DO UPDATE SET {}",
                cols.join(", "),
                params.join(", "),
                cols.len() + 2,
                updates.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(id);
            for (_, v) in &patch.set {
                q = q.bind(v.map(to_i64));
            }
            q.bind(now_ms()).execute(&mut *tx).await?;
        }
        store.commit_key_change(tx, true).await?;
    }
    read(store, target).await
}

/// Sets (or clears) the plan of account `name`; false when there is no such account.
pub async fn set_plan(store: &Store, name: &str, plan: Option<&str>) -> Result<bool, StoreError> {
    let _gate = store.write_gate().await;
    let mut tx = store.begin_write().await?;
    let res = sqlx::query("UPDATE accounts SET plan = $1 WHERE name = $2")
        .bind(plan)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    store.commit_key_change(tx, res.rows_affected() > 0).await?;
    Ok(res.rows_affected() == 1)
}

/// A set of limits as JSON: every limit, `null` where unset, spend caps in USD.
pub fn to_json(p: &PlanConfig) -> Value {
    let mut m = Map::new();
    for k in LimitKind::ALL {
        let v = match k.of(p) {
            None => Value::Null,
            Some(v) if k.is_money() => crate::billing::usd_json(to_i64(v)),
            Some(v) => json!(v),
        };
        m.insert(json_name(k).to_string(), v);
    }
    Value::Object(m)
}

/// A patch from a JSON object: each field a number (USD for spend caps, as a number or decimal
/// string) or `null` to clear it. Unknown fields are refused.
pub fn patch_from_json(v: &Value) -> Result<Patch, String> {
    let Some(obj) = v.as_object() else {
        return Err("limits must be a JSON object".into());
    };
    let mut patch = Patch::default();
    for (name, value) in obj {
        let Some(k) = LimitKind::ALL
            .iter()
            .copied()
            .find(|k| json_name(*k) == name)
        else {
            let known: Vec<&str> = LimitKind::ALL.iter().map(|k| json_name(*k)).collect();
            return Err(format!(
                "unknown limit `{name}`; expected one of {}",
                known.join(", ")
            ));
        };
        let parsed = match value {
            Value::Null => None,
            Value::Number(n) if k.is_money() => Some(usd_micros(name, &n.to_string())?),
            Value::String(s) if k.is_money() => Some(usd_micros(name, s)?),
            Value::Number(n) => Some(
                n.as_u64()
                    .ok_or_else(|| format!("`{name}` must be a positive integer or null"))?,
            ),
            _ => return Err(format!("`{name}` must be a number or null")),
        };
        patch
            .set
            .push((k, parsed.map(|v| checked(k, v)).transpose()?));
    }
    Ok(patch)
}

fn usd_micros(what: &str, s: &str) -> Result<u64, String> {
    let m = crate::billing::parse_usd(s).map_err(|e| format!("`{what}`: {e}"))?;
    u64::try_from(m).map_err(|_| format!("`{what}` must not be negative"))
}

/// `--requests-per-minute N …` of `tollgate accounts limits` / `tollgate keys limits`. Each takes
/// a value or `none` (clear that override); without any, the command only shows the overrides.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitArgs {
    /// Requests per minute (each key of an account; GCRA).
    #[arg(long, value_name = "N|none")]
    pub requests_per_minute: Option<String>,
    /// Tokens per minute (each key of an account).
    #[arg(long, value_name = "N|none")]
    pub tokens_per_minute: Option<String>,
    /// Requests in flight at once (each key of an account).
    #[arg(long, value_name = "N|none")]
    pub max_concurrent: Option<String>,
    /// Requests per calendar day (`[limits] timezone`).
    #[arg(long, value_name = "N|none")]
    pub requests_per_day: Option<String>,
    /// Tokens per calendar day.
    #[arg(long, value_name = "N|none")]
    pub tokens_per_day: Option<String>,
    /// Spend cap per day, in USD.
    #[arg(long, value_name = "USD|none")]
    pub spend_cap_daily: Option<String>,
    /// Spend cap per month, in USD.
    #[arg(long, value_name = "USD|none")]
    pub spend_cap_monthly: Option<String>,
    /// Remove every override first (the plan applies again).
    #[arg(long)]
    pub clear: bool,
}

impl LimitArgs {
    pub fn patch(&self) -> Result<Patch, String> {
        let args = [
            (LimitKind::RequestsPerMinute, &self.requests_per_minute),
            (LimitKind::TokensPerMinute, &self.tokens_per_minute),
            (LimitKind::MaxConcurrent, &self.max_concurrent),
            (LimitKind::RequestsPerDay, &self.requests_per_day),
            (LimitKind::TokensPerDay, &self.tokens_per_day),
            (LimitKind::SpendCapDaily, &self.spend_cap_daily),
            (LimitKind::SpendCapMonthly, &self.spend_cap_monthly),
        ];
        let mut patch = Patch {
            clear_all: self.clear,
            set: Vec::new(),
        };
        for (k, arg) in args {
            let Some(text) = arg else { continue };
            let flag = format!("--{}", k.name().replace('_', "-"));
            let v = if text.trim() == "none" {
                None
            } else if k.is_money() {
                Some(checked(k, usd_micros(&flag, text)?)?)
            } else {
                let n = text
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{flag} takes a whole number or `none`, not {text:?}"))?;
                Some(checked(k, n)?)
            };
            patch.set.push((k, v));
        }
        Ok(patch)
    }
}

/// The overrides as `name<TAB>value` lines (`-` when unset; spend caps in USD).
pub fn to_lines(p: &PlanConfig) -> String {
    let mut out = String::new();
    for k in LimitKind::ALL {
        let v = match k.of(p) {
            None => "-".to_string(),
            Some(v) if k.is_money() => crate::billing::format_usd(to_i64(v)),
            Some(v) => v.to_string(),
        };
        out.push_str(&format!("{}\t{v}\n", json_name(k)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_patch_sets_clears_and_refuses() {
        let p = patch_from_json(&json!({
            "requests_per_minute": 5,
            "tokens_per_day": null,
            "spend_cap_daily_usd": "1.50",
            "spend_cap_monthly_usd": 20
        }))
        .expect("patch");
        assert!(p.set.contains(&(LimitKind::RequestsPerMinute, Some(5))));
        assert!(p.set.contains(&(LimitKind::TokensPerDay, None)));
        assert!(p.set.contains(&(LimitKind::SpendCapDaily, Some(1_500_000))));
        assert!(p
            .set
            .contains(&(LimitKind::SpendCapMonthly, Some(20_000_000))));
        assert!(patch_from_json(&json!({"requests_per_minute": 0})).is_err());
        assert!(patch_from_json(&json!({"requests_per_minute": -1})).is_err());
        assert!(patch_from_json(&json!({"requests_per_minute": 2_000_000_000u64})).is_err());
        assert!(patch_from_json(&json!({"rpm": 5})).is_err());
        assert!(patch_from_json(&json!([1])).is_err());
    }

    #[test]
    fn cli_args_to_patch() {
        let a = LimitArgs {
            requests_per_minute: Some("7".into()),
            max_concurrent: Some("none".into()),
            spend_cap_daily: Some("0.25".into()),
            ..Default::default()
        };
        let p = a.patch().expect("patch");
        assert_eq!(
            p.set,
            vec![
                (LimitKind::RequestsPerMinute, Some(7)),
                (LimitKind::MaxConcurrent, None),
                (LimitKind::SpendCapDaily, Some(250_000)),
            ]
        );
        let bad = LimitArgs {
            tokens_per_minute: Some("lots".into()),
            ..Default::default()
        };
        assert!(bad.patch().is_err());
        assert!(LimitArgs::default().patch().expect("empty").is_empty());
    }

    #[test]
    fn json_round_trip_of_values() {
        let mut p = PlanConfig::default();
        LimitKind::RequestsPerDay.set(&mut p, Some(100));
        LimitKind::SpendCapMonthly.set(&mut p, Some(2_500_000));
        let v = to_json(&p);
        assert_eq!(v["requests_per_day"], 100);
        assert_eq!(v["spend_cap_monthly_usd"], 2.5);
        assert!(v["requests_per_minute"].is_null());
        let back = patch_from_json(&v).expect("patch");
        let mut q = PlanConfig::default();
        for (k, val) in back.set {
            k.set(&mut q, val);
        }
        assert_eq!(q, p);
    }

    #[tokio::test]
    async fn store_round_trip_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&url).await.expect("store");
        let a = store
            .create_account("acme", Some("pro"))
            .await
            .expect("create")
            .expect("new");
        let none = read_subject(&store, &a.id, "key_x").await.expect("read");
        assert_eq!(
            none,
            Some(SubjectRow {
                plan: Some("pro".into()),
                ..Default::default()
            })
        );
        let patch = Patch {
            clear_all: false,
            set: vec![
                (LimitKind::RequestsPerMinute, Some(3)),
                (LimitKind::SpendCapDaily, Some(10)),
            ],
        };
        let o = apply(&store, Target::Account(&a.id), &patch)
            .await
            .expect("apply");
        assert_eq!(o.requests_per_minute, Some(3));
        // A second patch changes only what it names.
        let o = apply(
            &store,
            Target::Account(&a.id),
            &Patch {
                clear_all: false,
                set: vec![(LimitKind::RequestsPerMinute, None)],
            },
        )
        .await
        .expect("apply");
        assert_eq!(o.requests_per_minute, None);
        assert_eq!(o.spend_cap_daily_micros, Some(10));
        // Each of those changes, and the plan's below, moves the key epoch (key caches watch it).
        assert_eq!(store.key_epoch().await.expect("epoch"), 2);
        assert!(set_plan(&store, "acme", None).await.expect("plan"));
        assert_eq!(store.key_epoch().await.expect("epoch"), 3);
        assert!(!set_plan(&store, "nobody", None).await.expect("plan"));
        assert_eq!(
            store.key_epoch().await.expect("epoch"),
            3,
            "nothing changed"
        );
        // This process counted the same three, as they committed (its key caches watch that).
        assert_eq!(store.key_changes(), 3);
        let row = read_subject(&store, &a.id, "key_x")
            .await
            .expect("read")
            .expect("row");
        assert_eq!(row.plan, None);
        assert_eq!(row.account.spend_cap_daily_micros, Some(10));
        let o = apply(
            &store,
            Target::Account(&a.id),
            &Patch {
                clear_all: true,
                set: Vec::new(),
            },
        )
        .await
        .expect("clear");
        assert_eq!(o, PlanConfig::default());
    }
}
