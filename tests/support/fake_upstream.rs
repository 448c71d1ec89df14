//! In-process fake OpenAI-compatible upstream for integration tests: emulates Moonshot, OpenRouter
//! and plain OpenAI wire shapes, injects faults, splits SSE into tiny pieces, records requests.
//!
//! # Quick start
//!
//! ```ignore
//! mod support;
//! use support::fake_upstream::{Behavior, FakeUpstream, Scenario};
//!
//! let up = FakeUpstream::start(
//!     Scenario::new(Behavior::moonshot())                     // default for every request
//!         .model("or-kimi", Behavior::openrouter())            // by the upstream `model` in the body
//!         .model("boom", Behavior::status_json(500, "server_error", "boom"))
//!         .then(Behavior::rate_limited(2)),                    // one-shot queue, consumed first, FIFO
//! )
//! .await;
//! let base = up.base_url();                   // "http://127.0.0.1:PORT/v1"
//! // ... drive tollgate against it ...
//! let reqs = up.requests();                   // every request: method, path, headers, raw body
//! assert!(up.wait_until(|s| s.streams_cancelled >= 1, Duration::from_secs(1)).await);
//! ```
//!
//! # Which behavior answers a request
//! 1. the next entry of the one-shot queue (`Scenario::then`, `FakeUpstream::push`), else
//! 2. the behavior registered for the request body's `model` (`Scenario::model`, `set_model`), else
//! 3. the default (`Scenario::new`, `set_default`).
//!
//! `Behavior::dynamic(|req| ...)` picks a behavior per request from the recorded request itself.
//!
//! # Emulated dialects (`Behavior::moonshot()`, `openrouter()`, `openrouter_2025()`, `openai()`)
//! The emulators answer according to the request: `stream: true` gets SSE, otherwise one JSON body.
//! What is said comes from a [`Transcript`]: by default [`Transcript::for_request`] picks
//! [`Transcript::tool_turn`] when the request has `tools` and the last message is not `role: tool`,
//! [`Transcript::after_tool`] when the last message is a tool result, else [`Transcript::plain`].
//! Force one with `.transcript(t)`. Tests compute expected output from the same transcript values.
//!
//! * **Moonshot K2.6**: `reasoning_content` (omitted when `thinking.type == "disabled"`), tool-call ids
//!   like `functions.get_weather:0`, usage with a top-level `cached_tokens`; streamed usage sits in
//!   `choices[0].usage` on the finish chunk. Validation rule emulated (turn off with
//!   `.without_validation()`): thinking on (default for models whose name contains `k2.6` unless
//!   `thinking.type == "disabled"`, or `thinking.type == "enabled"`) and an assistant message with
//!   `tool_calls` but no `reasoning_content` → HTTP 400 `invalid_request_error`
//!   `"thinking is enabled but reasoning_content is missing in assistant tool call message at index N"`.
//! * **OpenRouter**: `: OPENROUTER PROCESSING` comment lines, `reasoning` + `reasoning_details`
//!   deltas, `provider` and `native_finish_reason` on chunks, usage (with `cost`) on the finish chunk
//!   (2026 shape) or, with `openrouter_2025()`, on a separate following chunk with non-empty
//!   `choices` and `finish_reason: null`. Usage is sent whatever `stream_options` says.
//!   `.mid_stream_error_after(n)`: after `n` data chunks, an HTTP-200 error event
//!   (`error` + `finish_reason: "error"`) and the stream ends without `[DONE]`.
//! * **OpenAI**: no reasoning; `logprobs` on content when the request asks `logprobs: true`;
//!   `stream_options.include_usage` → `usage: null` on every chunk plus a final `choices: []` chunk.
//!
//! # Raw replies
//! `Behavior::status_json(status, type, message)` (OpenAI-shaped error body), `Behavior::raw(status,
//! body)`, `Behavior::json(status, value)`, `Behavior::sse(events)` (hand-written [`SseOut`] list), and
//! presets `context_length_exceeded()`, `unauthorized()`, `rate_limited(retry_after_secs)`,
//! `server_error()`, `unavailable(retry_after_secs)`. `.header(name, value)` adds a response header.
//!
//! # Faults (combine freely with any reply)
//! * `.delay_headers(d)`: wait before sending the status line.
//! * `.never_answer()`: accept the request and never respond (the future stays pending).
//! * `.cut_after(n)`: after `n` body events, drop the connection (no terminating chunk, no `[DONE]`).
//! * `.stall_after(n)`: after `n` events, keep the stream open and silent until the client leaves.
//! * `.malformed_at(n)`: insert a malformed `data:` event (broken JSON) before event `n`.
//! * `.chunk_delay(d)`: pace events `d` apart.
//! * `.crlf()`: frame SSE with `\r\n` line ends instead of `\n` (combine with `.split` to cut
//!   between `\r` and `\n`).
//! * `.split(seed)`: deliver the body in random 1–7 byte pieces (seeded), each a separate HTTP chunk
//!   flushed on its own (channel-backed body); `.split_gap(d)` sleeps `d` between pieces.
//!
//! # Counters
//! [`FakeUpstream::stats`] snapshots [`Stats`]: open/total TCP connections, requests, active /
//! completed / cancelled / cut streams, and requests abandoned while their answer was pending.
//! A stream counts as *cancelled* when the client went away before the fake finished sending it.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Fixed `created` timestamp of every emulated response.
pub const CREATED: u64 = 1_768_994_256;
/// Message of the Moonshot thinking/tool-call validation error, without the index.
pub const MOONSHOT_MISSING_REASONING: &str =
    "thinking is enabled but reasoning_content is missing in assistant tool call message at index";

// ---------------------------------------------------------------------------------------------
// Recorded requests
// ---------------------------------------------------------------------------------------------

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query, e.g. `/v1/chat/completions`.
    pub path: String,
    pub headers: HeaderMap,
    /// The raw body bytes exactly as received.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The body's `model` field.
    pub fn model(&self) -> Option<String> {
        self.json()
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// Whether the body asks for a stream.
    pub fn is_stream(&self) -> bool {
        self.json().get("stream").and_then(Value::as_bool) == Some(true)
    }
}

// ---------------------------------------------------------------------------------------------
// Transcripts: what the emulated model "says"
// ---------------------------------------------------------------------------------------------

/// One tool call of a transcript, with its streamed argument fragments.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub argument_fragments: Vec<String>,
}

impl ToolCall {
    pub fn new(id: &str, name: &str, fragments: &[&str]) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            argument_fragments: fragments.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// The full arguments string (fragments concatenated).
    pub fn arguments(&self) -> String {
        self.argument_fragments.concat()
    }
}

/// Token usage of a transcript. `prompt_tokens` includes `cached_tokens`; `completion_tokens`
/// includes `reasoning_tokens` (OpenAI semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// The logical answer an emulator renders in its dialect.
#[derive(Clone, Debug, PartialEq)]
pub struct Transcript {
    pub reasoning: Vec<String>,
    pub content: Vec<String>,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: String,
    pub usage: Usage,
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

impl Transcript {
    /// A greeting: reasoning, then content (with multi-byte UTF-8), finish `stop`.
    pub fn plain() -> Self {
        Self {
            reasoning: strings(&["The user", " greets me;", " reply briefly."]),
            content: strings(&["Hello", " 你好", " from the", " fake upstream."]),
            tool_calls: vec![],
            finish_reason: "stop".into(),
            usage: Usage {
                prompt_tokens: 20,
                completion_tokens: 30,
                cached_tokens: 8,
                reasoning_tokens: 12,
            },
        }
    }

    /// Reasoning, a little content, then two parallel tool calls, finish `tool_calls`.
    pub fn tool_turn() -> Self {
        Self {
            reasoning: strings(&["I should", " call get_weather", " and get_time."]),
            content: strings(&["Let me", " check."]),
            tool_calls: vec![
                ToolCall::new(
                    "functions.get_weather:0",
                    "get_weather",
                    &["{\"city\":", " \"Paris\"}"],
                ),
                ToolCall::new(
                    "functions.get_time:1",
                    "get_time",
                    &["{\"tz\":\"", "Europe/Paris\"}"],
                ),
            ],
            finish_reason: "tool_calls".into(),
            usage: Usage {
                prompt_tokens: 120,
                completion_tokens: 45,
                cached_tokens: 64,
                reasoning_tokens: 20,
            },
        }
    }

    /// The answer after tool results came back, finish `stop`.
    pub fn after_tool() -> Self {
        Self {
            reasoning: strings(&["The tool", " says 18°C."]),
            content: strings(&["It is", " 18°C", " in Paris."]),
            tool_calls: vec![],
            finish_reason: "stop".into(),
            usage: Usage {
                prompt_tokens: 180,
                completion_tokens: 25,
                cached_tokens: 120,
                reasoning_tokens: 9,
            },
        }
    }

    /// The transcript the emulators use for `request` when none is forced.
    pub fn for_request(request: &Value) -> Self {
        let messages = request.get("messages").and_then(Value::as_array);
        let last_role = messages
            .and_then(|m| m.last())
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str);
        let has_tools = request
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
        let tool_choice_none = request.get("tool_choice").and_then(Value::as_str) == Some("none");
        if last_role == Some("tool") {
            Self::after_tool()
        } else if has_tools && !tool_choice_none {
            Self::tool_turn()
        } else {
            Self::plain()
        }
    }

    pub fn reasoning_text(&self) -> String {
        self.reasoning.concat()
    }

    pub fn content_text(&self) -> String {
        self.content.concat()
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviors
// ---------------------------------------------------------------------------------------------

/// Dialect an emulating behavior speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Moonshot,
    /// OpenRouter with usage on the finish chunk (2026 captures).
    OpenRouter,
    /// OpenRouter with usage on a separate chunk with non-empty choices (Sept 2025 captures).
    OpenRouter2025,
    OpenAi,
}

/// One SSE event the fake writes.
#[derive(Clone, Debug)]
pub enum SseOut {
    /// `data: <json>\n\n`
    Data(Value),
    /// `: <text>\n\n`
    Comment(String),
    /// `data: [DONE]\n\n`
    Done,
    /// Bytes written as they are.
    Raw(Bytes),
}

impl SseOut {
    pub fn data(v: Value) -> Self {
        Self::Data(v)
    }
    pub fn comment(text: &str) -> Self {
        Self::Comment(text.to_owned())
    }
    pub fn raw(bytes: &[u8]) -> Self {
        Self::Raw(Bytes::copy_from_slice(bytes))
    }

    /// The wire bytes of this event.
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Self::Data(v) => Bytes::from(format!("data: {v}\n\n")),
            Self::Comment(c) => Bytes::from(format!(": {c}\n\n")),
            Self::Done => Bytes::from_static(b"data: [DONE]\n\n"),
            Self::Raw(b) => b.clone(),
        }
    }
}

type DynamicFn = Arc<dyn Fn(&RecordedRequest) -> Behavior + Send + Sync>;

#[derive(Clone)]
enum Reply {
    Emulate {
        dialect: Dialect,
        transcript: Option<Transcript>,
        validate: bool,
        mid_stream_error_after: Option<usize>,
    },
    Raw {
        status: u16,
        content_type: &'static str,
        body: Bytes,
    },
    Sse(Vec<SseOut>),
    Dynamic(DynamicFn),
}

/// How the fake answers one request: a reply plus optional faults. Build with the constructors
/// and chain the modifiers (see the module docs).
#[derive(Clone)]
pub struct Behavior {
    reply: Reply,
    headers: Vec<(String, String)>,
    header_delay: Option<Duration>,
    never_answer: bool,
    cut_after: Option<usize>,
    stall_after: Option<usize>,
    malformed_at: Option<usize>,
    chunk_delay: Option<Duration>,
    split_seed: Option<u64>,
    split_gap: Option<Duration>,
    crlf: bool,
}

impl fmt::Debug for Behavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reply = match &self.reply {
            Reply::Emulate { dialect, .. } => format!("Emulate({dialect:?})"),
            Reply::Raw { status, .. } => format!("Raw({status})"),
            Reply::Sse(ev) => format!("Sse({} events)", ev.len()),
            Reply::Dynamic(_) => "Dynamic".to_owned(),
        };
        f.debug_struct("Behavior")
            .field("reply", &reply)
            .field("header_delay", &self.header_delay)
            .field("never_answer", &self.never_answer)
            .field("cut_after", &self.cut_after)
            .field("stall_after", &self.stall_after)
            .field("malformed_at", &self.malformed_at)
            .field("chunk_delay", &self.chunk_delay)
            .field("split_seed", &self.split_seed)
            .finish()
    }
}

impl Behavior {
    fn with_reply(reply: Reply) -> Self {
        Self {
            reply,
            headers: vec![],
            header_delay: None,
            never_answer: false,
            cut_after: None,
            stall_after: None,
            malformed_at: None,
            chunk_delay: None,
            split_seed: None,
            split_gap: None,
            crlf: false,
        }
    }

    fn emulate(dialect: Dialect) -> Self {
        Self::with_reply(Reply::Emulate {
            dialect,
            transcript: None,
            validate: dialect == Dialect::Moonshot,
            mid_stream_error_after: None,
        })
    }

    /// Moonshot K2.6 emulation (with the reasoning_content validation rule).
    pub fn moonshot() -> Self {
        Self::emulate(Dialect::Moonshot)
    }
    /// OpenRouter emulation, usage on the finish chunk (2026 shape).
    pub fn openrouter() -> Self {
        Self::emulate(Dialect::OpenRouter)
    }
    /// OpenRouter emulation, usage on a separate chunk after the finish chunk (2025 shape).
    pub fn openrouter_2025() -> Self {
        Self::emulate(Dialect::OpenRouter2025)
    }
    /// Plain OpenAI emulation (logprobs, include_usage).
    pub fn openai() -> Self {
        Self::emulate(Dialect::OpenAi)
    }

    /// Any status with a body given as bytes (`content-type: application/json`).
    pub fn raw(status: u16, body: &[u8]) -> Self {
        Self::with_reply(Reply::Raw {
            status,
            content_type: "application/json",
            body: Bytes::copy_from_slice(body),
        })
    }
    /// Any status with a JSON body.
    pub fn json(status: u16, body: Value) -> Self {
        Self::with_reply(Reply::Raw {
            status,
            content_type: "application/json",
            body: Bytes::from(body.to_string()),
        })
    }
    /// Status with an OpenAI/Moonshot-shaped error body `{"error":{"type","message"}}`.
    pub fn status_json(status: u16, error_type: &str, message: &str) -> Self {
        Self::json(
            status,
            json!({"error": {"type": error_type, "message": message}}),
        )
    }
    /// A hand-written SSE stream (status 200, `text/event-stream`).
    pub fn sse(events: Vec<SseOut>) -> Self {
        Self::with_reply(Reply::Sse(events))
    }
    /// Choose a behavior per request.
    pub fn dynamic(f: impl Fn(&RecordedRequest) -> Behavior + Send + Sync + 'static) -> Self {
        Self::with_reply(Reply::Dynamic(Arc::new(f)))
    }

    /// 400 as Moonshot words a context overflow.
    pub fn context_length_exceeded() -> Self {
        Self::status_json(
            400,
            "invalid_request_error",
            "Invalid request: Your request exceeded model token limit : 262144",
        )
    }
    /// 401 as Moonshot words a bad key.
    pub fn unauthorized() -> Self {
        Self::status_json(
            401,
            "invalid_authentication_error",
            "Invalid Authentication",
        )
    }
    /// 429 engine overloaded with `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::status_json(
            429,
            "engine_overloaded_error",
            "The engine is currently overloaded, please try again later",
        )
        .header("retry-after", &retry_after_secs.to_string())
    }
    /// 500 server error.
    pub fn server_error() -> Self {
        Self::status_json(500, "server_error", "internal server error")
    }
    /// 503 with `Retry-After`.
    pub fn unavailable(retry_after_secs: u64) -> Self {
        Self::status_json(503, "server_unavailable", "service unavailable")
            .header("retry-after", &retry_after_secs.to_string())
    }

    /// Force the transcript an emulator renders.
    pub fn transcript(mut self, t: Transcript) -> Self {
        if let Reply::Emulate { transcript, .. } = &mut self.reply {
            *transcript = Some(t);
        }
        self
    }
    /// Turn off the Moonshot reasoning_content validation rule.
    pub fn without_validation(mut self) -> Self {
        if let Reply::Emulate { validate, .. } = &mut self.reply {
            *validate = false;
        }
        self
    }
    /// OpenRouter: after `n` data chunks, send the mid-stream error event and end (no `[DONE]`).
    pub fn mid_stream_error_after(mut self, n: usize) -> Self {
        if let Reply::Emulate {
            mid_stream_error_after,
            ..
        } = &mut self.reply
        {
            *mid_stream_error_after = Some(n);
        }
        self
    }
    /// Add a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
    pub fn delay_headers(mut self, d: Duration) -> Self {
        self.header_delay = Some(d);
        self
    }
    pub fn never_answer(mut self) -> Self {
        self.never_answer = true;
        self
    }
    pub fn cut_after(mut self, events: usize) -> Self {
        self.cut_after = Some(events);
        self
    }
    pub fn stall_after(mut self, events: usize) -> Self {
        self.stall_after = Some(events);
        self
    }
    pub fn malformed_at(mut self, event: usize) -> Self {
        self.malformed_at = Some(event);
        self
    }
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        self.chunk_delay = Some(d);
        self
    }
    pub fn split(mut self, seed: u64) -> Self {
        self.split_seed = Some(seed);
        self
    }
    pub fn split_gap(mut self, d: Duration) -> Self {
        self.split_gap = Some(d);
        self
    }
    pub fn crlf(mut self) -> Self {
        self.crlf = true;
        self
    }
}

/// Which behavior answers which request (see the module docs for the order).
#[derive(Clone, Debug)]
pub struct Scenario {
    default: Behavior,
    by_model: HashMap<String, Behavior>,
    queue: VecDeque<Behavior>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self::new(Behavior::moonshot())
    }
}

impl Scenario {
    pub fn new(default: Behavior) -> Self {
        Self {
            default,
            by_model: HashMap::new(),
            queue: VecDeque::new(),
        }
    }
    /// Answer requests whose body `model` equals `model` with `behavior`.
    pub fn model(mut self, model: &str, behavior: Behavior) -> Self {
        self.by_model.insert(model.to_owned(), behavior);
        self
    }
    /// Queue a one-shot behavior (consumed by the next request, before any other rule).
    pub fn then(mut self, behavior: Behavior) -> Self {
        self.queue.push_back(behavior);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// A snapshot of the fake's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// TCP connections open right now.
    pub connections_open: u64,
    /// TCP connections accepted so far.
    pub connections_total: u64,
    /// Requests received (all paths).
    pub requests: u64,
    /// Bodies being sent right now.
    pub streams_active: u64,
    /// Bodies sent to the end.
    pub streams_completed: u64,
    /// Bodies the client stopped reading before the end (disconnect / cancel).
    pub streams_cancelled: u64,
    /// Bodies the fake cut on purpose (`cut_after`).
    pub streams_cut: u64,
    /// Requests whose client went away while the answer was still pending (headers not sent).
    pub requests_abandoned: u64,
}

#[derive(Default)]
struct Counters {
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    requests: AtomicU64,
    streams_active: AtomicU64,
    streams_completed: AtomicU64,
    streams_cancelled: AtomicU64,
    streams_cut: AtomicU64,
    requests_abandoned: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Stats {
            connections_open: l(&self.connections_open),
            connections_total: l(&self.connections_total),
            requests: l(&self.requests),
            streams_active: l(&self.streams_active),
            streams_completed: l(&self.streams_completed),
            streams_cancelled: l(&self.streams_cancelled),
            streams_cut: l(&self.streams_cut),
            requests_abandoned: l(&self.requests_abandoned),
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::SeqCst);
}
fn dec(a: &AtomicU64) {
    a.fetch_sub(1, Ordering::SeqCst);
}

struct Shared {
    scenario: Mutex<Scenario>,
    requests: Mutex<Vec<RecordedRequest>>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn pick(&self, req: &RecordedRequest) -> Behavior {
        let mut sc = lock(&self.scenario);
        if let Some(b) = sc.queue.pop_front() {
            return b;
        }
        if let Some(b) = req.model().and_then(|m| sc.by_model.get(&m).cloned()) {
            return b;
        }
        sc.default.clone()
    }
}

enum StreamEnd {
    Running,
    Completed,
    Cut,
}

/// Counts one response body from start to end; a drop while running is a cancellation.
struct StreamGuard {
    shared: Arc<Shared>,
    end: StreamEnd,
}

impl StreamGuard {
    fn new(shared: Arc<Shared>) -> Self {
        inc(&shared.counters.streams_active);
        Self {
            shared,
            end: StreamEnd::Running,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.shared.counters;
        dec(&c.streams_active);
        match self.end {
            StreamEnd::Running => inc(&c.streams_cancelled),
            StreamEnd::Completed => inc(&c.streams_completed),
            StreamEnd::Cut => inc(&c.streams_cut),
        }
    }
}

/// Counts a request whose handler is dropped before it produced response headers.
struct PendingGuard {
    shared: Arc<Shared>,
    answered: bool,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if !self.answered {
            inc(&self.shared.counters.requests_abandoned);
        }
    }
}

struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        dec(&self.0.counters.connections_open);
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// A running fake upstream; stops when dropped.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl FakeUpstream {
    /// Bind 127.0.0.1:0 and serve `scenario` (needs a running tokio runtime).
    pub async fn start(scenario: Scenario) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("fake upstream: bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake upstream: local_addr: {e}"));
        let shared = Arc::new(Shared {
            scenario: Mutex::new(scenario),
            requests: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), tasks.clone()));
        lock(&tasks).push(accept.abort_handle());
        Self {
            addr,
            shared,
            tasks,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:PORT/v1`: what a provider's `base_url` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }
    /// Requests to `…/chat/completions` only.
    pub fn chat_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.path
                    .split('?')
                    .next()
                    .unwrap_or("")
                    .ends_with("/chat/completions")
            })
            .collect()
    }
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.shared.requests).last().cloned()
    }
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }
    /// Queue a one-shot behavior.
    pub fn push(&self, behavior: Behavior) {
        lock(&self.shared.scenario).queue.push_back(behavior);
    }
    pub fn set_default(&self, behavior: Behavior) {
        lock(&self.shared.scenario).default = behavior;
    }
    pub fn set_model(&self, model: &str, behavior: Behavior) {
        lock(&self.shared.scenario)
            .by_model
            .insert(model.to_owned(), behavior);
    }
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }
    /// Poll the counters until `pred` holds or `timeout` passes; returns whether it held.
    pub async fn wait_until(&self, pred: impl Fn(&Stats) -> bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.stats()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
) {
    let router = axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone());
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        inc(&shared.counters.connections_open);
        inc(&shared.counters.connections_total);
        let guard = ConnGuard(shared.clone());
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let task = tokio::spawn(async move {
            let _guard = guard;
            let io = hyper_util::rt::TokioIo::new(stream);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder.serve_connection(io, svc).await;
        });
        let mut t = lock(&tasks);
        t.retain(|h| !h.is_finished());
        t.push(task.abort_handle());
    }
}

async fn handle(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    req: Request<Body>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(
        Duration::from_secs(30),
        axum::body::to_bytes(body, usize::MAX),
    )
    .await
    {
        Ok(Ok(b)) => b,
        _ => Bytes::new(),
    };
    let rec = RecordedRequest {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    inc(&shared.counters.requests);
    lock(&shared.requests).push(rec.clone());

    let path = rec.path.split('?').next().unwrap_or("").to_owned();
    if path.ends_with("/models") && rec.method == Method::GET {
        return json_response(200, &json!({"object": "list", "data": []}));
    }
    if !path.ends_with("/chat/completions") {
        return json_response(
            404,
            &json!({"error": {"type": "resource_not_found_error", "message": format!("no route {path}")}}),
        );
    }

    let mut pending = PendingGuard {
        shared: shared.clone(),
        answered: false,
    };
    let mut behavior = shared.pick(&rec);
    // Resolve dynamic behaviors (bounded, in case one returns another dynamic one).
    for _ in 0..8 {
        match &behavior.reply {
            Reply::Dynamic(f) => behavior = f(&rec),
            _ => break,
        }
    }
    if let Some(d) = behavior.header_delay {
        tokio::time::sleep(d).await;
    }
    if behavior.never_answer {
        std::future::pending::<()>().await;
    }
    let resp = play(&shared, &behavior, &rec);
    pending.answered = true;
    resp
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn play(shared: &Arc<Shared>, b: &Behavior, rec: &RecordedRequest) -> Response<Body> {
    let (status, content_type, events): (u16, &'static str, Vec<Bytes>) = match &b.reply {
        Reply::Raw {
            status,
            content_type,
            body,
        } => (*status, content_type, vec![body.clone()]),
        Reply::Sse(events) => (
            200,
            "text/event-stream",
            events.iter().map(SseOut::to_bytes).collect(),
        ),
        Reply::Dynamic(_) => (
            500,
            "application/json",
            vec![Bytes::from_static(
                b"{\"error\":{\"message\":\"dynamic nesting\"}}",
            )],
        ),
        Reply::Emulate {
            dialect,
            transcript,
            validate,
            mid_stream_error_after,
        } => {
            let req = rec.json();
            if *validate && *dialect == Dialect::Moonshot {
                if let Some(idx) = moonshot_violation(&req) {
                    let body = json!({"error": {
                        "type": "invalid_request_error",
                        "message": format!("{MOONSHOT_MISSING_REASONING} {idx}"),
                    }});
                    (400, "application/json", vec![Bytes::from(body.to_string())])
                } else {
                    emulate(*dialect, transcript.as_ref(), *mid_stream_error_after, &req)
                }
            } else {
                emulate(*dialect, transcript.as_ref(), *mid_stream_error_after, &req)
            }
        }
    };

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let guard = StreamGuard::new(shared.clone());
    tokio::spawn(produce(events, Faults::from(b), tx, guard));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    if content_type == "text/event-stream" {
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
    }
    for (k, v) in &b.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    resp
}

struct Faults {
    cut_after: Option<usize>,
    stall_after: Option<usize>,
    malformed_at: Option<usize>,
    chunk_delay: Option<Duration>,
    split_seed: Option<u64>,
    split_gap: Option<Duration>,
    crlf: bool,
}

impl From<&Behavior> for Faults {
    fn from(b: &Behavior) -> Self {
        Self {
            cut_after: b.cut_after,
            stall_after: b.stall_after,
            malformed_at: b.malformed_at,
            chunk_delay: b.chunk_delay,
            split_seed: b.split_seed,
            split_gap: b.split_gap,
            crlf: b.crlf,
        }
    }
}

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Sends `bytes` (split into pieces when splitting); `Err` when the client went away.
async fn send(
    tx: &Tx,
    buf: &mut BytesMut,
    rng: &mut Option<StdRng>,
    gap: Option<Duration>,
    flush_all: bool,
) -> Result<(), ()> {
    match rng {
        None => {
            if !buf.is_empty() {
                let chunk = buf.split().freeze();
                tx.send(Ok(chunk)).await.map_err(|_| ())?;
            }
        }
        Some(rng) => {
            // Keep up to 6 bytes back unless flushing, so pieces straddle event boundaries.
            while buf.len() >= 7 || (flush_all && !buf.is_empty()) {
                let n = rng.gen_range(1..=7usize).min(buf.len());
                let piece = buf.split_to(n).freeze();
                tx.send(Ok(piece)).await.map_err(|_| ())?;
                match gap {
                    Some(d) => tokio::time::sleep(d).await,
                    None => tokio::task::yield_now().await,
                }
            }
        }
    }
    Ok(())
}

async fn produce(events: Vec<Bytes>, f: Faults, tx: Tx, mut guard: StreamGuard) {
    let mut rng = f.split_seed.map(StdRng::seed_from_u64);
    let mut buf = BytesMut::new();
    for (i, ev) in events.iter().enumerate() {
        if f.cut_after == Some(i) {
            if send(&tx, &mut buf, &mut rng, f.split_gap, true)
                .await
                .is_err()
            {
                return;
            }
            guard.end = StreamEnd::Cut;
            let _ = tx
                .send(Err(std::io::Error::other("fake upstream: cut")))
                .await;
            return;
        }
        if f.stall_after == Some(i) {
            if send(&tx, &mut buf, &mut rng, f.split_gap, true)
                .await
                .is_err()
            {
                return;
            }
            tx.closed().await;
            return;
        }
        if let (Some(d), true) = (f.chunk_delay, i > 0) {
            if send(&tx, &mut buf, &mut rng, f.split_gap, true)
                .await
                .is_err()
            {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(d) => {}
            }
        }
        if f.malformed_at == Some(i) {
            buf.extend_from_slice(
                b"data: {\"id\":\"chatcmpl-broken\",\"choices\":[{\"delta\":\n\n",
            );
        }
        if f.crlf {
            for &byte in ev.iter() {
                if byte == b'\n' {
                    buf.extend_from_slice(b"\r\n");
                } else {
                    buf.extend_from_slice(&[byte]);
                }
            }
        } else {
            buf.extend_from_slice(ev);
        }
        if send(&tx, &mut buf, &mut rng, f.split_gap, false)
            .await
            .is_err()
        {
            return;
        }
    }
    if f.malformed_at.is_some_and(|m| m >= events.len()) {
        buf.extend_from_slice(b"data: {\"id\":\"chatcmpl-broken\",\"choices\":[{\"delta\":\n\n");
    }
    if f.cut_after.is_some_and(|c| c >= events.len()) {
        if send(&tx, &mut buf, &mut rng, f.split_gap, true)
            .await
            .is_err()
        {
            return;
        }
        guard.end = StreamEnd::Cut;
        let _ = tx
            .send(Err(std::io::Error::other("fake upstream: cut")))
            .await;
        return;
    }
    if send(&tx, &mut buf, &mut rng, f.split_gap, true)
        .await
        .is_err()
    {
        return;
    }
    guard.end = StreamEnd::Completed;
}

// ---------------------------------------------------------------------------------------------
// Dialect rendering
// ---------------------------------------------------------------------------------------------

/// Index of the first assistant tool-call message lacking `reasoning_content` while thinking is on.
pub fn moonshot_violation(req: &Value) -> Option<usize> {
    if !moonshot_thinking(req) {
        return None;
    }
    let messages = req.get("messages")?.as_array()?;
    messages.iter().position(|m| {
        m.get("role").and_then(Value::as_str) == Some("assistant")
            && m.get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty())
            && m.get("reasoning_content").is_none_or(Value::is_null)
    })
}

/// Whether Moonshot would think for this request.
pub fn moonshot_thinking(req: &Value) -> bool {
    let ty = req
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str);
    match ty {
        Some("disabled") => false,
        Some("enabled") => true,
        _ => req
            .get("model")
            .and_then(Value::as_str)
            .is_some_and(|m| m.contains("k2.6") || m.contains("thinking")),
    }
}

fn emulate(
    dialect: Dialect,
    forced: Option<&Transcript>,
    mid_err: Option<usize>,
    req: &Value,
) -> (u16, &'static str, Vec<Bytes>) {
    let t = forced
        .cloned()
        .unwrap_or_else(|| Transcript::for_request(req));
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let stream = req.get("stream").and_then(Value::as_bool) == Some(true);
    if stream {
        let events = match dialect {
            Dialect::Moonshot => moonshot_stream(&t, &model, moonshot_thinking(req)),
            Dialect::OpenRouter | Dialect::OpenRouter2025 => {
                openrouter_stream(&t, &model, dialect == Dialect::OpenRouter2025, mid_err)
            }
            Dialect::OpenAi => openai_stream(&t, &model, req),
        };
        (
            200,
            "text/event-stream",
            events.iter().map(SseOut::to_bytes).collect(),
        )
    } else {
        let body = match dialect {
            Dialect::Moonshot => moonshot_full(&t, &model, moonshot_thinking(req)),
            Dialect::OpenRouter | Dialect::OpenRouter2025 => openrouter_full(&t, &model),
            Dialect::OpenAi => openai_full(&t, &model, req),
        };
        (200, "application/json", vec![Bytes::from(body.to_string())])
    }
}

fn full_tool_calls(t: &Transcript) -> Value {
    Value::Array(
        t.tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments()}})
            })
            .collect(),
    )
}

/// Tool-call deltas: first with index/id/type/name and `arguments: ""`, then fragments with index only.
fn tool_call_deltas(t: &Transcript) -> Vec<Value> {
    let mut out = vec![];
    for (i, c) in t.tool_calls.iter().enumerate() {
        out.push(json!([{"index": i, "id": c.id, "type": "function",
                         "function": {"name": c.name, "arguments": ""}}]));
        for frag in &c.argument_fragments {
            out.push(json!([{"index": i, "function": {"arguments": frag}}]));
        }
    }
    out
}

pub const MOONSHOT_ID: &str = "chatcmpl-fakemoonshot0001";
pub const OPENROUTER_ID: &str = "gen-1768994256-FakeOpenRouter01";
pub const OPENAI_ID: &str = "chatcmpl-FakeOpenAi0001";

fn moonshot_usage(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.total_tokens(), "cached_tokens": u.cached_tokens})
}

fn moonshot_stream(t: &Transcript, model: &str, thinking: bool) -> Vec<SseOut> {
    let chunk = |choice: Value| {
        SseOut::Data(
            json!({"id": MOONSHOT_ID, "object": "chat.completion.chunk", "created": CREATED,
                            "model": model, "choices": [choice], "system_fingerprint": "fpv0_fake"}),
        )
    };
    let delta = |d: Value| chunk(json!({"index": 0, "delta": d, "finish_reason": null}));
    let mut ev = vec![delta(json!({"role": "assistant", "content": ""}))];
    if thinking {
        for r in &t.reasoning {
            ev.push(delta(json!({"reasoning_content": r})));
        }
    }
    for c in &t.content {
        ev.push(delta(json!({"content": c})));
    }
    for tc in tool_call_deltas(t) {
        ev.push(delta(json!({"tool_calls": tc})));
    }
    ev.push(chunk(
        json!({"index": 0, "delta": {}, "finish_reason": t.finish_reason,
                         "usage": moonshot_usage(&t.usage)}),
    ));
    ev.push(SseOut::Done);
    ev
}

fn moonshot_full(t: &Transcript, model: &str, thinking: bool) -> Value {
    let mut message = json!({"role": "assistant", "content": t.content_text()});
    if thinking {
        message["reasoning_content"] = json!(t.reasoning_text());
    }
    if !t.tool_calls.is_empty() {
        message["tool_calls"] = full_tool_calls(t);
    }
    json!({"id": MOONSHOT_ID, "object": "chat.completion", "created": CREATED, "model": model,
           "choices": [{"index": 0, "message": message, "finish_reason": t.finish_reason}],
           "usage": moonshot_usage(&t.usage)})
}

/// OpenRouter's usage object, `cost` in credits (USD) as OpenRouter reports it.
pub fn openrouter_usage(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.total_tokens(), "cost": 0.00023492, "is_byok": false,
           "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0,
                                     "audio_tokens": 0, "video_tokens": 0},
           "cost_details": {"upstream_inference_cost": 0.00023492,
                            "upstream_inference_prompt_cost": 0.00004092,
                            "upstream_inference_completions_cost": 0.000194},
           "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens,
                                         "image_tokens": 0, "audio_tokens": 0}})
}

fn reasoning_details(text: &str) -> Value {
    json!([{"type": "reasoning.text", "text": text, "format": "unknown", "index": 0}])
}

fn openrouter_stream(
    t: &Transcript,
    model: &str,
    separate_usage: bool,
    mid_err: Option<usize>,
) -> Vec<SseOut> {
    let chunk = |choice: Value| {
        json!({"id": OPENROUTER_ID, "object": "chat.completion.chunk", "created": CREATED,
               "model": model, "provider": "Moonshot AI", "choices": [choice]})
    };
    let delta = |d: Value| {
        chunk(json!({"index": 0, "delta": d, "finish_reason": null, "native_finish_reason": null}))
    };
    let mut data: Vec<Value> = vec![];
    for r in &t.reasoning {
        data.push(delta(
            json!({"role": "assistant", "content": "", "reasoning": r,
                                "reasoning_details": reasoning_details(r)}),
        ));
    }
    for c in &t.content {
        data.push(delta(json!({"role": "assistant", "content": c})));
    }
    for tc in tool_call_deltas(t) {
        data.push(delta(
            json!({"role": "assistant", "content": null, "tool_calls": tc}),
        ));
    }
    let mut finish = chunk(
        json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": t.finish_reason,
                                  "native_finish_reason": t.finish_reason, "logprobs": null}),
    );
    if separate_usage {
        data.push(finish);
        let mut after = chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": null, "native_finish_reason": null,
                                     "logprobs": null}),
        );
        after["usage"] = openrouter_usage(&t.usage);
        data.push(after);
    } else {
        finish["usage"] = openrouter_usage(&t.usage);
        data.push(finish);
    }

    let mut ev = vec![
        SseOut::comment("OPENROUTER PROCESSING"),
        SseOut::comment("OPENROUTER PROCESSING"),
    ];
    let n_reasoning = t.reasoning.len();
    for (i, d) in data.into_iter().enumerate() {
        if mid_err == Some(i) {
            ev.push(SseOut::Data(json!({
                "id": OPENROUTER_ID, "object": "chat.completion.chunk", "created": CREATED,
                "model": model, "provider": "Moonshot AI",
                "error": {"code": 502, "message": "Upstream provider returned an error",
                          "metadata": {"error_type": "provider_overloaded"}},
                "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]})));
            return ev;
        }
        if i == n_reasoning && i > 0 {
            ev.push(SseOut::comment("OPENROUTER PROCESSING"));
        }
        ev.push(SseOut::Data(d));
    }
    ev.push(SseOut::Done);
    ev
}

fn openrouter_full(t: &Transcript, model: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": t.content_text(), "refusal": null,
                             "reasoning": t.reasoning_text(),
                             "reasoning_details": reasoning_details(&t.reasoning_text())});
    if !t.tool_calls.is_empty() {
        message["tool_calls"] = full_tool_calls(t);
    }
    json!({"id": OPENROUTER_ID, "provider": "Moonshot AI", "model": model,
           "object": "chat.completion", "created": CREATED,
           "choices": [{"logprobs": null, "finish_reason": t.finish_reason,
                        "native_finish_reason": t.finish_reason, "index": 0, "message": message}],
           "usage": openrouter_usage(&t.usage)})
}

/// The standard OpenAI usage object for a transcript.
pub fn openai_usage(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.total_tokens(),
           "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
           "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens, "audio_tokens": 0,
                                         "accepted_prediction_tokens": 0,
                                         "rejected_prediction_tokens": 0}})
}

/// Deterministic logprob entry for a content piece (`-0.5 - index/10`, top_logprobs of 2).
pub fn logprob_entry(token: &str, i: usize) -> Value {
    let lp = -0.5 - (i as f64) / 10.0;
    let bytes: Vec<u8> = token.as_bytes().to_vec();
    json!({"token": token, "logprob": lp, "bytes": bytes,
           "top_logprobs": [{"token": token, "logprob": lp, "bytes": bytes},
                            {"token": "x", "logprob": -9999.0, "bytes": null}]})
}

fn openai_stream(t: &Transcript, model: &str, req: &Value) -> Vec<SseOut> {
    let include_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let want_lp = req.get("logprobs").and_then(Value::as_bool) == Some(true);
    let chunk = |choices: Value| {
        let mut c = json!({"id": OPENAI_ID, "object": "chat.completion.chunk", "created": CREATED,
                           "model": model, "system_fingerprint": "fp_fake", "choices": choices});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut ev = vec![SseOut::Data(chunk(json!([{"index": 0,
        "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])))];
    for (i, c) in t.content.iter().enumerate() {
        let lp = if want_lp {
            json!({"content": [logprob_entry(c, i)], "refusal": null})
        } else {
            Value::Null
        };
        ev.push(SseOut::Data(chunk(
            json!([{"index": 0, "delta": {"content": c},
                                            "logprobs": lp, "finish_reason": null}]),
        )));
    }
    for tc in tool_call_deltas(t) {
        ev.push(SseOut::Data(chunk(
            json!([{"index": 0, "delta": {"tool_calls": tc},
                                            "logprobs": null, "finish_reason": null}]),
        )));
    }
    ev.push(SseOut::Data(chunk(
        json!([{"index": 0, "delta": {}, "logprobs": null,
                                        "finish_reason": t.finish_reason}]),
    )));
    if include_usage {
        let mut last = chunk(json!([]));
        last["usage"] = openai_usage(&t.usage);
        ev.push(SseOut::Data(last));
    }
    ev.push(SseOut::Done);
    ev
}

fn openai_full(t: &Transcript, model: &str, req: &Value) -> Value {
    let want_lp = req.get("logprobs").and_then(Value::as_bool) == Some(true);
    let content = if t.content.is_empty() {
        Value::Null
    } else {
        json!(t.content_text())
    };
    let mut message =
        json!({"role": "assistant", "content": content, "refusal": null, "annotations": []});
    if !t.tool_calls.is_empty() {
        message["tool_calls"] = full_tool_calls(t);
    }
    let logprobs = if want_lp {
        let entries: Vec<Value> = t
            .content
            .iter()
            .enumerate()
            .map(|(i, c)| logprob_entry(c, i))
            .collect();
        json!({"content": entries, "refusal": null})
    } else {
        Value::Null
    };
    json!({"id": OPENAI_ID, "object": "chat.completion", "created": CREATED, "model": model,
           "system_fingerprint": "fp_fake",
           "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                        "finish_reason": t.finish_reason}],
           "usage": openai_usage(&t.usage)})
}
