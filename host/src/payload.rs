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

/// Builds the chain input for the rule named `rule` and `event`; `event_id`
/// is the id the event was accepted under (the sender's, or ingest's).
pub fn build(rule: &str, event: &Event, event_id: &str) -> Value {
    let mut p = Map::new();
    p.insert("event_id".into(), Value::String(event_id.to_string()));
    p.insert("event_type".into(), Value::String(event.event_type.clone()));
    p.insert(
        "entity_type".into(),
        Value::String(event.entity_type.clone()),
    );
    if let Some(t) = &event.occurred_at {
        p.insert("occurred_at".into(), Value::String(t.clone()));
    }
    p.insert("rule".into(), Value::String(rule.to_string()));
    p.insert("scope".into(), Value::Object(event.scope.clone()));
    if let Some(user) = &event.user {
        p.insert("user".into(), Value::Object(user.clone()));
    }
    p.insert("entity".into(), Value::Object(entity_with_type(event)));
    if event.event_type == "update" {
        p.insert("changes".into(), changes_json(&event.changes));
    }
    Value::Object(p)
}

/// `build`'s payload as JSON text, serialized straight from the event: the
/// same text as `build(..).to_string()`, without first copying every field
/// of the event into a new `Value` (six to seven times as long, each field
/// its own allocation: BENCHMARKS.md, "allocations counted per delivery").
/// Ingest runs the chain on this, and a rule with no chain sends it as is.
pub fn to_string(rule: &str, event: &Event, event_id: &str) -> String {
    let payload = Payload {
        rule,
        event,
        event_id,
    };
    // Serializing maps, strings and `Value`s cannot fail.
    serde_json::to_string(&payload).unwrap_or_default()
}

/// `build`'s fields in `build`'s order, borrowed from the event.
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

/// `entity_with_type`, borrowed.
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

/// `changes_json`, borrowed. Its fields are distinct (each is a key of the
/// entity or of its `before`), so no later one replaces an earlier one as
/// in the map `changes_json` collects.
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

/// The entity with `id` and `type` first, so receivers find them at once.
fn entity_with_type(event: &Event) -> Map<String, Value> {
    let mut e = Map::new();
    if let Some(id) = event.entity.get("id") {
        e.insert("id".into(), id.clone());
    }
    e.insert(
        "type".into(),
        event
            .entity
            .get("type")
            .cloned()
            .unwrap_or_else(|| Value::String(event.entity_type.clone())),
    );
    for (k, v) in &event.entity {
        if k != "id" && k != "type" {
            e.insert(k.clone(), v.clone());
        }
    }
    e
}

/// `{field: {old, new}}`; a side that is absent is `null`.
pub fn changes_json(changes: &[Change]) -> Value {
    Value::Object(
        changes
            .iter()
            .map(|c| {
                (
                    c.field.clone(),
                    json!({"old": c.old.clone().unwrap_or(Value::Null), "new": c.new.clone().unwrap_or(Value::Null)}),
                )
            })
            .collect(),
    )
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

    /// `to_string` is `build` serialized, byte for byte, on events with and
    /// without each optional part: time, user, an entity `type` of its
    /// own, changes with an absent side, nesting, escapes, numbers.
    #[test]
    fn the_payload_serialized_from_the_event_is_the_built_one() {
        let events = [
            r#"{"event_type":"create","entity_type":"story","scope":{"workspace_id":1002},"entity":{"id":"s1","name":"A story"}}"#,
            r#"{"event_type":"create","entity_type":"story","occurred_at":"2026-12-04T10:00:00Z","scope":{"workspace_id":1002,"sharedspace_id":"ss"},"user":{"id":7,"name":"Ann"},"entity":{"name":"first","id":"s2","type":"user_story","phase":{"id":"p","n":[1,2.5,-3,null,true]}}}"#,
            r#"{"event_type":"update","entity_type":"defect","scope":{},"entity":{"id":9,"severity":"high","owner":"bo","note":"\"quoted\"\n\u00e9\u2028"},"before":{"id":9,"severity":"low","gone":{"x":1},"owner":"bo"}}"#,
            r#"{"event_type":"delete","entity_type":"task","scope":{"stream":"main"},"entity":{"type":"t","id":"x","big":18446744073709551615,"neg":-9223372036854775808,"f":1e300}}"#,
            r#"{"event_type":"deliver","entity_type":"build","scope":{"w":1},"user":{},"entity":{"id":"b"}}"#,
        ];
        for text in events {
            let event = Event::from_json(text).expect(text);
            for (rule, id) in [("r", "evt_1"), ("a \"rule\" é", "")] {
                let built = build(rule, &event, id);
                assert_eq!(to_string(rule, &event, id), built.to_string(), "{text}");
                // And what a rule without a chain sent before.
                assert_eq!(
                    to_string(rule, &event, id).into_bytes(),
                    serde_json::to_vec(&built).unwrap(),
                    "{text}"
                );
            }
        }
    }
}
