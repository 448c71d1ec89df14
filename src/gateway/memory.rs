//! Reasoning memory: remembers the reasoning that came with each tool-call turn tollgate served,
//! so that when a client sends the turn back without it (hidden reasoning, a client that drops
//! unknown fields, an Anthropic client with `display: omitted`) it can be restored before the
//! request goes upstream — Moonshot rejects a thinking-mode tool-call turn without it.
//!
//! Entries are scoped to the caller's key (hashed; never stored in clear) and keyed by tool-call
//! id, name and arguments. Memory is bounded (oldest entries evicted first).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use futures::StreamExt;

use super::model::{ChatRequest, ChatResponse, ChunkStream, Role, ToolCall};

/// Total bytes of reasoning text kept.
const MAX_BYTES: usize = 64 * 1024 * 1024;
/// Longest single reasoning text kept.
const MAX_ENTRY: usize = 1024 * 1024;

#[derive(Default)]
struct State {
    map: HashMap<u64, Arc<str>>,
    order: VecDeque<u64>,
    bytes: usize,
}

/// Bounded store of reasoning by (caller, tool call).
#[derive(Default)]
pub struct ReasoningMemory {
    state: Mutex<State>,
}

/// Hasher keys chosen at random once per process, so scopes cannot be precomputed.
fn hasher() -> impl Hasher {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    SEED.get_or_init(RandomState::new).build_hasher()
}

/// A caller scope: a keyed hash of the presented key (or of nothing in open mode).
pub fn scope_of(key: Option<&str>) -> u64 {
    let mut h = hasher();
    "tollgate-scope".hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

fn key_of(scope: u64, call: &ToolCall) -> u64 {
    let mut h = hasher();
    scope.hash(&mut h);
    call.id.hash(&mut h);
    call.function.name.hash(&mut h);
    call.function.arguments.hash(&mut h);
    h.finish()
}

impl ReasoningMemory {
    pub fn new() -> ReasoningMemory {
        ReasoningMemory::default()
    }

    /// Remembers `reasoning` for every call of a tool-call turn.
    pub fn remember(&self, scope: u64, calls: &[ToolCall], reasoning: &str) {
        if calls.is_empty() || reasoning.len() > MAX_ENTRY {
            return;
        }
        let text: Arc<str> = Arc::from(reasoning);
        let Ok(mut s) = self.state.lock() else { return };
        for c in calls {
            let k = key_of(scope, c);
            if let Some(old) = s.map.insert(k, text.clone()) {
                s.bytes -= old.len();
            } else {
                s.order.push_back(k);
            }
            s.bytes += text.len();
        }
        while s.bytes > MAX_BYTES {
            let Some(k) = s.order.pop_front() else { break };
            if let Some(old) = s.map.remove(&k) {
                s.bytes -= old.len();
            }
        }
    }

    /// Remembers the reasoning of a complete answer's tool-call turn.
    pub fn remember_response(&self, scope: u64, resp: &ChatResponse) {
        for c in &resp.choices {
            if let (Some(calls), Some(r)) = (&c.message.tool_calls, &c.message.reasoning_content) {
                self.remember(scope, calls, r);
            }
        }
    }

    /// Fills in missing `reasoning_content` on assistant tool-call messages; returns how many.
    pub fn restore(&self, scope: u64, req: &mut ChatRequest) -> usize {
        let Ok(s) = self.state.lock() else { return 0 };
        let mut n = 0;
        for m in req.messages.iter_mut() {
            if m.role != Role::Assistant || m.reasoning_content.is_some() {
                continue;
            }
            let Some(calls) = &m.tool_calls else { continue };
            if let Some(r) = calls.iter().find_map(|c| s.map.get(&key_of(scope, c))) {
                m.reasoning_content = Some(r.to_string());
                n += 1;
            }
        }
        n
    }

    /// Wraps a stream: collects choice 0's reasoning and tool calls and remembers them at the end.
    pub fn observe(self: &Arc<Self>, scope: u64, stream: ChunkStream) -> ChunkStream {
        let mem = self.clone();
        let mut reasoning = String::new();
        let mut calls: Vec<ToolCall> = Vec::new();
        Box::pin(stream.map(move |item| {
            if let Ok(chunk) = &item {
                for c in chunk.choices.iter().filter(|c| c.index == 0) {
                    if let Some(r) = &c.reasoning {
                        if reasoning.len() + r.len() <= MAX_ENTRY {
                            reasoning.push_str(r);
                        }
                    }
                    for d in &c.tool_calls {
                        let i = d.index as usize;
                        if i > 1024 {
                            continue;
                        }
                        while calls.len() <= i {
                            calls.push(ToolCall {
                                id: String::new(),
                                kind: "function".into(),
                                function: super::model::FunctionCall {
                                    name: String::new(),
                                    arguments: String::new(),
                                },
                            });
                        }
                        if let Some(id) = &d.id {
                            calls[i].id = id.clone();
                        }
                        if let Some(f) = &d.function {
                            if let Some(n) = &f.name {
                                calls[i].function.name.push_str(n);
                            }
                            if let Some(a) = &f.arguments {
                                calls[i].function.arguments.push_str(a);
                            }
                        }
                    }
                    if c.finish_reason.is_some() && !calls.is_empty() && !reasoning.is_empty() {
                        mem.remember(scope, &calls, &reasoning);
                    }
                }
            }
            item
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::model::{FunctionCall, Message};

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "f".into(),
                arguments: "{}".into(),
            },
        }
    }

    #[test]
    fn restores_only_for_the_same_caller() {
        let m = ReasoningMemory::new();
        m.remember(scope_of(Some("k1")), &[call("functions.f:0")], "because");
        let mut req = ChatRequest::default();
        let mut a = Message::new(Role::Assistant, None);
        a.tool_calls = Some(vec![call("functions.f:0")]);
        req.messages.push(a);
        let mut other = req.clone();
        assert_eq!(m.restore(scope_of(Some("k2")), &mut other), 0);
        assert_eq!(m.restore(scope_of(Some("k1")), &mut req), 1);
        assert_eq!(
            req.messages[0].reasoning_content.as_deref(),
            Some("because")
        );
    }
}
