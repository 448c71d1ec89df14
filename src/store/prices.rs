//! Price versions per model route (model + provider), each with an effective time.

use sqlx::Row;

use super::{now_ms, Store, StoreError};

/// One price version. Prices are integer micro-USD per 1M tokens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PriceRow {
    pub id: Option<i64>,
    pub model: String,
    /// Provider name of the route; empty = applies to every route of the model.
    pub provider: String,
    pub input_micros_per_m: i64,
    pub cached_micros_per_m: i64,
    pub output_micros_per_m: i64,
    pub fee_input_micros_per_m: i64,
    pub fee_cached_micros_per_m: i64,
    pub fee_output_micros_per_m: i64,
    /// Markup on the network price, in basis points (100 bps = 1%).
    pub markup_bps: i64,
    pub source: String,
    pub effective_at: i64,
    pub created_at: i64,
}

impl PriceRow {
    /// True when two versions charge the same amounts (ignores ids and times).
    pub fn same_amounts(&self, o: &PriceRow) -> bool {
        self.input_micros_per_m == o.input_micros_per_m
            && self.cached_micros_per_m == o.cached_micros_per_m
            && self.output_micros_per_m == o.output_micros_per_m
            && self.fee_input_micros_per_m == o.fee_input_micros_per_m
            && self.fee_cached_micros_per_m == o.fee_cached_micros_per_m
            && self.fee_output_micros_per_m == o.fee_output_micros_per_m
            && self.markup_bps == o.markup_bps
    }
}

const COLS: &str =
    "id, model, provider, input_micros_per_m, cached_micros_per_m, output_micros_per_m, \
     fee_input_micros_per_m, fee_cached_micros_per_m, fee_output_micros_per_m, markup_bps, source, \
     effective_at, created_at";

fn price_from(row: &sqlx::any::AnyRow) -> Result<PriceRow, sqlx::Error> {
    Ok(PriceRow {
        id: Some(row.try_get("id")?),
        model: row.try_get("model")?,
        provider: row.try_get("provider")?,
        input_micros_per_m: row.try_get("input_micros_per_m")?,
        cached_micros_per_m: row.try_get("cached_micros_per_m")?,
        output_micros_per_m: row.try_get("output_micros_per_m")?,
        fee_input_micros_per_m: row.try_get("fee_input_micros_per_m")?,
        fee_cached_micros_per_m: row.try_get("fee_cached_micros_per_m")?,
        fee_output_micros_per_m: row.try_get("fee_output_micros_per_m")?,
        markup_bps: row.try_get("markup_bps")?,
        source: row.try_get("source")?,
        effective_at: row.try_get("effective_at")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Appends a price version (prices are never edited; a change is a new version).
    pub async fn insert_price(&self, p: &PriceRow) -> Result<PriceRow, StoreError> {
        let _gate = self.write_gate().await;
        let now = now_ms();
        let sql = format!(
            "INSERT INTO prices (model, provider, input_micros_per_m, cached_micros_per_m, \
             output_micros_per_m, fee_input_micros_per_m, fee_cached_micros_per_m, \
             fee_output_micros_per_m, markup_bps, source, effective_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {COLS}"
        );
        let row = sqlx::query(&sql)
            .bind(&p.model)
            .bind(&p.provider)
            .bind(p.input_micros_per_m)
            .bind(p.cached_micros_per_m)
            .bind(p.output_micros_per_m)
            .bind(p.fee_input_micros_per_m)
            .bind(p.fee_cached_micros_per_m)
            .bind(p.fee_output_micros_per_m)
            .bind(p.markup_bps)
            .bind(&p.source)
            .bind(p.effective_at)
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        Ok(price_from(&row)?)
    }

    /// Every price version of a model (all providers), oldest effective first.
    pub async fn price_history(&self, model: &str) -> Result<Vec<PriceRow>, StoreError> {
        let sql = format!("SELECT {COLS} FROM prices WHERE model = $1 ORDER BY effective_at, id");
        let rows = sqlx::query(&sql).bind(model).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(price_from).collect::<Result<_, _>>()?)
    }

    /// Every price version of every model.
    pub async fn all_prices(&self) -> Result<Vec<PriceRow>, StoreError> {
        let sql = format!("SELECT {COLS} FROM prices ORDER BY model, provider, effective_at, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(price_from).collect::<Result<_, _>>()?)
    }
}
