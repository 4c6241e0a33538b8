//! `udf-labels`: renames user-defined fields (UDFs) to their labels, or labels back to names.
//!
//! ALM suites name the fields an administrator adds `something_udf`, while people know them by
//! the label the suite shows ("Rework Counter"). A receiver read by people (a chat message, a
//! spreadsheet) is easier to read with labels; one that writes back to the suite needs names.
//!
//! Config:
//!
//! ```json
//! {
//!   "labels": {"Rework Counter": "rework_counter_udf", "Root Cause": "root_cause_udf"},
//!   "direction": "to_labels",
//!   "unmapped": "keep"
//! }
//! ```
//!
//! - `labels` (required): UDF label → field name. Each name may have one label, so that the
//!   renaming can be undone.
//! - `direction`: `to_labels` (the default) renames each field name that has a label to the label;
//!   `to_names` renames each label back to its field name.
//! - `unmapped`: what to do with a UDF (a key ending in `_udf`) that has no label in `labels`:
//!   `keep` it under its name (the default) or `drop` it. Other fields are always kept.
//!
//! Only the top-level keys of `entity` and of `changes` are renamed, in place: the key order does
//! not change. A field is not renamed onto a key the object already has (the suite's own field
//! called like a label, say); it keeps its name and a warning is logged.

use rulehook_plugin_sdk::config::{self, ConfigError};
use rulehook_plugin_sdk::serde_json::Map;
use rulehook_plugin_sdk::udf::{self, LabelMap};
use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, log};
use serde::Deserialize;

/// The plugin: renames UDF keys.
pub struct UdfLabels;

impl Plugin for UdfLabels {
    fn transform(ctx: &Context, mut payload: Value, config: &Value) -> Result<Outcome, String> {
        let config = Renaming::from_config(config)?;
        if let Value::Object(root) = &mut payload {
            for part in ["entity", "changes"] {
                if let Some(Value::Object(fields)) = root.get_mut(part) {
                    config.rename(ctx, part, fields);
                }
            }
        }
        Ok(Outcome::Send(payload))
    }

    fn validate_config(config: &Value) -> Result<(), String> {
        Renaming::from_config(config)?;
        Ok(())
    }
}

rulehook_plugin_sdk::export_plugin!(UdfLabels);

/// The config as written in the rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// UDF label → field name. An `Option` only so that its absence gets a message of its own.
    labels: Option<LabelMap>,
    /// Which way to rename.
    #[serde(default)]
    direction: Direction,
    /// What to do with UDFs that have no label.
    #[serde(default)]
    unmapped: Unmapped,
}

/// Which way to rename.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Direction {
    /// Field names to labels.
    #[default]
    ToLabels,
    /// Labels to field names.
    ToNames,
}

/// What to do with a UDF that has no label.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Unmapped {
    /// Keep it under its field name.
    #[default]
    Keep,
    /// Leave it out.
    Drop,
}

/// What happens to one key.
#[derive(Debug, PartialEq, Eq)]
enum Fate<'a> {
    Keep,
    Rename(&'a str),
    Drop,
}

/// The config with its labels checked.
struct Renaming {
    labels: LabelMap,
    direction: Direction,
    unmapped: Unmapped,
}

impl Renaming {
    fn from_config(config: &Value) -> Result<Self, ConfigError> {
        let Config {
            labels,
            direction,
            unmapped,
        } = config::parse(config)?;
        let labels = labels.ok_or_else(|| {
            ConfigError::new(
                "labels",
                "`labels` is required: an object from UDF label to field name, such as \
                 {\"Rework Counter\": \"rework_counter_udf\"}",
            )
        })?;
        Ok(Self {
            labels,
            direction,
            unmapped,
        })
    }

    /// What becomes of the top-level key `key`.
    fn fate(&self, key: &str) -> Fate<'_> {
        let renamed = match self.direction {
            Direction::ToLabels => self.labels.label_for(key),
            Direction::ToNames => self.labels.name_for(key),
        };
        match renamed {
            Some(to) if to != key => Fate::Rename(to),
            Some(_) => Fate::Keep,
            // A UDF is unmapped when it still carries its name and the map has no label for it,
            // whichever way the renaming goes.
            None if self.unmapped == Unmapped::Drop
                && udf::is_udf(key)
                && self.labels.label_for(key).is_none() =>
            {
                Fate::Drop
            }
            None => Fate::Keep,
        }
    }

    /// Renames the keys of `fields` (the payload's `part`), keeping their order.
    fn rename(&self, ctx: &Context, part: &str, fields: &mut Map<String, Value>) {
        let fates: Vec<Fate<'_>> = fields
            .keys()
            .map(|key| match self.fate(key) {
                // Renamed onto a field the object keeps, it would overwrite that field's value.
                Fate::Rename(to) if fields.contains_key(to) && self.fate(to) == Fate::Keep => {
                    log::warn(format!(
                        "rule {}: {part}.{key} is not renamed to \"{to}\" because {part} already \
                         has a field \"{to}\"",
                        ctx.rule
                    ));
                    Fate::Keep
                }
                fate => fate,
            })
            .collect();
        if fates.iter().all(|fate| *fate == Fate::Keep) {
            return;
        }
        let old = std::mem::take(fields);
        let mut renamed = Map::with_capacity(old.len());
        for ((key, value), fate) in old.into_iter().zip(fates) {
            match fate {
                Fate::Keep => {
                    renamed.insert(key, value);
                }
                Fate::Rename(to) => {
                    renamed.insert(to.to_owned(), value);
                }
                Fate::Drop => {}
            }
        }
        *fields = renamed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rulehook_plugin_sdk::json;
    use rulehook_plugin_sdk::log::Level;
    use rulehook_plugin_sdk::testing::{
        context_for, run, sample_create, sample_delete, sample_update, validate,
    };

    const LABELS: &str = r#"{"Rework Counter": "rework_counter_udf", "Severity Note": "note_udf"}"#;

    fn labels() -> Value {
        rulehook_plugin_sdk::serde_json::from_str(LABELS).expect("valid JSON")
    }

    fn send(payload: &Value, config: &Value) -> Value {
        let (result, _) = run::<UdfLabels>(&context_for(payload), payload, config);
        match result {
            Ok(Outcome::Send(out)) => out,
            other => panic!("{config}: expected Send, got {other:?}"),
        }
    }

    /// Top-level keys of `value`, in order.
    fn keys(value: &Value) -> Vec<&str> {
        value
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    #[test]
    fn renames_entity_and_changes_keys_in_place() {
        // (direction, unmapped, entity keys after, changes keys after)
        let cases: &[(&str, &str, &[&str], &[&str])] = &[
            (
                "to_labels",
                "keep",
                &[
                    "id",
                    "type",
                    "name",
                    "description",
                    "severity",
                    "phase",
                    "Rework Counter",
                    "root_cause_udf",
                    "comments",
                ],
                &["phase", "Rework Counter"],
            ),
            (
                "to_labels",
                "drop",
                &[
                    "id",
                    "type",
                    "name",
                    "description",
                    "severity",
                    "phase",
                    "Rework Counter",
                    "comments",
                ],
                &["phase", "Rework Counter"],
            ),
            // The sample carries names, not labels: to_names leaves mapped names alone and only
            // `unmapped` has an effect.
            (
                "to_names",
                "keep",
                &[
                    "id",
                    "type",
                    "name",
                    "description",
                    "severity",
                    "phase",
                    "rework_counter_udf",
                    "root_cause_udf",
                    "comments",
                ],
                &["phase", "rework_counter_udf"],
            ),
            (
                "to_names",
                "drop",
                &[
                    "id",
                    "type",
                    "name",
                    "description",
                    "severity",
                    "phase",
                    "rework_counter_udf",
                    "comments",
                ],
                &["phase", "rework_counter_udf"],
            ),
        ];
        for (direction, unmapped, entity, changes) in cases {
            let config = json!({"labels": labels(), "direction": direction, "unmapped": unmapped});
            let out = send(&sample_update(), &config);
            assert_eq!(keys(&out["entity"]), *entity, "{config}");
            assert_eq!(keys(&out["changes"]), *changes, "{config}");
        }
    }

    #[test]
    fn values_follow_their_keys_and_the_rest_is_untouched() {
        let config = json!({"labels": labels()});
        let out = send(&sample_update(), &config);
        assert_eq!(out["entity"]["Rework Counter"], 2);
        assert_eq!(
            out["changes"]["Rework Counter"],
            json!({"old": 1, "new": 2})
        );
        for key in ["event_id", "scope", "user", "rule"] {
            assert_eq!(out[key], sample_update()[key], "{key}");
        }
        // Create and delete payloads have no changes and get none.
        for payload in [sample_create(), sample_delete()] {
            let out = send(&payload, &config);
            assert!(out.get("changes").is_none(), "{out}");
        }
    }

    #[test]
    fn to_names_undoes_to_labels() {
        let labelled = send(&sample_update(), &json!({"labels": labels()}));
        assert_eq!(keys(&labelled["entity"])[6], "Rework Counter");
        let back = send(
            &labelled,
            &json!({"labels": labels(), "direction": "to_names"}),
        );
        // Compared as text: key order is part of the promise.
        assert_eq!(back.to_string(), sample_update().to_string());

        // Unmapped UDFs go when asked, in this direction too.
        let back = send(
            &labelled,
            &json!({"labels": labels(), "direction": "to_names", "unmapped": "drop"}),
        );
        let entity = keys(&back["entity"]);
        assert!(entity.contains(&"rework_counter_udf"), "{back}");
        assert!(!entity.contains(&"root_cause_udf"), "{back}");
    }

    #[test]
    fn a_rename_never_overwrites_an_existing_field() {
        let payload = json!({
            "entity": {"id": "1", "Rework Counter": "the suite's own", "rework_counter_udf": 2},
        });
        let (result, logs) = run::<UdfLabels>(
            &Context::new("r", "e", "update", "defect"),
            &payload,
            &json!({"labels": labels()}),
        );
        assert_eq!(result, Ok(Outcome::Send(payload)));
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].level, Level::Warn);
        assert_eq!(
            logs[0].message,
            "rule r: entity.rework_counter_udf is not renamed to \"Rework Counter\" because \
             entity already has a field \"Rework Counter\""
        );
    }

    #[test]
    fn payloads_without_entity_or_changes_pass_through() {
        for payload in [json!({}), json!({"entity": "x", "changes": []}), json!([1])] {
            assert_eq!(send(&payload, &json!({"labels": labels()})), payload);
        }
    }

    #[test]
    fn bad_configs_name_the_entry_and_the_fix() {
        let cases = [
            (
                Value::Null,
                "labels: `labels` is required: an object from UDF label to field name",
            ),
            (
                json!({"direction": "to_labels"}),
                "labels: `labels` is required",
            ),
            (
                json!({"labels": ["rework_counter_udf"]}),
                "labels: labels must be an object from label to field name",
            ),
            (
                json!({"labels": {"Rework Counter": 3}}),
                "labels: label \"Rework Counter\" must map to a field name string",
            ),
            (
                json!({"labels": {"A": "a_udf", "B": "a_udf"}}),
                "labels: labels \"A\" and \"B\" both map to \"a_udf\"; each field name may have one label",
            ),
            (
                json!({"labels": {}, "direction": "up"}),
                "direction: unknown variant `up`, expected `to_labels` or `to_names`",
            ),
            (
                json!({"labels": {}, "unmapped": "delete"}),
                "unmapped: unknown variant `delete`, expected `keep` or `drop`",
            ),
            (
                json!({"labels": {}, "unmaped": "drop"}),
                "unmaped: unknown field `unmaped`, expected one of `labels`, `direction`, `unmapped`",
            ),
            (
                json!("to_labels"),
                "the config must be an object such as {\"key\": \"value\"}; found a string",
            ),
        ];
        for (config, message) in cases {
            let err = validate::<UdfLabels>(&config)
                .0
                .expect_err(&config.to_string());
            assert!(
                err.starts_with(message),
                "{config}:\n  got  {err}\n  want {message}"
            );
            let payload = sample_update();
            let (result, _) = run::<UdfLabels>(&context_for(&payload), &payload, &config);
            assert_eq!(result, Err(err), "{config}");
        }
    }

    #[test]
    fn good_configs_validate() {
        for config in [
            json!({"labels": {}}),
            json!({"labels": {"A": "a_udf"}, "direction": "to_names", "unmapped": "drop"}),
        ] {
            assert_eq!(validate::<UdfLabels>(&config).0, Ok(()), "{config}");
        }
    }

    #[test]
    fn odd_payloads_get_an_answer_not_a_panic() {
        for config in [
            json!({"labels": {"A": "a", "B": "b_udf"}, "unmapped": "drop"}),
            json!({"labels": {"A": "a"}, "direction": "to_names"}),
        ] {
            for payload in rulehook_plugin_sdk::testing::odd_payloads() {
                let (result, _) = run::<UdfLabels>(&Context::default(), &payload, &config);
                if let Err(err) = result {
                    assert!(err.contains("payload"), "{config} on {payload}: {err}");
                }
            }
        }
    }
}
