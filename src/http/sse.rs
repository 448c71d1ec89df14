//! Encodes a metered chunk stream as OpenAI chat SSE: chunks as they arrive, keep-alive comments
//! while the upstream is silent, the usage chunk when asked for, then `[DONE]` — or, if the
//! upstream fails mid-stream, an OpenAI-shaped error event and no `[DONE]`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};

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
const SETTLE_WAIT: Duration = Duration::from_secs(10);

fn frame(json: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    b.put_slice(b"data: ");
    b.put_slice(json);
    b.put_slice(b"\n\n");
    b.freeze()
}

pub fn chat_sse(
    mut metered: Metered,
    o: ChatSseOptions,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    async_stream::stream! {
        let env = Envelope { id: &o.id, created: o.created, model: &o.model, provider: &o.provider };
        loop {
            let next = match tokio::time::timeout(o.keepalive, metered.next()).await {
                Err(_) => {
                    yield Ok(Bytes::from_static(b": keep-alive\n\n"));
                    continue;
                }
                Ok(n) => n,
            };
            match next {
                Some(Ok(chunk)) => {
                    let visible = chunk.choices.iter().any(|c| o.show_reasoning || !c.is_reasoning_only());
                    if visible {
                        yield Ok(frame(&chunk_json(&env, &chunk, o.show_reasoning)));
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
