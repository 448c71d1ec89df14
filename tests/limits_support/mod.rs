//! Support for the limiter's integration tests: a counting fake upstream, a Redis server started
//! from Debian's `redis-server`, and real `tollgate` processes on loopback.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;

#[path = "../support/listening.rs"]
mod listening;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A fake OpenAI-compatible upstream that counts the chat requests it receives. Non-streamed
/// answers report 10 prompt + 5 completion tokens; streams send `delay_ms` between chunks.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    pub async fn start(delay_ms: u64) -> FakeUpstream {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |body: axum::body::Bytes| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if v["stream"].as_bool() == Some(true) {
                        let stream = async_stream::stream! {
                            for i in 0..5 {
                                let chunk = serde_json::json!({"id":"up","object":"chat.completion.chunk","created":1,"model":"m",
                                    "choices":[{"index":0,"delta":{"content": format!("w{i} ")},"finish_reason":null}]});
                                yield Ok::<_, std::io::Error>(format!("data: {chunk}\n\n"));
                                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            }
                            let end = serde_json::json!({"id":"up","object":"chat.completion.chunk","created":1,"model":"m",
                                "choices":[{"index":0,"delta":{},"finish_reason":"stop"}],
                                "usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}});
                            yield Ok(format!("data: {end}\n\ndata: [DONE]\n\n"));
                        };
                        (
                            [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                            axum::body::Body::from_stream(stream),
                        )
                            .into_response()
                    } else {
                        if delay_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        }
                        axum::Json(serde_json::json!({
                            "id": "up", "object": "chat.completion", "created": 1, "model": "m",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                        }))
                        .into_response()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream {
            addr,
            hits,
            _task: task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// The server secret every process of a test shares (keys are stored as HMACs under it).
pub const SECRET: &str = "limits-test-secret-0123456789abcdef-xyz";

/// A config with one model `m` routed to the fake upstream, on database `db_url`, plus `extra`.
pub fn config(upstream: &str, db_url: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[auth]
required = true

[database]
url = "{db_url}"

[[providers]]
name = "fake"
dialect = "openai"
base_url = "{upstream}"

[[models]]
id = "m"
max_output_tokens = 100
  [[models.routes]]
  provider = "fake"
  upstream_model = "m"
  price_per_mtok = {{ input = 1.0, output = 2.0 }}

{extra}
"#
    )
}

/// A config file and its database, with accounts and keys made through the real CLI.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db_url: String,
}

impl Stack {
    /// A stack on a fresh SQLite file.
    pub fn sqlite(upstream: &str, extra: &str) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
        Stack::with_db(dir, db_url, upstream, extra)
    }

    /// A stack on a fresh PostgreSQL database when `TOLLGATE_TEST_PG_URL` is set (as `make test`
    /// does), else on one SQLite file shared by every process (fine on one machine).
    pub async fn shared(upstream: &str, extra: &str) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_url = match std::env::var("TOLLGATE_TEST_PG_URL") {
            Ok(base) => fresh_pg(&base).await,
            Err(_) => {
                eprintln!("TOLLGATE_TEST_PG_URL not set: the instances share one SQLite file instead of PostgreSQL");
                format!("sqlite://{}", dir.path().join("tollgate.db").display())
            }
        };
        Stack::with_db(dir, db_url, upstream, extra)
    }

    fn with_db(dir: tempfile::TempDir, db_url: String, upstream: &str, extra: &str) -> Stack {
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, config(upstream, &db_url, extra)).expect("write config");
        Stack {
            dir,
            config: path,
            db_url,
        }
    }

    /// Runs `tollgate --config FILE ARGS...`; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("TOLLGATE_SECRET", SECRET)
            .output()
            .expect("run tollgate cli");
        assert!(
            out.status.success(),
            "tollgate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates account `name` (with `plan`), gives it $1000 and returns a new key for it.
    pub fn account(&self, name: &str, plan: Option<&str>) -> String {
        let mut args = vec!["accounts", "create", name];
        if let Some(p) = plan {
            args.extend(["--plan", p]);
        }
        self.cli(&args);
        self.cli(&["credits", "add", name, "1000", "--reason", "test"]);
        self.key(name)
    }

    /// Another key for an existing account.
    pub fn key(&self, account: &str) -> String {
        self.cli(&["keys", "create", "--account", account])
            .trim()
            .to_string()
    }

    /// An admin key (account `ops`, no plan, $1000).
    pub fn admin(&self) -> String {
        self.cli(&["accounts", "create", "ops"]);
        self.cli(&["credits", "add", "ops", "1000", "--reason", "test"]);
        self.cli(&["keys", "create", "--account", "ops", "--admin"])
            .trim()
            .to_string()
    }

    pub fn start(&self, args: &[&str]) -> Tollgate {
        Tollgate::start_file(&self.config, args)
    }
}

async fn fresh_pg(base: &str) -> String {
    use sqlx::{Connection, Executor};
    let name = format!("tg_limits_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(base)
        .await
        .unwrap_or_else(|e| panic!("connect {base}: {e}"));
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap_or_else(|e| panic!("create database: {e}"));
    let _ = admin.close().await;
    match base.rfind('/') {
        Some(i) if i > "postgres://".len() => format!("{}/{name}", &base[..i]),
        _ => panic!("TOLLGATE_TEST_PG_URL must end in /DBNAME"),
    }
}

/// Whether a test that needs `redis-server` can run; panics under CI when it is missing.
pub fn redis_available() -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("redis-server is not installed, and CI is set: install Debian's redis-server (make deps-test)");
        }
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server); set CI=1 to make this a failure");
    }
    ok
}

/// A `redis-server` on a loopback port, in a temp dir, without persistence; killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut r = Redis {
            port,
            child: None,
            dir,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_redis(self.port, Duration::from_secs(10));
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the Redis on `port` answers PING (a bare connect is not proof: on loopback it can
/// connect to itself while nothing listens yet).
fn wait_redis(port: u16, max: Duration) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut buf).is_ok()
                && &buf == b"+PONG\r\n"
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no Redis answers on port {port}");
}

/// A running `tollgate serve`; killed on drop. Its log goes to a file in its temp dir.
pub struct Tollgate {
    pub addr: SocketAddr,
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tollgate {
    pub fn start_file(cfg: &Path, args: &[&str]) -> Tollgate {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("tollgate.log");
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(cfg)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("TOLLGATE_REDIS_URL")
            .env("TOLLGATE_SECRET", SECRET)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn tollgate");
        let addr = listening::wait_listening(&mut child, &log, 0, Duration::from_secs(30));
        Tollgate {
            addr,
            child,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_path(t: &Tollgate) -> &Path {
    &t.log
}

/// One chat request with `key`; returns (status, headers, body).
pub async fn chat(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    stream: bool,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": stream}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = if stream && status == 200 {
        let _ = r.bytes().await;
        serde_json::Value::Null
    } else {
        r.json().await.unwrap_or_default()
    };
    (status, headers, body)
}
