//! The entity event as systems send it, and the changes an update carries.
//!
//! Parsing is strict and names the field at fault, because the sender is a
//! program whose author reads our 400 answers: `entity.id: missing; every
//! entity needs an id`. Parsing does no I/O and never invents data: an event
//! without an `id` keeps `None` here, and ingest gives it one.

use serde_json::{Map, Value};

/// Upper bound on caller-chosen ids, which end up in keys and headers.
pub const MAX_ID_LEN: usize = 200;

/// An event in the form the rule engine reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The sender's id; the same id twice is the same event (idempotent ingest).
    pub id: Option<String>,
    /// `create`, `update`, `delete`, or a domain event such as `deliver`.
    pub event_type: String,
    pub entity_type: String,
    /// Where the entity lives (`sharedspace_id`, `workspace_id`, `stream`…).
    pub scope: Map<String, Value>,
    pub user: Option<Map<String, Value>>,
    /// RFC 3339 time the change happened, as the sender wrote it.
    pub occurred_at: Option<String>,
    /// The entity after the change (for `delete`, as it was).
    pub entity: Map<String, Value>,
    /// The entity before the change; required for `update`.
    pub before: Option<Map<String, Value>>,
    /// For updates: every top-level field whose value differs, in entity order.
    pub changes: Vec<Change>,
}

/// One field that an update changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub field: String,
    /// `None` when the field was absent before (added by the update).
    pub old: Option<Value>,
    /// `None` when the field is absent after (removed by the update).
    pub new: Option<Value>,
}

/// What is wrong with an event, naming the field (`entity.id`) and what was
/// expected. Shown to senders in 400 answers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct EventError {
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> EventError {
    EventError {
        field: field.into(),
        problem: problem.into(),
    }
}

const KEYS: &[&str] = &[
    "id",
    "event_type",
    "entity_type",
    "scope",
    "user",
    "occurred_at",
    "entity",
    "before",
];

impl Event {
    /// Parses an event from JSON text.
    pub fn from_json(text: &str) -> Result<Event, EventError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| err("(body)", format!("not valid JSON: {e}")))?;
        Event::from_value(value)
    }

    /// Parses an event from a JSON value.
    pub fn from_value(value: Value) -> Result<Event, EventError> {
        let Value::Object(mut obj) = value else {
            return Err(err(
                "(body)",
                format!("expected a JSON object, found {}", kind(&value)),
            ));
        };
        if let Some(unknown) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
            let hint = crate::rules::diag::nearest(unknown, KEYS)
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_else(|| format!("; known fields: {}", KEYS.join(", ")));
            return Err(err(unknown.clone(), format!("unknown field{hint}")));
        }
        let id = match obj.remove("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(check_id("id", s)?),
            Some(other) => return Err(expected("id", "a string", &other)),
        };
        let event_type = required_name(&mut obj, "event_type")?;
        let entity_type = required_name(&mut obj, "entity_type")?;
        let scope = match obj.remove("scope") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => {
                for (k, v) in &m {
                    if !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                        return Err(expected(&format!("scope.{k}"), "a string or number", v));
                    }
                }
                m
            }
            Some(other) => return Err(expected("scope", "an object", &other)),
        };
        let user = match obj.remove("user") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(other) => return Err(expected("user", "an object", &other)),
        };
        let occurred_at = match obj.remove("occurred_at") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if looks_like_rfc3339(&s) => Some(s),
            Some(Value::String(s)) => {
                return Err(err(
                    "occurred_at",
                    format!("`{s}` is not an RFC 3339 time; write e.g. 2026-11-22T10:00:00Z"),
                ));
            }
            Some(other) => return Err(expected("occurred_at", "an RFC 3339 string", &other)),
        };
        let entity = match obj.remove("entity") {
            Some(Value::Object(m)) => m,
            None | Some(Value::Null) => {
                return Err(err("entity", "missing; send the entity the event is about"));
            }
            Some(other) => return Err(expected("entity", "an object", &other)),
        };
        match entity.get("id") {
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::Number(_)) => {}
            None | Some(Value::Null) => {
                return Err(err("entity.id", "missing; every entity needs an id"));
            }
            Some(other) => {
                return Err(expected(
                    "entity.id",
                    "a non-empty string or a number",
                    other,
                ));
            }
        }
        let before = match obj.remove("before") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(other) => return Err(expected("before", "an object", &other)),
        };
        if event_type == "update" && before.is_none() {
            return Err(err(
                "before",
                "missing; an update event must carry the entity as it was before the change \
                 so its changes can be computed",
            ));
        }
        let changes = if event_type == "update" {
            diff(before.as_ref().unwrap_or(&Map::new()), &entity)
        } else {
            Vec::new()
        };
        Ok(Event {
            id,
            event_type,
            entity_type,
            scope,
            user,
            occurred_at,
            entity,
            before,
            changes,
        })
    }

    /// The entity id as text (numbers are written in decimal).
    pub fn entity_id(&self) -> String {
        match self.entity.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }
}

/// Top-level fields whose values differ between `before` and `after`, in the
/// order of `after`, then fields that only `before` has.
pub fn diff(before: &Map<String, Value>, after: &Map<String, Value>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (field, new) in after {
        match before.get(field) {
            Some(old) if crate::rules::value::json_eq(old, new) => {}
            old => changes.push(Change {
                field: field.clone(),
                old: old.cloned(),
                new: Some(new.clone()),
            }),
        }
    }
    for (field, old) in before {
        if !after.contains_key(field) {
            changes.push(Change {
                field: field.clone(),
                old: Some(old.clone()),
                new: None,
            });
        }
    }
    changes
}

fn required_name(obj: &mut Map<String, Value>, field: &str) -> Result<String, EventError> {
    match obj.remove(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => check_id(field, s),
        Some(Value::String(_)) => Err(err(field, "empty; expected a name such as `update`")),
        None | Some(Value::Null) => Err(err(field, "missing")),
        Some(other) => Err(expected(field, "a string", &other)),
    }
}

fn check_id(field: &str, s: String) -> Result<String, EventError> {
    if s.is_empty() || s.len() > MAX_ID_LEN || s.chars().any(char::is_control) {
        return Err(err(
            field,
            format!("expected 1 to {MAX_ID_LEN} printable characters"),
        ));
    }
    Ok(s)
}

fn expected(field: &str, what: &str, found: &Value) -> EventError {
    err(field, format!("expected {what}, found {}", kind(found)))
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A light shape check (`YYYY-MM-DDTHH:MM:SS` then anything): enough to
/// catch "yesterday" without pulling in a date library.
fn looks_like_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':'
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({"id": "evt-1", "event_type": "update", "entity_type": "defect",
            "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
            "user": {"id": "1001", "email": "admin@example.com"},
            "occurred_at": "2026-11-22T10:00:00Z",
            "entity": {"id": "2013", "name": "Login fails", "phase": {"id": "phase.defect.opened"}, "rework_counter_udf": 3, "new_field": 1},
            "before": {"id": "2013", "name": "Login fails", "phase": {"id": "phase.defect.fixed"}, "rework_counter_udf": 2, "gone": true}})
    }

    #[test]
    fn update_computes_changes_in_entity_order() {
        let ev = Event::from_value(sample()).unwrap();
        let fields: Vec<_> = ev.changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["phase", "rework_counter_udf", "new_field", "gone"]);
        assert_eq!(ev.changes[1].old, Some(json!(2)));
        assert_eq!(ev.changes[1].new, Some(json!(3)));
        assert_eq!(ev.changes[2].old, None);
        assert_eq!(ev.changes[3].new, None);
    }

    #[test]
    fn bad_events_name_the_field() {
        let cases: &[(&str, Value, &str)] = &[
            (
                "no before on update",
                json!({"event_type": "update", "entity_type": "defect", "entity": {"id": "1"}}),
                "before: missing;",
            ),
            (
                "no entity id",
                json!({"event_type": "create", "entity_type": "defect", "entity": {"name": "x"}}),
                "entity.id: missing;",
            ),
            (
                "typo",
                json!({"event_typ": "create", "entity_type": "defect", "entity": {"id": "1"}}),
                "event_typ: unknown field; did you mean `event_type`?",
            ),
            (
                "wrong type",
                json!({"event_type": 3, "entity_type": "defect", "entity": {"id": "1"}}),
                "event_type: expected a string, found a number",
            ),
            (
                "bad time",
                json!({"event_type": "create", "entity_type": "d", "occurred_at": "yesterday", "entity": {"id": "1"}}),
                "occurred_at: `yesterday` is not an RFC 3339 time",
            ),
            (
                "nested scope",
                json!({"event_type": "create", "entity_type": "d", "scope": {"w": {}}, "entity": {"id": "1"}}),
                "scope.w: expected a string or number",
            ),
            (
                "not an object",
                json!([1]),
                "(body): expected a JSON object, found an array",
            ),
        ];
        for (name, value, want) in cases {
            let got = Event::from_value(value.clone()).unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "{name}: got {got:?}, want prefix {want:?}"
            );
        }
    }

    #[test]
    fn custom_events_are_accepted_as_they_are() {
        let ev = Event::from_value(json!({"event_type": "deliver", "entity_type": "stream",
            "scope": {"stream": "int"}, "entity": {"id": 7}}))
        .unwrap();
        assert_eq!(ev.event_type, "deliver");
        assert_eq!(ev.id, None);
        assert_eq!(ev.entity_id(), "7");
        assert!(ev.changes.is_empty());
    }
}
