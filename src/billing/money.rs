//! Money as integer micro-USD: parsing decimal USD strings, formatting, half-up rounding.
//!
//! No floats take part in any ledger arithmetic. The only float is produced at the very edge, for
//! JSON `usage.cost` (a number, as OpenRouter reports it), from an exact integer of micro-USD.

/// Micro-USD (1 USD = 1_000_000).
pub type Micros = i64;

pub const MICROS_PER_USD: i64 = 1_000_000;

/// Errors parsing a USD amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("invalid USD amount {0:?} (expected e.g. 1.25, at most 6 decimals)")]
    Invalid(String),
    #[error("USD amount {0:?} is too large")]
    Overflow(String),
}

/// Parses a decimal USD amount (`"1"`, `"0.05"`, `"-2.500000"`, `"1e-3"` is rejected) into micros.
pub fn parse_usd(s: &str) -> Result<Micros, MoneyError> {
    let t = s.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let body = body.strip_prefix('$').unwrap_or(body);
    let (int_part, frac_part) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    let valid = !(int_part.is_empty() && frac_part.is_empty())
        && int_part.bytes().all(|b| b.is_ascii_digit())
        && frac_part.bytes().all(|b| b.is_ascii_digit())
        && frac_part.len() <= 6
        && int_part.len() <= 12;
    if !valid {
        return Err(MoneyError::Invalid(s.to_string()));
    }
    let whole: i64 = if int_part.is_empty() {
        0
    } else {
        int_part
            .parse()
            .map_err(|_| MoneyError::Overflow(s.to_string()))?
    };
    let mut frac: i64 = 0;
    for (i, b) in frac_part.bytes().enumerate() {
        frac += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
    }
    let v = whole
        .checked_mul(MICROS_PER_USD)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(|| MoneyError::Overflow(s.to_string()))?;
    Ok(if neg { -v } else { v })
}

/// Formats micros as a fixed 6-decimal USD string: `1500` → `"0.001500"`.
pub fn format_usd(m: Micros) -> String {
    let (buf, start) = usd_digits(m);
    buf[start..].iter().map(|&b| char::from(b)).collect()
}

/// The text of [`format_usd`] written from the right into a buffer, and where it starts. Every
/// billed request formats its cost twice (header and body): digit by digit this is several times
/// cheaper than `format!` with its padding.
fn usd_digits(m: Micros) -> ([u8; 24], usize) {
    // i64::MIN is 19 digits: sign, 13 whole digits, point, 6 decimals fit in 24.
    let mut buf = [0u8; 24];
    let mut i = buf.len();
    let mut a = m.unsigned_abs();
    let mut push = |b: u8| {
        i -= 1;
        buf[i] = b;
    };
    for _ in 0..6 {
        push(b'0' + (a % 10) as u8);
        a /= 10;
    }
    push(b'.');
    loop {
        push(b'0' + (a % 10) as u8);
        a /= 10;
        if a == 0 {
            break;
        }
    }
    if m < 0 {
        push(b'-');
    }
    (buf, i)
}

/// JSON number for a micro-USD amount (display only; exact for any realistic amount).
pub fn usd_json(m: Micros) -> serde_json::Value {
    // Every integer below 2^53 is exact in f64, and the shortest round-trip printing of
    // m / 1e6 is the 6-decimal string, so the JSON text equals `format_usd` minus trailing zeros.
    serde_json::Number::from_f64(m as f64 / 1_000_000.0)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

/// The exact decimal text of a micro-USD amount as a raw JSON number (`1` → `0.000001`), for
/// wire types that want the cost without float formatting (no exponent form).
pub fn usd_raw(m: Micros) -> Box<serde_json::value::RawValue> {
    let (buf, start) = usd_digits(m);
    // Trailing zeros go, then a trailing point: the whole part keeps its digits (`0` for zero).
    let end = buf.len() - buf.iter().rev().take_while(|&&b| b == b'0').count();
    let end = if buf[end - 1] == b'.' { end - 1 } else { end };
    let text: String = buf[start..end].iter().map(|&b| char::from(b)).collect();
    serde_json::value::RawValue::from_string(text)
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
}

/// Divides a non-negative numerator by a positive denominator, rounding half up.
pub fn div_round_half_up(n: i128, d: i128) -> i128 {
    if d <= 0 {
        return 0;
    }
    if n >= 0 {
        (n + d / 2) / d
    } else {
        -((-n + d / 2) / d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        assert_eq!(parse_usd("1"), Ok(1_000_000));
        assert_eq!(parse_usd("1.00"), Ok(1_000_000));
        assert_eq!(parse_usd("0.05"), Ok(50_000));
        assert_eq!(parse_usd(".5"), Ok(500_000));
        assert_eq!(parse_usd("$2.5"), Ok(2_500_000));
        assert_eq!(parse_usd("-0.000001"), Ok(-1));
        assert!(parse_usd("0.0000001").is_err());
        assert!(parse_usd("1e3").is_err());
        assert!(parse_usd("").is_err());
        assert!(parse_usd(".").is_err());
        assert!(parse_usd("NaN").is_err());
        assert!(parse_usd("9999999999999").is_err());
        assert_eq!(format_usd(1_500), "0.001500");
        assert_eq!(format_usd(-2_500_000), "-2.500000");
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(-1), "-0.000001");
        assert_eq!(format_usd(12_345_678_901), "12345.678901");
        assert_eq!(format_usd(i64::MAX), "9223372036854.775807");
        assert_eq!(format_usd(i64::MIN), "-9223372036854.775808");
        // The same text as the general formatter gives.
        for m in [
            1_i64,
            9,
            10,
            999_999,
            1_000_000,
            1_000_001,
            -7_000_000,
            123_456_789_012,
        ] {
            let a = m.unsigned_abs();
            let sign = if m < 0 { "-" } else { "" };
            let expected = format!("{sign}{}.{:06}", a / 1_000_000, a % 1_000_000);
            assert_eq!(format_usd(m), expected);
        }
    }

    #[test]
    fn rounding_half_up() {
        assert_eq!(div_round_half_up(5, 10), 1);
        assert_eq!(div_round_half_up(4, 10), 0);
        assert_eq!(div_round_half_up(15, 10), 2);
        assert_eq!(div_round_half_up(0, 10), 0);
    }

    #[test]
    fn json_cost_is_exact() {
        for m in [
            0_i64,
            1,
            7,
            12_345,
            1_000_000,
            123_456_789,
            999_999,
            4_503_599_627_370_495,
        ] {
            // the raw form is the exact decimal text
            let raw = usd_raw(m);
            assert_eq!(parse_usd(raw.get()), Ok(m), "{}", raw.get());
            // the number form is the double nearest to the exact value (display only)
            let v = usd_json(m);
            let text = v.to_string();
            let back: f64 = text.parse().unwrap_or(f64::NAN);
            assert_eq!(back, m as f64 / 1_000_000.0, "{text}");
            if m >= 1_000 {
                assert_eq!(parse_usd(&text), Ok(m), "{text}");
            }
        }
        assert_eq!(usd_raw(1_500_000).get(), "1.5");
        assert_eq!(usd_raw(0).get(), "0");
        assert_eq!(usd_raw(2_000_000).get(), "2");
        assert_eq!(usd_raw(10_000_000).get(), "10");
        assert_eq!(usd_raw(100).get(), "0.0001");
        assert_eq!(usd_raw(-2_500_000).get(), "-2.5");
        assert_eq!(usd_raw(-3_000_000).get(), "-3");
    }
}
