//! `GatewayError`: every way a request can fail, independent of HTTP (mapped in `http::error`).

use std::time::Duration;

/// A failure of one request. The HTTP layer turns each variant into a status and an
/// OpenAI-shaped `{"error": {message, type, param, code}}` body; nothing else maps errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The request body is not valid JSON (message names line and column).
    #[error("{message}")]
    InvalidJson { message: String },
    /// The request is well-formed JSON but not a valid request.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("{message}")]
    Unauthorized { message: String },
    #[error("{message}")]
    Forbidden { message: String },
    #[error("{message}")]
    ModelNotFound { message: String },
    #[error("{message}")]
    NotFound { message: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// The client stopped sending its request body for longer than the server waits.
    #[error("the request body stopped arriving for {secs} s")]
    RequestTimeout { secs: u64 },
    /// The caller's balance cannot cover the request's worst case.
    #[error("{message}")]
    InsufficientCredits { message: String },
    /// A tollgate limit refused the request.
    #[error("{message}")]
    RateLimited {
        message: String,
        code: &'static str,
        retry_after: Option<Duration>,
    },
    /// tollgate itself is at capacity (e.g. the local engine's queue is full).
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Duration,
    },
    /// The upstream answered with a 4xx; status and message are passed on, provider named.
    #[error("{}: {}", .0.provider, .0.message)]
    UpstreamRejected(Box<UpstreamRejection>),
    /// The upstream failed (5xx, connection failure, unparseable answer).
    #[error("{provider}: {message}")]
    UpstreamFailed { provider: String, message: String },
    /// The upstream said it is unavailable for now (503 with `Retry-After`): routing waits that
    /// long before trying the route again (or moves on); the client sees a 502 like any 5xx.
    #[error("{provider}: {message}")]
    UpstreamUnavailable {
        provider: String,
        message: String,
        retry_after: Duration,
    },
    /// The upstream did not answer in time.
    #[error("{provider}: {message}")]
    UpstreamTimeout { provider: String, message: String },
    #[error("{message}")]
    Internal { message: String },
}

impl GatewayError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        GatewayError::Internal {
            message: message.into(),
        }
    }

    /// Whether trying another route (or the same one again) could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            GatewayError::UpstreamFailed { .. }
            | GatewayError::UpstreamUnavailable { .. }
            | GatewayError::UpstreamTimeout { .. } => true,
            GatewayError::UpstreamRejected(r) => matches!(r.status, 408 | 409 | 429),
            GatewayError::Overloaded { .. } => true,
            _ => false,
        }
    }
}

/// An upstream's 4xx answer, kept whole so the client sees the upstream's status and message.
#[derive(Debug, Clone)]
pub struct UpstreamRejection {
    pub provider: String,
    pub status: u16,
    pub message: String,
    pub kind: Option<String>,
    pub code: Option<String>,
    pub param: Option<String>,
    pub retry_after: Option<Duration>,
}
