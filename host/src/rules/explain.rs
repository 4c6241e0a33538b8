//! Why each rule did or did not match an event, in words an admin can act on.
//! Pure, like the rest of `rules`; slower than `RuleSet::matching` because
//! it looks at every rule and describes every miss.

use serde::Serialize;
use serde_json::Value;

use super::eval::EventView;
use super::model::{Condition, ConditionKind, Leaf, Op, Rule};
use super::{Miss, RuleSet};
use crate::event::Event;

/// The verdict for one rule.
#[derive(Debug, Serialize)]
pub struct Verdict {
    pub rule: String,
    /// `file:line:column` of the rule.
    pub at: String,
    pub matched: bool,
    /// For a non-match: what failed first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// For a match of a rule with `ordering`: the lane its delivery joins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering: Option<OrderingVerdict>,
}

/// Where an ordered rule's delivery for the event goes in line.
#[derive(Debug, Serialize)]
pub struct OrderingVerdict {
    /// `rule/key`: the deliveries of this lane are sent one at a time.
    pub lane: String,
    /// The key as written (`entity`, a field, a JSONPath).
    pub key: String,
    pub on_failure: &'static str,
}

/// The first check that failed, with what the rule wanted and what it saw.
#[derive(Debug, Serialize)]
pub struct Reason {
    /// `active`, `events`, `entity_types`, `scope.KEY` or the condition's
    /// path such as `when.all[1]`.
    pub check: String,
    /// The condition as written, or the expected values.
    pub expected: String,
    /// The value the rule saw; `null` when missing.
    pub actual: Value,
    /// A sentence saying why it failed.
    pub why: String,
}

/// Verdicts for every rule of the set, in rule order.
pub fn explain(set: &RuleSet, event: &Event) -> Vec<Verdict> {
    let view = EventView::new(event);
    set.rules()
        .iter()
        .map(|rule| {
            let reason = rule
                .decide(&view)
                .err()
                .map(|miss| describe(rule, &miss, &view));
            let ordering = match (&reason, &rule.ordering) {
                (None, Some(o)) => rule.lane(&view).map(|lane| OrderingVerdict {
                    lane,
                    key: o.key.to_string(),
                    on_failure: o.on_failure.as_str(),
                }),
                _ => None,
            };
            Verdict {
                rule: rule.name.clone(),
                at: rule.origin.to_string(),
                matched: reason.is_none(),
                reason,
                ordering,
            }
        })
        .collect()
}

fn describe(rule: &Rule, miss: &Miss<'_>, view: &EventView<'_>) -> Reason {
    let ev = view.event;
    match miss {
        Miss::Inactive => Reason {
            check: "active".into(),
            expected: "true".into(),
            actual: Value::Bool(false),
            why: "the rule is inactive (active: false)".into(),
        },
        Miss::EventType => Reason {
            check: "events".into(),
            expected: rule.events.join(", "),
            actual: Value::String(ev.event_type.clone()),
            why: format!(
                "event type `{}` is not one of the rule's events",
                ev.event_type
            ),
        },
        Miss::EntityType => Reason {
            check: "entity_types".into(),
            expected: rule.entity_types.join(", "),
            actual: Value::String(ev.entity_type.clone()),
            why: format!(
                "entity type `{}` is not one of the rule's entity types",
                ev.entity_type
            ),
        },
        Miss::Scope { key, expected } => {
            let actual = ev.scope.get(*key).cloned().unwrap_or(Value::Null);
            let why = if actual.is_null() {
                format!("the event has no scope `{key}`")
            } else {
                format!("scope `{key}` is {actual}, the rule wants {expected}")
            };
            Reason {
                check: format!("scope.{key}"),
                expected: expected.to_string(),
                actual,
                why,
            }
        }
        Miss::Condition(cond) => match view.refused_query() {
            Some((query, work)) => Reason {
                check: cond.path.clone(),
                expected: describe_condition(cond),
                actual: Value::Null,
                why: format!(
                    "the JSONPath `{query}` was not run: on this event it could visit {work} nodes, more than the {} one query may (each `..` multiplies the event's nodes by its depth); a rule with a query past the bound does not fire",
                    super::eval::MAX_JSONPATH_WORK
                ),
            },
            None => condition_reason(cond, view),
        },
    }
}

fn condition_reason(cond: &Condition, view: &EventView<'_>) -> Reason {
    match &cond.kind {
        ConditionKind::Leaf(leaf) => {
            let actual = actual_of(leaf, view);
            Reason {
                check: cond.path.clone(),
                expected: leaf.to_string(),
                why: leaf_why(leaf, &actual),
                actual,
            }
        }
        ConditionKind::Any(children) => {
            let parts: Vec<String> = children
                .iter()
                .filter_map(|c| c.eval(view).err())
                .map(|c| {
                    let r = condition_reason(c, view);
                    format!("{}: {}", r.check, r.why)
                })
                .collect();
            Reason {
                check: cond.path.clone(),
                expected: format!("any of {} conditions", children.len()),
                actual: Value::Null,
                why: format!("none of the alternatives holds ({})", parts.join("; ")),
            }
        }
        ConditionKind::Not(inner) => {
            let actual = match &inner.kind {
                ConditionKind::Leaf(leaf) => actual_of(leaf, view),
                _ => Value::Null,
            };
            Reason {
                check: cond.path.clone(),
                expected: format!("not ({})", describe_condition(inner)),
                actual,
                why: "the negated condition holds".into(),
            }
        }
        // `all` never reports itself: the failing child does.
        ConditionKind::All(_) => Reason {
            check: cond.path.clone(),
            expected: "all conditions".into(),
            actual: Value::Null,
            why: "a condition failed".into(),
        },
    }
}

fn describe_condition(cond: &Condition) -> String {
    match &cond.kind {
        ConditionKind::Leaf(leaf) => leaf.to_string(),
        ConditionKind::All(c) => format!("all of {} conditions", c.len()),
        ConditionKind::Any(c) => format!("any of {} conditions", c.len()),
        ConditionKind::Not(inner) => format!("not ({})", describe_condition(inner)),
    }
}

/// What the condition looked at; for change operators, `{old, new}`.
fn actual_of(leaf: &Leaf, view: &EventView<'_>) -> Value {
    let read = |original| {
        leaf.field
            .read(view, original)
            .map_or(Value::Null, |v| v.into_owned())
    };
    match leaf.op {
        Op::IsModified(_) | Op::ChangedFrom(_) | Op::ChangedTo(_) => {
            serde_json::json!({"old": read(true), "new": read(false)})
        }
        _ => read(leaf.original),
    }
}

fn leaf_why(leaf: &Leaf, actual: &Value) -> String {
    let which = if leaf.original {
        "original value of "
    } else {
        ""
    };
    match &leaf.op {
        Op::IsModified(true) | Op::ChangedFrom(_) | Op::ChangedTo(_)
            if actual["old"] == actual["new"] =>
        {
            format!("`{}` did not change", leaf.field)
        }
        Op::IsModified(false) => format!("`{}` changed", leaf.field),
        _ if actual.is_null() && !matches!(leaf.op, Op::Exists(false) | Op::IsEmpty(true)) => {
            format!("the {which}field `{}` is missing or null", leaf.field)
        }
        Op::Matches(_) if !actual.is_string() => {
            format!(
                "`{}` is {}, not a string",
                leaf.field,
                crate::event::kind(actual)
            )
        }
        _ => format!("the {which}`{}` is {actual}", leaf.field),
    }
}
