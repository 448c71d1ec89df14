//! Parses an Anthropic Messages request (`POST /v1/messages`) into the internal [`ChatRequest`].
//!
//! `system` becomes a system message, `tool_result` blocks become tool messages (before the rest of
//! their user turn), `thinking` blocks become `reasoning_content` (signature kept for Anthropic
//! upstreams), `tool_use` becomes `tool_calls`, and a trailing assistant turn becomes a prefill
//! (`partial: true`, Moonshot's spelling, which the other dialects translate).

use serde_json::{json, Map, Value};

use crate::error::GatewayError;
use crate::gateway::model::{
    ChatRequest, Content, ContentPart, FunctionCall, FunctionDef, Message, Role, Tool, ToolCall,
};
use crate::openai::chat::{parse_reasoning, take};

fn invalid(msg: impl Into<String>, param: &str) -> GatewayError {
    GatewayError::invalid(msg, Some(param.to_string()))
}

/// Parses and normalises an Anthropic Messages request body.
pub fn parse_messages_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let mut obj = crate::openai::chat::parse_object(body)?;
    let model: String =
        take(&mut obj, "model")?.ok_or_else(|| invalid("model: Field required", "model"))?;
    let raw_messages: Vec<Value> = take(&mut obj, "messages")?
        .ok_or_else(|| invalid("messages: Field required", "messages"))?;
    let max_tokens: Option<i64> = take(&mut obj, "max_tokens")?;
    let max_output_tokens = match max_tokens {
        Some(v) if v >= 1 => {
            Some(u32::try_from(v).map_err(|_| invalid("max_tokens is too large", "max_tokens"))?)
        }
        Some(v) => {
            return Err(invalid(
                format!("max_tokens: {v} is less than the minimum of 1"),
                "max_tokens",
            ))
        }
        None => None,
    };

    let mut messages = Vec::with_capacity(raw_messages.len() + 1);
    match take::<Value>(&mut obj, "system")? {
        None => {}
        Some(Value::String(s)) => messages.push(Message::new(Role::System, Some(Content::Text(s)))),
        Some(Value::Array(blocks)) => {
            let text = blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n");
            messages.push(Message::new(Role::System, Some(Content::Text(text))));
        }
        Some(_) => {
            return Err(invalid(
                "system must be a string or an array of text blocks",
                "system",
            ))
        }
    }
    let n = raw_messages.len();
    for (i, m) in raw_messages.into_iter().enumerate() {
        convert_message(i, m, i + 1 == n, &mut messages)?;
    }

    let tools: Vec<Value> = take(&mut obj, "tools")?.unwrap_or_default();
    let tools = tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| parse_tool(i, t))
        .collect::<Result<Vec<_>, _>>()?;
    let (tool_choice, parallel_tool_calls) = match take::<Value>(&mut obj, "tool_choice")? {
        None => (None, None),
        Some(tc) => convert_tool_choice(&tc)?,
    };

    // Thinking: Anthropic's `thinking` object reduces through the shared reducer.
    let mut thinking = Map::new();
    let mut exclude = false;
    if let Some(t) = obj.remove("thinking") {
        if let Some(d) = t.get("display").and_then(Value::as_str) {
            exclude = d == "omitted";
        }
        thinking.insert("thinking".into(), t);
    }
    // Other spellings a client may add (e.g. through an SDK's extra body) reduce alike, so a
    // contradiction with `thinking` is a 400 naming both.
    for k in [
        "reasoning",
        "reasoning_effort",
        "enable_thinking",
        "thinking_budget",
        "include_reasoning",
    ] {
        if let Some(v) = obj.remove(k) {
            thinking.insert(k.into(), v);
        }
    }
    let mut reasoning = parse_reasoning(&mut thinking)?;
    reasoning.exclude |= exclude;

    let stream: bool = take(&mut obj, "stream")?.unwrap_or(false);
    let stop: Vec<String> = take(&mut obj, "stop_sequences")?.unwrap_or_default();
    let metadata: Option<Map<String, Value>> = take(&mut obj, "metadata")?;
    let user = metadata
        .as_ref()
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut extra = Map::new();
    if let Some(k) = obj.remove("top_k").filter(|v| !v.is_null()) {
        extra.insert("top_k".into(), k);
    }
    // OpenRouter-shaped routing preferences work on every inbound API (the router takes them).
    if let Some(p) = obj.remove("provider") {
        extra.insert("provider".into(), p);
    }
    Ok(ChatRequest {
        model,
        messages,
        stream,
        include_usage: true,
        max_output_tokens,
        max_output_param: "max_tokens",
        temperature: take(&mut obj, "temperature")?,
        top_p: take(&mut obj, "top_p")?,
        stop,
        tools,
        tool_choice,
        parallel_tool_calls,
        reasoning,
        user,
        extra,
        ..Default::default()
    })
}

fn parse_tool(i: usize, t: Value) -> Result<Tool, GatewayError> {
    let param = format!("tools.{i}");
    let Value::Object(mut o) = t else {
        return Err(invalid(format!("{param}: must be an object"), &param));
    };
    if let Some(kind) = o.get("type").and_then(Value::as_str) {
        if kind != "custom" {
            return Err(invalid(
                format!("{param}.type: server tool {kind:?} is not supported by this gateway; declare a custom tool with name and input_schema"),
                &format!("{param}.type"),
            ));
        }
    }
    let name = match o.remove("name") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => {
            return Err(invalid(
                format!("{param}.name: Field required"),
                &format!("{param}.name"),
            ))
        }
    };
    let parameters = match o.remove("input_schema") {
        Some(v @ Value::Object(_)) => v,
        _ => {
            return Err(invalid(
                format!("{param}.input_schema: must be a JSON Schema object"),
                &format!("{param}.input_schema"),
            ))
        }
    };
    Ok(Tool {
        kind: "function".into(),
        function: Some(FunctionDef {
            name,
            description: o
                .remove("description")
                .and_then(|d| d.as_str().map(str::to_string)),
            parameters: Some(parameters),
            strict: None,
        }),
        extra: Map::new(),
    })
}

/// Anthropic `tool_choice` → OpenAI `tool_choice` and `parallel_tool_calls`.
fn convert_tool_choice(tc: &Value) -> Result<(Option<Value>, Option<bool>), GatewayError> {
    let parallel = tc
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|d| !d);
    let choice = match tc.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match tc.get("name").and_then(Value::as_str) {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => {
                return Err(invalid(
                    "tool_choice.name: Field required",
                    "tool_choice.name",
                ))
            }
        },
        _ => {
            return Err(invalid(
                "tool_choice.type must be one of auto, any, tool, none",
                "tool_choice.type",
            ))
        }
    };
    Ok((Some(choice), parallel))
}

/// One image block → an OpenAI `image_url` part (data URI for base64 sources).
fn image_part(b: &Value, param: &str) -> Result<ContentPart, GatewayError> {
    let src = b
        .get("source")
        .ok_or_else(|| invalid(format!("{param}.source: Field required"), param))?;
    let url = match src.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media = src
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png");
            let data = src.get("data").and_then(Value::as_str).unwrap_or("");
            format!("data:{media};base64,{data}")
        }
        Some("url") => src
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        other => {
            return Err(invalid(
                format!("{param}.source.type {other:?} is not supported (use base64 or url)"),
                param,
            ))
        }
    };
    Ok(ContentPart {
        kind: "image_url".into(),
        text: None,
        image_url: Some(json!({"url": url})),
        video_url: None,
        extra: Map::new(),
    })
}

fn text_part(t: &str) -> ContentPart {
    ContentPart {
        kind: "text".into(),
        text: Some(t.to_string()),
        image_url: None,
        video_url: None,
        extra: Map::new(),
    }
}

/// Parts → content: a plain string when every part is text.
fn content_of(parts: Vec<ContentPart>) -> Option<Content> {
    if parts.is_empty() {
        return None;
    }
    if parts.iter().all(|p| p.kind == "text") {
        return Some(Content::Text(
            parts
                .into_iter()
                .filter_map(|p| p.text)
                .collect::<Vec<_>>()
                .join(""),
        ));
    }
    Some(Content::Parts(parts))
}

fn convert_message(
    i: usize,
    m: Value,
    last: bool,
    out: &mut Vec<Message>,
) -> Result<(), GatewayError> {
    let param = format!("messages.{i}");
    let role = match m.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        _ => {
            return Err(invalid(
                format!("{param}.role: must be \"user\" or \"assistant\""),
                &format!("{param}.role"),
            ))
        }
    };
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            let mut msg = Message::new(role, Some(Content::Text(s.clone())));
            if role == Role::Assistant && last {
                msg.extra.insert("partial".into(), json!(true));
            }
            out.push(msg);
            return Ok(());
        }
        Some(Value::Array(b)) => b.clone(),
        _ => {
            return Err(invalid(
                format!("{param}.content: must be a string or an array of blocks"),
                &format!("{param}.content"),
            ))
        }
    };
    let mut parts: Vec<ContentPart> = Vec::new();
    let mut reasoning: Option<String> = None;
    let mut signature: Option<String> = None;
    let mut calls: Vec<ToolCall> = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let bp = format!("{param}.content.{j}");
        match b.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(text_part(
                b.get("text").and_then(Value::as_str).unwrap_or(""),
            )),
            Some("image") => parts.push(image_part(b, &bp)?),
            Some("thinking") if role == Role::Assistant => {
                let t = b.get("thinking").and_then(Value::as_str).unwrap_or("");
                reasoning.get_or_insert_with(String::new).push_str(t);
                if let Some(s) = b
                    .get("signature")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                {
                    signature = Some(s.to_string());
                }
            }
            // Redacted thinking can only be replayed to Anthropic itself; it carries no text.
            Some("redacted_thinking") if role == Role::Assistant => {}
            Some("tool_use") if role == Role::Assistant => {
                let id = b
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let name = b
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if id.is_empty() || name.is_empty() {
                    return Err(invalid(format!("{bp}: tool_use needs id and name"), &bp));
                }
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(ToolCall {
                    id,
                    kind: "function".into(),
                    function: FunctionCall {
                        name,
                        arguments: input.to_string(),
                    },
                });
            }
            Some("tool_result") if role == Role::User => {
                let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                if id.is_empty() {
                    return Err(invalid(format!("{bp}.tool_use_id: Field required"), &bp));
                }
                let content = match b.get("content") {
                    None | Some(Value::Null) => Content::Text(String::new()),
                    Some(Value::String(s)) => Content::Text(s.clone()),
                    Some(Value::Array(inner)) => {
                        let mut ps = Vec::new();
                        for (k, ib) in inner.iter().enumerate() {
                            match ib.get("type").and_then(Value::as_str) {
                                Some("text") => ps.push(text_part(
                                    ib.get("text").and_then(Value::as_str).unwrap_or(""),
                                )),
                                Some("image") => {
                                    ps.push(image_part(ib, &format!("{bp}.content.{k}"))?)
                                }
                                _ => {}
                            }
                        }
                        content_of(ps).unwrap_or(Content::Text(String::new()))
                    }
                    Some(_) => {
                        return Err(invalid(
                            format!("{bp}.content: must be a string or blocks"),
                            &bp,
                        ))
                    }
                };
                let content = if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                    Content::Text(format!("Error: {}", content.text()))
                } else {
                    content
                };
                let mut tm = Message::new(Role::Tool, Some(content));
                tm.tool_call_id = Some(id.to_string());
                out.push(tm);
            }
            Some("document") => {
                return Err(invalid(
                    format!("{bp}: document blocks are not supported by this gateway"),
                    &bp,
                ))
            }
            other => {
                return Err(invalid(
                    format!(
                        "{bp}.type: {other:?} is not a valid block for a {} message",
                        if role == Role::User {
                            "user"
                        } else {
                            "assistant"
                        }
                    ),
                    &bp,
                ))
            }
        }
    }
    if role == Role::User {
        if let Some(c) = content_of(parts) {
            out.push(Message::new(Role::User, Some(c)));
        }
        return Ok(());
    }
    let mut msg = Message::new(Role::Assistant, content_of(parts));
    msg.reasoning_content = reasoning;
    msg.reasoning_signature = signature;
    if !calls.is_empty() {
        msg.tool_calls = Some(calls);
    }
    if last && msg.tool_calls.is_none() {
        msg.extra.insert("partial".into(), json!(true));
    }
    out.push(msg);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ChatRequest, GatewayError> {
        parse_messages_request(&serde_json::to_vec(&v).expect("json"))
    }

    #[test]
    fn blocks_map_to_the_internal_model() {
        let r = parse(json!({
            "model": "kimi-k2.6", "max_tokens": 1024, "system": [{"type": "text", "text": "be brief"}],
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "call it", "signature": "sig"},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "thanks"}]}
            ]
        }))
        .expect("parses");
        assert_eq!(r.messages.len(), 5);
        assert_eq!(r.messages[0].role, Role::System);
        let a = &r.messages[2];
        assert_eq!(a.reasoning_content.as_deref(), Some("call it"));
        assert_eq!(a.reasoning_signature.as_deref(), Some("sig"));
        assert_eq!(
            a.tool_calls
                .as_ref()
                .map(|t| t[0].function.arguments.as_str()),
            Some("{\"city\":\"Paris\"}")
        );
        assert_eq!(r.messages[3].role, Role::Tool);
        assert_eq!(r.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(r.messages[4].role, Role::User);
        assert_eq!(r.tool_choice, Some(json!("required")));
        assert_eq!(r.parallel_tool_calls, Some(false));
        assert_eq!(
            (r.reasoning.enabled, r.reasoning.budget_tokens),
            (Some(true), Some(2048))
        );
    }

    #[test]
    fn provider_preferences_ride_along() {
        let r = parse(
            json!({"model": "m", "max_tokens": 10, "provider": {"order": ["a"]},
            "messages": [{"role": "user", "content": "x"}]}),
        )
        .expect("parses");
        assert_eq!(r.extra.get("provider"), Some(&json!({"order": ["a"]})));
    }

    #[test]
    fn trailing_assistant_is_a_prefill() {
        let r = parse(json!({"model": "m", "max_tokens": 10, "messages": [
            {"role": "user", "content": "json please"}, {"role": "assistant", "content": "{"}]}))
        .expect("parses");
        assert_eq!(r.messages[1].extra.get("partial"), Some(&json!(true)));
    }

    #[test]
    fn display_omitted_hides_reasoning() {
        let r = parse(
            json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}}),
        )
        .expect("parses");
        assert!(r.reasoning.exclude && r.reasoning.enabled == Some(true));
    }
}
