//! HTTP side of the limiter: who a request is limited as (from the billing principal, the
//! account's plan and the stored overrides), the `x-ratelimit-*` headers, and the admin endpoints
//! that show and change limits: `GET|PATCH|DELETE /admin/v1/keys/{prefix}/limits`,
//! `GET|PATCH|DELETE /admin/v1/accounts/{name}/limits` and `PATCH /admin/v1/accounts/{name}`
//! (`plan`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::billing::{Billing, Principal};
use crate::config::PlanConfig;
use crate::error::GatewayError;
use crate::limits::overrides::{self, Patch, SubjectRow, Target};
use crate::limits::{LimitStatus, LimitSubject, RateHeaders, ScopeKind};
use crate::store::{AccountRow, KeyRow};

/// The plan named by an account, resolved against `[[plans]]`.
fn resolve_plan<'a>(
    state: &'a AppState,
    account_id: &str,
    name: Option<&str>,
) -> Option<&'a PlanConfig> {
    let name = name?;
    match state.config.plan(name) {
        Some(p) => Some(p),
        None => {
            tracing::warn!(account_id, plan = %name, "account names a plan that is not in [[plans]]; only its overrides apply");
            None
        }
    }
}

/// The plan and overrides of a key: read on every request — by authentication, in the batched
/// key lookup, for a database key; otherwise one indexed query, unless `[limits]
/// subject_cache_ms` allows reusing a recent read.
async fn subject_row(state: &AppState, p: &Principal) -> Option<Arc<SubjectRow>> {
    // Read with the key by authentication, on this request: as fresh as a query of its own.
    if let Some(row) = &p.limits {
        return Some(row.clone());
    }
    if let Some(row) = state.limiter.cached_subject(&p.key_id) {
        return Some(row);
    }
    let billing = state.billing.as_ref()?;
    match overrides::read_subject(billing.store(), &p.account_id, &p.key_id).await {
        Ok(Some(row)) => {
            let row = Arc::new(row);
            state.limiter.store_subject(&p.key_id, row.clone());
            Some(row)
        }
        Ok(None) => None,
        Err(e) => {
            // Without the account row there is nothing to limit by; billing itself refuses
            // requests while its store is down.
            tracing::warn!(account_id = %p.account_id, error = %e, "could not read the account's plan and limit overrides");
            None
        }
    }
}

fn subject_of(state: &AppState, key_id: &str, account_id: &str, row: &SubjectRow) -> LimitSubject {
    let plan = resolve_plan(state, account_id, row.plan.as_deref());
    LimitSubject::effective(
        key_id.to_string(),
        account_id.to_string(),
        plan,
        &row.account,
        &row.key,
    )
}

/// The subject a request is limited as: its key and account, under the account's plan and the
/// overrides of both. `None` in open mode (no principal), which is never limited, and for a key
/// with no limit at all.
pub async fn subject(state: &AppState, principal: Option<&Principal>) -> Option<LimitSubject> {
    let p = principal?;
    let row = subject_row(state, p).await?;
    // Without a limit there is nothing to admit, reserve or settle (and no header to send).
    let plan = resolve_plan(state, &p.account_id, row.plan.as_deref());
    if !LimitSubject::any_limit(plan, &row.account, &row.key) {
        return None;
    }
    Some(LimitSubject::effective(
        p.key_id.clone(),
        p.account_id.clone(),
        plan,
        &row.account,
        &row.key,
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

/// The billing service of an admin request (admin key required).
async fn admin(state: &AppState, headers: &HeaderMap) -> Result<Arc<Billing>, ApiError> {
    let principal = super::authorize(state, headers).await?;
    let (Some(p), Some(billing)) = (principal, state.billing.as_ref()) else {
        return Err(GatewayError::NotFound {
            message: "There are no keys or accounts in open mode.".into(),
        }
        .into());
    };
    if !p.is_admin {
        return Err(GatewayError::Forbidden {
            message: "This key may not use the admin API.".into(),
        }
        .into());
    }
    Ok(billing.clone())
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    super::billing::to_gateway_error(crate::billing::BillingError::Store(e)).into()
}

/// A key by its visible prefix or its id.
async fn find_key(billing: &Billing, prefix: &str) -> Result<KeyRow, ApiError> {
    let key = match billing.key(prefix).await {
        Ok(k) => Some(k),
        Err(_) => billing
            .list_keys(None)
            .await
            .map_err(super::billing::to_gateway_error)?
            .into_iter()
            .find(|k| k.id == prefix),
    };
    key.ok_or_else(|| {
        GatewayError::NotFound {
            message: format!("No key '{prefix}'."),
        }
        .into()
    })
}

async fn find_account(billing: &Billing, name: &str) -> Result<AccountRow, ApiError> {
    billing
        .account(name)
        .await
        .map_err(|e| super::billing::to_gateway_error(e).into())
}

fn usage_json(status: &[LimitStatus]) -> Vec<Value> {
    status
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
        .collect()
}

async fn peek(state: &AppState, subject: &LimitSubject) -> Result<Vec<LimitStatus>, ApiError> {
    state.limiter.peek(&subject.scopes).await.map_err(|e| {
        GatewayError::Overloaded {
            message: format!("The rate limiter is unavailable: {e}"),
            retry_after: std::time::Duration::from_secs(1),
        }
        .into()
    })
}

/// The effective limits of one scope of `subject` (all `null` when the scope has none).
fn effective_json(subject: &LimitSubject, kind: ScopeKind) -> Value {
    let none = PlanConfig::default();
    let plan = subject
        .scopes
        .iter()
        .find(|s| s.kind == kind)
        .map_or(&none, |s| &*s.plan);
    overrides::to_json(plan)
}

async fn read_row(
    billing: &Billing,
    account_id: &str,
    key_id: &str,
) -> Result<SubjectRow, ApiError> {
    overrides::read_subject(billing.store(), account_id, key_id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            GatewayError::NotFound {
                message: format!("No account '{account_id}'."),
            }
            .into()
        })
}

/// A key's plan, overrides, effective limits and current usage.
async fn key_view(state: &AppState, billing: &Billing, key: &KeyRow) -> Result<Value, ApiError> {
    let row = read_row(billing, &key.account_id, &key.id).await?;
    let subject = subject_of(state, &key.id, &key.account_id, &row);
    let status = peek(state, &subject).await?;
    Ok(json!({
        "object": "key.limits",
        "key_id": key.id,
        "key_prefix": key.prefix,
        "account_id": key.account_id,
        "account": key.account_name,
        "plan": row.plan,
        "overrides": {
            "account": overrides::to_json(&row.account),
            "key": overrides::to_json(&row.key),
        },
        "effective": {
            "key": effective_json(&subject, ScopeKind::Key),
            "account": effective_json(&subject, ScopeKind::Account),
        },
        "backend": state.limiter.backend_name(),
        "timezone": state.config.limits.timezone,
        "limits": usage_json(&status),
    }))
}

/// An account's plan, overrides, effective limits (per key and for the account) and the
/// account-wide usage.
async fn account_view(
    state: &AppState,
    billing: &Billing,
    account: &AccountRow,
) -> Result<Value, ApiError> {
    let row = read_row(billing, &account.id, "").await?;
    let subject = subject_of(state, "", &account.id, &row);
    let account_scopes = LimitSubject {
        key_id: String::new(),
        account_id: Some(account.id.clone()),
        scopes: subject
            .scopes
            .iter()
            .filter(|s| s.kind == ScopeKind::Account)
            .cloned()
            .collect(),
    };
    let status = peek(state, &account_scopes).await?;
    Ok(json!({
        "object": "account.limits",
        "account_id": account.id,
        "account": account.name,
        "plan": row.plan,
        "overrides": overrides::to_json(&row.account),
        "effective": {
            "per_key": effective_json(&subject, ScopeKind::Key),
            "account": effective_json(&subject, ScopeKind::Account),
        },
        "backend": state.limiter.backend_name(),
        "timezone": state.config.limits.timezone,
        "limits": usage_json(&status),
    }))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        GatewayError::InvalidJson {
            message: format!("The body is not valid JSON: {e}"),
        }
        .into()
    })
}

fn limits_patch(v: &Value) -> Result<Patch, ApiError> {
    overrides::patch_from_json(v).map_err(|m| GatewayError::invalid(m, None).into())
}

async fn apply_patch(
    state: &AppState,
    billing: &Billing,
    target: Target<'_>,
    patch: &Patch,
) -> Result<(), ApiError> {
    if !patch.is_empty() {
        overrides::apply(billing.store(), target, patch)
            .await
            .map_err(store_error)?;
        state.limiter.forget_subjects();
    }
    Ok(())
}

/// `GET /admin/v1/keys/{prefix}/limits` (admin key): the key's plan, the account's and the key's
/// overrides, the effective limits and the current usage against each, key-scoped and
/// account-scoped. `{prefix}` is the key's visible prefix or its id.
pub async fn key_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> Result<Response, ApiError> {
    let billing = admin(&state, &headers).await?;
    let key = find_key(&billing, &prefix).await?;
    Ok(Json(key_view(&state, &billing, &key).await?).into_response())
}

/// `PATCH /admin/v1/keys/{prefix}/limits`: sets (a value) or clears (`null`) the key's overrides,
/// e.g. `{"requests_per_minute": 5, "spend_cap_daily_usd": "2.50", "max_concurrent": null}`.
/// Applies to the key's next request on every instance.
pub async fn patch_key_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let billing = admin(&state, &headers).await?;
    let key = find_key(&billing, &prefix).await?;
    let patch = limits_patch(&parse_json(&body)?)?;
    apply_patch(&state, &billing, Target::Key(&key.id), &patch).await?;
    Ok(Json(key_view(&state, &billing, &key).await?).into_response())
}

/// `DELETE /admin/v1/keys/{prefix}/limits`: removes every override of the key.
pub async fn clear_key_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> Result<Response, ApiError> {
    let billing = admin(&state, &headers).await?;
    let key = find_key(&billing, &prefix).await?;
    let patch = Patch {
        clear_all: true,
        set: Vec::new(),
    };
    apply_patch(&state, &billing, Target::Key(&key.id), &patch).await?;
    Ok(Json(key_view(&state, &billing, &key).await?).into_response())
}

/// `GET /admin/v1/accounts/{name}/limits`: the account's plan, overrides, effective limits and
/// account-wide usage.
pub async fn account_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let billing = admin(&state, &headers).await?;
    let account = find_account(&billing, &name).await?;
    Ok(Json(account_view(&state, &billing, &account).await?).into_response())
}

/// `PATCH /admin/v1/accounts/{name}/limits`: sets or clears the account's overrides (same body
/// as for keys).
pub async fn patch_account_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let billing = admin(&state, &headers).await?;
    let account = find_account(&billing, &name).await?;
    let patch = limits_patch(&parse_json(&body)?)?;
    apply_patch(&state, &billing, Target::Account(&account.id), &patch).await?;
    Ok(Json(account_view(&state, &billing, &account).await?).into_response())
}

/// `DELETE /admin/v1/accounts/{name}/limits`: removes every override of the account.
pub async fn clear_account_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let billing = admin(&state, &headers).await?;
    let account = find_account(&billing, &name).await?;
    let patch = Patch {
        clear_all: true,
        set: Vec::new(),
    };
    apply_patch(&state, &billing, Target::Account(&account.id), &patch).await?;
    Ok(Json(account_view(&state, &billing, &account).await?).into_response())
}

/// `PATCH /admin/v1/accounts/{name}`: changes the account's plan (`"plan": "pro"`, or `null` for
/// none; it must be one of `[[plans]]`) and/or its overrides (`"limits": {…}`). Returns the
/// account with its overrides.
pub async fn patch_account(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let billing = admin(&state, &headers).await?;
    let v = parse_json(&body)?;
    let Some(obj) = v.as_object() else {
        return Err(GatewayError::invalid("The body must be a JSON object.", None).into());
    };
    if let Some(field) = obj.keys().find(|k| *k != "plan" && *k != "limits") {
        return Err(GatewayError::invalid(
            format!("Unknown field `{field}`; an account's `plan` and `limits` can be changed."),
            Some(field.clone()),
        )
        .into());
    }
    let plan = match obj.get("plan") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(p)) => {
            if state.config.plan(p).is_none() {
                let known: Vec<&str> = state.config.plans.iter().map(|p| p.name.as_str()).collect();
                return Err(GatewayError::invalid(
                    format!(
                        "There is no plan '{p}' in the config; known plans: {}.",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                    Some("plan".into()),
                )
                .into());
            }
            Some(Some(p.clone()))
        }
        Some(_) => {
            return Err(GatewayError::invalid(
                "`plan` must be a plan name or null.",
                Some("plan".into()),
            )
            .into())
        }
    };
    let patch = match obj.get("limits") {
        Some(l) => limits_patch(l)?,
        None => Patch::default(),
    };
    let account = find_account(&billing, &name).await?;
    if let Some(plan) = &plan {
        overrides::set_plan(billing.store(), &account.name, plan.as_deref())
            .await
            .map_err(store_error)?;
        state.limiter.forget_subjects();
        tracing::info!(account = %account.name, plan = ?plan, "account plan changed");
    }
    apply_patch(&state, &billing, Target::Account(&account.id), &patch).await?;
    let account = find_account(&billing, &name).await?;
    let mut v = super::admin::account_json(&account);
    let o = overrides::read(billing.store(), Target::Account(&account.id))
        .await
        .map_err(store_error)?;
    v["limits"] = overrides::to_json(&o);
    Ok(Json(v).into_response())
}
