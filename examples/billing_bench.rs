//! Benchmark: requests/s through tollgate with billing on versus off (non-streamed, fake upstream).
//!
//! Usage: `billing_bench --bin PATH [--db URL] [--secs N] [--concurrency N]` (see bench/billing.sh).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tollgate::billing::keys::ServerSecret;
use tollgate::billing::{Billing, BillingSettings};
use tollgate::store::Store;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

async fn upstream(Json(body): Json<Value>) -> Json<Value> {
    Json(json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    }))
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

struct Gw(Child);
impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn run_mode(
    bin: &str,
    up: SocketAddr,
    db: Option<&str>,
    secs: u64,
    conc: usize,
) -> Result<f64, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let auth = match db {
        Some(url) => format!("[auth]\nrequired = true\n[database]\nurl = \"{url}\"\n"),
        None => "[auth]\nrequired = false\n".to_string(),
    };
    let cfg = format!(
        "{auth}[server]\nmetrics = false\n[[providers]]\nname = \"fake\"\ndialect = \"openai\"\nbase_url = \"http://{up}/v1\"\n\
         [[models]]\nid = \"m\"\nmax_output_tokens = 100\n  [[models.routes]]\n  provider = \"fake\"\n  upstream_model = \"m\"\n  \
         price_per_mtok = {{ input = 1.0, output = 2.0 }}\n"
    );
    let cfg_path = dir.path().join("t.toml");
    std::fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
    let mut key = String::new();
    if let Some(url) = db {
        let store = Store::connect(url).await.map_err(|e| e.to_string())?;
        let b = Billing::with_store(
            store,
            ServerSecret::from_bytes(SECRET.as_bytes().to_vec()),
            BillingSettings::default(),
        );
        let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
        b.create_account(&name, None)
            .await
            .map_err(|e| e.to_string())?;
        b.add_credits(&name, 1_000_000_000_000, "bench", None)
            .await
            .map_err(|e| e.to_string())?;
        key = b
            .create_key(&name, false, None, None)
            .await
            .map_err(|e| e.to_string())?
            .0;
        b.store().close().await;
    }
    let _gw = Gw(Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("TOLLGATE_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?);
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conc)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]});
    // wait until it answers
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.post(&url).bearer_auth(&key).json(&body).send().await;
        if matches!(&r, Ok(r) if r.status().is_success()) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "gateway did not answer: {:?}",
                r.map(|r| r.status())
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, url, key, body) = (client.clone(), url.clone(), key.clone(), body.clone());
        let (ok, errors, measuring, stop) =
            (ok.clone(), errors.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client.post(&url).bearer_auth(&key).json(&body).send().await;
                let good = match r {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let errs = errors.load(Ordering::Relaxed);
    if errs > 0 {
        eprintln!("  {errs} failed requests");
    }
    Ok(ok.load(Ordering::Relaxed) as f64 / elapsed)
}

#[tokio::main]
async fn main() {
    let bin = arg("--bin").unwrap_or_else(|| "target/release/tollgate".to_string());
    let secs: u64 = arg("--secs").and_then(|s| s.parse().ok()).unwrap_or(10);
    let conc: usize = arg("--concurrency")
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let db = arg("--db");
    let l = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind: {e}");
            std::process::exit(1);
        }
    };
    let up = l
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    tokio::spawn(async move {
        let _ = axum::serve(
            l,
            Router::new().route("/v1/chat/completions", post(upstream)),
        )
        .await;
    });
    let dbs: Vec<String> = match db {
        Some(d) => vec![d],
        None => vec![],
    };
    let off = match run_mode(&bin, up, None, secs, conc).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("billing off: {e}");
            std::process::exit(1);
        }
    };
    println!("billing off                : {off:8.0} req/s (concurrency {conc}, {secs} s)");
    for d in dbs {
        match run_mode(&bin, up, Some(&d), secs, conc).await {
            Ok(on) => println!(
                "billing on  ({:<14}): {on:8.0} req/s  → overhead {:.1}%",
                d.split(':').next().unwrap_or("?"),
                (1.0 - on / off) * 100.0
            ),
            Err(e) => eprintln!("billing on ({d}): {e}"),
        }
    }
}
