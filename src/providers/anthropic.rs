//! The `anthropic` upstream dialect: Anthropic Messages over HTTP (`{base_url}/messages`,
//! `x-api-key`, `anthropic-version`), with per-phase timeouts; wire conversion lives in
//! `crate::anthropic::upstream`.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::{timeout, Instant};

use super::openai_compat::{error_chain, read_capped};
use super::sse::{decode_body, ChunkDecoder, SseEvent};
use super::{Provider, UpstreamCall};
use crate::anthropic::upstream::{parse_response, write_request_for, StreamDecoder};
use crate::config::ProviderConfig;
use crate::error::{GatewayError, UpstreamRejection};
use crate::gateway::model::{ChatResponse, ChunkStream};

/// The API version tollgate speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// An Anthropic Messages upstream.
pub struct Anthropic {
    cfg: ProviderConfig,
    client: reqwest::Client,
    url: String,
}

impl Anthropic {
    pub fn new(cfg: ProviderConfig) -> Result<Anthropic, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("provider {:?}: header {k:?}: {e}", cfg.name))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| format!("provider {:?}: header {k:?}: {e}", cfg.name))?;
            headers.insert(name, value);
        }
        headers.insert(
            "anthropic-version",
            reqwest::header::HeaderValue::from_static(ANTHROPIC_VERSION),
        );
        if let Some(key) = &cfg.api_key {
            let mut v = reqwest::header::HeaderValue::from_str(key).map_err(|_| {
                format!(
                    "provider {:?}: the API key contains characters not allowed in a header",
                    cfg.name
                )
            })?;
            v.set_sensitive(true);
            headers.insert("x-api-key", v);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(cfg.timeouts.connect)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("provider {:?}: cannot build HTTP client: {e}", cfg.name))?;
        let url = format!("{}/messages", cfg.base_url);
        Ok(Anthropic { cfg, client, url })
    }

    fn timeout_error(&self, what: &str) -> GatewayError {
        GatewayError::UpstreamTimeout {
            provider: self.cfg.name.clone(),
            message: format!("the upstream timed out ({what})"),
        }
    }

    fn failed(&self, message: String) -> GatewayError {
        GatewayError::UpstreamFailed {
            provider: self.cfg.name.clone(),
            message,
        }
    }

    async fn send(
        &self,
        call: &UpstreamCall<'_>,
        stream: bool,
    ) -> Result<reqwest::Response, GatewayError> {
        // Kimi's Anthropic-compatible routes want reasoning on tool-call turns, unsigned.
        let kimi = self.cfg.base_url.contains("moonshot") || self.cfg.base_url.contains("kimi.com");
        let body = write_request_for(
            call.request,
            &call.route.upstream_model,
            stream,
            call.model.max_output_tokens,
            &self.cfg.name,
            kimi,
        )?;
        let fut = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-request-id", call.request_id)
            .body(serde_json::to_vec(&body).unwrap_or_default())
            .send();
        let resp = match timeout(self.cfg.timeouts.first_byte, fut).await {
            Err(_) => return Err(self.timeout_error("no response headers")),
            Ok(Err(e)) if e.is_timeout() => return Err(self.timeout_error("connect timed out")),
            Ok(Err(e)) => {
                return Err(self.failed(format!("cannot reach the upstream: {}", error_chain(&e))))
            }
            Ok(Ok(r)) => r,
        };
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let body = match timeout(self.cfg.timeouts.idle, read_capped(resp, 1024 * 1024)).await {
            Ok(Ok(b)) => b,
            _ => bytes::Bytes::new(),
        };
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let kind = v
            .pointer("/error/type")
            .and_then(Value::as_str)
            .map(str::to_string);
        let message = v
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("upstream returned HTTP {status}"));
        if (400..500).contains(&status) {
            Err(GatewayError::UpstreamRejected(Box::new(
                UpstreamRejection {
                    provider: self.cfg.name.clone(),
                    status,
                    message,
                    kind,
                    code: None,
                    param: None,
                    retry_after,
                },
            )))
        } else {
            Err(self.failed(format!("upstream returned HTTP {status}: {message}")))
        }
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    async fn complete(&self, call: &UpstreamCall<'_>) -> Result<ChatResponse, GatewayError> {
        let work = async {
            let resp = self.send(call, false).await?;
            let body = timeout(
                self.cfg.timeouts.idle,
                read_capped(resp, MAX_RESPONSE_BYTES),
            )
            .await
            .map_err(|_| self.timeout_error("response body stalled"))?
            .map_err(|e| self.failed(e))?;
            parse_response(&body).map_err(|e| self.failed(e))
        };
        timeout(self.cfg.timeouts.total, work)
            .await
            .map_err(|_| self.timeout_error("overall deadline"))?
    }

    async fn stream(&self, call: &UpstreamCall<'_>) -> Result<ChunkStream, GatewayError> {
        let start = Instant::now();
        let resp = self.send(call, true).await?;
        let provider = self.cfg.name.clone();
        let idle = self.cfg.timeouts.idle;
        let deadline = start + self.cfg.timeouts.total;
        Ok(decode_body(
            resp,
            provider,
            idle,
            deadline,
            StreamDecoder::default(),
        ))
    }
}

impl ChunkDecoder for StreamDecoder {
    fn event(&mut self, ev: &SseEvent) -> Result<Option<crate::gateway::model::ChatChunk>, String> {
        StreamDecoder::event(self, &ev.data)
    }
    fn done(&self) -> bool {
        self.done
    }
    fn saw_finish(&self) -> bool {
        self.saw_finish
    }
}
