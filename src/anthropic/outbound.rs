//! The internal answer in Anthropic's shape for `/v1/messages` clients: the `message` object, the
//! SSE event sequence (`message_start`, `content_block_*`, `message_delta`, `message_stop`, `ping`)
//! and the `{"type":"error","error":{type,message}}` error body.

use serde_json::{json, Value};

use super::stop_reason;
use crate::gateway::model::{ChatChunk, ChatResponse, Usage};

/// Anthropic usage: `input_tokens` excludes cache reads and writes.
pub fn usage_json(u: &Usage) -> Value {
    let write = u.cache_write_tokens.unwrap_or(0);
    json!({
        "input_tokens": u.prompt_tokens.saturating_sub(u.cached_tokens).saturating_sub(write),
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    })
}

/// Parses tool arguments into an object; invalid JSON is kept as `{"_raw": "<text>"}`.
pub fn arguments_object(args: &str) -> Value {
    if args.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(args) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"_raw": args}),
    }
}

/// A complete answer as an Anthropic `message` object.
pub fn message_json(id: &str, model: &str, resp: &ChatResponse, show_reasoning: bool) -> Value {
    let mut content = Vec::new();
    let mut finish = None;
    if let Some(c) = resp.choices.first() {
        let m = &c.message;
        if show_reasoning {
            if let Some(r) = m.reasoning_content.as_deref().filter(|r| !r.is_empty()) {
                content.push(json!({"type": "thinking", "thinking": r,
                    "signature": m.reasoning_signature.as_deref().unwrap_or("")}));
            }
        }
        if let Some(t) = m
            .content
            .as_ref()
            .map(|c| c.text())
            .filter(|t| !t.is_empty())
        {
            content.push(json!({"type": "text", "text": t}));
        }
        for call in m.tool_calls.iter().flatten() {
            content.push(
                json!({"type": "tool_use", "id": call.id, "name": call.function.name,
                "input": arguments_object(&call.function.arguments)}),
            );
        }
        finish = c.finish_reason.as_deref();
    }
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": usage_json(&resp.usage.unwrap_or_default()),
    })
}

/// The Anthropic error `type` for an HTTP status.
pub fn error_type(status: u16, upstream_kind: Option<&str>) -> &'static str {
    if upstream_kind == Some("engine_overloaded_error") || status == 529 {
        return "overloaded_error";
    }
    match status {
        400 | 409 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 504 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type","message"},"request_id"}`.
pub fn error_json(kind: &str, message: &str, request_id: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id})
}

/// One SSE event: name and JSON data.
pub type Event = (&'static str, Value);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    Tool(u32),
}

/// Turns internal chunks into Anthropic SSE events. Content-block indexes count every block; a
/// block is closed before the next kind opens (thinking → text → tool_use, in arrival order).
pub struct StreamEncoder {
    id: String,
    model: String,
    show_reasoning: bool,
    open: Option<(Block, u32)>,
    next_index: u32,
    finish: Option<String>,
    pending_signature: Option<String>,
}

impl StreamEncoder {
    pub fn new(id: &str, model: &str, show_reasoning: bool) -> StreamEncoder {
        StreamEncoder {
            id: id.to_string(),
            model: model.to_string(),
            show_reasoning,
            open: None,
            next_index: 0,
            finish: None,
            pending_signature: None,
        }
    }

    /// `message_start` and a first `ping`.
    pub fn start(&self) -> Vec<Event> {
        vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ),
            ("ping", json!({"type": "ping"})),
        ]
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((kind, index)) = self.open.take() {
            if kind == Block::Thinking {
                if let Some(sig) = self.pending_signature.take() {
                    out.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "signature_delta", "signature": sig}}),
                    ));
                }
            }
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn ensure(&mut self, kind: Block, start: Value, out: &mut Vec<Event>) -> u32 {
        if let Some((k, i)) = self.open {
            if k == kind {
                return i;
            }
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((kind, index));
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        index
    }

    /// The events for one chunk (first choice only; Anthropic has no `n`).
    pub fn chunk(&mut self, chunk: &ChatChunk) -> Vec<Event> {
        let mut out = Vec::new();
        let Some(c) = chunk.choices.iter().find(|c| c.index == 0) else {
            return out;
        };
        if self.show_reasoning {
            if let Some(r) = &c.reasoning {
                let i = self.ensure(
                    Block::Thinking,
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    &mut out,
                );
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": "thinking_delta", "thinking": r}}),
                ));
            }
            if let Some(sig) = &c.reasoning_signature {
                if matches!(self.open, Some((Block::Thinking, _))) {
                    self.pending_signature = Some(sig.clone());
                }
            }
        }
        if let Some(t) = c.content.as_deref().filter(|t| !t.is_empty()) {
            let i = self.ensure(Block::Text, json!({"type": "text", "text": ""}), &mut out);
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i,
                "delta": {"type": "text_delta", "text": t}}),
            ));
        }
        for tc in &c.tool_calls {
            let f = tc.function.as_ref();
            let is_open = matches!(self.open, Some((Block::Tool(k), _)) if k == tc.index);
            if !is_open {
                if let Some(id) = &tc.id {
                    let name = f.and_then(|f| f.name.as_deref()).unwrap_or("");
                    self.close(&mut out);
                    self.ensure(
                        Block::Tool(tc.index),
                        json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                        &mut out,
                    );
                } else {
                    tracing::warn!(
                        index = tc.index,
                        "tool-call fragment for a closed block dropped"
                    );
                    continue;
                }
            }
            if let Some(args) = f
                .and_then(|f| f.arguments.as_deref())
                .filter(|a| !a.is_empty())
            {
                if let Some((_, i)) = self.open {
                    out.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": args}}),
                    ));
                }
            }
        }
        if let Some(f) = &c.finish_reason {
            self.finish = Some(f.clone());
        }
        out
    }

    /// Closes the open block, then `message_delta` (stop reason, usage) and `message_stop`.
    pub fn finish(&mut self, usage: Option<Usage>) -> Vec<Event> {
        let mut out = Vec::new();
        self.close(&mut out);
        out.push((
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason(self.finish.as_deref()), "stop_sequence": null},
            "usage": usage_json(&usage.unwrap_or_default())}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_tokens_exclude_cache() {
        let u = Usage {
            prompt_tokens: 100,
            completion_tokens: 5,
            cached_tokens: 64,
            cache_write_tokens: None,
            reasoning_tokens: 0,
        };
        let v = usage_json(&u);
        assert_eq!(
            (
                v["input_tokens"].as_u64(),
                v["cache_read_input_tokens"].as_u64()
            ),
            (Some(36), Some(64))
        );
    }

    #[test]
    fn invalid_arguments_are_kept_raw() {
        assert_eq!(arguments_object("{\"a\""), json!({"_raw": "{\"a\""}));
        assert_eq!(arguments_object(""), json!({}));
    }
}
