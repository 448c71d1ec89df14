//! `POST /v1/chat/completions`: body limits, parsing, dispatch, and the JSON or SSE answer.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::{authorize, billing, sse, AppState, RequestId};
use crate::error::GatewayError;
use crate::gateway::usage::Metered;
use crate::gateway::{estimate_prompt_tokens, Answer, Prepared};
use crate::limits::{Demand, RateHeaders, SettleSink};
use crate::openai::{self, wire::Envelope};

/// Reads a request body, refusing (413) anything over `limit` without reading it all.
pub async fn read_body(req: Request, limit: u64) -> Result<(HeaderMap, Bytes), GatewayError> {
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
    }
    let limited = http_body_util::Limited::new(body, limit as usize);
    match limited.collect().await {
        Ok(c) => Ok((parts.headers, c.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::PayloadTooLarge { limit })
        }
        Err(e) => Err(GatewayError::invalid(
            format!("could not read the request body: {e}"),
            None,
        )),
    }
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let mut rate = RateHeaders::default();
    let mut resp = match handle(&state, req, &mut rate).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    super::limits::apply_headers(&mut resp, &rate);
    resp
}

/// The worst case a request may use: prompt estimate + maximum output tokens, and their cost at
/// the most expensive route (the route is only known after dispatch).
fn demand(prepared: &Prepared, prompt_estimate: u64, request_id: &str) -> Demand {
    let max_out = u64::from(
        prepared
            .request
            .max_output_tokens
            .unwrap_or(prepared.model.max_output_tokens)
            .min(prepared.model.max_output_tokens),
    );
    let cost = prepared
        .model
        .routes
        .iter()
        .map(|r| {
            crate::limits::cost_micros(
                &r.price,
                &crate::gateway::model::Usage {
                    prompt_tokens: prompt_estimate,
                    completion_tokens: max_out,
                    ..Default::default()
                },
            )
        })
        .max()
        .unwrap_or(0);
    Demand {
        request_id: request_id.to_string(),
        tokens: prompt_estimate.saturating_add(max_out),
        cost_micros: cost,
    }
}

async fn handle(
    state: &Arc<AppState>,
    req: Request,
    rate: &mut RateHeaders,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let principal = authorize(state, req.headers()).await?;
    let subject = super::limits::subject(state, principal.as_ref()).await;
    let (_headers, body) = read_body(req, state.config.server.max_body_bytes).await?;
    let parsed = openai::parse_chat_request(&body)?;
    let prepared = state.gateway.prepare(parsed)?;
    let prompt_estimate = estimate_prompt_tokens(&prepared.request);
    // Limits are checked before anything is held or sent upstream; a refusal costs nothing.
    let admitted = match &subject {
        Some(s) => match state
            .limiter
            .admit(s, demand(&prepared, prompt_estimate, &request_id))
            .await
        {
            Ok(a) => Some(a),
            Err((e, h)) => {
                *rate = h;
                return Err(e.into());
            }
        },
        None => None,
    };
    if let Some(a) = &admitted {
        *rate = a.headers;
    }
    // Hold the worst case before any upstream call (402 insufficient_credits otherwise).
    let ticket = match billing::hold(
        state,
        principal.as_ref(),
        &prepared,
        &request_id,
        prompt_estimate,
    )
    .await
    {
        Ok(t) => t,
        Err(e) => {
            if let Some(a) = admitted {
                a.settle(0, 0);
            }
            return Err(e.into());
        }
    };
    let (answer, served) = match state.gateway.dispatch(&prepared, &request_id).await {
        Ok(x) => x,
        Err(e) => {
            // Nothing was delivered: charge 0, and the limiter reservation is returned in full.
            if let Some(a) = admitted {
                a.settle(0, 0);
            }
            if let Some(t) = ticket {
                t.release("upstream_error").await;
            }
            return Err(e.into());
        }
    };
    let model_id = prepared.model.id.as_str();
    let template = state.gateway.outcome(&request_id, model_id, &served);
    let show_reasoning = !prepared.request.reasoning.exclude;
    let completion_id = format!("chatcmpl-{}", request_id.trim_start_matches("req_"));
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);

    let mut resp = match answer {
        Answer::Complete(r) => {
            let usage = state
                .gateway
                .record_complete(template, &r, prompt_estimate, started);
            if let Some(a) = admitted {
                a.settle(
                    usage.total_tokens(),
                    crate::limits::cost_micros(&served.price, &usage),
                );
            }
            // Settle before answering, so the cost shown is the cost charged.
            let cost = match ticket {
                Some(t) => t.settle_complete(&served, &usage, r.usage.is_none()).await,
                None => None,
            };
            let env = Envelope {
                id: &completion_id,
                created,
                model: model_id,
                provider: &served.provider,
            };
            let json = openai::wire::completion_json(&env, &r, show_reasoning, cost);
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                json,
            )
                .into_response();
            if let Some(c) = cost.and_then(|c| i64::try_from(c).ok()) {
                if let Ok(v) = HeaderValue::from_str(&crate::billing::format_usd(c)) {
                    resp.headers_mut().insert("x-tollgate-cost-usd", v);
                }
            }
            resp
        }
        Answer::Stream(stream) => {
            let (sink, cost) = match ticket {
                Some(t) => {
                    let (sink, rx) = t.into_sink(state.gateway.sink());
                    (sink, Some(rx))
                }
                None => (state.gateway.sink(), None),
            };
            // The stream's outcome (also on client disconnect) settles the limiter reservation.
            let sink: Arc<dyn crate::gateway::usage::OutcomeSink> = match admitted {
                Some(a) => Arc::new(SettleSink::new(sink, a, served.price)),
                None => sink,
            };
            let metered = Metered::new(stream, sink, template, prompt_estimate, started);
            let body = sse::chat_sse(
                metered,
                sse::ChatSseOptions {
                    id: completion_id,
                    created,
                    model: model_id.to_string(),
                    provider: served.provider.clone(),
                    include_usage: prepared.request.include_usage,
                    show_reasoning,
                    keepalive: state.config.server.keepalive,
                    cost,
                },
            );
            let mut r = Response::new(Body::from_stream(body));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            r
        }
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&served.provider) {
        h.insert("x-tollgate-provider", v);
    }
    if !prepared.warnings.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&prepared.warnings.join("; ")) {
            h.insert("x-tollgate-warning", v);
        }
    }
    Ok(resp)
}
