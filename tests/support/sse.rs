//! SSE helpers for tests: parse a body into frames, fold chat chunks, normalise volatile fields.
#![allow(dead_code)]

use serde_json::{json, Map, Value};

/// One SSE frame as a client sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A comment line (`: text`), text without the colon and leading space.
    Comment(String),
    /// A `data:` event (multi-line data joined with `\n`), plus the `event:` name if any.
    Data { event: Option<String>, data: String },
}

/// Parses an SSE body (any of `\n`, `\r\n`, `\r` line ends) into frames, in order.
pub fn parse(body: &str) -> Vec<Frame> {
    let normalised = body.replace("\r\n", "\n").replace('\r', "\n");
    let mut frames = vec![];
    let mut data: Vec<String> = vec![];
    let mut event: Option<String> = None;
    for line in normalised.split('\n') {
        if line.is_empty() {
            if !data.is_empty() {
                frames.push(Frame::Data {
                    event: event.take(),
                    data: data.join("\n"),
                });
                data.clear();
            }
            event = None;
            continue;
        }
        if let Some(c) = line.strip_prefix(':') {
            frames.push(Frame::Comment(c.strip_prefix(' ').unwrap_or(c).to_owned()));
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => data.push(value.to_owned()),
            "event" => event = Some(value.to_owned()),
            _ => {}
        }
    }
    if !data.is_empty() {
        frames.push(Frame::Data {
            event,
            data: data.join("\n"),
        });
    }
    frames
}

/// The `data:` payloads of a body, in order (including `[DONE]` as the literal string).
pub fn data_payloads(body: &str) -> Vec<String> {
    parse(body)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Data { data, .. } => Some(data),
            Frame::Comment(_) => None,
        })
        .collect()
}

/// The comment lines of a body.
pub fn comments(body: &str) -> Vec<String> {
    parse(body)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Comment(c) => Some(c),
            Frame::Data { .. } => None,
        })
        .collect()
}

/// Whether the last data payload is `[DONE]`.
pub fn ends_with_done(body: &str) -> bool {
    data_payloads(body).last().map(String::as_str) == Some("[DONE]")
}

/// The JSON chunks of a body (every data payload except `[DONE]`); panics on non-JSON payloads.
pub fn json_chunks(body: &str) -> Vec<Value> {
    data_payloads(body)
        .into_iter()
        .filter(|d| d != "[DONE]")
        .map(|d| {
            serde_json::from_str(&d)
                .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {d:?}\nbody:\n{body}"))
        })
        .collect()
}

/// Replaces fields that legitimately differ between two runs (`id`, `created`, `system_fingerprint`)
/// with fixed placeholders, recursively for chunk objects.
pub fn normalise_chunk(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in ["id", "created", "system_fingerprint"] {
            if o.contains_key(k) {
                o.insert(k.to_owned(), json!("<normalised>"));
            }
        }
    }
    v
}

/// A whole streamed answer folded the way an OpenAI SDK folds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Folded {
    pub role: Option<String>,
    pub reasoning_content: String,
    pub content: String,
    /// Tool calls by index: (index, id, type, name, arguments).
    pub tool_calls: Vec<FoldedToolCall>,
    pub finish_reason: Option<String>,
    /// Every `usage` object that was not null, with where it was found.
    pub usages: Vec<(UsagePlace, Value)>,
    pub models: Vec<String>,
    pub ids: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FoldedToolCall {
    pub index: u64,
    pub id: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
    /// How many deltas carried an `id` for this index.
    pub id_deltas: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsagePlace {
    /// Top-level `usage` on a chunk whose `choices` is empty (the OpenAI include_usage chunk).
    FinalEmptyChoices,
    /// Top-level `usage` on a chunk that still has choices.
    ChunkWithChoices,
    /// `choices[i].usage` (a Moonshot quirk that must not leak).
    InsideChoice,
}

/// Folds chunks into one message; tool calls keyed by `index` as the SDKs do.
pub fn fold(chunks: &[Value]) -> Folded {
    let mut f = Folded::default();
    for c in chunks {
        if let Some(m) = c.get("model").and_then(Value::as_str) {
            f.models.push(m.to_owned());
        }
        if let Some(id) = c.get("id").and_then(Value::as_str) {
            f.ids.push(id.to_owned());
        }
        let choices = c
            .get("choices")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            let place = if choices.is_empty() {
                UsagePlace::FinalEmptyChoices
            } else {
                UsagePlace::ChunkWithChoices
            };
            f.usages.push((place, u.clone()));
        }
        for ch in &choices {
            if let Some(u) = ch.get("usage").filter(|u| !u.is_null()) {
                f.usages.push((UsagePlace::InsideChoice, u.clone()));
            }
            if let Some(fr) = ch.get("finish_reason").and_then(Value::as_str) {
                f.finish_reason = Some(fr.to_owned());
            }
            let Some(d) = ch.get("delta") else { continue };
            if let Some(r) = d.get("role").and_then(Value::as_str) {
                f.role = Some(r.to_owned());
            }
            if let Some(r) = d.get("reasoning_content").and_then(Value::as_str) {
                f.reasoning_content.push_str(r);
            }
            if let Some(t) = d.get("content").and_then(Value::as_str) {
                f.content.push_str(t);
            }
            for tc in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                let index = tc.get("index").and_then(Value::as_u64).unwrap_or(u64::MAX);
                let pos = match f.tool_calls.iter().position(|t| t.index == index) {
                    Some(p) => p,
                    None => {
                        f.tool_calls.push(FoldedToolCall {
                            index,
                            ..Default::default()
                        });
                        f.tool_calls.len() - 1
                    }
                };
                let entry = &mut f.tool_calls[pos];
                if let Some(id) = tc.get("id").and_then(Value::as_str) {
                    entry.id = Some(id.to_owned());
                    entry.id_deltas += 1;
                }
                if let Some(t) = tc.get("type").and_then(Value::as_str) {
                    entry.kind = Some(t.to_owned());
                }
                if let Some(func) = tc.get("function") {
                    if let Some(n) = func.get("name").and_then(Value::as_str) {
                        entry.name = Some(n.to_owned());
                    }
                    if let Some(a) = func.get("arguments").and_then(Value::as_str) {
                        entry.arguments.push_str(a);
                    }
                }
            }
        }
    }
    f
}

/// Keys of a JSON object (empty for non-objects), for "no unexpected field" assertions.
pub fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(Map::keys)
        .map(|k| k.cloned().collect())
        .unwrap_or_default()
}
