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

#[cfg(test)]
mod tests {
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
