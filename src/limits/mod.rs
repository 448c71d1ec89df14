//! Rate limits, daily quotas and spend caps: per key and per account, in process or shared through
//! Redis across instances.
//!
//! One admission check covers every limit of every scope (the key and, when it has one, its
//! account): requests/min and tokens/min (GCRA, [`bucket`]), concurrent in-flight requests (leases),
//! requests/day and tokens/day (calendar day in `[limits] timezone`, [`calendar`]) and a daily and
//! monthly spend cap (integer micro-USD). Either every limit admits and all are charged together,
//! or nothing is charged and the request is refused with the limit that refused it and how long to
//! wait. Tokens and spend are reserved at their worst case up front and corrected to the actual
//! usage when the request ends ([`Admitted::settle`]); the concurrency slot is released then too,
//! including when the client disconnects (the stream's drop reports the outcome).

pub mod bucket;
pub mod calendar;
mod memory;
pub mod overrides;
mod redis;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::config::{Config, LimitsBackend, OnRedisDown, PlanConfig};
use crate::error::GatewayError;
use crate::gateway::usage::{Outcome, OutcomeSink};
use calendar::Zone;

pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// The id a presented API key is limited (and shown to operators) under: a truncated SHA-256, never
/// the key itself (and not the full hash, so Redis key names reveal nothing useful).
pub fn key_id(key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"tollgate-key-id\0");
    h.update(key.as_bytes());
    let d = h.finalize();
    let mut s = String::with_capacity(28);
    s.push_str("key_");
    for b in &d[..12] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether a limit applies to one key or to everything an account does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Key,
    Account,
}

impl ScopeKind {
    fn tag(self) -> &'static str {
        match self {
            ScopeKind::Key => "k",
            ScopeKind::Account => "a",
        }
    }
}

/// One scope a request is limited in: a key or an account, with the plan that applies to it.
#[derive(Debug, Clone)]
pub struct Scope {
    pub kind: ScopeKind,
    pub id: String,
    pub plan: Arc<PlanConfig>,
}

impl Scope {
    /// The prefix of this scope's state (in Redis: key names; in memory: map keys).
    fn state_key(&self) -> String {
        format!("tg:rl:{}:{}", self.kind.tag(), self.id)
    }
}

/// Who a request is limited as: its key and its account. A plan assigned to an account limits each
/// of the account's keys by its per-key limits (requests/tokens per minute, concurrency) and the
/// account as a whole by its per-account limits (requests/tokens per day, spend caps).
#[derive(Debug, Clone)]
pub struct LimitSubject {
    pub key_id: String,
    pub account_id: Option<String>,
    /// Scopes with a plan; empty means "no limits".
    pub scopes: Vec<Scope>,
}

impl LimitSubject {
    /// A key limited by `plan` (if any), with no account.
    pub fn key(key_id: String, plan: Option<Arc<PlanConfig>>) -> LimitSubject {
        let scopes = plan
            .map(|plan| Scope {
                kind: ScopeKind::Key,
                id: key_id.clone(),
                plan,
            })
            .into_iter()
            .collect();
        LimitSubject {
            key_id,
            account_id: None,
            scopes,
        }
    }

    /// A key of an account: `account_plan` limits the whole account, `key_plan` (an override) the key.
    pub fn account_key(
        key_id: String,
        account_id: String,
        key_plan: Option<Arc<PlanConfig>>,
        account_plan: Option<Arc<PlanConfig>>,
    ) -> LimitSubject {
        let mut s = LimitSubject::key(key_id, key_plan);
        if let Some(plan) = account_plan {
            s.scopes.push(Scope {
                kind: ScopeKind::Account,
                id: account_id.clone(),
                plan,
            });
        }
        s.account_id = Some(account_id);
        s
    }

    /// The subject for a key of an account whose plan is `plan`: per-minute and concurrency limits
    /// on the key, daily quotas and spend caps on the account.
    pub fn from_plan(
        key_id: String,
        account_id: String,
        plan: Option<Arc<PlanConfig>>,
    ) -> LimitSubject {
        let none = PlanConfig::default();
        LimitSubject::effective(key_id, account_id, plan.as_deref(), &none, &none)
    }

    /// The subject for a key of an account under `plan`, with the account's and the key's
    /// overrides (each field that is set replaces the plan's value):
    /// - the account's effective plan is its overrides over `plan`;
    /// - the key is limited by its per-minute and concurrency limits (key override, else the
    ///   account's effective value) and, only if the key has such overrides, by its own daily
    ///   quotas and spend caps;
    /// - the account as a whole is limited by the effective daily quotas and spend caps.
    pub fn effective(
        key_id: String,
        account_id: String,
        plan: Option<&PlanConfig>,
        account_overrides: &PlanConfig,
        key_overrides: &PlanConfig,
    ) -> LimitSubject {
        let none = PlanConfig::default();
        let base = plan.unwrap_or(&none);
        let overridden = LimitKind::any_set(account_overrides) || LimitKind::any_set(key_overrides);
        let name = match (plan, overridden) {
            (Some(p), false) => p.name.clone(),
            (Some(p), true) => format!("{} + overrides", p.name),
            (None, _) => "overrides".to_string(),
        };
        let mut per_key = PlanConfig {
            name: name.clone(),
            ..PlanConfig::default()
        };
        let mut per_account = per_key.clone();
        for k in LimitKind::ALL {
            let account_value = k.of(account_overrides).or(k.of(base));
            if k.per_key() {
                k.set(&mut per_key, k.of(key_overrides).or(account_value));
            } else {
                k.set(&mut per_key, k.of(key_overrides));
                k.set(&mut per_account, account_value);
            }
        }
        let key_plan = LimitKind::any_set(&per_key).then(|| Arc::new(per_key));
        let account_plan = LimitKind::any_set(&per_account).then(|| Arc::new(per_account));
        LimitSubject::account_key(key_id, account_id, key_plan, account_plan)
    }

    pub fn is_limited(&self) -> bool {
        !self.scopes.is_empty()
    }

    /// Whether [`Self::effective`] with these plans would limit anything, without building it
    /// (every request of an unlimited key asks).
    pub fn any_limit(
        plan: Option<&PlanConfig>,
        account_overrides: &PlanConfig,
        key_overrides: &PlanConfig,
    ) -> bool {
        plan.is_some_and(LimitKind::any_set)
            || LimitKind::any_set(account_overrides)
            || LimitKind::any_set(key_overrides)
    }
}

/// What a request asks for: the worst case reserved up front.
#[derive(Debug, Clone)]
pub struct Demand {
    pub request_id: String,
    /// Prompt estimate + maximum output.
    pub tokens: u64,
    /// Worst-case cost in micro-USD.
    pub cost_micros: u64,
}

/// One kind of limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    MaxConcurrent,
    RequestsPerDay,
    TokensPerDay,
    SpendCapDaily,
    SpendCapMonthly,
}

impl LimitKind {
    pub const ALL: [LimitKind; 7] = [
        LimitKind::RequestsPerMinute,
        LimitKind::TokensPerMinute,
        LimitKind::MaxConcurrent,
        LimitKind::RequestsPerDay,
        LimitKind::TokensPerDay,
        LimitKind::SpendCapDaily,
        LimitKind::SpendCapMonthly,
    ];

    #[cfg(test)]
    fn index(self) -> i64 {
        LimitKind::ALL.iter().position(|k| *k == self).unwrap_or(0) as i64
    }

    fn from_index(i: i64) -> Option<LimitKind> {
        usize::try_from(i)
            .ok()
            .and_then(|i| LimitKind::ALL.get(i).copied())
    }

    /// The error code a refusal by this limit carries.
    pub fn code(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::TokensPerMinute => "rate_limit_exceeded",
            LimitKind::MaxConcurrent => "concurrency_limit_exceeded",
            LimitKind::RequestsPerDay | LimitKind::TokensPerDay => "daily_quota_exceeded",
            LimitKind::SpendCapDaily | LimitKind::SpendCapMonthly => "spend_cap_exceeded",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::MaxConcurrent => "max_concurrent",
            LimitKind::RequestsPerDay => "requests_per_day",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::SpendCapDaily => "spend_cap_daily",
            LimitKind::SpendCapMonthly => "spend_cap_monthly",
        }
    }

    /// Whether a plan's value of this limit applies to each key (per-minute limits, concurrency)
    /// rather than to the account as a whole (daily quotas, spend caps).
    pub fn per_key(self) -> bool {
        matches!(
            self,
            LimitKind::RequestsPerMinute | LimitKind::TokensPerMinute | LimitKind::MaxConcurrent
        )
    }

    /// Whether the limit is money (micro-USD) rather than a count.
    pub fn is_money(self) -> bool {
        matches!(self, LimitKind::SpendCapDaily | LimitKind::SpendCapMonthly)
    }

    /// Sets the plan's value for this limit.
    pub fn set(self, p: &mut PlanConfig, v: Option<u64>) {
        let field = match self {
            LimitKind::RequestsPerMinute => &mut p.requests_per_minute,
            LimitKind::TokensPerMinute => &mut p.tokens_per_minute,
            LimitKind::MaxConcurrent => &mut p.max_concurrent,
            LimitKind::RequestsPerDay => &mut p.requests_per_day,
            LimitKind::TokensPerDay => &mut p.tokens_per_day,
            LimitKind::SpendCapDaily => &mut p.spend_cap_daily_micros,
            LimitKind::SpendCapMonthly => &mut p.spend_cap_monthly_micros,
        };
        *field = v;
    }

    /// Whether `p` sets any limit at all.
    pub fn any_set(p: &PlanConfig) -> bool {
        LimitKind::ALL.iter().any(|k| k.of(p).is_some())
    }

    /// The plan's value for this limit.
    pub fn of(self, p: &PlanConfig) -> Option<u64> {
        match self {
            LimitKind::RequestsPerMinute => p.requests_per_minute,
            LimitKind::TokensPerMinute => p.tokens_per_minute,
            LimitKind::MaxConcurrent => p.max_concurrent,
            LimitKind::RequestsPerDay => p.requests_per_day,
            LimitKind::TokensPerDay => p.tokens_per_day,
            LimitKind::SpendCapDaily => p.spend_cap_daily_micros,
            LimitKind::SpendCapMonthly => p.spend_cap_monthly_micros,
        }
    }
}

/// The current state of one limit of one scope.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LimitStatus {
    pub scope: ScopeKind,
    pub limit: LimitKind,
    pub max: u64,
    pub used: u64,
    pub remaining: u64,
    /// Milliseconds until the limit is fully available again (0 when unused).
    pub reset_ms: u64,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: ScopeKind,
    pub limit: LimitKind,
    pub max: u64,
    /// `None`: waiting cannot help (the request alone exceeds the limit).
    pub retry_after_ms: Option<u64>,
}

/// What a backend answers to an admission check.
#[derive(Debug, Clone)]
pub struct Decision {
    pub refusal: Option<Refusal>,
    /// Every limit's state after the check (after charging, if admitted).
    pub status: Vec<LimitStatus>,
    /// The calendar windows the charges went to (for corrections on settlement).
    pub day: i64,
    pub month: i64,
}

/// A backend failure (Redis unreachable, timed out, or answered nonsense).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitsError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis call timed out after {0:?}")]
    Timeout(Duration),
    #[error("limiter state is malformed: {0}")]
    Malformed(String),
}

/// The correction applied when a request ends.
#[derive(Debug, Clone)]
pub(crate) struct Settlement {
    pub request_id: String,
    pub day: i64,
    pub month: i64,
    /// Actual minus reserved (usually ≤ 0).
    pub tokens_delta: i64,
    pub cost_delta: i64,
}

/// The instance's clock in Unix milliseconds (the in-process backend's authority).
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

enum Primary {
    Memory(Arc<MemoryBackend>),
    Redis(Arc<RedisBackend>),
}

/// Which backend admitted a request (its settlement must go to the same one).
#[derive(Clone)]
enum Charged {
    Memory(Arc<MemoryBackend>),
    Redis(Arc<RedisBackend>),
}

/// The limiter: checks admissions and settles them.
pub struct Limiter {
    primary: Primary,
    /// Fail-open fallback: in-memory, each plan capped at `fail_open_local_cap` requests/min.
    local: Arc<MemoryBackend>,
    on_redis_down: OnRedisDown,
    local_cap: u64,
    redis_down: AtomicBool,
    /// While Redis is down, requests skip it until this instant (ms) instead of each waiting for
    /// a timeout; then one request probes it again (and `/readyz` pings it every time).
    redis_retry_at: AtomicI64,
    /// Key id -> (when read, what was read): the key's plan and overrides, kept for
    /// `subject_cache` (`[limits] subject_cache_ms`; 0, the default, reads them on every request).
    subjects: std::sync::Mutex<
        std::collections::HashMap<String, (std::time::Instant, Arc<overrides::SubjectRow>)>,
    >,
    subject_cache: Duration,
}

/// Waits longer than this are not slept by the OpenAI SDKs (they fall back to their own short
/// back-off), so such refusals say `x-should-retry: false`.
pub const SDK_MAX_RETRY_AFTER_MS: u64 = 60_000;

/// How long a failed Redis call makes requests skip Redis before probing again.
const REDIS_PROBE_INTERVAL_MS: i64 = 1_000;

/// The limiter's state for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub backend: &'static str,
    /// `"ok"`, or `"down"` when Redis is unreachable.
    pub state: &'static str,
    pub on_redis_down: Option<&'static str>,
    /// Whether requests are currently served (false only when Redis is down and fail_closed).
    pub admitting: bool,
}

impl Limiter {
    /// Builds the limiter from `[limits]` (the Redis connection is made lazily; a Redis that is
    /// down at start is handled like one that goes down later).
    pub fn new(config: &Config) -> Result<Limiter, String> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`Limiter::new`], with the in-process backends on `clock` (tests pass a manual clock).
    pub fn with_clock(config: &Config, clock: Arc<dyn Clock>) -> Result<Limiter, String> {
        let l = &config.limits;
        let zone = Zone::parse(&l.timezone)?;
        let memory = Arc::new(MemoryBackend::new(zone, clock.clone(), l.concurrency_lease));
        let primary = match l.backend {
            LimitsBackend::Memory => Primary::Memory(memory.clone()),
            LimitsBackend::Redis => {
                let url = l
                    .redis_url
                    .as_deref()
                    .ok_or("[limits] backend = \"redis\" needs redis_url")?;
                Primary::Redis(Arc::new(RedisBackend::new(
                    url,
                    zone,
                    l.redis_timeout,
                    l.concurrency_lease,
                )?))
            }
        };
        Ok(Limiter {
            primary,
            local: Arc::new(MemoryBackend::new(zone, clock, l.concurrency_lease)),
            on_redis_down: l.on_redis_down,
            local_cap: l.fail_open_local_cap,
            redis_down: AtomicBool::new(false),
            redis_retry_at: AtomicI64::new(0),
            subjects: std::sync::Mutex::new(std::collections::HashMap::new()),
            subject_cache: l.subject_cache,
        })
    }

    /// The scopes the fail-open fallback enforces in this instance: the whole plan, with
    /// requests/min capped at `fail_open_local_cap`. Daily quotas and spend caps start from the
    /// shared usage this instance last saw from Redis (see [`MemoryBackend::observe`]).
    fn local_scopes(&self, scopes: &[Scope]) -> Vec<Scope> {
        scopes
            .iter()
            .map(|s| {
                let cap = s
                    .plan
                    .requests_per_minute
                    .map_or(self.local_cap, |r| r.min(self.local_cap));
                Scope {
                    kind: s.kind,
                    id: s.id.clone(),
                    plan: Arc::new(PlanConfig {
                        name: format!("{} (local fail-open cap)", s.plan.name),
                        requests_per_minute: Some(cap),
                        ..(*s.plan).clone()
                    }),
                }
            })
            .collect()
    }

    /// Checks and charges every limit of `subject` for `demand`. `Ok(Admitted)` carries the rate
    /// headers; `Err` is the refusal (429, or 503 when Redis is down and `fail_closed`), with the
    /// headers to send along.
    pub async fn admit(
        &self,
        subject: &LimitSubject,
        demand: Demand,
    ) -> Result<Admitted, (GatewayError, RateHeaders)> {
        if !subject.is_limited() {
            return Ok(Admitted::unlimited());
        }
        let (decision, charged, scopes) = match &self.primary {
            Primary::Memory(m) => (
                m.admit(&subject.scopes, &demand),
                Charged::Memory(m.clone()),
                subject.scopes.clone(),
            ),
            Primary::Redis(r) => match self.redis_admit(r, &subject.scopes, &demand).await {
                Ok(d) => {
                    if self.redis_down.swap(false, Ordering::Relaxed) {
                        tracing::info!("redis is reachable again; limits are shared again");
                    }
                    if self.on_redis_down == OnRedisDown::FailOpen {
                        self.local
                            .observe(&subject.scopes, &d.status, d.day, d.month);
                    }
                    (d, Charged::Redis(r.clone()), subject.scopes.clone())
                }
                Err(e) => {
                    if !self.redis_down.swap(true, Ordering::Relaxed) {
                        self.redis_retry_at.store(
                            SystemClock.now_ms() + REDIS_PROBE_INTERVAL_MS,
                            Ordering::Relaxed,
                        );
                        tracing::error!(error = %e, mode = ?self.on_redis_down, "rate-limit backend unreachable");
                    }
                    match self.on_redis_down {
                        OnRedisDown::FailClosed => {
                            return Err((
                                GatewayError::Overloaded {
                                    message: "The rate limiter is unavailable; try again shortly."
                                        .into(),
                                    retry_after: Duration::from_secs(1),
                                },
                                RateHeaders::default(),
                            ))
                        }
                        OnRedisDown::FailOpen => {
                            let local = self.local_scopes(&subject.scopes);
                            (
                                self.local.admit(&local, &demand),
                                Charged::Memory(self.local.clone()),
                                local,
                            )
                        }
                    }
                }
            },
        };
        let mut headers = RateHeaders::from_status(&decision.status);
        match decision.refusal {
            Some(r) => {
                // Never fits, or a wait SDKs would not sleep: tell them not to retry now.
                if r.retry_after_ms
                    .is_none_or(|ms| ms > SDK_MAX_RETRY_AFTER_MS)
                {
                    headers.should_retry = Some(false);
                }
                Err((refusal_error(&r), headers))
            }
            None => Ok(Admitted {
                inner: Some(Charge {
                    backend: charged,
                    scopes,
                    request_id: demand.request_id,
                    day: decision.day,
                    month: decision.month,
                    tokens: demand.tokens,
                    cost_micros: demand.cost_micros,
                }),
                headers,
            }),
        }
    }

    async fn redis_admit(
        &self,
        r: &RedisBackend,
        scopes: &[Scope],
        demand: &Demand,
    ) -> Result<Decision, LimitsError> {
        let now = SystemClock.now_ms();
        if self.redis_down.load(Ordering::Relaxed) {
            let at = self.redis_retry_at.load(Ordering::Relaxed);
            // Only one request per interval probes; the rest go straight to the configured choice.
            if now < at
                || self
                    .redis_retry_at
                    .compare_exchange(
                        at,
                        now + REDIS_PROBE_INTERVAL_MS,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_err()
            {
                return Err(LimitsError::Redis("down (waiting to probe again)".into()));
            }
        }
        r.admit(scopes, demand).await
    }

    /// Current usage of every limit of `scopes`, without charging anything.
    pub async fn peek(&self, scopes: &[Scope]) -> Result<Vec<LimitStatus>, LimitsError> {
        match &self.primary {
            Primary::Memory(m) => Ok(m.peek(scopes)),
            Primary::Redis(r) => r.peek(scopes).await,
        }
    }

    /// Backend name and state, for `/readyz` (pings Redis with the call timeout).
    pub async fn health(&self) -> Health {
        match &self.primary {
            Primary::Memory(_) => Health {
                backend: "memory",
                state: "ok",
                on_redis_down: None,
                admitting: true,
            },
            Primary::Redis(r) => {
                let up = r.ping().await.is_ok();
                if up && self.redis_down.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis is reachable again; limits are shared again");
                } else if !up {
                    self.redis_down.store(true, Ordering::Relaxed);
                }
                let mode = match self.on_redis_down {
                    OnRedisDown::FailOpen => "fail_open",
                    OnRedisDown::FailClosed => "fail_closed",
                };
                Health {
                    backend: "redis",
                    state: if up { "ok" } else { "down" },
                    on_redis_down: Some(mode),
                    admitting: up || self.on_redis_down == OnRedisDown::FailOpen,
                }
            }
        }
    }

    /// A key's plan and overrides as read within `subject_cache` (never, when that is 0).
    pub fn cached_subject(&self, key_id: &str) -> Option<Arc<overrides::SubjectRow>> {
        if self.subject_cache.is_zero() {
            return None;
        }
        let g = self.subjects.lock().ok()?;
        g.get(key_id)
            .filter(|(at, _)| at.elapsed() < self.subject_cache)
            .map(|(_, r)| r.clone())
    }

    /// Keeps what was read for a key (when `subject_cache` is not 0).
    pub fn store_subject(&self, key_id: &str, row: Arc<overrides::SubjectRow>) {
        if self.subject_cache.is_zero() {
            return;
        }
        if let Ok(mut g) = self.subjects.lock() {
            if g.len() > 100_000 {
                let ttl = self.subject_cache;
                g.retain(|_, (at, _)| at.elapsed() < ttl);
            }
            g.insert(key_id.to_string(), (std::time::Instant::now(), row));
        }
    }

    /// Drops this instance's cached plans and overrides (after an admin changed them here).
    pub fn forget_subjects(&self) {
        if let Ok(mut g) = self.subjects.lock() {
            g.clear();
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.primary {
            Primary::Memory(_) => "memory",
            Primary::Redis(_) => "redis",
        }
    }
}

fn human_wait(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 120_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 7_200_000 {
        format!("{}m", ms.div_ceil(60_000))
    } else {
        format!("{}h", ms.div_ceil(3_600_000))
    }
}

/// The `GatewayError` for a refusal: 429 with the limit's code and `Retry-After`.
pub fn refusal_error(r: &Refusal) -> GatewayError {
    let scope = match r.scope {
        ScopeKind::Key => "key",
        ScopeKind::Account => "account",
    };
    let what = match r.limit {
        LimitKind::SpendCapDaily | LimitKind::SpendCapMonthly => format!(
            "{} of ${}.{:06} per {scope}",
            r.limit.name(),
            r.max / 1_000_000,
            r.max % 1_000_000
        ),
        _ => format!("{} limit of {} per {scope}", r.limit.name(), r.max),
    };
    let message = match r.retry_after_ms {
        Some(ms) => format!(
            "Rate limit reached: {what}. Try again in {}.",
            human_wait(ms)
        ),
        None => format!(
            "Request too large: this request alone exceeds the {what}; reduce max_tokens or the prompt. Retrying cannot help."
        ),
    };
    GatewayError::RateLimited {
        message,
        code: r.limit.code(),
        retry_after: r.retry_after_ms.map(Duration::from_millis),
    }
}

/// One OpenAI-style header trio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trio {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// The `x-ratelimit-*` values of a response: requests (per minute, else per day) and tokens (per
/// minute, else per day), of the scope with the least remaining; and `x-should-retry: false` on a
/// refusal that retrying soon cannot cure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub requests: Option<Trio>,
    pub tokens: Option<Trio>,
    pub should_retry: Option<bool>,
}

impl RateHeaders {
    pub fn from_status(status: &[LimitStatus]) -> RateHeaders {
        let pick = |minute: LimitKind, day: LimitKind| {
            let of = |k: LimitKind| {
                status
                    .iter()
                    .filter(|s| s.limit == k)
                    .min_by_key(|s| s.remaining)
                    .map(|s| Trio {
                        limit: s.max,
                        remaining: s.remaining,
                        reset_ms: s.reset_ms,
                    })
            };
            of(minute).or_else(|| of(day))
        };
        RateHeaders {
            requests: pick(LimitKind::RequestsPerMinute, LimitKind::RequestsPerDay),
            tokens: pick(LimitKind::TokensPerMinute, LimitKind::TokensPerDay),
            should_retry: None,
        }
    }

    /// `(name, value)` pairs: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`. Resets are
    /// durations like OpenAI's (`"6s"`, `"1m30s"`, `"120ms"`).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(t) = self.requests {
            out.push(("x-ratelimit-limit-requests", t.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", t.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", duration_text(t.reset_ms)));
        }
        if let Some(t) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", t.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", duration_text(t.reset_ms)));
        }
        if let Some(retry) = self.should_retry {
            out.push(("x-should-retry", retry.to_string()));
        }
        out
    }
}

/// OpenAI's reset format: `"0s"`, `"120ms"`, `"6s"`, `"6.5s"`, `"1m30s"`, `"3h2m1s"`.
pub fn duration_text(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s = (ms / 1_000) % 60;
    let frac = ms % 1_000;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 || h > 0 || m > 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let text = format!("{s}.{frac:03}");
        out.push_str(text.trim_end_matches('0'));
        out.push('s');
    }
    out
}

struct Charge {
    backend: Charged,
    scopes: Vec<Scope>,
    request_id: String,
    day: i64,
    month: i64,
    tokens: u64,
    cost_micros: u64,
}

/// An admitted request's charges. Settle it with the actual usage when the request ends; dropping
/// it unsettled releases the concurrency slot and keeps the worst-case reservation.
pub struct Admitted {
    inner: Option<Charge>,
    /// Rate headers after this admission.
    pub headers: RateHeaders,
}

impl Admitted {
    fn unlimited() -> Admitted {
        Admitted {
            inner: None,
            headers: RateHeaders::default(),
        }
    }

    /// Corrects the reservation to the actual tokens and cost and releases the concurrency slot.
    pub fn settle(mut self, actual_tokens: u64, actual_cost_micros: u64) {
        if let Some(c) = self.inner.take() {
            let s = Settlement {
                request_id: c.request_id.clone(),
                day: c.day,
                month: c.month,
                tokens_delta: sat_i64(actual_tokens) - sat_i64(c.tokens),
                cost_delta: sat_i64(actual_cost_micros) - sat_i64(c.cost_micros),
            };
            apply(c, s);
        }
    }
}

fn sat_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn apply(c: Charge, s: Settlement) {
    match c.backend {
        Charged::Memory(m) => m.settle(&c.scopes, &s),
        Charged::Redis(r) => match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    if let Err(e) = r.settle(&c.scopes, &s).await {
                        tracing::warn!(request_id = %s.request_id, error = %e, "could not settle rate-limit usage; the reservation stands and the concurrency lease expires on its own");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(request_id = %s.request_id, "no runtime to settle rate-limit usage")
            }
        },
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(c) = self.inner.take() {
            let s = Settlement {
                request_id: c.request_id.clone(),
                day: c.day,
                month: c.month,
                tokens_delta: 0,
                cost_delta: 0,
            };
            apply(c, s);
        }
    }
}

/// Prices a request's usage in micro-USD (prices per million tokens), rounded half up, once.
pub fn cost_micros(price: &crate::config::Price, u: &crate::gateway::model::Usage) -> u64 {
    let cached = u.cached_tokens.min(u.prompt_tokens);
    let num = u128::from(u.prompt_tokens - cached) * u128::from(price.input)
        + u128::from(cached) * u128::from(price.cached_input)
        + u128::from(u.completion_tokens) * u128::from(price.output);
    u64::try_from((num + 500_000) / 1_000_000).unwrap_or(u64::MAX)
}

/// An [`OutcomeSink`] for one request: settles its limiter charges from the outcome's actual usage,
/// then passes the outcome on. Metered streams report exactly once, also on client disconnect.
pub struct SettleSink {
    inner: Arc<dyn OutcomeSink>,
    admitted: std::sync::Mutex<Option<Admitted>>,
    price: crate::config::Price,
}

impl SettleSink {
    pub fn new(
        inner: Arc<dyn OutcomeSink>,
        admitted: Admitted,
        price: crate::config::Price,
    ) -> SettleSink {
        SettleSink {
            inner,
            admitted: std::sync::Mutex::new(Some(admitted)),
            price,
        }
    }
}

impl OutcomeSink for SettleSink {
    fn record(&self, outcome: Outcome) {
        let admitted = match self.admitted.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(a) = admitted {
            let tokens = outcome.usage.prompt_tokens + outcome.usage.completion_tokens;
            a.settle(tokens, cost_micros(&self.price, &outcome.usage));
        }
        self.inner.record(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_is_stable_and_hides_the_key() {
        let a = key_id("sk-secret-1");
        assert_eq!(a, key_id("sk-secret-1"));
        assert_ne!(a, key_id("sk-secret-2"));
        assert!(a.starts_with("key_") && a.len() == 28, "{a}");
        assert!(!a.contains("secret"));
    }

    #[test]
    fn duration_texts() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(12), "12ms");
        assert_eq!(duration_text(6_000), "6s");
        assert_eq!(duration_text(6_500), "6.5s");
        assert_eq!(duration_text(90_000), "1m30s");
        assert_eq!(duration_text(3_723_000), "1h2m3s");
    }

    #[test]
    fn codes_are_distinct_per_family() {
        assert_eq!(LimitKind::RequestsPerMinute.code(), "rate_limit_exceeded");
        assert_eq!(LimitKind::TokensPerMinute.code(), "rate_limit_exceeded");
        assert_eq!(LimitKind::RequestsPerDay.code(), "daily_quota_exceeded");
        assert_eq!(
            LimitKind::MaxConcurrent.code(),
            "concurrency_limit_exceeded"
        );
        assert_eq!(LimitKind::SpendCapMonthly.code(), "spend_cap_exceeded");
        for k in LimitKind::ALL {
            assert_eq!(LimitKind::from_index(k.index()), Some(k));
        }
    }

    #[test]
    fn cost_rounds_half_up_once() {
        let price = crate::config::Price {
            input: 600_000,
            cached_input: 100_000,
            output: 3_000_000,
        };
        let u = crate::gateway::model::Usage {
            prompt_tokens: 1_001,
            completion_tokens: 1,
            cached_tokens: 1,
            ..Default::default()
        };
        // 1000*0.6 + 1*0.1 + 1*3 = 603.1 micro-USD -> 603
        assert_eq!(cost_micros(&price, &u), 603);
    }

    fn plan_of(s: &LimitSubject, kind: ScopeKind) -> Option<PlanConfig> {
        s.scopes
            .iter()
            .find(|x| x.kind == kind)
            .map(|x| (*x.plan).clone())
    }

    #[test]
    fn effective_limits_override_field_by_field() {
        let pro = PlanConfig {
            name: "pro".into(),
            requests_per_minute: Some(600),
            max_concurrent: Some(20),
            requests_per_day: Some(1_000),
            ..Default::default()
        };
        let none = PlanConfig::default();
        // Plan only: per-minute and concurrency on the key, the daily quota on the account.
        let s = LimitSubject::effective("k".into(), "a".into(), Some(&pro), &none, &none);
        assert!(LimitSubject::any_limit(Some(&pro), &none, &none));
        let key = plan_of(&s, ScopeKind::Key).expect("key scope");
        let acct = plan_of(&s, ScopeKind::Account).expect("account scope");
        assert_eq!(
            (key.requests_per_minute, key.max_concurrent),
            (Some(600), Some(20))
        );
        assert_eq!(key.requests_per_day, None);
        assert_eq!(acct.requests_per_day, Some(1_000));
        assert_eq!(acct.requests_per_minute, None);
        assert_eq!(key.name, "pro");
        // Account overrides replace the plan's fields (per-minute ones for every key).
        let a_over = PlanConfig {
            requests_per_minute: Some(60),
            spend_cap_daily_micros: Some(5),
            ..Default::default()
        };
        // A key override replaces the account's per-key value and adds its own daily quota.
        let k_over = PlanConfig {
            max_concurrent: Some(2),
            requests_per_day: Some(10),
            ..Default::default()
        };
        let s = LimitSubject::effective("k".into(), "a".into(), Some(&pro), &a_over, &k_over);
        let key = plan_of(&s, ScopeKind::Key).expect("key scope");
        let acct = plan_of(&s, ScopeKind::Account).expect("account scope");
        assert_eq!(key.requests_per_minute, Some(60));
        assert_eq!(key.max_concurrent, Some(2));
        assert_eq!(key.requests_per_day, Some(10));
        assert_eq!(acct.requests_per_day, Some(1_000));
        assert_eq!(acct.spend_cap_daily_micros, Some(5));
        assert_eq!(key.name, "pro + overrides");
        // Overrides without a plan limit too; nothing at all means unlimited.
        let s = LimitSubject::effective("k".into(), "a".into(), None, &a_over, &none);
        assert!(s.is_limited());
        assert!(LimitSubject::any_limit(None, &a_over, &none));
        assert!(LimitSubject::any_limit(None, &none, &k_over));
        assert_eq!(
            plan_of(&s, ScopeKind::Key).and_then(|p| p.requests_per_minute),
            Some(60)
        );
        let s = LimitSubject::effective("k".into(), "a".into(), None, &none, &none);
        assert!(!s.is_limited());
        assert!(!LimitSubject::any_limit(None, &none, &none));
        let empty_plan = PlanConfig {
            name: "free".into(),
            ..Default::default()
        };
        let s = LimitSubject::effective("k".into(), "a".into(), Some(&empty_plan), &none, &none);
        assert!(!s.is_limited());
        assert!(!LimitSubject::any_limit(Some(&empty_plan), &none, &none));
    }

    #[tokio::test]
    async fn refusals_that_retrying_cannot_cure_say_so() {
        let config = crate::config::Config::builtin_default().expect("config");
        let limiter = Limiter::new(&config).expect("limiter");
        let plan = PlanConfig {
            name: "p".into(),
            requests_per_minute: Some(1),
            tokens_per_minute: Some(100),
            requests_per_day: Some(2),
            ..Default::default()
        };
        let subject = LimitSubject::key("k".into(), Some(Arc::new(plan)));
        let demand = |n: u32, tokens: u64| Demand {
            request_id: format!("r{n}"),
            tokens,
            cost_micros: 0,
        };
        // Never fits: no Retry-After, x-should-retry: false.
        let (e, h) = limiter
            .admit(&subject, demand(0, 101))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(
                e,
                GatewayError::RateLimited {
                    retry_after: None,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("Request too large"), "{e}");
        assert!(h.pairs().contains(&("x-should-retry", "false".to_string())));
        // A short wait (the next request in 60 s): retryable, no x-should-retry.
        let a = limiter
            .admit(&subject, demand(1, 1))
            .await
            .expect("admitted");
        assert!(!a
            .headers
            .pairs()
            .iter()
            .any(|(n, _)| *n == "x-should-retry"));
        let (e, h) = limiter
            .admit(&subject, demand(2, 1))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(
                e,
                GatewayError::RateLimited {
                    retry_after: Some(_),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!h.pairs().iter().any(|(n, _)| *n == "x-should-retry"));
    }
}
