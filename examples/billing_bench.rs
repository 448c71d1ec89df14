//! Benchmark: requests/s through tollgate with billing on versus off (non-streamed, fake upstream).
//!
//! Usage: `billing_bench --bin PATH [--sqlite URL] [--pg URL] [--lease-sqlite URL] [--lease-pg URL]
//! [--secs N] [--rounds N] [--concurrency N] [--delay-ms N]` (see bench/billing.sh). The
//! `--lease-*` gateways bill with `[billing] admission = "lease"`. One gateway process per mode (billing off, billing on
//! over SQLite, billing on over PostgreSQL) runs from the same binary for the whole run; the modes
//! are measured in turn, round after round, so slow drift of the shared machine hits them alike.
//! Each mode's figure is the median of its rounds; the cost of billing is `1 - on / off`. Beside
//! it, the CPU each billed request took (performance.md §6.3, "Resources"): the gateway process's
//! and, for the PostgreSQL modes, that of every `postgres` process, from `/proc` (`utime + stime`).
//! `--delay-ms` makes the fake upstream wait before it answers (default 0: answers at once).
//! `--burn-ns N,N,…` (bench/calibrate.sh, a binary built with the `calibration` feature) adds one
//! billing-off gateway per value that spins that many nanoseconds per request, beside the plain
//! billing-off one: what a known amount of added work costs here.

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

/// How long the fake upstream waits before answering, in milliseconds (`--delay-ms`).
static DELAY_MS: AtomicU64 = AtomicU64::new(0);

async fn upstream(Json(body): Json<Value>) -> Json<Value> {
    let delay = DELAY_MS.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
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

struct Gw {
    child: Child,
    pid: u32,
    _dir: tempfile::TempDir,
    label: String,
    url: String,
    key: String,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts one gateway: billing off (`db` None, open mode) or on over `db`, with a funded key;
/// `burn_ns` > 0 makes it spin that long per request (a `calibration` build).
async fn start(
    bin: &str,
    up: SocketAddr,
    label: &str,
    (db, lease, burn_ns): (Option<&str>, bool, u64),
    client: &reqwest::Client,
) -> Result<Gw, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let auth = match db {
        Some(url) if lease => format!(
            "[auth]\nrequired = true\n[database]\nurl = \"{url}\"\n[billing]\nadmission = \"lease\"\njournal_dir = \"{}\"\n",
            dir.path().join("journal").display()
        ),
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
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("TOLLGATE_SECRET", SECRET)
        .env("TOLLGATE_CALIBRATION_BURN_NS", burn_ns.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let gw = Gw {
        pid: child.id(),
        child,
        _dir: dir,
        label: label.to_string(),
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        key,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .post(&gw.url)
            .bearer_auth(&gw.key)
            .json(&body())
            .send()
            .await;
        if matches!(&r, Ok(r) if r.status().is_success()) {
            return Ok(gw);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{label}: gateway did not answer: {:?}",
                r.map(|r| r.status())
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn body() -> Value {
    json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]})
}

/// CPU seconds (user + system) used so far by process `pid`; 0 if it cannot be read. `/proc`
/// counts in USER_HZ ticks, 100 per second on Linux.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// CPU seconds used so far by every process named `postgres`.
fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_secs)
        .sum()
}

/// One slot's result.
struct Slot {
    rps: f64,
    failed: u64,
    /// CPU per successful request, µs: the gateway's, and PostgreSQL's.
    gw_us: f64,
    pg_us: f64,
}

/// Closed-loop load on one gateway: `conc` clients, 1 s warm-up, then `secs` measured.
async fn measure(client: &reqwest::Client, gw: &Gw, secs: f64, conc: usize) -> Slot {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, url, key) = (client.clone(), gw.url.clone(), gw.key.clone());
        let (ok, errors, measuring, stop) =
            (ok.clone(), errors.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let body = body();
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
    let (gw0, pg0) = (cpu_secs(gw.pid), postgres_cpu_secs());
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let (gw1, pg1) = (cpu_secs(gw.pid), postgres_cpu_secs());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let n = ok.load(Ordering::Relaxed).max(1) as f64;
    Slot {
        rps: ok.load(Ordering::Relaxed) as f64 / elapsed,
        failed: errors.load(Ordering::Relaxed),
        gw_us: (gw1 - gw0) * 1e6 / n,
        pg_us: (pg1 - pg0) * 1e6 / n,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

#[tokio::main]
async fn main() {
    let bin = arg("--bin").unwrap_or_else(|| "target/release/tollgate".to_string());
    let secs: f64 = arg("--secs").and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let rounds: usize = arg("--rounds").and_then(|s| s.parse().ok()).unwrap_or(3);
    let conc: usize = arg("--concurrency")
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let delay_ms: u64 = arg("--delay-ms").and_then(|s| s.parse().ok()).unwrap_or(0);
    DELAY_MS.store(delay_ms, Ordering::Relaxed);
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
    let client = match reqwest::Client::builder()
        .pool_max_idle_per_host(conc)
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("client: {e}");
            std::process::exit(1);
        }
    };
    let mut modes: Vec<(String, Option<String>, bool, u64)> =
        vec![("off".to_string(), None, false, 0)];
    for (flag, label, lease) in [
        ("--sqlite", "SQLite", false),
        ("--pg", "PostgreSQL", false),
        ("--lease-sqlite", "SQLite, lease admission", true),
        ("--lease-pg", "PostgreSQL, lease admission", true),
    ] {
        if let Some(u) = arg(flag) {
            modes.push((label.to_string(), Some(u), lease, 0));
        }
    }
    for ns in arg("--burn-ns")
        .iter()
        .flat_map(|l| l.split(','))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .filter(|&n| n > 0)
    {
        let label = format!("off + {:.1} µs spin", ns as f64 / 1000.0);
        modes.push((label, None, false, ns));
    }
    let mut gws = Vec::new();
    for (label, db, lease, burn) in &modes {
        match start(&bin, up, label, (db.as_deref(), *lease, *burn), &client).await {
            Ok(g) => gws.push(g),
            Err(e) => {
                eprintln!("{e}");
                drop(gws); // stops the gateways already started (exit would orphan them)
                std::process::exit(1);
            }
        }
    }
    let mut slots: Vec<Vec<Slot>> = gws.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        for (i, gw) in gws.iter().enumerate() {
            let s = measure(&client, gw, secs, conc).await;
            line.push_str(&format!("  {} {:.0}", gw.label, s.rps));
            slots[i].push(s);
        }
        println!("{line}");
    }
    let of = |i: usize, f: fn(&Slot) -> f64| -> Vec<f64> { slots[i].iter().map(f).collect() };
    let off = median(&of(0, |s| s.rps));
    println!();
    println!("| mode | req/s (median of {rounds} × {secs} s, concurrency {conc}, upstream delay {delay_ms} ms) | rounds | failed | cost (vs billing off) | cost, median of rounds' pairs | CPU µs/request: gateway (+ PostgreSQL) |");
    println!("|---|---|---|---|---|---|---|");
    let off_rounds = of(0, |s| s.rps);
    for (i, gw) in gws.iter().enumerate() {
        let rps = of(i, |s| s.rps);
        let m = median(&rps);
        let rounds: Vec<String> = rps.iter().map(|r| format!("{r:.0}")).collect();
        let failed: u64 = slots[i].iter().map(|s| s.failed).sum();
        let (cost, paired) = if i == 0 {
            ("—".to_string(), "—".to_string())
        } else {
            // Each round's slot against the billing-off slot of the same round (seconds apart),
            // so that the machine's speed drifting between rounds cancels out.
            let pairs: Vec<f64> = rps
                .iter()
                .zip(&off_rounds)
                .map(|(on, off)| (1.0 - on / off) * 100.0)
                .collect();
            (
                format!("{:.1}%", (1.0 - m / off) * 100.0),
                format!("{:.1}%", median(&pairs)),
            )
        };
        let (gw_us, pg_us) = (median(&of(i, |s| s.gw_us)), median(&of(i, |s| s.pg_us)));
        let cpu = if gw.label.starts_with("PostgreSQL") {
            format!("{gw_us:.1} + {pg_us:.1}")
        } else {
            format!("{gw_us:.1}")
        };
        println!(
            "| billing {} | {m:.0} | {} | {} | {cost} | {paired} | {cpu} |",
            if gw.label.starts_with("off") {
                gw.label.clone()
            } else {
                format!("on ({})", gw.label)
            },
            rounds.join(" / "),
            failed
        );
    }
}
