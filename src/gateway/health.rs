//! Route health: passive outlier ejection (consecutive failures or a high error rate eject a route
//! for a growing interval), half-open probes that re-admit it, `Retry-After` cooldowns, and moving
//! averages of time to first token and tokens/s for the `fastest` policy.
//!
//! A route is keyed by `provider/upstream_model`, shared by every model that uses it. Ejection
//! states: healthy → ejected (until T) → half-open (one real request at a time is the probe) →
//! healthy on success, or ejected again for twice as long on failure.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::{Config, HealthConfig, RouteConfig};

/// The health key of a route.
pub fn route_key(route: &RouteConfig) -> String {
    format!("{}/{}", route.provider, route.upstream_model)
}

/// Whether a route may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Healthy,
    /// Ejection is over; the next request is the probe.
    ProbeFree,
    /// Half-open with a probe in flight, or ejected until the instant.
    Ejected(Option<Instant>),
    /// The upstream asked us to wait (`Retry-After`) until the instant.
    Cooling(Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Healthy,
    Ejected { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

#[derive(Debug)]
struct RouteState {
    provider: String,
    upstream_model: String,
    state: State,
    consecutive: u32,
    /// Last outcomes, `true` = failure.
    window: VecDeque<bool>,
    window_failures: u32,
    /// Ejections in the current streak (the interval doubles with each).
    streak: u32,
    ejections_total: u64,
    readmitted_at: Option<Instant>,
    cooldown_until: Option<Instant>,
    successes_total: u64,
    failures_total: u64,
    /// Moving average of time to first token, milliseconds.
    ewma_ttft_ms: Option<u64>,
    /// Moving average of output tokens per second, ×1000.
    ewma_tps_milli: Option<u64>,
}

impl RouteState {
    fn new(provider: &str, upstream_model: &str) -> RouteState {
        RouteState {
            provider: provider.to_string(),
            upstream_model: upstream_model.to_string(),
            state: State::Healthy,
            consecutive: 0,
            window: VecDeque::new(),
            window_failures: 0,
            streak: 0,
            ejections_total: 0,
            readmitted_at: None,
            cooldown_until: None,
            successes_total: 0,
            failures_total: 0,
            ewma_ttft_ms: None,
            ewma_tps_milli: None,
        }
    }

    fn push_window(&mut self, failure: bool, size: u32) {
        self.window.push_back(failure);
        if failure {
            self.window_failures += 1;
        }
        while self.window.len() > size as usize {
            if self.window.pop_front() == Some(true) {
                self.window_failures = self.window_failures.saturating_sub(1);
            }
        }
    }

    fn clear_window(&mut self) {
        self.window.clear();
        self.window_failures = 0;
        self.consecutive = 0;
    }
}

/// A moving average with weight 3/10 on the new sample (integer arithmetic).
fn ewma(old: Option<u64>, sample: u64) -> u64 {
    match old {
        None => sample,
        Some(o) => (o.saturating_mul(7) + sample.saturating_mul(3)) / 10,
    }
}

/// One route's health, as shown on `/readyz` and `GET /admin/v1/routes/health`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteHealthView {
    pub route: String,
    pub provider: String,
    pub upstream_model: String,
    /// `healthy`, `ejected`, `half_open` or `cooling`.
    pub state: &'static str,
    pub ejected_for_ms: Option<u64>,
    pub cooldown_for_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub recent_error_percent: u32,
    pub recent_outcomes: usize,
    pub ejections_total: u64,
    pub successes_total: u64,
    pub failures_total: u64,
    pub ewma_ttft_ms: Option<u64>,
    pub ewma_tokens_per_sec: Option<u64>,
}

/// Health of every route.
#[derive(Debug)]
pub struct Health {
    cfg: HealthConfig,
    routes: Mutex<HashMap<String, RouteState>>,
}

impl Health {
    pub fn new(config: &Config) -> Health {
        let mut routes = HashMap::new();
        for m in &config.models {
            for r in &m.routes {
                routes
                    .entry(route_key(r))
                    .or_insert_with(|| RouteState::new(&r.provider, &r.upstream_model));
            }
        }
        Health {
            cfg: config.health.clone(),
            routes: Mutex::new(routes),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, RouteState>> {
        // A panic while holding the lock leaves consistent-enough counters; keep serving.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, key: &str, f: impl FnOnce(&mut RouteState) -> T) -> T {
        let mut map = self.lock();
        let st = map.entry(key.to_string()).or_insert_with(|| {
            let (p, m) = key.split_once('/').unwrap_or((key, ""));
            RouteState::new(p, m)
        });
        f(st)
    }

    /// Whether `key` can take a request at `now` (does not claim a probe).
    pub fn availability(&self, key: &str, now: Instant) -> Availability {
        self.with(key, |st| {
            if let Some(until) = st.cooldown_until {
                if until > now {
                    return Availability::Cooling(until);
                }
            }
            match st.state {
                State::Healthy => Availability::Healthy,
                State::Ejected { until } if until > now => Availability::Ejected(Some(until)),
                State::Ejected { .. } => Availability::ProbeFree,
                State::HalfOpen {
                    probe_in_flight: false,
                } => Availability::ProbeFree,
                State::HalfOpen {
                    probe_in_flight: true,
                } => Availability::Ejected(None),
            }
        })
    }

    /// Claims `key` for one attempt. A half-open (or expired-ejection) route gives a probe permit;
    /// `force` takes an ejected route anyway (every route is ejected: "panic" mode).
    pub fn acquire(self: &Arc<Self>, key: &str, now: Instant, force: bool) -> Option<Permit> {
        let probe = self.with(key, |st| match st.state {
            State::Healthy => Some(false),
            State::Ejected { until } if until <= now => {
                st.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                Some(true)
            }
            State::HalfOpen {
                probe_in_flight: false,
            } => {
                st.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                Some(true)
            }
            _ if force => Some(false),
            _ => None,
        })?;
        Some(Permit {
            health: self.clone(),
            key: key.to_string(),
            probe,
            done: false,
        })
    }

    /// Sets a `Retry-After` cooldown on `key` (capped by `max_cooldown`).
    pub fn cooldown(&self, key: &str, wait: Duration, now: Instant) {
        let until = now + wait.min(self.cfg.max_cooldown);
        self.with(key, |st| {
            if st.cooldown_until.is_none_or(|u| u < until) {
                st.cooldown_until = Some(until);
            }
        });
    }

    fn success(&self, key: &str, probe: bool, ttft: Option<Duration>) {
        let now = Instant::now();
        let max = self.cfg.max_ejection;
        let window = self.cfg.error_rate_window;
        self.with(key, |st| {
            st.successes_total += 1;
            if let Some(t) = ttft {
                st.ewma_ttft_ms = Some(ewma(st.ewma_ttft_ms, t.as_millis() as u64));
            }
            match st.state {
                State::HalfOpen { .. } if probe => {
                    tracing::info!(route = %format!("{}/{}", st.provider, st.upstream_model), "probe succeeded; route re-admitted");
                    st.state = State::Healthy;
                    st.clear_window();
                    st.readmitted_at = Some(now);
                }
                State::Healthy => {
                    st.consecutive = 0;
                    st.push_window(false, window);
                    if st.readmitted_at.is_some_and(|r| now.duration_since(r) > max) {
                        st.streak = 0;
                    }
                }
                // A request that started before the ejection: no verdict.
                _ => {}
            }
        });
    }

    fn failure(&self, key: &str, probe: bool) {
        let now = Instant::now();
        let cfg = &self.cfg;
        self.with(key, |st| {
            st.failures_total += 1;
            let eject = match st.state {
                State::HalfOpen { .. } if probe => true,
                State::Healthy => {
                    st.consecutive += 1;
                    st.push_window(true, cfg.error_rate_window);
                    let n = st.window.len() as u64;
                    st.consecutive >= cfg.consecutive_failures
                        || (n >= u64::from(cfg.error_rate_min_requests.max(1))
                            && u64::from(st.window_failures) * 100
                                >= u64::from(cfg.error_rate_percent) * n)
                }
                _ => false,
            };
            if eject {
                st.streak = st.streak.saturating_add(1);
                st.ejections_total += 1;
                let factor = 1u32 << st.streak.saturating_sub(1).min(16);
                let interval = cfg
                    .base_ejection
                    .saturating_mul(factor)
                    .min(cfg.max_ejection);
                st.state = State::Ejected {
                    until: now + interval,
                };
                st.clear_window();
                tracing::warn!(route = %format!("{}/{}", st.provider, st.upstream_model), ejection_ms = interval.as_millis() as u64, ejections = st.ejections_total, "route ejected");
                metrics::counter!("tollgate_route_ejections_total", "provider" => st.provider.clone()).increment(1);
            }
        });
    }

    /// Releases a probe without a verdict (the request was cancelled or the error was the client's).
    fn neutral(&self, key: &str, probe: bool) {
        if !probe {
            return;
        }
        self.with(key, |st| {
            if let State::HalfOpen { .. } = st.state {
                st.state = State::HalfOpen {
                    probe_in_flight: false,
                };
            }
        });
    }

    /// A failure after the stream started (counts toward ejection like any failure).
    pub fn failure_after_start(&self, key: &str) {
        self.failure(key, false);
    }

    /// Records the generation speed of a finished answer.
    pub fn throughput(&self, key: &str, completion_tokens: u64, generation: Duration) {
        let ms = generation.as_millis() as u64;
        if completion_tokens == 0 || ms == 0 {
            return;
        }
        let tps_milli = completion_tokens.saturating_mul(1_000_000) / ms;
        self.with(key, |st| {
            st.ewma_tps_milli = Some(ewma(st.ewma_tps_milli, tps_milli));
        });
    }

    /// Moving averages of `key`: (TTFT ms, tokens/s ×1000).
    pub fn speed(&self, key: &str) -> (Option<u64>, Option<u64>) {
        self.with(key, |st| (st.ewma_ttft_ms, st.ewma_tps_milli))
    }

    /// Every route's health, sorted by key.
    pub fn snapshot(&self) -> Vec<RouteHealthView> {
        let now = Instant::now();
        let map = self.lock();
        let mut out: Vec<RouteHealthView> = map
            .iter()
            .map(|(k, st)| {
                let cooling = st.cooldown_until.filter(|u| *u > now);
                let (state, ejected_for) = match st.state {
                    State::Ejected { until } if until > now => (
                        "ejected",
                        Some(until.duration_since(now).as_millis() as u64),
                    ),
                    State::Ejected { .. } | State::HalfOpen { .. } => ("half_open", None),
                    State::Healthy if cooling.is_some() => ("cooling", None),
                    State::Healthy => ("healthy", None),
                };
                let n = st.window.len();
                RouteHealthView {
                    route: k.clone(),
                    provider: st.provider.clone(),
                    upstream_model: st.upstream_model.clone(),
                    state,
                    ejected_for_ms: ejected_for,
                    cooldown_for_ms: cooling.map(|u| u.duration_since(now).as_millis() as u64),
                    consecutive_failures: st.consecutive,
                    recent_error_percent: if n == 0 {
                        0
                    } else {
                        (u64::from(st.window_failures) * 100 / n as u64) as u32
                    },
                    recent_outcomes: n,
                    ejections_total: st.ejections_total,
                    successes_total: st.successes_total,
                    failures_total: st.failures_total,
                    ewma_ttft_ms: st.ewma_ttft_ms,
                    ewma_tokens_per_sec: st.ewma_tps_milli.map(|t| t / 1000),
                }
            })
            .collect();
        out.sort_by(|a, b| a.route.cmp(&b.route));
        out
    }
}

/// The right to make one attempt on a route; reports the attempt's verdict exactly once (a
/// dropped permit releases a probe without a verdict).
#[derive(Debug)]
pub struct Permit {
    health: Arc<Health>,
    key: String,
    probe: bool,
    done: bool,
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(mut self, ttft: Option<Duration>) {
        self.done = true;
        self.health.success(&self.key, self.probe, ttft);
    }

    pub fn failure(mut self) {
        self.done = true;
        self.health.failure(&self.key, self.probe);
    }

    pub fn neutral(mut self) {
        self.done = true;
        self.health.neutral(&self.key, self.probe);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.health.neutral(&self.key, self.probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(consecutive: u32, rate: u32, min: u32) -> Arc<Health> {
        let mut cfg = Config::builtin_default().expect("default");
        cfg.health = HealthConfig {
            consecutive_failures: consecutive,
            error_rate_percent: rate,
            error_rate_min_requests: min,
            error_rate_window: 10,
            base_ejection: Duration::from_millis(100),
            max_ejection: Duration::from_millis(350),
            max_cooldown: Duration::from_secs(60),
        };
        Arc::new(Health::new(&cfg))
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_interval_and_probe_readmits() {
        let h = health(3, 100, 1000);
        let k = "p/m";
        for _ in 0..2 {
            h.acquire(k, Instant::now(), false)
                .expect("healthy")
                .failure();
        }
        assert_eq!(h.availability(k, Instant::now()), Availability::Healthy);
        h.acquire(k, Instant::now(), false)
            .expect("healthy")
            .failure();
        assert!(matches!(
            h.availability(k, Instant::now()),
            Availability::Ejected(Some(_))
        ));
        assert!(h.acquire(k, Instant::now(), false).is_none());
        assert!(h.acquire(k, Instant::now(), true).is_some(), "panic mode");
        std::thread::sleep(Duration::from_millis(101));
        assert_eq!(h.availability(k, Instant::now()), Availability::ProbeFree);
        let probe = h.acquire(k, Instant::now(), false).expect("probe");
        assert!(probe.is_probe());
        assert!(
            h.acquire(k, Instant::now(), false).is_none(),
            "one probe at a time"
        );
        probe.failure();
        // Second ejection: 200 ms.
        std::thread::sleep(Duration::from_millis(150));
        assert!(h.acquire(k, Instant::now(), false).is_none());
        std::thread::sleep(Duration::from_millis(60));
        let probe = h.acquire(k, Instant::now(), false).expect("probe");
        probe.failure();
        // Third: 400 ms capped to 350 ms.
        std::thread::sleep(Duration::from_millis(351));
        h.acquire(k, Instant::now(), false)
            .expect("probe")
            .success(None);
        assert_eq!(h.availability(k, Instant::now()), Availability::Healthy);
        let v = h.snapshot();
        let r = v.iter().find(|r| r.route == k).expect("route");
        assert_eq!(r.ejections_total, 3);
        assert_eq!(r.state, "healthy");
    }

    #[test]
    fn error_rate_ejects() {
        let h = health(100, 40, 10);
        let k = "p/m";
        for i in 0..10 {
            let p = h.acquire(k, Instant::now(), false).expect("healthy");
            if i % 3 == 0 {
                p.failure();
            } else {
                p.success(Some(Duration::from_millis(10)));
            }
        }
        // 4 failures of 10 = 40%.
        assert!(matches!(
            h.availability(k, Instant::now()),
            Availability::Ejected(_)
        ));
    }

    #[test]
    fn dropped_probe_is_released_and_cooldown_is_capped() {
        let h = health(1, 100, 1000);
        let k = "p/m";
        h.acquire(k, Instant::now(), false)
            .expect("healthy")
            .failure();
        std::thread::sleep(Duration::from_millis(101));
        drop(h.acquire(k, Instant::now(), false).expect("probe"));
        assert_eq!(h.availability(k, Instant::now()), Availability::ProbeFree);
        h.cooldown(k, Duration::from_secs(86_400), Instant::now());
        match h.availability(k, Instant::now()) {
            Availability::Cooling(until) => {
                assert!(until.duration_since(Instant::now()) <= Duration::from_secs(60))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ewma_moves_toward_samples() {
        assert_eq!(ewma(None, 100), 100);
        assert_eq!(ewma(Some(100), 200), 130);
    }
}
