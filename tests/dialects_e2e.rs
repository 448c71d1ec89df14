//! End-to-end dialect tests through the real binary and the Moonshot-emulating fake upstream
//! (which rejects a thinking-mode tool-call turn without `reasoning_content` exactly as Moonshot
//! does): 10-turn thinking + tools conversations over `/v1/messages` and over chat completions
//! with a client that drops reasoning, Anthropic error shape, Responses basics, Kimi quirks.

mod support;

use serde_json::{json, Value};

use support::fake_upstream::{Behavior, FakeUpstream, Scenario, Transcript};
use support::sse;
use support::tollgate::{Config, Model, Provider, Route, Tollgate};

async fn start(behavior: Behavior) -> (FakeUpstream, Tollgate) {
    let up = FakeUpstream::start(Scenario::new(behavior)).await;
    let tg = Config::new()
        .provider(Provider::new("moonshot", "moonshot", &up.base_url()))
        .model(
            Model::new("kimi-k2.6")
                .set("reasoning_efforts", "false")
                .set("fixed_parameters", "[\"temperature\", \"top_p\"]")
                .route(Route::new("moonshot", "kimi-k2.6")),
        )
        .start()
        .await;
    (up, tg)
}

fn tools_anthropic() -> Value {
    json!([
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}}
    ])
}

fn tools_chat() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
    ])
}

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("x-api-key", "sk-client")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("post")
}

/// Folds an Anthropic SSE body into the content blocks of the final message, checking the
/// event order on the way.
fn fold_anthropic_stream(body: &str) -> (Vec<Value>, String) {
    let mut blocks: Vec<Value> = Vec::new();
    let mut names = Vec::new();
    let mut stop = String::new();
    let mut partial: Vec<String> = Vec::new();
    for f in sse::parse(body) {
        let sse::Frame::Data { event, data } = f else {
            continue;
        };
        let v: Value = serde_json::from_str(&data).expect("event json");
        let name = event.expect("every Anthropic event is named");
        assert_eq!(v["type"], name.as_str());
        names.push(name.clone());
        match name.as_str() {
            "content_block_start" => {
                blocks.push(v["content_block"].clone());
                partial.push(String::new());
            }
            "content_block_delta" => {
                let i = v["index"].as_u64().expect("index") as usize;
                let d = &v["delta"];
                match d["type"].as_str().unwrap_or("") {
                    "text_delta" => {
                        let t = blocks[i]["text"].as_str().unwrap_or("").to_string()
                            + d["text"].as_str().unwrap_or("");
                        blocks[i]["text"] = json!(t);
                    }
                    "thinking_delta" => {
                        let t = blocks[i]["thinking"].as_str().unwrap_or("").to_string()
                            + d["thinking"].as_str().unwrap_or("");
                        blocks[i]["thinking"] = json!(t);
                    }
                    "input_json_delta" => {
                        partial[i].push_str(d["partial_json"].as_str().unwrap_or(""))
                    }
                    "signature_delta" => blocks[i]["signature"] = d["signature"].clone(),
                    other => panic!("unexpected delta {other}"),
                }
            }
            "content_block_stop" => {
                let i = v["index"].as_u64().expect("index") as usize;
                if blocks[i]["type"] == "tool_use" {
                    blocks[i]["input"] =
                        serde_json::from_str(&partial[i]).expect("tool input json");
                }
            }
            "message_delta" => stop = v["delta"]["stop_reason"].as_str().unwrap_or("").to_string(),
            _ => {}
        }
    }
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(names.iter().any(|n| n == "ping"));
    assert_eq!(names[names.len() - 2], "message_delta");
    (blocks, stop)
}

/// Ten turns of thinking + tools over `/v1/messages`, alternating streamed and complete answers.
/// The client replays the thinking blocks it received, as the Anthropic SDK does.
#[tokio::test]
async fn ten_turn_thinking_tools_conversation_over_messages() {
    let (up, tg) = start(Behavior::moonshot()).await;
    let url = tg.url("/v1/messages");
    let mut messages: Vec<Value> = Vec::new();
    for turn in 0..10 {
        messages.push(
            json!({"role": "user", "content": format!("turn {turn}: weather and time in Paris?")}),
        );
        for phase in 0..2 {
            let stream = (turn + phase) % 2 == 1;
            let body = json!({"model": "kimi-k2.6", "max_tokens": 4096, "stream": stream,
                "thinking": {"type": "enabled", "budget_tokens": 2048},
                "tools": tools_anthropic(), "messages": messages});
            let r = post(&url, &body).await;
            let status = r.status();
            let text = r.text().await.expect("body");
            assert_eq!(status, 200, "turn {turn} phase {phase}: {text}");
            let (blocks, stop) = if stream {
                fold_anthropic_stream(&text)
            } else {
                let v: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(v["type"], "message");
                (
                    v["content"].as_array().cloned().unwrap_or_default(),
                    v["stop_reason"].as_str().unwrap_or("").to_string(),
                )
            };
            assert_eq!(
                blocks[0]["type"], "thinking",
                "thinking comes first: {blocks:?}"
            );
            messages.push(json!({"role": "assistant", "content": blocks.clone()}));
            if phase == 0 {
                assert_eq!(stop, "tool_use");
                let results: Vec<Value> = blocks
                    .iter()
                    .filter(|b| b["type"] == "tool_use")
                    .map(|b| json!({"type": "tool_result", "tool_use_id": b["id"], "content": "18C"}))
                    .collect();
                assert_eq!(results.len(), 2);
                messages.push(json!({"role": "user", "content": results}));
            } else {
                assert_eq!(stop, "end_turn");
            }
        }
    }
    let reqs = up.requests();
    assert_eq!(reqs.len(), 20);
    // The last request carried every earlier tool-call turn's real reasoning back upstream.
    let last = reqs.last().expect("request").json();
    let want = Transcript::tool_turn().reasoning_text();
    let replayed: Vec<&Value> = last["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "assistant" && m.get("tool_calls").is_some())
        .collect();
    assert_eq!(replayed.len(), 10);
    for m in replayed {
        assert_eq!(m["reasoning_content"], want.as_str());
    }
    assert_eq!(last["thinking"]["type"], "enabled");
}

/// Ten turns over chat completions with a client that strips `reasoning_content` from the
/// assistant turns it sends back: tollgate restores the reasoning it served.
#[tokio::test]
async fn ten_turn_conversation_with_a_client_that_drops_reasoning() {
    let (up, tg) = start(Behavior::moonshot()).await;
    let url = tg.url("/v1/chat/completions");
    let mut messages: Vec<Value> = Vec::new();
    for turn in 0..10 {
        messages.push(json!({"role": "user", "content": format!("turn {turn}")}));
        for phase in 0..2 {
            let stream = (turn + phase) % 2 == 0;
            let body = json!({"model": "kimi-k2.6", "stream": stream, "tools": tools_chat(), "messages": messages});
            let r = post(&url, &body).await;
            let status = r.status();
            let text = r.text().await.expect("body");
            assert_eq!(status, 200, "turn {turn} phase {phase}: {text}");
            let (content, calls) = if stream {
                let f = sse::fold(&sse::json_chunks(&text));
                let calls: Vec<Value> = f
                    .tool_calls
                    .iter()
                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect();
                (f.content, calls)
            } else {
                let v: Value = serde_json::from_str(&text).expect("json");
                let m = &v["choices"][0]["message"];
                (
                    m["content"].as_str().unwrap_or("").to_string(),
                    m["tool_calls"].as_array().cloned().unwrap_or_default(),
                )
            };
            // The client keeps content and tool calls only.
            let mut a = json!({"role": "assistant", "content": content});
            if !calls.is_empty() {
                a["tool_calls"] = json!(calls);
            }
            messages.push(a);
            if phase == 0 {
                assert_eq!(calls.len(), 2, "{text}");
                for c in &calls {
                    messages
                        .push(json!({"role": "tool", "tool_call_id": c["id"], "content": "18C"}));
                }
            }
        }
    }
    let last = up.requests().last().expect("request").json();
    let want = Transcript::tool_turn().reasoning_text();
    let restored = last["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m.get("tool_calls").is_some())
        .filter(|m| m["reasoning_content"] == want.as_str())
        .count();
    assert_eq!(
        restored, 10,
        "every tool-call turn got its real reasoning back"
    );
}

#[tokio::test]
async fn anthropic_errors_have_anthropic_shape_and_529_for_overload() {
    let (_up, tg) = start(Behavior::status_json(
        429,
        "engine_overloaded_error",
        "The engine is currently overloaded",
    ))
    .await;
    let r = post(
        &tg.url("/v1/messages"),
        &json!({"model": "kimi-k2.6", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 529);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    let r = post(
        &tg.url("/v1/messages"),
        &json!({"model": "nope", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("not_found_error"))
    );
    let r = post(
        &tg.url("/v1/messages/count_tokens"),
        &json!({"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hello there, how are you?"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert!(v["input_tokens"].as_u64().is_some_and(|n| n > 0), "{v}");
}

#[tokio::test]
async fn kimi_request_quirks_reach_moonshot() {
    let (up, tg) = start(Behavior::moonshot()).await;
    // tool_choice "required" is emulated; an effort becomes thinking on; temperature is dropped.
    let r = post(
        &tg.url("/v1/chat/completions"),
        &json!({"model": "kimi-k2.6", "tools": tools_chat(),
        "tool_choice": "required", "reasoning_effort": "low", "temperature": 0.2,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let warning = r
        .headers()
        .get("x-tollgate-warning")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(warning.contains("effort"), "{warning}");
    let sent = up.last_request().expect("request").json();
    assert_eq!(sent["tool_choice"], "auto");
    assert_eq!(sent["thinking"], json!({"type": "enabled"}));
    assert!(sent.get("reasoning_effort").is_none() && sent.get("temperature").is_none());
    assert_eq!(
        sent["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map(|m| m["role"].clone()),
        Some(json!("user"))
    );
    // A named tool with thinking on cannot be emulated: a clear 400.
    let r = post(
        &tg.url("/v1/chat/completions"),
        &json!({"model": "kimi-k2.6", "tools": tools_chat(),
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["param"], "tool_choice");
    // Contradictory thinking spellings name both.
    let r = post(
        &tg.url("/v1/chat/completions"),
        &json!({"model": "kimi-k2.6",
        "thinking": {"type": "disabled"}, "reasoning": {"enabled": true},
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("thinking.type") && msg.contains("reasoning.enabled"),
        "{msg}"
    );
    // Anthropic prefill becomes Moonshot partial mode.
    let r = post(
        &tg.url("/v1/messages"),
        &json!({"model": "kimi-k2.6", "max_tokens": 100,
        "messages": [{"role": "user", "content": "json"}, {"role": "assistant", "content": "{"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let sent = up.last_request().expect("request").json();
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": "{", "partial": true})
    );
    // Video to a model without video is a 400 that names the models accepting video (none here).
    let r = post(
        &tg.url("/v1/chat/completions"),
        &json!({"model": "kimi-k2.6", "messages": [{"role": "user",
        "content": [{"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}]}]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("video"),
        "{v}"
    );
}

#[tokio::test]
async fn responses_create_and_stream() {
    let (_up, tg) = start(Behavior::moonshot()).await;
    let url = tg.url("/v1/responses");
    let r = post(&url, &json!({"model": "kimi-k2.6", "input": "hi"})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    let t = Transcript::plain();
    assert_eq!(v["output"][0]["type"], "reasoning");
    assert_eq!(
        v["output"][0]["content"][0]["text"],
        t.reasoning_text().as_str()
    );
    assert_eq!(
        v["output"][1]["content"][0]["text"],
        t.content_text().as_str()
    );
    assert_eq!(v["usage"]["input_tokens"], t.usage.prompt_tokens);
    let r = post(
        &url,
        &json!({"model": "kimi-k2.6", "input": "weather?", "stream": true,
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
                  {"type": "function", "name": "get_time", "parameters": {"type": "object"}}]}),
    )
    .await;
    let text = r.text().await.expect("body");
    let mut seq = 0;
    let mut names = Vec::new();
    for f in sse::parse(&text) {
        let sse::Frame::Data { event, data } = f else {
            continue;
        };
        let v: Value = serde_json::from_str(&data).expect("json");
        assert_eq!(v["sequence_number"], seq);
        seq += 1;
        names.push(event.expect("named"));
    }
    assert_eq!(names.first().map(String::as_str), Some("response.created"));
    assert_eq!(names.last().map(String::as_str), Some("response.completed"));
    assert_eq!(
        names
            .iter()
            .filter(|n| *n == "response.function_call_arguments.done")
            .count(),
        2
    );
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/dialects/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One request the fake Anthropic upstream received: path, headers, JSON body.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, axum::http::HeaderMap, Value)>>>;

/// A minimal Anthropic Messages upstream (the shared fake speaks only chat completions): answers
/// `POST /v1/messages` with the recorded fixtures, streamed when asked.
async fn fake_anthropic() -> (String, Seen) {
    let seen: Seen = Default::default();
    let rec = seen.clone();
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let rec = rec.clone();
                async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let stream = v["stream"] == true;
                    if let Ok(mut g) = rec.lock() {
                        g.push(("/v1/messages".to_string(), headers, v));
                    }
                    let (ct, body) = if stream {
                        ("text/event-stream", fixture("anthropic_stream.sse"))
                    } else {
                        ("application/json", fixture("anthropic_complete.json"))
                    };
                    ([(axum::http::header::CONTENT_TYPE, ct)], body)
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("http://{addr}/v1"), seen)
}

/// The `anthropic` upstream dialect over HTTP: path, headers, sanitised tool ids, thinking with a
/// budget, and the answer (complete and streamed) read back into each client's dialect.
#[tokio::test]
async fn anthropic_upstream_dialect() {
    let (base, seen) = fake_anthropic().await;
    let provider = Provider::new("claude", "anthropic", &base);
    let secret = provider.secret();
    let tg = Config::new()
        .provider(provider)
        .model(
            Model::new("kimi-k2.6")
                .set("reasoning_efforts", "true")
                .route(Route::new("claude", "claude-sonnet-4-5")),
        )
        .start()
        .await;
    let history = json!([
        {"role": "user", "content": "time in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "functions.get_time:0", "type": "function",
            "function": {"name": "get_time", "arguments": "{\"tz\":\"Europe/Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_time:0", "content": "12:00"}
    ]);
    let r = post(
        &tg.url("/v1/chat/completions"),
        &json!({"model": "kimi-k2.6", "tools": tools_chat(),
        "reasoning_effort": "high", "messages": history}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Need the time in Paris.");
    assert_eq!(m["tool_calls"][0]["id"], "toolu_02B");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["usage"]["prompt_tokens"], 120);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 64);
    let (path, headers, sent) = seen.lock().expect("lock").last().cloned().expect("request");
    assert_eq!(path, "/v1/messages");
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(h("x-api-key").as_deref(), Some(secret.as_str()));
    assert_eq!(h("anthropic-version").as_deref(), Some("2023-06-01"));
    let use_id = sent["messages"][1]["content"][0]["id"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        !use_id.is_empty()
            && use_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        "{use_id}"
    );
    assert_eq!(
        sent["messages"][2]["content"][0]["tool_use_id"],
        use_id.as_str()
    );
    assert_eq!(
        sent["thinking"],
        json!({"type": "enabled", "budget_tokens": 4096})
    );
    // Streamed, to an Anthropic client: the signature survives the round trip.
    let r = post(
        &tg.url("/v1/messages"),
        &json!({"model": "kimi-k2.6", "max_tokens": 8000, "stream": true,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "messages": [{"role": "user", "content": "time?"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    assert!(text.contains("\"signature_delta\""), "{text}");
    let (blocks, stop) = fold_anthropic_stream(&text);
    assert_eq!(stop, "tool_use");
    assert_eq!(
        blocks
            .iter()
            .map(|b| b["type"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["thinking", "text", "tool_use"]
    );
    assert_eq!(blocks[2]["input"], json!({"tz": "Europe/Paris"}));
    assert_eq!(blocks[0]["signature"], "EtYDsig==");
}

/// A remote image sent to Moonshot is fetched and inlined as a data URI; without the test-only
/// allowance the same loopback URL is refused with a 400 (SSRF protection on the live path).
#[tokio::test]
async fn remote_images_are_inlined_for_moonshot_with_ssrf_checks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let img = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 3\r\nconnection: close\r\n\r\nPNG").await;
            });
        }
    });
    let up = FakeUpstream::start(Scenario::new(Behavior::moonshot())).await;
    // The harness writes `input_modalities = ["text"]`; the vision model is raw TOML.
    const VISION: &str = "[[models]]\nid = \"kimi-k2.6\"\ninput_modalities = [\"text\", \"image\"]\ncapabilities = [\"reasoning\", \"tools\"]\n  [[models.routes]]\n  provider = \"moonshot\"\n  upstream_model = \"kimi-k2.6\"\n";
    let body = json!({"model": "kimi-k2.6", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": format!("http://127.0.0.1:{}/cat.png", img.port())}}]}]});
    let allowed = Config::new()
        .provider(Provider::new("moonshot", "moonshot", &up.base_url()))
        .raw(VISION)
        .env("TOLLGATE_TEST_FETCH_ALLOW", &img.to_string())
        .start()
        .await;
    let r = post(&allowed.url("/v1/chat/completions"), &body).await;
    assert_eq!(r.status(), 200);
    let sent = up.last_request().expect("request").json();
    assert_eq!(
        sent["messages"][0]["content"][1]["image_url"]["url"],
        "data:image/png;base64,UE5H"
    );
    let strict = Config::new()
        .provider(Provider::new("moonshot", "moonshot", &up.base_url()))
        .raw(VISION)
        .start()
        .await;
    let before = up.requests().len();
    let r = post(&strict.url("/v1/chat/completions"), &body).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("refused"),
        "{v}"
    );
    assert_eq!(up.requests().len(), before, "nothing reached the upstream");
}

/// An upstream failure after the stream started ends an Anthropic stream with an `error` event in
/// Anthropic's shape (no `message_stop`), and a Responses stream with `error` + `response.failed`.
#[tokio::test]
async fn mid_stream_failures_in_each_dialect() {
    let (_up, tg) = start(Behavior::openrouter().mid_stream_error_after(2)).await;
    let r = post(
        &tg.url("/v1/messages"),
        &json!({"model": "kimi-k2.6", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    let frames: Vec<(String, Value)> = sse::parse(&text)
        .into_iter()
        .filter_map(|f| match f {
            sse::Frame::Data { event, data } => Some((
                event.unwrap_or_default(),
                serde_json::from_str(&data).expect("json"),
            )),
            _ => None,
        })
        .collect();
    let (name, last) = frames.last().expect("frames");
    assert_eq!(name, "error", "{text}");
    assert_eq!(last["type"], "error");
    assert!(last["error"]["type"].is_string() && last["error"]["message"].is_string());
    assert!(!frames.iter().any(|(n, _)| n == "message_stop"));
    let r = post(
        &tg.url("/v1/responses"),
        &json!({"model": "kimi-k2.6", "stream": true, "input": "hi"}),
    )
    .await;
    let text = r.text().await.expect("body");
    let names: Vec<String> = sse::parse(&text)
        .into_iter()
        .filter_map(|f| match f {
            sse::Frame::Data { event, .. } => event,
            _ => None,
        })
        .collect();
    assert_eq!(
        names.last().map(String::as_str),
        Some("response.failed"),
        "{text}"
    );
    assert!(names.iter().any(|n| n == "error"));
    assert!(!names.iter().any(|n| n == "response.completed"));
}
