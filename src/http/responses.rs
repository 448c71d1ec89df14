//! `POST /v1/responses` (OpenAI Responses API): the shared request path with Responses parsing and
//! the `response` object / `response.*` SSE encoding; errors use the OpenAI error shape.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;

use super::chat::{annotate, handle, json_response, sse_response, Metering};
use super::error::ApiError;
use super::events::event_sse;
use super::AppState;
use crate::responses::outbound::{self, ResponseMeta};
use crate::responses::parse_responses_request;

pub async fn responses(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response, ApiError> {
    let (d, opts) = handle(&state, req, parse_responses_request).await?;
    let p = &d.prepared;
    let show_reasoning = !p.request.reasoning.exclude;
    let meta = ResponseMeta {
        id: format!("resp_{}", d.request_id.trim_start_matches("req_")),
        created_at: d.created,
        model: p.model.id.clone(),
        opts,
        max_output_tokens: p.request.max_output_tokens,
        effort: p.request.reasoning.effort.map(|e| e.as_str().to_string()),
    };
    let mut resp = match d.answer {
        Metering::Complete(r) => {
            let v = outbound::complete_json(&meta, &r, show_reasoning);
            json_response(serde_json::to_vec(&v).unwrap_or_default())
        }
        Metering::Stream(metered) => sse_response(event_sse(
            metered,
            outbound::StreamEncoder::new(meta, show_reasoning),
            state.config.server.keepalive,
            d.stream_cost,
        )),
    };
    annotate(&mut resp, &d.served.provider, &p.warnings);
    super::chat::annotate_cost(&mut resp, d.cost_micros);
    Ok(resp)
}
