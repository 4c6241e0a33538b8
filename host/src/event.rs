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
        Event::from_value(parse_json(text.as_bytes())?)
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

/// Parses JSON text the way an event must be read: like `serde_json`,
/// but refusing what it would silently change. A duplicate key in an
/// object is refused, naming it (`entity.name: duplicate key`), where
/// serde keeps the last value, so two readers of the same event could
/// disagree on it. An integer literal past 64 bits (above
/// 18446744073709551615 or below -9223372036854775808) is refused, naming
/// the field, where serde rounds it to a float: rulehook would otherwise
/// send a different id than it got. Floats stay floats.
pub fn parse_json(text: &[u8]) -> Result<Value, EventError> {
    let ctx = strict::Ctx::default();
    let mut de = serde_json::Deserializer::from_slice(text);
    let parsed = serde::de::DeserializeSeed::deserialize(ctx.root(), &mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    if let Some(fault) = ctx.fault.take() {
        return Err(fault);
    }
    let value = parsed.map_err(|e| err("(body)", format!("not valid JSON: {e}")))?;
    if let Some((field, literal)) = ctx.wide_integer(text) {
        let shown: String = literal.chars().take(40).collect();
        return Err(err(
            field,
            format!(
                "the integer {shown}{} does not fit in 64 bits (from -9223372036854775808 to \
                 18446744073709551615) and would be rounded; send it as a string to keep it exact",
                if shown.len() < literal.len() {
                    "…"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(value)
}

/// The visitor behind `parse_json`: builds the same `Value` serde_json
/// would, keeping each value's path for the error that names it.
mod strict {
    use std::cell::{Cell, RefCell};
    use std::fmt;

    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    use super::{EventError, err};

    #[derive(Default)]
    pub struct Ctx {
        /// Numbers seen so far, in document order.
        numbers: Cell<usize>,
        /// Floats that may be integers past 64 bits (integral, of at
        /// least 2^63): their place among the numbers, and their path.
        /// Only the text tells whether one was written as an integer.
        wide: RefCell<Vec<(usize, String)>>,
        /// The refusal that stopped the parse, naming its field.
        pub fault: RefCell<Option<EventError>>,
    }

    #[derive(Clone, Copy)]
    enum Path<'a> {
        Root,
        Key(&'a Path<'a>, &'a str),
        Index(&'a Path<'a>, usize),
    }

    impl Path<'_> {
        fn render(&self) -> String {
            let mut parts = Vec::new();
            let mut at = self;
            loop {
                match at {
                    Path::Root => break,
                    Path::Key(parent, k) => {
                        parts.push(format!(".{k}"));
                        at = parent;
                    }
                    Path::Index(parent, i) => {
                        parts.push(format!("[{i}]"));
                        at = parent;
                    }
                }
            }
            if parts.is_empty() {
                return "(body)".into();
            }
            parts.reverse();
            let joined = parts.concat();
            joined.strip_prefix('.').unwrap_or(&joined).to_string()
        }
    }

    pub struct Seed<'a> {
        ctx: &'a Ctx,
        path: Path<'a>,
    }

    impl Ctx {
        pub fn root(&self) -> Seed<'_> {
            Seed {
                ctx: self,
                path: Path::Root,
            }
        }

        fn number(&self) -> usize {
            let n = self.numbers.get();
            self.numbers.set(n + 1);
            n
        }

        /// The path and text of the first wide float that `text` wrote
        /// as an integer literal, if any.
        pub fn wide_integer(&self, text: &[u8]) -> Option<(String, String)> {
            let wide = self.wide.borrow();
            let mut wanted = wide.iter().peekable();
            wanted.peek()?;
            for (index, token) in numbers(text).enumerate() {
                let Some((at, path)) = wanted.peek() else {
                    break;
                };
                if *at != index {
                    continue;
                }
                wanted.next();
                if !token.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
                    return Some((path.clone(), String::from_utf8_lossy(token).into_owned()));
                }
            }
            None
        }
    }

    /// The number tokens of valid JSON text, in order.
    fn numbers(text: &[u8]) -> impl Iterator<Item = &[u8]> {
        let mut i = 0;
        std::iter::from_fn(move || {
            let mut in_string = false;
            while i < text.len() {
                let b = text[i];
                if in_string {
                    match b {
                        b'\\' => i += 1,
                        b'"' => in_string = false,
                        _ => {}
                    }
                } else if b == b'"' {
                    in_string = true;
                } else if b == b'-' || b.is_ascii_digit() {
                    let start = i;
                    while i < text.len()
                        && matches!(text[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                    {
                        i += 1;
                    }
                    return Some(&text[start..i]);
                }
                i += 1;
            }
            None
        })
    }

    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = Value;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }

        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            self.ctx.number();
            Ok(Value::Number(v.into()))
        }

        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            self.ctx.number();
            Ok(Value::Number(v.into()))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            let at = self.ctx.number();
            if v.fract() == 0.0 && v.abs() >= 9_223_372_036_854_775_808.0 {
                self.ctx.wide.borrow_mut().push((at, self.path.render()));
            }
            Number::from_f64(v)
                .map(Value::Number)
                .ok_or_else(|| E::custom("a number that is not finite"))
        }

        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_string()))
        }

        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }

        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            loop {
                let seed = Seed {
                    ctx: self.ctx,
                    path: Path::Index(&self.path, items.len()),
                };
                match seq.next_element_seed(seed)? {
                    Some(v) => items.push(v),
                    None => return Ok(Value::Array(items)),
                }
            }
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut obj = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                let path = Path::Key(&self.path, &key);
                if obj.contains_key(&key) {
                    *self.ctx.fault.borrow_mut() = Some(err(
                        path.render(),
                        "duplicate key: an object may name each key once (which value is meant?)",
                    ));
                    return Err(de::Error::custom("duplicate key"));
                }
                let value = map.next_value_seed(Seed {
                    ctx: self.ctx,
                    path,
                })?;
                obj.insert(key, value);
            }
            Ok(Value::Object(obj))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_json_is_serde_json_without_its_silent_changes() {
        let text = r#"{"a": [1, -2, 3.5, 1e300, 18446744073709551615, "x\"1e99\""], "b": {"c": null, "d": true}}"#;
        let strict = parse_json(text.as_bytes()).unwrap();
        let serde: Value = serde_json::from_str(text).unwrap();
        assert_eq!(strict, serde);
        assert_eq!(
            serde_json::to_string(&strict).unwrap(),
            serde_json::to_string(&serde).unwrap(),
            "same key order and number forms"
        );
        for (text, field, problem) in [
            (r#"{"a": 1, "a": 2}"#, "a", "duplicate key"),
            (
                r#"{"x": [{"k": 1}, {"k": 1, "k": 2}]}"#,
                "x[1].k",
                "duplicate key",
            ),
            (r#"{"a": 1e19, "b": 18446744073709551616}"#, "b", "64 bits"),
            (r#"[-9223372036854775809]"#, "[0]", "64 bits"),
            (r#"{"a": "1"#, "(body)", "not valid JSON"),
        ] {
            let e = parse_json(text.as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{text}: {e}");
            assert!(e.problem.contains(problem), "{text}: {e}");
        }
        // A wide float written as a float is a float.
        assert!(parse_json(br#"{"a": 1e19, "b": 1.8446744073709552e19}"#).is_ok());
    }

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
