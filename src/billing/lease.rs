//! Lease admission (`[billing] admission = "lease"`): requests are admitted in memory against a
//! durable credit lease, each charge (and the admission of a streamed request) is appended to the
//! local journal before the caller goes on, and a background task writes request records
//! (packed, see `store/pieces.rs`) and aggregated captures in batches.
//!
//! Guarantees (docs/billing.md "Lease admission"):
//! * no overdraft: a lease is a durable hold on the account (and the key's cap) taken before any
//!   request is admitted against it, and admission never exceeds what the lease holds;
//! * exactly once: a request's record and its charge are written in one transaction; a batch
//!   that may have been written before (the journal's replay, a retry after an unknown outcome)
//!   leaves out the records already there, so a replay never charges twice;
//! * `kill -9`: the journal survives (a record is in the page cache once appended); on restart
//!   the instance applies it — finished requests are charged, interrupted streamed ones recorded
//!   `expired` at no charge — and gives back the leases of its previous run. A request answered
//!   in one piece is journaled once, at its end: its client learns its id only from the answer,
//!   so one interrupted before that is never seen, and is neither charged nor recorded;
//! * an instance that never comes back: its leases expire and any sweeper returns what they still
//!   hold; charges in its lost journal are lost (never double-charged), at most one lease slice
//!   per key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};

use super::journal::{Journal, JournalOptions};
use super::service::{BillingError, Hold, Principal};
use crate::store::leases::{GrantOutcome, LeaseFinal, LeaseGrant, MAX_FINALS};
use crate::store::{now_ms, Store, StoreError};

/// One journal record. The row is shared with the queue of rows to write (serde's `rc`: an `Arc`
/// is encoded as what it points to), so journaling a request's end copies nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    /// Admitted: the request's row as it would be if it never finished.
    Hold(Arc<LeaseFinal>),
    /// Finished: the row to write.
    Final(Arc<LeaseFinal>),
}

/// What a request admitted under a lease keeps until it ends: the lease's id, and the book it
/// came from (so its end gives back to that book without looking it up).
#[derive(Clone)]
pub struct Leased {
    pub lease_id: String,
    book: Arc<Book>,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased")
            .field("lease_id", &self.lease_id)
            .finish_non_exhaustive()
    }
}

/// An account's lease (or a capped key's) as this instance sees it.
struct Book {
    state: StdMutex<BookState>,
    /// Serializes what talks to the database about the lease (taking, topping up, renewing after
    /// a lapse, giving it back). Admission from credit the lease already holds never waits on it.
    slow: Mutex<()>,
}

struct BookState {
    lease_id: Option<String>,
    /// Credit of the lease not promised to a request in flight (never negative).
    free: i64,
    in_flight: u64,
    last_used: Instant,
    /// Admission against the lease stops here unless it is renewed (its database expiry is
    /// `ttl` after the last renewal; this leaves a third of it as margin).
    valid_until: Instant,
    /// A request is topping the lease up: admission waits for it (so `free` only grows meanwhile
    /// and the grant it asked for is enough).
    refilling: bool,
}

impl Book {
    fn lock(&self) -> std::sync::MutexGuard<'_, BookState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `amount` from the lease's free credit, if it is valid and has enough.
    fn take(&self, amount: i64, now: Instant) -> Option<String> {
        let mut b = self.lock();
        if b.refilling || now >= b.valid_until || b.free < amount {
            return None;
        }
        let id = b.lease_id.clone()?;
        b.free -= amount;
        b.in_flight += 1;
        b.last_used = now;
        Some(id)
    }

    /// Forgets the lease if it is idle (or, with `idle: None`, has nothing in flight) and returns
    /// its id, to be given back.
    fn close_if_idle(&self, idle: Option<Duration>) -> Option<String> {
        let mut b = self.lock();
        if b.in_flight > 0 || idle.is_some_and(|d| b.last_used.elapsed() < d) {
            return None;
        }
        b.free = 0;
        b.lease_id.take()
    }
}

#[derive(Default)]
struct Queue {
    /// The last journal sequence number appended.
    last_seq: u64,
    /// Requests in flight: id → sequence number of their hold record (if journaled).
    open: HashMap<String, Option<u64>>,
    /// Finished, not yet written: their journal sequence numbers and row.
    /// Shared, so the writer takes a batch under the lock without copying rows there.
    pending: Vec<(Seqs, Arc<LeaseFinal>)>,
    /// A write of `pending`'s front was started and is not known to have committed (it failed,
    /// timed out, was dropped, or is still running): the next write checks which rows the
    /// database has (see [`Store::apply_lease_finals`]).
    unsure: bool,
}

impl Queue {
    /// Every journal record up to this sequence number is reflected in the database. The
    /// records that are not: an open request's hold, a pending row's end and hold (a row leaves
    /// `pending` once its transaction has committed). Scanned once per checkpoint, instead of
    /// keeping an ordered set that every request would update.
    fn applied_upto(&self) -> u64 {
        let pending = self
            .pending
            .iter()
            .flat_map(|((end, hold), _)| std::iter::once(*end).chain(*hold));
        let open = self.open.values().flatten().copied();
        match pending.chain(open).min() {
            Some(first) => first.saturating_sub(1),
            None => self.last_seq,
        }
    }
}

/// A finished request's journal sequence numbers: its final record's, and its hold record's when
/// its admission was journaled.
type Seqs = (u64, Option<u64>);

/// The lease admission machinery of one instance.
pub struct Leases {
    store: Store,
    owner: String,
    slice: i64,
    ttl: Duration,
    journal: Journal<Entry>,
    /// The books in use: an account's by its id, and a capped key's by its own (see [`book_of`]).
    books: StdMutex<[HashMap<String, Arc<Book>>; 2]>,
    queue: StdMutex<Queue>,
    /// One batch writer at a time (the background task, or a read that needs every charge).
    writer: Mutex<()>,
    last_checkpoint: StdMutex<Instant>,
    wake: Notify,
    /// Held for the life of the process: one instance per journal directory.
    _lock: std::fs::File,
}

fn io_err(e: impl std::fmt::Display) -> BillingError {
    BillingError::Store(StoreError::Invariant(format!("billing journal: {e}")))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// The background writer starts at most one batch this often unless a full batch waits. Rows
/// wait in memory (journaled) meanwhile; reads on this instance write them first. A batch's
/// transaction has a fixed cost (locks, the lease's capture, the commit) that PostgreSQL pays
/// in ~1 ms of its CPU: at 10 ms, ~140 rows a batch at 14k requests/s, that was ~13–15 µs of
/// the database's CPU per request, at 100 ms (and up to [`MAX_BATCH`] rows) ~8.
const BATCH_EVERY: Duration = Duration::from_millis(100);
/// Most rows one batch takes (more wait for the next, which then starts at once). The store
/// cuts a batch into statements of at most [`MAX_FINALS`] rows where it must.
const MAX_BATCH: usize = 2048;
/// The journal's applied segments are deleted at most this often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Idle leases (nothing in flight, nothing admitted for this long) are given back.
const IDLE: Duration = Duration::from_secs(30);

impl Leases {
    /// Opens the journal in `dir` (one instance per directory), applies what it holds from a
    /// previous run, and gives back that run's leases.
    pub async fn open(
        store: Store,
        dir: &Path,
        slice: i64,
        ttl: Duration,
    ) -> Result<Arc<Leases>, BillingError> {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_err)?;
        lock.try_lock().map_err(|_| {
            io_err(format!(
                "{} is in use by another tollgate (one journal directory per instance)",
                dir.display()
            ))
        })?;
        let owner = owner_id(dir)?;
        let (journal, replayed) =
            Journal::<Entry>::open(dir, JournalOptions::default()).map_err(io_err)?;
        if replayed.torn_tails > 0 {
            tracing::warn!(
                torn = replayed.torn_tails,
                "billing journal: dropped a record torn by a crash"
            );
        }
        // The previous run's requests: finished ones as recorded, the others interrupted.
        let mut rows: HashMap<String, LeaseFinal> = HashMap::new();
        let mut last = 0;
        for (seq, e) in replayed.records {
            last = last.max(seq);
            match e {
                Entry::Hold(f) => {
                    rows.entry(f.id.clone())
                        .or_insert_with(|| Arc::unwrap_or_clone(f).expired("interrupted"));
                }
                Entry::Final(f) => {
                    rows.insert(f.id.clone(), Arc::unwrap_or_clone(f));
                }
            }
        }
        let n = rows.len();
        let mut rows: Vec<Arc<LeaseFinal>> = rows.into_values().map(Arc::new).collect();
        rows.sort_by_key(|r| r.created_at);
        for chunk in rows.chunks(MAX_FINALS) {
            // Some of them may have been written before the crash.
            store.apply_lease_finals(chunk.to_vec(), true).await?;
        }
        for id in store.open_leases_of(&owner).await? {
            store
                .release_lease(&id, None, true, "release", None)
                .await?;
        }
        journal.checkpoint(last).map_err(io_err)?;
        if n > 0 {
            tracing::info!(
                requests = n,
                "billing journal: applied the previous run's records"
            );
        }
        Ok(Arc::new(Leases {
            store,
            owner,
            slice,
            ttl,
            journal,
            books: StdMutex::new([HashMap::new(), HashMap::new()]),
            queue: StdMutex::new(Queue {
                last_seq: last,
                ..Default::default()
            }),
            writer: Mutex::new(()),
            last_checkpoint: StdMutex::new(Instant::now()),
            wake: Notify::new(),
            _lock: lock,
        }))
    }

    /// Starts the writer and the renewer; they stop when the last `Arc` is dropped.
    pub fn spawn(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                let wait = me.wake.notified();
                let started = Instant::now();
                let wrote = me.write_pending().await;
                if wrote && me.checkpoint_due() {
                    // Deleting applied segments can wait on the disk: not on a runtime thread.
                    let me = Arc::clone(&me);
                    tokio::task::spawn_blocking(move || me.checkpoint());
                }
                if wrote {
                    // Off the request path: leave rows a moment to gather, so one transaction
                    // carries many (its fixed cost is most of a small batch's).
                    if !me.batch_full() {
                        tokio::time::sleep(BATCH_EVERY.saturating_sub(started.elapsed())).await;
                    }
                } else {
                    // A missed wake costs at most this delay (the `Arc` is kept that long).
                    let _ = tokio::time::timeout(Duration::from_millis(20), wait).await;
                }
            }
        });
        let weak = Arc::downgrade(self);
        let every = self.ttl / 3;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = me.renew().await {
                    tracing::warn!(error = %e, "could not renew credit leases");
                }
            }
        });
    }

    fn book(&self, p: &Principal) -> Arc<Book> {
        let (kind, id) = book_of(p);
        let mut all = self.books.lock().unwrap_or_else(|e| e.into_inner());
        let books = &mut all[kind as usize];
        if let Some(b) = books.get(id) {
            return b.clone();
        }
        let now = Instant::now();
        let book = Arc::new(Book {
            state: StdMutex::new(BookState {
                lease_id: None,
                free: 0,
                in_flight: 0,
                last_used: now,
                valid_until: now,
                refilling: false,
            }),
            slow: Mutex::new(()),
        });
        books.insert(id.to_string(), book.clone());
        book
    }

    /// Takes `amount` from the key's lease (taking or topping up the lease when it is short) for
    /// one request, which [`Self::register`] then records. Returns the lease it was taken from.
    pub async fn admit(&self, p: &Principal, amount: i64) -> Result<Leased, BillingError> {
        let book = self.book(p);
        let lease_id = match book.take(amount, Instant::now()) {
            Some(id) => id,
            // The slow path's future (a database round trip) lives on the heap, so the common
            // path's future (and every caller's) stays small.
            None => Box::pin(self.refill(p, &book, amount)).await?,
        };
        Ok(Leased { lease_id, book })
    }

    /// Records request `id`, admitted for `amount` under `lease`. `record` (the request's row as
    /// it would be if it never finished) is journaled: pass it when the client can learn the id
    /// before the request ends (a streamed answer), so a crash leaves the request recorded;
    /// without it the admission is kept in memory only. On failure the amount goes back to the
    /// lease.
    pub fn register(
        &self,
        lease: &Leased,
        id: &str,
        amount: i64,
        record: Option<LeaseFinal>,
    ) -> Result<(), BillingError> {
        // Encoded before the lock; checked, journaled and registered under it, so a concurrent
        // `finish` or a duplicate id sees either nothing or all of it.
        let rec = record.map(|mut row| {
            row.lease_id = lease.lease_id.clone();
            Journal::encode(&Entry::Hold(Arc::new(row)))
        });
        let res = rec.transpose().map_err(io_err).and_then(|rec| {
            let mut guard = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let q = &mut *guard;
            if q.open.contains_key(id) {
                return Err(BillingError::DuplicateRequest(id.to_string()));
            }
            let seq = match rec {
                Some(rec) => {
                    let seq = self.journal.append_encoded(rec).map_err(io_err)?;
                    q.last_seq = q.last_seq.max(seq);
                    Some(seq)
                }
                None => None,
            };
            q.open.insert(id.to_string(), seq);
            Ok(())
        });
        if res.is_err() {
            self.give_back(&lease.book, &lease.lease_id, amount, 0);
        }
        res
    }

    /// Returns `amount - charged` of a finished (or refused) request to its lease (unless the
    /// book has moved to another lease meanwhile: the old one's credit is not the new one's).
    fn give_back(&self, book: &Book, lease_id: &str, amount: i64, charged: i64) {
        let mut b = book.lock();
        if b.lease_id.as_deref() == Some(lease_id) {
            b.free += (amount - charged).max(0);
        }
        b.in_flight = b.in_flight.saturating_sub(1);
    }

    /// The slow path of admission, one request per book at a time: renews a lease whose local
    /// validity lapsed (a renewal failed) or forgets it if it was closed meanwhile, then takes
    /// more credit if the lease is short, and admits `amount`.
    async fn refill(
        &self,
        p: &Principal,
        book: &Book,
        amount: i64,
    ) -> Result<String, BillingError> {
        let _slow = book.slow.lock().await;
        // Another request may have topped it up while this one waited.
        if let Some(id) = book.take(amount, Instant::now()) {
            return Ok(id);
        }
        book.lock().refilling = true;
        let res = self.refill_locked(p, book, amount).await;
        let mut b = book.lock();
        b.refilling = false;
        let id = res?;
        // `free` only grew while refilling, so what was granted covers `amount`.
        if b.lease_id.as_deref() != Some(id.as_str()) || b.free < amount {
            return Err(io_err("the lease changed while it was topped up"));
        }
        b.free -= amount;
        b.in_flight += 1;
        b.last_used = Instant::now();
        Ok(id)
    }

    /// [`Self::refill`] under the book's slow lock: returns the lease id once `free >= amount`.
    async fn refill_locked(
        &self,
        p: &Principal,
        book: &Book,
        amount: i64,
    ) -> Result<String, BillingError> {
        let lapsed = {
            let b = book.lock();
            b.lease_id
                .clone()
                .filter(|_| Instant::now() >= b.valid_until)
        };
        if let Some(id) = lapsed {
            let renewed = self
                .store
                .renew_leases(std::slice::from_ref(&id), now_ms() + ms(self.ttl))
                .await?;
            let mut b = book.lock();
            if renewed.is_empty() {
                b.lease_id = None;
                b.free = 0;
            } else {
                b.valid_until = Instant::now() + self.ttl * 2 / 3;
            }
        }
        for _ in 0..2 {
            let (lease_id, free) = {
                let b = book.lock();
                match &b.lease_id {
                    Some(id) if b.free >= amount => return Ok(id.clone()),
                    Some(id) => (Some(id.clone()), b.free),
                    None => (None, 0),
                }
            };
            let capped = p.spend_cap_micros.is_some();
            let g = LeaseGrant {
                lease_id,
                account_id: p.account_id.clone(),
                key_id: capped.then(|| p.key_id.clone()),
                key_capped: capped,
                owner: self.owner.clone(),
                want_micros: self.slice.max(amount) - free,
                min_micros: amount - free,
                expires_at: now_ms() + ms(self.ttl),
            };
            match self.store.grant_lease(&g).await? {
                GrantOutcome::Granted { lease_id, micros } => {
                    let mut b = book.lock();
                    if b.lease_id.as_deref() != Some(lease_id.as_str()) {
                        b.free = 0;
                        b.lease_id = Some(lease_id.clone());
                    }
                    b.free += micros;
                    b.valid_until = Instant::now() + self.ttl * 2 / 3;
                    return Ok(lease_id);
                }
                GrantOutcome::LeaseClosed => {
                    let mut b = book.lock();
                    b.lease_id = None;
                    b.free = 0;
                }
                GrantOutcome::InsufficientCredits { available_micros } => {
                    return Err(BillingError::InsufficientCredits {
                        needed: super::format_usd(amount),
                        available: super::format_usd(available_micros + free.max(0)),
                    })
                }
                GrantOutcome::KeySpendCapReached => return Err(BillingError::KeySpendCapReached),
                GrantOutcome::NoAccount => return Err(BillingError::Unauthorized),
            }
        }
        Err(io_err("the lease was closed twice in a row"))
    }

    /// Records a leased request's end: journals its final row and queues it for the database.
    /// `None` when the request was already finished (nothing written).
    pub fn finish(&self, hold: &Hold, row: LeaseFinal) -> Result<Option<()>, BillingError> {
        let charged = row.cost_micros;
        let row = Arc::new(row);
        let rec = Journal::encode(&Entry::Final(Arc::clone(&row))).map_err(io_err)?;
        {
            // Under the queue lock: a concurrent second `finish` of the same request, or a read
            // of it, sees it either open or pending, never in between.
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let Some(hold_seq) = q.open.get(&hold.request_id).copied() else {
                return Ok(None);
            };
            // Not journaled → stays open: recorded as interrupted (uncharged) at the next start,
            // and its credit stays promised until then.
            let seq = self.journal.append_encoded(rec).map_err(io_err)?;
            q.open.remove(&hold.request_id);
            q.last_seq = q.last_seq.max(seq);
            q.pending.push(((seq, hold_seq), row));
        }
        if let Some(l) = &hold.lease {
            self.give_back(&l.book, &l.lease_id, hold.amount, charged);
        }
        self.wake.notify_one();
        Ok(Some(()))
    }

    fn batch_full(&self) -> bool {
        self.queue
            .lock()
            .map(|q| q.pending.len() >= MAX_BATCH)
            .unwrap_or(false)
    }

    /// A finished request not yet in the database.
    pub fn pending_row(&self, id: &str) -> Option<LeaseFinal> {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.pending
            .iter()
            .find(|(_, f)| f.id == id)
            .map(|(_, f)| LeaseFinal::clone(f))
    }

    /// Writes one batch of finished requests; `false` when there was nothing to write. Rows stay
    /// in `pending` (visible to [`Self::pending_row`]) until their transaction has committed;
    /// one writer at a time takes them from the front.
    async fn write_pending(&self) -> bool {
        let _one = self.writer.lock().await;
        // Under the lock (which every finishing request takes) only the shared rows are taken.
        let (rows, unsure): (Vec<Arc<LeaseFinal>>, bool) = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let n = q.pending.len().min(MAX_BATCH);
            if n == 0 {
                return false;
            }
            let rows = q.pending[..n].iter().map(|(_, f)| Arc::clone(f)).collect();
            // Unsure from here until this write is known to have committed: whatever ends it
            // otherwise (an error, the timeout, this future dropped by a caller that gave up,
            // with the batch already on the writer's thread or its COMMIT sent) leaves the next
            // write to check what the database has.
            (rows, std::mem::replace(&mut q.unsure, true))
        };
        let n = rows.len();
        let res = tokio::time::timeout(
            Duration::from_secs(30),
            self.store.apply_lease_finals(rows, unsure),
        )
        .await;
        match res {
            Ok(Ok(_)) => {
                let written: Vec<_> = {
                    let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                    q.unsure = false;
                    q.pending.drain(..n).collect()
                };
                // The last references to the rows (the store's are gone): freeing a batch of
                // them is not done under the lock that every finishing request takes.
                drop(written);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "writing charged requests failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                false
            }
            Err(_) => {
                tracing::warn!("writing charged requests timed out; retrying");
                false
            }
        }
    }

    /// Whether the journal's applied segments are due for deletion (then it counts as done).
    fn checkpoint_due(&self) -> bool {
        let mut last = self
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let due = last.elapsed() >= CHECKPOINT_EVERY;
        if due {
            *last = Instant::now();
        }
        due
    }

    /// Deletes the journal's segments whose records are all in the database.
    fn checkpoint(&self) {
        let upto = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applied_upto();
        if let Err(e) = self.journal.checkpoint(upto) {
            tracing::warn!(error = %e, "billing journal: checkpoint failed");
        }
    }

    /// Renews this instance's leases and gives back idle ones.
    async fn renew(&self) -> Result<(), BillingError> {
        let books = self.all_books();
        let mut ids = Vec::new();
        for book in &books {
            if book.lock().lease_id.is_none() {
                continue;
            }
            let _slow = book.slow.lock().await;
            if let Some(id) = book.close_if_idle(Some(IDLE)) {
                self.store
                    .release_lease(&id, None, true, "release", None)
                    .await?;
            } else if let Some(id) = book.lock().lease_id.clone() {
                ids.push(id);
            }
        }
        let renewed = self
            .store
            .renew_leases(&ids, now_ms() + ms(self.ttl))
            .await?;
        let until = Instant::now() + self.ttl * 2 / 3;
        for book in &books {
            let mut b = book.lock();
            if b.lease_id.as_ref().is_some_and(|id| renewed.contains(id)) {
                b.valid_until = until;
            }
        }
        Ok(())
    }

    fn all_books(&self) -> Vec<Arc<Book>> {
        let b = self.books.lock().unwrap_or_else(|e| e.into_inner());
        b.iter().flat_map(|m| m.values().cloned()).collect()
    }

    /// Writes what is pending now (reads that must see every answered charge call this first);
    /// gives up after `within`.
    pub async fn write_all_pending(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let empty = self
                .queue
                .lock()
                .map(|q| q.pending.is_empty())
                .unwrap_or(true);
            if empty {
                break;
            }
            if !self.write_pending().await {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Writes everything pending and gives back every lease with nothing in flight (shutdown).
    pub async fn flush(&self) -> Result<(), BillingError> {
        self.write_all_pending(Duration::from_secs(30)).await;
        let upto = {
            let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.applied_upto()
        };
        self.journal.checkpoint(upto).map_err(io_err)?;
        for book in self.all_books() {
            let _slow = book.slow.lock().await;
            if let Some(id) = book.close_if_idle(None) {
                self.store
                    .release_lease(&id, None, true, "release", None)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Which lease a principal's requests use: the account's, shared by its keys; a key with a spend
/// cap has its own, which also reserves against the cap.
fn book_of(p: &Principal) -> (BookKind, &str) {
    if p.spend_cap_micros.is_some() {
        (BookKind::Key, &p.key_id)
    } else {
        (BookKind::Account, &p.account_id)
    }
}

/// Whose credit a book holds: the index of its map in [`Leases`]' books.
#[derive(Clone, Copy)]
enum BookKind {
    Account = 0,
    Key = 1,
}

/// This directory's instance id (kept in `owner`, made on first use).
fn owner_id(dir: &Path) -> Result<String, BillingError> {
    let path: PathBuf = dir.join("owner");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => {
            let id = crate::store::new_id("gw");
            std::fs::write(&path, &id).map_err(io_err)?;
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> Arc<LeaseFinal> {
        Arc::new(LeaseFinal {
            id: id.to_string(),
            lease_id: "lease".to_string(),
            state: "settled".to_string(),
            ..LeaseFinal::default()
        })
    }

    /// A write whose future is dropped once its batch is on the SQLite writer's thread (a caller
    /// that gave up waiting) still commits; the next write of the same rows must check what the
    /// database has, or each request is written and charged twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_dropped_midway_is_not_written_twice() {
        let (dir, store, acct) = crate::store::test_support::funded_file_store().await;
        let leases = Leases::open(
            store.clone(),
            &dir.path().join("journal"),
            100_000,
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
        let lease_id = match store
            .grant_lease(&LeaseGrant {
                lease_id: None,
                account_id: acct.id.clone(),
                key_id: None,
                key_capped: false,
                owner: leases.owner.clone(),
                want_micros: 100_000,
                min_micros: 100_000,
                expires_at: now_ms() + 60_000,
            })
            .await
        {
            Ok(GrantOutcome::Granted { lease_id, .. }) => lease_id,
            other => panic!("grant: {other:?}"),
        };
        {
            let mut q = leases.queue.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..5u64 {
                let f = LeaseFinal {
                    id: format!("d{i}"),
                    lease_id: lease_id.clone(),
                    account_id: acct.id.clone(),
                    state: "settled".to_string(),
                    hold_micros: 1_000,
                    cost_micros: 100,
                    ..LeaseFinal::default()
                };
                q.pending.push(((i + 1, None), Arc::new(f)));
            }
        }
        // Polled once: far enough to hand the batch to the writer's thread; then dropped.
        let mut first = Box::pin(leases.write_pending());
        assert!(futures::poll!(first.as_mut()).is_pending());
        drop(first);
        assert!(leases.write_pending().await, "the rows are written");
        assert!(!leases.write_pending().await, "and no longer pending");
        let rep = store
            .check_ledger(None)
            .await
            .unwrap_or_else(|e| panic!("check: {e}"));
        assert!(rep.is_ok(), "ledger problems: {:#?}", rep.problems);
        assert_eq!(rep.requests, 5);
        let captured: i64 =
            sqlx::query_scalar("SELECT captured_micros FROM credit_leases WHERE id = $1")
                .bind(&lease_id)
                .fetch_one(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(captured, 500, "each charged once");
        store.close().await;
    }

    /// The journal may drop records only below every one not yet in the database: an open
    /// request's hold, and a pending row's end and (older) hold.
    #[test]
    fn applied_upto_stops_below_every_record_not_yet_written() {
        let mut q = Queue {
            last_seq: 9,
            ..Default::default()
        };
        assert_eq!(q.applied_upto(), 9, "nothing outstanding: all applied");
        // Records 3: the hold of a stream still open; 4 and 6: the hold and end of one that
        // finished; 5: the end of a request whose admission was not journaled. "quiet" is open
        // with no journaled hold.
        q.open.insert("streaming".to_string(), Some(3));
        q.open.insert("quiet".to_string(), None);
        q.pending.push(((5, None), row("a")));
        q.pending.push(((6, Some(4)), row("b")));
        assert_eq!(q.applied_upto(), 2);
        q.open.remove("streaming");
        assert_eq!(
            q.applied_upto(),
            3,
            "the finished stream's hold (4) is not written yet"
        );
        q.pending.drain(..1);
        assert_eq!(q.applied_upto(), 3);
        q.pending.clear();
        assert_eq!(q.applied_upto(), 9);
    }
}
