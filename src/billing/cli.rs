//! CLI commands for billing: `accounts`, `credits`, `keys`, `prices`, `usage`, `ledger` (and the
//! limits parts of `accounts` / `keys`: plans and limit overrides).
//!
//! The top-level `src/cli.rs` embeds [`BillingCommand`] and calls [`run`] with the same
//! `--config` / `--database-url` resolution as `serve`, so the CLI acts on the server's store.

use std::io::Write;

use crate::store::{now_ms, UsageGroup, UsageQuery};

use super::dates::{format_day, format_rfc3339, parse_time};
use super::money::{format_usd, parse_usd};
use super::pricing::PriceSpec;
use super::service::{Billing, BillingError, BillingSettings};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AccountsCmd {
    /// Create an account (zero balance).
    Create {
        name: String,
        #[arg(long)]
        plan: Option<String>,
    },
    /// List accounts with balances.
    List,
    /// Show one account.
    Show { name: String },
    /// Change an account's plan (a `[[plans]]` name, or `none`); applies to its next request.
    SetPlan { name: String, plan: String },
    /// Show, set (`--requests-per-minute 5`) or clear (`none`, `--clear`) the account's limit
    /// overrides; each set value replaces the plan's.
    Limits {
        name: String,
        #[command(flatten)]
        limits: crate::limits::overrides::LimitArgs,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CreditsCmd {
    /// Add credit (positive USD) or adjust it down (negative USD, e.g. `-- -1.50`).
    Add {
        account: String,
        #[arg(allow_hyphen_values = true)]
        usd: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCmd {
    /// Create a key; prints the key, and only the key, on stdout.
    Create {
        #[arg(long)]
        account: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        name: Option<String>,
        /// Lifetime spend cap in USD.
        #[arg(long)]
        spend_cap: Option<String>,
    },
    /// Import an existing key (e.g. a former static key), read from stdin; prints its prefix.
    Import {
        #[arg(long)]
        account: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (prefixes only).
    List {
        #[arg(long)]
        account: Option<String>,
    },
    /// Revoke a key by its prefix (`tg-XXXXXXXX`).
    Revoke { prefix: String },
    /// Set (USD) or clear (`none`) a key's spend cap.
    SetCap { prefix: String, usd: String },
    /// Show, set or clear the key's own limit overrides (they replace the account's values).
    Limits {
        prefix: String,
        #[command(flatten)]
        limits: crate::limits::overrides::LimitArgs,
    },
}

/// Arguments of `prices set`.
#[derive(Debug, Clone, clap::Args)]
pub struct PriceSetArgs {
    pub model: String,
    #[arg(long, default_value = "")]
    pub provider: String,
    #[arg(long)]
    pub input: String,
    #[arg(long)]
    pub cached_input: Option<String>,
    #[arg(long)]
    pub output: String,
    #[arg(long)]
    pub fee_input: Option<String>,
    #[arg(long)]
    pub fee_cached_input: Option<String>,
    #[arg(long)]
    pub fee_output: Option<String>,
    #[arg(long)]
    pub markup_percent: Option<String>,
    /// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or unix seconds; default now.
    #[arg(long)]
    pub effective_at: Option<String>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PricesCmd {
    /// Add a price version (USD per 1M tokens).
    Set(Box<PriceSetArgs>),
    /// List every price version of a model.
    History { model: String },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum LedgerCmd {
    /// Verify ledger invariants; exits non-zero on a problem.
    Check,
    /// Release expired holds now.
    Sweep,
}

/// `--account`, `--from` and `--to` of the commands that read by time.
#[derive(Debug, Clone, clap::Args)]
pub struct Window {
    #[arg(long)]
    pub account: Option<String>,
    /// Start (inclusive): `YYYY-MM-DD`, RFC 3339 UTC, or unix seconds. Default: 30 days ago
    /// (`usage`), a day ago (`requests`).
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive). Default: now.
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UsageArgs {
    #[command(flatten)]
    pub window: Window,
    #[arg(long, default_value = "day")]
    pub group_by: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RequestsArgs {
    #[command(flatten)]
    pub window: Window,
    /// At most this many (the oldest first).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

/// The billing subcommands, for embedding in the top-level clap parser.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BillingCommand {
    /// Manage accounts.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Add or adjust prepaid credit.
    #[command(subcommand)]
    Credits(CreditsCmd),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage model prices.
    #[command(subcommand)]
    Prices(PricesCmd),
    /// Show usage by day, model or key.
    Usage(UsageArgs),
    /// Print request records, one JSON object per line (held and leased requests alike).
    Requests(RequestsArgs),
    /// Ledger maintenance.
    #[command(subcommand)]
    Ledger(LedgerCmd),
}

impl Window {
    /// The account's id (if one is named) and `[from, to)` in milliseconds: `--from` defaults to
    /// `back_ms` before now, `--to` to now.
    async fn resolve(
        &self,
        billing: &Billing,
        back_ms: i64,
    ) -> Result<(Option<String>, i64, i64), BillingError> {
        let now = now_ms();
        let at = |s: &Option<String>, flag: &str, default: i64| match s {
            Some(s) => {
                parse_time(s).ok_or_else(|| BillingError::Invalid(format!("bad --{flag} {s:?}")))
            }
            None => Ok(default),
        };
        let (from, to) = (
            at(&self.from, "from", now - back_ms)?,
            at(&self.to, "to", now + 1)?,
        );
        let account_id = match &self.account {
            Some(name) => Some(billing.account(name).await?.id),
            None => None,
        };
        Ok((account_id, from, to))
    }
}

fn usd_arg(s: &str) -> Result<i64, BillingError> {
    parse_usd(s).map_err(|e| BillingError::Invalid(e.to_string()))
}

/// Applies `args` to the overrides of `target` (if any are given) and prints the result.
async fn limit_overrides(
    billing: &Billing,
    target: crate::limits::overrides::Target<'_>,
    args: &crate::limits::overrides::LimitArgs,
    out: &mut dyn Write,
) -> Result<(), BillingError> {
    use crate::limits::overrides;
    let patch = args.patch().map_err(BillingError::Invalid)?;
    let now = if patch.is_empty() {
        overrides::read(billing.store(), target).await?
    } else {
        overrides::apply(billing.store(), target, &patch).await?
    };
    write!(out, "{}", overrides::to_lines(&now))
        .map_err(|e| BillingError::Invalid(format!("write failed: {e}")))
}

/// Opens the store described by `settings` and runs one command, writing results to `out`
/// (machine-usable lines) and notes to stderr.
pub async fn run(
    cmd: BillingCommand,
    settings: BillingSettings,
    out: &mut dyn Write,
) -> Result<(), BillingError> {
    let billing = Billing::open(settings).await?;
    let r = run_with(&billing, cmd, out).await;
    billing.store().close().await;
    r
}

/// Runs one command against an open service.
pub async fn run_with(
    billing: &Billing,
    cmd: BillingCommand,
    out: &mut dyn Write,
) -> Result<(), BillingError> {
    let io = |e: std::io::Error| BillingError::Invalid(format!("write failed: {e}"));
    match cmd {
        BillingCommand::Accounts(AccountsCmd::Create { name, plan }) => {
            let a = billing.create_account(&name, plan.as_deref()).await?;
            writeln!(out, "{}\t{}", a.name, a.id).map_err(io)?;
        }
        BillingCommand::Accounts(AccountsCmd::List) => {
            writeln!(out, "NAME\tPLAN\tBALANCE_USD\tHELD_USD\tID").map_err(io)?;
            for a in billing.list_accounts().await? {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}",
                    a.name,
                    a.plan.as_deref().unwrap_or("-"),
                    format_usd(a.balance_micros),
                    format_usd(a.held_micros),
                    a.id
                )
                .map_err(io)?;
            }
        }
        BillingCommand::Accounts(AccountsCmd::Show { name }) => {
            let a = billing.account(&name).await?;
            writeln!(
                out,
                "name\t{}\nid\t{}\nplan\t{}\nbalance_usd\t{}\nheld_usd\t{}",
                a.name,
                a.id,
                a.plan.as_deref().unwrap_or("-"),
                format_usd(a.balance_micros),
                format_usd(a.held_micros)
            )
            .map_err(io)?;
        }
        BillingCommand::Accounts(AccountsCmd::SetPlan { name, plan }) => {
            let plan = (plan != "none").then_some(plan);
            if !crate::limits::overrides::set_plan(billing.store(), &name, plan.as_deref()).await? {
                return Err(BillingError::NotFound(format!("account {name}")));
            }
            writeln!(out, "{name}\tplan={}", plan.as_deref().unwrap_or("none")).map_err(io)?;
        }
        BillingCommand::Accounts(AccountsCmd::Limits { name, limits }) => {
            let a = billing.account(&name).await?;
            let target = crate::limits::overrides::Target::Account(&a.id);
            limit_overrides(billing, target, &limits, out).await?;
        }
        BillingCommand::Keys(KeysCmd::Limits { prefix, limits }) => {
            let k = billing.key(&prefix).await?;
            let target = crate::limits::overrides::Target::Key(&k.id);
            limit_overrides(billing, target, &limits, out).await?;
        }
        BillingCommand::Credits(CreditsCmd::Add {
            account,
            usd,
            reason,
            idempotency_key,
        }) => {
            let amount = usd_arg(&usd)?;
            let r = billing
                .add_credits(&account, amount, &reason, idempotency_key.as_deref())
                .await?;
            if r.replayed {
                eprintln!("note: idempotency key already used; nothing applied again");
            }
            writeln!(
                out,
                "{}\tbalance_usd={}\t{}",
                account,
                format_usd(r.balance_micros),
                r.transaction_id
            )
            .map_err(io)?;
        }
        BillingCommand::Keys(KeysCmd::Create {
            account,
            admin,
            name,
            spend_cap,
        }) => {
            let cap = spend_cap.as_deref().map(usd_arg).transpose()?;
            let (raw, row) = billing
                .create_key(&account, admin, name.as_deref(), cap)
                .await?;
            eprintln!(
                "created {} key {} for account {} — store it now, it is not shown again",
                if admin { "admin" } else { "customer" },
                row.prefix,
                row.account_name
            );
            writeln!(out, "{raw}").map_err(io)?;
        }
        BillingCommand::Keys(KeysCmd::Import {
            account,
            admin,
            name,
        }) => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| BillingError::Invalid(format!("reading the key from stdin: {e}")))?;
            let row = billing
                .import_key(&account, line.trim(), admin, name.as_deref())
                .await?;
            writeln!(out, "{}", row.prefix).map_err(io)?;
        }
        BillingCommand::Keys(KeysCmd::List { account }) => {
            writeln!(
                out,
                "PREFIX\tACCOUNT\tADMIN\tSPENT_USD\tCAP_USD\tLAST_USED\tREVOKED"
            )
            .map_err(io)?;
            for k in billing.list_keys(account.as_deref()).await? {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    k.prefix,
                    k.account_name,
                    if k.is_admin { "yes" } else { "no" },
                    format_usd(k.spent_micros),
                    k.spend_cap_micros
                        .map(format_usd)
                        .unwrap_or_else(|| "-".into()),
                    k.last_used_at
                        .map(format_rfc3339)
                        .unwrap_or_else(|| "-".into()),
                    k.revoked_at
                        .map(format_rfc3339)
                        .unwrap_or_else(|| "-".into()),
                )
                .map_err(io)?;
            }
        }
        BillingCommand::Keys(KeysCmd::Revoke { prefix }) => {
            billing.revoke_key(&prefix).await?;
            writeln!(out, "revoked {prefix}").map_err(io)?;
        }
        BillingCommand::Keys(KeysCmd::SetCap { prefix, usd }) => {
            let cap = if usd == "none" {
                None
            } else {
                Some(usd_arg(&usd)?)
            };
            let k = billing.set_key_cap(&prefix, cap).await?;
            writeln!(
                out,
                "{}\tcap_usd={}",
                k.prefix,
                k.spend_cap_micros
                    .map(format_usd)
                    .unwrap_or_else(|| "none".into())
            )
            .map_err(io)?;
        }
        BillingCommand::Prices(PricesCmd::Set(args)) => {
            let PriceSetArgs {
                model,
                provider,
                input,
                cached_input,
                output,
                fee_input,
                fee_cached_input,
                fee_output,
                markup_percent,
                effective_at,
            } = *args;
            let at = match effective_at {
                Some(s) => parse_time(&s)
                    .ok_or_else(|| BillingError::Invalid(format!("bad --effective-at {s:?}")))?,
                None => now_ms(),
            };
            let spec = PriceSpec {
                input,
                cached_input,
                output,
                fee_input,
                fee_cached_input,
                fee_output,
                markup_percent,
            };
            let row = spec
                .to_row(&model, &provider, "admin", at)
                .map_err(|e| BillingError::Invalid(e.to_string()))?;
            let r = billing.set_price(&row).await?;
            writeln!(
                out,
                "{}\tversion={}\teffective_at={}",
                r.model,
                r.id.unwrap_or(0),
                format_rfc3339(r.effective_at)
            )
            .map_err(io)?;
        }
        BillingCommand::Prices(PricesCmd::History { model }) => {
            writeln!(out, "VERSION\tPROVIDER\tEFFECTIVE_AT\tINPUT\tCACHED\tOUTPUT\tFEE_IN\tFEE_CACHED\tFEE_OUT\tMARKUP_BPS\tSOURCE").map_err(io)?;
            for p in billing.price_history(&model).await? {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    p.id.unwrap_or(0),
                    if p.provider.is_empty() {
                        "*"
                    } else {
                        &p.provider
                    },
                    format_rfc3339(p.effective_at),
                    format_usd(p.input_micros_per_m),
                    format_usd(p.cached_micros_per_m),
                    format_usd(p.output_micros_per_m),
                    format_usd(p.fee_input_micros_per_m),
                    format_usd(p.fee_cached_micros_per_m),
                    format_usd(p.fee_output_micros_per_m),
                    p.markup_bps,
                    p.source
                )
                .map_err(io)?;
            }
        }
        BillingCommand::Requests(args) => {
            let (account_id, from, to) = args.window.resolve(billing, 86_400_000).await?;
            for r in billing
                .request_records(account_id.as_deref(), from, to, args.limit)
                .await?
            {
                let line = serde_json::to_string(&r)
                    .map_err(|e| BillingError::Invalid(format!("request {}: {e}", r.id)))?;
                writeln!(out, "{line}").map_err(io)?;
            }
        }
        BillingCommand::Usage(args) => {
            let group: UsageGroup = args.group_by.parse().map_err(BillingError::Invalid)?;
            let (account_id, from, to) = args.window.resolve(billing, 30 * 86_400_000).await?;
            let rows = billing
                .usage(&UsageQuery {
                    account_id,
                    from_ms: from,
                    to_ms: to,
                    group,
                })
                .await?;
            writeln!(
                out,
                "GROUP\tREQUESTS\tPROMPT\tCACHED\tCOMPLETION\tREASONING\tCOST_USD"
            )
            .map_err(io)?;
            for b in rows {
                let g = match group {
                    UsageGroup::Day => b.group.parse::<i64>().map(format_day).unwrap_or(b.group),
                    _ => b.group,
                };
                writeln!(
                    out,
                    "{g}\t{}\t{}\t{}\t{}\t{}\t{}",
                    b.requests,
                    b.prompt_tokens,
                    b.cached_tokens,
                    b.completion_tokens,
                    b.reasoning_tokens,
                    format_usd(b.cost_micros)
                )
                .map_err(io)?;
            }
        }
        BillingCommand::Ledger(LedgerCmd::Sweep) => {
            let n = billing.sweep_expired().await?;
            writeln!(out, "released {n} expired holds").map_err(io)?;
        }
        BillingCommand::Ledger(LedgerCmd::Check) => {
            let rep = billing.check_ledger(Some(now_ms())).await?;
            writeln!(
                out,
                "transactions={} entries={} requests={} open_holds={} revenue_usd={}",
                rep.transactions,
                rep.entries,
                rep.requests,
                rep.open_holds,
                format_usd(rep.revenue_micros)
            )
            .map_err(io)?;
            if !rep.is_ok() {
                for p in &rep.problems {
                    writeln!(out, "PROBLEM\t{p}").map_err(io)?;
                }
                return Err(BillingError::Invalid(format!(
                    "ledger check found {} problem(s)",
                    rep.problems.len()
                )));
            }
        }
    }
    Ok(())
}
