//! Selection over the payload's JSON text, without building a `Value` for what passes through.
//!
//! Parsing a payload into `Value`s and writing it back costs far more than the selection itself
//! (each field is a few allocations and a hash, each way), while most of the payload either goes
//! out exactly as it came or is dropped. So this scans the text once, keeps each member as the
//! slice of text it is ([`RawValue`]), drops what the selection drops, and copies the rest out.
//! Only a field reached by a dotted path is parsed, to be cut down with the same [`Keep`] tree as
//! in [`Selection::apply`].
//!
//! Values are copied as they were written, so the output spells them as the input did (`1e2`
//! stays `1e2`); the host's payloads are written by `serde_json`, and for them the output is the
//! very text [`Selection::apply`] gives (the unit tests check both paths on every case).
//! Duplicate keys, which no payload built by the host has, are passed through, not merged.
//!
//! What it does not handle it declines (`None`), and the caller parses the whole payload instead:
//! a selection with JSONPaths (which can match anywhere in the entity), and text that is not a
//! payload object whose `entity` and `changes` are objects (the full parse handles or reports
//! those).
//!
//! [`Keep`]: crate::Keep

use std::borrow::Cow;
use std::fmt;

use rulehook_plugin_sdk::{Value, log};
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::Map;
use serde_json::value::RawValue;

use crate::{ALWAYS_KEPT, Selection};

/// The payload in `text` narrowed by `selection`, as JSON text; `None` when this path cannot do
/// it (see the module doc), `Some(Err)` when the selection fails.
pub(crate) fn select(text: &str, selection: &Selection<'_>) -> Option<Result<String, String>> {
    if !selection.jsonpaths.is_empty() {
        return None;
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let payload = PayloadSeed.deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    let Some(entity) = payload.iter().find_map(|(_, part)| match part {
        Part::Entity(entity) => Some(entity),
        _ => None,
    }) else {
        log::debug("the payload has no `entity`, so there are no fields to select");
        return Some(Ok(text.to_owned()));
    };
    let kept = match select_entity(entity, selection) {
        Ok(kept) => kept,
        Err(e) => return Some(Err(e)),
    };

    let mut out = String::with_capacity(text.len());
    out.push('{');
    for (i, (key, part)) in payload.iter().enumerate() {
        push_key(&mut out, i, key);
        match part {
            Part::Raw(raw) => out.push_str(raw.get()),
            Part::Entity(_) => {
                out.push('{');
                for (i, (key, text)) in kept.iter().enumerate() {
                    push_key(&mut out, i, key);
                    match text {
                        Text::Raw(raw) => out.push_str(raw.get()),
                        Text::Value(value) => out.push_str(&value.to_string()),
                    }
                }
                out.push('}');
            }
            Part::Changes(changes) => {
                out.push('{');
                let still_there = changes
                    .iter()
                    .filter(|(field, _)| kept.iter().any(|(key, _)| key.0 == field.0));
                for (i, (field, raw)) in still_there.enumerate() {
                    push_key(&mut out, i, field);
                    out.push_str(raw.get());
                }
                out.push('}');
            }
        }
    }
    out.push('}');
    Some(Ok(out))
}

/// A top-level member of the payload.
enum Part<'t> {
    /// Passed through as written.
    Raw(&'t RawValue),
    /// `entity`, member by member.
    Entity(Members<'t>),
    /// `changes`, member by member.
    Changes(Members<'t>),
}

/// An object's members, in order, each as its key and its JSON text.
type Members<'t> = Vec<(Key<'t>, &'t RawValue)>;

/// What goes out for an entity member.
enum Text<'t> {
    /// Its text as written.
    Raw(&'t RawValue),
    /// What a dotted path left of it.
    Value(Value),
}

/// The entity members that survive: `id` and `type` first, the rest in the entity's order.
fn select_entity<'e, 't>(
    entity: &'e Members<'t>,
    selection: &Selection<'_>,
) -> Result<Vec<(&'e Key<'t>, Text<'t>)>, String> {
    let mut front: [Option<(&Key<'t>, Text<'t>)>; 2] = [None, None];
    let mut rest = Vec::new();
    // Members only dotted paths reach, parsed, to be cut down once all are known.
    let mut reached = Map::new();
    for (key, raw) in entity {
        if let Some(slot) = ALWAYS_KEPT.iter().position(|k| *k == key.0) {
            front[slot] = Some((key, Text::Raw(raw)));
        } else if selection.keeps_whole(&key.0) {
            rest.push((key, Text::Raw(raw)));
        } else if selection.reaches_into(&key.0) {
            let value: Value = serde_json::from_str(raw.get())
                .map_err(|e| format!("the entity's `{}` could not be parsed: {e}", key.0))?;
            reached.insert(key.0.as_ref().to_owned(), value);
            rest.push((key, Text::Value(Value::Null)));
        }
    }
    if !reached.is_empty() {
        let reached = Value::Object(reached);
        let keep = selection.keep_tree(&reached)?;
        let Value::Object(mut reached) = reached else {
            return Ok(Vec::new());
        };
        rest.retain_mut(|(key, text)| {
            let Text::Value(slot) = text else {
                return true;
            };
            let pruned = reached
                .shift_remove(key.0.as_ref())
                .and_then(|value| keep.keys.get(key.0.as_ref())?.prune(value));
            match pruned {
                Some(value) => {
                    *slot = value;
                    true
                }
                None => false,
            }
        });
    }
    Ok(front.into_iter().flatten().chain(rest).collect())
}

/// Writes `"key":`, after a `,` unless it is the object's first member (`index` 0).
fn push_key(out: &mut String, index: usize, key: &Key<'_>) {
    if index > 0 {
        out.push(',');
    }
    match &key.0 {
        // Borrowed means the key had no escapes in the text, and a JSON string without escapes
        // holds no character that needs one: it goes back as it was.
        Cow::Borrowed(key) => {
            out.push('"');
            out.push_str(key);
            out.push('"');
        }
        Cow::Owned(key) => out.push_str(&Value::String(key.clone()).to_string()),
    }
    out.push(':');
}

/// The payload object, member by member.
struct PayloadSeed;

impl<'t> DeserializeSeed<'t> for PayloadSeed {
    type Value = Vec<(Key<'t>, Part<'t>)>;

    fn deserialize<D: de::Deserializer<'t>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'t> Visitor<'t> for PayloadSeed {
    type Value = Vec<(Key<'t>, Part<'t>)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a payload object")
    }

    fn visit_map<A: MapAccess<'t>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = access.next_key::<Key<'t>>()? {
            let part = match key.0.as_ref() {
                "entity" => Part::Entity(access.next_value_seed(MembersSeed)?),
                "changes" => Part::Changes(access.next_value_seed(MembersSeed)?),
                _ => Part::Raw(access.next_value()?),
            };
            members.push((key, part));
        }
        Ok(members)
    }
}

/// An object, member by member, each value left as text.
struct MembersSeed;

impl<'t> DeserializeSeed<'t> for MembersSeed {
    type Value = Members<'t>;

    fn deserialize<D: de::Deserializer<'t>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'t> Visitor<'t> for MembersSeed {
    type Value = Members<'t>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'t>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = access.next_key::<Key<'t>>()? {
            members.push((key, access.next_value()?));
        }
        Ok(members)
    }
}

/// An object key, borrowed from the text when it has no escapes, so that scanning an entity of a
/// hundred fields allocates nothing for their names.
struct Key<'t>(Cow<'t, str>);

impl<'t> de::Deserialize<'t> for Key<'t> {
    fn deserialize<D: de::Deserializer<'t>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'t> Visitor<'t> for KeyVisitor {
    type Value = Key<'t>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'t str) -> Result<Key<'t>, E> {
        Ok(Key(Cow::Borrowed(key)))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'t>, E> {
        Ok(Key(Cow::Owned(key.to_owned())))
    }

    fn visit_string<E: de::Error>(self, key: String) -> Result<Key<'t>, E> {
        Ok(Key(Cow::Owned(key)))
    }
}
