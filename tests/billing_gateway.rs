//! Billing through the real binary against a fake upstream, on SQLite and PostgreSQL: costs in
//! responses, 402 before any upstream call, request records, revocation, the account API, keys
//! never in logs, and `kill -9` recovery during 200 streamed requests.

mod billing_support;
#[path = "support/listening.rs"]
mod listening;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tollgate::billing::keys::ServerSecret;
use tollgate::billing::{Billing, BillingSettings};
use tollgate::store::{now_ms, Store};

use billing_support::{applied, Db};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const SECRET: &str = "gateway-test-secret-0123456789abcdef-xyz";

// ---- fake upstream -----------------------------------------------------------------------------

#[derive(Default)]
struct Upstream {
    calls: AtomicUsize,
}

/// OpenAI-compatible fake: `fake-500` fails; streams send `max_tokens` (default 20) one-token
/// chunks 5 ms apart, then usage; complete answers report 10 prompt (4 cached) + 20 completion.
async fn upstream_chat(State(st): State<Arc<Upstream>>, Json(body): Json<Value>) -> Response {
    st.calls.fetch_add(1, Ordering::SeqCst);
    let model = body["model"].as_str().unwrap_or("").to_string();
    if model == "fake-500" {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    if model == "fake-cut" {
        // Ten content chunks, then the connection drops: no finish_reason, no usage, no [DONE].
        let stream = async_stream::stream! {
            for i in 0..10 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let ev = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"content": format!("t{i} ")}, "finish_reason": null}]});
                yield Ok::<_, std::io::Error>(format!("data: {ev}\n\n"));
            }
            // let the ten chunks reach the gateway before the connection is torn down
            tokio::time::sleep(Duration::from_millis(100)).await;
            yield Err(std::io::Error::other("cut"));
        };
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| Response::new(Body::empty()));
    }
    if body["stream"].as_bool() == Some(true) {
        let n = body["max_tokens"]
            .as_u64()
            .or(body["max_completion_tokens"].as_u64())
            .unwrap_or(20)
            .min(20);
        let stream = async_stream::stream! {
            for i in 0..n {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let ev = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"content": format!("t{i} ")}, "finish_reason": null}]});
                yield Ok::<_, std::convert::Infallible>(format!("data: {ev}\n\n"));
            }
            let ev = json!({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}});
            yield Ok(format!("data: {ev}\n\ndata: [DONE]\n\n"));
        };
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| Response::new(Body::empty()));
    }
    Json(json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
                  "prompt_tokens_details": {"cached_tokens": 4}}
    }))
    .into_response()
}

async fn start_upstream() -> (SocketAddr, Arc<Upstream>) {
    let st = Arc::new(Upstream::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(upstream_chat))
        .with_state(st.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (addr, st)
}

// ---- the binary --------------------------------------------------------------------------------

fn config_text(up: SocketAddr, db_url: &str, hold_ttl_secs: u64, admission: &str) -> String {
    format!(
        r#"
[auth]
required = true
[database]
url = "{db_url}"
[billing]
hold_ttl_secs = {hold_ttl_secs}
sweep_interval_secs = 1
{admission}[[providers]]
name = "fake"
dialect = "openai"
base_url = "http://{up}/v1"
[[models]]
id = "m1"
max_output_tokens = 1000
  [[models.routes]]
  provider = "fake"
  upstream_model = "fake-ok"
  price_per_mtok = {{ input = 1.00, cached_input = 0.50, output = 4.00 }}
[[models]]
id = "cut"
max_output_tokens = 1000
  [[models.routes]]
  provider = "fake"
  upstream_model = "fake-cut"
  price_per_mtok = {{ input = 1.00, output = 4.00 }}
[[models]]
id = "broken"
max_output_tokens = 1000
  [[models.routes]]
  provider = "fake"
  upstream_model = "fake-500"
  price_per_mtok = {{ input = 1.00, output = 4.00 }}
[[providers]]
name = "fake2"
dialect = "openai"
base_url = "http://{up}/v1"
[[models]]
id = "fo"
max_output_tokens = 1000
  [[models.routes]]
  provider = "fake"
  upstream_model = "fake-500"
  price_per_mtok = {{ input = 1.00, output = 4.00 }}
  [[models.routes]]
  provider = "fake2"
  upstream_model = "fake-ok"
  price_per_mtok = {{ input = 2.00, cached_input = 1.00, output = 8.00 }}
[[models]]
id = "ch"
max_output_tokens = 1000
routing = {{ policy = "cheapest" }}
  [[models.routes]]
  provider = "fake"
  upstream_model = "fake-ok"
  price_per_mtok = {{ input = 1.00, output = 4.00 }}
  [[models.routes]]
  provider = "fake2"
  upstream_model = "fake-ok"
  price_per_mtok = {{ input = 2.00, output = 8.00 }}
"#
    )
}

struct Gw {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tollgate serve` on a port the kernel picks; returns it once it listens. Its stderr is
/// appended to `log` (restarts share the file).
fn spawn_gw(config: &Path, log: &Path) -> (Child, SocketAddr) {
    let from = std::fs::metadata(log)
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("log: {e}"));
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .env("TOLLGATE_SECRET", SECRET)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(logf))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn tollgate: {e}"));
    let addr = listening::wait_listening(&mut child, log, from, Duration::from_secs(30));
    (child, addr)
}

async fn start_gw(db: &Db, up: SocketAddr, hold_ttl_secs: u64) -> Gw {
    let config = db.dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        config_text(up, &db.url, hold_ttl_secs, &db.admission_toml()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let log = db.dir.path().join("tollgate.log");
    let (child, addr) = spawn_gw(&config, &log);
    Gw {
        child,
        addr,
        config,
        log,
    }
}

/// A billing handle on the same store, with the same secret as the binary.
async fn billing_on(db: &Db) -> Billing {
    let store = Store::connect(&db.url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    Billing::with_store(
        store,
        ServerSecret::from_bytes(SECRET.as_bytes().to_vec()),
        BillingSettings {
            database_url: db.url.clone(),
            ..BillingSettings::default()
        },
    )
}

/// A response header as text ("" when absent).
fn header_of(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A request's record as the test's own handle reads it from the database (see [`applied`]).
async fn record(db: &Db, b: &Billing, id: &str) -> tollgate::store::RequestRow {
    match applied(db, || async { b.request_record(id).await.ok() }).await {
        Some(r) => r,
        None => panic!(
            "request {id}: {:?}",
            b.request_record(id).await.map(|r| r.state)
        ),
    }
}

/// A new account with `micros` of credit, and a customer key for it.
async fn funded_key(b: &Billing, account: &str, micros: i64) -> String {
    b.create_account(account, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.add_credits(account, micros, "test", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.create_key(account, false, None, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn chat_body(model: &str, stream: bool, max_tokens: u32) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": max_tokens,
           "stream_options": {"include_usage": true},
           "messages": [{"role": "user", "content": "hello"}]})
}

// expected: 6 uncached × $1 + 4 cached × $0.5 + 20 × $4 per 1M = 6 + 2 + 80 = 88 micro-USD
const COMPLETE_COST: i64 = 88;

async fn gateway_flow(db: &Db) -> Billing {
    let (up, upstream) = start_upstream().await;
    let b = billing_on(db).await;
    let gw = start_gw(db, up, 3600).await;
    let base = format!("http://{}", gw.addr);
    let http = client();

    b.create_account("acme", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (key, _) = b
        .create_key("acme", false, None, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (admin_key, _) = b
        .create_key("acme", true, Some("ops"), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // A new account has no credit: 402 before any upstream call.
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("m1", false, 100))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 402);
    let v: Value = r.json().await.unwrap_or_default();
    assert_eq!(v["error"]["code"], "insufficient_credits", "{v}");
    assert_eq!(
        upstream.calls.load(Ordering::SeqCst),
        0,
        "no upstream call without credit"
    );

    // Top up through the admin API (idempotent).
    for _ in 0..2 {
        let r = http
            .post(format!("{base}/admin/v1/accounts/acme/credits"))
            .bearer_auth(&admin_key)
            .header("idempotency-key", "topup-1")
            .json(&json!({"amount_usd": "1.00", "reason": "test"}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.status().is_success(), "{:?}", r.text().await);
    }
    // customer keys cannot use the admin API
    let r = http
        .get(format!("{base}/admin/v1/accounts"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 403);

    // Non-streamed: cost header and usage.cost, equal to the ledger's charge.
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .header("x-api-key", &key)
        .json(&chat_body("m1", false, 100))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    let rid = header_of(&r, "x-request-id");
    assert_eq!(
        r.headers()
            .get("x-tollgate-cost-usd")
            .and_then(|v| v.to_str().ok()),
        Some("0.000088")
    );
    let v: Value = r.json().await.unwrap_or_default();
    assert_eq!(v["usage"]["cost"].as_f64(), Some(0.000088), "{v}");
    let rec = record(db, &b, &rid).await;
    assert_eq!(
        (rec.state.as_str(), rec.cost_micros),
        ("settled", COMPLETE_COST)
    );
    assert_eq!(
        (rec.prompt_tokens, rec.cached_tokens, rec.completion_tokens),
        (10, 4, 20)
    );
    assert_eq!(rec.provider.as_deref(), Some("fake"));
    assert_eq!(rec.upstream_model.as_deref(), Some("fake-ok"));
    assert!(!rec.estimated);

    // The customer API sees it.
    let r = http
        .get(format!("{base}/v1/requests/{rid}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let v: Value = r.json().await.unwrap_or_default();
    assert_eq!(v["cost"]["total_micros"], COMPLETE_COST, "{v}");
    let r = http
        .get(format!("{base}/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let v: Value = r.json().await.unwrap_or_default();
    assert_eq!(v["balance_micros"], 1_000_000 - COMPLETE_COST, "{v}");
    let r = http
        .get(format!("{base}/v1/usage?group_by=model"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let v: Value = r.json().await.unwrap_or_default();
    assert_eq!(v["data"][0]["group"], "m1", "{v}");
    assert_eq!(v["data"][0]["cost_micros"], COMPLETE_COST, "{v}");
    let r = http
        .get(format!("{base}/v1/models/m1/pricing-history"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let v: Value = r.json().await.unwrap_or_default();
    assert_eq!(
        v["data"][0]["per_million_tokens_usd"]["output"], "4.000000",
        "{v}"
    );

    // Streamed: the final usage chunk carries the cost; settled before [DONE].
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("m1", true, 15))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rid = header_of(&r, "x-request-id");
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("data: [DONE]"), "{text}");
    let cost = stream_cost(&text);
    // 10 × $1 + 15 × $4 = 70 micros
    assert_eq!(cost, Some(70), "{text}");
    let rec = record(db, &b, &rid).await;
    assert_eq!((rec.state.as_str(), rec.cost_micros), ("settled", 70));

    // Streamed Anthropic Messages and Responses answers carry the same charge as `usage.cost` in
    // their final usage object (`message_delta`, `response.completed`), settled before it is sent.
    for (path, body, event) in [
        (
            "/v1/messages",
            json!({"model": "m1", "stream": true, "max_tokens": 15,
                   "messages": [{"role": "user", "content": "hello"}]}),
            "message_delta",
        ),
        (
            "/v1/responses",
            json!({"model": "m1", "stream": true, "max_output_tokens": 15, "input": "hello"}),
            "response.completed",
        ),
    ] {
        let r = http
            .post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let rid = header_of(&r, "x-request-id");
        let text = r.text().await.unwrap_or_default();
        let cost = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|v| v["type"] == event)
            .filter_map(|v| {
                let u = if event == "message_delta" {
                    &v["usage"]
                } else {
                    &v["response"]["usage"]
                };
                u["cost"].as_f64()
            })
            .map(|c| (c * 1_000_000.0).round() as i64)
            .next_back();
        let rec = record(db, &b, &rid).await;
        assert_eq!(rec.state, "settled", "{path}: {text}");
        assert!(rec.cost_micros > 0, "{path}");
        assert_eq!(cost, Some(rec.cost_micros), "{path}: {text}");
    }

    // Stream cut by the upstream after 10 chunks: error event, no [DONE], and the charge covers only
    // the delivered text ("t0 " … "t9 " = 30 bytes → 8 tokens counted locally), marked estimated.
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("cut", true, 500))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rid = header_of(&r, "x-request-id");
    let text = r.text().await.unwrap_or_default();
    assert!(text.contains("t9 ") && text.contains("\"error\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let mut rec = record(db, &b, &rid).await;
    for _ in 0..100 {
        if rec.state != "held" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        rec = record(db, &b, &rid).await;
    }
    assert_eq!(rec.state, "settled", "{rec:?}");
    assert!(rec.estimated && rec.delivered, "{rec:?}");
    assert_eq!(rec.completion_tokens, 8, "{rec:?}");
    assert_eq!(
        rec.output_cost_micros, 32,
        "8 tokens × $4/Mtok = 32 micro-USD: {rec:?}"
    );
    assert!(
        rec.cost_micros > 0 && rec.cost_micros == rec.computed_cost_micros,
        "{rec:?}"
    );

    // Upstream failure: nothing delivered, charge 0.
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body("broken", false, 10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.status().is_server_error(), "{}", r.status());
    let rid = header_of(&r, "x-request-id");
    let rec = record(db, &b, &rid).await;
    assert_eq!((rec.state.as_str(), rec.cost_micros), ("released", 0));

    // Revocation (here by another process, as the CLI does) takes effect on the next request.
    // Lease admission caches key rows (here for 600 s, longer than `applied` waits): the key
    // epoch the revocation bumps drops that cache within ~0.1 s.
    let prefix = tollgate::billing::keys::visible_prefix(&key).unwrap_or_default();
    b.revoke_key(&prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = applied(db, || async {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat_body("m1", false, 10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (r.status().as_u16() == 401).then_some(())
    })
    .await;
    assert!(refused.is_some(), "the revoked key is refused");
    let r = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 401);

    // Keys never appear in the log (nor the database: see billing_ledger).
    let log = std::fs::read_to_string(&gw.log).unwrap_or_default();
    assert!(
        log.contains("request finished"),
        "the log is being captured: {log}"
    );
    for k in [&key, &admin_key] {
        assert!(!log.contains(&k[3..]), "a raw key appears in the log");
    }
    drop(gw);
    b
}
all_admissions!(gateway_bills_and_reports, gateway_flow);

/// The charge from the final usage chunk of an SSE body, in micro-USD.
fn stream_cost(text: &str) -> Option<i64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["usage"]["cost"].as_f64())
        .map(|c| (c * 1_000_000.0).round() as i64)
        .next_back()
}

// ---- kill -9 -----------------------------------------------------------------------------------

struct Outcome {
    request_id: Option<String>,
    completed_cost: Option<i64>,
}

async fn kill9(db: &Db) -> Billing {
    const HOLD_TTL: u64 = 2;
    let (up, _upstream) = start_upstream().await;
    let b = billing_on(db).await;
    let key = funded_key(&b, "acme", 100_000_000).await;
    let gw = start_gw(db, up, HOLD_TTL).await;
    let addr = Arc::new(RwLock::new(gw.addr));
    let (config, log) = (gw.config.clone(), gw.log.clone());
    let gw = Arc::new(tokio::sync::Mutex::new(gw));

    // 200 streamed requests, 16 at a time, while the gateway is killed at random points.
    let http = client();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (http, next, done, addr, key) = (
            http.clone(),
            next.clone(),
            done.clone(),
            addr.clone(),
            key.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < 200 {
                // one logical request: retried only while the gateway is down (no response)
                let resp = loop {
                    let a = *addr.read().unwrap_or_else(|e| e.into_inner());
                    match http
                        .post(format!("http://{a}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&chat_body("m1", true, 20))
                        .send()
                        .await
                    {
                        Ok(r) => break r,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                let request_id = resp
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let text = resp.text().await.unwrap_or_default();
                let completed_cost = if text.contains("data: [DONE]") {
                    stream_cost(&text)
                } else {
                    None
                };
                out.push(Outcome {
                    request_id,
                    completed_cost,
                });
                done.fetch_add(1, Ordering::SeqCst);
            }
            out
        }));
    }
    // Seeded "random" kill points (deterministic per run).
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15 ^ now_ms() as u64;
    let seed0 = seed;
    let mut kills = 0;
    while done.load(Ordering::SeqCst) < 200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(100 + seed % 300)).await;
        let mut g = gw.lock().await;
        let _ = g.child.kill(); // SIGKILL
        let _ = g.child.wait();
        kills += 1;
        let (child, a) = spawn_gw(&config, &log);
        g.child = child;
        g.addr = a;
        *addr.write().unwrap_or_else(|e| e.into_inner()) = a;
    }
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(
        kills >= 2,
        "the gateway was killed {kills} times (seed {seed0:#x})"
    );
    assert_eq!(outcomes.len(), 200);
    let completed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.completed_cost.is_some())
        .collect();
    assert!(
        !completed.is_empty(),
        "some streams completed (seed {seed0:#x})"
    );

    // Recovery: the running gateway's sweeper releases holds once they expire.
    tokio::time::sleep(Duration::from_secs(HOLD_TTL + 3)).await;
    let rep = b
        .check_ledger(Some(now_ms()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(rep.is_ok(), "seed {seed0:#x}: {:#?}", rep.problems);
    assert_eq!(
        rep.open_holds, 0,
        "every request id reached a final state (seed {seed0:#x})"
    );
    // A client that saw a cost was charged exactly that, once.
    for o in &completed {
        let Some(id) = &o.request_id else { continue };
        let rec = record(db, &b, id).await;
        assert_eq!(rec.state, "settled", "{id} (seed {seed0:#x})");
        assert_eq!(
            Some(rec.cost_micros),
            o.completed_cost,
            "{id} (seed {seed0:#x})"
        );
    }
    // Every request id a client saw (its answer started, so it was admitted) has a row in a final
    // state: under lease admission there are no held rows at all, so `open_holds == 0` alone
    // would prove nothing.
    let mut seen = 0;
    for o in &outcomes {
        let Some(id) = &o.request_id else { continue };
        let rec = record(db, &b, id).await;
        assert!(
            matches!(rec.state.as_str(), "settled" | "released" | "expired"),
            "{id}: {} (seed {seed0:#x})",
            rec.state
        );
        seen += 1;
    }
    assert!(seen > 0, "clients saw request ids (seed {seed0:#x})");
    // Listing by time finds every record once (lease admission's are packed by second), and the
    // CLI lists the same.
    let listed = b
        .request_records(None, 0, now_ms() + 1, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ids: Vec<&str> = listed.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), listed.len(), "each record listed once");
    assert_eq!(listed.len() as i64, rep.requests, "every record listed");
    for o in &outcomes {
        if let Some(id) = &o.request_id {
            assert!(ids.binary_search(&id.as_str()).is_ok(), "{id} not listed");
        }
    }
    let cli = Command::new(BIN)
        .args(["requests", "--from", "0", "--limit", "100000", "--config"])
        .arg(&config)
        .env("TOLLGATE_SECRET", SECRET)
        .output()
        .unwrap_or_else(|e| panic!("tollgate requests: {e}"));
    assert!(cli.status.success(), "{cli:?}");
    let mut cli_ids: Vec<String> = String::from_utf8_lossy(&cli.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            v["id"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    cli_ids.sort_unstable();
    assert_eq!(cli_ids, ids, "the CLI lists the same records");
    if db.lease {
        assert!(rep.leases > 0, "the lease path was used: {rep:?}");
        // A restarted instance gave back its predecessors' leases; at most the running one
        // holds one (none if it was started after the last request).
        assert!(
            rep.open_leases <= 1,
            "only the running instance holds a lease: {rep:?}"
        );
    }
    // Every request the gateway saw has exactly one row and one final state (checked above);
    // requests cut by a kill were never charged more than their hold.
    eprintln!(
        "kill -9: {kills} kills, {} requests, {} completed, {} rows (seed {seed0:#x})",
        outcomes.len(),
        completed.len(),
        rep.requests
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains(&key[3..]),
        "a raw key appears in the log"
    );
    drop(gw);
    b
}
all_admissions!(kill9_recovery, kill9);

/// Route 1 fails (500), route 2 serves: the request is settled once, at route 2's prices, and
/// the request record names route 2 (issue 6: "billed once at the route that served it").
async fn failover_flow(db: &Db) -> Billing {
    let (up, upstream) = start_upstream().await;
    let b = billing_on(db).await;
    let gw = start_gw(db, up, 3600).await;
    let base = format!("http://{}", gw.addr);
    let http = client();
    let key = funded_key(&b, "fo", 1_000_000).await;

    // Route 2's prices: non-streamed 6 uncached × $2 + 4 cached × $1 + 20 × $8 per 1M = 176;
    // streamed (10 prompt tokens, none cached, 20 completion) 10 × $2 + 20 × $8 = 180.
    let mut charged = 0;
    for (stream, expected) in [(false, 176), (true, 180)] {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat_body("fo", stream, 20))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 200, "stream {stream}");
        assert_eq!(
            header_of(&r, "x-tollgate-provider"),
            "fake2",
            "stream {stream}"
        );
        let rid = header_of(&r, "x-request-id");
        let text = r.text().await.unwrap_or_default();
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            let cost = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .find_map(|v| v["usage"]["cost"].as_f64());
            assert_eq!(cost, Some(expected as f64 / 1e6), "{text}");
        } else {
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            assert_eq!(
                v["usage"]["cost"].as_f64(),
                Some(expected as f64 / 1e6),
                "{v}"
            );
            assert_eq!(v["provider"], "fake2", "{v}");
        }
        let rec = record(db, &b, &rid).await;
        assert_eq!(
            (rec.state.as_str(), rec.cost_micros),
            ("settled", expected),
            "stream {stream}"
        );
        assert_eq!(rec.provider.as_deref(), Some("fake2"));
        assert_eq!(rec.upstream_model.as_deref(), Some("fake-ok"));
        charged += expected;
        // Both attempts are on the request's record (written just after the answer).
        let mut attempts = Value::Null;
        for _ in 0..50 {
            let r = http
                .get(format!("{base}/v1/requests/{rid}"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let v: Value = r.json().await.unwrap_or_default();
            attempts = v["attempts"].clone();
            if attempts.as_array().map_or(0, Vec::len) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seen: Vec<_> = attempts
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        (
                            x["provider"].as_str().unwrap_or("").to_string(),
                            x["result"].as_str().unwrap_or("").to_string(),
                            x["http_status"].as_i64(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            seen,
            vec![
                ("fake".to_string(), "failed".to_string(), Some(500)),
                ("fake2".to_string(), "served".to_string(), Some(200)),
            ],
            "{attempts}"
        );
    }
    // Two attempts per request (route 1's 500, then route 2), and exactly the two charges.
    assert_eq!(upstream.calls.load(Ordering::SeqCst), 4);
    applied(db, || async {
        let a = b.account("fo").await.ok()?;
        (a.balance_micros == 1_000_000 - charged && a.held_micros == 0).then_some(())
    })
    .await;
    let acct = b.account("fo").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (acct.balance_micros, acct.held_micros),
        (1_000_000 - charged, 0)
    );
    drop(gw);
    b
}
all_admissions!(failover_bills_the_serving_route, failover_flow);

// ---- model cards show the prices charged ------------------------------------------------------

/// `m1`'s card in `/v1/models/m1` and in the `/v1/models` list.
async fn m1_cards(http: &reqwest::Client, base: &str, key: &str) -> (Value, Value) {
    let get = |path: String| {
        let (http, key) = (http.clone(), key.to_string());
        async move {
            let r = http
                .get(path)
                .bearer_auth(&key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap_or_default()
        }
    };
    let one = get(format!("{base}/v1/models/m1")).await;
    let list = get(format!("{base}/v1/models")).await;
    let listed = list["data"]
        .as_array()
        .and_then(|d| d.iter().find(|c| c["id"] == "m1").cloned())
        .unwrap_or_else(|| panic!("m1 not listed: {list}"));
    (one, listed)
}

async fn card_prices(db: &Db) -> Billing {
    let (up, _upstream) = start_upstream().await;
    let b = billing_on(db).await;
    let gw = start_gw(db, up, 3600).await;
    let base = format!("http://{}", gw.addr);
    let http = client();
    b.create_account("cards", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (admin_key, _) = b
        .create_key("cards", true, Some("ops"), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // The config file's prices to start with.
    for card in <[Value; 2]>::from(m1_cards(&http, &base, &admin_key).await) {
        let want = json!({"input": "1", "cached_input": "0.5", "output": "4"});
        assert_eq!(card["pricing"]["per_mtok_usd"], want, "{card}");
        assert_eq!(
            card["providers"][0]["pricing"]["per_mtok_usd"], want,
            "{card}"
        );
    }

    // The admin API reprices route `fake`: $2 in / $8 out network, 10% markup, $0.50 output fee.
    let r = http
        .post(format!("{base}/admin/v1/prices"))
        .bearer_auth(&admin_key)
        .json(
            &json!({"model": "m1", "provider": "fake", "input": "2", "output": "8",
                      "fee_output": "0.50", "markup_percent": "10"}),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);

    // Cards show what a request is charged now: 2 × 1.1; cached defaults to input; 8 × 1.1 + 0.5.
    for card in <[Value; 2]>::from(m1_cards(&http, &base, &admin_key).await) {
        let want = json!({"input": "2.2", "cached_input": "2.2", "output": "9.3"});
        assert_eq!(card["pricing"]["per_mtok_usd"], want, "{card}");
        assert_eq!(card["pricing"]["completion"], "0.0000093", "{card}");
        assert_eq!(
            card["providers"][0]["pricing"]["per_mtok_usd"], want,
            "{card}"
        );
    }

    // `cheapest` routing follows an admin price change too, and so does the charge.
    let key = funded_key(&b, "cheap", 1_000_000).await;
    let serve = |expect: &'static str, cost: i64| {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        // A `user` per call: conversation affinity would otherwise keep the route that served.
        let mut body = chat_body("ch", false, 20);
        body["user"] = json!(expect);
        async move {
            let r = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(header_of(&r, "x-tollgate-provider"), expect);
            let v: Value = r.json().await.unwrap_or_default();
            assert_eq!(v["usage"]["cost"].as_f64(), Some(cost as f64 / 1e6), "{v}");
        }
    };
    // 10 prompt tokens (4 cached: cached defaults to input here) + 20 output: 10 × $1 + 20 × $4.
    serve("fake", 90).await;
    let r = http
        .post(format!("{base}/admin/v1/prices"))
        .bearer_auth(&admin_key)
        .json(&json!({"model": "ch", "provider": "fake", "input": "3", "output": "12"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);
    // Route `fake` now costs more than `fake2` ($2 / $8): 10 × $2 + 20 × $8.
    serve("fake2", 180).await;
    drop(gw);
    b
}
both_backends!(model_cards_show_charged_prices, card_prices);
