//! The gateway core: resolves the model, validates, routes to a provider (failing over before the
//! first byte), and meters the answer. Knows nothing of HTTP.

pub mod model;
pub mod usage;
pub mod validate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::catalog::Catalog;
use crate::config::{Config, ModelConfig, Price};
use crate::error::GatewayError;
use crate::providers::{self, Provider, UpstreamCall};
use model::{ChatRequest, ChatResponse, ChunkStream, Usage};
use usage::{LogSink, Metered, Outcome, OutcomeSink, OutcomeStatus};

/// The route that served a request.
#[derive(Debug, Clone)]
pub struct Served {
    pub provider: String,
    pub upstream_model: String,
    pub price: Price,
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
}

/// Shared state of the running gateway.
pub struct Gateway {
    catalog: Catalog,
    providers: HashMap<String, Arc<dyn Provider>>,
    sink: Arc<dyn OutcomeSink>,
}

impl Gateway {
    pub fn new(config: &Config) -> Result<Gateway, String> {
        Ok(Gateway {
            catalog: Catalog::new(config),
            providers: providers::build(config)?,
            sink: Arc::new(LogSink),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The sink every request's outcome goes to (log line and metrics).
    pub fn sink(&self) -> Arc<dyn OutcomeSink> {
        self.sink.clone()
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
        let warnings = validate::validate(&mut request, &model)?;
        Ok(Prepared {
            request,
            model,
            warnings,
        })
    }

    /// Sends the request upstream: routes in order, failing over on retryable errors. Only
    /// failures before the first byte are retried; after that the stream carries the error.
    pub async fn dispatch(
        &self,
        p: &Prepared,
        request_id: &str,
    ) -> Result<(Answer, Served), GatewayError> {
        let mut last: Option<GatewayError> = None;
        for route in providers::routes_of(&p.model) {
            let Some(provider) = self.providers.get(&route.provider) else {
                continue;
            };
            let call = UpstreamCall {
                request: &p.request,
                model: &p.model,
                route,
                request_id,
            };
            let served = Served {
                provider: route.provider.clone(),
                upstream_model: route.upstream_model.clone(),
                price: route.price,
            };
            let result = if p.request.stream {
                provider.stream(&call).await.map(Answer::Stream)
            } else {
                provider.complete(&call).await.map(Answer::Complete)
            };
            match result {
                Ok(answer) => return Ok((answer, served)),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(request_id, provider = %route.provider, error = %e, "route failed; trying the next one");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            GatewayError::internal(format!("model {} has no usable route", p.model.id))
        }))
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
