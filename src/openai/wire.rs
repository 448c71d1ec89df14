//! OpenAI wire types for what tollgate sends to clients: completions, chunks, usage, errors, models.

use serde::Serialize;
use serde_json::Value;

use crate::gateway::model::{
    ChatChunk, ChatResponse, ChunkChoice, Message, ToolCall, ToolCallDelta, Usage,
};

/// `usage` in OpenAI's shape, with `cost` (USD) as OpenRouter reports it when known.
#[derive(Debug, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: PromptDetails,
    pub completion_tokens_details: CompletionDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct PromptDetails {
    pub cached_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct CompletionDetails {
    pub reasoning_tokens: u64,
}

impl UsageOut {
    /// `cost_micros` is the request's charge in integer micro-USD, shown as USD.
    pub fn new(u: &Usage, cost_micros: Option<u64>) -> UsageOut {
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens(),
            prompt_tokens_details: PromptDetails {
                cached_tokens: u.cached_tokens,
                cache_write_tokens: u.cache_write_tokens,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: u.reasoning_tokens,
            },
            cost: cost_micros.map(micros_to_usd),
        }
    }
}

/// Integer micro-USD as a JSON number of dollars (display only; the ledger stays integer).
pub fn micros_to_usd(micros: u64) -> f64 {
    micros as f64 / 1_000_000.0
}

/// Identity of a response: our id, creation time and the canonical model id.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    pub id: &'a str,
    pub created: i64,
    pub model: &'a str,
    /// The route's provider name (OpenRouter-style `provider` field).
    pub provider: &'a str,
}

#[derive(Serialize)]
struct CompletionOut<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: Vec<ChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
    provider: &'a str,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    message: MessageOut<'a>,
    logprobs: Option<&'a Value>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    role: &'static str,
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a [ToolCall]>,
    refusal: Option<&'a Value>,
}

fn message_out(m: &Message, show_reasoning: bool) -> MessageOut<'_> {
    MessageOut {
        role: "assistant",
        content: m.content.as_ref().map(|c| c.text()),
        reasoning_content: m.reasoning_content.as_deref().filter(|_| show_reasoning),
        tool_calls: m.tool_calls.as_deref().filter(|t| !t.is_empty()),
        refusal: m.extra.get("refusal"),
    }
}

/// Serialises a complete answer as a `chat.completion` object.
pub fn completion_json(
    env: &Envelope<'_>,
    resp: &ChatResponse,
    show_reasoning: bool,
    cost_micros: Option<u64>,
) -> Vec<u8> {
    let out = CompletionOut {
        id: env.id,
        object: "chat.completion",
        created: env.created,
        model: env.model,
        choices: resp
            .choices
            .iter()
            .map(|c| ChoiceOut {
                index: c.index,
                message: message_out(&c.message, show_reasoning),
                logprobs: c.logprobs.as_ref(),
                finish_reason: c.finish_reason.as_deref(),
            })
            .collect(),
        usage: resp.usage.as_ref().map(|u| UsageOut::new(u, cost_micros)),
        system_fingerprint: resp.system_fingerprint.as_deref(),
        provider: env.provider,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
    choices: Vec<ChunkChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
    provider: &'a str,
}

#[derive(Serialize)]
struct ChunkChoiceOut<'a> {
    index: u32,
    delta: DeltaOut<'a>,
    logprobs: Option<&'a Value>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tool_calls: &'a [ToolCallDelta],
}

fn chunk_choice_out(c: &ChunkChoice, show_reasoning: bool) -> ChunkChoiceOut<'_> {
    ChunkChoiceOut {
        index: c.index,
        delta: DeltaOut {
            role: c.role.then_some("assistant"),
            content: c.content.as_deref(),
            reasoning_content: c.reasoning.as_deref().filter(|_| show_reasoning),
            refusal: c.refusal.as_deref(),
            tool_calls: &c.tool_calls,
        },
        logprobs: c.logprobs.as_ref(),
        finish_reason: c.finish_reason.as_deref(),
    }
}

/// Serialises one chunk as a `chat.completion.chunk` object (without usage: usage goes in the
/// dedicated final chunk).
pub fn chunk_json(env: &Envelope<'_>, chunk: &ChatChunk, show_reasoning: bool) -> Vec<u8> {
    let out = ChunkOut {
        id: env.id,
        object: "chat.completion.chunk",
        created: env.created,
        model: env.model,
        system_fingerprint: chunk.system_fingerprint.as_deref(),
        choices: chunk
            .choices
            .iter()
            .map(|c| chunk_choice_out(c, show_reasoning))
            .collect(),
        usage: None,
        provider: env.provider,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The standard final usage chunk: `choices: []` and the whole request's usage.
pub fn usage_chunk_json(env: &Envelope<'_>, usage: &Usage, cost_micros: Option<u64>) -> Vec<u8> {
    let out = ChunkOut {
        id: env.id,
        object: "chat.completion.chunk",
        created: env.created,
        model: env.model,
        system_fingerprint: None,
        choices: Vec::new(),
        usage: Some(UsageOut::new(usage, cost_micros)),
        provider: env.provider,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// `{"error": {message, type, param, code}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
    /// The upstream provider, when the error came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<&'a str>,
}
