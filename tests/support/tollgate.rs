//! Harness that runs the real `tollgate` binary for integration tests: builds a temp
//! `tollgate.toml`, starts `tollgate serve --config FILE --listen 127.0.0.1:0`, reads the port
//! from its log, waits for `/healthz`, captures its logs, and kills it on drop.
//!
//! ```ignore
//! let up = FakeUpstream::start(Scenario::new(Behavior::moonshot())).await;
//! let tg = Config::new()
//!     .provider(Provider::new("moonshot", "moonshot", &up.base_url()))
//!     .model(Model::new("kimi-k2.6").alias("kimi-k2-6").route(Route::new("moonshot", "kimi-k2.6")))
//!     .server("max_body_bytes", "4096")
//!     .start()
//!     .await;
//! let url = tg.url("/v1/chat/completions");
//! ```
//!
//! Each provider gets `api_key_env = "TOLLGATE_TEST_KEY_<NAME>"`, set in the child's environment
//! to [`Provider::secret`] (`sk-upstream-<name>-secret`), so tests can check what reaches the upstream
//! and that the secret never shows in logs. Auth defaults to `[auth] required = false`; use
//! `.static_keys(&["sk-test"])` for key checking. `.raw(toml)` appends arbitrary TOML.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::listening;

/// Path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tollgate")
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", inner.join(", "))
}

/// One `[[providers]]` entry.
#[derive(Clone, Debug)]
pub struct Provider {
    pub name: String,
    pub dialect: String,
    pub base_url: String,
    pub with_key: bool,
    /// Extra `key = value` lines (raw TOML values), e.g. `("first_byte_timeout_ms", "500")`.
    pub extra: Vec<(String, String)>,
}

impl Provider {
    pub fn new(name: &str, dialect: &str, base_url: &str) -> Self {
        Self {
            name: name.to_owned(),
            dialect: dialect.to_owned(),
            base_url: base_url.to_owned(),
            with_key: true,
            extra: vec![],
        }
    }
    /// No `api_key_env` for this provider (self-hosted upstreams).
    pub fn without_key(mut self) -> Self {
        self.with_key = false;
        self
    }
    /// Adds `key = value` (value is raw TOML: quote strings yourself).
    pub fn set(mut self, key: &str, raw_value: &str) -> Self {
        self.extra.push((key.to_owned(), raw_value.to_owned()));
        self
    }
    /// Name of the env var holding this provider's key.
    pub fn key_env(&self) -> String {
        let up: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("TOLLGATE_TEST_KEY_{up}")
    }
    /// The secret the child process gets in [`Provider::key_env`].
    pub fn secret(&self) -> String {
        format!("sk-upstream-{}-secret", self.name)
    }
}

/// One `[[models.routes]]` entry.
#[derive(Clone, Debug)]
pub struct Route {
    pub provider: String,
    pub upstream_model: String,
    pub extra: Vec<(String, String)>,
}

impl Route {
    pub fn new(provider: &str, upstream_model: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            upstream_model: upstream_model.to_owned(),
            extra: vec![],
        }
    }
    /// Adds `key = value` (raw TOML value), e.g. `("weight", "2")`.
    pub fn set(mut self, key: &str, raw_value: &str) -> Self {
        self.extra.push((key.to_owned(), raw_value.to_owned()));
        self
    }
}

/// One `[[models]]` entry.
#[derive(Clone, Debug)]
pub struct Model {
    pub id: String,
    pub aliases: Vec<String>,
    pub context_length: u64,
    pub max_output_tokens: u64,
    pub capabilities: Vec<String>,
    pub routes: Vec<Route>,
    pub extra: Vec<(String, String)>,
}

impl Model {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            aliases: vec![],
            context_length: 262_144,
            max_output_tokens: 16_000,
            capabilities: vec!["reasoning".into(), "tools".into(), "json_object".into()],
            routes: vec![],
            extra: vec![],
        }
    }
    pub fn alias(mut self, a: &str) -> Self {
        self.aliases.push(a.to_owned());
        self
    }
    pub fn max_output_tokens(mut self, n: u64) -> Self {
        self.max_output_tokens = n;
        self
    }
    pub fn route(mut self, r: Route) -> Self {
        self.routes.push(r);
        self
    }
    pub fn set(mut self, key: &str, raw_value: &str) -> Self {
        self.extra.push((key.to_owned(), raw_value.to_owned()));
        self
    }
}

/// A whole `tollgate.toml`, plus the child's extra environment.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub server: Vec<(String, String)>,
    pub static_keys: Option<Vec<String>>,
    pub providers: Vec<Provider>,
    pub models: Vec<Model>,
    pub raw: String,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }
    /// `[server] key = value` (raw TOML value).
    pub fn server(mut self, key: &str, raw_value: &str) -> Self {
        self.server.push((key.to_owned(), raw_value.to_owned()));
        self
    }
    /// `[auth] static_keys = [...]` (otherwise `[auth] required = false`).
    pub fn static_keys(mut self, keys: &[&str]) -> Self {
        self.static_keys = Some(keys.iter().map(|k| (*k).to_owned()).collect());
        self
    }
    pub fn provider(mut self, p: Provider) -> Self {
        self.providers.push(p);
        self
    }
    pub fn model(mut self, m: Model) -> Self {
        self.models.push(m);
        self
    }
    /// Appends raw TOML after everything else.
    pub fn raw(mut self, toml: &str) -> Self {
        self.raw.push_str(toml);
        self.raw.push('\n');
        self
    }
    /// Extra environment variable for the child.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }
    /// Extra command-line argument after `serve ...`.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_owned());
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        if !self.server.is_empty() {
            s.push_str("[server]\n");
            for (k, v) in &self.server {
                let _ = writeln!(s, "{k} = {v}");
            }
            s.push('\n');
        }
        s.push_str("[auth]\n");
        match &self.static_keys {
            Some(_) => {
                // The keys are imported into the test's database by `start` (static keys were
                // replaced by database keys).
                s.push_str("required = true\n");
            }
            None => s.push_str("required = false\n"),
        }
        s.push('\n');
        for p in &self.providers {
            s.push_str("[[providers]]\n");
            let _ = writeln!(s, "name = {}", toml_str(&p.name));
            let _ = writeln!(s, "base_url = {}", toml_str(&p.base_url));
            if p.with_key {
                let _ = writeln!(s, "api_key_env = {}", toml_str(&p.key_env()));
            }
            let _ = writeln!(s, "dialect = {}", toml_str(&p.dialect));
            for (k, v) in &p.extra {
                let _ = writeln!(s, "{k} = {v}");
            }
            s.push('\n');
        }
        for m in &self.models {
            s.push_str("[[models]]\n");
            let _ = writeln!(s, "id = {}", toml_str(&m.id));
            let _ = writeln!(s, "aliases = {}", toml_list(&m.aliases));
            let _ = writeln!(s, "context_length = {}", m.context_length);
            let _ = writeln!(s, "max_output_tokens = {}", m.max_output_tokens);
            let _ = writeln!(s, "input_modalities = [\"text\"]");
            let _ = writeln!(s, "capabilities = {}", toml_list(&m.capabilities));
            for (k, v) in &m.extra {
                let _ = writeln!(s, "{k} = {v}");
            }
            for r in &m.routes {
                s.push_str("  [[models.routes]]\n");
                let _ = writeln!(s, "  provider = {}", toml_str(&r.provider));
                let _ = writeln!(s, "  upstream_model = {}", toml_str(&r.upstream_model));
                let _ = writeln!(
                    s,
                    "  price_per_mtok = {{ input = 0.60, cached_input = 0.10, output = 3.00 }}"
                );
                for (k, v) in &r.extra {
                    let _ = writeln!(s, "  {k} = {v}");
                }
            }
            s.push('\n');
        }
        s.push_str(&self.raw);
        s
    }

    /// Writes the config and starts the binary; panics with the logs if it does not come up.
    pub async fn start(&self) -> Tollgate {
        Tollgate::start(self).await
    }
}

/// A running `tollgate serve`; killed on drop.
pub struct Tollgate {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    config: Config,
}

/// Creates a well-funded account `test` and imports `keys` as its keys (the test's fixed key
/// strings, so requests can keep using them).
fn import_keys(config: &Path, keys: &[String]) {
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut child = Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run tollgate {args:?}: {e}"));
        if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            let _ = writeln!(w, "{text}");
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("wait tollgate {args:?}: {e}"));
        assert!(
            out.status.success(),
            "tollgate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["accounts", "create", "test"], None);
    run(
        &["credits", "add", "test", "1000", "--reason", "test harness"],
        None,
    );
    for k in keys {
        run(&["keys", "import", "--account", "test"], Some(k));
    }
}

/// `TOLLGATE_TEST_LOG` (default `info`), keeping the `info` line that says where the server
/// listens.
fn log_filter() -> String {
    match std::env::var("TOLLGATE_TEST_LOG") {
        Ok(f) if f.contains("tollgate::http") => f,
        Ok(f) => format!("{f},tollgate::http=info"),
        Err(_) => "info".into(),
    }
}

fn read_file(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

impl Tollgate {
    pub async fn start(cfg: &Config) -> Tollgate {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let config_path = dir.path().join("tollgate.toml");
        let db = dir.path().join("tollgate.db");
        let text = format!(
            "{}\n[database]\nurl = {}\n",
            cfg.to_toml(),
            toml_str(&format!("sqlite://{}", db.display()))
        );
        std::fs::write(&config_path, text)
            .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
        if let Some(keys) = &cfg.static_keys {
            import_keys(&config_path, keys);
        }
        let mut tg = Tollgate {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            config: cfg.clone(),
        };
        tg.spawn(&config_path);
        let log = tg.log_path();
        if let Some(child) = tg.child.as_mut() {
            tg.addr = listening::wait_listening(child, &log, 0, Duration::from_secs(30));
        }
        if let Err(e) = tg.wait_healthy(Duration::from_secs(30)).await {
            panic!(
                "tollgate did not become healthy.\n--- config ---\n{}\n{e}\n--- logs ---\n{}",
                cfg.to_toml(),
                tg.logs()
            );
        }
        tg
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.log")
    }

    /// Starts `tollgate serve` on a port the kernel picks (see [`listening`]).
    fn spawn(&mut self, config_path: &Path) {
        let log = std::fs::File::create(self.log_path())
            .unwrap_or_else(|e| panic!("create log file: {e}"));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("clone log file: {e}"));
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(config_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&self.config.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .env("RUST_LOG", log_filter())
            .env("NO_COLOR", "1");
        for p in &self.config.providers {
            if p.with_key {
                cmd.env(p.key_env(), p.secret());
            }
        }
        for (k, v) in &self.config.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary()));
        self.child = Some(child);
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        let url = self.url("/healthz");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("tollgate exited early with {status}"));
                }
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no 2xx from {url} within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:PORT/v1`: the OpenAI SDK base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// Everything the process wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        read_file(&self.log_path())
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
    /// Sends SIGTERM (graceful shutdown tests).
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    /// Waits for the process to exit (after `terminate`), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A reqwest client for tests (no proxy from the environment, 60 s overall timeout).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| panic!("reqwest client: {e}"))
}
