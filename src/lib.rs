//! tollgate: a self-hosted, OpenAI-compatible LLM API gateway.

pub mod anthropic; // Anthropic Messages wire format and converters
pub mod billing; // accounts, keys, prices, the hold/settle ledger
pub mod catalog; // the model catalog and model cards
pub mod cli; // command-line interface
pub mod config; // the TOML config format, defaults and presets
pub mod engine; // the embedded llama.cpp engine (dialect `local`)
pub mod error; // GatewayError, independent of HTTP
pub mod gateway; // the core: internal model, validation, routing, usage
pub mod http; // the HTTP surface (axum)
pub mod limits; // rate limits, quotas, spend caps (in-process or Redis)
pub mod openai; // OpenAI Chat Completions wire format
pub mod providers; // upstream dialect adapters
pub mod responses; // OpenAI Responses API wire format and converters
pub mod store; // the billing database (SQLite / PostgreSQL)
pub mod telemetry; // logging and metrics setup

use std::sync::Arc;

/// Builds the application state from a resolved config, without a billing store (open mode,
/// or tests that need no keys).
pub fn build_state(config: config::Config) -> Result<Arc<http::AppState>, String> {
    build_state_with(config, None)
}

/// Builds the application state with an open billing service.
pub fn build_state_with(
    config: config::Config,
    billing: Option<Arc<billing::Billing>>,
) -> Result<Arc<http::AppState>, String> {
    let gateway = match &billing {
        // With a store, requests that failed over or failed keep their attempts on their record.
        Some(b) => gateway::Gateway::with_sink(
            &config,
            Arc::new(billing::attempts::AttemptsSink {
                inner: Arc::new(gateway::usage::LogSink),
                billing: b.clone(),
            }),
        )?,
        None => gateway::Gateway::new(&config)?,
    };
    if let Some(b) = &billing {
        b.publish_prices_to(gateway.prices().clone());
    }
    let limiter = Arc::new(limits::Limiter::new(&config)?);
    let metrics = if config.server.metrics {
        telemetry::prometheus()
    } else {
        None
    };
    Ok(Arc::new(http::AppState {
        config: Arc::new(config),
        gateway,
        limiter,
        metrics,
        billing,
    }))
}

/// Opens the billing store for a config that requires auth (None in open mode), records the
/// config's route prices as price versions, and releases holds left expired by a crash.
pub async fn open_billing(
    config: &config::Config,
) -> Result<Option<Arc<billing::Billing>>, String> {
    if !config.auth.required {
        return Ok(None);
    }
    let settings = billing::BillingSettings::from_config(config);
    let mut b = billing::Billing::open(settings).await.map_err(|e| {
        format!(
            "billing store {}: {e}",
            store::redact_url(&config.database_url)
        )
    })?;
    let now = store::now_ms();
    let mut rows = Vec::new();
    for m in &config.models {
        for r in m.routes.iter().filter(|r| r.priced) {
            rows.push(store::PriceRow {
                id: None,
                model: m.id.clone(),
                provider: r.provider.clone(),
                input_micros_per_m: i64::try_from(r.price.input).unwrap_or(i64::MAX),
                cached_micros_per_m: i64::try_from(r.price.cached_input).unwrap_or(i64::MAX),
                output_micros_per_m: i64::try_from(r.price.output).unwrap_or(i64::MAX),
                fee_input_micros_per_m: 0,
                fee_cached_micros_per_m: 0,
                fee_output_micros_per_m: 0,
                markup_bps: 0,
                source: "config".to_string(),
                effective_at: now,
                created_at: now,
            });
        }
    }
    b.sync_config_price_rows(&rows)
        .await
        .map_err(|e| format!("recording config prices: {e}"))?;
    b.start_leases()
        .await
        .map_err(|e| format!("lease admission: {e}"))?;
    b.sweep_expired()
        .await
        .map_err(|e| format!("releasing expired holds: {e}"))?;
    Ok(Some(Arc::new(b)))
}

/// Like [`build_state`], with the gateway reporting every request's outcome to `sink` (tests).
pub fn build_state_with_sink(
    config: config::Config,
    sink: Arc<dyn gateway::usage::OutcomeSink>,
) -> Result<Arc<http::AppState>, String> {
    let gateway = gateway::Gateway::with_sink(&config, sink)?;
    let mut state = Arc::try_unwrap(build_state(config)?)
        .map_err(|_| "the new state is already shared".to_string())?;
    state.gateway = gateway;
    Ok(Arc::new(state))
}

/// The router for a resolved config, for tests that serve it on port 0 (no billing store).
pub fn app(config: config::Config) -> Result<axum::Router, String> {
    Ok(http::app(build_state(config)?))
}
