//! The limiter through the real binary (in-process backend): 429s with their codes, `Retry-After`
//! and `x-ratelimit-*` headers, refusals that never reach the upstream, reservations corrected to
//! actual usage, concurrency released on client disconnect, and the admin usage endpoint.

mod limits_support;

use std::time::{Duration, Instant};

use limits_support::{chat, FakeUpstream, Stack, Tollgate};

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

/// One instance on a fresh SQLite store; account `acme` on `plan`, account `free` without a plan
/// and an admin. Returns (instance, acme's key, free's key, admin key, stack).
struct One {
    tg: Tollgate,
    key: String,
    free: String,
    admin: String,
    stack: Stack,
}

fn start(upstream: &FakeUpstream, plan: &str, extra: &str) -> One {
    let stack = Stack::sqlite(&upstream.base_url(), &plans(extra));
    let key = stack.account("acme", Some(plan));
    let free = stack.account("free", None);
    let admin = stack.admin();
    let tg = stack.start(&[]);
    One {
        tg,
        key,
        free,
        admin,
        stack,
    }
}

fn prefix(key: &str) -> &str {
    &key[..11]
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test]
async fn rpm_refusals_carry_code_headers_and_never_reach_upstream() {
    let up = FakeUpstream::start(0).await;
    let one = start(&up, "three_rpm", "");
    let tg = &one.tg;
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut statuses = Vec::new();
    for i in 0..5 {
        let (status, h, body) = chat(&c, &base, &one.key, false).await;
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
    // Requests per minute are per key: another key of the same account has its own 3.
    let other = one.stack.key("acme");
    for _ in 0..3 {
        assert_eq!(chat(&c, &base, &other, false).await.0, 200);
    }
    assert_eq!(chat(&c, &base, &other, false).await.0, 429);
    // A key without a plan is unlimited and gets no rate headers.
    for _ in 0..5 {
        let (status, h, _) = chat(&c, &base, &one.free, false).await;
        assert_eq!(status, 200);
        assert!(header(&h, "x-ratelimit-limit-requests").is_none());
    }
    let log = tg.log_text();
    assert!(!log.contains(&one.key), "clear key in the log");
}

#[tokio::test]
async fn daily_quota_code_and_reset_at_utc_midnight() {
    let up = FakeUpstream::start(0).await;
    let one = start(&up, "two_a_day", "");
    let tg = &one.tg;
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut ok = 0;
    for _ in 0..4 {
        let (status, h, body) = chat(&c, &base, &one.key, false).await;
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
    // The daily quota is the account's: a second key of the account is refused too.
    let other = one.stack.key("acme");
    let (status, _, body) = chat(&c, &base, &other, false).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "daily_quota_exceeded");
}

#[tokio::test]
async fn tokens_reserved_then_corrected_to_actual() {
    // Each request reserves 3 (prompt estimate) + 20 (max_tokens) = 23 tokens and uses 15
    // (the fake upstream's usage). Sequentially: admitted while 15*n + 23 <= 100, i.e. 6 requests.
    // Without the correction only 4 would pass (23*4 + 23 > 100).
    let up = FakeUpstream::start(0).await;
    let one = start(&up, "tpm", "");
    let tg = &one.tg;
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut ok = 0;
    let mut last = None;
    for _ in 0..8 {
        let (status, h, body) = chat(&c, &base, &one.key, false).await;
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
    let one = start(
        &up,
        "capped",
        "[[plans]]\nname = \"capped\"\nspend_cap_daily_usd = 0.0001\n",
    );
    let tg = &one.tg;
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (status, _, body) = chat(&c, &base, &one.key, false).await;
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
    let one = start(&up, "one_at_a_time", "");
    let tg = &one.tg;
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let held = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&one.key)
        .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .expect("stream");
    assert_eq!(held.status().as_u16(), 200);
    let (status, _, body) = chat(&c, &base, &one.key, false).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "concurrency_limit_exceeded");
    // The admin view shows the slot in use.
    let v: serde_json::Value = c
        .get(format!("{base}/admin/v1/keys/{}/limits", prefix(&one.key)))
        .bearer_auth(&one.admin)
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
        let (status, _, _) = chat(&c, &base, &one.key, false).await;
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
    let one = start(&up, "two_a_day", "");
    let tg = &one.tg;
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    chat(&c, &base, &one.key, false).await;
    let url = format!("{base}/admin/v1/keys/{}/limits", prefix(&one.key));
    let r = c.get(&url).bearer_auth(&one.key).send().await.expect("req");
    assert_eq!(r.status().as_u16(), 403);
    let r = c.get(&url).send().await.expect("req");
    assert_eq!(r.status().as_u16(), 401);
    let v: serde_json::Value = c
        .get(&url)
        .bearer_auth(&one.admin)
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
        .get(format!("{base}/admin/v1/keys/tg-nope0000/limits"))
        .bearer_auth(&one.admin)
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

async fn admin_call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    admin: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut r = c.request(method, url).bearer_auth(admin);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("admin request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Plan changes and overrides, made through the CLI and the admin API while the server runs, are
/// enforced from the very next request. With a key cache (lease admission), a change made by the
/// CLI (another process) arrives through the key epoch, which the server reads every 100 ms: the
/// test then waits `cli_settles` after each CLI change; admin API changes still apply at once.
async fn changes_apply_on_next_request(stack: Stack, up: &FakeUpstream, cli_settles: Duration) {
    let key = stack.account("acme", None);
    let admin = stack.admin();
    let tg = stack.start(&[]);
    let c = reqwest::Client::new();
    let base = format!("http://{}", tg.addr);
    let patch = reqwest::Method::PATCH;

    // No plan: unlimited, no rate headers.
    for _ in 0..4 {
        let (status, h, _) = chat(&c, &base, &key, false).await;
        assert_eq!(status, 200);
        assert!(header(&h, "x-ratelimit-limit-requests").is_none());
    }
    // The plan is changed by the CLI: 3 per minute from the next request on.
    assert!(stack
        .cli(&["accounts", "set-plan", "acme", "three_rpm"])
        .contains("plan=three_rpm"));
    tokio::time::sleep(cli_settles).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(chat(&c, &base, &key, false).await.0);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);

    // An unknown plan is refused; `null` removes the plan: unlimited again at once.
    let url = format!("{base}/admin/v1/accounts/acme");
    let (status, v) = admin_call(
        &c,
        patch.clone(),
        url.clone(),
        &admin,
        Some(serde_json::json!({"plan": "nope"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = admin_call(
        &c,
        patch.clone(),
        url.clone(),
        &admin,
        Some(serde_json::json!({"plan": null})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["plan"].is_null(), "{v}");
    let (status, h, _) = chat(&c, &base, &key, false).await;
    assert_eq!(status, 200);
    assert!(header(&h, "x-ratelimit-limit-requests").is_none());

    // The admin API assigns a daily plan: 2 more today, then a refusal SDKs must not retry now.
    let (status, v) = admin_call(
        &c,
        patch.clone(),
        url.clone(),
        &admin,
        Some(serde_json::json!({"plan": "two_a_day"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["plan"], "two_a_day");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, h, body) = chat(&c, &base, &key, false).await;
        statuses.push(status);
        if status == 429 {
            assert_eq!(body["error"]["code"], "daily_quota_exceeded", "{body}");
            assert_eq!(header(&h, "x-should-retry").as_deref(), Some("false"));
            assert!(header(&h, "retry-after").is_some());
        }
    }
    assert_eq!(statuses, vec![200, 200, 429]);

    // An account override (CLI) raises the daily quota to 3: one more, then refused.
    let out = stack.cli(&["accounts", "limits", "acme", "--requests-per-day", "3"]);
    assert!(out.contains("requests_per_day\t3"), "{out}");
    tokio::time::sleep(cli_settles).await;
    let (status, h, _) = chat(&c, &base, &key, false).await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&h, "x-ratelimit-limit-requests").as_deref(),
        Some("3")
    );
    assert_eq!(chat(&c, &base, &key, false).await.0, 429);

    // A key override that the request can never fit: 429 without Retry-After, not retryable.
    let key_url = format!("{base}/admin/v1/keys/{}/limits", prefix(&key));
    let (status, v) = admin_call(
        &c,
        patch.clone(),
        key_url.clone(),
        &admin,
        Some(serde_json::json!({"tokens_per_minute": 10})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["overrides"]["key"]["tokens_per_minute"], 10, "{v}");
    assert_eq!(v["effective"]["key"]["tokens_per_minute"], 10, "{v}");
    assert_eq!(v["effective"]["account"]["requests_per_day"], 3, "{v}");
    let (status, h, body) = chat(&c, &base, &key, false).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("Request too large"),
        "{body}"
    );
    assert_eq!(header(&h, "x-should-retry").as_deref(), Some("false"));
    assert!(header(&h, "retry-after").is_none());
    assert!(header(&h, "retry-after-ms").is_none());

    // Clear the key's overrides (DELETE) and raise the account's (PATCH): admitted again.
    let (status, v) = admin_call(&c, reqwest::Method::DELETE, key_url.clone(), &admin, None).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["overrides"]["key"]["tokens_per_minute"].is_null(), "{v}");
    let acct_url = format!("{base}/admin/v1/accounts/acme/limits");
    let (status, v) = admin_call(
        &c,
        patch.clone(),
        acct_url.clone(),
        &admin,
        Some(serde_json::json!({"requests_per_day": 10, "spend_cap_daily_usd": "5"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["overrides"]["requests_per_day"], 10, "{v}");
    assert_eq!(v["overrides"]["spend_cap_daily_usd"], 5.0, "{v}");
    let (status, h, _) = chat(&c, &base, &key, false).await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&h, "x-ratelimit-limit-requests").as_deref(),
        Some("10")
    );
    let (status, v) = admin_call(&c, reqwest::Method::GET, acct_url.clone(), &admin, None).await;
    assert_eq!(status, 200, "{v}");
    let rpd = v["limits"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["limit"] == "requests_per_day").cloned())
        .expect("requests_per_day usage");
    assert_eq!(rpd["used"], 4, "{v}");
    assert_eq!(rpd["max"], 10, "{v}");
    // Bad input is refused with 400; a customer key may not change limits.
    let (status, _) = admin_call(
        &c,
        patch.clone(),
        acct_url.clone(),
        &admin,
        Some(serde_json::json!({"requests_per_minute": 0})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = admin_call(
        &c,
        patch.clone(),
        acct_url.clone(),
        &key,
        Some(serde_json::json!({"requests_per_day": 100})),
    )
    .await;
    assert_eq!(status, 403);
    // The CLI clears the account's overrides: back to the plan's 2 a day (already used up).
    let out = stack.cli(&["accounts", "limits", "acme", "--clear"]);
    assert!(out.contains("requests_per_day\t-"), "{out}");
    tokio::time::sleep(cli_settles).await;
    let (status, _, body) = chat(&c, &base, &key, false).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "daily_quota_exceeded");
    // An unknown plan is refused by the CLI too.
    let out = std::process::Command::new(limits_support::BIN)
        .arg("--config")
        .arg(&stack.config)
        .args(["accounts", "set-plan", "acme", "nope"])
        .env("TOLLGATE_SECRET", limits_support::SECRET)
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(up.hits() > 0);
}

#[tokio::test]
async fn plan_and_override_changes_apply_on_next_request_sqlite() {
    let up = FakeUpstream::start(0).await;
    let stack = Stack::sqlite(&up.base_url(), &plans(""));
    changes_apply_on_next_request(stack, &up, Duration::ZERO).await;
}

/// The same with lease admission, whose key cache (600 s here) outlives the test.
#[tokio::test]
async fn plan_and_override_changes_apply_under_a_key_cache() {
    let up = FakeUpstream::start(0).await;
    let lease = "[billing]\nadmission = \"lease\"\nkey_cache_secs = 600\n";
    let stack = Stack::sqlite(&up.base_url(), &plans(lease));
    changes_apply_on_next_request(stack, &up, Duration::from_secs(1)).await;
}

/// The same on PostgreSQL (`TOLLGATE_TEST_PG_URL`, as `make test` sets it; SQLite without it).
#[tokio::test]
async fn plan_and_override_changes_apply_on_next_request_postgres() {
    let up = FakeUpstream::start(0).await;
    let stack = Stack::shared(&up.base_url(), &plans("")).await;
    changes_apply_on_next_request(stack, &up, Duration::ZERO).await;
}
