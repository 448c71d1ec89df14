//! The internal answer in the Responses API's shape: the `response` object (output items:
//! `reasoning`, `message`, `function_call`) and the `response.*` SSE event sequence, each event with
//! an increasing `sequence_number`, ending in `response.completed` (or `.incomplete` / `.failed`).

use serde_json::{json, Value};

use super::ResponsesOptions;
use crate::gateway::model::{ChatChunk, ChatResponse, Usage};

/// Identity and echo fields of one response.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created_at: i64,
    pub model: String,
    pub opts: ResponsesOptions,
    pub max_output_tokens: Option<u32>,
    pub effort: Option<String>,
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.total_tokens(),
    })
}

fn status_of(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

fn response_json(
    m: &ResponseMeta,
    status: &str,
    output: Vec<Value>,
    usage: Option<&Usage>,
    incomplete: Value,
    error: Value,
) -> Value {
    json!({
        "id": m.id,
        "object": "response",
        "created_at": m.created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": m.opts.instructions,
        "max_output_tokens": m.max_output_tokens,
        "model": m.model,
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "reasoning": {"effort": m.effort, "summary": m.opts.summary},
        "store": false,
        "temperature": null,
        "text": m.opts.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": m.opts.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        "tools": m.opts.tools,
        "top_p": null,
        "truncation": "disabled",
        "usage": usage.map(usage_json),
        "metadata": m.opts.metadata.clone().unwrap_or_else(|| json!({})),
    })
}

fn reasoning_item(id: &str, text: &str, summary: bool, status: &str) -> Value {
    if summary {
        json!({"type": "reasoning", "id": id, "summary": [{"type": "summary_text", "text": text}], "status": status})
    } else {
        json!({"type": "reasoning", "id": id, "summary": [], "content": [{"type": "reasoning_text", "text": text}], "status": status})
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, call_id: &str, name: &str, args: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": args, "status": status})
}

/// A complete answer as a `response` object.
pub fn complete_json(m: &ResponseMeta, resp: &ChatResponse, show_reasoning: bool) -> Value {
    let mut output = Vec::new();
    let mut finish = None;
    let short = m.id.trim_start_matches("resp_");
    if let Some(c) = resp.choices.first() {
        if show_reasoning {
            if let Some(r) = c
                .message
                .reasoning_content
                .as_deref()
                .filter(|r| !r.is_empty())
            {
                output.push(reasoning_item(
                    &format!("rs_{short}"),
                    r,
                    m.opts.summary.is_some(),
                    "completed",
                ));
            }
        }
        if let Some(t) = c
            .message
            .content
            .as_ref()
            .map(|c| c.text())
            .filter(|t| !t.is_empty())
        {
            output.push(message_item(&format!("msg_{short}"), &t, "completed"));
        }
        for (i, call) in c.message.tool_calls.iter().flatten().enumerate() {
            output.push(call_item(
                &format!("fc_{short}_{i}"),
                &call.id,
                &call.function.name,
                &call.function.arguments,
                "completed",
            ));
        }
        finish = c.finish_reason.as_deref();
    }
    let (status, incomplete) = status_of(finish);
    response_json(
        m,
        status,
        output,
        resp.usage.as_ref(),
        incomplete,
        Value::Null,
    )
}

/// One SSE event: name and JSON data (the data's `type` equals the name).
pub type Event = (&'static str, Value);

enum Open {
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
    },
    Call {
        index: u32,
        id: String,
        call_id: String,
        name: String,
        args: String,
    },
}

/// Turns internal chunks into the `response.*` event sequence.
pub struct StreamEncoder {
    meta: ResponseMeta,
    show_reasoning: bool,
    seq: u64,
    open: Option<(Open, usize)>,
    output: Vec<Value>,
    finish: Option<String>,
    calls: u32,
}

impl StreamEncoder {
    pub fn new(meta: ResponseMeta, show_reasoning: bool) -> StreamEncoder {
        StreamEncoder {
            meta,
            show_reasoning,
            seq: 0,
            open: None,
            output: Vec::new(),
            finish: None,
            calls: 0,
        }
    }

    fn ev(&mut self, out: &mut Vec<Event>, name: &'static str, mut data: Value) {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push((name, data));
    }

    fn summary(&self) -> bool {
        self.meta.opts.summary.is_some()
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let r = response_json(
            &self.meta,
            "in_progress",
            Vec::new(),
            None,
            Value::Null,
            Value::Null,
        );
        self.ev(&mut out, "response.created", json!({"response": r}));
        self.ev(&mut out, "response.in_progress", json!({"response": r}));
        out
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        let Some((open, oi)) = self.open.take() else {
            return;
        };
        let item = match open {
            Open::Reasoning { id, text } => {
                if self.summary() {
                    self.ev(out, "response.reasoning_summary_text.done", json!({"item_id": id, "output_index": oi, "summary_index": 0, "text": text}));
                    self.ev(out, "response.reasoning_summary_part.done", json!({"item_id": id, "output_index": oi, "summary_index": 0, "part": {"type": "summary_text", "text": text}}));
                } else {
                    self.ev(out, "response.reasoning_text.done", json!({"item_id": id, "output_index": oi, "content_index": 0, "text": text}));
                    self.ev(out, "response.content_part.done", json!({"item_id": id, "output_index": oi, "content_index": 0, "part": {"type": "reasoning_text", "text": text}}));
                }
                reasoning_item(&id, &text, self.summary(), "completed")
            }
            Open::Message { id, text } => {
                self.ev(out, "response.output_text.done", json!({"item_id": id, "output_index": oi, "content_index": 0, "text": text, "logprobs": []}));
                self.ev(out, "response.content_part.done", json!({"item_id": id, "output_index": oi, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}));
                message_item(&id, &text, "completed")
            }
            Open::Call {
                id,
                call_id,
                name,
                args,
                ..
            } => {
                self.ev(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": oi, "name": name, "arguments": args}),
                );
                call_item(&id, &call_id, &name, &args, "completed")
            }
        };
        self.ev(
            out,
            "response.output_item.done",
            json!({"output_index": oi, "item": item}),
        );
        self.output.push(item);
    }

    fn short(&self) -> String {
        self.meta.id.trim_start_matches("resp_").to_string()
    }

    /// The events for one chunk (first choice only).
    pub fn chunk(&mut self, chunk: &ChatChunk) -> Vec<Event> {
        let mut out = Vec::new();
        let Some(c) = chunk.choices.iter().find(|c| c.index == 0) else {
            return out;
        };
        if self.show_reasoning {
            if let Some(r) = &c.reasoning {
                if !matches!(self.open, Some((Open::Reasoning { .. }, _))) {
                    self.close(&mut out);
                    let oi = self.output.len();
                    let id = format!("rs_{}_{oi}", self.short());
                    self.ev(&mut out, "response.output_item.added", json!({"output_index": oi, "item": reasoning_item(&id, "", self.summary(), "in_progress")}));
                    if self.summary() {
                        self.ev(&mut out, "response.reasoning_summary_part.added", json!({"item_id": id, "output_index": oi, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}));
                    } else {
                        self.ev(&mut out, "response.content_part.added", json!({"item_id": id, "output_index": oi, "content_index": 0, "part": {"type": "reasoning_text", "text": ""}}));
                    }
                    self.open = Some((
                        Open::Reasoning {
                            id,
                            text: String::new(),
                        },
                        oi,
                    ));
                }
                if let Some((Open::Reasoning { id, text }, oi)) = &mut self.open {
                    text.push_str(r);
                    let (id, oi) = (id.clone(), *oi);
                    if self.summary() {
                        self.ev(&mut out, "response.reasoning_summary_text.delta", json!({"item_id": id, "output_index": oi, "summary_index": 0, "delta": r}));
                    } else {
                        self.ev(&mut out, "response.reasoning_text.delta", json!({"item_id": id, "output_index": oi, "content_index": 0, "delta": r}));
                    }
                }
            }
        }
        if let Some(t) = c.content.as_deref().filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some((Open::Message { .. }, _))) {
                self.close(&mut out);
                let oi = self.output.len();
                let id = format!("msg_{}_{oi}", self.short());
                self.ev(&mut out, "response.output_item.added", json!({"output_index": oi,
                    "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
                self.ev(&mut out, "response.content_part.added", json!({"item_id": id, "output_index": oi, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
                self.open = Some((
                    Open::Message {
                        id,
                        text: String::new(),
                    },
                    oi,
                ));
            }
            if let Some((Open::Message { id, text }, oi)) = &mut self.open {
                text.push_str(t);
                let (id, oi) = (id.clone(), *oi);
                self.ev(&mut out, "response.output_text.delta", json!({"item_id": id, "output_index": oi, "content_index": 0, "delta": t, "logprobs": []}));
            }
        }
        for tc in &c.tool_calls {
            let is_open =
                matches!(&self.open, Some((Open::Call { index, .. }, _)) if *index == tc.index);
            let f = tc.function.as_ref();
            if !is_open {
                let Some(call_id) = tc.id.clone() else {
                    tracing::warn!(
                        index = tc.index,
                        "tool-call fragment for a closed item dropped"
                    );
                    continue;
                };
                self.close(&mut out);
                let oi = self.output.len();
                let id = format!("fc_{}_{}", self.short(), self.calls);
                self.calls += 1;
                let name = f.and_then(|f| f.name.clone()).unwrap_or_default();
                self.ev(&mut out, "response.output_item.added", json!({"output_index": oi, "item": call_item(&id, &call_id, &name, "", "in_progress")}));
                self.open = Some((
                    Open::Call {
                        index: tc.index,
                        id,
                        call_id,
                        name,
                        args: String::new(),
                    },
                    oi,
                ));
            }
            if let Some(a) = f
                .and_then(|f| f.arguments.as_deref())
                .filter(|a| !a.is_empty())
            {
                if let Some((Open::Call { id, args, .. }, oi)) = &mut self.open {
                    args.push_str(a);
                    let (id, oi) = (id.clone(), *oi);
                    self.ev(
                        &mut out,
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": oi, "delta": a}),
                    );
                }
            }
        }
        if let Some(f) = &c.finish_reason {
            self.finish = Some(f.clone());
        }
        out
    }

    /// Closes the open item and sends `response.completed` (or `response.incomplete`).
    pub fn finish(&mut self, usage: Option<Usage>) -> Vec<Event> {
        let mut out = Vec::new();
        self.close(&mut out);
        let (status, incomplete) = status_of(self.finish.as_deref());
        let r = response_json(
            &self.meta,
            status,
            std::mem::take(&mut self.output),
            usage.as_ref(),
            incomplete,
            Value::Null,
        );
        let name = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.ev(&mut out, name, json!({"response": r}));
        out
    }

    /// A mid-stream failure: an `error` event, then `response.failed`.
    pub fn fail(&mut self, code: &str, message: &str) -> Vec<Event> {
        let mut out = Vec::new();
        self.ev(
            &mut out,
            "error",
            json!({"code": code, "message": message, "param": null}),
        );
        let r = response_json(
            &self.meta,
            "failed",
            std::mem::take(&mut self.output),
            None,
            Value::Null,
            json!({"code": code, "message": message}),
        );
        self.ev(&mut out, "response.failed", json!({"response": r}));
        out
    }
}
