//! An SSRF-safe fetcher for media URLs tollgate must inline for an upstream (e.g. an https image
//! URL sent to Moonshot, which reads only data URIs).
//!
//! Every hop: the host is resolved once, every resolved address is checked (private, loopback,
//! link-local, metadata, CGNAT, multicast, reserved, and the IPv6 forms that embed IPv4: mapped,
//! compatible, NAT64, 6to4; Teredo refused), and the connection is pinned to the checked address so
//! DNS cannot rebind between check and connect. Redirects are followed by hand and re-checked. Size
//! and time are capped. Tests may allow specific loopback `ip:port` pairs explicitly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::timeout;

/// Why a fetch was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("invalid media URL: {0}")]
    BadUrl(String),
    #[error("refused to fetch {url}: {reason}")]
    Refused { url: String, reason: String },
    #[error("the media at {0} is larger than the limit of {1} bytes")]
    TooLarge(String, usize),
    #[error("fetching {0} timed out")]
    Timeout(String),
    #[error("fetching {0} failed with HTTP {1}")]
    Status(String, u16),
    #[error("fetching {0} failed: {1}")]
    Network(String, String),
    #[error("too many redirects fetching {0}")]
    TooManyRedirects(String),
}

/// Limits of one fetch.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    pub max_bytes: usize,
    pub timeout: Duration,
    pub max_redirects: u8,
    /// Test-only: exact `ip:port` pairs allowed although their address is forbidden.
    pub allow: Vec<SocketAddr>,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            max_bytes: 10 * 1024 * 1024,
            timeout: Duration::from_secs(15),
            max_redirects: 3,
            allow: Vec::new(),
        }
    }
}

impl FetchPolicy {
    /// The default policy plus the test-only allowlist in `TOLLGATE_TEST_FETCH_ALLOW`
    /// (comma-separated `ip:port`), which integration tests use to reach a loopback fake server.
    pub fn from_env() -> FetchPolicy {
        let mut p = FetchPolicy::default();
        if let Ok(v) = std::env::var("TOLLGATE_TEST_FETCH_ALLOW") {
            p.allow = v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
            if !p.allow.is_empty() {
                tracing::warn!(allow = ?p.allow, "TOLLGATE_TEST_FETCH_ALLOW is set: the media fetcher may reach these addresses (tests only)");
            }
        }
        p
    }
}

/// Fetched media.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub content_type: String,
    pub bytes: Vec<u8>,
}

fn v4_forbidden(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || o[0] >= 240
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
}

fn v6_forbidden(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_forbidden(v4);
    }
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // IPv4-compatible ::a.b.c.d (deprecated) and NAT64 64:ff9b::/96.
    if s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return ip.is_unspecified() || ip.is_loopback() || v4_forbidden(embedded(s[6], s[7]));
    }
    // 6to4 2002:AABB:CCDD::/48 embeds AA.BB.CC.DD.
    if s[0] == 0x2002 {
        return v4_forbidden(embedded(s[1], s[2]));
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] == 0x2001 && s[1] == 0) // Teredo
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local
}

/// Whether an address must never be fetched from (private, loopback, link-local incl. the
/// 169.254.169.254 metadata service, reserved, and IPv6 forms embedding such IPv4 addresses).
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => v6_forbidden(v6),
    }
}

/// The SSRF-safe fetcher.
#[derive(Debug, Clone, Default)]
pub struct Fetcher {
    policy: FetchPolicy,
}

impl Fetcher {
    pub fn new(policy: FetchPolicy) -> Fetcher {
        Fetcher { policy }
    }

    /// Resolves `url`'s host once and returns the address to pin, or why it is refused.
    async fn resolve(&self, url: &reqwest::Url) -> Result<SocketAddr, FetchError> {
        let text = url.to_string();
        let host = url
            .host_str()
            .ok_or_else(|| FetchError::BadUrl(text.clone()))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| FetchError::BadUrl(text.clone()))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => timeout(self.policy.timeout, tokio::net::lookup_host((bare, port)))
                .await
                .map_err(|_| FetchError::Timeout(text.clone()))?
                .map_err(|e| {
                    FetchError::Network(text.clone(), format!("cannot resolve {bare}: {e}"))
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(FetchError::Network(
                text,
                format!("{bare} has no addresses"),
            ));
        }
        // Every address must be allowed: otherwise a name with one public and one private address
        // could be used to reach the private one.
        for a in &addrs {
            if is_forbidden(a.ip()) && !self.policy.allow.contains(a) {
                return Err(FetchError::Refused {
                    url: text,
                    reason: format!(
                        "{} is a private, loopback, link-local or reserved address",
                        a.ip()
                    ),
                });
            }
        }
        Ok(addrs[0])
    }

    /// Fetches `url` (http or https), following up to `max_redirects` redirects, each re-checked.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchError> {
        let whole = async {
            let mut url =
                reqwest::Url::parse(url).map_err(|e| FetchError::BadUrl(format!("{url}: {e}")))?;
            for _ in 0..=self.policy.max_redirects {
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(FetchError::Refused {
                        url: url.to_string(),
                        reason: "only http and https URLs are fetched".into(),
                    });
                }
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(FetchError::Refused {
                        url: url.to_string(),
                        reason: "URLs with credentials are not fetched".into(),
                    });
                }
                let addr = self.resolve(&url).await?;
                let host = url.host_str().unwrap_or("").to_string();
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .resolve(&host, addr)
                    .connect_timeout(self.policy.timeout)
                    .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| FetchError::Network(url.to_string(), e.to_string()))?;
                let resp = client
                    .get(url.clone())
                    .send()
                    .await
                    .map_err(|e| FetchError::Network(url.to_string(), e.to_string()))?;
                let status = resp.status();
                if status.is_redirection() {
                    let loc = resp
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| FetchError::Status(url.to_string(), status.as_u16()))?;
                    url = url
                        .join(loc)
                        .map_err(|e| FetchError::BadUrl(format!("{loc}: {e}")))?;
                    continue;
                }
                if !status.is_success() {
                    return Err(FetchError::Status(url.to_string(), status.as_u16()));
                }
                if resp
                    .content_length()
                    .is_some_and(|n| n as usize > self.policy.max_bytes)
                {
                    return Err(FetchError::TooLarge(url.to_string(), self.policy.max_bytes));
                }
                let content_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/octet-stream")
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let mut bytes = Vec::new();
                let mut body = resp.bytes_stream();
                while let Some(part) = body.next().await {
                    let part =
                        part.map_err(|e| FetchError::Network(url.to_string(), e.to_string()))?;
                    if bytes.len() + part.len() > self.policy.max_bytes {
                        return Err(FetchError::TooLarge(url.to_string(), self.policy.max_bytes));
                    }
                    bytes.extend_from_slice(&part);
                }
                return Ok(Fetched {
                    content_type,
                    bytes,
                });
            }
            Err(FetchError::TooManyRedirects(url.to_string()))
        };
        timeout(self.policy.timeout, whole)
            .await
            .map_err(|_| FetchError::Timeout(url.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses() {
        for a in [
            "169.254.169.254",
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "fe80::1",
            "fd00::1",
            "2001::1",
            "::127.0.0.1",
            "224.0.0.1",
        ] {
            let ip: IpAddr = a.parse().expect("ip");
            assert!(is_forbidden(ip), "{a} must be forbidden");
        }
        for a in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            let ip: IpAddr = a.parse().expect("ip");
            assert!(!is_forbidden(ip), "{a} must be allowed");
        }
    }
}
