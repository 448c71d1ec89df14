//! The `anthropic` upstream dialect: Anthropic Messages over HTTP (`{base_url}/messages`,
//! `x-api-key`, `anthropic-version`), with per-phase timeouts; wire conversion lives in
//! `crate::anthropic::upstream`.

use async_trait::async_trait;
use http::header::HeaderName;
use tokio::time::Instant;

use super::client::UpstreamClient;
use super::sse::{decode_body, ChunkDecoder, SseEvent};
use super::{Provider, UpstreamCall};
use crate::anthropic::upstream::{parse_response, write_request_for, StreamDecoder};
use crate::config::ProviderConfig;
use crate::error::GatewayError;
use crate::gateway::model::{ChatResponse, ChunkStream};

/// The API version tollgate speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// An Anthropic Messages upstream.
pub struct Anthropic {
    cfg: ProviderConfig,
    http: UpstreamClient,
}

impl Anthropic {
    pub fn new(cfg: ProviderConfig) -> Result<Anthropic, String> {
        let auth = cfg
            .api_key
            .as_ref()
            .map(|key| (HeaderName::from_static("x-api-key"), key.clone()));
        let http = UpstreamClient::new(
            &cfg,
            "/messages",
            auth,
            &[("anthropic-version", ANTHROPIC_VERSION)],
        )?;
        Ok(Anthropic { cfg, http })
    }

    fn upstream_body(
        &self,
        call: &UpstreamCall<'_>,
        stream: bool,
    ) -> Result<Vec<u8>, GatewayError> {
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
        serde_json::to_vec(&body).map_err(|e| self.http.failed(e.to_string()))
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    async fn complete(&self, call: &UpstreamCall<'_>) -> Result<ChatResponse, GatewayError> {
        let body = self.upstream_body(call, false)?;
        let answer = self
            .http
            .complete(body, call.request_id, MAX_RESPONSE_BYTES)
            .await?;
        parse_response(&answer).map_err(|e| self.http.failed(e))
    }

    async fn stream(&self, call: &UpstreamCall<'_>) -> Result<ChunkStream, GatewayError> {
        let start = Instant::now();
        let body = self.upstream_body(call, true)?;
        let resp = self.http.post(body, true, call.request_id).await?;
        Ok(decode_body(
            resp.into_body(),
            self.cfg.name.clone(),
            self.cfg.timeouts.idle,
            start + self.cfg.timeouts.total,
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
