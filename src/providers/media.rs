//! Inlines remote media for upstreams that read only data URIs (Moonshot): each `http(s)` image URL
//! is fetched with the SSRF-safe fetcher and replaced by a `data:` URI. Other URLs are untouched.

use std::sync::OnceLock;

use base64::Engine;
use serde_json::{json, Value};

use crate::error::GatewayError;
use crate::gateway::fetch::{FetchPolicy, Fetcher};
use crate::gateway::model::{ChatRequest, Content};

fn fetcher() -> &'static Fetcher {
    static F: OnceLock<Fetcher> = OnceLock::new();
    F.get_or_init(|| Fetcher::new(FetchPolicy::from_env()))
}

fn remote_url(v: &Value) -> Option<&str> {
    let url = match v {
        Value::String(s) => s.as_str(),
        other => other.get("url").and_then(Value::as_str)?,
    };
    (url.starts_with("http://") || url.starts_with("https://")).then_some(url)
}

/// A copy of `req` with remote images inlined, or `None` when there are none.
pub async fn inline_remote_images(req: &ChatRequest) -> Result<Option<ChatRequest>, GatewayError> {
    let any = req.messages.iter().any(|m| match &m.content {
        Some(Content::Parts(ps)) => ps
            .iter()
            .any(|p| p.image_url.as_ref().and_then(remote_url).is_some()),
        _ => false,
    });
    if !any {
        return Ok(None);
    }
    let mut out = req.clone();
    for (i, m) in out.messages.iter_mut().enumerate() {
        let Some(Content::Parts(parts)) = &mut m.content else {
            continue;
        };
        for (j, p) in parts.iter_mut().enumerate() {
            let Some(url) = p
                .image_url
                .as_ref()
                .and_then(remote_url)
                .map(str::to_string)
            else {
                continue;
            };
            let param = format!("messages[{i}].content[{j}].image_url");
            let got = fetcher().fetch(&url).await.map_err(|e| {
                GatewayError::invalid(format!("cannot use image {url}: {e}"), Some(param.clone()))
            })?;
            if !got.content_type.starts_with("image/") {
                return Err(GatewayError::invalid(
                    format!(
                        "{url} is not an image (content-type {:?})",
                        got.content_type
                    ),
                    Some(param),
                ));
            }
            let data = base64::engine::general_purpose::STANDARD.encode(&got.bytes);
            let uri = format!("data:{};base64,{data}", got.content_type);
            let detail = p.image_url.as_ref().and_then(|v| v.get("detail")).cloned();
            let mut iu = json!({"url": uri});
            if let Some(d) = detail {
                iu["detail"] = d;
            }
            p.image_url = Some(iu);
        }
    }
    Ok(Some(out))
}
