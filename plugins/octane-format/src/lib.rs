//! `octane-format`: reshapes the payload into the ALM suite's (Octane's) webhook format.
//!
//! Receivers written for the suite's own webhooks (CI servers, integrations) expect its payload,
//! not rulehook's. Put this plugin last in the chain, after any that select or redact fields.
//!
//! Config: `{"server_url": "https://alm.example.com"}` (required): the suite's base URL, which
//! the format carries so receivers can link back to the entity.
//!
//! From rulehook's payload
//!
//! ```json
//! {"event_type": "update", "scope": {"sharedspace_id": 1001, "workspace_id": 1002},
//!  "user": {"id": "1001", "email": "admin@example.com"},
//!  "entity": {"id": "2013", "type": "defect", "name": "Crash on save"},
//!  "changes": {"name": {"old": "Crash", "new": "Crash on save"}}, ...}
//! ```
//!
//! it makes
//!
//! ```json
//! {"server_url": "https://alm.example.com", "event_type": "update",
//!  "sharedspace_id": 1001, "workspace_id": 1002,
//!  "username": {"id": "1001", "email": "admin@example.com"},
//!  "data": [{"entity": {"type": "defect", "id": "2013", "name": "Crash on save"},
//!            "changes": {"name": {"oldValue": "Crash", "newValue": "Crash on save"}}}]}
//! ```
//!
//! A missing scope id is `null`, and so is `username` when the event has no user. `changes` is
//! there for `update` events only; the entity's other fields follow `type` and `id` in their own
//! order.

use rulehook_plugin_sdk::config::ConfigError;
use rulehook_plugin_sdk::path::kind;
use rulehook_plugin_sdk::serde_json::Map;
use rulehook_plugin_sdk::{Context, Outcome, Plugin, Value};

/// The plugin: builds the suite's webhook payload.
pub struct OctaneFormat;

impl Plugin for OctaneFormat {
    fn transform(ctx: &Context, payload: Value, config: &Value) -> Result<Outcome, String> {
        let server_url = server_url(config)?;
        let Value::Object(mut payload) = payload else {
            return Err(format!(
                "the payload is {}, not an object; octane-format expects the event payload the \
                 host builds, so check the plugin before it in the chain",
                kind(&payload)
            ));
        };
        let event_type = payload
            .shift_remove("event_type")
            .unwrap_or_else(|| Value::String(ctx.event_type.clone()));
        let entity = match payload.shift_remove("entity") {
            Some(Value::Object(entity)) => entity,
            other => {
                return Err(format!(
                    "the payload's `entity` is {}; octane-format needs the entity object the host \
                     builds, so check the plugin before it in the chain",
                    other.as_ref().map_or("missing", kind)
                ));
            }
        };
        let mut item = Map::new();
        item.insert(
            "entity".into(),
            Value::Object(type_and_id_first(entity, &ctx.entity_type)),
        );
        if event_type == "update" {
            let changes = match payload.shift_remove("changes") {
                Some(Value::Object(changes)) => changes,
                _ => Map::new(),
            };
            item.insert("changes".into(), Value::Object(old_and_new_values(changes)));
        }

        let mut scope = match payload.shift_remove("scope") {
            Some(Value::Object(scope)) => scope,
            _ => Map::new(),
        };
        let mut out = Map::new();
        out.insert("server_url".into(), Value::String(server_url.to_owned()));
        out.insert("event_type".into(), event_type);
        for id in ["sharedspace_id", "workspace_id"] {
            out.insert(id.into(), scope.shift_remove(id).unwrap_or(Value::Null));
        }
        out.insert("username".into(), username(payload.shift_remove("user")));
        out.insert("data".into(), Value::Array(vec![Value::Object(item)]));
        Ok(Outcome::Send(Value::Object(out)))
    }

    fn validate_config(config: &Value) -> Result<(), String> {
        server_url(config)?;
        Ok(())
    }
}

rulehook_plugin_sdk::export_plugin!(OctaneFormat);

/// The config keys this plugin understands.
const SETTINGS: &[&str] = &["server_url"];

/// The configured `server_url`, checked.
fn server_url(config: &Value) -> Result<&str, ConfigError> {
    let required = || {
        ConfigError::new(
            "",
            "`server_url` is required: the ALM server's base URL, such as https://alm.example.com",
        )
    };
    let settings = match config {
        Value::Null => return Err(required()),
        Value::Object(settings) => settings,
        other => {
            return Err(ConfigError::new(
                "",
                format!(
                    "the config must be an object such as {{\"server_url\": \"https://alm.example.com\"}}; \
                     found {}",
                    kind(other)
                ),
            ));
        }
    };
    if let Some(unknown) = settings.keys().find(|k| !SETTINGS.contains(&k.as_str())) {
        return Err(ConfigError::new(
            unknown.as_str(),
            "unknown setting; octane-format takes only `server_url`",
        ));
    }
    match settings.get("server_url") {
        None | Some(Value::Null) => Err(required()),
        Some(Value::String(url)) => {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !url.chars().any(char::is_whitespace) => Ok(url),
                _ => Err(ConfigError::new(
                    "server_url",
                    format!(
                        "\"{url}\" is not an http:// or https:// URL; give the ALM server's base \
                         URL, such as https://alm.example.com"
                    ),
                )),
            }
        }
        Some(other) => Err(ConfigError::new(
            "server_url",
            format!(
                "must be a string such as \"https://alm.example.com\"; found {}",
                kind(other)
            ),
        )),
    }
}

/// The entity with `type` then `id` first, as the suite sends them. An entity without `type`
/// gets the event's entity type (`null` if that is unknown too).
fn type_and_id_first(mut entity: Map<String, Value>, entity_type: &str) -> Map<String, Value> {
    let mut out = Map::with_capacity(entity.len() + 2);
    let ty = match entity.shift_remove("type") {
        Some(ty) if !ty.is_null() => ty,
        _ if entity_type.is_empty() => Value::Null,
        _ => Value::String(entity_type.to_owned()),
    };
    out.insert("type".into(), ty);
    out.insert(
        "id".into(),
        entity.shift_remove("id").unwrap_or(Value::Null),
    );
    out.extend(entity);
    out
}

/// `{field: {old, new}}` as the suite's `{field: {oldValue, newValue}}`.
fn old_and_new_values(changes: Map<String, Value>) -> Map<String, Value> {
    changes
        .into_iter()
        .map(|(field, change)| {
            let (old, new) = match change {
                Value::Object(mut sides) => (
                    sides.shift_remove("old").unwrap_or(Value::Null),
                    sides.shift_remove("new").unwrap_or(Value::Null),
                ),
                // Not the {old, new} the host builds: all that is known is the value now.
                other => (Value::Null, other),
            };
            let mut sides = Map::with_capacity(2);
            sides.insert("oldValue".into(), old);
            sides.insert("newValue".into(), new);
            (field, Value::Object(sides))
        })
        .collect()
}

/// The suite's `username`: the acting user's id and e-mail, or `null` when there is none.
fn username(user: Option<Value>) -> Value {
    let Some(Value::Object(mut user)) = user else {
        return Value::Null;
    };
    let mut out = Map::with_capacity(2);
    for key in ["id", "email"] {
        out.insert(key.into(), user.shift_remove(key).unwrap_or(Value::Null));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rulehook_plugin_sdk::json;
    use rulehook_plugin_sdk::testing::{
        context_for, run, sample_create, sample_delete, sample_update, validate,
    };

    const CONFIG: &str = r#"{"server_url": "https://alm.example.com"}"#;

    fn send(payload: &Value) -> Value {
        let config: Value = rulehook_plugin_sdk::serde_json::from_str(CONFIG).expect("JSON");
        let (result, logs) = run::<OctaneFormat>(&context_for(payload), payload, &config);
        assert!(logs.is_empty(), "{logs:?}");
        match result {
            Ok(Outcome::Send(out)) => out,
            other => panic!("expected Send, got {other:?}"),
        }
    }

    /// The output for each sample, compared as text so key order counts.
    #[test]
    fn emits_the_suite_format_exactly() {
        let entity = json!({
            "type": "defect",
            "id": "2013",
            "name": "Crash on save",
            "description": "Stack trace mentions customer ACME",
            "severity": {"id": "list_node.severity.high", "name": "High"},
            "phase": {"id": "phase.defect.opened", "name": "Opened"},
            "rework_counter_udf": 2,
            "root_cause_udf": "config",
            "comments": [
                {"author": "bot", "text": "auto-triaged"},
                {"author": "ann", "text": "seen it too"},
                {"author": "bot", "text": "reopened"},
            ],
        });
        let cases = [
            (
                sample_update(),
                json!({
                    "server_url": "https://alm.example.com",
                    "event_type": "update",
                    "sharedspace_id": 1001,
                    "workspace_id": 1002,
                    "username": {"id": "1001", "email": "admin@example.com"},
                    "data": [{
                        "entity": entity,
                        "changes": {
                            "phase": {
                                "oldValue": {"id": "phase.defect.fixed"},
                                "newValue": {"id": "phase.defect.opened"},
                            },
                            "rework_counter_udf": {"oldValue": 1, "newValue": 2},
                        },
                    }],
                }),
            ),
            (
                sample_create(),
                json!({
                    "server_url": "https://alm.example.com",
                    "event_type": "create",
                    "sharedspace_id": 1001,
                    "workspace_id": 1002,
                    "username": {"id": "1001", "email": "admin@example.com"},
                    "data": [{"entity": entity}],
                }),
            ),
            (
                sample_delete(),
                json!({
                    "server_url": "https://alm.example.com",
                    "event_type": "delete",
                    "sharedspace_id": 1001,
                    "workspace_id": 1002,
                    "username": null,
                    "data": [{"entity": {"type": "defect", "id": "2013", "name": "Crash on save"}}],
                }),
            ),
        ];
        for (payload, expected) in cases {
            let out = send(&payload);
            assert_eq!(
                out.to_string(),
                expected.to_string(),
                "{}",
                payload["event_type"]
            );
        }
    }

    #[test]
    fn fills_what_the_payload_lacks_with_null() {
        let payload = json!({
            "event_type": "update",
            "entity_type": "story",
            "scope": {"workspace_id": "1002"},
            "user": {"id": "7"},
            "entity": {"name": "Checkout", "id": "77"},
            "changes": {"name": {"new": "Checkout"}, "odd": 5},
        });
        let expected = json!({
            "server_url": "https://alm.example.com",
            "event_type": "update",
            "sharedspace_id": null,
            "workspace_id": "1002",
            "username": {"id": "7", "email": null},
            "data": [{
                "entity": {"type": "story", "id": "77", "name": "Checkout"},
                "changes": {
                    "name": {"oldValue": null, "newValue": "Checkout"},
                    "odd": {"oldValue": null, "newValue": 5},
                },
            }],
        });
        assert_eq!(send(&payload).to_string(), expected.to_string());

        // A custom event type has no changes; an update without any has empty ones.
        let custom = json!({"event_type": "deliver", "entity": {"id": "1", "type": "release"}});
        assert!(send(&custom)["data"][0].get("changes").is_none());
        let bare = json!({"event_type": "update", "entity": {"id": "1", "type": "release"}});
        assert_eq!(send(&bare)["data"][0]["changes"], json!({}));
        assert_eq!(send(&bare)["sharedspace_id"], Value::Null);
    }

    #[test]
    fn refuses_payloads_without_an_entity() {
        let config = json!({"server_url": "https://alm.example.com"});
        let cases = [
            (
                json!({"event_type": "create"}),
                "the payload's `entity` is missing",
            ),
            (json!({"entity": [1]}), "the payload's `entity` is an array"),
            (json!("x"), "the payload is a string"),
        ];
        for (payload, message) in cases {
            let (result, _) = run::<OctaneFormat>(&Context::default(), &payload, &config);
            let err = result.expect_err(&payload.to_string());
            assert!(err.starts_with(message), "{payload}: {err}");
        }
    }

    #[test]
    fn bad_configs_name_server_url_and_the_fix() {
        let cases = [
            (
                Value::Null,
                "`server_url` is required: the ALM server's base URL, such as https://alm.example.com",
            ),
            (
                json!({}),
                "`server_url` is required: the ALM server's base URL, such as https://alm.example.com",
            ),
            (json!({"server_url": null}), "`server_url` is required"),
            (
                json!({"server_url": "alm.example.com"}),
                "server_url: \"alm.example.com\" is not an http:// or https:// URL; give the ALM \
                 server's base URL, such as https://alm.example.com",
            ),
            (
                json!({"server_url": "ftp://alm.example.com"}),
                "server_url: \"ftp://alm.example.com\" is not an http:// or https:// URL",
            ),
            (
                json!({"server_url": "https://"}),
                "server_url: \"https://\" is not an http:// or https:// URL",
            ),
            (
                json!({"server_url": "https://alm example.com"}),
                "server_url: \"https://alm example.com\" is not an http:// or https:// URL",
            ),
            (
                json!({"server_url": 443}),
                "server_url: must be a string such as \"https://alm.example.com\"; found a number",
            ),
            (
                json!({"server_url": "https://alm.example.com", "serverurl": "x"}),
                "serverurl: unknown setting; octane-format takes only `server_url`",
            ),
            (
                json!("https://alm.example.com"),
                "the config must be an object such as {\"server_url\": \"https://alm.example.com\"}; found a string",
            ),
        ];
        for (config, message) in cases {
            let err = validate::<OctaneFormat>(&config)
                .0
                .expect_err(&config.to_string());
            assert!(
                err.starts_with(message),
                "{config}:\n  got  {err}\n  want {message}"
            );
            assert!(err.contains("server_url"), "{config}: {err}");
            let payload = sample_update();
            let (result, _) = run::<OctaneFormat>(&context_for(&payload), &payload, &config);
            assert_eq!(result, Err(err), "{config}");
        }
    }

    #[test]
    fn good_configs_validate() {
        for url in [
            "https://alm.example.com",
            "http://localhost:8080/",
            "https://a/b?c=d",
        ] {
            let config = json!({"server_url": url});
            assert_eq!(validate::<OctaneFormat>(&config).0, Ok(()), "{config}");
        }
    }

    #[test]
    fn odd_payloads_get_an_answer_not_a_panic() {
        for config in [json!({"server_url": "https://alm.example.com"})] {
            for payload in rulehook_plugin_sdk::testing::odd_payloads() {
                let (result, _) = run::<OctaneFormat>(&Context::default(), &payload, &config);
                if let Err(err) = result {
                    assert!(err.contains("payload"), "{config} on {payload}: {err}");
                }
            }
        }
    }
}
