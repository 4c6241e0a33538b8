//! The payload a matching rule starts from, before its plugins run.
//!
//! It carries the basic fields (event id and type, entity id and type, time,
//! scope, user, rule), the whole entity, and for updates the changed fields
//! with their old and new values. The chain then narrows it: the bundled
//! `select-fields` plugin runs first with the rule's `fields`, keeping only
//! the entity's id, type and the selected fields. Pure.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value, json};

use crate::event::{Change, Event};
use crate::rules::Rule;

/// The payload as JSON text: what ingest runs the chain on, and what a rule
/// with no chain sends. Serialized straight from the event; building a
/// `Value` copy of it first took six to seven times as long, every field its
/// own allocation (BENCHMARKS.md, "allocations counted per delivery").
/// `event_id` is the id the event was accepted under (the sender's, or
/// ingest's).
pub fn to_string(rule: &str, event: &Event, event_id: &str) -> String {
    // Serializing maps, strings and `Value`s cannot fail.
    serde_json::to_string(&Payload {
        rule,
        event,
        event_id,
    })
    .unwrap_or_default()
}

/// The same payload as a `Value`, for those that look into it (`rulehook
/// explain`, the rule cases); one shape, `Payload`'s, so it cannot drift
/// from what is sent.
pub fn build(rule: &str, event: &Event, event_id: &str) -> Value {
    serde_json::to_value(Payload {
        rule,
        event,
        event_id,
    })
    .unwrap_or_default()
}

/// `{field: {old, new}}`; a side that is absent is `null` (conditions on
/// `changes` see this).
pub fn changes_json(changes: &[Change]) -> Value {
    serde_json::to_value(Changes(changes)).unwrap_or_default()
}

/// The payload's fields in order, borrowed from the event: the basic fields,
/// the entity, and for updates the changes.
struct Payload<'a> {
    rule: &'a str,
    event: &'a Event,
    event_id: &'a str,
}

impl Serialize for Payload<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let event = self.event;
        let mut p = s.serialize_map(None)?;
        p.serialize_entry("event_id", self.event_id)?;
        p.serialize_entry("event_type", &event.event_type)?;
        p.serialize_entry("entity_type", &event.entity_type)?;
        if let Some(t) = &event.occurred_at {
            p.serialize_entry("occurred_at", t)?;
        }
        p.serialize_entry("rule", self.rule)?;
        p.serialize_entry("scope", &event.scope)?;
        if let Some(user) = &event.user {
            p.serialize_entry("user", user)?;
        }
        p.serialize_entry("entity", &EntityWithType(event))?;
        if event.event_type == "update" {
            p.serialize_entry("changes", &Changes(&event.changes))?;
        }
        p.end()
    }
}

/// The entity with `id` and `type` first, so receivers find them at once;
/// `type` is the entity's own, else the event's `entity_type`.
struct EntityWithType<'a>(&'a Event);

impl Serialize for EntityWithType<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let event = self.0;
        let mut e = s.serialize_map(None)?;
        if let Some(id) = event.entity.get("id") {
            e.serialize_entry("id", id)?;
        }
        match event.entity.get("type") {
            Some(t) => e.serialize_entry("type", t)?,
            None => e.serialize_entry("type", &event.entity_type)?,
        }
        for (k, v) in &event.entity {
            if k != "id" && k != "type" {
                e.serialize_entry(k, v)?;
            }
        }
        e.end()
    }
}

/// The changes, field by field in the event's order (each field once: they
/// are the keys of the entity and of its `before`).
struct Changes<'a>(&'a [Change]);

impl Serialize for Changes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for c in self.0 {
            m.serialize_entry(&c.field, &OldNew(c))?;
        }
        m.end()
    }
}

/// `{old, new}`, an absent side `null` (as `None` serializes).
struct OldNew<'a>(&'a Change);

impl Serialize for OldNew<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("old", &self.0.old)?;
        m.serialize_entry("new", &self.0.new)?;
        m.end()
    }
}

/// The configuration the select-fields plugin gets for a rule.
pub fn select_fields_config(rule: &Rule) -> Value {
    let labels: Map<String, Value> = rule
        .labels
        .iter()
        .map(|(l, n)| (l.clone(), Value::String(n.clone())))
        .collect();
    json!({"fields": rule.fields, "labels": labels})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text sent, key order included (the rule cases compare `build`'s
    /// `Value`, whose equality ignores order): id and type first in the
    /// entity, `type` from `entity_type` when the entity has none, the
    /// optional parts only when present, changes with an absent side as
    /// `null`, escapes and 64-bit integers as they came.
    #[test]
    fn the_payload_text_has_its_fields_in_order() {
        let cases = [
            (
                r#"{"event_type":"create","entity_type":"story","scope":{"workspace_id":1002},"entity":{"name":"A story","id":"s1"}}"#,
                r#"{"event_id":"evt_1","event_type":"create","entity_type":"story","rule":"r","scope":{"workspace_id":1002},"entity":{"id":"s1","type":"story","name":"A story"}}"#,
            ),
            (
                r#"{"event_type":"delete","entity_type":"task","occurred_at":"2026-12-04T10:00:00Z","user":{"id":7},"scope":{"stream":"main"},"entity":{"big":18446744073709551615,"type":"t","neg":-9223372036854775808,"id":"x"}}"#,
                r#"{"event_id":"evt_1","event_type":"delete","entity_type":"task","occurred_at":"2026-12-04T10:00:00Z","rule":"r","scope":{"stream":"main"},"user":{"id":7},"entity":{"id":"x","type":"t","big":18446744073709551615,"neg":-9223372036854775808}}"#,
            ),
            (
                r#"{"event_type":"update","entity_type":"defect","scope":{},"entity":{"id":9,"severity":"high","note":"\"q\"\n"},"before":{"id":9,"severity":"low","gone":{"x":1}}}"#,
                r#"{"event_id":"evt_1","event_type":"update","entity_type":"defect","rule":"r","scope":{},"entity":{"id":9,"type":"defect","severity":"high","note":"\"q\"\n"},"changes":{"severity":{"old":"low","new":"high"},"note":{"old":null,"new":"\"q\"\n"},"gone":{"old":{"x":1},"new":null}}}"#,
            ),
        ];
        for (event, want) in cases {
            let event = Event::from_json(event).expect(event);
            assert_eq!(to_string("r", &event, "evt_1"), want);
            // The `Value` is that payload too.
            assert_eq!(build("r", &event, "evt_1").to_string(), want);
        }
    }
}
