//! The in-process backend: every limit's state in one mutex-guarded map, on the instance's clock.
//! Same algorithm and numbers as the Redis script; one instance only. Entries that hold nothing
//! any more (buckets drained, no lease, counters of a past day and month) are evicted by a sweep at
//! most once per [`SWEEP_EVERY_MS`], as Redis expires the same state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::bucket::Bucket;
use super::calendar::{Window, Zone};
use super::{Clock, Decision, Demand, LimitKind, LimitStatus, Refusal, Scope, Settlement};

/// How often (instance clock) idle entries are swept out.
pub const SWEEP_EVERY_MS: i64 = 60_000;

#[derive(Debug, Default)]
struct ScopeState {
    rpm: Bucket,
    tpm: Bucket,
    /// In-flight request id -> lease expiry (ms).
    leases: HashMap<String, i64>,
    day: i64,
    day_requests: u64,
    day_tokens: u64,
    day_spend: u64,
    month: i64,
    month_spend: u64,
    /// From this instant (ms) both buckets are empty.
    busy_until: i64,
}

impl ScopeState {
    /// Records that a bucket changed, so the entry is kept until it has drained.
    fn touch(&mut self, b: Bucket, limit: i64) {
        self.busy_until = self.busy_until.max(b.drained_at(limit));
    }

    /// Whether the entry holds nothing that a later request could need (`leases` already pruned).
    fn idle(&self, now: i64, w: &Window) -> bool {
        self.busy_until <= now
            && self.leases.is_empty()
            && (self.day != w.day
                || (self.day_requests == 0 && self.day_tokens == 0 && self.day_spend == 0))
            && (self.month != w.month || self.month_spend == 0)
    }

    /// Rolls the calendar counters over to `w` (a new day/month starts at zero).
    fn roll(&mut self, w: &Window) {
        if self.day != w.day {
            self.day = w.day;
            self.day_requests = 0;
            self.day_tokens = 0;
            self.day_spend = 0;
        }
        if self.month != w.month {
            self.month = w.month;
            self.month_spend = 0;
        }
    }
}

/// In-process limiter state.
pub struct MemoryBackend {
    zone: Zone,
    clock: Arc<dyn Clock>,
    lease_ms: i64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    map: HashMap<String, ScopeState>,
    swept_at: i64,
}

impl State {
    /// Drops idle entries, at most once per `SWEEP_EVERY_MS`.
    fn sweep(&mut self, now: i64, w: &Window) {
        if now - self.swept_at < SWEEP_EVERY_MS && now >= self.swept_at {
            return;
        }
        self.swept_at = now;
        self.map.retain(|_, st| {
            st.leases.retain(|_, exp| *exp > now);
            !st.idle(now, w)
        });
    }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl MemoryBackend {
    pub fn new(zone: Zone, clock: Arc<dyn Clock>, lease: Duration) -> MemoryBackend {
        MemoryBackend {
            zone,
            clock,
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// How many subjects have state (tests and diagnostics).
    pub fn entries(&self) -> usize {
        self.lock().map.len()
    }

    /// Sets the day and month counters of `scopes` to the shared usage another backend reported
    /// (`status` of an admission by Redis, for calendar windows `day` / `month`), so that this
    /// backend, used as the fail-open fallback, starts from what was already used.
    pub(crate) fn observe(&self, scopes: &[Scope], status: &[LimitStatus], day: i64, month: i64) {
        let now = self.clock.now_ms();
        let w = self.zone.window(now);
        if w.day != day && w.month != month {
            return;
        }
        let mut state = self.lock();
        for s in scopes {
            let mine = |k: LimitKind| {
                status
                    .iter()
                    .find(|x| x.scope == s.kind && x.limit == k)
                    .map(|x| x.used)
            };
            let calendar = [
                LimitKind::RequestsPerDay,
                LimitKind::TokensPerDay,
                LimitKind::SpendCapDaily,
                LimitKind::SpendCapMonthly,
            ];
            if calendar.iter().all(|k| mine(*k).is_none()) {
                continue;
            }
            let st = state.map.entry(s.state_key()).or_default();
            st.roll(&w);
            if w.day == day {
                if let Some(u) = mine(LimitKind::RequestsPerDay) {
                    st.day_requests = u;
                }
                if let Some(u) = mine(LimitKind::TokensPerDay) {
                    st.day_tokens = u;
                }
                if let Some(u) = mine(LimitKind::SpendCapDaily) {
                    st.day_spend = u;
                }
            }
            if w.month == month {
                if let Some(u) = mine(LimitKind::SpendCapMonthly) {
                    st.month_spend = u;
                }
            }
        }
    }

    pub(crate) fn admit(&self, scopes: &[Scope], d: &Demand) -> Decision {
        let now = self.clock.now_ms();
        let w = self.zone.window(now);
        let mut state = self.lock();
        state.sweep(now, &w);
        let map = &mut state.map;
        let tokens = i(d.tokens);
        let mut refusal: Option<Refusal> = None;
        for s in scopes {
            let st = map.entry(s.state_key()).or_default();
            st.roll(&w);
            st.leases.retain(|_, exp| *exp > now);
            let p = &s.plan;
            let mut fail = |limit: LimitKind, max: u64, wait: Option<i64>| {
                let wait = wait.map(u);
                let worse = match &refusal {
                    None => true,
                    Some(r) => match (r.retry_after_ms, wait) {
                        (None, _) => false,
                        (Some(_), None) => true,
                        (Some(a), Some(b)) => b > a,
                    },
                };
                if worse {
                    refusal = Some(Refusal {
                        scope: s.kind,
                        limit,
                        max,
                        retry_after_ms: wait,
                    });
                }
            };
            if let Some(l) = p.requests_per_minute {
                match st.rpm.wait_ms(now, i(l), 1) {
                    Some(0) => {}
                    w => fail(LimitKind::RequestsPerMinute, l, w),
                }
            }
            if let Some(l) = p.tokens_per_minute {
                match st.tpm.wait_ms(now, i(l), tokens) {
                    Some(0) => {}
                    w => fail(LimitKind::TokensPerMinute, l, w),
                }
            }
            if let Some(l) = p.max_concurrent {
                if st.leases.len() as u64 >= l {
                    // The earliest a slot can free up is unknown; 1 s is a polite retry.
                    fail(LimitKind::MaxConcurrent, l, Some(1_000));
                }
            }
            let to_day = w.day_reset_ms - now;
            let to_month = w.month_reset_ms - now;
            if let Some(l) = p.requests_per_day {
                if st.day_requests + 1 > l {
                    fail(LimitKind::RequestsPerDay, l, Some(to_day));
                }
            }
            if let Some(l) = p.tokens_per_day {
                if d.tokens > l {
                    fail(LimitKind::TokensPerDay, l, None);
                } else if st.day_tokens + d.tokens > l {
                    fail(LimitKind::TokensPerDay, l, Some(to_day));
                }
            }
            if let Some(l) = p.spend_cap_daily_micros {
                if d.cost_micros > l {
                    fail(LimitKind::SpendCapDaily, l, None);
                } else if st.day_spend + d.cost_micros > l {
                    fail(LimitKind::SpendCapDaily, l, Some(to_day));
                }
            }
            if let Some(l) = p.spend_cap_monthly_micros {
                if d.cost_micros > l {
                    fail(LimitKind::SpendCapMonthly, l, None);
                } else if st.month_spend + d.cost_micros > l {
                    fail(LimitKind::SpendCapMonthly, l, Some(to_month));
                }
            }
        }
        if refusal.is_none() {
            for s in scopes {
                let st = map.entry(s.state_key()).or_default();
                let p = &s.plan;
                if let Some(l) = p.requests_per_minute {
                    st.rpm.add(now, i(l), 1);
                    st.touch(st.rpm, i(l));
                }
                if let Some(l) = p.tokens_per_minute {
                    st.tpm.add(now, i(l), tokens);
                    st.touch(st.tpm, i(l));
                }
                if p.max_concurrent.is_some() {
                    st.leases
                        .insert(d.request_id.clone(), now.saturating_add(self.lease_ms));
                }
                st.day_requests += 1;
                st.day_tokens += d.tokens;
                st.day_spend += d.cost_micros;
                st.month_spend += d.cost_micros;
            }
        }
        let status = status_of(map, scopes, now, &w);
        Decision {
            refusal,
            status,
            day: w.day,
            month: w.month,
        }
    }

    pub(crate) fn settle(&self, scopes: &[Scope], s: &Settlement) {
        let now = self.clock.now_ms();
        let mut state = self.lock();
        for sc in scopes {
            let Some(st) = state.map.get_mut(&sc.state_key()) else {
                continue;
            };
            st.leases.remove(&s.request_id);
            if let Some(l) = sc.plan.tokens_per_minute {
                if s.tokens_delta != 0 {
                    st.tpm.add(now, i(l), s.tokens_delta);
                    st.touch(st.tpm, i(l));
                }
            }
            if st.day == s.day {
                st.day_tokens = u(i(st.day_tokens).saturating_add(s.tokens_delta));
                st.day_spend = u(i(st.day_spend).saturating_add(s.cost_delta));
            }
            if st.month == s.month {
                st.month_spend = u(i(st.month_spend).saturating_add(s.cost_delta));
            }
        }
    }

    pub(crate) fn peek(&self, scopes: &[Scope]) -> Vec<LimitStatus> {
        let now = self.clock.now_ms();
        let w = self.zone.window(now);
        let mut state = self.lock();
        let map = &mut state.map;
        for s in scopes {
            if let Some(st) = map.get_mut(&s.state_key()) {
                st.roll(&w);
                st.leases.retain(|_, exp| *exp > now);
            }
        }
        status_of(map, scopes, now, &w)
    }
}

fn status_of(
    map: &HashMap<String, ScopeState>,
    scopes: &[Scope],
    now: i64,
    w: &Window,
) -> Vec<LimitStatus> {
    let mut out = Vec::new();
    let empty = ScopeState::default();
    for s in scopes {
        let st = map.get(&s.state_key()).unwrap_or(&empty);
        let same_day = st.day == w.day;
        let same_month = st.month == w.month;
        for k in LimitKind::ALL {
            let Some(max) = k.of(&s.plan) else { continue };
            let (remaining, reset_ms) = match k {
                LimitKind::RequestsPerMinute => (
                    u(st.rpm.remaining(now, i(max))),
                    u(st.rpm.reset_ms(now, i(max))),
                ),
                LimitKind::TokensPerMinute => (
                    u(st.tpm.remaining(now, i(max))),
                    u(st.tpm.reset_ms(now, i(max))),
                ),
                LimitKind::MaxConcurrent => (max.saturating_sub(st.leases.len() as u64), 0),
                LimitKind::RequestsPerDay | LimitKind::TokensPerDay | LimitKind::SpendCapDaily => {
                    let used = if !same_day {
                        0
                    } else if k == LimitKind::RequestsPerDay {
                        st.day_requests
                    } else if k == LimitKind::TokensPerDay {
                        st.day_tokens
                    } else {
                        st.day_spend
                    };
                    (
                        max.saturating_sub(used),
                        if used == 0 {
                            0
                        } else {
                            u(w.day_reset_ms - now)
                        },
                    )
                }
                LimitKind::SpendCapMonthly => {
                    let used = if same_month { st.month_spend } else { 0 };
                    (
                        max.saturating_sub(used),
                        if used == 0 {
                            0
                        } else {
                            u(w.month_reset_ms - now)
                        },
                    )
                }
            };
            out.push(LimitStatus {
                scope: s.kind,
                limit: k,
                max,
                used: max.saturating_sub(remaining),
                remaining,
                reset_ms,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PlanConfig;
    use crate::limits::ScopeKind;
    use std::sync::atomic::{AtomicI64, Ordering};

    struct Manual(AtomicI64);
    impl Clock for Manual {
        fn now_ms(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .expect("rfc3339")
            .timestamp_millis()
    }

    fn setup(
        zone: &str,
        start: &str,
        plan: PlanConfig,
    ) -> (Arc<Manual>, MemoryBackend, Vec<Scope>) {
        let clock = Arc::new(Manual(AtomicI64::new(ms(start))));
        let b = MemoryBackend::new(
            Zone::parse(zone).expect("zone"),
            clock.clone(),
            Duration::from_secs(900),
        );
        let scopes = vec![Scope {
            kind: ScopeKind::Key,
            id: "key_test".into(),
            plan: Arc::new(plan),
        }];
        (clock, b, scopes)
    }

    fn demand(n: u32, tokens: u64, cost: u64) -> Demand {
        Demand {
            request_id: format!("req_{n}"),
            tokens,
            cost_micros: cost,
        }
    }

    fn admitted(b: &MemoryBackend, scopes: &[Scope], n: u32, tokens: u64, cost: u64) -> u32 {
        (0..n)
            .filter(|i| b.admit(scopes, &demand(*i, tokens, cost)).refusal.is_none())
            .count() as u32
    }

    #[test]
    fn rpm_exact_at_emission_edges() {
        let plan = PlanConfig {
            requests_per_minute: Some(10),
            ..Default::default()
        };
        let (clock, b, scopes) = setup("UTC", "2026-11-22T12:00:00Z", plan);
        assert_eq!(admitted(&b, &scopes, 60, 1, 0), 10);
        let d = b.admit(&scopes, &demand(99, 1, 0));
        let r = d.refusal.expect("refused");
        assert_eq!(r.limit, LimitKind::RequestsPerMinute);
        assert_eq!(r.retry_after_ms, Some(6_000));
        clock.0.fetch_add(5_999, Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 5, 1, 0), 0);
        clock.0.fetch_add(1, Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 5, 1, 0), 1);
        // Refusals charged nothing: 60 s after the last admission the full burst is back.
        clock.0.fetch_add(60_000, Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 60, 1, 0), 10);
    }

    #[test]
    fn rpd_resets_exactly_at_local_midnight() {
        let plan = PlanConfig {
            requests_per_day: Some(100),
            ..Default::default()
        };
        // Asia/Tokyo (UTC+9): the day ends at 15:00 UTC.
        let (clock, b, scopes) = setup("Asia/Tokyo", "2026-11-22T14:00:00Z", plan);
        assert_eq!(admitted(&b, &scopes, 150, 1, 0), 100);
        let r = b.admit(&scopes, &demand(1, 1, 0)).refusal.expect("refused");
        assert_eq!(r.limit, LimitKind::RequestsPerDay);
        assert_eq!(r.retry_after_ms, Some(3_600_000));
        clock
            .0
            .store(ms("2026-11-22T14:59:59.999Z"), Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 5, 1, 0), 0);
        clock.0.store(ms("2026-11-22T15:00:00Z"), Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 150, 1, 0), 100);
    }

    #[test]
    fn dst_day_quota_resets_once() {
        let plan = PlanConfig {
            requests_per_day: Some(3),
            ..Default::default()
        };
        // Europe/Berlin's 25-hour day 2026-10-25 runs 2026-10-24T22:00Z .. 2026-10-25T23:00Z.
        let (clock, b, scopes) = setup("Europe/Berlin", "2026-10-24T22:00:00Z", plan);
        assert_eq!(admitted(&b, &scopes, 5, 1, 0), 3);
        for t in [
            "2026-10-25T00:30:00Z",
            "2026-10-25T01:30:00Z",
            "2026-10-25T22:59:59.999Z",
        ] {
            clock.0.store(ms(t), Ordering::SeqCst);
            assert_eq!(admitted(&b, &scopes, 5, 1, 0), 0, "at {t}");
        }
        clock.0.store(ms("2026-10-25T23:00:00Z"), Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 5, 1, 0), 3);
    }

    #[test]
    fn tpm_reserves_then_corrects() {
        let plan = PlanConfig {
            tokens_per_minute: Some(1_000),
            tokens_per_day: Some(10_000),
            ..Default::default()
        };
        let (_clock, b, scopes) = setup("UTC", "2026-11-22T12:00:00Z", plan);
        let d = b.admit(&scopes, &demand(1, 900, 0));
        assert!(d.refusal.is_none());
        let r = b
            .admit(&scopes, &demand(2, 200, 0))
            .refusal
            .expect("refused");
        assert_eq!(r.limit, LimitKind::TokensPerMinute);
        assert_eq!(r.retry_after_ms, Some(6_000));
        b.settle(
            &scopes,
            &Settlement {
                request_id: "req_1".into(),
                day: d.day,
                month: d.month,
                tokens_delta: 50 - 900,
                cost_delta: 0,
            },
        );
        assert!(b.admit(&scopes, &demand(3, 200, 0)).refusal.is_none());
        let st = b.peek(&scopes);
        let tpd = st
            .iter()
            .find(|s| s.limit == LimitKind::TokensPerDay)
            .expect("tpd");
        assert_eq!(tpd.used, 250);
        // A request larger than the whole limit can never pass: no Retry-After.
        let r = b
            .admit(&scopes, &demand(4, 1_001, 0))
            .refusal
            .expect("refused");
        assert_eq!(r.retry_after_ms, None);
    }

    #[test]
    fn concurrency_released_on_settle_and_lease_expiry() {
        let plan = PlanConfig {
            max_concurrent: Some(2),
            ..Default::default()
        };
        let (clock, b, scopes) = setup("UTC", "2026-11-22T12:00:00Z", plan);
        assert_eq!(admitted(&b, &scopes, 5, 1, 0), 2);
        let r = b.admit(&scopes, &demand(9, 1, 0)).refusal.expect("refused");
        assert_eq!(r.limit.code(), "concurrency_limit_exceeded");
        b.settle(
            &scopes,
            &Settlement {
                request_id: "req_0".into(),
                day: 0,
                month: 0,
                tokens_delta: 0,
                cost_delta: 0,
            },
        );
        assert!(b.admit(&scopes, &demand(10, 1, 0)).refusal.is_none());
        assert!(b.admit(&scopes, &demand(11, 1, 0)).refusal.is_some());
        // A holder that never settles (crash) loses its slot when the lease ends.
        clock.0.fetch_add(900_000, Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 5, 1, 0), 2);
    }

    #[test]
    fn spend_caps_daily_and_monthly() {
        let plan = PlanConfig {
            spend_cap_daily_micros: Some(1_000_000),
            spend_cap_monthly_micros: Some(1_500_000),
            ..Default::default()
        };
        let (clock, b, scopes) = setup("UTC", "2026-11-30T12:00:00Z", plan);
        // $1.00/day at $0.05 worst case: exactly 20.
        assert_eq!(admitted(&b, &scopes, 50, 1, 50_000), 20);
        let r = b
            .admit(&scopes, &demand(1, 1, 50_000))
            .refusal
            .expect("refused");
        assert_eq!(r.limit, LimitKind::SpendCapDaily);
        assert_eq!(r.retry_after_ms, Some(12 * 3_600_000));
        // Next day (and next month): the monthly cap of $1.50 leaves $0.50 = 10 more... but
        // it is a new month, so 20 again (daily cap binds).
        clock.0.store(ms("2026-12-01T00:00:00Z"), Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 50, 1, 50_000), 20);
        clock.0.store(ms("2026-12-02T00:00:00Z"), Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 50, 1, 50_000), 10);
        let r = b
            .admit(&scopes, &demand(1, 1, 50_000))
            .refusal
            .expect("refused");
        assert_eq!(r.limit, LimitKind::SpendCapMonthly);
        assert_eq!(r.limit.code(), "spend_cap_exceeded");
    }

    #[test]
    fn refused_request_charges_no_scope() {
        // Key allows plenty, the account is out: nothing is charged to the key either.
        let clock = Arc::new(Manual(AtomicI64::new(ms("2026-11-22T12:00:00Z"))));
        let b = MemoryBackend::new(Zone::Fixed(0), clock, Duration::from_secs(900));
        let key = Scope {
            kind: ScopeKind::Key,
            id: "k1".into(),
            plan: Arc::new(PlanConfig {
                requests_per_day: Some(100),
                ..Default::default()
            }),
        };
        let account = Scope {
            kind: ScopeKind::Account,
            id: "a1".into(),
            plan: Arc::new(PlanConfig {
                requests_per_day: Some(5),
                ..Default::default()
            }),
        };
        let both = vec![key.clone(), account];
        assert_eq!(admitted(&b, &both, 20, 1, 0), 5);
        let st = b.peek(std::slice::from_ref(&key));
        assert_eq!(st[0].used, 5);
    }

    fn key_scope(id: &str, plan: &PlanConfig) -> Vec<Scope> {
        vec![Scope {
            kind: ScopeKind::Key,
            id: id.into(),
            plan: Arc::new(plan.clone()),
        }]
    }

    #[test]
    fn idle_entries_are_evicted_and_busy_ones_kept() {
        let minute = PlanConfig {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(1_000),
            ..Default::default()
        };
        let (clock, b, _) = setup("UTC", "2026-11-22T23:50:00Z", PlanConfig::default());
        // 500 subjects seen once each, and one with a request in flight (lease of 15 min).
        for n in 0..500 {
            let sc = key_scope(&format!("k{n}"), &minute);
            assert!(b.admit(&sc, &demand(n, 100, 0)).refusal.is_none());
        }
        let conc = PlanConfig {
            max_concurrent: Some(1),
            ..Default::default()
        };
        let held = key_scope("held", &conc);
        assert!(b.admit(&held, &demand(9_999, 1, 0)).refusal.is_none());
        assert_eq!(b.entries(), 501);
        // Two minutes later the buckets are empty, but today's counters still matter.
        clock.0.fetch_add(120_000, Ordering::SeqCst);
        assert!(b
            .admit(&key_scope("x", &minute), &demand(1, 1, 0))
            .refusal
            .is_none());
        assert_eq!(b.entries(), 502);
        // After midnight only the lease holder (and the subject admitted now) is left.
        clock.0.store(ms("2026-11-23T00:01:00Z"), Ordering::SeqCst);
        assert!(b
            .admit(&key_scope("y", &minute), &demand(2, 1, 0))
            .refusal
            .is_none());
        assert_eq!(b.entries(), 2);
        // The lease is still enforced after the sweep.
        assert!(b.admit(&held, &demand(10_000, 1, 0)).refusal.is_some());
        // A sweep runs at most once a minute.
        clock.0.fetch_add(30_000, Ordering::SeqCst);
        assert!(b
            .admit(&key_scope("z", &minute), &demand(3, 1, 0))
            .refusal
            .is_none());
        assert_eq!(b.entries(), 3);
        // Once the lease has expired (15 min) the holder's entry goes too; today's do not.
        clock.0.store(ms("2026-11-23T00:20:00Z"), Ordering::SeqCst);
        assert!(b
            .admit(&key_scope("w", &minute), &demand(4, 1, 0))
            .refusal
            .is_none());
        assert_eq!(b.entries(), 3, "y, z and w stay for today; held is gone");
        assert!(b.admit(&held, &demand(10_001, 1, 0)).refusal.is_none());
    }

    #[test]
    fn monthly_spend_survives_the_sweep_until_the_month_ends() {
        let plan = PlanConfig {
            spend_cap_monthly_micros: Some(100),
            ..Default::default()
        };
        let (clock, b, scopes) = setup("UTC", "2026-11-10T12:00:00Z", plan);
        assert_eq!(admitted(&b, &scopes, 5, 1, 60), 1);
        clock.0.store(ms("2026-11-20T12:00:00Z"), Ordering::SeqCst);
        assert_eq!(
            admitted(&b, &scopes, 5, 1, 60),
            0,
            "spent 60 of 100 this month"
        );
        assert_eq!(b.entries(), 1);
        clock.0.store(ms("2026-12-01T00:01:00Z"), Ordering::SeqCst);
        assert_eq!(admitted(&b, &scopes, 5, 1, 60), 1);
    }

    #[test]
    fn observed_shared_usage_seeds_the_local_counters() {
        let plan = PlanConfig {
            requests_per_day: Some(10),
            spend_cap_monthly_micros: Some(1_000),
            ..Default::default()
        };
        let (_clock, b, scopes) = setup("UTC", "2026-11-22T12:00:00Z", plan);
        let w = Zone::Fixed(0).window(ms("2026-11-22T12:00:00Z"));
        let status = vec![
            LimitStatus {
                scope: ScopeKind::Key,
                limit: LimitKind::RequestsPerDay,
                max: 10,
                used: 7,
                remaining: 3,
                reset_ms: 1,
            },
            LimitStatus {
                scope: ScopeKind::Key,
                limit: LimitKind::SpendCapMonthly,
                max: 1_000,
                used: 900,
                remaining: 100,
                reset_ms: 1,
            },
        ];
        b.observe(&scopes, &status, w.day, w.month);
        // 3 requests left today, and $0.0001 of monthly spend: 2 at 50 micro-USD.
        assert_eq!(admitted(&b, &scopes, 10, 1, 50), 2);
        assert_eq!(admitted(&b, &scopes, 10, 1, 0), 1);
        // Usage reported for another day is ignored.
        b.observe(&scopes, &status, w.day - 1, w.month - 1);
        assert_eq!(admitted(&b, &scopes, 10, 1, 0), 0);
    }
}
