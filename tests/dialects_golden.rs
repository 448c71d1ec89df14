//! Golden tests for the dialect converters (issue 5): every inbound API (chat completions,
//! Anthropic Messages, Responses) × every upstream dialect (moonshot, openrouter, vllm, anthropic),
//! streamed and not, with tools and reasoning. Fixtures in `tests/fixtures/dialects/`, insta
//! snapshots in `tests/snapshots/`.
//!
//! Request direction: inbound fixture → parse → `Gateway::prepare` → the dialect's upstream body.
//! Answer direction: upstream fixture (JSON or SSE) → internal model → each inbound API's output.

use serde_json::{json, Value};

use tollgate::anthropic;
use tollgate::config::{Config, Dialect};
use tollgate::gateway::model::{ChatChunk, ChatRequest, ChatResponse, Usage};
use tollgate::gateway::Gateway;
use tollgate::openai;
use tollgate::openai::wire::Envelope;
use tollgate::providers::openai_compat;
use tollgate::responses;

const CONFIG: &str = r#"
[[providers]]
name = "moonshot"
dialect = "moonshot"
base_url = "http://127.0.0.1:9/v1"
[[providers]]
name = "openrouter"
dialect = "openrouter"
base_url = "http://127.0.0.1:9/v1"
[[providers]]
name = "vllm"
dialect = "vllm"
base_url = "http://127.0.0.1:9/v1"
[[providers]]
name = "anthropic"
dialect = "anthropic"
base_url = "http://127.0.0.1:9/v1"
[[models]]
id = "kimi-k2.6"
max_output_tokens = 16000
input_modalities = ["text", "image", "video"]
capabilities = ["reasoning", "tools"]
fixed_parameters = ["temperature", "top_p", "n", "presence_penalty", "frequency_penalty"]
reasoning_efforts = false
  [[models.routes]]
  provider = "moonshot"
  upstream_model = "kimi-k2.6"
"#;

const DIALECTS: [(&str, Dialect, &str); 4] = [
    ("moonshot", Dialect::Moonshot, "kimi-k2.6"),
    ("openrouter", Dialect::Openrouter, "moonshotai/kimi-k2.6"),
    ("vllm", Dialect::Vllm, "moonshotai/Kimi-K2.6"),
    ("anthropic", Dialect::Anthropic, "claude-sonnet-4-5"),
];

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/dialects/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn gateway() -> Gateway {
    let cfg = Config::parse(CONFIG, "golden", None).expect("config");
    Gateway::new(&cfg).expect("gateway")
}

fn parse_inbound(api: &str, stream: bool) -> ChatRequest {
    let mut body: Value =
        serde_json::from_slice(&fixture(&format!("{api}_request.json"))).expect("fixture json");
    body["stream"] = json!(stream);
    let bytes = serde_json::to_vec(&body).expect("json");
    match api {
        "chat" => openai::parse_chat_request(&bytes).expect("chat parses"),
        "messages" => anthropic::parse_messages_request(&bytes).expect("messages parses"),
        "responses" => {
            responses::parse_responses_request(&bytes)
                .expect("responses parses")
                .0
        }
        other => panic!("unknown api {other}"),
    }
}

fn upstream_body(dialect: Dialect, req: &ChatRequest, upstream_model: &str, stream: bool) -> Value {
    match dialect {
        Dialect::Anthropic => {
            anthropic::upstream::write_request(req, upstream_model, stream, 16000, "anthropic")
                .expect("anthropic body")
        }
        d => serde_json::from_slice(&openai_compat::write_body(d, req, upstream_model, stream))
            .expect("body json"),
    }
}

#[test]
fn requests_inbound_x_upstream() {
    let gw = gateway();
    for api in ["chat", "messages", "responses"] {
        for stream in [false, true] {
            let prepared = gw.prepare(parse_inbound(api, stream)).expect("prepare");
            for (name, dialect, upstream_model) in DIALECTS {
                let body = upstream_body(dialect, &prepared.request, upstream_model, stream);
                let mode = if stream { "stream" } else { "complete" };
                insta::assert_json_snapshot!(
                    format!("request__{api}__{name}__{mode}"),
                    json!({
                        "warnings": prepared.warnings,
                        "body": body,
                    })
                );
            }
        }
    }
}

fn sse_data(name: &str) -> Vec<String> {
    let text = String::from_utf8(fixture(name)).expect("utf8");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn complete_answer(dialect: Dialect) -> ChatResponse {
    match dialect {
        Dialect::Anthropic => {
            anthropic::upstream::parse_response(&fixture("anthropic_complete.json")).expect("parse")
        }
        _ => openai_compat::parse_completion(&fixture("openai_like_complete.json")).expect("parse"),
    }
}

fn streamed_answer(dialect: Dialect) -> Vec<ChatChunk> {
    match dialect {
        Dialect::Anthropic => {
            let mut d = anthropic::upstream::StreamDecoder::default();
            sse_data("anthropic_stream.sse")
                .iter()
                .filter_map(|e| d.event(e).expect("event"))
                .collect()
        }
        Dialect::Openrouter => {
            openai_compat::normalise_stream(&sse_data("openrouter_stream.sse")).expect("stream")
        }
        Dialect::Vllm => {
            openai_compat::normalise_stream(&sse_data("vllm_stream.sse")).expect("stream")
        }
        _ => openai_compat::normalise_stream(&sse_data("moonshot_stream.sse")).expect("stream"),
    }
}

fn to_json(bytes: Vec<u8>) -> Value {
    serde_json::from_slice(&bytes).expect("json")
}

fn events_json(evs: Vec<(&'static str, Value)>) -> Vec<Value> {
    evs.into_iter()
        .map(|(name, data)| json!({"event": name, "data": data}))
        .collect()
}

fn responses_meta() -> responses::outbound::ResponseMeta {
    let (_, opts) =
        responses::parse_responses_request(&fixture("responses_request.json")).expect("parses");
    responses::outbound::ResponseMeta {
        id: "resp_golden".into(),
        created_at: 1_700_000_000,
        model: "kimi-k2.6".into(),
        opts,
        max_output_tokens: Some(4096),
        effort: None,
    }
}

fn encode_complete(api: &str, r: &ChatResponse) -> Value {
    match api {
        "chat" => {
            let env = Envelope {
                id: "chatcmpl-golden",
                created: 1_700_000_000,
                model: "kimi-k2.6",
                provider: "p",
            };
            to_json(openai::wire::completion_json(&env, r, true, None))
        }
        "messages" => anthropic::outbound::message_json("msg_golden", "kimi-k2.6", r, true),
        _ => responses::outbound::complete_json(&responses_meta(), r, true),
    }
}

fn encode_stream(api: &str, chunks: &[ChatChunk]) -> Value {
    let usage: Option<Usage> = chunks.iter().rev().find_map(|c| c.usage);
    match api {
        "chat" => {
            let env = Envelope {
                id: "chatcmpl-golden",
                created: 1_700_000_000,
                model: "kimi-k2.6",
                provider: "p",
            };
            let mut out: Vec<Value> = chunks
                .iter()
                .filter(|c| !c.choices.is_empty())
                .map(|c| to_json(openai::wire::chunk_json(&env, c, true)))
                .collect();
            if let Some(u) = usage {
                out.push(to_json(openai::wire::usage_chunk_json(&env, &u, None)));
            }
            Value::Array(out)
        }
        "messages" => {
            let mut enc = anthropic::outbound::StreamEncoder::new("msg_golden", "kimi-k2.6", true);
            let mut evs = enc.start();
            for c in chunks {
                evs.extend(enc.chunk(c));
            }
            evs.extend(enc.finish(usage));
            Value::Array(events_json(evs))
        }
        _ => {
            let mut enc = responses::outbound::StreamEncoder::new(responses_meta(), true);
            let mut evs = enc.start();
            for c in chunks {
                evs.extend(enc.chunk(c));
            }
            evs.extend(enc.finish(usage));
            Value::Array(events_json(evs))
        }
    }
}

#[test]
fn answers_upstream_x_inbound() {
    for (name, dialect, _) in DIALECTS {
        let complete = complete_answer(dialect);
        let chunks = streamed_answer(dialect);
        for api in ["chat", "messages", "responses"] {
            insta::assert_json_snapshot!(
                format!("answer__{name}__{api}__complete"),
                encode_complete(api, &complete)
            );
            insta::assert_json_snapshot!(
                format!("answer__{name}__{api}__stream"),
                encode_stream(api, &chunks)
            );
        }
    }
}

/// Hidden reasoning is not shown in any dialect, but the usage (which counts it) is kept.
#[test]
fn excluded_reasoning_is_hidden_everywhere_but_counted() {
    let r = complete_answer(Dialect::Moonshot);
    let env = Envelope {
        id: "x",
        created: 0,
        model: "kimi-k2.6",
        provider: "p",
    };
    let chat = to_json(openai::wire::completion_json(&env, &r, false, None));
    assert!(chat["choices"][0]["message"]
        .get("reasoning_content")
        .is_none());
    assert_eq!(chat["usage"]["completion_tokens"], 30);
    let msg = anthropic::outbound::message_json("m", "kimi-k2.6", &r, false);
    assert!(msg["content"]
        .as_array()
        .expect("content")
        .iter()
        .all(|b| b["type"] != "thinking"));
    assert_eq!(msg["usage"]["output_tokens"], 30);
    let resp = responses::outbound::complete_json(&responses_meta(), &r, false);
    assert!(resp["output"]
        .as_array()
        .expect("output")
        .iter()
        .all(|i| i["type"] != "reasoning"));
    assert_eq!(resp["usage"]["output_tokens"], 30);
    let mut enc = anthropic::outbound::StreamEncoder::new("m", "kimi-k2.6", false);
    let evs: Vec<_> = streamed_answer(Dialect::Moonshot)
        .iter()
        .flat_map(|c| enc.chunk(c))
        .collect();
    assert!(evs
        .iter()
        .all(|(_, d)| d["content_block"]["type"] != "thinking"));
}
