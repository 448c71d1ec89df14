//! Request validation against the API's ranges and the model's card, before any upstream call.

use crate::config::ModelConfig;
use crate::error::GatewayError;
use crate::gateway::model::{ChatRequest, Content, Role};

/// Checks `req` for `model`; drops parameters the model fixes and returns a warning for each.
pub fn validate(req: &mut ChatRequest, model: &ModelConfig) -> Result<Vec<String>, GatewayError> {
    if req.messages.is_empty() {
        return Err(GatewayError::invalid(
            "'messages' must contain at least one message",
            Some("messages".into()),
        ));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if m.role == Role::Unknown {
            return Err(GatewayError::invalid(
                format!(
                    "messages[{i}].role must be one of system, developer, user, assistant, tool"
                ),
                Some(format!("messages[{i}].role")),
            ));
        }
        if m.role == Role::Tool && m.tool_call_id.is_none() {
            return Err(GatewayError::invalid(
                format!("messages[{i}] has role 'tool' but no tool_call_id"),
                Some(format!("messages[{i}].tool_call_id")),
            ));
        }
        if let Some(Content::Parts(parts)) = &m.content {
            for (j, p) in parts.iter().enumerate() {
                let needed = match p.kind.as_str() {
                    "image_url" | "image" => Some("image"),
                    "video_url" | "video" => Some("video"),
                    "input_audio" => Some("audio"),
                    _ => None,
                };
                if let Some(modality) = needed {
                    if !model.input_modalities.iter().any(|x| x == modality) {
                        return Err(GatewayError::invalid(
                            format!(
                                "model {} does not accept {modality} input (it accepts: {})",
                                model.id,
                                model.input_modalities.join(", ")
                            ),
                            Some(format!("messages[{i}].content[{j}]")),
                        ));
                    }
                }
            }
        }
    }
    if let Some(t) = req.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(GatewayError::invalid(
                format!("invalid 'temperature': {t} is outside the range 0 to 2"),
                Some("temperature".into()),
            ));
        }
    }
    if let Some(p) = req.top_p {
        if !(0.0..=1.0).contains(&p) {
            return Err(GatewayError::invalid(
                format!("invalid 'top_p': {p} is outside the range 0 to 1"),
                Some("top_p".into()),
            ));
        }
    }
    for (name, v) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ] {
        if let Some(v) = v {
            if !(-2.0..=2.0).contains(&v) {
                return Err(GatewayError::invalid(
                    format!("invalid '{name}': {v} is outside the range -2 to 2"),
                    Some(name.into()),
                ));
            }
        }
    }
    if let Some(n) = req.max_output_tokens {
        if n > model.max_output_tokens {
            return Err(GatewayError::invalid(
                format!(
                    "invalid '{}': {n} is more than model {}'s maximum output of {} tokens",
                    req.max_output_param, model.id, model.max_output_tokens
                ),
                Some(req.max_output_param.to_string()),
            ));
        }
    }
    if req.stop.len() > 4 {
        return Err(GatewayError::invalid(
            format!(
                "'stop' has {} sequences; at most 4 are allowed",
                req.stop.len()
            ),
            Some("stop".into()),
        ));
    }
    if let Some(k) = req.top_logprobs {
        if k > 20 {
            return Err(GatewayError::invalid(
                format!("invalid 'top_logprobs': {k} is more than 20"),
                Some("top_logprobs".into()),
            ));
        }
    }
    if let Some(n) = req.n {
        if n == 0 || n > 8 {
            return Err(GatewayError::invalid(
                format!("invalid 'n': {n} must be between 1 and 8"),
                Some("n".into()),
            ));
        }
    }
    if !req.tools.is_empty() && !model.has_capability("tools") {
        return Err(GatewayError::invalid(
            format!("model {} does not support tools", model.id),
            Some("tools".into()),
        ));
    }

    let mut warnings = Vec::new();
    for fixed in &model.fixed_parameters {
        let dropped = match fixed.as_str() {
            "temperature" => req.temperature.take().is_some(),
            "top_p" => req.top_p.take().is_some(),
            "n" => {
                if req.n.is_some_and(|n| n > 1) {
                    return Err(GatewayError::invalid(
                        format!("model {} only supports n = 1", model.id),
                        Some("n".into()),
                    ));
                }
                req.n.take().is_some()
            }
            "presence_penalty" => req.presence_penalty.take().is_some(),
            "frequency_penalty" => req.frequency_penalty.take().is_some(),
            _ => false,
        };
        if dropped {
            warnings.push(format!(
                "{fixed} is fixed for {} and was not forwarded",
                model.id
            ));
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gateway::model::Message;

    fn model() -> ModelConfig {
        let c = Config::parse(
            r#"
[[providers]]
name = "p"
dialect = "moonshot"
base_url = "http://127.0.0.1:1/v1"
[[models]]
id = "kimi-k2.6"
max_output_tokens = 16000
input_modalities = ["text", "image"]
fixed_parameters = ["temperature", "top_p"]
capabilities = ["tools"]
  [[models.routes]]
  provider = "p"
"#,
            "t",
            None,
        )
        .expect("config");
        c.models[0].clone()
    }

    fn req() -> ChatRequest {
        ChatRequest {
            model: "kimi-k2.6".into(),
            messages: vec![Message::new(Role::User, Some(Content::Text("hi".into())))],
            max_output_param: "max_tokens",
            ..Default::default()
        }
    }

    fn param(r: Result<Vec<String>, GatewayError>) -> String {
        match r {
            Err(GatewayError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ranges_are_checked_with_param() {
        let m = model();
        let mut r = req();
        r.max_output_tokens = Some(16001);
        assert_eq!(param(validate(&mut r, &m)), "max_tokens");
        let mut r = req();
        r.stop = vec!["a".into(); 5];
        assert_eq!(param(validate(&mut r, &m)), "stop");
        let mut r = req();
        r.messages.clear();
        assert_eq!(param(validate(&mut r, &m)), "messages");
        let mut r = req();
        r.messages.push(Message::new(Role::Unknown, None));
        assert_eq!(param(validate(&mut r, &m)), "messages[1].role");
    }

    #[test]
    fn fixed_parameters_are_dropped_with_warning() {
        let m = model();
        let mut r = req();
        r.temperature = Some(0.3);
        let w = validate(&mut r, &m).expect("valid");
        assert_eq!(r.temperature, None);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn temperature_range_is_checked_before_dropping() {
        let m = model();
        let mut r = req();
        r.temperature = Some(3.0);
        assert_eq!(param(validate(&mut r, &m)), "temperature");
    }
}
