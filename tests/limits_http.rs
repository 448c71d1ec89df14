//! The limiter through the real binary (in-process backend): 429s with their codes, `Retry-After`
//! and `x-ratelimit-*` headers, refusals that never reach the upstream, reservations corrected to
//! actual usage, concurrency released on client disconnect, and the admin usage endpoint.

mod limits_support;

use std::time::{Duration, Instant};

use limits_support::{chat, config, FakeUpstream, Tollgate};
use tollgate::limits::key_id;

fn plans(extra: &str) -> String {
    format!(
        r#"
[[plans]]
name = "three_rpm"
requests_per_minute = 3
[[plans]]
name = "two_a_day"
requests_per_day = 2
[[plans]]
name = "one_at_a_time"
max_concurrent = 1
[[plans]]
name = "tpm"
tokens_per_minute = 100
{extra}
"#
    )
}

fn start(upstream: &FakeUpstream, key_plan: &str, extra: &str) -> Tollgate {
    let text = config(
        &upstream.base_url(),
        &format!(
            "{}\n[auth.static_key_plans]\n\"sk-pro\" = \"{key_plan}\"\n",
            plans(extra)
        ),
    );
    // `[auth.static_key_plans]` after `[[plans]]` is a valid TOML sub-table of [auth].
    Tollgate::start(&text, &[])
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test]
async fn rpm_refusals_carry_code_headers_and_never_reach_upstream() {
    let up = FakeUpstream::start(0).await;
    let tg = start(&up, "three_rpm", "");
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut statuses = Vec::new();
    for i in 0..5 {
        let (status, h, body) = chat(&c, &base, "sk-pro", false).await;
        statuses.push(status);
        assert_eq!(
            header(&h, "x-ratelimit-limit-requests").as_deref(),
            Some("3"),
            "request {i}: {h:?}"
        );
        assert!(header(&h, "x-ratelimit-remaining-requests").is_some());
        assert!(header(&h, "x-ratelimit-reset-requests").is_some());
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
            assert_eq!(body["error"]["type"], "rate_limit_error");
            let ms: u64 = header(&h, "retry-after-ms")
                .and_then(|v| v.parse().ok())
                .expect("retry-after-ms");
            // One emission interval is 20 s; the refusal waits at most that.
            assert!(ms > 0 && ms <= 20_000, "{ms}");
            let secs: u64 = header(&h, "retry-after")
                .and_then(|v| v.parse().ok())
                .expect("retry-after");
            assert_eq!(secs, ms.div_ceil(1000));
            assert_eq!(
                header(&h, "x-ratelimit-remaining-requests").as_deref(),
                Some("0")
            );
        }
    }
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    assert_eq!(up.hits(), 3, "refused requests must not reach the upstream");
    // A key without a plan is unlimited and gets no rate headers.
    for _ in 0..5 {
        let (status, h, _) = chat(&c, &base, "sk-free", false).await;
        assert_eq!(status, 200);
        assert!(header(&h, "x-ratelimit-limit-requests").is_none());
    }
    let log = tg.log_text();
    assert!(!log.contains("sk-pro"), "clear key in the log");
}

#[tokio::test]
async fn daily_quota_code_and_reset_at_utc_midnight() {
    let up = FakeUpstream::start(0).await;
    let tg = start(&up, "two_a_day", "");
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut ok = 0;
    for _ in 0..4 {
        let (status, h, body) = chat(&c, &base, "sk-pro", false).await;
        if status == 200 {
            ok += 1;
            continue;
        }
        assert_eq!(status, 429);
        assert_eq!(body["error"]["code"], "daily_quota_exceeded", "{body}");
        let ms: i64 = header(&h, "retry-after-ms")
            .and_then(|v| v.parse().ok())
            .expect("retry-after-ms");
        let now = chrono::Utc::now().timestamp_millis();
        let midnight = (now / 86_400_000 + 1) * 86_400_000;
        assert!(
            (now + ms - midnight).abs() < 5_000,
            "reset should be UTC midnight: now {now} + {ms} vs {midnight}"
        );
    }
    assert_eq!(ok, 2);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn tokens_reserved_then_corrected_to_actual() {
    // Each request reserves 3 (prompt estimate) + 20 (max_tokens) = 23 tokens and uses 15
    // (the fake upstream's usage). Sequentially: admitted while 15*n + 23 <= 100, i.e. 6 requests.
    // Without the correction only 4 would pass (23*4 + 23 > 100).
    let up = FakeUpstream::start(0).await;
    let tg = start(&up, "tpm", "");
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut ok = 0;
    let mut last = None;
    for _ in 0..8 {
        let (status, h, body) = chat(&c, &base, "sk-pro", false).await;
        assert_eq!(
            header(&h, "x-ratelimit-limit-tokens").as_deref(),
            Some("100")
        );
        if status == 200 {
            ok += 1;
        } else {
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            last = header(&h, "x-ratelimit-remaining-tokens");
        }
    }
    assert_eq!(ok, 6);
    let remaining: u64 = last.and_then(|v| v.parse().ok()).expect("remaining");
    assert!(remaining < 23, "{remaining}");
}

#[tokio::test]
async fn spend_cap_counts_actual_cost() {
    // Worst case 3*$1 + 20*$2 per Mtok = 43 micro-USD; actual 10*$1 + 5*$2 = 20 micro-USD.
    // Cap 100 micro-USD: admitted while 20*n + 43 <= 100, i.e. 3 requests.
    let up = FakeUpstream::start(0).await;
    let tg = start(
        &up,
        "capped",
        "[[plans]]\nname = \"capped\"\nspend_cap_daily_usd = 0.0001\n",
    );
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (status, _, body) = chat(&c, &base, "sk-pro", false).await;
        codes.push(if status == 200 {
            "ok".to_string()
        } else {
            body["error"]["code"].as_str().unwrap_or("?").to_string()
        });
    }
    assert_eq!(
        codes,
        vec!["ok", "ok", "ok", "spend_cap_exceeded", "spend_cap_exceeded"]
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn concurrency_slot_released_when_client_disconnects() {
    let up = FakeUpstream::start(400).await; // a 2-second stream
    let tg = start(&up, "one_at_a_time", "");
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let held = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-pro")
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .expect("stream");
    assert_eq!(held.status().as_u16(), 200);
    let (status, _, body) = chat(&c, &base, "sk-pro", false).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "concurrency_limit_exceeded");
    // The admin view shows the slot in use.
    let v: serde_json::Value = c
        .get(format!("{base}/admin/v1/keys/{}/limits", key_id("sk-pro")))
        .bearer_auth("sk-admin")
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    assert_eq!(v["plan"], "one_at_a_time", "{v}");
    assert_eq!(v["limits"][0]["limit"], "max_concurrent");
    assert_eq!(v["limits"][0]["used"], 1, "{v}");
    // Disconnect mid-stream: the slot comes back without waiting for the lease (15 min).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = chat(&c, &base, "sk-pro", false).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot not released after disconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn admin_limits_endpoint_needs_admin_and_reports_usage() {
    let up = FakeUpstream::start(0).await;
    let tg = start(&up, "two_a_day", "");
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    chat(&c, &base, "sk-pro", false).await;
    let url = format!("{base}/admin/v1/keys/{}/limits", key_id("sk-pro"));
    let r = c.get(&url).bearer_auth("sk-pro").send().await.expect("req");
    assert_eq!(r.status().as_u16(), 403);
    let r = c.get(&url).send().await.expect("req");
    assert_eq!(r.status().as_u16(), 401);
    let v: serde_json::Value = c
        .get(&url)
        .bearer_auth("sk-admin")
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(v["backend"], "memory");
    assert_eq!(v["limits"][0]["limit"], "requests_per_day");
    assert_eq!(v["limits"][0]["used"], 1);
    assert_eq!(v["limits"][0]["remaining"], 1);
    let r = c
        .get(format!("{base}/admin/v1/keys/key_nope/limits"))
        .bearer_auth("sk-admin")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status().as_u16(), 404);
    let ready: serde_json::Value = c
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["limits"]["backend"], "memory");
}
