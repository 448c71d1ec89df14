//! Operational behaviour of the real binary: `--version`, `config check`, model cards, request ids,
//! body limits without reading the whole body, open-mode refusal off loopback, graceful shutdown,
//! `make run`'s first key.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/listening.rs"]
mod listening;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn write_config(dir: &tempfile::TempDir, body: &str) -> std::path::PathBuf {
    let path = dir.path().join("tollgate.toml");
    let db = dir.path().join("tollgate.db");
    let body = format!("{body}\n[database]\nurl = \"sqlite://{}\"\n", db.display());
    std::fs::write(&path, body).expect("write config");
    path
}

/// Runs a command to its end; panics with its stderr unless it succeeded; returns its stdout.
fn stdout_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a billing CLI command against the config's store; returns stdout.
fn cli(config: &std::path::Path, args: &[&str]) -> String {
    stdout_of(
        Command::new(BIN).args(args).arg("--config").arg(config),
        &format!("{args:?}"),
    )
}

/// Creates a funded account and returns a fresh customer key for it.
fn customer_key(config: &std::path::Path) -> String {
    cli(config, &["accounts", "create", "ops"]);
    cli(config, &["credits", "add", "ops", "10", "--reason", "test"]);
    cli(config, &["keys", "create", "--account", "ops"])
        .trim()
        .to_string()
}

struct Server {
    child: Child,
    addr: SocketAddr,
    key: String,
}

impl Server {
    /// The request text with the test's key in place of `sk-test`.
    fn req(&self, text: &[u8]) -> Vec<u8> {
        String::from_utf8_lossy(text)
            .replace("sk-test", &self.key)
            .into_bytes()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &std::path::Path) -> Server {
    start_with_env(config, &[])
}

fn start_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> Server {
    let key = customer_key(config);
    // The log goes beside the config.
    let log = config.with_file_name("serve.log");
    let (child, addr) = serve(&["--config".as_ref(), config.as_os_str()], env, &log);
    Server { child, addr, key }
}

/// Starts `tollgate GLOBAL… serve --listen 127.0.0.1:0` with its stderr appended to `log` and
/// waits until it listens (a second start appends to the same log; only its own lines count).
fn serve(
    global: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
    log: &std::path::Path,
) -> (Child, SocketAddr) {
    let from = std::fs::metadata(log)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut child = Command::new(BIN)
        .args(global)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(logf))
        .spawn()
        .expect("spawn tollgate");
    let addr = listening::wait_listening(&mut child, log, from, Duration::from_secs(20));
    (child, addr)
}

/// Sends raw bytes and reads the whole response (the server closes or we time out).
fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = find_body_end(&buf) {
                    buf.truncate(end);
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// With a content-length response, the end of the body.
fn find_body_end(buf: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(buf);
    let head_end = text.find("\r\n\r\n")? + 4;
    let len: usize = text[..head_end].lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().parse().ok())
    })??;
    (buf.len() >= head_end + len).then_some(head_end + len)
}

const CONFIG: &str = r#"
[auth]
required = true
[server]
max_body_bytes = 1024
[[providers]]
name = "moonshot"
dialect = "moonshot"
base_url = "http://127.0.0.1:9/v1"
[[models]]
id = "kimi-k2.6"
aliases = ["moonshotai/kimi-k2.6"]
context_length = 262144
max_output_tokens = 16000
input_modalities = ["text", "image", "video"]
capabilities = ["reasoning", "tools", "json_object"]
  [[models.routes]]
  provider = "moonshot"
  price_per_mtok = { input = 0.60, cached_input = 0.10, output = 3.00 }
"#;

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn config_check_prints_catalog_and_fails_pointedly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write_config(&dir, CONFIG);
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kimi-k2.6")
            && text.contains("moonshotai/kimi-k2.6")
            && text.contains("in 0.6 cached 0.1 out 3"),
        "{text}"
    );

    let bad = write_config(
        &dir,
        &CONFIG.replace(
            "max_body_bytes = 1024",
            "max_body_bytes = 1024\nlisten_on = \"x\"",
        ),
    );
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_on") && err.contains("line 6"), "{err}");
}

#[test]
fn models_cards_request_ids_and_body_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(&dir, CONFIG);
    let srv = start(&cfg);

    let resp = raw(srv.addr, &srv.req(b"GET /v1/models/moonshotai/kimi-k2.6 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\nconnection: close\r\n\r\n"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("x-request-id: req_"),
        "{resp}"
    );
    let body = &resp[resp.find("\r\n\r\n").expect("body") + 4..];
    let card: serde_json::Value = serde_json::from_str(body).expect("json card");
    assert_eq!(card["id"], "kimi-k2.6");
    assert_eq!(card["context_length"], 262144);
    assert_eq!(card["max_output_tokens"], 16000);
    assert_eq!(
        card["architecture"]["input_modalities"],
        serde_json::json!(["text", "image", "video"])
    );
    assert_eq!(card["pricing"]["prompt"], "0.0000006");
    assert!(card["supported_parameters"]
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p == "tools")));

    // 413 from Content-Length alone: the server answers before the (never sent) body arrives.
    let resp = raw(
        srv.addr,
        &srv.req(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n{"),
    );
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("\"code\":\"payload_too_large\""), "{resp}");

    // Unknown path: OpenAI-shaped 404 with a request id.
    let resp = raw(
        srv.addr,
        b"GET /v1/nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(
        resp.starts_with("HTTP/1.1 404") && resp.contains("\"error\""),
        "{resp}"
    );
}

#[test]
fn open_mode_is_refused_off_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(&dir, &CONFIG.replace("required = true", "required = false"));
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("open mode"));
}

/// `make run`'s first start: scripts/first-key.sh creates one key and prints it, then `serve` with
/// the built-in config (no `--config`) requires a key and takes that one; a second run of the
/// script creates none; the key is in clear neither in the server's log nor in the database.
#[test]
fn first_start_key_is_what_the_built_in_config_requires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("tollgate.db");
    let url = format!("sqlite://{}", db.display());
    let first_key = || {
        stdout_of(
            Command::new("bash")
                .arg("scripts/first-key.sh")
                .args([BIN, "--database-url", &url]),
            "scripts/first-key.sh",
        )
    };
    let printed = first_key();
    let key = printed
        .split_whitespace()
        .find(|w| w.starts_with("tg-") && w.len() > 40)
        .unwrap_or_else(|| panic!("no key printed:\n{printed}"))
        .to_string();
    assert_eq!(first_key(), "", "a second run prints nothing");
    let keys = stdout_of(
        Command::new(BIN).args(["--database-url", &url, "keys", "list"]),
        "keys list",
    );
    assert_eq!(keys.lines().count(), 2, "a header and the one key:\n{keys}");

    // The built-in config, as `make run` serves it.
    let log = dir.path().join("serve.log");
    let (child, addr) = serve(&["--database-url".as_ref(), url.as_ref()], &[], &log);
    let server = Server {
        child,
        addr,
        key: key.clone(),
    };
    let anonymous = raw(
        server.addr,
        b"GET /v1/account HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    let with_key = raw(
        server.addr,
        &server.req(b"GET /v1/account HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\nconnection: close\r\n\r\n"),
    );
    drop(server); // stopped before its files are read
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
    assert!(
        with_key.starts_with("HTTP/1.1 200") && with_key.contains(r#""name":"local""#),
        "{with_key}"
    );
    for file in [log, db.clone(), db.with_extension("db-wal")] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&key),
            "the key is in clear in {}",
            file.display()
        );
    }
}

#[cfg(unix)]
#[test]
fn sigterm_stops_accepting_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(&dir, CONFIG);
    let mut srv = start(&cfg);
    let pid = srv.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = srv.child.try_wait().expect("wait") {
            assert!(st.success(), "exit status {st:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tollgate did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        TcpStream::connect(srv.addr).is_err(),
        "still accepting after shutdown"
    );
}

/// A one-connection-at-a-time upstream that streams `n` chunks, `gap` apart.
fn slow_upstream(n: usize, gap: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                let _ = c.read(&mut buf);
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n");
                for i in 0..n {
                    let ev = format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}}}}]}}\n\n");
                    if c.write_all(ev.as_bytes()).is_err() {
                        return;
                    }
                    std::thread::sleep(gap);
                }
                let _ = c.write_all(b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n");
            });
        }
    });
    addr
}

#[cfg(unix)]
#[test]
fn sigterm_lets_an_open_stream_finish() {
    let up = slow_upstream(10, Duration::from_millis(150));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        &dir,
        &CONFIG.replace("http://127.0.0.1:9/v1", &format!("http://{up}/v1")),
    );
    let mut srv = start(&cfg);
    let addr = srv.addr;
    let key = srv.key.clone();
    let reader = std::thread::spawn(move || {
        let body =
            br#"{"model":"kimi-k2.6","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .replace("sk-test", &key);
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.write_all(req.as_bytes()).expect("write");
        s.write_all(body).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    std::thread::sleep(Duration::from_millis(400));
    let pid = srv.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let out = reader.join().expect("reader");
    assert!(out.contains("t9 "), "stream was cut: {out}");
    assert!(out.contains("data: [DONE]"), "stream did not finish: {out}");
    let st = srv.child.wait().expect("wait");
    assert!(st.success());
}

#[test]
fn silent_upstream_gets_sse_keepalive_comments() {
    let up = slow_upstream(2, Duration::from_millis(2500));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = CONFIG
        .replace("http://127.0.0.1:9/v1", &format!("http://{up}/v1"))
        .replace(
            "max_body_bytes = 1024",
            "max_body_bytes = 1024\nkeepalive_secs = 1",
        );
    let cfg = write_config(&dir, &cfg);
    let srv = start(&cfg);
    let body =
        br#"{"model":"kimi-k2.6","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .replace("sk-test", &srv.key);
    let mut s = TcpStream::connect(srv.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(req.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let t0 = out.find("t0 ").expect("first chunk");
    let t1 = out.find("t1 ").expect("second chunk");
    let ka = out.find(": keep-alive").expect("a keep-alive comment");
    assert!(
        t0 < ka && ka < t1,
        "keep-alive not between the chunks: {out}"
    );
    assert!(out.contains("data: [DONE]"));
}

#[test]
fn metrics_count_requests_tokens_and_attempts() {
    let up = slow_upstream(2, Duration::from_millis(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(
        &dir,
        &CONFIG
            .replace("http://127.0.0.1:9/v1", &format!("http://{up}/v1"))
            .replace(
                "[server]\n",
                "[server]\nmetrics_token_env = \"TG_OPS_METRICS_TOKEN\"\n",
            ),
    );
    // Named but unset: serve refuses to start (it would leave /metrics open).
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("TG_OPS_METRICS_TOKEN")
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TG_OPS_METRICS_TOKEN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let srv = start_with_env(&cfg, &[("TG_OPS_METRICS_TOKEN", "scrape-me")]);
    // The token is required: none or a wrong one is a 401.
    for auth in ["", "authorization: Bearer nope\r\n"] {
        let text = raw(
            srv.addr,
            format!("GET /metrics HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n")
                .as_bytes(),
        );
        assert!(text.starts_with("HTTP/1.1 401"), "{auth:?}: {text}");
    }
    let body =
        br#"{"model":"kimi-k2.6","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    for _ in 0..2 {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let mut s = TcpStream::connect(srv.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        s.write_all(&srv.req(req.as_bytes())).expect("write");
        s.write_all(body).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.contains("data: [DONE]"), "{out}");
    }
    // The outcome is recorded as the stream ends; give the server a moment to count it.
    let want = [
        r#"tollgate_requests_total{model="kimi-k2.6",provider="moonshot",status="completed"} 2"#,
        r#"tollgate_tokens_total{model="kimi-k2.6",kind="prompt"} 6"#,
        r#"tollgate_tokens_total{model="kimi-k2.6",kind="completion"} 10"#,
        r#"tollgate_upstream_attempts_total{provider="moonshot",retry="false"} 2"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = raw(
            srv.addr,
            b"GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer scrape-me\r\nconnection: close\r\n\r\n",
        );
        if want.iter().all(|w| text.contains(w)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("metrics missing one of {want:?}:\n{text}");
}
