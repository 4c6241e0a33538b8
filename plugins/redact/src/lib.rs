//! `redact`: masks or removes sensitive values before a payload leaves rulehook.
//!
//! Entities carry what their authors typed (descriptions naming customers, people's e-mail
//! addresses); a receiver outside the company should not get them. This plugin overwrites those
//! values with a mask, or removes them.
//!
//! Config:
//!
//! ```json
//! {"paths": ["description", "owner.email", "$.user.email"], "mode": "mask", "mask": "[redacted]"}
//! ```
//!
//! - `paths` (required, at least one): what to redact.
//!   - A field name or dotted path (`description`, `owner.email`, `comments.0.text`) names a value
//!     in the entity. It is redacted in `changes` too, so its old and new values do not leak:
//!     `description` redacts `changes.description.old` and `.new` (or, in `remove` mode, drops the
//!     `changes.description` entry), and `owner.email` redacts `email` inside
//!     `changes.owner.old` and `changes.owner.new`.
//!   - A JSONPath (starting with `$`) is evaluated against the whole payload:
//!     `$.user.email`, `$.entity.comments[*].text`. It reaches only what it names, so cover
//!     `changes` yourself if a JSONPath redacts an entity field that can change.
//!
//!   A path that matches nothing is fine: a field the source did not send needs no redaction.
//! - `mode`: `mask` (the default) replaces each value with `mask`; `remove` deletes it (from
//!   arrays too, shifting later elements down).
//! - `mask`: the replacement, any JSON value; `"[redacted]"` by default.

use rulehook_plugin_sdk::config::{self, ConfigError};
use rulehook_plugin_sdk::jsonpath::JsonPath;
use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value, json, log, path};
use serde::Deserialize;

/// The plugin: masks or removes the configured values.
pub struct Redact;

impl Plugin for Redact {
    fn transform(ctx: &Context, mut payload: Value, config: &Value) -> Result<Outcome, String> {
        let redaction = Redaction::from_config(config)?;
        let count = redaction.apply(&mut payload)?;
        log::debug(format!("rule {}: redacted {count} values", ctx.rule));
        Ok(Outcome::Send(payload))
    }

    fn validate_config(config: &Value) -> Result<(), String> {
        Redaction::from_config(config)?;
        Ok(())
    }
}

rulehook_plugin_sdk::export_plugin!(Redact);

/// The config as written in the rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// What to redact. An `Option` only so that its absence gets a message of its own.
    paths: Option<Vec<String>>,
    #[serde(default)]
    mode: Mode,
    /// Not an `Option`: `null` is a mask like any other value.
    #[serde(default = "default_mask")]
    mask: Value,
}

fn default_mask() -> Value {
    json!("[redacted]")
}

/// What to do with a value to redact.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Replace it with the mask.
    #[default]
    Mask,
    /// Delete it.
    Remove,
}

/// One entry of `paths`, parsed.
#[derive(Debug)]
enum Target {
    /// A field name or dotted path into the entity (and `changes`).
    Field(String),
    /// A JSONPath over the whole payload.
    JsonPath(JsonPath),
}

/// The checked config.
#[derive(Debug)]
struct Redaction {
    targets: Vec<Target>,
    mode: Mode,
    mask: Value,
}

impl Redaction {
    fn from_config(config: &Value) -> Result<Self, ConfigError> {
        let Config { paths, mode, mask } = config::parse(config)?;
        let Some(paths) = paths else {
            return Err(ConfigError::new(
                "paths",
                "`paths` is required: the values to redact, such as \
                 [\"description\", \"owner.email\", \"$.user.email\"]",
            ));
        };
        if paths.is_empty() {
            return Err(ConfigError::new(
                "paths",
                "is empty; list at least one value to redact, such as [\"description\"]",
            ));
        }
        let targets = paths
            .into_iter()
            .enumerate()
            .map(|(i, path)| {
                Target::parse(path)
                    .map_err(|message| ConfigError::new(format!("paths[{i}]"), message))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            targets,
            mode,
            mask,
        })
    }

    /// Redacts every target in `payload`; returns how many values were masked or removed.
    fn apply(&self, payload: &mut Value) -> Result<usize, String> {
        let mut count = 0;
        for target in &self.targets {
            count += match target {
                Target::Field(dotted) => self.redact_field(payload, dotted),
                Target::JsonPath(jsonpath) => match self.mode {
                    Mode::Mask => jsonpath.replace(payload, &self.mask),
                    Mode::Remove => jsonpath.remove(payload),
                }
                .map_err(|e| e.to_string())?,
            };
        }
        Ok(count)
    }

    /// Redacts `dotted` in the entity and in what `changes` says of it.
    fn redact_field(&self, payload: &mut Value, dotted: &str) -> usize {
        let mut count = 0;
        if let Some(entity) = payload.get_mut("entity") {
            count += self.redact_path(entity, dotted);
        }
        let Some(Value::Object(changes)) = payload.get_mut("changes") else {
            return count;
        };
        // `changes` is keyed by top-level field: {"owner": {"old": {...}, "new": {...}}}.
        let (field, below) = match dotted.split_once('.') {
            Some((field, below)) => (field, Some(below)),
            None => (dotted, None),
        };
        match (below, self.mode) {
            (None, Mode::Remove) => count += usize::from(changes.shift_remove(field).is_some()),
            (None, Mode::Mask) => match changes.get_mut(field) {
                Some(Value::Object(sides)) => {
                    for side in ["old", "new"] {
                        if let Some(value) = sides.get_mut(side) {
                            *value = self.mask.clone();
                            count += 1;
                        }
                    }
                }
                // Not the {old, new} the host builds: mask all of it rather than guess.
                Some(other) => {
                    *other = self.mask.clone();
                    count += 1;
                }
                None => {}
            },
            (Some(below), _) => {
                if let Some(Value::Object(sides)) = changes.get_mut(field) {
                    for side in ["old", "new"] {
                        if let Some(value) = sides.get_mut(side) {
                            count += self.redact_path(value, below);
                        }
                    }
                }
            }
        }
        count
    }

    /// Masks or removes the value at `dotted` in `value`, if there is one; returns 1 if there was.
    fn redact_path(&self, value: &mut Value, dotted: &str) -> usize {
        match self.mode {
            Mode::Mask => match path::get_path_mut(value, dotted) {
                Some(slot) => {
                    *slot = self.mask.clone();
                    1
                }
                None => 0,
            },
            Mode::Remove => usize::from(path::remove_path(value, dotted).is_some()),
        }
    }
}

impl Target {
    fn parse(path: String) -> Result<Self, String> {
        if !path.starts_with('$') {
            path::validate_path(&path).map_err(|e| e.to_string())?;
            return Ok(Target::Field(path));
        }
        if path.trim() == "$" {
            return Err(
                "\"$\" is the whole payload; name the values to redact, such as \"$.user.email\""
                    .to_owned(),
            );
        }
        JsonPath::parse(&path)
            .map(Target::JsonPath)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rulehook_plugin_sdk::testing::{
        context_for, run, sample_create, sample_delete, sample_update, validate,
    };

    /// `sample_update()` with an owner and a description that changed, so nested and top-level
    /// redaction of `changes` can both be seen.
    fn payload() -> Value {
        let mut payload = sample_update();
        payload["entity"]["owner"] = json!({"id": "9", "email": "dev@example.com"});
        payload["changes"]["description"] =
            json!({"old": "was ACME", "new": "Stack trace mentions customer ACME"});
        payload["changes"]["owner"] = json!({
            "old": {"id": "8", "email": "old@example.com"},
            "new": {"id": "9", "email": "dev@example.com"},
        });
        payload
    }

    fn send(payload: &Value, config: &Value) -> Value {
        let (result, _) = run::<Redact>(&context_for(payload), payload, config);
        match result {
            Ok(Outcome::Send(out)) => out,
            other => panic!("{config}: expected Send, got {other:?}"),
        }
    }

    /// `payload()` with `edits` applied: each sets (or, with `None`, removes) a dotted path.
    fn expected(edits: &[(&str, Option<Value>)]) -> Value {
        let mut payload = payload();
        for (at, value) in edits {
            match value {
                Some(value) => {
                    path::set_path(&mut payload, at, value.clone()).expect("a settable path");
                }
                None => {
                    path::remove_path(&mut payload, at).expect("a present path");
                }
            }
        }
        payload
    }

    #[test]
    fn masks_and_removes_what_the_paths_name() {
        let m = || Some(json!("[redacted]"));
        let cases: Vec<(Value, Value)> = vec![
            // A field: in the entity, and both sides of its change.
            (
                json!({"paths": ["description"]}),
                expected(&[
                    ("entity.description", m()),
                    ("changes.description.old", m()),
                    ("changes.description.new", m()),
                ]),
            ),
            (
                json!({"paths": ["description"], "mode": "remove"}),
                expected(&[("entity.description", None), ("changes.description", None)]),
            ),
            // A dotted path: inside the entity's value and inside both sides of its change.
            (
                json!({"paths": ["owner.email"]}),
                expected(&[
                    ("entity.owner.email", m()),
                    ("changes.owner.old.email", m()),
                    ("changes.owner.new.email", m()),
                ]),
            ),
            (
                json!({"paths": ["owner.email"], "mode": "remove"}),
                expected(&[
                    ("entity.owner.email", None),
                    ("changes.owner.old.email", None),
                    ("changes.owner.new.email", None),
                ]),
            ),
            // A field that did not change: only the entity.
            (
                json!({"paths": ["name", "comments.1.text"]}),
                expected(&[("entity.name", m()), ("entity.comments.1.text", m())]),
            ),
            // JSONPaths: over the whole payload, nothing else.
            (
                json!({"paths": ["$.user.email"]}),
                expected(&[("user.email", m())]),
            ),
            (
                json!({"paths": ["$.entity.comments[?@.author=='bot'].text", "$.user.email"], "mode": "remove"}),
                expected(&[
                    ("entity.comments.2.text", None),
                    ("entity.comments.0.text", None),
                    ("user.email", None),
                ]),
            ),
            (
                json!({"paths": ["$.entity.comments[?@.author=='bot']"], "mode": "remove"}),
                expected(&[("entity.comments.2", None), ("entity.comments.0", None)]),
            ),
            // Paths that match nothing.
            (
                json!({"paths": ["missing", "owner.phone", "name.first", "$.nope", "$.entity.comments[9]"]}),
                payload(),
            ),
            // Any JSON value masks.
            (
                json!({"paths": ["owner"], "mask": null}),
                expected(&[
                    ("entity.owner", Some(Value::Null)),
                    ("changes.owner.old", Some(Value::Null)),
                    ("changes.owner.new", Some(Value::Null)),
                ]),
            ),
            (
                json!({"paths": ["$.scope.workspace_id"], "mask": {"hidden": true}}),
                expected(&[("scope.workspace_id", Some(json!({"hidden": true})))]),
            ),
        ];
        for (config, expected) in cases {
            let out = send(&payload(), &config);
            // As text: removal must not reorder what is left.
            assert_eq!(out.to_string(), expected.to_string(), "{config}");
        }
    }

    #[test]
    fn payloads_without_changes_or_entity() {
        let config = json!({"paths": ["name"], "mode": "remove"});
        for payload in [sample_create(), sample_delete()] {
            let out = send(&payload, &config);
            assert!(out["entity"].get("name").is_none(), "{out}");
            assert!(out.get("changes").is_none(), "{out}");
        }
        for payload in [
            json!({}),
            json!({"entity": "x", "changes": [1]}),
            json!([1]),
        ] {
            assert_eq!(send(&payload, &config), payload);
        }
        // A change entry that is not the host's {old, new} is masked whole rather than leaked.
        let payload = json!({"changes": {"name": "Crash"}});
        assert_eq!(
            send(&payload, &json!({"paths": ["name"]})),
            json!({"changes": {"name": "[redacted]"}})
        );
    }

    #[test]
    fn logs_how_many_values_without_logging_them() {
        let payload = payload();
        let (result, logs) = run::<Redact>(
            &context_for(&payload),
            &payload,
            &json!({"paths": ["owner.email", "$.user.email"]}),
        );
        assert!(result.is_ok());
        let messages: Vec<&str> = logs.iter().map(|l| l.message.as_str()).collect();
        assert_eq!(messages, ["rule defect-reopened: redacted 4 values"]);
    }

    #[test]
    fn bad_configs_name_the_entry_and_the_fix() {
        let cases = [
            (
                Value::Null,
                "paths: `paths` is required: the values to redact",
            ),
            (json!({"mode": "remove"}), "paths: `paths` is required"),
            (
                json!({"paths": []}),
                "paths: is empty; list at least one value to redact",
            ),
            (
                json!({"paths": "description"}),
                "paths: invalid type: string \"description\", expected a sequence",
            ),
            (
                json!({"paths": ["name", 3]}),
                "paths[1]: invalid type: integer `3`, expected a string",
            ),
            (
                json!({"paths": ["name", "owner..email"]}),
                "paths[1]: field path \"owner..email\" has an empty segment",
            ),
            (json!({"paths": [""]}), "paths[0]: field path is empty"),
            (
                json!({"paths": ["$"]}),
                "paths[0]: \"$\" is the whole payload; name the values to redact",
            ),
            (
                json!({"paths": ["$.user[?"]}),
                "paths[0]: JSONPath \"$.user[?\" is invalid: ",
            ),
            (
                json!({"paths": ["name"], "mode": "hide"}),
                "mode: unknown variant `hide`, expected `mask` or `remove`",
            ),
            (
                json!({"paths": ["name"], "masks": "x"}),
                "masks: unknown field `masks`, expected one of `paths`, `mode`, `mask`",
            ),
            (
                json!(["name"]),
                "the config must be an object such as {\"key\": \"value\"}; found an array",
            ),
        ];
        for (config, message) in cases {
            let err = validate::<Redact>(&config)
                .0
                .expect_err(&config.to_string());
            assert!(
                err.starts_with(message),
                "{config}:\n  got  {err}\n  want {message}"
            );
            let payload = payload();
            let (result, _) = run::<Redact>(&context_for(&payload), &payload, &config);
            assert_eq!(result, Err(err), "{config}");
        }
    }

    #[test]
    fn good_configs_validate() {
        for config in [
            json!({"paths": ["description"]}),
            json!({"paths": ["owner.email", "$.user.email", "$..email"], "mode": "remove"}),
            json!({"paths": ["x"], "mode": "mask", "mask": null}),
        ] {
            assert_eq!(validate::<Redact>(&config).0, Ok(()), "{config}");
        }
    }

    #[test]
    fn odd_payloads_get_an_answer_not_a_panic() {
        for config in [
            json!({"paths": ["a.b.1.c", "owner.email", "comments.0.0", "$..c", "$.user"]}),
            json!({"paths": ["a", "owner", "$.entity.a.b[*]"], "mode": "remove"}),
        ] {
            for payload in rulehook_plugin_sdk::testing::odd_payloads() {
                let (result, _) = run::<Redact>(&Context::default(), &payload, &config);
                if let Err(err) = result {
                    assert!(err.contains("payload"), "{config} on {payload}: {err}");
                }
            }
        }
    }
}
