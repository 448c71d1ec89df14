//! Billing: accounts, API keys, prices, and the hold → settle ledger around every request.
//!
//! See [`service::Billing`] for the API the gateway uses, and the README section "Billing" for the
//! charging rules.

pub mod attempts;
pub mod cli;
pub mod dates;
pub mod journal;
pub mod keys;
pub mod lease;
pub mod money;
pub mod pricing;
pub mod service;

pub use money::{format_usd, parse_usd, usd_json, Micros};
pub use pricing::{compute_cost, hold_amount, Cost, PriceSpec, Usage};
pub use service::{
    Billing, BillingError, BillingSettings, CreditResult, Hold, HoldParams, Principal, SettleInput,
    Settlement,
};
