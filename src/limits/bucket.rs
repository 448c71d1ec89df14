//! GCRA arithmetic for per-minute limits, in exact integers (mirrored line by line in `lua/limits.lua`).
//!
//! A limit of `L` units per period `P` ms is a bucket whose `level` is the GCRA "theoretical
//! arrival time minus now", scaled by `L` so every quantity is an integer: one unit costs `P`,
//! the bucket holds `P * L` (a burst of `L`), and it drains at `L` per millisecond (i.e. one
//! unit every `P / L` ms, continuously). A request of `c` units is admitted iff
//! `level + c * P <= P * L`. There is no window boundary, so no 2× burst at one: in any interval
//! of `d` ms at most `L + floor(d * L / P)` units are admitted.
//!
//! Values stay below 2^53 (limits ≤ 1e9, P = 60 000), so Lua's doubles compute the same numbers.
//! A correction upwards (a request used more than it reserved) may leave the level above `P * L`;
//! it then drains for longer than a period, like any GCRA debt.

/// The period of per-minute limits.
pub const MINUTE_MS: i64 = 60_000;

/// A bucket's stored state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    pub level: i64,
    pub last_ms: i64,
}

impl Bucket {
    /// The level at `now`, after draining since `last_ms` (a clock that went backwards drains nothing).
    pub fn level_at(&self, now: i64, limit: i64) -> i64 {
        let elapsed = (now - self.last_ms).max(0);
        // Compared before multiplying, so a long idle time cannot overflow.
        if elapsed >= self.drain_ms(limit) {
            0
        } else {
            self.level - elapsed * limit
        }
    }

    /// Milliseconds the stored level needs to drain completely.
    fn drain_ms(&self, limit: i64) -> i64 {
        ceil_div(self.level.max(0), limit)
    }

    /// The instant (ms) from which the bucket is empty.
    pub fn drained_at(&self, limit: i64) -> i64 {
        self.last_ms.saturating_add(self.drain_ms(limit))
    }

    /// Milliseconds until `cost` more units fit, or `None` when `cost` exceeds the whole limit.
    pub fn wait_ms(&self, now: i64, limit: i64, cost: i64) -> Option<i64> {
        if cost > limit {
            return None;
        }
        let need = self.level_at(now, limit) + cost * MINUTE_MS - MINUTE_MS * limit;
        Some(if need <= 0 { 0 } else { ceil_div(need, limit) })
    }

    /// Adds `cost` units at `now` (after a successful `wait_ms(..) == Some(0)`); a negative cost
    /// returns units (a reservation corrected downwards), never below empty.
    pub fn add(&mut self, now: i64, limit: i64, cost: i64) {
        let level = self.level_at(now, limit);
        self.level = (level + cost * MINUTE_MS).max(0);
        self.last_ms = now.max(self.last_ms);
    }

    /// Whole units still available at `now`.
    pub fn remaining(&self, now: i64, limit: i64) -> i64 {
        (MINUTE_MS * limit - self.level_at(now, limit)).max(0) / MINUTE_MS
    }

    /// Milliseconds until the bucket is empty again (the full limit available).
    pub fn reset_ms(&self, now: i64, limit: i64) -> i64 {
        ceil_div(self.level_at(now, limit), limit)
    }
}

fn ceil_div(a: i64, b: i64) -> i64 {
    if b <= 0 {
        return 0;
    }
    (a + b - 1).div_euclid(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits requests of `cost` at `now` until refused; returns the count.
    fn burst(b: &mut Bucket, now: i64, limit: i64, cost: i64) -> u32 {
        let mut n = 0;
        while b.wait_ms(now, limit, cost) == Some(0) {
            b.add(now, limit, cost);
            n += 1;
        }
        n
    }

    #[test]
    fn ten_per_minute_exact_edges() {
        let mut b = Bucket::default();
        let t0 = 1_000_000;
        assert_eq!(burst(&mut b, t0, 10, 1), 10);
        // The 11th waits exactly one emission interval (6 s).
        assert_eq!(b.wait_ms(t0, 10, 1), Some(6_000));
        assert_eq!(b.wait_ms(t0 + 5_999, 10, 1), Some(1));
        assert_eq!(burst(&mut b, t0 + 5_999, 10, 1), 0);
        assert_eq!(burst(&mut b, t0 + 6_000, 10, 1), 1);
        assert_eq!(b.remaining(t0 + 6_000, 10), 0);
        // A full minute after the last admission everything is back.
        assert_eq!(b.reset_ms(t0 + 6_000, 10), 60_000);
        assert_eq!(burst(&mut b, t0 + 66_000, 10, 1), 10);
    }

    #[test]
    fn no_double_burst_across_any_boundary() {
        // A fixed window would admit 10 at 59.999 s and 10 more at 60.000 s. GCRA admits, in any
        // interval of d ms, at most 10 + floor(d / 6000).
        let mut b = Bucket::default();
        let mut admitted = Vec::new();
        let mut t = 0;
        while t < 180_000 {
            if b.wait_ms(t, 10, 1) == Some(0) {
                b.add(t, 10, 1);
                admitted.push(t);
            }
            t += 250;
        }
        for (i, start) in admitted.iter().enumerate() {
            for d in [1_000, 6_000, 30_000, 60_000] {
                let n = admitted[i..].iter().filter(|&&x| x < start + d).count() as i64;
                assert!(n <= 10 + d / 6_000, "{n} admitted in {d} ms from {start}");
            }
        }
        // Sustained rate: 10 burst + one per 6 s over 180 s, sampled every 250 ms.
        assert_eq!(admitted.len(), 10 + 29);
    }

    #[test]
    fn tokens_weighted_and_corrected() {
        let mut b = Bucket::default();
        let lim = 1_000;
        assert_eq!(b.wait_ms(0, lim, 900), Some(0));
        b.add(0, lim, 900);
        assert_eq!(b.remaining(0, lim), 100);
        assert_eq!(b.wait_ms(0, lim, 200), Some(6_000));
        // Actual usage was 50, not 900: return 850.
        b.add(0, lim, -850);
        assert_eq!(b.remaining(0, lim), 950);
        assert_eq!(b.wait_ms(0, lim, 200), Some(0));
        assert_eq!(b.wait_ms(0, lim, 1_001), None);
        // Correction never drives the level below empty.
        b.add(0, lim, -10_000);
        assert_eq!(b.level, 0);
    }

    #[test]
    fn debt_from_an_upward_correction_drains_fully() {
        // 10 tokens/min, 10 reserved, 25 actually used: 15 more than a full bucket.
        let mut b = Bucket::default();
        b.add(0, 10, 10);
        b.add(0, 10, 15);
        assert_eq!(b.level, 25 * MINUTE_MS);
        // Full again only after 2.5 minutes, not after one (no clamp at one period).
        assert_eq!(b.reset_ms(60_001, 10), 89_999);
        assert_eq!(b.wait_ms(60_001, 10, 1), Some(95_999 - 60_001 + 1));
        assert_eq!(b.wait_ms(96_000, 10, 1), Some(0));
        assert_eq!(b.drained_at(10), 150_000);
        assert_eq!(b.level_at(150_000, 10), 0);
        assert_eq!(b.level_at(i64::MAX, 10), 0);
    }

    #[test]
    fn clock_going_backwards_drains_nothing() {
        let mut b = Bucket::default();
        b.add(10_000, 10, 10);
        assert_eq!(b.level_at(5_000, 10), b.level);
        assert_eq!(b.wait_ms(5_000, 10, 1), Some(6_000));
    }
}
