//! The embedded store: every table in one redb file on the local disk
//! (the default; one binary, no server). One process owns the file, so
//! there is one node and claims are not needed: `Claim`s are neither made
//! nor checked here. No redb type leaves this module.

mod commit_log;
mod versions;

use std::path::Path;

use ::redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use super::schema::*;
use super::*;

pub struct Redb {
    /// `None` only between closing a file whose write failed and opening
    /// it again (see [`Redb::reopen`]).
    db: std::sync::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    cache_bytes: usize,
    /// Each commit also saves redb's allocator state (and commits in two
    /// phases), so opening a file that was not closed cleanly needs no walk
    /// of the whole file (see `open_with`).
    quick_repair: bool,
    /// Set when a write failed with an I/O error (ENOSPC, EIO): redb then
    /// refuses every later write ("Previous I/O error occurred. Please
    /// close and re-open the database"), so the next write reopens the file
    /// first (and applies the commit log again over its last checkpoint).
    reopen: std::sync::atomic::AtomicBool,
    /// The commit log (see `commit_log.rs`); `None` when every batch is a
    /// durable redb commit of its own (`commit_log: false`). Locked before
    /// a write transaction begins, never after, so two writers cannot wait
    /// on each other.
    log: Option<std::sync::Mutex<commit_log::CommitLog>>,
}

/// How the embedded store opens its file.
#[derive(Clone, Copy, Debug)]
pub struct RedbOptions {
    /// redb's page cache (half of it may hold pages not yet checkpointed).
    pub cache_bytes: usize,
    /// Save redb's allocator state with every durable commit, so opening a
    /// file not closed cleanly needs no walk of the whole file.
    pub quick_repair: bool,
    /// Make batches durable in the commit log, checkpointing redb about
    /// once a second, instead of a durable redb commit per batch.
    pub commit_log: bool,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            cache_bytes: 64 << 20,
            quick_repair: true,
            commit_log: true,
        }
    }
}

/// `META` key: the last commit log record the file's last durable commit
/// holds.
const LOG_SEQ: &str = "commit_log_seq";

/// The free space a probe wants before it says writes can resume: enough
/// for a few batches, so the dispatcher does not start attempts on a disk
/// that has room for only one more commit.
const PROBE_FREE_BYTES: u64 = 1 << 20;

/// Index entries a list may step over per record it may read: stepping
/// over an index key costs a small fraction of reading and decoding a
/// record.
const INDEX_STEPS_PER_READ: usize = 10;

/// Opens the file (creating it when missing), reporting a repair.
fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let name = path.display().to_string();
    // A file not closed cleanly (kill -9, power loss) is repaired while
    // it opens; say so, and how long it took, since it delays serving.
    let repairing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = repairing.clone();
    let started = std::time::Instant::now();
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .set_repair_callback(move |_| {
            if !flag.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("the database was not closed cleanly (a crash or kill -9); repairing it before serving");
            }
        })
        .create(path)
        .map_err(|source| StoreError::Open {
            path: name.clone(),
            source,
        })?;
    let ms = started.elapsed().as_millis() as u64;
    if repairing.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(path = %name, ms, "database repaired");
    } else {
        // With quick repair a file a crash left opens from the allocator
        // state its last commit saved: nothing to report beyond the time.
        tracing::info!(path = %name, ms, "database opened");
    }
    Ok(db)
}

impl Redb {
    /// Opens (or creates) the database file, choosing quick repair. With it, a restart after a crash
    /// (kill -9, power loss) opens at once; without it redb rebuilds its
    /// allocator state by walking the whole file first, seconds for a
    /// large backlog. It costs a little on every commit (BENCHMARKS.md).
    pub fn open_with(path: &Path, options: RedbOptions) -> Result<Redb, StoreError> {
        let RedbOptions {
            cache_bytes,
            quick_repair,
            commit_log,
        } = options;
        let name = path.display().to_string();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
                op: "create data directory",
                message: format!("{}: {e}", dir.display()),
            })?;
        }
        let db = open_database(path, cache_bytes)?;
        let mut tx = db.begin_write().map_err(io("open"))?;
        tx.set_quick_repair(quick_repair);
        {
            // Create every table so reads never meet a missing one.
            tx.open_table(EVENTS).map_err(io("open"))?;
            tx.open_table(EVENT_IDS).map_err(io("open"))?;
            tx.open_table(DELIVERIES).map_err(io("open"))?;
            tx.open_table(BODIES).map_err(io("open"))?;
            tx.open_table(DUE).map_err(io("open"))?;
            tx.open_table(PARKED).map_err(io("open"))?;
            tx.open_table(ATTEMPTS).map_err(io("open"))?;
            tx.open_table(BY_RULE).map_err(io("open"))?;
            tx.open_table(BY_STATE).map_err(io("open"))?;
            tx.open_table(ENDPOINTS).map_err(io("open"))?;
            tx.open_table(RULE_VERSIONS).map_err(io("open"))?;
            tx.open_table(RULE_VERSIONS_RETIRED).map_err(io("open"))?;
            tx.open_table(LANES).map_err(io("open"))?;
            tx.open_table(LANE_WAIT).map_err(io("open"))?;
            let mut meta = tx.open_table(META).map_err(io("open"))?;
            let found = meta
                .get("schema_version")
                .map_err(io("open"))?
                .map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::TooNew {
                        path: name,
                        found: v,
                        known: SCHEMA_VERSION,
                    });
                }
                Some(v) if v < SCHEMA_VERSION => {
                    migrate(&tx, v)?;
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(io("migrate"))?;
                    tracing::info!(path = %name, from = v, to = SCHEMA_VERSION, "database migrated");
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(io("open"))?;
                }
            }
        }
        tx.commit().map_err(io("open"))?;
        // What a crash left in the log is applied even when the log is
        // off now; then the file is removed.
        let log_path = commit_log::CommitLog::path_for(path);
        let log = if commit_log || log_path.exists() {
            let mut log = commit_log::CommitLog::open(&log_path)?;
            recover(&db, &mut log, quick_repair)?;
            if commit_log {
                Some(std::sync::Mutex::new(log))
            } else {
                drop(log);
                std::fs::remove_file(&log_path).map_err(|e| StoreError::Io {
                    op: "remove the commit log",
                    message: format!("{}: {e}", log_path.display()),
                })?;
                None
            }
        } else {
            None
        };
        Ok(Redb {
            db: std::sync::RwLock::new(Some(db)),
            path: path.to_path_buf(),
            cache_bytes,
            quick_repair,
            reopen: Default::default(),
            log,
        })
    }

    /// Locks the commit log, if there is one.
    fn lock_log(&self) -> Option<std::sync::MutexGuard<'_, commit_log::CommitLog>> {
        self.log
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn read(&self) -> Result<ReadTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(|e| e.into_inner());
        db.as_ref()
            .ok_or_else(closed)?
            .begin_read()
            .map_err(io("begin read"))
    }

    /// A write transaction, on a reopened file if the last write failed
    /// (`log`, locked by the caller, is applied to it again). Returned with
    /// the read guard that keeps the file from being reopened under it.
    fn write(
        &self,
        log: Option<&mut commit_log::CommitLog>,
    ) -> Result<
        (
            std::sync::RwLockReadGuard<'_, Option<Database>>,
            WriteTransaction,
        ),
        StoreError,
    > {
        if self.reopen.load(std::sync::atomic::Ordering::Acquire) {
            self.reopen(log)?;
        }
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let mut tx = guard
            .as_ref()
            .ok_or_else(closed)?
            .begin_write()
            .map_err(io("begin write"))?;
        tx.set_quick_repair(self.quick_repair);
        Ok((guard, tx))
    }

    /// Marks the file for reopening when `r` is an I/O failure.
    fn watch<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Io { .. }) = &r {
            self.reopen
                .store(true, std::sync::atomic::Ordering::Release);
        }
        r
    }

    /// Closes the file and opens it again, which is what redb needs after
    /// a failed write. The old handle closes once the last read transaction
    /// on it ends; until then the open fails and the next write tries again.
    fn reopen(&self, log: Option<&mut commit_log::CommitLog>) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        if !self.reopen.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(()); // another writer did it meanwhile
        }
        drop(db.take());
        let opened = open_database(&self.path, self.cache_bytes).map_err(|e| StoreError::Io {
            op: "reopen the database after a failed write",
            message: e.to_string(),
        })?;
        // The file is back at its last checkpoint: what the log holds
        // after it is applied again before anything else is written.
        if let Some(log) = log {
            recover(&opened, log, self.quick_repair)?;
        }
        *db = Some(opened);
        self.reopen
            .store(false, std::sync::atomic::Ordering::Release);
        tracing::info!(path = %self.path.display(), "database reopened after a failed write");
        Ok(())
    }
}

#[cfg(test)]
impl Redb {
    /// A raw write transaction, for tests that plant what a migration or
    /// a corruption would leave.
    pub(super) fn raw_write(&self) -> WriteTransaction {
        // Checkpointed first, so nothing in the log is applied again over
        // what the test plants.
        self.checkpoint().expect("checkpoint");
        self.write(None).expect("begin write").1
    }
}

fn closed() -> StoreError {
    StoreError::Io {
        op: "use the database",
        message: "it is closed after a failed write and could not be opened again yet".into(),
    }
}

/// The free space on the filesystem holding `path`, for the probe.
fn free_bytes(path: &Path) -> Result<u64, StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| StoreError::Io {
        op: "measure free disk space",
        message: format!("{} holds a NUL byte", dir.display()),
    })?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(StoreError::Io {
            op: "measure free disk space",
            message: format!("{}: {}", dir.display(), std::io::Error::last_os_error()),
        });
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

impl Redb {
    /// One batch in one transaction. A small batch of loggable ops (nearly
    /// all of them) is applied in a non-durable commit after it was
    /// appended to the commit log and synced; any other is a durable
    /// commit, which checkpoints the log too.
    fn apply_inner(&self, ops: Vec<Op>) -> Result<Vec<Done>, StoreError> {
        let mut log = self.lock_log();
        let now = now_ms();
        // Event keys are chosen here, not while applying, so the log can
        // replay an accept under the key it was first stored with.
        let keys: Vec<Option<EventKey>> = ops
            .iter()
            .map(|op| matches!(op, Op::Accept(_)).then(new_event_key))
            .collect();
        // An attempt record is serialized once, for the log and the table.
        let stored: Vec<Option<Vec<u8>>> = ops
            .iter()
            .map(|op| match op {
                Op::Finish {
                    attempt: Some(a), ..
                } => Some(to_json(a)),
                _ => None,
            })
            .collect();
        let out = {
            let (_guard, mut tx) = self.write(log.as_deref_mut())?;
            // Staged after `write`, which may reopen the file (and the log).
            let logged = match log.as_deref_mut() {
                Some(log) if ops.iter().all(commit_log::loggable) => {
                    let refs: Vec<commit_log::ToLog<'_>> = ops
                        .iter()
                        .zip(&keys)
                        .zip(&stored)
                        .map(|((op, key), s)| (op, *key, s.as_deref()))
                        .collect();
                    log.stage(now, &refs)
                }
                _ => false,
            };
            let out = apply_batch(
                &tx,
                ops.into_iter()
                    .zip(keys)
                    .zip(stored)
                    .map(|((op, key), s)| (op, key, s)),
                now,
            )?;
            match (&mut log, logged) {
                (Some(log), true) => {
                    tx.set_durability(Durability::None).map_err(io("commit"))?;
                    let seq = log.append_staged()?;
                    // Should this commit fail (redb writes pages out when
                    // its buffer is full, and that can meet a full disk),
                    // the record is taken back, so the failure means what
                    // it says: nothing of the batch is stored, and the
                    // reopen it asks for does not apply it either.
                    if let Err(e) = tx.commit() {
                        if let Err(w) = log.withdraw(seq) {
                            tracing::error!(error = %w, "a batch that failed to commit stays in the commit log; it is applied when the file is reopened");
                        }
                        return Err(io("commit")(e));
                    }
                }
                (Some(log), false) => {
                    put_log_seq(&tx, log.last_seq)?;
                    tx.commit().map_err(io("commit"))?;
                    let seq = log.last_seq;
                    log.checkpointed(seq);
                }
                (None, _) => tx.commit().map_err(io("commit"))?,
            }
            out
        };
        if let Some(log) = &mut log
            && log.checkpoint_due()
        {
            // The batch stands whatever the checkpoint does: a failure
            // only means the log keeps growing until one succeeds (and
            // an I/O error reopens the file at the next write).
            if let Err(e) = self.watch(self.checkpoint_locked(log)) {
                tracing::warn!(error = %e, "checkpoint of the commit log failed; the log keeps the batches");
            }
        }
        Ok(out)
    }

    /// A durable commit holding everything written so far; the log starts
    /// over (if anything was logged since the last). Called when the store
    /// closes and before a test plants records.
    fn checkpoint(&self) -> Result<(), StoreError> {
        match self.lock_log() {
            Some(mut log) if !log.is_empty() => self.checkpoint_locked(&mut log),
            _ => Ok(()),
        }
    }

    fn checkpoint_locked(&self, log: &mut commit_log::CommitLog) -> Result<(), StoreError> {
        let (_guard, tx) = self.write(Some(&mut *log))?;
        let seq = log.last_seq;
        put_log_seq(&tx, seq)?;
        tx.commit().map_err(io("checkpoint"))?;
        log.checkpointed(seq);
        Ok(())
    }
}

/// Applies `ops` in `tx`: each `Accept` with its event key, each `Finish`
/// with its attempt record's stored form when it was made already.
fn apply_batch(
    tx: &WriteTransaction,
    ops: impl IntoIterator<Item = (Op, Option<EventKey>, Option<Vec<u8>>)>,
    now: u64,
) -> Result<Vec<Done>, StoreError> {
    let mut out = Vec::new();
    let mut tables = Tables::open(tx)?;
    for (op, key, stored) in ops {
        let done = match op {
            // Rare (once per reload, once per retention run):
            // their tables are opened only then, not for every commit.
            op @ (Op::PutRuleVersions { .. } | Op::DropRuleVersions(_)) => versions::apply(tx, op)?,
            op => apply_one(&mut tables, op, key, stored, now)?,
        };
        out.push(done);
    }
    Ok(out)
}

fn put_log_seq(tx: &WriteTransaction, seq: u64) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META).map_err(io("checkpoint"))?;
    meta.insert(LOG_SEQ, seq).map_err(io("checkpoint"))?;
    Ok(())
}

/// Applies what the commit log holds after the file's last checkpoint, in
/// one durable commit, and starts the log over: after a crash (at open) or
/// a failed write (at reopen) the file is back at that checkpoint.
fn recover(
    db: &Database,
    log: &mut commit_log::CommitLog,
    quick_repair: bool,
) -> Result<(), StoreError> {
    let checkpointed = {
        let tx = db.begin_read().map_err(io("recover"))?;
        let meta = tx.open_table(META).map_err(io("recover"))?;
        meta.get(LOG_SEQ)
            .map_err(io("recover"))?
            .map_or(0, |v| v.value())
    };
    let pending = log.read_after(checkpointed)?;
    let last = pending.last().map_or(checkpointed, |r| r.seq);
    if pending.is_empty() {
        // A clean close: nothing to apply, and no commit to make at start.
        log.checkpointed(last);
        return Ok(());
    }
    let (records, ops) = (
        pending.len(),
        pending.iter().map(|r| r.ops.len()).sum::<usize>(),
    );
    let started = std::time::Instant::now();
    let mut tx = db.begin_write().map_err(io("recover"))?;
    tx.set_quick_repair(quick_repair);
    for record in pending {
        apply_batch(
            &tx,
            record.ops.into_iter().map(|(op, key)| (op, key, None)),
            record.now,
        )?;
    }
    put_log_seq(&tx, last)?;
    tx.commit().map_err(io("recover"))?;
    log.checkpointed(last);
    tracing::warn!(
        log = %log.path().display(),
        records,
        ops,
        ms = started.elapsed().as_millis() as u64,
        "applied the commit log's batches that the last checkpoint did not hold (the last run ended without closing the store)"
    );
    Ok(())
}

impl Drop for Redb {
    /// A clean close leaves nothing in the log to apply again.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "could not checkpoint the commit log at close; the next start applies it");
        }
    }
}

impl Backend for Redb {
    fn kind(&self) -> &'static str {
        "redb"
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        invariants::assert_indexes(self);
    }

    /// Applies a batch in one transaction with one durable commit. Either
    /// every op's effect is stored, or (on a storage error) none is.
    fn apply(&self, ops: Vec<Op>) -> Result<Vec<Done>, StoreError> {
        let r = self.apply_inner(ops);
        self.watch(r)
    }

    fn close(&self) -> Result<(), StoreError> {
        let r = self.checkpoint();
        self.watch(r)
    }

    /// Room on the disk for a few batches, then an empty commit (which
    /// reopens the file first if the last write failed).
    fn probe(&self) -> Result<(), StoreError> {
        let free = free_bytes(&self.path)?;
        if free < PROBE_FREE_BYTES {
            return Err(StoreError::Io {
                op: "probe",
                message: format!(
                    "no space left on device: {} has {free} bytes free; writes resume once {PROBE_FREE_BYTES} are",
                    self.path.parent().unwrap_or(Path::new(".")).display()
                ),
            });
        }
        let r = match self.lock_log() {
            Some(mut log) => self.checkpoint_locked(&mut log),
            None => self
                .write(None)
                .and_then(|(_guard, tx)| tx.commit().map_err(io("commit"))),
        };
        self.watch(r)
    }

    fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(DELIVERIES).map_err(io("read delivery"))?;
        let found = t.get(id.0).map_err(io("read delivery"))?;
        found.map(|v| from_json(v.value(), "delivery")).transpose()
    }

    fn body(&self, id: DeliveryId) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(BODIES).map_err(io("read body"))?;
        Ok(t.get(id.0)
            .map_err(io("read body"))?
            .map(|v| v.value().to_vec()))
    }

    fn attempts(&self, id: DeliveryId) -> Result<Vec<Attempt>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(ATTEMPTS).map_err(io("read attempts"))?;
        let mut out = Vec::new();
        for item in t
            .range((id.0, 0u32)..=(id.0, u32::MAX))
            .map_err(io("read attempts"))?
        {
            let (_, v) = item.map_err(io("read attempts"))?;
            out.push(from_json(v.value(), "attempt")?);
        }
        Ok(out)
    }

    fn event(&self, id: &str) -> Result<Option<EventRecord>, StoreError> {
        let tx = self.read()?;
        read_event(&tx, id)
    }

    /// Up to `limit` pending deliveries due at `now`, oldest due first,
    /// skipping those `busy` says are taken (queued or in flight). `after` resumes
    /// behind the key an earlier scan stopped at, so a backlog is walked
    /// once instead of from its start on every scan. Bodies up to
    /// `body_cap` bytes come along, read in the same transaction.
    fn due(
        &self,
        after: Option<DueKey>,
        now: u64,
        limit: usize,
        busy: &dyn Fn(DeliveryId) -> bool,
        body_cap: usize,
    ) -> Result<DueScan, StoreError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let tx = self.read()?;
        let due = tx.open_table(DUE).map_err(io("due"))?;
        let deliveries = tx.open_table(DELIVERIES).map_err(io("due"))?;
        let bodies = tx.open_table(BODIES).map_err(io("due"))?;
        let mut scan = DueScan::default();
        // When the scan after this one should run at the latest.
        let mut later = due
            .range((now.saturating_add(1), 0u128)..)
            .map_err(io("due"))?;
        scan.next_due = later
            .next()
            .transpose()
            .map_err(io("due"))?
            .map(|(k, _)| k.value().0);
        if limit == 0 {
            scan.resume = after;
            scan.more = true;
            return Ok(scan);
        }
        let start = after.map_or(Unbounded, Excluded);
        let range = due
            .range::<DueKey>((start, Included((now, u128::MAX))))
            .map_err(io("due"))?;
        for item in range {
            let (k, _) = item.map_err(io("due"))?;
            let key = k.value();
            scan.resume = Some(key);
            let id = DeliveryId(key.1);
            if busy(id) {
                continue;
            }
            if let Some(v) = deliveries.get(id.0).map_err(io("due"))? {
                let d: Delivery = from_json(v.value(), "delivery")?;
                let body = bodies
                    .get(id.0)
                    .map_err(io("due"))?
                    .filter(|b| b.value().len() <= body_cap)
                    .map(|b| b.value().to_vec());
                scan.found.push(Due {
                    delivery: d,
                    body,
                    claim: None,
                });
            }
            if scan.found.len() >= limit {
                scan.more = true;
                break;
            }
        }
        Ok(scan)
    }

    fn lanes(
        &self,
        filter: &LaneFilter,
        after: Option<&str>,
        limit: usize,
        budget: usize,
    ) -> Result<Vec<LaneInfo>, StoreError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let tx = self.read()?;
        let lanes = tx.open_table(LANES).map_err(io("lanes"))?;
        let deliveries = tx.open_table(DELIVERIES).map_err(io("lanes"))?;
        let wait = tx.open_table(LANE_WAIT).map_err(io("lanes"))?;
        // A rule's lanes are one range, from `rule/` on.
        let start = match (&filter.rule, after) {
            (_, Some(a)) => Excluded(a.to_string()),
            (Some(rule), None) => Included(format!("{rule}/")),
            (None, None) => Unbounded,
        };
        let mut out = Vec::new();
        let range = lanes
            .range::<&str>((start.as_ref().map(String::as_str), Unbounded))
            .map_err(io("lanes"))?;
        for (looked, item) in range.enumerate() {
            if out.len() >= limit || looked >= budget {
                break;
            }
            let (k, v) = item.map_err(io("lanes"))?;
            let lane = k.value();
            if let Some(rule) = &filter.rule
                && !lane.starts_with(&format!("{rule}/"))
            {
                break;
            }
            let rec: LaneRecord = from_json(v.value(), "lane")?;
            if let Some(info) = lane_info(&deliveries, &wait, lane, &rec)?
                && filter.keeps(&info)
            {
                out.push(info);
            }
        }
        Ok(out)
    }

    fn lane(&self, lane: &str) -> Result<Option<LaneInfo>, StoreError> {
        let tx = self.read()?;
        let lanes = tx.open_table(LANES).map_err(io("lane"))?;
        let deliveries = tx.open_table(DELIVERIES).map_err(io("lane"))?;
        let wait = tx.open_table(LANE_WAIT).map_err(io("lane"))?;
        let Some(v) = lanes.get(lane).map_err(io("lane"))? else {
            return Ok(None);
        };
        let rec: LaneRecord = from_json(v.value(), "lane")?;
        lane_info(&deliveries, &wait, lane, &rec)
    }

    /// Counted from the tables' lengths and the halted heads' park
    /// entries; the oldest waiting delivery is the smallest id among each
    /// lane's first waiting one (ids are time-ordered), one seek per lane
    /// rather than a walk of everything waiting.
    fn lane_stats(&self) -> Result<LaneStats, StoreError> {
        let tx = self.read()?;
        let lanes = tx.open_table(LANES).map_err(io("lane stats"))?;
        let wait = tx.open_table(LANE_WAIT).map_err(io("lane stats"))?;
        let parked = tx.open_table(PARKED).map_err(io("lane stats"))?;
        let halted = parked
            .range((LANE_PARK_PREFIX, 0u128)..)
            .map_err(io("lane stats"))?
            .map_while(|e| {
                e.ok()
                    .filter(|(k, _)| k.value().0.starts_with(LANE_PARK_PREFIX))
            })
            .count() as u64;
        let mut oldest: Option<u128> = None;
        for item in lanes.iter().map_err(io("lane stats"))? {
            let (k, _) = item.map_err(io("lane stats"))?;
            let lane = k.value();
            let first = wait
                .range((lane, 0u64)..=(lane, u64::MAX))
                .map_err(io("lane stats"))?
                .next()
                .transpose()
                .map_err(io("lane stats"))?;
            if let Some((_, id)) = first {
                oldest = Some(oldest.map_or(id.value(), |o| o.min(id.value())));
            }
        }
        Ok(LaneStats {
            lanes: lanes.len().map_err(io("lane stats"))?,
            halted,
            waiting: wait.len().map_err(io("lane stats"))?,
            oldest_waiting_at: oldest.map(|id| DeliveryId(id).created_ms()),
        })
    }

    /// Pending and parked deliveries: the backlog.
    fn backlog(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.read()?;
        let due = tx
            .open_table(DUE)
            .map_err(io("count"))?
            .len()
            .map_err(io("count"))?;
        let parked = tx
            .open_table(PARKED)
            .map_err(io("count"))?
            .len()
            .map_err(io("count"))?;
        Ok((due, parked))
    }

    fn pending_groups(&self, budget: usize) -> Result<PendingCounts, StoreError> {
        let tx = self.read()?;
        let due = tx.open_table(DUE).map_err(io("pending"))?;
        let deliveries = tx.open_table(DELIVERIES).map_err(io("pending"))?;
        let mut counts: std::collections::HashMap<PendingGroup, u64> =
            std::collections::HashMap::new();
        let mut complete = true;
        for (looked, item) in due.iter().map_err(io("pending"))?.enumerate() {
            if looked == budget {
                complete = false;
                break;
            }
            let (k, _) = item.map_err(io("pending"))?;
            if let Some(v) = deliveries.get(k.value().1).map_err(io("pending"))? {
                // Only the three fields: serde skips the rest of the record.
                let group: PendingGroup = from_json(v.value(), "delivery")?;
                *counts.entry(group).or_default() += 1;
            }
        }
        let mut groups: Vec<(PendingGroup, u64)> = counts.into_iter().collect();
        groups.sort();
        Ok(PendingCounts { groups, complete })
    }

    fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(ENDPOINTS).map_err(io("endpoints"))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(io("endpoints"))? {
            let (_, v) = item.map_err(io("endpoints"))?;
            out.push(from_json(v.value(), "endpoint")?);
        }
        Ok(out)
    }

    /// Endpoints that have parked deliveries, with how many (for the API).
    fn parked_count(&self, endpoint: &str) -> Result<u64, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(PARKED).map_err(io("parked"))?;
        let n = t
            .range((endpoint, 0u128)..=(endpoint, u128::MAX))
            .map_err(io("parked"))?
            .count();
        Ok(n as u64)
    }

    /// Parked deliveries per endpoint, for the endpoints whose key starts
    /// with `prefix` (such as every WebSocket space). Walks those entries,
    /// so it is for the admin API, not the delivery path.
    fn parked_by_prefix(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(PARKED).map_err(io("parked"))?;
        let mut out: Vec<(String, u64)> = Vec::new();
        for entry in t.range((prefix, 0u128)..).map_err(io("parked"))? {
            let (key, _) = entry.map_err(io("parked"))?;
            let endpoint = key.value().0;
            if !endpoint.starts_with(prefix) {
                break;
            }
            match out.last_mut() {
                Some((last, n)) if last == endpoint => *n += 1,
                _ => out.push((endpoint.to_string(), 1)),
            }
        }
        Ok(out)
    }

    /// A page of deliveries newest first: up to `limit` that pass every
    /// filter, strictly older than `before`, looking at no more than
    /// `budget` records. Candidates come from the most selective index
    /// (event record, `BY_RULE`, the state's index, else every delivery in
    /// the time range), so the common filters cost about one read per row
    /// shown; the others are checked per candidate within the budget.
    fn page(
        &self,
        filter: &Filter,
        before: Option<DeliveryId>,
        limit: usize,
        budget: usize,
    ) -> Result<Page, StoreError> {
        let tx = self.read()?;
        let deliveries = tx.open_table(DELIVERIES).map_err(io("list"))?;
        let attempts = tx.open_table(ATTEMPTS).map_err(io("list"))?;
        let (lower, upper) = filter.id_range(before);
        let mut page = Page::default();
        if limit == 0 || lower > upper {
            return Ok(page);
        }
        let budget = budget.max(1);
        // The last id looked at, and whether looking stopped early.
        let mut last = None;
        let mut stopped = false;
        let mut take = |id: u128| -> Result<bool, StoreError> {
            page.scanned += 1;
            last = Some(DeliveryId(id));
            if let Some(v) = deliveries.get(id).map_err(io("list"))? {
                let d: Delivery = from_json(v.value(), "delivery")?;
                let keep = filter.keeps(&d)
                    && match &filter.endpoint {
                        None => true,
                        Some(ep) => {
                            let attempt = if d.attempts == 0 {
                                None
                            } else {
                                attempts
                                    .get((id, d.attempts))
                                    .map_err(io("list"))?
                                    .map(|a| from_json::<Attempt>(a.value(), "attempt"))
                                    .transpose()?
                            };
                            ep.matches(&d, attempt.as_ref())
                        }
                    };
                if keep {
                    page.deliveries.push(d);
                }
            }
            stopped = page.deliveries.len() >= limit || page.scanned >= budget;
            Ok(stopped)
        };
        // Unordered indexes yield their newest `k`; when more than `k`
        // were in range, the page goes on below the smallest of them.
        let k = if filter.post_filters() { budget } else { limit };
        let mut capped = false;
        // Where to go on from when a walk of two indexes ran out of steps.
        let mut resume_at = None;
        match (&filter.event, &filter.rule, filter.state) {
            (Some(event), _, _) => {
                let mut ids: Vec<u128> = read_event(&tx, event)?
                    .map(|r| r.deliveries.iter().map(|d| d.0).collect())
                    .unwrap_or_default();
                ids.retain(|id| (lower..=upper).contains(id));
                ids.sort_unstable_by(|a, b| b.cmp(a));
                feed(ids, &mut take)?;
            }
            (None, Some(rule), Some(state)) if state.is_final() => {
                // Both indexes are ordered by id: walk them together and
                // load only the ids in both, so a rare combination costs
                // index steps, not record reads.
                let by_rule = tx.open_table(BY_RULE).map_err(io("list"))?;
                let by_state = tx.open_table(BY_STATE).map_err(io("list"))?;
                let mut a = by_rule
                    .range((rule.as_str(), lower)..=(rule.as_str(), upper))
                    .map_err(io("list"))?
                    .rev();
                let mut b = by_state
                    .range((state.as_str(), lower)..=(state.as_str(), upper))
                    .map_err(io("list"))?
                    .rev();
                let (mut x, mut y) = (next_id(&mut a)?, next_id(&mut b)?);
                let mut steps = 0usize;
                while let (Some(i), Some(j)) = (x, y) {
                    steps += 1;
                    if steps > budget.saturating_mul(INDEX_STEPS_PER_READ) {
                        // Every id in both above the larger head was seen;
                        // one in both must be at or below the smaller.
                        resume_at = Some(DeliveryId(i.min(j).saturating_add(1)));
                        break;
                    }
                    match i.cmp(&j) {
                        std::cmp::Ordering::Equal => {
                            if take(i)? {
                                break;
                            }
                            x = next_id(&mut a)?;
                            y = next_id(&mut b)?;
                        }
                        std::cmp::Ordering::Greater => x = next_id(&mut a)?,
                        std::cmp::Ordering::Less => y = next_id(&mut b)?,
                    }
                }
            }
            (None, Some(rule), _) => {
                let idx = tx.open_table(BY_RULE).map_err(io("list"))?;
                let range = idx
                    .range((rule.as_str(), lower)..=(rule.as_str(), upper))
                    .map_err(io("list"))?;
                for item in range.rev() {
                    let (key, _) = item.map_err(io("list"))?;
                    if take(key.value().1)? {
                        break;
                    }
                }
            }
            (None, None, Some(state @ (State::Pending | State::Parked | State::Waiting))) => {
                let ids = if state == State::Pending {
                    let due = tx.open_table(DUE).map_err(io("list"))?;
                    let keys = due.iter().map_err(io("list"))?;
                    newest_between(keys.map(|k| k.map(|(k, _)| k.value().1)), lower, upper, k)?
                } else if state == State::Waiting {
                    let wait = tx.open_table(LANE_WAIT).map_err(io("list"))?;
                    let entries = wait.iter().map_err(io("list"))?;
                    newest_between(entries.map(|e| e.map(|(_, v)| v.value())), lower, upper, k)?
                } else {
                    let parked = tx.open_table(PARKED).map_err(io("list"))?;
                    let keys = parked.iter().map_err(io("list"))?;
                    newest_between(keys.map(|k| k.map(|(k, _)| k.value().1)), lower, upper, k)?
                };
                capped = ids.len() >= k;
                feed(ids, &mut take)?;
            }
            (None, None, Some(state)) => {
                let idx = tx.open_table(BY_STATE).map_err(io("list"))?;
                let key = state.as_str();
                let range = idx.range((key, lower)..=(key, upper)).map_err(io("list"))?;
                for item in range.rev() {
                    let (k, _) = item.map_err(io("list"))?;
                    if take(k.value().1)? {
                        break;
                    }
                }
            }
            (None, None, None) => {
                let all = tx.open_table(DELIVERIES).map_err(io("list"))?;
                for item in all.range(lower..=upper).map_err(io("list"))?.rev() {
                    let (k, _) = item.map_err(io("list"))?;
                    if take(k.value())? {
                        break;
                    }
                }
            }
        }
        if stopped || capped {
            page.next_before = last;
        }
        if resume_at.is_some() && page.deliveries.len() < limit {
            page.next_before = resume_at;
        }
        Ok(page)
    }

    /// Deliveries by state. Pending, parked and all final ones are table
    /// lengths (redb keeps them); failed and skipped are counted from
    /// `BY_STATE`, up to `cap` each, and succeeded is the rest. A count
    /// that reached `cap` is `cap`, and `exact` says so.
    fn counts(&self, cap: u64) -> Result<(StateCounts, bool), StoreError> {
        let tx = self.read()?;
        let len = |def: TableDefinition<'_, (u64, DeliveryKey), ()>| -> Result<u64, StoreError> {
            tx.open_table(def)
                .map_err(io("count"))?
                .len()
                .map_err(io("count"))
        };
        let pending = len(DUE)?;
        let parked_t = tx.open_table(PARKED).map_err(io("count"))?;
        let parked = parked_t.len().map_err(io("count"))?;
        let by_state = tx.open_table(BY_STATE).map_err(io("count"))?;
        let finals = by_state.len().map_err(io("count"))?;
        let mut exact = true;
        let mut count = |state: State| -> Result<u64, StoreError> {
            let key = state.as_str();
            let n = by_state
                .range((key, 0u128)..=(key, u128::MAX))
                .map_err(io("count"))?
                .take(usize::try_from(cap).unwrap_or(usize::MAX))
                .count() as u64;
            if n >= cap {
                exact = false;
            }
            Ok(n)
        };
        let failed = count(State::Failed)?;
        let skipped = count(State::Skipped)?;
        let waiting = tx
            .open_table(LANE_WAIT)
            .map_err(io("count"))?
            .len()
            .map_err(io("count"))?;
        let counts = StateCounts {
            pending,
            parked,
            waiting,
            succeeded: finals.saturating_sub(failed + skipped),
            failed,
            skipped,
        };
        Ok((counts, exact))
    }

    /// The newest deliveries made at or after `since_ms`, up to `limit`,
    /// each with its last attempt: what the console's traffic charts are
    /// drawn from (a range of the time-ordered delivery ids).
    fn recent(
        &self,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Option<Attempt>)>, StoreError> {
        let tx = self.read()?;
        let deliveries = tx.open_table(DELIVERIES).map_err(io("recent"))?;
        let attempts = tx.open_table(ATTEMPTS).map_err(io("recent"))?;
        let mut out = Vec::new();
        let range = deliveries
            .range(u128::from(since_ms) << 80..)
            .map_err(io("recent"))?;
        for item in range.rev().take(limit) {
            let (k, v) = item.map_err(io("recent"))?;
            let d: Delivery = from_json(v.value(), "delivery")?;
            let last = if d.attempts == 0 {
                None
            } else {
                attempts
                    .get((k.value(), d.attempts))
                    .map_err(io("recent"))?
                    .map(|a| from_json::<Attempt>(a.value(), "attempt"))
                    .transpose()?
            };
            out.push((d, last));
        }
        Ok(out)
    }

    /// The last attempt of each delivery (`None` for one not attempted),
    /// in one read transaction: the list shows its URL and duration.
    fn last_attempts(&self, list: &[Delivery]) -> Result<Vec<Option<Attempt>>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(ATTEMPTS).map_err(io("read attempts"))?;
        list.iter()
            .map(|d| {
                if d.attempts == 0 {
                    return Ok(None);
                }
                t.get((d.id.0, d.attempts))
                    .map_err(io("read attempts"))?
                    .map(|a| from_json(a.value(), "attempt"))
                    .transpose()
            })
            .collect()
    }

    /// A delivery's last attempt, if it has one (for the live tail's
    /// endpoint filter).
    fn last_attempt(&self, d: &Delivery) -> Result<Option<Attempt>, StoreError> {
        if d.attempts == 0 {
            return Ok(None);
        }
        let tx = self.read()?;
        let t = tx.open_table(ATTEMPTS).map_err(io("read attempts"))?;
        t.get((d.id.0, d.attempts))
            .map_err(io("read attempts"))?
            .map(|a| from_json(a.value(), "attempt"))
            .transpose()
    }

    fn rule_versions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.stored_rule_versions()
    }

    fn export(&self, after: Option<EventKey>, limit: usize) -> Result<Export, StoreError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let tx = self.read()?;
        let events = tx.open_table(EVENTS).map_err(io("export"))?;
        let deliveries = tx.open_table(DELIVERIES).map_err(io("export"))?;
        let bodies = tx.open_table(BODIES).map_err(io("export"))?;
        let attempts = tx.open_table(ATTEMPTS).map_err(io("export"))?;
        let mut out = Export::default();
        let start = after.map_or(Unbounded, Excluded);
        for item in events
            .range::<EventKey>((start, Unbounded))
            .map_err(io("export"))?
        {
            if out.events.len() >= limit {
                out.next = out.events.last().map(|(k, _)| *k);
                break;
            }
            let (k, v) = item.map_err(io("export"))?;
            let record: EventRecord = from_json(v.value(), "event")?;
            for id in &record.deliveries {
                let Some(d) = deliveries.get(id.0).map_err(io("export"))? else {
                    continue;
                };
                let d: Delivery = from_json(d.value(), "delivery")?;
                let body = bodies
                    .get(id.0)
                    .map_err(io("export"))?
                    .map(|b| b.value().to_vec())
                    .unwrap_or_default();
                let mut list = Vec::new();
                for a in attempts
                    .range((id.0, 0u32)..=(id.0, u32::MAX))
                    .map_err(io("export"))?
                {
                    list.push(from_json(a.map_err(io("export"))?.1.value(), "attempt")?);
                }
                out.deliveries.push((d, body, list));
            }
            out.events.push((k.value(), record));
        }
        Ok(out)
    }

    fn unused_rule_versions(&self, before_ms: u64) -> Result<Vec<String>, StoreError> {
        self.retired_unused_rule_versions(before_ms)
    }
}

/// A lane as admins see it, from its record, its head and its waiting ones.
fn lane_info(
    deliveries: &impl ReadableTable<DeliveryKey, &'static [u8]>,
    wait: &impl ReadableTable<(&'static str, u64), DeliveryKey>,
    lane: &str,
    rec: &LaneRecord,
) -> Result<Option<LaneInfo>, StoreError> {
    let Some(v) = deliveries.get(rec.head.0).map_err(io("lane"))? else {
        return Ok(None);
    };
    let head: Delivery = from_json(v.value(), "delivery")?;
    let mut waiting = 0u64;
    let mut oldest = None;
    for item in wait
        .range((lane, 0u64)..=(lane, u64::MAX))
        .map_err(io("lane"))?
    {
        let (_, id) = item.map_err(io("lane"))?;
        if waiting == 0 {
            oldest = Some(DeliveryId(id.value()).created_ms());
        }
        waiting += 1;
    }
    Ok(Some(LaneInfo::new(lane.to_string(), head, waiting, oldest)))
}

fn read_event(tx: &ReadTransaction, id: &str) -> Result<Option<EventRecord>, StoreError> {
    let ids = tx.open_table(EVENT_IDS).map_err(io("read event"))?;
    let events = tx.open_table(EVENTS).map_err(io("read event"))?;
    Ok(find_event(&ids, &events, id)?.map(|(_, record)| record))
}

/// The event key and record of a sender's event id, if it was accepted.
fn find_event(
    ids: &impl ReadableTable<&'static str, EventKey>,
    events: &impl ReadableTable<EventKey, &'static [u8]>,
    id: &str,
) -> Result<Option<(EventKey, EventRecord)>, StoreError> {
    let Some(key) = ids.get(id).map_err(io("find event"))? else {
        return Ok(None);
    };
    let key = key.value();
    let Some(v) = events.get(key).map_err(io("find event"))? else {
        return Ok(None);
    };
    Ok(Some((key, from_json(v.value(), "event")?)))
}

/// A new, time-ordered event key.
fn new_event_key() -> EventKey {
    uuid::Uuid::now_v7().as_u128()
}

/// An entry of a (key, delivery id) index as its range yields it.
type IndexEntry<'a> = Result<
    (
        ::redb::AccessGuard<'a, (&'static str, DeliveryKey)>,
        ::redb::AccessGuard<'a, ()>,
    ),
    ::redb::StorageError,
>;

/// The delivery id of an index range's next entry, `None` at its end.
fn next_id<'a>(it: &mut impl Iterator<Item = IndexEntry<'a>>) -> Result<Option<u128>, StoreError> {
    Ok(it
        .next()
        .transpose()
        .map_err(io("list"))?
        .map(|(k, _)| k.value().1))
}

/// Gives `take` the ids in `ids` until it says it has enough.
fn feed(
    ids: Vec<u128>,
    take: &mut impl FnMut(u128) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    for id in ids {
        if take(id)? {
            break;
        }
    }
    Ok(())
}

/// The `k` largest ids at or below `upper`, largest first, from a table
/// not ordered by id (`DUE`, `PARKED`): one pass, `k` ids in memory.
fn newest<E: std::fmt::Display>(
    ids: impl Iterator<Item = Result<u128, E>>,
    upper: u128,
    k: usize,
) -> Result<Vec<u128>, StoreError> {
    use std::cmp::Reverse;
    let mut heap = std::collections::BinaryHeap::with_capacity(k.min(4096) + 1);
    for id in ids {
        let id = id.map_err(io("list"))?;
        if id <= upper {
            heap.push(Reverse(id));
            if heap.len() > k {
                heap.pop();
            }
        }
    }
    // Ascending `Reverse` is descending ids.
    Ok(heap.into_sorted_vec().into_iter().map(|r| r.0).collect())
}

/// The `k` largest ids in `lower..=upper`, largest first, from a table
/// not ordered by id (`DUE`, `PARKED`): one pass, `k` ids in memory.
fn newest_between<E: std::fmt::Display>(
    ids: impl Iterator<Item = Result<u128, E>>,
    lower: u128,
    upper: u128,
    k: usize,
) -> Result<Vec<u128>, StoreError> {
    let in_range = ids.filter(|id| id.as_ref().map_or(true, |id| *id >= lower));
    newest(in_range, upper, k)
}

/// Brings a file of an older schema version up to date, inside the
/// transaction that opens it.
fn migrate(tx: &WriteTransaction, from: u64) -> Result<(), StoreError> {
    if from < 2 {
        // 1 → 2: events keyed by time with a hashed-id index instead of by
        // the sender's id with an age index; no by-event index; the state
        // index holds final states only.
        {
            let old = tx.open_table(EVENTS_V1).map_err(io("migrate"))?;
            let mut events = tx.open_table(EVENTS).map_err(io("migrate"))?;
            let mut ids = tx.open_table(EVENT_IDS).map_err(io("migrate"))?;
            for (n, item) in old.iter().map_err(io("migrate"))?.enumerate() {
                let (_, v) = item.map_err(io("migrate"))?;
                let record: EventRecord = from_json(v.value(), "event")?;
                // Time-ordered like a UUIDv7; the low bits only make it unique.
                let key = (u128::from(record.accepted_at) << 80) | n as u128;
                events
                    .insert(key, to_json(&record).as_slice())
                    .map_err(io("migrate"))?;
                ids.insert(record.id.as_str(), key).map_err(io("migrate"))?;
            }
        }
        tx.delete_table(EVENTS_V1).map_err(io("migrate"))?;
        tx.delete_table(EVENT_TIMES_V1).map_err(io("migrate"))?;
        tx.delete_table(BY_EVENT_V1).map_err(io("migrate"))?;
        let mut by_state = tx.open_table(BY_STATE).map_err(io("migrate"))?;
        for state in [State::Pending, State::Parked] {
            let key = state.as_str();
            by_state
                .retain_in((key, 0u128)..=(key, u128::MAX), |_, _| false)
                .map_err(io("migrate"))?;
        }
    }
    // 2 → 3: ordered lanes (`LANES`, `LANE_WAIT`, the `waiting` state and
    // a delivery's `lane`). Nothing to move: the open created the two
    // tables, no stored delivery has a lane, and the version bump keeps an
    // older rulehook, which cannot read `waiting`, from opening the file.
    Ok(())
}

/// Every table of a write transaction, opened once: opening a table costs
/// more than an insert, and one commit covers thousands of operations.
struct Tables<'t> {
    events: ::redb::Table<'t, EventKey, &'static [u8]>,
    event_ids: ::redb::Table<'t, &'static str, EventKey>,
    deliveries: ::redb::Table<'t, DeliveryKey, &'static [u8]>,
    bodies: ::redb::Table<'t, DeliveryKey, &'static [u8]>,
    due: ::redb::Table<'t, (u64, DeliveryKey), ()>,
    parked: ::redb::Table<'t, (&'static str, DeliveryKey), ()>,
    attempts: ::redb::Table<'t, (DeliveryKey, u32), &'static [u8]>,
    by_rule: ::redb::Table<'t, (&'static str, DeliveryKey), ()>,
    by_state: ::redb::Table<'t, (&'static str, DeliveryKey), ()>,
    endpoints: ::redb::Table<'t, &'static str, &'static [u8]>,
    lanes: ::redb::Table<'t, &'static str, &'static [u8]>,
    lane_wait: ::redb::Table<'t, (&'static str, u64), DeliveryKey>,
}

impl<'t> Tables<'t> {
    fn open(tx: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            events: tx.open_table(EVENTS).map_err(io("open tables"))?,
            event_ids: tx.open_table(EVENT_IDS).map_err(io("open tables"))?,
            deliveries: tx.open_table(DELIVERIES).map_err(io("open tables"))?,
            bodies: tx.open_table(BODIES).map_err(io("open tables"))?,
            due: tx.open_table(DUE).map_err(io("open tables"))?,
            parked: tx.open_table(PARKED).map_err(io("open tables"))?,
            attempts: tx.open_table(ATTEMPTS).map_err(io("open tables"))?,
            by_rule: tx.open_table(BY_RULE).map_err(io("open tables"))?,
            by_state: tx.open_table(BY_STATE).map_err(io("open tables"))?,
            endpoints: tx.open_table(ENDPOINTS).map_err(io("open tables"))?,
            lanes: tx.open_table(LANES).map_err(io("open tables"))?,
            lane_wait: tx.open_table(LANE_WAIT).map_err(io("open tables"))?,
        })
    }
}

fn load_delivery(t: &mut Tables<'_>, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
    let t = &mut t.deliveries;
    let found = t.get(id.0).map_err(io("read delivery"))?;
    found.map(|v| from_json(v.value(), "delivery")).transpose()
}

/// Writes `new`, keeping the state, due and parked indexes in step with it:
/// a pending delivery is in `DUE`, a parked one in `PARKED`, a waiting one
/// in `LANE_WAIT`, a final one in `BY_STATE`.
fn save_delivery(
    t: &mut Tables<'_>,
    old: Option<&Delivery>,
    new: &Delivery,
) -> Result<(), StoreError> {
    let id = new.id.0;
    let by_state = &mut t.by_state;
    let due = &mut t.due;
    let parked = &mut t.parked;
    if let Some(old) = old {
        if old.state != new.state && old.state.is_final() {
            by_state
                .remove((old.state.as_str(), id))
                .map_err(io("save delivery"))?;
        }
        if let (State::Pending, Some(at)) = (old.state, old.next_attempt_at) {
            due.remove((at, id)).map_err(io("save delivery"))?;
        }
        if let Some(ep) = &old.parked_on {
            parked
                .remove((ep.as_str(), id))
                .map_err(io("save delivery"))?;
        }
        if let (State::Waiting, Some(lane)) = (old.state, &old.lane) {
            t.lane_wait
                .remove((lane.key.as_str(), lane.seq))
                .map_err(io("save delivery"))?;
        }
    }
    if let (State::Waiting, Some(lane)) = (new.state, &new.lane) {
        t.lane_wait
            .insert((lane.key.as_str(), lane.seq), id)
            .map_err(io("save delivery"))?;
    }
    if new.state.is_final() && old.is_none_or(|o| o.state != new.state) {
        by_state
            .insert((new.state.as_str(), id), ())
            .map_err(io("save delivery"))?;
    }
    if let (State::Pending, Some(at)) = (new.state, new.next_attempt_at) {
        due.insert((at, id), ()).map_err(io("save delivery"))?;
    }
    if let (State::Parked, Some(ep)) = (new.state, &new.parked_on) {
        parked
            .insert((ep.as_str(), id), ())
            .map_err(io("save delivery"))?;
    }
    t.deliveries
        .insert(id, to_json(new).as_slice())
        .map_err(io("save delivery"))?;
    Ok(())
}

/// `key`: for an `Accept`, the key its event is stored under; `stored`:
/// for a `Finish`, its attempt as stored, when made already.
fn apply_one(
    t: &mut Tables<'_>,
    op: Op,
    key: Option<EventKey>,
    stored: Option<Vec<u8>>,
    now: u64,
) -> Result<Done, StoreError> {
    match op {
        Op::PutRuleVersions { .. } | Op::DropRuleVersions(_) => {
            unreachable!("Redb::apply writes rule versions itself")
        }
        Op::Accept(ev) => {
            if let Some((_, existing)) = find_event(&t.event_ids, &t.events, &ev.id)? {
                return Ok(Done::Accepted {
                    deliveries: existing.deliveries,
                    duplicate: true,
                    claim: None,
                    waiting: Vec::new(),
                });
            }
            let ids: Vec<DeliveryId> = ev.deliveries.iter().map(|d| d.id).collect();
            let record = EventRecord {
                id: ev.id.clone(),
                accepted_at: now,
                deliveries: ids.clone(),
            };
            let key = key.unwrap_or_else(new_event_key);
            let mut waiting = Vec::new();
            t.events
                .insert(key, to_json(&record).as_slice())
                .map_err(io("accept"))?;
            t.event_ids
                .insert(ev.id.as_str(), key)
                .map_err(io("accept"))?;
            for nd in ev.deliveries {
                let d = Delivery {
                    id: nd.id,
                    event_id: ev.id.clone(),
                    rule: nd.rule,
                    state: nd.state,
                    attempts: 0,
                    next_attempt_at: (nd.state == State::Pending).then_some(now),
                    created_at: now,
                    updated_at: now,
                    parked_on: None,
                    reason: nd.reason,
                    last_status: None,
                    unbuilt: nd.unbuilt,
                    space: nd.space,
                    rule_version: nd.rule_version,
                    lane: None,
                };
                let d = match nd.lane {
                    Some(lane) if d.state == State::Pending => {
                        let d = join_lane(t, d, lane.key, lane.halt, now)?;
                        if d.state == State::Waiting {
                            waiting.push(d.id);
                        }
                        d
                    }
                    _ => d,
                };
                t.bodies
                    .insert(d.id.0, nd.body.as_ref())
                    .map_err(io("accept"))?;
                t.by_rule
                    .insert((d.rule.as_str(), d.id.0), ())
                    .map_err(io("accept"))?;
                save_delivery(t, None, &d)?;
            }
            Ok(Done::Accepted {
                deliveries: ids,
                duplicate: false,
                claim: None,
                waiting,
            })
        }
        // One node: there is no other claim to lose to.
        Op::Finish {
            id, attempt, next, ..
        } => {
            let Some(old) = load_delivery(t, id)? else {
                return Ok(Done::Rejected(format!("no delivery {id}")));
            };
            if old.state == State::Waiting {
                return Ok(Done::Rejected(waits_in_lane(&old)));
            }
            let mut d = old.clone();
            d.updated_at = now;
            if let Some(a) = &attempt {
                d.attempts = d.attempts.max(a.number);
                d.last_status = a.status;
                let stored = stored.unwrap_or_else(|| to_json(a));
                t.attempts
                    .insert((id.0, a.number), stored.as_slice())
                    .map_err(io("record attempt"))?;
            }
            let step = Step::after(attempt.as_ref(), next);
            d.state = step.state;
            d.next_attempt_at = step.next_attempt_at;
            d.parked_on = step.parked_on;
            d.reason = step.reason;
            save_delivery(t, Some(&old), &d)?;
            let promoted = if d.state.is_final() && !old.state.is_final() {
                advance_lane(t, &d, now)?
            } else {
                None
            };
            Ok(Done::Finished { promoted })
        }
        Op::PutEndpoint(ep) => {
            t.endpoints
                .insert(ep.endpoint.as_str(), to_json(&ep).as_slice())
                .map_err(io("save endpoint"))?;
            Ok(Done::EndpointSaved)
        }
        Op::Unpark { endpoint, limit } => {
            let ids: Vec<u128> = {
                let parked = &mut t.parked;
                let range = parked
                    .range((endpoint.as_str(), 0u128)..=(endpoint.as_str(), u128::MAX))
                    .map_err(io("unpark"))?;
                let mut ids = Vec::new();
                for item in range.take(limit) {
                    ids.push(item.map_err(io("unpark"))?.0.value().1);
                }
                ids
            };
            let mut moved = Vec::new();
            for id in ids {
                if let Some(old) = load_delivery(t, DeliveryId(id))? {
                    let mut d = old.clone();
                    d.state = State::Pending;
                    d.parked_on = None;
                    d.next_attempt_at = Some(now);
                    d.updated_at = now;
                    save_delivery(t, Some(&old), &d)?;
                    moved.push(d.id);
                } else {
                    t.parked
                        .remove((endpoint.as_str(), id))
                        .map_err(io("unpark"))?;
                }
            }
            Ok(Done::Unparked(moved))
        }
        Op::Redeliver { id, body, rebind } => {
            let Some(old) = load_delivery(t, id)? else {
                return Ok(Done::Rejected(format!("no delivery {id}")));
            };
            if old.state == State::Waiting {
                return Ok(Done::Rejected(waits_in_lane(&old)));
            }
            let (mut d, new_body) = redelivered(old.clone(), body, rebind, now);
            if let Some(bytes) = new_body {
                t.bodies
                    .insert(id.0, bytes.as_slice())
                    .map_err(io("redeliver"))?;
            }
            // A final delivery of a lane sent again goes to the lane's end,
            // so it never runs beside the lane's head.
            if let Some(lane) = d.lane.clone()
                && old.state.is_final()
                && d.state == State::Pending
            {
                d = join_lane(t, d, lane.key, lane.halt, now)?;
            }
            save_delivery(t, Some(&old), &d)?;
            Ok(Done::Redelivered(d))
        }
        Op::SkipLane { lane } => {
            let Some(rec) = load_lane(t, &lane)? else {
                return Ok(Done::Rejected(no_lane(&lane)));
            };
            let Some(old) = load_delivery(t, rec.head)? else {
                return Err(StoreError::Corrupt(format!(
                    "lane {lane} names a missing head {}",
                    rec.head
                )));
            };
            if let Err(why) = skippable(&old, &lane) {
                return Ok(Done::Rejected(why));
            }
            let d = skipped_head(old.clone(), now);
            save_delivery(t, Some(&old), &d)?;
            let promoted = advance_lane(t, &d, now)?;
            Ok(Done::LaneSkipped {
                head: d.id,
                promoted,
            })
        }
        Op::Compact {
            before_ms,
            after,
            limit,
        } => compact(t, before_ms, after, limit),
    }
}

fn load_lane(t: &mut Tables<'_>, lane: &str) -> Result<Option<LaneRecord>, StoreError> {
    let found = t.lanes.get(lane).map_err(io("read lane"))?;
    found.map(|v| from_json(v.value(), "lane")).transpose()
}

/// `d` (pending, not yet saved) joins lane `key`: it becomes the head of a
/// lane without one, or waits behind the head. Returns it as it is to be
/// saved.
fn join_lane(
    t: &mut Tables<'_>,
    mut d: Delivery,
    key: String,
    halt: bool,
    now: u64,
) -> Result<Delivery, StoreError> {
    let (mut rec, waits) = match load_lane(t, &key)? {
        Some(rec) => {
            let waits = rec.head != d.id;
            (rec, waits)
        }
        None => (
            LaneRecord {
                head: d.id,
                next_seq: 0,
            },
            false,
        ),
    };
    d.lane = Some(Lane {
        key,
        seq: rec.next_seq,
        halt,
    });
    rec.next_seq += 1;
    if waits {
        d.state = State::Waiting;
        d.next_attempt_at = None;
        d.reason = Some(format!("waits behind {} in its lane", rec.head));
    } else {
        d.next_attempt_at = Some(d.next_attempt_at.unwrap_or(now));
    }
    let lane = d.lane.as_ref().map(|l| l.key.as_str()).unwrap_or_default();
    t.lanes
        .insert(lane, to_json(&rec).as_slice())
        .map_err(io("save lane"))?;
    Ok(d)
}

/// `done`, a lane's head, became final: the lane's next waiting delivery
/// becomes pending (due now) and the head, or the lane goes when none waits.
fn advance_lane(
    t: &mut Tables<'_>,
    done: &Delivery,
    now: u64,
) -> Result<Option<DeliveryId>, StoreError> {
    let Some(lane) = &done.lane else {
        return Ok(None);
    };
    let key = lane.key.as_str();
    match load_lane(t, key)? {
        Some(rec) if rec.head == done.id => {}
        // Not the head (a redelivered copy that was final already): the
        // lane is someone else's turn.
        _ => return Ok(None),
    }
    let next = {
        let mut range = t
            .lane_wait
            .range((key, 0u64)..=(key, u64::MAX))
            .map_err(io("advance lane"))?;
        range
            .next()
            .transpose()
            .map_err(io("advance lane"))?
            .map(|(_, v)| DeliveryId(v.value()))
    };
    let Some(next) = next else {
        t.lanes.remove(key).map_err(io("advance lane"))?;
        return Ok(None);
    };
    let Some(old) = load_delivery(t, next)? else {
        return Err(StoreError::Corrupt(format!(
            "lane {key} waits for a missing delivery {next}"
        )));
    };
    let mut d = old.clone();
    d.state = State::Pending;
    d.next_attempt_at = Some(now);
    d.reason = None;
    d.updated_at = now;
    save_delivery(t, Some(&old), &d)?;
    let mut rec = load_lane(t, key)?.unwrap_or(LaneRecord {
        head: next,
        next_seq: 0,
    });
    rec.head = next;
    t.lanes
        .insert(key, to_json(&rec).as_slice())
        .map_err(io("advance lane"))?;
    Ok(Some(next))
}

/// Deletes events accepted before `before_ms` whose deliveries are all in
/// a final state, with their deliveries, bodies, attempts and index entries.
/// Events with a pending or parked delivery stay, however old.
fn compact(
    t: &mut Tables<'_>,
    before_ms: u64,
    after: Option<EventKey>,
    limit: usize,
) -> Result<Done, StoreError> {
    use std::ops::Bound::{Excluded, Unbounded};
    // Keys start with the acceptance time in milliseconds (UUIDv7).
    let end = u128::from(before_ms) << 80;
    let start = after.map_or(Unbounded, Excluded);
    let old: Vec<(EventKey, EventRecord)> = {
        let mut v = Vec::new();
        for item in t
            .events
            .range::<EventKey>((start, Excluded(end)))
            .map_err(io("compact"))?
        {
            let (k, rec) = item.map_err(io("compact"))?;
            v.push((k.value(), from_json(rec.value(), "event")?));
            if v.len() >= limit {
                break;
            }
        }
        v
    };
    let resume = (old.len() >= limit)
        .then(|| old.last().map(|(k, _)| *k))
        .flatten();
    let mut removed = 0;
    for (key, record) in old {
        let deliveries: Vec<Delivery> = record
            .deliveries
            .iter()
            .filter_map(|id| load_delivery(t, *id).transpose())
            .collect::<Result<_, _>>()?;
        if deliveries.iter().any(|d| !d.state.is_final()) {
            continue;
        }
        for d in &deliveries {
            let id = d.id.0;
            t.deliveries.remove(id).map_err(io("compact"))?;
            t.bodies.remove(id).map_err(io("compact"))?;
            t.by_state
                .remove((d.state.as_str(), id))
                .map_err(io("compact"))?;
            t.by_rule
                .remove((d.rule.as_str(), id))
                .map_err(io("compact"))?;
            t.attempts
                .retain_in((id, 0u32)..=(id, u32::MAX), |_, _| false)
                .map_err(io("compact"))?;
        }
        t.event_ids
            .remove(record.id.as_str())
            .map_err(io("compact"))?;
        t.events.remove(key).map_err(io("compact"))?;
        removed += 1;
    }
    Ok(Done::Compacted { removed, resume })
}

/// The invariant the lifecycle suite checks after every step.
#[cfg(test)]
mod invariants {
    use super::*;
    use std::collections::HashMap;

    /// The keys of an index keyed by (name, delivery id), in order.
    fn name_id_keys(
        tx: &ReadTransaction,
        table: TableDefinition<'_, (&str, DeliveryKey), ()>,
    ) -> Vec<(String, u128)> {
        tx.open_table(table)
            .unwrap()
            .iter()
            .unwrap()
            .map(|i| {
                let (k, _) = i.unwrap();
                (k.value().0.to_string(), k.value().1)
            })
            .collect()
    }

    /// Every delivery is in exactly the index its state calls for, and no
    /// index names a delivery that is not there or not in that state.
    pub(super) fn assert_indexes(store: &Redb) {
        let tx = store.read().unwrap();
        let deliveries = tx.open_table(DELIVERIES).unwrap();
        let mut all = HashMap::new();
        for item in deliveries.iter().unwrap() {
            let (k, v) = item.unwrap();
            let d: Delivery = serde_json::from_slice(v.value()).unwrap();
            all.insert(k.value(), d);
        }
        let due: Vec<(u64, u128)> = tx
            .open_table(DUE)
            .unwrap()
            .iter()
            .unwrap()
            .map(|i| i.unwrap().0.value())
            .collect();
        let parked = name_id_keys(&tx, PARKED);
        let by_state = name_id_keys(&tx, BY_STATE);
        let wait: Vec<((String, u64), u128)> = tx
            .open_table(LANE_WAIT)
            .unwrap()
            .iter()
            .unwrap()
            .map(|i| {
                let (k, v) = i.unwrap();
                ((k.value().0.to_string(), k.value().1), v.value())
            })
            .collect();
        let lanes: HashMap<String, LaneRecord> = tx
            .open_table(LANES)
            .unwrap()
            .iter()
            .unwrap()
            .map(|i| {
                let (k, v) = i.unwrap();
                (
                    k.value().to_string(),
                    serde_json::from_slice(v.value()).unwrap(),
                )
            })
            .collect();
        for ((lane, seq), id) in &wait {
            let d = &all[id];
            let l = d.lane.as_ref().expect("a waiting delivery has a lane");
            assert_eq!(
                (d.state, l.key.as_str(), l.seq),
                (State::Waiting, lane.as_str(), *seq),
                "lane wait entry {id:x}"
            );
            let rec = lanes
                .get(lane)
                .unwrap_or_else(|| panic!("lane {lane} has waiting deliveries but no head"));
            assert!(
                *seq < rec.next_seq,
                "lane {lane}: seq {seq} not below next_seq {}",
                rec.next_seq
            );
        }
        // Each lane has exactly one head, pending or parked, and every
        // pending or parked delivery of a lane is its lane's head.
        for (lane, rec) in &lanes {
            let head = &all[&rec.head.0];
            assert!(
                matches!(head.state, State::Pending | State::Parked),
                "lane {lane}'s head {:x} is {:?}",
                rec.head.0,
                head.state
            );
            assert_eq!(
                head.lane.as_ref().map(|l| l.key.as_str()),
                Some(lane.as_str())
            );
            if let Some(((_, first), _)) = wait.iter().find(|((l, _), _)| l == lane) {
                assert!(
                    head.lane.as_ref().unwrap().seq < *first,
                    "lane {lane}: a waiting one is ahead of the head"
                );
            }
        }
        for (id, d) in &all {
            if let (Some(l), State::Pending | State::Parked) = (&d.lane, d.state) {
                assert_eq!(
                    lanes.get(&l.key).map(|r| r.head.0),
                    Some(*id),
                    "delivery {id:x} of lane {} is {:?} but not its head",
                    l.key,
                    d.state
                );
            }
        }
        for (at, id) in &due {
            let d = &all[id];
            assert_eq!(
                (d.state, d.next_attempt_at),
                (State::Pending, Some(*at)),
                "due entry {id:x}"
            );
        }
        for (ep, id) in &parked {
            let d = &all[id];
            assert_eq!(
                (d.state, d.parked_on.as_deref()),
                (State::Parked, Some(ep.as_str())),
                "parked entry {id:x}"
            );
        }
        for (state, id) in &by_state {
            assert_eq!(all[id].state.as_str(), state, "state entry {id:x}");
        }
        for (id, d) in &all {
            let count = match d.state {
                State::Pending => due.iter().filter(|(_, i)| i == id).count(),
                State::Parked => parked.iter().filter(|(_, i)| i == id).count(),
                State::Waiting => wait.iter().filter(|(_, i)| i == id).count(),
                _ => by_state.iter().filter(|(_, i)| i == id).count(),
            };
            assert_eq!(
                count, 1,
                "delivery {id:x} ({:?}) is indexed {count} times",
                d.state
            );
        }
    }
}
