//! The records rulehook keeps, as they are stored (JSON inside redb values,
//! so an operator can read them with any tool and fields can be added).

use serde::{Deserialize, Serialize};

/// A delivery id as shown to people and receivers: `dlv_` + 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(pub u128);

impl DeliveryId {
    /// A new, time-ordered id (UUIDv7).
    pub fn new() -> Self {
        DeliveryId(uuid::Uuid::now_v7().as_u128())
    }

    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("dlv_")?;
        (hex.len() == 32).then_some(())?;
        u128::from_str_radix(hex, 16).ok().map(DeliveryId)
    }

    /// Milliseconds since the Unix epoch at which the id was made.
    pub fn created_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl Default for DeliveryId {
    fn default() -> Self {
        DeliveryId::new()
    }
}

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dlv_{:032x}", self.0)
    }
}

impl Serialize for DeliveryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeliveryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DeliveryId::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("bad delivery id `{text}`")))
    }
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its next attempt (in `DUE`).
    Pending,
    /// Waiting for its endpoint to be unblocked or re-enabled, or for an
    /// admin to resume its halted lane (in `PARKED`).
    Parked,
    /// Behind the head of its ordered lane: it becomes pending when every
    /// delivery accepted before it in the lane is final (in `LANE_WAIT`).
    Waiting,
    /// A 2xx answer was received.
    Succeeded,
    /// Every attempt failed; redeliver to try again.
    Failed,
    /// A plugin chose not to send it.
    Skipped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Parked => "parked",
            State::Waiting => "waiting",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Skipped => "skipped",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        Some(match text {
            "pending" => State::Pending,
            "parked" => State::Parked,
            "waiting" => State::Waiting,
            "succeeded" => State::Succeeded,
            "failed" => State::Failed,
            "skipped" => State::Skipped,
            _ => return None,
        })
    }

    /// Final states are kept for the retention period, then compacted.
    pub fn is_final(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Skipped)
    }
}

/// One delivery: an event, a rule, a fixed body, and its progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: DeliveryId,
    pub event_id: String,
    pub rule: String,
    pub state: State,
    /// Attempts made so far (the next one is `attempts + 1`).
    pub attempts: u32,
    /// When the next attempt is due (ms since the epoch), while pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<u64>,
    pub created_at: u64,
    pub updated_at: u64,
    /// The endpoint it is parked on, while parked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked_on: Option<String>,
    /// Why it is skipped, failed or parked (plugin message, last error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// Its plugin chain failed: the stored body is the chain's input, and a
    /// redelivery runs the chain again (with the plugins then loaded)
    /// before sending. Once built, a body never changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unbuilt: bool,
    /// For WebSocket rules: the shared space whose connected clients get
    /// it, fixed when the delivery is made (the event is not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<String>,
    /// The version of its rule that matched it (see `rules::target`): every
    /// attempt sends with that version's URL, signing, headers, credentials
    /// and retry policy, whatever the rule files say now. `None` only for
    /// deliveries stored before versions existed; those follow the rule of
    /// the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_version: Option<String>,
    /// Its place in an ordered lane, for a rule with `ordering`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Lane>,
}

/// A delivery's place in an ordered lane: the deliveries of one rule whose
/// events share a key go one at a time, by `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    /// `rule/key` (see `rules::lane_id`).
    pub key: String,
    /// Acceptance order within the lane, from 0: the order of the commits
    /// that accepted them (and within one commit, the batch's order).
    pub seq: u64,
    /// The rule said `on_failure: halt`: when this delivery fails for good
    /// it parks on the lane (`lane:` + key) instead, holding the rest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub halt: bool,
}

/// The endpoint key a halted lane's head is parked on: unparking it is
/// resuming the lane.
pub fn lane_park_key(lane: &str) -> String {
    format!("{LANE_PARK_PREFIX}{lane}")
}

/// What every halted lane's park key starts with.
pub const LANE_PARK_PREFIX: &str = "lane:";

/// What the embedded store keeps per lane (see `schema::LANES`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneRecord {
    /// The delivery sent (or held) now: pending or parked.
    pub head: DeliveryId,
    /// The sequence number the next delivery to join gets.
    pub next_seq: u64,
}

/// An ordered lane as admins see it (`GET /v1/lanes`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LaneInfo {
    /// `rule/key`.
    pub lane: String,
    pub rule: String,
    pub key: String,
    /// `flowing` (head pending, no failure yet), `retrying` (the head's
    /// last attempt failed), `parked` (its endpoint is blocked or gone, or
    /// no WebSocket client), `halted` (the head failed: resume or skip).
    pub state: &'static str,
    /// The delivery now sent or held.
    pub head: Delivery,
    /// How many wait behind it.
    pub waiting: u64,
    /// When the oldest waiting one was made (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_waiting_at: Option<u64>,
}

/// A lane id's rule and key (`rule/key`: rule names have no `/`).
pub fn split_lane(lane: &str) -> (&str, &str) {
    lane.split_once('/').unwrap_or((lane, ""))
}

impl LaneInfo {
    /// A lane from its id, its head, how many wait behind it and when the
    /// first of those was made: what both stores read.
    pub fn new(lane: String, head: Delivery, waiting: u64, oldest_waiting_at: Option<u64>) -> Self {
        let (rule, key) = split_lane(&lane);
        LaneInfo {
            rule: rule.to_string(),
            key: key.to_string(),
            state: LaneInfo::state_of(&head),
            lane,
            head,
            waiting,
            oldest_waiting_at,
        }
    }

    /// The lane's state, from its head.
    pub fn state_of(head: &Delivery) -> &'static str {
        match head.state {
            State::Parked
                if head
                    .parked_on
                    .as_deref()
                    .is_some_and(|p| p.starts_with(LANE_PARK_PREFIX)) =>
            {
                "halted"
            }
            State::Parked => "parked",
            State::Pending if head.attempts > 0 => "retrying",
            _ => "flowing",
        }
    }
}

/// One attempt to send a delivery, as sent and as answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub started_at: u64,
    pub duration_ms: u64,
    pub url: String,
    pub method: String,
    /// Request headers with secrets redacted.
    pub request_headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_phrase: Option<String>,
    #[serde(default)]
    pub response_headers: Vec<(String, String)>,
    /// The response body, cut at the configured cap (UTF-8, lossy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    #[serde(default)]
    pub response_truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What rulehook decided: "succeeded", "retry at …", "failed", "parked …".
    pub outcome: String,
}

/// An accepted event: enough to answer a resent id the same way, list its
/// deliveries and age it out. (Version 1 records also hold the event
/// itself under `event`; it is ignored.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub id: String,
    pub accepted_at: u64,
    pub deliveries: Vec<DeliveryId>,
}

/// What rulehook knows about an endpoint (scheme://host:port).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub endpoint: String,
    /// Failures (no reply, timeout, invalid HTTP) in a row.
    pub consecutive_failures: u32,
    /// How many times it was blocked in a row (the cool-down doubles each time).
    pub blocks: u32,
    /// Blocked until this time (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_until: Option<u64>,
    /// Answered 410 Gone: disabled until an admin re-enables it.
    #[serde(default)]
    pub disabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at: u64,
}
