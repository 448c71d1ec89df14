//! Command-line interface: `serve`, `config check`, and account administration (accounts, keys,
//! credits, prices, usage, ledger) on the same store as the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Self-hosted, OpenAI-compatible LLM API gateway"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Config file (TOML). Without it, the built-in default config is used.
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Database URL, overriding `[database] url` (`sqlite://tollgate.db`, `postgres://…`).
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API.
    Serve {
        /// Listen address, overriding `[server] listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Redis for limits shared by several instances (sets `[limits] backend = "redis"`).
        #[arg(long, env = "TOLLGATE_REDIS_URL")]
        redis_url: Option<String>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    #[command(flatten)]
    Billing(Box<crate::billing::cli::BillingCommand>),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file and print the resolved catalog.
    Check { file: PathBuf },
}

/// Entry point for the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { listen, redis_url } => {
            let config = cli.config;
            let database_url = cli.database_url;
            telemetry::init_logging(cli.log_format, true);
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let served = runtime.block_on(serve(config, listen, database_url, redis_url));
            crate::gateway::usage::flush_outcomes();
            telemetry::flush_logs();
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file) {
            Ok(c) => {
                print_catalog(&c);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Billing(cmd) => {
            telemetry::init_logging(cli.log_format, false);
            let mut cfg = match load(cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Some(u) = cli.database_url {
                cfg.database_url = u;
            }
            if let Err(e) = check_plan(&cfg, &cmd) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let settings = crate::billing::BillingSettings::from_config(&cfg);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut out = std::io::stdout();
            match runtime.block_on(crate::billing::cli::run(*cmd, settings, &mut out)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A plan given to `accounts set-plan` must be one of `[[plans]]` in the config; one given to
/// `accounts create --plan` only gets a warning when it is not (it applies once it is defined).
fn check_plan(cfg: &Config, cmd: &crate::billing::cli::BillingCommand) -> Result<(), String> {
    use crate::billing::cli::{AccountsCmd, BillingCommand};
    let known = || {
        let names: Vec<&str> = cfg.plans.iter().map(|p| p.name.as_str()).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    match cmd {
        BillingCommand::Accounts(AccountsCmd::SetPlan { plan, .. })
            if plan != "none" && cfg.plan(plan).is_none() =>
        {
            Err(format!(
                "there is no plan {plan:?} in the config (known: {}); use `none` for no plan",
                known()
            ))
        }
        BillingCommand::Accounts(AccountsCmd::Create {
            plan: Some(plan), ..
        }) if cfg.plan(plan).is_none() => {
            eprintln!(
                "warning: there is no plan {plan:?} in the config (known: {}); the account has no limits until it is defined",
                known()
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

fn load(config: Option<PathBuf>) -> Result<Config, String> {
    match config {
        Some(path) => Config::load(&path).map_err(|e| e.to_string()),
        None => Config::builtin_default().map_err(|e| e.to_string()),
    }
}

async fn serve(
    config: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    database_url: Option<String>,
    redis_url: Option<String>,
) -> Result<(), String> {
    let mut cfg = load(config)?;
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    if let Some(u) = database_url {
        cfg.database_url = u;
    }
    if let Some(url) = redis_url {
        cfg.limits.redis_url = Some(url);
        cfg.limits.backend = crate::config::LimitsBackend::Redis;
    }
    tracing::info!(
        backend = ?cfg.limits.backend,
        on_redis_down = ?cfg.limits.on_redis_down,
        timezone = %cfg.limits.timezone,
        plans = cfg.plans.len(),
        "rate limits"
    );
    if !cfg.auth.required {
        if !cfg.server.listen.ip().is_loopback() {
            return Err(format!(
                "[auth] required = false (open mode) is refused on the non-loopback address {}; set keys or listen on 127.0.0.1",
                cfg.server.listen
            ));
        }
        tracing::warn!(
            "OPEN MODE: [auth] required = false — any caller on {} is served without a key",
            cfg.server.listen
        );
    }
    // Fail closed: a named but missing token variable must not leave /metrics open.
    if let (Some(var), None) = (&cfg.server.metrics_token_env, &cfg.server.metrics_token) {
        return Err(format!(
            "[server] metrics_token_env = {var:?}: that environment variable is not set"
        ));
    }
    for p in &cfg.providers {
        if let (Some(var), None) = (&p.api_key_env, &p.api_key) {
            tracing::warn!(provider = %p.name, "environment variable {var} is not set; requests to this provider go without a key");
        }
    }
    // Signals first, so a SIGTERM that arrives as soon as the port is open is never lost; the
    // state (models loaded, store opened) before the bind, so an open port is a serving port.
    let shutdown = crate::http::shutdown_signal();
    let billing = crate::open_billing(&cfg).await?;
    let _sweeper = billing.as_ref().map(|b| b.spawn_sweeper());
    let _key_watch = billing.as_ref().and_then(|b| b.spawn_key_watch());
    if let Some(b) = &billing {
        if b.store()
            .list_keys(None)
            .await
            .map(|k| k.is_empty())
            .unwrap_or(false)
        {
            tracing::warn!("auth is required but no API keys exist yet: create one with `tollgate accounts create NAME` and `tollgate keys create --account NAME`");
        }
    }
    let listen = cfg.server.listen;
    let at_exit = billing.clone();
    let state = crate::build_state_with(cfg, billing)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let served = crate::http::serve(state, listener, shutdown)
        .await
        .map_err(|e| e.to_string());
    if let Some(b) = at_exit {
        if let Err(e) = b.flush().await {
            tracing::warn!(error = %e, "billing: could not write everything at shutdown; the journal keeps it for the next start");
        }
    }
    served
}

fn print_catalog(c: &Config) {
    println!("listen: {}", c.server.listen);
    println!(
        "auth: {}",
        if c.auth.required {
            "required"
        } else {
            "open (no key needed)"
        }
    );
    println!("providers:");
    for p in &c.providers {
        let key = match (&p.api_key_env, &p.api_key) {
            (Some(v), Some(_)) => format!("key from ${v} (set)"),
            (Some(v), None) => format!("key from ${v} (NOT SET)"),
            (None, _) => "no key".to_string(),
        };
        println!(
            "  {:<14} {:<12} {}  [{key}]",
            p.name,
            p.dialect.as_str(),
            p.base_url
        );
    }
    println!("models:");
    for m in &c.models {
        println!(
            "  {}  (aliases: {})  context {}  max output {}  inputs {}  capabilities {}",
            m.id,
            if m.aliases.is_empty() {
                "-".to_string()
            } else {
                m.aliases.join(", ")
            },
            m.context_length,
            m.max_output_tokens,
            m.input_modalities.join("+"),
            if m.capabilities.is_empty() {
                "-".to_string()
            } else {
                m.capabilities.join(",")
            }
        );
        for r in &m.routes {
            println!(
                "    -> {} as {:?}  $/Mtok in {} cached {} out {}",
                r.provider,
                r.upstream_model,
                crate::catalog::micros_str(r.price.input),
                crate::catalog::micros_str(r.price.cached_input),
                crate::catalog::micros_str(r.price.output)
            );
        }
    }
}
