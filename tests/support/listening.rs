//! Readiness of a spawned `tollgate serve --listen 127.0.0.1:0`: the address it bound, read from
//! its own "listening on ADDR" log line.
//!
//! Picking a free port in the test and probing it with a TCP connect is racy: another test can take
//! the port between the pick and the bind, and on loopback a connect to a port nobody listens on
//! can even succeed by connecting to itself (TCP simultaneous open), so the probe passes before the
//! server is up. Letting the kernel choose when the server binds and reading back the address
//! the server reports has neither problem. Shared by several test crates via `#[path]`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// What `serve` logs (at `info`) once its listener is bound.
const MARK: &str = "listening on ";

/// The address in the first "listening on ADDR" line of `log`, if there is one yet.
pub fn bound_addr(log: &str) -> Option<SocketAddr> {
    let rest = &log[log.find(MARK)? + MARK.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Waits until the child logs where it listens (its stderr must go to `log`, with `info` not
/// filtered out). Only the log after byte `from` counts (the log's length before the spawn, when
/// earlier runs appended to the same file). Panics with the log if the child exits first or
/// `timeout` passes.
pub fn wait_listening(child: &mut Child, log: &Path, from: usize, timeout: Duration) -> SocketAddr {
    let deadline = Instant::now() + timeout;
    loop {
        let all = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(all.get(from..).unwrap_or_default());
        if let Some(addr) = bound_addr(&text) {
            return addr;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tollgate exited with {status} before listening; its log:\n{text}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tollgate did not say where it listens within {timeout:?}; its log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reads_text_and_json_lines() {
    let text = "2026-12-06T23:59:00Z  INFO tollgate::http: listening on 127.0.0.1:41234\n";
    assert_eq!(bound_addr(text), Some("127.0.0.1:41234".parse().unwrap()));
    let json = r#"{"level":"INFO","message":"listening on [::1]:8080","target":"tollgate::http"}"#;
    assert_eq!(bound_addr(json), Some("[::1]:8080".parse().unwrap()));
    assert_eq!(bound_addr("starting\n"), None);
}
