//! Embedded llama.cpp engine (provider dialect `local`): loads a GGUF, builds prompts, and decodes many requests in one batch.
//!
//! The llama context lives on one dedicated std thread (see [`scheduler`]); [`Engine::submit`]
//! renders and tokenizes on the caller's thread, checks admission (slots + bounded queue) and hands
//! the job over. Events come back on a tokio channel; dropping the receiver cancels the request
//! and frees its slot.

mod grammar;
mod sampler;
mod scheduler;
mod template;
mod text;
pub mod tools;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde_json::Value as Json;
use tokio::sync::mpsc;

pub use grammar::JSON_OBJECT_GBNF;
pub use sampler::SamplingParams;
pub use template::TemplateError;

use grammar::Grammar;
use template::ChatTemplate;

/// Seconds a client should wait before retrying when the engine is full.
pub const OVERLOADED_RETRY_AFTER_SECS: u32 = 1;

/// Engine sizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Compute threads; `None` uses every core of the machine.
    pub threads: Option<usize>,
    /// Sequences decoded together (llama.cpp sequence ids).
    pub slots: usize,
    /// Requests allowed to wait for a slot; more are refused as overloaded.
    pub queue: usize,
    /// KV cells (tokens) per slot: the context window of one request. Clamped to the model's
    /// training context and rounded up to llama.cpp's 256-token granularity.
    pub ctx_per_slot: u32,
    /// Maximum tokens submitted to one llama_decode call.
    pub batch: u32,
    /// Jinja chat template to use instead of the GGUF's own `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            threads: None,
            slots: 8,
            queue: 32,
            ctx_per_slot: 4096,
            batch: 512,
            chat_template: None,
        }
    }
}

/// What the loaded model can do (for the model card).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// `general.name` from the GGUF, when present.
    pub name: Option<String>,
    /// Context window one request gets (prompt + completion).
    pub context_length: u32,
    /// Context length the model was trained with (GGUF metadata).
    pub train_context_length: u32,
    /// The chat template renders tools and tool calls.
    pub supports_tools: bool,
    /// Always false: the engine never produces reasoning content.
    pub supports_reasoning: bool,
    /// `response_format` json_object / json_schema are enforced by grammar.
    pub supports_json: bool,
    /// The GGUF had no usable template and ChatML is used instead.
    pub chat_template_fallback: bool,
    /// Parameter count.
    pub n_params: u64,
    /// Concurrent sequences.
    pub slots: usize,
    /// Waiting requests allowed beyond the slots.
    pub queue: usize,
    /// Compute threads.
    pub threads: usize,
}

/// One chat message as the template sees it (text content only).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text content (parts already joined); `None` for an assistant turn with only tool calls.
    pub content: Option<String>,
    /// Optional participant name.
    pub name: Option<String>,
    /// OpenAI-shaped tool calls of an assistant turn.
    pub tool_calls: Option<Vec<Json>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// Output format constraint.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Json),
}

/// Whether and how the model must call a tool (OpenAI `tool_choice`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (tool calls in its output are recognised).
    #[default]
    Auto,
    /// The model must answer in text; its output is never read as a tool call.
    None,
    /// The model must call one of these functions: sampling is grammar-constrained to a
    /// Hermes-style `<tool_call>{"name": .., "arguments": {..}}</tool_call>`.
    Required(Vec<String>),
}

/// A generation request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// OpenAI tool definitions, passed to the template.
    pub tools: Option<Vec<Json>>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Completion token limit (`None`: until the context window is full).
    pub max_tokens: Option<u32>,
    /// Stop strings; the first match ends generation and is not returned.
    pub stop: Vec<String>,
    /// Output constraint.
    pub response_format: ResponseFormat,
    /// Tool use (only meaningful with `tools`).
    pub tool_choice: ToolChoice,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End of turn or a stop string.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Exact token accounting for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens sampled (the end-of-turn token is not counted).
    pub completion_tokens: u32,
    /// Prompt tokens whose KV was reused from the prefix cache.
    pub cached_tokens: u32,
}

/// An alternative token with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    /// Token text (lossy if the token is a partial UTF-8 sequence).
    pub token: String,
    /// Raw token bytes.
    pub bytes: Vec<u8>,
    /// Natural-log probability.
    pub logprob: f32,
}

/// Log-probability of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Token text (lossy if the token is a partial UTF-8 sequence).
    pub token: String,
    /// Raw token bytes.
    pub bytes: Vec<u8>,
    /// Natural-log probability.
    pub logprob: f32,
    /// Most likely alternatives, best first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// What the engine streams back for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// New text (always valid UTF-8, never splitting a character) and the logprobs of the tokens it completes.
    Delta {
        /// Text to append.
        text: String,
        /// Logprobs, when requested.
        logprobs: Vec<TokenLogprob>,
    },
    /// Generation finished; always the last event of a successful request.
    Done {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Token accounting.
        usage: Usage,
    },
    /// Generation failed; the last event.
    Error(EngineError),
}

/// Engine errors, typed so the gateway can map them to HTTP statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The model could not be loaded (startup/config problem).
    #[error("cannot load model {path}: {reason}")]
    Load {
        /// GGUF path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Every slot and queue place is taken (HTTP 503 `server_overloaded` + Retry-After).
    #[error("the local engine is at capacity ({capacity} requests in flight); retry shortly")]
    Overloaded {
        /// Slots plus queue places.
        capacity: usize,
        /// Suggested wait.
        retry_after_secs: u32,
    },
    /// The request asks for something this model/template cannot do (HTTP 400).
    #[error("{message}")]
    InvalidRequest {
        /// Human-readable reason.
        message: String,
        /// Request parameter at fault.
        param: Option<String>,
    },
    /// Prompt (plus requested output) does not fit the context window (HTTP 400 `context_length_exceeded`).
    #[error("the prompt is {prompt_tokens} tokens but this model's context window is {context_length} tokens")]
    ContextLength {
        /// Prompt size.
        prompt_tokens: usize,
        /// Window size.
        context_length: u32,
    },
    /// The engine thread is gone (HTTP 503).
    #[error("the local engine is not running")]
    Unavailable,
    /// llama.cpp failed while decoding (HTTP 500).
    #[error("local inference failed: {0}")]
    Internal(String),
}

impl EngineError {
    /// Suggested HTTP status.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::InvalidRequest { .. } | Self::ContextLength { .. } => 400,
            Self::Overloaded { .. } | Self::Unavailable => 503,
            Self::Load { .. } | Self::Internal(_) => 500,
        }
    }
}

impl From<TemplateError> for EngineError {
    fn from(e: TemplateError) -> Self {
        let param = match &e {
            TemplateError::Unsupported { param, .. } => Some((*param).to_owned()),
            TemplateError::Render(_) => Some("messages".to_owned()),
        };
        Self::InvalidRequest {
            message: e.to_string(),
            param,
        }
    }
}

/// Decrements the in-flight count when a request ends (however it ends).
#[derive(Debug)]
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request ready for the engine thread.
struct Job {
    prompt: Vec<LlamaToken>,
    sampling: SamplingParams,
    grammar: Option<Grammar>,
    stop: Vec<String>,
    max_tokens: u32,
    tx: mpsc::Sender<EngineEvent>,
    submitted: Instant,
    /// Returned when the job is dropped, or just before its final event is sent (so a client
    /// that has the final event finds the place free again).
    permit: Option<Permit>,
}

struct Inner {
    model: Arc<LlamaModel>,
    template: ChatTemplate,
    info: ModelInfo,
    bos_text: String,
    add_bos: bool,
    bos: LlamaToken,
    jobs: std::sync::mpsc::Sender<Job>,
    in_flight: Arc<AtomicUsize>,
    capacity: usize,
}

/// Handle to a loaded model and its engine thread. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.inner.info)
            .finish()
    }
}

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The process-wide llama.cpp backend (initialised once).
fn backend() -> Result<&'static LlamaBackend, String> {
    BACKEND
        .get_or_init(|| {
            let enabled = std::env::var_os("TOLLGATE_LLAMA_LOG").is_some();
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(enabled),
            );
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Engine {
    /// Loads the GGUF at `path` and starts the engine thread. Blocking (seconds for big models):
    /// call it from `spawn_blocking` inside async code.
    pub fn load(path: &Path, options: EngineOptions) -> Result<Self, EngineError> {
        let load_err = |reason: String| EngineError::Load {
            path: path.to_path_buf(),
            reason,
        };
        if !path.is_file() {
            return Err(load_err("file not found".into()));
        }
        if options.slots == 0 || options.ctx_per_slot < 16 || options.batch == 0 {
            return Err(load_err(
                "slots and batch must be positive and ctx_per_slot at least 16".into(),
            ));
        }
        let backend = backend().map_err(load_err)?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| load_err(e.to_string()))?;
        let model = Arc::new(model);

        let threads = options.threads.filter(|&t| t > 0).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let train_ctx = model.n_ctx_train().max(16);
        let ctx_per_slot = round_up_256(options.ctx_per_slot.min(train_ctx));

        let vocab = model.vocab();
        let piece = |t: LlamaToken| {
            if t.0 < 0 {
                String::new()
            } else {
                String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
            }
        };
        let bos = vocab.bos();
        let bos_text = piece(bos);
        let eos_text = piece(vocab.eos());
        let add_bos = vocab.should_add_bos() && bos.0 >= 0;
        let template_src = options
            .chat_template
            .clone()
            .or_else(|| model.meta_val_str("tokenizer.chat_template").ok());
        let template = ChatTemplate::new(template_src, bos_text.clone(), eos_text);

        let info = ModelInfo {
            name: model.meta_val_str("general.name").ok(),
            context_length: ctx_per_slot,
            train_context_length: train_ctx,
            supports_tools: template.supports_tools(),
            supports_reasoning: false,
            supports_json: true,
            chat_template_fallback: template.is_fallback(),
            n_params: model.n_params(),
            slots: options.slots,
            queue: options.queue,
            threads,
        };

        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let cfg = scheduler::Config {
            slots: options.slots,
            ctx_per_slot,
            batch: options.batch,
            threads,
        };
        let thread_model = Arc::clone(&model);
        std::thread::Builder::new()
            .name("tollgate-engine".into())
            .spawn(move || scheduler::run(thread_model, cfg, jobs_rx, ready_tx))
            .map_err(|e| load_err(format!("cannot start engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(load_err(reason)),
            Err(_) => return Err(load_err("engine thread exited during start-up".into())),
        }

        Ok(Self {
            inner: Arc::new(Inner {
                model,
                template,
                info,
                bos_text,
                add_bos,
                bos,
                jobs: jobs_tx,
                in_flight: Arc::new(AtomicUsize::new(0)),
                capacity: options.slots + options.queue,
            }),
        })
    }

    /// What the model can do.
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// Requests currently decoding or waiting.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Renders and tokenizes the prompt exactly as a request would (for tests and token counting).
    pub fn tokenize_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Json]>,
    ) -> Result<usize, EngineError> {
        Ok(self.prompt_tokens(messages, tools)?.len())
    }

    fn prompt_tokens(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Json]>,
    ) -> Result<Vec<LlamaToken>, EngineError> {
        let inner = &self.inner;
        let text = inner.template.render(messages, tools)?;
        let vocab = inner.model.vocab();
        let mut tokens = vocab.tokenize(text.as_bytes(), false, true);
        let starts_with_bos = !inner.bos_text.is_empty() && text.starts_with(&inner.bos_text);
        if inner.add_bos && !starts_with_bos {
            tokens.insert(0, inner.bos);
        }
        Ok(tokens)
    }

    /// Queues a request. Fails fast with a typed error when the request is invalid for this model,
    /// does not fit, or the engine is full. Non-blocking apart from tokenization.
    pub fn submit(&self, req: GenerateRequest) -> Result<mpsc::Receiver<EngineEvent>, EngineError> {
        let inner = &self.inner;
        let ctx = inner.info.context_length;
        if req.messages.is_empty() {
            return Err(EngineError::InvalidRequest {
                message: "messages must not be empty".into(),
                param: Some("messages".into()),
            });
        }
        let prompt = self.prompt_tokens(&req.messages, req.tools.as_deref())?;
        let room = usize::try_from(ctx).unwrap_or(usize::MAX).saturating_sub(1);
        if prompt.is_empty() || prompt.len() >= room {
            return Err(EngineError::ContextLength {
                prompt_tokens: prompt.len(),
                context_length: ctx,
            });
        }
        let room_left = u32::try_from(room - prompt.len()).unwrap_or(u32::MAX);
        let max_tokens = req.max_tokens.unwrap_or(room_left).min(room_left).max(1);
        let forced_call = match (&req.tool_choice, &req.tools) {
            (ToolChoice::Required(names), Some(t)) if !t.is_empty() => {
                if req.response_format != ResponseFormat::Text {
                    return Err(EngineError::InvalidRequest {
                        message: "a required tool call cannot be combined with response_format"
                            .into(),
                        param: Some("tool_choice".into()),
                    });
                }
                Some(tools::required_call_gbnf(names).map_err(|message| {
                    EngineError::InvalidRequest {
                        message,
                        param: Some("tool_choice".into()),
                    }
                })?)
            }
            _ => None,
        };
        let grammar = match &req.response_format {
            ResponseFormat::Text => forced_call,
            ResponseFormat::JsonObject => Some(JSON_OBJECT_GBNF.to_owned()),
            ResponseFormat::JsonSchema(schema) => Some(grammar::schema_to_gbnf(schema).map_err(
                |e| EngineError::InvalidRequest {
                    message: e.to_string(),
                    param: Some("response_format".into()),
                },
            )?),
        };
        let grammar =
            match grammar {
                Some(g) => Some(Grammar::new(&inner.model, &g).map_err(|e| {
                    EngineError::InvalidRequest {
                        message: e.to_string(),
                        param: Some("response_format".into()),
                    }
                })?),
                None => None,
            };
        if let Some(k) = req.sampling.logprobs {
            if k > 20 {
                return Err(EngineError::InvalidRequest {
                    message: "top_logprobs must be between 0 and 20".into(),
                    param: Some("top_logprobs".into()),
                });
            }
        }

        let capacity = inner.capacity;
        inner
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            })
            .map_err(|_| EngineError::Overloaded {
                capacity,
                retry_after_secs: OVERLOADED_RETRY_AFTER_SECS,
            })?;
        let permit = Permit(Arc::clone(&inner.in_flight));

        // One event per generated token at most, plus the final one: try_send never finds it full.
        let cap = usize::try_from(max_tokens)
            .unwrap_or(usize::MAX)
            .saturating_add(4);
        let (tx, rx) = mpsc::channel(cap);
        let job = Job {
            prompt,
            sampling: req.sampling,
            grammar,
            stop: req.stop,
            max_tokens,
            tx,
            submitted: Instant::now(),
            permit: Some(permit),
        };
        inner.jobs.send(job).map_err(|_| EngineError::Unavailable)?;
        Ok(rx)
    }
}

fn round_up_256(n: u32) -> u32 {
    n.div_ceil(256).saturating_mul(256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctx_rounding() {
        assert_eq!(round_up_256(1), 256);
        assert_eq!(round_up_256(2048), 2048);
        assert_eq!(round_up_256(2049), 2304);
    }

    #[test]
    fn error_statuses() {
        assert_eq!(
            EngineError::Overloaded {
                capacity: 1,
                retry_after_secs: 1
            }
            .http_status(),
            503
        );
        assert_eq!(
            EngineError::ContextLength {
                prompt_tokens: 10,
                context_length: 5
            }
            .http_status(),
            400
        );
    }
}
