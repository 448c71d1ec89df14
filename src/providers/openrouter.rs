//! OpenRouter dialect quirks: the normalised `reasoning` request object.
//!
//! OpenRouter's response quirks (SSE comment lines, `reasoning` instead of `reasoning_content`,
//! usage on the finish chunk or on a separate chunk with non-empty choices, mid-stream `error`
//! events) are absorbed by the shared parser in `openai_compat.rs`.

use serde_json::{json, Map, Value};

use crate::gateway::model::{Effort, Reasoning};

/// Writes the internal thinking setting as OpenRouter's `reasoning: {effort|max_tokens, exclude, enabled}`.
pub fn write_reasoning(body: &mut Map<String, Value>, r: &Reasoning) {
    if r.enabled.is_none() && r.effort.is_none() && r.budget_tokens.is_none() && !r.exclude {
        return;
    }
    let mut o = Map::new();
    match (r.enabled, r.effort, r.budget_tokens) {
        (Some(false), _, _) | (_, Some(Effort::None), _) => {
            o.insert("enabled".into(), json!(false));
        }
        (_, Some(e), _) => {
            o.insert("effort".into(), json!(e.as_str()));
        }
        (_, None, Some(b)) => {
            o.insert("max_tokens".into(), json!(b));
        }
        (Some(true), None, None) => {
            o.insert("enabled".into(), json!(true));
        }
        (None, None, None) => {}
    }
    if r.exclude {
        o.insert("exclude".into(), json!(true));
    }
    body.insert("reasoning".into(), Value::Object(o));
}
