//! tollgate: a self-hosted, OpenAI-compatible LLM API gateway.

pub mod catalog; // the model catalog and model cards
pub mod cli; // command-line interface
pub mod config; // the TOML config format, defaults and presets
pub mod error; // GatewayError, independent of HTTP
pub mod gateway; // the core: internal model, validation, routing, usage
pub mod http; // the HTTP surface (axum)
pub mod limits; // rate limits, quotas, spend caps (in-process or Redis)
pub mod openai; // OpenAI Chat Completions wire format
pub mod providers; // upstream dialect adapters
pub mod telemetry; // logging and metrics setup

use std::sync::Arc;

/// Builds the application state from a resolved config (used by `serve` and by tests).
pub fn build_state(config: config::Config) -> Result<Arc<http::AppState>, String> {
    let gateway = gateway::Gateway::new(&config)?;
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
    }))
}

/// The router for a resolved config, for tests that serve it on port 0.
pub fn app(config: config::Config) -> Result<axum::Router, String> {
    Ok(http::app(build_state(config)?))
}
