//! `POST /v1/messages` (Anthropic Messages): the shared request path with Anthropic parsing,
//! the Anthropic `message` / SSE encoding, and Anthropic-shaped errors (529 for overload).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::chat::{annotate, handle, json_response, sse_response, Metering};
use super::events::{event_sse, upstream_kind};
use super::{AppState, RequestId};
use crate::anthropic::{self, outbound};
use crate::error::GatewayError;

/// An error in Anthropic's shape: `{"type":"error","error":{"type","message"},"request_id"}`.
pub struct AnthropicError(pub GatewayError, pub String);

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let p = super::error::parts(&self.0);
        let kind = outbound::error_type(p.status.as_u16(), upstream_kind(&self.0));
        let status = match kind {
            "overloaded_error" => {
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            _ => p.status,
        };
        let body = outbound::error_json(kind, &self.0.to_string(), &self.1);
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&body).unwrap_or_default(),
        )
            .into_response();
        if let Some(ra) = p.retry_after {
            if let Ok(v) = HeaderValue::from_str(&ra.as_secs_f64().ceil().max(0.0).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let Some(provider) = p.provider.and_then(|p| HeaderValue::from_str(p).ok()) {
            resp.headers_mut().insert("x-tollgate-provider", provider);
        }
        resp
    }
}

pub async fn messages(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let (d, ()) = match handle(&state, req, |b| {
        Ok((anthropic::parse_messages_request(b)?, ()))
    })
    .await
    {
        Ok(x) => x,
        Err(e) => return AnthropicError(e, request_id).into_response(),
    };
    let p = &d.prepared;
    let show_reasoning = !p.request.reasoning.exclude;
    let id = format!("msg_{}", d.request_id.trim_start_matches("req_"));
    let mut resp = match d.answer {
        Metering::Complete(r) => {
            let v = outbound::message_json(&id, &p.model.id, &r, show_reasoning);
            json_response(serde_json::to_vec(&v).unwrap_or_default())
        }
        Metering::Stream(metered) => sse_response(event_sse(
            metered,
            outbound::StreamEncoder::new(&id, &p.model.id, show_reasoning),
            state.config.server.keepalive,
            d.stream_cost,
        )),
    };
    annotate(&mut resp, &d.served.provider, &p.warnings);
    super::chat::annotate_cost(&mut resp, d.cost_micros);
    resp
}

/// `POST /v1/messages/count_tokens`: a local estimate of the prompt's input tokens (Claude Code
/// and the Anthropic SDK call it to size context); nothing is sent upstream.
pub async fn count_tokens(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let work = async {
        super::authorize(&state, req.headers()).await?;
        let server = &state.config.server;
        let (_h, body) =
            super::chat::read_body(req, server.max_body_bytes, server.client_timeout).await?;
        // count_tokens has no max_tokens; the parser does not require it.
        let parsed = anthropic::parse_messages_request(&body)?;
        let prepared = state.gateway.prepare(parsed)?;
        Ok::<u64, GatewayError>(crate::gateway::estimate_prompt_tokens(&prepared.request))
    };
    match work.await {
        Ok(n) => json_response(
            serde_json::to_vec(&serde_json::json!({"input_tokens": n})).unwrap_or_default(),
        ),
        Err(e) => AnthropicError(e, request_id).into_response(),
    }
}
