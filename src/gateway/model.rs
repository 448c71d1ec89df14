//! The internal request/response model: every inbound API converts into it and every upstream
//! dialect converts out of it.
//!
//! Its serde form is OpenAI Chat Completions' shape (the lingua franca of the upstreams), so an
//! OpenAI-like dialect serialises it directly and patches only its own quirks. Fields the model
//! does not know ride along in `extra` maps, untouched.

use std::pin::Pin;

use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::GatewayError;

/// A chat request after parsing and normalisation.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// The model name the client asked for (id or alias).
    pub model: String,
    pub messages: Vec<Message>,
    pub stream: bool,
    /// The client asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// `max_completion_tokens` / `max_tokens`, whichever the client sent.
    pub max_output_tokens: Option<u32>,
    /// The client's name for `max_output_tokens` (for error messages).
    pub max_output_param: &'static str,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Vec<String>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub reasoning: Reasoning,
    pub user: Option<String>,
    pub prompt_cache_key: Option<String>,
    /// Request fields tollgate does not model, forwarded to the upstream unchanged.
    pub extra: Map<String, Value>,
}

/// The one internal thinking setting every client spelling reduces to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reasoning {
    /// `None` leaves the model's default.
    pub enabled: Option<bool>,
    pub effort: Option<Effort>,
    pub budget_tokens: Option<u32>,
    /// Keep earlier turns' reasoning in the prompt (Moonshot `keep: "all"`).
    pub keep_history: bool,
    /// Reason, but do not show the reasoning to the client (still counted and billed).
    pub exclude: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effort {
    None,
    Minimal,
    Low,
    Medium,
    High,
    Xhigh,
    Max,
}

impl Effort {
    pub fn as_str(self) -> &'static str {
        match self {
            Effort::None => "none",
            Effort::Minimal => "minimal",
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High => "high",
            Effort::Xhigh => "xhigh",
            Effort::Max => "max",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
    #[serde(other)]
    Unknown,
}

/// One conversation message (OpenAI shape; `reasoning_content` carries earlier reasoning).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The opaque signature of `reasoning_content` when it came from Anthropic (replayed only to
    /// an Anthropic upstream; never serialised in the OpenAI shape).
    #[serde(skip)]
    pub reasoning_signature: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: Role, content: Option<Content>) -> Message {
        Message {
            role,
            content,
            reasoning_content: None,
            tool_calls: None,
            tool_call_id: None,
            name: None,
            reasoning_signature: None,
            extra: Map::new(),
        }
    }
}

/// Message content: a plain string or a list of typed parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The concatenated text of the content (parts other than text are skipped).
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// One content part (`text`, `image_url`, `video_url`, …); unknown members ride in `extra`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `{"url", "detail"}` or a bare URL string (Moonshot accepts both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_url: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A tool the model may call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionDef>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A complete tool call in an assistant message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// One fragment of a streamed tool call; fragments are keyed by `index`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionDelta>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FunctionDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// Token usage, normalised: `prompt_tokens` includes `cached_tokens`, `completion_tokens`
/// includes `reasoning_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: Option<u64>,
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A complete (non-streamed) answer.
#[derive(Debug, Clone, Default)]
pub struct ChatResponse {
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
    pub system_fingerprint: Option<String>,
    /// The upstream's own id for the generation (kept for the request record).
    pub upstream_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Choice {
    pub index: u32,
    pub message: Message,
    pub finish_reason: Option<String>,
    pub logprobs: Option<Value>,
}

/// One streamed chunk, normalised.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatChunk {
    pub choices: Vec<ChunkChoice>,
    pub usage: Option<Usage>,
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkChoice {
    pub index: u32,
    /// The delta opens the assistant message (`role: "assistant"`).
    pub role: bool,
    pub content: Option<String>,
    pub reasoning: Option<String>,
    /// The signature closing a reasoning block (Anthropic upstreams only).
    pub reasoning_signature: Option<String>,
    pub refusal: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

impl ChunkChoice {
    /// Whether the choice carries only reasoning (hidden when the client excluded reasoning).
    pub fn is_reasoning_only(&self) -> bool {
        (self.reasoning.is_some() || self.reasoning_signature.is_some())
            && !self.role
            && self.content.is_none()
            && self.refusal.is_none()
            && self.tool_calls.is_empty()
            && self.finish_reason.is_none()
    }

    /// Whether the choice carries nothing a client would see.
    pub fn is_empty(&self) -> bool {
        !self.role
            && self.content.is_none()
            && self.reasoning.is_none()
            && self.reasoning_signature.is_none()
            && self.refusal.is_none()
            && self.tool_calls.is_empty()
            && self.logprobs.is_none()
            && self.finish_reason.is_none()
    }
}

/// A stream of normalised chunks. An `Err` item ends the stream: the upstream failed mid-way.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, GatewayError>> + Send>>;
