//! The rule engine: rule files in, decisions out.
//!
//! `yaml` reads text into a spanned tree, `parse` validates it into
//! [`Rule`]s (reporting every mistake with its place), [`RuleSet`] indexes
//! them, `eval` decides whether a rule's conditions hold for an event, and
//! `explain` says why a rule did or did not match, and `target` names the
//! version of a rule's sending part that each delivery is bound to.
//!
//! **Invariant: this module does no I/O and reads no clock or randomness.**
//! Reading the rules directory and resolving secrets from the environment
//! happen in `load`, which hands text and a resolver in. That keeps matching
//! deterministic and testable from data files alone.

pub mod diag;
pub mod eval;
pub mod explain;
pub mod load;
pub mod model;
pub mod parse;
pub mod schema;
pub mod target;
pub mod value;
pub mod yaml;

#[cfg(test)]
mod cases;

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine as _;

pub use diag::{Diagnostic, Severity};
pub use model::*;
pub use parse::SecretResolver;

use crate::event::Event;
use eval::EventView;

/// One rule file's path and text.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// A validated, indexed set of rules, ready for matching.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    index: Index,
    /// Rule name → position in `rules` (names are unique).
    by_name: HashMap<String, usize>,
    /// Some active rule has a JSONPath condition, whose cost the event
    /// drives (bounded per query by `eval::MAX_JSONPATH_WORK`).
    jsonpath: bool,
}

impl RuleSet {
    /// Parses and validates every source and indexes the valid rules.
    /// Returns every diagnostic of every file (errors and warnings), sorted
    /// by file and position. Callers that must not run a partly valid set
    /// (serve, reload) refuse it when any diagnostic is an error.
    pub fn compile(sources: &[Source], secrets: &dyn SecretResolver) -> (RuleSet, Vec<Diagnostic>) {
        let mut diagnostics = Vec::new();
        let mut rules: Vec<Rule> = Vec::new();
        // Rule name → index in `rules`, for the duplicate check across files.
        let mut names: HashMap<String, usize> = HashMap::new();
        for (parsed, file_diagnostics) in parse_all(sources, secrets) {
            diagnostics.extend(file_diagnostics);
            for rule in parsed {
                if let Some(&first) = names.get(&rule.name) {
                    diagnostics.push(Diagnostic {
                        severity: Severity::Error,
                        file: rule.origin.file.clone(),
                        line: rule.origin.span.line,
                        column: rule.origin.span.column,
                        message: format!(
                            "duplicate rule name `{}`: also defined at {}",
                            rule.name, rules[first].origin
                        ),
                        fix: Some(
                            "rule names are unique across the rules directory; rename one of them"
                                .into(),
                        ),
                    });
                    continue;
                }
                names.insert(rule.name.clone(), rules.len());
                rules.push(rule);
            }
        }
        diagnostics.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        (RuleSet::new(rules), diagnostics)
    }

    /// Indexes already validated rules, keeping their order.
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        let index = Index::build(&rules);
        let by_name = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        fn has_jsonpath(c: &model::Condition) -> bool {
            match &c.kind {
                model::ConditionKind::Leaf(leaf) => {
                    matches!(leaf.field, model::Field::JsonPath { .. })
                }
                model::ConditionKind::All(cs) | model::ConditionKind::Any(cs) => {
                    cs.iter().any(has_jsonpath)
                }
                model::ConditionKind::Not(inner) => has_jsonpath(inner),
            }
        }
        let jsonpath = rules
            .iter()
            .any(|r| r.active && r.when.as_ref().is_some_and(has_jsonpath));
        RuleSet {
            rules,
            index,
            by_name,
            jsonpath,
        }
    }

    /// Whether matching may run JSONPath queries: then matching an event
    /// can take milliseconds, and callers keep it off async threads.
    pub fn queries_jsonpath(&self) -> bool {
        self.jsonpath
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule named `name`. Every attempt looks its rule up, so this is
    /// a hash lookup, not a walk through thousands of rules.
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.by_name.get(name).map(|&i| &self.rules[i])
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules that fire for `event`, in rule order. Cost grows with the
    /// rules indexed under the event's type, entity type and scope, not with
    /// the size of the set.
    pub fn matching(&self, event: &Event) -> Vec<&Rule> {
        let view = EventView::new(event);
        let mut candidates = self.index.candidates(event);
        candidates.sort_unstable();
        candidates
            .into_iter()
            .map(|i| &self.rules[i as usize])
            .filter(|rule| rule.decide(&view).is_ok())
            .collect()
    }
}

/// Why a rule does not fire for an event.
#[derive(Debug)]
pub enum Miss<'r> {
    Inactive,
    EventType,
    EntityType,
    Scope {
        key: &'r str,
        expected: &'r serde_json::Value,
    },
    Condition(&'r Condition),
}

/// The longest ordering key kept as it is; a longer one is kept as its
/// SHA-256 (`sha256:` + hex), so a sender's huge field value cannot grow
/// the store's lane index.
pub const MAX_ORDER_KEY: usize = 200;

impl Rule {
    /// The ordered lane this rule's delivery for the event joins (`rule/key`,
    /// see [`lane_id`]), or `None` for a rule without `ordering`. An event
    /// without the key's field joins the key `null`: every such event of the
    /// rule goes in one lane, rather than unordered. Pure.
    pub fn lane(&self, view: &EventView<'_>) -> Option<String> {
        let ordering = self.ordering.as_ref()?;
        let ev = view.event;
        let key = match &ordering.key {
            OrderKey::Entity => {
                let id = ev.entity.get("id").map(key_text).unwrap_or_default();
                format!("{}:{id}", ev.entity_type)
            }
            OrderKey::Field(field) => field
                .read(view, false)
                .map_or_else(|| "null".to_string(), |v| key_text(&v)),
        };
        Some(lane_id(&self.name, &key))
    }

    /// Whether this rule fires for the event, checking the cheap filters
    /// first. Pure.
    pub fn decide<'r>(&'r self, view: &EventView<'_>) -> Result<(), Miss<'r>> {
        let ev = view.event;
        if !self.active {
            return Err(Miss::Inactive);
        }
        if !self.events.contains(&ev.event_type) {
            return Err(Miss::EventType);
        }
        if !self.entity_types.is_empty() && !self.entity_types.contains(&ev.entity_type) {
            return Err(Miss::EntityType);
        }
        for (key, expected) in &self.scope {
            if !ev
                .scope
                .get(key)
                .is_some_and(|actual| value::scope_eq(expected, actual))
            {
                return Err(Miss::Scope { key, expected });
            }
        }
        match &self.when {
            Some(cond) => {
                view.clear_refused();
                let decided = cond.eval(view).map_err(Miss::Condition);
                // A JSONPath too costly on this event leaves the condition
                // undecided: the rule does not fire, whatever the operator
                // (a `not` around it must not turn the refusal into a match).
                if view.refused_query().is_some() {
                    return Err(Miss::Condition(cond));
                }
                decided
            }
            None => Ok(()),
        }
    }
}

/// A key's text: a string as it is, anything else as compact JSON.
fn key_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A lane's id: the rule name, `/`, the key (rule names have no `/`, so
/// the first one splits it), the key hashed past [`MAX_ORDER_KEY`] bytes.
pub fn lane_id(rule: &str, key: &str) -> String {
    use sha2::Digest as _;
    if key.len() <= MAX_ORDER_KEY {
        return format!("{rule}/{key}");
    }
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{rule}/sha256:{hex}")
}

/// Candidate lists by event type, then entity type, then one scope key.
#[derive(Debug, Default)]
struct Index {
    by_event: HashMap<String, EventBucket>,
}

#[derive(Debug, Default)]
struct EventBucket {
    by_entity: HashMap<String, ScopedList>,
    any_entity: ScopedList,
}

/// Rules split by the value of the scope key most of them constrain (often
/// `workspace_id`), so a tenant's event skips other tenants' rules.
#[derive(Debug, Default)]
struct ScopedList {
    key: Option<String>,
    by_value: HashMap<String, Vec<u32>>,
    rest: Vec<u32>,
}

impl Index {
    fn build(rules: &[Rule]) -> Index {
        // event → (entity type → rule ids, rule ids for any entity type)
        type Lists = HashMap<String, (HashMap<String, Vec<u32>>, Vec<u32>)>;
        let mut lists: Lists = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            if !rule.active {
                continue;
            }
            let i = i as u32;
            let mut events: Vec<&String> = rule.events.iter().collect();
            events.dedup();
            for event in events {
                let (by_entity, any) = lists.entry(event.clone()).or_default();
                if rule.entity_types.is_empty() {
                    any.push(i);
                } else {
                    for t in &rule.entity_types {
                        let list = by_entity.entry(t.clone()).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
            }
        }
        let by_event = lists
            .into_iter()
            .map(|(event, (by_entity, any))| {
                let bucket = EventBucket {
                    by_entity: by_entity
                        .into_iter()
                        .map(|(t, ids)| (t, ScopedList::build(ids, rules)))
                        .collect(),
                    any_entity: ScopedList::build(any, rules),
                };
                (event, bucket)
            })
            .collect();
        Index { by_event }
    }

    fn candidates(&self, ev: &Event) -> Vec<u32> {
        let mut out = Vec::new();
        if let Some(bucket) = self.by_event.get(&ev.event_type) {
            if let Some(list) = bucket.by_entity.get(&ev.entity_type) {
                list.extend_candidates(ev, &mut out);
            }
            bucket.any_entity.extend_candidates(ev, &mut out);
        }
        out
    }
}

impl ScopedList {
    fn build(ids: Vec<u32>, rules: &[Rule]) -> ScopedList {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for &i in &ids {
            for (k, _) in &rules[i as usize].scope {
                *counts.entry(k.as_str()).or_default() += 1;
            }
        }
        // Ties broken by name so the index is the same on every load.
        let key = counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
            .map(|(k, _)| k.to_string());
        let mut list = ScopedList {
            key,
            ..Default::default()
        };
        for i in ids {
            let scope_value = list.key.as_ref().and_then(|key| {
                rules[i as usize]
                    .scope
                    .iter()
                    .find(|(k, _)| k == key)
                    .and_then(|(_, v)| value::scalar_key(v))
            });
            match scope_value {
                Some(v) => list.by_value.entry(v).or_default().push(i),
                None => list.rest.push(i),
            }
        }
        list
    }

    fn extend_candidates(&self, ev: &Event, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.rest);
        if let Some(key) = &self.key
            && let Some(ids) = ev
                .scope
                .get(key)
                .and_then(value::scalar_key)
                .and_then(|v| self.by_value.get(&v))
        {
            out.extend_from_slice(ids);
        }
    }
}

/// Checks a Standard Webhooks secret: `whsec_` + base64 of 24 to 64 bytes.
pub fn check_whsec(secret: &str) -> Result<Vec<u8>, String> {
    let Some(b64) = secret.strip_prefix("whsec_") else {
        return Err("it does not start with `whsec_`".into());
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        // The decoder's error names the offending character: not shown.
        .map_err(|_| "the part after `whsec_` is not valid base64".to_string())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("the key is {} bytes long", key.len()));
    }
    Ok(key)
}

/// Parses every source, on as many threads as there are cores: a file's
/// parse depends on nothing but its text and the secrets, and compiling
/// the regexes and JSONPaths of thousands of rules is most of a reload.
/// Results come back in source order, so the outcome does not depend on
/// the scheduling.
fn parse_all(
    sources: &[Source],
    secrets: &dyn SecretResolver,
) -> Vec<(Vec<Rule>, Vec<Diagnostic>)> {
    let parse_one = |source: &Source| {
        let mut sink = diag::Sink::new(&source.path);
        let parsed = parse::parse_file(&source.path, &source.text, secrets, &mut sink);
        (parsed, sink.diagnostics)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || sources.len() < 2 {
        return sources.iter().map(parse_one).collect();
    }
    let chunk = sources.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = sources
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(parse_one).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("rule parsing does not panic"))
            .collect()
    })
}
