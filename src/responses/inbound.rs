//! Parses a Responses API request into the internal [`ChatRequest`].
//!
//! `instructions` becomes a system message; consecutive `reasoning`, assistant `message` and
//! `function_call` items fold into one assistant message (reasoning → `reasoning_content`,
//! `call_id` → the tool-call id); `function_call_output` becomes a tool message with that id.

use serde_json::{json, Map, Value};

use crate::error::GatewayError;
use crate::gateway::model::{
    ChatRequest, Content, ContentPart, FunctionCall, FunctionDef, Message, Role, Tool, ToolCall,
};
use crate::openai::chat::{parse_object, parse_reasoning, take};

/// What the Responses encoder needs besides the internal request.
#[derive(Debug, Clone, Default)]
pub struct ResponsesOptions {
    /// The client asked for reasoning summaries (`reasoning.summary`): reasoning is sent as
    /// `summary_text` instead of raw `reasoning_text`.
    pub summary: Option<String>,
    pub instructions: Option<String>,
    pub metadata: Option<Value>,
    /// The request's `tools` in Responses shape, echoed in the response object.
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
    pub text: Option<Value>,
}

fn invalid(msg: impl Into<String>, param: &str) -> GatewayError {
    GatewayError::invalid(msg, Some(param.to_string()))
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

fn content_of(v: &Value, param: &str) -> Result<Option<Content>, GatewayError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(Content::Text(s.clone()))),
        Value::Array(parts) => {
            let mut out = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text") | Some("output_text") | Some("text") => out.push(text_part(
                        p.get("text").and_then(Value::as_str).unwrap_or(""),
                    )),
                    Some("input_image") => {
                        let url = p.get("image_url").and_then(Value::as_str).unwrap_or("");
                        if url.is_empty() {
                            return Err(invalid(format!("{param}.content[{j}]: input_image needs image_url (file_id is not supported)"), param));
                        }
                        let mut iu = json!({"url": url});
                        if let Some(d) = p.get("detail") {
                            iu["detail"] = d.clone();
                        }
                        out.push(ContentPart {
                            kind: "image_url".into(),
                            text: None,
                            image_url: Some(iu),
                            video_url: None,
                            extra: Map::new(),
                        });
                    }
                    Some("input_video") | Some("video_url") => {
                        let url = p
                            .get("video_url")
                            .map(|u| u.get("url").cloned().unwrap_or(u.clone()))
                            .unwrap_or(Value::Null);
                        out.push(ContentPart {
                            kind: "video_url".into(),
                            text: None,
                            image_url: None,
                            video_url: Some(json!({"url": url})),
                            extra: Map::new(),
                        });
                    }
                    Some("refusal") => out.push(text_part(
                        p.get("refusal").and_then(Value::as_str).unwrap_or(""),
                    )),
                    other => {
                        return Err(invalid(
                            format!("{param}.content[{j}].type {other:?} is not supported"),
                            param,
                        ))
                    }
                }
            }
            if out.iter().all(|p| p.kind == "text") {
                Ok(Some(Content::Text(
                    out.into_iter()
                        .filter_map(|p| p.text)
                        .collect::<Vec<_>>()
                        .join(""),
                )))
            } else {
                Ok(Some(Content::Parts(out)))
            }
        }
        _ => Err(invalid(
            format!("{param}.content must be a string or an array"),
            param,
        )),
    }
}

/// Builds messages from input items, folding assistant-side items into one message.
struct Folder {
    out: Vec<Message>,
    assistant: Option<Message>,
}

impl Folder {
    fn flush(&mut self) {
        if let Some(a) = self.assistant.take() {
            self.out.push(a);
        }
    }

    fn assistant(&mut self) -> &mut Message {
        self.assistant
            .get_or_insert_with(|| Message::new(Role::Assistant, None))
    }
}

fn reasoning_text(item: &Value) -> String {
    let pick = |k: &str, t: &str| -> Vec<String> {
        item.get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some(t))
            .filter_map(|p| p.get("text").and_then(Value::as_str).map(str::to_string))
            .collect()
    };
    let content = pick("content", "reasoning_text");
    if !content.is_empty() {
        return content.join("");
    }
    pick("summary", "summary_text").join("\n\n")
}

/// Parses and normalises a Responses request body.
pub fn parse_responses_request(
    body: &[u8],
) -> Result<(ChatRequest, ResponsesOptions), GatewayError> {
    let mut obj = parse_object(body)?;
    let model: String = take(&mut obj, "model")?
        .ok_or_else(|| invalid("you must provide a model parameter", "model"))?;
    if obj
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(invalid(
            "previous_response_id is not supported: tollgate stores no responses; send the whole conversation in input (store: false)",
            "previous_response_id",
        ));
    }
    let mut opts = ResponsesOptions::default();
    let mut f = Folder {
        out: Vec::new(),
        assistant: None,
    };
    if let Some(instr) = take::<String>(&mut obj, "instructions")? {
        f.out.push(Message::new(
            Role::System,
            Some(Content::Text(instr.clone())),
        ));
        opts.instructions = Some(instr);
    }
    match take::<Value>(&mut obj, "input")? {
        None => return Err(invalid("missing required parameter: 'input'", "input")),
        Some(Value::String(s)) => f.out.push(Message::new(Role::User, Some(Content::Text(s)))),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let param = format!("input[{i}]");
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                match kind {
                    "message" => {
                        let role = match item.get("role").and_then(Value::as_str) {
                            Some("user") => Role::User,
                            Some("system") => Role::System,
                            Some("developer") => Role::Developer,
                            Some("assistant") => Role::Assistant,
                            other => return Err(invalid(format!("{param}.role {other:?} is not one of user, system, developer, assistant"), &param)),
                        };
                        let content = content_of(item.get("content").unwrap_or(&Value::Null), &param)?;
                        if role == Role::Assistant {
                            let a = f.assistant();
                            if a.tool_calls.is_some() {
                                f.flush();
                            }
                            let a = f.assistant();
                            let prev = a.content.as_ref().map(Content::text).unwrap_or_default();
                            let add = content.map(|c| c.text()).unwrap_or_default();
                            a.content = Some(Content::Text(prev + &add));
                        } else {
                            f.flush();
                            f.out.push(Message::new(role, content));
                        }
                    }
                    "reasoning" => {
                        let needs_new = f.assistant.as_ref().is_some_and(|a| a.content.is_some() || a.tool_calls.is_some() || a.reasoning_content.is_some());
                        if needs_new {
                            f.flush();
                        }
                        f.assistant().reasoning_content = Some(reasoning_text(item));
                    }
                    "function_call" => {
                        let call_id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                        let name = item.get("name").and_then(Value::as_str).unwrap_or("");
                        if call_id.is_empty() || name.is_empty() {
                            return Err(invalid(format!("{param}: function_call needs call_id and name"), &param));
                        }
                        let args = item.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                        f.assistant().tool_calls.get_or_insert_with(Vec::new).push(ToolCall {
                            id: call_id.to_string(),
                            kind: "function".into(),
                            function: FunctionCall { name: name.to_string(), arguments: args.to_string() },
                        });
                    }
                    "function_call_output" => {
                        f.flush();
                        let call_id = item.get("call_id").and_then(Value::as_str).unwrap_or("");
                        if call_id.is_empty() {
                            return Err(invalid(format!("{param}.call_id is required"), &param));
                        }
                        let content = match item.get("output") {
                            Some(Value::String(s)) => Content::Text(s.clone()),
                            Some(v) => content_of(v, &param)?.unwrap_or(Content::Text(String::new())),
                            None => Content::Text(String::new()),
                        };
                        let mut m = Message::new(Role::Tool, Some(content));
                        m.tool_call_id = Some(call_id.to_string());
                        f.out.push(m);
                    }
                    other => return Err(invalid(format!("{param}.type {other:?} is not supported (use message, reasoning, function_call, function_call_output)"), &param)),
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "input must be a string or an array of items",
                "input",
            ))
        }
    }
    f.flush();

    let raw_tools: Vec<Value> = take(&mut obj, "tools")?.unwrap_or_default();
    let mut tools = Vec::with_capacity(raw_tools.len());
    for (i, t) in raw_tools.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid(
                format!(
                    "tools[{i}].type {:?} is not supported; only function tools are",
                    t.get("type")
                ),
                &format!("tools[{i}].type"),
            ));
        }
        let name = t.get("name").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            return Err(invalid(
                format!("tools[{i}].name is required"),
                &format!("tools[{i}].name"),
            ));
        }
        tools.push(Tool {
            kind: "function".into(),
            function: Some(FunctionDef {
                name: name.to_string(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                parameters: t.get("parameters").cloned().filter(|p| p.is_object()),
                strict: t.get("strict").and_then(Value::as_bool),
            }),
            extra: Map::new(),
        });
    }
    opts.tools = raw_tools;
    let raw_choice: Option<Value> = take(&mut obj, "tool_choice")?;
    opts.tool_choice = raw_choice.clone();
    let tool_choice = match raw_choice {
        None => None,
        Some(v @ Value::String(_)) => Some(v),
        Some(Value::Object(o)) => {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("tool_choice.name is required", "tool_choice.name"))?;
            Some(json!({"type": "function", "function": {"name": name}}))
        }
        Some(_) => {
            return Err(invalid(
                "tool_choice must be a string or an object",
                "tool_choice",
            ))
        }
    };

    let response_format = match take::<Value>(&mut obj, "text")? {
        None => None,
        Some(t) => {
            opts.text = Some(t.clone());
            match t.get("format") {
                Some(fmt) => match fmt.get("type").and_then(Value::as_str) {
                    Some("json_schema") => Some(json!({"type": "json_schema", "json_schema": {
                        "name": fmt.get("name").cloned().unwrap_or(json!("response")),
                        "schema": fmt.get("schema").cloned().unwrap_or(json!({})),
                        "strict": fmt.get("strict").cloned().unwrap_or(Value::Null)}})),
                    Some("json_object") => Some(json!({"type": "json_object"})),
                    _ => None,
                },
                None => None,
            }
        }
    };

    let mut r = Map::new();
    if let Some(reasoning) = obj.remove("reasoning") {
        if let Some(s) = reasoning.get("summary").and_then(Value::as_str) {
            opts.summary = Some(s.to_string());
        }
        r.insert("reasoning".into(), reasoning);
    }
    for k in [
        "thinking",
        "reasoning_effort",
        "enable_thinking",
        "thinking_budget",
        "include_reasoning",
        "chat_template_kwargs",
    ] {
        if let Some(v) = obj.remove(k) {
            r.insert(k.into(), v);
        }
    }
    let reasoning = parse_reasoning(&mut r)?;
    let mut extra = Map::new();
    if let Some(k) = r.remove("chat_template_kwargs") {
        extra.insert("chat_template_kwargs".into(), k);
    }
    // OpenRouter-shaped routing preferences work on every inbound API (the router takes them).
    if let Some(p) = obj.remove("provider") {
        extra.insert("provider".into(), p);
    }
    opts.metadata = take(&mut obj, "metadata")?;
    let max_output: Option<i64> = take(&mut obj, "max_output_tokens")?;
    let max_output_tokens = match max_output {
        Some(v) if v >= 1 => Some(
            u32::try_from(v)
                .map_err(|_| invalid("max_output_tokens is too large", "max_output_tokens"))?,
        ),
        Some(v) => {
            return Err(invalid(
                format!("invalid 'max_output_tokens': {v} is less than the minimum of 1"),
                "max_output_tokens",
            ))
        }
        None => None,
    };
    Ok((
        ChatRequest {
            model,
            messages: f.out,
            stream: take(&mut obj, "stream")?.unwrap_or(false),
            include_usage: true,
            max_output_tokens,
            max_output_param: "max_output_tokens",
            temperature: take(&mut obj, "temperature")?,
            top_p: take(&mut obj, "top_p")?,
            tools,
            tool_choice,
            parallel_tool_calls: take(&mut obj, "parallel_tool_calls")?,
            response_format,
            reasoning,
            user: take(&mut obj, "user")?,
            prompt_cache_key: take(&mut obj, "prompt_cache_key")?,
            extra,
            ..Default::default()
        },
        opts,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_preferences_ride_along() {
        let body = json!({"model": "m", "input": "hi", "provider": {"only": ["b"]}});
        let (r, _) =
            parse_responses_request(&serde_json::to_vec(&body).expect("json")).expect("parses");
        assert_eq!(r.extra.get("provider"), Some(&json!({"only": ["b"]})));
    }

    #[test]
    fn items_fold_into_chat_messages() {
        let body = json!({"model": "kimi-k2.6", "instructions": "be brief",
        "reasoning": {"effort": "high", "summary": "auto"},
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Florence?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "call weather"}]},
            {"type": "function_call", "call_id": "functions.weather:0", "name": "weather", "arguments": "{\"location\":\"Florence\"}"},
            {"type": "function_call_output", "call_id": "functions.weather:0", "output": "40 C"}
        ]});
        let (r, o) =
            parse_responses_request(&serde_json::to_vec(&body).expect("json")).expect("parses");
        assert_eq!(r.messages.len(), 4);
        assert_eq!(
            r.messages[2].reasoning_content.as_deref(),
            Some("call weather")
        );
        assert_eq!(
            r.messages[2].tool_calls.as_ref().map(|t| t[0].id.as_str()),
            Some("functions.weather:0")
        );
        assert_eq!(
            r.messages[3].tool_call_id.as_deref(),
            Some("functions.weather:0")
        );
        assert_eq!(r.reasoning.enabled, Some(true));
        assert_eq!(o.summary.as_deref(), Some("auto"));
    }

    #[test]
    fn previous_response_id_is_refused() {
        let body = br#"{"model":"m","input":"hi","previous_response_id":"resp_1"}"#;
        assert!(parse_responses_request(body).is_err());
    }
}
