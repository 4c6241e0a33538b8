//! Every redb table of rulehook, in one place. See `docs` in `mod.rs` for
//! what each holds; keys are chosen so the scans we need are range scans.

use redb::TableDefinition;

/// Delivery ids are UUIDv7 as `u128`: unique, and ordered by creation time,
/// which makes retention a scan from the start of the table.
pub type DeliveryKey = u128;

/// event id → event record (JSON): the event as accepted and its deliveries.
pub const EVENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("events");
/// (accepted at ms, event id): events by age, for retention.
pub const EVENT_TIMES: TableDefinition<'_, (u64, &str), ()> = TableDefinition::new("event_times");
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
/// Listing indexes: (rule name | event id | state, delivery id).
pub const BY_RULE: TableDefinition<'_, (&str, DeliveryKey), ()> = TableDefinition::new("by_rule");
pub const BY_EVENT: TableDefinition<'_, (&str, DeliveryKey), ()> = TableDefinition::new("by_event");
pub const BY_STATE: TableDefinition<'_, (&str, DeliveryKey), ()> = TableDefinition::new("by_state");
/// endpoint (scheme://host:port) → endpoint state (JSON): failures, blocks, 410.
pub const ENDPOINTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("endpoints");
/// Small settings such as the schema version.
pub const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// Bumped when the layout changes incompatibly; a newer file is refused.
pub const SCHEMA_VERSION: u64 = 1;
