//! Fidelity integration tests (issue 2 §4–§6) through the real binary and the fake upstream,
//! plus self-tests of the fake upstream itself.

mod support;

mod fake_selftest {
    use std::time::Duration;

    use futures::StreamExt;
    use serde_json::{json, Value};

    use crate::support::fake_upstream::{Behavior, FakeUpstream, Scenario, Transcript};
    use crate::support::sse;

    fn chat(model: &str, stream: bool) -> Value {
        json!({"model": model, "stream": stream,
               "messages": [{"role": "user", "content": "hi"}]})
    }

    async fn post(up: &FakeUpstream, body: &Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", up.base_url()))
            .json(body)
            .send()
            .await
            .expect("post to fake")
    }

    #[tokio::test]
    async fn moonshot_stream_has_documented_shape() {
        let up = FakeUpstream::start(Scenario::new(Behavior::moonshot())).await;
        let mut body = chat("kimi-k2.6", true);
        body["tools"] =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]);
        let text = post(&up, &body).await.text().await.expect("body");
        assert!(sse::ends_with_done(&text));
        let chunks = sse::json_chunks(&text);
        let f = sse::fold(&chunks);
        let t = Transcript::tool_turn();
        assert_eq!(f.reasoning_content, t.reasoning_text());
        assert_eq!(f.content, t.content_text());
        assert_eq!(f.tool_calls.len(), 2);
        assert_eq!(
            f.tool_calls[0].id.as_deref(),
            Some("functions.get_weather:0")
        );
        assert_eq!(f.tool_calls[1].arguments, "{\"tz\":\"Europe/Paris\"}");
        assert_eq!(f.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(f.usages.len(), 1);
        assert_eq!(f.usages[0].0, sse::UsagePlace::InsideChoice);
        assert_eq!(f.usages[0].1["cached_tokens"], 64);
        let rec = up.last_request().expect("recorded");
        assert_eq!(rec.json()["tools"][0]["function"]["name"], "get_weather");
    }

    #[tokio::test]
    async fn moonshot_rejects_tool_history_without_reasoning() {
        let up = FakeUpstream::start(Scenario::new(Behavior::moonshot())).await;
        let body = json!({"model": "kimi-k2.6", "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
              "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"}]});
        let r = post(&up, &body).await;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .ends_with("at index 1"),
            "{v}"
        );
        let mut ok = body.clone();
        ok["thinking"] = json!({"type": "disabled"});
        assert_eq!(post(&up, &ok).await.status(), 200);
    }

    #[tokio::test]
    async fn splitter_delivers_same_bytes_in_small_pieces() {
        let up = FakeUpstream::start(
            Scenario::new(Behavior::openrouter()).model("split", Behavior::openrouter().split(7)),
        )
        .await;
        let clean = post(&up, &chat("clean", true))
            .await
            .text()
            .await
            .expect("clean");
        let r = post(&up, &chat("split", true)).await;
        let mut pieces = r.bytes_stream();
        let mut all = Vec::new();
        let mut n = 0usize;
        let mut max = 0usize;
        while let Some(p) = pieces.next().await {
            let p = p.expect("piece");
            n += 1;
            max = max.max(p.len());
            all.extend_from_slice(&p);
        }
        let split = String::from_utf8(all).expect("utf8");
        assert_eq!(split.replace("\"split\"", "\"clean\""), clean);
        assert!(max <= 7, "largest piece {max}");
        assert!(n > clean.len() / 7, "{n} pieces for {} bytes", clean.len());
    }

    #[tokio::test]
    async fn cut_after_drops_connection_without_done() {
        let up = FakeUpstream::start(Scenario::new(Behavior::moonshot().cut_after(3))).await;
        let r = post(&up, &chat("kimi-k2.6", true)).await;
        assert_eq!(r.status(), 200);
        let res = r.text().await;
        assert!(res.is_err(), "expected a body error, got {res:?}");
        assert!(
            up.wait_until(|s| s.streams_cut == 1, Duration::from_secs(2))
                .await
        );
    }

    #[tokio::test]
    async fn client_disconnect_counts_as_cancelled_stream() {
        let up = FakeUpstream::start(Scenario::new(Behavior::moonshot().stall_after(2))).await;
        let r = post(&up, &chat("kimi-k2.6", true)).await;
        let mut s = r.bytes_stream();
        let _first = s.next().await;
        assert_eq!(up.stats().streams_active, 1);
        drop(s);
        assert!(
            up.wait_until(
                |s| s.streams_cancelled == 1 && s.streams_active == 0,
                Duration::from_secs(1)
            )
            .await,
            "{:?}",
            up.stats()
        );
    }

    #[tokio::test]
    async fn client_disconnect_while_pending_counts_as_abandoned() {
        let up = FakeUpstream::start(Scenario::new(Behavior::moonshot().never_answer())).await;
        let res = reqwest::Client::new()
            .post(format!("{}/chat/completions", up.base_url()))
            .json(&chat("kimi-k2.6", false))
            .timeout(Duration::from_millis(200))
            .send()
            .await;
        assert!(res.is_err());
        assert!(
            up.wait_until(
                |s| s.requests_abandoned == 1 && s.connections_open == 0,
                Duration::from_secs(1)
            )
            .await,
            "{:?}",
            up.stats()
        );
    }

    #[tokio::test]
    async fn openrouter_2025_and_openai_include_usage_shapes() {
        let up = FakeUpstream::start(
            Scenario::new(Behavior::openai()).model("or", Behavior::openrouter_2025()),
        )
        .await;
        let text = post(&up, &chat("or", true)).await.text().await.expect("or");
        assert!(sse::comments(&text)
            .iter()
            .all(|c| c == "OPENROUTER PROCESSING"));
        assert!(!sse::comments(&text).is_empty());
        let chunks = sse::json_chunks(&text);
        let last = chunks.last().expect("chunks");
        assert!(last["choices"][0]["finish_reason"].is_null());
        assert_eq!(last["usage"]["cost"], 0.00023492);
        assert!(chunks[0]["choices"][0]["delta"]["reasoning"].is_string());

        let mut body = chat("gpt", true);
        body["stream_options"] = json!({"include_usage": true});
        body["logprobs"] = json!(true);
        let text = post(&up, &body).await.text().await.expect("openai");
        let chunks = sse::json_chunks(&text);
        let last = chunks.last().expect("chunks");
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null()));
        assert!(chunks[1]["choices"][0]["logprobs"]["content"][0]["token"].is_string());
    }

    #[tokio::test]
    async fn faults_status_queue_and_delay() {
        let up = FakeUpstream::start(
            Scenario::new(Behavior::openai())
                .then(Behavior::rate_limited(3))
                .then(Behavior::openai().delay_headers(Duration::from_millis(150))),
        )
        .await;
        let r = post(&up, &chat("m", false)).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        let t0 = std::time::Instant::now();
        let r = post(&up, &chat("m", false)).await;
        assert_eq!(r.status(), 200);
        assert!(t0.elapsed() >= Duration::from_millis(150));
        let v: Value = post(&up, &chat("m", false))
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            Transcript::plain().content_text()
        );
        assert_eq!(up.chat_requests().len(), 3);
    }

    #[tokio::test]
    async fn malformed_event_is_inserted() {
        let up = FakeUpstream::start(Scenario::new(Behavior::openai().malformed_at(1))).await;
        let text = post(&up, &chat("m", true))
            .await
            .text()
            .await
            .expect("body");
        let bad: Vec<String> = sse::data_payloads(&text)
            .into_iter()
            .filter(|d| d != "[DONE]" && serde_json::from_str::<Value>(d).is_err())
            .collect();
        assert_eq!(bad.len(), 1, "{text}");
    }
}
