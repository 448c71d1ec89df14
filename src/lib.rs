//! tollgate library crate: module registry.
pub mod billing;
pub mod http;
pub mod store;
