//! Billing ledger tests, run against SQLite and PostgreSQL: admission under concurrency,
//! exactly-once settlement, expiry sweeping, idempotent top-ups, keys, caps, prices and usage.

mod billing_support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tollgate::billing::{
    compute_cost, Billing, BillingError, HoldParams, Principal, SettleInput, Usage,
};
use tollgate::store::leases::{GrantOutcome, LeaseFinal, LeaseGrant};
use tollgate::store::ledger::{FinalState, HoldInsert, HoldOutcome, SettleWrite};
use tollgate::store::{now_ms, PriceRow, UsageGroup, UsageQuery};

use billing_support::Db;

fn price(model: &str, input: i64, cached: i64, output: i64) -> PriceRow {
    PriceRow {
        id: None,
        model: model.to_string(),
        provider: String::new(),
        input_micros_per_m: input,
        cached_micros_per_m: cached,
        output_micros_per_m: output,
        fee_input_micros_per_m: 0,
        fee_cached_micros_per_m: 0,
        fee_output_micros_per_m: 0,
        markup_bps: 0,
        source: "test".to_string(),
        effective_at: 0,
        created_at: 0,
    }
}

/// Account `name` with `usd_micros` credit and a customer key; returns the principal.
async fn funded(b: &Billing, name: &str, micros: i64) -> (Principal, String) {
    b.create_account(name, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    if micros > 0 {
        b.add_credits(name, micros, "test funding", None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (raw, _) = b
        .create_key(name, false, None, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let p = b.authenticate(&raw).await.unwrap_or_else(|e| panic!("{e}"));
    (p, raw)
}

fn params(id: &str, model: &str, prompt: u64, max_out: u64) -> HoldParams {
    HoldParams {
        request_id: id.to_string(),
        model: model.to_string(),
        provider: None,
        fallback_providers: Vec::new(),
        prompt_tokens_estimate: prompt,
        max_output_tokens: max_out,
        streamed: false,
    }
}

fn ok_input(u: Usage) -> SettleInput {
    SettleInput {
        usage: u,
        delivered: true,
        estimated: false,
        status: "ok".into(),
        http_status: Some(200),
        ..Default::default()
    }
}

/// The cost formula written out independently of the library: exact pico-USD, rounded once.
fn expected_cost(u: &Usage, input: i64, cached: i64, output: i64) -> i64 {
    let c = u.cached_tokens.min(u.prompt_tokens) as i128;
    let pico = (u.prompt_tokens as i128 - c) * input as i128
        + c * cached as i128
        + u.completion_tokens as i128 * output as i128;
    ((pico + 500_000) / 1_000_000) as i64
}

// D-1: $1.00, 200 concurrent requests each holding up to $0.05 → at most 20 admitted, the
// balance never below zero, and charges = usage × price to the micro-dollar.
async fn concurrent_admission(db: &Db) -> Billing {
    let b = Arc::new(db.billing().await);
    // $0.50/1M input, $0.125/1M cached, $2.00/1M output; hold = 20k × 0.5 + 20k × 2 = $0.05
    b.set_price(&price("m1", 500_000, 125_000, 2_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, _) = funded(&b, "acme", 1_000_000).await;

    let stop = Arc::new(AtomicBool::new(false));
    let min_seen = Arc::new(AtomicI64::new(i64::MAX));
    let monitor = {
        let (b, stop, min_seen) = (b.clone(), stop.clone(), min_seen.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(a) = b.account("acme").await {
                    min_seen.fetch_min(a.balance_micros, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // Phase 1: 200 concurrent holds; admitted holds stay open until every attempt has finished.
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let (b, p) = (b.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("req-{i}");
            match b.hold(&p, &params(&id, "m1", 20_000, 20_000)).await {
                Ok(h) => Some((i, h)),
                Err(BillingError::InsufficientCredits { .. }) => None,
                Err(e) => panic!("hold {id}: {e}"),
            }
        }));
    }
    let mut holds = Vec::new();
    for t in tasks {
        if let Some(h) = t.await.unwrap_or_else(|e| panic!("{e}")) {
            holds.push(h);
        }
    }
    assert!(holds.len() <= 20, "admitted {} > 20", holds.len());
    assert_eq!(holds.len(), 20, "every hold that fits is admitted");
    // Phase 2: settle all concurrently with "upstream-reported" usage within the hold bounds.
    let mut tasks = Vec::new();
    for (i, hold) in holds {
        assert_eq!(hold.amount, 50_000);
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let u = Usage {
                prompt_tokens: 1_000 + i * 97 % 19_000,
                cached_tokens: i * 31 % 1_000,
                completion_tokens: 1 + i * 7_919 % 20_000,
                reasoning_tokens: i % 50,
            };
            let s = b
                .settle(&hold, &ok_input(u))
                .await
                .unwrap_or_else(|e| panic!("settle {i}: {e}"));
            (u, s.charged)
        }));
    }
    let mut charged_sum = 0i64;
    let mut expected_sum = 0i64;
    for t in tasks {
        let (u, charged) = t.await.unwrap_or_else(|e| panic!("{e}"));
        charged_sum += charged;
        expected_sum += expected_cost(&u, 500_000, 125_000, 2_000_000);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = monitor.await;
    assert!(
        min_seen.load(Ordering::Relaxed) >= 0,
        "balance went below zero"
    );
    assert_eq!(charged_sum, expected_sum, "charges != usage × price");
    let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.balance_micros, 1_000_000 - charged_sum);
    assert_eq!(a.held_micros, 0);
    Arc::try_unwrap(b).unwrap_or_else(|_| panic!("billing still shared"))
}
all_admissions!(d1_concurrent_admission, concurrent_admission);

// Each request id settles exactly once, whatever races or retries.
async fn exactly_once(db: &Db) -> Billing {
    let b = Arc::new(db.billing().await);
    b.set_price(&price("m", 1_000_000, 1_000_000, 1_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, _) = funded(&b, "acme", 10_000_000).await;
    let hold = b
        .hold(&p, &params("dup", "m", 100, 100))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hold.amount, 200);

    // a second hold with the same id is refused by the database
    match b.hold(&p, &params("dup", "m", 100, 100)).await {
        Err(BillingError::DuplicateRequest(_)) => {}
        other => panic!("expected DuplicateRequest, got {other:?}"),
    }

    // 16 concurrent settlements (and releases) of the same hold: exactly one applies
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (b, hold) = (b.clone(), hold.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                b.settle(
                    &hold,
                    &ok_input(Usage {
                        prompt_tokens: 50,
                        completion_tokens: 70,
                        ..Default::default()
                    }),
                )
                .await
            } else {
                b.release(&hold, "retry").await
            }
        }));
    }
    let mut fresh = 0;
    let mut states = Vec::new();
    for t in tasks {
        let s = t
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        if !s.replayed {
            fresh += 1;
        }
        states.push((s.state, s.charged));
    }
    assert_eq!(fresh, 1, "exactly one settlement applies");
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "all callers see the same outcome: {states:?}"
    );
    let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.balance_micros, 10_000_000 - states[0].1);
    assert_eq!(a.held_micros, 0);
    Arc::try_unwrap(b).unwrap_or_else(|_| panic!("billing still shared"))
}
all_admissions!(exactly_once_settlement, exactly_once);

// Charging rules: nothing delivered → 0; usage beyond the hold → capped; estimated flag kept.
async fn charging_rules(db: &Db) -> Billing {
    let b = db.billing().await;
    b.set_price(&price("m", 1_000_000, 500_000, 4_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, _) = funded(&b, "acme", 1_000_000).await;

    let h = b
        .hold(&p, &params("fail", "m", 1_000, 1_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let s = b
        .settle(
            &h,
            &SettleInput {
                delivered: false,
                usage: Usage {
                    prompt_tokens: 1_000,
                    completion_tokens: 10,
                    ..Default::default()
                },
                status: "upstream_error".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((s.state, s.charged), (FinalState::Released, 0));

    let h = b
        .hold(&p, &params("big", "m", 10, 10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let s = b
        .settle(
            &h,
            &ok_input(Usage {
                prompt_tokens: 1_000,
                completion_tokens: 1_000,
                ..Default::default()
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.state, FinalState::Settled);
    assert_eq!(s.charged, h.amount, "capture never exceeds the hold");
    assert!(s.cost.total > h.amount);

    let h = b
        .hold(&p, &params("est", "m", 100, 100))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let s = b
        .settle(
            &h,
            &SettleInput {
                usage: Usage {
                    prompt_tokens: 100,
                    cached_tokens: 40,
                    completion_tokens: 30,
                    reasoning_tokens: 10,
                },
                delivered: true,
                estimated: true,
                provider: Some("fake".into()),
                upstream_model: Some("fake-model".into()),
                status: "client_disconnected".into(),
                http_status: Some(200),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // 60 × 1 + 40 × 0.5 + 30 × 4 = 200 micros
    assert_eq!(s.charged, 200);
    let r = b
        .request_record("est")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.estimated && r.delivered);
    assert_eq!(r.state, "settled");
    assert_eq!(
        (
            r.prompt_tokens,
            r.cached_tokens,
            r.completion_tokens,
            r.reasoning_tokens
        ),
        (100, 40, 30, 10)
    );
    assert_eq!(
        (
            r.input_cost_micros,
            r.cached_cost_micros,
            r.output_cost_micros
        ),
        (60, 20, 120)
    );
    assert_eq!(r.provider.as_deref(), Some("fake"));
    assert_eq!(r.upstream_model.as_deref(), Some("fake-model"));
    assert_eq!(r.status.as_deref(), Some("client_disconnected"));
    assert!(r.latency_ms.is_some());
    b
}
all_admissions!(charging_rules_apply, charging_rules);

// A crash leaves holds open; the sweeper releases them after expiry, idempotently.
async fn sweeper(db: &Db) -> Billing {
    let mut settings = db.settings();
    // generous TTL: the "nothing expired yet" check must not race a slow, loaded machine
    settings.hold_ttl = Duration::from_millis(2_000);
    let b = db.billing_with(settings).await;
    b.set_price(&price("m", 1_000_000, 1_000_000, 1_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, _) = funded(&b, "acme", 1_000_000).await;
    let mut holds = Vec::new();
    for i in 0..5 {
        holds.push(
            b.hold(&p, &params(&format!("h{i}"), "m", 1_000, 1_000))
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    assert_eq!(
        b.sweep_expired().await.unwrap_or_else(|e| panic!("{e}")),
        0,
        "nothing expired yet"
    );
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let rep = b
        .check_ledger(Some(now_ms()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rep.expired_open_holds, 5, "the checker sees stale holds");
    // two sweepers at once (e.g. two replicas) → each hold expires once
    let (a, c) = tokio::join!(b.sweep_expired(), b.sweep_expired());
    let n = a.unwrap_or_else(|e| panic!("{e}")) + c.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 5);
    assert_eq!(b.sweep_expired().await.unwrap_or_else(|e| panic!("{e}")), 0);
    // a late settlement after expiry is a replay, not a second final state
    let s = b
        .settle(
            &holds[0],
            &ok_input(Usage {
                prompt_tokens: 1,
                ..Default::default()
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(s.replayed);
    assert_eq!((s.state, s.charged), (FinalState::Expired, 0));
    let acct = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((acct.balance_micros, acct.held_micros), (1_000_000, 0));
    billing_support::assert_ledger_ok_no_stale_holds(&b).await;
    b
}
both_backends!(sweeper_releases_expired_holds, sweeper);

// Top-ups with an Idempotency-Key apply once; a mismatched reuse is a conflict.
async fn topups(db: &Db) -> Billing {
    let b = Arc::new(db.billing().await);
    b.create_account("acme", Some("pro"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.add_credits("acme", 2_500_000, "invoice 42", Some("inv-42"))
                .await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        let r = t
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        if !r.replayed {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(
        b.account("acme")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .balance_micros,
        2_500_000
    );
    match b
        .add_credits("acme", 3_000_000, "invoice 42", Some("inv-42"))
        .await
    {
        Err(BillingError::Conflict(_)) => {}
        other => panic!("expected Conflict, got {other:?}"),
    }
    // adjustments down, never below zero
    b.add_credits("acme", -500_000, "refund", Some("adj-1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match b.add_credits("acme", -5_000_000, "too much", None).await {
        Err(BillingError::InsufficientCredits { .. }) => {}
        other => panic!("expected InsufficientCredits, got {other:?}"),
    }
    let r = b
        .add_credits("acme", -500_000, "refund", Some("adj-1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.replayed);
    assert_eq!(
        b.account("acme")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .balance_micros,
        2_000_000
    );
    assert!(matches!(
        b.add_credits("nobody", 1, "x", None).await,
        Err(BillingError::NotFound(_))
    ));
    assert!(matches!(
        b.add_credits("acme", 0, "x", None).await,
        Err(BillingError::Invalid(_))
    ));
    assert!(matches!(
        b.create_account("acme", None).await,
        Err(BillingError::Conflict(_))
    ));
    Arc::try_unwrap(b).unwrap_or_else(|_| panic!("billing still shared"))
}
both_backends!(idempotent_topups, topups);

// Keys: shown once, stored as digests, revocation takes effect on the next request, caps hold.
async fn keys(db: &Db) -> Billing {
    let b = db.billing().await;
    b.set_price(&price("m", 0, 0, 1_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, raw) = funded(&b, "acme", 1_000_000).await;
    assert!(!p.is_admin);
    assert!(raw.starts_with(&p.key_prefix));
    let keys = b
        .list_keys(Some("acme"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0].last_used_at.is_some(),
        "authenticate records last_used_at"
    );
    // wrong keys of every shape fail the same way
    for bad in [
        "",
        "tg-",
        "sk-123",
        "tg-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "tg-x' OR '1'='1",
    ] {
        assert!(
            matches!(b.authenticate(bad).await, Err(BillingError::Unauthorized)),
            "{bad}"
        );
    }
    let long = format!("tg-{}", "a".repeat(10_000));
    assert!(matches!(
        b.authenticate(&long).await,
        Err(BillingError::Unauthorized)
    ));
    // Each change to what a key carries moves the key epoch (what caching instances watch).
    let epoch = || async {
        b.store()
            .key_epoch()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let before = epoch().await;
    b.revoke_key(&p.key_prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        epoch().await,
        before + 1,
        "a revocation moves the key epoch"
    );
    assert!(matches!(
        b.authenticate(&raw).await,
        Err(BillingError::Revoked)
    ));
    assert!(matches!(
        b.revoke_key(&p.key_prefix).await,
        Err(BillingError::NotFound(_))
    ));

    // spend cap: $0.001 cap, holds of 500 micros each
    let (raw2, _) = b
        .create_key("acme", true, Some("capped"), Some(1_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let p2 = b
        .authenticate(&raw2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(p2.is_admin);
    let h1 = b
        .hold(&p2, &params("c1", "m", 0, 500))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let h2 = b
        .hold(&p2, &params("c2", "m", 0, 500))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        b.hold(&p2, &params("c3", "m", 0, 500)).await,
        Err(BillingError::KeySpendCapReached)
    ));
    b.settle(
        &h1,
        &ok_input(Usage {
            completion_tokens: 100,
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    b.release(&h2, "x").await.unwrap_or_else(|e| panic!("{e}"));
    let k = b
        .key(&p2.key_prefix)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k.spent_micros, 100);
    // 100 spent + 500 + 500 > 1000, 100 + 500 fits
    b.hold(&p2, &params("c4", "m", 0, 500))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        b.hold(&p2, &params("c5", "m", 0, 500)).await,
        Err(BillingError::KeySpendCapReached)
    ));
    let before = epoch().await;
    b.set_key_cap(&p2.key_prefix, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        epoch().await,
        before + 1,
        "a cap change moves the key epoch"
    );

    // the raw keys appear nowhere in the database
    assert_no_secret_in_db(db, &b, &[&raw, &raw2]).await;
    b
}
all_admissions!(keys_auth_revoke_caps, keys);

async fn assert_no_secret_in_db(db: &Db, b: &Billing, raws: &[&str]) {
    if let Some(path) = db.sqlite_file() {
        // checkpoint so the WAL content is in the main file too, then grep every file
        let _ = sqlx::query("PRAGMA wal_checkpoint(FULL)")
            .execute(b.store().pool())
            .await;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            if let Ok(bytes) = std::fs::read(&p) {
                for raw in raws {
                    let body = &raw[3..];
                    assert!(
                        !bytes.windows(body.len()).any(|w| w == body.as_bytes()),
                        "raw key found in {p:?}"
                    );
                }
            }
        }
    } else {
        use sqlx::Row;
        let tables = [
            "accounts",
            "api_keys",
            "requests",
            "ledger_transactions",
            "ledger_entries",
            "prices",
        ];
        for t in tables {
            let sql = format!("SELECT CAST(row_to_json(x) AS TEXT) FROM {t} x");
            let rows = sqlx::query(&sql)
                .fetch_all(b.store().pool())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            for r in rows {
                let text: String = r.try_get(0).unwrap_or_default();
                for raw in raws {
                    assert!(!text.contains(&raw[3..]), "raw key found in table {t}");
                }
            }
        }
    }
}

// Price versions with effective times; history lists every change.
async fn prices(db: &Db) -> Billing {
    let b = db.billing().await;
    let now = now_ms();
    let mut old = price("kimi", 1_000_000, 1_000_000, 1_000_000);
    old.effective_at = now - 60_000;
    let mut cur = price("kimi", 2_000_000, 2_000_000, 2_000_000);
    cur.effective_at = now - 1_000;
    let mut future = price("kimi", 9_000_000, 9_000_000, 9_000_000);
    future.effective_at = now + 3_600_000;
    let mut routed = price("kimi", 3_000_000, 3_000_000, 3_000_000);
    routed.provider = "moonshot".into();
    routed.effective_at = now - 1_000;
    for p in [&future, &old, &cur, &routed] {
        b.set_price(p).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let got = b
        .price_for("kimi", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no price"));
    assert_eq!(got.input_micros_per_m, 2_000_000);
    let got = b
        .price_for("kimi", Some("moonshot"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no price"));
    assert_eq!(got.input_micros_per_m, 3_000_000);
    let got = b
        .price_for("kimi", Some("other"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no price"));
    assert_eq!(got.input_micros_per_m, 2_000_000);
    assert!(b
        .price_for("unknown", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none());
    let hist = b
        .price_history("kimi")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(hist.len(), 4);
    assert!(hist
        .windows(2)
        .all(|w| w[0].effective_at <= w[1].effective_at));

    // unpriced models are refused, never free by accident
    let (p, _) = funded(&b, "acme", 1_000_000).await;
    assert!(matches!(
        b.hold(&p, &params("u", "unknown", 1, 1)).await,
        Err(BillingError::NoPrice(_))
    ));

    // config prices: written once, rewritten only when the config changes
    use tollgate::billing::PriceSpec;
    let spec = PriceSpec {
        input: "0.60".into(),
        output: "2.50".into(),
        ..Default::default()
    };
    let entries = vec![("cfg".to_string(), String::new(), spec.clone())];
    assert_eq!(
        b.sync_config_prices(&entries)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
    assert_eq!(
        b.sync_config_prices(&entries)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        0
    );
    let changed = vec![(
        "cfg".to_string(),
        String::new(),
        PriceSpec {
            output: "3".into(),
            ..spec
        },
    )];
    assert_eq!(
        b.sync_config_prices(&changed)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
    assert_eq!(
        b.price_history("cfg")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len(),
        2
    );
    b
}
both_backends!(price_versions, prices);

// Usage by day, model and key.
async fn usage(db: &Db) -> Billing {
    let b = db.billing().await;
    b.set_price(&price("a", 1_000_000, 1_000_000, 1_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.set_price(&price("b", 2_000_000, 2_000_000, 2_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, _) = funded(&b, "acme", 1_000_000).await;
    let (raw2, _) = b
        .create_key("acme", false, None, None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let p2 = b
        .authenticate(&raw2)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (other, _) = funded(&b, "other", 1_000_000).await;
    for (i, (who, model)) in [(&p, "a"), (&p, "b"), (&p2, "a"), (&other, "a")]
        .iter()
        .enumerate()
    {
        let h = b
            .hold(who, &params(&format!("u{i}"), model, 10, 10))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        b.settle(
            &h,
            &ok_input(Usage {
                prompt_tokens: 10,
                completion_tokens: 10,
                ..Default::default()
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let q = |group| UsageQuery {
        account_id: Some(p.account_id.clone()),
        from_ms: 0,
        to_ms: now_ms() + 1_000,
        group,
    };
    let by_model = b
        .usage(&q(UsageGroup::Model))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_model.len(), 2);
    assert_eq!(
        (
            by_model[0].group.as_str(),
            by_model[0].requests,
            by_model[0].cost_micros
        ),
        ("a", 2, 40)
    );
    assert_eq!(
        (
            by_model[1].group.as_str(),
            by_model[1].requests,
            by_model[1].cost_micros
        ),
        ("b", 1, 40)
    );
    let by_key = b
        .usage(&q(UsageGroup::Key))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_key.len(), 2);
    assert_eq!(by_key.iter().map(|x| x.cost_micros).sum::<i64>(), 80);
    let by_day = b
        .usage(&q(UsageGroup::Day))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(by_day.len(), 1);
    assert_eq!(by_day[0].group, (now_ms() / 86_400_000).to_string());
    assert_eq!(by_day[0].prompt_tokens, 30);
    let all = b
        .usage(&UsageQuery {
            account_id: None,
            from_ms: 0,
            to_ms: now_ms() + 1_000,
            group: UsageGroup::Model,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(all[0].requests, 3);
    let none = b
        .usage(&UsageQuery {
            account_id: None,
            from_ms: 0,
            to_ms: 1_000,
            group: UsageGroup::Model,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(none.is_empty());
    b
}
all_admissions!(usage_grouping, usage);

// The ledger tables refuse UPDATE and DELETE.
async fn append_only(db: &Db) -> Billing {
    let b = db.billing().await;
    funded(&b, "acme", 1_000).await;
    for sql in [
        "UPDATE ledger_entries SET amount_micros = 0",
        "DELETE FROM ledger_entries",
        "UPDATE ledger_transactions SET amount_micros = 0",
        "DELETE FROM ledger_transactions",
    ] {
        assert!(
            sqlx::query(sql).execute(b.store().pool()).await.is_err(),
            "{sql} must fail"
        );
    }
    b
}
both_backends!(ledger_is_append_only, append_only);

fn hold_insert(id: &str, p: &Principal, micros: i64, expires_at: i64) -> HoldInsert {
    HoldInsert {
        request_id: id.to_string(),
        account_id: p.account_id.clone(),
        key_id: Some(p.key_id.clone()),
        key_capped: p.spend_cap_micros.is_some(),
        model: "m".to_string(),
        provider: None,
        price_id: None,
        hold_micros: micros,
        expires_at,
    }
}

// Group commit: holds decided together in one transaction are admitted one after the other in
// order; a hold refused for balance, for a key's cap, or as a duplicate id does not fail the others.
async fn batch_admission(db: &Db) -> Billing {
    let b = db.billing().await;
    let (p, _) = funded(&b, "acme", 100).await;
    let (_, capped_raw) = funded(&b, "capco", 1_000).await;
    let capped = b
        .key(&tollgate::billing::keys::visible_prefix(&capped_raw).unwrap_or_default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.set_key_cap(&capped.prefix, Some(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let q = b
        .authenticate(&capped_raw)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(q.spend_cap_micros, Some(30));
    // an id already held before the batch: the batch transaction fails on it and every operation
    // is re-run alone; the outcomes must be the same as if it had not been there
    let exp = now_ms() + 600_000;
    assert_eq!(
        b.store()
            .place_hold(&hold_insert("old", &p, 0, exp))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        HoldOutcome::Held
    );
    for with_old in [false, true] {
        let tag = if with_old { "b" } else { "a" };
        let mut batch = vec![
            hold_insert(&format!("{tag}1"), &p, 60, exp),
            hold_insert(&format!("{tag}2"), &p, 50, exp), // 40 left: refused
            hold_insert(&format!("{tag}1"), &p, 0, exp),  // same id again in the batch
            hold_insert(&format!("{tag}3"), &q, 20, exp), // capped key: fits (20 ≤ 30)
            hold_insert(&format!("{tag}4"), &q, 20, exp), // 40 > 30: refused by the cap
            hold_insert(&format!("{tag}5"), &p, 40, exp), // exactly what is left
            hold_insert(&format!("{tag}6"), &p, 1, exp),  // nothing left
            hold_insert(&format!("{tag}7"), &q, 10, exp), // cap exactly reached
        ];
        if with_old {
            batch.insert(3, hold_insert("old", &p, 0, exp));
        }
        let mut got: Vec<HoldOutcome> = b
            .store()
            .place_holds(batch)
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        if with_old {
            assert_eq!(got.remove(3), HoldOutcome::DuplicateRequest);
        }
        assert_eq!(
            got,
            vec![
                HoldOutcome::Held,
                HoldOutcome::InsufficientCredits {
                    available_micros: 40
                },
                HoldOutcome::DuplicateRequest,
                HoldOutcome::Held,
                HoldOutcome::KeySpendCapReached,
                HoldOutcome::Held,
                HoldOutcome::InsufficientCredits {
                    available_micros: 0
                },
                HoldOutcome::Held,
            ],
            "batch {tag}"
        );
        let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.balance_micros, a.held_micros), (0, 100));
        // settle the round in one batch: capture some, release some, one already final
        let w = |c: i64| SettleWrite {
            captured_micros: c,
            network_cost_micros: c,
            delivered: c > 0,
            status: Some("ok".into()),
            ..Default::default()
        };
        let fin = b
            .store()
            .finalize_many(vec![
                (format!("{tag}1"), FinalState::Settled, w(55)),
                (format!("{tag}5"), FinalState::Released, w(0)),
                (format!("{tag}1"), FinalState::Released, w(0)), // twice in one batch
                (format!("{tag}3"), FinalState::Settled, w(21)), // above its 20 hold
                (format!("{tag}7"), FinalState::Settled, w(10)),
                ("nope".to_string(), FinalState::Released, w(0)),
            ])
            .await;
        assert!(fin[0].as_ref().is_ok_and(|r| r.is_some()), "{tag}1 settled");
        assert!(
            fin[1].as_ref().is_ok_and(|r| r.is_some()),
            "{tag}5 released"
        );
        assert!(
            fin[2].as_ref().is_ok_and(|r| r.is_none()),
            "{tag}1 only once"
        );
        assert!(fin[3].is_err(), "a capture above the hold is refused");
        assert!(fin[4].as_ref().is_ok_and(|r| r.is_some()), "{tag}7 settled");
        assert!(fin[5].as_ref().is_ok_and(|r| r.is_none()), "unknown id");
        let r = b
            .store()
            .finalize(&format!("{tag}3"), FinalState::Settled, &w(20), None)
            .await;
        assert!(
            r.is_ok_and(|r| r.is_some()),
            "{tag}3 settles within its hold"
        );
        let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((a.balance_micros, a.held_micros), (45, 0));
        let k = b
            .key(&capped.prefix)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let c = b.account("capco").await.unwrap_or_else(|e| panic!("{e}"));
        let spent_before = if with_old { 30 } else { 0 };
        assert_eq!(k.spent_micros, spent_before + 30);
        assert_eq!(c.held_micros, 0);
        // top the account up again for the second round (and lift the key's cap)
        b.add_credits("acme", 55, "refill", None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        b.set_key_cap(&capped.prefix, Some(60))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    b
}
both_backends!(batch_admission_is_per_hold, batch_admission);

// A crash after a batch of holds committed and before anything settled: the holds are durable,
// and the expiry path releases them after a restart, once.
async fn batch_crash_recovery(db: &Db) -> Billing {
    let b = db.billing().await;
    let (p, _) = funded(&b, "acme", 1_000).await;
    let expired = now_ms() - 1;
    let got = b
        .store()
        .place_holds(
            (0..10)
                .map(|i| hold_insert(&format!("c{i}"), &p, 50, expired))
                .collect(),
        )
        .await;
    assert!(got.iter().all(|r| matches!(r, Ok(HoldOutcome::Held))));
    // "kill -9": the process goes away without settling anything
    b.store().close().await;
    drop(b);
    let b = db.billing().await;
    let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (a.balance_micros, a.held_micros),
        (500, 500),
        "holds are durable"
    );
    let (x, y) = tokio::join!(b.sweep_expired(), b.sweep_expired());
    assert_eq!(
        x.unwrap_or_else(|e| panic!("{e}")) + y.unwrap_or_else(|e| panic!("{e}")),
        10
    );
    let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((a.balance_micros, a.held_micros), (1_000, 0));
    billing_support::assert_ledger_ok_no_stale_holds(&b).await;
    b
}
both_backends!(batch_crash_is_recovered_by_expiry, batch_crash_recovery);

/// A lease of `micros` on `p`'s account, granted directly in the store (owner `test`).
async fn test_lease(b: &Billing, p: &Principal, micros: i64) -> String {
    let got = b
        .store()
        .grant_lease(&LeaseGrant {
            lease_id: None,
            account_id: p.account_id.clone(),
            key_id: None,
            key_capped: false,
            owner: "test".to_string(),
            want_micros: micros,
            min_micros: micros,
            expires_at: now_ms() + 60_000,
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let GrantOutcome::Granted {
        lease_id,
        micros: got,
    } = got
    else {
        panic!("no lease: {got:?}")
    };
    assert_eq!(got, micros);
    lease_id
}

/// A settled request row under `lease_id` charging `cost`.
fn leased_final(lease_id: &str, p: &Principal, id: &str, cost: i64) -> LeaseFinal {
    LeaseFinal {
        id: id.to_string(),
        lease_id: lease_id.to_string(),
        account_id: p.account_id.clone(),
        key_id: Some(p.key_id.clone()),
        model: "m".to_string(),
        provider: None,
        upstream_model: None,
        price_id: None,
        state: "settled".to_string(),
        hold_micros: 10_000,
        hold_expires_at: now_ms() + 60_000,
        status: Some("ok".to_string()),
        http_status: Some(200),
        prompt_tokens: 1,
        cached_tokens: 0,
        completion_tokens: 1,
        reasoning_tokens: 0,
        cost_micros: cost,
        computed_cost_micros: cost,
        input_cost_micros: 0,
        cached_cost_micros: 0,
        output_cost_micros: cost,
        network_cost_micros: cost,
        estimated: false,
        delivered: true,
        latency_ms: Some(1),
        created_at: now_ms(),
        finished_at: now_ms(),
    }
}

// A journal replay hands the database rows it may already have: each request row is written and
// charged once, whatever overlap a batch has with what was written before.
async fn lease_replay(db: &Db) -> Billing {
    let b = db.billing().await;
    let (p, _) = funded(&b, "acme", 1_000_000).await;
    let lease_id = test_lease(&b, &p, 500_000).await;
    let row = |id: &str, cost: i64| leased_final(&lease_id, &p, id, cost);
    let ids: Vec<String> = (0..40).map(|i| format!("lr-{i:02}")).collect();
    let apply = |range: std::ops::Range<usize>, maybe_written: bool| {
        let rows: Vec<Arc<LeaseFinal>> =
            ids[range].iter().map(|id| Arc::new(row(id, 100))).collect();
        let store = b.store().clone();
        async move {
            store
                .apply_lease_finals(rows, maybe_written)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    assert_eq!(apply(0..10, false).await, 10);
    // Replays overlapping what was written on both sides.
    assert_eq!(apply(5..25, true).await, 15);
    assert_eq!(apply(0..25, true).await, 0);
    assert_eq!(apply(20..40, true).await, 15);
    // Text that a binary or bulk format might read specially (tab, newline, backslash, `\N`)
    // comes back as written, and a missing value stays missing.
    let odd = "m\t\\N \\ \"q\" {a,b}\r\né";
    let mut weird = row("lr-odd", 0);
    weird.model = odd.to_string();
    weird.provider = Some("\\N".to_string());
    weird.upstream_model = Some(String::new());
    weird.status = None;
    assert_eq!(
        b.store()
            .apply_lease_finals(vec![Arc::new(weird)], false)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
    let back = b
        .store()
        .request_by_id("lr-odd")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("lr-odd not written"));
    assert_eq!(back.model, odd);
    assert_eq!(back.provider.as_deref(), Some("\\N"));
    assert_eq!(back.upstream_model.as_deref(), Some(""));
    assert_eq!(back.status, None);
    assert_eq!(back.http_status, Some(200));
    let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        a.balance_micros,
        1_000_000 - 40 * 100,
        "each row charged once"
    );
    let released = b
        .store()
        .release_lease(&lease_id, None, true, "release", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(released, Some(500_000 - 40 * 100));
    b
}
both_backends!(lease_replay_charges_each_row_once, lease_replay);

// Leased requests' records, packed by the second of their ids, are found by id and listed by
// account and time; an id of another form (a negative bucket) too.
async fn packed_records(db: &Db) -> Billing {
    let b = db.billing().await;
    let (p, _) = funded(&b, "acme", 1_000_000).await;
    let (q, _) = funded(&b, "other", 1_000_000).await;
    let (lp, lq) = (
        test_lease(&b, &p, 100_000).await,
        test_lease(&b, &q, 100_000).await,
    );
    let t0 = now_ms() - 10_000;
    // Ids of three seconds (as the gateway makes them: UUIDv7 of the arrival time), created a
    // little after their id's time, and one id of another form.
    let id_at = |ms: i64| {
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            (ms / 1000) as u64,
            ((ms % 1000) * 1_000_000) as u32,
        );
        format!("req_{}", uuid::Uuid::new_v7(ts).simple())
    };
    let mut rows = Vec::new();
    for i in 0..30i64 {
        let at = t0 + i * 100;
        let (lease, who) = if i % 3 == 0 { (&lq, &q) } else { (&lp, &p) };
        let mut f = leased_final(lease, who, &id_at(at), 10);
        f.created_at = at + 5;
        rows.push(Arc::new(f));
    }
    let mut odd = leased_final(&lp, &p, "imported-1", 10);
    odd.created_at = t0 + 1_500;
    rows.push(Arc::new(odd));
    let store = b.store().clone();
    assert_eq!(
        store
            .apply_lease_finals(rows.clone(), false)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        31
    );
    for f in &rows {
        let got = b
            .request_record(&f.id)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", f.id));
        assert_eq!(
            serde_json::to_value(&got).ok(),
            serde_json::to_value(LeaseFinal::clone(f).into_row()).ok(),
            "{} as written",
            f.id
        );
    }
    assert!(
        b.request_record(&id_at(t0 + 50)).await.is_err(),
        "not written"
    );
    let ids = |acct: Option<&str>, from: i64, to: i64| {
        let b = &b;
        let acct = acct.map(str::to_string);
        async move {
            b.request_records(acct.as_deref(), from, to, usize::MAX)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    let want = |pred: &dyn Fn(&LeaseFinal) -> bool| {
        let mut w: Vec<&LeaseFinal> = rows.iter().map(|f| &**f).filter(|f| pred(f)).collect();
        w.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        w.into_iter().map(|f| f.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(None, 0, now_ms()).await, want(&|_| true));
    assert_eq!(
        ids(Some(&p.account_id), 0, now_ms()).await,
        want(&|f| f.account_id == p.account_id)
    );
    let (from, to) = (t0 + 1_005, t0 + 2_105);
    assert_eq!(
        ids(Some(&q.account_id), from, to).await,
        want(&|f| f.account_id == q.account_id && (from..to).contains(&f.created_at))
    );
    assert_eq!(
        ids(None, from, to).await.len(),
        12,
        "a window across seconds"
    );
    b
}
both_backends!(packed_records_are_found_and_listed, packed_records);

// Batches of finals, top-ups and renewals of the same lease at once, from separate connections:
// every one succeeds. They lock the account, then the lease (`LOCK_ACCOUNTS_PG`); a batch that
// locked the lease first met a top-up holding the account, and PostgreSQL aborted one of them
// as a deadlock (seen as a refused request under load).
async fn lease_lock_order(db: &Db) -> Billing {
    let b = Arc::new(db.billing().await);
    let (p, _) = funded(&b, "acme", 10_000_000).await;
    let lease_id = test_lease(&b, &p, 1_000_000).await;
    const N: usize = 150;
    let batches = {
        let (b, p, lease_id) = (b.clone(), p.clone(), lease_id.clone());
        tokio::spawn(async move {
            for i in 0..N {
                let rows = vec![
                    Arc::new(leased_final(&lease_id, &p, &format!("lo-{i}-a"), 10)),
                    Arc::new(leased_final(&lease_id, &p, &format!("lo-{i}-b"), 10)),
                ];
                b.store()
                    .apply_lease_finals(rows, false)
                    .await
                    .unwrap_or_else(|e| panic!("batch {i}: {e}"));
            }
        })
    };
    let top_ups = {
        let (b, p, lease_id) = (b.clone(), p.clone(), lease_id.clone());
        tokio::spawn(async move {
            for i in 0..N {
                let got = b
                    .store()
                    .grant_lease(&LeaseGrant {
                        lease_id: Some(lease_id.clone()),
                        account_id: p.account_id.clone(),
                        key_id: None,
                        key_capped: false,
                        owner: "test".to_string(),
                        want_micros: 1_000,
                        min_micros: 1_000,
                        expires_at: now_ms() + 60_000,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("top-up {i}: {e}"));
                assert!(
                    matches!(got, GrantOutcome::Granted { micros: 1_000, .. }),
                    "{got:?}"
                );
            }
        })
    };
    let renewals = {
        let (b, lease_id) = (b.clone(), lease_id.clone());
        tokio::spawn(async move {
            for i in 0..N / 3 {
                let open = b
                    .store()
                    .renew_leases(std::slice::from_ref(&lease_id), now_ms() + 60_000)
                    .await
                    .unwrap_or_else(|e| panic!("renewal {i}: {e}"));
                assert!(open.contains(&lease_id));
            }
        })
    };
    for t in [batches, top_ups, renewals] {
        t.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let released = b
        .store()
        .release_lease(&lease_id, None, true, "release", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let granted = 1_000_000 + N as i64 * 1_000;
    let charged = N as i64 * 2 * 10;
    assert_eq!(released, Some(granted - charged));
    let a = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((a.balance_micros, a.held_micros), (10_000_000 - charged, 0));
    Arc::try_unwrap(b).unwrap_or_else(|_| panic!("billing still shared"))
}
both_backends!(lease_batches_top_ups_and_renewals_at_once, lease_lock_order);

#[test]
fn library_cost_matches_independent_formula() {
    let p = price("m", 500_000, 125_000, 2_000_000);
    for i in 0..2_000u64 {
        let u = Usage {
            prompt_tokens: i * 13,
            cached_tokens: i * 5 % 700,
            completion_tokens: i * 29 % 3_001,
            reasoning_tokens: 0,
        };
        assert_eq!(
            compute_cost(&p, &u).total,
            expected_cost(&u, 500_000, 125_000, 2_000_000)
        );
    }
}

// Lease admission, a crash with requests in flight: a streamed request (its client has seen its
// id) is journaled when admitted and recorded `expired`, uncharged, at the next start; one to be
// answered in one piece (its client learns the id only from the answer) is journaled only when it
// ends, so one cut short leaves no trace; a finished one is charged once.
async fn crash_in_flight(db: &Db) -> Billing {
    let b = db.billing().await;
    b.set_price(&price("m", 1_000_000, 1_000_000, 1_000_000))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (p, _) = funded(&b, "acme", 1_000_000).await;
    let streamed = HoldParams {
        streamed: true,
        ..params("streamed", "m", 100, 100)
    };
    let hold = |params: HoldParams| {
        let (b, p) = (&b, &p);
        async move { b.hold(p, &params).await.unwrap_or_else(|e| panic!("{e}")) }
    };
    let _cut_stream = hold(streamed).await;
    let _cut_whole = hold(params("whole", "m", 100, 100)).await;
    let done = hold(params("done", "m", 100, 100)).await;
    let u = Usage {
        prompt_tokens: 10,
        completion_tokens: 5,
        ..Default::default()
    };
    let s = b
        .settle(&done, &ok_input(u))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.charged, 15);
    // The crash: nothing is flushed; the background tasks let go of the journal when they wake.
    drop(b);
    db.journal_released().await;

    let b = db.billing().await;
    let r = b
        .request_record("streamed")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.state.as_str(), r.cost_micros), ("expired", 0));
    match b.request_record("whole").await {
        Err(BillingError::NotFound(_)) => {}
        other => panic!("expected no record of the cut whole answer, got {other:?}"),
    }
    let r = b
        .request_record("done")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.state.as_str(), r.cost_micros), ("settled", 15));
    // the previous run's lease was given back at the start: nothing stays held
    let acct = b.account("acme").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((acct.balance_micros, acct.held_micros), (1_000_000 - 15, 0));
    b
}

lease_admission!(lease_crash_with_requests_in_flight, crash_in_flight);
