//! Pricing: cost of a request from a price version and token usage, in micro-USD.
//!
//! Prices are integer micro-USD per 1M tokens for input, cached input and output, each split into a
//! network cost and a platform fee, plus an optional markup (basis points) on the network cost.
//! Reasoning tokens are output tokens: `completion_tokens` already includes them (OpenAI
//! convention), so they are recorded but not billed a second time.
//!
//! Rounding: every component is computed exactly in units of 1e-16 USD, summed, and the total is
//! rounded **once per request, half up**, to the micro-dollar. Per-component figures in the request
//! record are each rounded half up for display; only the total is charged.

use crate::store::PriceRow;

use super::money::{div_round_half_up, parse_usd, Micros, MoneyError};

/// Token usage of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Input tokens served from the upstream's prompt cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
    /// All output tokens, reasoning included.
    pub completion_tokens: u64,
    /// Reasoning tokens (a subset of `completion_tokens`; informational).
    pub reasoning_tokens: u64,
}

/// A request's cost, in micro-USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Cost {
    /// The charge: the exact total rounded once, half up.
    pub total: Micros,
    pub input: Micros,
    pub cached: Micros,
    pub output: Micros,
    /// Part of `total` that is network (upstream) cost; `total - network` is the platform fee.
    pub network: Micros,
}

impl Cost {
    pub fn platform_fee(&self) -> Micros {
        self.total - self.network
    }
}

/// 1e-16 USD per (token × micro-USD-per-1M-tokens × 10_000 bps).
const SCALE_TO_MICROS: i128 = 10_000_000_000; // 1e16 units per USD / 1e6 micros per USD

fn line(tokens: u64, network_per_m: i64, fee_per_m: i64, markup_bps: i64) -> (i128, i128) {
    let t = i128::from(tokens);
    let net = t * i128::from(network_per_m.max(0)) * 10_000;
    let markup = t * i128::from(network_per_m.max(0)) * i128::from(markup_bps.max(0));
    let fee = t * i128::from(fee_per_m.max(0)) * 10_000;
    (net, markup + fee)
}

fn to_micros(units: i128) -> Micros {
    i64::try_from(div_round_half_up(units, SCALE_TO_MICROS)).unwrap_or(i64::MAX)
}

/// Cost of `usage` at `price`.
pub fn compute_cost(price: &PriceRow, usage: &Usage) -> Cost {
    let cached = usage.cached_tokens.min(usage.prompt_tokens);
    let uncached = usage.prompt_tokens - cached;
    let (in_net, in_fee) = line(
        uncached,
        price.input_micros_per_m,
        price.fee_input_micros_per_m,
        price.markup_bps,
    );
    let (c_net, c_fee) = line(
        cached,
        price.cached_micros_per_m,
        price.fee_cached_micros_per_m,
        price.markup_bps,
    );
    let (o_net, o_fee) = line(
        usage.completion_tokens,
        price.output_micros_per_m,
        price.fee_output_micros_per_m,
        price.markup_bps,
    );
    let total = to_micros(in_net + in_fee + c_net + c_fee + o_net + o_fee);
    let network = to_micros(in_net + c_net + o_net).min(total);
    Cost {
        total,
        input: to_micros(in_net + in_fee),
        cached: to_micros(c_net + c_fee),
        output: to_micros(o_net + o_fee),
        network,
    }
}

/// What one million tokens of each kind cost at `price`, fee and markup included, in micro-USD:
/// the rates a model card shows, computed by [`compute_cost`] itself so they agree with charges.
pub fn per_mtok_totals(price: &PriceRow) -> crate::config::Price {
    const M: u64 = 1_000_000;
    let total = |u: Usage| u64::try_from(compute_cost(price, &u).total).unwrap_or(0);
    crate::config::Price {
        input: total(Usage {
            prompt_tokens: M,
            ..Usage::default()
        }),
        cached_input: total(Usage {
            prompt_tokens: M,
            cached_tokens: M,
            ..Usage::default()
        }),
        output: total(Usage {
            completion_tokens: M,
            ..Usage::default()
        }),
    }
}

/// Worst-case cost to hold before the upstream call: every prompt token at the uncached input
/// price plus `max_output_tokens` at the output price.
pub fn hold_amount(
    price: &PriceRow,
    prompt_tokens_estimate: u64,
    max_output_tokens: u64,
) -> Micros {
    compute_cost(
        price,
        &Usage {
            prompt_tokens: prompt_tokens_estimate,
            cached_tokens: 0,
            completion_tokens: max_output_tokens,
            reasoning_tokens: 0,
        },
    )
    .total
}

/// A price as written in config or the admin API: decimal USD per 1M tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSpec {
    /// Network (upstream) USD per 1M input tokens.
    pub input: String,
    /// USD per 1M cached input tokens (defaults to `input`).
    #[serde(default)]
    pub cached_input: Option<String>,
    pub output: String,
    /// Platform fee USD per 1M tokens, added on top of the network price.
    #[serde(default)]
    pub fee_input: Option<String>,
    #[serde(default)]
    pub fee_cached_input: Option<String>,
    #[serde(default)]
    pub fee_output: Option<String>,
    /// Markup on the network price, percent as a decimal string (`"5"`, `"2.5"`).
    #[serde(default)]
    pub markup_percent: Option<String>,
}

impl PriceSpec {
    /// Converts to a price row for `model`/`provider`, effective at `effective_at` (unix ms).
    pub fn to_row(
        &self,
        model: &str,
        provider: &str,
        source: &str,
        effective_at: i64,
    ) -> Result<PriceRow, MoneyError> {
        let nonneg = |s: &str| -> Result<i64, MoneyError> {
            let v = parse_usd(s)?;
            if v < 0 {
                return Err(MoneyError::Invalid(s.to_string()));
            }
            Ok(v)
        };
        let opt = |s: &Option<String>| -> Result<i64, MoneyError> {
            s.as_deref().map(nonneg).transpose().map(|v| v.unwrap_or(0))
        };
        let input = nonneg(&self.input)?;
        let markup_bps = match &self.markup_percent {
            // percent with up to 2 decimals → basis points, via the same exact decimal parser
            Some(p) => {
                let micro = nonneg(p)?; // percent × 1e6
                if micro % 10_000 != 0 {
                    return Err(MoneyError::Invalid(p.clone()));
                }
                micro / 10_000
            }
            None => 0,
        };
        Ok(PriceRow {
            id: None,
            model: model.to_string(),
            provider: provider.to_string(),
            input_micros_per_m: input,
            cached_micros_per_m: match &self.cached_input {
                Some(c) => nonneg(c)?,
                None => input,
            },
            output_micros_per_m: nonneg(&self.output)?,
            fee_input_micros_per_m: opt(&self.fee_input)?,
            fee_cached_micros_per_m: opt(&self.fee_cached_input)?,
            fee_output_micros_per_m: opt(&self.fee_output)?,
            markup_bps,
            source: source.to_string(),
            effective_at,
            created_at: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: i64, cached: i64, output: i64) -> PriceRow {
        PriceRow {
            id: None,
            model: "m".into(),
            provider: String::new(),
            input_micros_per_m: input,
            cached_micros_per_m: cached,
            output_micros_per_m: output,
            fee_input_micros_per_m: 0,
            fee_cached_micros_per_m: 0,
            fee_output_micros_per_m: 0,
            markup_bps: 0,
            source: "test".into(),
            effective_at: 0,
            created_at: 0,
        }
    }

    #[test]
    fn basic_cost() {
        // $0.60 / $0.15 / $2.50 per 1M
        let p = price(600_000, 150_000, 2_500_000);
        let c = compute_cost(
            &p,
            &Usage {
                prompt_tokens: 1_000,
                cached_tokens: 200,
                completion_tokens: 500,
                reasoning_tokens: 100,
            },
        );
        // 800 × 0.6 + 200 × 0.15 + 500 × 2.5 = 480 + 30 + 1250 micros
        assert_eq!(c.total, 1_760);
        assert_eq!(c.input, 480);
        assert_eq!(c.cached, 30);
        assert_eq!(c.output, 1_250);
        assert_eq!(c.network, 1_760);
        assert_eq!(c.platform_fee(), 0);
    }

    #[test]
    fn rounds_once_half_up() {
        // 1 token at $0.50/1M = 0.5 micro → rounds to 1; two components of 0.25 each → one 0.5 → 1
        let p = price(250_000, 0, 250_000);
        let c = compute_cost(
            &p,
            &Usage {
                prompt_tokens: 1,
                cached_tokens: 0,
                completion_tokens: 1,
                reasoning_tokens: 0,
            },
        );
        assert_eq!(c.total, 1, "0.25 + 0.25 = 0.5 rounds up once");
        assert_eq!(c.input, 0);
        assert_eq!(c.output, 0);
        let c = compute_cost(
            &price(400_000, 0, 0),
            &Usage {
                prompt_tokens: 1,
                ..Default::default()
            },
        );
        assert_eq!(c.total, 0, "0.4 rounds down");
    }

    #[test]
    fn fee_and_markup_split() {
        let mut p = price(1_000_000, 1_000_000, 2_000_000);
        p.fee_output_micros_per_m = 500_000;
        p.markup_bps = 1_000; // 10%
        let c = compute_cost(
            &p,
            &Usage {
                prompt_tokens: 1_000,
                cached_tokens: 0,
                completion_tokens: 1_000,
                reasoning_tokens: 0,
            },
        );
        // network: 1000 + 2000 = 3000; markup 300; fee 500
        assert_eq!(c.network, 3_000);
        assert_eq!(c.total, 3_800);
        assert_eq!(c.platform_fee(), 800);
    }

    #[test]
    fn hold_covers_any_usage_within_bounds() {
        let p = price(600_000, 150_000, 2_500_000);
        let h = hold_amount(&p, 1_000, 2_000);
        for (pt, ct, out) in [
            (1_000, 0, 2_000),
            (1_000, 1_000, 2_000),
            (10, 5, 1),
            (0, 0, 0),
        ] {
            let c = compute_cost(
                &p,
                &Usage {
                    prompt_tokens: pt,
                    cached_tokens: ct,
                    completion_tokens: out,
                    reasoning_tokens: 0,
                },
            );
            assert!(c.total <= h);
        }
    }

    #[test]
    fn spec_parsing() {
        let s = PriceSpec {
            input: "0.60".into(),
            cached_input: Some("0.15".into()),
            output: "2.50".into(),
            markup_percent: Some("5.5".into()),
            ..Default::default()
        };
        let r = s
            .to_row("kimi", "moonshot", "config", 0)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.input_micros_per_m, 600_000);
        assert_eq!(r.cached_micros_per_m, 150_000);
        assert_eq!(r.output_micros_per_m, 2_500_000);
        assert_eq!(r.markup_bps, 550);
        let bad = PriceSpec {
            input: "-1".into(),
            output: "1".into(),
            ..Default::default()
        };
        assert!(bad.to_row("m", "", "config", 0).is_err());
    }
}
