//! `select-fields`: keeps only the entity fields a rule's `fields:` select.
//!
//! The host runs this plugin first in the chain of every rule that has `fields:`, so receivers
//! get the fields they asked for and nothing else the source happened to send (less to parse,
//! less personal data to leak). Its config is built by the host from the rule:
//!
//! ```json
//! {
//!   "fields": ["name", "phase.id", "*_udf", "$.comments[?@.author=='bot']", {"label": "Root Cause"}],
//!   "labels": {"Root Cause": "root_cause_udf"}
//! }
//! ```
//!
//! Each entry of `fields` is one selector:
//! - a field name (`name`): keeps that top-level field whole;
//! - a dotted path (`phase.id`): keeps only that nested value, so `phase` becomes
//!   `{"id": "phase.defect.opened"}`; array elements are named by index (`comments.0.author`);
//! - a pattern with `*` and `?` (`*_udf`): keeps every top-level field whose name matches;
//! - a JSONPath starting with `$` (`$.comments[?@.author=='bot']`), evaluated against the entity:
//!   keeps what it matches at its place, matched array elements in order and compacted;
//! - `{"label": "Root Cause"}`: the UDF that `labels` names for that label.
//!
//! The output is the payload unchanged except that `entity` keeps only `id` and `type` (always,
//! and always first) and the selected fields, in the entity's own key order, and `changes` (on
//! updates) keeps only the fields whose top-level key is still in the entity. A selected field
//! the entity does not have is simply absent. With no config or an empty `fields`, the payload
//! passes through unchanged.
//!
//! This plugin runs on every delivery of such rules, so the component works on the payload's JSON
//! text (module `skim`): it scans it once, copies out what it keeps, and builds no `Value` for
//! what passes through or is dropped. Selections with JSONPaths, and odd payloads, take the
//! `Value` path (`Selection::apply`), which narrows the entity in place; it is also the reference
//! the unit tests hold the text path to.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rulehook_plugin_sdk::config::ConfigError;
use rulehook_plugin_sdk::jsonpath::{JsonPath, Step};
use rulehook_plugin_sdk::path::{self, kind};
use rulehook_plugin_sdk::{Context, Outcome, Plugin, RawOutcome, RawPlugin, Value, log, udf};
use serde_json::Map;

mod skim;

/// The plugin: keeps the selected entity fields.
pub struct SelectFields;

/// The reference implementation over a parsed payload; the unit tests check the exported
/// [`RawPlugin`] against it.
impl Plugin for SelectFields {
    fn transform(_ctx: &Context, payload: Value, config: &Value) -> Result<Outcome, String> {
        let selection = Selection::from_config(config)?;
        Ok(Outcome::Send(selection.apply(payload)?))
    }

    fn validate_config(config: &Value) -> Result<(), String> {
        Selection::from_config(config)?;
        Ok(())
    }
}

/// What the component exports. Parsing a 5 KB payload into `Value`s and writing it back takes
/// longer than the plugin's whole time budget, while most of it goes out as it came or is
/// dropped, so this works on the text (module `skim`) and falls back to the `Value` path only
/// for what that does not handle. With nothing to select, the text goes back untouched.
impl RawPlugin for SelectFields {
    fn transform_raw(_ctx: &Context, payload: String, config: &str) -> Result<RawOutcome, String> {
        let config = config_from_text(config)?;
        let selection = Selection::from_config(&config)?;
        if selection.is_empty() {
            return Ok(RawOutcome::Send(payload));
        }
        if let Some(selected) = skim::select(&payload, &selection) {
            return selected.map(RawOutcome::Send);
        }
        let payload: Value = serde_json::from_str(&payload).map_err(|e| {
            format!(
                "payload is not valid JSON ({e}); the host passes the event payload or the \
                 previous plugin's output, so check the plugin before this one in the chain"
            )
        })?;
        let selected = selection.apply(payload)?;
        serde_json::to_string(&selected)
            .map(RawOutcome::Send)
            .map_err(|e| format!("the selected payload could not be serialized as JSON: {e}"))
    }

    fn validate_config_raw(config: &str) -> Result<(), String> {
        <Self as Plugin>::validate_config(&config_from_text(config)?)
    }
}

rulehook_plugin_sdk::export_plugin!(raw SelectFields);

/// The config as the host passes it: JSON text, empty when the rule gives none.
fn config_from_text(config: &str) -> Result<Value, String> {
    if config.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(config).map_err(|e| {
        format!("config is not valid JSON ({e}); check the rule's `fields` and `labels`")
    })
}

/// The config keys this plugin understands.
const SETTINGS: &[&str] = &["fields", "labels"];

/// Fields every selection keeps: a receiver cannot act on an entity it cannot identify.
const ALWAYS_KEPT: [&str; 2] = ["id", "type"];

/// A rule's `fields`, parsed from the config. It borrows the config's strings: the plugin keeps no
/// state between calls, so this is rebuilt per call and should cost no more than it must.
#[derive(Debug, Default)]
struct Selection<'a> {
    /// Top-level field names: plain names and the UDF names that `{label}` entries resolve to.
    names: Vec<&'a str>,
    /// Dotted paths of two or more segments. Whether a segment is a key or an index depends on
    /// the entity, so they are resolved against each entity.
    paths: Vec<&'a str>,
    /// Globs over top-level field names, matched with [`udf::glob_match`].
    patterns: Vec<&'a str>,
    /// JSONPaths over the entity.
    jsonpaths: Vec<JsonPath>,
}

impl<'a> Selection<'a> {
    /// Parses the config, naming the offending entry (`fields[2]`, `labels.Root Cause`) and the
    /// fix on any mistake.
    fn from_config(config: &'a Value) -> Result<Self, ConfigError> {
        let settings = match config {
            Value::Null => return Ok(Self::default()),
            Value::Object(settings) => settings,
            other => {
                return Err(ConfigError::new(
                    "",
                    format!(
                        "the config must be an object such as {{\"fields\": [\"name\", \"phase.id\"]}}; found {}",
                        kind(other)
                    ),
                ));
            }
        };
        if let Some(unknown) = settings.keys().find(|k| !SETTINGS.contains(&k.as_str())) {
            return Err(ConfigError::new(
                unknown.as_str(),
                "unknown setting; select-fields takes `fields` (the selectors) and `labels` \
                 (UDF label to field name)",
            ));
        }
        let labels = parse_labels(settings.get("labels"))?;
        let entries = match settings.get("fields") {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Array(entries)) => entries,
            Some(other) => {
                return Err(ConfigError::new(
                    "fields",
                    format!(
                        "must be a list of selectors such as [\"name\", \"phase.id\", \"*_udf\"]; found {}",
                        kind(other)
                    ),
                ));
            }
        };
        let mut selection = Self::default();
        for (i, entry) in entries.iter().enumerate() {
            selection
                .add(entry, labels)
                .map_err(|message| ConfigError::new(format!("fields[{i}]"), message))?;
        }
        Ok(selection)
    }

    fn add(
        &mut self,
        entry: &'a Value,
        labels: Option<&'a Map<String, Value>>,
    ) -> Result<(), String> {
        match entry {
            Value::String(selector) => self.add_selector(selector),
            Value::Object(object) => {
                if let Some(key) = object.keys().find(|k| *k != "label") {
                    return Err(format!(
                        "unknown key `{key}`; an object entry selects a UDF by its label, like \
                         {{\"label\": \"Root Cause\"}}"
                    ));
                }
                let label = match object.get("label") {
                    Some(Value::String(label)) => label,
                    Some(other) => {
                        return Err(format!(
                            "`label` must be a string such as \"Root Cause\"; found {}",
                            kind(other)
                        ));
                    }
                    None => {
                        return Err(
                            "missing `label`; write {\"label\": \"Root Cause\"} to select \
                                    a UDF by its label"
                                .to_owned(),
                        );
                    }
                };
                // `parse_labels` has checked that every value is a string.
                match labels.and_then(|l| l.get(label)).and_then(Value::as_str) {
                    Some(name) => {
                        self.names.push(name);
                        Ok(())
                    }
                    None => Err(unknown_label(label, labels)),
                }
            }
            other => Err(format!(
                "must be a field name, dotted path, pattern or JSONPath string, or \
                 {{\"label\": \"Root Cause\"}}; found {}",
                kind(other)
            )),
        }
    }

    fn add_selector(&mut self, selector: &'a str) -> Result<(), String> {
        if selector.starts_with('$') {
            let jsonpath = JsonPath::parse(selector).map_err(|e| e.to_string())?;
            self.jsonpaths.push(jsonpath);
        } else if udf::is_glob(selector) {
            if selector.contains('.') {
                return Err(format!(
                    "pattern \"{selector}\" contains a \".\", but patterns match top-level field \
                     names only; select nested values with a JSONPath such as \"$.phase.*\""
                ));
            }
            self.patterns.push(selector);
        } else if path::segments(selector).map_err(|e| e.to_string())?.len() == 1 {
            self.names.push(selector);
        } else {
            self.paths.push(selector);
        }
        Ok(())
    }

    /// Whether the top-level entity field `key` is selected whole, by name or pattern.
    fn keeps_whole(&self, key: &str) -> bool {
        self.names.contains(&key) || self.patterns.iter().any(|p| udf::glob_match(p, key))
    }

    /// Whether a dotted path selects something inside the top-level entity field `key`.
    fn reaches_into(&self, key: &str) -> bool {
        self.paths.iter().any(|p| p.split('.').next() == Some(key))
    }

    fn is_empty(&self) -> bool {
        self.names.is_empty()
            && self.paths.is_empty()
            && self.patterns.is_empty()
            && self.jsonpaths.is_empty()
    }

    /// Narrows the payload's `entity` to the selection and its `changes` to what is left.
    fn apply(&self, mut payload: Value) -> Result<Value, String> {
        if self.is_empty() {
            return Ok(payload);
        }
        let Value::Object(root) = &mut payload else {
            return Err(format!(
                "the payload is {}, not an object; select-fields expects the event payload the \
                 host builds, so check the plugin before it in the chain",
                kind(&payload)
            ));
        };
        let keep = match root.get("entity") {
            None => {
                log::debug("the payload has no `entity`, so there are no fields to select");
                return Ok(payload);
            }
            Some(entity @ Value::Object(_)) => self.keep_tree(entity)?,
            Some(other) => {
                return Err(format!(
                    "the payload's `entity` is {}, not an object; select-fields keeps fields of \
                     the entity object the host builds, so check the plugin before it in the chain",
                    kind(other)
                ));
            }
        };
        let Some(Value::Object(entity)) = root.get_mut("entity") else {
            // Checked just above; nothing to select otherwise.
            return Ok(payload);
        };
        self.select(entity, &keep);
        // Taken out for a moment so `changes` can be narrowed while the entity is looked at.
        let entity = std::mem::take(entity);
        if let Some(Value::Object(changes)) = root.get_mut("changes") {
            changes.retain(|field, _| entity.contains_key(field));
        }
        root.insert("entity".to_owned(), Value::Object(entity));
        Ok(payload)
    }

    /// Narrows `entity`, in place, to `id`, `type` and the selected fields, in its own key order
    /// but with `id` and `type` first. In place, because moving every kept field into a new map
    /// would hash each key again.
    fn select(&self, entity: &mut Map<String, Value>, keep: &Keep<'_>) {
        entity.retain(|key, value| {
            if keep.all
                || ALWAYS_KEPT.contains(&key.as_str())
                || self.patterns.iter().any(|p| udf::glob_match(p, key))
            {
                return true;
            }
            let Some(below) = keep.keys.get(key.as_str()) else {
                return false;
            };
            match below.prune(std::mem::take(value)) {
                Some(kept) => {
                    *value = kept;
                    true
                }
                None => false,
            }
        });
        // The host builds entities with `id` and `type` first; another source may not have.
        let mut front = 0;
        for key in ALWAYS_KEPT {
            if !entity.contains_key(key) {
                continue;
            }
            if entity.keys().nth(front).map(String::as_str) != Some(key)
                && let Some((key, value)) = entity.shift_remove_entry(key)
            {
                entity.shift_insert(front, key, value);
            }
            front += 1;
        }
    }

    /// What to keep below the top level: names, paths and JSONPath matches merged into one tree.
    /// Patterns are not in it, as they are matched against each top-level name as it goes by.
    fn keep_tree(&self, entity: &Value) -> Result<Keep<'a>, String> {
        let mut keep = Keep::default();
        for name in &self.names {
            keep.insert_name(name);
        }
        for path in &self.paths {
            if let Some(steps) = locate_path(entity, path) {
                keep.insert_steps(steps);
            }
        }
        for jsonpath in &self.jsonpaths {
            for location in jsonpath.locate(entity).map_err(|e| e.to_string())? {
                keep.insert_steps(location.0);
            }
        }
        Ok(keep)
    }
}

/// Checks `labels` (label → UDF field name) and returns it, `None` when there is none.
fn parse_labels(labels: Option<&Value>) -> Result<Option<&Map<String, Value>>, ConfigError> {
    let labels = match labels {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(labels)) => labels,
        Some(other) => {
            return Err(ConfigError::new(
                "labels",
                format!(
                    "must be an object from UDF label to field name, such as \
                     {{\"Rework Counter\": \"rework_counter_udf\"}}; found {}",
                    kind(other)
                ),
            ));
        }
    };
    for (label, name) in labels {
        match name {
            Value::String(name) if !name.is_empty() => {}
            other => {
                return Err(ConfigError::new(
                    format!("labels.{label}"),
                    format!(
                        "must be the UDF's field name as a non-empty string, such as \
                         \"rework_counter_udf\"; found {other}"
                    ),
                ));
            }
        }
    }
    Ok(Some(labels))
}

fn unknown_label(label: &str, labels: Option<&Map<String, Value>>) -> String {
    let known: Vec<String> = labels
        .into_iter()
        .flat_map(|l| l.keys())
        .map(|l| format!("\"{l}\""))
        .collect();
    let known = if known.is_empty() {
        "there are none".to_owned()
    } else {
        format!("known: {}", known.join(", "))
    };
    format!(
        "label \"{label}\" is not in `labels`; add it there as \"{label}\": \"<field>_udf\", or \
         use a known label ({known})"
    )
}

/// The steps to the value a dotted path names in `entity`, or `None` if it names nothing there.
/// Whether a segment is a key or an index depends on what it meets, as in
/// [`path::get_path`].
fn locate_path(entity: &Value, dotted: &str) -> Option<Vec<Step>> {
    let segments = path::segments(dotted).ok()?;
    let mut steps = Vec::with_capacity(segments.len());
    let mut current = entity;
    for segment in segments {
        current = match current {
            Value::Object(map) => {
                steps.push(Step::Key(segment.to_owned()));
                map.get(segment)?
            }
            Value::Array(items) => {
                let index = segment.parse::<usize>().ok()?;
                steps.push(Step::Index(index));
                items.get(index)?
            }
            _ => return None,
        };
    }
    Some(steps)
}

/// What to keep of a value: all of it, or some of its members or elements.
#[derive(Debug, Default)]
struct Keep<'a> {
    /// Keep the whole value (it was selected itself, not only something inside it).
    all: bool,
    /// Object members to keep some of.
    keys: BTreeMap<Cow<'a, str>, Keep<'a>>,
    /// Array elements to keep some of.
    indexes: BTreeMap<usize, Keep<'a>>,
}

impl<'a> Keep<'a> {
    /// Marks the top-level field `name` as kept whole.
    fn insert_name(&mut self, name: &'a str) {
        if !self.all {
            self.keys.entry(Cow::Borrowed(name)).or_default().keep_all();
        }
    }

    /// Marks the value at `steps` below this one as kept whole.
    fn insert_steps(&mut self, steps: Vec<Step>) {
        let mut node = self;
        for step in steps {
            if node.all {
                return;
            }
            node = match step {
                Step::Key(key) => node.keys.entry(Cow::Owned(key)).or_default(),
                Step::Index(index) => node.indexes.entry(index).or_default(),
            };
        }
        node.keep_all();
    }

    fn keep_all(&mut self) {
        self.all = true;
        self.keys.clear();
        self.indexes.clear();
    }

    /// What is left of `value` once everything not kept is dropped; `None` if nothing is.
    fn prune(&self, value: Value) -> Option<Value> {
        if self.all {
            return Some(value);
        }
        match value {
            Value::Object(members) if !self.keys.is_empty() => {
                let kept: Map<String, Value> = members
                    .into_iter()
                    .filter_map(|(key, value)| {
                        let value = self.keys.get(key.as_str())?.prune(value)?;
                        Some((key, value))
                    })
                    .collect();
                (!kept.is_empty()).then_some(Value::Object(kept))
            }
            Value::Array(items) if !self.indexes.is_empty() => {
                let kept: Vec<Value> = items
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, item)| self.indexes.get(&i)?.prune(item))
                    .collect();
                (!kept.is_empty()).then_some(Value::Array(kept))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rulehook_plugin_sdk::json;
    use rulehook_plugin_sdk::testing::{
        context_for, run, run_raw, sample_create, sample_delete, sample_update, validate,
    };

    /// Runs the plugin and returns what it sent, failing the test on anything else, and checks
    /// that the exported raw path sends the very same text.
    fn send(payload: &Value, config: &Value) -> Value {
        let ctx = context_for(payload);
        let (result, _) = run::<SelectFields>(&ctx, payload, config);
        let out = match result {
            Ok(Outcome::Send(out)) => out,
            other => panic!("{config}: expected Send, got {other:?}"),
        };
        let text = payload.to_string();
        let (raw, _) = run_raw::<SelectFields>(&ctx, &text, &config.to_string());
        assert_eq!(
            raw,
            Ok(RawOutcome::Send(out.to_string())),
            "{config}: the raw path differs"
        );
        // And it got there over the text, unless JSONPaths sent it to the full parse.
        if let Ok(selection) = Selection::from_config(config)
            && selection.jsonpaths.is_empty()
            && !selection.is_empty()
        {
            let skimmed = skim::select(&text, &selection);
            assert!(matches!(skimmed, Some(Ok(_))), "{config}: {skimmed:?}");
        }
        out
    }

    /// The error both paths give for `payload` and `config`; they must agree.
    fn error(payload: &Value, config: &Value) -> String {
        let ctx = context_for(payload);
        let (result, _) = run::<SelectFields>(&ctx, payload, config);
        let err = result.expect_err(&format!("{config} on {payload}"));
        let (raw, _) = run_raw::<SelectFields>(&ctx, &payload.to_string(), &config.to_string());
        assert_eq!(raw, Err(err.clone()), "{config}: the raw path differs");
        err
    }

    /// The entity `fields` keep of `sample_update()`, compared as text so key order counts.
    fn check(fields: Value, labels: Value, expected_entity: Value) {
        let config = json!({"fields": fields, "labels": labels});
        let out = send(&sample_update(), &config);
        assert_eq!(
            out["entity"].to_string(),
            expected_entity.to_string(),
            "{config}"
        );
    }

    #[test]
    fn selectors_keep_what_they_name() {
        let labels =
            json!({"Root Cause": "root_cause_udf", "Rework Counter": "rework_counter_udf"});
        let base = || json!({"id": "2013", "type": "defect"});
        let with = |extra: Value| {
            let mut e = base();
            if let (Value::Object(e), Value::Object(extra)) = (&mut e, extra) {
                e.extend(extra);
            }
            e
        };
        let cases: Vec<(Value, Value)> = vec![
            // Names, in the entity's order whatever the selectors' order.
            (json!(["name"]), with(json!({"name": "Crash on save"}))),
            (
                json!(["root_cause_udf", "name"]),
                with(json!({"name": "Crash on save", "root_cause_udf": "config"})),
            ),
            (json!(["id"]), base()),
            (json!(["type", "id"]), base()),
            // Dotted paths keep only the nested value, merged when several share a parent.
            (
                json!(["phase.id"]),
                with(json!({"phase": {"id": "phase.defect.opened"}})),
            ),
            (
                json!(["phase.name", "phase.id"]),
                with(json!({"phase": {"id": "phase.defect.opened", "name": "Opened"}})),
            ),
            (
                json!(["phase.id", "phase"]),
                with(json!({"phase": {"id": "phase.defect.opened", "name": "Opened"}})),
            ),
            (
                json!(["comments.1.author"]),
                with(json!({"comments": [{"author": "ann"}]})),
            ),
            // Patterns over top-level names.
            (
                json!(["*_udf"]),
                with(json!({"rework_counter_udf": 2, "root_cause_udf": "config"})),
            ),
            (json!(["re?ork*"]), with(json!({"rework_counter_udf": 2}))),
            (json!(["root*"]), with(json!({"root_cause_udf": "config"}))),
            (
                json!(["*_*_udf"]),
                with(json!({"rework_counter_udf": 2, "root_cause_udf": "config"})),
            ),
            // JSONPaths keep matches at their place; matched elements compacted, in order.
            (
                json!(["$.comments[?@.author=='bot']"]),
                with(json!({"comments": [
                    {"author": "bot", "text": "auto-triaged"},
                    {"author": "bot", "text": "reopened"},
                ]})),
            ),
            (
                json!(["$.comments[*].text"]),
                with(json!({"comments": [
                    {"text": "auto-triaged"}, {"text": "seen it too"}, {"text": "reopened"},
                ]})),
            ),
            (
                json!(["$.severity.name", "$['phase']"]),
                with(json!({
                    "severity": {"name": "High"},
                    "phase": {"id": "phase.defect.opened", "name": "Opened"},
                })),
            ),
            (json!(["$"]), sample_update()["entity"].clone()),
            // Labels resolve to UDF names.
            (
                json!([{"label": "Root Cause"}]),
                with(json!({"root_cause_udf": "config"})),
            ),
            // Mixed, overlapping selectors.
            (
                json!(["*_udf", {"label": "Rework Counter"}, "phase.id", "$.phase.name"]),
                with(json!({
                    "phase": {"id": "phase.defect.opened", "name": "Opened"},
                    "rework_counter_udf": 2,
                    "root_cause_udf": "config",
                })),
            ),
            (
                json!(["severity", "comments.1.author", {"label": "Rework Counter"}, "root*", "phase.id"]),
                with(json!({
                    "severity": {"id": "list_node.severity.high", "name": "High"},
                    "phase": {"id": "phase.defect.opened"},
                    "rework_counter_udf": 2,
                    "root_cause_udf": "config",
                    "comments": [{"author": "ann"}],
                })),
            ),
            // Whatever the entity lacks is simply absent.
            (
                json!([
                    "missing",
                    "phase.missing",
                    "name.first",
                    "comments.9",
                    "comments.x",
                    "nope_*",
                    "$.comments[?@.author=='nobody']",
                ]),
                base(),
            ),
        ];
        for (fields, expected) in cases {
            check(fields, labels.clone(), expected);
        }
    }

    #[test]
    fn id_and_type_come_first_and_the_rest_keeps_the_entity_order() {
        let payload = json!({"entity": {"z": 1, "type": "story", "a": 2, "id": "7", "m": 3}});
        let out = send(&payload, &json!({"fields": ["m", "z", "a"]}));
        assert_eq!(
            out.to_string(),
            r#"{"entity":{"id":"7","type":"story","z":1,"a":2,"m":3}}"#
        );
        // An entity without `id` or `type` does not get them invented.
        let out = send(
            &json!({"entity": {"a": 1, "b": 2}}),
            &json!({"fields": ["b"]}),
        );
        assert_eq!(out.to_string(), r#"{"entity":{"b":2}}"#);
    }

    #[test]
    fn keys_and_values_that_need_escapes_survive_both_paths() {
        let payload = json!({
            "event_id": "e\"1\"",
            "entity": {
                "type": "defect",
                "id": "1",
                "quote\"d": "a\\b",
                "tab\t_udf": "line\nbreak \u{1f}",
                "caf\u{e9}": {"\u{e9}t\u{e9}": 1.5, "n": -0.0},
                "big": 12345678901234567890u64,
                "skip\"me": [1, 2],
            },
            "changes": {"quote\"d": {"old": null, "new": "a\\b"}, "skip\"me": {"old": [], "new": [1, 2]}},
        });
        let out = send(
            &payload,
            &json!({"fields": ["quote\"d", "*_udf", "caf\u{e9}.\u{e9}t\u{e9}", "big"]}),
        );
        assert_eq!(
            out["entity"],
            json!({
                "id": "1",
                "type": "defect",
                "quote\"d": "a\\b",
                "tab\t_udf": "line\nbreak \u{1f}",
                "caf\u{e9}": {"\u{e9}t\u{e9}": 1.5},
                "big": 12345678901234567890u64,
            })
        );
        assert_eq!(
            out["changes"],
            json!({"quote\"d": {"old": null, "new": "a\\b"}})
        );
    }

    #[test]
    fn changes_keep_only_fields_still_in_the_entity() {
        let cases: &[(Value, &[&str])] = &[
            (json!(["name"]), &[]),
            (json!(["phase.id"]), &["phase"]),
            (json!(["*_udf"]), &["rework_counter_udf"]),
            (json!(["$..id"]), &["phase"]),
            (
                json!(["rework_counter_udf", "phase"]),
                &["phase", "rework_counter_udf"],
            ),
        ];
        for (fields, expected) in cases {
            let out = send(&sample_update(), &json!({"fields": fields}));
            let changes = out["changes"].as_object().expect("changes stay an object");
            let keys: Vec<&str> = changes.keys().map(String::as_str).collect();
            assert_eq!(keys, *expected, "{fields}");
            // A kept change is kept whole, old and new.
            for key in keys {
                assert_eq!(changes[key], sample_update()["changes"][key], "{fields}");
            }
        }
    }

    #[test]
    fn everything_but_entity_and_changes_is_untouched() {
        let out = send(&sample_update(), &json!({"fields": ["name"]}));
        let mut expected = sample_update();
        expected["entity"] = json!({"id": "2013", "type": "defect", "name": "Crash on save"});
        expected["changes"] = json!({});
        assert_eq!(out.to_string(), expected.to_string());

        // Create and delete payloads have no `changes`, and get none.
        for payload in [sample_create(), sample_delete()] {
            let out = send(&payload, &json!({"fields": ["name"]}));
            assert!(out.get("changes").is_none(), "{out}");
            assert_eq!(out["entity"]["name"], "Crash on save");
        }
    }

    #[test]
    fn no_selection_passes_the_payload_through() {
        for config in [
            Value::Null,
            json!({}),
            json!({"fields": []}),
            json!({"fields": null, "labels": {"A": "a_udf"}}),
        ] {
            let out = send(&sample_update(), &config);
            assert_eq!(out.to_string(), sample_update().to_string(), "{config}");
        }
    }

    #[test]
    fn payloads_without_an_entity_object() {
        let config = json!({"fields": ["name"]});
        let payload = json!({"event_id": "e"});
        assert_eq!(send(&payload, &config), payload);

        let cases = [
            (
                json!({"entity": "2013"}),
                "the payload's `entity` is a string",
            ),
            (json!([1]), "the payload is an array"),
        ];
        for (payload, message) in cases {
            let err = error(&payload, &config);
            assert!(err.starts_with(message), "{payload}: {err}");
        }
        let (result, _) = run_raw::<SelectFields>(&Context::default(), "{\"entity\":", "");
        assert_eq!(
            result,
            Ok(RawOutcome::Send("{\"entity\":".into())),
            "no selection, no parse"
        );
        let (result, _) = run_raw::<SelectFields>(&Context::default(), "{", r#"{"fields":["a"]}"#);
        assert!(result.unwrap_err().starts_with("payload is not valid JSON"));
    }

    #[test]
    fn bad_configs_name_the_entry_and_the_fix() {
        let cases = [
            (
                json!("name"),
                "the config must be an object such as {\"fields\": [\"name\", \"phase.id\"]}; found a string",
            ),
            (
                json!({"field": ["name"]}),
                "field: unknown setting; select-fields takes `fields`",
            ),
            (
                json!({"fields": "name"}),
                "fields: must be a list of selectors such as",
            ),
            (
                json!({"fields": ["name", 3]}),
                "fields[1]: must be a field name, dotted path, pattern or JSONPath string",
            ),
            (
                json!({"fields": ["name", "phase..id"]}),
                "fields[1]: field path \"phase..id\" has an empty segment",
            ),
            (json!({"fields": [""]}), "fields[0]: field path is empty"),
            (
                json!({"fields": ["$.comments[?"]}),
                "fields[0]: JSONPath \"$.comments[?\" is invalid: ",
            ),
            (
                json!({"fields": ["phase.*"]}),
                "fields[0]: pattern \"phase.*\" contains a \".\"",
            ),
            (
                json!({"fields": ["name", "severity", {"label": "Root Cuase"}],
                       "labels": {"Root Cause": "root_cause_udf"}}),
                "fields[2]: label \"Root Cuase\" is not in `labels`; add it there as \
                 \"Root Cuase\": \"<field>_udf\", or use a known label (known: \"Root Cause\")",
            ),
            (
                json!({"fields": [{"label": "Root Cause"}]}),
                "fields[0]: label \"Root Cause\" is not in `labels`",
            ),
            (
                json!({"fields": [{"lable": "Root Cause"}]}),
                "fields[0]: unknown key `lable`",
            ),
            (json!({"fields": [{}]}), "fields[0]: missing `label`"),
            (
                json!({"fields": [{"label": 5}]}),
                "fields[0]: `label` must be a string",
            ),
            (
                json!({"fields": ["name"], "labels": ["Root Cause"]}),
                "labels: must be an object from UDF label to field name",
            ),
            (
                json!({"fields": ["name"], "labels": {"Root Cause": 5}}),
                "labels.Root Cause: must be the UDF's field name as a non-empty string",
            ),
            (
                json!({"labels": {"Root Cause": ""}}),
                "labels.Root Cause: must be the UDF's field name",
            ),
        ];
        for (config, message) in cases {
            let (result, _) = validate::<SelectFields>(&config);
            let err = result.expect_err(&config.to_string());
            assert!(
                err.starts_with(message),
                "{config}:\n  got  {err}\n  want {message}"
            );
            // The same mistake fails a delivery with the same message.
            assert_eq!(error(&sample_update(), &config), err, "{config}");
            assert_eq!(
                SelectFields::validate_config_raw(&config.to_string()),
                Err(err),
                "{config}"
            );
        }
    }

    #[test]
    fn good_configs_validate() {
        for config in [
            Value::Null,
            json!({"fields": []}),
            json!({"fields": ["name", "phase.id", "*_udf", "$.comments[0]", {"label": "A"}],
                   "labels": {"A": "a_udf", "B": "a_udf"}}),
        ] {
            assert_eq!(validate::<SelectFields>(&config).0, Ok(()), "{config}");
            let text = config.to_string();
            assert_eq!(SelectFields::validate_config_raw(&text), Ok(()), "{config}");
        }
    }

    #[test]
    fn odd_payloads_get_an_answer_not_a_panic() {
        let configs = [
            json!({"fields": ["name", "a.b.1.c", "owner.email", "*", "$..c", {"label": "A"}], "labels": {"A": "a"}}),
            json!({"fields": ["comments.0.0", "id.x", "a"]}),
        ];
        for config in configs {
            for payload in rulehook_plugin_sdk::testing::odd_payloads() {
                let (result, _) = run::<SelectFields>(&Context::default(), &payload, &config);
                if let Err(err) = &result {
                    assert!(err.contains("payload"), "{config} on {payload}: {err}");
                }
                // The exported text path gives the same answer.
                let text = payload.to_string();
                let (raw, _) =
                    run_raw::<SelectFields>(&Context::default(), &text, &config.to_string());
                let result = result.map(|outcome| match outcome {
                    Outcome::Send(out) => RawOutcome::Send(out.to_string()),
                    Outcome::Skip(reason) => RawOutcome::Skip(reason),
                });
                assert_eq!(raw, result, "{config} on {payload}");
            }
        }
    }
}
