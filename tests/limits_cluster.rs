//! Several tollgate processes sharing one Redis: limits hold across instances as if there were
//! one, and a Redis outage behaves as configured (`fail_open` with a per-instance cap, or
//! `fail_closed`), crashes nothing, and heals without a restart when Redis returns.
//!
//! Uses Debian's `redis-server` (started per test on a free loopback port); skipped when it is not
//! installed, unless `CI` is set. The instances also share one PostgreSQL database (accounts, keys,
//! ledger) when `TOLLGATE_TEST_PG_URL` is set, as under `make test`; otherwise one SQLite file.

mod limits_support;

use std::time::{Duration, Instant};

use futures::future::join_all;
use limits_support::{chat, redis_available, FakeUpstream, Redis, Stack, Tollgate};

const PLANS: &str = r#"
[[plans]]
name = "ten_rpm"
requests_per_minute = 10
[[plans]]
name = "hundred_a_day"
requests_per_day = 100
[[plans]]
name = "twelve_a_day"
requests_per_day = 12
"#;

/// Keys of the accounts every cluster test uses.
struct Cluster {
    nodes: Vec<Tollgate>,
    /// Account `pro` (10 requests/min per key).
    pro: String,
    /// Account `trial` (100 requests/day).
    trial: String,
    /// Account `free` (12 requests/day).
    free: String,
    /// Account `ops` (no plan, admin).
    admin: String,
    _stack: Stack,
}

async fn three(upstream: &FakeUpstream, redis: &Redis, limits: &str) -> Cluster {
    let stack = Stack::shared(&upstream.base_url(), &format!("{PLANS}\n{limits}")).await;
    let pro = stack.account("pro", Some("ten_rpm"));
    let trial = stack.account("trial", Some("hundred_a_day"));
    let free = stack.account("free", Some("twelve_a_day"));
    let admin = stack.admin();
    let nodes = (0..3)
        .map(|_| stack.start(&["--redis-url", &redis.url()]))
        .collect();
    Cluster {
        nodes,
        pro,
        trial,
        free,
        admin,
        _stack: stack,
    }
}

/// Sends `n` requests with `key`, round-robin over `nodes`, all at once; returns the statuses.
async fn burst(c: &reqwest::Client, nodes: &[Tollgate], key: &str, n: usize) -> Vec<u16> {
    let bases: Vec<String> = nodes.iter().map(|t| format!("http://{}", t.addr)).collect();
    let futs = (0..n).map(|i| {
        let base = bases[i % bases.len()].clone();
        let c = c.clone();
        let key = key.to_string();
        async move { chat(&c, &base, &key, false).await.0 }
    });
    join_all(futs).await
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

async fn ready(c: &reqwest::Client, t: &Tollgate) -> (u16, serde_json::Value) {
    let r = c
        .get(t.url("/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("readyz");
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_rpm_and_daily_quota() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = FakeUpstream::start(0).await;
    let cl = three(&up, &redis, "").await;
    let nodes = &cl.nodes;
    let c = reqwest::Client::new();

    // 10 requests/min, 60 requests spread over the three instances at once: exactly 10.
    let started = Instant::now();
    let statuses = burst(&c, nodes, &cl.pro, 60).await;
    let took = started.elapsed();
    assert_eq!(count(&statuses, 200), 10, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 50, "{statuses:?}");
    // GCRA frees the next slot one emission interval (6 s) after the first admission; the burst
    // must finish before that for "exactly 10" to be the right answer.
    assert!(took < Duration::from_secs(6), "burst took {took:?}");
    assert_eq!(up.hits(), 10);

    // 100 requests/day across the three: exactly 100 of 150 (in waves, as real clients come).
    let mut all = Vec::new();
    for _ in 0..3 {
        all.extend(burst(&c, nodes, &cl.trial, 50).await);
    }
    assert_eq!(count(&all, 200), 100, "{all:?}");
    assert_eq!(count(&all, 429), 50);
    assert_eq!(up.hits(), 110);

    // Each instance reports the same shared usage.
    for n in nodes {
        let v: serde_json::Value = c
            .get(n.url(&format!("/admin/v1/keys/{}/limits", &cl.trial[..11])))
            .bearer_auth(&cl.admin)
            .send()
            .await
            .expect("admin")
            .json()
            .await
            .expect("json");
        assert_eq!(v["backend"], "redis");
        assert_eq!(v["limits"][0]["used"], 100, "{v}");
    }
    // No clear key and no full hash in Redis key names.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan"])
        .output();
    if let Ok(out) = out {
        let keys = String::from_utf8_lossy(&out.stdout);
        assert!(!keys.contains("tg-"), "{keys}");
        assert!(keys.contains("tg:rl:a:"), "{keys}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fail_open_is_capped_per_instance_and_heals() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    let up = FakeUpstream::start(0).await;
    let mut cl = three(
        &up,
        &redis,
        "[limits]\non_redis_down = \"fail_open\"\nfail_open_local_cap = 3\n",
    )
    .await;
    let free = cl.free.clone();
    let nodes = &mut cl.nodes;
    let c = reqwest::Client::new();

    let s = burst(&c, nodes, &free, 6).await;
    assert_eq!(count(&s, 200), 6, "{s:?}");

    redis.kill();
    // Each instance admits at most its local cap (3/min per key) while Redis is down.
    for n in nodes.iter() {
        let s = burst(&c, std::slice::from_ref(n), &free, 10).await;
        assert_eq!(count(&s, 200), 3, "{s:?}");
        assert_eq!(count(&s, 429), 7, "{s:?}");
        let (status, v) = ready(&c, n).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["limits"]["state"], "down", "{v}");
        assert_eq!(v["limits"]["on_redis_down"], "fail_open");
    }
    for n in nodes.iter_mut() {
        assert!(n.alive(), "an instance died while Redis was down");
    }

    // Redis returns (empty: no persistence): limits are shared again, without a restart.
    redis.restart();
    wait_redis_ok(&c, nodes).await;
    let s = burst(&c, nodes, &free, 30).await;
    assert_eq!(count(&s, 200), 12, "{s:?}");
    for n in nodes.iter_mut() {
        assert!(n.alive());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fail_closed_refuses_then_heals() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    let up = FakeUpstream::start(0).await;
    let mut cl = three(&up, &redis, "[limits]\non_redis_down = \"fail_closed\"\n").await;
    let (free, admin) = (cl.free.clone(), cl.admin.clone());
    let nodes = &mut cl.nodes;
    let c = reqwest::Client::new();
    let s = burst(&c, nodes, &free, 3).await;
    assert_eq!(count(&s, 200), 3);

    redis.kill();
    let hits = up.hits();
    for n in nodes.iter() {
        let base = format!("http://{}", n.addr);
        let (status, h, body) = chat(&c, &base, &free, false).await;
        assert_eq!(status, 503, "{body}");
        assert!(h.get("retry-after").is_some());
        let (status, v) = ready(&c, n).await;
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["limits"]["state"], "down");
        assert_eq!(v["limits"]["on_redis_down"], "fail_closed");
        // Keys without a plan are not limited, so they do not depend on Redis.
        let (status, _, _) = chat(&c, &base, &admin, false).await;
        assert_eq!(status, 200);
    }
    assert_eq!(up.hits(), hits + 3, "refused requests reached the upstream");

    redis.restart();
    wait_redis_ok(&c, nodes).await;
    let s = burst(&c, nodes, &free, 20).await;
    assert_eq!(count(&s, 200), 12, "{s:?}");
    for n in nodes.iter_mut() {
        assert!(n.alive());
    }
}

async fn wait_redis_ok(c: &reqwest::Client, nodes: &[Tollgate]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in nodes {
        loop {
            let (status, v) = ready(c, n).await;
            if status == 200 && v["limits"]["state"] == "ok" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "instance did not reconnect to Redis: {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_daily_quota_resets_at_midnight_of_configured_zone() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = FakeUpstream::start(0).await;
    let c = reqwest::Client::new();
    for zone in ["Asia/Kolkata", "America/New_York", "+09:00"] {
        let stack = Stack::sqlite(
            &up.base_url(),
            &format!(
                "[[plans]]\nname = \"one\"\nrequests_per_day = 1\n[limits]\ntimezone = \"{zone}\"\n"
            ),
        );
        let key = stack.account("acme", Some("one"));
        let node = stack.start(&["--redis-url", &redis.url()]);
        let base = format!("http://{}", node.addr);
        // Each zone run starts from a clean slate in Redis.
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "FLUSHALL"])
            .output();
        assert_eq!(chat(&c, &base, &key, false).await.0, 200);
        let (status, h, body) = chat(&c, &base, &key, false).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"]["code"], "daily_quota_exceeded");
        let ms: i64 = h
            .get("retry-after-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("retry-after-ms");
        let now = chrono::Utc::now().timestamp_millis();
        let want = tollgate::limits::calendar::Zone::parse(zone)
            .expect("zone")
            .window(now)
            .day_reset_ms;
        assert!(
            (now + ms - want).abs() < 5_000,
            "{zone}: Redis says the day resets at {}, the zone says {want}",
            now + ms
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_concurrency_and_tpm() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    // A slow upstream (1 s) keeps every admitted request in flight while the burst arrives.
    let up = FakeUpstream::start(1_000).await;
    let stack = Stack::shared(
        &up.base_url(),
        r#"
[[plans]]
name = "two_inflight"
max_concurrent = 2
[[plans]]
name = "tpm100"
tokens_per_minute = 100
"#,
    )
    .await;
    let pro = stack.account("pro", Some("two_inflight"));
    let trial = stack.account("trial", Some("tpm100"));
    let admin = stack.admin();
    let nodes: Vec<Tollgate> = (0..3)
        .map(|_| stack.start(&["--redis-url", &redis.url()]))
        .collect();
    let c = reqwest::Client::new();

    let s = burst(&c, &nodes, &pro, 12).await;
    assert_eq!(count(&s, 200), 2, "{s:?}");
    assert_eq!(count(&s, 429), 10, "{s:?}");
    // Both finished: their slots are free again on every instance.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v: serde_json::Value = c
            .get(nodes[2].url(&format!("/admin/v1/keys/{}/limits", &pro[..11])))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("admin")
            .json()
            .await
            .expect("json");
        if v["limits"][0]["used"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "slots not released: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = burst(&c, &nodes, &pro, 6).await;
    assert_eq!(count(&s, 200), 2, "{s:?}");

    // Each request reserves 3 + 20 = 23 tokens: 4 fit in 100 (92), the 5th would make 115.
    let s = burst(&c, &nodes, &trial, 12).await;
    assert_eq!(count(&s, 200), 4, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn override_set_on_one_instance_applies_on_all_at_the_next_request() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start();
    let up = FakeUpstream::start(0).await;
    let cl = three(&up, &redis, "").await;
    let nodes = &cl.nodes;
    let c = reqwest::Client::new();
    let base = |i: usize| format!("http://{}", nodes[i].addr);
    // `free` may do 12 a day; 2 used through node 0.
    for _ in 0..2 {
        assert_eq!(chat(&c, &base(0), &cl.free, false).await.0, 200);
    }
    // Node 1 lowers the account's daily quota to 3; nodes 2 and 0 enforce it at once.
    let r = c
        .patch(nodes[1].url("/admin/v1/accounts/free/limits"))
        .bearer_auth(&cl.admin)
        .json(&serde_json::json!({"requests_per_day": 3}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(chat(&c, &base(2), &cl.free, false).await.0, 200);
    let (status, _, body) = chat(&c, &base(0), &cl.free, false).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "daily_quota_exceeded");
    // Node 2 moves the account to the 10-per-minute plan and drops the override: node 0 admits.
    let r = c
        .patch(nodes[2].url("/admin/v1/accounts/free"))
        .bearer_auth(&cl.admin)
        .json(&serde_json::json!({"plan": "ten_rpm", "limits": {"requests_per_day": null}}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status().as_u16(), 200);
    let (status, h, _) = chat(&c, &base(0), &cl.free, false).await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("x-ratelimit-limit-requests")
            .and_then(|v| v.to_str().ok()),
        Some("10")
    );
    // A key override on node 0 applies on node 1: one request per minute for this key.
    let r = c
        .patch(nodes[0].url(&format!("/admin/v1/keys/{}/limits", &cl.free[..11])))
        .bearer_auth(&cl.admin)
        .json(&serde_json::json!({"requests_per_minute": 1}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status().as_u16(), 200);
    let (status, _, body) = chat(&c, &base(1), &cl.free, false).await;
    assert_eq!(status, 429, "the bucket already holds one request: {body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_fail_open_keeps_daily_quota_from_last_shared_usage() {
    if !redis_available() {
        return;
    }
    let mut redis = Redis::start();
    let up = FakeUpstream::start(0).await;
    let mut cl = three(
        &up,
        &redis,
        "[limits]\non_redis_down = \"fail_open\"\nfail_open_local_cap = 100\n",
    )
    .await;
    let free = cl.free.clone();
    let nodes = &mut cl.nodes;
    let c = reqwest::Client::new();
    // 10 of the 12 a day, one at a time, round-robin: node 0 last saw 10 used, node 1 8, node 2 9.
    for i in 0..10 {
        let base = format!("http://{}", nodes[i % 3].addr);
        assert_eq!(chat(&c, &base, &free, false).await.0, 200);
    }
    redis.kill();
    // Each instance alone now admits what was left when it last saw the shared count.
    for (i, left) in [(0, 2), (1, 4), (2, 3)] {
        let s = burst(&c, std::slice::from_ref(&nodes[i]), &free, 6).await;
        assert_eq!(count(&s, 200), left, "node {i}: {s:?}");
        let base = format!("http://{}", nodes[i].addr);
        let (status, _, body) = chat(&c, &base, &free, false).await;
        assert_eq!(status, 429);
        assert_eq!(body["error"]["code"], "daily_quota_exceeded", "{body}");
    }
    for n in nodes.iter_mut() {
        assert!(n.alive());
    }
}
