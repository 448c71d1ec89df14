//! OpenAI Chat Completions wire format: parsing requests into the internal model and writing
//! responses, chunks, errors and model cards in OpenAI's exact shape.

pub mod chat;
pub mod wire;

pub use chat::parse_chat_request;
