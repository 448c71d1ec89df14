//! Configuration: the TOML file format, the built-in default, provider presets and validation.
//!
//! The raw file is parsed into `RawConfig` (unknown keys are errors that name the key and line), then
//! resolved into [`Config`]: presets expanded, prices converted to integer micro-USD, references checked.

mod presets;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use presets::{preset, Preset, PRESETS};

/// The config used when `serve` is given no `--config`: the embedded local model in open mode.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// A configuration error, with a message that points at the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{0}")]
    Invalid(String),
}

/// Wire dialect of an upstream provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Moonshot,
    Openrouter,
    Openai,
    Vllm,
    Sglang,
    Empiriolabs,
    Gonkagate,
    Anthropic,
    Local,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Moonshot => "moonshot",
            Dialect::Openrouter => "openrouter",
            Dialect::Openai => "openai",
            Dialect::Vllm => "vllm",
            Dialect::Sglang => "sglang",
            Dialect::Empiriolabs => "empiriolabs",
            Dialect::Gonkagate => "gonkagate",
            Dialect::Anthropic => "anthropic",
            Dialect::Local => "local",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file format
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    database: Option<RawDatabase>,
    #[serde(default)]
    billing: RawBilling,
    #[serde(default)]
    providers: Vec<RawProvider>,
    #[serde(default)]
    models: Vec<RawModel>,
    /// Outlier ejection of routes (applies to every route).
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    plans: Vec<RawPlan>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: String,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    max_concurrent: Option<u64>,
    requests_per_day: Option<u64>,
    tokens_per_day: Option<u64>,
    /// USD in the file (e.g. `5.00`); stored as integer micro-USD.
    spend_cap_daily_usd: Option<f64>,
    spend_cap_monthly_usd: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    consecutive_failures: Option<u32>,
    error_rate_percent: Option<u32>,
    error_rate_min_requests: Option<u32>,
    error_rate_window: Option<u32>,
    base_ejection_ms: Option<u64>,
    max_ejection_ms: Option<u64>,
    max_cooldown_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    policy: Option<RoutingPolicy>,
    max_attempts: Option<u32>,
    deadline_ms: Option<u64>,
    complete_deadline_ms: Option<u64>,
    first_chunk_timeout_ms: Option<u64>,
    retry_budget_percent: Option<u32>,
    retry_budget_min_per_sec: Option<u32>,
    max_retry_after_ms: Option<u64>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    affinity: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    backend: Option<LimitsBackend>,
    redis_url: Option<String>,
    on_redis_down: Option<OnRedisDown>,
    fail_open_local_cap: Option<u64>,
    timezone: Option<String>,
    redis_timeout_ms: Option<u64>,
    concurrency_lease_secs: Option<u64>,
    subject_cache_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    client_timeout_secs: Option<u64>,
    keepalive_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    metrics: Option<bool>,
    metrics_token_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    required: Option<bool>,
    /// Replaced by database keys; present only to give an upgrade message.
    #[serde(default)]
    static_keys_env: Vec<String>,
    /// Replaced by database keys; present only to give an upgrade message.
    #[serde(default)]
    static_keys: Vec<String>,
    /// Environment variable holding the server secret for API-key digests.
    secret_env: Option<String>,
    /// File holding the server secret when the variable is unset.
    secret_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    hold_ttl_secs: Option<u64>,
    sweep_interval_secs: Option<u64>,
    allow_unpriced: Option<bool>,
    /// `hold` (default) or `lease`.
    admission: Option<String>,
    /// Lease slice, USD string.
    lease_usd: Option<String>,
    lease_ttl_secs: Option<u64>,
    journal_dir: Option<String>,
    key_cache_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    preset: Option<String>,
    base_url: Option<String>,
    api_key_env: Option<String>,
    dialect: Option<Dialect>,
    /// Extra request headers sent to this provider (values are not secrets).
    #[serde(default)]
    headers: HashMap<String, String>,
    connect_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    name: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    context_length: Option<u32>,
    max_output_tokens: Option<u32>,
    #[serde(default)]
    input_modalities: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
    /// Sampling parameters this model does not let callers change (dropped with a warning).
    #[serde(default)]
    fixed_parameters: Vec<String>,
    /// Whether the model has graded reasoning effort levels (false for Kimi K2.6: on/off only).
    reasoning_efforts: Option<bool>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    /// How requests are spread over the routes and retried.
    #[serde(default)]
    routing: RawRouting,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    provider: String,
    upstream_model: Option<String>,
    price_per_mtok: Option<RawPrice>,
    weight: Option<u32>,
    model_path: Option<String>,
    /// Overrides of the model's card for this route (what this upstream can serve).
    capabilities: Option<Vec<String>>,
    input_modalities: Option<Vec<String>>,
    context_length: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    #[serde(default)]
    cached_input: Option<f64>,
    output: f64,
}

// ---------------------------------------------------------------------------------------------
// Resolved configuration
// ---------------------------------------------------------------------------------------------

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub database_url: String,
    pub billing: BillingConfig,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    pub health: HealthConfig,
    /// `[[plans]]`: named sets of limits assigned to keys/accounts.
    pub plans: Vec<PlanConfig>,
    /// `[limits]`: where limiter state lives and what happens when it is unreachable.
    pub limits: LimitsConfig,
}

/// One `[[plans]]` entry. `None` means "no limit of this kind". Money is integer micro-USD.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanConfig {
    pub name: String,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub spend_cap_daily_micros: Option<u64>,
    pub spend_cap_monthly_micros: Option<u64>,
}

/// Where limiter state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    Memory,
    Redis,
}

/// What the Redis backend does while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisDown {
    /// Admit, bounded by a per-instance in-memory cap (`fail_open_local_cap` requests/min/subject).
    FailOpen,
    /// Refuse with 503 until Redis is back.
    FailClosed,
}

/// The `[limits]` section, resolved.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub backend: LimitsBackend,
    pub redis_url: Option<String>,
    pub on_redis_down: OnRedisDown,
    /// Requests per minute per subject (key or account) each instance admits while Redis is down
    /// in `fail_open` mode (on top of the plan's own limits, enforced locally).
    pub fail_open_local_cap: u64,
    /// `"UTC"`, a fixed offset like `"+05:30"`, or an IANA zone name like `"Europe/Berlin"`.
    pub timezone: String,
    /// Timeout of every Redis call.
    pub redis_timeout: Duration,
    /// A concurrency slot whose holder vanished (crash) is freed after this long.
    pub concurrency_lease: Duration,
    /// How long an instance may reuse a key's plan and overrides read from the database; 0 (the
    /// default) reads them on every request, so changes apply to the next request everywhere.
    pub subject_cache: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: LimitsBackend::Memory,
            redis_url: None,
            on_redis_down: OnRedisDown::FailOpen,
            fail_open_local_cap: 60,
            timezone: "UTC".to_string(),
            redis_timeout: Duration::from_millis(250),
            concurrency_lease: Duration::from_secs(900),
            subject_cache: Duration::ZERO,
        }
    }
}

/// How a model's requests pick a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingPolicy {
    /// Routes in configured order; later ones are fallbacks.
    #[default]
    Priority,
    /// Random by `weight`; the others are fallbacks.
    Weighted,
    /// Lowest price for the request's token mix first.
    Cheapest,
    /// Lowest measured time to first token plus generation time first.
    Fastest,
}

/// Retry and routing settings of one model.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub policy: RoutingPolicy,
    /// Upstream attempts per request, first one included.
    pub max_attempts: u32,
    /// Streams: overall time until the first chunk is ready for the client, all attempts and
    /// waits included.
    pub deadline: Duration,
    /// Non-streamed requests: overall time for the whole answer, all attempts included.
    pub complete_deadline: Duration,
    /// Streams: longest wait for one attempt's first chunk before failing over.
    pub first_chunk_timeout: Duration,
    /// Retries allowed on top of first attempts, in percent of requests (sliding 10 s window).
    pub retry_budget_percent: u32,
    /// Retries always allowed per second of the window, whatever the percentage says.
    pub retry_budget_min_per_sec: u32,
    /// Longest `Retry-After` waited for; a longer one moves to the next route at once.
    pub max_retry_after: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Keep one conversation on one route while it is healthy.
    pub affinity: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: RoutingPolicy::Priority,
            max_attempts: 3,
            deadline: Duration::from_secs(100),
            complete_deadline: Duration::from_secs(600),
            first_chunk_timeout: Duration::from_secs(30),
            retry_budget_percent: 20,
            retry_budget_min_per_sec: 10,
            max_retry_after: Duration::from_secs(10),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            affinity: true,
        }
    }
}

impl Config {
    /// The plan named `name`.
    pub fn plan(&self, name: &str) -> Option<&PlanConfig> {
        self.plans.iter().find(|p| p.name == name)
    }
}

/// Outlier ejection of routes.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Consecutive failures that eject a route.
    pub consecutive_failures: u32,
    /// Failure percentage over the last `error_rate_window` outcomes that ejects a route.
    pub error_rate_percent: u32,
    /// Outcomes needed in the window before the error rate counts.
    pub error_rate_min_requests: u32,
    pub error_rate_window: u32,
    /// First ejection lasts this long; each further one doubles it, up to `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Longest cooldown taken from an upstream's `Retry-After`.
    pub max_cooldown: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            consecutive_failures: 5,
            error_rate_percent: 50,
            error_rate_min_requests: 20,
            error_rate_window: 50,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: u64,
    /// A client's request headers must arrive within this, and its body may pause no longer.
    pub client_timeout: Duration,
    pub keepalive: Duration,
    pub shutdown_grace: Duration,
    pub metrics: bool,
    /// When set, `/metrics` answers only `Authorization: Bearer <token>`.
    pub metrics_token: Option<MetricsToken>,
    /// The variable the token is read from; `serve` refuses to start when it is named but unset.
    pub metrics_token_env: Option<String>,
}

/// The bearer token `/metrics` requires, read from the environment. Never printed.
#[derive(Clone)]
pub struct MetricsToken(String);

impl MetricsToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(***)")
    }
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub required: bool,
    /// Environment variable holding the server secret (default `TOLLGATE_SECRET`).
    pub secret_env: String,
    /// Secret file used when the variable is unset (default: next to the SQLite database).
    pub secret_file: Option<PathBuf>,
}

/// `[billing]`: hold lifetime, sweeper interval, unpriced models.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    pub hold_ttl: Duration,
    pub sweep_interval: Duration,
    pub allow_unpriced: bool,
    /// Lease admission (`admission = "lease"`): its settings; `None` holds per request.
    pub lease: Option<LeaseConfig>,
    /// How long an authenticated key is reused without reading its row again (0: every request
    /// reads it; default 0, or 5 s with lease admission).
    pub key_cache: Duration,
}

/// `[billing] admission = "lease"`: admit against leased credit, journal locally, write the
/// database in batches (see docs/billing.md "Lease admission").
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How much credit one lease takes from an account at a time (micro-USD).
    pub slice_micros: i64,
    /// A lease not renewed for this long is released by any instance's sweeper.
    pub ttl: Duration,
    /// The journal directory; `None`: next to the SQLite file, or `tollgate-journal` beside the
    /// config file.
    pub journal_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub total: Duration,
}

#[derive(Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub dialect: Dialect,
    pub base_url: String,
    pub api_key_env: Option<String>,
    /// The key read from `api_key_env` at load time. Never printed.
    pub api_key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub timeouts: Timeouts,
    /// The preset's Kimi K2.6 model id, when the provider came from a preset.
    pub kimi_k26_model: Option<&'static str>,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("dialect", &self.dialect)
            .field("base_url", &self.base_url)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Prices in integer micro-USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub provider: String,
    pub upstream_model: String,
    pub price: Price,
    /// The config gave a price (`price_per_mtok`); unpriced routes are refused when billing.
    pub priced: bool,
    pub weight: u32,
    pub model_path: Option<PathBuf>,
    /// `None`: the model's.
    pub capabilities: Option<Vec<String>>,
    pub input_modalities: Option<Vec<String>>,
    pub context_length: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub id: String,
    pub name: String,
    pub aliases: Vec<String>,
    pub context_length: u32,
    pub max_output_tokens: u32,
    pub input_modalities: Vec<String>,
    pub capabilities: Vec<String>,
    pub fixed_parameters: Vec<String>,
    /// The model has graded reasoning effort levels; when false, an effort only turns thinking on
    /// (or off for `none`) and is reported in `x-tollgate-warning`.
    pub reasoning_efforts: bool,
    pub routes: Vec<RouteConfig>,
    pub routing: RoutingConfig,
}

impl ModelConfig {
    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }
}

impl Config {
    /// Loads and resolves a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), path.parent())
    }

    /// The built-in default configuration.
    pub fn builtin_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, "<built-in default>", None)
    }

    /// Parses and resolves config text. `origin` names the source in error messages; relative
    /// `model_path`s resolve against `base_dir` when given, else the working directory.
    pub fn parse(text: &str, origin: &str, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse(describe_toml_error(origin, text, &e)))?;
        resolve(raw, base_dir, &|name| std::env::var(name).ok())
            .map_err(|msg| ConfigError::Invalid(format!("{origin}: {msg}")))
    }
}

/// Formats a TOML error as `file:line:col: message` (toml's spans give byte offsets).
fn describe_toml_error(origin: &str, text: &str, err: &toml::de::Error) -> String {
    let msg = err.message().trim().to_string();
    match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            let key = text.get(span.clone()).unwrap_or("").trim();
            if msg.starts_with("unknown field") {
                format!("{origin}:{line}:{col}: {msg} (key `{key}` on line {line})")
            } else {
                format!("{origin}:{line}:{col}: {msg}")
            }
        }
        None => format!("{origin}: {msg}"),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let upto = &text[..offset.min(text.len())];
    let line = upto.matches('\n').count() + 1;
    let col = upto.rfind('\n').map_or(upto.len(), |i| upto.len() - i - 1) + 1;
    (line, col)
}

/// Converts a USD-per-million-tokens price from the file into integer micro-USD per million tokens.
fn usd_to_micros(what: &str, usd: f64) -> Result<u64, String> {
    if !usd.is_finite() || usd < 0.0 {
        return Err(format!("{what} must be a non-negative number, got {usd}"));
    }
    let micros = (usd * 1_000_000.0).round();
    if micros > 1e15 {
        return Err(format!("{what} is implausibly large: {usd}"));
    }
    Ok(micros as u64)
}

fn resolve(
    raw: RawConfig,
    base_dir: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, String> {
    let listen_text = raw
        .server
        .listen
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let listen: SocketAddr = listen_text
        .parse()
        .map_err(|e| format!("[server] listen = {listen_text:?} is not an address: {e}"))?;
    let server = ServerConfig {
        listen,
        max_body_bytes: raw.server.max_body_bytes.unwrap_or(32 * 1024 * 1024),
        client_timeout: Duration::from_secs(raw.server.client_timeout_secs.unwrap_or(30).max(1)),
        keepalive: Duration::from_secs(raw.server.keepalive_secs.unwrap_or(10).max(1)),
        shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_secs.unwrap_or(30)),
        metrics: raw.server.metrics.unwrap_or(true),
        metrics_token: raw
            .server
            .metrics_token_env
            .as_deref()
            .and_then(env)
            .filter(|t| !t.is_empty())
            .map(MetricsToken),
        metrics_token_env: raw.server.metrics_token_env,
    };

    if !raw.auth.static_keys.is_empty() || !raw.auth.static_keys_env.is_empty() {
        return Err("[auth] static_keys / static_keys_env were replaced by database keys: remove them and \
             create keys with `tollgate accounts create NAME` and `tollgate keys create --account NAME`"
            .to_string());
    }
    let auth = AuthConfig {
        required: raw.auth.required.unwrap_or(true),
        secret_env: raw
            .auth
            .secret_env
            .unwrap_or_else(|| "TOLLGATE_SECRET".to_string()),
        secret_file: raw.auth.secret_file.map(|f| match base_dir {
            Some(d) if Path::new(&f).is_relative() => d.join(f),
            _ => PathBuf::from(f),
        }),
    };
    let lease_admission = raw.billing.admission.as_deref() == Some("lease");
    let billing = BillingConfig {
        key_cache: Duration::from_secs(
            raw.billing
                .key_cache_secs
                .unwrap_or(if lease_admission { 5 } else { 0 }),
        ),
        hold_ttl: Duration::from_secs(raw.billing.hold_ttl_secs.unwrap_or(3600).max(1)),
        sweep_interval: Duration::from_secs(raw.billing.sweep_interval_secs.unwrap_or(30).max(1)),
        allow_unpriced: raw.billing.allow_unpriced.unwrap_or(false),
        lease: match raw.billing.admission.as_deref() {
            None | Some("hold") => None,
            Some("lease") => Some(LeaseConfig {
                slice_micros: match raw.billing.lease_usd.as_deref() {
                    None => 5_000_000,
                    Some(v) => match crate::billing::parse_usd(v) {
                        Ok(m) if m > 0 => m,
                        _ => {
                            return Err(format!(
                                "[billing] lease_usd = \"{v}\": expected a positive amount such as \"5.00\""
                            ))
                        }
                    },
                },
                ttl: Duration::from_secs(raw.billing.lease_ttl_secs.unwrap_or(60).max(3)),
                journal_dir: raw.billing.journal_dir.map(|f| match base_dir {
                    Some(d) if Path::new(&f).is_relative() => d.join(f),
                    _ => PathBuf::from(f),
                }),
            }),
            Some(other) => {
                return Err(format!(
                    "[billing] admission = \"{other}\": expected \"hold\" or \"lease\""
                ))
            }
        },
    };
    let plans = resolve_plans(raw.plans)?;
    let limits = resolve_limits(raw.limits)?;

    let mut providers = Vec::with_capacity(raw.providers.len());
    for p in raw.providers {
        let preset = match &p.preset {
            Some(name) => Some(preset(name).ok_or_else(|| {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
                format!(
                    "provider {:?}: unknown preset {name:?} (known: {})",
                    p.name,
                    names.join(", ")
                )
            })?),
            None => None,
        };
        let dialect = p
            .dialect
            .or(preset.map(|p| p.dialect))
            .ok_or_else(|| format!("provider {:?}: set `dialect` (or `preset`)", p.name))?;
        let base_url = match (p.base_url, preset) {
            (Some(u), _) => u,
            (None, Some(pr)) => pr.base_url.to_string(),
            (None, None) if dialect == Dialect::Local => String::new(),
            (None, None) => {
                return Err(format!(
                    "provider {:?}: set `base_url` (or `preset`)",
                    p.name
                ))
            }
        };
        if dialect != Dialect::Local
            && !(base_url.starts_with("http://") || base_url.starts_with("https://"))
        {
            return Err(format!(
                "provider {:?}: base_url {base_url:?} must start with http:// or https://",
                p.name
            ));
        }
        let api_key_env = p
            .api_key_env
            .or(preset.and_then(|pr| pr.api_key_env.map(str::to_string)));
        let api_key = api_key_env
            .as_deref()
            .and_then(env)
            .filter(|k| !k.is_empty());
        if providers.iter().any(|q: &ProviderConfig| q.name == p.name) {
            return Err(format!("provider {:?} is defined twice", p.name));
        }
        let ms = |v: Option<u64>, d: u64| Duration::from_millis(v.unwrap_or(d));
        providers.push(ProviderConfig {
            name: p.name,
            dialect,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key_env,
            api_key,
            headers: p.headers.into_iter().collect(),
            timeouts: Timeouts {
                connect: ms(p.connect_timeout_ms, 5_000),
                first_byte: ms(p.first_byte_timeout_ms, 120_000),
                idle: ms(p.idle_timeout_ms, 120_000),
                total: ms(p.request_timeout_ms, 900_000),
            },
            kimi_k26_model: preset.and_then(|pr| pr.kimi_k26_model),
        });
    }

    let mut models: Vec<ModelConfig> = Vec::with_capacity(raw.models.len());
    let mut names: HashMap<String, String> = HashMap::new();
    for m in raw.models {
        for n in std::iter::once(&m.id).chain(m.aliases.iter()) {
            if let Some(prev) = names.insert(n.clone(), m.id.clone()) {
                return Err(format!(
                    "model name {n:?} is used by both {prev:?} and {:?}",
                    m.id
                ));
            }
        }
        if m.routes.is_empty() {
            return Err(format!("model {:?} has no [[models.routes]]", m.id));
        }
        let mut routes = Vec::with_capacity(m.routes.len());
        for r in m.routes {
            let provider = providers
                .iter()
                .find(|p| p.name == r.provider)
                .ok_or_else(|| {
                    format!(
                        "model {:?}: route names unknown provider {:?}",
                        m.id, r.provider
                    )
                })?;
            let upstream_model = r
                .upstream_model
                .or_else(|| {
                    provider
                        .kimi_k26_model
                        .filter(|_| m.id == "kimi-k2.6")
                        .map(str::to_string)
                })
                .unwrap_or_else(|| m.id.clone());
            let priced = r.price_per_mtok.is_some();
            let price = match r.price_per_mtok {
                Some(p) => Price {
                    input: usd_to_micros(&format!("model {:?} price input", m.id), p.input)?,
                    cached_input: usd_to_micros(
                        &format!("model {:?} price cached_input", m.id),
                        p.cached_input.unwrap_or(p.input),
                    )?,
                    output: usd_to_micros(&format!("model {:?} price output", m.id), p.output)?,
                },
                None => Price::default(),
            };
            let model_path = r.model_path.map(|p| {
                let p = PathBuf::from(p);
                match base_dir {
                    Some(dir) if p.is_relative() && !dir.as_os_str().is_empty() => dir.join(p),
                    _ => p,
                }
            });
            if provider.dialect == Dialect::Local && model_path.is_none() {
                return Err(format!(
                    "model {:?}: a route to local provider {:?} needs `model_path`",
                    m.id, provider.name
                ));
            }
            routes.push(RouteConfig {
                provider: r.provider,
                upstream_model,
                price,
                priced,
                weight: r.weight.unwrap_or(1),
                model_path,
                capabilities: r.capabilities,
                input_modalities: r.input_modalities,
                context_length: r.context_length,
            });
        }
        let max_output_tokens = m.max_output_tokens.unwrap_or(16_384);
        let context_length = m.context_length.unwrap_or(131_072);
        if max_output_tokens == 0 || context_length == 0 {
            return Err(format!(
                "model {:?}: context_length and max_output_tokens must be > 0",
                m.id
            ));
        }
        for modality in &m.input_modalities {
            if !matches!(
                modality.as_str(),
                "text" | "image" | "video" | "audio" | "file"
            ) {
                return Err(format!(
                    "model {:?}: unknown input modality {modality:?}",
                    m.id
                ));
            }
        }
        let routing = resolve_routing(&m.id, m.routing)?;
        models.push(ModelConfig {
            name: m.name.unwrap_or_else(|| m.id.clone()),
            id: m.id,
            aliases: m.aliases,
            context_length,
            max_output_tokens,
            input_modalities: if m.input_modalities.is_empty() {
                vec!["text".to_string()]
            } else {
                m.input_modalities
            },
            capabilities: m.capabilities,
            fixed_parameters: m.fixed_parameters,
            reasoning_efforts: m.reasoning_efforts.unwrap_or(true),
            routes,
            routing,
        });
    }

    let database_url = raw
        .database
        .and_then(|d| d.url)
        .unwrap_or_else(|| "sqlite://tollgate.db".to_string());

    Ok(Config {
        server,
        auth,
        database_url,
        billing,
        providers,
        models,
        health: resolve_health(raw.health)?,
        plans,
        limits,
    })
}

fn resolve_plans(raw: Vec<RawPlan>) -> Result<Vec<PlanConfig>, String> {
    let mut plans: Vec<PlanConfig> = Vec::with_capacity(raw.len());
    for p in raw {
        if p.name.is_empty() {
            return Err("[[plans]] entry without a name".to_string());
        }
        if plans.iter().any(|q| q.name == p.name) {
            return Err(format!("plan {:?} is defined twice", p.name));
        }
        let check = |what: &str, v: Option<u64>| -> Result<Option<u64>, String> {
            match v {
                Some(0) => Err(format!(
                    "plan {:?}: {what} = 0 would refuse everything; omit it for no limit",
                    p.name
                )),
                Some(n) if n > 1_000_000_000 => Err(format!(
                    "plan {:?}: {what} = {n} is larger than the supported 1000000000",
                    p.name
                )),
                v => Ok(v),
            }
        };
        let usd = |what: &str, v: Option<f64>| -> Result<Option<u64>, String> {
            v.map(|u| usd_to_micros(&format!("plan {:?} {what}", p.name), u))
                .transpose()
        };
        plans.push(PlanConfig {
            requests_per_minute: check("requests_per_minute", p.requests_per_minute)?,
            tokens_per_minute: check("tokens_per_minute", p.tokens_per_minute)?,
            max_concurrent: check("max_concurrent", p.max_concurrent)?,
            requests_per_day: check("requests_per_day", p.requests_per_day)?,
            tokens_per_day: check("tokens_per_day", p.tokens_per_day)?,
            spend_cap_daily_micros: usd("spend_cap_daily_usd", p.spend_cap_daily_usd)?,
            spend_cap_monthly_micros: usd("spend_cap_monthly_usd", p.spend_cap_monthly_usd)?,
            name: p.name,
        });
    }
    Ok(plans)
}

fn resolve_limits(raw: RawLimits) -> Result<LimitsConfig, String> {
    let d = LimitsConfig::default();
    let backend = raw.backend.unwrap_or(if raw.redis_url.is_some() {
        LimitsBackend::Redis
    } else {
        LimitsBackend::Memory
    });
    if backend == LimitsBackend::Redis && raw.redis_url.is_none() {
        return Err(
            "[limits] backend = \"redis\" needs redis_url (or pass --redis-url)".to_string(),
        );
    }
    let timezone = raw.timezone.unwrap_or(d.timezone);
    crate::limits::calendar::Zone::parse(&timezone)
        .map_err(|e| format!("[limits] timezone: {e}"))?;
    Ok(LimitsConfig {
        backend,
        redis_url: raw.redis_url,
        on_redis_down: raw.on_redis_down.unwrap_or(d.on_redis_down),
        fail_open_local_cap: raw
            .fail_open_local_cap
            .unwrap_or(d.fail_open_local_cap)
            .max(1),
        timezone,
        redis_timeout: raw
            .redis_timeout_ms
            .map(|ms| Duration::from_millis(ms.max(1)))
            .unwrap_or(d.redis_timeout),
        concurrency_lease: raw
            .concurrency_lease_secs
            .map(|s| Duration::from_secs(s.max(1)))
            .unwrap_or(d.concurrency_lease),
        subject_cache: raw
            .subject_cache_ms
            .map_or(d.subject_cache, Duration::from_millis),
    })
}

fn resolve_routing(model: &str, r: RawRouting) -> Result<RoutingConfig, String> {
    let d = RoutingConfig::default();
    let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
    let out = RoutingConfig {
        policy: r.policy.unwrap_or(d.policy),
        max_attempts: r.max_attempts.unwrap_or(d.max_attempts),
        deadline: ms(r.deadline_ms, d.deadline),
        complete_deadline: ms(r.complete_deadline_ms, d.complete_deadline),
        first_chunk_timeout: ms(r.first_chunk_timeout_ms, d.first_chunk_timeout),
        retry_budget_percent: r.retry_budget_percent.unwrap_or(d.retry_budget_percent),
        retry_budget_min_per_sec: r
            .retry_budget_min_per_sec
            .unwrap_or(d.retry_budget_min_per_sec),
        max_retry_after: ms(r.max_retry_after_ms, d.max_retry_after),
        backoff_base: ms(r.backoff_base_ms, d.backoff_base),
        backoff_max: ms(r.backoff_max_ms, d.backoff_max),
        affinity: r.affinity.unwrap_or(d.affinity),
    };
    if out.max_attempts == 0 || out.max_attempts > 10 {
        return Err(format!(
            "model {model:?}: routing.max_attempts must be between 1 and 10"
        ));
    }
    if out.retry_budget_percent > 100 {
        return Err(format!(
            "model {model:?}: routing.retry_budget_percent must be at most 100"
        ));
    }
    if out.deadline.is_zero()
        || out.complete_deadline.is_zero()
        || out.first_chunk_timeout.is_zero()
    {
        return Err(format!(
            "model {model:?}: routing.deadline_ms, complete_deadline_ms and first_chunk_timeout_ms must be > 0"
        ));
    }
    Ok(out)
}

fn resolve_health(h: RawHealth) -> Result<HealthConfig, String> {
    let d = HealthConfig::default();
    let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
    let out = HealthConfig {
        consecutive_failures: h.consecutive_failures.unwrap_or(d.consecutive_failures),
        error_rate_percent: h.error_rate_percent.unwrap_or(d.error_rate_percent),
        error_rate_min_requests: h
            .error_rate_min_requests
            .unwrap_or(d.error_rate_min_requests),
        error_rate_window: h.error_rate_window.unwrap_or(d.error_rate_window),
        base_ejection: ms(h.base_ejection_ms, d.base_ejection),
        max_ejection: ms(h.max_ejection_ms, d.max_ejection),
        max_cooldown: ms(h.max_cooldown_ms, d.max_cooldown),
    };
    if out.consecutive_failures == 0 {
        return Err("[health] consecutive_failures must be > 0".into());
    }
    if out.error_rate_window == 0 || out.error_rate_window > 10_000 {
        return Err("[health] error_rate_window must be between 1 and 10000".into());
    }
    if out.max_ejection < out.base_ejection {
        return Err("[health] max_ejection_ms must be >= base_ejection_ms".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8080"

[[providers]]
name = "moonshot"
base_url = "https://api.moonshot.ai/v1"
api_key_env = "MOONSHOT_API_KEY"
dialect = "moonshot"

[[models]]
id = "kimi-k2.6"
aliases = ["kimi-k2-6", "moonshot/kimi-k2.6", "moonshotai/kimi-k2.6"]
context_length = 262144
max_output_tokens = 16000
input_modalities = ["text", "image", "video"]
capabilities = ["reasoning", "tools", "json_object"]
  [[models.routes]]
  provider = "moonshot"
  upstream_model = "kimi-k2.6"
  price_per_mtok = { input = 0.60, cached_input = 0.10, output = 3.00 }
"#;

    fn parse(text: &str) -> Result<Config, String> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| describe_toml_error("t.toml", text, &e))?;
        resolve(raw, None, &|name| {
            (name == "MOONSHOT_API_KEY").then(|| "sk-secret".to_string())
        })
    }

    #[test]
    fn issue_example_parses_with_integer_prices() {
        let c = parse(EXAMPLE).expect("parses");
        assert_eq!(
            c.models[0].routes[0].price,
            Price {
                input: 600_000,
                cached_input: 100_000,
                output: 3_000_000
            }
        );
        assert_eq!(c.providers[0].api_key.as_deref(), Some("sk-secret"));
        assert!(!format!("{:?}", c.providers[0]).contains("sk-secret"));
        assert!(c.auth.required);
    }

    #[test]
    fn billing_admission_modes() {
        let c = parse(EXAMPLE).expect("parses");
        assert!(c.billing.lease.is_none(), "hold admission by default");
        assert!(c.billing.key_cache.is_zero(), "no key cache by default");
        let lease = |extra: &str| parse(&format!("[billing]\n{extra}\n{EXAMPLE}"));
        let c = lease("admission = \"lease\"").expect("parses");
        let l = c.billing.lease.expect("lease settings");
        assert_eq!((l.slice_micros, l.ttl.as_secs()), (5_000_000, 60));
        assert!(l.journal_dir.is_none());
        assert_eq!(
            c.billing.key_cache.as_secs(),
            5,
            "lease admission caches keys 5 s"
        );
        let c = lease("admission = \"lease\"\nlease_usd = \"0.25\"\nlease_ttl_secs = 1")
            .expect("parses");
        let l = c.billing.lease.expect("lease settings");
        assert_eq!(
            (l.slice_micros, l.ttl.as_secs()),
            (250_000, 3),
            "TTL floor 3 s"
        );
        let err = lease("admission = \"later\"").unwrap_err();
        assert!(err.contains("expected \"hold\" or \"lease\""), "{err}");
        let err = lease("admission = \"lease\"\nlease_usd = \"-1\"").unwrap_err();
        assert!(err.contains("lease_usd"), "{err}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = EXAMPLE.replace(
            "dialect = \"moonshot\"",
            "dialect = \"moonshot\"\nbase_ulr = \"x\"",
        );
        let err = parse(&text).unwrap_err();
        assert!(err.contains("base_ulr"), "{err}");
        assert!(err.contains("t.toml:10:"), "{err}");
    }

    #[test]
    fn preset_fills_base_url_and_k26_model() {
        let text = r#"
[[providers]]
name = "or"
preset = "openrouter"
[[models]]
id = "kimi-k2.6"
  [[models.routes]]
  provider = "or"
"#;
        let c = parse(text).expect("parses");
        assert_eq!(c.providers[0].base_url, "https://openrouter.ai/api/v1");
        assert_eq!(c.providers[0].dialect, Dialect::Openrouter);
        assert_eq!(c.models[0].routes[0].upstream_model, "moonshotai/kimi-k2.6");
    }

    #[test]
    fn route_to_unknown_provider_is_an_error() {
        let err =
            parse(&EXAMPLE.replace("provider = \"moonshot\"", "provider = \"nope\"")).unwrap_err();
        assert!(err.contains("unknown provider \"nope\""), "{err}");
    }

    #[test]
    fn duplicate_alias_is_an_error() {
        let text = format!("{EXAMPLE}\n[[models]]\nid = \"kimi-k2-6\"\n  [[models.routes]]\n  provider = \"moonshot\"\n");
        assert!(parse(&text).unwrap_err().contains("used by both"));
    }

    #[test]
    fn routing_and_health_settings_parse_with_defaults() {
        let text = EXAMPLE.replace(
            "capabilities = [\"reasoning\", \"tools\", \"json_object\"]",
            "capabilities = [\"reasoning\", \"tools\", \"json_object\"]\nrouting = { policy = \"cheapest\", max_attempts = 2, max_retry_after_ms = 5000 }",
        ) + "\n[health]\nconsecutive_failures = 3\nbase_ejection_ms = 1000\n";
        let c = parse(&text).expect("parses");
        let r = &c.models[0].routing;
        assert_eq!(r.policy, RoutingPolicy::Cheapest);
        assert_eq!(r.max_attempts, 2);
        assert_eq!(r.max_retry_after, Duration::from_secs(5));
        assert_eq!(r.retry_budget_percent, 20, "default");
        assert_eq!(c.health.consecutive_failures, 3);
        assert_eq!(c.health.base_ejection, Duration::from_secs(1));
        assert_eq!(c.health.max_ejection, Duration::from_secs(300), "default");
        let bad = EXAMPLE.replace(
            "capabilities = [\"reasoning\", \"tools\", \"json_object\"]",
            "routing = { max_atempts = 2 }",
        );
        assert!(parse(&bad).unwrap_err().contains("max_atempts"));
        let bad = EXAMPLE.replace(
            "capabilities = [\"reasoning\", \"tools\", \"json_object\"]",
            "routing = { max_attempts = 0 }",
        );
        assert!(parse(&bad).unwrap_err().contains("max_attempts"));
    }

    #[test]
    fn builtin_default_is_valid() {
        let c = Config::builtin_default().expect("default config parses");
        // Auth is required by default, the built-in config included; open mode is opt-in.
        assert!(c.auth.required);
        assert_eq!(c.database_url, "sqlite://tollgate.db");
        assert!(c.server.listen.ip().is_loopback());
        assert!(c.models.iter().any(|m| m.id == "smollm2-135m-instruct"));
    }
}
