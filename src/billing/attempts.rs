//! Records the upstream attempts of requests that failed over, were retried or failed on the
//! request's record in the billing store (an outcome sink wrapped around the gateway's own).

use std::sync::Arc;

use crate::billing::service::Billing;
use crate::gateway::usage::{AttemptResult, Outcome, OutcomeSink};
use crate::store::attempts::AttemptRow;

/// Passes every outcome to `inner`; writes the attempts of those with more than one attempt, or a
/// failed one, to the store on a task of their own (off the response path).
pub struct AttemptsSink {
    pub inner: Arc<dyn OutcomeSink>,
    pub billing: Arc<Billing>,
}

impl OutcomeSink for AttemptsSink {
    fn record(&self, o: Outcome) {
        let worth =
            o.attempts.len() > 1 || o.attempts.iter().any(|a| a.result != AttemptResult::Served);
        if worth {
            let rows = rows(&o);
            let (id, billing) = (o.request_id.clone(), self.billing.clone());
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(async move {
                        if let Err(e) = billing.store().record_attempts(&id, &rows).await {
                            tracing::warn!(request_id = %id, error = %e, "recording attempts failed");
                        }
                    });
                }
                Err(_) => tracing::warn!(request_id = %id, "no runtime: attempts not recorded"),
            }
        }
        self.inner.record(o);
    }
}

fn rows(o: &Outcome) -> Vec<AttemptRow> {
    o.attempts
        .iter()
        .zip(0i64..)
        .map(|(a, n)| AttemptRow {
            n,
            provider: a.provider.clone(),
            upstream_model: a.upstream_model.clone(),
            result: a.result.as_str().to_string(),
            http_status: a.status.map(i64::from),
            started_ms: i64::try_from(a.started_ms).unwrap_or(i64::MAX),
            duration_ms: i64::try_from(a.duration_ms).unwrap_or(i64::MAX),
            error: a.error.clone(),
        })
        .collect()
}
