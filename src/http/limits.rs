//! HTTP side of the limiter: who a request is limited as, the `x-ratelimit-*` headers, and
//! `GET /admin/v1/keys/{id}/limits`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::{presented_key, AppState};
use crate::error::GatewayError;
use crate::limits::{key_id, LimitSubject, RateHeaders};

/// The subject a request is limited as: the presented key's id and its configured plan.
/// `None` when no key was presented (open mode), which is never limited.
pub fn subject(state: &AppState, headers: &HeaderMap) -> Option<LimitSubject> {
    let key = presented_key(headers)?;
    let id = key_id(key);
    let plan = plan_of(state, &id);
    Some(LimitSubject::key(id, plan))
}

fn plan_of(state: &AppState, key_id: &str) -> Option<Arc<crate::config::PlanConfig>> {
    state
        .config
        .limits
        .static_key_plans
        .get(key_id)
        .and_then(|name| state.config.plan(name))
        .map(|p| Arc::new(p.clone()))
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

/// Checks the caller's key against `[auth] admin_keys`.
pub fn authorize_admin(state: &AppState, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(key) = presented_key(headers) else {
        return Err(GatewayError::Unauthorized {
            message: "The admin API needs an admin key.".into(),
        });
    };
    let ok = state.config.auth.admin_keys.iter().fold(false, |acc, k| {
        acc | bool::from(k.as_bytes().ct_eq(key.as_bytes()))
    });
    if ok {
        Ok(())
    } else {
        Err(GatewayError::Forbidden {
            message: "This key may not use the admin API.".into(),
        })
    }
}

/// `GET /admin/v1/keys/{id}/limits`: the key's plan and current usage against each limit.
pub async fn key_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize_admin(&state, &headers)?;
    let plan = plan_of(&state, &id);
    let known = plan.is_some()
        || state
            .config
            .auth
            .static_keys
            .iter()
            .any(|k| key_id(k) == id);
    if !known {
        return Err(GatewayError::NotFound {
            message: format!("No key with id '{id}'."),
        }
        .into());
    }
    let subject = LimitSubject::key(id.clone(), plan.clone());
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
        "key_id": id,
        "plan": plan.as_ref().map(|p| p.name.clone()),
        "backend": state.limiter.backend_name(),
        "timezone": state.config.limits.timezone,
        "limits": limits,
    }))
    .into_response())
}
