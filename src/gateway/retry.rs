//! Retry conduct: which upstream failures are retried, the global retry budget (retries ≤ a
//! percentage of requests over a sliding window, plus a small per-second reserve), `Retry-After`
//! handling, and exponential back-off with full jitter.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::gateway::usage::AttemptResult;

/// Width of the retry budget's sliding window, in one-second buckets.
const WINDOW_SECS: usize = 10;

/// What an attempt's error means for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Not retried anywhere: the client's request is at fault (context length, content policy,
    /// invalid request, auth, …). Passed to the client as is.
    Fatal,
    /// Rate limited (429/408/409); `retry_after` is the upstream's wish.
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, connection failure, bad answer: counts against the route's health.
    Failed,
    /// No answer in time: counts against the route's health.
    TimedOut,
}

impl Class {
    pub fn of(e: &GatewayError) -> Class {
        match e {
            GatewayError::UpstreamRejected(r) => {
                let fatal_kind =
                    is_fatal_kind(r.kind.as_deref()) || is_fatal_kind(r.code.as_deref());
                match r.status {
                    _ if fatal_kind => Class::Fatal,
                    408 | 409 | 429 if r.kind.as_deref() == Some("insufficient_quota") => {
                        Class::Failed
                    }
                    408 | 409 | 429 => Class::RateLimited {
                        retry_after: r.retry_after,
                    },
                    // The provider refused tollgate's own credentials, credit or model id: another
                    // route may well serve the request.
                    401..=404 => Class::Failed,
                    _ => Class::Fatal,
                }
            }
            GatewayError::UpstreamUnavailable { retry_after, .. } => Class::RateLimited {
                retry_after: Some(*retry_after),
            },
            GatewayError::UpstreamTimeout { .. } => Class::TimedOut,
            GatewayError::UpstreamFailed { .. } | GatewayError::Overloaded { .. } => Class::Failed,
            _ => Class::Fatal,
        }
    }

    pub fn attempt_result(self) -> AttemptResult {
        match self {
            Class::Fatal => AttemptResult::Rejected,
            Class::RateLimited { .. } => AttemptResult::RateLimited,
            Class::Failed => AttemptResult::Failed,
            Class::TimedOut => AttemptResult::TimedOut,
        }
    }
}

fn is_fatal_kind(kind: Option<&str>) -> bool {
    matches!(
        kind,
        Some(
            "context_length_exceeded"
                | "content_policy_violation"
                | "content_filter"
                | "moderation"
        )
    )
}

/// The HTTP status of an upstream failure, when the error carries one.
pub fn status_of(e: &GatewayError) -> Option<u16> {
    match e {
        GatewayError::UpstreamRejected(r) => Some(r.status),
        GatewayError::UpstreamFailed { message, .. }
        | GatewayError::UpstreamUnavailable { message, .. } => message
            .strip_prefix("upstream returned HTTP ")
            .and_then(|rest| rest.get(..3))
            .and_then(|s| s.parse().ok()),
        _ => None,
    }
}

/// Exponential back-off with full jitter before the `tries`-th retry of the same route
/// (`tries` ≥ 1): uniform in `[0, min(max, base × 2^(tries-1))]`.
pub fn backoff(base: Duration, max: Duration, tries: u32, rng: &mut impl Rng) -> Duration {
    let cap = base
        .saturating_mul(1u32 << tries.saturating_sub(1).min(20))
        .min(max);
    let ms = cap.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.gen_range(0..=ms))
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    requests: u64,
    retries: u64,
}

/// A retry budget shared by all requests of one model: a retry is allowed while the retries of
/// the last 10 s stay below `percent`% of the requests of the last 10 s plus `min_per_sec` × 10.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    reserve: u64,
    epoch: Instant,
    buckets: Mutex<[Bucket; WINDOW_SECS]>,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_sec: u32) -> RetryBudget {
        RetryBudget {
            percent: u64::from(percent),
            reserve: u64::from(min_per_sec) * WINDOW_SECS as u64,
            epoch: Instant::now(),
            buckets: Mutex::new([Bucket::default(); WINDOW_SECS]),
        }
    }

    fn bucket<'a>(&self, b: &'a mut [Bucket; WINDOW_SECS], now: Instant) -> &'a mut Bucket {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let slot = &mut b[(second % WINDOW_SECS as u64) as usize];
        if slot.second != second {
            *slot = Bucket {
                second,
                ..Bucket::default()
            };
        }
        slot
    }

    /// Counts a new request (deposits into the budget).
    pub fn request(&self, now: Instant) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        self.bucket(&mut b, now).requests += 1;
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let (mut requests, mut retries) = (0u64, 0u64);
        for s in b.iter() {
            if s.second + (WINDOW_SECS as u64) > second && s.second <= second {
                requests += s.requests;
                retries += s.retries;
            }
        }
        // retries + 1 ≤ reserve + percent% × requests, in integers.
        if (retries + 1) * 100 > self.reserve * 100 + self.percent * requests {
            return false;
        }
        self.bucket(&mut b, now).retries += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::UpstreamRejection;
    use rand::SeedableRng;

    fn rejected(status: u16, kind: Option<&str>, ra: Option<u64>) -> GatewayError {
        GatewayError::UpstreamRejected(Box::new(UpstreamRejection {
            provider: "p".into(),
            status,
            message: "m".into(),
            kind: kind.map(str::to_string),
            code: None,
            param: None,
            retry_after: ra.map(Duration::from_secs),
        }))
    }

    #[test]
    fn classification() {
        assert_eq!(
            Class::of(&rejected(400, Some("context_length_exceeded"), None)),
            Class::Fatal
        );
        assert_eq!(Class::of(&rejected(400, None, None)), Class::Fatal);
        assert_eq!(Class::of(&rejected(401, None, None)), Class::Failed);
        assert_eq!(Class::of(&rejected(422, None, None)), Class::Fatal);
        assert_eq!(
            Class::of(&rejected(403, Some("content_policy_violation"), None)),
            Class::Fatal
        );
        assert_eq!(
            Class::of(&rejected(429, Some("rate_limit_error"), Some(2))),
            Class::RateLimited {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        let failed = GatewayError::UpstreamFailed {
            provider: "p".into(),
            message: "upstream returned HTTP 503: busy".into(),
        };
        assert_eq!(Class::of(&failed), Class::Failed);
        assert_eq!(status_of(&failed), Some(503));
        assert_eq!(
            Class::of(&GatewayError::UpstreamTimeout {
                provider: "p".into(),
                message: "t".into()
            }),
            Class::TimedOut
        );
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        for tries in 1..10 {
            for _ in 0..100 {
                let d = backoff(base, max, tries, &mut rng);
                let cap = (100u64 << (tries - 1)).min(1000);
                assert!(d <= Duration::from_millis(cap), "{tries}: {d:?}");
            }
        }
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|_| backoff(base, max, 3, &mut rng).as_millis())
            .collect();
        assert!(spread.len() > 10, "jitter spreads the waits");
    }

    #[test]
    fn budget_limits_retries_to_a_share_of_requests() {
        let b = RetryBudget::new(20, 1); // reserve: 10 per window
        for _ in 0..100 {
            b.request(Instant::now());
        }
        let mut allowed = 0;
        for _ in 0..100 {
            if b.try_retry(Instant::now()) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 30, "20% of 100 plus the reserve of 10");
        // The window slides: after 10 s the old requests and retries no longer count.
        let later = Instant::now() + Duration::from_secs(11);
        let mut allowed = 0;
        for _ in 0..100 {
            if b.try_retry(later) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 10, "only the reserve without new requests");
    }
}
