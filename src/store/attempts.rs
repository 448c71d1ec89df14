//! The upstream attempts of a request (table `request_attempts`), for requests that failed over,
//! were retried or failed.

use sqlx::Row;

use super::{Store, StoreError};

/// One upstream attempt, in the order made (`n` from 0).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttemptRow {
    pub n: i64,
    pub provider: String,
    pub upstream_model: String,
    /// `served`, `failed`, `timed_out`, `rate_limited` or `rejected`.
    pub result: String,
    pub http_status: Option<i64>,
    /// Milliseconds from the request's start to the attempt's start.
    pub started_ms: i64,
    pub duration_ms: i64,
    /// A short, text-free reason for a failed attempt.
    pub error: Option<String>,
}

impl Store {
    /// Records a request's attempts (once: a second call for the same request changes nothing).
    pub async fn record_attempts(
        &self,
        request_id: &str,
        attempts: &[AttemptRow],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for a in attempts {
            sqlx::query(
                "INSERT INTO request_attempts (request_id, n, provider, upstream_model, result, \
                 http_status, started_ms, duration_ms, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            )
            .bind(request_id)
            .bind(a.n)
            .bind(&a.provider)
            .bind(&a.upstream_model)
            .bind(&a.result)
            .bind(a.http_status)
            .bind(a.started_ms)
            .bind(a.duration_ms)
            .bind(a.error.as_deref())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A request's recorded attempts, in order (empty when it had none worth recording).
    pub async fn request_attempts(&self, request_id: &str) -> Result<Vec<AttemptRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT CAST(n AS BIGINT) AS n, provider, upstream_model, result, \
             CAST(http_status AS BIGINT) AS http_status, CAST(started_ms AS BIGINT) AS started_ms, \
             CAST(duration_ms AS BIGINT) AS duration_ms, error \
             FROM request_attempts WHERE request_id = $1 ORDER BY n",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRow {
                    n: r.try_get("n")?,
                    provider: r.try_get("provider")?,
                    upstream_model: r.try_get("upstream_model")?,
                    result: r.try_get("result")?,
                    http_status: r.try_get("http_status")?,
                    started_ms: r.try_get("started_ms")?,
                    duration_ms: r.try_get("duration_ms")?,
                    error: r.try_get("error")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
