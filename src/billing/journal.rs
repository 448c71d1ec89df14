//! Local append-only journal: a write-ahead log of records that must outlive a crash of the process
//! between "the client was answered" and "the database has it".
//!
//! Billing appends each request's hold and final charge here before answering the client; a
//! background task applies the records to the database in batches and then calls
//! [`Journal::checkpoint`]. On restart [`Journal::open`] returns every record still on disk, in
//! order, for the caller to apply again (the database side is idempotent by request id).
//!
//! The module is generic over the record type `T` and knows nothing about billing.
//!
//! # Durability
//!
//! Every [`append`](Journal::append) is one `write(2)` of whole lines to a file opened with
//! `O_APPEND`, under a mutex. Once the call returns the bytes are in the kernel page cache, so
//! they survive `kill -9` (or a panic) of the process, but not a power loss or kernel crash.
//! With [`JournalOptions::fsync`] the write is followed by `fdatasync(2)`, which also survives
//! those, at the cost of a disk flush per append. Appends are short blocking syscalls (records are
//! a few hundred bytes); calling them from async code without `spawn_blocking` is acceptable
//! without fsync, and worth reconsidering with it.
//!
//! # On-disk format
//!
//! The directory holds segments named `journal-{first_seq:020}.log` (so lexical order is
//! sequence order), each a sequence of lines
//!
//! ```text
//! {seq} {crc32 of the JSON, 8 lowercase hex digits} {record as one-line JSON}\n
//! ```
//!
//! Sequence numbers are assigned by the journal, strictly increasing across segments and restarts
//! (they may have gaps after a failed append). The CRC is CRC-32/IEEE over the JSON bytes.
//!
//! # Recovery rules
//!
//! * A segment whose **last** line is incomplete (no newline) or fails its checksum is a write torn
//!   by a crash: the tail is dropped (counted in [`Replayed::torn_tails`]) and the file is
//!   truncated to its last good line, so the next open does not see the torn bytes again.
//! * A bad line that is **not** the last of its segment, a line whose checksum matches but whose
//!   JSON does not decode as `T`, or sequence numbers out of order, are [`JournalError::Corrupt`]:
//!   those are not what a crash leaves behind, and skipping them silently would lose charges.
//! * Appends after an open always go to a new segment; old segments are only read and deleted.
//!
//! # Segments and checkpoints
//!
//! An append starts a new segment first if the current one is non-empty and the write would take
//! it past [`JournalOptions::segment_bytes`]. [`Journal::checkpoint`]`(seq)` declares every
//! record with a sequence number `<= seq` applied: it deletes every segment other than the current
//! one whose records are all `<= seq`, and first rotates the current segment when it is non-empty
//! and entirely applied, so an idle journal shrinks to one empty segment (whose name still carries
//! the next sequence number across a restart).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::de::DeserializeOwned;
use serde::Serialize;

const SEGMENT_PREFIX: &str = "journal-";
const SEGMENT_SUFFIX: &str = ".log";
const SEGMENT_DIGITS: usize = 20;

/// Errors from the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O error on the journal directory or one of its segments.
    #[error("journal I/O error: {0}")]
    Io(#[from] io::Error),
    /// A segment holds something a crash cannot explain (see the module docs); `line` is 1-based.
    #[error("corrupt journal segment {path}, line {line}: {reason}", path = .file.display())]
    Corrupt {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    /// A record could not be serialized as one line of JSON (nothing was written).
    #[error("journal record cannot be encoded: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Records found on disk by [`Journal::open`].
#[derive(Debug)]
pub struct Replayed<T> {
    /// Every record still on disk with its sequence number, in sequence order.
    pub records: Vec<(u64, T)>,
    /// How many segments ended in a torn (partial or checksum-failing) last line, now dropped.
    pub torn_tails: usize,
}

/// Options for [`Journal::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// `fdatasync` after every append (and sync the directory after segment changes). Without it
    /// an acknowledged record survives a process crash but not a power loss.
    pub fsync: bool,
    /// Size after which appends go to a new segment.
    pub segment_bytes: u64,
}

impl Default for JournalOptions {
    /// No fsync, 8 MiB segments.
    fn default() -> Self {
        JournalOptions {
            fsync: false,
            segment_bytes: 8 * 1024 * 1024,
        }
    }
}

/// A local append-only journal of `T` records. `Send + Sync` whatever `T` is; share it via `Arc`.
pub struct Journal<T> {
    dir: PathBuf,
    opts: JournalOptions,
    state: Mutex<State>,
    _records: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Journal<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// A segment file and the range of records it holds.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Highest sequence number written to it; `None` while it holds no record.
    last_seq: Option<u64>,
}

/// The segment being appended to.
#[derive(Debug)]
struct Current {
    seg: Segment,
    file: File,
    /// Bytes of whole lines in the file.
    bytes: u64,
}

#[derive(Debug)]
struct State {
    /// Sequence number of the next record.
    next_seq: u64,
    current: Current,
    /// Older segments, oldest first, none of them empty of records when opened.
    sealed: Vec<Segment>,
    /// A failed write may have left partial bytes in the current segment that could not be cut
    /// off: the next append must go to a new segment so the garbage stays a torn tail.
    must_rotate: bool,
}

impl<T: Serialize + DeserializeOwned> Journal<T> {
    /// Opens (creating) `dir`, reads every existing segment in order and returns its records with
    /// their sequence numbers, then starts a new segment for appends (it never appends to an old
    /// one; an old segment left empty, e.g. by an idle checkpoint, may be reused because it holds
    /// nothing).
    ///
    /// A segment whose last line is incomplete or fails its checksum is cut there: the torn tail
    /// is dropped and counted, earlier records are kept, and the file is truncated to its last
    /// good line (only after every segment has been read without error). Any other bad line is
    /// [`JournalError::Corrupt`]. Old segments left without records are deleted. Sequence numbers
    /// continue after the highest one seen (or the highest segment name).
    ///
    /// All records are held in memory; callers are expected to checkpoint often enough that this
    /// is small.
    pub fn open(
        dir: &Path,
        opts: JournalOptions,
    ) -> Result<(Journal<T>, Replayed<T>), JournalError> {
        create_private_dir(dir)?;

        let mut records = Vec::new();
        let mut cuts: Vec<(PathBuf, u64)> = Vec::new();
        let mut scanned: Vec<Segment> = Vec::new();
        let mut prev: Option<u64> = None;
        let mut highest_name = 0u64;
        for (first_seq, path) in list_segments(dir)? {
            highest_name = highest_name.max(first_seq);
            let data = fs::read(&path)?;
            let scan = scan_segment::<T>(&path, first_seq, &data, prev)?;
            if scan.torn {
                cuts.push((path.clone(), scan.valid_len as u64));
            }
            let last_seq = scan.records.last().map(|(seq, _)| *seq);
            prev = last_seq.or(prev);
            records.extend(scan.records);
            scanned.push(Segment { path, last_seq });
        }

        // Every segment read cleanly: now it is safe to change anything on disk.
        for (path, len) in &cuts {
            let file = OpenOptions::new().write(true).open(path)?;
            file.set_len(*len)?;
            if opts.fsync {
                file.sync_all()?;
            }
        }

        // `prev < u64::MAX` is guaranteed by `scan_segment`.
        let next_seq = prev.map_or(1, |p| p + 1).max(highest_name).max(1);
        let path = segment_path(dir, next_seq);
        // Another segment can only have this name if it holds no record (its records would be
        // >= next_seq otherwise), so opening it without `create_new` appends to nothing.
        let file = open_segment_file(&path, false)?;
        let bytes = file.metadata()?.len();
        let current = Current {
            seg: Segment {
                path,
                last_seq: None,
            },
            file,
            bytes,
        };

        let mut sealed = Vec::with_capacity(scanned.len());
        for seg in scanned {
            if seg.path == current.seg.path {
                continue;
            }
            if seg.last_seq.is_none() {
                remove_if_exists(&seg.path)?;
            } else {
                sealed.push(seg);
            }
        }
        if opts.fsync {
            sync_dir(dir)?;
        }

        let journal = Journal {
            dir: dir.to_path_buf(),
            opts,
            state: Mutex::new(State {
                next_seq,
                current,
                sealed,
                must_rotate: false,
            }),
            _records: PhantomData,
        };
        let torn_tails = cuts.len();
        Ok((
            journal,
            Replayed {
                records,
                torn_tails,
            },
        ))
    }

    /// Appends one record as one line with one `write(2)` on an `O_APPEND` file under a mutex (so
    /// concurrent appends never interleave), and returns its sequence number. With
    /// [`JournalOptions::fsync`] the write is followed by `fdatasync`. This is a short blocking
    /// syscall.
    ///
    /// On error the record may or may not be on disk (e.g. the write succeeded but the sync
    /// failed); a replay may therefore return it.
    pub fn append(&self, rec: &T) -> Result<u64, JournalError> {
        let encoded = [encode(rec)?];
        let mut st = self.lock();
        self.write_batch(&mut st, &encoded)
    }

    /// Appends several records with one `write(2)` (same guarantees as [`append`](Self::append):
    /// they land contiguously, all in one segment) and returns the sequence number of each, in
    /// order. An empty slice writes nothing.
    pub fn append_many(&self, recs: &[T]) -> Result<Vec<u64>, JournalError> {
        if recs.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = recs.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let mut st = self.lock();
        let first = self.write_batch(&mut st, &encoded)?;
        Ok((first..).take(encoded.len()).collect())
    }

    /// Declares every record with sequence number `<= seq` applied: deletes every segment other
    /// than the one being appended to whose records are all `<= seq`. If the current segment is
    /// non-empty and entirely `<= seq`, it is rotated first (and then deleted too), so an idle
    /// journal shrinks to one empty segment.
    pub fn checkpoint(&self, seq: u64) -> Result<(), JournalError> {
        let mut st = self.lock();
        if st.current.seg.last_seq.is_some_and(|last| last <= seq) {
            self.rotate(&mut st)?;
        }
        let mut result = Ok(());
        let mut removed = false;
        st.sealed.retain(|seg| {
            if result.is_err() || seg.last_seq.is_some_and(|last| last > seq) {
                return true;
            }
            match remove_if_exists(&seg.path) {
                Ok(()) => {
                    removed = true;
                    false
                }
                Err(e) => {
                    result = Err(e);
                    true
                }
            }
        });
        if removed && self.opts.fsync {
            sync_dir(&self.dir)?;
        }
        result.map_err(JournalError::from)
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent at every point a panic could occur, so poisoning is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes pre-encoded records as one buffer; returns the sequence number of the first.
    fn write_batch(&self, st: &mut State, encoded: &[Encoded]) -> Result<u64, JournalError> {
        let first = st.next_seq;
        let mut buf = Vec::with_capacity(encoded.iter().map(|e| e.json.len() + 32).sum());
        let mut seq = first;
        for e in encoded {
            write!(buf, "{seq} {:08x} ", e.crc)?;
            buf.extend_from_slice(&e.json);
            buf.push(b'\n');
            seq += 1;
        }
        let last = seq - 1;

        let cur = &st.current;
        if st.must_rotate
            || (cur.bytes > 0
                && cur.bytes.saturating_add(buf.len() as u64) > self.opts.segment_bytes)
        {
            self.rotate(st)?;
        }

        // The sequence numbers are spent even if the write fails: part of it may be on disk.
        st.next_seq = seq;
        let cur = &mut st.current;
        if let Err(e) = (&cur.file).write_all(&buf) {
            // Cut off a partial write so the segment stays well formed; failing that, append
            // elsewhere from now on and let replay drop the partial line as a torn tail.
            if cur.file.set_len(cur.bytes).is_err() {
                st.must_rotate = true;
            }
            return Err(e.into());
        }
        cur.bytes += buf.len() as u64;
        cur.seg.last_seq = Some(last);
        if self.opts.fsync {
            if let Err(e) = cur.file.sync_data() {
                // After a failed fsync the page cache state of this file is unknown.
                st.must_rotate = true;
                return Err(e.into());
            }
        }
        Ok(first)
    }

    /// Starts a new segment named after `next_seq` and seals the current one.
    fn rotate(&self, st: &mut State) -> Result<(), JournalError> {
        let path = segment_path(&self.dir, st.next_seq);
        let file = open_segment_file(&path, true)?;
        let new = Current {
            seg: Segment {
                path,
                last_seq: None,
            },
            file,
            bytes: 0,
        };
        let old = std::mem::replace(&mut st.current, new);
        st.sealed.push(old.seg);
        st.must_rotate = false;
        if self.opts.fsync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// A record serialized outside the lock.
struct Encoded {
    crc: u32,
    json: Vec<u8>,
}

fn encode<T: Serialize>(rec: &T) -> Result<Encoded, JournalError> {
    let json = serde_json::to_vec(rec).map_err(JournalError::Encode)?;
    // serde_json's compact output escapes newlines, but a `RawValue` is copied verbatim.
    if memchr::memchr(b'\n', &json).is_some() {
        return Err(JournalError::Encode(
            <serde_json::Error as serde::ser::Error>::custom("record JSON contains a raw newline"),
        ));
    }
    Ok(Encoded {
        crc: crc32(&json),
        json,
    })
}

/// The result of reading one segment.
struct SegmentScan<T> {
    records: Vec<(u64, T)>,
    /// Length of the well-formed prefix (whole good lines).
    valid_len: usize,
    /// The segment ended in a torn line, cut at `valid_len`.
    torn: bool,
}

/// Parses one segment; `prev` is the last sequence number of the segments before it.
fn scan_segment<T: DeserializeOwned>(
    path: &Path,
    first_seq: u64,
    data: &[u8],
    mut prev: Option<u64>,
) -> Result<SegmentScan<T>, JournalError> {
    let mut records = Vec::new();
    let mut pos = 0usize;
    let mut line_no = 0usize;
    while pos < data.len() {
        line_no += 1;
        let corrupt = |reason: String| JournalError::Corrupt {
            file: path.to_path_buf(),
            line: line_no,
            reason,
        };
        let rest = &data[pos..];
        let Some(nl) = memchr::memchr(b'\n', rest) else {
            // An incomplete line can only be the last one.
            return Ok(SegmentScan {
                records,
                valid_len: pos,
                torn: true,
            });
        };
        let end = pos + nl + 1;
        let (seq, json) = match parse_line(&rest[..nl]) {
            Ok(parsed) => parsed,
            Err(_) if end == data.len() => {
                return Ok(SegmentScan {
                    records,
                    valid_len: pos,
                    torn: true,
                });
            }
            Err(reason) => {
                return Err(corrupt(format!(
                    "{reason} (not the last line of the segment, so not a torn write)"
                )));
            }
        };
        if seq < first_seq {
            return Err(corrupt(format!(
                "sequence number {seq} is below the segment's first, {first_seq}"
            )));
        }
        if let Some(p) = prev.filter(|&p| seq <= p) {
            return Err(corrupt(format!(
                "sequence number {seq} does not follow the previous one, {p}"
            )));
        }
        if seq == u64::MAX {
            return Err(corrupt("sequence number out of range".to_owned()));
        }
        let rec = serde_json::from_slice::<T>(json).map_err(|e| {
            corrupt(format!(
                "record passes its checksum but does not decode: {e}"
            ))
        })?;
        records.push((seq, rec));
        prev = Some(seq);
        pos = end;
    }
    Ok(SegmentScan {
        records,
        valid_len: pos,
        torn: false,
    })
}

/// Splits `{seq} {crc} {json}` (without the newline) and checks the CRC.
fn parse_line(line: &[u8]) -> Result<(u64, &[u8]), String> {
    let sp = memchr::memchr(b' ', line).ok_or("no space after the sequence number")?;
    let seq = parse_decimal(&line[..sp]).ok_or("malformed sequence number")?;
    let rest = &line[sp + 1..];
    if rest.len() < 9 || rest[8] != b' ' {
        return Err("malformed checksum field".to_owned());
    }
    let stored = parse_hex32(&rest[..8]).ok_or("malformed checksum field")?;
    let json = &rest[9..];
    let actual = crc32(json);
    if stored != actual {
        return Err(format!(
            "checksum mismatch (line says {stored:08x}, record hashes to {actual:08x})"
        ));
    }
    Ok((seq, json))
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn parse_hex32(s: &[u8]) -> Option<u32> {
    if s.len() != 8 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// CRC-32/IEEE (the zlib/PNG/Ethernet one), by `crc32fast` (SIMD where the CPU has it).
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}"))
}

/// Segment files in `dir` as (first sequence number, path), in order. Other files are ignored.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(digits) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SEGMENT_PREFIX))
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
        else {
            continue;
        };
        if digits.len() != SEGMENT_DIGITS || !entry.file_type()?.is_file() {
            continue;
        }
        if let Some(first_seq) = parse_decimal(digits.as_bytes()) {
            out.push((first_seq, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(out)
}

fn open_segment_file(path: &Path, create_new: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.append(true);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes file creations and deletions in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Rec {
        id: String,
        n: u64,
    }

    fn rec(n: u64) -> Rec {
        Rec {
            id: format!("req-{n:04}"),
            n,
        }
    }

    fn open(dir: &Path, opts: JournalOptions) -> (Journal<Rec>, Replayed<Rec>) {
        match Journal::open(dir, opts) {
            Ok(pair) => pair,
            Err(e) => panic!("open failed: {e}"),
        }
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    fn last_segment(dir: &Path) -> PathBuf {
        segments(dir).pop().unwrap()
    }

    /// Sequence numbers on each line of a segment file.
    fn seqs_in(path: &Path) -> Vec<u64> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn journal_is_send_and_sync_for_any_record_type() {
        fn assert_send_sync<X: Send + Sync>() {}
        assert_send_sync::<Journal<Rec>>();
        assert_send_sync::<Journal<std::cell::Cell<u32>>>();
    }

    #[test]
    fn round_trip_across_reopen_continues_seq() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/journal");
        let (j, replayed) = open(&dir, JournalOptions::default());
        assert!(replayed.records.is_empty());
        assert_eq!(replayed.torn_tails, 0);
        assert_eq!(j.dir(), dir.as_path());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        for n in 1..=3 {
            assert_eq!(j.append(&rec(n)).unwrap(), n);
        }
        drop(j);

        let (j, replayed) = open(&dir, JournalOptions::default());
        assert_eq!(replayed.torn_tails, 0);
        let want: Vec<(u64, Rec)> = (1..=3).map(|n| (n, rec(n))).collect();
        assert_eq!(replayed.records, want);
        // A new segment for appends: the old one is not appended to.
        let before = segments(&dir);
        assert_eq!(before.len(), 2);
        assert_eq!(j.append(&rec(4)).unwrap(), 4);
        assert_eq!(seqs_in(&before[0]), vec![1, 2, 3]);
        assert_eq!(seqs_in(&before[1]), vec![4]);
        assert!(before[1].ends_with("journal-00000000000000000004.log"));
        drop(j);

        let (j, replayed) = open(&dir, JournalOptions::default());
        let want: Vec<(u64, Rec)> = (1..=4).map(|n| (n, rec(n))).collect();
        assert_eq!(replayed.records, want);
        assert_eq!(j.append(&rec(5)).unwrap(), 5);
    }

    #[test]
    fn fsync_option_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = JournalOptions {
            fsync: true,
            segment_bytes: 100,
        };
        let (j, _) = open(tmp.path(), opts);
        assert_eq!(
            j.append_many(&[rec(1), rec(2), rec(3)]).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(j.append(&rec(4)).unwrap(), 4);
        j.checkpoint(3).unwrap();
        drop(j);
        let (_, replayed) = open(tmp.path(), opts);
        assert_eq!(replayed.records, vec![(4, rec(4))]);
    }

    #[test]
    fn concurrent_appends_do_not_interleave() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 500;
        let tmp = tempfile::tempdir().unwrap();
        // Small segments so rotation happens under contention too.
        let opts = JournalOptions {
            fsync: false,
            segment_bytes: 64 * 1024,
        };
        let (j, _) = open(tmp.path(), opts);
        let j = Arc::new(j);
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let j = Arc::clone(&j);
                std::thread::spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            // ~200 bytes, like a billing record.
                            let r = Rec {
                                id: format!("t{t}-{i}-{}", "x".repeat(170)),
                                n: t * PER_THREAD + i,
                            };
                            (j.append(&r).unwrap(), r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut written: Vec<(u64, Rec)> = Vec::new();
        for h in handles {
            let mine = h.join().unwrap();
            // Each thread's records got increasing sequence numbers.
            assert!(mine.windows(2).all(|w| w[0].0 < w[1].0));
            written.extend(mine);
        }
        let seqs: HashSet<u64> = written.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs.len() as u64, THREADS * PER_THREAD);
        drop(j);

        assert!(segments(tmp.path()).len() > 2);
        // Every line of every segment is whole (replay would reject an interleaved middle line).
        let (_, replayed) = open(tmp.path(), opts);
        assert_eq!(replayed.torn_tails, 0);
        written.sort_by_key(|(s, _)| *s);
        assert_eq!(replayed.records, written);
        assert_eq!(
            replayed.records.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=THREADS * PER_THREAD).collect::<Vec<_>>()
        );
    }

    #[test]
    fn torn_tail_mid_line_is_dropped_and_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, _) = open(tmp.path(), JournalOptions::default());
        for n in 1..=3 {
            j.append(&rec(n)).unwrap();
        }
        drop(j);
        let seg = last_segment(tmp.path());
        let full = fs::read(&seg).unwrap();
        let good_len = full.len() - full.split(|&b| b == b'\n').nth(2).unwrap().len() - 1;
        // Cut the third line in the middle, as a crash during its write would.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(full.len() as u64 - 10).unwrap();
        drop(f);

        let (j, replayed) = open(tmp.path(), JournalOptions::default());
        assert_eq!(replayed.torn_tails, 1);
        assert_eq!(replayed.records, vec![(1, rec(1)), (2, rec(2))]);
        assert_eq!(fs::metadata(&seg).unwrap().len(), good_len as u64);
        // The torn record's seq is reused: it was never replayed, so nothing refers to it.
        assert_eq!(j.append(&rec(33)).unwrap(), 3);
        drop(j);

        let (_, replayed) = open(tmp.path(), JournalOptions::default());
        assert_eq!(replayed.torn_tails, 0);
        assert_eq!(
            replayed.records,
            vec![(1, rec(1)), (2, rec(2)), (3, rec(33))]
        );
    }

    /// Rewrites line `line` (0-based) of `path` with `f`.
    fn edit_line(path: &Path, line: usize, f: impl FnOnce(&str) -> String) {
        let text = fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[line] = f(&lines[line]);
        fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    /// Flips one hex digit of the CRC field.
    fn break_crc(line: &str) -> String {
        let (seq, rest) = line.split_once(' ').unwrap();
        let first = rest.as_bytes()[0];
        let swapped = if first == b'0' { '1' } else { '0' };
        format!("{seq} {swapped}{}", &rest[1..])
    }

    /// A journal of records 1..=3 whose line `line` (0-based) is rewritten by `edit`; returns its
    /// directory and segment.
    fn three_edited(
        line: usize,
        edit: impl FnOnce(&str) -> String,
    ) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (j, _) = open(tmp.path(), JournalOptions::default());
        for n in 1..=3 {
            j.append(&rec(n)).unwrap();
        }
        drop(j);
        let seg = last_segment(tmp.path());
        edit_line(&seg, line, edit);
        (tmp, seg)
    }

    #[test]
    fn torn_tail_with_bad_crc_is_dropped_and_truncated() {
        let (tmp, seg) = three_edited(2, break_crc);

        let (j, replayed) = open(tmp.path(), JournalOptions::default());
        assert_eq!(replayed.torn_tails, 1);
        assert_eq!(replayed.records, vec![(1, rec(1)), (2, rec(2))]);
        assert_eq!(seqs_in(&seg), vec![1, 2]);
        drop(j);

        let (_, replayed) = open(tmp.path(), JournalOptions::default());
        assert_eq!(replayed.torn_tails, 0);
        assert_eq!(replayed.records, vec![(1, rec(1)), (2, rec(2))]);
    }

    #[test]
    fn segment_holding_only_a_torn_line_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join("journal-00000000000000000001.log"),
            b"1 0000",
        )
        .unwrap();
        let (j, replayed) = open(tmp.path(), JournalOptions::default());
        assert_eq!(replayed.torn_tails, 1);
        assert!(replayed.records.is_empty());
        // The emptied file had the name the new segment wants; it is the only segment left.
        assert_eq!(segments(tmp.path()).len(), 1);
        assert_eq!(j.append(&rec(1)).unwrap(), 1);
    }

    #[test]
    fn corrupt_middle_line_is_an_error() {
        let (tmp, seg) = three_edited(1, break_crc);
        let before = fs::read(&seg).unwrap();

        match Journal::<Rec>::open(tmp.path(), JournalOptions::default()) {
            Err(JournalError::Corrupt { file, line, reason }) => {
                assert_eq!(file, seg);
                assert_eq!(line, 2);
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Nothing on disk was changed by the failed open.
        assert_eq!(fs::read(&seg).unwrap(), before);
        assert_eq!(segments(tmp.path()), vec![seg]);
    }

    #[test]
    fn undecodable_record_with_good_crc_is_an_error_even_last() {
        let tmp = tempfile::tempdir().unwrap();
        let json = br#"{"id":"req-1"}"#; // missing `n`
        let mut line = format!("1 {:08x} ", crc32(json)).into_bytes();
        line.extend_from_slice(json);
        line.push(b'\n');
        fs::write(tmp.path().join("journal-00000000000000000001.log"), line).unwrap();
        match Journal::<Rec>::open(tmp.path(), JournalOptions::default()) {
            Err(JournalError::Corrupt {
                line: 1, reason, ..
            }) => {
                assert!(reason.contains("does not decode"), "{reason}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn out_of_order_sequence_numbers_are_an_error() {
        let (tmp, _) = three_edited(2, |l| format!("2{}", &l[1..]));
        match Journal::<Rec>::open(tmp.path(), JournalOptions::default()) {
            Err(JournalError::Corrupt { line: 3, .. }) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn rotation_by_size_and_checkpoint_deletes_only_applied_segments() {
        let tmp = tempfile::tempdir().unwrap();
        // Lines are ~42 bytes: three per segment.
        let opts = JournalOptions {
            fsync: false,
            segment_bytes: 130,
        };
        let (j, _) = open(tmp.path(), opts);
        for n in 1..=20 {
            assert_eq!(j.append(&rec(n)).unwrap(), n);
        }
        let segs = segments(tmp.path());
        assert!(segs.len() >= 5, "{segs:?}");
        let mut all = Vec::new();
        let mut last_of = Vec::new();
        for s in &segs {
            let seqs = seqs_in(s);
            last_of.push(*seqs.last().unwrap());
            assert!(!seqs.is_empty());
            assert!(fs::metadata(s).unwrap().len() <= opts.segment_bytes);
            // Named after its first record.
            assert!(s.ends_with(format!("journal-{:020}.log", seqs[0])));
            all.extend(seqs);
        }
        assert_eq!(all, (1..=20).collect::<Vec<_>>());

        // 10 falls inside a segment: that one and later ones stay.
        j.checkpoint(10).unwrap();
        let left = segments(tmp.path());
        let expect: Vec<PathBuf> = segs
            .iter()
            .zip(&last_of)
            .filter(|(_, &last)| last > 10)
            .map(|(s, _)| s.clone())
            .collect();
        assert_eq!(left, expect);
        assert!(
            seqs_in(&left[0])[0] <= 10,
            "the partly applied segment is kept"
        );
        assert!(left.len() < segs.len());
        drop(j);

        let (j, replayed) = open(tmp.path(), opts);
        let first_kept = seqs_in(&left[0])[0];
        let want: Vec<(u64, Rec)> = (first_kept..=20).map(|n| (n, rec(n))).collect();
        assert_eq!(replayed.records, want);
        assert_eq!(j.append(&rec(21)).unwrap(), 21);
        j.checkpoint(15).unwrap();
        assert!(segments(tmp.path())
            .iter()
            .all(|s| seqs_in(s).last().is_none_or(|&l| l > 15)));
    }

    #[test]
    fn checkpoint_on_idle_journal_leaves_one_empty_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = JournalOptions {
            fsync: false,
            segment_bytes: 100,
        };
        let (j, _) = open(tmp.path(), opts);
        for n in 1..=5 {
            j.append(&rec(n)).unwrap();
        }
        assert!(segments(tmp.path()).len() > 1);
        j.checkpoint(4).unwrap();
        assert!(!segments(tmp.path()).is_empty());
        j.checkpoint(5).unwrap();
        let segs = segments(tmp.path());
        assert_eq!(segs.len(), 1);
        assert_eq!(fs::metadata(&segs[0]).unwrap().len(), 0);
        assert!(segs[0].ends_with("journal-00000000000000000006.log"));
        // Idempotent on an empty current segment.
        j.checkpoint(5).unwrap();
        assert_eq!(segments(tmp.path()), segs);
        drop(j);

        // The empty segment's name carries the next seq across a restart.
        let (j, replayed) = open(tmp.path(), opts);
        assert!(replayed.records.is_empty());
        assert_eq!(segments(tmp.path()), segs);
        assert_eq!(j.append(&rec(6)).unwrap(), 6);
    }

    /// Write syscalls made by this thread so far (Linux task I/O accounting).
    #[cfg(target_os = "linux")]
    fn thread_write_syscalls() -> Option<u64> {
        let io = fs::read_to_string("/proc/thread-self/io").ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("syscw:"))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn append_many_is_one_write() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, _) = open(tmp.path(), JournalOptions::default());
        assert_eq!(j.append(&rec(0)).unwrap(), 1);
        let batch: Vec<Rec> = (1..=100).map(rec).collect();

        #[cfg(target_os = "linux")]
        let before = thread_write_syscalls();
        let seqs = j.append_many(&batch).unwrap();
        #[cfg(target_os = "linux")]
        if let (Some(b), Some(a)) = (before, thread_write_syscalls()) {
            assert_eq!(a - b, 1, "append_many of 100 records made {} writes", a - b);
        }
        assert_eq!(seqs, (2..=101).collect::<Vec<_>>());

        #[cfg(target_os = "linux")]
        let before = thread_write_syscalls();
        assert_eq!(j.append_many(&[]).unwrap(), Vec::<u64>::new());
        #[cfg(target_os = "linux")]
        if let (Some(b), Some(a)) = (before, thread_write_syscalls()) {
            assert_eq!(a, b, "an empty batch writes nothing");
        }
        drop(j);

        let (_, replayed) = open(tmp.path(), JournalOptions::default());
        assert_eq!(replayed.records.len(), 101);
        let got: Vec<(u64, Rec)> = replayed.records[1..].to_vec();
        let want: Vec<(u64, Rec)> = seqs.into_iter().zip(batch).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn append_many_batch_stays_in_one_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = JournalOptions {
            fsync: false,
            segment_bytes: 100,
        };
        let (j, _) = open(tmp.path(), opts);
        j.append(&rec(1)).unwrap();
        let seqs = j.append_many(&[rec(2), rec(3), rec(4), rec(5)]).unwrap();
        assert_eq!(seqs, vec![2, 3, 4, 5]);
        let segs = segments(tmp.path());
        assert_eq!(segs.len(), 2);
        assert_eq!(seqs_in(&segs[1]), vec![2, 3, 4, 5]);
    }

    #[test]
    fn record_with_raw_newline_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, _) = Journal::<Box<serde_json::value::RawValue>>::open(
            tmp.path(),
            JournalOptions::default(),
        )
        .unwrap();
        let raw = serde_json::value::RawValue::from_string("{\n\"a\": 1}".to_owned()).unwrap();
        assert!(matches!(j.append(&raw), Err(JournalError::Encode(_))));
        let ok = serde_json::value::RawValue::from_string("{\"a\": 1}".to_owned()).unwrap();
        assert_eq!(j.append(&ok).unwrap(), 1);
    }

    #[test]
    fn unrelated_files_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("README"), b"not a segment\n").unwrap();
        fs::write(tmp.path().join("journal-1.log"), b"garbage\n").unwrap();
        let (j, replayed) = open(tmp.path(), JournalOptions::default());
        assert!(replayed.records.is_empty());
        assert_eq!(j.append(&rec(1)).unwrap(), 1);
        assert!(tmp.path().join("README").exists());
    }
}
