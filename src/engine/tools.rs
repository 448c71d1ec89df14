//! Tool calls in model output: recognises the common chat-template conventions (Hermes/Qwen `<tool_call>` tags, Mistral `[TOOL_CALLS]`, bare JSON calls) and turns them into OpenAI-shaped calls.

use serde_json::Value as Json;

/// Opening markers that announce a tool call in the conventions this parser knows.
const MARKERS: [&str; 3] = ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"];

/// One call found in the model's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON-encoded string (the OpenAI wire shape).
    pub arguments: String,
}

/// The model's answer split into free text and tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOutput {
    /// Text outside the tool calls (trimmed; empty when the answer was only calls).
    pub content: String,
    /// Calls in order of appearance.
    pub calls: Vec<ParsedToolCall>,
}

/// Parses `text` for tool calls naming one of `known` functions. Returns `None` when the text is
/// an ordinary answer (no call, or something call-shaped that does not parse: it stays text).
pub fn parse(text: &str, known: &[&str]) -> Option<ParsedOutput> {
    let is_known = |c: &ParsedToolCall| known.is_empty() || known.contains(&c.name.as_str());
    // Hermes / Qwen: <tool_call>{json}</tool_call>, possibly several, possibly after some text.
    if let Some(first) = text.find("<tool_call>") {
        let mut calls = Vec::new();
        let mut content = text[..first].to_owned();
        let mut rest = &text[first..];
        while let Some(start) = rest.find("<tool_call>") {
            content.push_str(&rest[..start]);
            let body_start = start + "<tool_call>".len();
            let (body, next) = match rest[body_start..].find("</tool_call>") {
                Some(end) => (
                    &rest[body_start..body_start + end],
                    &rest[body_start + end + "</tool_call>".len()..],
                ),
                // A final call whose closing tag never came (end of turn right after the JSON).
                None => (&rest[body_start..], ""),
            };
            calls.extend(calls_from_json(body.trim())?);
            rest = next;
        }
        content.push_str(rest);
        return finish(content, calls, is_known);
    }
    // Mistral: [TOOL_CALLS][{...}, ...]; Llama 3.1: <|python_tag|>{...}.
    for marker in &MARKERS[1..] {
        if let Some(pos) = text.find(marker) {
            let calls = calls_from_json(text[pos + marker.len()..].trim())?;
            return finish(text[..pos].to_owned(), calls, is_known);
        }
    }
    // Bare JSON: the whole answer is one call object or an array of them.
    let trimmed = text.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let calls = calls_from_json(trimmed)?;
        return finish(String::new(), calls, is_known);
    }
    None
}

/// Top-level keys a forced call's arguments may have: a small model can otherwise keep inventing
/// keys until `max_tokens` cuts the call off.
const MAX_ARGUMENTS: usize = 6;

/// GBNF forcing one Hermes-style call to one of `names`, with a JSON object of at most
/// [`MAX_ARGUMENTS`] top-level keys as arguments (the form [`parse`] reads back). Names are limited to OpenAI's `[A-Za-z0-9_-]{1,64}` plus `.`.
pub fn required_call_gbnf(names: &[String]) -> Result<String, String> {
    if names.is_empty() {
        return Err("tool_choice requires a tool call but no tool is available".into());
    }
    let mut alts = Vec::with_capacity(names.len());
    for n in names {
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(format!(
                "function name {n:?} must be 1-64 characters of a-z, A-Z, 0-9, '_', '-' or '.'"
            ));
        }
        alts.push(format!("\"\\\"{n}\\\"\""));
    }
    let json_rules = super::JSON_OBJECT_GBNF
        .split_once('\n')
        .map_or("", |(_, rest)| rest);
    Ok(format!(
        "root ::= \"<tool_call>\\n{{\\\"name\\\": \" call-name \", \\\"arguments\\\": \" call-args \"}}\\n</tool_call>\"\ncall-name ::= {}\ncall-args ::= \"{{\" ws ( string \":\" ws value ( \",\" ws string \":\" ws value ){{0,{}}} )? \"}}\" ws\n{json_rules}",
        alts.join(" | "),
        MAX_ARGUMENTS - 1
    ))
}

/// Whether `text` (the output so far) might still turn into a tool call, so a stream should hold
/// it back instead of showing it as content.
pub fn may_become_call(text: &str) -> bool {
    let t = text.trim_start();
    t.is_empty()
        || t.starts_with('{')
        || t.starts_with('[')
        || marker_at(t).is_some()
        || partial_marker_len(t) > 0
}

/// Byte position of the first call marker in `text`.
pub fn marker_at(text: &str) -> Option<usize> {
    MARKERS.iter().filter_map(|m| text.find(m)).min()
}

/// Length of the longest end of `text` that is the start of a call marker (a marker may be
/// arriving token by token); 0 when there is none.
pub fn partial_marker_len(text: &str) -> usize {
    MARKERS
        .iter()
        .flat_map(|m| (1..m.len()).filter(move |&n| text.ends_with(&m[..n])))
        .max()
        .unwrap_or(0)
}

fn finish(
    content: String,
    calls: Vec<ParsedToolCall>,
    is_known: impl Fn(&ParsedToolCall) -> bool,
) -> Option<ParsedOutput> {
    if calls.is_empty() || !calls.iter().all(is_known) {
        return None;
    }
    Some(ParsedOutput {
        content: content.trim().to_owned(),
        calls,
    })
}

/// Reads one call object, or an array of them, from JSON text.
fn calls_from_json(text: &str) -> Option<Vec<ParsedToolCall>> {
    let v: Json = serde_json::from_str(text).ok()?;
    match v {
        Json::Array(items) => items.iter().map(call_from_value).collect(),
        other => call_from_value(&other).map(|c| vec![c]),
    }
}

/// `{"name": .., "arguments"|"parameters": ..}`, optionally wrapped as `{"function": {..}}`.
fn call_from_value(v: &Json) -> Option<ParsedToolCall> {
    let obj = v.as_object()?;
    if let Some(f) = obj.get("function").filter(|f| f.is_object()) {
        return call_from_value(f);
    }
    let name = obj.get("name")?.as_str()?.to_owned();
    if name.is_empty() {
        return None;
    }
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Json::Null) => "{}".to_owned(),
        // Some templates already emit the OpenAI string form.
        Some(Json::String(s)) => {
            serde_json::from_str::<Json>(s).ok()?;
            s.clone()
        }
        Some(args @ Json::Object(_)) => args.to_string(),
        Some(_) => return None,
    };
    Some(ParsedToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> ParsedToolCall {
        ParsedToolCall {
            name: name.into(),
            arguments: args.into(),
        }
    }

    #[test]
    fn hermes_tags_with_text_and_several_calls() {
        let out = parse(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
            &["get_weather", "get_time"],
        );
        assert_eq!(
            out,
            Some(ParsedOutput {
                content: "Let me check.".into(),
                calls: vec![
                    call("get_weather", "{\"city\":\"Paris\"}"),
                    call("get_time", "{}")
                ],
            })
        );
    }

    #[test]
    fn unclosed_final_tag_and_string_arguments() {
        let out = parse(
            "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}",
            &["f"],
        );
        assert_eq!(out.map(|o| o.calls), Some(vec![call("f", "{\"x\": 1}")]));
    }

    #[test]
    fn mistral_python_tag_and_bare_json() {
        let m = parse(
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 2}}]",
            &["f"],
        );
        assert_eq!(m.map(|o| o.calls), Some(vec![call("f", "{\"a\":2}")]));
        let l = parse(
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"a\": 3}}",
            &["f"],
        );
        assert_eq!(l.map(|o| o.calls), Some(vec![call("f", "{\"a\":3}")]));
        let b = parse(
            " {\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": {}}}",
            &["f"],
        );
        assert_eq!(b.map(|o| o.calls), Some(vec![call("f", "{}")]));
    }

    #[test]
    fn ordinary_text_and_unknown_or_broken_calls_stay_text() {
        assert_eq!(parse("The weather is fine.", &["f"]), None);
        assert_eq!(parse("{\"answer\": 42}", &["f"]), None);
        assert_eq!(parse("{\"name\": \"g\", \"arguments\": {}}", &["f"]), None);
        assert_eq!(parse("<tool_call>{not json}</tool_call>", &["f"]), None);
    }

    #[test]
    fn required_call_grammar_names_the_tools() {
        let g = required_call_gbnf(&["get_weather".into(), "f".into()]).unwrap_or_default();
        assert!(
            g.starts_with("root ::= \"<tool_call>\\n{\\\"name\\\": \" call-name "),
            "{g}"
        );
        assert!(
            g.contains("call-name ::= \"\\\"get_weather\\\"\" | \"\\\"f\\\"\"\n"),
            "{g}"
        );
        assert!(g.contains("object ::="));
        assert!(g.contains("call-args ::= \"{\" ws ( string \":\" ws value ( \",\" ws string \":\" ws value ){0,5} )? \"}\" ws\n"), "{g}");
        assert!(!g.contains("root ::= object"));
        assert!(required_call_gbnf(&[]).is_err());
        assert!(required_call_gbnf(&["bad\"name".into()]).is_err());
    }

    #[test]
    fn streaming_hold_back() {
        assert!(may_become_call(""));
        assert!(may_become_call("  {\"na"));
        assert!(may_become_call("<tool_"));
        assert!(may_become_call("Sure. <tool"));
        assert!(may_become_call("Sure. <tool_call>{"));
        assert!(!may_become_call("Sure, the weather"));
        assert!(!may_become_call("Hello"));
        assert_eq!(marker_at("ab<tool_call>{"), Some(2));
        assert_eq!(marker_at("abc"), None);
        assert_eq!(partial_marker_len("Sure. <tool_"), 6);
        assert_eq!(partial_marker_len("Sure. [TOOL"), 5);
        assert_eq!(partial_marker_len("Sure."), 0);
    }
}
