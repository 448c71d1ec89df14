//! HTTP side of the limiter: who a request is limited as (from the billing principal and the
//! account's plan), the `x-ratelimit-*` headers, and `GET /admin/v1/keys/{prefix}/limits`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::billing::Principal;
use crate::config::PlanConfig;
use crate::error::GatewayError;
use crate::limits::{LimitSubject, RateHeaders};

/// The plan named by an account (its `plan` column), resolved against `[[plans]]`. The account's
/// plan is read through the limiter's short cache, so a changed plan applies within seconds.
async fn account_plan(state: &AppState, account_id: &str) -> Option<Arc<PlanConfig>> {
    let name = match state.limiter.cached_plan(account_id) {
        Some(name) => name,
        None => {
            let billing = state.billing.as_ref()?;
            let name = match billing.account_by_id(account_id).await {
                Ok(a) => a.plan,
                Err(e) => {
                    // Without the account row there is nothing to limit by; billing itself
                    // refuses requests while its store is down.
                    tracing::warn!(account_id, error = %e, "could not read the account's plan");
                    return None;
                }
            };
            state.limiter.store_plan(account_id, name.clone());
            name
        }
    }?;
    match state.config.plan(&name) {
        Some(p) => Some(Arc::new(p.clone())),
        None => {
            tracing::warn!(account_id, plan = %name, "account names a plan that is not in [[plans]]; no limits apply");
            None
        }
    }
}

/// The subject a request is limited as: its key and account, under the account's plan.
/// `None` in open mode (no principal), which is never limited.
pub async fn subject(state: &AppState, principal: Option<&Principal>) -> Option<LimitSubject> {
    let p = principal?;
    let plan = account_plan(state, &p.account_id).await;
    Some(LimitSubject::from_plan(
        p.key_id.clone(),
        p.account_id.clone(),
        plan,
    ))
}

/// Where the request path leaves the rate headers for [`rate_headers`] to put on the response,
/// whichever way it ends (answer, 429, upstream error).
#[derive(Clone, Default)]
pub struct RateSlot(Option<Arc<std::sync::Mutex<RateHeaders>>>);

impl RateSlot {
    /// The slot of a request (empty when the middleware is not installed).
    pub fn of(req: &axum::extract::Request) -> RateSlot {
        req.extensions()
            .get::<RateSlot>()
            .cloned()
            .unwrap_or_default()
    }

    pub fn set(&self, rate: RateHeaders) {
        if let Some(m) = &self.0 {
            if let Ok(mut g) = m.lock() {
                *g = rate;
            }
        }
    }
}

/// Middleware: gives each request a [`RateSlot`] and adds what the handler left in it to the
/// response as `x-ratelimit-*` headers.
pub async fn rate_headers(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let cell = Arc::new(std::sync::Mutex::new(RateHeaders::default()));
    req.extensions_mut().insert(RateSlot(Some(cell.clone())));
    let mut resp = next.run(req).await;
    let rate = cell.lock().map(|g| *g).unwrap_or_default();
    apply_headers(&mut resp, &rate);
    resp
}

/// Adds the `x-ratelimit-*` headers to a response.
pub fn apply_headers(resp: &mut Response, rate: &RateHeaders) {
    let h = resp.headers_mut();
    for (name, value) in rate.pairs() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

/// `GET /admin/v1/keys/{prefix}/limits` (admin key): the key's plan and its current usage against
/// each limit, key-scoped and account-scoped. `{prefix}` is the key's visible prefix or its id.
pub async fn key_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> Result<Response, ApiError> {
    let principal = super::authorize(&state, &headers).await?;
    let (Some(p), Some(billing)) = (principal, state.billing.as_ref()) else {
        return Err(GatewayError::NotFound {
            message: "There are no keys in open mode.".into(),
        }
        .into());
    };
    if !p.is_admin {
        return Err(GatewayError::Forbidden {
            message: "This key may not use the admin API.".into(),
        }
        .into());
    }
    let key = match billing.key(&prefix).await {
        Ok(k) => Some(k),
        Err(_) => billing
            .list_keys(None)
            .await
            .map_err(super::billing::to_gateway_error)?
            .into_iter()
            .find(|k| k.id == prefix),
    };
    let Some(key) = key else {
        return Err(GatewayError::NotFound {
            message: format!("No key '{prefix}'."),
        }
        .into());
    };
    state.limiter.forget_plan(&key.account_id);
    let plan = account_plan(&state, &key.account_id).await;
    let subject = LimitSubject::from_plan(key.id.clone(), key.account_id.clone(), plan.clone());
    let status =
        state
            .limiter
            .peek(&subject.scopes)
            .await
            .map_err(|e| GatewayError::Overloaded {
                message: format!("The rate limiter is unavailable: {e}"),
                retry_after: std::time::Duration::from_secs(1),
            })?;
    let limits: Vec<_> = status
        .iter()
        .map(|s| {
            json!({
                "scope": s.scope,
                "limit": s.limit.name(),
                "max": s.max,
                "used": s.used,
                "remaining": s.remaining,
                "resets_in_ms": s.reset_ms,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "key.limits",
        "key_id": key.id,
        "key_prefix": key.prefix,
        "account_id": key.account_id,
        "account": key.account_name,
        "plan": plan.as_ref().map(|p| p.name.clone()),
        "backend": state.limiter.backend_name(),
        "timezone": state.config.limits.timezone,
        "limits": limits,
    }))
    .into_response())
}
