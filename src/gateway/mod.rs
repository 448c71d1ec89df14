//! The gateway core: resolves the model, validates, routes to a provider (failing over before the
//! first byte), and meters the answer. Knows nothing of HTTP.

pub mod fetch;
pub mod health;
pub mod memory;
pub mod model;
pub mod prices;
pub mod retry;
pub mod router;
pub mod rules;
pub mod usage;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::catalog::Catalog;
use crate::config::{Config, ModelConfig, Price};
use crate::error::GatewayError;
use crate::providers::{self, Provider, UpstreamCall};
use health::{route_key, Availability, Health, Permit};
use model::{ChatRequest, ChatResponse, ChunkStream, Usage};
use retry::{Class, RetryBudget};
use router::{Affinity, Needs, PlanInput, RoutePrefs};
use usage::{Attempt, AttemptResult, LogSink, Metered, Outcome, OutcomeSink, OutcomeStatus};

/// The route that served a request.
#[derive(Debug, Clone)]
pub struct Served {
    pub provider: String,
    pub upstream_model: String,
    pub price: Price,
    /// Every upstream attempt of the request, the serving one last.
    pub attempts: Vec<Attempt>,
}

/// An upstream's answer, complete or streamed.
pub enum Answer {
    Complete(ChatResponse),
    Stream(ChunkStream),
}

/// A request resolved against the catalog and validated.
pub struct Prepared {
    pub request: ChatRequest,
    pub model: Arc<ModelConfig>,
    /// Notes for the client (`x-tollgate-warning`), e.g. dropped fixed parameters.
    pub warnings: Vec<String>,
    /// The client's routing preferences (the request's `provider` object).
    pub prefs: RoutePrefs,
}

/// Shared state of the running gateway.
pub struct Gateway {
    catalog: Catalog,
    providers: HashMap<String, Arc<dyn Provider>>,
    sink: Arc<dyn OutcomeSink>,
    health: Arc<Health>,
    budgets: HashMap<String, RetryBudget>,
    affinity: Affinity,
    memory: Arc<memory::ReasoningMemory>,
    prices: Arc<prices::PriceBook>,
}

impl Gateway {
    pub fn new(config: &Config) -> Result<Gateway, String> {
        Gateway::with_sink(config, Arc::new(LogSink))
    }

    /// A gateway that reports outcomes to `sink`.
    pub fn with_sink(config: &Config, sink: Arc<dyn OutcomeSink>) -> Result<Gateway, String> {
        Ok(Gateway {
            catalog: Catalog::new(config),
            providers: providers::build(config)?,
            sink,
            health: Arc::new(Health::new(config)),
            budgets: config
                .models
                .iter()
                .map(|m| {
                    (
                        m.id.clone(),
                        RetryBudget::new(
                            m.routing.retry_budget_percent,
                            m.routing.retry_budget_min_per_sec,
                        ),
                    )
                })
                .collect(),
            affinity: Affinity::new(100_000, Duration::from_secs(3600)),
            memory: Arc::new(memory::ReasoningMemory::new()),
            prices: Arc::default(),
        })
    }

    /// Health of every route (for `/readyz` and the admin API).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The store's current route prices over the config's (fed by billing; empty without it).
    pub fn prices(&self) -> &Arc<prices::PriceBook> {
        &self.prices
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The sink every request's outcome goes to (log line and metrics).
    pub fn sink(&self) -> Arc<dyn OutcomeSink> {
        self.sink.clone()
    }

    /// Reasoning remembered per tool-call turn (restored when a client sends a turn back without it).
    pub fn memory(&self) -> &Arc<memory::ReasoningMemory> {
        &self.memory
    }

    /// Finds the model and validates the request for it.
    pub fn prepare(&self, mut request: ChatRequest) -> Result<Prepared, GatewayError> {
        let model = match self.catalog.get(&request.model) {
            Some(m) => m.clone(),
            None => {
                let suggestions = self.catalog.suggest(&request.model);
                let hint = if suggestions.is_empty() {
                    String::new()
                } else {
                    format!(
                        " Did you mean {}?",
                        suggestions
                            .iter()
                            .map(|s| format!("'{s}'"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    )
                };
                return Err(GatewayError::ModelNotFound {
                    message: format!("The model '{}' does not exist.{hint}", request.model),
                });
            }
        };
        let prefs = router::take_prefs(&mut request.extra)?;
        rules::check_modalities(&request, &model, &self.catalog)?;
        let mut warnings = validate::validate(&mut request, &model)?;
        warnings.extend(rules::apply_reasoning(&mut request, &model));
        Ok(Prepared {
            request,
            model,
            warnings,
            prefs,
        })
    }

    /// Sends the request upstream. The router orders the model's routes; attempts follow that
    /// order (a new route before a retry of a tried one), within the model's attempt limit, retry
    /// budget and deadline, honouring `Retry-After` up to a cap. Failover happens only before the
    /// first byte: for a stream the first chunk is read here, before anything reaches the client,
    /// so a stream that fails before its first chunk is retried like any other error. A request
    /// that fails here is recorded as an outcome with nothing delivered and zero usage (charge 0).
    pub async fn dispatch(
        &self,
        p: &Prepared,
        request_id: &str,
    ) -> Result<(Answer, Served), GatewayError> {
        let started = tokio::time::Instant::now();
        let routing = &p.model.routing;
        let limit = if p.request.stream {
            routing.deadline
        } else {
            routing.complete_deadline
        };
        let deadline = started + limit;
        let needs = Needs::of(&p.request, estimate_prompt_tokens(&p.request), &p.model);
        let affinity_key = routing.affinity.then(|| router::affinity_key(&p.request));
        let sticky = affinity_key.and_then(|k| self.affinity.get(k));
        let order = router::plan(
            &PlanInput {
                model: &p.model,
                needs: &needs,
                prefs: &p.prefs,
                health: &self.health,
                prices: &self.prices,
                sticky: sticky.as_deref(),
            },
            &mut rand::thread_rng(),
        )?;
        let budget = self.budgets.get(&p.model.id);
        if let Some(b) = budget {
            b.request(started);
        }
        let mut tries = vec![0u32; order.len()];
        let mut excluded = vec![false; order.len()];
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut last: Option<GatewayError> = None;

        while (attempts.len() as u32) < routing.max_attempts {
            let (k, permit) = match self.pick(p, &order, &tries, &excluded, deadline).await {
                Pick::Now(k, permit) => (k, permit),
                Pick::Cooling(until) => {
                    if last.is_none() {
                        let wait = until.saturating_duration_since(tokio::time::Instant::now());
                        last = Some(GatewayError::RateLimited {
                            message: format!(
                                "every route of model {} is rate limited by its upstream; retry later",
                                p.model.id
                            ),
                            code: "upstream_rate_limited",
                            retry_after: Some(wait),
                        });
                    }
                    break;
                }
                Pick::None => break,
            };
            if !attempts.is_empty() {
                if let Some(b) = budget {
                    if !b.try_retry(tokio::time::Instant::now()) {
                        tracing::warn!(request_id, model = %p.model.id, "retry budget exhausted; not retrying");
                        metrics::counter!("tollgate_retry_budget_exhausted_total", "model" => p.model.id.clone()).increment(1);
                        break;
                    }
                }
            }
            if tries[k] > 0 {
                let wait = retry::backoff(
                    routing.backoff_base,
                    routing.backoff_max,
                    tries[k],
                    &mut rand::thread_rng(),
                );
                let until = (tokio::time::Instant::now() + wait).min(deadline);
                tokio::time::sleep_until(until).await;
            }
            let route = &p.model.routes[order[k]];
            let key = route_key(route);
            let Some(provider) = self.providers.get(&route.provider) else {
                excluded[k] = true;
                continue;
            };
            let at = tokio::time::Instant::now();
            if at >= deadline {
                break;
            }
            tries[k] += 1;
            let call = UpstreamCall {
                request: &p.request,
                model: &p.model,
                route,
                request_id,
            };
            let left = deadline.saturating_duration_since(at);
            let wait = if p.request.stream {
                left.min(routing.first_chunk_timeout)
            } else {
                left
            };
            let result = match tokio::time::timeout(
                wait,
                attempt(provider.as_ref(), &call, p.request.stream),
            )
            .await
            {
                Ok(r) => r,
                Err(_) if wait < left => Err(GatewayError::UpstreamTimeout {
                    provider: route.provider.clone(),
                    message: format!("the upstream sent nothing within {} ms", wait.as_millis()),
                }),
                Err(_) => Err(GatewayError::UpstreamTimeout {
                    provider: route.provider.clone(),
                    message: format!(
                        "no upstream answered within the request deadline of {} ms",
                        limit.as_millis()
                    ),
                }),
            };
            usage::count_attempt(&p.model.id, &route.provider, !attempts.is_empty());
            let mut record = Attempt {
                provider: route.provider.clone(),
                upstream_model: route.upstream_model.clone(),
                started_ms: at.duration_since(started).as_millis() as u64,
                duration_ms: at.elapsed().as_millis() as u64,
                result: AttemptResult::Served,
                status: None,
                error: None,
            };
            match result {
                Ok((answer, ttft)) => {
                    record.status = Some(200);
                    attempts.push(record);
                    // A complete (non-streamed) answer's wait is its whole generation, not a
                    // time to first token: it counts as throughput below, not as TTFT.
                    permit.success(matches!(answer, Answer::Stream(_)).then_some(ttft));
                    if let Some(ak) = affinity_key {
                        self.affinity.set(ak, &key);
                    }
                    let answer = match answer {
                        Answer::Stream(s) => {
                            Answer::Stream(track(s, self.health.clone(), key, at + ttft))
                        }
                        Answer::Complete(r) => {
                            if let Some(u) = r.usage {
                                self.health
                                    .throughput(&key, u.completion_tokens, at.elapsed());
                            }
                            Answer::Complete(r)
                        }
                    };
                    if attempts.len() > 1 {
                        tracing::info!(request_id, provider = %route.provider, attempts = attempts.len(), "served after failover");
                    }
                    let served = Served {
                        provider: route.provider.clone(),
                        upstream_model: route.upstream_model.clone(),
                        price: self.prices.of(&p.model.id, route).0,
                        attempts,
                    };
                    return Ok((answer, served));
                }
                Err(e) => {
                    let class = Class::of(&e);
                    record.result = class.attempt_result();
                    record.status = retry::status_of(&e);
                    record.error = Some(error_code(&e));
                    attempts.push(record);
                    match class {
                        Class::Fatal => {
                            permit.neutral();
                            self.record_failure(p, request_id, attempts, started);
                            return Err(e);
                        }
                        Class::RateLimited { retry_after } => {
                            permit.neutral();
                            if let Some(ra) = retry_after {
                                self.health.cooldown(&key, ra, tokio::time::Instant::now());
                                if ra > routing.max_retry_after {
                                    excluded[k] = true;
                                }
                            }
                        }
                        Class::Failed | Class::TimedOut => permit.failure(),
                    }
                    tracing::warn!(request_id, provider = %route.provider, error = %e, "upstream attempt failed");
                    last = Some(e);
                }
            }
        }
        self.record_failure(p, request_id, attempts, started);
        Err(last.unwrap_or_else(|| GatewayError::UpstreamTimeout {
            provider: String::new(),
            message: format!(
                "no route of model {} could be tried within the request deadline",
                p.model.id
            ),
        }))
    }

    /// The next route to try: untried routes before retried ones, healthy before anything else;
    /// waits for a `Retry-After` cooldown no longer than the cap; when every remaining route is
    /// ejected, takes one anyway (better a probe than a certain failure).
    async fn pick(
        &self,
        p: &Prepared,
        order: &[usize],
        tries: &[u32],
        excluded: &[bool],
        deadline: tokio::time::Instant,
    ) -> Pick {
        loop {
            let now = tokio::time::Instant::now();
            let mut by: Vec<usize> = (0..order.len()).filter(|&k| !excluded[k]).collect();
            by.sort_by_key(|&k| (tries[k], k));
            let Some(&first) = by.first() else {
                return Pick::None;
            };
            let mut cooling: Option<tokio::time::Instant> = None;
            let mut ejected: Option<usize> = None;
            for &k in &by {
                let key = route_key(&p.model.routes[order[k]]);
                match self.health.availability(&key, now) {
                    Availability::Healthy | Availability::ProbeFree => {
                        if let Some(permit) = self.health.acquire(&key, now, false) {
                            return Pick::Now(k, permit);
                        }
                        ejected.get_or_insert(k);
                    }
                    Availability::Cooling(until) => {
                        cooling = Some(cooling.map_or(until, |c| c.min(until)));
                    }
                    Availability::Ejected(_) => {
                        ejected.get_or_insert(k);
                    }
                }
            }
            if let Some(until) = cooling {
                if until.saturating_duration_since(now) <= p.model.routing.max_retry_after
                    && until < deadline
                {
                    tokio::time::sleep_until(until).await;
                    continue;
                }
            }
            if let Some(k) = ejected {
                let key = route_key(&p.model.routes[order[k]]);
                if let Some(permit) = self.health.acquire(&key, now, true) {
                    return Pick::Now(k, permit);
                }
            }
            return match cooling {
                Some(until) => Pick::Cooling(until),
                None => {
                    tracing::debug!(route = first, "no route available");
                    Pick::None
                }
            };
        }
    }

    /// Records a request that failed before anything reached the client.
    fn record_failure(
        &self,
        p: &Prepared,
        request_id: &str,
        attempts: Vec<Attempt>,
        started: tokio::time::Instant,
    ) {
        let (provider, upstream_model) = attempts
            .last()
            .map(|a| (a.provider.clone(), a.upstream_model.clone()))
            .unwrap_or_default();
        let latency_ms = started.elapsed().as_millis() as u64;
        self.sink.record(Outcome {
            request_id: request_id.to_string(),
            model: p.model.id.clone(),
            provider,
            upstream_model,
            usage: Usage::default(),
            estimated: false,
            delivered: false,
            status: OutcomeStatus::UpstreamError,
            latency_ms,
            first_byte_ms: None,
            attempts,
        });
    }

    /// The outcome template for a request served by `served`.
    pub fn outcome(&self, request_id: &str, model: &str, served: &Served) -> Outcome {
        Outcome {
            request_id: request_id.to_string(),
            model: model.to_string(),
            provider: served.provider.clone(),
            upstream_model: served.upstream_model.clone(),
            usage: Usage::default(),
            estimated: false,
            delivered: false,
            status: OutcomeStatus::Completed,
            latency_ms: 0,
            first_byte_ms: None,
            attempts: served.attempts.clone(),
        }
    }

    /// Wraps a stream so its outcome is recorded exactly once.
    pub fn meter_stream(
        &self,
        stream: ChunkStream,
        template: Outcome,
        prompt_estimate: u64,
        started: Instant,
    ) -> Metered {
        Metered::new(
            stream,
            self.sink.clone(),
            template,
            prompt_estimate,
            started,
        )
    }

    /// Records a complete answer's outcome.
    pub fn record_complete(
        &self,
        mut template: Outcome,
        resp: &ChatResponse,
        prompt_estimate: u64,
        started: Instant,
    ) -> Usage {
        let usage = match resp.usage {
            Some(u) => u,
            None => {
                template.estimated = true;
                let out: usize = resp
                    .choices
                    .iter()
                    .map(|c| {
                        c.message.content.as_ref().map_or(0, |t| t.text().len())
                            + c.message.reasoning_content.as_ref().map_or(0, String::len)
                    })
                    .sum();
                Usage {
                    prompt_tokens: prompt_estimate,
                    completion_tokens: usage::estimate_tokens(out),
                    ..Usage::default()
                }
            }
        };
        template.usage = usage;
        template.delivered = true;
        template.latency_ms = started.elapsed().as_millis() as u64;
        template.first_byte_ms = Some(template.latency_ms);
        self.sink.record(template);
        usage
    }
}

/// A local estimate of a request's prompt tokens (for holds and for upstreams without usage).
pub fn estimate_prompt_tokens(req: &ChatRequest) -> u64 {
    let mut bytes = 0usize;
    for m in &req.messages {
        bytes += 8;
        if let Some(c) = &m.content {
            bytes += match c {
                model::Content::Text(s) => s.len(),
                model::Content::Parts(parts) => parts
                    .iter()
                    .map(|p| p.text.as_ref().map_or(1024, String::len))
                    .sum(),
            };
        }
        bytes += m.reasoning_content.as_ref().map_or(0, String::len);
        if let Some(calls) = &m.tool_calls {
            bytes += calls
                .iter()
                .map(|t| t.function.name.len() + t.function.arguments.len())
                .sum::<usize>();
        }
    }
    for t in &req.tools {
        bytes += t.function.as_ref().map_or(0, |f| {
            f.name.len()
                + f.description.as_ref().map_or(0, String::len)
                + f.parameters.as_ref().map_or(0, |p| p.to_string().len())
        });
    }
    usage::estimate_tokens(bytes)
}

/// The retry loop's choice.
enum Pick {
    Now(usize, Permit),
    /// Every remaining route is cooling down past the wait cap or the deadline.
    Cooling(tokio::time::Instant),
    None,
}

/// One upstream attempt. For a stream, waits for the first chunk (so a failure before it can
/// still fail over) and returns the time to it.
async fn attempt(
    provider: &dyn Provider,
    call: &UpstreamCall<'_>,
    stream: bool,
) -> Result<(Answer, Duration), GatewayError> {
    let at = tokio::time::Instant::now();
    if !stream {
        let r = provider.complete(call).await?;
        return Ok((Answer::Complete(r), at.elapsed()));
    }
    let mut s = provider.stream(call).await?;
    match s.next().await {
        Some(Ok(first)) => {
            let ttft = at.elapsed();
            let rest = futures::stream::once(async move { Ok(first) }).chain(s);
            Ok((Answer::Stream(Box::pin(rest)), ttft))
        }
        Some(Err(e)) => Err(e),
        None => Err(GatewayError::UpstreamFailed {
            provider: provider.name().to_string(),
            message: "the upstream stream ended without any data".into(),
        }),
    }
}

/// Reports a started stream's fate to route health: a failure after the start counts against
/// the route; a finished stream records its generation speed.
fn track(
    mut s: ChunkStream,
    health: Arc<Health>,
    key: String,
    first_at: tokio::time::Instant,
) -> ChunkStream {
    Box::pin(async_stream::stream! {
        let mut completion = 0u64;
        while let Some(item) = s.next().await {
            match &item {
                Ok(c) => {
                    if let Some(u) = c.usage {
                        completion = u.completion_tokens;
                    }
                }
                Err(_) => {
                    health.failure_after_start(&key);
                    yield item;
                    return;
                }
            }
            yield item;
        }
        health.throughput(&key, completion, first_at.elapsed());
    })
}

/// A short, text-free reason for an attempt's failure (for the request record).
fn error_code(e: &GatewayError) -> String {
    match e {
        GatewayError::UpstreamRejected(r) => r
            .code
            .clone()
            .or_else(|| r.kind.clone())
            .unwrap_or_else(|| format!("http_{}", r.status)),
        GatewayError::UpstreamFailed { .. } => "upstream_error".into(),
        GatewayError::UpstreamUnavailable { .. } => "upstream_unavailable".into(),
        GatewayError::UpstreamTimeout { .. } => "timeout".into(),
        _ => "error".into(),
    }
}
