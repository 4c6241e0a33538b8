//! The commit log in front of the redb file: what makes a batch durable
//! at one small write and one `fdatasync`.
//!
//! Why: a durable redb commit writes every B-tree page the batch dirtied
//! (about 25 separate 4 KiB writes for one delivery) and syncs twice; at
//! low rate, where each batch holds one or two ops, that is most of what a
//! delivery costs (BENCHMARKS.md, "What a delivery costs"). With the log,
//! a batch of the hot ops (accept, record an attempt, endpoint state,
//! unpark) is applied to redb in a non-durable commit (its pages stay in
//! redb's memory) and the batch itself is appended here and synced before
//! anyone is answered. Every second or every few MiB a checkpoint, one
//! durable redb commit, writes the pages all those batches dirtied once,
//! and the log starts over.
//!
//! After a crash redb opens at its last checkpoint, which names the last
//! log record it holds (`META["commit_log_seq"]`); the records after it are
//! applied again, in order, with the clock reading and event keys they were
//! first applied with, so the result is the state the answers described.
//!
//! File format (little-endian), one record after another:
//!
//! ```text
//! record  := magic "RHL1" | seq u64 | len u32 | crc32 u32 | payload[len]
//! payload := now u64 | count u32 | op*
//! ```
//!
//! `crc32` covers seq, len and payload. The log is reused from its start
//! after each checkpoint instead of truncated (a write that changes no file
//! size has no metadata to sync), so what follows the last record written
//! is an older generation: reading stops at the first record whose checksum
//! fails or whose sequence number does not follow the one before.

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::super::records::Endpoint;
use super::super::*;

const MAGIC: &[u8; 4] = b"RHL1";
const HEADER: usize = 4 + 8 + 4 + 4;

/// A checkpoint is due once the log holds this much...
pub(super) const CHECKPOINT_BYTES: u64 = 4 << 20;
/// ...or its oldest record is this old. Bounds what a restart after a
/// crash applies again (about a second of work) and how long a
/// checkpoint's page writes take.
pub(super) const CHECKPOINT_AGE: Duration = Duration::from_secs(1);

/// A batch whose record would be this large is committed durably by redb
/// itself (checkpointing the log): its page writes are shared by many ops
/// already, and logging it would write its bodies twice. Measured: with
/// NDJSON at saturation, logging every batch cut throughput by a quarter.
const MAX_RECORD: usize = 256 << 10;

/// The log grows in steps of this many zeroed bytes, so appending within
/// a step changes no file size.
const GROW: u64 = 1 << 20;

/// The ops the log holds. Any other (rule versions, compaction, an admin's
/// redeliver or lane skip) is rare and committed durably by redb itself,
/// which checkpoints everything before it.
pub(super) fn loggable(op: &Op) -> bool {
    matches!(
        op,
        Op::Accept(_) | Op::Finish { .. } | Op::PutEndpoint(_) | Op::Unpark { .. }
    )
}

/// The open log file and where its current generation ends.
pub(super) struct CommitLog {
    file: std::fs::File,
    path: PathBuf,
    /// Where the next record goes.
    end: u64,
    /// Where the last record written starts (see `withdraw`).
    last_start: u64,
    /// How far the file is allocated (zeroes or records).
    allocated: u64,
    /// The sequence number of the last record written or checkpointed.
    pub(super) last_seq: u64,
    /// When the first record since the last checkpoint was written.
    oldest: Option<Instant>,
    /// The next record, built in place: room for its header, then the
    /// payload `stage` encodes. It is kept from record to record: a new
    /// buffer for each (and one for the payload before it) came from pages
    /// the allocator had returned between two commits at a low rate,
    /// about eight page faults a commit and 9 % of the writer's CPU at 500
    /// events/s.
    record: Vec<u8>,
}

/// A batch's ops, each with the event key an `Accept` is stored under.
pub(super) type KeyedOps = Vec<(Op, Option<EventKey>)>;

/// A batch read back from the log.
pub(super) struct Logged {
    pub seq: u64,
    pub now: u64,
    pub ops: KeyedOps,
}

impl CommitLog {
    /// The log beside the database file `db` (`rulehook.redb` →
    /// `rulehook.redb.log`).
    pub(super) fn path_for(db: &Path) -> PathBuf {
        let mut name = db.as_os_str().to_owned();
        name.push(".log");
        PathBuf::from(name)
    }

    /// Opens (or creates) the log. Nothing is appended until the caller
    /// has applied what `read_after` returns and checkpointed it.
    pub(super) fn open(path: &Path) -> Result<CommitLog, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::Io {
                op: "open the commit log",
                message: format!("{}: {e}", path.display()),
            })?;
        let allocated = file
            .metadata()
            .map_err(|e| StoreError::Io {
                op: "open the commit log",
                message: format!("{}: {e}", path.display()),
            })?
            .len();
        Ok(CommitLog {
            file,
            path: path.to_path_buf(),
            end: allocated, // nothing may overwrite it before recovery
            last_start: allocated,
            allocated,
            last_seq: 0,
            oldest: None,
            record: Vec::new(),
        })
    }

    /// The records of the log's current generation after `checkpointed`
    /// (the sequence number the database's last durable commit holds), in
    /// order: what a crash left to apply again.
    pub(super) fn read_after(&self, checkpointed: u64) -> Result<Vec<Logged>, StoreError> {
        let bytes = std::fs::read(&self.path).map_err(|e| StoreError::Io {
            op: "read the commit log",
            message: format!("{}: {e}", self.path.display()),
        })?;
        read_records(&bytes, checkpointed, &self.path.display().to_string())
    }

    /// The path of the log file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes a batch of loggable ops as the next record, in the log's
    /// own buffer. `false` when it would pass `MAX_RECORD`: nothing is
    /// staged then, and the batch is not to be logged.
    pub(super) fn stage(&mut self, now: u64, ops: &[ToLog<'_>]) -> bool {
        self.record.clear();
        self.record.resize(HEADER, 0);
        if encode_into(&mut self.record, now, ops) {
            return true;
        }
        self.record.clear();
        // One op may be a body of megabytes; that stays no longer.
        if self.record.capacity() > 2 * MAX_RECORD {
            self.record = Vec::new();
        }
        false
    }

    /// Appends the record `stage` made and syncs it: when this returns
    /// `Ok`, the batch survives a crash. Returns the record's sequence
    /// number. On an error nothing counts as written (the next record
    /// overwrites what part of this one reached the file).
    pub(super) fn append_staged(&mut self) -> Result<u64, StoreError> {
        assert!(self.record.len() >= HEADER, "a record is staged");
        let seq = self.last_seq + 1;
        let (header, payload) = self.record.split_at_mut(HEADER);
        header[0..4].copy_from_slice(MAGIC);
        header[4..12].copy_from_slice(&seq.to_le_bytes());
        header[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[16..20].copy_from_slice(&crc(seq, payload).to_le_bytes());
        let end = self.end + self.record.len() as u64;
        let path = self.path.display().to_string();
        let fail = |e: std::io::Error| StoreError::Io {
            op: "append to the commit log",
            message: format!("{path}: {e}"),
        };
        if end > self.allocated {
            self.grow(end).map_err(fail)?;
        }
        self.file
            .write_all_at(&self.record, self.end)
            .map_err(fail)?;
        self.file.sync_data().map_err(fail)?;
        self.last_start = self.end;
        self.end = end;
        self.last_seq = seq;
        self.oldest.get_or_insert_with(Instant::now);
        Ok(seq)
    }

    /// Appends one encoded payload (see `append_staged`).
    #[cfg(test)]
    pub(super) fn append(&mut self, payload: &[u8]) -> Result<u64, StoreError> {
        self.record.clear();
        self.record.resize(HEADER, 0);
        self.record.extend_from_slice(payload);
        self.append_staged()
    }

    /// Zero-fills the file up to at least `end`, in `GROW` steps, and
    /// syncs the new size once.
    fn grow(&mut self, end: u64) -> std::io::Result<()> {
        let target = end.div_ceil(GROW) * GROW;
        let zeros = vec![0u8; GROW as usize];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(GROW) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file.sync_all()?;
        self.allocated = target;
        Ok(())
    }

    /// Takes back the record `append` just wrote (`seq`), when the batch
    /// it holds could not be applied: its header is zeroed and synced, so
    /// no recovery applies it, and the next record goes in its place.
    /// Then "the batch failed" means nothing of it is stored, as without
    /// the log. A failure here leaves the record in (the caller says so).
    pub(super) fn withdraw(&mut self, seq: u64) -> Result<(), StoreError> {
        assert_eq!(seq, self.last_seq, "only the last record can be withdrawn");
        let fail = |e: std::io::Error| StoreError::Io {
            op: "withdraw a record from the commit log",
            message: format!("{}: {e}", self.path.display()),
        };
        self.file
            .write_all_at(&[0u8; HEADER], self.last_start)
            .map_err(fail)?;
        self.file.sync_data().map_err(fail)?;
        self.end = self.last_start;
        self.last_seq -= 1;
        if self.end == 0 {
            self.oldest = None;
        }
        Ok(())
    }

    /// Whether the log should be checkpointed now.
    pub(super) fn checkpoint_due(&self) -> bool {
        self.end >= CHECKPOINT_BYTES || self.oldest.is_some_and(|t| t.elapsed() >= CHECKPOINT_AGE)
    }

    /// Whether anything was written since the last checkpoint.
    pub(super) fn is_empty(&self) -> bool {
        self.end == 0
    }

    /// After a durable commit that holds every record up to `seq`: the
    /// next record (`seq + 1`) goes to the start of the file.
    pub(super) fn checkpointed(&mut self, seq: u64) {
        self.last_seq = seq;
        self.end = 0;
        self.oldest = None;
    }
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The records of the file's current generation after `checkpointed`.
fn read_records(bytes: &[u8], checkpointed: u64, name: &str) -> Result<Vec<Logged>, StoreError> {
    let mut out: Vec<Logged> = Vec::new();
    let mut at = 0usize;
    let mut prev: Option<u64> = None;
    while at + HEADER <= bytes.len() {
        let h = &bytes[at..at + HEADER];
        if &h[..4] != MAGIC {
            break;
        }
        let seq = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break; // cut short: a write the crash interrupted
        };
        if crc(seq, payload) != sum || prev.is_some_and(|p| seq != p + 1) {
            break; // torn, or an older generation's record
        }
        prev = Some(seq);
        at += HEADER + len;
        if seq <= checkpointed {
            continue;
        }
        let expected = out.last().map_or(checkpointed + 1, |r| r.seq + 1);
        if seq != expected {
            return Err(StoreError::Corrupt(format!(
                "commit log {name}: record {seq} follows checkpoint {checkpointed}; records in between are missing"
            )));
        }
        let (now, ops) = decode(payload).map_err(|why| {
            StoreError::Corrupt(format!("commit log {name}: record {seq}: {why}"))
        })?;
        out.push(Logged { seq, now, ops });
    }
    Ok(out)
}

/// An op to log, with the event key an `Accept` is stored under, and the
/// stored form of a `Finish`'s attempt when the caller has it already
/// (else `encode_into` makes it).
pub(super) type ToLog<'a> = (&'a Op, Option<EventKey>, Option<&'a [u8]>);

/// The payload of a batch of loggable ops (see `loggable`), alone.
#[cfg(test)]
pub(super) fn encode(now: u64, ops: &[ToLog<'_>]) -> Option<Vec<u8>> {
    let mut w = Vec::new();
    encode_into(&mut w, now, ops).then_some(w)
}

/// Appends to `w` the payload of a batch of loggable ops (see
/// `loggable`); `false` once the payload passes `MAX_RECORD` (such a batch
/// is not logged, so encoding stops there instead of copying every body
/// of a large batch for nothing).
fn encode_into(w: &mut Vec<u8>, now: u64, ops: &[ToLog<'_>]) -> bool {
    let start = w.len();
    put_u64(w, now);
    put_u32(w, ops.len() as u32);
    for (op, key, stored) in ops {
        match op {
            Op::Accept(ev) => {
                w.push(1);
                put_u128(w, key.expect("an Accept has its event key"));
                put_str(w, &ev.id);
                put_u32(w, ev.deliveries.len() as u32);
                for d in &ev.deliveries {
                    put_u128(w, d.id.0);
                    put_str(w, &d.rule);
                    w.push(state_tag(d.state));
                    put_opt_str(w, d.reason.as_deref());
                    put_bytes(w, &d.body);
                    w.push(d.unbuilt as u8);
                    put_opt_str(w, d.space.as_deref());
                    put_opt_str(w, d.rule_version.as_deref());
                    match &d.lane {
                        None => w.push(0),
                        Some(l) => {
                            w.push(1);
                            put_str(w, &l.key);
                            w.push(l.halt as u8);
                        }
                    }
                }
            }
            Op::Finish {
                id,
                attempt,
                next,
                epoch,
            } => {
                w.push(2);
                put_u128(w, id.0);
                match attempt {
                    None => w.push(0),
                    Some(a) => {
                        w.push(1);
                        match stored {
                            Some(bytes) => put_bytes(w, bytes),
                            None => put_bytes(w, &to_json(a)),
                        }
                    }
                }
                match next {
                    Next::Succeeded => w.push(0),
                    Next::Failed(why) => {
                        w.push(1);
                        put_str(w, why);
                    }
                    Next::Retry { at } => {
                        w.push(2);
                        put_u64(w, *at);
                    }
                    Next::Park { endpoint, reason } => {
                        w.push(3);
                        put_str(w, endpoint);
                        put_str(w, reason);
                    }
                }
                match epoch {
                    None => w.push(0),
                    Some(e) => {
                        w.push(1);
                        put_u64(w, *e);
                    }
                }
            }
            Op::PutEndpoint(ep) => {
                w.push(3);
                put_bytes(w, &to_json(ep));
            }
            Op::Unpark { endpoint, limit } => {
                w.push(4);
                put_str(w, endpoint);
                put_u64(w, *limit as u64);
            }
            other => unreachable!("not a loggable op: {other:?}"),
        }
        if w.len() - start >= MAX_RECORD {
            return false;
        }
    }
    true
}

fn decode(payload: &[u8]) -> Result<(u64, KeyedOps), String> {
    let mut r = Reader(payload);
    let now = r.u64()?;
    let count = r.u32()? as usize;
    let mut ops = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let op = match r.u8()? {
            1 => {
                let key = r.u128()?;
                let id = r.string()?;
                let n = r.u32()? as usize;
                let mut deliveries = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    deliveries.push(NewDelivery {
                        id: DeliveryId(r.u128()?),
                        rule: r.string()?,
                        state: state_from(r.u8()?)?,
                        reason: r.opt_string()?,
                        body: bytes::Bytes::copy_from_slice(r.bytes()?),
                        unbuilt: r.u8()? != 0,
                        space: r.opt_string()?,
                        rule_version: r.opt_string()?,
                        lane: match r.u8()? {
                            0 => None,
                            _ => Some(NewLane {
                                key: r.string()?,
                                halt: r.u8()? != 0,
                            }),
                        },
                    });
                }
                (Op::Accept(NewEvent { id, deliveries }), Some(key))
            }
            2 => {
                let id = DeliveryId(r.u128()?);
                let attempt = match r.u8()? {
                    0 => None,
                    _ => Some(serde_json::from_slice(r.bytes()?).map_err(|e| e.to_string())?),
                };
                let next = match r.u8()? {
                    0 => Next::Succeeded,
                    1 => Next::Failed(r.string()?),
                    2 => Next::Retry { at: r.u64()? },
                    3 => Next::Park {
                        endpoint: r.string()?,
                        reason: r.string()?,
                    },
                    t => return Err(format!("unknown next step {t}")),
                };
                let epoch = match r.u8()? {
                    0 => None,
                    _ => Some(r.u64()?),
                };
                let op = Op::Finish {
                    id,
                    attempt,
                    next,
                    epoch,
                };
                (op, None)
            }
            3 => {
                let ep: Endpoint = serde_json::from_slice(r.bytes()?).map_err(|e| e.to_string())?;
                (Op::PutEndpoint(ep), None)
            }
            4 => {
                let endpoint = r.string()?;
                let limit = r.u64()? as usize;
                (Op::Unpark { endpoint, limit }, None)
            }
            t => return Err(format!("unknown op {t}")),
        };
        ops.push(op);
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the last op", r.0.len()));
    }
    Ok((now, ops))
}

fn state_tag(s: State) -> u8 {
    match s {
        State::Pending => 0,
        State::Parked => 1,
        State::Waiting => 2,
        State::Succeeded => 3,
        State::Failed => 4,
        State::Skipped => 5,
    }
}

fn state_from(t: u8) -> Result<State, String> {
    Ok(match t {
        0 => State::Pending,
        1 => State::Parked,
        2 => State::Waiting,
        3 => State::Succeeded,
        4 => State::Failed,
        5 => State::Skipped,
        t => return Err(format!("unknown delivery state {t}")),
    })
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_u128(w: &mut Vec<u8>, v: u128) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_bytes(w: &mut Vec<u8>, v: &[u8]) {
    put_u32(w, v.len() as u32);
    w.write_all(v).expect("writing to a Vec");
}
fn put_str(w: &mut Vec<u8>, v: &str) {
    put_bytes(w, v.as_bytes());
}
fn put_opt_str(w: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => w.push(0),
        Some(s) => {
            w.push(1);
            put_str(w, s);
        }
    }
}

/// Reads a payload front to back; every read names what was cut short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "cut short: {n} bytes wanted, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u128(&mut self) -> Result<u128, String> {
        Ok(u128::from_le_bytes(
            self.take(16)?.try_into().expect("16 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
    fn opt_string(&mut self) -> Result<Option<String>, String> {
        match self.u8()? {
            0 => Ok(None),
            _ => self.string().map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(id: &str, body: &[u8]) -> Op {
        Op::Accept(NewEvent {
            id: id.into(),
            deliveries: vec![NewDelivery {
                id: DeliveryId(7),
                rule: "r".into(),
                state: State::Pending,
                reason: Some("why".into()),
                body: bytes::Bytes::copy_from_slice(body),
                unbuilt: true,
                space: None,
                rule_version: Some("v1".into()),
                lane: Some(NewLane {
                    key: "r/k".into(),
                    halt: true,
                }),
            }],
        })
    }

    fn finish(next: Next) -> Op {
        Op::Finish {
            id: DeliveryId(9),
            attempt: Some(Attempt {
                number: 2,
                started_at: 5,
                duration_ms: 3,
                url: "http://x/".into(),
                method: "POST".into(),
                request_headers: vec![("a".into(), "b".into())],
                status: Some(500),
                reason_phrase: None,
                response_headers: vec![],
                response_body: Some("no".into()),
                response_truncated: false,
                error: None,
                outcome: "retry".into(),
            }),
            next,
            epoch: Some(3),
        }
    }

    /// Each loggable op and variant comes back as it went in.
    #[test]
    fn ops_round_trip() {
        let ops = [
            (accept("e1", b"{\"x\":1}"), Some(42u128)),
            (finish(Next::Succeeded), None),
            (finish(Next::Failed("gone".into())), None),
            (finish(Next::Retry { at: 99 }), None),
            (
                finish(Next::Park {
                    endpoint: "http://h:1".into(),
                    reason: "blocked".into(),
                }),
                None,
            ),
            (
                Op::Unpark {
                    endpoint: "lane:r/k".into(),
                    limit: 5,
                },
                None,
            ),
        ];
        let refs: Vec<ToLog<'_>> = ops.iter().map(|(o, k)| (o, *k, None)).collect();
        let (now, back) = decode(&encode(123, &refs).expect("small")).expect("decodes");
        assert_eq!(now, 123);
        assert_eq!(back.len(), ops.len());
        for ((want, wk), (got, gk)) in ops.iter().zip(&back) {
            assert_eq!(format!("{want:?}"), format!("{got:?}"));
            assert_eq!(wk, gk);
        }
    }

    /// A batch past `MAX_RECORD` is not encoded (it is not logged).
    #[test]
    fn a_batch_past_the_record_limit_is_not_encoded() {
        let big = accept("big", &vec![b'x'; MAX_RECORD]);
        assert!(encode(1, &[(&big, Some(1), None)]).is_none());
        let small = accept("small", b"{}");
        assert!(encode(1, &[(&small, Some(1), None)]).is_some());
    }

    fn payload(n: u64) -> Vec<u8> {
        let op = accept(&format!("e{n}"), b"body");
        encode(n, &[(&op, Some(n as u128), None)]).expect("small")
    }

    fn seqs(records: &[Logged]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    /// A fresh directory, removed with its contents at the end.
    struct Dir(PathBuf);
    impl Dir {
        fn new() -> Dir {
            let dir = std::env::temp_dir().join(format!(
                "rulehook-log-{}-{:x}",
                std::process::id(),
                DeliveryId::new().0
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The log at `path` and what it holds after checkpoint `seq`.
    fn reopen(path: &Path, seq: u64) -> (CommitLog, Vec<Logged>) {
        let log = CommitLog::open(path).unwrap();
        let pending = log.read_after(seq).unwrap();
        (log, pending)
    }

    /// The log builds each record in the buffer it keeps: a batch too big
    /// to log leaves nothing staged (and no buffer of its size behind),
    /// and the records staged around it read back as they were encoded.
    #[test]
    fn a_staged_record_reads_back_and_one_too_big_leaves_nothing_staged() {
        let dir = Dir::new();
        let path = dir.0.join("db.log");
        let (mut log, _) = reopen(&path, 0);
        log.checkpointed(0);
        let first = accept("first", b"{}");
        assert!(log.stage(10, &[(&first, Some(1), None)]));
        assert_eq!(log.append_staged().unwrap(), 1);
        let big = accept("big", &vec![b'x'; 4 * MAX_RECORD]);
        assert!(!log.stage(11, &[(&big, Some(2), None)]));
        assert!(log.record.capacity() <= 2 * MAX_RECORD);
        let second = accept("second", b"{\"a\":1}");
        assert!(log.stage(12, &[(&second, Some(3), None)]));
        assert_eq!(log.append_staged().unwrap(), 2);
        drop(log);
        let (_, pending) = reopen(&path, 0);
        assert_eq!(seqs(&pending), [1, 2]);
        let read: Vec<(u64, String)> = pending
            .iter()
            .map(|r| (r.now, format!("{:?}", r.ops[0].0)))
            .collect();
        assert_eq!(
            read,
            [(10, format!("{first:?}")), (12, format!("{second:?}"))]
        );
    }

    /// What is read back after a crash: the records after the checkpoint,
    /// up to a torn one, and never an older generation's.
    #[test]
    fn reads_back_what_follows_the_checkpoint() {
        let dir = Dir::new();
        let path = dir.0.join("db.log");
        let (mut log, pending) = reopen(&path, 0);
        assert!(pending.is_empty());
        log.checkpointed(0);
        for n in 1..=5 {
            assert_eq!(log.append(&payload(n)).unwrap(), n);
        }
        drop(log);
        // Checkpoint at 2: 3..=5 come back, in order, with their clocks.
        let (mut log, pending) = reopen(&path, 2);
        assert_eq!(seqs(&pending), [3, 4, 5]);
        assert_eq!(pending[0].now, 3);
        // Checkpointed at 5: the log starts over; 6 and 7 overwrite 1 and
        // 2, and 3..=5 behind them are an older generation.
        log.checkpointed(5);
        log.append(&payload(6)).unwrap();
        log.append(&payload(7)).unwrap();
        drop(log);
        assert_eq!(seqs(&reopen(&path, 5).1), [6, 7]);
        assert!(reopen(&path, 7).1.is_empty());
        // A torn last record (its checksum fails) ends the log.
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER + payload(6).len();
        bytes[second + HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(seqs(&reopen(&path, 5).1), [6]);
    }

    /// A withdrawn record is never read back, and the next one takes its
    /// number and place.
    #[test]
    fn a_withdrawn_record_is_not_read_back() {
        let dir = Dir::new();
        let path = dir.0.join("db.log");
        let mut log = CommitLog::open(&path).unwrap();
        log.checkpointed(0);
        for n in 1..=3 {
            log.append(&payload(n)).unwrap();
        }
        log.withdraw(3).unwrap();
        assert_eq!(seqs(&reopen(&path, 0).1), [1, 2]);
        assert_eq!(log.append(&payload(30)).unwrap(), 3);
        let pending = reopen(&path, 0).1;
        assert_eq!(seqs(&pending), [1, 2, 3]);
        assert_eq!(pending[2].now, 30);
    }

    /// A record missing between the checkpoint and the next one found is
    /// corruption, named, not silently skipped.
    #[test]
    fn a_gap_after_the_checkpoint_is_refused() {
        let dir = Dir::new();
        let path = dir.0.join("db.log");
        let mut log = CommitLog::open(&path).unwrap();
        log.checkpointed(10);
        log.append(&payload(11)).unwrap();
        drop(log);
        let err = CommitLog::open(&path)
            .unwrap()
            .read_after(8)
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("record 11 follows checkpoint 8"),
            "{err}"
        );
    }
}
