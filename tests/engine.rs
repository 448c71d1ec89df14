//! Integration tests for the embedded llama.cpp engine against the real SmolLM2-135M GGUF (fetch it with scripts/fetch-model.sh).
// `serial()` holds a std mutex across awaits on purpose: it serialises whole tests (each on its own
// runtime) so two model-heavy tests never share the 2 cores; no task in a test contends for it.
#![allow(clippy::await_holding_lock)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate::engine::{
    tools, ChatMessage, Engine, EngineError, EngineEvent, EngineOptions, FinishReason,
    GenerateRequest, ResponseFormat, SamplingParams, TokenLogprob, ToolChoice, Usage,
};

fn model_path() -> PathBuf {
    let p = std::env::var_os("TOLLGATE_TEST_MODEL").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    assert!(
        p.is_file(),
        "test model missing at {}: run scripts/fetch-model.sh (make deps does)",
        p.display()
    );
    p
}

/// One shared engine: loading is cheap (mmap) but two engines would fight over the 2 cores.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::load(
            &model_path(),
            EngineOptions {
                slots: 8,
                queue: 24,
                ctx_per_slot: 2048,
                ..EngineOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("load: {e}"))
    })
}

/// Tests share the CPU; run them one at a time so timings and concurrency checks are meaningful.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn user(text: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: Some(text.into()),
        ..Default::default()
    }
}

fn system(text: &str) -> ChatMessage {
    ChatMessage {
        role: "system".into(),
        content: Some(text.into()),
        ..Default::default()
    }
}

#[derive(Debug)]
struct Outcome {
    text: String,
    deltas: usize,
    logprobs: Vec<TokenLogprob>,
    finish: FinishReason,
    usage: Usage,
    ttft: Duration,
    first_at: Instant,
    done_at: Instant,
}

async fn collect(
    mut rx: tokio::sync::mpsc::Receiver<EngineEvent>,
    started: Instant,
) -> Result<Outcome, String> {
    let mut text = String::new();
    let mut deltas = 0;
    let mut logprobs = Vec::new();
    let mut first: Option<Instant> = None;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
        .await
        .map_err(|_| "timed out waiting for the engine".to_string())?
    {
        match ev {
            EngineEvent::Delta {
                text: t,
                logprobs: l,
            } => {
                first.get_or_insert_with(Instant::now);
                deltas += 1;
                text.push_str(&t);
                logprobs.extend(l);
            }
            EngineEvent::Done {
                finish_reason,
                usage,
            } => {
                let now = Instant::now();
                let first_at = first.unwrap_or(now);
                return Ok(Outcome {
                    text,
                    deltas,
                    logprobs,
                    finish: finish_reason,
                    usage,
                    ttft: first_at - started,
                    first_at,
                    done_at: now,
                });
            }
            EngineEvent::Error(e) => return Err(e.to_string()),
        }
    }
    Err("stream ended without Done".into())
}

async fn run(req: GenerateRequest) -> Outcome {
    let started = Instant::now();
    let rx = engine()
        .submit(req)
        .unwrap_or_else(|e| panic!("submit: {e}"));
    collect(rx, started).await.unwrap_or_else(|e| panic!("{e}"))
}

fn req(messages: Vec<ChatMessage>, max_tokens: u32, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        messages,
        max_tokens: Some(max_tokens),
        sampling,
        ..Default::default()
    }
}

#[tokio::test]
async fn model_card_info() {
    let info = engine().info();
    assert_eq!(info.train_context_length, 8192);
    assert_eq!(info.context_length, 2048);
    assert!(!info.supports_reasoning);
    assert!(
        !info.supports_tools,
        "SmolLM2's template has no tool support"
    );
    assert!(!info.chat_template_fallback, "GGUF template should compile");
}

#[tokio::test]
async fn same_seed_same_text() {
    let _g = serial();
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(1234),
        ..Default::default()
    };
    let msgs = vec![user("Write one sentence about the sea.")];
    let a = run(req(msgs.clone(), 40, sampling.clone())).await;
    let b = run(req(msgs.clone(), 40, sampling)).await;
    assert!(!a.text.is_empty());
    assert_eq!(a.text, b.text);
    assert_eq!(a.usage.completion_tokens, b.usage.completion_tokens);
}

#[tokio::test]
async fn json_schema_output_validates_20_of_20() {
    let _g = serial();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "city": {"type": "string", "maxLength": 24}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    });
    let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{e}"));
    let mut rxs = Vec::new();
    for i in 0..20u64 {
        let r = GenerateRequest {
            messages: vec![user(
                "Invent a person. Reply in JSON with name, age and city.",
            )],
            max_tokens: Some(160),
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(i),
                ..Default::default()
            },
            response_format: ResponseFormat::JsonSchema(schema.clone()),
            ..Default::default()
        };
        let started = Instant::now();
        rxs.push((
            engine().submit(r).unwrap_or_else(|e| panic!("{e}")),
            started,
        ));
    }
    let mut valid = 0;
    for (rx, started) in rxs {
        let out = collect(rx, started).await.unwrap_or_else(|e| panic!("{e}"));
        let value: serde_json::Value = serde_json::from_str(&out.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} finish={:?}", out.text, out.finish));
        assert!(
            validator.is_valid(&value),
            "invalid against schema: {value}"
        );
        assert_eq!(out.finish, FinishReason::Stop, "{:?}", out.text);
        valid += 1;
    }
    assert_eq!(valid, 20);
}

#[tokio::test]
async fn json_object_output_parses() {
    let _g = serial();
    let r = GenerateRequest {
        messages: vec![user("Give me a JSON object describing a cat.")],
        max_tokens: Some(128),
        sampling: SamplingParams {
            temperature: 0.7,
            seed: Some(5),
            ..Default::default()
        },
        response_format: ResponseFormat::JsonObject,
        ..Default::default()
    };
    let out = run(r).await;
    if out.finish == FinishReason::Stop {
        let v: serde_json::Value =
            serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {}", out.text));
        assert!(v.is_object());
    } else {
        assert!(out.text.trim_start().starts_with('{'), "{}", out.text);
    }
}

#[tokio::test]
async fn eight_concurrent_streams_complete_with_exact_usage() {
    let _g = serial();
    let e = engine();
    let topics = [
        "cats", "rivers", "bread", "stars", "trains", "music", "snow", "bees",
    ];
    let mut pending = Vec::new();
    for (i, t) in topics.iter().enumerate() {
        let msgs = vec![user(&format!("Tell me a short fact about {t}."))];
        let expected_prompt = e
            .tokenize_chat(&msgs, None)
            .unwrap_or_else(|e| panic!("{e}"));
        let r = req(
            msgs,
            32,
            SamplingParams {
                temperature: 0.8,
                seed: Some(i as u64),
                logprobs: Some(2),
                ..Default::default()
            },
        );
        let started = Instant::now();
        let rx = e.submit(r).unwrap_or_else(|e| panic!("{e}"));
        pending.push((expected_prompt, tokio::spawn(collect(rx, started))));
    }
    assert_eq!(e.in_flight(), 8);
    let mut outs = Vec::new();
    for (expected_prompt, h) in pending {
        let out = h
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.usage.prompt_tokens as usize, expected_prompt);
        assert!(out.usage.completion_tokens >= 1 && out.usage.completion_tokens <= 32);
        if out.finish == FinishReason::Length {
            assert_eq!(out.usage.completion_tokens, 32);
        }
        // One logprob entry per generated token, and their bytes spell the text exactly.
        assert_eq!(out.logprobs.len(), out.usage.completion_tokens as usize);
        let bytes: Vec<u8> = out.logprobs.iter().flat_map(|l| l.bytes.clone()).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), out.text);
        assert!(out
            .logprobs
            .iter()
            .all(|l| l.logprob <= 0.0 && l.top_logprobs.len() == 2));
        assert!(out.deltas >= 1);
        outs.push(out);
    }
    // Decoded together: every stream had produced its first token before any stream finished.
    let last_first = outs.iter().map(|o| o.first_at).max();
    let first_done = outs.iter().map(|o| o.done_at).min();
    assert!(
        last_first < first_done,
        "streams were not decoded concurrently"
    );
    // Every place is returned before its request's final event is sent: with every final event
    // in hand, none is still held (a test that follows starts with the engine idle).
    assert_eq!(e.in_flight(), 0);
}

/// Acceptance: a second request sharing a ≥500-token prefix reuses it (cached_tokens ≥ 500) and
/// its time to first token is under 30% of the first request's. The 30% bound is the criterion
/// itself; expected ratios on 2 cores are ~5-10% (only ~20 new tokens to prefill instead of ~560).
/// To tolerate noise from other processes on the shared machine, up to three independent
/// attempts (each with a fresh, never-cached prefix) are made; one clean attempt must pass.
#[tokio::test]
async fn shared_prefix_is_reused_and_fast() {
    let _g = serial();
    let e = engine();
    // Warm-up so one-time graph allocation is not charged to the first request.
    run(req(vec![user("hello")], 2, SamplingParams::default())).await;
    let mut report = Vec::new();
    for attempt in 0..3 {
        let nonce = format!("{:?}-{attempt}", Instant::now());
        let mut prefix =
            format!("Session {nonce}. You are a careful assistant. Reference notes follow.\n");
        for i in 0..60 {
            prefix.push_str(&format!(
                "Note {i}: the warehouse on shelf {i} holds {} boxes of blue widgets.\n",
                i * 7 + 3
            ));
        }
        let first_msgs = vec![system(&prefix), user("How many boxes are on shelf 3?")];
        let second_msgs = vec![system(&prefix), user("What is on shelf 12?")];
        let n_prefix = e.tokenize_chat(&[system(&prefix)], None).unwrap_or(0);
        assert!(n_prefix >= 520, "prefix only {n_prefix} tokens");
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let a = run(req(first_msgs, 4, greedy.clone())).await;
        let b = run(req(second_msgs, 4, greedy)).await;
        assert!(
            a.usage.cached_tokens < 100,
            "first request must be cold: {:?}",
            a.usage
        );
        assert!(
            b.usage.cached_tokens >= 500,
            "second request cached only {:?}",
            b.usage
        );
        let ratio = b.ttft.as_secs_f64() / a.ttft.as_secs_f64();
        report.push(format!(
            "ttft1={:?} ttft2={:?} ratio={ratio:.3}",
            a.ttft, b.ttft
        ));
        if ratio < 0.30 {
            return;
        }
    }
    panic!("cached TTFT not under 30% of cold TTFT: {report:?}");
}

#[tokio::test]
async fn max_tokens_gives_length_and_stop_is_trimmed() {
    let _g = serial();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let msgs = vec![user("List the days of the week, comma separated.")];
    let full = run(req(msgs.clone(), 24, greedy.clone())).await;
    assert_eq!(full.finish, FinishReason::Length);
    assert_eq!(full.usage.completion_tokens, 24);
    // Pick a stop string from the middle of the greedy output; the rerun must end right before it.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = full.text.find(&stop).unwrap_or(0);
    let mut r = req(msgs, 24, greedy);
    r.stop = vec![stop.clone()];
    let stopped = run(r).await;
    assert_eq!(stopped.finish, FinishReason::Stop);
    assert_eq!(stopped.text, full.text[..cut], "stop={stop:?}");
}

#[tokio::test]
async fn template_limits_are_client_errors() {
    let e = engine();
    let tools = vec![json!({"type": "function", "function": {"name": "f", "parameters": {}}})];
    let r = GenerateRequest {
        messages: vec![user("hi")],
        tools: Some(tools),
        ..Default::default()
    };
    match e.submit(r) {
        Err(err @ EngineError::InvalidRequest { .. }) => assert_eq!(err.http_status(), 400),
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    let huge = "word ".repeat(5000);
    match e.submit(req(vec![user(&huge)], 8, SamplingParams::default())) {
        Err(err @ EngineError::ContextLength { .. }) => assert_eq!(err.http_status(), 400),
        other => panic!("expected ContextLength, got {other:?}"),
    }
}

#[tokio::test]
async fn queue_overflow_is_overloaded_and_disconnect_frees_slot() {
    let _g = serial();
    // A separate tiny engine: 1 slot + 1 queue place.
    let small = Engine::load(
        &model_path(),
        EngineOptions {
            slots: 1,
            queue: 1,
            ctx_per_slot: 512,
            ..EngineOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let long = || {
        req(
            vec![user("Count from one to two hundred.")],
            400,
            SamplingParams::default(),
        )
    };
    let a = small.submit(long()).unwrap_or_else(|e| panic!("{e}"));
    let b = small.submit(long()).unwrap_or_else(|e| panic!("{e}"));
    match small.submit(long()) {
        Err(err @ EngineError::Overloaded { .. }) => {
            assert_eq!(err.http_status(), 503);
            assert!(
                matches!(err, EngineError::Overloaded { retry_after_secs, .. } if retry_after_secs >= 1)
            );
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    // Clients go away: both the running and the queued request release their places.
    drop(a);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(30);
    while small.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(small.in_flight(), 0);
    let c = small
        .submit(req(vec![user("hi")], 4, SamplingParams::default()))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = collect(c, Instant::now())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.usage.completion_tokens >= 1);
}

/// The gateway in-process with the built-in default config (the embedded model), on port 0, in
/// open mode (these tests are about the engine, not keys; the default requires a key).
async fn start_default_gateway() -> String {
    let mut cfg = tollgate::config::Config::builtin_default().unwrap_or_else(|e| panic!("{e}"));
    cfg.auth.required = false;
    for m in &mut cfg.models {
        for r in &mut m.routes {
            if r.model_path.is_some() {
                r.model_path = Some(model_path());
            }
        }
    }
    let state = tollgate::build_state_with(cfg, None).unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(tollgate::http::serve(
        state,
        listener,
        std::future::pending::<()>(),
    ));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinking_request_on_local_model_is_served_with_warning() {
    let _g = serial();
    let base = start_default_gateway().await;
    let client = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        client
            .post(format!("{base}/v1/chat/completions"))
            .timeout(Duration::from_secs(60))
            .json(&body)
            .send()
    };
    let warning = |r: &reqwest::Response| {
        r.headers()
            .get("x-tollgate-warning")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let msgs = json!([{"role": "user", "content": "Say hi."}]);

    // Non-streamed, OpenAI spelling.
    let r = post(
        json!({"model": "smollm2-135m-instruct", "messages": msgs, "max_tokens": 4,
                        "reasoning_effort": "high"}),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    let w = warning(&r).unwrap_or_default();
    assert!(
        w.contains("does not support reasoning") && w.contains("ignored"),
        "warning: {w:?}"
    );
    let body: serde_json::Value = r.json().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(body["choices"][0]["message"]["content"].is_string());
    assert!(body["choices"][0]["message"]
        .get("reasoning_content")
        .is_none());
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap_or(0),
        0
    );

    // Streamed, Moonshot/Anthropic-style `thinking` spelling.
    let r = post(
        json!({"model": "smollm2-135m-instruct", "messages": msgs, "max_tokens": 4,
                        "stream": true, "thinking": {"type": "enabled"}}),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert!(warning(&r).is_some_and(|w| w.contains("does not support reasoning")));
    let text = r.text().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(text.contains("[DONE]"), "{text}");

    // No thinking asked for, or thinking turned off: no warning.
    for extra in [json!({}), json!({"thinking": {"type": "disabled"}})] {
        let mut body = json!({"model": "smollm2-135m-instruct", "messages": msgs, "max_tokens": 2});
        if let (Some(b), Some(x)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(x.clone());
        }
        let r = post(body).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status(), 200);
        assert_eq!(warning(&r), None, "{extra}");
    }
}

/// A tiny tool-capable chat template (Hermes-style calls), standing in for a real one.
const TOOL_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.first and tools %}Tools: {% for t in tools %}{{ t.function.name }} ({{ t.function.description }}); {% endfor %}call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>\n{% endif %}{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[tokio::test]
async fn required_tool_call_with_a_tool_template_parses() {
    let _g = serial();
    let e = Engine::load(
        &model_path(),
        EngineOptions {
            slots: 1,
            queue: 1,
            ctx_per_slot: 1024,
            chat_template: Some(TOOL_TEMPLATE.into()),
            ..EngineOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(e.info().supports_tools);
    let tools = vec![json!({"type": "function", "function": {
        "name": "get_weather", "description": "current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})];
    let ask = |choice: ToolChoice| GenerateRequest {
        messages: vec![user("What is the weather in Paris?")],
        tools: Some(tools.clone()),
        tool_choice: choice,
        max_tokens: Some(160),
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let rx = e
        .submit(ask(ToolChoice::Required(vec!["get_weather".into()])))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = collect(rx, Instant::now())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.finish, FinishReason::Stop, "{:?}", out.text);
    let parsed = tools::parse(&out.text, &["get_weather"])
        .unwrap_or_else(|| panic!("not a tool call: {:?}", out.text));
    assert_eq!(parsed.calls.len(), 1);
    assert_eq!(parsed.calls[0].name, "get_weather");
    let args: serde_json::Value =
        serde_json::from_str(&parsed.calls[0].arguments).unwrap_or_else(|e| panic!("{e}"));
    assert!(args.is_object());
    // The conversation with the call and its result renders back through the template.
    let history = vec![
        user("What is the weather in Paris?"),
        ChatMessage {
            role: "assistant".into(),
            tool_calls: Some(vec![json!({"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": parsed.calls[0].arguments}})]),
            ..Default::default()
        },
        ChatMessage {
            role: "tool".into(),
            content: Some("18 C, sunny".into()),
            tool_call_id: Some("call_1".into()),
            ..Default::default()
        },
    ];
    assert!(e.tokenize_chat(&history, Some(&tools)).unwrap_or(0) > 20);
    // A named tool that is not offered cannot be forced.
    let mut bad = ask(ToolChoice::Required(vec!["rm -rf".into()]));
    bad.tools = Some(tools.clone());
    assert!(matches!(
        e.submit(bad),
        Err(EngineError::InvalidRequest { .. })
    ));
}
