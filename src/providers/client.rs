//! The upstream HTTP client every HTTP dialect sends with: hyper-util's pooled keep-alive client
//! (HTTP/1.1, and HTTP/2 where TLS negotiates it), the provider's fixed headers, per-phase
//! timeouts, and the one mapping of transport failures and non-2xx answers to gateway errors.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;
use tokio::time::{timeout, Instant};

use crate::config::{ProviderConfig, Timeouts};
use crate::error::{GatewayError, UpstreamRejection};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// How much of a non-2xx answer's body is read to find its error message.
const ERROR_BODY_CAP: usize = 1024 * 1024;

/// One provider's connection pool and fixed request parts.
pub struct UpstreamClient {
    client: Client<Connector, Full<Bytes>>,
    uri: Uri,
    /// Headers sent on every request: the provider's own, its credential, and the user agent.
    headers: HeaderMap,
    provider: String,
    timeouts: Timeouts,
}

impl UpstreamClient {
    /// A client that POSTs to `{base_url}{path}`, authenticating with `auth` (header name and
    /// value, marked sensitive so it is never printed) plus any fixed `extra` headers.
    pub fn new(
        cfg: &ProviderConfig,
        path: &str,
        auth: Option<(HeaderName, String)>,
        extra: &[(&'static str, &'static str)],
    ) -> Result<UpstreamClient, String> {
        let name = &cfg.name;
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let key = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("provider {name:?}: header {k:?}: {e}"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|e| format!("provider {name:?}: header {k:?}: {e}"))?;
            headers.insert(key, value);
        }
        for (k, v) in extra {
            headers.insert(*k, HeaderValue::from_static(v));
        }
        if let Some((header, secret)) = auth {
            let mut v = HeaderValue::from_str(&secret).map_err(|_| {
                format!(
                    "provider {name:?}: the API key contains characters not allowed in a header"
                )
            })?;
            v.set_sensitive(true);
            headers.insert(header, v);
        }
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(concat!("tollgate/", env!("CARGO_PKG_VERSION"))),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let uri: Uri = format!("{}{path}", cfg.base_url)
            .parse()
            .map_err(|e| format!("provider {name:?}: base_url {:?}: {e}", cfg.base_url))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(format!(
                    "provider {name:?}: base_url {:?} must start with http:// or https://",
                    cfg.base_url
                ))
            }
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.timeouts.connect));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(UpstreamClient {
            client,
            uri,
            headers,
            provider: cfg.name.clone(),
            timeouts: cfg.timeouts.clone(),
        })
    }

    /// POSTs a JSON body and waits (up to the first-byte timeout) for a 2xx answer's headers; any
    /// other answer becomes the matching gateway error.
    pub async fn post(
        &self,
        body: Vec<u8>,
        stream: bool,
        request_id: &str,
    ) -> Result<Response<Incoming>, GatewayError> {
        let sent = self.client.request(self.request(body, stream, request_id));
        match timeout(self.timeouts.first_byte, sent).await {
            Err(_) => Err(self.timeout_error("no response headers")),
            Ok(r) => self.answer(r).await,
        }
    }

    /// POSTs a JSON body and reads the complete 2xx answer (capped in size) under one timer: the
    /// headers within the total timeout, the body within the idle timeout after them, all of it
    /// within the total timeout. Not the first-byte timeout: a non-streamed answer's headers
    /// usually come only with the finished generation, which for a reasoning model with 16K output
    /// tokens takes minutes; the request's own deadline (`complete_deadline_ms`) bounds the wait.
    /// (One timer, moved on, instead of one per phase: each tokio timer is registered and removed
    /// under the runtime's timer lock.)
    pub async fn complete(
        &self,
        body: Vec<u8>,
        request_id: &str,
        cap: usize,
    ) -> Result<Bytes, GatewayError> {
        let start = Instant::now();
        let end = start + self.timeouts.total;
        let timer = tokio::time::sleep_until(end);
        tokio::pin!(timer);
        let sent = self.client.request(self.request(body, false, request_id));
        let resp = tokio::select! {
            biased;
            r = sent => self.answer(r).await?,
            _ = timer.as_mut() => return Err(self.phase_timeout(end, "no response headers")),
        };
        timer
            .as_mut()
            .reset(end.min(Instant::now() + self.timeouts.idle));
        tokio::select! {
            biased;
            b = read_capped(resp.into_body(), cap) => b.map_err(|e| self.failed(e)),
            _ = timer => Err(self.phase_timeout(end, "response body stalled")),
        }
    }

    fn request(&self, body: Vec<u8>, stream: bool, request_id: &str) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.clone_from(&self.headers);
        h.insert(
            ACCEPT,
            HeaderValue::from_static(if stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
        req
    }

    /// A 2xx answer as it is; anything else as the matching gateway error.
    async fn answer(
        &self,
        r: Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    ) -> Result<Response<Incoming>, GatewayError> {
        match r {
            Err(e) if is_connect_timeout(&e) => Err(self.timeout_error("connect timed out")),
            Err(e) => Err(self.failed(format!("cannot reach the upstream: {}", error_chain(&e)))),
            Ok(resp) if resp.status().is_success() => Ok(resp),
            Ok(resp) => Err(self.upstream_error(resp).await),
        }
    }

    fn phase_timeout(&self, end: Instant, phase: &str) -> GatewayError {
        self.timeout_error(if Instant::now() >= end {
            "overall deadline"
        } else {
            phase
        })
    }

    pub fn timeout_error(&self, what: &str) -> GatewayError {
        GatewayError::UpstreamTimeout {
            provider: self.provider.clone(),
            message: format!("the upstream timed out ({what})"),
        }
    }

    pub fn failed(&self, message: String) -> GatewayError {
        GatewayError::UpstreamFailed {
            provider: self.provider.clone(),
            message,
        }
    }

    /// Turns a non-2xx upstream answer into an error that keeps its status, message and fields.
    async fn upstream_error(&self, resp: Response<Incoming>) -> GatewayError {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| parse_retry_after(s, std::time::SystemTime::now()));
        let body = match timeout(
            self.timeouts.idle,
            read_capped(resp.into_body(), ERROR_BODY_CAP),
        )
        .await
        {
            Ok(Ok(b)) => b,
            _ => Bytes::new(),
        };
        let parsed = parse_error_body(&body);
        let message = parsed.message.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            if text.is_empty() {
                format!("upstream returned HTTP {status}")
            } else {
                text.chars().take(500).collect()
            }
        });
        if (400..500).contains(&status) {
            GatewayError::UpstreamRejected(Box::new(UpstreamRejection {
                provider: self.provider.clone(),
                status,
                message,
                kind: parsed.kind,
                code: parsed.code,
                param: parsed.param,
                retry_after,
            }))
        } else if let (503, Some(retry_after)) = (status, retry_after) {
            GatewayError::UpstreamUnavailable {
                provider: self.provider.clone(),
                message: format!("upstream returned HTTP {status}: {message}"),
                retry_after,
            }
        } else {
            self.failed(format!("upstream returned HTTP {status}: {message}"))
        }
    }
}

/// Reads a body whole, failing once it passes `cap` bytes.
pub async fn read_capped(mut body: Incoming, cap: usize) -> Result<Bytes, String> {
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| format!("reading the upstream answer failed: {}", error_chain(&e)))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > cap {
                return Err(format!("the upstream answer exceeded {cap} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// An error with all its causes, for messages that name the real reason (refused, reset, TLS…).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn is_connect_timeout(e: &hyper_util::client::legacy::Error) -> bool {
    if !e.is_connect() {
        return false;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// The fields of an upstream error body, whichever dialect wrote it (OpenAI's
/// `{"error": {message, type, code, param}}`, Anthropic's `{"type": "error", "error": {type,
/// message}}`, OpenRouter's `metadata.error_type`, or a bare string).
#[derive(Default, Debug, PartialEq)]
struct ParsedError {
    message: Option<String>,
    kind: Option<String>,
    code: Option<String>,
    param: Option<String>,
}

fn parse_error_body(body: &[u8]) -> ParsedError {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return ParsedError::default();
    };
    let e = v.get("error").unwrap_or(&v);
    let s = |k: &str| match e.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    ParsedError {
        message: s("message").or_else(|| e.as_str().map(str::to_string)),
        kind: s("type").or_else(|| {
            e.pointer("/metadata/error_type")
                .and_then(Value::as_str)
                .map(str::to_string)
        }),
        code: s("code"),
        param: s("param"),
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay seconds (fractions accepted, as some
/// providers send them) or an HTTP-date, as the time left until then (zero if it has passed).
fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_or_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past: retry now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn error_bodies_of_every_dialect() {
        let openai = parse_error_body(
            br#"{"error":{"message":"bad","type":"invalid_request_error","code":"context_length_exceeded","param":"messages"}}"#,
        );
        assert_eq!(openai.message.as_deref(), Some("bad"));
        assert_eq!(openai.code.as_deref(), Some("context_length_exceeded"));
        assert_eq!(openai.param.as_deref(), Some("messages"));
        let anthropic = parse_error_body(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(anthropic.kind.as_deref(), Some("overloaded_error"));
        assert_eq!(anthropic.message.as_deref(), Some("Overloaded"));
        let openrouter = parse_error_body(
            br#"{"error":{"code":402,"message":"Insufficient credits","metadata":{"error_type":"x"}}}"#,
        );
        assert_eq!(
            (
                openrouter.message.as_deref(),
                openrouter.code.as_deref(),
                openrouter.kind.as_deref()
            ),
            (Some("Insufficient credits"), Some("402"), Some("x"))
        );
        let bare = parse_error_body(br#"{"error":"nope"}"#);
        assert_eq!(bare.message.as_deref(), Some("nope"));
        assert_eq!(parse_error_body(b"<html>"), ParsedError::default());
    }

    fn cfg(base_url: &str) -> ProviderConfig {
        ProviderConfig {
            name: "p".into(),
            dialect: crate::config::Dialect::Openai,
            base_url: base_url.into(),
            api_key_env: None,
            api_key: Some("sk-secret".into()),
            headers: vec![("x-extra".into(), "1".into())],
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                first_byte: Duration::from_secs(1),
                idle: Duration::from_secs(1),
                total: Duration::from_secs(1),
            },
            kimi_k26_model: None,
        }
    }

    #[test]
    fn builds_for_http_and_https_and_refuses_other_schemes() {
        let auth = || Some((http::header::AUTHORIZATION, "Bearer sk-secret".to_string()));
        let c = UpstreamClient::new(
            &cfg("https://api.example.com/v1"),
            "/chat/completions",
            auth(),
            &[],
        )
        .expect("https");
        assert_eq!(
            c.uri.to_string(),
            "https://api.example.com/v1/chat/completions"
        );
        assert!(c.headers[http::header::AUTHORIZATION].is_sensitive());
        assert_eq!(c.headers["x-extra"], "1");
        assert!(UpstreamClient::new(&cfg("http://127.0.0.1:9/v1"), "/x", auth(), &[]).is_ok());
        assert!(UpstreamClient::new(&cfg("ftp://h/v1"), "/x", auth(), &[]).is_err());
        let bad_key = Some((http::header::AUTHORIZATION, "Bearer a\nb".to_string()));
        assert!(UpstreamClient::new(&cfg("http://h/v1"), "/x", bad_key, &[]).is_err());
    }
}
