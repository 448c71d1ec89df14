//! Shared test support for billing tests: a fresh database per test on SQLite (temp file) and
//! PostgreSQL (`TOLLGATE_TEST_PG_URL`, a fresh database each), and the ledger checker.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use sqlx::{Connection, Executor};
use tollgate::billing::keys::ServerSecret;
use tollgate::billing::{Billing, BillingSettings};
use tollgate::store::{now_ms, Store};

/// A fresh, empty database for one test.
pub struct Db {
    pub url: String,
    pub backend: &'static str,
    pub dir: tempfile::TempDir,
    /// Lease admission (`[billing] admission = "lease"`) instead of a hold per request.
    pub lease: bool,
}

impl Db {
    pub async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
        Db {
            url,
            backend: "sqlite",
            dir,
            lease: false,
        }
    }

    /// A fresh PostgreSQL database, or None when no test server is configured. With `CI` set, a
    /// missing `TOLLGATE_TEST_PG_URL` is a failure, never a silent skip.
    pub async fn postgres() -> Option<Db> {
        let Ok(base) = std::env::var("TOLLGATE_TEST_PG_URL") else {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but TOLLGATE_TEST_PG_URL is not: PostgreSQL tests cannot run (use `make test`, which starts scripts/pg-test.sh)");
            }
            eprintln!(
                "TOLLGATE_TEST_PG_URL not set: skipping the PostgreSQL variant (run `make test`)"
            );
            return None;
        };
        let name = format!("tg_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|e| panic!("connect {base}: {e}"));
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("create database: {e}"));
        let _ = admin.close().await;
        let url = match base.rfind('/') {
            Some(i) if i > "postgres://".len() => format!("{}/{name}", &base[..i]),
            _ => panic!("TOLLGATE_TEST_PG_URL must end in /DBNAME"),
        };
        Some(Db {
            url,
            backend: "postgres",
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
            lease: false,
        })
    }

    /// The same database, used with lease admission.
    pub fn leased(mut self) -> Db {
        self.lease = true;
        self
    }

    /// The `[billing]` lines that select this database's admission mode (a journal in the test's
    /// directory, short lease expiry so the recovery tests see expired leases released, and a key
    /// cache that outlives every test: a key change made by another process must reach the
    /// gateway through the key epoch, not the cache's expiry).
    pub fn admission_toml(&self) -> String {
        if self.lease {
            format!(
                "admission = \"lease\"\nlease_ttl_secs = 6\nkey_cache_secs = 600\njournal_dir = \"{}\"\n",
                self.dir.path().join("journal").display()
            )
        } else {
            String::new()
        }
    }

    pub fn settings(&self) -> BillingSettings {
        BillingSettings {
            database_url: self.url.clone(),
            secret_env: "TOLLGATE_TEST_SECRET_UNSET".to_string(),
            secret_file: Some(self.dir.path().join("tollgate.secret")),
            hold_ttl: Duration::from_secs(600),
            sweep_interval: Duration::from_millis(200),
            allow_unpriced: false,
            lease: self.lease.then(|| tollgate::config::LeaseConfig {
                slice_micros: 5_000_000,
                ttl: Duration::from_secs(6),
                journal_dir: Some(self.dir.path().join("journal")),
            }),
            key_cache: Duration::ZERO,
        }
    }

    pub async fn billing(&self) -> Billing {
        self.billing_with(self.settings()).await
    }

    pub async fn billing_with(&self, settings: BillingSettings) -> Billing {
        let store = Store::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.url));
        let secret = ServerSecret::from_bytes(b"test-secret-test-secret-test-secret!".to_vec());
        let mut b = Billing::with_store(store, secret, settings);
        b.start_leases()
            .await
            .unwrap_or_else(|e| panic!("lease admission: {e}"));
        b
    }

    /// Waits (up to 30 s) until no [`Billing`] of this process holds the journal directory's lock:
    /// a dropped one's background tasks let go of it when they next wake (within ~100 ms when
    /// idle, later on a loaded machine).
    pub async fn journal_released(&self) {
        let path = self.dir.path().join("journal").join("lock");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let free = match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(f) => f.try_lock().is_ok(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => panic!("open {}: {e}", path.display()),
            };
            if free {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the journal at {} is still locked 30 s after its billing was dropped",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn sqlite_file(&self) -> Option<PathBuf> {
        tollgate::store::sqlite_file_of(&self.url)
    }
}

/// Runs the ledger checker and fails the test on any problem.
pub async fn assert_ledger_ok(b: &Billing) {
    let rep = b
        .check_ledger(None)
        .await
        .unwrap_or_else(|e| panic!("ledger check failed to run: {e}"));
    assert!(rep.is_ok(), "ledger problems: {:#?}", rep.problems);
}

/// Like [`assert_ledger_ok`] and also requires that no hold is open past its expiry.
pub async fn assert_ledger_ok_no_stale_holds(b: &Billing) {
    let rep = b
        .check_ledger(Some(now_ms()))
        .await
        .unwrap_or_else(|e| panic!("ledger check failed to run: {e}"));
    assert!(rep.is_ok(), "ledger problems: {:#?}", rep.problems);
}

/// Declares one test per backend and admission mode: `NAME::sqlite`, `NAME::postgres`,
/// `NAME::sqlite_lease` and `NAME::postgres_lease`. The body gets a `Db` (whose `lease` says the
/// mode) and returns the `Billing` it used; the ledger checker runs afterwards.
#[macro_export]
macro_rules! all_admissions {
    ($name:ident, $body:ident) => {
        mod $name {
            $crate::backend_tests!($body);
            $crate::lease_tests!($body);
        }
    };
}

/// Declares the lease admission tests only: `NAME::sqlite_lease` and `NAME::postgres_lease`.
#[macro_export]
macro_rules! lease_admission {
    ($name:ident, $body:ident) => {
        mod $name {
            $crate::lease_tests!($body);
        }
    };
}

/// The `sqlite_lease` and `postgres_lease` tests of [`all_admissions`] and [`lease_admission`],
/// inside the module they declare.
#[macro_export]
macro_rules! lease_tests {
    ($body:ident) => {
        $crate::db_tests!($body, sqlite_lease, postgres_lease, true);
    };
}

/// Reads with `f` once under hold admission (everything is written before the answer), or until
/// it returns `Some` within 8 s under lease admission (request rows and charges are written in
/// batches just after the answer; key changes made elsewhere reach the 5 s key cache).
pub async fn applied<T, F, Fut>(db: &Db, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    if !db.lease {
        return f().await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Declares one test per backend: `NAME::sqlite` and `NAME::postgres`. The body gets a `Db` and
/// returns the `Billing` it used; the ledger checker runs afterwards.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            $crate::backend_tests!($body);
        }
    };
}

/// The `sqlite` and `postgres` tests of [`both_backends`] and [`all_admissions`], inside the
/// module they declare.
#[macro_export]
macro_rules! backend_tests {
    ($body:ident) => {
        $crate::db_tests!($body, sqlite, postgres, false);
    };
}

/// A SQLite and a PostgreSQL test named `$sqlite` and `$postgres` running `$body` (under lease
/// admission if `$lease`), then the ledger checker. Without a PostgreSQL server configured the
/// PostgreSQL test does nothing, unless `CI` is set (see [`Db::postgres`]).
#[macro_export]
macro_rules! db_tests {
    ($body:ident, $sqlite:ident, $postgres:ident, $lease:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $sqlite() {
            let db = $crate::billing_support::Db::sqlite().await;
            let db = if $lease { db.leased() } else { db };
            let b = super::$body(&db).await;
            $crate::billing_support::assert_ledger_ok(&b).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $postgres() {
            if let Some(db) = $crate::billing_support::Db::postgres().await {
                let db = if $lease { db.leased() } else { db };
                let b = super::$body(&db).await;
                $crate::billing_support::assert_ledger_ok(&b).await;
                b.store().close().await;
            }
        }
    };
}
