//! Self-hosted Kimi K2 (vLLM / SGLang) and prefill quirks shared by the OpenAI-like dialects.
//!
//! K2's chat template renders tool-call ids into the prompt and the model was trained on
//! `functions.NAME:IDX` with a conversation-global `IDX`; other ids (`call_…`, `toolu_…`) degrade
//! its tool calling. History ids are rewritten to that form, with tool results rewritten alike.
//! Earlier reasoning goes under both `reasoning_content` and `reasoning` (vLLM's rename).
//! A trailing `partial: true` assistant turn (Moonshot's prefill) becomes vLLM/SGLang's
//! `continue_final_message`, or a plain trailing assistant turn for OpenRouter.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::config::Dialect;
use crate::gateway::model::ChatRequest;

/// Whether the upstream model is a Kimi K2 (its template needs `functions.NAME:IDX` ids).
pub fn is_k2(upstream_model: &str) -> bool {
    let m = upstream_model.to_ascii_lowercase();
    m.contains("kimi-k2") || m.contains("kimi_k2")
}

/// Rewrites every tool-call id in the history to `functions.NAME:IDX` (IDX counts tool calls
/// across the conversation) and every tool result's `tool_call_id` to match.
pub fn rewrite_tool_ids(messages: &mut [Value]) {
    let mut map: HashMap<String, String> = HashMap::new();
    let mut idx = 0usize;
    for m in messages.iter_mut() {
        if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
            for c in calls {
                let name = c
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let new_id = format!("functions.{name}:{idx}");
                idx += 1;
                if let Some(old) = c.get("id").and_then(Value::as_str) {
                    map.insert(old.to_string(), new_id.clone());
                }
                c["id"] = json!(new_id);
            }
        }
    }
    for m in messages.iter_mut() {
        if m.get("role").and_then(Value::as_str) == Some("tool") {
            if let Some(new_id) = m
                .get("tool_call_id")
                .and_then(Value::as_str)
                .and_then(|old| map.get(old))
            {
                m["tool_call_id"] = json!(new_id);
            }
        }
    }
}

/// Patches a body for a self-hosted K2: history ids rewritten, and `keep: all` (preserved
/// thinking) spelled as K2.6's template kwarg `preserve_thinking`.
pub fn patch_body(body: &mut Map<String, Value>, req: &ChatRequest) {
    if let Some(Value::Array(messages)) = body.get_mut("messages") {
        rewrite_tool_ids(messages);
        // vLLM renamed the field to `reasoning` (and dropped `reasoning_content` in 2026); K2
        // templates and SGLang read `reasoning_content`. Earlier reasoning is sent under both.
        for m in messages.iter_mut() {
            if let Value::Object(o) = m {
                if let Some(r) = o.get("reasoning_content").cloned() {
                    o.entry("reasoning").or_insert(r);
                }
            }
        }
    }
    if req.reasoning.keep_history && req.reasoning.enabled != Some(false) {
        if let Value::Object(k) = body
            .entry("chat_template_kwargs")
            .or_insert_with(|| json!({}))
        {
            k.entry("preserve_thinking").or_insert(json!(true));
        }
    }
}

/// Translates a trailing `partial: true` assistant turn for dialects other than Moonshot.
pub fn apply_prefill(dialect: Dialect, body: &mut Map<String, Value>) {
    let mut prefill = false;
    if let Some(Value::Array(messages)) = body.get_mut("messages") {
        for m in messages.iter_mut() {
            if let Value::Object(o) = m {
                if o.remove("partial").is_some_and(|p| p == json!(true)) {
                    prefill = true;
                }
            }
        }
    }
    if prefill && matches!(dialect, Dialect::Vllm | Dialect::Sglang) {
        body.insert("continue_final_message".into(), json!(true));
        body.insert("add_generation_prompt".into(), json!(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_rewritten_with_a_global_counter() {
        let mut msgs = vec![
            json!({"role": "assistant", "tool_calls": [
                {"id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "toolu_a", "content": "18C"}),
            json!({"role": "tool", "tool_call_id": "call_b", "content": "noon"}),
            json!({"role": "assistant", "tool_calls": [
                {"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "x", "content": "19C"}),
        ];
        rewrite_tool_ids(&mut msgs);
        assert_eq!(msgs[0]["tool_calls"][1]["id"], "functions.get_time:1");
        assert_eq!(msgs[2]["tool_call_id"], "functions.get_time:1");
        assert_eq!(msgs[4]["tool_call_id"], "functions.get_weather:2");
    }
}

#[cfg(test)]
mod prefill_tests {
    use super::*;

    #[test]
    fn partial_becomes_continue_final_message_for_vllm_and_is_dropped_elsewhere() {
        let mut body = Map::new();
        body.insert(
            "messages".into(),
            json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "{", "partial": true}]),
        );
        let mut or = body.clone();
        apply_prefill(Dialect::Vllm, &mut body);
        assert_eq!(body["continue_final_message"], true);
        assert_eq!(body["add_generation_prompt"], false);
        assert!(body["messages"][1].get("partial").is_none());
        apply_prefill(Dialect::Openrouter, &mut or);
        assert!(or.get("continue_final_message").is_none());
        assert_eq!(
            or["messages"][1],
            json!({"role": "assistant", "content": "{"})
        );
    }
}
