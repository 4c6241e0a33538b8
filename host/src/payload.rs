//! The payload a matching rule starts from, before its plugins run.
//!
//! It carries the basic fields (event id and type, entity id and type, time,
//! scope, user, rule), the whole entity, and for updates the changed fields
//! with their old and new values. The chain then narrows it: the bundled
//! `select-fields` plugin runs first with the rule's `fields`, keeping only
//! the entity's id, type and the selected fields. Pure.

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
