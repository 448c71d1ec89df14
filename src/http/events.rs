//! Named-event SSE (`event: NAME` + `data: JSON`) for the Anthropic and Responses surfaces: drives
//! a per-API encoder over the metered chunk stream, with keep-alives while the upstream is silent.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;
use serde_json::Value;

use crate::anthropic::outbound as ant;
use crate::error::GatewayError;
use crate::gateway::model::{ChatChunk, Usage};
use crate::gateway::usage::Metered;
use crate::responses::outbound as resp;

pub type Event = (&'static str, Value);

/// One inbound API's stream encoder.
pub trait EventEncoder: Send + 'static {
    fn start(&mut self) -> Vec<Event>;
    fn chunk(&mut self, chunk: &ChatChunk) -> Vec<Event>;
    fn finish(&mut self, usage: Option<Usage>) -> Vec<Event>;
    fn fail(&mut self, e: &GatewayError) -> Vec<Event>;
    /// The keep-alive event; `None` sends an SSE comment.
    fn keepalive(&mut self) -> Option<Event>;
}

impl EventEncoder for ant::StreamEncoder {
    fn start(&mut self) -> Vec<Event> {
        ant::StreamEncoder::start(self)
    }
    fn chunk(&mut self, chunk: &ChatChunk) -> Vec<Event> {
        ant::StreamEncoder::chunk(self, chunk)
    }
    fn finish(&mut self, usage: Option<Usage>) -> Vec<Event> {
        ant::StreamEncoder::finish(self, usage)
    }
    fn fail(&mut self, e: &GatewayError) -> Vec<Event> {
        let p = super::error::parts(e);
        let kind = ant::error_type(p.status.as_u16(), upstream_kind(e));
        let body =
            serde_json::json!({"type": "error", "error": {"type": kind, "message": e.to_string()}});
        vec![("error", body)]
    }
    fn keepalive(&mut self) -> Option<Event> {
        Some(("ping", serde_json::json!({"type": "ping"})))
    }
}

impl EventEncoder for resp::StreamEncoder {
    fn start(&mut self) -> Vec<Event> {
        resp::StreamEncoder::start(self)
    }
    fn chunk(&mut self, chunk: &ChatChunk) -> Vec<Event> {
        resp::StreamEncoder::chunk(self, chunk)
    }
    fn finish(&mut self, usage: Option<Usage>) -> Vec<Event> {
        resp::StreamEncoder::finish(self, usage)
    }
    fn fail(&mut self, e: &GatewayError) -> Vec<Event> {
        let p = super::error::parts(e);
        resp::StreamEncoder::fail(self, p.code.unwrap_or(p.kind), &e.to_string())
    }
    fn keepalive(&mut self) -> Option<Event> {
        None
    }
}

/// The upstream's own error type, when the error came from one.
pub fn upstream_kind(e: &GatewayError) -> Option<&str> {
    match e {
        GatewayError::UpstreamRejected(r) => r.kind.as_deref(),
        _ => None,
    }
}

fn frame(out: &mut BytesMut, name: &str, data: &Value) {
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(&serde_json::to_vec(data).unwrap_or_default());
    out.put_slice(b"\n\n");
}

fn frames(events: Vec<Event>) -> Bytes {
    let mut b = BytesMut::new();
    for (name, data) in &events {
        frame(&mut b, name, data);
    }
    b.freeze()
}

fn keepalive_frame<E: EventEncoder>(enc: &mut E) -> Bytes {
    match enc.keepalive() {
        Some(ev) => frames(vec![ev]),
        None => Bytes::from_static(b": keep-alive\n\n"),
    }
}

/// Encodes the metered stream with `enc`. The stream is never buffered: each chunk's events are
/// written as soon as they are encoded.
pub fn event_sse<E: EventEncoder>(
    mut metered: Metered,
    mut enc: E,
    keepalive: Duration,
    cost: Option<tokio::sync::oneshot::Receiver<Option<u64>>>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    async_stream::stream! {
        yield Ok(frames(enc.start()));
        // Hidden reasoning produces no events: keep-alives also cover a busy but invisible upstream.
        let mut last_write = tokio::time::Instant::now();
        let timer = tokio::time::sleep(keepalive);
        tokio::pin!(timer);
        loop {
            let Some(next) = super::sse::next_or_idle(&mut metered, timer.as_mut(), keepalive).await else {
                yield Ok(keepalive_frame(&mut enc));
                last_write = tokio::time::Instant::now();
                continue;
            };
            match next {
                Some(Ok(chunk)) => {
                    let evs = enc.chunk(&chunk);
                    if !evs.is_empty() {
                        yield Ok(frames(evs));
                        last_write = tokio::time::Instant::now();
                    } else if last_write.elapsed() >= keepalive {
                        yield Ok(keepalive_frame(&mut enc));
                        last_write = tokio::time::Instant::now();
                    }
                }
                Some(Err(e)) => {
                    yield Ok(frames(enc.fail(&e)));
                    return;
                }
                None => break,
            }
        }
        // Settlement is committed before the final usage event is sent (as for chat streams).
        let cost = match cost {
            Some(rx) => tokio::time::timeout(super::sse::SETTLE_WAIT, rx).await.ok().and_then(Result::ok).flatten(),
            None => None,
        };
        let mut evs = enc.finish(metered.usage());
        add_cost(&mut evs, cost);
        yield Ok(frames(evs));
    }
}

/// Adds the request's charge to the usage object of the final event, as `cost` in USD (as chat
/// streams show it in `usage.cost`): `message_delta` (Anthropic), `response.completed` /
/// `response.incomplete` (Responses).
fn add_cost(evs: &mut [(&'static str, Value)], cost_micros: Option<u64>) {
    let Some(c) = cost_micros else { return };
    for (name, body) in evs.iter_mut() {
        let usage = match *name {
            "message_delta" => body.get_mut("usage"),
            "response.completed" | "response.incomplete" => {
                body.get_mut("response").and_then(|r| r.get_mut("usage"))
            }
            _ => None,
        };
        if let Some(Value::Object(u)) = usage {
            u.insert(
                "cost".to_string(),
                crate::openai::wire::micros_to_usd(c).into(),
            );
        }
    }
}
