//! An incremental Server-Sent Events parser: feed it bytes split at any boundary, get whole events.
//!
//! Lines end in `\n`, `\r\n` or `\r`; `data:` lines of one event are joined with `\n`; comment lines
//! (starting with `:`) are counted but produce no event; a blank line dispatches the event.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::gateway::model::{ChatChunk, ChunkStream};

/// One parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Parser state across `feed` calls.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// A `\r` ended the last line; a following `\n` belongs to it.
    pending_cr: bool,
    comments: u64,
}

/// Events larger than this are refused (a protection against a runaway upstream).
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("an SSE event from the upstream exceeded {MAX_EVENT_BYTES} bytes")]
pub struct SseTooLarge;

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// How many comment lines (keep-alives) were seen.
    pub fn comments(&self) -> u64 {
        self.comments
    }

    /// Feeds bytes; appends every completed event to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseTooLarge> {
        self.buf.extend_from_slice(bytes);
        loop {
            if self.pending_cr {
                if self.buf.is_empty() {
                    break;
                }
                if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
                self.pending_cr = false;
            }
            let Some(pos) = memchr::memchr2(b'\n', b'\r', &self.buf) else {
                break;
            };
            let is_cr = self.buf[pos] == b'\r';
            let line = self.buf.split_to(pos);
            self.buf.advance(1);
            if is_cr {
                self.pending_cr = true;
            }
            self.line(&line, out);
        }
        if self.buf.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(SseTooLarge);
        }
        Ok(())
    }

    /// Flushes a final event that was not followed by a blank line (stream ended).
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.line(&line, out);
        }
        self.dispatch(out);
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {} // id, retry and unknown fields carry nothing we use
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        if self.has_data {
            out.push(SseEvent {
                event: self.event.take(),
                data: std::mem::take(&mut self.data),
            });
        }
        self.event = None;
        self.has_data = false;
    }
}

/// A dialect's per-stream decoder: turns upstream SSE events into internal chunks.
pub trait ChunkDecoder: Send + 'static {
    /// One event; `Err` ends the stream as an upstream failure.
    fn event(&mut self, ev: &SseEvent) -> Result<Option<ChatChunk>, String>;
    /// The upstream said the stream is over (e.g. `[DONE]`, `message_stop`).
    fn done(&self) -> bool;
    /// The answer reached its end (a finish reason was seen), so a closed body is complete.
    fn saw_finish(&self) -> bool;
}

/// Reads an upstream SSE body with the idle and overall timeouts and decodes it into chunks. A body
/// that breaks, stalls or closes before the answer is complete ends with an error item.
pub fn decode_body<D: ChunkDecoder>(
    mut body: Incoming,
    provider: String,
    idle: Duration,
    deadline: Instant,
    mut dec: D,
) -> ChunkStream {
    Box::pin(async_stream::stream! {
        let mut parser = SseParser::new();
        let mut events: Vec<SseEvent> = Vec::new();
        let fail = |message: String| GatewayError::UpstreamFailed { provider: provider.clone(), message };
        // One timer for the whole body, pushed later on each frame (lock-free in tokio; a fresh
        // `timeout` per frame takes the runtime's timer lock twice).
        let timer = tokio::time::sleep_until(deadline.min(Instant::now() + idle));
        tokio::pin!(timer);
        loop {
            timer.as_mut().reset(deadline.min(Instant::now() + idle));
            let next = tokio::select! {
                biased;
                n = body.frame() => Some(n),
                _ = timer.as_mut() => None,
            };
            let Some(next) = next else {
                yield Err(GatewayError::UpstreamTimeout { provider: provider.clone(), message: "the upstream stream stalled or passed its deadline".into() });
                return;
            };
            let finished = match next {
                Some(Ok(frame)) => {
                    let Ok(bytes) = frame.into_data() else { continue };
                    if parser.feed(&bytes, &mut events).is_err() {
                        yield Err(fail("an SSE event from the upstream was too large".into()));
                        return;
                    }
                    false
                }
                Some(Err(e)) => {
                    yield Err(fail(format!("the upstream stream broke: {}", super::client::error_chain(&e))));
                    return;
                }
                None => {
                    parser.finish(&mut events);
                    true
                }
            };
            for ev in events.drain(..) {
                match dec.event(&ev) {
                    Ok(Some(chunk)) => yield Ok(chunk),
                    Ok(None) => {}
                    Err(msg) => {
                        yield Err(fail(msg));
                        return;
                    }
                }
                if dec.done() {
                    return;
                }
            }
            if finished {
                if !dec.saw_finish() {
                    yield Err(fail("the upstream stream ended before the answer was complete".into()));
                }
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> (Vec<SseEvent>, u64) {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).expect("size");
        }
        p.finish(&mut out);
        (out, p.comments())
    }

    const STREAM: &[u8] = b": OPENROUTER PROCESSING\n\ndata: {\"a\":1}\n\nevent: message_start\ndata: {\"b\":\r\ndata: 2}\r\n\r\ndata: \xc3\xa9t\xc3\xa9\n\ndata: [DONE]\n\n";

    #[test]
    fn parses_events_comments_and_multiline_data() {
        let (ev, comments) = parse_all(&[STREAM]);
        assert_eq!(comments, 1);
        let data: Vec<&str> = ev.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, vec!["{\"a\":1}", "{\"b\":\n2}", "été", "[DONE]"]);
        assert_eq!(ev[1].event.as_deref(), Some("message_start"));
    }

    #[test]
    fn any_split_gives_identical_events() {
        let (whole, _) = parse_all(&[STREAM]);
        for size in 1..=7 {
            let pieces: Vec<&[u8]> = STREAM.chunks(size).collect();
            assert_eq!(parse_all(&pieces).0, whole, "split at {size}");
        }
        for cut in 0..STREAM.len() {
            let (a, b) = STREAM.split_at(cut);
            assert_eq!(parse_all(&[a, b]).0, whole, "cut at {cut}");
        }
    }

    #[test]
    fn final_event_without_blank_line_is_flushed() {
        let (ev, _) = parse_all(&[b"data: x"]);
        assert_eq!(
            ev,
            vec![SseEvent {
                event: None,
                data: "x".into()
            }]
        );
    }
}
