//! The `Billing` service: authenticate keys, hold before the upstream call, settle exactly once
//! after it, sweep expired holds, and the account/key/credit/price operations behind the admin API
//! and CLI.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::gateway::prices::PriceBook;
use crate::store::ledger::{FinalState, HoldInsert, HoldOutcome, SettleWrite, TopUpOutcome};
use crate::store::{
    now_ms, sqlite_file_of, AccountRow, KeyRow, LedgerReport, PriceRow, RequestRow, Store,
    StoreError, UsageBucket, UsageQuery,
};

use super::keys::{self, SecretError, ServerSecret};
use super::lease::Leases;
use super::money::{format_usd, Micros};
use super::pricing::{compute_cost, hold_amount, Cost, PriceSpec, Usage};
use crate::store::leases::LeaseFinal;

/// Where the store is and how billing behaves.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// `sqlite://tollgate.db` (default) or `postgres://…`.
    pub database_url: String,
    /// Environment variable holding the server secret for key digests.
    pub secret_env: String,
    /// Secret file used when the variable is unset; default: `<sqlite db file>.secret`.
    pub secret_file: Option<PathBuf>,
    /// How long a hold lives before the sweeper releases it (crash recovery).
    pub hold_ttl: Duration,
    /// How often the sweeper runs.
    pub sweep_interval: Duration,
    /// Models with no price are refused (false, default) or served free (true).
    pub allow_unpriced: bool,
    /// Lease admission instead of a database hold per request (see [`super::lease`]).
    pub lease: Option<crate::config::LeaseConfig>,
    /// Reuse an authenticated key's row for this long (zero: read it on every request).
    pub key_cache: Duration,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            database_url: "sqlite://tollgate.db".to_string(),
            secret_env: "TOLLGATE_SECRET".to_string(),
            secret_file: None,
            hold_ttl: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(30),
            allow_unpriced: false,
            lease: None,
            key_cache: Duration::ZERO,
        }
    }
}

impl BillingSettings {
    /// Settings from the resolved config (`[database]`, `[auth]`, `[billing]`).
    pub fn from_config(cfg: &crate::config::Config) -> BillingSettings {
        BillingSettings {
            database_url: cfg.database_url.clone(),
            secret_env: cfg.auth.secret_env.clone(),
            secret_file: cfg.auth.secret_file.clone(),
            hold_ttl: cfg.billing.hold_ttl,
            sweep_interval: cfg.billing.sweep_interval,
            allow_unpriced: cfg.billing.allow_unpriced,
            lease: cfg.billing.lease.clone(),
            key_cache: cfg.billing.key_cache,
        }
    }

    /// The lease journal directory: configured, else next to the SQLite database
    /// (`<file>.journal`), else `tollgate-journal` in the working directory.
    pub fn journal_dir(&self) -> Option<PathBuf> {
        let l = self.lease.as_ref()?;
        Some(l.journal_dir.clone().unwrap_or_else(|| {
            sqlite_file_of(&self.database_url).map_or_else(
                || PathBuf::from("tollgate-journal"),
                |p| {
                    let mut s = p.into_os_string();
                    s.push(".journal");
                    PathBuf::from(s)
                },
            )
        }))
    }

    /// The secret file actually used: configured, or next to the SQLite database.
    pub fn effective_secret_file(&self) -> Option<PathBuf> {
        self.secret_file.clone().or_else(|| {
            sqlite_file_of(&self.database_url).map(|p| {
                let mut s = p.into_os_string();
                s.push(".secret");
                PathBuf::from(s)
            })
        })
    }
}

/// Billing errors. HTTP mapping lives in `src/http/`.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("this API key has been revoked")]
    Revoked,
    #[error("admin key required")]
    Forbidden,
    #[error("insufficient credits: this request may cost up to ${needed} but the available balance is ${available}")]
    InsufficientCredits { needed: String, available: String },
    #[error("this API key has reached its spend cap")]
    KeySpendCapReached,
    #[error("request id {0} was already used")]
    DuplicateRequest(String),
    #[error("model {0} has no price configured")]
    NoPrice(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("billing store unavailable: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

impl BillingError {
    /// Stable machine-readable code for error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            BillingError::Unauthorized => "invalid_api_key",
            BillingError::Revoked => "invalid_api_key",
            BillingError::Forbidden => "forbidden",
            BillingError::InsufficientCredits { .. } => "insufficient_credits",
            BillingError::KeySpendCapReached => "key_spend_cap_reached",
            BillingError::DuplicateRequest(_) => "duplicate_request",
            BillingError::NoPrice(_) => "model_not_priced",
            BillingError::NotFound(_) => "not_found",
            BillingError::Conflict(_) => "idempotency_conflict",
            BillingError::Invalid(_) => "invalid_request",
            BillingError::Store(_) => "billing_unavailable",
            BillingError::Secret(_) => "billing_unavailable",
        }
    }

    /// HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            BillingError::Unauthorized | BillingError::Revoked => 401,
            BillingError::Forbidden => 403,
            BillingError::InsufficientCredits { .. } | BillingError::KeySpendCapReached => 402,
            BillingError::DuplicateRequest(_) => 409,
            BillingError::NoPrice(_) => 503,
            BillingError::NotFound(_) => 404,
            BillingError::Conflict(_) => 422,
            BillingError::Invalid(_) => 400,
            BillingError::Store(_) | BillingError::Secret(_) => 503,
        }
    }
}

/// Who is calling: the account and key behind an authenticated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub account_id: String,
    pub account_name: String,
    pub key_id: String,
    /// Visible key prefix (`tg-XXXXXXXX`), safe to log.
    pub key_prefix: String,
    pub is_admin: bool,
    pub spend_cap_micros: Option<i64>,
    /// The account's plan and limit overrides as read with the key on this request (the limiter
    /// uses them instead of a query of its own).
    pub limits: Option<std::sync::Arc<crate::limits::overrides::SubjectRow>>,
}

/// What the gateway knows before the upstream call.
#[derive(Debug, Clone)]
pub struct HoldParams {
    pub request_id: String,
    /// Public model id (price lookup and usage grouping).
    pub model: String,
    /// Provider of the chosen route, if known (prices may differ per route).
    pub provider: Option<String>,
    /// Other providers the request may fail over to; the hold covers the dearest of them all.
    pub fallback_providers: Vec<String>,
    pub prompt_tokens_estimate: u64,
    /// min(max_tokens requested, model max output) — the caller clamps.
    pub max_output_tokens: u64,
    /// The answer is streamed, so the client sees the request's id before it ends. Under lease
    /// admission such a request's admission is journaled too (see [`super::lease`]).
    pub streamed: bool,
}

/// A placed hold. Settle or release it exactly once; if the process dies, the sweeper releases it
/// after `expires_at`.
#[derive(Debug, Clone)]
pub struct Hold {
    pub request_id: String,
    pub account_id: String,
    pub key_id: Option<String>,
    pub amount: Micros,
    /// The price the hold was computed at (the dearest candidate route).
    pub price: Arc<PriceRow>,
    /// Prices of every candidate route by provider; settlement uses the serving route's.
    pub route_prices: Vec<(String, Arc<PriceRow>)>,
    pub model: String,
    pub provider: Option<String>,
    pub expires_at: i64,
    pub started: Instant,
    /// Admitted under this credit lease (lease admission) instead of a hold of its own.
    pub lease: Option<super::lease::Leased>,
}

/// What happened, reported after the upstream call.
#[derive(Debug, Clone, Default)]
pub struct SettleInput {
    /// Tokens to bill: upstream-reported, or counted locally (then `estimated`).
    pub usage: Usage,
    /// Whether any content reached the client. `false` → charge 0.
    pub delivered: bool,
    /// `usage` was counted locally because the upstream reported none.
    pub estimated: bool,
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    /// Short outcome label: `ok`, `client_disconnected`, `upstream_error`, …
    pub status: String,
    pub http_status: Option<u16>,
}

/// The final state of a request after settlement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Settlement {
    pub request_id: String,
    pub state: FinalState,
    /// Amount charged (micro-USD), ≤ the hold.
    pub charged: Micros,
    /// Exact cost before the hold cap.
    pub cost: Cost,
    pub estimated: bool,
    /// The request was already final; this is the stored outcome, nothing new was written.
    pub replayed: bool,
}

/// Result of a top-up or adjustment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CreditResult {
    pub transaction_id: String,
    pub balance_micros: Micros,
    pub replayed: bool,
}

struct PriceCache {
    loaded: Option<Instant>,
    /// Versions by model, then by provider ("" = every route of the model), oldest first; looked
    /// up by `&str` on every request, so nothing is allocated for it.
    by_route: HashMap<String, HashMap<String, Vec<Arc<PriceRow>>>>,
}

const PRICE_CACHE_TTL: Duration = Duration::from_secs(5);
const TOUCH_EVERY_MS: i64 = 60_000;
/// Most keys cached at once (the cache is emptied when full).
const KEY_CACHE_MAX: usize = 100_000;
/// How often an instance with a key cache reads the store's key epoch (see
/// [`Billing::spawn_key_watch`]).
const KEY_WATCH_EVERY: Duration = Duration::from_millis(100);

/// The billing service. Clone the `Arc`; all methods take `&self`.
pub struct Billing {
    store: Store,
    secret: ServerSecret,
    settings: BillingSettings,
    prices: RwLock<PriceCache>,
    /// Where the gateway reads route prices for routing and limits; kept current on every reload.
    price_book: std::sync::OnceLock<Arc<PriceBook>>,
    /// Lease admission, when configured and started ([`Billing::start_leases`]).
    leases: Option<Arc<Leases>>,
    /// Authenticated keys by digest, when `key_cache` is set.
    keys: std::sync::Mutex<KeyCache>,
}

/// Key rows read less than `key_cache` ago, all valid as of one count of key changes
/// ([`Store::key_changes`]): when the count has moved, they are dropped.
#[derive(Default)]
struct KeyCache {
    changes: u64,
    /// By digest: (read at, row).
    rows: HashMap<String, (Instant, Arc<crate::store::KeyAuthRow>)>,
}

impl KeyCache {
    /// Drops the rows if a key changed since they were read (`changes` is the store's count now).
    fn as_of(&mut self, changes: u64) -> &mut Self {
        if self.changes != changes {
            self.rows.clear();
            self.changes = changes;
        }
        self
    }
}

impl std::fmt::Debug for Billing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Billing").finish_non_exhaustive()
    }
}

impl Billing {
    /// Opens the store (creating and migrating it) and loads the server secret.
    pub async fn open(settings: BillingSettings) -> Result<Billing, BillingError> {
        let store = Store::connect(&settings.database_url).await?;
        let secret = ServerSecret::load(
            &settings.secret_env,
            settings.effective_secret_file().as_deref(),
        )?;
        Ok(Billing::with_store(store, secret, settings))
    }

    /// Builds the service over an open store (tests).
    pub fn with_store(store: Store, secret: ServerSecret, settings: BillingSettings) -> Billing {
        Billing {
            store,
            secret,
            settings,
            prices: RwLock::new(PriceCache {
                loaded: None,
                by_route: HashMap::new(),
            }),
            price_book: std::sync::OnceLock::new(),
            leases: None,
            keys: std::sync::Mutex::default(),
        }
    }

    /// Starts lease admission when the settings ask for it: opens the journal, applies what a
    /// previous run left in it, and starts the writer and renewer tasks. Needs a Tokio runtime.
    pub async fn start_leases(&mut self) -> Result<(), BillingError> {
        let (Some(cfg), Some(dir)) = (self.settings.lease.clone(), self.settings.journal_dir())
        else {
            return Ok(());
        };
        let leases = Leases::open(self.store.clone(), &dir, cfg.slice_micros, cfg.ttl).await?;
        leases.spawn();
        self.leases = Some(leases);
        Ok(())
    }

    /// Under lease admission, writes the charges already answered that are still queued, so a
    /// read of balances or usage on this instance sees them (bounded; no-op otherwise).
    async fn written_charges(&self) {
        if let Some(l) = &self.leases {
            l.write_all_pending(Duration::from_secs(5)).await;
        }
    }

    /// Writes what lease admission still has pending and gives its idle leases back (shutdown).
    pub async fn flush(&self) -> Result<(), BillingError> {
        match &self.leases {
            Some(l) => l.flush().await,
            None => Ok(()),
        }
    }

    /// Reloads the price versions when the cache is older than its period (and so the book).
    pub async fn reload_prices_if_stale(&self) -> Result<(), BillingError> {
        self.refresh_prices(false).await
    }

    /// Keeps `book` filled with the route prices in effect, from now on and at every reload of the
    /// price versions, so the gateway routes and limits with the prices that are charged.
    pub fn publish_prices_to(&self, book: Arc<PriceBook>) {
        let _ = self.price_book.set(book);
        self.publish_prices();
    }

    fn publish_prices(&self) {
        let (Some(book), Ok(c)) = (self.price_book.get(), self.prices.read()) else {
            return;
        };
        let now = now_ms();
        let mut map = crate::gateway::prices::PriceMap::new();
        for (model, routes) in &c.by_route {
            for (provider, versions) in routes {
                if let Some(row) = versions.iter().rev().find(|p| p.effective_at <= now) {
                    map.entry(model.clone())
                        .or_default()
                        .insert(provider.clone(), super::pricing::per_mtok_totals(row));
                }
            }
        }
        book.replace(map);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &BillingSettings {
        &self.settings
    }

    // ---- authentication -------------------------------------------------------------------

    /// Resolves a raw key (`tg-…`) to its principal: an indexed lookup by digest (the digest is
    /// compared again in constant time). Without a key cache (hold admission's default) the row
    /// is read on every call, so a revocation takes effect on the next request; with one (lease
    /// admission's default), a change through this instance drops the cache at once and one made
    /// elsewhere within ~0.1 s (see [`Self::spawn_key_watch`]).
    pub async fn authenticate(&self, raw_key: &str) -> Result<Principal, BillingError> {
        if !keys::well_formed(raw_key) {
            return Err(BillingError::Unauthorized);
        }
        let digest = self.secret.digest(raw_key);
        let row = match self.cached_key(&digest) {
            Some(row) => row,
            None => {
                // Counted before the read: a row read while a key changed may predate the change.
                let changes = self.store.key_changes();
                let row = Arc::new(
                    Box::pin(self.store.key_by_hash(&digest))
                        .await?
                        .ok_or(BillingError::Unauthorized)?,
                );
                if !self.settings.key_cache.is_zero() {
                    if let Ok(mut c) = self.keys.lock() {
                        let c = c.as_of(self.store.key_changes());
                        if c.changes == changes {
                            if c.rows.len() >= KEY_CACHE_MAX {
                                c.rows.clear();
                            }
                            c.rows.insert(digest.clone(), (Instant::now(), row.clone()));
                        }
                    }
                }
                row
            }
        };
        if !keys::digests_equal(&row.key_hash, &digest) {
            return Err(BillingError::Unauthorized);
        }
        if row.revoked_at.is_some() {
            return Err(BillingError::Revoked);
        }
        let now = now_ms();
        if row.last_used_at.is_none_or(|t| now - t >= TOUCH_EVERY_MS) {
            if let Err(e) = Box::pin(self.store.touch_key(&row.id, now)).await {
                tracing::warn!(key = %row.prefix, error = %e, "could not update last_used_at");
            }
            // The cached row is read again next time, with the new `last_used_at`.
            self.forget_key(&digest);
        }
        Ok(Principal {
            account_id: row.account_id.clone(),
            account_name: row.account_name.clone(),
            key_id: row.id.clone(),
            key_prefix: row.prefix.clone(),
            is_admin: row.is_admin,
            spend_cap_micros: row.spend_cap_micros,
            limits: Some(row.limits.clone()),
        })
    }

    /// A key row read less than `key_cache` ago.
    fn cached_key(&self, digest: &str) -> Option<Arc<crate::store::KeyAuthRow>> {
        if self.settings.key_cache.is_zero() {
            return None;
        }
        let mut c = self.keys.lock().ok()?;
        let (at, row) = c.as_of(self.store.key_changes()).rows.get(digest)?;
        (at.elapsed() < self.settings.key_cache).then(|| row.clone())
    }

    fn forget_key(&self, digest: &str) {
        if let Ok(mut c) = self.keys.lock() {
            c.rows.remove(digest);
        }
    }

    // ---- prices ---------------------------------------------------------------------------

    async fn refresh_prices(&self, force: bool) -> Result<(), BillingError> {
        let fresh = self
            .prices
            .read()
            .map(|c| c.loaded.is_some_and(|t| t.elapsed() < PRICE_CACHE_TTL))
            .unwrap_or(false);
        if fresh && !force {
            return Ok(());
        }
        let all = Box::pin(self.store.all_prices()).await?;
        let mut by_route: HashMap<String, HashMap<String, Vec<Arc<PriceRow>>>> = HashMap::new();
        for p in all {
            by_route
                .entry(p.model.clone())
                .or_default()
                .entry(p.provider.clone())
                .or_default()
                .push(Arc::new(p));
        }
        for v in by_route.values_mut().flat_map(|r| r.values_mut()) {
            v.sort_by_key(|p| (p.effective_at, p.id));
        }
        if let Ok(mut c) = self.prices.write() {
            c.by_route = by_route;
            c.loaded = Some(Instant::now());
        }
        self.publish_prices();
        Ok(())
    }

    /// The price in effect now for a model route: the provider-specific version if any, else the
    /// model-wide one.
    pub async fn price_for(
        &self,
        model: &str,
        provider: Option<&str>,
    ) -> Result<Option<Arc<PriceRow>>, BillingError> {
        self.refresh_prices(false).await?;
        let now = now_ms();
        let c = self
            .prices
            .read()
            .map_err(|_| BillingError::Invalid("price cache poisoned".to_string()))?;
        let routes = c.by_route.get(model);
        let pick = |prov: &str| {
            routes
                .and_then(|r| r.get(prov))
                .and_then(|v| v.iter().rev().find(|p| p.effective_at <= now).cloned())
        };
        Ok(provider.and_then(pick).or_else(|| pick("")))
    }

    /// Appends a price version (admin API / CLI).
    pub async fn set_price(&self, row: &PriceRow) -> Result<PriceRow, BillingError> {
        let r = self.store.insert_price(row).await?;
        self.refresh_prices(true).await?;
        Ok(r)
    }

    /// Records config-file prices as versions: a new version is written only when the config price
    /// differs from the latest config-sourced version, so admin-set prices survive restarts until
    /// the config itself changes.
    pub async fn sync_config_prices(
        &self,
        entries: &[(String, String, PriceSpec)],
    ) -> Result<usize, BillingError> {
        let now = now_ms();
        let mut rows = Vec::with_capacity(entries.len());
        for (model, provider, spec) in entries {
            rows.push(
                spec.to_row(model, provider, "config", now)
                    .map_err(|e| BillingError::Invalid(format!("price of {model}: {e}")))?,
            );
        }
        self.sync_config_price_rows(&rows).await
    }

    /// Like [`sync_config_prices`](Self::sync_config_prices) for ready price rows.
    pub async fn sync_config_price_rows(&self, rows: &[PriceRow]) -> Result<usize, BillingError> {
        let mut written = 0;
        for row in rows {
            let hist = self.store.price_history(&row.model).await?;
            let last_config = hist
                .iter()
                .rev()
                .find(|p| p.provider == row.provider && p.source == "config");
            if last_config.is_some_and(|p| p.same_amounts(row)) {
                continue;
            }
            let mut row = row.clone();
            row.source = "config".to_string();
            self.store.insert_price(&row).await?;
            written += 1;
        }
        self.refresh_prices(true).await?;
        Ok(written)
    }

    pub async fn price_history(&self, model: &str) -> Result<Vec<PriceRow>, BillingError> {
        Ok(self.store.price_history(model).await?)
    }

    // ---- the request path -----------------------------------------------------------------
    //
    // An async fn's future is as large as its largest await, and each caller's contains it and
    // copies it when it is created. The database calls that a leased request rarely makes (a
    // key or price not cached, a lease to top up) and hold admission's transactions (next to
    // which an allocation is nothing) are awaited boxed, so the futures of the common path stay
    // small: ~0.5 µs per billed request of copying less in a `perf` profile of lease admission.

    /// Holds the worst-case cost before the upstream call. Fails with `InsufficientCredits`
    /// (HTTP 402) without any upstream call when the available balance is too low.
    pub async fn hold(&self, p: &Principal, params: &HoldParams) -> Result<Hold, BillingError> {
        let candidates = std::iter::once(params.provider.as_deref())
            .chain(params.fallback_providers.iter().map(|s| Some(s.as_str())));
        let mut route_prices = Vec::new();
        let mut dearest: Option<(Micros, Arc<PriceRow>)> = None;
        for prov in candidates {
            let price = match self.price_for(&params.model, prov).await? {
                Some(pr) => pr,
                None if self.settings.allow_unpriced => Arc::new(free_price(&params.model)),
                None => return Err(BillingError::NoPrice(params.model.clone())),
            };
            let amount = hold_amount(
                &price,
                params.prompt_tokens_estimate,
                params.max_output_tokens,
            );
            if dearest.as_ref().is_none_or(|(a, _)| amount > *a) {
                dearest = Some((amount, price.clone()));
            }
            if let Some(name) = prov {
                route_prices.push((name.to_string(), price));
            }
        }
        let Some((_, price)) = dearest else {
            return Err(BillingError::NoPrice(params.model.clone()));
        };
        let mut hold = self.hold_at_price(p, params, price).await?;
        hold.route_prices = route_prices;
        Ok(hold)
    }

    /// Like [`hold`](Self::hold) with an explicit price.
    pub async fn hold_at_price(
        &self,
        p: &Principal,
        params: &HoldParams,
        price: Arc<PriceRow>,
    ) -> Result<Hold, BillingError> {
        if params.request_id.is_empty() {
            return Err(BillingError::Invalid("empty request id".to_string()));
        }
        let amount = hold_amount(
            &price,
            params.prompt_tokens_estimate,
            params.max_output_tokens,
        );
        let ttl_ms = i64::try_from(self.settings.hold_ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let expires_at = now_ms().saturating_add(ttl_ms);
        // The admitted request, under a lease (its id and book) or a hold of its own.
        let held = |price: Arc<PriceRow>, lease: Option<super::lease::Leased>| Hold {
            request_id: params.request_id.clone(),
            account_id: p.account_id.clone(),
            key_id: Some(p.key_id.clone()),
            amount,
            price,
            route_prices: Vec::new(),
            model: params.model.clone(),
            provider: params.provider.clone(),
            expires_at,
            started: Instant::now(),
            lease,
        };
        if let Some(leases) = &self.leases {
            let lease = leases.admit(p, amount).await?;
            let now = now_ms();
            let record = params.streamed.then(|| LeaseFinal {
                id: params.request_id.clone(),
                lease_id: String::new(),
                account_id: p.account_id.clone(),
                key_id: Some(p.key_id.clone()),
                model: params.model.clone(),
                provider: params.provider.clone(),
                upstream_model: None,
                price_id: price.id,
                state: "held".to_string(),
                hold_micros: amount,
                hold_expires_at: expires_at,
                created_at: now,
                finished_at: now,
                // Nothing used, charged or delivered yet.
                ..LeaseFinal::default()
            });
            leases.register(&lease, &params.request_id, amount, record)?;
            return Ok(held(price, Some(lease)));
        }
        let ins = HoldInsert {
            request_id: params.request_id.clone(),
            account_id: p.account_id.clone(),
            key_id: Some(p.key_id.clone()),
            key_capped: p.spend_cap_micros.is_some(),
            model: params.model.clone(),
            provider: params.provider.clone(),
            price_id: price.id,
            hold_micros: amount,
            expires_at,
        };
        Box::pin(self.place_hold(ins)).await?;
        Ok(held(price, None))
    }

    /// Hold admission: the hold's row and ledger entries, in a transaction of their own.
    async fn place_hold(&self, ins: HoldInsert) -> Result<(), BillingError> {
        match self.store.place_hold(&ins).await? {
            HoldOutcome::Held => Ok(()),
            HoldOutcome::InsufficientCredits { available_micros } => {
                Err(BillingError::InsufficientCredits {
                    needed: format_usd(ins.hold_micros),
                    available: format_usd(available_micros),
                })
            }
            HoldOutcome::KeySpendCapReached => Err(BillingError::KeySpendCapReached),
            HoldOutcome::DuplicateRequest => Err(BillingError::DuplicateRequest(ins.request_id)),
        }
    }

    /// Settles a hold exactly once. Rules:
    /// * nothing delivered → charge 0 (the hold is released);
    /// * otherwise charge `usage` at the held price, capped at the hold;
    /// * a second call for the same request id writes nothing and returns the stored outcome.
    pub async fn settle(
        &self,
        hold: &Hold,
        input: &SettleInput,
    ) -> Result<Settlement, BillingError> {
        let latency = i64::try_from(hold.started.elapsed().as_millis()).ok();
        let price = input
            .provider
            .as_deref()
            .and_then(|prov| hold.route_prices.iter().find(|(n, _)| n == prov))
            .map_or(&hold.price, |(_, pr)| pr);
        let (state, cost, charged) = if input.delivered {
            let cost = compute_cost(price, &input.usage);
            (FinalState::Settled, cost, cost.total.min(hold.amount))
        } else {
            (FinalState::Released, Cost::default(), 0)
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let w = SettleWrite {
            captured_micros: charged,
            computed_cost_micros: cost.total,
            input_cost_micros: cost.input,
            cached_cost_micros: cost.cached,
            output_cost_micros: cost.output,
            network_cost_micros: cost.network.min(charged),
            prompt_tokens: clamp(input.usage.prompt_tokens),
            cached_tokens: clamp(input.usage.cached_tokens),
            completion_tokens: clamp(input.usage.completion_tokens),
            reasoning_tokens: clamp(input.usage.reasoning_tokens),
            estimated: input.estimated,
            delivered: input.delivered,
            provider: input.provider.clone().or_else(|| hold.provider.clone()),
            upstream_model: input.upstream_model.clone(),
            status: Some(input.status.clone()),
            http_status: input.http_status.map(i64::from),
            latency_ms: latency,
        };
        let settled = Settlement {
            request_id: hold.request_id.clone(),
            state,
            charged,
            cost,
            estimated: input.estimated,
            replayed: false,
        };
        // Written now, or found already final (then the stored outcome is the answer).
        if let (Some(leases), Some(lease)) = (&self.leases, &hold.lease) {
            let row = leased_row(hold, &lease.lease_id, state, w);
            if leases.finish(hold, row)?.is_some() {
                return Ok(settled);
            }
            return Box::pin(self.stored_settlement(&hold.request_id)).await;
        }
        Box::pin(self.finalize(hold, settled, w)).await
    }

    /// Hold admission's settlement: the request's row finalised in a transaction of its own.
    async fn finalize(
        &self,
        hold: &Hold,
        settled: Settlement,
        w: SettleWrite,
    ) -> Result<Settlement, BillingError> {
        let written = self
            .store
            .finalize(&hold.request_id, settled.state, &w, None)
            .await?;
        if written.is_some() {
            Ok(settled)
        } else {
            self.stored_settlement(&hold.request_id).await
        }
    }

    /// Releases a hold without charge (the request failed before anything was delivered).
    pub async fn release(&self, hold: &Hold, status: &str) -> Result<Settlement, BillingError> {
        self.settle(
            hold,
            &SettleInput {
                delivered: false,
                status: status.to_string(),
                ..Default::default()
            },
        )
        .await
    }

    async fn stored_settlement(&self, request_id: &str) -> Result<Settlement, BillingError> {
        let r = self.request_record(request_id).await?;
        let state = match r.state.as_str() {
            "settled" => FinalState::Settled,
            "released" => FinalState::Released,
            "expired" => FinalState::Expired,
            other => {
                return Err(BillingError::Store(StoreError::Invariant(format!(
                    "request {request_id} not final after settlement ({other})"
                ))))
            }
        };
        Ok(Settlement {
            request_id: r.id,
            state,
            charged: r.cost_micros,
            cost: Cost {
                total: r.computed_cost_micros,
                input: r.input_cost_micros,
                cached: r.cached_cost_micros,
                output: r.output_cost_micros,
                network: r.network_cost_micros,
            },
            estimated: r.estimated,
            replayed: true,
        })
    }

    /// Releases every hold past its expiry (crash recovery). Idempotent and safe to run from
    /// several processes at once: each hold is finalised by whichever run gets there first.
    pub async fn sweep_expired(&self) -> Result<usize, BillingError> {
        let now = now_ms();
        let mut n = 0;
        loop {
            let ids = self.store.expired_holds(now, 500).await?;
            if ids.is_empty() {
                break;
            }
            let batch = ids.len();
            for id in ids {
                let w = SettleWrite {
                    status: Some("hold_expired".to_string()),
                    ..Default::default()
                };
                if self
                    .store
                    .finalize(&id, FinalState::Expired, &w, Some(now))
                    .await?
                    .is_some()
                {
                    n += 1;
                }
            }
            if batch < 500 {
                break;
            }
        }
        loop {
            let ids = self.store.expired_leases(now, 500).await?;
            let batch = ids.len();
            for id in ids {
                if self
                    .store
                    .release_lease(&id, None, true, "expire", Some(now))
                    .await?
                    .is_some()
                {
                    n += 1;
                }
            }
            if batch < 500 {
                break;
            }
        }
        if n > 0 {
            tracing::info!(released = n, "released expired holds and leases");
        }
        Ok(n)
    }

    /// Runs the sweeper every `sweep_interval` until the task is dropped/aborted.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.settings.sweep_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match tokio::time::timeout(Duration::from_secs(60), me.sweep_expired()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "hold sweeper failed"),
                    Err(_) => tracing::warn!("hold sweeper timed out"),
                }
            }
        })
    }

    /// With a key cache (`key_cache`, lease admission's default), reads the store's key epoch
    /// every [`KEY_WATCH_EVERY`] and, when it has moved, counts a key change
    /// ([`Store::keys_changed`]), which drops the cache: a key revoked, a cap or a plan changed by
    /// another process (the CLI, another instance) counts from the next request after that read,
    /// not after the cache's lifetime. (Changes this process makes count as they commit.) The
    /// lifetime still bounds a cached row's age if the store cannot be read. `None` without a key
    /// cache (every request reads the key).
    pub fn spawn_key_watch(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.settings.key_cache.is_zero() {
            return None;
        }
        let weak = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            let mut seen = None;
            let mut failing = false;
            let mut tick = tokio::time::interval(KEY_WATCH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                match tokio::time::timeout(Duration::from_secs(5), me.store.key_epoch()).await {
                    Ok(Ok(epoch)) => {
                        // The first read too: a row cached before it may predate a change.
                        if seen != Some(epoch) {
                            me.store.keys_changed();
                            seen = Some(epoch);
                        }
                        failing = false;
                    }
                    // Said once per failure, not ten times a second.
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "could not read the key epoch; cached keys live out their key_cache");
                    }
                    Err(_) if !failing => {
                        failing = true;
                        tracing::warn!(
                            "reading the key epoch timed out; cached keys live out their key_cache"
                        );
                    }
                    _ => {}
                }
            }
        }))
    }

    /// Checks the ledger invariants (see [`Store::check_ledger`]).
    pub async fn check_ledger(
        &self,
        expiry_cutoff_ms: Option<i64>,
    ) -> Result<LedgerReport, BillingError> {
        Ok(self.store.check_ledger(expiry_cutoff_ms).await?)
    }

    // ---- accounts, credits, keys ----------------------------------------------------------

    pub async fn create_account(
        &self,
        name: &str,
        plan: Option<&str>,
    ) -> Result<AccountRow, BillingError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(BillingError::Invalid(
                "account name must be 1-128 printable characters".into(),
            ));
        }
        self.store
            .create_account(name, plan)
            .await?
            .ok_or_else(|| BillingError::Conflict(format!("account {name} already exists")))
    }

    pub async fn list_accounts(&self) -> Result<Vec<AccountRow>, BillingError> {
        self.written_charges().await;
        Ok(self.store.list_accounts().await?)
    }

    pub async fn account(&self, name: &str) -> Result<AccountRow, BillingError> {
        self.written_charges().await;
        self.store
            .account_by_name(name)
            .await?
            .ok_or_else(|| BillingError::NotFound(format!("account {name}")))
    }

    pub async fn account_by_id(&self, id: &str) -> Result<AccountRow, BillingError> {
        self.written_charges().await;
        self.store
            .account_by_id(id)
            .await?
            .ok_or_else(|| BillingError::NotFound(format!("account {id}")))
    }

    /// Adds credit (amount > 0) or adjusts it down (amount < 0) with a reason. With an
    /// idempotency key, repeating the same call returns the first result (`replayed`), and reusing
    /// the key with different parameters is a `Conflict`.
    pub async fn add_credits(
        &self,
        account: &str,
        amount: Micros,
        reason: &str,
        idempotency_key: Option<&str>,
    ) -> Result<CreditResult, BillingError> {
        if amount == 0 {
            return Err(BillingError::Invalid("amount must not be zero".into()));
        }
        if reason.trim().is_empty() {
            return Err(BillingError::Invalid("a reason is required".into()));
        }
        if idempotency_key.is_some_and(|k| k.is_empty() || k.len() > 255) {
            return Err(BillingError::Invalid(
                "Idempotency-Key must be 1-255 characters".into(),
            ));
        }
        let acct = self.account(account).await?;
        let kind = if amount > 0 { "topup" } else { "adjustment" };
        match self
            .store
            .apply_credit(&acct.id, amount, kind, reason, idempotency_key)
            .await?
        {
            TopUpOutcome::Applied {
                txn_id,
                balance_micros,
            } => Ok(CreditResult {
                transaction_id: txn_id,
                balance_micros,
                replayed: false,
            }),
            TopUpOutcome::Replayed {
                txn_id,
                balance_micros,
            } => Ok(CreditResult {
                transaction_id: txn_id,
                balance_micros,
                replayed: true,
            }),
            TopUpOutcome::Conflict => Err(BillingError::Conflict(
                "Idempotency-Key was already used with different parameters".into(),
            )),
            TopUpOutcome::InsufficientBalance { available_micros } => {
                Err(BillingError::InsufficientCredits {
                    needed: format_usd(-amount),
                    available: format_usd(available_micros),
                })
            }
            TopUpOutcome::NoAccount => Err(BillingError::NotFound(format!("account {account}"))),
        }
    }

    /// Issues a key for an account. Returns the raw key — the only time it exists outside the
    /// caller's hands — and its listing row.
    pub async fn create_key(
        &self,
        account: &str,
        admin: bool,
        name: Option<&str>,
        spend_cap: Option<Micros>,
    ) -> Result<(String, KeyRow), BillingError> {
        if spend_cap.is_some_and(|c| c < 0) {
            return Err(BillingError::Invalid(
                "spend cap must not be negative".into(),
            ));
        }
        let acct = self.account(account).await?;
        for _ in 0..5 {
            let raw = keys::generate_key();
            let prefix = keys::visible_prefix(&raw).unwrap_or_default();
            let digest = self.secret.digest(&raw);
            if let Some(row) = self
                .store
                .insert_key(&acct.id, &prefix, &digest, admin, name, spend_cap)
                .await?
            {
                tracing::info!(account = %acct.name, key = %prefix, admin, "created API key");
                return Ok((raw, row));
            }
        }
        Err(BillingError::Conflict(
            "could not allocate a unique key prefix".into(),
        ))
    }

    /// Imports an existing key (e.g. a former `[auth] static_keys` entry) for an account. Only
    /// its digest is stored; its listing prefix is derived from the digest. Returns the row.
    pub async fn import_key(
        &self,
        account: &str,
        raw: &str,
        admin: bool,
        name: Option<&str>,
    ) -> Result<KeyRow, BillingError> {
        if !keys::importable(raw) {
            return Err(BillingError::Invalid(
                "an imported key must be 6-256 printable ASCII characters".into(),
            ));
        }
        let acct = self.account(account).await?;
        let digest = self.secret.digest(raw);
        let prefix = keys::imported_prefix(&digest);
        let row = self
            .store
            .insert_key(&acct.id, &prefix, &digest, admin, name, None)
            .await?
            .ok_or_else(|| BillingError::Conflict("this key is already imported".into()))?;
        tracing::info!(account = %acct.name, key = %prefix, admin, "imported API key");
        Ok(row)
    }

    pub async fn list_keys(&self, account: Option<&str>) -> Result<Vec<KeyRow>, BillingError> {
        self.written_charges().await;
        let id = match account {
            Some(name) => Some(self.account(name).await?.id),
            None => None,
        };
        Ok(self.store.list_keys(id.as_deref()).await?)
    }

    pub async fn key(&self, prefix: &str) -> Result<KeyRow, BillingError> {
        self.written_charges().await;
        self.store
            .key_by_prefix(prefix)
            .await?
            .ok_or_else(|| BillingError::NotFound(format!("key {prefix}")))
    }

    pub async fn revoke_key(&self, prefix: &str) -> Result<(), BillingError> {
        if self.store.revoke_key(prefix).await? {
            tracing::info!(key = %prefix, "revoked API key");
            Ok(())
        } else {
            Err(BillingError::NotFound(format!("active key {prefix}")))
        }
    }

    pub async fn set_key_cap(
        &self,
        prefix: &str,
        cap: Option<Micros>,
    ) -> Result<KeyRow, BillingError> {
        if cap.is_some_and(|c| c < 0) {
            return Err(BillingError::Invalid(
                "spend cap must not be negative".into(),
            ));
        }
        if !self.store.set_key_cap(prefix, cap).await? {
            return Err(BillingError::NotFound(format!("key {prefix}")));
        }
        self.key(prefix).await
    }

    // ---- reporting ------------------------------------------------------------------------

    pub async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageBucket>, BillingError> {
        if q.to_ms <= q.from_ms {
            return Err(BillingError::Invalid("`to` must be after `from`".into()));
        }
        self.written_charges().await;
        Ok(self.store.usage(q).await?)
    }

    /// Request records created in `[from_ms, to_ms)`, oldest first, at most `limit` (every
    /// charge already answered written first).
    pub async fn request_records(
        &self,
        account_id: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<RequestRow>, BillingError> {
        if to_ms <= from_ms {
            return Err(BillingError::Invalid("`to` must be after `from`".into()));
        }
        self.written_charges().await;
        Ok(self
            .store
            .requests_between(account_id, from_ms, to_ms, limit)
            .await?)
    }

    pub async fn request_record(&self, id: &str) -> Result<RequestRow, BillingError> {
        if let Some(f) = self.leases.as_ref().and_then(|l| l.pending_row(id)) {
            return Ok(f.into_row());
        }
        self.store
            .request_by_id(id)
            .await?
            .ok_or_else(|| BillingError::NotFound(format!("request {id}")))
    }
}

/// A leased request's final row from its hold and settlement.
fn leased_row(hold: &Hold, lease_id: &str, state: FinalState, w: SettleWrite) -> LeaseFinal {
    let now = now_ms();
    LeaseFinal {
        id: hold.request_id.clone(),
        lease_id: lease_id.to_string(),
        account_id: hold.account_id.clone(),
        key_id: hold.key_id.clone(),
        model: hold.model.clone(),
        provider: w.provider,
        upstream_model: w.upstream_model,
        price_id: hold.price.id,
        state: state.as_str().to_string(),
        hold_micros: hold.amount,
        hold_expires_at: hold.expires_at,
        status: w.status,
        http_status: w.http_status,
        prompt_tokens: w.prompt_tokens,
        cached_tokens: w.cached_tokens,
        completion_tokens: w.completion_tokens,
        reasoning_tokens: w.reasoning_tokens,
        cost_micros: w.captured_micros,
        computed_cost_micros: w.computed_cost_micros,
        input_cost_micros: w.input_cost_micros,
        cached_cost_micros: w.cached_cost_micros,
        output_cost_micros: w.output_cost_micros,
        network_cost_micros: w.network_cost_micros,
        estimated: w.estimated,
        delivered: w.delivered,
        latency_ms: w.latency_ms,
        created_at: now - w.latency_ms.unwrap_or(0),
        finished_at: now,
    }
}

fn free_price(model: &str) -> PriceRow {
    PriceRow {
        id: None,
        model: model.to_string(),
        provider: String::new(),
        input_micros_per_m: 0,
        cached_micros_per_m: 0,
        output_micros_per_m: 0,
        fee_input_micros_per_m: 0,
        fee_cached_micros_per_m: 0,
        fee_output_micros_per_m: 0,
        markup_bps: 0,
        source: "unpriced".to_string(),
        effective_at: 0,
        created_at: 0,
    }
}
