//! Upstream providers: one adapter per wire dialect behind the [`Provider`] trait.
//!
//! OpenAI-like dialects (moonshot, openrouter, openai, vllm, sglang, empiriolabs, gonkagate) share
//! one HTTP client in `openai_compat.rs`; each dialect's quirks live in its own file.

pub mod anthropic;
pub mod client;
pub mod kimi_k2;
pub mod local;
pub mod media;
pub mod moonshot;
pub mod openai_compat;
pub mod openrouter;
pub mod sse;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Config, Dialect, ModelConfig, RouteConfig};
use crate::error::GatewayError;
use crate::gateway::model::{ChatRequest, ChatResponse, ChunkStream};

/// Everything an adapter needs for one upstream call.
pub struct UpstreamCall<'a> {
    pub request: &'a ChatRequest,
    pub model: &'a ModelConfig,
    pub route: &'a RouteConfig,
    pub request_id: &'a str,
}

/// An upstream that can answer chat requests.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's configured name.
    fn name(&self) -> &str;

    /// A complete (non-streamed) answer.
    async fn complete(&self, call: &UpstreamCall<'_>) -> Result<ChatResponse, GatewayError>;

    /// A streamed answer. Resolves once the upstream has accepted the request (status line
    /// received), so failures before any byte reaches the client are plain errors.
    async fn stream(&self, call: &UpstreamCall<'_>) -> Result<ChunkStream, GatewayError>;
}

/// Builds one adapter per configured provider.
pub fn build(config: &Config) -> Result<HashMap<String, Arc<dyn Provider>>, String> {
    let mut out: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    for p in &config.providers {
        let provider: Arc<dyn Provider> = match p.dialect {
            Dialect::Local => Arc::new(local::LocalProvider::new(p, config)?),
            Dialect::Anthropic => Arc::new(anthropic::Anthropic::new(p.clone())?),
            _ => Arc::new(openai_compat::OpenAiCompat::new(p.clone())?),
        };
        out.insert(p.name.clone(), provider);
    }
    Ok(out)
}

/// The routes of `model` whose provider exists, in configured order.
pub fn routes_of(model: &ModelConfig) -> impl Iterator<Item = &RouteConfig> {
    model.routes.iter()
}
