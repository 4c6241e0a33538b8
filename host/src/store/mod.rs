//! The storage contract: what the rest of rulehook may ask of durable
//! state, in the domain's words (accept an event with its deliveries,
//! record an attempt, park and unpark, list), and the two stores that keep
//! it: `redb` (embedded, the default: one binary, one file) and `postgres`
//! (cluster mode: many stateless nodes on one database). Ingest, the
//! dispatcher, the API and the CLI hold a `Store` and never know which.
//!
//! The one invariant every backend keeps: **`apply` returns only once its
//! whole batch is durable** (redb: fsynced; postgres: COMMIT acknowledged,
//! which with synchronous replication means flushed on a standby), and on
//! error nothing of the batch is stored. Writes come in batches so the
//! outbox can give many events and attempts one commit: that is what makes
//! durable ingest fast. Reads never block writes.
//!
//! In cluster mode several nodes send from one store, so a node *claims*
//! the deliveries it sends (`Claim`): a claim is a lease with a fencing
//! epoch, and a result recorded under an epoch that is no longer the
//! delivery's is refused (`Done::Rejected`). The embedded store has one
//! node and ignores claims.

pub mod postgres;
pub mod records;
pub mod redb;
pub mod schema;

use std::path::Path;

pub use self::redb::{Redb, RedbOptions};
pub use records::*;
pub use schema::{DeliveryKey, EventKey};

/// A storage failure; the message names the database and the operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: String,
        source: ::redb::DatabaseError,
    },
    #[error(
        "database {path} has schema version {found}, newer than this rulehook ({known}); upgrade rulehook"
    )]
    TooNew {
        path: String,
        found: u64,
        known: u64,
    },
    #[error("storage error during {op}: {message}")]
    Io { op: &'static str, message: String },
    /// The database cannot be reached (postgres mode): nothing was stored,
    /// and trying again later may work.
    #[error("the database is unreachable during {op}: {message}")]
    Unavailable { op: &'static str, message: String },
    /// The transaction lost a race with another one (postgres: a
    /// deadlock or serialization failure) and stored nothing; running it
    /// again may work. Not a failure of the storage.
    #[error(
        "the database rolled back a transaction that conflicted with another during {op}: {message}"
    )]
    Conflict { op: &'static str, message: String },
    #[error("no delivery {0}")]
    NoDelivery(DeliveryId),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

fn io<E: std::fmt::Display>(op: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Io {
        op,
        message: e.to_string(),
    }
}

/// A node's hold on a delivery it is about to send (cluster mode). Made
/// when the node accepts the delivery or claims it from the due index; it
/// lasts the configured lease from `at` and is renewed while the delivery
/// is queued or in flight. Recording the attempt names `epoch`: if another
/// node claimed the delivery since (the lease ran out), the record is
/// refused and the other node's stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    /// When the claim was made (ms since the epoch, this node's clock).
    pub at: u64,
}

/// A new event and the deliveries built for it, to be accepted atomically.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub id: String,
    pub deliveries: Vec<NewDelivery>,
}

#[derive(Clone, Debug)]
pub struct NewDelivery {
    pub id: DeliveryId,
    pub rule: String,
    /// `Pending` to send, or `Skipped` / `Failed` when a plugin decided so.
    pub state: State,
    pub reason: Option<String>,
    /// The final body, or for `unbuilt` the chain's input (see `Delivery`).
    /// Shared with the dispatcher's hand-over, so it is not copied.
    pub body: bytes::Bytes,
    pub unbuilt: bool,
    /// For WebSocket rules: the shared space whose clients get it.
    pub space: Option<String>,
    /// The rule version it is bound to (stored with `PutRuleVersions`).
    pub rule_version: Option<String>,
    /// The ordered lane it joins (a rule with `ordering`): the store makes
    /// it the lane's head (pending) or puts it behind the head (waiting).
    pub lane: Option<NewLane>,
}

/// The lane a new delivery joins.
#[derive(Clone, Debug)]
pub struct NewLane {
    /// `rule/key` (see `rules::lane_id`).
    pub key: String,
    /// `on_failure: halt`.
    pub halt: bool,
}

/// A redelivery's body: the stored one, or the outcome of running an
/// unbuilt delivery's plugin chain again.
#[derive(Clone, Debug, PartialEq)]
pub enum Rebuilt {
    Same,
    Body(Vec<u8>),
    Skipped(String),
    Failed(String),
}

/// What happens to a delivery after an attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    Succeeded,
    /// Retries exhausted, or a permanent error.
    Failed(String),
    Retry {
        at: u64,
    },
    /// The endpoint is blocked or disabled; wait there without using up attempts.
    Park {
        endpoint: String,
        reason: String,
    },
}

/// One write in a batch.
// `Finish` carries its attempt record inline: ops are built once, moved
// into a batch and consumed, so boxing would only add an allocation per
// attempt on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Op {
    Accept(NewEvent),
    /// Record an attempt (if any: parking before sending records none) and move on.
    Finish {
        id: DeliveryId,
        attempt: Option<Attempt>,
        next: Next,
        /// The claim it was sent under (cluster mode): if the delivery was
        /// claimed again since, nothing is recorded and the op is
        /// `Rejected`. `None` records unconditionally (embedded store).
        epoch: Option<u64>,
    },
    PutEndpoint(Endpoint),
    /// Move up to `limit` deliveries parked on `endpoint` back to due now.
    Unpark {
        endpoint: String,
        limit: usize,
    },
    /// Give up a halted lane's head (it becomes `failed`, its record kept)
    /// and send the next delivery of the lane. Resuming a halted lane is
    /// `Unpark` of its park key (`lane_park_key`).
    SkipLane {
        lane: String,
    },
    /// Send again now, keeping the id (and so the receivers' dedupe key).
    /// A delivery of an ordered lane joins the lane's end: it is sent when
    /// the deliveries ahead of it are final.
    Redeliver {
        id: DeliveryId,
        /// For an unbuilt delivery, what running its chain again gave.
        body: Rebuilt,
        /// Bind it to this rule version instead of the one it has: an
        /// admin's explicit "send it with the rule as it is now".
        rebind: Option<String>,
    },
    /// Store rule versions (version → JSON `TargetSpec`) not stored yet
    /// (one already there is left as it is: equal versions, equal specs),
    /// and record which run: every stored version not in `running` is
    /// retired from `at` on (if it was not already), every one in it is not.
    PutRuleVersions {
        add: Vec<(String, Vec<u8>)>,
        running: Vec<String>,
        at: u64,
    },
    /// Delete these retired rule versions (the caller checked that no
    /// pending or parked delivery is bound to them); one that runs again
    /// since is kept.
    DropRuleVersions(Vec<String>),
    /// Remove events accepted before `before_ms` whose deliveries are
    /// final, looking at up to `limit` events after `after` (where the
    /// previous call stopped), so events kept for a pending delivery never
    /// stop later ones from going.
    Compact {
        before_ms: u64,
        after: Option<EventKey>,
        limit: usize,
    },
}

/// The result of one `Op`, in the order of the batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Done {
    /// `duplicate`: the event id was accepted before; these are its deliveries.
    /// `claim`: the accepting node holds the new pending deliveries under
    /// it (cluster mode), so it may send them at once.
    /// `waiting`: the new deliveries that went behind their lane's head
    /// (not to be sent now).
    Accepted {
        deliveries: Vec<DeliveryId>,
        duplicate: bool,
        claim: Option<Claim>,
        waiting: Vec<DeliveryId>,
    },
    /// `promoted`: the delivery became final and the next one of its lane
    /// is pending now (due at once, held by no node).
    Finished {
        promoted: Option<DeliveryId>,
    },
    /// The lane's head that was given up, and the next one, now pending.
    LaneSkipped {
        head: DeliveryId,
        promoted: Option<DeliveryId>,
    },
    EndpointSaved,
    Unparked(Vec<DeliveryId>),
    Redelivered(Delivery),
    RuleVersionsSaved,
    RuleVersionsDropped(Vec<String>),
    /// How many events were removed; `resume` is where to go on from when
    /// `limit` events were looked at (more may be old enough), else `None`.
    Compacted {
        removed: usize,
        resume: Option<EventKey>,
    },
    /// This op failed on its own (e.g. unknown delivery); the rest of the batch stands.
    Rejected(String),
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A position in the due index: (due at, delivery id).
pub type DueKey = (u64, DeliveryKey);

/// A due delivery a scan found, with its body when small enough, and the
/// claim it was taken under (cluster mode).
#[derive(Debug)]
pub struct Due {
    pub delivery: Delivery,
    pub body: Option<Vec<u8>>,
    pub claim: Option<Claim>,
}

/// What one scan of the due index found.
#[derive(Debug, Default)]
pub struct DueScan {
    /// Due deliveries, oldest due first.
    pub found: Vec<Due>,
    /// The last key looked at: where the next scan may resume.
    pub resume: Option<DueKey>,
    /// The scan stopped at its limit; more may be due behind `resume`.
    pub more: bool,
    /// When the earliest delivery not yet due (after `now`) is due.
    pub next_due: Option<u64>,
}

/// Filters for listing lanes (`GET /v1/lanes`).
#[derive(Clone, Debug, Default)]
pub struct LaneFilter {
    pub rule: Option<String>,
    /// A lane state (`LaneInfo::state`): `flowing`, `retrying`, `parked`, `halted`.
    pub state: Option<String>,
}

impl LaneFilter {
    pub fn keeps(&self, lane: &LaneInfo) -> bool {
        self.rule.as_ref().is_none_or(|r| *r == lane.rule)
            && self.state.as_ref().is_none_or(|s| s == lane.state)
    }
}

/// Lanes in numbers, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaneStats {
    /// Lanes with a head (a delivery pending or held).
    pub lanes: u64,
    /// Lanes whose head is halted (waiting for an admin).
    pub halted: u64,
    /// Deliveries waiting behind a head.
    pub waiting: u64,
    /// When the oldest waiting delivery was made (ms since the epoch).
    pub oldest_waiting_at: Option<u64>,
}

/// Pending deliveries by what they are sent with, for the queue depth per
/// endpoint in `/metrics`: the host turns each group into an endpoint (a
/// rule version's URL, a WebSocket space), which the store does not know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PendingCounts {
    pub groups: Vec<(PendingGroup, u64)>,
    /// Every pending delivery was counted; `false`: only the `budget` due
    /// first were (a backlog larger than one scrape should read).
    pub complete: bool,
}

/// What a pending delivery is sent with, as far as its endpoint goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
pub struct PendingGroup {
    pub rule: String,
    /// `None` for deliveries stored before rule versions existed: they
    /// follow the running rule of their name.
    #[serde(default, rename = "rule_version")]
    pub version: Option<String>,
    #[serde(default)]
    pub space: Option<String>,
}

/// A halted ordered delivery's next: `Failed` becomes parking on its lane,
/// so the lane holds until an admin resumes or skips it. Everything else
/// is as it was.
/// `halts` is the lane of a delivery whose rule says `on_failure: halt`.
pub fn on_lane_failure(next: Next, halts: Option<&str>) -> Next {
    match (next, halts) {
        (Next::Failed(why), Some(lane)) => Next::Park {
            endpoint: lane_park_key(lane),
            reason: format!("{why}{HALTED}: resume it to send it again, or skip it"),
        },
        (next, _) => next,
    }
}

/// Filters for listing deliveries. Every filter given must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub rule: Option<String>,
    pub event: Option<String>,
    pub state: Option<State>,
    /// The endpoint it goes to (see `EndpointMatch`).
    pub endpoint: Option<EndpointMatch>,
    /// The HTTP status of its last attempt.
    pub status_code: Option<StatusMatch>,
    /// Made at or after this time (ms since the epoch). Delivery ids are
    /// UUIDv7, so time bounds are bounds on the id: a range, not a filter.
    pub since_ms: Option<u64>,
    /// Made at or before this time (ms since the epoch, inclusive).
    pub until_ms: Option<u64>,
}

/// Which endpoint (`scheme://host:port`, or a WebSocket space's key) a
/// delivery goes to. Deliveries do not store their URL: one that was
/// attempted is matched by its last attempt's URL, a parked one by the
/// endpoint it waits on, a WebSocket one by its space, and one not yet
/// attempted by its rule, through `rules` (the rules of the running set
/// that send there, which the caller looks up).
#[derive(Clone, Debug, Default)]
pub struct EndpointMatch {
    pub key: String,
    pub rules: Vec<String>,
    /// The shared space, when `key` is a WebSocket space's.
    pub space: Option<String>,
}

/// An HTTP status filter: one code (`404`) or a class (`5xx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusMatch {
    Code(u16),
    /// The hundreds digit: `5` for `5xx`.
    Class(u16),
}

impl StatusMatch {
    /// `404`, or `1xx` … `5xx` (the `x`s in either case).
    pub fn parse(text: &str) -> Option<StatusMatch> {
        let t = text.trim().to_ascii_lowercase();
        if let Some(class) = t.strip_suffix("xx") {
            let c: u16 = class.parse().ok()?;
            return (1..=5).contains(&c).then_some(StatusMatch::Class(c));
        }
        let code: u16 = t.parse().ok()?;
        (100..=599)
            .contains(&code)
            .then_some(StatusMatch::Code(code))
    }

    pub fn matches(self, status: Option<u16>) -> bool {
        match (self, status) {
            (StatusMatch::Code(c), Some(s)) => c == s,
            (StatusMatch::Class(c), Some(s)) => s / 100 == c,
            (_, None) => false,
        }
    }
}

impl Filter {
    fn keeps(&self, d: &Delivery) -> bool {
        self.rule.as_ref().is_none_or(|r| *r == d.rule)
            && self.event.as_ref().is_none_or(|e| *e == d.event_id)
            && self.state.is_none_or(|s| s == d.state)
            && self.status_code.is_none_or(|m| m.matches(d.last_status))
            && self.since_ms.is_none_or(|t| d.id.created_ms() >= t)
            && self.until_ms.is_none_or(|t| d.id.created_ms() <= t)
    }

    /// Whether `d` passes every filter, its last attempt (for the endpoint
    /// filter) given when it has one. For checking deliveries one at a
    /// time, such as the live tail's.
    pub fn matches(&self, d: &Delivery, last_attempt: Option<&Attempt>) -> bool {
        self.keeps(d)
            && self
                .endpoint
                .as_ref()
                .is_none_or(|ep| ep.matches(d, last_attempt))
    }

    /// Whether checking a candidate takes more than its index entry: then
    /// candidates from an index not ordered by id are collected up to the
    /// scan budget instead of up to the page size.
    fn post_filters(&self) -> bool {
        self.endpoint.is_some() || self.status_code.is_some()
    }

    /// The id range the time bounds allow, intersected with `below` (an
    /// exclusive cursor).
    fn id_range(&self, below: Option<DeliveryId>) -> (u128, u128) {
        let lower = self.since_ms.map_or(0, |t| u128::from(t) << 80);
        let mut upper = below.map_or(u128::MAX, |b| b.0.saturating_sub(1));
        if let Some(t) = self.until_ms {
            let end = (u128::from(t) + 1) << 80;
            upper = upper.min(end.saturating_sub(1));
        }
        (lower, upper)
    }
}

impl EndpointMatch {
    pub fn matches(&self, d: &Delivery, last_attempt: Option<&Attempt>) -> bool {
        if d.parked_on.as_deref() == Some(self.key.as_str()) {
            return true;
        }
        if let Some(space) = &d.space {
            return self.space.as_deref() == Some(space.as_str());
        }
        match last_attempt {
            Some(a) => url_endpoint(&a.url).as_deref() == Some(self.key.as_str()),
            None => self.rules.contains(&d.rule),
        }
    }
}

/// `scheme://host:port` of a URL, the way the dispatcher keys endpoints
/// (`deliver::endpoint_key`; the store does not import the dispatcher, and
/// a test keeps the two equal).
pub fn url_endpoint(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    Some(format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str().unwrap_or_default(),
        u.port_or_known_default().unwrap_or(0)
    ))
}

/// A page of deliveries, newest first, and where the next one starts.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub deliveries: Vec<Delivery>,
    /// Pass as `before` for the next page; `None` once nothing older can
    /// match. Set also when the scan budget ran out before the page filled,
    /// so a rare filter answers quickly and paging goes on from there.
    pub next_before: Option<DeliveryId>,
    /// Records looked at for this page.
    pub scanned: usize,
}

/// Deliveries by state, for the console's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StateCounts {
    pub pending: u64,
    pub parked: u64,
    pub waiting: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub skipped: u64,
}

/// A slice of a store's contents (see `Backend::export`).
#[derive(Clone, Debug, Default)]
pub struct Export {
    /// (event key, record), oldest first.
    pub events: Vec<(EventKey, EventRecord)>,
    /// Every delivery of those events, with its body and attempts.
    pub deliveries: Vec<(Delivery, Vec<u8>, Vec<Attempt>)>,
    /// Where the next slice starts (`after`); `None` at the end.
    pub next: Option<EventKey>,
}

/// A rulehook node as the cluster sees it (`GET /v1/cluster`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NodeInfo {
    pub id: String,
    /// rulehook's version.
    pub version: String,
    /// Digest of the rule set it runs (see `reload::Snapshot::digest`).
    pub rules_digest: String,
    /// Where its API listens, as it says.
    pub addr: String,
    pub started_at: u64,
    pub heartbeat_at: u64,
    /// WebSocket shared spaces with a client connected to this node.
    pub spaces: Vec<String>,
}

/// What every store does. `apply` is the only write; see the module docs
/// for its durability promise. Methods take `&self` and block: async
/// callers run them with `spawn_blocking` (the outbox has its own thread).
pub trait Backend: Send + Sync {
    /// Which store this is, for logs and `/v1/cluster`: `redb` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Panics naming the first broken invariant of the stored state (every
    /// delivery indexed exactly as its state says, no orphan rows). For the
    /// lifecycle suite, after every step.
    #[cfg(test)]
    fn check_invariants(&self);

    /// Applies a batch in one transaction with one durable commit. Either
    /// every op's effect is stored, or (on a storage error) none is.
    fn apply(&self, ops: Vec<Op>) -> Result<Vec<Done>, StoreError>;

    /// Whether a write would work now, found by one that needs what a
    /// batch needs (the embedded store: room on the disk and a file that
    /// takes a commit; postgres: a write on the primary, replicated as
    /// configured). Nothing of it is visible.
    fn probe(&self) -> Result<(), StoreError>;

    /// Called by the writer after its last batch: makes what was written
    /// durable without anything to apply again at the next start (the
    /// embedded store checkpoints its commit log). Writes after it still
    /// work.
    fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// How many batches may be applied at once (the outbox runs this many
    /// writers). The embedded store takes one writer at a time.
    fn writers(&self) -> usize {
        1
    }

    fn delivery(&self, id: DeliveryId) -> Result<Option<Delivery>, StoreError>;
    fn body(&self, id: DeliveryId) -> Result<Option<Vec<u8>>, StoreError>;
    fn attempts(&self, id: DeliveryId) -> Result<Vec<Attempt>, StoreError>;
    fn event(&self, id: &str) -> Result<Option<EventRecord>, StoreError>;

    /// Up to `limit` pending deliveries due at `now`, oldest due first,
    /// skipping those `busy` says are taken (queued or in flight here).
    /// `after` resumes behind the key an earlier scan stopped at, so a
    /// backlog is walked once instead of from its start on every scan.
    /// Bodies up to `body_cap` bytes come along. In cluster mode each found
    /// delivery is claimed for this node (`Due::claim`), and deliveries
    /// another node holds under a live lease are not found.
    fn due(
        &self,
        after: Option<DueKey>,
        now: u64,
        limit: usize,
        busy: &dyn Fn(DeliveryId) -> bool,
        body_cap: usize,
    ) -> Result<DueScan, StoreError>;

    /// Extends this node's claims on `ids` (queued or in flight) by a lease
    /// from now. No-op for the embedded store.
    fn renew(&self, _ids: &[DeliveryId]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Gives up this node's claims (deliveries it dropped from memory or
    /// will not send, such as at a stop) so another node may take them at
    /// once rather than when the lease runs out. No-op for the embedded store.
    fn release(&self, _claims: &[(DeliveryId, u64)]) -> Result<(), StoreError> {
        Ok(())
    }

    /// Wakes `wake` whenever another node made work due that this one may
    /// take (cluster mode: `LISTEN`). No-op for the embedded store.
    fn watch(&self, _wake: std::sync::Arc<tokio::sync::Notify>) {}

    /// Whether a client of WebSocket space `space` is connected to another
    /// live node (cluster mode), so a delivery for it should go there
    /// rather than wait parked here. The embedded store has one node.
    fn space_elsewhere(&self, _space: &str) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Records this node as alive and returns every node seen recently
    /// (itself included). The embedded store has only this node.
    fn heartbeat(&self, me: &NodeInfo) -> Result<Vec<NodeInfo>, StoreError> {
        Ok(vec![me.clone()])
    }

    /// Up to `limit` lanes after `after` (a lane id), in lane id order,
    /// that pass `filter`, looking at no more than `budget` lanes.
    fn lanes(
        &self,
        filter: &LaneFilter,
        after: Option<&str>,
        limit: usize,
        budget: usize,
    ) -> Result<Vec<LaneInfo>, StoreError>;

    /// One lane, if it has a head.
    fn lane(&self, lane: &str) -> Result<Option<LaneInfo>, StoreError>;

    /// Lanes in numbers (for `/metrics`).
    fn lane_stats(&self) -> Result<LaneStats, StoreError>;

    /// Pending and parked deliveries: the backlog.
    fn backlog(&self) -> Result<(u64, u64), StoreError>;
    /// Pending deliveries grouped by rule version and space, looking at no
    /// more than `budget` of them (those due first).
    fn pending_groups(&self, budget: usize) -> Result<PendingCounts, StoreError>;
    fn endpoints(&self) -> Result<Vec<Endpoint>, StoreError>;
    /// Deliveries parked on `endpoint`.
    fn parked_count(&self, endpoint: &str) -> Result<u64, StoreError>;
    /// Parked deliveries per endpoint, for the endpoints whose key starts
    /// with `prefix` (such as every WebSocket space). For the admin API,
    /// not the delivery path.
    fn parked_by_prefix(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError>;

    /// A page of deliveries newest first: up to `limit` that pass every
    /// filter, strictly older than `before`, looking at no more than
    /// `budget` records; `Page::next_before` goes on from there.
    fn page(
        &self,
        filter: &Filter,
        before: Option<DeliveryId>,
        limit: usize,
        budget: usize,
    ) -> Result<Page, StoreError>;

    /// Deliveries by state; `exact` is false when a count reached `cap`
    /// and stopped there.
    fn counts(&self, cap: u64) -> Result<(StateCounts, bool), StoreError>;

    /// The newest deliveries made at or after `since_ms`, up to `limit`,
    /// each with its last attempt (the console's traffic charts).
    fn recent(
        &self,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(Delivery, Option<Attempt>)>, StoreError>;

    /// The last attempt of each delivery (`None` for one not attempted).
    fn last_attempts(&self, list: &[Delivery]) -> Result<Vec<Option<Attempt>>, StoreError>;

    /// Every stored rule version and its JSON `TargetSpec`.
    fn rule_versions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Retired rule versions that may be deleted: retired before
    /// `before_ms` and bound to no pending or parked delivery.
    fn unused_rule_versions(&self, before_ms: u64) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` events accepted after `after` (an event key; `None`
    /// from the first), oldest first, each with its deliveries, bodies and
    /// attempts: what `rulehook store copy` moves. Stores that cannot be
    /// copied from say so.
    fn export(&self, _after: Option<EventKey>, _limit: usize) -> Result<Export, StoreError> {
        Err(StoreError::Io {
            op: "export",
            message: format!("copying out of a {} store is not supported", self.kind()),
        })
    }

    /// Stores exported records as they are, leaving any already there
    /// (same event id or delivery id) untouched, so a copy run twice
    /// changes nothing the second time. Returns the deliveries added.
    fn import(&self, _part: Export) -> Result<usize, StoreError> {
        Err(StoreError::Io {
            op: "import",
            message: format!("copying into a {} store is not supported", self.kind()),
        })
    }

    /// Deliveries newest first, filtered, `limit` at a time; `before` pages.
    fn list(
        &self,
        filter: &Filter,
        before: Option<DeliveryId>,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        Ok(self.page(filter, before, limit, usize::MAX)?.deliveries)
    }

    /// A delivery's last attempt, if it has one.
    fn last_attempt(&self, d: &Delivery) -> Result<Option<Attempt>, StoreError> {
        Ok(self.last_attempts(std::slice::from_ref(d))?.pop().flatten())
    }
}

/// The store the host holds: one of the backends, behind the contract,
/// and whether its writes work (see [`Store::apply`]).
pub struct Store {
    backend: Box<dyn Backend>,
    health: Health,
}

/// Whether the last write worked, and if not, why and since when. Kept
/// because a store whose writes fail (a full disk, an unreachable
/// database) must be visible (`/healthz` answers 503) and must hold the
/// dispatcher back: an attempt whose record cannot be written would be sent
/// again and again.
#[derive(Default)]
struct Health {
    failing: std::sync::atomic::AtomicBool,
    why: std::sync::Mutex<Option<Failing>>,
}

/// Why writes fail, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failing {
    pub error: String,
    /// The first failure of this run of failures (ms since the epoch).
    pub since_ms: u64,
}

impl StoreError {
    /// Whether the error says the storage itself failed (a write or the
    /// connection), rather than something about one record.
    pub fn is_storage_failure(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Unavailable { .. })
    }
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        self.backend.as_ref()
    }
}

impl Store {
    pub fn new(backend: impl Backend + 'static) -> Store {
        Store {
            backend: Box::new(backend),
            health: Health::default(),
        }
    }

    /// The contract's `apply` (this shadows [`Backend::apply`]), noting
    /// whether the write worked: a storage failure makes the store
    /// [`failing`](Store::failing) until a later write or
    /// [`probe`](Store::probe) works.
    pub fn apply(&self, ops: Vec<Op>) -> Result<Vec<Done>, StoreError> {
        let r = self.backend.apply(ops);
        self.note(r.as_ref().map(|_| ()));
        r
    }

    /// Tries a write that needs what a real one needs (room on the disk, a
    /// writable database) and notes the result; the dispatcher calls it
    /// while the store is failing, to notice when it is back.
    pub fn probe(&self) -> Result<(), StoreError> {
        let r = self.backend.probe();
        self.note(r.as_ref().map(|_| ()));
        r
    }

    /// Whether the last write (or probe) failed.
    pub fn is_failing(&self) -> bool {
        self.health
            .failing
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Why writes fail, while they do.
    pub fn failing(&self) -> Option<Failing> {
        if !self.is_failing() {
            return None;
        }
        self.health
            .why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note(&self, r: Result<(), &StoreError>) {
        use std::sync::atomic::Ordering;
        match r {
            Ok(()) => {
                if self.health.failing.swap(false, Ordering::AcqRel) {
                    let was = self
                        .health
                        .why
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    let ms = was.map(|f| now_ms().saturating_sub(f.since_ms));
                    tracing::warn!(failing_ms = ms, "store writes work again");
                }
            }
            Err(e) if e.is_storage_failure() => {
                let mut why = self.health.why.lock().unwrap_or_else(|e| e.into_inner());
                let since_ms = match &*why {
                    Some(f) if self.is_failing() => f.since_ms,
                    _ => {
                        tracing::error!(error = %e, "store writes fail: ingest answers 503 and no attempt starts until they work again");
                        now_ms()
                    }
                };
                *why = Some(Failing {
                    error: e.to_string(),
                    since_ms,
                });
                self.health.failing.store(true, Ordering::Release);
            }
            Err(_) => {}
        }
    }

    /// Opens (or creates) an embedded database file. `cache_bytes` bounds
    /// redb's page cache, which is most of rulehook's memory with a large
    /// backlog.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        Store::open_with(
            path,
            RedbOptions {
                cache_bytes,
                ..RedbOptions::default()
            },
        )
    }

    /// `open` with every option (see `RedbOptions`).
    pub fn open_with(path: &Path, options: RedbOptions) -> Result<Store, StoreError> {
        Ok(Store::new(Redb::open_with(path, options)?))
    }
}

/// Where an attempt leaves a delivery: the part of its record `Finish`
/// changes besides the attempt count and status. Both stores apply it, so
/// they agree on every transition.
#[derive(Debug, PartialEq)]
struct Step {
    state: State,
    next_attempt_at: Option<u64>,
    parked_on: Option<String>,
    reason: Option<String>,
}

impl Step {
    fn after(attempt: Option<&Attempt>, next: Next) -> Step {
        let (state, next_attempt_at, parked_on, reason) = match next {
            Next::Succeeded => (State::Succeeded, None, None, None),
            Next::Failed(why) => (State::Failed, None, None, Some(why)),
            Next::Retry { at } => (
                State::Pending,
                Some(at),
                None,
                attempt.and_then(|a| a.error.clone()),
            ),
            Next::Park { endpoint, reason } => (State::Parked, None, Some(endpoint), Some(reason)),
        };
        Step {
            state,
            next_attempt_at,
            parked_on,
            reason,
        }
    }
}

/// What a halted head's reason says after its error (a skip keeps the error).
const HALTED: &str = "; its lane is halted";

/// What a refusal for a lane without a head starts with (the API answers
/// 404 for it).
pub const NO_LANE: &str = "no lane";

/// The refusal for a lane without a head.
fn no_lane(lane: &str) -> String {
    format!("{NO_LANE} {lane}: it has no delivery pending or held")
}

/// What a refusal to redeliver a waiting delivery says (the API answers
/// 409 for it).
pub const WAITS_IN_LANE: &str = "waits in lane";

/// Why a waiting delivery cannot be redelivered.
fn waits_in_lane(d: &Delivery) -> String {
    let lane = d.lane.as_ref().map_or("", |l| l.key.as_str());
    format!(
        "delivery {} {WAITS_IN_LANE} {lane} and is sent when those ahead of it are final; to move the lane on, resume or skip its head",
        d.id
    )
}

/// Whether `head` (the head of `lane`) may be skipped: only a halted one,
/// so a skip never races an attempt in flight.
fn skippable(head: &Delivery, lane: &str) -> Result<(), String> {
    let halted = head.state == State::Parked
        && head.parked_on.as_deref() == Some(lane_park_key(lane).as_str());
    if halted {
        return Ok(());
    }
    Err(format!(
        "lane {lane} is not halted: its head {} is {} ({}); only a halted lane can be skipped",
        head.id,
        head.state.as_str(),
        LaneInfo::state_of(head)
    ))
}

/// A halted head given up by an admin: failed, its reason kept.
fn skipped_head(mut d: Delivery, now: u64) -> Delivery {
    d.state = State::Failed;
    d.parked_on = None;
    d.next_attempt_at = None;
    d.updated_at = now;
    let why = d.reason.take().unwrap_or_default();
    let why = why.split(HALTED).next().unwrap_or_default().to_string();
    d.reason = Some(format!("skipped by an admin after: {why}"));
    d
}

/// A delivery after `Redeliver`, and the body to store when running its
/// chain again built one.
fn redelivered(
    old: Delivery,
    body: Rebuilt,
    rebind: Option<String>,
    now: u64,
) -> (Delivery, Option<Vec<u8>>) {
    let mut d = old;
    if let Some(version) = rebind {
        d.rule_version = Some(version);
    }
    d.parked_on = None;
    d.next_attempt_at = None;
    d.updated_at = now;
    let mut new_body = None;
    match body {
        Rebuilt::Same => {}
        Rebuilt::Body(bytes) => {
            new_body = Some(bytes);
            d.unbuilt = false;
        }
        Rebuilt::Skipped(why) => {
            d.state = State::Skipped;
            d.reason = Some(why);
            d.unbuilt = false;
            return (d, None);
        }
        Rebuilt::Failed(why) => {
            d.state = State::Failed;
            d.reason = Some(why);
            return (d, None);
        }
    }
    d.state = State::Pending;
    d.next_attempt_at = Some(now);
    d.reason = Some("redelivery requested".into());
    (d, new_body)
}

#[cfg(test)]
mod tests;
