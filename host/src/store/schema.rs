//! Every table of both stores, in one place: the redb tables (keys chosen
//! so the scans we need are range scans) and the PostgreSQL migrations.

use redb::TableDefinition;

/// Delivery ids are UUIDv7 as `u128`: unique, and ordered by creation time,
/// which makes retention a scan from the start of the table.
pub type DeliveryKey = u128;

/// Event keys are ordered by acceptance time (UUIDv7: milliseconds since
/// the epoch in the top 48 bits), so retention is a scan from the start.
pub type EventKey = u128;
/// event key → event record (JSON): the sender's event id, when it was
/// accepted and its deliveries. The event itself is not kept: each
/// delivery's body is what was built from it, and storing both doubled the
/// bytes written per event.
pub const EVENTS: TableDefinition<'_, EventKey, &[u8]> = TableDefinition::new("events_by_time");
/// sender's event id → event key: the idempotency index. Small entries
/// keep it small: ids from a time-ordered scheme append at its end, and
/// random ones (UUIDv4) land each on its own page, so its size is what
/// those page writes and cache misses cost.
pub const EVENT_IDS: TableDefinition<'_, &str, EventKey> = TableDefinition::new("event_ids");
/// delivery id → delivery record (JSON), without the body.
pub const DELIVERIES: TableDefinition<'_, DeliveryKey, &[u8]> = TableDefinition::new("deliveries");
/// delivery id → the payload bytes, fixed once built.
pub const BODIES: TableDefinition<'_, DeliveryKey, &[u8]> = TableDefinition::new("bodies");
/// (due time in ms since the epoch, delivery id): pending deliveries by when
/// they are due. A delivery is in `DUE` or `PARKED` exactly while pending.
pub const DUE: TableDefinition<'_, (u64, DeliveryKey), ()> = TableDefinition::new("due");
/// (endpoint, delivery id): deliveries waiting for a blocked or disabled endpoint.
pub const PARKED: TableDefinition<'_, (&str, DeliveryKey), ()> = TableDefinition::new("parked");
/// (delivery id, attempt number from 1) → attempt record (JSON).
pub const ATTEMPTS: TableDefinition<'_, (DeliveryKey, u32), &[u8]> =
    TableDefinition::new("attempts");
/// Listing index: (rule name, delivery id). Listing by event reads the
/// event record's delivery ids instead of a second index.
pub const BY_RULE: TableDefinition<'_, (&str, DeliveryKey), ()> = TableDefinition::new("by_rule");
/// Listing index for final states only: (state, delivery id). Pending and
/// parked deliveries are listed from `DUE` and `PARKED`, which hold exactly
/// them, so a delivery's first attempt costs no index churn here.
pub const BY_STATE: TableDefinition<'_, (&str, DeliveryKey), ()> = TableDefinition::new("by_state");
/// Version 1 tables, read once by the migration and then deleted: events
/// keyed by the sender's id, an age index, and a by-event index.
pub const EVENTS_V1: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("events");
pub const EVENT_TIMES_V1: TableDefinition<'_, (u64, &str), ()> =
    TableDefinition::new("event_times");
pub const BY_EVENT_V1: TableDefinition<'_, (&str, DeliveryKey), ()> =
    TableDefinition::new("by_event");
/// endpoint (scheme://host:port) → endpoint state (JSON): failures, blocks, 410.
pub const ENDPOINTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("endpoints");
/// rule version (16 hex digits) → what it sends with (JSON `TargetSpec`,
/// secrets as references): every delivery names the version that matched
/// it, so it can be sent as accepted after the rule changed or went.
pub const RULE_VERSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("rule_versions");
/// rule version → when it stopped running (ms since the epoch). A version
/// retired longer than the retention period, and bound to no pending or
/// parked delivery, is deleted: every final delivery made under it has been
/// compacted by then.
pub const RULE_VERSIONS_RETIRED: TableDefinition<'_, &str, u64> =
    TableDefinition::new("rule_versions_retired");
/// ordered lane (`rule/key`) → lane record (JSON `LaneRecord`): its head
/// (the one delivery of the lane that is pending or parked) and the next
/// sequence number. A lane is here exactly while it has a head.
pub const LANES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("lanes");
/// (lane, sequence number) → delivery id: the deliveries waiting behind a
/// lane's head, in acceptance order. A delivery is here exactly while it is
/// `waiting`.
pub const LANE_WAIT: TableDefinition<'_, (&str, u64), DeliveryKey> =
    TableDefinition::new("lane_wait");
/// Small settings such as the schema version.
pub const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// Bumped when the layout changes; a newer file is refused, an older one
/// is migrated when it is opened (see `migrate` in `mod.rs`).
pub const SCHEMA_VERSION: u64 = 3;

/// The PostgreSQL schema, one entry per version: a database at version
/// `n` has run the first `n` entries (`rulehook_schema` holds `n`). Add a
/// new entry for a change; never edit one that was released. A database
/// of a newer version is refused, as a newer redb file is.
///
/// Deliveries keep their body in the row (large ones are TOASTed by
/// PostgreSQL) and their claim: `owner`, `lease_until` (ms since the
/// epoch) and `epoch`, bumped by every claim. Partial indexes hold exactly
/// the pending (due order) and parked (per endpoint) deliveries, as `DUE`
/// and `PARKED` do in the embedded store. JSON records (attempts,
/// endpoints) are `json`, readable with any PostgreSQL tool.
pub const POSTGRES_MIGRATIONS: &[&str] = &["
CREATE TABLE events (
    key uuid PRIMARY KEY,
    id text NOT NULL UNIQUE,
    accepted_at bigint NOT NULL
);
CREATE TABLE deliveries (
    id uuid PRIMARY KEY,
    event_id text NOT NULL,
    rule text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at bigint,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    parked_on text,
    reason text,
    last_status integer,
    unbuilt boolean NOT NULL DEFAULT false,
    space text,
    rule_version text,
    body bytea NOT NULL,
    owner text,
    lease_until bigint,
    epoch bigint NOT NULL DEFAULT 0
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX deliveries_parked ON deliveries (parked_on, id) WHERE state = 'parked';
CREATE INDEX deliveries_rule ON deliveries (rule, id);
CREATE INDEX deliveries_final ON deliveries (state, id) WHERE state IN ('succeeded', 'failed', 'skipped');
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE TABLE attempts (
    delivery uuid NOT NULL,
    number integer NOT NULL,
    record json NOT NULL,
    PRIMARY KEY (delivery, number)
);
CREATE TABLE endpoints (
    endpoint text PRIMARY KEY,
    record json NOT NULL
);
CREATE TABLE rule_versions (
    version text PRIMARY KEY,
    spec bytea NOT NULL,
    retired_at bigint
);
CREATE TABLE rule_versions_running (
    node text NOT NULL,
    version text NOT NULL,
    PRIMARY KEY (node, version)
);
CREATE TABLE nodes (
    id text PRIMARY KEY,
    version text NOT NULL,
    rules_digest text NOT NULL,
    addr text NOT NULL,
    started_at bigint NOT NULL,
    heartbeat_at bigint NOT NULL,
    spaces text[] NOT NULL DEFAULT '{}'
);
", "
-- 2: ordered lanes. A delivery of a rule with `ordering` has its lane
-- (`rule/key`), its place in it and the rule's on_failure; the lane's row
-- names its head (NULL while the lane is empty) and is locked by every
-- write that joins, advances or skips the lane, which is what serializes
-- them across nodes and writers.
ALTER TABLE deliveries ADD COLUMN lane text, ADD COLUMN lane_seq bigint,
    ADD COLUMN lane_halt boolean NOT NULL DEFAULT false;
CREATE INDEX deliveries_waiting ON deliveries (lane, lane_seq) WHERE state = 'waiting';
CREATE INDEX deliveries_waiting_age ON deliveries (id) WHERE state = 'waiting';
CREATE TABLE lanes (
    key text PRIMARY KEY,
    head uuid,
    next_seq bigint NOT NULL DEFAULT 0
);
"];
