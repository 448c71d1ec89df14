//! Moonshot (Kimi) dialect quirks: `thinking` spelling, `max_completion_tokens`, usage placement.
//!
//! Moonshot puts streamed usage in `choices[0].usage` and may report `cached_tokens` at the top of
//! `usage`; both are read by the shared parser in `openai_compat.rs`. This file writes the request.

use serde_json::{json, Map, Value};

use crate::gateway::model::Reasoning;

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
