//! `POST /v1/chat/completions`, and the request path all three inbound APIs share (body limits,
//! auth, parse, prepare, dispatch, metering).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::{authorize, billing, presented_key, sse, AppState, RequestId};
use crate::error::GatewayError;
use crate::gateway::model::{ChatRequest, ChatResponse};
use crate::gateway::usage::Metered;
use crate::gateway::{estimate_prompt_tokens, memory, Answer, Prepared, Served};
use crate::limits::{Demand, SettleSink};
use crate::openai::{self, wire::Envelope};

/// `fut`'s output, waited for at most `timeout` when it is not ready at once (a future that is
/// ready when first polled starts no timer).
async fn within<F: std::future::Future>(
    fut: F,
    timeout: Duration,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    match futures::poll!(fut.as_mut()) {
        std::task::Poll::Ready(v) => Ok(v),
        std::task::Poll::Pending => tokio::time::timeout(timeout, fut).await,
    }
}

/// Reads a request body, refusing (413) anything over `limit` without reading it all, and (408)
/// one that pauses longer than `timeout` (`[server] client_timeout_secs`) between frames.
///
/// The pause is timed here, and only for a frame that is not ready when asked for (see
/// [`within`]). A body-timeout layer on the router armed and cancelled a timer per request: the
/// billing bench's unbilled gateway went from 25.5–25.7 to 26.5–27.1 µs of CPU per request.
pub async fn read_body(
    req: Request,
    limit: u64,
    timeout: Duration,
) -> Result<(HeaderMap, Bytes), GatewayError> {
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
    let mut body = http_body_util::Limited::new(body, limit as usize);
    let mut chunks: Vec<Bytes> = Vec::new();
    let timed_out = |_| GatewayError::RequestTimeout {
        secs: timeout.as_secs(),
    };
    while let Some(frame) = within(body.frame(), timeout).await.map_err(timed_out)? {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    chunks.push(data);
                }
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::PayloadTooLarge { limit })
            }
            Err(e) => {
                return Err(GatewayError::invalid(
                    format!("could not read the request body: {e}"),
                    None,
                ))
            }
        }
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    };
    Ok((parts.headers, bytes))
}

/// The worst case a request may use: prompt estimate + maximum output tokens, and their cost at
/// the most expensive route (the route is only known after dispatch).
fn demand(
    prepared: &Prepared,
    prices: &crate::gateway::prices::PriceBook,
    prompt_estimate: u64,
    request_id: &str,
) -> Demand {
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
                &prices.of(&prepared.model.id, r).0,
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

/// A request that went through the shared path: authorised, parsed, prepared, dispatched, and
/// metered (a complete answer is recorded; a stream records itself when it ends).
pub struct Dispatched {
    pub request_id: String,
    pub prepared: Prepared,
    pub served: Served,
    pub created: i64,
    pub answer: Metering,
    /// A complete answer's charge in micro-USD (settled before the answer is sent).
    pub cost_micros: Option<u64>,
    /// A stream's charge, sent once its outcome is settled (before the final usage / `[DONE]`).
    pub stream_cost: Option<tokio::sync::oneshot::Receiver<Option<u64>>>,
}

/// The charge of a complete answer, in USD.
const COST_HEADER: header::HeaderName = header::HeaderName::from_static("x-tollgate-cost-usd");

/// Sets `x-tollgate-cost-usd` (a complete answer's charge) on its response.
pub fn annotate_cost(resp: &mut Response, cost_micros: Option<u64>) {
    if let Some(c) = cost_micros.and_then(|c| i64::try_from(c).ok()) {
        if let Ok(v) = HeaderValue::try_from(crate::billing::format_usd(c)) {
            resp.headers_mut().insert(COST_HEADER, v);
        }
    }
}

/// The answer with its metering attached.
pub enum Metering {
    Complete(ChatResponse),
    Stream(Metered),
}

/// The one path every inbound API shares: auth → parse → prepare → dispatch → meter. `parse`
/// turns the body into the internal request (plus whatever its encoder needs).
pub async fn handle<T>(
    state: &AppState,
    req: Request,
    parse: impl FnOnce(&[u8]) -> Result<(ChatRequest, T), GatewayError>,
) -> Result<(Dispatched, T), GatewayError> {
    let started = Instant::now();
    #[cfg(feature = "calibration")]
    super::calibration::burn();
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let principal = authorize(state, req.headers()).await?;
    let subject = super::limits::subject(state, principal.as_ref()).await;
    let rate_slot = super::limits::RateSlot::of(&req);
    let scope = memory::scope_of(presented_key(req.headers()));
    let server = &state.config.server;
    let (_headers, body) = read_body(req, server.max_body_bytes, server.client_timeout).await?;
    let (parsed, extra) = parse(&body)?;
    let mut prepared = state.gateway.prepare(parsed)?;
    let mem = state.gateway.memory();
    mem.restore(scope, &mut prepared.request);
    let prompt_estimate = estimate_prompt_tokens(&prepared.request);
    // Limits are checked before anything is held or sent upstream; a refusal costs nothing.
    let admitted = match &subject {
        Some(s) => match state
            .limiter
            .admit(
                s,
                demand(
                    &prepared,
                    state.gateway.prices(),
                    prompt_estimate,
                    &request_id,
                ),
            )
            .await
        {
            Ok(a) => Some(a),
            Err((e, h)) => {
                rate_slot.set(h);
                return Err(e);
            }
        },
        None => None,
    };
    if let Some(a) = &admitted {
        rate_slot.set(a.headers);
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
            return Err(e);
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
            return Err(e);
        }
    };
    let template = state
        .gateway
        .outcome(&request_id, &prepared.model.id, &served);
    let mut cost_micros = None;
    let mut stream_cost = None;
    let answer = match answer {
        Answer::Complete(r) => {
            mem.remember_response(scope, &r);
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
            if let Some(t) = ticket {
                cost_micros = t.settle_complete(&served, &usage, r.usage.is_none()).await;
            }
            Metering::Complete(r)
        }
        Answer::Stream(s) => {
            let sink = match ticket {
                Some(t) => {
                    let (sink, rx) = t.into_sink(state.gateway.sink());
                    stream_cost = Some(rx);
                    sink
                }
                None => state.gateway.sink(),
            };
            // The stream's outcome (also on client disconnect) settles the limiter reservation.
            let sink: Arc<dyn crate::gateway::usage::OutcomeSink> = match admitted {
                Some(a) => Arc::new(SettleSink::new(sink, a, served.price)),
                None => sink,
            };
            Metering::Stream(Metered::new(
                mem.observe(scope, s),
                sink,
                template,
                prompt_estimate,
                started,
            ))
        }
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok((
        Dispatched {
            request_id,
            prepared,
            served,
            created,
            answer,
            cost_micros,
            stream_cost,
        },
        extra,
    ))
}

/// An SSE response around a byte stream.
pub fn sse_response<S>(body: S) -> Response
where
    S: futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
{
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

/// A JSON response.
pub fn json_response(json: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        json,
    )
        .into_response()
}

/// `x-tollgate-provider` and `x-tollgate-warning` on a successful answer.
pub fn annotate(resp: &mut Response, provider: &str, warnings: &[String]) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(provider) {
        h.insert("x-tollgate-provider", v);
    }
    if !warnings.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&warnings.join("; ")) {
            h.insert("x-tollgate-warning", v);
        }
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (d, ()) = handle(&state, req, |b| Ok((openai::parse_chat_request(b)?, ()))).await?;
    let p = &d.prepared;
    let show_reasoning = !p.request.reasoning.exclude;
    let completion_id = format!("chatcmpl-{}", d.request_id.trim_start_matches("req_"));
    let mut resp = match d.answer {
        Metering::Complete(r) => {
            let env = Envelope {
                id: &completion_id,
                created: d.created,
                model: &p.model.id,
                provider: &d.served.provider,
            };
            json_response(openai::wire::completion_json(
                &env,
                &r,
                show_reasoning,
                d.cost_micros,
            ))
        }
        Metering::Stream(metered) => sse_response(sse::chat_sse(
            metered,
            sse::ChatSseOptions {
                id: completion_id,
                created: d.created,
                model: p.model.id.clone(),
                provider: d.served.provider.clone(),
                include_usage: p.request.include_usage,
                show_reasoning,
                keepalive: state.config.server.keepalive,
                cost: d.stream_cost,
            },
        )),
    };
    annotate(&mut resp, &d.served.provider, &p.warnings);
    super::chat::annotate_cost(&mut resp, d.cost_micros);
    Ok(resp)
}
