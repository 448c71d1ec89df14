//! Usage accounting for streams: watches chunks on their way to the client, keeps the upstream's
//! usage (or counts locally when there is none) and reports one [`Outcome`] when the stream ends,
//! fails or is dropped by a disconnecting client.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::Stream;

use crate::error::GatewayError;
use crate::gateway::model::{ChatChunk, ChunkStream, Usage};

/// How a request ended, for metering and billing.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    pub model: String,
    pub provider: String,
    pub upstream_model: String,
    pub usage: Usage,
    /// Usage was counted locally because the upstream reported none.
    pub estimated: bool,
    /// Anything at all reached the client.
    pub delivered: bool,
    pub status: OutcomeStatus,
    pub latency_ms: u64,
    pub first_byte_ms: Option<u64>,
    /// Every upstream attempt, in order; the last successful one served the request.
    pub attempts: Vec<Attempt>,
}

/// One upstream attempt of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub provider: String,
    pub upstream_model: String,
    /// Milliseconds from the request's start to this attempt's start.
    pub started_ms: u64,
    pub duration_ms: u64,
    pub result: AttemptResult,
    /// The upstream's HTTP status, when it sent one.
    pub status: Option<u16>,
    /// A short reason for a failed attempt (never prompt text).
    pub error: Option<String>,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// The upstream accepted and started answering; this attempt served the request.
    Served,
    /// 5xx, connection failure, bad answer, or a failure before the first chunk (retryable).
    Failed,
    /// The upstream did not answer in time.
    TimedOut,
    /// 429 / 408 / 409: retryable rejection.
    RateLimited,
    /// A 4xx that is not retried (passed to the client).
    Rejected,
}

impl AttemptResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Served => "served",
            AttemptResult::Failed => "failed",
            AttemptResult::TimedOut => "timed_out",
            AttemptResult::RateLimited => "rate_limited",
            AttemptResult::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeStatus {
    Completed = 0,
    /// The upstream failed: after the stream started (`delivered` may be true), or before anything
    /// was sent because every attempt failed (`delivered` false, usage zero: charge 0).
    UpstreamError = 1,
    /// The client went away before the end.
    ClientDisconnected = 2,
}

impl OutcomeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeStatus::Completed => "completed",
            OutcomeStatus::UpstreamError => "upstream_error",
            OutcomeStatus::ClientDisconnected => "client_disconnected",
        }
    }
}

/// Receives the outcome of every request exactly once.
pub trait OutcomeSink: Send + Sync {
    fn record(&self, outcome: Outcome);
}

/// The default sink: structured log line and Prometheus metrics (no prompt or completion text).
///
/// A request only queues its outcome; the `access-log` thread takes the queue every
/// [`ACCESS_TICK`] and writes the lines and counts the metrics. So neither the formatting nor a
/// task spawn is on the answer's path: a spawned task pushed the upstream connection's task out
/// of the worker's next-task slot, and the runtime woke its idle second worker for it (a futex
/// call and a cross-CPU wake-up between reading the upstream answer and writing the client's).
/// An idle thread sleeps until the next outcome; [`flush_outcomes`] writes out what is queued.
pub struct LogSink;

impl OutcomeSink for LogSink {
    fn record(&self, o: Outcome) {
        AccessLog::get().push(o);
    }
}

/// How long a finished request's outcome may wait for its access line and metrics.
pub const ACCESS_TICK: std::time::Duration = std::time::Duration::from_millis(5);
/// Ticks without any outcome (about a second) after which the thread sleeps until the next one.
const ACCESS_IDLE_TICKS: u32 = 200;
/// Outcomes queued beyond this (the thread cannot keep up) are written by the request itself.
const ACCESS_QUEUE_CAP: usize = 65_536;

/// The queue of finished outcomes and the thread that writes them.
struct AccessLog {
    queue: std::sync::Mutex<AccessQueue>,
    wake: std::sync::Condvar,
    /// Held while a batch is written, so [`flush_outcomes`] returns only when all are out.
    writing: std::sync::Mutex<()>,
    /// The thread runs; without it (it could not be started) outcomes are written at once.
    threaded: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct AccessQueue {
    items: Vec<Outcome>,
    /// The thread sleeps until the next outcome (the pusher wakes it).
    parked: bool,
}

impl AccessLog {
    fn get() -> &'static AccessLog {
        static LOG: std::sync::OnceLock<AccessLog> = std::sync::OnceLock::new();
        static THREAD: std::sync::Once = std::sync::Once::new();
        let log = LOG.get_or_init(|| AccessLog {
            queue: Default::default(),
            wake: std::sync::Condvar::new(),
            writing: std::sync::Mutex::new(()),
            threaded: std::sync::atomic::AtomicBool::new(false),
        });
        THREAD.call_once(|| {
            let started = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || log.run())
                .is_ok();
            log.threaded
                .store(started, std::sync::atomic::Ordering::Release);
        });
        log
    }

    fn push(&self, o: Outcome) {
        if !self.threaded.load(std::sync::atomic::Ordering::Acquire) {
            return self.write(&[o]);
        }
        let Ok(mut q) = self.queue.lock() else {
            return self.write(&[o]);
        };
        if q.items.len() >= ACCESS_QUEUE_CAP {
            drop(q);
            return self.write(&[o]);
        }
        q.items.push(o);
        let wake = std::mem::replace(&mut q.parked, false);
        drop(q);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The thread: every tick, writes what was queued; after a quiet second, sleeps until woken.
    fn run(&self) {
        let mut batch: Vec<Outcome> = Vec::new();
        let mut idle = 0u32;
        loop {
            std::thread::sleep(ACCESS_TICK);
            {
                let Ok(mut q) = self.queue.lock() else { return };
                if q.items.is_empty() {
                    idle += 1;
                    if idle < ACCESS_IDLE_TICKS {
                        continue;
                    }
                    q.parked = true;
                    while q.items.is_empty() {
                        q = match self.wake.wait(q) {
                            Ok(q) => q,
                            Err(_) => return,
                        };
                    }
                }
                idle = 0;
            }
            self.write_queued(&mut batch);
        }
    }

    /// Takes the queue (into `batch`, whose buffer is reused) and writes it.
    fn write_queued(&self, batch: &mut Vec<Outcome>) {
        let Ok(_w) = self.writing.lock() else { return };
        match self.queue.lock() {
            Ok(mut q) => std::mem::swap(&mut q.items, batch),
            Err(_) => return,
        }
        self.write(batch);
        batch.clear();
    }

    fn write(&self, outcomes: &[Outcome]) {
        for o in outcomes {
            log_outcome(o);
        }
    }
}

/// Writes the access lines and metrics of every outcome queued so far (the server calls it on its
/// way out, before the log buffer's last flush).
pub fn flush_outcomes() {
    AccessLog::get().write_queued(&mut Vec::new());
}

/// The access line and the metrics of one finished request.
fn log_outcome(o: &Outcome) {
    let m = RouteMetrics::of(&o.model, &o.provider);
    m.requests[o.status as usize].increment(1);
    m.prompt_tokens.increment(o.usage.prompt_tokens);
    m.completion_tokens.increment(o.usage.completion_tokens);
    m.duration.record(o.latency_ms as f64 / 1000.0);
    tracing::info!(
        request_id = %o.request_id,
        model = %o.model,
        provider = %o.provider,
        upstream_model = %o.upstream_model,
        status = o.status.as_str(),
        prompt_tokens = o.usage.prompt_tokens,
        completion_tokens = o.usage.completion_tokens,
        cached_tokens = o.usage.cached_tokens,
        estimated = o.estimated,
        latency_ms = o.latency_ms,
        first_byte_ms = o.first_byte_ms,
        attempts = o.attempts.len(),
        "request finished"
    );
}

/// The metric handles of one (model, provider) pair, registered once and reused: building a
/// labelled key and looking it up in the recorder on every request costs more than the counting.
struct RouteMetrics {
    /// By [`OutcomeStatus`] discriminant.
    requests: [metrics::Counter; 3],
    prompt_tokens: metrics::Counter,
    completion_tokens: metrics::Counter,
    duration: metrics::Histogram,
    /// Upstream attempts: `[first, retry]`.
    attempts: [metrics::Counter; 2],
}

/// Counts one upstream attempt of `model` on `provider`.
pub fn count_attempt(model: &str, provider: &str, retry: bool) {
    RouteMetrics::of(model, provider).attempts[usize::from(retry)].increment(1);
}

/// Distinct (model, provider) pairs come from the catalog; past this many (a misbehaving
/// caller cannot add any, but stay bounded anyway) handles are built per request, uncached.
const ROUTE_METRICS_CAP: usize = 4096;

type RouteMetricsMap =
    std::collections::HashMap<String, std::collections::HashMap<String, Arc<RouteMetrics>>>;

impl RouteMetrics {
    fn of(model: &str, provider: &str) -> Arc<RouteMetrics> {
        static CACHE: std::sync::OnceLock<std::sync::RwLock<RouteMetricsMap>> =
            std::sync::OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Ok(g) = cache.read() {
            if let Some(m) = g.get(model).and_then(|p| p.get(provider)) {
                return m.clone();
            }
        }
        let m = Arc::new(RouteMetrics::register(model, provider));
        if let Ok(mut g) = cache.write() {
            if g.values().map(|p| p.len()).sum::<usize>() < ROUTE_METRICS_CAP {
                g.entry(model.to_string())
                    .or_default()
                    .insert(provider.to_string(), m.clone());
            }
        }
        m
    }

    fn register(model: &str, provider: &str) -> RouteMetrics {
        let (model, provider) = (model.to_string(), provider.to_string());
        let requests = [
            OutcomeStatus::Completed,
            OutcomeStatus::UpstreamError,
            OutcomeStatus::ClientDisconnected,
        ]
        .map(|s| {
            metrics::counter!("tollgate_requests_total", "model" => model.clone(), "provider" => provider.clone(), "status" => s.as_str())
        });
        RouteMetrics {
            requests,
            prompt_tokens: metrics::counter!("tollgate_tokens_total", "model" => model.clone(), "kind" => "prompt"),
            completion_tokens: metrics::counter!("tollgate_tokens_total", "model" => model.clone(), "kind" => "completion"),
            duration: metrics::histogram!("tollgate_request_duration_seconds", "model" => model),
            attempts: ["false", "true"].map(|retry| {
                metrics::counter!("tollgate_upstream_attempts_total", "provider" => provider.clone(), "retry" => retry)
            }),
        }
    }
}

/// Rough local token count for text when an upstream reports no usage (about 4 bytes a token).
pub fn estimate_tokens(text_bytes: usize) -> u64 {
    text_bytes.div_ceil(4) as u64
}

/// Wraps a chunk stream; reports its [`Outcome`] to `sink` exactly once.
pub struct Metered {
    inner: ChunkStream,
    sink: Arc<dyn OutcomeSink>,
    outcome: Option<Outcome>,
    started: Instant,
    usage: Option<Usage>,
    out_bytes: usize,
    prompt_estimate: u64,
}

impl Metered {
    /// `template` carries the request's identity; `prompt_estimate` is the local prompt count used
    /// when the upstream reports no usage.
    pub fn new(
        inner: ChunkStream,
        sink: Arc<dyn OutcomeSink>,
        template: Outcome,
        prompt_estimate: u64,
        started: Instant,
    ) -> Metered {
        Metered {
            inner,
            sink,
            outcome: Some(template),
            started,
            usage: None,
            out_bytes: 0,
            prompt_estimate,
        }
    }

    fn observe(&mut self, chunk: &ChatChunk) {
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        for c in &chunk.choices {
            self.out_bytes += c.content.as_ref().map_or(0, String::len)
                + c.reasoning.as_ref().map_or(0, String::len);
            for t in &c.tool_calls {
                if let Some(f) = &t.function {
                    self.out_bytes += f.name.as_ref().map_or(0, String::len)
                        + f.arguments.as_ref().map_or(0, String::len);
                }
            }
        }
        if let Some(o) = self.outcome.as_mut() {
            if !o.delivered {
                o.delivered = true;
                o.first_byte_ms = Some(self.started.elapsed().as_millis() as u64);
            }
        }
    }

    fn finish(&mut self, status: OutcomeStatus) {
        let Some(mut o) = self.outcome.take() else {
            return;
        };
        o.status = status;
        o.latency_ms = self.started.elapsed().as_millis() as u64;
        match self.usage {
            Some(u) => o.usage = u,
            None if o.delivered => {
                o.usage = Usage {
                    prompt_tokens: self.prompt_estimate,
                    completion_tokens: estimate_tokens(self.out_bytes),
                    ..Usage::default()
                };
                o.estimated = true;
            }
            None => {}
        }
        self.sink.record(o);
    }

    /// The usage seen so far (upstream-reported).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

impl Stream for Metered {
    type Item = Result<ChatChunk, GatewayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.observe(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(OutcomeStatus::UpstreamError);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(OutcomeStatus::Completed);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.finish(OutcomeStatus::ClientDisconnected);
    }
}
