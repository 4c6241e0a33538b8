//! Sending: the dispatcher takes pending deliveries (handed over by ingest
//! right after their commit, or found due in the store), sends them within
//! concurrency limits, and records each attempt through the outbox.
//!
//! The store is the truth. The in-memory queue is a shortcut for latency:
//! whatever is lost from it (a crash, an overflow) is still due in the
//! store and is found by the next scan. A delivery id is in `active` from
//! the moment it is queued until its attempt's record is committed, so a
//! scan never starts a delivery twice.

pub mod channel;
pub mod client;
pub mod policy;
pub mod proxy;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::{Notify, mpsc, watch};

use crate::config::Config;
use crate::metrics::{Answer, Metrics, NO_ENDPOINT, Outcome as Counted};
use crate::outbox::Outbox;
use crate::rules::Transport;
use crate::rules::target::RuleVersion;
use crate::sign;
use crate::store::{
    Attempt, Claim, DeliveryId, DueKey, Endpoint, NewLane, Next, Op, Store, now_ms,
};
use crate::targets::{Target, Targets};
use crate::telemetry;
use client::{SendError, Sender};
use opentelemetry::KeyValue;
use policy::{Decision, EndpointChange};

/// The delivery id header, the same on every attempt and redelivery.
pub const DELIVERY_HEADER: &str = "X-Rulehook-Delivery";
/// The event's id, the rule's name and the attempt's number, on every attempt.
const EVENT_HEADER: &str = "X-Rulehook-Event";
const RULE_HEADER: &str = "X-Rulehook-Rule";
const ATTEMPT_HEADER: &str = "X-Rulehook-Attempt";

/// The headers rulehook sends on its own, by the name it records and the
/// name it sends, made once: `HeaderName::from_bytes` copies a name that
/// is not a standard header into a new allocation, lowercased, each time
/// (seven of these on every attempt).
static OWN_HEADERS: [(&str, http::HeaderName); 8] = [
    (
        DELIVERY_HEADER,
        http::HeaderName::from_static("x-rulehook-delivery"),
    ),
    (
        EVENT_HEADER,
        http::HeaderName::from_static("x-rulehook-event"),
    ),
    (
        RULE_HEADER,
        http::HeaderName::from_static("x-rulehook-rule"),
    ),
    (
        ATTEMPT_HEADER,
        http::HeaderName::from_static("x-rulehook-attempt"),
    ),
    (
        crate::rules::model::DEFAULT_SIGNATURE_HEADER,
        http::HeaderName::from_static("x-rulehook-signature"),
    ),
    (
        sign::WEBHOOK_ID,
        http::HeaderName::from_static("webhook-id"),
    ),
    (
        sign::WEBHOOK_TIMESTAMP,
        http::HeaderName::from_static("webhook-timestamp"),
    ),
    (
        sign::WEBHOOK_SIGNATURE,
        http::HeaderName::from_static("webhook-signature"),
    ),
];

/// The name a header is sent under (one of `OWN_HEADERS` without a copy).
fn header_name(name: &str) -> Result<http::HeaderName, http::header::InvalidHeaderName> {
    match OWN_HEADERS.iter().find(|(own, _)| *own == name) {
        Some((_, sent)) => Ok(sent.clone()),
        None => http::HeaderName::from_bytes(name.as_bytes()),
    }
}

/// A delivery to attempt.
#[derive(Clone, Debug)]
pub struct Work {
    pub id: DeliveryId,
    pub rule: String,
    /// The rule version it is bound to (`None`: stored before versions
    /// existed; it follows the running rule of the same name).
    pub version: Option<RuleVersion>,
    pub event_id: String,
    /// Attempts already made.
    pub attempts: u32,
    /// The body, when the caller has it at hand (fresh from ingest).
    pub body: Option<Bytes>,
    /// For WebSocket rules: the shared space whose clients get it.
    pub space: Option<String>,
    /// This node's hold on it (cluster mode; see `store::Claim`).
    pub claim: Option<Claim>,
    /// The ordered lane it heads (a rule with `ordering`): its record moves
    /// the lane on, so it is written at once rather than lazily (see
    /// `Outbox::write_lazily`), and with `on_failure: halt` it parks on the
    /// lane when it fails for good.
    pub lane: Option<NewLane>,
}

/// What the dispatcher and its attempts share.
pub struct Shared {
    pub store: Arc<Store>,
    pub outbox: Outbox,
    pub rules: Arc<ArcSwap<crate::reload::Snapshot>>,
    /// The rule versions deliveries are bound to.
    pub targets: Arc<Targets>,
    pub sender: Sender,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// Deliveries queued or in flight (see the module docs).
    pub active: Mutex<HashSet<DeliveryId>>,
    /// Endpoint states, loaded at start and persisted on every change.
    pub endpoints: Mutex<HashMap<String, Endpoint>>,
    /// WebSocket clients, for `transport: websocket` rules.
    pub channel: channel::Hub,
    /// Asks the dispatcher for a scan of the store now.
    pub kick: Arc<Notify>,
    /// This node as a cluster member (postgres mode): its claims' lease.
    pub cluster: Option<Arc<crate::cluster::Node>>,
    /// Claims waiting to be handed back together (see `release`).
    pub releasing: Arc<Mutex<Vec<(DeliveryId, u64)>>>,
}

/// How long claims to hand back gather before one statement releases
/// them all.
const RELEASE_GATHER: Duration = Duration::from_millis(20);

impl Shared {
    /// The rule version `work` is sent with: the one it is bound to, or for
    /// a delivery stored before versions existed, the running rule of its
    /// name. `Err` says why it cannot be sent.
    pub fn target(&self, work: &Work) -> Result<Arc<Target>, String> {
        match &work.version {
            Some(v) => self.targets.get(v).ok_or_else(|| {
                format!(
                    "version {v} of rule `{}` is not in the store; redeliver it with the current rule",
                    work.rule
                )
            }),
            None => self.rules.load().targets.get(&work.rule).cloned().ok_or_else(|| {
                format!(
                    "rule `{}` no longer exists; restore it and redeliver",
                    work.rule
                )
            }),
        }
    }

    /// Gives up the claims of deliveries this node dropped from memory, so
    /// another node (or this one's next scan) takes them at once instead of
    /// when the lease runs out. In the background; embedded mode has none.
    pub fn release(&self, works: impl IntoIterator<Item = Work>) {
        let claims: Vec<(DeliveryId, u64)> = works
            .into_iter()
            .filter_map(|w| w.claim.map(|c| (w.id, c.epoch)))
            .collect();
        if claims.is_empty() {
            return;
        }
        // Gathered, then released in one statement: under a burst that
        // overflows the queue, one round trip per delivery kept the pool
        // busy and starved the claims and records the work needed.
        let first = {
            let mut pending = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
            let first = pending.is_empty();
            pending.extend(claims);
            first
        };
        if !first {
            return; // the flush already on its way takes these too
        }
        let (store, pending) = (self.store.clone(), self.releasing.clone());
        tokio::spawn(async move {
            tokio::time::sleep(RELEASE_GATHER).await;
            let claims = std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = store.release(&claims) {
                    tracing::warn!(deliveries = claims.len(), error = %e, "could not release claims; they are taken over when their lease runs out");
                }
            })
            .await;
        });
    }

    pub fn is_active(&self, id: DeliveryId) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }
}

/// The way into the dispatcher, for ingest and the admin API.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Work>,
    kick: Arc<Notify>,
    shared: Arc<Shared>,
}

impl Queue {
    /// Hands over a committed delivery. If the queue is full it stays only
    /// in the store, and the dispatcher is told to scan.
    pub fn enqueue(&self, work: Work) {
        let id = work.id;
        let fresh = self
            .shared
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
        if !fresh {
            // A scan found it in the store between its commit and now, and
            // has started it: starting it here too would send it twice.
            return;
        }
        if let Err(e) = self.tx.try_send(work) {
            self.shared
                .active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.shared.release([e.into_inner()]);
            self.kick.notify_one();
        }
    }

    /// Asks for a scan of the store now (after a redelivery or an unblock).
    pub fn kick(&self) {
        self.kick.notify_one();
    }
}

/// Deliveries unparked per commit. An endpoint blocked while a backlog
/// built up can hold a million parked deliveries; moving them in one
/// transaction held the one writer, and with it every ingest and the first
/// resumed attempt, for about ten seconds.
pub const UNPARK_STEP: usize = 5_000;

/// Commits `first` together with the first `UNPARK_STEP` deliveries parked
/// on `endpoint` made due again, and returns that commit's results (the
/// unpark's last). The rest follows in the background, a step per commit,
/// the dispatcher kicked after each, so attempts start after the first
/// step, not after the whole backlog moved.
pub async fn unpark(
    outbox: &Outbox,
    kick: &Arc<Notify>,
    endpoint: &str,
    mut first: Vec<Op>,
) -> Result<Vec<crate::store::Done>, crate::outbox::OutboxError> {
    let step = |endpoint: &str| Op::Unpark {
        endpoint: endpoint.to_string(),
        limit: UNPARK_STEP,
    };
    // How many the last step moved; a full step means more may be left.
    let moved = |done: &[crate::store::Done]| match done.last() {
        Some(crate::store::Done::Unparked(ids)) => ids.len(),
        _ => 0,
    };
    first.push(step(endpoint));
    let done = outbox.write(first).await?;
    kick.notify_one();
    if moved(&done) >= UNPARK_STEP {
        let (outbox, kick, endpoint) = (outbox.clone(), kick.clone(), endpoint.to_string());
        tokio::spawn(async move {
            let mut total = UNPARK_STEP;
            loop {
                match outbox.write(vec![step(&endpoint)]).await {
                    Ok(done) => {
                        kick.notify_one();
                        total += moved(&done);
                        if moved(&done) < UNPARK_STEP {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::error!(endpoint, error = %e, "could not unpark the rest of this endpoint's deliveries; they resume at its next unblock");
                        break;
                    }
                }
            }
            tracing::info!(
                endpoint,
                deliveries = total,
                "every parked delivery of this endpoint is due again"
            );
        });
    }
    Ok(done)
}

/// Makes the deliveries parked for a WebSocket space due now (a client has
/// connected to it) and has the dispatcher look for them.
pub async fn resume_channel(shared: &Shared, space: &str) {
    // Cluster mode: record that this node has a client of the space before
    // its deliveries are made due, so the claims go to this node.
    crate::cluster::announce(shared).await;
    match unpark(
        &shared.outbox,
        &shared.kick,
        &channel::endpoint(space),
        Vec::new(),
    )
    .await
    {
        Ok(done) => {
            if let Some(crate::store::Done::Unparked(ids)) = done.last()
                && !ids.is_empty()
            {
                tracing::info!(
                    space,
                    deliveries = ids.len(),
                    "resuming deliveries that waited for a WebSocket client"
                );
            }
            shared.kick.notify_one();
        }
        Err(e) => {
            tracing::error!(space, error = %e, "could not resume the deliveries parked for this space; they resume when the next client connects")
        }
    }
}

/// The scheme://host:port an URL's deliveries are grouped, limited and
/// blocked by.
pub fn endpoint_key(url: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// What an attempt's task tells the dispatcher, in this order.
enum Completion {
    /// The request is over: its concurrency slot is free. Sent before the
    /// record is committed, so the endpoint's throughput does not wait on
    /// the disk.
    Freed {
        endpoint: String,
        /// 429/502/503/504: the endpoint asks us to slow down.
        slow_down: bool,
        success: bool,
    },
    /// The attempt's record is committed (or failed to be): the delivery
    /// may be picked up again, at `retry_at` if it was scheduled.
    Recorded {
        id: DeliveryId,
        retry_at: Option<u64>,
    },
}

/// What one attempt decided, for the dispatcher and for the store.
struct Outcome {
    slow_down: bool,
    success: bool,
    retry_at: Option<u64>,
    /// The record of the attempt and the delivery's next state.
    ops: Vec<Op>,
    /// Parked because no WebSocket client of this space was connected.
    waits_for_space: Option<String>,
}

/// Starts the dispatcher; it runs until `shutdown` turns true, then lets
/// in-flight attempts finish within the configured grace.
pub fn start(
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> (Queue, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(8192);
    let kick = shared.kick.clone();
    let queue = Queue {
        tx,
        kick: kick.clone(),
        shared: shared.clone(),
    };
    let handle = tokio::spawn(Dispatcher::new(shared).run(rx, kick, shutdown));
    (queue, handle)
}

struct Dispatcher {
    shared: Arc<Shared>,
    in_flight: usize,
    /// Attempts whose record is not committed yet (includes `in_flight`).
    recording: usize,
    per_endpoint: HashMap<String, usize>,
    /// Per-endpoint concurrency, lowered when it asks to slow down.
    limits: HashMap<String, usize>,
    waiting: HashMap<String, VecDeque<Work>>,
    waiting_total: usize,
    /// More is due in the store than fitted in the last scan.
    backlog: bool,
    /// Where a scan through a backlog resumes (see `scan`).
    cursor: Option<DueKey>,
    /// When a scan last started from the beginning of the due index.
    last_full_scan: Instant,
    done_tx: mpsc::UnboundedSender<Completion>,
    done_rx: Option<mpsc::UnboundedReceiver<Completion>>,
    /// Each attempt's task until its record is committed, so a stop can cut
    /// the ones the grace did not let finish.
    tasks: HashMap<DeliveryId, tokio::task::JoinHandle<()>>,
    /// A stop was asked for: no attempt starts any more.
    stopping: bool,
}

/// Deliveries held in memory while their endpoint is at its limit; past
/// this they stay in the store only.
const MAX_WAITING: usize = 10_000;

/// A scan fills memory up to this many times `max_in_flight`; the next
/// one runs when half of that is left, so the attempts go on from memory
/// while it reads (a scan of a thousand deliveries takes milliseconds,
/// which at full speed is longer than `max_in_flight` attempts last).
const SCAN_REFILL: usize = 4;

/// How often a scan through a backlog starts again from the beginning.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

/// Bodies up to this size are read with the scan that finds them; larger
/// ones when their attempt starts, so a scan never holds much memory.
const SCAN_BODY_CAP: usize = 64 << 10;

/// How often the dispatcher tries a write while the store's writes fail.
const STORE_PROBE_EVERY: Duration = Duration::from_secs(1);

impl Dispatcher {
    fn new(shared: Arc<Shared>) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Dispatcher {
            shared,
            in_flight: 0,
            recording: 0,
            per_endpoint: HashMap::new(),
            limits: HashMap::new(),
            waiting: HashMap::new(),
            waiting_total: 0,
            backlog: true,
            cursor: None,
            last_full_scan: Instant::now(),
            done_tx,
            done_rx: Some(done_rx),
            tasks: HashMap::new(),
            stopping: false,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Work>,
        kick: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut done_rx = self.done_rx.take().expect("run once");
        let max = self.shared.config.max_in_flight;
        let mut next_scan = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(c) = done_rx.recv() => {
                    if let Completion::Recorded { retry_at: Some(at), .. } = c {
                        // Wake for this retry if it is due before the next scan.
                        let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                        next_scan = next_scan.min(tokio::time::Instant::now() + wait);
                    }
                    self.completed(c);
                    if self.backlog && self.queued() < max * SCAN_REFILL / 2 {
                        next_scan = tokio::time::Instant::now();
                    }
                }
                Some(work) = rx.recv(), if self.in_flight < max => self.dispatch(work),
                _ = tokio::time::sleep_until(next_scan) => {
                    let wait = self.scan().await;
                    next_scan = tokio::time::Instant::now() + wait;
                }
                _ = kick.notified() => {
                    // Something was made due now (a redelivery, an unblock),
                    // maybe behind the cursor: look from the start.
                    self.cursor = None;
                    next_scan = tokio::time::Instant::now();
                }
            }
        }
        self.stop(&mut done_rx).await;
    }

    /// The stop: from the signal on no attempt starts (what waits in memory
    /// stays pending in the store); those in flight get the grace to finish
    /// and record; whatever is left then is cut. A cut attempt records
    /// nothing, so its delivery is still due and goes out again after the
    /// restart, with the same id.
    async fn stop(&mut self, done_rx: &mut mpsc::UnboundedReceiver<Completion>) {
        self.stopping = true;
        // What waits in memory will not be sent by this node: in cluster
        // mode let the others have it now rather than after the lease.
        let claims: Vec<(DeliveryId, u64)> = self
            .waiting
            .drain()
            .flat_map(|(_, q)| q)
            .filter_map(|w| w.claim.map(|c| (w.id, c.epoch)))
            .collect();
        self.waiting_total = 0;
        if !claims.is_empty() {
            let store = self.shared.store.clone();
            let release = tokio::task::spawn_blocking(move || store.release(&claims));
            match tokio::time::timeout(Duration::from_secs(2), release).await {
                Ok(Ok(Ok(()))) => {}
                _ => tracing::warn!(
                    "could not release the claims of queued deliveries at the stop; other nodes take them when the lease runs out"
                ),
            }
        }
        let grace = self.shared.config.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        while self.recording > 0 {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(c)) => self.completed(c),
                _ => break,
            }
        }
        let cut: Vec<DeliveryId> = self.tasks.keys().copied().collect();
        for (_, task) in self.tasks.drain() {
            task.abort();
            // Returns at once: the task is dropped at its next await.
            let _ = task.await;
        }
        if cut.is_empty() {
            tracing::info!("dispatcher stopped; every attempt in flight finished");
        } else {
            let shown: Vec<String> = cut.iter().take(20).map(|id| id.to_string()).collect();
            tracing::warn!(
                cut = cut.len(),
                grace_ms = grace.as_millis() as u64,
                deliveries = %shown.join(","),
                "shutdown grace over: attempts still in flight were cut short; they stay pending and are sent again after the restart"
            );
        }
    }

    /// Deliveries held in memory: in flight or waiting for their endpoint.
    fn queued(&self) -> usize {
        self.in_flight + self.waiting_total
    }

    fn completed(&mut self, c: Completion) {
        match c {
            Completion::Freed {
                endpoint,
                slow_down,
                success,
            } => self.freed(endpoint, slow_down, success),
            Completion::Recorded { id, .. } => {
                self.recording -= 1;
                self.tasks.remove(&id);
                self.shared
                    .active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
        }
    }

    fn freed(&mut self, endpoint: String, slow_down: bool, success: bool) {
        self.in_flight -= 1;
        if let Some(n) = self.per_endpoint.get_mut(&endpoint) {
            *n = n.saturating_sub(1);
        }
        let max_ep = self.shared.config.max_in_flight_per_endpoint;
        let limit = self.limits.entry(endpoint.clone()).or_insert(max_ep);
        // Additive increase, multiplicative decrease, as TCP does: back off
        // fast when the endpoint is overloaded, recover gradually.
        if slow_down {
            *limit = (*limit / 2).max(1);
        } else if success && *limit < max_ep {
            *limit += 1;
        }
        if self.stopping {
            return;
        }
        // The freed slot goes to the next waiting delivery that can start:
        // one left out (its lease ran out, or the store cannot record it)
        // must not leave the slot idle until another attempt completes.
        while let Some(next) = self
            .waiting
            .get_mut(&endpoint)
            .and_then(|queue| queue.pop_front())
        {
            self.waiting_total -= 1;
            if self.start(next, endpoint.clone()) {
                break;
            }
        }
    }

    fn dispatch(&mut self, work: Work) {
        // WebSocket deliveries are limited per shared space, the way HTTP
        // ones are per endpoint.
        let endpoint = self
            .shared
            .target(&work)
            .ok()
            .and_then(|t| match (&t.webhook, &work.space) {
                (Ok(w), Some(space)) if w.transport == Transport::WebSocket => {
                    Some(channel::endpoint(space))
                }
                (Ok(w), _) => w.url.as_ref().map(endpoint_key),
                (Err(_), _) => None,
            })
            .unwrap_or_default();
        let limit = *self
            .limits
            .get(&endpoint)
            .unwrap_or(&self.shared.config.max_in_flight_per_endpoint);
        if self.per_endpoint.get(&endpoint).copied().unwrap_or(0) >= limit {
            if self.waiting_total >= MAX_WAITING {
                self.leave_to_store(work);
                return;
            }
            self.waiting_total += 1;
            self.waiting.entry(endpoint).or_default().push_back(work);
            return;
        }
        self.start(work, endpoint);
    }

    /// Drops `work` from memory: it is still due in the store, where a
    /// later scan (this node's or, in cluster mode, any node's) finds it.
    /// Its claim is handed back; the epoch in the release makes that a
    /// no-op if another node has claimed it since.
    fn leave_to_store(&mut self, work: Work) {
        self.shared
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&work.id);
        self.shared.release([work]);
        self.backlog = true;
    }

    /// Starts the attempt, or leaves the delivery to the store (it stays
    /// due there) when it must not start now; says which.
    fn start(&mut self, work: Work, endpoint: String) -> bool {
        if self.shared.store.is_failing() {
            // Its record could not be written: the attempt would be sent
            // and then sent again, for as long as writes fail. It stays due
            // in the store; the scan probes the store and finds it again
            // once writes work.
            self.leave_to_store(work);
            return false;
        }
        if let (Some(node), Some(claim)) = (&self.shared.cluster, &work.claim)
            && !node.holds(claim, now_ms())
        {
            // Held in memory past its lease (this node was paused, or cut
            // off from the database): another node may be sending it now.
            tracing::info!(event = %work.event_id, delivery = %work.id, rule = %work.rule, endpoint = %endpoint, node = %node.id, "lease ran out before the attempt started; leaving the delivery to the next claim");
            self.leave_to_store(work);
            return false;
        }
        self.in_flight += 1;
        self.recording += 1;
        *self.per_endpoint.entry(endpoint.clone()).or_default() += 1;
        let shared = self.shared.clone();
        let done = self.done_tx.clone();
        let id = work.id;
        let task = tokio::spawn(async move {
            // One trace per attempt (exported only with `otlp_endpoint`).
            let span = telemetry::root(Some(&work.event_id), "attempt", || {
                [
                    KeyValue::new("event.id", work.event_id.clone()),
                    KeyValue::new("delivery.id", work.id.to_string()),
                    KeyValue::new("rule", work.rule.clone()),
                    KeyValue::new("endpoint", endpoint.to_string()),
                    KeyValue::new("attempt", i64::from(work.attempts) + 1),
                ]
            });
            let mut outcome = span.clone().instrument(attempt(&shared, &work)).await;
            if let Some(lane) = work.lane.as_ref().filter(|l| l.halt) {
                hold_lane(&mut outcome.ops, &lane.key);
            }
            let _ = done.send(Completion::Freed {
                // Kept for the record's log lines, which name it.
                endpoint: endpoint.clone(),
                slow_down: outcome.slow_down,
                success: outcome.success,
            });
            // The delivery stays in `active` until this commit, so no scan
            // starts it again on the strength of its old state.
            // No client waits on an attempt record: it may share a commit
            // with the next ones (a lane's head may not: the lane waits).
            let record = span.child("record", || []);
            let recorded = if work.lane.is_some() {
                record.instrument(shared.outbox.write(outcome.ops)).await
            } else {
                record
                    .instrument(shared.outbox.write_lazily(outcome.ops))
                    .await
            };
            let retry_at = match recorded {
                Ok(done)
                    if done
                        .iter()
                        .any(|d| matches!(d, crate::store::Done::Rejected(_))) =>
                {
                    for d in &done {
                        if let crate::store::Done::Rejected(why) = d {
                            tracing::warn!(event = %work.event_id, delivery = %id, rule = %work.rule, endpoint = %endpoint, reason = %why, "attempt result refused");
                        }
                    }
                    shared.metrics.claim_lost();
                    None
                }
                Ok(done) => {
                    // The next delivery of an ordered lane is due now:
                    // scan for it rather than wait for the next scan.
                    if done
                        .iter()
                        .any(|d| matches!(d, crate::store::Done::Finished { promoted: Some(_) }))
                    {
                        shared.kick.notify_one();
                    }
                    outcome.retry_at
                }
                Err(e) => {
                    tracing::error!(event = %work.event_id, delivery = %id, rule = %work.rule, endpoint = %endpoint, error = %e, "could not record the attempt; the delivery stays due");
                    None
                }
            };
            // A client may have connected between the attempt's look and
            // the park's commit, and its resume may have run before the
            // park existed: look again now that it does.
            if let Some(space) = outcome.waits_for_space
                && shared.channel.clients(&space) > 0
            {
                resume_channel(&shared, &space).await;
            }
            let _ = done.send(Completion::Recorded { id, retry_at });
        });
        self.tasks.insert(id, task);
        true
    }

    /// Unparks endpoints whose block expired, then starts due deliveries
    /// while there is room. Returns how long until the next scan.
    async fn scan(&mut self) -> Duration {
        self.shared.metrics.dispatcher_held(
            self.per_endpoint.iter().map(|(ep, n)| (ep, *n)),
            self.waiting.iter().map(|(ep, q)| (ep, q.len())),
        );
        if self.shared.store.is_failing() {
            // No attempt starts while records cannot be written (see
            // `start`); a probe, once a second, notices when they can.
            let store = self.shared.store.clone();
            let probed = tokio::task::spawn_blocking(move || store.probe()).await;
            if !matches!(probed, Ok(Ok(()))) {
                return STORE_PROBE_EVERY;
            }
            self.cursor = None;
        }
        let now = now_ms();
        self.unpark_expired(now).await;
        // Refill to a few times the overall limit, so a backlog is read in
        // batches (one scan per ~1,000 deliveries, not one per completion)
        // while what is held in memory stays bounded.
        let free = (self.shared.config.max_in_flight * SCAN_REFILL).saturating_sub(self.queued());
        if free == 0 {
            self.backlog = true;
            return Duration::from_millis(50);
        }
        // Through a backlog, each scan resumes where the last one stopped:
        // walking from the start every time would step over every queued
        // and in-flight delivery again, and those are most of the head of
        // the index. A delivery that ends up behind the cursor (queued when
        // it was passed, then dropped from memory) is found by the next
        // scan from the start, at most a second later.
        if self.last_full_scan.elapsed() >= FULL_SCAN_EVERY {
            self.cursor = None;
        }
        if self.cursor.is_none() {
            self.last_full_scan = Instant::now();
        }
        let after = self.cursor;
        let store = self.shared.store.clone();
        let shared = self.shared.clone();
        let t0 = Instant::now();
        let found = tokio::task::spawn_blocking(move || {
            // The lock is taken per key, not across the scan: ingest and
            // completions must not wait for a walk through the store.
            let scan = store.due(after, now, free, &|id| shared.is_active(id), SCAN_BODY_CAP)?;
            if shared.cluster.is_some() {
                // Another node's reload may have made versions this one
                // has not seen: read them before the attempts need them.
                let versions = scan
                    .found
                    .iter()
                    .filter_map(|d| d.delivery.rule_version.as_deref());
                if let Err(e) = shared.targets.learn(&store, versions) {
                    tracing::warn!(error = %e, "could not read rule versions made by other nodes");
                }
            }
            Ok::<_, crate::store::StoreError>(scan)
        })
        .await;
        let scan = match found {
            Ok(Ok(scan)) => scan,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "scanning for due deliveries failed; trying again shortly");
                return Duration::from_secs(1);
            }
            Err(_) => return Duration::from_secs(1),
        };
        tracing::debug!(
            found = scan.found.len(),
            more = scan.more,
            free,
            from_start = after.is_none(),
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            "scanned the due index"
        );
        self.backlog = scan.more;
        self.cursor = if scan.more { scan.resume } else { None };
        let scan_next = scan.next_due;
        let found: Vec<_> = {
            // Ingest may have handed one of these over since the scan looked:
            // whoever marks a delivery active first starts it, the other
            // leaves it (see `Queue::enqueue`).
            let mut active = self.shared.active.lock().unwrap_or_else(|e| e.into_inner());
            scan.found
                .into_iter()
                .filter(|due| active.insert(due.delivery.id))
                .collect()
        };
        for due in found {
            let d = due.delivery;
            self.dispatch(Work {
                id: d.id,
                rule: d.rule,
                version: d.rule_version.map(RuleVersion),
                event_id: d.event_id,
                attempts: d.attempts,
                body: due.body.map(Bytes::from),
                space: d.space,
                claim: due.claim,
                lane: d.lane.map(|l| NewLane {
                    key: l.key,
                    halt: l.halt,
                }),
            });
        }
        if self.backlog {
            return Duration::from_millis(20);
        }
        // Wake for the next retry, but at least every second so blocks that
        // expire and deliveries a failed hand-over left behind are found.
        let until_next = scan_next.map_or(1000, |at| at.saturating_sub(now_ms()).clamp(1, 1000));
        Duration::from_millis(until_next)
    }

    async fn unpark_expired(&mut self, now: u64) {
        let expired: Vec<Endpoint> = {
            let mut eps = self
                .shared
                .endpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            eps.values_mut()
                .filter(|ep| !ep.disabled && ep.blocked_until.is_some_and(|t| t <= now))
                .map(|ep| {
                    ep.blocked_until = None;
                    ep.updated_at = now;
                    ep.clone()
                })
                .collect()
        };
        for ep in expired {
            tracing::info!(endpoint = %ep.endpoint, "endpoint block expired; resuming its parked deliveries");
            let ops = vec![Op::PutEndpoint(ep.clone())];
            if let Err(e) = unpark(&self.shared.outbox, &self.shared.kick, &ep.endpoint, ops).await
            {
                tracing::error!(endpoint = %ep.endpoint, error = %e, "could not unpark");
            }
        }
    }
}

/// Makes one attempt and decides what to record; the caller commits it.
async fn attempt(shared: &Shared, work: &Work) -> Outcome {
    let target = match shared.target(work) {
        Ok(t) => t,
        Err(why) => return cannot_send(shared, work, why),
    };
    let webhook = match &target.webhook {
        Ok(w) => w,
        Err(why) => return cannot_send(shared, work, why.clone()),
    };
    let url = match (webhook.transport, webhook.url.as_ref()) {
        (Transport::WebSocket, _) => return channel_attempt(shared, work, webhook).await,
        (Transport::Http, Some(url)) => url,
        (Transport::Http, None) => {
            shared
                .metrics
                .series(&target.rule, NO_ENDPOINT)
                .delivery(Counted::Failed);
            return not_sent(
                work,
                Next::Failed(format!(
                    "rule `{}` has no url; add one and redeliver",
                    target.rule
                )),
            );
        }
    };
    let endpoint = endpoint_key(url);
    let series = shared.metrics.series(&target.rule, &endpoint);
    let now = now_ms();
    let blocked = {
        let eps = shared.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        eps.get(&endpoint)
            .and_then(|ep| policy::is_blocked(ep, now))
    };
    if let Some(reason) = blocked {
        series.delivery(Counted::Parked);
        return not_sent(work, Next::Park { endpoint, reason });
    }
    let body = match body_of(shared, work).await {
        Ok(body) => body,
        Err(failed) => return failed,
    };
    let number = work.attempts + 1;
    let id_text = work.id.to_string();
    let per_attempt = [
        (EVENT_HEADER, work.event_id.clone()),
        (RULE_HEADER, target.rule.clone()),
        (ATTEMPT_HEADER, number.to_string()),
    ];
    let (request, recorded) = telemetry::child("sign", || [])
        .in_scope(|| build_request(webhook, &id_text, per_attempt, now / 1000, body));
    let started = Instant::now();
    let sent = match request {
        Ok(req) => {
            let span = telemetry::child("send", || {
                [KeyValue::new(
                    "http.request.method",
                    webhook.method.as_str().to_string(),
                )]
            });
            span.instrument(shared.sender.send(
                url,
                req,
                webhook.tls_verify,
                webhook.connect_timeout,
                webhook.reply_timeout,
                shared.config.response_body_cap,
            ))
            .await
        }
        Err(e) => Err(SendError::Refused(e)),
    };
    let elapsed = started.elapsed();
    let mut record = Attempt {
        number,
        started_at: now,
        duration_ms: elapsed.as_millis() as u64,
        url: url.to_string(),
        method: webhook.method.as_str().into(),
        request_headers: recorded,
        status: None,
        reason_phrase: None,
        response_headers: Vec::new(),
        response_body: None,
        response_truncated: false,
        error: None,
        outcome: String::new(),
    };
    let result = match sent {
        Ok(r) => {
            let retry_after = r
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                .and_then(|(_, v)| parse_retry_after(v, now));
            record.status = Some(r.status);
            record.reason_phrase = r.reason;
            record.response_headers = r.headers;
            record.response_body = Some(String::from_utf8_lossy(&r.body).into_owned());
            record.response_truncated = r.truncated;
            policy::Result::Status {
                code: r.status,
                retry_after,
            }
        }
        Err(SendError::Refused(e)) => policy::Result::Refused(e),
        Err(SendError::NoReply(e)) => policy::Result::NoReply(e),
        Err(SendError::Timeout(e)) => policy::Result::Timeout(e),
        Err(SendError::InvalidHttp(e)) => policy::Result::InvalidHttp(e),
    };
    if !matches!(result, policy::Result::Status { .. }) {
        record.error = Some(result.describe());
    }
    let decision = decide(shared, webhook, number, &result);
    let (change, ep_state) = {
        let mut eps = shared.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let ep = eps.entry(endpoint.clone()).or_insert_with(|| Endpoint {
            endpoint: endpoint.clone(),
            ..Default::default()
        });
        let before = ep.clone();
        let change = policy::endpoint_after(ep, &result, now_ms(), &shared.config.protection);
        (change, (*ep != before).then(|| ep.clone()))
    };
    let next = match (&decision, &change) {
        (Decision::Succeeded, _) => Next::Succeeded,
        (Decision::Gone, _) => Next::Park {
            endpoint: endpoint.clone(),
            reason: format!("endpoint {endpoint} answered 410 Gone"),
        },
        (Decision::Failed(why), _) => Next::Failed(why.clone()),
        (Decision::Retry { .. }, EndpointChange::Blocked { .. }) => Next::Park {
            endpoint: endpoint.clone(),
            reason: format!(
                "endpoint {endpoint} was blocked after repeated failures ({})",
                result.describe()
            ),
        },
        (Decision::Retry { at }, _) => Next::Retry { at: *at },
    };
    record.outcome = outcome_text(&next);
    let success = next == Next::Succeeded;
    let answer = match &result {
        policy::Result::Status { code, .. } => Answer::Status(*code),
        policy::Result::Refused(_) => Answer::Refused,
        policy::Result::NoReply(_) => Answer::NoReply,
        policy::Result::Timeout(_) => Answer::Timeout,
        policy::Result::InvalidHttp(_) => Answer::InvalidHttp,
    };
    count_attempt(&series, answer, &next, elapsed);
    let span = telemetry::Span::current();
    if let Some(code) = record.status {
        span.record("http.response.status_code", || i64::from(code));
    }
    span.record("outcome", || next_kind(&next));
    if let EndpointChange::Blocked { until } = change {
        shared.metrics.endpoint_blocked(&endpoint);
        tracing::warn!(event = %work.event_id, delivery = %work.id, rule = %target.rule, endpoint = %endpoint, until, "endpoint blocked after repeated failures");
    }
    // The status, not the error text: a refusal's text can quote the URL,
    // whose path or query may be a credential (Slack's are).
    let status = answer;
    match &next {
        Next::Failed(_) => {
            tracing::warn!(event = %work.event_id, delivery = %work.id, rule = %target.rule, endpoint = %endpoint, attempt = number, status = %status, "delivery failed; its record has every attempt, and it can be redelivered")
        }
        Next::Park { .. } => {
            tracing::warn!(event = %work.event_id, delivery = %work.id, rule = %target.rule, endpoint = %endpoint, attempt = number, status = %status, "delivery parked until its endpoint is unblocked")
        }
        Next::Retry { at } => {
            tracing::info!(event = %work.event_id, delivery = %work.id, rule = %target.rule, endpoint = %endpoint, attempt = number, status = %status, retry_in_ms = at.saturating_sub(now_ms()), "attempt failed; retrying")
        }
        Next::Succeeded => {
            tracing::debug!(event = %work.event_id, delivery = %work.id, rule = %target.rule, version = %target.version, endpoint = %endpoint, attempt = number, status = %status, "attempt")
        }
    }
    let slow_down = matches!(
        result,
        policy::Result::Status {
            code: 429 | 502 | 503 | 504,
            ..
        }
    );
    let retry_at = match next {
        Next::Retry { at } => Some(at),
        _ => None,
    };
    let mut ops = vec![Op::Finish {
        id: work.id,
        attempt: Some(record),
        next,
        epoch: work.claim.map(|c| c.epoch),
    }];
    if let Some(ep) = ep_state {
        ops.push(Op::PutEndpoint(ep));
    }
    Outcome {
        slow_down,
        success,
        retry_at,
        ops,
        waits_for_space: None,
    }
}

/// A halting lane's head that failed for good parks on its lane instead
/// (see `store::on_lane_failure`), and its attempt record says so.
fn hold_lane(ops: &mut [Op], lane: &str) {
    for op in ops {
        if let Op::Finish { next, attempt, .. } = op
            && matches!(next, Next::Failed(_))
        {
            *next = crate::store::on_lane_failure(next.clone(), Some(lane));
            if let Some(a) = attempt {
                a.outcome = outcome_text(next);
            }
        }
    }
}

/// An attempt that could not be made: nothing was sent, nothing recorded
/// but the delivery's next state.
fn not_sent(work: &Work, next: Next) -> Outcome {
    Outcome {
        slow_down: false,
        success: false,
        retry_at: None,
        ops: vec![Op::Finish {
            id: work.id,
            attempt: None,
            next,
            epoch: work.claim.map(|c| c.epoch),
        }],
        waits_for_space: None,
    }
}

type Request = http::Request<Full<Bytes>>;

/// A request to `webhook`, as every attempt and test connection sends it:
/// content type, user agent, the delivery id, `extra` headers, basic
/// authentication, the rule's own headers and the signatures over `body`.
/// Also returns the headers as recorded, with the credentials and secret
/// header values redacted (`***`).
fn build_request<'a>(
    webhook: &crate::rules::Webhook,
    delivery_id: &str,
    extra: impl IntoIterator<Item = (&'a str, String)>,
    now_secs: u64,
    body: Bytes,
) -> (Result<Request, String>, Vec<(String, String)>) {
    // Header by header, so a value that cannot be sent is refused by its
    // header's name (`Request::builder` said only "failed to parse header
    // value"), and never by its value, which may be a secret.
    let mut sent = http::HeaderMap::new();
    let mut recorded = Vec::new();
    let mut refused: Option<String> = None;
    // `shown`: what the attempt record keeps when it is not what is sent.
    let mut add = |name: &str, value: String, shown: Option<&str>| {
        match (header_name(name), http::HeaderValue::from_str(&value)) {
            (Ok(n), Ok(v)) => {
                sent.append(n, v);
            }
            (Err(e), _) => {
                refused.get_or_insert(format!(
                    "cannot build the request: header name `{name}`: {e}"
                ));
            }
            (_, Err(e)) => {
                refused.get_or_insert(format!(
                    "cannot build the request: the value of header `{name}`: {e}"
                ));
            }
        }
        recorded.push((name.to_string(), shown.map_or(value, str::to_string)));
    };
    add("Content-Type", "application/json".into(), None);
    add(
        "User-Agent",
        concat!("rulehook/", env!("CARGO_PKG_VERSION")).into(),
        None,
    );
    add(DELIVERY_HEADER, delivery_id.to_string(), None);
    for (k, v) in extra {
        add(k, v, None);
    }
    if let Some(c) = &webhook.credentials {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", c.username, c.password.value));
        add("Authorization", format!("Basic {token}"), Some("Basic ***"));
    }
    for (k, v) in &webhook.headers {
        let shown = matches!(v, crate::rules::HeaderValue::Secret(_)).then(|| v.recorded());
        add(k, v.value().to_string(), shown);
    }
    for (k, v) in crate::sign::headers(webhook, delivery_id, now_secs, &body) {
        add(k, v, None);
    }
    if let Some(why) = refused {
        return (Err(why), recorded);
    }
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = match http::Method::from_bytes(webhook.method.as_str().as_bytes()) {
        Ok(m) => m,
        Err(e) => return (Err(format!("cannot build the request: {e}")), recorded),
    };
    *request.headers_mut() = sent;
    (Ok(request), recorded)
}

/// A delivery that cannot be attempted at all fails, saying why.
fn cannot_send(shared: &Shared, work: &Work, why: impl Into<String>) -> Outcome {
    shared
        .metrics
        .series(&work.rule, NO_ENDPOINT)
        .delivery(Counted::Failed);
    tracing::warn!(event = %work.event_id, delivery = %work.id, rule = %work.rule, endpoint = %NO_ENDPOINT, "delivery failed before any attempt; its record says why");
    not_sent(work, Next::Failed(why.into()))
}

/// The delivery's body: handed over with it, or read from the store; if
/// it is missing there, the delivery fails.
async fn body_of(shared: &Shared, work: &Work) -> Result<Bytes, Outcome> {
    if let Some(b) = &work.body {
        return Ok(b.clone());
    }
    let store = shared.store.clone();
    let id = work.id;
    match tokio::task::spawn_blocking(move || store.body(id)).await {
        Ok(Ok(Some(b))) => Ok(Bytes::from(b)),
        _ => Err(cannot_send(
            shared,
            work,
            "the delivery's body is missing from the store",
        )),
    }
}

/// The retry policy's decision after attempt `number`, with fresh jitter.
fn decide(
    shared: &Shared,
    webhook: &crate::rules::Webhook,
    number: u32,
    result: &policy::Result,
) -> Decision {
    let jitter = rand::random::<f64>() * 2.0 - 1.0;
    let cap = shared.config.retry_after_cap;
    policy::decide(&webhook.retry, number, result, now_ms(), jitter, cap)
}

/// What an attempt record says was decided.
fn outcome_text(next: &Next) -> String {
    match next {
        Next::Succeeded => "succeeded".into(),
        Next::Failed(why) => format!("failed: {why}"),
        Next::Retry { at } => format!("retry in {} ms", at.saturating_sub(now_ms())),
        Next::Park { reason, .. } => format!("parked: {reason}"),
    }
}

/// Counts a made attempt and what it decided for its delivery.
fn count_attempt(series: &crate::metrics::Series, answer: Answer, next: &Next, took: Duration) {
    series.attempt(answer, *next == Next::Succeeded, took);
    match next {
        Next::Succeeded => series.delivery(Counted::Succeeded),
        Next::Failed(_) => series.delivery(Counted::Failed),
        Next::Park { .. } => series.delivery(Counted::Parked),
        Next::Retry { .. } => {}
    }
}

/// The decision's name, for the attempt's span.
fn next_kind(next: &Next) -> &'static str {
    match next {
        Next::Succeeded => "succeeded",
        Next::Failed(_) => "failed",
        Next::Retry { .. } => "retry",
        Next::Park { .. } => "parked",
    }
}

/// One attempt of a WebSocket rule's delivery: a text frame to every
/// client of its shared space. With none connected it is parked (nothing
/// is sent, no attempt recorded) until one connects.
async fn channel_attempt(shared: &Shared, work: &Work, webhook: &crate::rules::Webhook) -> Outcome {
    let Some(space) = work.space.clone() else {
        return cannot_send(
            shared,
            work,
            "the delivery was made while its rule sent over HTTP, so it has no shared space; its rule now sends over WebSocket",
        );
    };
    let series = shared
        .metrics
        .series(&work.rule, &channel::endpoint(&space));
    let wait_for_client = |work: &Work| {
        series.delivery(Counted::Parked);
        let mut outcome = not_sent(
            work,
            Next::Park {
                endpoint: channel::endpoint(&space),
                reason: format!("no WebSocket client is connected to shared space {space}"),
            },
        );
        outcome.waits_for_space = Some(space.clone());
        outcome
    };
    if shared.channel.clients(&space) == 0 {
        // Cluster mode: a client of this space may be connected to another
        // node. Hand the delivery back, due now; only a node with a client
        // of the space may claim it then.
        if shared.cluster.is_some() {
            let store = shared.store.clone();
            let s = space.clone();
            if let Ok(Ok(true)) =
                tokio::task::spawn_blocking(move || store.space_elsewhere(&s)).await
            {
                return not_sent(work, Next::Retry { at: now_ms() });
            }
        }
        return wait_for_client(work);
    }
    let body = match body_of(shared, work).await {
        Ok(body) => body,
        Err(failed) => return failed,
    };
    let number = work.attempts + 1;
    let now = now_ms();
    let started = Instant::now();
    let sent = shared
        .channel
        .send(&space, &body, webhook.reply_timeout)
        .await;
    let elapsed = started.elapsed();
    let next = match &sent {
        Ok(_) => Next::Succeeded,
        // The last client left between the look and the send.
        Err(channel::SendError::NoClient) => return wait_for_client(work),
        Err(channel::SendError::NotTaken(why)) => {
            let result = policy::Result::NoReply(why.clone());
            match decide(shared, webhook, number, &result) {
                Decision::Retry { at } => Next::Retry { at },
                Decision::Failed(why) => Next::Failed(why),
                Decision::Succeeded | Decision::Gone => Next::Failed(why.clone()),
            }
        }
    };
    let answer = if sent.is_ok() {
        Answer::Frame
    } else {
        Answer::NoReply
    };
    count_attempt(&series, answer, &next, elapsed);
    let record = Attempt {
        number,
        started_at: now,
        duration_ms: elapsed.as_millis() as u64,
        url: channel::path(&space),
        method: "WEBSOCKET".into(),
        request_headers: Vec::new(),
        status: None,
        reason_phrase: None,
        response_headers: Vec::new(),
        response_body: None,
        response_truncated: false,
        error: sent.as_ref().err().map(|e| match e {
            channel::SendError::NotTaken(why) => why.clone(),
            channel::SendError::NoClient => String::new(),
        }),
        outcome: match &sent {
            Ok(clients) => format!("succeeded: sent to {}", clients.join(", ")),
            Err(_) => outcome_text(&next),
        },
    };
    match &next {
        Next::Failed(_) => {
            tracing::warn!(event = %work.event_id, delivery = %work.id, rule = %work.rule, endpoint = %channel::endpoint(&space), attempt = number, "delivery failed; no client of its shared space took the frame")
        }
        Next::Retry { .. } => {
            tracing::info!(event = %work.event_id, delivery = %work.id, rule = %work.rule, endpoint = %channel::endpoint(&space), attempt = number, "no client of its shared space took the frame; retrying")
        }
        _ => {
            tracing::debug!(event = %work.event_id, delivery = %work.id, rule = %work.rule, endpoint = %channel::endpoint(&space), attempt = number, outcome = %record.outcome, "websocket attempt")
        }
    }
    let success = next == Next::Succeeded;
    let retry_at = match next {
        Next::Retry { at } => Some(at),
        _ => None,
    };
    Outcome {
        slow_down: false,
        success,
        retry_at,
        ops: vec![Op::Finish {
            id: work.id,
            attempt: Some(record),
            next,
            epoch: work.claim.map(|c| c.epoch),
        }],
        waits_for_space: None,
    }
}

/// What a test connection got.
pub struct TestConnection {
    /// The URL posted to: the rule's, with `test=true` added.
    pub url: url::Url,
    pub method: &'static str,
    pub duration: Duration,
    pub result: Result<client::Response, SendError>,
}

/// Posts a small test body to `rule`'s URL with `?test=true`, signed and
/// authenticated as its deliveries are, and returns the answer. Nothing is
/// stored. `Err` names why no request could be made.
pub async fn test_connection(
    sender: &Sender,
    rule: &crate::rules::Rule,
    body_cap: usize,
) -> Result<TestConnection, String> {
    let webhook = &rule.webhook;
    let (Transport::Http, Some(url)) = (webhook.transport, webhook.url.as_ref()) else {
        return Err(format!(
            "rule `{}` sends over the WebSocket channel, which has no URL to test; see its clients in GET /v1/endpoints",
            rule.name
        ));
    };
    let mut test_url = url.clone();
    test_url.query_pairs_mut().append_pair("test", "true");
    let body = serde_json::to_vec(
        &serde_json::json!({"test": true, "rule": rule.name, "message": "rulehook test connection"}),
    )
    .map_err(|e| e.to_string())?;
    let id = DeliveryId::new().to_string();
    let (req, _) = build_request(webhook, &id, [], now_ms() / 1000, Bytes::from(body));
    let req = req?;
    let started = Instant::now();
    let result = sender
        .send(
            &test_url,
            req,
            webhook.tls_verify,
            webhook.connect_timeout,
            webhook.reply_timeout,
            body_cap,
        )
        .await;
    Ok(TestConnection {
        url: test_url,
        method: webhook.method.as_str(),
        duration: started.elapsed(),
        result,
    })
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now_ms: u64) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(Duration::from_millis(at_ms.saturating_sub(now_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120", 0), Some(Duration::from_secs(120)));
        let now = 1_445_412_480_000; // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", 0), None);
    }

    /// The webhook of the one rule `r` whose `webhook:` mapping is `spec`,
    /// its secrets resolved by `resolve`.
    fn webhook_of(
        spec: &str,
        resolve: impl Fn(&crate::rules::SecretRef) -> Result<String, String> + Sync,
    ) -> crate::rules::Webhook {
        let (set, diags) = crate::rules::RuleSet::compile(
            &[crate::rules::Source {
                path: "r.yaml".into(),
                text: format!("rules:\n  - name: r\n    events: [create]\n    webhook: {spec}\n"),
            }],
            &resolve,
        );
        assert!(diags.is_empty(), "{diags:?}");
        set.get("r").unwrap().webhook.clone()
    }

    #[test]
    fn a_secret_header_is_sent_and_recorded_as_stars() {
        let webhook = webhook_of(
            "{url: \"https://a.example/\", headers: {X-Team: qa, X-Api-Key: {env: KEY}}, credentials: {username: u, password: {env: PW}}}",
            |r| match r {
                crate::rules::SecretRef::Env(n) => Ok(format!("value-of-{n}")),
                _ => Err("not here".to_string()),
            },
        );
        let (request, recorded) = build_request(&webhook, "d-1", [], 0, Bytes::from_static(b"{}"));
        let request = request.unwrap();
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.headers()["content-type"], "application/json");
        assert_eq!(request.headers()[DELIVERY_HEADER], "d-1");
        assert_eq!(request.headers()["x-api-key"], "value-of-KEY");
        // Every header sent is recorded, once, in the order sent.
        let names: Vec<&str> = recorded.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(request.headers().len(), names.len(), "{names:?}");
        assert_eq!(
            &names[..3],
            ["Content-Type", "User-Agent", DELIVERY_HEADER],
            "{names:?}"
        );
        for (k, _) in &recorded {
            assert!(request.headers().contains_key(k.as_str()), "{k} not sent");
        }
        assert_eq!(request.headers()["x-team"], "qa");
        let shown = |name: &str| {
            recorded
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(shown("X-Api-Key"), Some("***"));
        assert_eq!(shown("X-Team"), Some("qa"));
        assert_eq!(shown("Authorization"), Some("Basic ***"));
        assert!(
            !format!("{recorded:?}").contains("value-of"),
            "{recorded:?}"
        );
    }

    /// The names made once in `OWN_HEADERS` are those `from_bytes` makes
    /// of the names recorded; any other name is made as it always was.
    #[test]
    fn its_own_headers_are_sent_under_the_names_they_are_recorded_by() {
        for (recorded, sent) in &OWN_HEADERS {
            let made = http::HeaderName::from_bytes(recorded.as_bytes()).unwrap();
            assert_eq!(sent, &made, "{recorded}");
            assert_eq!(&header_name(recorded).unwrap(), sent, "{recorded}");
        }
        assert_eq!(header_name("X-Team").unwrap().as_str(), "x-team");
        assert!(header_name("bad name").is_err());
        // An attempt sends them, signed both ways, under those names.
        let webhook = webhook_of(
            "{url: \"https://a.example/\", secret: {env: S}, signature: [hmac-sha256, standard-webhooks]}",
            |_| Ok("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string()),
        );
        let extra = [("X-Rulehook-Event", "e-1".to_string())];
        let (request, recorded) =
            build_request(&webhook, "d-1", extra, 7, Bytes::from_static(b"{}"));
        let request = request.unwrap();
        for name in [
            DELIVERY_HEADER,
            "X-Rulehook-Event",
            crate::rules::model::DEFAULT_SIGNATURE_HEADER,
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
        ] {
            assert!(request.headers().contains_key(name), "{name} not sent");
            assert!(
                recorded.iter().any(|(k, _)| k == name),
                "{name} not recorded"
            );
        }
        assert_eq!(request.headers()["x-rulehook-event"], "e-1");
        assert_eq!(request.headers()["webhook-timestamp"], "7");
    }

    #[test]
    fn a_header_value_that_cannot_be_sent_refuses_the_request_by_name() {
        // A secret from the environment may hold a control byte, which no
        // header can carry: nothing is sent, and the reason names it.
        let webhook = webhook_of(
            "{url: \"https://a.example/\", headers: {X-Api-Key: {env: KEY}}}",
            |_| Ok("two\u{7f}parts".to_string()),
        );
        let (request, recorded) = build_request(&webhook, "d-1", [], 0, Bytes::from_static(b"{}"));
        let why = request.expect_err("a control byte in a header value is refused");
        assert!(why.contains("`X-Api-Key`"), "{why}");
        assert!(
            !why.contains("two"),
            "the value stays out of the reason: {why}"
        );
        assert!(
            recorded.iter().any(|(k, v)| k == "X-Api-Key" && v == "***"),
            "{recorded:?}"
        );
    }

    #[test]
    fn endpoints_are_origins() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            endpoint_key(&u("https://ci.example.com/hooks/a?x=1")),
            "https://ci.example.com:443"
        );
        assert_eq!(
            endpoint_key(&u("http://127.0.0.1:9000/h")),
            "http://127.0.0.1:9000"
        );
    }
}
