//! Dialect `local`: adapts the internal chat request to the embedded llama.cpp engine (`crate::engine`) and its events back to chunks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Provider, UpstreamCall};
use crate::config::{Config, ProviderConfig};
use crate::engine::tools::{self as tool_parse, ParsedOutput};
use crate::engine::{
    self, ChatMessage, Engine, EngineError, EngineEvent, EngineOptions, GenerateRequest,
    ResponseFormat, SamplingParams, TokenLogprob, ToolChoice,
};
use crate::error::GatewayError;
use crate::gateway::model::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, ChunkStream, Content, FunctionCall,
    FunctionDelta, Message, Role, ToolCall, ToolCallDelta, Usage,
};

/// Longest a non-streamed local request may take before it is abandoned.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest silence between two engine events of a stream (queue wait plus one decode step).
const EVENT_TIMEOUT: Duration = Duration::from_secs(300);

/// One local provider: an engine per distinct GGUF among the routes that use it.
pub struct LocalProvider {
    name: String,
    engines: HashMap<PathBuf, Engine>,
}

/// Engine sizing from the environment (`TOLLGATE_LOCAL_THREADS`, `_SLOTS`, `_QUEUE`, `_CTX`),
/// falling back to [`EngineOptions::default`].
pub fn engine_options_from_env() -> EngineOptions {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let d = EngineOptions::default();
    EngineOptions {
        threads: get("TOLLGATE_LOCAL_THREADS")
            .filter(|&t| t > 0)
            .or(d.threads),
        slots: get("TOLLGATE_LOCAL_SLOTS")
            .filter(|&s| s > 0)
            .unwrap_or(d.slots),
        queue: get("TOLLGATE_LOCAL_QUEUE").unwrap_or(d.queue),
        ctx_per_slot: get("TOLLGATE_LOCAL_CTX")
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(d.ctx_per_slot),
        batch: d.batch,
        chat_template: d.chat_template,
    }
}

impl LocalProvider {
    /// Loads (once each) every GGUF that a route to this provider names. Blocking: model loading
    /// takes a moment, so this runs at start-up.
    pub fn new(p: &ProviderConfig, config: &Config) -> Result<LocalProvider, String> {
        let options = engine_options_from_env();
        let mut engines = HashMap::new();
        for m in &config.models {
            for r in m.routes.iter().filter(|r| r.provider == p.name) {
                let Some(path) = &r.model_path else {
                    continue;
                };
                if engines.contains_key(path) {
                    continue;
                }
                let engine = Engine::load(path, options.clone()).map_err(|e| {
                    format!(
                        "provider {:?}: {e} (the default model is fetched by `make model` / scripts/fetch-model.sh)",
                        p.name
                    )
                })?;
                let info = engine.info();
                tracing::info!(
                    provider = %p.name,
                    model = %m.id,
                    path = %path.display(),
                    context_length = info.context_length,
                    slots = info.slots,
                    threads = info.threads,
                    tools = info.supports_tools,
                    "local engine loaded"
                );
                engines.insert(path.clone(), engine);
            }
        }
        Ok(LocalProvider {
            name: p.name.clone(),
            engines,
        })
    }

    /// The engine serving a loaded GGUF (for model cards and tests).
    pub fn engine(&self, path: &std::path::Path) -> Option<&Engine> {
        self.engines.get(path)
    }

    fn submit(&self, call: &UpstreamCall<'_>) -> Result<mpsc::Receiver<EngineEvent>, GatewayError> {
        let path = call.route.model_path.as_ref().ok_or_else(|| {
            GatewayError::internal(format!(
                "route of model {} to local provider {} has no model_path",
                call.model.id, self.name
            ))
        })?;
        let engine = self.engines.get(path).ok_or_else(|| {
            GatewayError::internal(format!(
                "local provider {} has not loaded {}",
                self.name,
                path.display()
            ))
        })?;
        let req = to_engine_request(call.request)?;
        engine.submit(req).map_err(|e| self.map_err(e))
    }

    fn map_err(&self, e: EngineError) -> GatewayError {
        map_engine_error(&self.name, e)
    }
}

/// Maps engine errors onto the gateway's error kinds (and so onto HTTP statuses).
pub fn map_engine_error(provider: &str, e: EngineError) -> GatewayError {
    match e {
        EngineError::Overloaded {
            retry_after_secs, ..
        } => GatewayError::Overloaded {
            message: e.to_string(),
            retry_after: Duration::from_secs(u64::from(retry_after_secs)),
        },
        EngineError::InvalidRequest { message, param } => GatewayError::InvalidRequest {
            message,
            param,
            code: None,
        },
        EngineError::ContextLength { .. } => GatewayError::InvalidRequest {
            message: e.to_string(),
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
        },
        EngineError::Unavailable | EngineError::Internal(_) | EngineError::Load { .. } => {
            GatewayError::UpstreamFailed {
                provider: provider.to_string(),
                message: e.to_string(),
            }
        }
    }
}

/// Converts the internal request into an engine request; anything the engine cannot do is a 400.
pub fn to_engine_request(r: &ChatRequest) -> Result<GenerateRequest, GatewayError> {
    if r.n.is_some_and(|n| n > 1) {
        return Err(GatewayError::invalid(
            "the local engine returns one choice per request (n = 1)",
            Some("n".to_string()),
        ));
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.iter().enumerate() {
        let role = match m.role {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function | Role::Unknown => {
                return Err(GatewayError::invalid(
                    format!("messages[{i}]: this role is not supported by the local engine"),
                    Some(format!("messages[{i}].role")),
                ))
            }
        };
        let content = match &m.content {
            None => None,
            Some(Content::Text(s)) => Some(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        _ => {
                            return Err(GatewayError::invalid(
                                format!(
                                    "messages[{i}].content[{j}]: the local engine accepts text parts only"
                                ),
                                Some(format!("messages[{i}].content[{j}]")),
                            ))
                        }
                    }
                }
                Some(text)
            }
        };
        let tool_calls = m.tool_calls.as_ref().map(|calls| {
            calls
                .iter()
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect()
        });
        messages.push(ChatMessage {
            role: role.to_string(),
            content,
            name: m.name.clone(),
            tool_calls,
            tool_call_id: m.tool_call_id.clone(),
        });
    }
    let tools = if r.tools.is_empty() {
        None
    } else {
        Some(
            r.tools
                .iter()
                .filter_map(|t| serde_json::to_value(t).ok())
                .collect(),
        )
    };
    let logprobs = if r.logprobs {
        Some(u8::try_from(r.top_logprobs.unwrap_or(0).min(20)).unwrap_or(20))
    } else {
        None
    };
    let sampling = SamplingParams {
        temperature: r.temperature.unwrap_or(1.0) as f32,
        top_p: r.top_p.unwrap_or(1.0) as f32,
        seed: r.seed.map(|s| s as u64),
        presence_penalty: r.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: r.frequency_penalty.unwrap_or(0.0) as f32,
        logprobs,
    };
    Ok(GenerateRequest {
        messages,
        tools,
        sampling,
        max_tokens: r.max_output_tokens,
        stop: r.stop.clone(),
        response_format: response_format(r.response_format.as_ref())?,
        tool_choice: tool_choice(r)?,
    })
}

/// Names of the request's function tools.
fn tool_names(r: &ChatRequest) -> Vec<String> {
    r.tools
        .iter()
        .filter_map(|t| t.function.as_ref().map(|f| f.name.clone()))
        .collect()
}

/// OpenAI `tool_choice`: "auto" (default), "none", "required", or one named function.
fn tool_choice(r: &ChatRequest) -> Result<ToolChoice, GatewayError> {
    let bad = |msg: String| GatewayError::invalid(msg, Some("tool_choice".into()));
    let names = tool_names(r);
    match &r.tool_choice {
        None => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required(names)),
            other => Err(bad(format!(
                "tool_choice must be \"auto\", \"none\", \"required\" or a named function, got {other:?}"
            ))),
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice object must name a function".into()))?;
            if !names.iter().any(|n| n == name) {
                return Err(bad(format!("tool_choice names {name:?}, which is not in tools")));
            }
            Ok(ToolChoice::Required(vec![name.to_owned()]))
        }
    }
}

/// Whether the output of `r` should be read for tool calls.
fn parses_tool_calls(r: &ChatRequest) -> bool {
    !r.tools.is_empty() && r.tool_choice.as_ref().and_then(Value::as_str) != Some("none")
}

fn call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

/// The OpenAI message for a finished answer: tool calls when the text is one, else the text.
fn answer_message(text: String, parsed: Option<ParsedOutput>) -> (Message, bool) {
    match parsed {
        Some(p) => {
            let content = (!p.content.is_empty()).then(|| Content::Text(p.content));
            let mut m = Message::new(Role::Assistant, content);
            m.tool_calls = Some(
                p.calls
                    .into_iter()
                    .map(|c| ToolCall {
                        id: call_id(),
                        kind: "function".into(),
                        function: FunctionCall {
                            name: c.name,
                            arguments: c.arguments,
                        },
                    })
                    .collect(),
            );
            (m, true)
        }
        None => (
            Message::new(Role::Assistant, Some(Content::Text(text))),
            false,
        ),
    }
}

/// Streams text while holding back whatever might be the start of a tool call, so a call is sent
/// as `tool_calls` deltas instead of leaking out as content. Without tools it passes text through.
#[derive(Debug, Default)]
struct ToolCallStream {
    names: Vec<String>,
    active: bool,
    /// Text not yet shown.
    held: String,
    /// Held text contains a call marker (or is a bare JSON answer): keep it until the end.
    in_call: bool,
    emitted_any: bool,
}

impl ToolCallStream {
    fn new(r: &ChatRequest) -> Self {
        Self {
            names: tool_names(r),
            active: parses_tool_calls(r),
            ..Default::default()
        }
    }

    /// Adds new text; returns what can be shown now.
    fn push(&mut self, text: &str) -> String {
        if !self.active {
            return text.to_owned();
        }
        self.held.push_str(text);
        if self.in_call {
            return String::new();
        }
        if !self.emitted_any && tool_parse::may_become_call(&self.held) {
            let t = self.held.trim_start();
            if t.starts_with('{') || t.starts_with('[') || tool_parse::marker_at(t).is_some() {
                self.in_call = true;
            }
            if self.in_call || t.len() < 16 {
                return String::new();
            }
        }
        let cut = match tool_parse::marker_at(&self.held) {
            Some(pos) => {
                self.in_call = true;
                pos
            }
            None => self.held.len() - tool_parse::partial_marker_len(&self.held),
        };
        let out: String = self.held.drain(..cut).collect();
        self.emitted_any |= !out.is_empty();
        out
    }

    /// The end of the answer: the remaining text, and the calls if it was one.
    fn finish(&mut self) -> (String, Option<ParsedOutput>) {
        let held = std::mem::take(&mut self.held);
        if !self.active {
            return (held, None);
        }
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        match tool_parse::parse(&held, &names) {
            Some(p) => (String::new(), Some(p)),
            None => (held, None),
        }
    }
}

fn response_format(v: Option<&Value>) -> Result<ResponseFormat, GatewayError> {
    let Some(v) = v else {
        return Ok(ResponseFormat::Text);
    };
    let bad = |msg: &str| GatewayError::invalid(msg.to_string(), Some("response_format".into()));
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let schema = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("response_format.json_schema.schema is required"))?;
            Ok(ResponseFormat::JsonSchema(schema.clone()))
        }
        _ => Err(bad(
            "response_format.type must be one of text, json_object, json_schema",
        )),
    }
}

fn logprobs_json(entries: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": e.top_logprobs.iter().map(|t| json!({
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": t.bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content, "refusal": null })
}

fn usage_of(u: engine::Usage) -> Usage {
    Usage {
        prompt_tokens: u64::from(u.prompt_tokens),
        completion_tokens: u64::from(u.completion_tokens),
        cached_tokens: u64::from(u.cached_tokens),
        cache_write_tokens: None,
        reasoning_tokens: 0,
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn complete(&self, call: &UpstreamCall<'_>) -> Result<ChatResponse, GatewayError> {
        let mut rx = self.submit(call)?;
        let want_logprobs = call.request.logprobs;
        let names = tool_names(call.request);
        let collect = async {
            let mut text = String::new();
            let mut lps = Vec::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    EngineEvent::Delta { text: t, logprobs } => {
                        text.push_str(&t);
                        lps.extend(logprobs);
                    }
                    EngineEvent::Done {
                        finish_reason,
                        usage,
                    } => {
                        let parsed = if parses_tool_calls(call.request) {
                            let names: Vec<&str> = names.iter().map(String::as_str).collect();
                            tool_parse::parse(&text, &names)
                        } else {
                            None
                        };
                        let (message, called) = answer_message(text, parsed);
                        let finish = if called {
                            "tool_calls"
                        } else {
                            finish_reason.as_str()
                        };
                        return Ok(ChatResponse {
                            choices: vec![Choice {
                                index: 0,
                                message,
                                finish_reason: Some(finish.to_string()),
                                logprobs: want_logprobs.then(|| logprobs_json(&lps)),
                            }],
                            usage: Some(usage_of(usage)),
                            system_fingerprint: None,
                            upstream_id: None,
                        });
                    }
                    EngineEvent::Error(e) => return Err(self.map_err(e)),
                }
            }
            Err(self.map_err(EngineError::Unavailable))
        };
        tokio::time::timeout(COMPLETE_TIMEOUT, collect)
            .await
            .map_err(|_| GatewayError::UpstreamTimeout {
                provider: self.name.clone(),
                message: "the local engine did not finish in time".into(),
            })?
    }

    async fn stream(&self, call: &UpstreamCall<'_>) -> Result<ChunkStream, GatewayError> {
        let mut rx = self.submit(call)?;
        let want_logprobs = call.request.logprobs;
        let provider = self.name.clone();
        let mut calls = ToolCallStream::new(call.request);
        let mut held_lps: Vec<TokenLogprob> = Vec::new();
        let s = async_stream::stream! {
            yield Ok(ChatChunk {
                choices: vec![ChunkChoice { index: 0, role: true, content: Some(String::new()), ..Default::default() }],
                ..Default::default()
            });
            loop {
                let ev = match tokio::time::timeout(EVENT_TIMEOUT, rx.recv()).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => {
                        yield Err(map_engine_error(&provider, EngineError::Unavailable));
                        return;
                    }
                    Err(_) => {
                        yield Err(GatewayError::UpstreamTimeout {
                            provider: provider.clone(),
                            message: "the local engine stalled".into(),
                        });
                        return;
                    }
                };
                match ev {
                    EngineEvent::Delta { text, logprobs } => {
                        held_lps.extend(logprobs);
                        let text = calls.push(&text);
                        if text.is_empty() && calls.active {
                            continue;
                        }
                        let logprobs = std::mem::take(&mut held_lps);
                        let logprobs = (want_logprobs && !logprobs.is_empty()).then(|| logprobs_json(&logprobs));
                        yield Ok(ChatChunk {
                            choices: vec![ChunkChoice {
                                index: 0,
                                content: (!text.is_empty()).then_some(text),
                                logprobs,
                                ..Default::default()
                            }],
                            ..Default::default()
                        });
                    }
                    EngineEvent::Done { finish_reason, usage } => {
                        let (rest, parsed) = calls.finish();
                        let logprobs = std::mem::take(&mut held_lps);
                        let logprobs = (want_logprobs && !logprobs.is_empty()).then(|| logprobs_json(&logprobs));
                        let mut finish = finish_reason.as_str();
                        let mut tool_calls = Vec::new();
                        let mut content = (!rest.is_empty()).then_some(rest);
                        if let Some(p) = parsed {
                            finish = "tool_calls";
                            content = (!p.content.is_empty()).then_some(p.content);
                            tool_calls = p.calls.into_iter().enumerate().map(|(i, c)| ToolCallDelta {
                                index: u32::try_from(i).unwrap_or(u32::MAX),
                                id: Some(call_id()),
                                kind: Some("function".into()),
                                function: Some(FunctionDelta { name: Some(c.name), arguments: Some(c.arguments) }),
                            }).collect();
                        }
                        if content.is_some() || !tool_calls.is_empty() || logprobs.is_some() {
                            yield Ok(ChatChunk {
                                choices: vec![ChunkChoice { index: 0, content, tool_calls, logprobs, ..Default::default() }],
                                ..Default::default()
                            });
                        }
                        yield Ok(ChatChunk {
                            choices: vec![ChunkChoice {
                                index: 0,
                                finish_reason: Some(finish.to_string()),
                                ..Default::default()
                            }],
                            usage: Some(usage_of(usage)),
                            ..Default::default()
                        });
                        return;
                    }
                    EngineEvent::Error(e) => {
                        yield Err(map_engine_error(&provider, e));
                        return;
                    }
                }
            }
        };
        Ok(Box::pin(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::model::ContentPart;
    use serde_json::Map;

    fn base() -> ChatRequest {
        ChatRequest {
            model: "smollm2-135m-instruct".into(),
            messages: vec![Message::new(Role::User, Some(Content::Text("hi".into())))],
            max_output_param: "max_tokens",
            ..Default::default()
        }
    }

    #[test]
    fn maps_sampling_and_format() {
        let mut r = base();
        r.temperature = Some(0.5);
        r.seed = Some(9);
        r.logprobs = true;
        r.top_logprobs = Some(3);
        r.max_output_tokens = Some(12);
        r.stop = vec!["x".into()];
        r.response_format = Some(
            json!({"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object"}}}),
        );
        let g = to_engine_request(&r).unwrap_or_default();
        assert_eq!(g.sampling.temperature, 0.5);
        assert_eq!(g.sampling.seed, Some(9));
        assert_eq!(g.sampling.logprobs, Some(3));
        assert_eq!(g.max_tokens, Some(12));
        assert_eq!(g.stop, vec!["x".to_string()]);
        assert_eq!(
            g.response_format,
            ResponseFormat::JsonSchema(json!({"type":"object"}))
        );
        assert_eq!(g.messages[0].role, "user");
    }

    #[test]
    fn rejects_images_and_n() {
        let mut r = base();
        r.messages[0].content = Some(Content::Parts(vec![ContentPart {
            kind: "image_url".into(),
            text: None,
            image_url: Some(json!({"url": "http://x"})),
            video_url: None,
            extra: Map::new(),
        }]));
        assert!(matches!(
            to_engine_request(&r),
            Err(GatewayError::InvalidRequest { .. })
        ));
        let mut r = base();
        r.n = Some(2);
        assert!(matches!(
            to_engine_request(&r),
            Err(GatewayError::InvalidRequest { param: Some(p), .. }) if p == "n"
        ));
    }

    #[test]
    fn overloaded_maps_to_503_kind() {
        let e = map_engine_error(
            "local",
            EngineError::Overloaded {
                capacity: 2,
                retry_after_secs: 1,
            },
        );
        assert!(
            matches!(e, GatewayError::Overloaded { retry_after, .. } if retry_after == Duration::from_secs(1))
        );
        let e = map_engine_error(
            "local",
            EngineError::ContextLength {
                prompt_tokens: 9000,
                context_length: 4096,
            },
        );
        assert!(matches!(
            e,
            GatewayError::InvalidRequest {
                code: Some("context_length_exceeded"),
                ..
            }
        ));
    }

    fn with_tools(choice: Option<Value>) -> ChatRequest {
        let mut r = base();
        r.tools = vec![serde_json::from_value(
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {}}}),
        )
        .unwrap_or_else(|e| panic!("{e}"))];
        r.tool_choice = choice;
        r
    }

    fn feed(s: &mut ToolCallStream, pieces: &[&str]) -> String {
        pieces.iter().map(|p| s.push(p)).collect()
    }

    #[test]
    fn tool_choice_maps_to_engine() {
        let g = |c: Option<Value>| to_engine_request(&with_tools(c)).map(|r| r.tool_choice);
        assert_eq!(g(None).ok(), Some(ToolChoice::Auto));
        assert_eq!(g(Some(json!("none"))).ok(), Some(ToolChoice::None));
        assert_eq!(
            g(Some(json!("required"))).ok(),
            Some(ToolChoice::Required(vec!["get_weather".into()]))
        );
        assert_eq!(
            g(Some(
                json!({"type": "function", "function": {"name": "get_weather"}})
            ))
            .ok(),
            Some(ToolChoice::Required(vec!["get_weather".into()]))
        );
        assert!(g(Some(
            json!({"type": "function", "function": {"name": "nope"}})
        ))
        .is_err());
        assert!(g(Some(json!("sometimes"))).is_err());
    }

    #[test]
    fn streamed_tool_call_is_held_back_and_parsed() {
        let mut s = ToolCallStream::new(&with_tools(None));
        let shown = feed(
            &mut s,
            &[
                "<tool",
                "_call>\n{\"name\": \"get_weather\", ",
                "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
            ],
        );
        assert_eq!(shown, "");
        let (rest, parsed) = s.finish();
        assert_eq!(rest, "");
        let p = parsed.unwrap_or_else(|| panic!("no call parsed"));
        assert_eq!(p.calls[0].name, "get_weather");
        assert_eq!(p.calls[0].arguments, "{\"city\":\"Oslo\"}");
        let (m, called) = answer_message(String::new(), Some(p));
        assert!(called);
        assert!(m.content.is_none());
        let calls = m.tool_calls.unwrap_or_default();
        assert!(calls[0].id.starts_with("call_"));
        assert_eq!(calls[0].function.name, "get_weather");
    }

    #[test]
    fn streamed_text_passes_through_with_tools() {
        let mut s = ToolCallStream::new(&with_tools(None));
        let shown = feed(
            &mut s,
            &["The weather", " in Oslo is mild", " today. [", "1]"],
        );
        let (rest, parsed) = s.finish();
        assert_eq!(shown + &rest, "The weather in Oslo is mild today. [1]");
        assert!(parsed.is_none());
        // Text, then a call: the text streams, the call does not.
        let mut s = ToolCallStream::new(&with_tools(None));
        let shown = feed(
            &mut s,
            &[
                "Let me look that up for you. ",
                "<tool_call>{\"name\": \"get_weather\"}</tool_call>",
            ],
        );
        assert_eq!(shown, "Let me look that up for you. ");
        let (rest, parsed) = s.finish();
        assert_eq!(rest, "");
        assert_eq!(parsed.map(|p| p.calls.len()), Some(1));
        // tool_choice none: never parsed.
        let mut s = ToolCallStream::new(&with_tools(Some(json!("none"))));
        let shown = feed(
            &mut s,
            &["<tool_call>{\"name\": \"get_weather\"}</tool_call>"],
        );
        assert!(shown.starts_with("<tool_call>"));
        assert!(s.finish().1.is_none());
    }
}
