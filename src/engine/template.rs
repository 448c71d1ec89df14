//! Prompt building: renders the model's own Jinja chat template (GGUF `tokenizer.chat_template`) with minijinja, Hugging Face conventions.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use super::ChatMessage;

/// ChatML, used when a GGUF carries no template (or one minijinja cannot parse).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// Why a request cannot be turned into a prompt (all are client errors).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The request uses a feature the template has no way to express.
    #[error("{message}")]
    Unsupported {
        /// Human-readable reason.
        message: String,
        /// Request parameter at fault.
        param: &'static str,
    },
    /// The template refused or failed to render the conversation.
    #[error("the model's chat template cannot render this conversation: {0}")]
    Render(String),
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    supports_tools: bool,
    bos_token: String,
    eos_token: String,
    fallback: bool,
}

impl ChatTemplate {
    /// Compiles `source` (falling back to ChatML if it is missing or does not parse).
    pub fn new(source: Option<String>, bos_token: String, eos_token: String) -> Self {
        let primary = source.and_then(|src| match build_env(src.clone()) {
            Ok(env) => Some((env, src)),
            Err(e) => {
                tracing::warn!(error = %e, "GGUF chat template does not compile; using ChatML");
                None
            }
        });
        let (env, src, fallback) = match primary {
            Some((env, src)) => (env, src, false),
            None => match build_env(CHATML_TEMPLATE.to_owned()) {
                Ok(env) => (env, CHATML_TEMPLATE.to_owned(), true),
                Err(_) => (Environment::new(), String::new(), true),
            },
        };
        let supports_tools = src.contains("tools") || src.contains("tool_calls");
        Self {
            env,
            supports_tools,
            bos_token,
            eos_token,
            fallback,
        }
    }

    /// Whether the template renders tool definitions and tool calls.
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// Whether the built-in ChatML fallback is in use.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Renders the conversation (with the assistant turn opened).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Json]>,
    ) -> Result<String, TemplateError> {
        let tools = tools.filter(|t| !t.is_empty());
        if tools.is_some() && !self.supports_tools {
            return Err(TemplateError::Unsupported {
                message: "this model's chat template does not support tools".to_owned(),
                param: "tools",
            });
        }
        let mut msgs = Vec::with_capacity(messages.len());
        for m in messages {
            msgs.push(self.message_json(m)?);
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        let tools_value = tools.map(Value::from_serialize);
        tmpl.render(context! {
            messages => Value::from_serialize(&msgs),
            tools => tools_value,
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| TemplateError::Render(describe(&e)))
    }

    fn message_json(&self, m: &ChatMessage) -> Result<Json, TemplateError> {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => {
                return Err(TemplateError::Unsupported {
                    message: format!("unsupported message role '{other}'"),
                    param: "messages",
                })
            }
        };
        let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
        if (role == "tool" || has_calls) && !self.supports_tools {
            return Err(TemplateError::Unsupported {
                message: "this model's chat template cannot express tool calls or tool results"
                    .to_owned(),
                param: "messages",
            });
        }
        let mut obj = Map::new();
        obj.insert("role".into(), Json::String(role.to_owned()));
        match &m.content {
            Some(c) => {
                obj.insert("content".into(), Json::String(c.clone()));
            }
            None if has_calls => {
                obj.insert("content".into(), Json::Null);
            }
            None => {
                obj.insert("content".into(), Json::String(String::new()));
            }
        }
        if let Some(name) = &m.name {
            obj.insert("name".into(), Json::String(name.clone()));
        }
        if let Some(id) = &m.tool_call_id {
            obj.insert("tool_call_id".into(), Json::String(id.clone()));
        }
        if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) {
            let calls = calls.iter().map(hf_tool_call).collect();
            obj.insert("tool_calls".into(), Json::Array(calls));
        }
        Ok(Json::Object(obj))
    }
}

/// OpenAI tool calls carry `arguments` as a JSON string; HF templates expect an object (they
/// apply `tojson` themselves). Also exposes `name`/`arguments` at the top level as some templates read them there.
fn hf_tool_call(call: &Json) -> Json {
    let mut call = call.clone();
    if let Some(func) = call.get_mut("function").and_then(Json::as_object_mut) {
        if let Some(Json::String(args)) = func.get("arguments") {
            if let Ok(parsed) = serde_json::from_str::<Json>(args) {
                func.insert("arguments".into(), parsed);
            }
        }
        let func = func.clone();
        if let Some(obj) = call.as_object_mut() {
            for (k, v) in func {
                obj.entry(k).or_insert(v);
            }
        }
    }
    call
}

fn describe(e: &JinjaError) -> String {
    match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_owned(),
        _ => e.to_string(),
    }
}

fn build_env(source: String) -> Result<Environment<'static>, JinjaError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String { format_now(&fmt) });
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

/// Minimal `strftime` for the date strings some templates print (`%d %b %Y`, `%Y-%m-%d`).
fn format_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mi = usize::try_from(m.saturating_sub(1)).unwrap_or(0).min(11);
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%b", MONTHS[mi])
        .replace("%B", FULL[mi])
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const TOOLY: &str = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}{% for m in messages %}{% if m.role == 'user' and m.content.strip() == '' %}{{ raise_exception('empty user message') }}{% endif %}[{{ m.role }}]{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: Some(content.into()),
            ..Default::default()
        }
    }

    #[test]
    fn smollm_template_renders() {
        let t = ChatTemplate::new(Some(SMOL.into()), String::new(), String::new());
        assert!(!t.supports_tools());
        let out = t.render(&[msg("user", "hi")], None).unwrap_or_default();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn developer_maps_to_system() {
        let t = ChatTemplate::new(Some(SMOL.into()), String::new(), String::new());
        let out = t
            .render(&[msg("developer", "be brief"), msg("user", "hi")], None)
            .unwrap_or_default();
        assert!(out.starts_with("<|im_start|>system\nbe brief<|im_end|>"));
    }

    #[test]
    fn tools_rejected_when_template_lacks_them() {
        let t = ChatTemplate::new(Some(SMOL.into()), String::new(), String::new());
        let tools = vec![serde_json::json!({"type":"function","function":{"name":"f"}})];
        let err = t.render(&[msg("user", "hi")], Some(&tools));
        assert!(matches!(
            err,
            Err(TemplateError::Unsupported { param: "tools", .. })
        ));
        let tool_msg = ChatMessage {
            role: "tool".into(),
            content: Some("42".into()),
            tool_call_id: Some("c1".into()),
            ..Default::default()
        };
        let err = t.render(&[msg("user", "hi"), tool_msg], None);
        assert!(matches!(
            err,
            Err(TemplateError::Unsupported {
                param: "messages",
                ..
            })
        ));
    }

    #[test]
    fn tool_template_gets_tools_and_parsed_arguments() {
        let t = ChatTemplate::new(Some(TOOLY.into()), String::new(), String::new());
        assert!(t.supports_tools());
        let tools = vec![serde_json::json!({"type":"function","function":{"name":"get_weather"}})];
        let call = ChatMessage {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(vec![serde_json::json!({
                "id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
            })]),
            ..Default::default()
        };
        let out = t
            .render(&[msg("user", "weather?"), call], Some(&tools))
            .unwrap_or_default();
        // trim_blocks (the Hugging Face convention) eats the newline after each block tag.
        assert!(
            out.starts_with("TOOLS:get_weather;[user]weather?[assistant]"),
            "{out}"
        );
        assert!(out.contains("get_weather({\"city\":\"Paris\"})"), "{out}");
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let t = ChatTemplate::new(Some(TOOLY.into()), String::new(), String::new());
        let err = t.render(&[msg("user", "  ")], None);
        assert_eq!(err, Err(TemplateError::Render("empty user message".into())));
    }

    #[test]
    fn broken_template_falls_back_to_chatml() {
        let t = ChatTemplate::new(Some("{% for %}".into()), String::new(), String::new());
        assert!(t.is_fallback());
        let out = t.render(&[msg("user", "x")], None).unwrap_or_default();
        assert_eq!(
            out,
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn unknown_role_rejected() {
        let t = ChatTemplate::new(None, String::new(), String::new());
        assert!(matches!(
            t.render(&[msg("wizard", "x")], None),
            Err(TemplateError::Unsupported { .. })
        ));
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }
}
