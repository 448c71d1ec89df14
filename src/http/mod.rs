//! The HTTP surface (the only module that knows axum): router, middleware, server lifecycle.

pub mod admin;
pub mod billing;
#[cfg(feature = "calibration")]
mod calibration;
pub mod chat;
mod conn;
pub mod error;
mod events;
pub mod limits;
pub mod messages;
pub mod responses;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
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
    // A body may pause no longer than `client_timeout` between frames (a client that sends
    // headers and then trickles or stops its body holds a connection no longer). The API's
    // POST routes time their bodies as they read them (`chat::read_body`: no timer unless a
    // frame is late); the admin routes' JSON bodies, through this layer.
    let admin_body =
        tower_http::timeout::RequestBodyTimeoutLayer::new(state.config.server.client_timeout);
    let router = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route(
            "/admin/v1/keys/{prefix}/limits",
            get(limits::key_limits)
                .patch(limits::patch_key_limits)
                .delete(limits::clear_key_limits)
                .layer(admin_body.clone()),
        )
        .route(
            "/admin/v1/accounts/{name}/limits",
            get(limits::account_limits)
                .patch(limits::patch_account_limits)
                .delete(limits::clear_account_limits)
                .layer(admin_body.clone()),
        )
        // GET of the same path is billing's (admin router, merged below)
        .route(
            "/admin/v1/accounts/{name}",
            patch(limits::patch_account).layer(admin_body.clone()),
        )
        .route("/admin/v1/routes/health", get(routes_health))
        .fallback(not_found)
        .layer(middleware::from_fn(limits::rate_headers))
        .layer(middleware::from_fn(request_id))
        .with_state(state);
    match billing {
        Some(b) => router.merge(admin::router(b).layer(admin_body)),
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
    let mut data = Vec::with_capacity(cat.models().len());
    for m in cat.models() {
        data.push(card(&state, m).await);
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// A model's card; with billing on, its prices are the ones charged now (the store's current
/// versions, which the admin API can change), not the config file's.
async fn card(state: &AppState, m: &crate::config::ModelConfig) -> serde_json::Value {
    if let Some(b) = &state.billing {
        if let Err(e) = b.reload_prices_if_stale().await {
            tracing::warn!(model = %m.id, error = %e, "model card: prices not reloaded");
        }
    }
    state.gateway.catalog().card(m, state.gateway.prices())
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
        Some(m) => Ok(Json(card(&state, m).await).into_response()),
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
    // Not ready only when the limiter refuses everything (Redis down and `fail_closed`).
    let code = if limits.admitting {
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
    let routes = state.gateway.health().snapshot();
    // Ready while every model has a route that is neither ejected nor cooling down after a
    // `Retry-After`; a degraded gateway stays in rotation (it still fails over and probes), so
    // the status code stays 200.
    let degraded: Vec<&str> = state
        .config
        .models
        .iter()
        .filter(|m| {
            m.routes.iter().all(|r| {
                let key = crate::gateway::health::route_key(r);
                routes
                    .iter()
                    .any(|v| v.route == key && matches!(v.state, "ejected" | "cooling"))
            })
        })
        .map(|m| m.id.as_str())
        .collect();
    let status = if !limits.admitting {
        "not_ready"
    } else if degraded.is_empty() {
        "ready"
    } else {
        "degraded"
    };
    let routes: Vec<_> = routes
        .iter()
        .map(|r| json!({"route": r.route, "state": r.state}))
        .collect();
    (
        code,
        Json(
            json!({"status": status, "auth_required": state.config.auth.required, "providers": providers, "routes": routes, "models_without_healthy_route": degraded, "limits": limits}),
        ),
    )
}

/// `GET /admin/v1/routes/health`: every route's ejection state, error rate and speed.
async fn routes_health(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // an admin API: admin keys only (open mode: anyone on loopback)
    if let Some(p) = authorize(&state, &headers).await? {
        if !p.is_admin {
            return Err(GatewayError::Forbidden {
                message: "admin key required".into(),
            }
            .into());
        }
    }
    let data = state.gateway.health().snapshot();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn metrics_handler(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.config.server.metrics_token {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|p| crate::billing::keys::digests_equal(p, token.expose())) {
            let mut resp =
                (StatusCode::UNAUTHORIZED, "metrics need the bearer token\n").into_response();
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"metrics\""),
            );
            return resp;
        }
    }
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
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let grace = state.config.server.shutdown_grace;
    let addr: SocketAddr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let header_timeout = state.config.server.client_timeout;
    let server = conn::run(listener, app(state), header_timeout, rx);
    tracing::info!("listening on {addr}");
    let mut handle = tokio::spawn(async move {
        server.await;
        Ok::<(), std::io::Error>(())
    });
    tokio::select! {
        r = &mut handle => return r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        _ = shutdown => {}
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

/// Registers SIGTERM/SIGINT handlers now (before the listener is bound, so an early signal is never
/// lost) and returns a future that resolves on the first of them.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {}
                _ = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Default interval of SSE keep-alive comments.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);
