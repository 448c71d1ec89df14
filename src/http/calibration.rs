//! Benchmark calibration only (cargo feature `calibration`, never in a default build): every
//! chat request spins for `TOLLGATE_CALIBRATION_BURN_NS` nanoseconds before anything else, so
//! `bench/calibrate.sh` can measure what a known amount of added per-request work costs in
//! throughput on a machine (BENCHMARKS.md, "What added work costs here").

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Spins for the configured time (read once from the environment; unset or 0: returns at once).
/// It spins on the clock, so a thread preempted meanwhile spends less CPU than that, never more.
pub fn burn() {
    static NS: OnceLock<u64> = OnceLock::new();
    let ns = *NS.get_or_init(|| {
        std::env::var("TOLLGATE_CALIBRATION_BURN_NS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if ns == 0 {
        return;
    }
    let until = Instant::now() + Duration::from_nanos(ns);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}
