//! Anthropic Messages wire format: inbound requests → the internal model, the internal answer →
//! Anthropic messages and SSE events, the Anthropic error shape, and the `anthropic` upstream
//! dialect's request writer and answer reader.

pub mod inbound;
pub mod outbound;
pub mod upstream;

pub use inbound::parse_messages_request;

/// Internal finish reason → Anthropic `stop_reason`.
pub fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic `stop_reason` → internal (OpenAI) finish reason.
pub fn finish_reason(stop: &str) -> String {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
    .to_string()
}
