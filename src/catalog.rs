//! The model catalog: finds a model by id or alias, suggests near names, and builds model cards.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::config::{Config, ModelConfig, Price};
use crate::gateway::prices::PriceBook;

/// Every configured model, indexed by id and alias.
#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<Arc<ModelConfig>>,
    by_name: HashMap<String, usize>,
    created: i64,
}

impl Catalog {
    pub fn new(config: &Config) -> Catalog {
        let models: Vec<Arc<ModelConfig>> = config.models.iter().cloned().map(Arc::new).collect();
        let mut by_name = HashMap::new();
        for (i, m) in models.iter().enumerate() {
            by_name.insert(m.id.clone(), i);
            for a in &m.aliases {
                by_name.insert(a.clone(), i);
            }
        }
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Catalog {
            models,
            by_name,
            created,
        }
    }

    /// The model with this id or alias.
    pub fn get(&self, name: &str) -> Option<&Arc<ModelConfig>> {
        self.by_name.get(name).map(|&i| &self.models[i])
    }

    pub fn models(&self) -> &[Arc<ModelConfig>] {
        &self.models
    }

    /// Up to three configured names closest to `name`, best first.
    pub fn suggest(&self, name: &str) -> Vec<String> {
        let lower = name.to_ascii_lowercase();
        let mut scored: Vec<(f64, &String)> = self
            .by_name
            .keys()
            .map(|k| (strsim::jaro_winkler(&lower, &k.to_ascii_lowercase()), k))
            .filter(|(s, _)| *s > 0.7)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let mut out: Vec<String> = Vec::new();
        for (_, k) in scored {
            let canonical = self
                .get(k)
                .map(|m| m.id.clone())
                .unwrap_or_else(|| k.clone());
            if !out.contains(&canonical) {
                out.push(canonical);
            }
            if out.len() == 3 {
                break;
            }
        }
        out
    }

    /// The OpenAI `model` object, extended like OpenRouter's models API; each route priced as
    /// `prices` says (the store's price in effect with billing on, else the config's).
    pub fn card(&self, m: &ModelConfig, prices: &PriceBook) -> Value {
        let route_prices: Vec<Price> = m.routes.iter().map(|r| prices.of(&m.id, r).0).collect();
        let price = route_prices.first().copied().unwrap_or_default();
        json!({
            "id": m.id,
            "object": "model",
            "created": self.created,
            "owned_by": owner(&m.id),
            "name": m.name,
            "aliases": m.aliases,
            "context_length": m.context_length,
            "max_output_tokens": m.max_output_tokens,
            "architecture": {
                "input_modalities": m.input_modalities,
                "output_modalities": ["text"],
            },
            "capabilities": m.capabilities,
            "supported_parameters": supported_parameters(m),
            "top_provider": {
                "context_length": m.context_length,
                "max_completion_tokens": m.max_output_tokens,
            },
            "pricing": pricing_json(&price),
            "providers": m.routes.iter().zip(&route_prices).map(|(r, p)| json!({
                "provider": r.provider,
                "upstream_model": r.upstream_model,
                "pricing": pricing_json(p),
            })).collect::<Vec<_>>(),
        })
    }
}

fn owner(id: &str) -> &'static str {
    if id.starts_with("kimi") || id.starts_with("moonshot") {
        "moonshotai"
    } else {
        "tollgate"
    }
}

/// Request parameters a model accepts, OpenRouter-style.
fn supported_parameters(m: &ModelConfig) -> Vec<&'static str> {
    let mut p = vec![
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "logprobs",
        "top_logprobs",
        "user",
    ];
    for s in [
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
    ] {
        if !m.fixed_parameters.iter().any(|f| f == s) {
            p.push(s);
        }
    }
    if m.has_capability("tools") {
        p.extend(["tools", "tool_choice", "parallel_tool_calls"]);
    }
    if m.has_capability("reasoning") {
        p.extend([
            "reasoning",
            "include_reasoning",
            "thinking",
            "reasoning_effort",
        ]);
    }
    if m.has_capability("json_object") || m.has_capability("json_schema") {
        p.push("response_format");
    }
    if m.has_capability("json_schema") {
        p.push("structured_outputs");
    }
    p
}

/// Prices as USD-per-token decimal strings (OpenRouter's convention) and per million tokens.
/// The `pricing` object of a model card (OpenRouter's per-token USD strings, plus per-1M).
fn pricing_json(p: &Price) -> Value {
    json!({
        "prompt": per_token_usd(p.input),
        "completion": per_token_usd(p.output),
        "input_cache_read": per_token_usd(p.cached_input),
        "per_mtok_usd": {
            "input": micros_str(p.input),
            "cached_input": micros_str(p.cached_input),
            "output": micros_str(p.output),
        }
    })
}

/// Formats micro-USD as a dollar decimal string without going through floats.
pub fn micros_str(micros: u64) -> String {
    let s = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    trim_zeros(s)
}

/// Micro-USD per million tokens → USD per token, as an exact decimal string.
fn per_token_usd(micros_per_mtok: u64) -> String {
    // USD/token = micros / 1e6 / 1e6 = micros / 1e12
    let s = format!(
        "{}.{:012}",
        micros_per_mtok / 1_000_000_000_000,
        micros_per_mtok % 1_000_000_000_000
    );
    trim_zeros(s)
}

fn trim_zeros(s: String) -> String {
    let t = s.trim_end_matches('0').trim_end_matches('.');
    if t.is_empty() {
        "0".to_string()
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_prices_are_exact() {
        assert_eq!(per_token_usd(600_000), "0.0000006");
        assert_eq!(per_token_usd(3_000_000), "0.000003");
        assert_eq!(micros_str(600_000), "0.6");
        assert_eq!(micros_str(0), "0");
        assert_eq!(micros_str(12_000_001), "12.000001");
    }

    #[test]
    fn lookup_by_alias_and_suggest() {
        let cfg = Config::parse(
            r#"
[[providers]]
name = "p"
dialect = "openai"
base_url = "http://127.0.0.1:1/v1"
[[models]]
id = "kimi-k2.6"
aliases = ["moonshotai/kimi-k2.6"]
  [[models.routes]]
  provider = "p"
"#,
            "t",
            None,
        )
        .expect("config");
        let c = Catalog::new(&cfg);
        assert_eq!(
            c.get("moonshotai/kimi-k2.6").map(|m| m.id.as_str()),
            Some("kimi-k2.6")
        );
        assert_eq!(c.suggest("kimi-k2.5"), vec!["kimi-k2.6".to_string()]);
        assert!(c.suggest("zzzz").is_empty());
    }
}
