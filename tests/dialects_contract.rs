//! Contract tests for issue 5: the real `anthropic` Python SDK (messages, streaming, tool use,
//! thinking) and the real `openai` SDK's `responses.create` / `responses.stream`, run with pytest
//! against the real binary in front of the Moonshot-emulating fake upstream.
//!
//! Needs the project venv with the SDKs (`scripts/contract-deps.sh`, run by `make deps-test`).

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use support::fake_upstream::{Behavior, FakeUpstream, Scenario, Transcript};
use support::tollgate::{Config, Model, Provider, Route};

/// The venv's python with the SDKs, or `None` (skipped locally, a failure when `CI` is set —
/// the same convention as tests/contract.rs).
fn python() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = Command::new(&p)
        .args(["-c", "import anthropic, openai, pytest"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(p);
    }
    let msg = format!(
        "contract test dependency missing: {} with anthropic, openai and pytest; run scripts/contract-deps.sh",
        p.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn expect() -> serde_json::Value {
    let plain = Transcript::plain();
    let tool = Transcript::tool_turn();
    let after = Transcript::after_tool();
    json!({
        "model": "kimi-k2.6",
        "plain": {"content": plain.content_text(), "reasoning": plain.reasoning_text(),
                  "usage": {"prompt_tokens": plain.usage.prompt_tokens,
                            "completion_tokens": plain.usage.completion_tokens,
                            "cached_tokens": plain.usage.cached_tokens}},
        "tool_turn": {"reasoning": tool.reasoning_text(),
                      "tool_calls": tool.tool_calls.iter().map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments()})).collect::<Vec<_>>()},
        "after_tool": {"content": after.content_text()},
    })
}

async fn run_pytest(script: &str) {
    let Some(py) = python() else { return };
    let up = FakeUpstream::start(Scenario::new(Behavior::moonshot())).await;
    let tg = Config::new()
        .provider(Provider::new("moonshot", "moonshot", &up.base_url()))
        .model(
            Model::new("kimi-k2.6")
                .set("reasoning_efforts", "false")
                .route(Route::new("moonshot", "kimi-k2.6")),
        )
        .static_keys(&["sk-contract"])
        .start()
        .await;
    let root = env!("CARGO_MANIFEST_DIR");
    let base = tg.base_url();
    let expect = expect().to_string();
    let script = format!("{root}/tests/contract/{script}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", &script])
            .env("TOLLGATE_BASE_URL", base)
            .env("TOLLGATE_API_KEY", "sk-contract")
            .env("TOLLGATE_CONTRACT_EXPECT", expect)
            .current_dir(format!("{root}/tests/contract"))
            .output()
    })
    .await
    .expect("join")
    .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pytest failed:\n{stdout}\n{stderr}\n--- tollgate logs ---\n{}",
        tg.logs()
    );
    assert!(
        stdout.contains(" passed") && !stdout.contains(" failed") && !stdout.contains(" skipped"),
        "pytest ran no test or skipped some:\n{stdout}"
    );
}

#[tokio::test]
async fn anthropic_python_sdk() {
    run_pytest("test_anthropic_sdk.py").await;
}

#[tokio::test]
async fn openai_python_sdk_responses() {
    run_pytest("test_responses_sdk.py").await;
}
