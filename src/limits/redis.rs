//! The Redis backend: every admission, settlement and read is one atomic Lua script
//! (`lua/limits.lua`) evaluated on Redis's clock, so any number of instances share exact limits.
//! The connection is a lazily-connecting `ConnectionManager` that reconnects by itself; every call
//! has a timeout, so a dead Redis costs one timeout per request, never a hang or a crash.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::calendar::Zone;
use super::{
    Clock, Decision, Demand, LimitKind, LimitStatus, LimitsError, Refusal, Scope, ScopeKind,
    Settlement, SystemClock,
};

/// A zone's offset table (see `Zone::offset_table`), tagged with the hour it was computed for.
type OffsetCache = (i64, Arc<Vec<(i64, i64)>>);

const SCRIPT: &str = include_str!("lua/limits.lua");

/// Limiter state in Redis.
pub struct RedisBackend {
    conn: ConnectionManager,
    script: redis::Script,
    zone: Zone,
    timeout: Duration,
    lease_ms: i64,
    /// The zone's offset table, recomputed when this instance's hour changes.
    offsets: Mutex<OffsetCache>,
}

impl RedisBackend {
    pub fn new(
        url: &str,
        zone: Zone,
        timeout: Duration,
        lease: Duration,
    ) -> Result<RedisBackend, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis: {e}"))?;
        Ok(RedisBackend {
            conn,
            script: redis::Script::new(SCRIPT),
            zone,
            timeout,
            lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4),
            offsets: Mutex::new((i64::MIN, Arc::new(Vec::new()))),
        })
    }

    fn offsets(&self) -> Arc<Vec<(i64, i64)>> {
        let now = SystemClock.now_ms();
        let hour = now.div_euclid(3_600_000);
        let mut g = match self.offsets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.0 != hour {
            *g = (hour, Arc::new(self.zone.offset_table(now)));
        }
        g.1.clone()
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        mode: &str,
        scopes: &[Scope],
        request_id: &str,
        tokens: u64,
        cost: u64,
        day: i64,
        month: i64,
        d_tokens: i64,
        d_cost: i64,
    ) -> Result<Vec<i64>, LimitsError> {
        let mut inv = self.script.prepare_invoke();
        for s in scopes {
            inv.key(s.state_key());
        }
        inv.arg(mode)
            .arg(request_id)
            .arg(tokens)
            .arg(cost)
            .arg(self.lease_ms)
            .arg(day)
            .arg(month)
            .arg(d_tokens)
            .arg(d_cost);
        let offs = self.offsets();
        inv.arg(offs.len());
        for (from, off) in offs.iter() {
            inv.arg(*from).arg(*off);
        }
        for s in scopes {
            inv.arg(match s.kind {
                ScopeKind::Key => 0,
                ScopeKind::Account => 1,
            });
            for k in LimitKind::ALL {
                inv.arg(
                    k.of(&s.plan)
                        .map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX)),
                );
            }
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(LimitsError::Redis(e.to_string())),
            Err(_) => Err(LimitsError::Timeout(self.timeout)),
        }
    }

    pub(crate) async fn admit(
        &self,
        scopes: &[Scope],
        d: &Demand,
    ) -> Result<Decision, LimitsError> {
        let v = self
            .run(
                "admit",
                scopes,
                &d.request_id,
                d.tokens,
                d.cost_micros,
                0,
                0,
                0,
                0,
            )
            .await?;
        decode(&v)
    }

    pub(crate) async fn settle(&self, scopes: &[Scope], s: &Settlement) -> Result<(), LimitsError> {
        self.run(
            "settle",
            scopes,
            &s.request_id,
            0,
            0,
            s.day,
            s.month,
            s.tokens_delta,
            s.cost_delta,
        )
        .await
        .map(|_| ())
    }

    pub(crate) async fn peek(&self, scopes: &[Scope]) -> Result<Vec<LimitStatus>, LimitsError> {
        let v = self.run("peek", scopes, "", 0, 0, 0, 0, 0, 0).await?;
        decode(&v).map(|d| d.status)
    }

    /// `PING` with the call timeout.
    pub async fn ping(&self) -> Result<(), LimitsError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        match tokio::time::timeout(self.timeout, cmd.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(LimitsError::Redis(e.to_string())),
            Err(_) => Err(LimitsError::Timeout(self.timeout)),
        }
    }
}

fn scope_kind(v: i64) -> ScopeKind {
    if v == 1 {
        ScopeKind::Account
    } else {
        ScopeKind::Key
    }
}

fn nonneg(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn decode(v: &[i64]) -> Result<Decision, LimitsError> {
    if v.len() < 7 || !(v.len() - 7).is_multiple_of(5) {
        return Err(LimitsError::Malformed(format!(
            "script returned {} values",
            v.len()
        )));
    }
    let refusal = if v[0] == 1 {
        None
    } else {
        Some(Refusal {
            scope: scope_kind(v[1]),
            limit: LimitKind::from_index(v[2])
                .ok_or_else(|| LimitsError::Malformed(format!("limit index {}", v[2])))?,
            max: nonneg(v[3]),
            retry_after_ms: (v[4] >= 0).then(|| nonneg(v[4])),
        })
    };
    let mut status = Vec::with_capacity((v.len() - 7) / 5);
    for c in v[7..].chunks_exact(5) {
        let limit = LimitKind::from_index(c[1])
            .ok_or_else(|| LimitsError::Malformed(format!("limit index {}", c[1])))?;
        let max = nonneg(c[2]);
        let remaining = nonneg(c[3]);
        status.push(LimitStatus {
            scope: scope_kind(c[0]),
            limit,
            max,
            used: max.saturating_sub(remaining),
            remaining,
            reset_ms: nonneg(c[4]),
        });
    }
    Ok(Decision {
        refusal,
        status,
        day: v[5],
        month: v[6],
    })
}
