//! Moonshot (Kimi) dialect quirks: `thinking: {type, keep}`, reasoning carried back on assistant
//! turns, `tool_choice` limits under thinking, and tool-call ids echoed verbatim.
//!
//! Moonshot puts streamed usage in `choices[0].usage` and may report `cached_tokens` at the top of
//! `usage`; both are read by the shared parser in `openai_compat.rs`. This file writes the request.

use serde_json::{json, Map, Value};

use crate::error::GatewayError;
use crate::gateway::model::{ChatRequest, Reasoning};

/// The steering message that emulates `tool_choice: "required"` (Moonshot accepts only
/// `auto`/`none`; this is the emulation from Moonshot's migration guide, as LiteLLM applies it).
pub const REQUIRED_TOOL_STEER: &str = "Please select a tool to handle the current issue.";

/// Writes the internal thinking setting in Moonshot's spelling: `thinking: {type, keep}`.
pub fn write_thinking(body: &mut Map<String, Value>, r: &Reasoning) {
    let Some(enabled) = r.enabled.or(r.keep_history.then_some(true)) else {
        return;
    };
    let mut t = Map::new();
    t.insert(
        "type".into(),
        json!(if enabled { "enabled" } else { "disabled" }),
    );
    if enabled && r.keep_history {
        t.insert("keep".into(), json!("all"));
    }
    body.insert("thinking".into(), Value::Object(t));
}

/// Whether the upstream model thinks for this request (K2.5+ think by default; moonshot-v1 never).
pub fn thinking_on(req: &ChatRequest, upstream_model: &str) -> bool {
    req.reasoning
        .enabled
        .unwrap_or(!upstream_model.starts_with("moonshot-v1"))
}

/// Refuses what Moonshot cannot do and tollgate cannot emulate: a named `tool_choice` while
/// thinking is on (Moonshot allows only `auto`/`none` then).
pub fn check(req: &ChatRequest, upstream_model: &str) -> Result<(), GatewayError> {
    if let Some(Value::Object(_)) = &req.tool_choice {
        if thinking_on(req, upstream_model) {
            return Err(GatewayError::invalid(
                format!("{upstream_model} with thinking on accepts only tool_choice \"auto\" or \"none\"; a named tool cannot be forced. Use tool_choice \"required\" (emulated), or turn thinking off (thinking: {{\"type\": \"disabled\"}})"),
                Some("tool_choice".to_string()),
            ));
        }
    }
    Ok(())
}

/// `null`, `[]` or a list of text parts that are all empty.
fn empty_parts(c: &Value) -> bool {
    match c {
        Value::Null => true,
        Value::Array(parts) => parts.iter().all(|p| {
            p.get("type").and_then(Value::as_str) == Some("text")
                && p.get("text")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
        }),
        _ => false,
    }
}

/// Patches an OpenAI-shaped body for Moonshot.
pub fn patch_body(body: &mut Map<String, Value>, req: &ChatRequest, upstream_model: &str) {
    let thinking = thinking_on(req, upstream_model);
    let keep_all = req.reasoning.keep_history;
    if let Some(Value::Array(messages)) = body.get_mut("messages") {
        let mut filled = 0usize;
        for m in messages.iter_mut() {
            let Value::Object(o) = m else { continue };
            if o.get("role").and_then(Value::as_str) != Some("assistant") {
                continue;
            }
            let has_calls = o
                .get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty());
            // Tool-call turns whose content is only empty text parts omit `content` (Kimi rejects
            // `[{"type":"text","text":""}]`); a plain string is echoed as the client sent it.
            if has_calls && o.get("content").is_some_and(empty_parts) {
                o.remove("content");
            }
            // Thinking on: every tool-call turn (every turn with keep=all) must carry reasoning.
            // Tollgate restores remembered reasoning before this point; a single space is the
            // documented minimum when none is known.
            if thinking
                && (has_calls || keep_all)
                && o.get("reasoning_content").is_none_or(Value::is_null)
            {
                o.insert("reasoning_content".into(), json!(" "));
                filled += 1;
            }
        }
        if filled > 0 {
            tracing::info!(
                filled,
                "assistant turns without reasoning_content got a placeholder for Moonshot"
            );
        }
        if req.tool_choice.as_ref().and_then(Value::as_str) == Some("required") {
            messages.push(json!({"role": "user", "content": REQUIRED_TOOL_STEER}));
        }
    }
    if body.get("tool_choice").and_then(Value::as_str) == Some("required") {
        body.insert("tool_choice".into(), json!("auto"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(req: &ChatRequest) -> Map<String, Value> {
        let v: Value = serde_json::from_slice(&super::super::openai_compat::write_body(
            crate::config::Dialect::Moonshot,
            req,
            "kimi-k2.6",
            false,
        ))
        .expect("json");
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn tool_turns_get_reasoning_and_required_is_emulated() {
        let req: ChatRequest = crate::openai::parse_chat_request(
            serde_json::to_string(&json!({"model": "kimi-k2.6", "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f", "strict": true, "parameters": {"type": "object"}}}],
                "messages": [{"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "text", "text": ""}], "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]}))
            .expect("json")
            .as_bytes(),
        )
        .expect("parses");
        let b = body_of(&req);
        let msgs = b["messages"].as_array().expect("messages");
        assert_eq!(msgs[1]["reasoning_content"], " ");
        assert!(
            msgs[1].get("content").is_none(),
            "empty text parts are omitted"
        );
        assert_eq!(
            msgs[1]["tool_calls"][0]["id"], "call_1",
            "ids are echoed verbatim"
        );
        assert_eq!(
            msgs.last().map(|m| m["content"].clone()),
            Some(json!(REQUIRED_TOOL_STEER))
        );
        assert_eq!(b["tool_choice"], "auto");
        assert_eq!(
            b["tools"][0]["function"]["strict"], true,
            "tool fields pass unchanged"
        );
        let mut off = req.clone();
        off.reasoning.enabled = Some(false);
        let b = body_of(&off);
        assert!(b["messages"][1].get("reasoning_content").is_none());
    }
}
