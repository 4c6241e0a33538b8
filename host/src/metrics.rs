//! What an operator graphs and alerts on, at `/metrics`: counters, gauges
//! and histograms with the labels a page at night needs (which rule, which
//! endpoint, which plugin), rendered by `prometheus-client` in the
//! Prometheus text format.
//!
//! Labels come from rule files and URLs, which an admin (or a hostile rule
//! set) can grow without bound, so each label's values are capped
//! ([`Cap`]): the first `label_values` rules, endpoints and plugins seen
//! since start keep their own series, later ones are folded into `other`.
//!
//! The delivery path never builds a label set per attempt: a `(rule,
//! endpoint)` pair resolves once to a [`Series`] of pre-made handles (an
//! `Arc` out of a read-locked map), and each handle is an atomic (a
//! counter) or a short mutex (a histogram).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The label value that every value past a label's cap is folded into.
pub const OTHER: &str = "other";

/// The label value of deliveries that have no endpoint (their rule
/// version is gone, or it has no URL): they fail before any is chosen.
pub const NO_ENDPOINT: &str = "none";

/// Distinct values each label (rule, endpoint, plugin) keeps by default.
pub const DEFAULT_LABEL_VALUES: usize = 1_000;

/// The content type of what `render` writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the attempt latency buckets: from a keep-alive
/// POST on a local network to the 20 s reply timeout.
const ATTEMPT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 20.0,
];

/// Request → 202: mostly the shared fsync (milliseconds), plugins included.
const INGEST_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One plugin call: well under a millisecond warm, up to its deadline
/// (50 ms by default, more where a rule allows it).
const PLUGIN_BUCKETS: [f64; 11] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

type L1 = [(&'static str, Arc<str>); 1];
type L3 = [(&'static str, Arc<str>); 3];
type L4 = [(&'static str, Arc<str>); 4];

/// A bounded set of label values: the first `max` values asked for keep
/// their own, the rest read `other`. Values are never evicted, so a
/// series does not change label while the process runs.
#[derive(Debug)]
struct Cap {
    max: usize,
    admitted: RwLock<HashSet<Arc<str>>>,
    other: Arc<str>,
}

impl Cap {
    fn new(max: usize) -> Cap {
        Cap {
            max,
            admitted: RwLock::new(HashSet::new()),
            other: Arc::from(OTHER),
        }
    }

    /// The label for `value` (itself, or `other` past the cap). Allocates
    /// only the first time a value is admitted.
    fn label(&self, value: &str) -> Arc<str> {
        if let Some(v) = self
            .admitted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(value)
        {
            return v.clone();
        }
        let mut admitted = self.admitted.write().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = admitted.get(value) {
            return v.clone();
        }
        // "other" itself always means the fold, whoever names it.
        if admitted.len() >= self.max || value == OTHER {
            return self.other.clone();
        }
        let v: Arc<str> = Arc::from(value);
        admitted.insert(v.clone());
        v
    }
}

/// How a delivery ended up, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Skipped,
    Parked,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::Skipped,
        Outcome::Parked,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Parked => "parked",
        }
    }
}

/// What an attempt got back, as the `status` label says it: the HTTP
/// status class, or why there was no status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status code.
    Status(u16),
    /// The connector or the outbound policy refused it (nothing was sent).
    Refused,
    NoReply,
    Timeout,
    InvalidHttp,
    /// A WebSocket frame written to the space's clients.
    Frame,
}

impl Answer {
    const LABELS: [&'static str; 10] = [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "refused",
        "no_reply",
        "timeout",
        "invalid_http",
        "frame",
    ];

    /// The `status` label of this answer's class.
    pub fn label(self) -> &'static str {
        Answer::LABELS[self.index()]
    }

    fn index(self) -> usize {
        match self {
            Answer::Status(code) => usize::from(code / 100).clamp(1, 5) - 1,
            Answer::Refused => 5,
            Answer::NoReply => 6,
            Answer::Timeout => 7,
            Answer::InvalidHttp => 8,
            Answer::Frame => 9,
        }
    }
}

/// For logs: the status code, or why there was none (`timeout`, …).
impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Status(code) => write!(f, "{code}"),
            other => f.write_str(other.label()),
        }
    }
}

/// The families, shared by every [`Series`] that makes handles in them.
#[derive(Debug)]
struct Families {
    deliveries: Family<L3, Counter>,
    attempts: Family<L4, Counter>,
    attempt_seconds: Family<L1, Histogram>,
}

/// The handles of one `(rule, endpoint)` pair, each made on first use so
/// that a pair shows only the outcomes and status classes it has had.
#[derive(Debug)]
pub struct Series {
    rule: Arc<str>,
    endpoint: Arc<str>,
    families: Arc<Families>,
    deliveries: [OnceLock<Counter>; 4],
    /// Per [`Answer`] class, success and failure (a 2xx can fail a
    /// delivery only in theory; a 4xx is a failure).
    attempts: [[OnceLock<Counter>; 2]; Answer::LABELS.len()],
    latency: OnceLock<Histogram>,
}

impl Series {
    /// Counts a delivery that reached `outcome`.
    pub fn delivery(&self, outcome: Outcome) {
        let i = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or_default();
        self.deliveries[i]
            .get_or_init(|| {
                self.families.deliveries.get_or_create_owned(&[
                    ("rule", self.rule.clone()),
                    ("endpoint", self.endpoint.clone()),
                    ("outcome", Arc::from(outcome.label())),
                ])
            })
            .inc();
    }

    /// Counts an attempt that got `answer` after `took`, and whether it
    /// delivered.
    pub fn attempt(&self, answer: Answer, success: bool, took: Duration) {
        let class = answer.index();
        self.attempts[class][usize::from(!success)]
            .get_or_init(|| {
                self.families.attempts.get_or_create_owned(&[
                    ("rule", self.rule.clone()),
                    ("endpoint", self.endpoint.clone()),
                    (
                        "result",
                        Arc::from(if success { "success" } else { "failure" }),
                    ),
                    ("status", Arc::from(Answer::LABELS[class])),
                ])
            })
            .inc();
        self.latency
            .get_or_init(|| {
                self.families
                    .attempt_seconds
                    .get_or_create_owned(&[("endpoint", self.endpoint.clone())])
            })
            .observe(took.as_secs_f64());
    }
}

/// Series pairs kept per label cap: past `label_values` × this, new
/// pairs of admitted rules and endpoints go to `(other, other)`. A rule
/// has one URL per version, so real sets stay far below it.
const PAIRS_PER_VALUE: usize = 10;

/// What `/metrics` reads at scrape time from the parts that own it.
#[derive(Debug, Default)]
pub struct Scrape {
    pub queue_depth: u64,
    pub parked: u64,
    /// Ordered lanes: halted ones, those with a head, deliveries waiting
    /// behind a head, and the oldest one's age.
    pub lanes: crate::store::LaneStats,
    pub websocket_clients: u64,
    pub in_flight: u64,
    pub store_writable: bool,
    pub outbox_commits: u64,
    pub outbox_ops: u64,
    pub rules_loaded: u64,
    pub connections_open: u64,
    pub last_reload_ok: bool,
    pub connections_closed_room: u64,
    pub connections_closed_all_busy: u64,
    pub sign_ins_failed: u64,
    pub sign_ins_locked_out: u64,
    /// Per endpoint (HTTP origins and WebSocket spaces).
    pub endpoints: Vec<EndpointNow>,
    /// The store's pending deliveries per endpoint.
    pub pending: Pending,
}

/// Pending deliveries per endpoint key, and whether every one was counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    pub by_endpoint: Vec<(String, u64)>,
    pub complete: bool,
}

/// How often a scrape counts the store's pending deliveries per endpoint
/// (scrapes in between show the last count), and how many of them one
/// count reads at most: the store has no per-endpoint index (one would
/// cost every delivery a write), so a count walks the due index and reads
/// each record, about 1 µs each; this keeps a scrape of a backlog of
/// millions from costing seconds.
const PENDING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
pub const PENDING_BUDGET: usize = 100_000;

/// One endpoint's state at scrape time.
#[derive(Debug, Default, Clone)]
pub struct EndpointNow {
    pub endpoint: String,
    /// Blocked after repeated failures, or disabled by a 410.
    pub blocked: bool,
    pub parked: u64,
    pub consecutive_failures: u64,
}

/// Rule label → endpoint label → that pair's handles.
type SeriesByRule = HashMap<Arc<str>, HashMap<Arc<str>, Arc<Series>>>;

/// Deliveries the dispatcher holds in memory per endpoint, as of its last
/// scan: in flight, and waiting for one of the endpoint's slots.
type Held = HashMap<String, (u64, u64)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rules: Cap,
    endpoints: Cap,
    plugins: Cap,
    pair_cap: usize,
    families: Arc<Families>,
    series: RwLock<SeriesByRule>,
    pairs: std::sync::atomic::AtomicUsize,

    events: Family<L1, Counter>,
    created: Family<L1, Counter>,
    endpoint_blocks: Family<L1, Counter>,
    reloads: Family<L1, Counter>,
    claims_lost: Counter,
    ingest_seconds: Histogram,
    plugin_seconds: Family<L1, Histogram>,
    plugin_failures: Family<L1, Counter>,
    cluster_nodes: Gauge,
    cluster_rule_sets: Gauge,

    // Read at scrape time from their owners (see `Scrape`); counters kept
    // elsewhere are mirrored into counter handles so their type is right.
    queue_depth: Gauge,
    parked: Gauge,
    lanes_held: Gauge,
    lanes_active: Gauge,
    lane_waiting: Gauge,
    lane_oldest_waiting_seconds: Gauge,
    websocket_clients: Gauge,
    in_flight: Gauge,
    store_writable: Gauge,
    outbox_commits: Counter,
    outbox_ops: Counter,
    rules_loaded: Gauge,
    connections_open: Gauge,
    last_reload_ok: Gauge,
    connections_closed: Family<L1, Counter>,
    sign_ins: Family<L1, Counter>,
    endpoint_blocked: Family<L1, Gauge>,
    endpoint_parked: Family<L1, Gauge>,
    endpoint_failures: Family<L1, Gauge>,
    endpoint_in_flight: Family<L1, Gauge>,
    endpoint_waiting: Family<L1, Gauge>,
    endpoint_pending: Family<L1, Gauge>,
    pending_complete: Gauge,
    held: Mutex<Held>,
    /// The store's pending deliveries per endpoint, as last counted (see
    /// `PENDING_EVERY`).
    pending: Mutex<Option<(std::time::Instant, Pending)>>,
    /// The outbox's batch sizes, kept by the outbox (which starts after
    /// the metrics) and bound here once it runs.
    commit_ops: Arc<OnceLock<Histogram>>,
    /// One scrape at a time: the per-endpoint gauges are cleared and
    /// refilled, and two scrapes interleaving would each see half.
    scraping: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(DEFAULT_LABEL_VALUES)
    }
}

impl Metrics {
    /// `label_values` caps each label's distinct values.
    pub fn new(label_values: usize) -> Metrics {
        let families = Arc::new(Families {
            deliveries: Family::default(),
            attempts: Family::default(),
            attempt_seconds: Family::new_with_constructor(|| Histogram::new(ATTEMPT_BUCKETS)),
        });
        let mut m = Metrics {
            registry: Registry::with_prefix("rulehook"),
            rules: Cap::new(label_values),
            endpoints: Cap::new(label_values),
            plugins: Cap::new(label_values),
            pair_cap: label_values.saturating_mul(PAIRS_PER_VALUE).max(1),
            families: families.clone(),
            series: RwLock::new(HashMap::new()),
            pairs: Default::default(),
            events: Family::default(),
            created: Family::default(),
            endpoint_blocks: Family::default(),
            reloads: Family::default(),
            claims_lost: Counter::default(),
            ingest_seconds: Histogram::new(INGEST_BUCKETS),
            plugin_seconds: Family::new_with_constructor(|| Histogram::new(PLUGIN_BUCKETS)),
            plugin_failures: Family::default(),
            cluster_nodes: Gauge::default(),
            cluster_rule_sets: Gauge::default(),
            queue_depth: Gauge::default(),
            parked: Gauge::default(),
            lanes_held: Gauge::default(),
            lanes_active: Gauge::default(),
            lane_waiting: Gauge::default(),
            lane_oldest_waiting_seconds: Gauge::default(),
            websocket_clients: Gauge::default(),
            in_flight: Gauge::default(),
            store_writable: Gauge::default(),
            outbox_commits: Counter::default(),
            outbox_ops: Counter::default(),
            rules_loaded: Gauge::default(),
            connections_open: Gauge::default(),
            last_reload_ok: Gauge::default(),
            connections_closed: Family::default(),
            sign_ins: Family::default(),
            endpoint_blocked: Family::default(),
            endpoint_parked: Family::default(),
            endpoint_failures: Family::default(),
            endpoint_in_flight: Family::default(),
            endpoint_waiting: Family::default(),
            endpoint_pending: Family::default(),
            pending_complete: Gauge::default(),
            held: Mutex::new(HashMap::new()),
            pending: Mutex::new(None),
            commit_ops: Arc::new(OnceLock::new()),
            scraping: Mutex::new(()),
        };
        // Known label values start at 0, so a rate or an alert on them
        // works before their first event (a failed reload above all).
        for result in ["accepted", "duplicate", "rejected"] {
            drop(m.events.get_or_create(&[("result", Arc::from(result))]));
        }
        for outcome in ["ok", "failed"] {
            drop(m.reloads.get_or_create(&[("outcome", Arc::from(outcome))]));
        }
        let r = &mut m.registry;
        r.register(
            "events",
            "Events posted to ingest, by result (accepted, duplicate, rejected)",
            m.events.clone(),
        );
        r.register(
            "deliveries_created",
            "Deliveries built from accepted events and handed to the dispatcher, by rule",
            m.created.clone(),
        );
        r.register(
            "deliveries",
            "Deliveries that reached an outcome (succeeded, failed, skipped by a plugin, parked), by rule and endpoint",
            families.deliveries.clone(),
        );
        r.register(
            "attempts",
            "Delivery attempts by rule, endpoint, result and status (HTTP status class, or refused, no_reply, timeout, invalid_http, frame)",
            families.attempts.clone(),
        );
        r.register(
            "attempt_duration_seconds",
            "Time from sending a request to its complete answer, by endpoint",
            families.attempt_seconds.clone(),
        );
        r.register(
            "endpoint_blocks",
            "Times an endpoint was blocked after repeated failures",
            m.endpoint_blocks.clone(),
        );
        r.register(
            "rule_reloads",
            "Rule reloads, by outcome (ok, failed)",
            m.reloads.clone(),
        );
        r.register(
            "ingest_duration_seconds",
            "Time from a POST /v1/events request (its headers read) to its 202: the body, matching, plugins and the durable commit",
            m.ingest_seconds.clone(),
        );
        r.register_collector(Box::new(Bound(m.commit_ops.clone())));
        r.register(
            "plugin_call_duration_seconds",
            "Time of one plugin call, by plugin",
            m.plugin_seconds.clone(),
        );
        r.register(
            "plugin_failures",
            "Plugin calls that failed (trap, timeout, memory, error), by plugin",
            m.plugin_failures.clone(),
        );
        r.register(
            "claims_lost",
            "Attempts whose result was refused because another node took the delivery over after this node's lease ran out (cluster mode)",
            m.claims_lost.clone(),
        );
        r.register(
            "cluster_nodes",
            "Nodes with a recent heartbeat (cluster mode)",
            m.cluster_nodes.clone(),
        );
        r.register(
            "cluster_rule_sets",
            "Different rule sets among live nodes; above 1 the nodes disagree (cluster mode)",
            m.cluster_rule_sets.clone(),
        );
        r.register(
            "queue_depth",
            "Deliveries waiting for an attempt (pending), in the store",
            m.queue_depth.clone(),
        );
        r.register(
            "parked_deliveries",
            "Deliveries waiting for a blocked or disabled endpoint, or for a WebSocket client",
            m.parked.clone(),
        );
        r.register(
            "lanes_held",
            "Ordered lanes whose head failed and that wait for an admin (halted: resume or skip them)",
            m.lanes_held.clone(),
        );
        r.register(
            "lanes_active",
            "Ordered lanes with a delivery pending or held",
            m.lanes_active.clone(),
        );
        r.register(
            "lane_waiting_deliveries",
            "Deliveries waiting behind the head of their ordered lane",
            m.lane_waiting.clone(),
        );
        r.register(
            "lane_oldest_waiting_seconds",
            "Age of the oldest delivery waiting behind the head of its ordered lane (0 when none waits)",
            m.lane_oldest_waiting_seconds.clone(),
        );
        r.register(
            "websocket_clients",
            "Clients connected to the WebSocket channel, over all shared spaces",
            m.websocket_clients.clone(),
        );
        r.register(
            "deliveries_in_flight",
            "Deliveries queued in memory or being attempted",
            m.in_flight.clone(),
        );
        r.register(
            "store_writable",
            "1 while the store takes writes, 0 while they fail (a full disk, an unreachable database); /healthz then answers 503",
            m.store_writable.clone(),
        );
        r.register(
            "outbox_commits",
            "Durable commits made by the outbox",
            m.outbox_commits.clone(),
        );
        r.register(
            "outbox_ops",
            "Store operations committed by the outbox",
            m.outbox_ops.clone(),
        );
        r.register(
            "rules_loaded",
            "Rules in the running set",
            m.rules_loaded.clone(),
        );
        r.register(
            "connections_open",
            "Client connections open, counted against server.max_connections",
            m.connections_open.clone(),
        );
        r.register(
            "rules_last_reload_ok",
            "1 when the last rule/plugin load succeeded, 0 when it failed and the previous set kept running",
            m.last_reload_ok.clone(),
        );
        r.register(
            "connections_closed",
            "Client connections closed by the connection cap: to make room for a new one (room), or new ones because every slot was serving a request (all_busy)",
            m.connections_closed.clone(),
        );
        r.register(
            "sign_ins",
            "Sign-ins (channel and console) that failed, or were refused because their address failed too often",
            m.sign_ins.clone(),
        );
        r.register(
            "endpoint_blocked",
            "1 while an endpoint is blocked after repeated failures or disabled by a 410 Gone",
            m.endpoint_blocked.clone(),
        );
        r.register(
            "endpoint_parked",
            "Deliveries parked on a blocked or disabled endpoint, or waiting for a WebSocket space's client",
            m.endpoint_parked.clone(),
        );
        r.register(
            "endpoint_consecutive_failures",
            "Failures in a row (no reply, timeout, invalid HTTP) of an endpoint; it is blocked at protection.failures",
            m.endpoint_failures.clone(),
        );
        r.register(
            "endpoint_in_flight",
            "Attempts in flight to an endpoint, as of the dispatcher's last scan",
            m.endpoint_in_flight.clone(),
        );
        r.register(
            "endpoint_waiting",
            "Deliveries held in memory waiting for one of the endpoint's concurrency slots, as of the dispatcher's last scan",
            m.endpoint_waiting.clone(),
        );
        r.register(
            "endpoint_pending",
            "Deliveries pending in the store for an endpoint (due now or waiting for a retry), counted at most every 10 s and up to 100,000 of them, the earliest due first (see pending_by_endpoint_complete)",
            m.endpoint_pending.clone(),
        );
        r.register(
            "pending_by_endpoint_complete",
            "1 when endpoint_pending counted every pending delivery, 0 when the backlog was larger than one count reads",
            m.pending_complete.clone(),
        );
        m
    }

    /// The handles of `rule` sending to `endpoint` (an `endpoint_key`, a
    /// WebSocket space's key, or [`NO_ENDPOINT`]).
    pub fn series(&self, rule: &str, endpoint: &str) -> Arc<Series> {
        if let Some(s) = self.cached(rule, endpoint) {
            return s;
        }
        let (mut r, mut e) = (self.rules.label(rule), self.endpoints.label(endpoint));
        if let Some(s) = self.cached(&r, &e) {
            return s;
        }
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = series.get(&r).and_then(|m| m.get(&e)) {
            return s.clone();
        }
        if self.pairs.load(std::sync::atomic::Ordering::Relaxed) >= self.pair_cap {
            (r, e) = (self.rules.other.clone(), self.endpoints.other.clone());
            if let Some(s) = series.get(&r).and_then(|m| m.get(&e)) {
                return s.clone();
            }
        }
        let s = Arc::new(Series {
            rule: r.clone(),
            endpoint: e.clone(),
            families: self.families.clone(),
            deliveries: Default::default(),
            attempts: Default::default(),
            latency: OnceLock::new(),
        });
        series.entry(r).or_default().insert(e, s.clone());
        self.pairs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s
    }

    fn cached(&self, rule: &str, endpoint: &str) -> Option<Arc<Series>> {
        self.series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(rule)
            .and_then(|m| m.get(endpoint))
            .cloned()
    }

    pub fn event_accepted(&self) {
        self.event("accepted");
    }

    pub fn event_duplicate(&self) {
        self.event("duplicate");
    }

    pub fn event_rejected(&self) {
        self.event("rejected");
    }

    fn event(&self, result: &'static str) {
        self.events
            .get_or_create(&[("result", Arc::from(result))])
            .inc();
    }

    /// A delivery of `rule` handed to the dispatcher.
    pub fn delivery_created(&self, rule: &str) {
        self.created
            .get_or_create(&[("rule", self.rules.label(rule))])
            .inc();
    }

    pub fn endpoint_blocked(&self, endpoint: &str) {
        self.endpoint_blocks
            .get_or_create(&[("endpoint", self.endpoints.label(endpoint))])
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&[("outcome", Arc::from(if ok { "ok" } else { "failed" }))])
            .inc();
    }

    pub fn claim_lost(&self) {
        self.claims_lost.inc();
    }

    /// Request → 202 of one `POST /v1/events`.
    pub fn ingested(&self, took: Duration) {
        self.ingest_seconds.observe(took.as_secs_f64());
    }

    /// One call of `plugin`, and whether it failed (a skip is no failure).
    pub fn plugin_call(&self, plugin: &str, took: Duration, failed: bool) {
        let label = [("plugin", self.plugins.label(plugin))];
        self.plugin_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if failed {
            self.plugin_failures.get_or_create(&label).inc();
        }
    }

    /// Cluster mode's heartbeat: live nodes and distinct rule sets.
    pub fn cluster(&self, nodes: u64, rule_sets: u64) {
        self.cluster_nodes.set(nodes as i64);
        self.cluster_rule_sets.set(rule_sets as i64);
    }

    /// The dispatcher's in-memory view per endpoint (in flight, waiting),
    /// published at each scan: cheap for it, and `/metrics` never waits on
    /// the dispatcher's loop.
    pub fn dispatcher_held<'a>(
        &self,
        in_flight: impl Iterator<Item = (&'a String, usize)>,
        waiting: impl Iterator<Item = (&'a String, usize)>,
    ) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for v in held.values_mut() {
            *v = (0, 0);
        }
        // Scans come every 20 ms through a backlog: a known endpoint costs
        // a lookup, not a copy of its key.
        let mut set = |ep: &String, f: &mut dyn FnMut(&mut (u64, u64))| match held.get_mut(ep) {
            Some(v) => f(v),
            None => f(held.entry(ep.clone()).or_default()),
        };
        for (ep, n) in in_flight {
            set(ep, &mut |v| v.0 = n as u64);
        }
        for (ep, n) in waiting {
            set(ep, &mut |v| v.1 = n as u64);
        }
        held.retain(|_, v| *v != (0, 0));
    }

    /// The last count of the store's pending deliveries per endpoint.
    fn last_pending(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, Pending)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shows the outbox's batch-size histogram (`OutboxStats::batch_ops`).
    pub fn bind_commit_ops(&self, h: Histogram) {
        let _ = self.commit_ops.set(h);
    }

    /// The exposition, with the scrape-time values of `now`.
    pub fn render(&self, now: &Scrape) -> String {
        let _one = self.scraping.lock().unwrap_or_else(|e| e.into_inner());
        self.queue_depth.set(now.queue_depth as i64);
        self.parked.set(now.parked as i64);
        self.lanes_held.set(now.lanes.halted as i64);
        self.lanes_active.set(now.lanes.lanes as i64);
        self.lane_waiting.set(now.lanes.waiting as i64);
        let oldest = now
            .lanes
            .oldest_waiting_at
            .map_or(0, |at| crate::store::now_ms().saturating_sub(at) / 1000);
        self.lane_oldest_waiting_seconds.set(oldest as i64);
        self.websocket_clients.set(now.websocket_clients as i64);
        self.in_flight.set(now.in_flight as i64);
        self.store_writable.set(i64::from(now.store_writable));
        mirror(&self.outbox_commits, now.outbox_commits);
        mirror(&self.outbox_ops, now.outbox_ops);
        self.rules_loaded.set(now.rules_loaded as i64);
        self.connections_open.set(now.connections_open as i64);
        self.last_reload_ok.set(i64::from(now.last_reload_ok));
        for (reason, v) in [
            ("room", now.connections_closed_room),
            ("all_busy", now.connections_closed_all_busy),
        ] {
            mirror(
                &self
                    .connections_closed
                    .get_or_create(&[("reason", Arc::from(reason))]),
                v,
            );
        }
        for (result, v) in [
            ("failed", now.sign_ins_failed),
            ("locked_out", now.sign_ins_locked_out),
        ] {
            mirror(
                &self
                    .sign_ins
                    .get_or_create(&[("result", Arc::from(result))]),
                v,
            );
        }
        // Per endpoint: refilled from scratch, so an endpoint that went
        // away (or unblocked) leaves no stale series; folded ones add up.
        let gauges = [
            &self.endpoint_blocked,
            &self.endpoint_parked,
            &self.endpoint_failures,
            &self.endpoint_in_flight,
            &self.endpoint_waiting,
            &self.endpoint_pending,
        ];
        for g in gauges {
            g.clear();
        }
        for (ep, n) in &now.pending.by_endpoint {
            let label = [("endpoint", self.endpoints.label(ep))];
            self.endpoint_pending
                .get_or_create(&label)
                .inc_by(*n as i64);
        }
        self.pending_complete.set(i64::from(now.pending.complete));
        for ep in &now.endpoints {
            let label = [("endpoint", self.endpoints.label(&ep.endpoint))];
            self.endpoint_blocked
                .get_or_create(&label)
                .inc_by(i64::from(ep.blocked));
            self.endpoint_parked
                .get_or_create(&label)
                .inc_by(ep.parked as i64);
            self.endpoint_failures
                .get_or_create(&label)
                .inc_by(ep.consecutive_failures as i64);
        }
        let held: Vec<(String, (u64, u64))> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (ep, (in_flight, waiting)) in held {
            let label = [("endpoint", self.endpoints.label(&ep))];
            self.endpoint_in_flight
                .get_or_create(&label)
                .inc_by(in_flight as i64);
            self.endpoint_waiting
                .get_or_create(&label)
                .inc_by(waiting as i64);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// What the delivery side holds at scrape time: the store's backlog, the
/// endpoints' states and what is parked on the blocked ones. The store is
/// read off the reactor; parked deliveries are counted only for endpoints
/// that can hold them (blocked, disabled, WebSocket spaces), so a scrape
/// walks the parked index once at most.
pub async fn scrape(shared: &crate::deliver::Shared) -> Scrape {
    let now_ms = crate::store::now_ms();
    let mut endpoints: Vec<EndpointNow> = shared
        .endpoints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .map(|ep| EndpointNow {
            endpoint: ep.endpoint.clone(),
            blocked: ep.disabled || ep.blocked_until.is_some_and(|t| t > now_ms),
            parked: 0,
            consecutive_failures: u64::from(ep.consecutive_failures),
        })
        .collect();
    let store = shared.store.clone();
    // Whether this scrape counts again; it takes the turn at once, so two
    // scrapes at the same moment do not both walk the store.
    let recount = {
        let mut last = shared.metrics.last_pending();
        let stale = last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= PENDING_EVERY);
        if stale {
            let shown = last.take().map(|(_, p)| p).unwrap_or_default();
            *last = Some((std::time::Instant::now(), shown));
        }
        stale
    };
    let (backlog, lanes, endpoints, groups) = tokio::task::spawn_blocking(move || {
        let groups = recount
            .then(|| store.pending_groups(PENDING_BUDGET).ok())
            .flatten();
        let backlog = store.backlog().unwrap_or((0, 0));
        let lanes = store.lane_stats().unwrap_or_default();
        for ep in endpoints.iter_mut().filter(|ep| ep.blocked) {
            ep.parked = store.parked_count(&ep.endpoint).unwrap_or(0);
        }
        for (key, parked) in store
            .parked_by_prefix(crate::deliver::channel::ENDPOINT_PREFIX)
            .unwrap_or_default()
        {
            endpoints.push(EndpointNow {
                endpoint: key,
                blocked: false,
                parked,
                consecutive_failures: 0,
            });
        }
        (backlog, lanes, endpoints, groups)
    })
    .await
    .unwrap_or_default();
    let pending = {
        let mut last = shared.metrics.last_pending();
        if let Some(groups) = groups {
            *last = Some((
                std::time::Instant::now(),
                pending_by_endpoint(shared, groups),
            ));
        }
        last.as_ref().map(|(_, p)| p.clone()).unwrap_or_default()
    };
    Scrape {
        queue_depth: backlog.0,
        parked: backlog.1,
        lanes,
        websocket_clients: shared.channel.spaces().iter().map(|(_, n)| *n as u64).sum(),
        in_flight: shared
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len() as u64,
        store_writable: !shared.store.is_failing(),
        outbox_commits: shared
            .outbox
            .stats
            .commits
            .load(std::sync::atomic::Ordering::Relaxed),
        outbox_ops: shared
            .outbox
            .stats
            .ops
            .load(std::sync::atomic::Ordering::Relaxed),
        endpoints,
        pending,
        ..Scrape::default()
    }
}

/// The store's pending groups as endpoints: a space's key, else the URL of
/// the rule version the deliveries are bound to (or of the running rule,
/// for those stored before versions). A version this server cannot read
/// counts under `NO_ENDPOINT`, as its attempts do.
fn pending_by_endpoint(
    shared: &crate::deliver::Shared,
    counts: crate::store::PendingCounts,
) -> Pending {
    let rules = shared.rules.load();
    let mut by: HashMap<String, u64> = HashMap::new();
    for (g, n) in counts.groups {
        let endpoint = match (&g.space, &g.version) {
            (Some(space), _) => Some(crate::deliver::channel::endpoint(space)),
            (None, Some(v)) => shared
                .targets
                .get(&crate::rules::target::RuleVersion(v.clone()))
                .and_then(|t| t.endpoint()),
            (None, None) => rules.targets.get(&g.rule).and_then(|t| t.endpoint()),
        };
        *by.entry(endpoint.unwrap_or_else(|| NO_ENDPOINT.to_string()))
            .or_default() += n;
    }
    let mut by_endpoint: Vec<(String, u64)> = by.into_iter().collect();
    by_endpoint.sort();
    Pending {
        by_endpoint,
        complete: counts.complete,
    }
}

/// Sets a counter handle to a count kept elsewhere (the connection cap's,
/// the outbox's): those only grow, so the handle stays a counter.
fn mirror(c: &Counter, v: u64) {
    c.inner().store(v, std::sync::atomic::Ordering::Relaxed);
}

/// A histogram made elsewhere, shown once bound (`bind_commit_ops`).
#[derive(Debug)]
struct Bound(Arc<OnceLock<Histogram>>);

impl prometheus_client::collector::Collector for Bound {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let Some(h) = self.0.get() else {
            return Ok(());
        };
        let metric = encoder.encode_descriptor(
            "outbox_batch_ops",
            "Store operations per durable commit (the group commit's batch size)",
            None,
            h.metric_type(),
        )?;
        h.encode(metric)
    }
}

/// The histogram of the outbox's batch sizes: 1 to 16,384 operations.
pub fn commit_ops_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 2.0, 15,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` with an independent parser and returns the samples of
    /// `name` as (labels, value).
    fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        scrape
            .samples
            .into_iter()
            .filter(|s| s.metric == name)
            .map(|s| {
                let v = match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    other => panic!("{name}: {other:?}"),
                };
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                (labels, v)
            })
            .collect()
    }

    #[test]
    fn renders_labelled_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.event_accepted();
        m.event_accepted();
        let s = m.series("r1", "https://a.example:443");
        s.attempt(Answer::Status(204), true, Duration::from_millis(4));
        s.delivery(Outcome::Succeeded);
        m.series("r1", "https://b.example:443").attempt(
            Answer::Timeout,
            false,
            Duration::from_secs(2),
        );
        let text = m.render(&Scrape {
            queue_depth: 7,
            store_writable: true,
            ..Default::default()
        });
        assert!(
            text.contains("rulehook_events_total{result=\"accepted\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE rulehook_events_total counter\n"),
            "{text}"
        );
        assert!(text.contains("rulehook_queue_depth 7\n"), "{text}");
        assert!(text.contains("rulehook_store_writable 1\n"), "{text}");
        let attempts = samples(&text, "rulehook_attempts_total");
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        let ok = attempts
            .iter()
            .find(|(l, _)| l["endpoint"] == "https://a.example:443")
            .unwrap();
        assert_eq!(ok.0["status"], "2xx");
        assert_eq!(ok.0["result"], "success");
        assert_eq!(ok.0["rule"], "r1");
        assert!(
            text.contains(
                "rulehook_attempt_duration_seconds_bucket{endpoint=\"https://a.example:443\",le=\"0.005\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn label_values_past_the_cap_fold_into_other() {
        let m = Metrics::new(3);
        for i in 0..10 {
            m.series(
                &format!("rule-{i}"),
                &format!("http://127.0.0.1:{}", 9000 + i),
            )
            .attempt(Answer::NoReply, false, Duration::from_millis(1));
        }
        let text = m.render(&Scrape::default());
        let attempts = samples(&text, "rulehook_attempts_total");
        let endpoints: HashSet<&str> = attempts
            .iter()
            .map(|(l, _)| l["endpoint"].as_str())
            .collect();
        let rules: HashSet<&str> = attempts.iter().map(|(l, _)| l["rule"].as_str()).collect();
        assert_eq!(endpoints.len(), 4, "{endpoints:?}");
        assert!(endpoints.contains(OTHER));
        assert_eq!(rules.len(), 4, "{rules:?}");
        let total: f64 = attempts.iter().map(|(_, v)| v).sum();
        assert_eq!(total, 10.0, "every attempt is counted, folded or not");
        // The same handles come back for a folded pair: no new series.
        assert!(Arc::ptr_eq(
            &m.series("rule-9", "http://127.0.0.1:9009"),
            &m.series("rule-8", "http://127.0.0.1:9008")
        ));
    }

    /// Every metric family, each with at least one sample.
    fn every_family() -> String {
        let m = Metrics::default();
        m.bind_commit_ops(commit_ops_histogram());
        let s = m.series("r", "http://a:1");
        s.attempt(Answer::Status(200), true, Duration::from_millis(1));
        s.delivery(Outcome::Succeeded);
        m.delivery_created("r");
        m.endpoint_blocked("http://a:1");
        m.claim_lost();
        m.ingested(Duration::from_millis(1));
        m.plugin_call("p", Duration::from_micros(5), true);
        m.cluster(1, 1);
        m.dispatcher_held(
            [(&"http://a:1".to_string(), 1)].into_iter(),
            std::iter::empty(),
        );
        m.render(&Scrape {
            endpoints: vec![EndpointNow {
                endpoint: "http://a:1".into(),
                ..Default::default()
            }],
            pending: Pending {
                by_endpoint: vec![("http://a:1".into(), 3)],
                complete: true,
            },
            ..Default::default()
        })
    }

    #[test]
    fn the_dashboard_and_the_readme_name_only_metrics_that_exist() {
        let text = every_family();
        let families: HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dashboard = include_str!("../../docs/grafana/rulehook.json");
        serde_json::from_str::<serde_json::Value>(dashboard).expect("the dashboard is JSON");
        // The README's section on metrics (other sections name tables too).
        let readme = include_str!("../../README.md");
        let readme = readme
            .split("### Observability")
            .nth(1)
            .and_then(|rest| rest.split("\n### ").next())
            .expect("README has an Observability section");
        for (what, doc) in [("dashboard", dashboard), ("README", readme)] {
            let names = doc
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("rulehook_") && w.len() > "rulehook_".len());
            for name in names {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|base| families.contains(base))
                    .unwrap_or(name);
                assert!(
                    families.contains(family),
                    "the {what} names {name}, which /metrics does not have"
                );
            }
        }
    }

    #[test]
    fn scrape_time_endpoint_gauges_are_refilled() {
        let m = Metrics::new(1);
        let ep = |name: &str, blocked| EndpointNow {
            endpoint: name.into(),
            blocked,
            parked: 5,
            consecutive_failures: 2,
        };
        let text = m.render(&Scrape {
            endpoints: vec![
                ep("http://a:1", true),
                ep("http://b:1", true),
                ep("http://c:1", false),
            ],
            ..Default::default()
        });
        let blocked = samples(&text, "rulehook_endpoint_blocked");
        let value = |n: &str| {
            blocked
                .iter()
                .find(|(l, _)| l["endpoint"] == n)
                .map(|(_, v)| *v)
        };
        assert_eq!(value("http://a:1"), Some(1.0));
        assert_eq!(value(OTHER), Some(1.0), "{text}");
        let parked = samples(&text, "rulehook_endpoint_parked");
        assert_eq!(parked.iter().map(|(_, v)| v).sum::<f64>(), 15.0);
        let text = m.render(&Scrape::default());
        assert!(
            samples(&text, "rulehook_endpoint_blocked").is_empty(),
            "{text}"
        );
    }
}
