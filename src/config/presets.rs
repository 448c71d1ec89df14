//! Provider presets: base URL, dialect, key variable and Kimi K2.6 model id for common upstreams.
//!
//! A `[[providers]]` entry with `preset = "NAME"` takes these values unless it overrides them, so a
//! preset plus the key's environment variable is enough to serve `kimi-k2.6`.

use super::Dialect;

/// One upstream preset.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub dialect: Dialect,
    pub base_url: &'static str,
    pub api_key_env: Option<&'static str>,
    /// The upstream's model id for Kimi K2.6, used when a `kimi-k2.6` route names no `upstream_model`.
    pub kimi_k26_model: Option<&'static str>,
}

/// All shipped presets.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "moonshot",
        dialect: Dialect::Moonshot,
        base_url: "https://api.moonshot.ai/v1",
        api_key_env: Some("MOONSHOT_API_KEY"),
        kimi_k26_model: Some("kimi-k2.6"),
    },
    Preset {
        name: "moonshot-cn",
        dialect: Dialect::Moonshot,
        base_url: "https://api.moonshot.cn/v1",
        api_key_env: Some("MOONSHOT_CN_API_KEY"),
        kimi_k26_model: Some("kimi-k2.6"),
    },
    Preset {
        name: "openrouter",
        dialect: Dialect::Openrouter,
        base_url: "https://openrouter.ai/api/v1",
        api_key_env: Some("OPENROUTER_API_KEY"),
        kimi_k26_model: Some("moonshotai/kimi-k2.6"),
    },
    Preset {
        name: "gonkagate",
        dialect: Dialect::Gonkagate,
        base_url: "https://api.gonkagate.com/v1",
        api_key_env: Some("GONKAGATE_API_KEY"),
        kimi_k26_model: Some("moonshotai/Kimi-K2.6"),
    },
    Preset {
        name: "empiriolabs",
        dialect: Dialect::Empiriolabs,
        base_url: "https://api.empiriolabs.ai/v1",
        api_key_env: Some("EMPIRIOLABS_API_KEY"),
        kimi_k26_model: Some("kimi-k2-6"),
    },
    Preset {
        name: "runapi",
        dialect: Dialect::Openai,
        base_url: "https://runapi.ai/v1",
        api_key_env: Some("RUNAPI_API_KEY"),
        kimi_k26_model: Some("kimi-k2.6"),
    },
    Preset {
        name: "aigateway",
        dialect: Dialect::Openai,
        base_url: "https://api.aigateway.sh/v1",
        api_key_env: Some("AIGATEWAY_API_KEY"),
        kimi_k26_model: Some("moonshot/kimi-k2.6"),
    },
    Preset {
        name: "vllm",
        dialect: Dialect::Vllm,
        base_url: "http://127.0.0.1:8000/v1",
        api_key_env: Some("VLLM_API_KEY"),
        kimi_k26_model: Some("moonshotai/Kimi-K2.6"),
    },
    Preset {
        name: "sglang",
        dialect: Dialect::Sglang,
        base_url: "http://127.0.0.1:30000/v1",
        api_key_env: Some("SGLANG_API_KEY"),
        kimi_k26_model: Some("moonshotai/Kimi-K2.6"),
    },
    Preset {
        name: "llama-server",
        dialect: Dialect::Openai,
        base_url: "http://127.0.0.1:8081/v1",
        api_key_env: None,
        kimi_k26_model: Some("Kimi-K2.6"),
    },
    Preset {
        name: "ollama",
        dialect: Dialect::Openai,
        base_url: "http://127.0.0.1:11434/v1",
        api_key_env: None,
        kimi_k26_model: Some("kimi-k2.6"),
    },
];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}
