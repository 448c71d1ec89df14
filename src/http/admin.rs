//! Admin API (`/admin/v1/...`, admin keys) and the customer account API (`/v1/account`,
//! `/v1/usage`, `/v1/requests/{id}`, `/v1/models/{id}/pricing-history`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::billing::dates::{format_day, format_rfc3339, parse_time};
use crate::billing::{
    format_usd, parse_usd, usd_json, Billing, BillingError, PriceSpec, Principal,
};
use crate::store::attempts::AttemptRow;
use crate::store::{now_ms, AccountRow, KeyRow, PriceRow, RequestRow, UsageGroup, UsageQuery};

/// Routes for the account and admin APIs; merge into the main router.
pub fn router(billing: Arc<Billing>) -> Router {
    Router::new()
        .route("/v1/account", get(get_account))
        .route("/v1/usage", get(get_usage))
        .route("/v1/requests/{id}", get(get_request))
        .route(
            "/admin/v1/accounts",
            get(admin_list_accounts).post(admin_create_account),
        )
        .route("/admin/v1/accounts/{name}", get(admin_get_account))
        .route("/admin/v1/accounts/{name}/credits", post(admin_add_credits))
        .route(
            "/admin/v1/keys",
            get(admin_list_keys).post(admin_create_key),
        )
        .route(
            "/admin/v1/keys/{prefix}",
            get(admin_get_key).patch(admin_patch_key),
        )
        .route("/admin/v1/keys/{prefix}/revoke", post(admin_revoke_key))
        .route(
            "/admin/v1/prices",
            get(admin_list_prices).post(admin_set_price),
        )
        .route("/admin/v1/usage", get(admin_usage))
        .route("/admin/v1/requests/{id}", get(admin_get_request))
        .route("/admin/v1/ledger/check", get(admin_ledger_check))
        .with_state(billing)
}

/// An error rendered in the OpenAI error shape.
pub struct ApiError(pub BillingError);

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        billing_error_response(&self.0)
    }
}

/// Maps a billing error to an HTTP response with an OpenAI-style body.
pub fn billing_error_response(e: &BillingError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = match status.as_u16() {
        401 => "authentication_error",
        402 => "insufficient_quota",
        403 => "permission_error",
        404 => "not_found_error",
        400 | 409 | 422 => "invalid_request_error",
        _ => "api_error",
    };
    if matches!(e, BillingError::Store(_) | BillingError::Secret(_)) {
        tracing::error!(error = %e, "billing store error");
    }
    let message = match e {
        // never echo database details to clients
        BillingError::Store(_) | BillingError::Secret(_) => {
            "billing is temporarily unavailable".to_string()
        }
        other => other.to_string(),
    };
    let mut resp = (
        status,
        Json(json!({"error": {"message": message, "type": kind, "code": e.code()}})),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
    }
    resp
}

/// The raw key from `Authorization: Bearer …` or `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
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

async fn principal(b: &Billing, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let key = presented_key(headers).ok_or(BillingError::Unauthorized)?;
    Ok(b.authenticate(key).await?)
}

async fn admin(b: &Billing, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let p = principal(b, headers).await?;
    if !p.is_admin {
        return Err(BillingError::Forbidden.into());
    }
    Ok(p)
}

pub(crate) fn account_json(a: &AccountRow) -> Value {
    json!({
        "object": "account",
        "id": a.id,
        "name": a.name,
        "plan": a.plan,
        "balance_usd": usd_json(a.balance_micros),
        "balance_micros": a.balance_micros,
        "held_usd": usd_json(a.held_micros),
        "held_micros": a.held_micros,
        "created_at": format_rfc3339(a.created_at),
    })
}

fn key_json(k: &KeyRow) -> Value {
    json!({
        "object": "api_key",
        "id": k.id,
        "prefix": k.prefix,
        "account": k.account_name,
        "admin": k.is_admin,
        "name": k.name,
        "spend_cap_usd": k.spend_cap_micros.map(usd_json),
        "spent_usd": usd_json(k.spent_micros),
        "created_at": format_rfc3339(k.created_at),
        "last_used_at": k.last_used_at.map(format_rfc3339),
        "revoked_at": k.revoked_at.map(format_rfc3339),
    })
}

fn price_json(p: &PriceRow) -> Value {
    let usd = |m: i64| format_usd(m);
    json!({
        "version": p.id,
        "model": p.model,
        "provider": if p.provider.is_empty() { None } else { Some(&p.provider) },
        "effective_at": format_rfc3339(p.effective_at),
        "created_at": format_rfc3339(p.created_at),
        "source": p.source,
        "per_million_tokens_usd": {
            "input": usd(p.input_micros_per_m),
            "cached_input": usd(p.cached_micros_per_m),
            "output": usd(p.output_micros_per_m),
        },
        "platform_fee_per_million_tokens_usd": {
            "input": usd(p.fee_input_micros_per_m),
            "cached_input": usd(p.fee_cached_micros_per_m),
            "output": usd(p.fee_output_micros_per_m),
        },
        "markup_percent": format!("{}.{:02}", p.markup_bps / 100, p.markup_bps % 100),
    })
}

/// The request record as shown to customers and admins.
pub fn request_json(r: &RequestRow) -> Value {
    request_json_with(r, &[])
}

/// A request record with its upstream attempts: the recorded ones when it failed over, was retried
/// or failed; otherwise its one attempt, the route that served it.
fn request_json_with(r: &RequestRow, attempts: &[AttemptRow]) -> Value {
    let attempts = if !attempts.is_empty() {
        json!(attempts)
    } else if let (true, Some(p), Some(m)) = (r.delivered, &r.provider, &r.upstream_model) {
        json!([{"n": 0, "provider": p, "upstream_model": m, "result": "served",
                "http_status": r.http_status}])
    } else {
        json!([])
    };
    json!({
        "attempts": attempts,
        "object": "request",
        "id": r.id,
        "model": r.model,
        "provider": r.provider,
        "upstream_model": r.upstream_model,
        "state": r.state,
        "status": r.status,
        "http_status": r.http_status,
        "usage": {
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "completion_tokens": r.completion_tokens,
            "reasoning_tokens": r.reasoning_tokens,
            "estimated": r.estimated,
        },
        "cost": {
            "total_usd": usd_json(r.cost_micros),
            "total_micros": r.cost_micros,
            "input_usd": usd_json(r.input_cost_micros),
            "cached_input_usd": usd_json(r.cached_cost_micros),
            "output_usd": usd_json(r.output_cost_micros),
            "network_usd": usd_json(r.network_cost_micros),
            "platform_fee_usd": usd_json(r.platform_fee_micros),
            "uncapped_usd": usd_json(r.computed_cost_micros),
            "held_usd": usd_json(r.hold_micros),
        },
        "delivered": r.delivered,
        "latency_ms": r.latency_ms,
        "created_at": format_rfc3339(r.created_at),
        "finished_at": r.finished_at.map(format_rfc3339),
        "price_version": r.price_id,
    })
}

async fn get_account(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&b, &headers).await?;
    let a = b.account_by_id(&p.account_id).await?;
    Ok(Json(account_json(&a)))
}

#[derive(Debug, Deserialize)]
struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    account: Option<String>,
}

async fn usage_response(
    b: &Billing,
    account_id: Option<String>,
    q: &UsageParams,
) -> Result<Json<Value>, ApiError> {
    let group: UsageGroup = q
        .group_by
        .as_deref()
        .unwrap_or("day")
        .parse()
        .map_err(BillingError::Invalid)?;
    let now = now_ms();
    let parse = |s: &Option<String>, default: i64, name: &str| -> Result<i64, BillingError> {
        match s {
            Some(v) => parse_time(v).ok_or_else(|| {
                BillingError::Invalid(format!(
                    "`{name}` must be YYYY-MM-DD, RFC 3339 UTC or unix seconds"
                ))
            }),
            None => Ok(default),
        }
    };
    let from = parse(&q.from, now - 30 * 86_400_000, "from")?;
    let to = parse(&q.to, now + 1, "to")?;
    let rows = b
        .usage(&UsageQuery {
            account_id,
            from_ms: from,
            to_ms: to,
            group,
        })
        .await?;
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            let g = match group {
                UsageGroup::Day => r
                    .group
                    .parse::<i64>()
                    .map(format_day)
                    .unwrap_or_else(|_| r.group.clone()),
                _ => r.group.clone(),
            };
            json!({
                "group": g,
                "requests": r.requests,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "completion_tokens": r.completion_tokens,
                "reasoning_tokens": r.reasoning_tokens,
                "cost_usd": usd_json(r.cost_micros),
                "cost_micros": r.cost_micros,
            })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "group_by": group,
        "from": format_rfc3339(from),
        "to": format_rfc3339(to),
        "data": data,
    })))
}

async fn get_usage(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Query(q): Query<UsageParams>,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&b, &headers).await?;
    usage_response(&b, Some(p.account_id), &q).await
}

async fn get_request(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let p = principal(&b, &headers).await?;
    let r = b.request_record(&id).await?;
    // a customer sees only its own requests; others look like they do not exist
    if r.account_id != p.account_id && !p.is_admin {
        return Err(BillingError::NotFound(format!("request {id}")).into());
    }
    request_view(&b, &r).await
}

/// A request record with its stored attempts.
async fn request_view(b: &Billing, r: &RequestRow) -> Result<Json<Value>, ApiError> {
    let attempts = b
        .store()
        .request_attempts(&r.id)
        .await
        .map_err(BillingError::from)?;
    Ok(Json(request_json_with(r, &attempts)))
}

/// `GET /v1/models/{id}/pricing-history` (routed by the models handler; the caller is authenticated).
pub async fn pricing_history_response(b: &Billing, model: &str) -> Result<Response, BillingError> {
    let hist = b.price_history(model).await?;
    Ok(Json(json!({
        "object": "list",
        "model": model,
        "data": hist.iter().map(price_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

async fn admin_list_accounts(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    let rows = b.list_accounts().await?;
    Ok(Json(
        json!({"object": "list", "data": rows.iter().map(account_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    name: String,
    plan: Option<String>,
}

async fn admin_create_account(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Json(body): Json<CreateAccount>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin(&b, &headers).await?;
    let a = b.create_account(&body.name, body.plan.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(account_json(&a))))
}

async fn admin_get_account(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    Ok(Json(account_json(&b.account(&name).await?)))
}

fn usd_value(v: &Value, field: &str) -> Result<i64, BillingError> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(BillingError::Invalid(format!(
                "`{field}` must be a decimal USD amount"
            )))
        }
    };
    parse_usd(&s).map_err(|e| BillingError::Invalid(format!("`{field}`: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddCredits {
    amount_usd: Value,
    reason: String,
}

async fn admin_add_credits(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(body): Json<AddCredits>,
) -> Result<Response, ApiError> {
    admin(&b, &headers).await?;
    let amount = usd_value(&body.amount_usd, "amount_usd")?;
    let idem = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map_err(|_| BillingError::Invalid("bad Idempotency-Key".into()))
        })
        .transpose()?;
    let r = b.add_credits(&name, amount, &body.reason, idem).await?;
    let mut resp = (
        if r.replayed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        Json(json!({
            "object": "credit_transaction",
            "id": r.transaction_id,
            "account": name,
            "amount_usd": usd_json(amount),
            "balance_usd": usd_json(r.balance_micros),
            "balance_micros": r.balance_micros,
            "replayed": r.replayed,
        })),
    )
        .into_response();
    if r.replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[derive(Debug, Deserialize)]
struct KeyListParams {
    account: Option<String>,
}

async fn admin_list_keys(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Query(q): Query<KeyListParams>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    let rows = b.list_keys(q.account.as_deref()).await?;
    Ok(Json(
        json!({"object": "list", "data": rows.iter().map(key_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    account: String,
    #[serde(default)]
    admin: bool,
    name: Option<String>,
    spend_cap_usd: Option<Value>,
}

async fn admin_create_key(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Json(body): Json<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin(&b, &headers).await?;
    let cap = body
        .spend_cap_usd
        .as_ref()
        .filter(|v| !v.is_null())
        .map(|v| usd_value(v, "spend_cap_usd"))
        .transpose()?;
    let (raw, row) = b
        .create_key(&body.account, body.admin, body.name.as_deref(), cap)
        .await?;
    let mut v = key_json(&row);
    v["key"] = Value::String(raw);
    Ok((StatusCode::CREATED, Json(v)))
}

async fn admin_get_key(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    Ok(Json(key_json(&b.key(&prefix).await?)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchKey {
    /// null clears the cap
    spend_cap_usd: Value,
}

async fn admin_patch_key(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
    Json(body): Json<PatchKey>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    let cap = if body.spend_cap_usd.is_null() {
        None
    } else {
        Some(usd_value(&body.spend_cap_usd, "spend_cap_usd")?)
    };
    Ok(Json(key_json(&b.set_key_cap(&prefix, cap).await?)))
}

async fn admin_revoke_key(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    b.revoke_key(&prefix).await?;
    Ok(Json(key_json(&b.key(&prefix).await?)))
}

#[derive(Debug, Deserialize)]
struct PriceListParams {
    model: Option<String>,
}

async fn admin_list_prices(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Query(q): Query<PriceListParams>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    let rows = match &q.model {
        Some(m) => b.price_history(m).await?,
        None => b.store().all_prices().await.map_err(BillingError::from)?,
    };
    Ok(Json(
        json!({"object": "list", "data": rows.iter().map(price_json).collect::<Vec<_>>()}),
    ))
}

#[derive(Debug, Deserialize)]
struct SetPrice {
    model: String,
    #[serde(default)]
    provider: String,
    /// `YYYY-MM-DD`, RFC 3339 UTC or unix seconds; default now.
    effective_at: Option<String>,
    #[serde(flatten)]
    spec: PriceSpec,
}

async fn admin_set_price(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Json(body): Json<SetPrice>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    admin(&b, &headers).await?;
    let at = match &body.effective_at {
        Some(s) => {
            parse_time(s).ok_or_else(|| BillingError::Invalid("bad `effective_at`".into()))?
        }
        None => now_ms(),
    };
    let row = body
        .spec
        .to_row(&body.model, &body.provider, "admin", at)
        .map_err(|e| BillingError::Invalid(e.to_string()))?;
    let r = b.set_price(&row).await?;
    Ok((StatusCode::CREATED, Json(price_json(&r))))
}

async fn admin_usage(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Query(q): Query<UsageParams>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    let account_id = match &q.account {
        Some(name) => Some(b.account(name).await?.id),
        None => None,
    };
    usage_response(&b, account_id, &q).await
}

async fn admin_get_request(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    request_view(&b, &b.request_record(&id).await?).await
}

async fn admin_ledger_check(
    State(b): State<Arc<Billing>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&b, &headers).await?;
    let rep = b.check_ledger(Some(now_ms())).await?;
    Ok(Json(json!({
        "ok": rep.is_ok(),
        "transactions": rep.transactions,
        "entries": rep.entries,
        "requests": rep.requests,
        "open_holds": rep.open_holds,
        "revenue_usd": usd_json(rep.revenue_micros),
        "problems": rep.problems,
    })))
}
