//! Database access for billing: one sqlx `Any` pool over SQLite (default) or PostgreSQL, migrations.
//!
//! All SQL in tollgate is written once in a dialect both backends accept (`$1` placeholders,
//! `ON CONFLICT`, `RETURNING`, integer money and unix-millisecond times); each backend has its own
//! migration set under `migrations/sqlite` and `migrations/postgres`, applied on connect. The one
//! exception is the lease writer ([`lease_writer`]): on a SQLite file, the batches of leased
//! requests' rows are written by a rusqlite connection of their own, on a thread of their own.

pub mod accounts;
pub mod attempts;
mod batch;
pub mod check;
mod lease_writer;
pub mod leases;
pub mod ledger;
mod pieces;
pub mod prices;
pub mod usage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Connection, Executor};
use tokio::sync::{Mutex, MutexGuard};

pub use accounts::{AccountRow, KeyAuthRow, KeyRow};
pub use check::LedgerReport;
pub use ledger::{FinalState, HoldInsert, RequestRow, SettleWrite, TopUpOutcome};
pub use prices::PriceRow;
pub use usage::{UsageBucket, UsageGroup, UsageQuery};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url (expected sqlite:// or postgres://): {0}")]
    UnsupportedUrl(String),
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// From the lease writer's own SQLite connection (see [`lease_writer`]).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The lease writer's thread did not answer (stopped, or timed out).
    #[error("lease writer: {0}")]
    LeaseWriter(String),
    #[error("{0}")]
    Invariant(String),
}

/// Which database engine backs the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Handle to the billing database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    sqlite_path: Option<PathBuf>,
    /// SQLite allows one writer at a time; writers queue here instead of spinning in SQLite's busy
    /// handler. (Other processes, e.g. the CLI, still rely on `busy_timeout`.)
    write_gate: Option<Arc<Mutex<()>>>,
    /// Group commit and batched key lookups (see [`batch`]); `None` on the handle its own tasks
    /// use, and outside a Tokio runtime.
    batcher: Option<batch::Batcher>,
    /// SQLite file: the thread that writes lease finals (see [`lease_writer`]), started on first
    /// use. `None` on PostgreSQL and on an in-memory SQLite database (no file to share).
    lease_writer: Option<Arc<lease_writer::LeaseWriter>>,
    /// Changes to what an authenticated key carries that this process knows of (see
    /// [`Store::key_changes`]); shared by every clone of the handle.
    key_changes: Arc<std::sync::atomic::AtomicU64>,
}

/// Settings of every SQLite connection, the pool's and the lease writer's (on top of sqlx's default
/// `foreign_keys=ON`; `journal_mode=WAL` is set once, on connect, and stays with the file).
pub(crate) const SQLITE_PRAGMAS: &str =
    "PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; PRAGMA temp_store=MEMORY;";

static MIGRATE_SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static MIGRATE_POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Current wall-clock time in unix milliseconds (UTC). The single time source for billing rows.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Returns the file path of a `sqlite:` URL (None for in-memory or non-SQLite URLs).
pub fn sqlite_file_of(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    Some(PathBuf::from(path))
}

impl Store {
    /// Connects, creating the SQLite file if needed, and applies pending migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            let mut u = url.to_string();
            if !u.contains("mode=") {
                u.push_str(if u.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
            (Backend::Sqlite, u)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        let opts: AnyConnectOptions = url
            .parse::<AnyConnectOptions>()?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));

        // One connection first: switch SQLite to WAL (needs an exclusive lock) and migrate.
        // SQLite also says which file it opened (empty for an in-memory database), for the lease
        // writer's own connection.
        let mut sqlite_file = None;
        {
            let mut conn = opts.connect().await?;
            if backend == Backend::Sqlite {
                conn.execute("PRAGMA journal_mode=WAL").await?;
                MIGRATE_SQLITE.run(&mut conn).await?;
                let file: String =
                    sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                        .fetch_one(&mut conn)
                        .await?;
                sqlite_file = Some(file).filter(|f| !f.is_empty()).map(PathBuf::from);
            } else {
                MIGRATE_POSTGRES.run(&mut conn).await?;
            }
            conn.close().await?;
        }

        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(30))
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            // WAL + NORMAL is durable across process crashes (kill -9).
                            // temp_store=MEMORY: the transient tables SQLite builds for the batch
                            // statements (`UPDATE … FROM (VALUES …)`) were otherwise files, one
                            // created and deleted in /var/tmp per write batch.
                            conn.execute(SQLITE_PRAGMAS).await?;
                            Ok(())
                        })
                    })
                    .connect_with(opts)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(opts)
                    .await?
            }
        };
        let mut store = Store {
            pool,
            backend,
            sqlite_path: sqlite_file_of(&url),
            write_gate: (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(()))),
            batcher: None,
            lease_writer: sqlite_file.map(|f| Arc::new(lease_writer::LeaseWriter::new(f))),
            key_changes: Arc::default(),
        };
        store.batcher = batch::spawn(&store);
        Ok(store)
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Path of the SQLite database file, if the store is a SQLite file.
    pub fn sqlite_path(&self) -> Option<&std::path::Path> {
        self.sqlite_path.as_deref()
    }

    /// Serialises in-process writers on SQLite; a no-op on PostgreSQL.
    pub(crate) async fn write_gate(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.write_gate {
            Some(m) => Some(m.lock().await),
            None => None,
        }
    }

    /// The statement that begins a write transaction. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`): a deferred transaction that has already read cannot wait for the lock
    /// when it comes to write — SQLite answers "database is locked" at once instead of calling
    /// its busy handler.
    pub(crate) fn begin_write_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }

    /// Begins a write transaction on a pooled connection (see [`Self::begin_write_sql`]).
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        self.pool.begin_with(self.begin_write_sql()).await
    }

    /// Closes the pool (waits for connections to be returned) and stops the lease writer.
    pub async fn close(&self) {
        if let Some(b) = &self.batcher {
            b.close();
        }
        if let Some(w) = &self.lease_writer {
            w.close().await;
        }
        self.pool.close().await;
    }
}

/// Removes a password from a database URL before it is shown in an error or log line.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Creates a unique id with a readable prefix (`acct_…`, `key_…`, `tx_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// What the store's unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{AccountRow, Store};

    /// A migrated SQLite file (kept while the directory lives) with one account, "acme", holding
    /// $1.00.
    pub(crate) async fn funded_file_store() -> (tempfile::TempDir, Store, AccountRow) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let acct = match store.create_account("acme", None).await {
            Ok(Some(a)) => a,
            other => panic!("account: {other:?}"),
        };
        store
            .apply_credit(&acct.id, 1_000_000, "topup", "test", None)
            .await
            .unwrap_or_else(|e| panic!("credit: {e}"));
        (dir, store, acct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_path_parsing() {
        assert_eq!(
            sqlite_file_of("sqlite://tollgate.db"),
            Some(PathBuf::from("tollgate.db"))
        );
        assert_eq!(
            sqlite_file_of("sqlite:///var/x.db?mode=rwc"),
            Some(PathBuf::from("/var/x.db"))
        );
        assert_eq!(sqlite_file_of("sqlite::memory:"), None);
        assert_eq!(sqlite_file_of("postgres://a@b/c"), None);
    }

    #[test]
    fn url_redaction() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
