//! Encodes a metered chunk stream as OpenAI chat SSE: chunks as they arrive, keep-alive comments
//! while the upstream is silent, the usage chunk when asked for, then `[DONE]` — or, if the
//! upstream fails mid-stream, an OpenAI-shaped error event and no `[DONE]`.

use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{FutureExt, Stream, StreamExt};

use crate::error::GatewayError;
use crate::gateway::model::ChatChunk;
use crate::gateway::usage::Metered;
use crate::openai::wire::{chunk_json, usage_chunk_json, Envelope};

pub struct ChatSseOptions {
    pub id: String,
    pub created: i64,
    pub model: String,
    pub provider: String,
    pub include_usage: bool,
    pub show_reasoning: bool,
    pub keepalive: Duration,
    /// The request's charge (micro-USD), sent by billing once the stream's outcome is settled.
    pub cost: Option<tokio::sync::oneshot::Receiver<Option<u64>>>,
}

/// How long the end of a stream waits for its settlement before sending the usage chunk anyway.
pub(super) const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// Chunks that are already waiting when one is sent join it in one body frame (one write), up
/// to this many bytes; a chunk is never held back to wait for another.
const COALESCE_BYTES: usize = 16 * 1024;

/// The next chunk, or `None` when `every` passes first (time for a keep-alive). One timer serves a
/// whole stream: pushing its deadline later is lock-free in tokio, whereas a fresh `timeout` per
/// chunk registers and removes a timer under the runtime's timer lock, which the workers contend
/// for (perf showed `sched_yield` in that lock on every streamed request).
pub(crate) async fn next_or_idle(
    metered: &mut Metered,
    timer: Pin<&mut tokio::time::Sleep>,
    every: Duration,
) -> Option<Option<Result<ChatChunk, GatewayError>>> {
    let mut timer = timer;
    timer.as_mut().reset(tokio::time::Instant::now() + every);
    tokio::select! {
        biased;
        next = metered.next() => Some(next),
        _ = timer => None,
    }
}

fn frame(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    put_frame(&mut b, json);
    b.freeze()
}

fn put_frame(b: &mut BytesMut, json: &[u8]) {
    b.reserve(json.len() + 8);
    b.put_slice(b"data: ");
    b.put_slice(json);
    b.put_slice(b"\n\n");
}

pub fn chat_sse(
    mut metered: Metered,
    o: ChatSseOptions,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    async_stream::stream! {
        let env = Envelope { id: &o.id, created: o.created, model: &o.model, provider: &o.provider };
        let timer = tokio::time::sleep(o.keepalive);
        tokio::pin!(timer);
        loop {
            let Some(next) = next_or_idle(&mut metered, timer.as_mut(), o.keepalive).await else {
                yield Ok(Bytes::from_static(b": keep-alive\n\n"));
                continue;
            };
            let visible = |chunk: &ChatChunk| {
                chunk.choices.iter().any(|c| o.show_reasoning || !c.is_reasoning_only())
            };
            match next {
                Some(Ok(chunk)) => {
                    let mut out = BytesMut::new();
                    if visible(&chunk) {
                        put_frame(&mut out, &chunk_json(&env, &chunk, o.show_reasoning));
                    }
                    // Take what the upstream has already sent, without waiting for more.
                    let mut end = None;
                    while out.len() < COALESCE_BYTES {
                        match metered.next().now_or_never() {
                            Some(Some(Ok(chunk))) => {
                                if visible(&chunk) {
                                    put_frame(&mut out, &chunk_json(&env, &chunk, o.show_reasoning));
                                }
                            }
                            Some(Some(Err(e))) => {
                                end = Some(Some(e));
                                break;
                            }
                            Some(None) => {
                                end = Some(None);
                                break;
                            }
                            None => break,
                        }
                    }
                    match end {
                        Some(Some(e)) => {
                            put_frame(&mut out, &crate::http::error::body(&e));
                            yield Ok(out.freeze());
                            return;
                        }
                        Some(None) => {
                            if !out.is_empty() {
                                yield Ok(out.freeze());
                            }
                            break;
                        }
                        None => {
                            if !out.is_empty() {
                                yield Ok(out.freeze());
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    yield Ok(frame(&crate::http::error::body(&e)));
                    return;
                }
                None => break,
            }
        }
        // Settlement is committed before the final usage (and [DONE]) is sent.
        let cost = match o.cost {
            Some(rx) => tokio::time::timeout(SETTLE_WAIT, rx).await.ok().and_then(Result::ok).flatten(),
            None => None,
        };
        if o.include_usage {
            if let Some(u) = metered.usage() {
                yield Ok(frame(&usage_chunk_json(&env, &u, cost)));
            }
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}
