//! Calendar windows for daily and monthly limits: the day/month an instant falls in, in the
//! configured time zone, and the UTC instant that window resets.
//!
//! A day is the local calendar day: it starts at local midnight (00:00:00.000) and the quota resets
//! at the first instant of the next local day. On a DST day that day is 23 or 25 hours long. Months
//! reset at local midnight on the first of the month. All instants are Unix milliseconds.
//!
//! The arithmetic here is mirrored exactly by the Redis Lua script (`lua/admit.lua`), which gets
//! the zone as a table of `(from_ms, offset_ms)` pairs from [`Zone::offset_table`] and reads the
//! time from Redis itself.

use chrono::{Offset, TimeZone};

const DAY_MS: i64 = 86_400_000;

/// The zone daily and monthly windows are computed in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    /// A fixed offset from UTC in milliseconds (`"UTC"` is `Fixed(0)`).
    Fixed(i64),
    /// An IANA zone, with its DST rules.
    Named(chrono_tz::Tz),
}

impl Zone {
    /// Parses `"UTC"`, `"+05:30"` / `"-08:00"` or an IANA zone name.
    pub fn parse(s: &str) -> Result<Zone, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("utc") || t == "Z" {
            return Ok(Zone::Fixed(0));
        }
        if let Some(rest) = t.strip_prefix('+').or_else(|| t.strip_prefix('-')) {
            let sign = if t.starts_with('-') { -1 } else { 1 };
            let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
            let h: i64 = h
                .parse()
                .map_err(|_| format!("{s:?} is not an offset like +05:30"))?;
            let m: i64 = m
                .parse()
                .map_err(|_| format!("{s:?} is not an offset like +05:30"))?;
            if h > 14 || m > 59 {
                return Err(format!("{s:?} is out of range"));
            }
            return Ok(Zone::Fixed(sign * (h * 3_600_000 + m * 60_000)));
        }
        t.parse::<chrono_tz::Tz>()
            .map(Zone::Named)
            .map_err(|_| format!("unknown time zone {s:?} (use UTC, +HH:MM or an IANA name)"))
    }

    /// Local time minus UTC at the instant `ms`.
    pub fn offset_at(&self, ms: i64) -> i64 {
        match self {
            Zone::Fixed(o) => *o,
            Zone::Named(tz) => match chrono::DateTime::from_timestamp_millis(ms) {
                Some(dt) => {
                    i64::from(
                        tz.offset_from_utc_datetime(&dt.naive_utc())
                            .fix()
                            .local_minus_utc(),
                    ) * 1000
                }
                None => 0,
            },
        }
    }

    /// The local day number (days since 1970-01-01 local) of instant `ms`.
    pub fn day(&self, ms: i64) -> i64 {
        (ms + self.offset_at(ms)).div_euclid(DAY_MS)
    }

    /// The UTC instant local day `day` begins.
    pub fn day_start(&self, day: i64) -> i64 {
        local_to_utc(|t| self.offset_at(t), day * DAY_MS)
    }

    /// The window of `ms`: its day, month and when each resets.
    pub fn window(&self, ms: i64) -> Window {
        let day = self.day(ms);
        let (y, m, _) = civil_from_days(day);
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        Window {
            day,
            month: y * 12 + (m - 1),
            day_reset_ms: self.day_start(day + 1),
            month_reset_ms: self.day_start(days_from_civil(ny, nm, 1)),
        }
    }

    /// `(from_ms, offset_ms)` pairs describing this zone from 40 days before `around_ms` to 40 days
    /// after: offset_at(t) is the offset of the last pair with from ≤ t (the first pair covers
    /// everything before it). Used by the Redis script, whose clock is Redis's; the table only has
    /// to cover Redis's "now", so this instance's clock may be off by weeks without harm.
    pub fn offset_table(&self, around_ms: i64) -> Vec<(i64, i64)> {
        let start = around_ms - 40 * DAY_MS;
        let end = around_ms + 40 * DAY_MS;
        let mut out = vec![(i64::MIN / 4, self.offset_at(start))];
        if let Zone::Named(_) = self {
            let step = 3_600_000;
            let mut t = start;
            let mut cur = self.offset_at(t);
            while t < end {
                let next = t + step;
                let o = self.offset_at(next);
                if o != cur {
                    // Binary-search the exact millisecond of the change.
                    let (mut lo, mut hi) = (t, next);
                    while hi - lo > 1 {
                        let mid = lo + (hi - lo) / 2;
                        if self.offset_at(mid) == cur {
                            lo = mid;
                        } else {
                            hi = mid;
                        }
                    }
                    out.push((hi, o));
                    cur = o;
                }
                t = next;
            }
        }
        out
    }
}

/// The calendar windows an instant falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub day: i64,
    /// `year * 12 + month0`.
    pub month: i64,
    pub day_reset_ms: i64,
    pub month_reset_ms: i64,
}

/// The UTC instant of local wall time `local_ms`; if that wall time does not exist (a DST gap at
/// midnight), the first instant after the gap.
fn local_to_utc(offset_at: impl Fn(i64) -> i64, local_ms: i64) -> i64 {
    let guess = local_ms - offset_at(local_ms);
    let r = local_ms - offset_at(guess);
    if r + offset_at(r) == local_ms {
        r
    } else {
        // In a gap: no instant shows this wall time; the day starts when the gap ends.
        guess.max(r)
    }
}

/// Proleptic Gregorian date of a day number (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Day number of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .expect("rfc3339")
            .timestamp_millis()
    }

    #[test]
    fn civil_round_trip() {
        for d in [-800_000, -1, 0, 1, 19_000, 20_000, 2_000_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
    }

    #[test]
    fn utc_day_resets_at_midnight_exactly() {
        let z = Zone::parse("UTC").expect("utc");
        let before = ms("2026-11-22T23:59:59.999Z");
        let after = ms("2026-11-23T00:00:00.000Z");
        assert_eq!(z.day(before) + 1, z.day(after));
        assert_eq!(z.window(before).day_reset_ms, after);
        assert_eq!(z.window(before).month_reset_ms, ms("2026-12-01T00:00:00Z"));
        assert_eq!(
            z.window(ms("2026-12-15T00:00:00Z")).month_reset_ms,
            ms("2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn fixed_offset_resets_at_local_midnight() {
        let z = Zone::parse("+09:00").expect("offset");
        // Local midnight in UTC+9 is 15:00 UTC the day before (the LiteLLM #34896 bug: late by 9 h).
        let w = z.window(ms("2026-11-22T10:00:00Z"));
        assert_eq!(w.day_reset_ms, ms("2026-11-22T15:00:00Z"));
        let z = Zone::parse("-05:30").expect("offset");
        assert_eq!(
            z.window(ms("2026-11-22T10:00:00Z")).day_reset_ms,
            ms("2026-11-23T05:30:00Z")
        );
    }

    #[test]
    fn dst_days_are_23_and_25_hours() {
        let z = Zone::parse("Europe/Berlin").expect("tz");
        // 2026-03-29: clocks go 02:00 -> 03:00 (23 h day); 2026-10-25: 03:00 -> 02:00 (25 h day).
        let spring = z.window(ms("2026-03-29T06:00:00Z"));
        let start = z.day_start(spring.day);
        assert_eq!(start, ms("2026-03-28T23:00:00Z"));
        assert_eq!(spring.day_reset_ms - start, 23 * 3_600_000);
        assert_eq!(spring.day_reset_ms, ms("2026-03-29T22:00:00Z"));
        let autumn = z.window(ms("2026-10-25T06:00:00Z"));
        assert_eq!(
            autumn.day_reset_ms - z.day_start(autumn.day),
            25 * 3_600_000
        );
        assert_eq!(autumn.day_reset_ms, ms("2026-10-25T23:00:00Z"));
    }

    #[test]
    fn offset_table_matches_zone() {
        let z = Zone::parse("America/New_York").expect("tz");
        let around = ms("2026-11-01T12:00:00Z");
        let table = z.offset_table(around);
        assert!(table.len() >= 2, "{table:?}");
        let lookup = |t: i64| {
            table
                .iter()
                .rev()
                .find(|(from, _)| *from <= t)
                .map(|(_, o)| *o)
                .unwrap_or(table[0].1)
        };
        let mut t = around - 30 * DAY_MS;
        while t < around + 30 * DAY_MS {
            assert_eq!(lookup(t), z.offset_at(t), "at {t}");
            t += 600_000 + 7;
        }
    }

    #[test]
    fn bad_zones_are_errors() {
        assert!(Zone::parse("Mars/Olympus").is_err());
        assert!(Zone::parse("+25:00").is_err());
    }
}
