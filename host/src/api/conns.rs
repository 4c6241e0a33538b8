//! The server's open connections and what each is doing, so a cap on them
//! holds without letting slow or idle clients lock everyone else out.
//!
//! Each connection is in one phase: `Waiting` (for a request's headers,
//! or idle between keep-alive requests), `Reading` (its request's body)
//! or `Busy` (its request was read and is being served: an ingest waiting
//! for its commit, a response being written, a live tail). At the cap
//! (`server.max_connections`) a new connection takes the slot of the
//! connection that has been waiting or reading the longest, which is
//! closed at once; a `Busy` one is never closed this way, so nothing whose
//! request was read (an event on its way to a 202) is ever cut. Only when
//! every slot is `Busy` is the new connection closed instead. Why this and
//! not "stop accepting": a stopped accept loop leaves `/healthz`, ingest
//! and everyone else queued behind the slowest clients, while taking the
//! stalest slot lets a quick request in whatever the slow ones do; the
//! timeouts (`server.header_timeout`, `server.body_timeout`) then bound
//! how long any client holds a slot at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

/// What a connection is doing; see the module comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Reading,
    Busy,
}

pub struct Connections {
    cap: usize,
    inner: Mutex<Inner>,
    /// Connections closed to make room, and new ones closed because every
    /// slot was busy; logged now and then rather than once each, so a
    /// flood of connections does not become a flood of log lines.
    evicted: AtomicU64,
    refused: AtomicU64,
    last_report: Mutex<Option<Instant>>,
}

struct Inner {
    next: u64,
    open: HashMap<u64, Entry>,
    /// Entries told to close that have not closed yet: they no longer
    /// count against the cap, as their sockets go within moments.
    closing: usize,
}

struct Entry {
    phase: Phase,
    /// When it entered its phase: the eviction order.
    since: Instant,
    close: Arc<Notify>,
    told: bool,
}

/// A connection's place among the open ones, given back when dropped.
pub struct Slot {
    id: u64,
    conns: Arc<Connections>,
    close: Arc<Notify>,
}

impl Connections {
    pub fn new(cap: usize) -> Arc<Connections> {
        Arc::new(Connections {
            cap: cap.max(1),
            inner: Mutex::new(Inner {
                next: 0,
                open: HashMap::new(),
                closing: 0,
            }),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            last_report: Mutex::new(None),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections closed so far to make room for a new one.
    pub fn closed_for_room(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// New connections closed so far because every slot was busy.
    pub fn refused_all_busy(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections counted against the cap now.
    pub fn open(&self) -> usize {
        let inner = self.inner();
        inner.open.len() - inner.closing
    }

    /// A slot for a just-accepted connection: free, or taken from the
    /// connection waiting or reading the longest. `None` when every slot
    /// is busy; the caller closes the new connection.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut inner = self.inner();
        let inner = &mut *inner;
        if inner.open.len() - inner.closing >= self.cap {
            let victim = inner
                .open
                .iter_mut()
                .filter(|(_, e)| !e.told && e.phase != Phase::Busy)
                .min_by_key(|(_, e)| e.since)
                .map(|(_, e)| e);
            match victim {
                Some(e) => {
                    e.told = true;
                    // A permit is stored if the task is not waiting yet.
                    e.close.notify_one();
                    inner.closing += 1;
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                    self.report();
                }
                None => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    self.report();
                    return None;
                }
            }
        }
        let id = inner.next;
        inner.next += 1;
        let close = Arc::new(Notify::new());
        inner.open.insert(
            id,
            Entry {
                phase: Phase::Waiting,
                since: Instant::now(),
                close: close.clone(),
                told: false,
            },
        );
        Some(Slot {
            id,
            conns: self.clone(),
            close,
        })
    }

    /// A warning at most every 10 s while connections are being closed
    /// for room, with the totals so far.
    fn report(&self) {
        let mut last = self.last_report.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed().as_secs() < 10) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(
            max_connections = self.cap,
            closed_for_room = self.evicted.load(Ordering::Relaxed),
            refused_all_busy = self.refused.load(Ordering::Relaxed),
            "connection cap reached: closing the connections idle or reading the longest to make room (server.max_connections)"
        );
    }
}

impl Slot {
    /// Moves the connection to `phase` (a no-op if it is there already,
    /// so its place in the eviction order is kept).
    pub fn set(&self, phase: Phase) {
        let mut inner = self.conns.inner();
        if let Some(e) = inner.open.get_mut(&self.id)
            && e.phase != phase
        {
            e.phase = phase;
            e.since = Instant::now();
        }
    }

    /// Resolves when the connection must close to make room.
    pub async fn closed_for_room(&self) {
        self.close.notified().await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.conns.inner();
        if let Some(e) = inner.open.remove(&self.id)
            && e.told
        {
            inner.closing -= 1;
        }
    }
}

/// Runs a connection's task so that the wakes it gives itself while it
/// is being polled become another poll at once, not a trip through the
/// scheduler. hyper's HTTP/1 server polls the service inside the
/// connection's task, and the request body it reads wakes that same task
/// (the handler waits on the body's channel); tokio treats a task woken
/// during its own poll as one that yielded, queues it and wakes a parked
/// worker to share the load, which at a low rate finds nothing to do and
/// goes back to sleep: about one futex wake-up and sleep of the other
/// worker per request at 500 events/s (`perf record -e sched:sched_waking
/// -g`: 912 such wakes for 1,000 deliveries; BENCHMARKS.md, "What a
/// delivery costs"). Wakes from elsewhere (the outbox's answer, a socket)
/// reach the task as before; one that comes during a poll is a re-poll.
pub fn absorb_self_wakes<F: Future>(fut: F) -> SelfWakes<F> {
    let flag = Arc::new(WakeFlag::default());
    SelfWakes {
        fut: Box::pin(fut),
        waker: std::task::Waker::from(flag.clone()),
        flag,
    }
}

/// See `absorb_self_wakes`.
pub struct SelfWakes<F> {
    fut: std::pin::Pin<Box<F>>,
    flag: Arc<WakeFlag>,
    /// The waker the inner future sees (it sets `flag`).
    waker: std::task::Waker,
}

#[derive(Default)]
struct WakeFlag {
    /// The inner future is being polled: a wake now only sets `woken`.
    polling: std::sync::atomic::AtomicBool,
    woken: std::sync::atomic::AtomicBool,
    /// The task's own waker, for wakes between polls.
    outer: Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.polling.load(Ordering::SeqCst) {
            self.woken.store(true, Ordering::SeqCst);
        } else if let Some(w) = &*self.outer.lock().unwrap_or_else(|e| e.into_inner()) {
            w.wake_by_ref();
        }
    }
}

/// Re-polls in a row at most, so a future that keeps waking itself still
/// lets the worker run other tasks (as a yield would).
const MAX_REPOLLS: usize = 8;

impl<F: Future> Future for SelfWakes<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = &mut *self;
        {
            let mut outer = this.flag.outer.lock().unwrap_or_else(|e| e.into_inner());
            if !outer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *outer = Some(cx.waker().clone());
            }
        }
        this.flag.polling.store(true, Ordering::SeqCst);
        let mut inner = std::task::Context::from_waker(&this.waker);
        let mut repolls = 0;
        let woken = loop {
            this.flag.woken.store(false, Ordering::SeqCst);
            if let std::task::Poll::Ready(out) = this.fut.as_mut().poll(&mut inner) {
                this.flag.polling.store(false, Ordering::SeqCst);
                return std::task::Poll::Ready(out);
            }
            if !this.flag.woken.load(Ordering::SeqCst) {
                break false;
            }
            repolls += 1;
            if repolls == MAX_REPOLLS {
                break true;
            }
        };
        this.flag.polling.store(false, Ordering::SeqCst);
        // A wake that came after the last look, before `polling` was
        // cleared, must not be lost.
        if woken || this.flag.woken.swap(false, Ordering::SeqCst) {
            cx.waker().wake_by_ref();
        }
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {

    /// A future that wakes itself on each of its first `ready_after`
    /// polls, as hyper's connection does when the body it reads wakes the
    /// handler polled in the same task, and is then done.
    struct WakesItself {
        polls: usize,
        ready_after: usize,
    }

    impl Future for WakesItself {
        type Output = usize;
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<usize> {
            self.polls += 1;
            if self.polls > self.ready_after {
                return std::task::Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }

    struct CountWakes(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_during_its_own_poll_is_a_repoll_and_others_reach_the_task() {
        // (polls before it is ready, outer polls it takes, wakes the task gets)
        let cases = [(0, 1, 0), (1, 1, 0), (3, 1, 0), (MAX_REPOLLS - 1, 1, 0)];
        for (ready_after, outer_polls, task_wakes) in cases {
            let counter = Arc::new(CountWakes(Default::default()));
            let waker = std::task::Waker::from(counter.clone());
            let mut cx = std::task::Context::from_waker(&waker);
            let mut fut = std::pin::pin!(absorb_self_wakes(WakesItself {
                polls: 0,
                ready_after,
            }));
            let mut polls = 0;
            let out = loop {
                polls += 1;
                if let std::task::Poll::Ready(n) = fut.as_mut().poll(&mut cx) {
                    break n;
                }
            };
            assert_eq!(out, ready_after + 1, "{ready_after}");
            assert_eq!(polls, outer_polls, "{ready_after}");
            assert_eq!(
                counter.0.load(Ordering::SeqCst),
                task_wakes,
                "{ready_after}"
            );
        }
        // One that keeps waking itself gives the worker back, woken to go on.
        let counter = Arc::new(CountWakes(Default::default()));
        let waker = std::task::Waker::from(counter.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut fut = std::pin::pin!(absorb_self_wakes(WakesItself {
            polls: 0,
            ready_after: usize::MAX,
        }));
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        // A wake from elsewhere between polls reaches the task.
        let inner = fut.waker.clone();
        inner.wake_by_ref();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    }
    use super::*;

    #[test]
    fn at_the_cap_the_stalest_unbusy_connection_makes_room() {
        let conns = Connections::new(2);
        let a = conns.admit().expect("free slot");
        let b = conns.admit().expect("free slot");
        a.set(Phase::Reading);
        b.set(Phase::Reading);
        // `a` has been reading longer than `b`.
        let c = conns.admit().expect("room made");
        assert!(a.close.notified().now_or_never_is_ready());
        assert!(!b.close.notified().now_or_never_is_ready());
        assert_eq!(conns.open(), 2);
        drop(a);
        assert_eq!(conns.open(), 2);
        // Busy connections are never taken: with both busy, no room.
        b.set(Phase::Busy);
        c.set(Phase::Busy);
        assert!(conns.admit().is_none());
        c.set(Phase::Waiting);
        assert!(conns.admit().is_some());
    }

    trait Ready {
        fn now_or_never_is_ready(self) -> bool;
    }

    impl<F: std::future::Future> Ready for F {
        fn now_or_never_is_ready(self) -> bool {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let mut f = std::pin::pin!(self);
            f.as_mut().poll(&mut cx).is_ready()
        }
    }
}
