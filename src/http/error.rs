//! The one place `GatewayError` becomes HTTP: status, headers and the OpenAI error body.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::GatewayError;
use crate::openai::wire::{ErrorBody, ErrorObject};

/// Status, OpenAI `type`, `code`, `param` and `Retry-After` for an error.
pub struct ErrorParts<'a> {
    pub status: StatusCode,
    pub kind: &'a str,
    pub code: Option<&'a str>,
    pub param: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub retry_after: Option<std::time::Duration>,
}

pub fn parts(e: &GatewayError) -> ErrorParts<'_> {
    let p = |status, kind, code: Option<&'static str>| ErrorParts {
        status,
        kind,
        code,
        param: None,
        provider: None,
        retry_after: None,
    };
    match e {
        GatewayError::InvalidJson { .. } => p(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("invalid_json"),
        ),
        GatewayError::InvalidRequest { param, code, .. } => ErrorParts {
            param: param.as_deref(),
            ..p(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(code.unwrap_or("invalid_request")),
            )
        },
        GatewayError::Unauthorized { .. } => p(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            Some("invalid_api_key"),
        ),
        GatewayError::Forbidden { .. } => {
            p(StatusCode::FORBIDDEN, "permission_error", Some("forbidden"))
        }
        GatewayError::ModelNotFound { .. } => ErrorParts {
            param: Some("model"),
            ..p(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            )
        },
        GatewayError::NotFound { .. } => p(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("not_found"),
        ),
        GatewayError::PayloadTooLarge { .. } => p(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("payload_too_large"),
        ),
        GatewayError::RequestTimeout { .. } => p(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
        ),
        GatewayError::InsufficientCredits { .. } => p(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            Some("insufficient_credits"),
        ),
        GatewayError::RateLimited {
            code, retry_after, ..
        } => ErrorParts {
            retry_after: *retry_after,
            ..p(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some(code),
            )
        },
        GatewayError::Overloaded { retry_after, .. } => ErrorParts {
            retry_after: Some(*retry_after),
            ..p(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("server_overloaded"),
            )
        },
        GatewayError::UpstreamRejected(r) => ErrorParts {
            status: StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
            kind: r.kind.as_deref().unwrap_or(if r.status == 429 {
                "rate_limit_error"
            } else {
                "invalid_request_error"
            }),
            code: r.code.as_deref(),
            param: r.param.as_deref(),
            provider: Some(&r.provider),
            retry_after: r.retry_after,
        },
        GatewayError::UpstreamFailed { provider, .. } => ErrorParts {
            provider: Some(provider),
            ..p(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_error"),
            )
        },
        GatewayError::UpstreamUnavailable {
            provider,
            retry_after,
            ..
        } => ErrorParts {
            provider: Some(provider),
            retry_after: Some(*retry_after),
            ..p(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_error"),
            )
        },
        GatewayError::UpstreamTimeout { provider, .. } => ErrorParts {
            provider: Some(provider),
            ..p(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                Some("upstream_timeout"),
            )
        },
        GatewayError::Internal { .. } => p(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            Some("internal_error"),
        ),
    }
}

/// The OpenAI-shaped JSON body of an error.
pub fn body(e: &GatewayError) -> Vec<u8> {
    let p = parts(e);
    let message = e.to_string();
    serde_json::to_vec(&ErrorBody {
        error: ErrorObject {
            message: &message,
            kind: p.kind,
            param: p.param,
            code: p.code,
            provider: p.provider,
        },
    })
    .unwrap_or_default()
}

/// Wrapper so handlers can `?` a `GatewayError`.
pub struct ApiError(pub GatewayError);

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let p = parts(&self.0);
        let mut resp = (
            p.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body(&self.0),
        )
            .into_response();
        if let Some(ra) = p.retry_after {
            let secs = ra.as_secs_f64().ceil().max(0.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&ra.as_millis().to_string()) {
                resp.headers_mut().insert("retry-after-ms", v);
            }
        }
        if let Some(provider) = p.provider {
            if let Ok(v) = HeaderValue::from_str(provider) {
                resp.headers_mut().insert("x-tollgate-provider", v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (GatewayError::invalid("x", Some("temperature".into())), 400),
            (
                GatewayError::ModelNotFound {
                    message: "m".into(),
                },
                404,
            ),
            (GatewayError::PayloadTooLarge { limit: 1 }, 413),
            (GatewayError::RequestTimeout { secs: 1 }, 408),
            (
                GatewayError::UpstreamFailed {
                    provider: "p".into(),
                    message: "m".into(),
                },
                502,
            ),
            (
                GatewayError::UpstreamTimeout {
                    provider: "p".into(),
                    message: "m".into(),
                },
                504,
            ),
            (
                GatewayError::UpstreamRejected(Box::new(crate::error::UpstreamRejection {
                    provider: "p".into(),
                    status: 422,
                    message: "m".into(),
                    kind: None,
                    code: None,
                    param: None,
                    retry_after: None,
                })),
                422,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(parts(&e).status.as_u16(), status, "{e:?}");
            let v: serde_json::Value = serde_json::from_slice(&body(&e)).expect("json");
            for k in ["message", "type", "param", "code"] {
                assert!(v["error"].get(k).is_some(), "{k} missing in {v}");
            }
        }
    }
}
