//! Logging (tracing, text or JSON) and the Prometheus metrics recorder.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber (`RUST_LOG` overrides the default `info`).
///
/// `buffered` (the server) batches `info` and quieter lines, above all the per-request access
/// line, like nginx's `access_log … buffer= flush=`: they are written by a background thread at
/// most [`LOG_FLUSH`] later (or as soon as [`LOG_BUFFER`] bytes are waiting) instead of one
/// `write(2)` per request. `warn` and `error` lines flush what is waiting and are written at once,
/// so order is kept and problems show immediately. [`flush_logs`] writes out the rest at exit.
pub fn init_logging(format: LogFormat, buffered: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if buffered {
        start_flusher();
    }
    // Colour only on a terminal: escape codes in log files are noise, and cost CPU per line.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(LogOut { buffered });
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// How long a buffered log line may wait.
pub const LOG_FLUSH: Duration = Duration::from_millis(100);
/// Buffered bytes that trigger a write before [`LOG_FLUSH`].
pub const LOG_BUFFER: usize = 64 * 1024;

static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Writes out buffered log lines now (the server calls it on its way out).
pub fn flush_logs() {
    let waiting = match PENDING.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(_) => return,
    };
    if !waiting.is_empty() {
        let _ = std::io::stderr().lock().write_all(&waiting);
    }
}

fn start_flusher() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(|| loop {
                std::thread::sleep(LOG_FLUSH);
                flush_logs();
            });
    });
}

/// The log sink: stderr, buffered for quiet levels when `buffered`.
#[derive(Clone, Copy)]
struct LogOut {
    buffered: bool,
}

/// One event's writer (tracing-subscriber formats an event whole, then writes it once).
struct LineOut {
    buffer: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogOut {
    type Writer = LineOut;
    fn make_writer(&'a self) -> LineOut {
        LineOut { buffer: false }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LineOut {
        LineOut {
            buffer: self.buffered && *meta.level() > tracing::Level::WARN,
        }
    }
}

impl Write for LineOut {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if self.buffer {
            let full = match PENDING.lock() {
                Ok(mut p) => {
                    p.extend_from_slice(line);
                    (p.len() >= LOG_BUFFER).then(|| std::mem::take(&mut *p))
                }
                Err(_) => Some(line.to_vec()),
            };
            if let Some(out) = full {
                std::io::stderr().lock().write_all(&out)?;
            }
        } else {
            // Whatever is buffered was logged earlier: out first, then this line.
            let mut err = std::io::stderr().lock();
            if let Ok(mut p) = PENDING.lock() {
                if !p.is_empty() {
                    err.write_all(&p)?;
                    p.clear();
                }
            }
            err.write_all(line)?;
        }
        Ok(line.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process-wide Prometheus recorder (installed once).
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}
