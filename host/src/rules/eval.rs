//! Evaluating conditions against an event. Pure: no I/O, clock or randomness.
//!
//! A failed condition is reported as a reference to the node that failed, so
//! the fast path allocates nothing; `explain` turns it into words.

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};
use std::cmp::Ordering;

use serde_json::{Map, Value};

use super::model::{Condition, ConditionKind, Field, Leaf, Op};
use super::value;
use crate::event::Event;

/// The most work one JSONPath query may cost on one event, in node
/// visits, worst case. The sender shapes the event and a query's cost
/// grows with it: each descendant segment (`..`) can visit every node
/// below each node it starts from, so `$..*..*` over a deep 17 KB event
/// took 6.6 s and 670 MB (debug build) before this bound. A query whose
/// worst case on the event is past it is not run: its field reads as
/// missing and the rule does not fire (whatever the operator), the same in
/// matching and `explain`, which says why.
pub const MAX_JSONPATH_WORK: u64 = 1_000_000;

/// An event prepared for evaluation. The JSON documents that JSONPath
/// conditions query are built only if a JSONPath condition runs.
pub struct EventView<'e> {
    pub event: &'e Event,
    current_doc: OnceCell<Doc>,
    original_doc: OnceCell<Doc>,
    /// The last JSONPath query not run for its cost, with that cost.
    refused: RefCell<Option<(String, u64)>>,
}

/// A document JSONPath queries, with the shape that bounds their cost.
struct Doc {
    value: Value,
    /// Every value in it, containers included.
    nodes: u64,
    /// The longest path from the root to a value, root counted.
    depth: u64,
}

impl Doc {
    fn new(value: Value) -> Doc {
        let (mut nodes, mut depth) = (0u64, 0u64);
        // A stack of its own: no recursion on the sender's nesting.
        let mut stack = vec![(&value, 1u64)];
        while let Some((v, d)) = stack.pop() {
            nodes += 1;
            depth = depth.max(d);
            match v {
                Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
                Value::Object(m) => stack.extend(m.values().map(|i| (i, d + 1))),
                _ => {}
            }
        }
        Doc {
            value,
            nodes,
            depth,
        }
    }
}

impl<'e> EventView<'e> {
    pub fn new(event: &'e Event) -> Self {
        EventView {
            event,
            current_doc: OnceCell::new(),
            original_doc: OnceCell::new(),
            refused: RefCell::new(None),
        }
    }

    /// The document `$` refers to: the event with `entity` (or, for
    /// `original: true`, `before` in its place) and the computed `changes`.
    fn document(&self, original: bool) -> &Value {
        &self.doc(original).value
    }

    fn doc(&self, original: bool) -> &Doc {
        let cell = if original {
            &self.original_doc
        } else {
            &self.current_doc
        };
        cell.get_or_init(|| Doc::new(event_document(self.event, original)))
    }

    /// The JSONPath query (and its worst-case work) that was not run since
    /// `clear_refused`, if any.
    pub fn refused_query(&self) -> Option<(String, u64)> {
        self.refused.borrow().clone()
    }

    pub fn clear_refused(&self) {
        self.refused.borrow_mut().take();
    }

    /// The worst-case work of the JSONPath `text` on this event: nodes ×
    /// depth per descendant segment, × the selectors of a union. Counted
    /// on the text, so a `..` or `,` inside a string literal counts too,
    /// which only errs on the safe side.
    pub fn jsonpath_work(&self, text: &str, original: bool) -> u64 {
        let doc = self.doc(original);
        let descendants = text.matches("..").count() as u32;
        let selectors = text.matches(',').count() as u64 + 1;
        doc.nodes
            .saturating_mul(doc.depth.max(1).saturating_pow(descendants))
            .saturating_mul(selectors)
    }

    fn entity(&self, original: bool) -> Option<&'e Map<String, Value>> {
        if original {
            self.event.before.as_ref()
        } else {
            Some(&self.event.entity)
        }
    }
}

/// The event as one JSON document, for JSONPath conditions.
pub fn event_document(ev: &Event, original: bool) -> Value {
    let mut doc = Map::new();
    if let Some(id) = &ev.id {
        doc.insert("id".into(), Value::String(id.clone()));
    }
    doc.insert("event_type".into(), Value::String(ev.event_type.clone()));
    doc.insert("entity_type".into(), Value::String(ev.entity_type.clone()));
    doc.insert("scope".into(), Value::Object(ev.scope.clone()));
    if let Some(user) = &ev.user {
        doc.insert("user".into(), Value::Object(user.clone()));
    }
    if let Some(t) = &ev.occurred_at {
        doc.insert("occurred_at".into(), Value::String(t.clone()));
    }
    let entity = if original {
        ev.before.clone()
    } else {
        Some(ev.entity.clone())
    };
    if let Some(entity) = entity {
        doc.insert("entity".into(), Value::Object(entity));
    }
    if let Some(before) = &ev.before {
        doc.insert("before".into(), Value::Object(before.clone()));
    }
    doc.insert("changes".into(), crate::payload::changes_json(&ev.changes));
    Value::Object(doc)
}

impl Field {
    /// The value a condition sees, or `None` when the field is missing.
    /// A JSONPath matching several nodes yields them as an array.
    pub fn read<'v>(&self, view: &'v EventView<'_>, original: bool) -> Option<Cow<'v, Value>> {
        match self {
            Field::Name(name) => view.entity(original)?.get(name).map(Cow::Borrowed),
            Field::Path(parts) => {
                let (first, rest) = parts.split_first()?;
                let mut cur = view.entity(original)?.get(first)?;
                for part in rest {
                    cur = match cur {
                        Value::Object(m) => m.get(part)?,
                        Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
                        _ => return None,
                    };
                }
                Some(Cow::Borrowed(cur))
            }
            Field::JsonPath { query, text } => {
                let work = view.jsonpath_work(text, original);
                if work > MAX_JSONPATH_WORK {
                    *view.refused.borrow_mut() = Some((text.clone(), work));
                    return None;
                }
                let doc = view.document(original);
                let found = jsonpath_rust::query::js_path_process(query, doc).ok()?;
                match found.len() {
                    0 => None,
                    1 => found.into_iter().next().map(|r| Cow::Borrowed(r.val())),
                    _ => Some(Cow::Owned(Value::Array(
                        found.into_iter().map(|r| r.val().clone()).collect(),
                    ))),
                }
            }
        }
    }
}

impl Condition {
    /// `Ok` when the condition holds, else the node that decided the miss.
    pub fn eval<'c>(&'c self, view: &EventView<'_>) -> Result<(), &'c Condition> {
        match &self.kind {
            ConditionKind::All(children) => children.iter().try_for_each(|c| c.eval(view)),
            ConditionKind::Any(children) => {
                if children.iter().any(|c| c.eval(view).is_ok()) {
                    Ok(())
                } else {
                    Err(self)
                }
            }
            ConditionKind::Not(inner) => match inner.eval(view) {
                Ok(()) => Err(self),
                Err(_) => Ok(()),
            },
            ConditionKind::Leaf(leaf) => {
                if leaf.holds(view) {
                    Ok(())
                } else {
                    Err(self)
                }
            }
        }
    }
}

impl Leaf {
    pub fn holds(&self, view: &EventView<'_>) -> bool {
        let actual = || self.field.read(view, self.original);
        match &self.op {
            Op::Equals(v) => actual().is_some_and(|a| value::json_eq(&a, v)),
            Op::NotEquals(v) => !actual().is_some_and(|a| value::json_eq(&a, v)),
            Op::In(vs) => actual().is_some_and(|a| vs.iter().any(|v| value::json_eq(&a, v))),
            Op::NotIn(vs) => !actual().is_some_and(|a| vs.iter().any(|v| value::json_eq(&a, v))),
            Op::Contains(v) => actual().is_some_and(|a| value::contains(&a, v)),
            Op::Matches(re) => actual().is_some_and(|a| a.as_str().is_some_and(|s| re.is_match(s))),
            Op::Gt(v) => ordered(actual(), v, |o| o == Ordering::Greater),
            Op::Gte(v) => ordered(actual(), v, |o| o != Ordering::Less),
            Op::Lt(v) => ordered(actual(), v, |o| o == Ordering::Less),
            Op::Lte(v) => ordered(actual(), v, |o| o != Ordering::Greater),
            Op::Exists(want) => actual().is_some_and(|a| !a.is_null()) == *want,
            Op::IsEmpty(want) => value::is_empty(actual().as_deref()) == *want,
            Op::IsModified(want) => self.modified(view) == *want,
            Op::ChangedFrom(v) => {
                self.modified(view)
                    && self
                        .field
                        .read(view, true)
                        .is_some_and(|old| value::json_eq(&old, v))
            }
            Op::ChangedTo(v) => {
                self.modified(view)
                    && self
                        .field
                        .read(view, false)
                        .is_some_and(|new| value::json_eq(&new, v))
            }
        }
    }

    /// The field differs between `before` and the entity. Without `before`
    /// (create, delete, custom events) nothing counts as modified.
    pub fn modified(&self, view: &EventView<'_>) -> bool {
        if view.event.before.is_none() {
            return false;
        }
        let old = self.field.read(view, true);
        let new = self.field.read(view, false);
        match (old, new) {
            (None, None) => false,
            (Some(a), Some(b)) => !value::json_eq(&a, &b),
            _ => true,
        }
    }
}

fn ordered(actual: Option<Cow<'_, Value>>, bound: &Value, want: impl Fn(Ordering) -> bool) -> bool {
    actual
        .and_then(|a| value::compare(&a, bound))
        .is_some_and(want)
}
