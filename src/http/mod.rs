//! HTTP layer (axum): routers and handlers.
pub mod admin;
