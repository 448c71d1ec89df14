//! The HTTP surface (the only module that knows axum): router, middleware, server lifecycle.

pub mod admin;
pub mod billing;
pub mod chat;
pub mod error;
pub mod limits;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Config;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use error::ApiError;

/// State shared by every handler.
pub struct AppState {
    pub config: Arc<Config>,
    pub gateway: Gateway,
    pub limiter: Arc<crate::limits::Limiter>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Accounts, keys and the ledger; None in open mode (nothing is billed then).
    pub billing: Option<Arc<crate::billing::Billing>>,
}

/// The request's id, set by the request-id middleware and echoed in `x-request-id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Builds the router.
pub fn app(state: Arc<AppState>) -> Router {
    let billing = state.billing.clone();
    let router = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/admin/v1/keys/{prefix}/limits", get(limits::key_limits))
        .fallback(not_found)
        .layer(middleware::from_fn(request_id))
        .with_state(state);
    match billing {
        Some(b) => router.merge(admin::router(b)),
        None => router,
    }
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = format!("req_{}", uuid::Uuid::now_v7().simple());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The caller's key from `Authorization: Bearer` or `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some(k) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(k.trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

pub use billing::authorize;

async fn list_models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers).await?;
    let cat = state.gateway.catalog();
    let data: Vec<_> = cat.models().iter().map(|m| cat.card(m)).collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers).await?;
    let cat = state.gateway.catalog();
    // `/v1/models/{id}/pricing-history` (model ids may contain '/', so it is routed here)
    if let (Some(mid), Some(b)) = (id.strip_suffix("/pricing-history"), &state.billing) {
        let canonical = cat.get(mid).map_or(mid, |m| m.id.as_str());
        return admin::pricing_history_response(b, canonical)
            .await
            .map_err(|e| billing::to_gateway_error(e).into());
    }
    match cat.get(&id) {
        Some(m) => Ok(Json(cat.card(m)).into_response()),
        None => {
            let s = cat.suggest(&id);
            let hint = if s.is_empty() {
                String::new()
            } else {
                format!(" Did you mean '{}'?", s.join("' or '"))
            };
            Err(GatewayError::ModelNotFound {
                message: format!("The model '{id}' does not exist.{hint}"),
            }
            .into())
        }
    }
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let limits = state.limiter.health().await;
    let status = if limits.admitting {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let providers: Vec<_> = state
        .config
        .providers
        .iter()
        .map(|p| json!({"name": p.name, "dialect": p.dialect.as_str(), "key_configured": p.api_key.is_some() || p.api_key_env.is_none()}))
        .collect();
    (
        status,
        Json(
            json!({"status": if limits.admitting { "ready" } else { "not_ready" }, "auth_required": state.config.auth.required, "providers": providers, "limits": limits}),
        ),
    )
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are disabled").into_response(),
    }
}

async fn not_found(req: Request) -> ApiError {
    GatewayError::NotFound {
        message: format!("Unknown request URL: {} {}", req.method(), req.uri().path()),
    }
    .into()
}

/// Runs the server until SIGTERM/SIGINT, then lets open requests finish up to the grace period.
pub async fn serve(state: Arc<AppState>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let grace = state.config.server.shutdown_grace;
    let addr: SocketAddr = listener.local_addr()?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        let mut rx = rx;
        let _ = rx.wait_for(|v| *v).await;
    });
    tracing::info!("listening on {addr}");
    let mut handle = tokio::spawn(async move { server.await });
    tokio::select! {
        r = &mut handle => return r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        _ = shutdown_signal() => {}
    }
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections; waiting for open requests"
    );
    let _ = tx.send(true);
    match tokio::time::timeout(grace, &mut handle).await {
        Ok(r) => r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(_) => {
            tracing::warn!("grace period over; closing remaining connections");
            handle.abort();
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Default interval of SSE keep-alive comments.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);
