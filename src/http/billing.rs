//! Billing on the request path: authentication by database key, the hold before the upstream
//! call, and settlement after it (inline for complete answers, from the stream's outcome for SSE).

use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use tokio::sync::oneshot;

use super::{presented_key, AppState};
use crate::billing::{Billing, BillingError, Hold, HoldParams, Principal, SettleInput, Usage};
use crate::error::GatewayError;
use crate::gateway::model::Usage as GatewayUsage;
use crate::gateway::usage::{Outcome, OutcomeSink, OutcomeStatus};
use crate::gateway::{Prepared, Served};

/// Maps a billing failure to the gateway's error (and so to HTTP).
pub fn to_gateway_error(e: BillingError) -> GatewayError {
    match e {
        BillingError::Unauthorized => GatewayError::Unauthorized {
            message: "Incorrect API key provided.".into(),
        },
        BillingError::Revoked => GatewayError::Unauthorized {
            message: "This API key has been revoked.".into(),
        },
        BillingError::Forbidden => GatewayError::Forbidden {
            message: e.to_string(),
        },
        BillingError::InsufficientCredits { .. } | BillingError::KeySpendCapReached => {
            GatewayError::InsufficientCredits {
                message: e.to_string(),
            }
        }
        BillingError::NoPrice(_) => GatewayError::InvalidRequest {
            message: e.to_string(),
            param: Some("model".into()),
            code: Some("model_not_priced"),
        },
        BillingError::NotFound(_) => GatewayError::NotFound {
            message: e.to_string(),
        },
        BillingError::Invalid(_) | BillingError::Conflict(_) => {
            GatewayError::invalid(e.to_string(), None)
        }
        BillingError::DuplicateRequest(_) => GatewayError::internal(e.to_string()),
        BillingError::Store(_) | BillingError::Secret(_) => {
            tracing::error!(error = %e, "billing store unavailable; refusing billable traffic");
            GatewayError::Overloaded {
                message: "Billing is temporarily unavailable; please retry.".into(),
                retry_after: std::time::Duration::from_secs(5),
            }
        }
    }
}

/// Authenticates the caller. `Ok(None)` in open mode (`[auth] required = false`: nothing billed).
pub async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Principal>, GatewayError> {
    if !state.config.auth.required {
        return Ok(None);
    }
    let Some(key) = presented_key(headers) else {
        return Err(GatewayError::Unauthorized {
            message: "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.".into(),
        });
    };
    let Some(billing) = &state.billing else {
        return Err(GatewayError::Unauthorized {
            message: "Incorrect API key provided.".into(),
        });
    };
    billing
        .authenticate(key)
        .await
        .map(Some)
        .map_err(to_gateway_error)
}

/// An open hold for one request. Settle it, release it, or turn it into a stream sink; if it is
/// dropped unused (the client went away before anything was sent), it is released in the
/// background.
pub struct Ticket {
    billing: Arc<Billing>,
    hold: Option<Hold>,
}

/// Holds the worst case for `prepared` before any upstream call.
pub async fn hold(
    state: &AppState,
    principal: Option<&Principal>,
    prepared: &Prepared,
    request_id: &str,
    prompt_estimate: u64,
) -> Result<Option<Ticket>, GatewayError> {
    let (Some(p), Some(billing)) = (principal, &state.billing) else {
        return Ok(None);
    };
    let model = &prepared.model;
    let mut providers = crate::providers::routes_of(model).map(|r| r.provider.clone());
    let first = providers.next();
    let cap = u64::from(model.max_output_tokens);
    let max_out = prepared
        .request
        .max_output_tokens
        .map_or(cap, u64::from)
        .min(cap);
    // The local prompt estimate is ~bytes/4; a token covers at least one byte, so bytes (plus a
    // little template overhead) bounds the real count. Hold for that worst case, so the capture
    // (actual usage, capped at the hold) is never cut short by an undercounted prompt.
    let prompt_upper_bound = prompt_estimate.saturating_mul(4).saturating_add(16);
    let params = HoldParams {
        request_id: request_id.to_string(),
        model: model.id.clone(),
        provider: first,
        fallback_providers: providers.collect(),
        prompt_tokens_estimate: prompt_upper_bound,
        max_output_tokens: max_out,
        streamed: prepared.request.stream,
    };
    let hold = billing.hold(p, &params).await.map_err(to_gateway_error)?;
    Ok(Some(Ticket {
        billing: billing.clone(),
        hold: Some(hold),
    }))
}

fn billing_usage(u: &GatewayUsage) -> Usage {
    Usage {
        prompt_tokens: u.prompt_tokens,
        cached_tokens: u.cached_tokens,
        completion_tokens: u.completion_tokens,
        reasoning_tokens: u.reasoning_tokens,
    }
}

/// The charging rules, from a request's outcome:
/// * completed → charge the usage (upstream-reported, else counted locally and `estimated`);
/// * client disconnected, or the upstream failed after the stream started → charge what was
///   delivered to the client (0 if nothing was); the usage of a cut stream is counted locally from
///   the delivered text and marked `estimated` unless the upstream reported it.
fn settle_input(o: &Outcome) -> SettleInput {
    let delivered = o.delivered;
    SettleInput {
        usage: billing_usage(&o.usage),
        delivered,
        estimated: o.estimated,
        provider: Some(o.provider.clone()),
        upstream_model: Some(o.upstream_model.clone()),
        status: o.status.as_str().to_string(),
        http_status: Some(200),
    }
}

async fn settle_logged(billing: &Billing, hold: &Hold, input: &SettleInput) -> Option<u64> {
    match billing.settle(hold, input).await {
        Ok(s) => {
            tracing::debug!(request_id = %hold.request_id, charged_micros = s.charged, state = ?s.state, "settled");
            u64::try_from(s.charged).ok()
        }
        Err(e) => {
            // The hold stays open and is released by the sweeper when it expires.
            tracing::error!(request_id = %hold.request_id, error = %e, "settlement failed");
            None
        }
    }
}

impl Ticket {
    /// Releases the hold (nothing was delivered).
    pub async fn release(mut self, status: &str) {
        if let Some(hold) = self.hold.take() {
            if let Err(e) = self.billing.release(&hold, status).await {
                tracing::error!(request_id = %hold.request_id, error = %e, "release failed");
            }
        }
    }

    /// Settles a complete (non-streamed) answer; returns the charge in micro-USD.
    pub async fn settle_complete(
        mut self,
        served: &Served,
        usage: &GatewayUsage,
        estimated: bool,
    ) -> Option<u64> {
        let hold = self.hold.take()?;
        let input = SettleInput {
            usage: billing_usage(usage),
            delivered: true,
            estimated,
            provider: Some(served.provider.clone()),
            upstream_model: Some(served.upstream_model.clone()),
            status: OutcomeStatus::Completed.as_str().to_string(),
            http_status: Some(200),
        };
        settle_logged(&self.billing, &hold, &input).await
    }

    /// A stream sink that records to `inner` and settles the hold from the stream's outcome;
    /// the receiver gets the charge (for the final usage chunk).
    pub fn into_sink(
        mut self,
        inner: Arc<dyn OutcomeSink>,
    ) -> (Arc<dyn OutcomeSink>, oneshot::Receiver<Option<u64>>) {
        let (tx, rx) = oneshot::channel();
        let sink = BillingSink {
            inner,
            billing: self.billing.clone(),
            hold: Mutex::new(self.hold.take()),
            tx: Mutex::new(Some(tx)),
        };
        (Arc::new(sink), rx)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else { return };
        let billing = self.billing.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    if let Err(e) = billing.release(&hold, "client_disconnected").await {
                        tracing::error!(request_id = %hold.request_id, error = %e, "release failed");
                    }
                });
            }
            Err(_) => tracing::warn!(request_id = %hold.request_id, "hold left to expire"),
        }
    }
}

struct BillingSink {
    inner: Arc<dyn OutcomeSink>,
    billing: Arc<Billing>,
    hold: Mutex<Option<Hold>>,
    tx: Mutex<Option<oneshot::Sender<Option<u64>>>>,
}

impl OutcomeSink for BillingSink {
    fn record(&self, o: Outcome) {
        let input = settle_input(&o);
        self.inner.record(o);
        let hold = self.hold.lock().ok().and_then(|mut h| h.take());
        let tx = self.tx.lock().ok().and_then(|mut t| t.take());
        let Some(hold) = hold else { return };
        let billing = self.billing.clone();
        // Settlement runs on its own task so it completes even when the client is gone.
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    let cost = settle_logged(&billing, &hold, &input).await;
                    if let Some(tx) = tx {
                        let _ = tx.send(cost);
                    }
                });
            }
            Err(_) => {
                tracing::warn!(request_id = %hold.request_id, "no runtime: hold left to expire")
            }
        }
    }
}
