//! Lease-admitted requests' records, packed: a batch's final rows written as one `request_pieces`
//! row per id bucket (the second of the id's UUIDv7), not one `requests` row each.
//!
//! A row per request was most of what billing cost a database under lease admission (on
//! PostgreSQL ~3.4 µs of backend CPU per row: ~0.8 for the row to exist, ~0.7 its primary key,
//! the rest its 30 columns; see BENCHMARKS.md). A piece is one row and one index entry for up to
//! a batch of requests; its value is the requests' records in postcard (a compact serde binary)
//! with their repeated texts (lease, account, key, model, provider, status) written once each.
//!
//! What that gives up, and how it is made up for:
//! * No primary key to make a replayed record a no-op: a batch that may have been written before
//!   (a retry after an unknown outcome, the journal's replay after a crash) is first checked
//!   against the pieces of its ids' buckets (and against `requests`, where earlier versions
//!   wrote lease rows); see [`present_in`]. A batch written for the first time needs no check.
//! * No SQL over single records: [`Store::request_by_id`](super::Store::request_by_id) reads the
//!   one bucket an id can be in ([`bucket_of`]); usage is read from `usage_by_second`, which the
//!   same transaction adds to; the ledger checker decodes every piece, and reports an id written
//!   twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::leases::LeaseFinal;
use super::StoreError;

/// The first byte of a piece: its format.
const FORMAT: u8 = 1;

/// The bucket of a request id: the second (Unix time) of a tollgate id (`req_` and a UUIDv7 in
/// hex), so a piece holds ids of one second; any other id (tests, imports) falls into one of a
/// million negative buckets by a hash of its text.
pub(super) fn bucket_of(id: &str) -> i64 {
    let uuid_secs = id
        .strip_prefix("req_")
        .filter(|hex| hex.len() == 32)
        .and_then(|hex| uuid::Uuid::try_parse(hex).ok())
        .filter(|u| u.get_version_num() == 7)
        .and_then(|u| u.get_timestamp())
        .map(|ts| ts.to_unix().0);
    match uuid_secs.and_then(|s| i64::try_from(s).ok()) {
        Some(s) => s,
        None => {
            // FNV-1a: stable across versions and platforms (std's hasher is not).
            let h = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            -1 - (h % 1_000_000) as i64
        }
    }
}

/// One `request_pieces` row to insert.
#[derive(Debug)]
pub(super) struct Piece {
    pub(super) bucket: i64,
    pub(super) rows: i64,
    pub(super) data: Vec<u8>,
}

/// A record with its texts as indexes into the piece's table of texts.
#[derive(Serialize, Deserialize)]
struct Packed {
    id: u32,
    lease_id: u32,
    account_id: u32,
    key_id: Option<u32>,
    model: u32,
    provider: Option<u32>,
    upstream_model: Option<u32>,
    price_id: Option<i64>,
    state: u32,
    hold_micros: i64,
    hold_expires_at: i64,
    status: Option<u32>,
    http_status: Option<i64>,
    prompt_tokens: i64,
    cached_tokens: i64,
    completion_tokens: i64,
    reasoning_tokens: i64,
    cost_micros: i64,
    computed_cost_micros: i64,
    input_cost_micros: i64,
    cached_cost_micros: i64,
    output_cost_micros: i64,
    network_cost_micros: i64,
    estimated: bool,
    delivered: bool,
    latency_ms: Option<i64>,
    created_at: i64,
    finished_at: i64,
}

#[derive(Serialize, Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    texts: Vec<&'a str>,
    records: Vec<Packed>,
}

/// The texts of one piece, each stored once.
#[derive(Default)]
struct Texts<'a> {
    list: Vec<&'a str>,
    index: HashMap<&'a str, u32>,
}

impl<'a> Texts<'a> {
    fn of(&mut self, t: &'a str) -> u32 {
        let next = self.list.len() as u32;
        *self.index.entry(t).or_insert_with(|| {
            self.list.push(t);
            next
        })
    }

    fn opt(&mut self, t: Option<&'a str>) -> Option<u32> {
        t.map(|t| self.of(t))
    }
}

fn encode(finals: &[&LeaseFinal]) -> Result<Vec<u8>, StoreError> {
    let mut texts = Texts::default();
    let records = finals
        .iter()
        .map(|f| Packed {
            id: texts.of(&f.id),
            lease_id: texts.of(&f.lease_id),
            account_id: texts.of(&f.account_id),
            key_id: texts.opt(f.key_id.as_deref()),
            model: texts.of(&f.model),
            provider: texts.opt(f.provider.as_deref()),
            upstream_model: texts.opt(f.upstream_model.as_deref()),
            price_id: f.price_id,
            state: texts.of(&f.state),
            hold_micros: f.hold_micros,
            hold_expires_at: f.hold_expires_at,
            status: texts.opt(f.status.as_deref()),
            http_status: f.http_status,
            prompt_tokens: f.prompt_tokens,
            cached_tokens: f.cached_tokens,
            completion_tokens: f.completion_tokens,
            reasoning_tokens: f.reasoning_tokens,
            cost_micros: f.cost_micros,
            computed_cost_micros: f.computed_cost_micros,
            input_cost_micros: f.input_cost_micros,
            cached_cost_micros: f.cached_cost_micros,
            output_cost_micros: f.output_cost_micros,
            network_cost_micros: f.network_cost_micros,
            estimated: f.estimated,
            delivered: f.delivered,
            latency_ms: f.latency_ms,
            created_at: f.created_at,
            finished_at: f.finished_at,
        })
        .collect();
    let body = Body {
        texts: texts.list,
        records,
    };
    let mut out = vec![FORMAT];
    postcard::to_io(&body, &mut out).map_err(|e| StoreError::Invariant(format!("piece: {e}")))?;
    Ok(out)
}

/// The records of a piece.
pub(super) fn decode(data: &[u8]) -> Result<Vec<LeaseFinal>, StoreError> {
    let bad = |why: String| StoreError::Invariant(format!("request piece: {why}"));
    let Some((&FORMAT, rest)) = data.split_first() else {
        return Err(bad(format!("unknown format {:?}", data.first().copied())));
    };
    let body: Body<'_> = postcard::from_bytes(rest).map_err(|e| bad(e.to_string()))?;
    let text = |i: u32| {
        body.texts
            .get(i as usize)
            .map(|t| t.to_string())
            .ok_or_else(|| bad(format!("text {i} of {}", body.texts.len())))
    };
    let opt = |i: Option<u32>| i.map(text).transpose();
    body.records
        .iter()
        .map(|p| {
            Ok(LeaseFinal {
                id: text(p.id)?,
                lease_id: text(p.lease_id)?,
                account_id: text(p.account_id)?,
                key_id: opt(p.key_id)?,
                model: text(p.model)?,
                provider: opt(p.provider)?,
                upstream_model: opt(p.upstream_model)?,
                price_id: p.price_id,
                state: text(p.state)?,
                hold_micros: p.hold_micros,
                hold_expires_at: p.hold_expires_at,
                status: opt(p.status)?,
                http_status: p.http_status,
                prompt_tokens: p.prompt_tokens,
                cached_tokens: p.cached_tokens,
                completion_tokens: p.completion_tokens,
                reasoning_tokens: p.reasoning_tokens,
                cost_micros: p.cost_micros,
                computed_cost_micros: p.computed_cost_micros,
                input_cost_micros: p.input_cost_micros,
                cached_cost_micros: p.cached_cost_micros,
                output_cost_micros: p.output_cost_micros,
                network_cost_micros: p.network_cost_micros,
                estimated: p.estimated,
                delivered: p.delivered,
                latency_ms: p.latency_ms,
                created_at: p.created_at,
                finished_at: p.finished_at,
            })
        })
        .collect()
}

/// A batch's records as pieces, one per bucket, in bucket order.
pub(super) fn pack(finals: &[Arc<LeaseFinal>]) -> Result<Vec<Piece>, StoreError> {
    let mut by_bucket: BTreeMap<i64, Vec<&LeaseFinal>> = BTreeMap::new();
    for f in finals {
        by_bucket.entry(bucket_of(&f.id)).or_default().push(f);
    }
    by_bucket
        .into_iter()
        .map(|(bucket, fs)| {
            Ok(Piece {
                bucket,
                rows: fs.len() as i64,
                data: encode(&fs)?,
            })
        })
        .collect()
}

/// The distinct buckets of a batch's ids.
pub(super) fn buckets_of(finals: &[Arc<LeaseFinal>]) -> Vec<i64> {
    let mut b: Vec<i64> = finals.iter().map(|f| bucket_of(&f.id)).collect();
    b.sort_unstable();
    b.dedup();
    b
}

/// The ids of `finals` already written: in one of `pieces` (those of the batch's buckets), or
/// among `rows` (ids found in `requests`).
pub(super) fn present_in(
    finals: &[Arc<LeaseFinal>],
    pieces: &[Vec<u8>],
    rows: impl IntoIterator<Item = String>,
) -> Result<HashSet<String>, StoreError> {
    let wanted: HashSet<&str> = finals.iter().map(|f| f.id.as_str()).collect();
    let mut found: HashSet<String> = rows.into_iter().collect();
    for data in pieces {
        for f in decode(data)? {
            if wanted.contains(f.id.as_str()) {
                found.insert(f.id);
            }
        }
    }
    Ok(found)
}

/// The pieces of one bucket.
pub(super) const PIECES_OF_BUCKET: &str = "SELECT data FROM request_pieces WHERE bucket = $1";

/// The insert of one piece.
pub(super) const INSERT_PIECE: &str =
    "INSERT INTO request_pieces (bucket, rows, data, written_at) VALUES ($1, $2, $3, $4)";

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, key: Option<&str>, cost: i64) -> Arc<LeaseFinal> {
        Arc::new(LeaseFinal {
            id: id.to_string(),
            lease_id: "lease_1".to_string(),
            account_id: "acct_1".to_string(),
            key_id: key.map(str::to_string),
            model: "kimi-k2.6".to_string(),
            provider: Some("moonshot".to_string()),
            upstream_model: None,
            price_id: Some(7),
            state: "settled".to_string(),
            hold_micros: 50_000,
            hold_expires_at: 1_800_000_000_000,
            status: Some("ok".to_string()),
            http_status: Some(200),
            prompt_tokens: 12,
            cached_tokens: 3,
            completion_tokens: 40,
            reasoning_tokens: 9,
            cost_micros: cost,
            computed_cost_micros: cost + 1,
            input_cost_micros: -1,
            cached_cost_micros: 0,
            output_cost_micros: i64::MAX,
            network_cost_micros: i64::MIN,
            estimated: true,
            delivered: false,
            latency_ms: None,
            created_at: 1_764_000_000_123,
            finished_at: 1_764_000_000_456,
        })
    }

    /// Every field comes back as written, texts shared between records or not.
    #[test]
    fn a_piece_decodes_to_its_records() {
        let finals = [
            rec("req_a", Some("key_1"), 100),
            rec("req_b", None, 0),
            rec("req_c", Some("key_2"), 7),
        ];
        let refs: Vec<&LeaseFinal> = finals.iter().map(|f| &**f).collect();
        let data = encode(&refs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(data[0], FORMAT);
        let back = decode(&data).unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<LeaseFinal> = finals.iter().map(|f| LeaseFinal::clone(f)).collect();
        assert_eq!(back, want);
        // The shared texts are stored once: far less than the texts written out per record.
        let single = encode(&refs[..1]).unwrap_or_else(|e| panic!("{e}")).len();
        assert!(data.len() < 3 * single - 60, "{} vs {single}", data.len());
    }

    #[test]
    fn a_damaged_piece_is_an_error_not_records() {
        let data = encode(&[&rec("req_a", None, 1)]).unwrap_or_else(|e| panic!("{e}"));
        assert!(decode(&data[..data.len() - 3]).is_err(), "cut short");
        let mut other = data.clone();
        other[0] = 9;
        assert!(decode(&other).is_err(), "unknown format");
        assert!(decode(&[]).is_err());
    }

    /// A tollgate id's bucket is its second; other ids fall in negative buckets, stably.
    #[test]
    fn buckets_are_the_ids_seconds() {
        let u = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            1_764_000_123,
            456_000_000,
        ));
        let id = format!("req_{}", u.simple());
        assert_eq!(bucket_of(&id), 1_764_000_123);
        assert!(bucket_of(&format!("req_{}", uuid::Uuid::now_v7().simple())) > 1_700_000_000);
        let v4 = format!("req_{}", uuid::Uuid::new_v4().simple());
        for other in ["a0", "req_x", v4.as_str(), ""] {
            let b = bucket_of(other);
            assert!((-1_000_000..0).contains(&b), "{other}: {b}");
            assert_eq!(b, bucket_of(other));
        }
        assert_ne!(bucket_of("a0"), bucket_of("a1"));
    }

    /// A batch is cut by bucket; the presence check finds ids in pieces and in rows.
    #[test]
    fn pack_cuts_by_bucket_and_presence_is_found() {
        let finals = vec![rec("a1", None, 1), rec("a2", None, 1), rec("a1x", None, 1)];
        let pieces = pack(&finals).unwrap_or_else(|e| panic!("{e}"));
        let total: i64 = pieces.iter().map(|p| p.rows).sum();
        assert_eq!(total, 3);
        assert_eq!(
            pieces.iter().map(|p| p.bucket).collect::<Vec<_>>(),
            buckets_of(&finals)
        );
        let first = pieces
            .iter()
            .find(|p| decode(&p.data).is_ok_and(|r| r.iter().any(|f| f.id == "a1")))
            .map(|p| p.data.clone())
            .unwrap_or_else(|| panic!("a1 in no piece"));
        let found =
            present_in(&finals, &[first], ["a2".to_string()]).unwrap_or_else(|e| panic!("{e}"));
        assert!(found.contains("a1") && found.contains("a2"), "{found:?}");
    }
}
