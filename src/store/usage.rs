//! Usage aggregation over settled requests, grouped by UTC day, model or key.

use sqlx::Row;

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

/// A usage query: `[from_ms, to_ms)` over one account or all accounts.
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
            UsageGroup::Day => "CAST(CAST(r.created_at / 86400000 AS BIGINT) AS TEXT)",
            UsageGroup::Model => "r.model",
            UsageGroup::Key => "COALESCE(k.prefix, '')",
        };
        let account_filter = if q.account_id.is_some() {
            "AND r.account_id = $3"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {group_expr} AS g, CAST(COUNT(*) AS BIGINT) AS n, \
             CAST(COALESCE(SUM(r.prompt_tokens), 0) AS BIGINT) AS p, \
             CAST(COALESCE(SUM(r.cached_tokens), 0) AS BIGINT) AS c, \
             CAST(COALESCE(SUM(r.completion_tokens), 0) AS BIGINT) AS o, \
             CAST(COALESCE(SUM(r.reasoning_tokens), 0) AS BIGINT) AS rs, \
             CAST(COALESCE(SUM(r.cost_micros), 0) AS BIGINT) AS cost \
             FROM requests r LEFT JOIN api_keys k ON k.id = r.key_id \
             WHERE r.state = 'settled' AND r.created_at >= $1 AND r.created_at < $2 {account_filter} \
             GROUP BY {group_expr} ORDER BY {group_expr}"
        );
        let mut query = sqlx::query(&sql).bind(q.from_ms).bind(q.to_ms);
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
