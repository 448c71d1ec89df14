//! tollgate library crate: the gateway's modules (see ARCHITECTURE.md).

pub mod engine;
