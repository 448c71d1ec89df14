//! The `anthropic` upstream dialect's wire conversion: the internal request → an Anthropic
//! Messages body, and an Anthropic answer (JSON or SSE events) → the internal model.
//!
//! Tool-call ids are sanitised to `^[a-zA-Z0-9_-]+$` (identically in `tool_use` and
//! `tool_result`); reasoning is replayed as a `thinking` block only when it carries Anthropic's
//! signature (signatures are never fabricated); video is refused.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::finish_reason;
use crate::error::GatewayError;
use crate::gateway::model::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, Content, ContentPart, Effort,
    FunctionCall, FunctionDelta, Message, Role, ToolCall, ToolCallDelta, Usage,
};

/// Makes a tool-call id match `^[a-zA-Z0-9_-]+$`, deterministically. Ids that change get a short
/// hash of the original appended so two different ids never collide.
pub fn sanitize_tool_id(id: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(ok) {
        return id.to_string();
    }
    let mut out: String = id.chars().map(|c| if ok(c) { c } else { '_' }).collect();
    // FNV-1a: stable across processes and versions.
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    out.push_str(&format!("-{h:08x}"));
    out
}

/// Reasoning effort → Anthropic thinking budget (documented mapping, LiteLLM-like).
fn effort_budget(e: Effort) -> Option<u32> {
    match e {
        Effort::None => None,
        Effort::Minimal | Effort::Low => Some(1024),
        Effort::Medium => Some(2048),
        Effort::High => Some(4096),
        Effort::Xhigh => Some(8192),
        Effort::Max => Some(16384),
    }
}

fn bad(msg: impl Into<String>, param: String) -> GatewayError {
    GatewayError::invalid(msg, Some(param))
}

/// One OpenAI content part → an Anthropic block.
fn block_of(p: &ContentPart, provider: &str, param: String) -> Result<Option<Value>, GatewayError> {
    match p.kind.as_str() {
        "text" => Ok(p.text.as_ref().map(|t| json!({"type": "text", "text": t}))),
        "image_url" | "image" => {
            let url = match &p.image_url {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v
                    .get("url")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                None => String::new(),
            };
            if let Some(rest) = url.strip_prefix("data:") {
                let (meta, data) = rest.split_once(',').unwrap_or((rest, ""));
                let media = meta.strip_suffix(";base64").unwrap_or(meta);
                Ok(Some(
                    json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}),
                ))
            } else {
                Ok(Some(
                    json!({"type": "image", "source": {"type": "url", "url": url}}),
                ))
            }
        }
        "video_url" | "video" => Err(bad(
            format!("provider {provider} (anthropic dialect) does not accept video input"),
            param,
        )),
        other => Err(bad(
            format!("content part type {other:?} is not supported by provider {provider}"),
            param,
        )),
    }
}

fn push(out: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last["role"] == role {
            if let Some(arr) = last["content"].as_array_mut() {
                arr.extend(blocks);
                return;
            }
        }
    }
    out.push(json!({"role": role, "content": blocks}));
}

/// Writes the internal request as an Anthropic Messages body.
pub fn write_request(
    req: &ChatRequest,
    upstream_model: &str,
    stream: bool,
    default_max_tokens: u32,
    provider: &str,
) -> Result<Value, GatewayError> {
    write_request_for(
        req,
        upstream_model,
        stream,
        default_max_tokens,
        provider,
        false,
    )
}

/// As [`write_request`]; `unsigned_thinking` replays reasoning without a signature as a thinking
/// block with an empty signature — for Kimi's Anthropic-compatible route, which validates that
/// tool-call turns carry thinking but not signatures (real Anthropic would reject it).
pub fn write_request_for(
    req: &ChatRequest,
    upstream_model: &str,
    stream: bool,
    default_max_tokens: u32,
    provider: &str,
    unsigned_thinking: bool,
) -> Result<Value, GatewayError> {
    let mut system: Vec<String> = Vec::new();
    let mut msgs: Vec<Value> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        match m.role {
            Role::System | Role::Developer => {
                if let Some(c) = &m.content {
                    system.push(c.text());
                }
            }
            Role::User => {
                let blocks = match &m.content {
                    None => Vec::new(),
                    Some(Content::Text(t)) => vec![json!({"type": "text", "text": t})],
                    Some(Content::Parts(ps)) => {
                        let mut b = Vec::new();
                        for (j, p) in ps.iter().enumerate() {
                            if let Some(v) = block_of(p, provider, format!("{param}.content[{j}]"))?
                            {
                                b.push(v);
                            }
                        }
                        b
                    }
                };
                push(&mut msgs, "user", blocks);
            }
            Role::Tool | Role::Function => {
                let id = sanitize_tool_id(m.tool_call_id.as_deref().unwrap_or(""));
                let text = m.content.as_ref().map(Content::text).unwrap_or_default();
                push(
                    &mut msgs,
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": text})],
                );
            }
            Role::Assistant => {
                let mut blocks = Vec::new();
                match (&m.reasoning_content, &m.reasoning_signature) {
                    (Some(r), Some(sig)) => {
                        blocks.push(json!({"type": "thinking", "thinking": r, "signature": sig}))
                    }
                    (Some(r), None) if unsigned_thinking => {
                        blocks.push(json!({"type": "thinking", "thinking": r, "signature": ""}))
                    }
                    _ => {}
                }
                if let Some(t) = m
                    .content
                    .as_ref()
                    .map(Content::text)
                    .filter(|t| !t.is_empty())
                {
                    blocks.push(json!({"type": "text", "text": t}));
                }
                for c in m.tool_calls.iter().flatten() {
                    blocks.push(json!({"type": "tool_use", "id": sanitize_tool_id(&c.id), "name": c.function.name,
                        "input": super::outbound::arguments_object(&c.function.arguments)}));
                }
                push(&mut msgs, "assistant", blocks);
            }
            Role::Unknown => {}
        }
    }
    if msgs.first().is_some_and(|m| m["role"] != "user") {
        msgs.insert(
            0,
            json!({"role": "user", "content": [{"type": "text", "text": "..."}]}),
        );
    }
    let max_tokens = req.max_output_tokens.unwrap_or(default_max_tokens);
    let mut body = Map::new();
    body.insert("model".into(), json!(upstream_model));
    body.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert("messages".into(), Value::Array(msgs));
    if stream {
        body.insert("stream".into(), json!(true));
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        body.insert("top_p".into(), json!(p));
    }
    if let Some(k) = req.extra.get("top_k") {
        body.insert("top_k".into(), k.clone());
    }
    if !req.stop.is_empty() {
        body.insert("stop_sequences".into(), json!(req.stop));
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .filter_map(|t| t.function.as_ref())
            .map(|f| {
                let mut o = json!({"name": f.name, "input_schema": f.parameters.clone().unwrap_or_else(|| json!({"type": "object"}))});
                if let Some(d) = &f.description {
                    o["description"] = json!(d);
                }
                o
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
        let mut tc = match &req.tool_choice {
            Some(Value::String(s)) if s == "required" => json!({"type": "any"}),
            Some(Value::String(s)) if s == "none" => json!({"type": "none"}),
            Some(Value::Object(o)) => match o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) => json!({"type": "tool", "name": name}),
                None => json!({"type": "auto"}),
            },
            _ => json!({"type": "auto"}),
        };
        if req.parallel_tool_calls == Some(false) {
            tc["disable_parallel_tool_use"] = json!(true);
        }
        body.insert("tool_choice".into(), tc);
    }
    if let Some(u) = &req.user {
        body.insert("metadata".into(), json!({"user_id": u}));
    }
    let r = &req.reasoning;
    let on = r.enabled.unwrap_or(false)
        || r.budget_tokens.is_some()
        || r.effort.is_some_and(|e| e != Effort::None);
    if on && r.enabled != Some(false) {
        let budget = r
            .budget_tokens
            .or_else(|| r.effort.and_then(effort_budget))
            .unwrap_or(2048)
            .min(max_tokens.saturating_sub(1));
        if budget >= 1024 {
            let mut t = json!({"type": "enabled", "budget_tokens": budget});
            if r.exclude {
                t["display"] = json!("omitted");
            }
            body.insert("thinking".into(), t);
        }
    }
    Ok(Value::Object(body))
}

fn usage_of(u: &Value, base: Option<&Usage>) -> Usage {
    let g = |k: &str| u.get(k).and_then(Value::as_u64);
    let input = g("input_tokens")
        .or(base.map(|b| {
            b.prompt_tokens
                .saturating_sub(b.cached_tokens + b.cache_write_tokens.unwrap_or(0))
        }))
        .unwrap_or(0);
    let read = g("cache_read_input_tokens")
        .or(base.map(|b| b.cached_tokens))
        .unwrap_or(0);
    let write = g("cache_creation_input_tokens").or(base.and_then(|b| b.cache_write_tokens));
    Usage {
        prompt_tokens: input + read + write.unwrap_or(0),
        completion_tokens: g("output_tokens").unwrap_or(0),
        cached_tokens: read,
        cache_write_tokens: write.filter(|w| *w > 0),
        reasoning_tokens: 0,
    }
}

/// Parses a non-streamed Anthropic answer.
pub fn parse_response(body: &[u8]) -> Result<ChatResponse, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the upstream answer is not an Anthropic message: {e}"))?;
    if v.get("type").and_then(Value::as_str) == Some("error") {
        return Err(format!(
            "the upstream reported an error: {}",
            v["error"]["message"].as_str().unwrap_or("unknown")
        ));
    }
    let mut text = String::new();
    let mut reasoning: Option<String> = None;
    let mut signature = None;
    let mut calls = Vec::new();
    for b in v
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
            Some("thinking") => {
                reasoning
                    .get_or_insert_with(String::new)
                    .push_str(b["thinking"].as_str().unwrap_or(""));
                signature = b["signature"].as_str().map(str::to_string);
            }
            Some("tool_use") => calls.push(ToolCall {
                id: b["id"].as_str().unwrap_or("").to_string(),
                kind: "function".into(),
                function: FunctionCall {
                    name: b["name"].as_str().unwrap_or("").to_string(),
                    arguments: b
                        .get("input")
                        .map(Value::to_string)
                        .unwrap_or_else(|| "{}".into()),
                },
            }),
            _ => {}
        }
    }
    let mut message = Message::new(
        Role::Assistant,
        (!text.is_empty()).then_some(Content::Text(text)),
    );
    message.reasoning_content = reasoning;
    message.reasoning_signature = signature;
    if !calls.is_empty() {
        message.tool_calls = Some(calls);
    }
    Ok(ChatResponse {
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: v
                .get("stop_reason")
                .and_then(Value::as_str)
                .map(finish_reason),
            logprobs: None,
        }],
        usage: v.get("usage").map(|u| usage_of(u, None)),
        system_fingerprint: None,
        upstream_id: v.get("id").and_then(Value::as_str).map(str::to_string),
    })
}

/// Per-stream state turning Anthropic SSE events into internal chunks. Tool-call indexes count
/// tool calls only (not content blocks).
#[derive(Default)]
pub struct StreamDecoder {
    tools: HashMap<u64, u32>,
    next_tool: u32,
    input: Option<Usage>,
    pub done: bool,
    pub saw_finish: bool,
}

impl StreamDecoder {
    /// One event's `data` → at most one chunk; `Err` is a mid-stream upstream failure.
    pub fn event(&mut self, data: &str) -> Result<Option<ChatChunk>, String> {
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let mut c = ChunkChoice::default();
        let mut usage = None;
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                self.input = v["message"].get("usage").map(|u| usage_of(u, None));
                c.role = true;
                c.content = Some(String::new());
            }
            "content_block_start" => {
                let b = &v["content_block"];
                if b["type"] == "tool_use" {
                    let idx = self.next_tool;
                    self.next_tool += 1;
                    self.tools.insert(v["index"].as_u64().unwrap_or(0), idx);
                    c.tool_calls.push(ToolCallDelta {
                        index: idx,
                        id: b["id"].as_str().map(str::to_string),
                        kind: Some("function".into()),
                        function: Some(FunctionDelta {
                            name: b["name"].as_str().map(str::to_string),
                            arguments: Some(String::new()),
                        }),
                    });
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str().unwrap_or("") {
                    "text_delta" => c.content = d["text"].as_str().map(str::to_string),
                    "thinking_delta" => c.reasoning = d["thinking"].as_str().map(str::to_string),
                    "signature_delta" => {
                        c.reasoning_signature = d["signature"].as_str().map(str::to_string)
                    }
                    "input_json_delta" => {
                        let Some(&idx) = self.tools.get(&v["index"].as_u64().unwrap_or(0)) else {
                            return Ok(None);
                        };
                        c.tool_calls.push(ToolCallDelta {
                            index: idx,
                            id: None,
                            kind: None,
                            function: Some(FunctionDelta {
                                name: None,
                                arguments: d["partial_json"].as_str().map(str::to_string),
                            }),
                        });
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                c.finish_reason = v["delta"]["stop_reason"].as_str().map(finish_reason);
                self.saw_finish = true;
                usage = Some(usage_of(&v["usage"], self.input.as_ref()));
            }
            "message_stop" => {
                self.done = true;
                self.saw_finish = true;
            }
            "error" => {
                return Err(format!(
                    "the upstream failed mid-stream: {}",
                    v["error"]["message"].as_str().unwrap_or("unknown error")
                ));
            }
            _ => {}
        }
        if c.is_empty() && usage.is_none() {
            return Ok(None);
        }
        Ok(Some(ChatChunk {
            choices: if c.is_empty() { Vec::new() } else { vec![c] },
            usage,
            system_fingerprint: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitised_ids_match_the_pattern_and_differ() {
        let a = sanitize_tool_id("functions.get_weather:0");
        let b = sanitize_tool_id("functions_get_weather_0");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{a}"
        );
        assert_ne!(a, b);
        assert_eq!(b, "functions_get_weather_0");
        assert_eq!(a, sanitize_tool_id("functions.get_weather:0"));
    }

    #[test]
    fn stream_tool_index_counts_tools_only() {
        let mut d = StreamDecoder::default();
        let evs = [
            r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":4,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":7}}"#,
        ];
        let chunks: Vec<ChatChunk> = evs.iter().filter_map(|e| d.event(e).expect("ok")).collect();
        assert_eq!(chunks[2].choices[0].tool_calls[0].index, 0);
        let last = chunks.last().expect("chunk");
        assert_eq!(last.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        let u = last.usage.expect("usage");
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (14, 4, 7)
        );
    }
}
