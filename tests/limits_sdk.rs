//! Runs tests/contract/limits/test_sdk_retry.py: the official `openai` Python SDK, with default
//! retries, recovers from a tollgate 429 using only `retry-after-ms` / `Retry-After`, and does not
//! retry a request that can never fit (`x-should-retry: false`).
//! Needs the venv made by scripts/contract-deps.sh (`.venv/` with `openai` and `pytest`), or a
//! Python named by `TOLLGATE_TEST_PYTHON`; skipped without one unless `CI` is set.

mod limits_support;

use std::path::PathBuf;
use std::process::Command;

use limits_support::{FakeUpstream, Stack};

fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("TOLLGATE_TEST_PYTHON").map(PathBuf::from),
        Some(root.join(".venv/bin/python")),
    ];
    for p in candidates.into_iter().flatten() {
        let ok = Command::new(&p)
            .args(["-c", "import openai, pytest"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(p);
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("no Python with openai+pytest: run scripts/contract-deps.sh (make deps-test)");
    }
    eprintln!("SKIPPED: no .venv with openai+pytest (run scripts/contract-deps.sh)");
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_sdk_default_retries_recover_from_429() {
    let Some(py) = python() else { return };
    let up = FakeUpstream::start(0).await;
    let stack = Stack::sqlite(
        &up.base_url(),
        "[[plans]]\nname = \"twelve\"\nrequests_per_minute = 12\n[[plans]]\nname = \"small\"\ntokens_per_minute = 40\n",
    );
    let key = stack.account("acme", Some("twelve"));
    let small = stack.account("tiny", Some("small"));
    let tg = stack.start(&[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/contract/limits");
    let base = format!("http://{}", tg.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(&script)
            .env("TOLLGATE_BASE_URL", base)
            .env("TOLLGATE_KEY", key)
            .env("TOLLGATE_SMALL_KEY", small)
            .output()
    })
    .await
    .expect("join")
    .expect("run pytest");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{text}");
    assert!(text.contains("2 passed"), "{text}");
    // 12 in the burst + 1 after the retry; the refused attempts (and the request too large for
    // its key's tokens per minute) never reached the upstream.
    assert_eq!(up.hits(), 13);
}
