//! Contract tests: drives the real `openai` Python SDK (pytest) and the real `openai` npm package
//! (`node --test`) against the real binary in front of the fake upstream. Install the SDKs with
//! `scripts/contract-deps.sh`; without them the tests skip locally but fail when `CI` is set.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use support::fake_upstream::{Behavior, FakeUpstream, Scenario, Transcript};
use support::tollgate::{Config, Model, Provider, Route, Tollgate};

const MAX_BODY_BYTES: u64 = 65_536;
const API_KEY: &str = "sk-test";
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn transcript_json(t: &Transcript) -> Value {
    json!({
        "reasoning": t.reasoning_text(),
        "content": t.content_text(),
        "tool_calls": t.tool_calls.iter()
            .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments()}))
            .collect::<Vec<_>>(),
        "usage": {"prompt_tokens": t.usage.prompt_tokens,
                  "completion_tokens": t.usage.completion_tokens,
                  "cached_tokens": t.usage.cached_tokens},
    })
}

/// Fake upstream + tollgate configured for every contract case; the JSON handed to the suites.
async fn stack() -> (FakeUpstream, Tollgate, Value) {
    let up = FakeUpstream::start(
        Scenario::new(Behavior::moonshot())
            .model("fake-ctx-overflow", Behavior::context_length_exceeded())
            .model("fake-429", Behavior::rate_limited(1))
            .model("fake-500", Behavior::server_error())
            .model("fake-slow", Behavior::moonshot().never_answer())
            .model(
                "fake-or-midstream",
                Behavior::openrouter().mid_stream_error_after(3),
            ),
    )
    .await;
    let cfg = Config::new()
        .server("max_body_bytes", &MAX_BODY_BYTES.to_string())
        .static_keys(&[API_KEY])
        .provider(Provider::new("moonshot", "moonshot", &up.base_url()))
        .provider(
            Provider::new("moonshot-slow", "moonshot", &up.base_url())
                .set("first_byte_timeout_ms", "1000"),
        )
        .provider(Provider::new("openrouter", "openrouter", &up.base_url()))
        .model(
            Model::new("kimi-k2.6")
                .alias("kimi-k2-6")
                .route(Route::new("moonshot", "kimi-k2.6")),
        )
        .model(Model::new("ctx-overflow").route(Route::new("moonshot", "fake-ctx-overflow")))
        .model(Model::new("rate-limited").route(Route::new("moonshot", "fake-429")))
        .model(Model::new("upstream-500").route(Route::new("moonshot", "fake-500")))
        // A non-streamed answer may take as long as its request deadline allows (1 s here);
        // streams give up on the provider's first-byte timeout.
        .model(
            Model::new("upstream-slow")
                .route(Route::new("moonshot-slow", "fake-slow"))
                .set("routing", "{ complete_deadline_ms = 1000 }"),
        )
        .model(Model::new("or-midstream").route(Route::new("openrouter", "fake-or-midstream")));
    let tg = cfg.start().await;
    let expect = json!({
        "model": "kimi-k2.6",
        "max_body_bytes": MAX_BODY_BYTES,
        "plain": transcript_json(&Transcript::plain()),
        "tool_turn": transcript_json(&Transcript::tool_turn()),
        "after_tool": transcript_json(&Transcript::after_tool()),
        "models": {
            "upstream_400": "ctx-overflow",
            "upstream_429": "rate-limited",
            "upstream_500": "upstream-500",
            "upstream_slow": "upstream-slow",
            "midstream_error": "or-midstream",
        },
        "upstream_400_message": "exceeded model token limit",
    });
    (up, tg, expect)
}

/// Missing deps: fail under CI, skip (loudly) otherwise.
fn missing(what: &str) {
    let msg = format!("contract test dependency missing: {what}; run scripts/contract-deps.sh");
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED: {msg}");
}

async fn run_suite(
    program: &Path,
    args: &[&str],
    cwd: &Path,
    tg: &Tollgate,
    expect: &Value,
) -> String {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .env("TOLLGATE_BASE_URL", tg.base_url())
        .env("TOLLGATE_API_KEY", API_KEY)
        .env("TOLLGATE_CONTRACT_EXPECT", expect.to_string())
        .env("NO_COLOR", "1")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SUITE_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{} timed out after {SUITE_TIMEOUT:?}", program.display()))
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "{} {args:?} failed with {}:\n{text}\n--- tollgate logs ---\n{}",
        program.display(),
        out.status,
        tg.logs()
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk() {
    let python = root().join(".venv/bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", "import openai, pytest"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        return missing(&format!("{} with openai and pytest", python.display()));
    }
    let (_up, tg, expect) = stack().await;
    let dir = root().join("tests/contract");
    let out = run_suite(
        &python,
        &[
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_openai_sdk.py",
        ],
        &dir,
        &tg,
        &expect,
    )
    .await;
    assert!(
        out.contains(" passed") && !out.contains(" failed") && !out.contains(" skipped"),
        "pytest ran no test or skipped some:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_node_sdk() {
    let dir = root().join("tests/contract");
    if !dir.join("node_modules/openai/package.json").exists() {
        return missing("tests/contract/node_modules/openai (npm ci)");
    }
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !node_ok {
        return missing("node");
    }
    let (_up, tg, expect) = stack().await;
    let out = run_suite(
        Path::new("node"),
        &["--test", "--test-reporter=tap", "openai_sdk.test.mjs"],
        &dir,
        &tg,
        &expect,
    )
    .await;
    let passed = out
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed > 0, "node --test ran no test:\n{out}");
    assert!(
        out.lines().any(|l| l.trim() == "# fail 0"),
        "node --test failures:\n{out}"
    );
}
