//! The outbox: the one writer of the store, with group commit.
//!
//! Every write (accepted events with their deliveries, attempt records,
//! endpoint state) is sent here. One thread takes whatever requests are
//! waiting, applies them all in one redb transaction and commits once, so
//! one fsync covers many events: redb commits about 3,750 times a second
//! here, and batching is how ingest goes well past that. Callers wait for
//! the commit before they answer (ingest's 202 means "on disk").
//!
//! After each commit it tells subscribers (the console's live tail) which
//! deliveries changed; with no subscriber that costs one atomic load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::store::{DeliveryId, Done, Op, Store, StoreError};

/// Upper bound on ops in one transaction, so one commit stays short and
/// callers that arrive during it wait at most about one commit.
const MAX_BATCH_OPS: usize = 4096;

/// How long a batch of lazy writes only (attempt records) waits for more
/// company before it commits, and how many ops end the wait early. At a
/// low rate every attempt record was a commit of its own, and a commit
/// (its page writes and fsyncs, in the kernel) is most of what a delivery
/// costs there (BENCHMARKS.md, "What a delivery costs"); nobody answers a
/// client on a record, so it can wait: 20 ms gathers ten records at
/// 500 deliveries/s. Any urgent write (an event to accept, an admin's
/// action, a lane's record) ends the wait at once.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(20);
/// How long a small batch with an urgent write (an event to accept) may
/// wait for more, when urgent writes come from several callers at once
/// closer together than `COMPANY_GAP` (see `Pacer`), and the ops that end
/// the wait early. It is added to a 202 at most, and only at rates where
/// one commit per event is what a delivery mostly costs. Longer than the
/// gap itself: measured at 500 events/s (one per request), a 5 ms wait
/// gathers ~3.5 deliveries per sync and cost 313 µs of CPU per delivery,
/// 10 ms ~6 and 263 µs (p99 ingest → first attempt 8.4 → 13.5 ms). 20 ms
/// saved nothing more while every accept that came woke the writer; since
/// the writer parks through the wait (`Company`) it gathers ~8 per sync,
/// 169 → 149 µs against 10 ms, p99 11.9 → 22.1 ms, inside the 50 ms
/// budget; at 2,000/s the wait ends early on `URGENT_OPS` and the p99 is
/// unchanged (BENCHMARKS.md, "What a delivery costs").
const URGENT_LINGER: std::time::Duration = std::time::Duration::from_millis(20);
const URGENT_OPS: usize = 16;
/// Urgent writes must have lately come closer together than this for a
/// small batch to wait: apart by more, a wait brings about one event at
/// most, and costs every event the wait (measured at 150 events/s, 6.7 ms
/// apart: a 10 ms wait took the p50 from 0.8 to 11 ms).
const COMPANY_GAP: std::time::Duration = std::time::Duration::from_millis(5);

/// The longest `record_linger` the config takes.
pub const MAX_LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_OPS: usize = 64;

#[derive(Debug, thiserror::Error, Clone)]
pub enum OutboxError {
    #[error("storage failed, nothing of this request was stored: {0}")]
    Store(Arc<StoreError>),
    #[error("the outbox has stopped (shutting down)")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Vec<Done>, OutboxError>>;
/// Writes with their replies, in the order they came.
type Writes = Vec<(Vec<Op>, Reply)>;

/// What the channel carries: the urgent writes (someone answers a client
/// on them), and the wake-ups the pen needs.
enum Request {
    Write {
        ops: Vec<Op>,
        reply: Reply,
    },
    /// Lazy writes wait in the pen, and the writer was asleep with no
    /// deadline: it must look at them (see `Pen`).
    Nudge,
    /// Commit what was sent before this, then stop (see `Outbox::close`).
    Close,
}

/// Where lazy writes (attempt records) wait for a commit, beside the
/// channel rather than in it: sending one into the channel woke the
/// writer each time, and at a low rate every record then cost the writer
/// a wake-up of its own (BENCHMARKS.md, "fewer wake-ups"). A lazy write
/// wakes the writer only when the writer sleeps with no deadline (the pen
/// was empty) or the pen has `LINGER_OPS` waiting; otherwise the writer
/// takes the pen along with the next urgent write, or when the oldest
/// lazy write's linger is over. The pen holds at most one write per
/// attempt in flight, which the dispatcher caps.
#[derive(Default)]
struct Pen(std::sync::Mutex<PenState>);

#[derive(Default)]
struct PenState {
    writes: Writes,
    ops: usize,
    /// When the oldest write waiting came.
    since: Option<std::time::Instant>,
    /// A writer sleeps on the channel with no deadline, so the next lazy
    /// write must nudge it (set and read under the lock, so a write put
    /// in just after the writer looked still wakes it).
    writer_asleep: bool,
    /// The outbox closed: lazy writes fail as urgent ones do.
    closed: bool,
}

impl Pen {
    fn lock(&self) -> std::sync::MutexGuard<'_, PenState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a write in; whether the writer must be nudged. `None` once the
    /// outbox is closed (the write is dropped, so its caller gets `Stopped`).
    fn put(&self, ops: Vec<Op>, reply: Reply) -> Option<bool> {
        let mut pen = self.lock();
        if pen.closed {
            return None;
        }
        let before = pen.ops;
        pen.ops += ops.len();
        pen.writes.push((ops, reply));
        pen.since.get_or_insert_with(std::time::Instant::now);
        // Nudged once as the pen fills, not by every write past that.
        let nudge = pen.writer_asleep || (before < LINGER_OPS && pen.ops >= LINGER_OPS);
        pen.writer_asleep &= !nudge;
        Some(nudge)
    }

    /// Before a writer sleeps on the channel: until when it may sleep (the
    /// oldest waiting write's linger, or `expect`: see `writer`), or `None`
    /// (nothing waits or is expected: it sleeps until nudged).
    fn deadline(
        &self,
        linger: std::time::Duration,
        expect: Option<std::time::Instant>,
    ) -> Option<std::time::Instant> {
        let mut pen = self.lock();
        let until = if pen.ops >= LINGER_OPS {
            pen.since.map(|_| std::time::Instant::now())
        } else {
            pen.since.map(|t| t + linger)
        };
        let until = until.or(expect.filter(|t| *t > std::time::Instant::now()));
        pen.writer_asleep = until.is_none();
        until
    }

    /// Takes every waiting write, and when the oldest came.
    fn take(&self) -> (Writes, Option<std::time::Instant>) {
        let mut pen = self.lock();
        pen.writer_asleep = false;
        pen.ops = 0;
        (std::mem::take(&mut pen.writes), pen.since.take())
    }

    fn close(&self) {
        self.lock().closed = true;
    }
}

/// A writer waiting for an accept's company sleeps through the accepts
/// that come meanwhile: at 500 events/s a 20 ms wait brings about ten,
/// and each woke the writer only for it to see that the wait was not over
/// (one futex sleep of the writer per delivery, in a `perf record -e
/// sched:sched_switch` of the server). It parks until the wait is over, or
/// until the accepts queued in the channel are enough to end it early,
/// which the callers that send them check (one atomic load each when
/// nobody waits).
#[derive(Default)]
struct Company {
    /// How many queued requests end the wait (0: nobody waits).
    wake_at: std::sync::atomic::AtomicUsize,
    /// The writer that waits (with several, only the one gathering does).
    writer: std::sync::Mutex<Option<std::thread::Thread>>,
}

impl Company {
    /// A caller has sent a write, and `queued` requests are in the channel.
    fn sent(&self, queued: usize) {
        let at = self.wake_at.load(Ordering::SeqCst);
        if at != 0
            && queued >= at
            && let Some(writer) = &*self.writer.lock().unwrap_or_else(|e| e.into_inner())
        {
            writer.unpark();
        }
    }

    /// Sleeps until `until`, or until `needed` requests are queued in `rx`.
    /// Wakes from it are counted in `wakeups`.
    fn wait(
        &self,
        rx: &mpsc::Receiver<Request>,
        needed: usize,
        until: std::time::Instant,
        wakeups: &AtomicU64,
    ) {
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
        // Published before the queue is looked at, and a caller looks at
        // it after its send: one of the two sees the other (an unpark
        // before the park makes the park return at once).
        self.wake_at.store(needed.max(1), Ordering::SeqCst);
        loop {
            let now = std::time::Instant::now();
            if now >= until || rx.len() >= needed || rx.is_closed() {
                break;
            }
            std::thread::park_timeout(until - now);
            wakeups.fetch_add(1, Ordering::Relaxed);
        }
        self.wake_at.store(0, Ordering::SeqCst);
    }
}

/// Counters for `/metrics`.
#[derive(Debug)]
pub struct OutboxStats {
    pub commits: AtomicU64,
    pub ops: AtomicU64,
    /// Operations per commit: how well group commit shares its fsyncs.
    pub batch_ops: prometheus_client::metrics::histogram::Histogram,
    /// Times a writer woke from waiting for writes: at a low rate each
    /// wake-up is a good part of what a delivery costs (BENCHMARKS.md).
    pub wakeups: AtomicU64,
}

impl Default for OutboxStats {
    fn default() -> Self {
        OutboxStats {
            commits: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            batch_ops: crate::metrics::commit_ops_histogram(),
            wakeups: AtomicU64::new(0),
        }
    }
}

/// A handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Request>,
    pen: Arc<Pen>,
    company: Arc<Company>,
    pub stats: Arc<OutboxStats>,
    /// The deliveries each commit changed (accepted, attempted, parked,
    /// unparked, redelivered), for live views. Bounded: a subscriber that
    /// falls behind is told it lagged and reads the store instead.
    changes: broadcast::Sender<Arc<[DeliveryId]>>,
}

/// Commits a live view may fall behind by before it is told it lagged.
const CHANGES_BACKLOG: usize = 256;

impl Outbox {
    /// Starts the writer thread. It ends after `close`, or when every
    /// `Outbox` handle is gone, after writing what was already sent.
    pub fn start(store: Arc<Store>) -> (Outbox, JoinHandle<()>) {
        Outbox::start_with_linger(store, LINGER)
    }

    /// `start` with another linger for lazy writes (tests).
    pub fn start_with_linger(
        store: Arc<Store>,
        linger: std::time::Duration,
    ) -> (Outbox, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(8192);
        let stats = Arc::new(OutboxStats::default());
        let thread_stats = stats.clone();
        let (changes, _) = broadcast::channel(CHANGES_BACKLOG);
        let thread_changes = changes.clone();
        let pen = Arc::new(Pen::default());
        let thread_pen = pen.clone();
        let company = Arc::new(Company::default());
        let thread_company = company.clone();
        // The embedded store has one writer anyway; a database server
        // commits several transactions at once, and while one batch waits
        // for its round trips and its (replicated) commit, the next fills.
        let writers = store.writers().max(1);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let handle = std::thread::Builder::new()
            .name("rulehook-outbox".into())
            .spawn(move || {
                let others: Vec<JoinHandle<()>> = (1..writers)
                    .map(|i| {
                        let (store, rx, pen) = (store.clone(), rx.clone(), thread_pen.clone());
                        let (stats, changes) = (thread_stats.clone(), thread_changes.clone());
                        let company = thread_company.clone();
                        std::thread::Builder::new()
                            .name(format!("rulehook-outbox-{i}"))
                            .spawn(move || writer(store, rx, pen, company, stats, changes, linger))
                            .expect("spawn an outbox writer thread")
                    })
                    .collect();
                writer(
                    store.clone(),
                    rx,
                    thread_pen,
                    thread_company,
                    thread_stats,
                    thread_changes,
                    linger,
                );
                for w in others {
                    let _ = w.join();
                }
                // Every batch is in; a clean stop leaves nothing for the
                // next start to apply again.
                if let Err(e) = store.close() {
                    tracing::warn!(error = %e, "could not close the store cleanly; the next start applies its commit log");
                }
            })
            .expect("spawn the outbox writer thread");
        (
            Outbox {
                tx,
                pen,
                company,
                stats,
                changes,
            },
            handle,
        )
    }

    /// The ids of the deliveries each commit from now on changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<[DeliveryId]>> {
        self.changes.subscribe()
    }

    /// Writes `ops` durably, sharing a commit with other callers.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<Done>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Write { ops, reply })
            .await
            .map_err(|_| OutboxError::Stopped)?;
        self.company
            .sent(self.tx.max_capacity() - self.tx.capacity());
        rx.await.map_err(|_| OutboxError::Stopped)?
    }

    /// `write` for what no client waits on (attempt records): when only
    /// such writes are waiting, the commit waits up to `LINGER` for more,
    /// so at a low rate records share commits instead of each paying one.
    /// Durable all the same when it returns.
    pub async fn write_lazily(&self, ops: Vec<Op>) -> Result<Vec<Done>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        match self.pen.put(ops, reply) {
            None => return Err(OutboxError::Stopped),
            Some(true) => {
                // A full channel means the writer is busy and comes back
                // for the pen anyway; a closed one, that it has stopped
                // (then the reply is dropped: `Stopped`).
                let _ = self.tx.try_send(Request::Nudge);
            }
            Some(false) => {}
        }
        rx.await.map_err(|_| OutboxError::Stopped)?
    }

    /// `write` for a caller on a plain thread (a reload), which must not
    /// be a runtime thread.
    pub fn write_blocking(&self, ops: Vec<Op>) -> Result<Vec<Done>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Request::Write { ops, reply })
            .map_err(|_| OutboxError::Stopped)?;
        self.company
            .sent(self.tx.max_capacity() - self.tx.capacity());
        rx.blocking_recv().map_err(|_| OutboxError::Stopped)?
    }

    /// Has the writer commit everything sent before this call and stop;
    /// later writes fail with `Stopped`. A stop uses it so that joining the
    /// writer never waits for the last handle to be dropped: a task that
    /// still holds one (a client that never reads its socket) must not keep
    /// the process from exiting.
    pub async fn close(&self) {
        let _ = self.tx.send(Request::Close).await;
    }
}

/// One batch as a writer gathers it.
#[derive(Default)]
struct Batch {
    writes: Writes,
    ops: usize,
    /// It holds an urgent write.
    urgent: bool,
    /// When its oldest lazy write came (its linger runs from there).
    lazy_since: Option<std::time::Instant>,
}

impl Batch {
    fn add(&mut self, ops: Vec<Op>, reply: Reply) {
        self.ops += ops.len();
        self.writes.push((ops, reply));
    }

    /// Takes what waits in the pen.
    fn take_pen(&mut self, pen: &Pen) {
        let (writes, since) = pen.take();
        for (ops, reply) in writes {
            self.add(ops, reply);
        }
        if let Some(t) = since {
            self.lazy_since = Some(self.lazy_since.map_or(t, |s| s.min(t)));
        }
    }
}

/// One writer: takes what is waiting (holding the receiver only while it
/// gathers), applies it as one batch, answers, and goes on. With several
/// writers, `Close` closes the channel: each drains what was sent before
/// it and stops.
fn writer(
    store: Arc<Store>,
    rx: Arc<std::sync::Mutex<mpsc::Receiver<Request>>>,
    pen: Arc<Pen>,
    company: Arc<Company>,
    stats: Arc<OutboxStats>,
    changes: broadcast::Sender<Arc<[DeliveryId]>>,
    linger: std::time::Duration,
) {
    // For the timed waits on the channel.
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a timer for the outbox writer");
    // The channel's next request, waiting until `until` at most (`None`:
    // until one comes). `Err` once it is closed and empty.
    let recv = |rx: &mut mpsc::Receiver<Request>,
                until: Option<std::time::Instant>|
     -> Result<Option<Request>, ()> {
        let got = match until {
            None => rx.blocking_recv().ok_or(()).map(Some),
            Some(t) => timer.block_on(async {
                // Timeouts are made inside the timer's runtime.
                match tokio::time::timeout_at(t.into(), rx.recv()).await {
                    Ok(Some(r)) => Ok(Some(r)),
                    Ok(None) => Err(()),
                    Err(_) => Ok(None),
                }
            }),
        };
        stats.wakeups.fetch_add(1, Ordering::Relaxed);
        got
    };
    let mut pacer = Pacer::new();
    let mut closing = false;
    // After a commit with urgent writes (accepts, mostly), their attempts'
    // records follow within milliseconds: the writer then sleeps at most a
    // linger, and the records wait in the pen for the next urgent write or
    // that deadline instead of each waking it (at 100 events/s that is one
    // wake-up fewer per delivery).
    let mut expect: Option<std::time::Instant> = None;
    while !closing {
        let mut batch = Batch::default();
        {
            let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            // While waiting for company for an urgent write: until when,
            // and how many came.
            let mut urgent_wait: Option<(std::time::Instant, usize)> = None;
            // Sleep until a write comes, or the pen's oldest is due.
            let mut next =
                recv(&mut rx, pen.deadline(linger, expect.take())).unwrap_or_else(|()| {
                    closing = true;
                    None
                });
            loop {
                match next.take() {
                    Some(Request::Write { ops, reply }) => {
                        batch.urgent = true;
                        pacer.arrived(std::time::Instant::now());
                        if let Some((_, came)) = urgent_wait.as_mut() {
                            *came += 1;
                        }
                        batch.add(ops, reply);
                    }
                    Some(Request::Nudge) | None => {}
                    Some(Request::Close) => {
                        rx.close();
                        closing = true;
                    }
                }
                if closing || batch.ops >= MAX_BATCH_OPS {
                    break;
                }
                if let Ok(req) = rx.try_recv() {
                    next = Some(req);
                    continue;
                }
                // The channel is empty: the pen's writes join (once per
                // look, not per request), then wait a little for company,
                // or go.
                batch.take_pen(&pen);
                if batch.ops >= MAX_BATCH_OPS {
                    break;
                }
                let until = if !batch.urgent {
                    match batch.lazy_since {
                        Some(t) if batch.ops < LINGER_OPS && t.elapsed() < linger => {
                            Some(t + linger)
                        }
                        _ => None,
                    }
                } else if batch.ops < URGENT_OPS {
                    match urgent_wait {
                        Some((until, _)) => Some(until),
                        None if pacer.lingers(std::time::Instant::now()) => {
                            let until = std::time::Instant::now() + URGENT_LINGER;
                            urgent_wait = Some((until, 0));
                            Some(until)
                        }
                        None => None,
                    }
                } else {
                    None
                };
                let Some(until) = until.filter(|t| *t > std::time::Instant::now()) else {
                    break;
                };
                // What came meanwhile; the loop goes on with it, and ends
                // once the wait is over and nothing more is there.
                if batch.urgent {
                    // Waiting for an accept's company: the arrivals do not
                    // wake the writer until enough are queued to end the
                    // wait (each request carries one op at least).
                    company.wait(&rx, URGENT_OPS - batch.ops, until, &stats.wakeups);
                    next = match rx.try_recv() {
                        Ok(req) => Some(req),
                        Err(mpsc::error::TryRecvError::Empty) => None,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closing = true;
                            None
                        }
                    };
                } else {
                    // Lingering for records: an accept ends it at once.
                    next = recv(&mut rx, Some(until)).unwrap_or_else(|()| {
                        closing = true;
                        None
                    });
                }
            }
            if let Some((_, came)) = urgent_wait {
                pacer.lingered(came, std::time::Instant::now());
            }
            if closing {
                // Later lazy writes fail; those in the pen now go in this
                // last batch.
                pen.close();
                batch.take_pen(&pen);
            }
        }
        if batch.writes.is_empty() {
            continue;
        }
        if batch.urgent {
            expect = Some(std::time::Instant::now() + linger);
        }
        commit(&store, batch, &stats, &changes);
    }
}

/// Applies one batch as one commit and answers each of its writes.
fn commit(
    store: &Store,
    batch: Batch,
    stats: &OutboxStats,
    changes: &broadcast::Sender<Arc<[DeliveryId]>>,
) {
    let n = batch.ops;
    let lens: Vec<usize> = batch.writes.iter().map(|(ops, _)| ops.len()).collect();
    let mut ops = Vec::with_capacity(n);
    let mut replies = Vec::with_capacity(batch.writes.len());
    for (req_ops, reply) in batch.writes {
        ops.extend(req_ops);
        replies.push(reply);
    }
    let watched = changes.receiver_count() > 0;
    let mut changed = if watched {
        changed_by(&ops)
    } else {
        Vec::new()
    };
    match store.apply(ops) {
        Ok(results) => {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.ops.fetch_add(n as u64, Ordering::Relaxed);
            stats.batch_ops.observe(n as f64);
            if watched {
                for done in &results {
                    match done {
                        Done::Unparked(ids) => changed.extend(ids.iter().copied()),
                        Done::Finished {
                            promoted: Some(next),
                        } => changed.push(*next),
                        Done::LaneSkipped { head, promoted } => {
                            changed.push(*head);
                            changed.extend(*promoted);
                        }
                        _ => {}
                    }
                }
                if !changed.is_empty() {
                    let _ = changes.send(changed.into());
                }
            }
            let mut results = results.into_iter();
            for (reply, len) in replies.into_iter().zip(lens) {
                let part: Vec<Done> = results.by_ref().take(len).collect();
                let _ = reply.send(Ok(part));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, ops = n, "outbox commit failed; the batch was not stored");
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(OutboxError::Store(e.clone())));
            }
        }
    }
}

/// Whether a small urgent batch should wait for company: only when urgent
/// writes have lately come closer together than `COMPANY_GAP` (so the
/// wait likely brings one), and not while such waits keep bringing none.
/// A lone caller that posts one event after another is one of those: its
/// next event comes only after this commit, so waiting for it is waste;
/// after a wait that brought nothing the pacer stays out for a while,
/// doubling up to 2 s, and such a caller loses at most one wait per pause.
struct Pacer {
    /// Mean gap between urgent writes, in seconds (moving average).
    gap: f64,
    last: Option<std::time::Instant>,
    quiet_until: Option<std::time::Instant>,
    pause: std::time::Duration,
}

impl Pacer {
    const MIN_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);

    fn new() -> Pacer {
        Pacer {
            gap: f64::INFINITY,
            last: None,
            quiet_until: None,
            pause: Pacer::MIN_PAUSE,
        }
    }

    fn arrived(&mut self, now: std::time::Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last).as_secs_f64();
            self.gap = if self.gap.is_finite() {
                0.8 * self.gap + 0.2 * gap
            } else {
                gap
            };
        }
        self.last = Some(now);
    }

    fn lingers(&self, now: std::time::Instant) -> bool {
        self.gap <= COMPANY_GAP.as_secs_f64() && self.quiet_until.is_none_or(|t| now >= t)
    }

    /// A wait ended, having brought `came` more writes.
    fn lingered(&mut self, came: usize, now: std::time::Instant) {
        if came == 0 {
            self.quiet_until = Some(now + self.pause);
            self.pause = (self.pause * 2).min(Pacer::MAX_PAUSE);
        } else {
            self.quiet_until = None;
            self.pause = Pacer::MIN_PAUSE;
        }
    }
}

/// The deliveries a batch names (unparked ones are known only after it).
fn changed_by(ops: &[Op]) -> Vec<DeliveryId> {
    let mut ids = Vec::new();
    for op in ops {
        match op {
            Op::Accept(ev) => ids.extend(ev.deliveries.iter().map(|d| d.id)),
            Op::Finish { id, .. } | Op::Redeliver { id, .. } => ids.push(*id),
            Op::PutEndpoint(_)
            | Op::Unpark { .. }
            | Op::SkipLane { .. }
            | Op::Compact { .. }
            | Op::PutRuleVersions { .. }
            | Op::DropRuleVersions(_) => {}
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Endpoint, Op};
    use std::time::Duration;

    fn store(name: &str) -> (Arc<Store>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "rulehook-outbox-{name}-{}-{:x}",
            std::process::id(),
            DeliveryId::new().0
        ));
        let store = Store::open(&dir.join("rulehook.redb"), 1 << 20).unwrap();
        (Arc::new(store), dir)
    }

    fn endpoint(name: &str) -> Op {
        Op::PutEndpoint(Endpoint {
            endpoint: format!("https://{name}:443"),
            ..Default::default()
        })
    }

    /// Closes the outbox, waits for its writer and removes the store.
    fn stop(outbox: Outbox, handle: JoinHandle<()>, dir: &std::path::Path) {
        runtime().block_on(outbox.close());
        drop(outbox);
        handle.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_pacer_waits_only_for_close_arrivals_and_backs_off_when_waits_bring_none() {
        let t0 = std::time::Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut p = Pacer::new();
        assert!(!p.lingers(t0), "no arrivals yet");
        // Events 20 ms apart: a wait of 5 ms would rarely bring one.
        for i in 0..5 {
            p.arrived(ms(i * 20));
        }
        assert!(!p.lingers(ms(100)));
        // 7 ms apart (150 events/s): closer than the wait is long, but a
        // wait would bring about one, and cost each event the whole wait.
        let mut p = Pacer::new();
        for i in 0..5 {
            p.arrived(ms(i * 7));
        }
        assert!(!p.lingers(ms(35)));
        // 1 ms apart: it waits.
        let mut p = Pacer::new();
        for i in 0..5 {
            p.arrived(ms(i));
        }
        assert!(p.lingers(ms(5)));
        // A wait that brought nothing (a lone sender): out for 100 ms, then
        // 200 ms after the next such wait.
        p.lingered(0, ms(10));
        assert!(!p.lingers(ms(50)));
        assert!(p.lingers(ms(110)));
        p.lingered(0, ms(110));
        assert!(!p.lingers(ms(250)));
        assert!(p.lingers(ms(310)));
        // One that brought company resets the pause.
        p.lingered(3, ms(310));
        assert!(p.lingers(ms(311)));
        p.lingered(0, ms(311));
        assert!(p.lingers(ms(412)), "the pause is back to 100 ms");
    }

    #[test]
    fn an_urgent_write_ends_the_linger_of_lazy_ones_and_shares_their_commit() {
        let (store, dir) = store("urgent");
        // A linger no test would sit out: only an urgent write can end it
        // early, and the two then share one commit.
        let (outbox, handle) = Outbox::start_with_linger(store.clone(), Duration::from_secs(600));
        runtime().block_on(async {
            let lazy = tokio::spawn({
                let outbox = outbox.clone();
                async move { outbox.write_lazily(vec![endpoint("a")]).await }
            });
            // Let the writer take the lazy write and start lingering on it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let urgent = outbox.write(vec![endpoint("b")]).await.unwrap();
            assert_eq!(urgent, vec![Done::EndpointSaved]);
            assert_eq!(lazy.await.unwrap().unwrap(), vec![Done::EndpointSaved]);
        });
        assert_eq!(
            outbox.stats.commits.load(Ordering::Relaxed),
            1,
            "one commit for both"
        );
        assert_eq!(store.endpoints().unwrap().len(), 2);
        stop(outbox, handle, &dir);
    }

    #[test]
    fn lazy_writes_wake_the_writer_once_per_commit_not_once_each() {
        let (store, dir) = store("wakeups");
        let (outbox, handle) = Outbox::start_with_linger(store.clone(), Duration::from_millis(500));
        runtime().block_on(async {
            // Twenty records 5 ms apart, all within one linger, each
            // waited on (as an attempt's task waits on its record).
            let mut writes = Vec::new();
            for i in 0..20 {
                let outbox = outbox.clone();
                writes.push(tokio::spawn(async move {
                    outbox.write_lazily(vec![endpoint(&format!("w{i}"))]).await
                }));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for w in writes {
                assert_eq!(w.await.unwrap().unwrap(), vec![Done::EndpointSaved]);
            }
        });
        assert_eq!(outbox.stats.commits.load(Ordering::Relaxed), 1);
        // Woken by the first record, then by the linger's end.
        let wakeups = outbox.stats.wakeups.load(Ordering::Relaxed);
        assert!(
            wakeups <= 2,
            "the writer woke {wakeups} times for one commit"
        );
        assert_eq!(store.endpoints().unwrap().len(), 20);
        stop(outbox, handle, &dir);
    }

    #[test]
    fn accepts_arriving_while_the_writer_waits_for_company_do_not_each_wake_it() {
        let (store, dir) = store("company");
        let (outbox, handle) = Outbox::start(store.clone());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // 80 accepts 1 ms apart, each from a caller of its own (as
            // requests at 1,000 events/s): close enough for the writer to
            // wait for company, too few for a wait to end early.
            let mut writes = Vec::new();
            for i in 0..80 {
                let outbox = outbox.clone();
                writes.push(tokio::spawn(async move {
                    outbox.write(vec![endpoint(&format!("a{i}"))]).await
                }));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for w in writes {
                assert_eq!(w.await.unwrap().unwrap(), vec![Done::EndpointSaved]);
            }
        });
        let commits = outbox.stats.commits.load(Ordering::Relaxed);
        let wakeups = outbox.stats.wakeups.load(Ordering::Relaxed);
        assert!(commits < 40, "80 accepts 1 ms apart made {commits} commits");
        // A batch's first accept wakes the writer, and its wait's end; the
        // accepts in between do not.
        assert!(
            wakeups <= 2 * commits + 2,
            "the writer woke {wakeups} times for {commits} commits"
        );
        assert_eq!(store.endpoints().unwrap().len(), 80);
        stop(outbox, handle, &dir);
    }

    #[test]
    fn a_record_after_an_accept_waits_for_the_next_accept_without_a_wake_up() {
        let (store, dir) = store("expect");
        let (outbox, handle) = Outbox::start_with_linger(store.clone(), Duration::from_millis(500));
        runtime().block_on(async {
            // An accept, its attempt's record 10 ms later, the next accept
            // 10 ms after that: as at 50 events/s.
            outbox.write(vec![endpoint("accept-1")]).await.unwrap();
            let record = tokio::spawn({
                let outbox = outbox.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    outbox.write_lazily(vec![endpoint("record-1")]).await
                }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            outbox.write(vec![endpoint("accept-2")]).await.unwrap();
            assert_eq!(record.await.unwrap().unwrap(), vec![Done::EndpointSaved]);
        });
        // The record shared the second accept's commit, and only the two
        // accepts woke the writer.
        assert_eq!(outbox.stats.commits.load(Ordering::Relaxed), 2);
        assert_eq!(outbox.stats.wakeups.load(Ordering::Relaxed), 2);
        stop(outbox, handle, &dir);
    }

    #[test]
    fn every_lazy_write_is_answered_among_urgent_ones_and_none_after_close() {
        let (store, dir) = store("mixed");
        let (outbox, handle) = Outbox::start_with_linger(store.clone(), Duration::from_millis(3));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let answered = rt.block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|t| {
                    let outbox = outbox.clone();
                    tokio::spawn(async move {
                        for i in 0..50 {
                            let op = vec![endpoint(&format!("t{t}-{i}"))];
                            let done = if i % 5 == 0 {
                                outbox.write(op).await
                            } else {
                                outbox.write_lazily(op).await
                            };
                            assert_eq!(done.unwrap(), vec![Done::EndpointSaved]);
                            if i % 7 == 0 {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            // Lazy writes in the pen at the close are committed by it.
            let last: Vec<_> = (0..3)
                .map(|i| {
                    let outbox = outbox.clone();
                    tokio::spawn(async move {
                        outbox
                            .write_lazily(vec![endpoint(&format!("last{i}"))])
                            .await
                    })
                })
                .collect();
            tokio::task::yield_now().await;
            outbox.close().await;
            let mut answered = 0;
            for w in last {
                // Either in the last batch, or refused as stopped.
                match w.await.unwrap() {
                    Ok(done) => {
                        assert_eq!(done, vec![Done::EndpointSaved]);
                        answered += 1;
                    }
                    Err(e) => assert!(matches!(e, OutboxError::Stopped), "{e}"),
                }
            }
            let after = outbox.write_lazily(vec![endpoint("after")]).await;
            assert!(matches!(after, Err(OutboxError::Stopped)), "{after:?}");
            answered
        });
        drop(outbox);
        handle.join().unwrap();
        // Exactly what was answered Ok is stored: nothing lost, nothing
        // refused stored.
        let stored = store.endpoints().unwrap();
        assert_eq!(stored.len(), 400 + answered, "{} stored", stored.len());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lazy_writes_alone_commit_together_once_the_linger_is_over() {
        let (store, dir) = store("lazy");
        let (outbox, handle) = Outbox::start_with_linger(store.clone(), Duration::from_millis(300));
        let done = runtime().block_on(async {
            let writes: Vec<_> = (0..5)
                .map(|i| {
                    let outbox = outbox.clone();
                    tokio::spawn(async move {
                        outbox.write_lazily(vec![endpoint(&format!("e{i}"))]).await
                    })
                })
                .collect();
            let mut done = Vec::new();
            for w in writes {
                done.push(w.await.unwrap().unwrap());
            }
            done
        });
        assert_eq!(done, vec![vec![Done::EndpointSaved]; 5]);
        assert_eq!(
            store.endpoints().unwrap().len(),
            5,
            "durable when they return"
        );
        let commits = outbox.stats.commits.load(Ordering::Relaxed);
        assert!(commits < 5, "five lazy writes made {commits} commits");
        stop(outbox, handle, &dir);
    }
}
