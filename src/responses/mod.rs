//! OpenAI Responses API wire format (`POST /v1/responses`): input items → the internal model, and
//! the internal answer → a `response` object or the `response.*` SSE event sequence.
//!
//! Kimi has no Responses endpoint, so every Responses request is translated to chat; reasoning
//! comes back as a `reasoning` item (raw `reasoning_text`, or `summary_text` when the client asked
//! for a summary) and is replayed from `reasoning` input items as `reasoning_content`.

pub mod inbound;
pub mod outbound;

pub use inbound::{parse_responses_request, ResponsesOptions};
