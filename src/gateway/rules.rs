//! Per-model request rules from the catalog, applied once before routing: reasoning settings the
//! model cannot take are reduced (with a warning), and media the model cannot read is a 400 that
//! names the models that can.

use crate::catalog::Catalog;
use crate::config::ModelConfig;
use crate::error::GatewayError;
use crate::gateway::model::{ChatRequest, Content, Effort, Reasoning};

/// Applies the model's reasoning rules; returns warnings for `x-tollgate-warning`.
///
/// A model without the `reasoning` capability (e.g. the embedded SmolLM2) is served without
/// thinking: any thinking setting is cleared, and a request that asked for thinking is told so.
///
/// Models without effort levels (`reasoning_efforts = false`, e.g. Kimi K2.6) take an effort as
/// on/off only: `none` turns thinking off, any other level turns it on (Moonshot's own client
/// maps efforts the same way).
pub fn apply_reasoning(req: &mut ChatRequest, model: &ModelConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let r = &mut req.reasoning;
    if !model.has_capability("reasoning") {
        let asked = r.enabled == Some(true)
            || r.effort.is_some_and(|e| e != Effort::None)
            || (r.enabled != Some(false) && r.budget_tokens.is_some_and(|b| b > 0));
        if asked {
            warnings.push(format!(
                "{} does not support reasoning; the request's thinking setting was ignored",
                model.id
            ));
        }
        *r = Reasoning::default();
        return warnings;
    }
    if !model.reasoning_efforts {
        if let Some(e) = r.effort.take() {
            let on = e != Effort::None;
            r.enabled = Some(on);
            if e != Effort::None {
                warnings.push(format!(
                    "{} has no reasoning effort levels; effort {:?} was applied as thinking on",
                    model.id,
                    e.as_str()
                ));
            }
        }
    }
    if r.enabled == Some(false) {
        r.effort = None;
    }
    warnings
}

/// Refuses image/video input the model cannot read, naming the models that accept it.
pub fn check_modalities(
    req: &ChatRequest,
    model: &ModelConfig,
    catalog: &Catalog,
) -> Result<(), GatewayError> {
    for (i, m) in req.messages.iter().enumerate() {
        let Some(Content::Parts(parts)) = &m.content else {
            continue;
        };
        for (j, p) in parts.iter().enumerate() {
            let modality = match p.kind.as_str() {
                "image_url" | "image" => "image",
                "video_url" | "video" => "video",
                _ => continue,
            };
            if model.input_modalities.iter().any(|x| x == modality) {
                continue;
            }
            let accepting: Vec<&str> = catalog
                .models()
                .iter()
                .filter(|c| c.input_modalities.iter().any(|x| x == modality))
                .map(|c| c.id.as_str())
                .collect();
            let hint = if accepting.is_empty() {
                format!("no configured model accepts {modality} input")
            } else {
                format!(
                    "models that accept {modality} input: {}",
                    accepting.join(", ")
                )
            };
            return Err(GatewayError::invalid(
                format!(
                    "model {} does not accept {modality} input (it accepts: {}); {hint}",
                    model.id,
                    model.input_modalities.join(", ")
                ),
                Some(format!("messages[{i}].content[{j}]")),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gateway::model::{Message, Role};

    fn model(capabilities: &str) -> ModelConfig {
        let text = format!(
            "[[providers]]\nname = \"local\"\ndialect = \"local\"\n[[models]]\nid = \"tiny\"\ncapabilities = {capabilities}\n  [[models.routes]]\n  provider = \"local\"\n  model_path = \"m.gguf\"\n"
        );
        let c = Config::parse(&text, "t", None).unwrap_or_else(|e| panic!("config: {e}"));
        c.models[0].clone()
    }

    fn req(reasoning: Reasoning) -> ChatRequest {
        ChatRequest {
            model: "tiny".into(),
            messages: vec![Message::new(Role::User, Some(Content::Text("hi".into())))],
            max_output_param: "max_tokens",
            reasoning,
            ..Default::default()
        }
    }

    #[test]
    fn thinking_on_a_model_without_reasoning_is_dropped_with_warning() {
        let m = model("[\"json_object\"]");
        for asked in [
            Reasoning {
                enabled: Some(true),
                ..Default::default()
            },
            Reasoning {
                effort: Some(Effort::High),
                ..Default::default()
            },
            Reasoning {
                budget_tokens: Some(1024),
                ..Default::default()
            },
        ] {
            let mut r = req(asked.clone());
            let w = apply_reasoning(&mut r, &m);
            assert_eq!(w.len(), 1, "{asked:?}");
            assert!(w[0].contains("does not support reasoning"), "{w:?}");
            assert_eq!(r.reasoning, Reasoning::default());
        }
        // Turning thinking off, or not mentioning it, needs no warning.
        for quiet in [
            Reasoning::default(),
            Reasoning {
                enabled: Some(false),
                ..Default::default()
            },
            Reasoning {
                effort: Some(Effort::None),
                ..Default::default()
            },
        ] {
            let mut r = req(quiet);
            assert!(apply_reasoning(&mut r, &m).is_empty());
            assert_eq!(r.reasoning, Reasoning::default());
        }
    }

    #[test]
    fn reasoning_models_keep_their_thinking_setting() {
        let m = model("[\"reasoning\"]");
        let mut r = req(Reasoning {
            enabled: Some(true),
            budget_tokens: Some(512),
            ..Default::default()
        });
        assert!(apply_reasoning(&mut r, &m).is_empty());
        assert_eq!(r.reasoning.enabled, Some(true));
        assert_eq!(r.reasoning.budget_tokens, Some(512));
    }
}
