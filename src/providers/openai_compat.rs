//! The HTTP adapter for OpenAI-like upstreams: writes the request in the dialect's spelling, sends
//! it with pooled keep-alive connections and per-phase timeouts, and normalises the answer
//! (complete or streamed) into the internal model.

use std::collections::HashSet;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::client::UpstreamClient;
use super::sse::{decode_body, SseEvent};
use super::{kimi_k2, media, moonshot, openrouter, Provider, UpstreamCall};
use crate::config::{Dialect, ProviderConfig};
use crate::error::GatewayError;
use crate::gateway::model::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, ChunkStream, Content, Message, Role,
    ToolCall, ToolCallDelta, Usage,
};

/// Largest non-streamed upstream answer accepted.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// An OpenAI-compatible upstream.
pub struct OpenAiCompat {
    cfg: ProviderConfig,
    http: UpstreamClient,
}

impl OpenAiCompat {
    pub fn new(cfg: ProviderConfig) -> Result<OpenAiCompat, String> {
        let auth = cfg
            .api_key
            .as_ref()
            .map(|key| (http::header::AUTHORIZATION, format!("Bearer {key}")));
        let http = UpstreamClient::new(&cfg, "/chat/completions", auth, &[])?;
        Ok(OpenAiCompat { cfg, http })
    }

    /// Writes the upstream request body in this dialect's spelling.
    pub fn body(&self, call: &UpstreamCall<'_>, stream: bool) -> Vec<u8> {
        write_body(
            self.cfg.dialect,
            call.request,
            &call.route.upstream_model,
            stream,
        )
    }

    /// The upstream request body for `call`, after the dialect's checks (and, for Moonshot, with
    /// remote images fetched and inlined).
    async fn upstream_body(
        &self,
        call: &UpstreamCall<'_>,
        stream: bool,
    ) -> Result<Vec<u8>, GatewayError> {
        if self.cfg.dialect == Dialect::Moonshot {
            moonshot::check(call.request, &call.route.upstream_model)?;
        }
        // Moonshot reads only data URIs: remote images are fetched (SSRF-safe) and inlined.
        let inlined = if self.cfg.dialect == Dialect::Moonshot {
            media::inline_remote_images(call.request).await?
        } else {
            None
        };
        Ok(match &inlined {
            Some(req) => write_body(self.cfg.dialect, req, &call.route.upstream_model, stream),
            None => self.body(call, stream),
        })
    }
}

#[async_trait]
impl Provider for OpenAiCompat {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    async fn complete(&self, call: &UpstreamCall<'_>) -> Result<ChatResponse, GatewayError> {
        let body = self.upstream_body(call, false).await?;
        let answer = self
            .http
            .complete(body, call.request_id, MAX_RESPONSE_BYTES)
            .await?;
        parse_completion(&answer).map_err(|e| self.http.failed(e))
    }

    async fn stream(&self, call: &UpstreamCall<'_>) -> Result<ChunkStream, GatewayError> {
        let start = Instant::now();
        let body = self.upstream_body(call, true).await?;
        let resp = self.http.post(body, true, call.request_id).await?;
        Ok(decode_body(
            resp.into_body(),
            self.cfg.name.clone(),
            self.cfg.timeouts.idle,
            start + self.cfg.timeouts.total,
            StreamNormaliser::default(),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Request writing
// ---------------------------------------------------------------------------------------------

/// Serialises the internal request for an OpenAI-like dialect.
pub fn write_body(
    dialect: Dialect,
    req: &ChatRequest,
    upstream_model: &str,
    stream: bool,
) -> Vec<u8> {
    write_body_direct(dialect, req, upstream_model, stream)
        .unwrap_or_else(|| write_body_value(dialect, req, upstream_model, stream))
}

/// Top-level keys [`write_body_direct`] writes itself; an `extra` field of the same name (it
/// would be dropped or replace a value in place) sends the request the `Value` way.
const OWN_KEYS: [&str; 24] = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_completion_tokens",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "logprobs",
    "top_logprobs",
    "user",
    "prompt_cache_key",
    "reasoning_effort",
    "enable_thinking",
    "thinking_budget",
];

fn clashes(extra: &Map<String, Value>, fields: &[&str]) -> bool {
    !extra.is_empty() && extra.keys().any(|k| fields.contains(&k.as_str()))
}

/// The same bytes as [`write_body_value`], serialised straight from the request, for the
/// dialects that patch nothing but a reasoning field at the end (the hot path of a plain
/// OpenAI-compatible upstream). `None` when anything would need the `Value` way's patching: a
/// message to rewrite (`reasoning_content` for OpenAI, a `partial` prefill flag) or an `extra`
/// field named like a field written here.
fn write_body_direct(
    dialect: Dialect,
    req: &ChatRequest,
    upstream_model: &str,
    stream: bool,
) -> Option<Vec<u8>> {
    use serde::ser::{SerializeMap, Serializer};

    if !matches!(
        dialect,
        Dialect::Openai | Dialect::Gonkagate | Dialect::Empiriolabs
    ) || clashes(&req.extra, &OWN_KEYS)
    {
        return None;
    }
    for m in &req.messages {
        if (dialect == Dialect::Openai && m.reasoning_content.is_some())
            || clashes(
                &m.extra,
                &[
                    "partial",
                    "role",
                    "content",
                    "reasoning_content",
                    "tool_calls",
                    "tool_call_id",
                    "name",
                ],
            )
        {
            return None;
        }
        if let Some(Content::Parts(parts)) = &m.content {
            let part_fields = ["type", "text", "image_url", "video_url"];
            if parts.iter().any(|p| clashes(&p.extra, &part_fields)) {
                return None;
            }
        }
    }
    if req
        .tools
        .iter()
        .any(|t| clashes(&t.extra, &["type", "function"]))
    {
        return None;
    }
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::new(&mut out);
    let mut body = ser.serialize_map(None).ok()?;
    macro_rules! put {
        ($k:expr, $v:expr) => {
            body.serialize_entry($k, $v).ok()?
        };
    }
    macro_rules! opt {
        ($k:expr, $v:expr) => {
            if let Some(v) = $v {
                body.serialize_entry($k, v).ok()?;
            }
        };
    }
    put!("model", upstream_model);
    put!("messages", &req.messages);
    if stream {
        put!("stream", &true);
        // Always ask for usage: tollgate meters every stream, whatever the client asked.
        put!(
            "stream_options",
            &IncludeUsage {
                include_usage: true
            }
        );
    }
    if let Some(n) = req.max_output_tokens {
        let key = match dialect {
            Dialect::Openai => "max_completion_tokens",
            _ => "max_tokens",
        };
        put!(key, &n);
    }
    opt!("temperature", &req.temperature);
    opt!("top_p", &req.top_p);
    opt!("n", &req.n);
    opt!("presence_penalty", &req.presence_penalty);
    opt!("frequency_penalty", &req.frequency_penalty);
    opt!("seed", &req.seed);
    opt!("stop", (!req.stop.is_empty()).then_some(&req.stop));
    opt!("tools", (!req.tools.is_empty()).then_some(&req.tools));
    opt!("tool_choice", &req.tool_choice);
    opt!("parallel_tool_calls", &req.parallel_tool_calls);
    opt!("response_format", &req.response_format);
    opt!("logprobs", req.logprobs.then_some(&true));
    opt!("top_logprobs", &req.top_logprobs);
    opt!("user", &req.user);
    opt!("prompt_cache_key", &req.prompt_cache_key);
    for (k, v) in &req.extra {
        put!(k, v);
    }
    let r = &req.reasoning;
    match dialect {
        Dialect::Empiriolabs => {
            opt!("enable_thinking", &r.enabled);
            opt!("thinking_budget", &r.budget_tokens);
        }
        _ => {
            let effort = match (r.effort, r.enabled) {
                (Some(e), _) => Some(e.as_str()),
                (None, Some(false)) => Some("none"),
                _ => None,
            };
            opt!("reasoning_effort", &effort);
        }
    }
    body.end().ok()?;
    Some(out)
}

/// `{"include_usage": true}` without building a `Value`.
#[derive(serde::Serialize)]
struct IncludeUsage {
    include_usage: bool,
}

/// Serialises the internal request for an OpenAI-like dialect as a `Value` (any dialect's
/// patches apply to it).
fn write_body_value(
    dialect: Dialect,
    req: &ChatRequest,
    upstream_model: &str,
    stream: bool,
) -> Vec<u8> {
    let mut body = Map::with_capacity(16 + req.extra.len());
    body.insert("model".into(), json!(upstream_model));
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| message_json(dialect, m))
        .collect();
    body.insert("messages".into(), Value::Array(messages));
    if stream {
        body.insert("stream".into(), json!(true));
        // Always ask for usage: tollgate meters every stream, whatever the client asked.
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(n) = req.max_output_tokens {
        let key = match dialect {
            Dialect::Moonshot | Dialect::Openai => "max_completion_tokens",
            _ => "max_tokens",
        };
        body.insert(key.into(), json!(n));
    }
    let opt = |body: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            body.insert(k.into(), v);
        }
    };
    opt(&mut body, "temperature", req.temperature.map(|v| json!(v)));
    opt(&mut body, "top_p", req.top_p.map(|v| json!(v)));
    opt(&mut body, "n", req.n.map(|v| json!(v)));
    opt(
        &mut body,
        "presence_penalty",
        req.presence_penalty.map(|v| json!(v)),
    );
    opt(
        &mut body,
        "frequency_penalty",
        req.frequency_penalty.map(|v| json!(v)),
    );
    opt(&mut body, "seed", req.seed.map(|v| json!(v)));
    if !req.stop.is_empty() {
        body.insert("stop".into(), json!(req.stop));
    }
    if !req.tools.is_empty() {
        body.insert(
            "tools".into(),
            serde_json::to_value(&req.tools).unwrap_or(Value::Null),
        );
    }
    opt(&mut body, "tool_choice", req.tool_choice.clone());
    opt(
        &mut body,
        "parallel_tool_calls",
        req.parallel_tool_calls.map(|v| json!(v)),
    );
    opt(&mut body, "response_format", req.response_format.clone());
    if req.logprobs {
        body.insert("logprobs".into(), json!(true));
    }
    opt(
        &mut body,
        "top_logprobs",
        req.top_logprobs.map(|v| json!(v)),
    );
    opt(&mut body, "user", req.user.clone().map(Value::String));
    opt(
        &mut body,
        "prompt_cache_key",
        req.prompt_cache_key.clone().map(Value::String),
    );
    for (k, v) in &req.extra {
        body.entry(k.clone()).or_insert_with(|| v.clone());
    }
    write_reasoning(dialect, &mut body, req);
    match dialect {
        Dialect::Moonshot => moonshot::patch_body(&mut body, req, upstream_model),
        _ => {
            kimi_k2::apply_prefill(dialect, &mut body);
            if matches!(dialect, Dialect::Vllm | Dialect::Sglang) && kimi_k2::is_k2(upstream_model)
            {
                kimi_k2::patch_body(&mut body, req);
            }
        }
    }
    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
}

fn write_reasoning(dialect: Dialect, body: &mut Map<String, Value>, req: &ChatRequest) {
    let r = &req.reasoning;
    match dialect {
        Dialect::Moonshot => moonshot::write_thinking(body, r),
        Dialect::Openrouter => openrouter::write_reasoning(body, r),
        Dialect::Vllm | Dialect::Sglang => {
            if let Some(enabled) = r.enabled {
                let kwargs = body
                    .entry("chat_template_kwargs")
                    .or_insert_with(|| json!({}));
                if let Value::Object(k) = kwargs {
                    k.entry("thinking").or_insert(json!(enabled));
                }
            }
        }
        Dialect::Empiriolabs => {
            if let Some(enabled) = r.enabled {
                body.insert("enable_thinking".into(), json!(enabled));
            }
            if let Some(b) = r.budget_tokens {
                body.insert("thinking_budget".into(), json!(b));
            }
        }
        Dialect::Openai | Dialect::Gonkagate => {
            if let Some(e) = r.effort {
                body.insert("reasoning_effort".into(), json!(e.as_str()));
            } else if r.enabled == Some(false) {
                body.insert("reasoning_effort".into(), json!("none"));
            }
        }
        Dialect::Anthropic | Dialect::Local => {}
    }
}

fn message_json(dialect: Dialect, m: &Message) -> Value {
    let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        match dialect {
            // OpenRouter reads `reasoning`; it also accepts `reasoning_content` as an alias.
            Dialect::Openrouter => {
                if let Some(r) = o.remove("reasoning_content") {
                    o.entry("reasoning").or_insert(r);
                }
            }
            Dialect::Openai => {
                o.remove("reasoning_content");
            }
            _ => {}
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Response parsing (private wire types, lenient about every known upstream's quirks)
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct UpUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    /// Moonshot's non-standard top-level cached count.
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<UpPromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<UpCompletionDetails>,
}

#[derive(Deserialize, Default)]
struct UpPromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct UpCompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl UpUsage {
    fn normalise(&self) -> Usage {
        let details = self.prompt_tokens_details.as_ref();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: details
                .and_then(|d| d.cached_tokens)
                .or(self.cached_tokens)
                .unwrap_or(0),
            cache_write_tokens: details.and_then(|d| d.cache_write_tokens),
            reasoning_tokens: self
                .completion_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct UpCompletion {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    choices: Vec<UpChoice>,
    #[serde(default)]
    usage: Option<UpUsage>,
    #[serde(default)]
    system_fingerprint: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct UpChoice {
    #[serde(default)]
    index: u32,
    message: UpMessage,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(Deserialize, Default)]
struct UpMessage {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    refusal: Option<Value>,
}

/// Parses a non-streamed OpenAI-like answer (any dialect's quirks) into the internal model.
pub fn parse_completion(body: &[u8]) -> Result<ChatResponse, String> {
    let up: UpCompletion = serde_json::from_slice(body)
        .map_err(|e| format!("the upstream answer is not a chat completion: {e}"))?;
    if let Some(err) = up.error {
        return Err(format!(
            "the upstream reported an error: {}",
            error_message(&err)
        ));
    }
    let choices = up
        .choices
        .into_iter()
        .map(|c| {
            let content = match c.message.content {
                Some(Value::String(s)) => Some(Content::Text(s)),
                Some(Value::Null) | None => None,
                Some(other) => serde_json::from_value(other).ok(),
            };
            let mut message = Message::new(Role::Assistant, content);
            message.reasoning_content = c.message.reasoning_content.or(c.message.reasoning);
            message.tool_calls = c.message.tool_calls.filter(|t| !t.is_empty());
            if let Some(r) = c.message.refusal.filter(|r| !r.is_null()) {
                message.extra.insert("refusal".into(), r);
            }
            Choice {
                index: c.index,
                message,
                finish_reason: c.finish_reason.map(normalise_finish),
                logprobs: c.logprobs.filter(|l| !l.is_null()),
            }
        })
        .collect();
    Ok(ChatResponse {
        choices,
        usage: up.usage.map(|u| u.normalise()),
        system_fingerprint: up.system_fingerprint,
        upstream_id: up.id,
    })
}

fn normalise_finish(f: String) -> String {
    match f.as_str() {
        "stop" | "length" | "tool_calls" | "content_filter" | "function_call" => f,
        "eos" | "end_turn" | "stop_sequence" => "stop".into(),
        "max_tokens" => "length".into(),
        "tool_use" => "tool_calls".into(),
        _ => f,
    }
}

#[derive(Deserialize)]
struct UpChunk {
    #[serde(default)]
    choices: Vec<UpChunkChoice>,
    #[serde(default)]
    usage: Option<UpUsage>,
    #[serde(default)]
    system_fingerprint: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct UpChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: UpDelta,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<Value>,
    /// Moonshot puts streamed usage here.
    #[serde(default)]
    usage: Option<UpUsage>,
}

#[derive(Deserialize, Default)]
struct UpDelta {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

/// Per-stream state that turns upstream chunks into clean internal chunks.
#[derive(Default)]
struct StreamNormaliser {
    role_sent: HashSet<u32>,
    saw_finish: bool,
    done: bool,
}

impl StreamNormaliser {
    fn event(&mut self, ev: &SseEvent) -> Result<Option<ChatChunk>, String> {
        let data = ev.data.trim();
        if data == "[DONE]" {
            self.done = true;
            self.saw_finish = true;
            return Ok(None);
        }
        if data.is_empty() {
            return Ok(None);
        }
        let up: UpChunk = match serde_json::from_str(data) {
            Ok(c) => c,
            // A malformed event is skipped, not fatal: the stream's end decides completeness.
            Err(e) => {
                tracing::warn!(error = %e, "skipping a malformed SSE event from the upstream");
                return Ok(None);
            }
        };
        if let Some(err) = up.error {
            return Err(format!(
                "the upstream failed mid-stream: {}",
                error_message(&err)
            ));
        }
        let mut usage = up.usage.map(|u| u.normalise());
        let mut choices = Vec::with_capacity(up.choices.len());
        for c in up.choices {
            if let Some(u) = &c.usage {
                usage = Some(u.normalise());
            }
            if c.finish_reason.as_deref() == Some("error") {
                return Err("the upstream ended the stream with finish_reason \"error\"".into());
            }
            let role = c.delta.role.is_some() && self.role_sent.insert(c.index);
            let choice = ChunkChoice {
                index: c.index,
                role,
                content: c.delta.content.filter(|s| !s.is_empty() || role),
                reasoning: c
                    .delta
                    .reasoning_content
                    .or(c.delta.reasoning)
                    .filter(|s| !s.is_empty()),
                reasoning_signature: None,
                refusal: c.delta.refusal.filter(|s| !s.is_empty()),
                tool_calls: c.delta.tool_calls.unwrap_or_default(),
                logprobs: c.logprobs.filter(|l| !l.is_null()),
                finish_reason: c.finish_reason.map(normalise_finish),
            };
            if choice.finish_reason.is_some() {
                self.saw_finish = true;
            }
            if !choice.is_empty() {
                choices.push(choice);
            }
        }
        if choices.is_empty() && usage.is_none() {
            return Ok(None);
        }
        Ok(Some(ChatChunk {
            choices,
            usage,
            system_fingerprint: up.system_fingerprint,
        }))
    }
}

/// Normalises a whole recorded stream (each SSE `data` payload in order), as the live adapter
/// does: for golden tests and tools. Stops at `[DONE]`; an upstream error ends it with `Err`.
pub fn normalise_stream(events: &[String]) -> Result<Vec<ChatChunk>, String> {
    let mut n = StreamNormaliser::default();
    let mut out = Vec::new();
    for data in events {
        if let Some(c) = n.event(&SseEvent {
            event: None,
            data: data.clone(),
        })? {
            out.push(c);
        }
        if n.done {
            break;
        }
    }
    Ok(out)
}

fn error_message(err: &Value) -> String {
    err.get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| err.to_string())
}

impl super::sse::ChunkDecoder for StreamNormaliser {
    fn event(&mut self, ev: &SseEvent) -> Result<Option<ChatChunk>, String> {
        StreamNormaliser::event(self, ev)
    }
    fn done(&self) -> bool {
        self.done
    }
    fn saw_finish(&self) -> bool {
        self.saw_finish
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::model::Reasoning;

    fn norm_all(events: &[&str]) -> (Vec<ChatChunk>, Result<(), String>, bool) {
        let mut n = StreamNormaliser::default();
        let mut out = Vec::new();
        for e in events {
            match n.event(&SseEvent {
                event: None,
                data: e.to_string(),
            }) {
                Ok(Some(c)) => out.push(c),
                Ok(None) => {}
                Err(m) => return (out, Err(m), n.saw_finish),
            }
        }
        (out, Ok(()), n.saw_finish)
    }

    #[test]
    fn moonshot_usage_in_choice_and_top_level_cached_tokens() {
        let (chunks, r, fin) = norm_all(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"think"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop","usage":{"prompt_tokens":8,"completion_tokens":11,"total_tokens":19,"cached_tokens":8}}]}"#,
            "[DONE]",
        ]);
        assert!(r.is_ok() && fin);
        assert_eq!(chunks[1].choices[0].reasoning.as_deref(), Some("think"));
        let u = chunks[2].usage.expect("usage");
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (8, 11, 8)
        );
    }

    #[test]
    fn openrouter_separate_usage_chunk_and_reasoning_field() {
        let (chunks, r, _) = norm_all(&[
            r#"{"provider":"Moonshot AI","choices":[{"index":0,"delta":{"role":"assistant","reasoning":"hm"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls","native_finish_reason":"tool_calls"}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":{"prompt_tokens":154,"completion_tokens":52,"total_tokens":206,"cost":0.0004448,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":7}}}"#,
        ]);
        assert!(r.is_ok());
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].choices[0].role);
        assert_eq!(chunks[0].choices[0].reasoning.as_deref(), Some("hm"));
        assert!(!chunks[1].choices[0].role, "role is sent once");
        assert!(
            chunks[2].choices.is_empty(),
            "the usage chunk's empty choice is dropped"
        );
        assert_eq!(
            chunks[2]
                .usage
                .map(|u| (u.cached_tokens, u.reasoning_tokens)),
            Some((3, 7))
        );
    }

    #[test]
    fn mid_stream_error_event_is_an_error() {
        let (_, r, _) = norm_all(&[
            r#"{"error":{"code":429,"message":"Rate limit exceeded"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}"#,
        ]);
        assert!(r.unwrap_err().contains("Rate limit exceeded"));
    }

    #[test]
    fn malformed_event_is_skipped() {
        let (chunks, r, _) = norm_all(&[
            "{not json",
            r#"{"choices":[{"index":0,"delta":{"content":"ok"}}]}"#,
        ]);
        assert!(r.is_ok());
        assert_eq!(chunks.len(), 1);
    }

    /// The direct writer gives the `Value` writer's bytes exactly, key order included, and
    /// declines what it does not patch.
    #[test]
    fn direct_body_is_the_value_body() {
        let bodies = [
            r#"{"model":"m","messages":[{"role":"user","content":"Return one short sentence."}],"max_tokens":16}"#,
            r#"{"zz":1,"model":"m","a":{"b":[1,2.5,"x",1e3,-0.0]},"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"},"extra_part":1}],"name":"n","x_extra":true}],"stream":true,"mid":null,"temperature":0.7,"top_p":1,"last":"y","reasoning_effort":"low"}"#,
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"r"}],"stop":["a","b"],"tools":[{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object","properties":{}},"strict":true}},{"type":"builtin_function","function":{"name":"$web_search"},"x":1}],"tool_choice":"auto","seed":-3,"n":2,"logprobs":true,"top_logprobs":3,"user":"u","prompt_cache_key":"k","presence_penalty":0,"frequency_penalty":-1.5,"parallel_tool_calls":false,"response_format":{"type":"json_object"},"max_completion_tokens":5,"enable_thinking":true,"thinking_budget":64}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"\u00e9\n\"q\""}],"thinking":{"type":"disabled"},"chat_template_kwargs":{"x":1}}"#,
        ];
        for b in bodies {
            let req = crate::openai::parse_chat_request(b.as_bytes()).expect("parses");
            for d in [Dialect::Openai, Dialect::Gonkagate, Dialect::Empiriolabs] {
                for stream in [false, true] {
                    let direct = write_body_direct(d, &req, "up/model", stream)
                        .unwrap_or_else(|| panic!("{d:?} {b}: declined"));
                    let value = write_body_value(d, &req, "up/model", stream);
                    assert_eq!(
                        String::from_utf8_lossy(&direct),
                        String::from_utf8_lossy(&value),
                        "{d:?} {b}"
                    );
                }
            }
        }
        // what needs the Value way's patching is declined (and written by it)
        let declined = [
            (
                Dialect::Openai,
                r#"{"model":"m","messages":[{"role":"assistant","content":"a","reasoning_content":"r"}]}"#,
            ),
            (
                Dialect::Gonkagate,
                r#"{"model":"m","messages":[{"role":"assistant","content":"a","partial":true}]}"#,
            ),
            (Dialect::Openrouter, r#"{"model":"m","messages":[]}"#),
            (Dialect::Moonshot, r#"{"model":"m","messages":[]}"#),
        ];
        for (d, b) in declined {
            let req = crate::openai::parse_chat_request(b.as_bytes()).expect("parses");
            assert!(
                write_body_direct(d, &req, "m", false).is_none(),
                "{d:?} {b}"
            );
        }
        let mut req = crate::openai::parse_chat_request(declined[3].1.as_bytes()).expect("ok");
        req.extra.insert("seed".into(), json!(1));
        assert!(write_body_direct(Dialect::Openai, &req, "m", false).is_none());
    }

    #[test]
    fn moonshot_body_spelling() {
        let mut req = ChatRequest {
            model: "kimi-k2.6".into(),
            max_output_tokens: Some(100),
            reasoning: Reasoning {
                enabled: Some(true),
                keep_history: true,
                ..Default::default()
            },
            ..Default::default()
        };
        req.extra.insert("custom_field".into(), json!(1));
        let v: Value =
            serde_json::from_slice(&write_body(Dialect::Moonshot, &req, "kimi-k2.6", true))
                .expect("json");
        assert_eq!(v["max_completion_tokens"], 100);
        assert_eq!(v["thinking"], json!({"type": "enabled", "keep": "all"}));
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        assert_eq!(v["custom_field"], 1);
        let v: Value = serde_json::from_slice(&write_body(
            Dialect::Openrouter,
            &req,
            "moonshotai/kimi-k2.6",
            false,
        ))
        .expect("json");
        assert_eq!(v["max_tokens"], 100);
        assert_eq!(v["reasoning"], json!({"enabled": true}));
        assert!(v.get("stream").is_none());
    }
}
