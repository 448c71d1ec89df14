//! Shared support for tollgate's integration tests: fake upstream, real-binary harness, SSE helpers.
//!
//! Use from a test crate with `mod support;`. See `fake_upstream` (scenario builder and faults),
//! `tollgate` (config builder; starts `target/.../tollgate serve` on a port the kernel picks, read back by `listening`) and `sse`
//! (parse a response body into frames, fold chunks into one message, normalise ids for comparison).
#![allow(dead_code)]

pub mod fake_upstream;
pub mod listening;
pub mod sse;
pub mod tollgate;
