//! Parses an OpenAI Chat Completions request body into the internal [`ChatRequest`].
//!
//! Known fields are taken out of the JSON object one by one (each error names its `param`); the
//! rest stays in `extra` and is forwarded upstream unchanged. Every spelling of "thinking" a chat
//! client may send is reduced to the one internal [`Reasoning`] setting here.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::GatewayError;
use crate::gateway::model::{ChatRequest, Effort, Message, Reasoning, Tool};

/// Parses and normalises a request body. Malformed JSON is reported with line and column.
///
/// A well-formed request is read straight into its typed fields ([`fast`]); anything that path
/// does not accept (malformed JSON, a wrong type, an invalid value) is parsed again by the
/// field-by-field path below, which words every error. Both give the same request.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    if let Some(req) = fast::parse(body) {
        return Ok(req);
    }
    let mut obj = parse_object(body)?;
    chat_request_from(&mut obj)
}

/// Parses a request body that must be a JSON object (malformed JSON names line and column).
pub(crate) fn parse_object(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(GatewayError::invalid(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(GatewayError::InvalidJson {
            message: format!(
                "could not parse the request body as JSON: {} (line {}, column {})",
                strip_position(&e.to_string()),
                e.line(),
                e.column()
            ),
        }),
    }
}

fn chat_request_from(obj: &mut Map<String, Value>) -> Result<ChatRequest, GatewayError> {
    let model: String = take(obj, "model")?.ok_or_else(|| {
        GatewayError::invalid("you must provide a model parameter", Some("model".into()))
    })?;
    let messages: Vec<Message> = take(obj, "messages")?.ok_or_else(|| {
        GatewayError::invalid(
            "missing required parameter: 'messages'",
            Some("messages".into()),
        )
    })?;
    let stream: bool = take(obj, "stream")?.unwrap_or(false);
    let stream_options: Option<Map<String, Value>> = take(obj, "stream_options")?;
    let include_usage = stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_completion_tokens: Option<i64> = take(obj, "max_completion_tokens")?;
    let max_tokens: Option<i64> = take(obj, "max_tokens")?;
    let (max_output_tokens, max_output_param) = max_output(max_completion_tokens, max_tokens)?;
    let stop = stop_strings(take::<Value>(obj, "stop")?)?;
    let tools: Vec<Value> = take(obj, "tools")?.unwrap_or_default();
    let tools = tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| parse_tool(i, t))
        .collect::<Result<Vec<Tool>, _>>()?;

    let mut req = ChatRequest {
        model,
        messages,
        stream,
        include_usage,
        max_output_tokens,
        max_output_param,
        temperature: take(obj, "temperature")?,
        top_p: take(obj, "top_p")?,
        n: take(obj, "n")?,
        presence_penalty: take(obj, "presence_penalty")?,
        frequency_penalty: take(obj, "frequency_penalty")?,
        seed: take(obj, "seed")?,
        stop,
        tools,
        tool_choice: take(obj, "tool_choice")?,
        parallel_tool_calls: take(obj, "parallel_tool_calls")?,
        response_format: take(obj, "response_format")?,
        logprobs: take::<Option<bool>>(obj, "logprobs")?
            .flatten()
            .unwrap_or(false),
        top_logprobs: take(obj, "top_logprobs")?,
        reasoning: Reasoning::default(),
        user: take(obj, "user")?,
        prompt_cache_key: take(obj, "prompt_cache_key")?,
        extra: Map::new(),
    };
    req.reasoning = parse_reasoning(obj)?;
    req.extra = std::mem::take(obj);
    Ok(req)
}

/// The typed path: known fields are deserialised straight from the body (no `Value` tree for
/// `messages`), unknown ones are kept as `Value`s in `extra` in exactly the order the
/// field-by-field path leaves them (its `Map::remove` is a swap-remove, so the order of `extra`
/// depends on where the known keys stood; it is replayed here on a small vector). Any error
/// gives `None`, and the caller falls back to the field-by-field path for its wording.
mod fast {
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
    use serde_json::{Map, Value};

    use super::{max_output, parse_reasoning, parse_tool, stop_strings};
    use crate::gateway::model::{ChatRequest, Message, Reasoning};

    /// The typed fields, in the order the field-by-field path removes them from the object.
    pub(super) const TYPED: [&str; 21] = [
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_completion_tokens",
        "max_tokens",
        "stop",
        "tools",
        "temperature",
        "top_p",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "logprobs",
        "top_logprobs",
        "user",
        "prompt_cache_key",
    ];

    #[derive(Default)]
    struct Known {
        model: Option<String>,
        messages: Option<Vec<Message>>,
        stream: Option<bool>,
        stream_options: Option<Map<String, Value>>,
        max_completion_tokens: Option<i64>,
        max_tokens: Option<i64>,
        stop: Option<Value>,
        tools: Option<Vec<Value>>,
        temperature: Option<f64>,
        top_p: Option<f64>,
        n: Option<u32>,
        presence_penalty: Option<f64>,
        frequency_penalty: Option<f64>,
        seed: Option<i64>,
        tool_choice: Option<Value>,
        parallel_tool_calls: Option<bool>,
        response_format: Option<Value>,
        logprobs: Option<bool>,
        top_logprobs: Option<u32>,
        user: Option<String>,
        prompt_cache_key: Option<String>,
    }

    /// A top-level key: one of [`TYPED`] (by index) or any other.
    #[derive(PartialEq)]
    enum Key {
        Typed(usize),
        Other(String),
    }

    struct KeySeed;

    impl<'de> DeserializeSeed<'de> for KeySeed {
        type Value = Key;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for KeySeed {
        type Value = Key;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key, E> {
            Ok(match TYPED.iter().position(|k| *k == s) {
                Some(i) => Key::Typed(i),
                None => Key::Other(s.to_owned()),
            })
        }
    }

    struct Body;

    impl<'de> Visitor<'de> for Body {
        type Value = (Known, Vec<(Key, Value)>);
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut k = Known::default();
            let mut entries: Vec<(Key, Value)> = Vec::with_capacity(8);
            while let Some(key) = map.next_key_seed(KeySeed)? {
                let value = match key {
                    Key::Typed(i) => {
                        match i {
                            0 => k.model = map.next_value()?,
                            1 => k.messages = map.next_value()?,
                            2 => k.stream = map.next_value()?,
                            3 => k.stream_options = map.next_value()?,
                            4 => k.max_completion_tokens = map.next_value()?,
                            5 => k.max_tokens = map.next_value()?,
                            6 => k.stop = map.next_value()?,
                            7 => k.tools = map.next_value()?,
                            8 => k.temperature = map.next_value()?,
                            9 => k.top_p = map.next_value()?,
                            10 => k.n = map.next_value()?,
                            11 => k.presence_penalty = map.next_value()?,
                            12 => k.frequency_penalty = map.next_value()?,
                            13 => k.seed = map.next_value()?,
                            14 => k.tool_choice = map.next_value()?,
                            15 => k.parallel_tool_calls = map.next_value()?,
                            16 => k.response_format = map.next_value()?,
                            17 => k.logprobs = map.next_value()?,
                            18 => k.top_logprobs = map.next_value()?,
                            19 => k.user = map.next_value()?,
                            _ => k.prompt_cache_key = map.next_value()?,
                        }
                        Value::Null
                    }
                    Key::Other(_) => map.next_value()?,
                };
                // A repeated key keeps its first place and takes the last value (like `Map`).
                match entries.iter_mut().find(|(e, _)| *e == key) {
                    Some(slot) => slot.1 = value,
                    None => entries.push((key, value)),
                }
            }
            Ok((k, entries))
        }
    }

    pub(super) fn parse(body: &[u8]) -> Option<ChatRequest> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let (k, mut entries) = de.deserialize_map(Body).ok()?;
        de.end().ok()?;
        for i in 0..TYPED.len() {
            if let Some(pos) = entries.iter().position(|(e, _)| *e == Key::Typed(i)) {
                entries.swap_remove(pos);
            }
        }
        let mut obj = Map::with_capacity(entries.len());
        for (key, v) in entries {
            if let Key::Other(key) = key {
                obj.insert(key, v);
            }
        }
        let include_usage = k
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (max_output_tokens, max_output_param) =
            max_output(k.max_completion_tokens, k.max_tokens).ok()?;
        let stop = stop_strings(k.stop).ok()?;
        let tools = k
            .tools
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, t)| parse_tool(i, t).ok())
            .collect::<Option<Vec<_>>>()?;
        let mut req = ChatRequest {
            model: k.model?,
            messages: k.messages?,
            stream: k.stream.unwrap_or(false),
            include_usage,
            max_output_tokens,
            max_output_param,
            temperature: k.temperature,
            top_p: k.top_p,
            n: k.n,
            presence_penalty: k.presence_penalty,
            frequency_penalty: k.frequency_penalty,
            seed: k.seed,
            stop,
            tools,
            tool_choice: k.tool_choice,
            parallel_tool_calls: k.parallel_tool_calls,
            response_format: k.response_format,
            logprobs: k.logprobs.unwrap_or(false),
            top_logprobs: k.top_logprobs,
            reasoning: Reasoning::default(),
            user: k.user,
            prompt_cache_key: k.prompt_cache_key,
            extra: Map::new(),
        };
        req.reasoning = parse_reasoning(&mut obj).ok()?;
        req.extra = obj;
        Some(req)
    }
}

/// serde_json's Display appends " at line X column Y"; we add our own wording.
fn strip_position(msg: &str) -> &str {
    msg.find(" at line ").map_or(msg, |i| &msg[..i])
}

/// Removes `key` and deserialises it; `null` counts as absent.
pub(crate) fn take<T: DeserializeOwned>(
    obj: &mut Map<String, Value>,
    key: &str,
) -> Result<Option<T>, GatewayError> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_path_to_error::deserialize(v).map(Some).map_err(|e| {
            let path = e.path().to_string();
            let param = if path == "." || path.is_empty() {
                key.to_string()
            } else if path.starts_with('[') {
                format!("{key}{path}")
            } else {
                format!("{key}.{path}")
            };
            GatewayError::invalid(
                format!("invalid value for '{param}': {}", e.into_inner()),
                Some(param),
            )
        }),
    }
}

fn positive_u32(v: i64, param: &str) -> Result<u32, GatewayError> {
    if v < 1 {
        return Err(GatewayError::invalid(
            format!("invalid '{param}': {v} is less than the minimum of 1"),
            Some(param.to_string()),
        ));
    }
    u32::try_from(v).map_err(|_| {
        GatewayError::invalid(
            format!("invalid '{param}': {v} is too large"),
            Some(param.to_string()),
        )
    })
}

/// The output-token limit and the parameter that set it (`max_completion_tokens` wins).
fn max_output(
    max_completion_tokens: Option<i64>,
    max_tokens: Option<i64>,
) -> Result<(Option<u32>, &'static str), GatewayError> {
    Ok(match (max_completion_tokens, max_tokens) {
        (Some(v), _) => (
            Some(positive_u32(v, "max_completion_tokens")?),
            "max_completion_tokens",
        ),
        (None, Some(v)) => (Some(positive_u32(v, "max_tokens")?), "max_tokens"),
        (None, None) => (None, "max_tokens"),
    })
}

/// `stop` as a list: absent or null → none; a string or an array of strings.
fn stop_strings(v: Option<Value>) -> Result<Vec<String>, GatewayError> {
    let bad = || {
        GatewayError::invalid(
            "stop must be a string or an array of strings",
            Some("stop".into()),
        )
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

pub(crate) fn parse_tool(i: usize, t: Value) -> Result<Tool, GatewayError> {
    let param = format!("tools[{i}]");
    let tool: Tool = serde_path_to_error::deserialize(t).map_err(|e| {
        let path = e.path().to_string();
        let p = if path == "." {
            param.clone()
        } else {
            format!("{param}.{path}")
        };
        GatewayError::invalid(
            format!("invalid tool at '{p}': {}", e.into_inner()),
            Some(p),
        )
    })?;
    match tool.kind.as_str() {
        "function" => match &tool.function {
            Some(f) if valid_function_name(&f.name) => {
                if let Some(p) = &f.parameters {
                    if !p.is_object() {
                        return Err(GatewayError::invalid(
                            format!("'{param}.function.parameters' must be a JSON Schema object"),
                            Some(format!("{param}.function.parameters")),
                        ));
                    }
                }
                Ok(tool)
            }
            Some(_) => Err(GatewayError::invalid(
                format!("'{param}.function.name' must be 1-64 characters of a-z, A-Z, 0-9, underscores and dashes"),
                Some(format!("{param}.function.name")),
            )),
            None => Err(GatewayError::invalid(format!("'{param}.function' is required for function tools"), Some(format!("{param}.function")))),
        },
        // Moonshot's built-in tools (e.g. `$web_search`) and other typed tools ride along.
        "builtin_function" | "custom" => Ok(tool),
        other => Err(GatewayError::invalid(format!("'{param}.type' {other:?} is not supported; use \"function\""), Some(format!("{param}.type")))),
    }
}

fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' || b == b':')
}

/// One client statement about whether to think, remembered with where it came from.
struct Vote {
    source: &'static str,
    enabled: bool,
}

/// Reduces every chat-side spelling of thinking controls to one [`Reasoning`]; contradictory
/// settings are a 400 naming both.
pub(crate) fn parse_reasoning(obj: &mut Map<String, Value>) -> Result<Reasoning, GatewayError> {
    let mut r = Reasoning::default();
    let mut votes: Vec<Vote> = Vec::new();

    // Moonshot / Anthropic: thinking: {type: enabled|disabled, keep, budget_tokens}
    if let Some(t) = obj.remove("thinking") {
        match &t {
            Value::Object(m) => {
                match m.get("type").and_then(Value::as_str) {
                    Some("enabled") | Some("adaptive") => votes.push(Vote {
                        source: "thinking.type",
                        enabled: true,
                    }),
                    Some("disabled") => votes.push(Vote {
                        source: "thinking.type",
                        enabled: false,
                    }),
                    None => {}
                    Some(other) => {
                        return Err(GatewayError::invalid(
                            format!(
                                "thinking.type must be \"enabled\" or \"disabled\", got {other:?}"
                            ),
                            Some("thinking.type".into()),
                        ))
                    }
                }
                match m.get("keep") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) if s == "all" => r.keep_history = true,
                    Some(other) => {
                        return Err(GatewayError::invalid(
                            format!("thinking.keep must be \"all\" or null, got {other}"),
                            Some("thinking.keep".into()),
                        ))
                    }
                }
                if let Some(b) = m.get("budget_tokens") {
                    r.budget_tokens = Some(budget(b, "thinking.budget_tokens")?);
                }
            }
            Value::Bool(b) => votes.push(Vote {
                source: "thinking",
                enabled: *b,
            }),
            Value::Null => {}
            _ => {
                return Err(GatewayError::invalid(
                    "thinking must be an object like {\"type\": \"enabled\"}",
                    Some("thinking".into()),
                ))
            }
        }
    }

    // OpenRouter: reasoning: {effort, max_tokens, exclude, enabled}
    if let Some(v) = obj.remove("reasoning") {
        match v {
            Value::Object(m) => {
                if let Some(e) = m.get("effort") {
                    let effort = parse_effort(e, "reasoning.effort")?;
                    votes.push(Vote {
                        source: "reasoning.effort",
                        enabled: effort != Effort::None,
                    });
                    r.effort = Some(effort);
                }
                if let Some(b) = m.get("max_tokens") {
                    if r.effort.is_some() {
                        return Err(GatewayError::invalid(
                            "use reasoning.effort or reasoning.max_tokens, not both",
                            Some("reasoning.max_tokens".into()),
                        ));
                    }
                    merge_budget(
                        &mut r,
                        budget(b, "reasoning.max_tokens")?,
                        "reasoning.max_tokens",
                    )?;
                    votes.push(Vote {
                        source: "reasoning.max_tokens",
                        enabled: true,
                    });
                }
                if let Some(Value::Bool(ex)) = m.get("exclude") {
                    r.exclude = *ex;
                }
                if let Some(Value::Bool(en)) = m.get("enabled") {
                    votes.push(Vote {
                        source: "reasoning.enabled",
                        enabled: *en,
                    });
                }
            }
            Value::Null => {}
            _ => {
                return Err(GatewayError::invalid(
                    "reasoning must be an object",
                    Some("reasoning".into()),
                ))
            }
        }
    }

    // OpenAI: reasoning_effort
    if let Some(e) = obj.remove("reasoning_effort") {
        if !e.is_null() {
            let effort = parse_effort(&e, "reasoning_effort")?;
            if let Some(prev) = r.effort {
                if prev != effort {
                    return Err(GatewayError::invalid(
                        format!(
                            "reasoning_effort {:?} contradicts reasoning.effort {:?}",
                            effort.as_str(),
                            prev.as_str()
                        ),
                        Some("reasoning_effort".into()),
                    ));
                }
            }
            votes.push(Vote {
                source: "reasoning_effort",
                enabled: effort != Effort::None,
            });
            r.effort = Some(effort);
        }
    }

    // OpenRouter legacy: include_reasoning
    if let Some(Value::Bool(inc)) = obj.remove("include_reasoning") {
        if inc && r.exclude {
            return Err(GatewayError::invalid(
                "contradictory thinking settings: reasoning.exclude hides the reasoning but include_reasoning asks for it",
                Some("include_reasoning".into()),
            ));
        }
        r.exclude = r.exclude || !inc;
    }

    // EmpirioLabs / Qwen-style: enable_thinking + thinking_budget
    if let Some(v) = obj.remove("enable_thinking") {
        match v {
            Value::Bool(b) => votes.push(Vote {
                source: "enable_thinking",
                enabled: b,
            }),
            Value::Null => {}
            _ => {
                return Err(GatewayError::invalid(
                    "enable_thinking must be a boolean",
                    Some("enable_thinking".into()),
                ))
            }
        }
    }
    if let Some(b) = obj.remove("thinking_budget") {
        if !b.is_null() {
            merge_budget(&mut r, budget(&b, "thinking_budget")?, "thinking_budget")?;
        }
    }

    // vLLM / SGLang: chat_template_kwargs.{thinking, enable_thinking} (left in place for passthrough)
    if let Some(Value::Object(k)) = obj.get("chat_template_kwargs") {
        for key in ["thinking", "enable_thinking"] {
            if let Some(Value::Bool(b)) = k.get(key) {
                votes.push(Vote {
                    source: if key == "thinking" {
                        "chat_template_kwargs.thinking"
                    } else {
                        "chat_template_kwargs.enable_thinking"
                    },
                    enabled: *b,
                });
            }
        }
    }

    if let Some(first) = votes.first() {
        if let Some(other) = votes.iter().find(|v| v.enabled != first.enabled) {
            return Err(GatewayError::invalid(
                format!(
                    "contradictory thinking settings: {} turns thinking {} but {} turns it {}",
                    first.source,
                    if first.enabled { "on" } else { "off" },
                    other.source,
                    if other.enabled { "on" } else { "off" }
                ),
                Some(other.source.to_string()),
            ));
        }
        r.enabled = Some(first.enabled);
    }
    if r.enabled == Some(false) && (r.budget_tokens.is_some() || r.keep_history) {
        return Err(GatewayError::invalid(
            "a thinking budget or keep was given but thinking is turned off",
            Some("thinking".into()),
        ));
    }
    Ok(r)
}

fn parse_effort(v: &Value, param: &str) -> Result<Effort, GatewayError> {
    serde_json::from_value(v.clone()).map_err(|_| {
        GatewayError::invalid(
            format!("{param} must be one of none, minimal, low, medium, high, xhigh, max; got {v}"),
            Some(param.to_string()),
        )
    })
}

fn budget(v: &Value, param: &str) -> Result<u32, GatewayError> {
    v.as_u64()
        .filter(|b| *b >= 1)
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| {
            GatewayError::invalid(
                format!("{param} must be a positive integer"),
                Some(param.to_string()),
            )
        })
}

fn merge_budget(r: &mut Reasoning, b: u32, param: &str) -> Result<(), GatewayError> {
    match r.budget_tokens {
        Some(prev) if prev != b => Err(GatewayError::invalid(
            format!("{param} = {b} contradicts an earlier thinking budget of {prev}"),
            Some(param.to_string()),
        )),
        _ => {
            r.budget_tokens = Some(b);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::model::Role;

    fn parse(v: Value) -> Result<ChatRequest, GatewayError> {
        parse_chat_request(&serde_json::to_vec(&v).expect("json"))
    }

    fn param_of(e: GatewayError) -> Option<String> {
        match e {
            GatewayError::InvalidRequest { param, .. } => param,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The typed path gives exactly what the field-by-field path gives (including the order of
    /// `extra`, which goes upstream), and declines whatever that path refuses.
    /// The typed parse gave the same request as the field-by-field one, `extra` order included.
    fn assert_same(f: &ChatRequest, s: &ChatRequest, body: &str) {
        assert_eq!(format!("{f:?}"), format!("{s:?}"), "{body}");
        let (fk, sk): (Vec<_>, Vec<_>) = (f.extra.keys().collect(), s.extra.keys().collect());
        assert_eq!(fk, sk, "{body}");
    }

    #[test]
    fn typed_path_matches_the_field_by_field_path() {
        let bodies = [
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#,
            r#"{"zz":1,"model":"m","a":{"b":[1,2.5,"x"]},"messages":[{"role":"user","content":"hi","name":"n","x_extra":true}],"stream":true,"mid":null,"stream_options":{"include_usage":true},"temperature":0.7,"top_p":1,"last":"y"}"#,
            r#"{"model":"m","first":1,"messages":[],"second":2,"thinking":{"type":"enabled","keep":"all"},"third":3,"chat_template_kwargs":{"thinking":true},"fourth":4}"#,
            r#"{"u1":1,"reasoning_effort":"high","u2":2,"model":"m","u3":3,"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":[{"type":"text","text":"r"}]}],"u4":4,"include_reasoning":false}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"a"}],"model":"m2","x":1,"x":2,"stop":["a","b"],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"auto","seed":-3,"n":2,"logprobs":true,"top_logprobs":3,"user":"u","prompt_cache_key":"k","presence_penalty":0,"frequency_penalty":-1.5,"parallel_tool_calls":false,"response_format":{"type":"json_object"},"max_completion_tokens":5,"provider":{"order":["a"]}}"#,
            r#"{"model":"m","messages":[{"role":"wizard","content":"x","partial":true}],"temperature":null,"stop":null,"stream":null,"enable_thinking":true,"thinking_budget":100,"reasoning":{"exclude":true}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"\u00e9\n"}],"\u0061":1}"#,
            // refused: the typed path must decline, the other path words the error
            r#"{"model":"m","messages":[],"temperature":"hot"}"#,
            r#"{"model":"m","messages":[],"max_tokens":0}"#,
            r#"{"model":"m","messages":[],"stop":[1]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
            r#"{"messages":[]}"#,
            r#"{"model":null,"messages":[]}"#,
            r#"{"model":"m","messages":[],"thinking":{"type":"disabled"},"reasoning_effort":"high"}"#,
            r#"{"model":"m","messages":[],"tools":[{"type":"function","function":{"name":""}}]}"#,
            r#"{"model":"m","messages":[]} trailing"#,
            r#"[1]"#,
            r#"{"model":"m","messages":[],"temperature":"hot","temperature":1}"#,
        ];
        let mut accepted = 0;
        for b in bodies {
            let mut obj = match parse_object(b.as_bytes()) {
                Ok(o) => o,
                Err(_) => {
                    assert!(fast::parse(b.as_bytes()).is_none(), "{b}");
                    continue;
                }
            };
            let slow = chat_request_from(&mut obj);
            match (fast::parse(b.as_bytes()), slow) {
                (Some(f), Ok(s)) => {
                    accepted += 1;
                    assert_same(&f, &s, b);
                }
                // declined (e.g. a repeated key whose first value is wrong): the fallback parses it
                (None, _) => {}
                (Some(_), Err(e)) => panic!("{b}: the typed path accepted what is refused: {e}"),
            }
        }
        assert_eq!(accepted, 7, "every valid body takes the typed path");
    }

    /// The same property over thousands of generated bodies: random subsets of the known keys
    /// (in random order, some repeated) with well- and ill-typed values, mixed with unknown
    /// keys. Whatever the typed path accepts, the field-by-field path accepts identically; what
    /// that path refuses, the typed path declines.
    #[test]
    fn typed_path_matches_on_generated_bodies() {
        use rand::{Rng, SeedableRng};
        let messages = [
            r#"[{"role":"user","content":"hi"}]"#,
            r#"[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"t"}],"name":"n"}]"#,
            r#"[{"role":"assistant","content":null,"reasoning_content":"r","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"ok"}]"#,
            r#"[{"role":"wizard","content":"x"}]"#,
            r#"[{"role":"user","content":5}]"#,
            "[]",
        ];
        let any = [
            "null",
            "true",
            "false",
            "0",
            "1",
            "-1",
            "2.5",
            "3000000000",
            "\"s\"",
            "[]",
            "[\"a\"]",
            "[1]",
            "{}",
            r#"{"type":"enabled"}"#,
            r#"{"include_usage":true}"#,
            r#"{"type":"json_object"}"#,
            r#"{"effort":"high","exclude":true}"#,
            "\"high\"",
            "\"auto\"",
            r#"[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#,
            r#"[{"type":"function","function":{"name":""}}]"#,
        ];
        // Every typed key, plus the reasoning spellings and unknown keys that go to `extra`.
        let keys: Vec<&str> = fast::TYPED
            .iter()
            .copied()
            .chain([
                "thinking",
                "reasoning",
                "reasoning_effort",
                "enable_thinking",
                "thinking_budget",
                "include_reasoning",
                "chat_template_kwargs",
                "provider",
                "metadata",
                "x_one",
                "x_two",
            ])
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261122);
        let (mut accepted, mut declined) = (0, 0);
        for _ in 0..4000 {
            let mut fields: Vec<String> = Vec::new();
            if rng.gen_bool(0.95) {
                fields.push(format!(
                    "\"model\":{}",
                    if rng.gen_bool(0.9) { "\"m\"" } else { "1" }
                ));
            }
            if rng.gen_bool(0.95) {
                fields.push(format!(
                    "\"messages\":{}",
                    messages[rng.gen_range(0..messages.len())]
                ));
            }
            for _ in 0..rng.gen_range(0..6) {
                let k = keys[rng.gen_range(0..keys.len())];
                let v = if k == "messages" {
                    messages[rng.gen_range(0..messages.len())]
                } else {
                    any[rng.gen_range(0..any.len())]
                };
                fields.push(format!("\"{k}\":{v}"));
            }
            let n = fields.len();
            for i in (1..n).rev() {
                fields.swap(i, rng.gen_range(0..=i));
            }
            let b = format!("{{{}}}", fields.join(","));
            let Ok(mut obj) = parse_object(b.as_bytes()) else {
                assert!(fast::parse(b.as_bytes()).is_none(), "{b}");
                continue;
            };
            match (fast::parse(b.as_bytes()), chat_request_from(&mut obj)) {
                (Some(f), Ok(s)) => {
                    accepted += 1;
                    assert_same(&f, &s, &b);
                }
                (None, Ok(_)) => declined += 1,
                (None, Err(_)) => {}
                (Some(_), Err(e)) => panic!("{b}: the typed path accepted what is refused: {e}"),
            }
        }
        // Enough of both kinds to mean something; the fallback is for the odd body, not the rule.
        assert!(accepted > 500, "accepted {accepted}");
        assert!(
            declined * 20 < accepted,
            "declined {declined} of {accepted} valid"
        );
    }

    #[test]
    fn malformed_json_names_line_and_column() {
        let e = parse_chat_request(b"{\n  \"model\": \"x\",\n  \"messages\": [,]\n}").unwrap_err();
        match e {
            GatewayError::InvalidJson { message } => {
                assert!(message.contains("line 3, column 16"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_fields_pass_through_and_known_are_taken() {
        let r = parse(serde_json::json!({
            "model": "kimi-k2.6", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 10, "max_tokens": 99, "stop": "END",
            "stream": true, "stream_options": {"include_usage": true},
            "partial_mode_magic": {"a": 1}, "prompt_cache_key": "s1"
        }))
        .expect("parses");
        assert_eq!(r.max_output_tokens, Some(10));
        assert_eq!(r.stop, vec!["END".to_string()]);
        assert!(r.include_usage && r.stream);
        assert_eq!(
            r.extra.get("partial_mode_magic"),
            Some(&serde_json::json!({"a": 1}))
        );
        assert!(!r.extra.contains_key("max_tokens"));
        assert_eq!(r.prompt_cache_key.as_deref(), Some("s1"));
    }

    #[test]
    fn wrong_types_name_the_param() {
        let e = parse(serde_json::json!({"model": "m", "messages": [], "temperature": "hot"}))
            .unwrap_err();
        assert_eq!(param_of(e).as_deref(), Some("temperature"));
        let e =
            parse(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": 5}]}))
                .unwrap_err();
        assert!(param_of(e).unwrap_or_default().starts_with("messages[0]"));
        let e = parse(serde_json::json!({"model": "m", "messages": [], "tools": [{"type": "function", "function": {"name": ""}}]})).unwrap_err();
        assert_eq!(param_of(e).as_deref(), Some("tools[0].function.name"));
        let e =
            parse(serde_json::json!({"model": "m", "messages": [], "max_tokens": 0})).unwrap_err();
        assert_eq!(param_of(e).as_deref(), Some("max_tokens"));
    }

    #[test]
    fn unknown_role_parses_as_unknown() {
        let r = parse(
            serde_json::json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
        )
        .expect("parses");
        assert_eq!(r.messages[0].role, Role::Unknown);
    }

    #[test]
    fn thinking_spellings_reduce_to_one_setting() {
        let r = parse(serde_json::json!({"model": "m", "messages": [], "thinking": {"type": "enabled", "keep": "all"}})).expect("ok");
        assert_eq!(r.reasoning.enabled, Some(true));
        assert!(r.reasoning.keep_history);
        let r = parse(serde_json::json!({"model": "m", "messages": [], "reasoning": {"effort": "high", "exclude": true}})).expect("ok");
        assert_eq!(
            (r.reasoning.enabled, r.reasoning.effort, r.reasoning.exclude),
            (Some(true), Some(Effort::High), true)
        );
        let r =
            parse(serde_json::json!({"model": "m", "messages": [], "reasoning_effort": "none"}))
                .expect("ok");
        assert_eq!(r.reasoning.enabled, Some(false));
        let r = parse(serde_json::json!({"model": "m", "messages": [], "enable_thinking": true, "thinking_budget": 2048})).expect("ok");
        assert_eq!(
            (r.reasoning.enabled, r.reasoning.budget_tokens),
            (Some(true), Some(2048))
        );
    }

    #[test]
    fn contradictory_visibility_is_400_naming_both() {
        let e = parse(serde_json::json!({"model": "m", "messages": [], "reasoning": {"exclude": true}, "include_reasoning": true})).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("reasoning.exclude") && msg.contains("include_reasoning"),
            "{msg}"
        );
        let r =
            parse(serde_json::json!({"model": "m", "messages": [], "include_reasoning": false}))
                .expect("ok");
        assert!(r.reasoning.exclude);
    }

    #[test]
    fn contradictory_thinking_is_400_naming_both() {
        let e = parse(serde_json::json!({"model": "m", "messages": [], "thinking": {"type": "disabled"}, "reasoning_effort": "high"})).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("thinking.type") && msg.contains("reasoning_effort"),
            "{msg}"
        );
    }
}
