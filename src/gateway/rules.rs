//! Per-model request rules from the catalog, applied once before routing: reasoning settings the
//! model cannot take are reduced (with a warning), and media the model cannot read is a 400 that
//! names the models that can.

use crate::catalog::Catalog;
use crate::config::ModelConfig;
use crate::error::GatewayError;
use crate::gateway::model::{ChatRequest, Content, Effort};

/// Applies the model's reasoning rules; returns warnings for `x-tollgate-warning`.
///
/// Models without effort levels (`reasoning_efforts = false`, e.g. Kimi K2.6) take an effort as
/// on/off only: `none` turns thinking off, any other level turns it on (Moonshot's own client
/// maps efforts the same way).
pub fn apply_reasoning(req: &mut ChatRequest, model: &ModelConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let r = &mut req.reasoning;
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
